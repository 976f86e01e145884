"""MLflow tracking with an explicit SQLite store: one run per command, with config, commit and versions."""

from crl_exp.tracking.mlflow_run import RunTracker, resolve_tracking_uri, start_tracked_run

__all__ = ["RunTracker", "resolve_tracking_uri", "start_tracked_run"]
