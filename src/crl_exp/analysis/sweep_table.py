"""The rows of a sweep table: one per job (config keys, held-out metric + CI, delta vs no steering)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from crl_exp.errors import CRLConfigError
from crl_exp.stats import pool_seed_intervals

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


def newest_per_config(runs) -> list:
    """One run per job: a rerun may have repeated or skipped jobs, so the newest run of each config hash."""
    newest: dict[str, object] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        newest[r.data.tags.get("config_hash", r.info.run_id)] = r
    return list(newest.values())


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
    for base in ("static", "random"):
        key = f"delta/crl_minus_{base}/{primary}"
        if key in m:
            row.update({f"delta_vs_{base}": m[key], f"delta_vs_{base}_ci_low": m.get(f"{key}_ci_low"),
                        f"delta_vs_{base}_ci_high": m.get(f"{key}_ci_high")})
    return row


def seed_aggregate(rows: list[dict]) -> list[dict]:
    """Per (task, layer, masking) over its seeds: each CRL-minus-baseline delta pooled by
    ``stats.pool_seed_intervals`` (the report's pooling: Student's t for the between-seed part, each seed's
    example-sampling error read off its interval and not divided by the seeds, which share their examples)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in ("task", "layer", "masking")), []).append(row)
    out = []
    for (task, layer, masking), members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        agg = {"task": task, "layer": layer, "masking": masking, "seeds": ",".join(sorted(str(r.get("seed"))
                                                                                          for r in members))}
        for base in ("none", "static", "random"):
            lo_key, hi_key = ("delta_ci_low", "delta_ci_high") if base == "none" else (
                f"delta_vs_{base}_ci_low", f"delta_vs_{base}_ci_high")
            found = [r for r in members if r.get(f"delta_vs_{base}") is not None
                     and r.get(lo_key) is not None and r.get(hi_key) is not None]
            if not found:
                continue
            pooled = pool_seed_intervals([float(r[f"delta_vs_{base}"]) for r in found],
                                         [(float(r[lo_key]), float(r[hi_key])) for r in found])
            agg.update({f"crl_minus_{base}": pooled["delta"], f"crl_minus_{base}_sd_seeds": pooled["sd_seeds"],
                        f"crl_minus_{base}_ci_low": pooled["ci_low"], f"crl_minus_{base}_ci_high": pooled["ci_high"]})
        out.append(agg)
    return out
