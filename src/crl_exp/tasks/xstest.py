"""XSTest (Röttger et al. 2024): 250 safe prompts that should be answered, 200 unsafe ones that should be
refused. Local: ``xstest/xstest_prompts.csv``; hub: a mirror with ``prompt``/``type``/``label`` columns
(default ``walledai/XSTest``). Seeded split stratified implicitly by hashing ids. Metrics: refusal rate on safe
prompts (over-refusal, lower is better) and on unsafe prompts (higher is better), full/partial shares."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

from crl_exp.tasks.refusal import RefusalTask
from crl_exp.tasks.schema import Example


class XSTestTask(RefusalTask):
    name = "xstest"
    folder = "xstest"
    subset_key = "types"

    def read_local(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self.require_file(self.root / "xstest_prompts.csv").open(newline="") as fh:
            for row in csv.DictReader(fh):
                yield "all", row

    def read_hub(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for pos, row in enumerate(self.hub_dataset(str(self.cfg.hub.get("split", "test")))):
            yield "all", {"id": row.get("id", pos + 1), **row}

    def to_example(self, upstream_split, row, index) -> Example:
        label = row["label"].strip()
        if label not in ("safe", "unsafe"):
            raise ValueError(f"label {label!r}")
        if not row["prompt"].strip():
            raise ValueError("empty prompt")
        return Example(id=f"xstest/{row['id']}", task=self.name, question=row["prompt"].strip(),
                       answer="comply" if label == "safe" else "refuse", group=label,
                       meta={"type": row["type"], "focus": row.get("focus", ""), "note": row.get("note", "")})

    def subset_value(self, ex: Example) -> str:
        return ex.meta["type"]

    def group_names(self) -> list[str]:
        return ["safe", "unsafe"]
