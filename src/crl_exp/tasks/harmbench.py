"""HarmBench (Mazeika et al. 2024) text behaviours: every behaviour should be refused.

Local: ``harmbench/harmbench_behaviors_text_{val,test}.csv``; hub: ``walledai/HarmBench`` (configs
``standard``/``contextual``/``copyright``; ``prompt``, ``category``, ``context``), mapped to the CSV layout.
Splits: upstream val is the validation split; upstream test is divided (seeded) into train and test by a hash of
the behaviour, or of its ``ContextString`` for contextual rows, so two behaviours over one passage never straddle
train and test.
Contextual behaviours get their ``ContextString`` prepended. A refusal judge gives refusal rates; the attack
success rate is HarmBench's own measure and comes only from a behaviour classifier (``task/judge=
behaviour_classifier``: its 13B classifier on a GPU): the two are different numbers, each under its own name with
its judge's."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from typing import Any

from crl_exp.tasks import splits as splitting
from crl_exp.tasks.config import HarmBenchConfig
from crl_exp.tasks.refusal import RefusalTask
from crl_exp.tasks.schema import Example

FUNCTIONAL = ("standard", "contextual", "copyright")


class HarmBenchTask(RefusalTask):
    config_class = HarmBenchConfig  # the typed task/ node (tasks/config.py)
    name = "harmbench"
    folder = "harmbench"
    subset_key = "functional_categories"

    def read_local(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for split in ("val", "test"):
            path = self.require_file(self.root / f"harmbench_behaviors_text_{split}.csv")
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    yield split, row

    def read_hub(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for config in FUNCTIONAL:
            for pos, row in enumerate(self.hub_dataset(str(self.cfg.hub.split or "train"), name=config)):
                yield "test", {"Behavior": row["prompt"], "FunctionalCategory": config,
                               "SemanticCategory": row.get("category", ""), "ContextString": row.get("context") or "",
                               "BehaviorID": row.get("BehaviorID") or f"{config}_{pos}"}

    def to_example(self, upstream_split, row, index) -> Example:
        functional = row["FunctionalCategory"].strip()
        if functional not in FUNCTIONAL:
            raise ValueError(f"FunctionalCategory {functional!r}")
        if not row["Behavior"].strip() or not row["BehaviorID"].strip():
            raise ValueError("empty behaviour or id")
        return Example(id=f"harmbench/{row['BehaviorID']}", task=self.name, question=row["Behavior"].strip(),
                       answer="refuse", group=functional, context=(row.get("ContextString") or "").strip(),
                       meta={"upstream_split": upstream_split, "semantic_category": row.get("SemanticCategory", "")})

    def cluster(self, ex: Example) -> str:
        """Contextual behaviours sharing a ContextString (e.g. ``..._1``/``..._2`` of one passage) are one unit."""
        if ex.context:
            return "context:" + hashlib.sha256(ex.context.encode()).hexdigest()[:16]
        return ex.id

    def assign_split(self, ex: Example) -> str:
        if ex.meta["upstream_split"] == "val":
            return "validation"
        fractions = dict(self.cfg.split_fractions)
        return splitting.assign(self.cluster(ex), self.seed, {"train": fractions["train"], "test": fractions["test"]})

    def group_names(self) -> list[str]:
        return list(FUNCTIONAL)

    @property
    def primary_key(self) -> str:
        """A behaviour classifier measures attack success, not refusal: the comparison decides on ``correct``
        (the behaviour not carried out: higher is better, as for the refusal rate)."""
        if getattr(self.judge, "measures", "refusal") == "attack_success":
            return f"correct:{self.judge.name}"
        return super().primary_key
