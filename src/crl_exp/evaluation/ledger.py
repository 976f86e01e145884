"""The confirmation ledger: one committed line per scoring of a task's confirmation subset.

The confirmation part of a test split (``Task.heldout``) answers the project's question once; every command that
scores it appends (time, task, config hash, commit, seed, n, MLflow run id) here, so a reader counts how often it
was used and which runs the recorded answer rests on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from crl_exp.paths import PROJECT_ROOT

DEFAULT_LEDGER = PROJECT_ROOT / "experiments" / "confirmation_ledger.jsonl"


def record_confirmation(path: str | Path | None, *, task: str, config_hash: str, commit: str, seed: int, n: int,
                        run_id: str | None, mode: str) -> dict:
    """Append one line to the ledger (created if missing) and return it."""
    ledger = Path(path) if path else DEFAULT_LEDGER
    ledger.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "task": task, "mode": mode,
             "config_hash": config_hash, "commit": commit, "seed": seed, "n": n, "run_id": run_id}
    with ledger.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def read_ledger(path: str | Path | None = None) -> list[dict]:
    ledger = Path(path) if path else DEFAULT_LEDGER
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
