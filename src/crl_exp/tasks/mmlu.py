"""MMLU (Hendrycks et al.): 57 subjects, 4 options, 5-shot prompts from the subject's dev rows.

Local layout: ``mmlu/dev/<subject>_dev.csv`` and ``mmlu/test/<subject>_test.csv`` (no header: question, A, B, C,
D, answer letter). Hub: ``cais/mmlu`` (``choices`` list, integer ``answer``), mapped to the same layout.
Splits: only the upstream *test* split has enough questions, so it is divided per question (seeded) into
train / validation / test (``split_fractions``); held-out numbers come from the test part, which is still
upstream test data. Dev rows are only ever few-shot examples. Accuracy is reported micro (over questions,
``accuracy``), macro (over subjects, ``accuracy_macro``) and per subject.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

from crl_exp.errors import CRLConfigError
from crl_exp.tasks.config import MMLUConfig
from crl_exp.tasks.multiple_choice import MultipleChoiceTask, options_block
from crl_exp.tasks.schema import LETTERS, Example


class MMLUTask(MultipleChoiceTask):
    config_class = MMLUConfig  # the typed task/ node (tasks/config.py)
    name = "mmlu"
    folder = "mmlu"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dev: dict[str, list[Example]] = {}

    subset_key = "subjects"

    def read_local(self) -> Iterator[tuple[str, dict[str, Any]]]:
        subjects = sorted(p.name.removesuffix("_test.csv") for p in (self.root / "test").glob("*_test.csv"))
        if not subjects:
            raise CRLConfigError(f"No <subject>_test.csv files in {str(self.root / 'test')!r}")
        for subject in subjects:
            for split in ("dev", "test"):
                path = self.require_file(self.root / split / f"{subject}_{split}.csv")
                with path.open(newline="") as fh:
                    for pos, row in enumerate(csv.reader(fh)):
                        yield split, {"subject": subject, "row": row, "pos": pos}

    def read_hub(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for split in ("dev", "test"):
            position: dict[str, int] = {}
            for row in self.hub_dataset(split):
                subject = row["subject"]
                position[subject] = position.get(subject, -1) + 1
                yield split, {"subject": subject, "pos": position[subject],
                              "row": [row["question"], *row["choices"], LETTERS[int(row["answer"])]]}

    def to_example(self, upstream_split: str, row: dict[str, Any], index: int) -> Example:
        fields = row["row"]
        if len(fields) != 6:
            raise ValueError(f"expected 6 columns, got {len(fields)}")
        question, *choices, answer = fields
        answer = answer.strip().upper()
        if answer not in "ABCD" or not answer or not question.strip():
            raise ValueError(f"bad answer letter {answer!r} or empty question")
        subject = row["subject"]
        ex = Example(id=f"{subject}/{upstream_split}/{row['pos']}", task=self.name,
                     question=question, answer=answer, group=subject, choices=tuple(choices),
                     meta={"upstream_split": upstream_split})
        if upstream_split == "dev":
            self._dev.setdefault(subject, []).append(ex)
        return ex

    def cluster(self, ex: Example) -> str:
        return ex.group  # questions of one subject share its few-shot prompt and its difficulty

    def confirm_unit(self, ex: Example) -> str:
        return ex.id  # questions of a subject are not near-twins: both parts keep every subject

    def keep(self, ex: Example) -> bool:
        return ex.meta["upstream_split"] == "test"  # dev rows are the few-shot pool only

    def few_shot_prefix(self, ex: Example) -> str:
        """The subject header and its dev-row exemplars: shared by every question of the subject."""
        self.split("test")  # make sure the dev pool is loaded
        subject = ex.group.replace("_", " ")
        parts = [f"The following are multiple choice questions (with answers) about {subject}.\n"]
        for shot in self._dev.get(ex.group, [])[: int(self.cfg.n_shots)]:
            parts.append(f"{shot.question}\n{options_block(shot.choices)}\nAnswer: {shot.answer}\n")
        return "\n".join(parts) + "\n"

    def user_text(self, ex: Example) -> str:
        return f"{self.few_shot_prefix(ex)}{ex.question}\n{options_block(ex.choices)}\nAnswer:"
