"""The confirmation ledger: one committed line per scoring of a task's confirmation subset.

The confirmation part of a test split (``Task.heldout``) answers the project's question once; every command that
scores it appends (time, task, config hash, commit, seed, n, MLflow run id) here, so a reader counts how often it
was used and which runs the recorded answer rests on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from crl_exp.paths import default_cache_dir


def default_ledger() -> Path:
    """Where a run records its confirmation scorings when ``eval.ledger`` names no file: the cache folder, never
    the checkout (the recorded answer's configs name ``experiments/confirmation_ledger.jsonl`` themselves)."""
    return default_cache_dir() / "confirmation_ledger.jsonl"


def record_confirmation(path: str | Path | None, *, task: str, config_hash: str, commit: str, seed: int, n: int,
                        run_id: str | None, mode: str) -> dict:
    """Append one line to the ledger (created if missing) and return it."""
    ledger = Path(path) if path else default_ledger()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "task": task, "mode": mode,
             "config_hash": config_hash, "commit": commit, "seed": seed, "n": n, "run_id": run_id}
    with ledger.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def read_ledger(path: str | Path | None = None) -> list[dict]:
    ledger = Path(path) if path else default_ledger()
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]


def earlier_scorings(ids, earlier: dict[str, list[str]]) -> dict:
    """How many of one run's held-out ``ids`` earlier scorings already saw: ``earlier`` maps a label (a recorded
    run) to the ids it scored. The ledger counts confirmation scorings; runs before the dev/confirmation cut scored
    hash subsets of whole test splits, so a confirmation part can hold ids that were scored (and that choices may
    have been made on) before it existed. Returns n, the distinct ids already scored, the scorings summed over
    labels and the overlap per label (labels with none left out)."""
    ids = set(ids)
    per = {label: len(ids & set(other)) for label, other in earlier.items()}
    touched = set().union(*(ids & set(other) for other in earlier.values())) if earlier else set()
    return {"n": len(ids), "already_scored": len(touched), "scorings": sum(per.values()),
            "by_record": {k: v for k, v in sorted(per.items()) if v}, "ids": sorted(touched)}
