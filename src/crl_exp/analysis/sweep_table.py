"""``mode=compare_sweep``: one row per job of a sweep (config keys, held-out metric + CI, delta vs baseline),
printed and logged as an artifact of the sweep's parent run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from crl_exp.analysis.layers import markdown_table
from crl_exp.errors import CRLConfigError
from crl_exp.tracking import RunTracker

KEYS = ("task", "layer", "masking", "seed", "mode")


def latest_parent(client: MlflowClient, experiment_name: str):
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise CRLConfigError(f"No MLflow experiment {experiment_name!r}; sweeps log to '<name>-sweep-<hash>' "
                             f"(see the 'Sweep parent run' log line)")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'sweep_parent'",
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        raise CRLConfigError(f"Experiment {experiment_name!r} has no sweep parent run")
    return exp, parents


def job_row(run) -> dict:
    m, t = run.data.metrics, run.data.tags
    row = {k: t.get(k) for k in KEYS}
    row.update(status=run.info.status, run_id=run.info.run_id)
    primary = run.data.params.get("task.primary_metric", "accuracy").replace("{judge}", "string_match")
    for prefix in ("heldout/crl", f"eval/{t.get('task')}/"):
        found = [k for k in m if k.startswith(prefix) and k.endswith("/" + primary)]
        if found:
            key = found[0]
            row.update(metric=key, value=m[key], ci_low=m.get(f"{key}_ci_low"), ci_high=m.get(f"{key}_ci_high"))
            break
    delta = f"delta/crl_minus_none/{primary}"
    if delta in m:
        row.update(delta_vs_none=m[delta], delta_ci_low=m.get(f"{delta}_ci_low"), delta_ci_high=m.get(f"{delta}_ci_high"))
    return row


def compare_sweep(cfg: DictConfig, tracker: RunTracker) -> pd.DataFrame:
    client = MlflowClient(tracker.tracking_uri)
    exp, parents = latest_parent(client, str(cfg.compare.experiment_name))
    parent_ids = {p.info.run_id for p in parents}
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") in parent_ids]
    if not children:
        raise CRLConfigError(f"The sweep in {exp.name!r} has no job runs yet")
    # A rerun may have skipped jobs: the newest run per config hash represents the job.
    newest: dict[str, object] = {}
    for r in sorted(children, key=lambda r: r.info.start_time):
        newest[r.data.tags.get("config_hash", r.info.run_id)] = r
    table = pd.DataFrame([job_row(r) for r in newest.values()]).sort_values(["task", "layer", "masking"])
    md = markdown_table(table.drop(columns=["run_id"]))
    print(md)
    parent = parents[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep_table.md").write_text(md + "\n")
        table.to_csv(Path(tmp) / "sweep_table.csv", index=False)
        client.log_artifacts(parent, tmp, "comparison")
        tracker.log_artifact(Path(tmp), "comparison")
    tracker.set_tags({"analysis": "compare_sweep", "sweep_parent": parent})
    return table
