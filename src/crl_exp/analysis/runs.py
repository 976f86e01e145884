"""Read trained CRL runs back from MLflow: their config and policy checkpoint (for ``mode=analyse``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from crl_exp.errors import CRLConfigError


def load_run_config(client: MlflowClient, run_id: str) -> DictConfig:
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise CRLConfigError(f"Unknown MLflow run id {run_id!r} at {client.tracking_uri}") from exc
    if run.data.tags.get("mode") != "train":
        raise CRLConfigError(f"Run {run_id} is a mode={run.data.tags.get('mode')} run, not a CRL training run")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config.yaml", tmp)
        return OmegaConf.load(path)


def download_checkpoint(client: MlflowClient, run_id: str, dest: Path) -> Path:
    names = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    if "checkpoints/last.ckpt" not in names:
        raise CRLConfigError(f"Run {run_id} has no policy checkpoint (checkpoints/last.ckpt); was training finished?")
    return Path(client.download_artifacts(run_id, "checkpoints/last.ckpt", str(dest)))


def load_policy_state(module, ckpt_path: Path) -> None:
    """Policy weights and mask state from a Lightning checkpoint into a fresh ``CRLModule``."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module.load_state_dict(ckpt["state_dict"])
    module.mask.load_state_dict(ckpt["afm"])
