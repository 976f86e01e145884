"""``mode=compare_sweep compare.experiment_name=...``: one row per job of a sweep, printed and logged as an
artifact of the sweep's parent run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from crl_exp.analysis.layers import markdown_table
from crl_exp.analysis.sweep_table import job_row, latest_parent, newest_per_config, seed_aggregate
from crl_exp.errors import CRLConfigError
from crl_exp.tracking import RunTracker


def run(cfg: DictConfig, tracker: RunTracker) -> pd.DataFrame:
    client = MlflowClient(tracker.tracking_uri)
    exp, parents = latest_parent(client, str(cfg.compare.experiment_name))
    parent_ids = {p.info.run_id for p in parents}
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") in parent_ids]
    if not children:
        raise CRLConfigError(f"The sweep in {exp.name!r} has no job runs yet")
    rows = [job_row(r) for r in newest_per_config(children)]
    table = pd.DataFrame(rows).sort_values(["task", "layer", "masking"])
    md = markdown_table(table.drop(columns=["run_id"]))
    seeds = pd.DataFrame(seed_aggregate(rows))
    if (seeds["seeds"].str.count(",") > 0).any():  # some configuration ran with several seeds
        md += "\n\nOver seeds (mean; CI includes seed variance):\n\n" + markdown_table(seeds)
    print(md)
    parent = parents[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep_table.md").write_text(md + "\n")
        table.to_csv(Path(tmp) / "sweep_table.csv", index=False)
        seeds.to_csv(Path(tmp) / "seed_aggregate.csv", index=False)
        client.log_artifacts(parent, tmp, "comparison")
        tracker.log_artifact(Path(tmp), "comparison")
    tracker.set_tags({"analysis": "compare_sweep", "sweep_parent": parent})
    return table
