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

# The recorded answer's ledger, named by every ``answer_*`` config (``eval.ledger``) and read by its report.
ANSWER_LEDGER = "experiments/confirmation_ledger.jsonl"


def ledger_path(path: str | Path) -> Path:
    """The ledger a config names, a relative path resolved against the project root (never Hydra's run folder, so
    every run of an answer config appends to the one file its report reads). There is no default: a confirmation
    scoring that named no ledger would land where no report looks (``EvalConfig`` refuses it)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def record_confirmation(path: str | Path, *, task: str, config_hash: str, commit: str, seed: int, n: int,
                        run_id: str | None, mode: str) -> dict:
    """Append one line to the ledger ``path`` names (created if missing) and return it."""
    ledger = ledger_path(path)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "task": task, "mode": mode,
             "config_hash": config_hash, "commit": commit, "seed": seed, "n": n, "run_id": run_id}
    with ledger.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def read_ledger(path: str | Path = ANSWER_LEDGER) -> list[dict]:
    """Every line of the ledger ``path`` names (the recorded answer's by default); none if it does not exist."""
    ledger = ledger_path(path)
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
