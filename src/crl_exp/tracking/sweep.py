"""MLflow bookkeeping for Hydra multiruns (sweeps).

``SweepCallback.on_multirun_start`` runs once in the launching process, before any job: it creates the SQLite
schema, the sweep's experiment and a *parent* run holding the sweep's config, and writes
``<sweep dir>/mlflow_sweep.json``. Every job (a separate process under joblib/submitit/ray, or the same process
under the basic launcher) reads that file and opens a *child* run of the parent, tagged with layer, task,
masking schedule and seed, so parallel jobs never race on DB creation. ``on_multirun_end`` records how many
jobs finished, failed or were skipped.

Re-running a sweep skips jobs whose config hash already has a FINISHED child run (``sweep.force=true`` to rerun).
The hash covers the code version too (git commit, and a hash of the uncommitted diff on a dirty tree), so after
a fix a rerun recomputes instead of silently reusing runs made by the old code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from crl_exp.tracking.provenance import git_commit
from crl_exp.tracking.store import ensure_experiment, resolve_tracking_uri

log = logging.getLogger(__name__)
SWEEP_FILE = "mlflow_sweep.json"
# Keys that do not change what a job computes (where it logs, how it shows progress).
_NOT_HASHED = ("logger", "hydra", "trainer.progress_bar", "sweep")


def config_hash(cfg: DictConfig, code_version: str | None = None) -> str:
    """What a job computes: its resolved config (less logging/progress keys) and the code version."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_HASHED:
        node, *rest = key.split(".")
        if rest and isinstance(data.get(node), dict):
            data[node].pop(rest[0], None)
        else:
            data.pop(node, None)
    data["_code_version"] = code_version if code_version is not None else git_commit()
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def job_tags(cfg: DictConfig) -> dict[str, str]:
    return {"layer": str(cfg.sae.layer), "task": str(cfg.task.name), "masking": str(cfg.get("masking", {}).get("schedule", "none")),
            "seed": str(cfg.seed), "config_hash": config_hash(cfg)}


def read_sweep_file(sweep_dir: str | Path) -> dict[str, Any] | None:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finished_run_with_hash(client: MlflowClient, experiment_id: str, digest: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.config_hash = '{digest}' and attributes.status = 'FINISHED'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


class SweepCallback(Callback):
    """Registered in ``conf/hydra/callbacks``: creates the sweep's MLflow experiment and parent run once."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = resolve_tracking_uri(config.logger.get("tracking_uri"))
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = sorted(o for o in config.hydra.overrides.task if not o.startswith(("hydra.", "sweep.force")))
        digest = hashlib.sha256(" ".join(overrides).encode()).hexdigest()[:8]
        # The same sweep command maps to the same experiment, so a rerun finds (and skips) finished jobs.
        name = config.get("sweep", {}).get("experiment_name") or f"{config.logger.experiment_name}-sweep-{digest}"
        exp_id = ensure_experiment(uri, name, config.logger.get("artifact_location"))
        client = MlflowClient(uri)
        parent = client.create_run(exp_id, run_name=f"sweep-{Path(config.hydra.sweep.dir).name}",
                                   tags={"kind": "sweep_parent", "git_commit": git_commit(),
                                         "sweep_dir": str(config.hydra.sweep.dir),
                                         "sweep_overrides": " ".join(overrides)})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        cfg_copy = OmegaConf.to_container(config, resolve=False)
        cfg_copy.pop("hydra", None)
        client.log_text(parent.info.run_id, OmegaConf.to_yaml(cfg_copy), "sweep_config.yaml")
        client.log_text(parent.info.run_id, "\n".join(overrides), "sweep_overrides.txt")
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"tracking_uri": uri, "experiment_id": exp_id,
                                                        "experiment_name": name,
                                                        "parent_run_id": parent.info.run_id}))
        log.info("Sweep parent run %s in MLflow experiment %r", parent.info.run_id, name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = read_sweep_file(config.hydra.sweep.dir)
        if info is None:
            return
        client = MlflowClient(info["tracking_uri"])
        children = client.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
        counts = {s: sum(r.info.status == s for r in children) for s in ("FINISHED", "FAILED")}
        skipped = sum(1 for p in Path(config.hydra.sweep.dir).rglob("SKIPPED"))
        client.set_tag(info["parent_run_id"], "jobs_finished", counts["FINISHED"])
        client.set_tag(info["parent_run_id"], "jobs_failed", counts["FAILED"])
        client.set_tag(info["parent_run_id"], "jobs_skipped", skipped)
        client.set_terminated(info["parent_run_id"], "FAILED" if counts["FAILED"] else "FINISHED")
