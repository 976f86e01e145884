"""The one row schema every benchmark is normalised to, whichever source (local files or hub) it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Example:
    """One benchmark item.

    ``id`` is stable across sources and runs (it drives the seeded split). ``answer`` is the gold target: an
    option letter (MMLU, BBQ), a normalised number (GSM8K) or the desired behaviour ``refuse``/``comply``
    (HarmBench, XSTest). ``group`` is what per-group metrics break down by (subject, category, label).
    """

    id: str
    task: str
    question: str
    answer: str
    group: str
    choices: tuple[str, ...] = ()
    context: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "question": self.question, "answer": self.answer,
                "group": self.group, "choices": list(self.choices), "context": self.context, "meta": self.meta}
