"""The typed ``eval/`` node: how held-out data is scored by ``mode=eval`` and by ``mode=train``'s comparison.

Every default is defined here once; ``conf/eval/default.yaml`` starts from the registered ``base_eval`` node and
sets nothing else, so a misspelled key fails at composition with its name. ``eval_config`` validates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crl_exp.errors import CRLConfigError
from crl_exp.structured import to_dataclass

SPLITS = ("train", "validation", "test")
HELDOUT_PARTS = ("dev", "confirm", "all")
TABLE_SCORING = ("auto", "false")


@dataclass
class EvalConfig:
    """Held-out scoring settings.

    Fields:
        split: ``mode=eval``'s split; ``test`` means its ``heldout`` part.
        limit: ``mode=eval``: a seeded subset of that size (None = the whole split).
        batch_size: ``mode=eval``'s batch size (``mode=train`` uses ``budget.eval_batch_size``).
        n_bootstrap: bootstrap resamples behind every 95% interval.
        heldout: the part of the test split scored: ``dev`` (every run, sweep and ``make train``), ``confirm``
            (kept for the recorded answer; refused without ``+confirm=true``, and each scoring appends a line to the
            ledger) or ``all``.
        ledger: the confirmation ledger, a path relative to the project root (required by ``heldout=confirm``;
            the recorded answer's configs name ``experiments/confirmation_ledger.jsonl``).
        assumed_discordance: the MDE planning figure: the share of discordant pairs assumed when computing what a
            held-out n can detect (the observed share is reported beside it).
        table_scoring: ``auto``: one-token tasks over a pool of at most ``table_max_features`` read every condition
            off one exact reward table; ``false``: roll every condition out.
        table_max_features: the largest pool ``table_scoring=auto`` reads off a table.
        random_dictionary_columns: dictionary features (drawn per seed) behind the table's ``random_dictionary`` row.
        log_examples: prompts the trained policy is rolled out on for the intervention log under table scoring
            (which also re-checks the table).
        table_cache: cache reward tables across seeds (they depend on the prompts and features only).
    """

    split: str = "validation"
    limit: int | None = None
    batch_size: int = 8
    n_bootstrap: int = 1000
    heldout: str = "dev"
    ledger: str | None = None
    assumed_discordance: float = 0.2
    table_scoring: str = "auto"
    table_max_features: int = 160
    random_dictionary_columns: int = 32
    log_examples: int = 200
    table_cache: bool = True

    def __post_init__(self) -> None:
        self.table_scoring = str(self.table_scoring).lower()
        problems = []
        if self.split not in SPLITS:
            problems.append(f"eval.split={self.split!r} must be one of {SPLITS}")
        if self.heldout not in HELDOUT_PARTS:
            problems.append(f"eval.heldout={self.heldout!r} must be one of {HELDOUT_PARTS}")
        if self.heldout == "confirm" and not self.ledger:
            problems.append("eval.heldout=confirm needs eval.ledger, the file each confirmation scoring is appended "
                            "to (the recorded answer's configs name experiments/confirmation_ledger.jsonl)")
        if self.table_scoring not in TABLE_SCORING:
            problems.append(f"eval.table_scoring must be auto or false, got {self.table_scoring!r}")
        if not 0 < float(self.assumed_discordance) <= 1:
            problems.append(f"eval.assumed_discordance={self.assumed_discordance} must be in (0, 1]")
        for key in ("batch_size", "n_bootstrap", "table_max_features", "log_examples"):
            if int(getattr(self, key)) < 1:
                problems.append(f"eval.{key}={getattr(self, key)} must be >= 1")
        if self.limit is not None and int(self.limit) < 1:
            problems.append(f"eval.limit={self.limit} must be >= 1 or null")
        if int(self.random_dictionary_columns) < 0:
            problems.append(f"eval.random_dictionary_columns={self.random_dictionary_columns} must be >= 0")
        if problems:
            raise CRLConfigError("; ".join(problems))


def eval_config(node: Any) -> EvalConfig:
    """The typed, validated ``eval/`` node (an ``EvalConfig`` passes through)."""
    return to_dataclass(EvalConfig, node, "eval")
