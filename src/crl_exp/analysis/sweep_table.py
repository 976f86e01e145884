"""The rows of a sweep table: one per job (config keys, held-out metric + CI, delta vs no steering)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from crl_exp.errors import CRLConfigError

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
