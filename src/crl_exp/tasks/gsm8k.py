"""GSM8K (Cobbe et al. 2021): grade-school maths, few-shot chain of thought, exact match of the final number.

Local layout: ``gsm8k/train.jsonl`` and ``gsm8k/test.jsonl`` (``question``, ``answer`` ending in ``#### N``);
hub: ``openai/gsm8k`` (config ``main``), same columns. Splits: upstream test is the test split; upstream train
is divided (seeded) into train / validation, minus the few-shot exemplars, which never appear in any split.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import torch

from crl_exp.errors import CRLConfigError
from crl_exp.tasks import splits as splitting
from crl_exp.tasks.base import Task
from crl_exp.tasks.config import GSM8KConfig
from crl_exp.tasks.metrics import GroupedMean
from crl_exp.tasks.parsing import gsm8k_gold, parse_gsm8k_completion
from crl_exp.tasks.schema import Example

_CALC = re.compile(r"<<[^>]*>>")


class GSM8KTask(Task):
    config_class = GSM8KConfig  # the typed task/ node (tasks/config.py)
    name = "gsm8k"
    kind = "generation"
    folder = "gsm8k"

    reference_marker = "####"
    REWARDS = ("exact", "reference_likelihood")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shots: list[Example] = []
        self._prefix: str | None = None  # the exemplars block, built once (few_shot_prefix)
        if self.cfg.reward not in self.REWARDS:
            raise CRLConfigError(f"task.reward for gsm8k must be one of {self.REWARDS}, got {self.cfg.reward!r}")

    def reference_answers(self, batch: list[Example]) -> list[str] | None:
        """``#### <gold>``, the exemplars' answer line, when the reward is its likelihood (VeriFree)."""
        if self.cfg.reward != "reference_likelihood":
            return None
        return [f"#### {ex.answer}" for ex in batch]

    def read_local(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for split in ("train", "test"):
            path = self.require_file(self.root / f"{split}.jsonl")
            with path.open() as fh:
                for pos, line in enumerate(fh):
                    if line.strip():
                        try:
                            yield split, {**json.loads(line), "pos": pos}
                        except json.JSONDecodeError as exc:
                            yield split, {"pos": pos, "_error": f"bad JSON: {exc}"}

    def read_hub(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for split in ("train", "test"):
            for pos, row in enumerate(self.hub_dataset(split)):
                yield split, {**row, "pos": pos}

    def to_example(self, upstream_split: str, row: dict[str, Any], index: int) -> Example:
        if "_error" in row:
            raise ValueError(row["_error"])
        question = row["question"].strip()
        if not question:
            raise ValueError("empty question")
        return Example(id=f"{upstream_split}/{row['pos']}", task=self.name, question=question,
                       answer=gsm8k_gold(row["answer"]), group="all",
                       meta={"upstream_split": upstream_split, "solution": _CALC.sub("", row["answer"]).strip()})

    def shot_ids(self) -> set[str]:
        """Few-shot exemplars: a seeded choice of upstream train rows, excluded from every split."""
        return {f"train/{i}" for i in self.cfg.shot_rows}

    def assign_split(self, ex: Example) -> str:
        if ex.meta["upstream_split"] == "test":
            return "test"
        fractions = dict(self.cfg.split_fractions)
        return splitting.assign(ex.id, self.seed, {"train": fractions["train"], "validation": fractions["validation"]})

    def keep(self, ex: Example) -> bool:
        if ex.id in self.shot_ids():
            self._shots.append(ex)
            return False
        return True

    def few_shot_prefix(self, ex: Example) -> str:
        """The exemplars: the same for every question, built once (every prompt's text starts with it: rebuilding
        it per call copied the 7k-row train split each time, a third of a tiny-model training run's time)."""
        if self._prefix is None:
            self.split("train")  # loads the splits, which sets the exemplars aside
            shots = sorted(self._shots, key=lambda e: list(self.cfg.shot_rows).index(int(e.id.split("/")[1])))
            self._prefix = "".join(f"Question: {s.question}\nAnswer: {s.meta['solution']}\n\n" for s in shots)
        return self._prefix

    def user_text(self, ex: Example) -> str:
        return f"{self.few_shot_prefix(ex)}Question: {ex.question}\nAnswer:"

    def score_batch(self, examples, prompts, completions, option_probs=None):
        records = []
        for ex, completion in zip(examples, completions, strict=True):
            parsed = parse_gsm8k_completion(completion)
            correct = float(parsed is not None and parsed == ex.answer)
            records.append({"group": "all", "parsed": parsed, "valid": parsed is not None, "correct": correct,
                            "reward": correct})
        return records

    def metrics_from_records(self, records: list[dict[str, Any]]) -> dict[str, float]:
        metric = GroupedMean("exact_match", ["all"])
        metric.update(torch.tensor([r["correct"] for r in records]), torch.zeros(len(records), dtype=torch.long))
        out = metric.compute()
        out["invalid_rate"] = sum(not r["valid"] for r in records) / max(1, len(records))
        out["reward"] = sum(r["reward"] for r in records) / len(records) if records else float("nan")
        if records and all("reference_likelihood" in r for r in records):
            out["reference_likelihood"] = sum(r["reference_likelihood"] for r in records) / len(records)
        return out
