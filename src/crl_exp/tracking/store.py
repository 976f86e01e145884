"""Where runs are stored: the explicit tracking URI and experiment creation (docs/design.md §7: never ``./mlruns``)."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


def resolve_tracking_uri(uri: str | None) -> str:
    if uri:
        return str(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_artifact_location(location: str | None) -> str:
    return str(location) if location else (Path.cwd() / "mlartifacts").resolve().as_uri()


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """Create the experiment (and the SQLite schema) if needed; return its id. Against an ``mlflow server`` the
    server chooses where artifacts go (it serves them to every machine), unless ``artifact_location`` is set."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    remote = str(tracking_uri).startswith(("http://", "https://"))
    location = artifact_location if remote else resolve_artifact_location(artifact_location)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # a parallel job created it between our lookup and our create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
