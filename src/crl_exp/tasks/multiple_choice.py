"""Shared scoring for option-letter tasks (MMLU, BBQ).

docs/design.md §5: report accuracy both *unconstrained* (the letter parsed from the generated text; anything else is
invalid and wrong) and *constrained* (argmax of the model's probabilities over the option letters), plus the
invalid-answer rate, because steering can "gain" accuracy just by removing invalid outputs. Rewards:
``exact`` (1 if the unconstrained answer is right), ``dense`` (probability of the right letter, all its
spellings summed, under the *full* next-token distribution), the latter giving small models a learning signal,
or ``margin`` (that probability minus the largest other letter's, in [-1, 1]; positive exactly when the gold
letter is the most likely letter). Renormalising over the option letters would let a policy push probability off
the letters at no cost; ``letter_mass`` (probability on any option letter) makes such a shift visible. ``dense``
still pays for pushing mass *onto* every letter (a format gain, measured in experiments/crl_results.md);
``margin`` pays only for the gold letter gaining on its best rival.
"""

from __future__ import annotations

from typing import Any

import torch

from crl_exp.tasks.base import Task
from crl_exp.tasks.metrics import GroupedMean
from crl_exp.tasks.parsing import parse_letter
from crl_exp.tasks.schema import LETTERS, Example


class MultipleChoiceTask(Task):
    kind = "multiple_choice"

    @property
    def reward_kind(self) -> str:
        kind = self.cfg.reward
        if kind not in ("exact", "dense", "margin"):
            raise ValueError(f"task.reward must be exact, dense or margin, got {kind!r}")
        return kind

    def scored_letters(self, batch: list[Example]) -> str:
        return LETTERS[: max((len(e.choices) for e in batch), default=0)]

    def group_names(self) -> list[str]:
        if getattr(self, "_group_names", None) is None:
            self._group_names = sorted({e.group for s in ("train", "validation", "test") for e in self.split(s)})
        return self._group_names

    def score_batch(self, examples: list[Example], prompts: list[str], completions: list[str],
                    option_probs: torch.Tensor | None) -> list[dict[str, Any]]:
        records = []
        for i, (ex, completion) in enumerate(zip(examples, completions, strict=True)):
            letters = self.option_letters(ex)
            parsed = parse_letter(completion, len(letters))
            correct = parsed == ex.answer
            rec: dict[str, Any] = {"group": ex.group, "parsed": parsed, "valid": parsed is not None,
                                   "correct": float(correct)}
            if option_probs is not None:
                probs = option_probs[i, : len(letters)]
                gold = letters.index(ex.answer)
                rec["gold_prob"] = float(probs[gold])
                rec["gold_margin"] = rec["gold_prob"] - float(torch.cat([probs[:gold], probs[gold + 1:]]).max())
                rec["letter_mass"] = float(probs.sum())
                rec["constrained"] = letters[int(probs.argmax())]
                rec["constrained_correct"] = float(rec["constrained"] == ex.answer)
            dense = {"dense": "gold_prob", "margin": "gold_margin"}.get(self.reward_kind)
            rec["reward"] = rec[dense] if dense in rec else float(correct)
            records.append(rec)
        return records

    def grouped(self, records: list[dict[str, Any]], key: str, prefix: str) -> dict[str, float]:
        names = self.group_names()
        index = {n: i for i, n in enumerate(names)}
        metric = GroupedMean(prefix, names)
        metric.update(torch.tensor([r[key] for r in records], dtype=torch.float),
                      torch.tensor([index[r["group"]] for r in records]))
        return metric.compute()

    def metrics_from_records(self, records: list[dict[str, Any]]) -> dict[str, float]:
        out = self.grouped(records, "correct", "accuracy")
        if records and "constrained_correct" in records[0]:
            out["accuracy_constrained"] = sum(r["constrained_correct"] for r in records) / len(records)
            out["gold_prob"] = sum(r["gold_prob"] for r in records) / len(records)
            out["letter_mass"] = sum(r["letter_mass"] for r in records) / len(records)
        out["invalid_rate"] = sum(not r["valid"] for r in records) / max(1, len(records))
        out["reward"] = sum(r["reward"] for r in records) / max(1, len(records))
        return out


def options_block(choices: tuple[str, ...]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
