"""Per-layer comparison of the CRL runs of a sweep, read back from MLflow.

Per layer: task gain (CRL minus no steering on the primary metric, with its paired-bootstrap 95% CI), feature
diversity (distinct features on held-out episodes and in the last training iteration) and the
syntactic-vs-semantic profile of the chosen features (``features/syntactic_share``, see
``feature_profile.py``). Runs from different models or tasks are refused unless ``compare.group_by_task_model``
is set, in which case each (model, task) group gets its own rows.
"""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from crl_exp.errors import CRLConfigError


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
