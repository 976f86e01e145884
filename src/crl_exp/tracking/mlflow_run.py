"""One MLflow run per command.

docs/design.md §7: MLflow >= 3.13 refuses the ``./mlruns`` file store, so the tracking URI is always explicit:
``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``. Every run records
the resolved Hydra config (as params and as ``config.yaml``), the git commit, package versions and the
Hydra output folder, so a number in the UI can always be traced back to what produced it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from crl_exp.tracking.provenance import git_commit, package_versions
from crl_exp.tracking.store import ensure_experiment, resolve_tracking_uri
from crl_exp.tracking.sweep import config_hash, job_tags, read_sweep_file

log = logging.getLogger(__name__)

def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values (MLflow params), lists kept as JSON."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


class RunTracker:
    """Thin handle on the active MLflow run; every logging call of crl-exp goes through it."""

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """A column-oriented table (shown as a table in the MLflow UI's artifact view)."""
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def child(self, run_name: str, tags: dict[str, Any] | None = None) -> RunTracker:
        """A nested run (e.g. the SAE training run inside a steering command)."""
        parent = self.client.get_run(self.run_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=run_name,
                                     tags={"mlflow.parentRunId": self.run_id, **(tags or {})})
        return RunTracker(self.client, run.info.run_id, self.tracking_uri)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def current_sweep() -> dict[str, Any] | None:
    """The sweep's MLflow ids when running as a Hydra multirun job (written by ``SweepCallback``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return read_sweep_file(HydraConfig.get().sweep.dir)


def existing_run(client: MlflowClient, run_id: str | None):
    """The run ``run_id`` in this store, or ``None`` (with a warning) when there is none."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        log.warning("The checkpoint's MLflow run %s is not in this store: logging the resumed training to a new run",
                    run_id)
        return None


def descriptive_run_name(cfg: DictConfig, estimator: str | None = None) -> str:
    """A run named after what it ran (``logger.run_name`` overrides it): mode, task, model, layer, and for
    training the action space (``pool32``, the known-answer design's pool, or ``dict``), the actor head, the
    estimator (``estimator``: the one ``ppo.advantage`` resolved to; the config's own word when not given) and
    the seed, e.g. ``train-bbq-gemma3_270m-L12-pool32-independent-group-s0``."""
    def pick(key: str):
        return OmegaConf.select(cfg, key, default=None)

    parts = [str(pick("mode") or "run"), pick("task.name"), pick("model.name")]
    layer = pick("sae.layer")
    parts.append(f"L{layer}" if layer is not None else None)
    if str(pick("mode")) == "train":
        pool = pick("policy.action_pool") or pick("task.design.pool_size")
        parts += [f"pool{pool}" if pool else "dict", pick("policy.head"), estimator or pick("ppo.advantage"),
                  f"s{pick('seed')}"]
    return "-".join(str(p) for p in parts if p not in (None, ""))


@contextmanager
def start_tracked_run(cfg: DictConfig, run_name: str | None = None, output_dir: str | Path | None = None,
                      tags: dict[str, Any] | None = None, resume_run_id: str | None = None) -> Iterator[RunTracker]:
    """Open an MLflow run that records config, commit, versions and outputs folder; FAILED on exceptions.

    ``resume_run_id`` (the run a resumed checkpoint was logging to): that run is reopened and continued, so a
    crashed and resumed training is one run; if the store no longer has it, a new run records where it resumed."""
    lcfg = cfg.logger
    sweep = current_sweep()
    if sweep is not None:  # a multirun job: child of the sweep's parent run, in the sweep's experiment
        uri, exp_id = sweep["tracking_uri"], sweep["experiment_id"]
        tags = {**(tags or {}), "mlflow.parentRunId": sweep["parent_run_id"], **job_tags(cfg)}
    else:
        uri = resolve_tracking_uri(lcfg.get("tracking_uri"))
        exp_id = ensure_experiment(uri, lcfg.experiment_name, lcfg.get("artifact_location"))
    client = MlflowClient(tracking_uri=uri)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resumed = existing_run(client, resume_run_id)
    if resumed is not None:
        client.update_run(resumed.info.run_id, status="RUNNING")
        client.set_tag(resumed.info.run_id, "resumed_from", str(cfg.trainer.ckpt_path))
        tracker = RunTracker(client, resumed.info.run_id, uri)
        log.info("Resuming MLflow run %s at %s", resumed.info.run_id, uri)
        params = {k: v for k, v in flatten(resolved).items() if k not in resumed.data.params}
        config_file = "config_resumed.yaml"
    else:
        run = client.create_run(exp_id, run_name=run_name or lcfg.get("run_name") or descriptive_run_name(cfg),
                                tags={"mode": str(cfg.mode), "git_commit": git_commit(),
                                      "outputs_dir": str(output_dir or ""), "config_hash": config_hash(cfg),
                                      **({"resumed_from_run": resume_run_id} if resume_run_id else {}),
                                      **(tags or {})})
        tracker = RunTracker(client, run.info.run_id, uri)
        log.info("MLflow run %s in experiment %s at %s", run.info.run_id, exp_id, uri)
        params, config_file = flatten(resolved), "config.yaml"
    try:
        tracker.log_params(params)
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), config_file)
        tracker.log_dict(package_versions(), "package_versions.json")
        yield tracker
    except BaseException as exc:
        with tempfile.TemporaryDirectory() as tmp:
            err = Path(tmp) / "error.txt"
            err.write_text(f"{type(exc).__name__}: {exc}")
            tracker.log_artifact(err)
        tracker.finish("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        raise
    else:
        if output_dir and Path(output_dir, ".hydra").is_dir():
            tracker.log_artifact(Path(output_dir, ".hydra"), "hydra")
        tracker.finish("FINISHED")
