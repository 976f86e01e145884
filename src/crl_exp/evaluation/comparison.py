"""The statistics of a held-out comparison: each condition's metrics and intervals, and paired deltas.

Every interval is *clustered* (``Task.cluster``: near-twin examples move together) and is the primary one:

* a condition's metrics: cluster bootstrap; its share of correct examples: Wilson on the cluster-adjusted
  effective sample size (never ``[0, 0]``);
* a paired delta of a binary metric (accuracy, exact match, refusal rate): Newcombe's paired interval on the
  cluster-adjusted counts; the unclustered Newcombe interval and the cluster bootstrap are kept beside it;
* a paired delta of a continuous metric (the reward): cluster bootstrap, the plain bootstrap beside it.

Power: the minimum detectable effect at an *assumed* discordance (``eval.assumed_discordance``, a planning
figure that exists even when two conditions agree everywhere) and at the observed one, on the effective n.
"""

from __future__ import annotations

from typing import Any

import torch

from crl_exp.stats import (
    bootstrap_ci,
    design_effect,
    mde_paired_binary,
    mde_paired_mean,
    paired_binary_interval,
    proportion_interval,
)


def clusters_of(records: list[dict]) -> list[str]:
    return [str(r.get("cluster", r["id"])) for r in records]


def is_share_of_correct(task, records: list[dict], key: str) -> bool:
    """Whether ``key`` is the share of records with ``correct`` = 1 (then binary intervals apply)."""
    if not records:
        return False
    value = task.metrics_from_records(records).get(key)
    share = sum(float(r["correct"]) > 0.5 for r in records) / len(records)
    return value is not None and abs(value - share) < 1e-6  # a metric in float32 is off by ~1e-8, a share by >= 1/n


def condition_summary(task, records: list[dict], key: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Metrics of one condition with clustered 95% intervals."""
    metrics = task.metrics_from_records(records)
    clusters = clusters_of(records)
    cis = bootstrap_ci(len(records), lambda idx: task.metrics_from_records([records[i] for i in idx.tolist()]),
                       n_boot=n_boot, seed=seed, clusters=clusters)
    if is_share_of_correct(task, records, key):
        cis[key] = proportion_interval([float(r["correct"]) > 0.5 for r in records], clusters)
    return {"metrics": metrics, "ci95": {k: list(v) for k, v in cis.items()}, "clusters": len(set(clusters))}


def paired_delta(task, a: list[dict], b: list[dict], key: str, n_boot: int, seed: int,
                 assumed_discordance: float) -> dict[str, Any]:
    """``a`` minus ``b`` on the same examples (same order): the primary metric and the reward, each with its
    primary (clustered) interval and the alternatives, and what this held-out set could detect."""
    if [r["id"] for r in a] != [r["id"] for r in b]:
        raise ValueError("paired deltas need the same examples in the same order")
    clusters = clusters_of(a)
    n = len(a)

    def stat(idx):
        ma = task.metrics_from_records([a[i] for i in idx.tolist()])
        mb = task.metrics_from_records([b[i] for i in idx.tolist()])
        return {k: ma[k] - mb[k] for k in (key, "reward") if k in ma and k in mb}

    point = stat(torch.arange(n))
    clustered = bootstrap_ci(n, stat, n_boot=n_boot, seed=seed, clusters=clusters)
    plain = bootstrap_ci(n, stat, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {}
    for metric, delta in point.items():
        entry = {"delta": delta, "bootstrap_clustered": list(clustered.get(metric, (float("nan"),) * 2)),
                 "bootstrap": list(plain.get(metric, (float("nan"),) * 2))}
        if metric == key and is_share_of_correct(task, a, key) and is_share_of_correct(task, b, key):
            ok_a = [float(r["correct"]) > 0.5 for r in a]
            ok_b = [float(r["correct"]) > 0.5 for r in b]
            newcombe, unclustered = paired_binary_interval(ok_a, ok_b, clusters), paired_binary_interval(ok_a, ok_b)
            entry["newcombe"] = [unclustered["ci_low"], unclustered["ci_high"]]
            entry["ci95"] = [newcombe["ci_low"], newcombe["ci_high"]]
            entry["method"] = "newcombe_clustered"
        else:
            entry["ci95"] = entry["bootstrap_clustered"]
            entry["method"] = "bootstrap_clustered"
        out[metric] = entry
    out["power"] = detectable_effects(a, b, clusters, assumed_discordance)
    return out


def detectable_effects(a: list[dict], b: list[dict], clusters: list[str], assumed_discordance: float) -> dict[str, float]:
    """The minimum detectable difference (80% power, two-sided 5%) in per-example correctness at the assumed and
    at the observed share of discordant pairs, and in mean reward at the observed spread of paired differences,
    each on the effective sample size n / design effect."""
    n = len(a)
    correct = [(float(x["correct"]) > 0.5, float(y["correct"]) > 0.5) for x, y in zip(a, b, strict=True)]
    discordance = sum(x != y for x, y in correct) / n if n else float("nan")
    diffs = [float(x["reward"]) - float(y["reward"]) for x, y in zip(a, b, strict=True)]
    sd = torch.tensor(diffs).std().item() if n > 1 else float("nan")
    deff_correct = design_effect([float(x) - float(y) for x, y in correct], clusters)
    deff_reward = design_effect(diffs, clusters)
    return {"n": n, "clusters": len(set(clusters)), "design_effect": deff_correct,
            "discordance": discordance, "assumed_discordance": assumed_discordance,
            "mde_correct": mde_paired_binary(n / deff_correct, assumed_discordance),
            "mde_correct_observed": mde_paired_binary(n / deff_correct, discordance),
            "mde_reward": mde_paired_mean(n / deff_reward, sd)}


def side_effects(base: list[dict], steered: list[dict]) -> dict[str, float]:
    """A steered condition against no steering on the same examples (same order): items fixed (wrong -> right),
    items broken (right -> wrong), the side-effect ratio broken / (fixed + broken) (nan when nothing changed) and
    the share of examples whose reward the steering lowered. A net gain can hide many items broken."""
    if [r["id"] for r in base] != [r["id"] for r in steered]:
        raise ValueError("side effects need the same examples in the same order")
    ok_base = [float(r["correct"]) > 0.5 for r in base]
    ok = [float(r["correct"]) > 0.5 for r in steered]
    fixed = sum(o and not b for o, b in zip(ok, ok_base, strict=True))
    broken = sum(b and not o for o, b in zip(ok, ok_base, strict=True))
    worse = sum(float(s["reward"]) < float(b["reward"]) - 1e-9 for s, b in zip(steered, base, strict=True))
    return {"fixed": fixed, "broken": broken, "n": len(ok),
            "ratio": broken / (fixed + broken) if fixed + broken else float("nan"),
            "reward_worse_share": worse / len(ok) if ok else float("nan")}
