"""``mode=compare_layers``: per-layer comparison of the CRL runs of a sweep, read back from MLflow.

Per layer: task gain (CRL minus no steering on the primary metric, with its paired-bootstrap 95% CI), feature
diversity (distinct features on held-out episodes and in the last training iteration) and the
syntactic-vs-semantic profile of the chosen features (``features/syntactic_share``, see
``feature_profile.py``). Runs from different models or tasks are refused unless ``compare.group_by_task_model``
is set, in which case each (model, task) group gets its own rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from crl_exp.errors import CRLConfigError
from crl_exp.tracking import RunTracker


def collect_runs(client: MlflowClient, experiment_name: str) -> pd.DataFrame:
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise CRLConfigError(f"No MLflow experiment named {experiment_name!r} at {client.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], "tags.mode = 'train' and attributes.status = 'FINISHED'")
    rows = []
    for r in runs:
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        primary = p.get("task.primary_metric", "")
        gain_keys = [k for k in m if k.startswith("delta/crl_minus_none/") and not k.endswith(("_ci_low", "_ci_high"))
                     and not k.endswith("/reward")]
        if not gain_keys:
            continue
        key = gain_keys[0]
        rows.append({"run_id": r.info.run_id, "model": t.get("model"), "task": t.get("task"),
                     "layer": int(t.get("layer")), "masking": p.get("masking.schedule"), "seed": p.get("seed"),
                     "metric": key.removeprefix("delta/crl_minus_none/") or primary,
                     "gain": m[key], "gain_ci_low": m.get(f"{key}_ci_low"), "gain_ci_high": m.get(f"{key}_ci_high"),
                     "distinct_features_heldout": m.get("features/distinct_heldout"),
                     "distinct_features_train": m.get("train/distinct_features"),
                     "syntactic_share": m.get("features/syntactic_share")})
    return pd.DataFrame(rows)


def compare_layers(cfg: DictConfig, tracker: RunTracker) -> pd.DataFrame:
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


def markdown_table(df: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def plot_layers(table: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (model, task), g in table.groupby(["model", "task"]):
        g = g.sort_values("layer")
        label = f"{model}/{task}"
        yerr = [g["gain"] - g["gain_ci_low"], g["gain_ci_high"] - g["gain"]]
        axes[0].errorbar(g["layer"], g["gain"], yerr=yerr, marker="o", capsize=3, label=label)
        axes[1].plot(g["layer"], g["distinct_features_heldout"], marker="o", label=label)
        axes[2].plot(g["layer"], g["syntactic_share"], marker="o", label=label)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set(xlabel="layer", ylabel="CRL - no steering", title="Task gain (95% CI)")
    axes[1].set(xlabel="layer", ylabel="distinct features", title="Feature diversity (held-out)")
    axes[2].set(xlabel="layer", ylabel="share", title="Syntactic share of chosen features", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
