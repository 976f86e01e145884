"""``mode=compare_layers compare.experiment_name=...``: the layer table/plot of a sweep's CRL runs (see
``analysis/layers.py`` for what each column means)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from crl_exp.analysis.layers import collect_runs, markdown_table, plot_layers
from crl_exp.errors import CRLConfigError
from crl_exp.tracking import RunTracker


def run(cfg: DictConfig, tracker: RunTracker) -> pd.DataFrame:
    ccfg = cfg.compare
    client = MlflowClient(tracker.tracking_uri)
    df = collect_runs(client, str(ccfg.experiment_name))
    if df.empty:
        raise CRLConfigError(f"No finished CRL training runs in experiment {ccfg.experiment_name!r}")
    groups = df.groupby(["model", "task"]).size()
    if len(groups) > 1 and not ccfg.get("group_by_task_model", False):
        raise CRLConfigError(f"The sweep mixes models/tasks {list(groups.index)}; set "
                             f"compare.group_by_task_model=true to compare them group by group")
    table = df.sort_values(["model", "task", "layer"]).reset_index(drop=True)
    out = Path(tempfile.mkdtemp(prefix="compare-layers-"))
    table.to_csv(out / "layers.csv", index=False)
    md = markdown_table(table.drop(columns=["run_id"]))
    (out / "layers.md").write_text(md + "\n")
    plot_layers(table, out / "layers.png")
    tracker.log_artifact(out, "compare_layers")
    tracker.set_tags({"analysis": "compare_layers", "source_experiment": ccfg.experiment_name})
    print(md)
    return table
