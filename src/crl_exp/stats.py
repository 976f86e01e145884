"""The statistics every reported number goes through (bottom layer: plain torch and math, no project imports).

* ``bootstrap_ci``: percentile bootstrap of any statistic of the held-out examples; with ``clusters`` it
  resamples whole clusters (BBQ templates, MMLU subjects, XSTest contrast pairs, HarmBench contexts), because
  examples of one cluster are near-twins and do not vary independently.
* ``wilson_interval`` / ``newcombe_paired_interval``: score intervals for a proportion and for the difference
  of two *paired* proportions (Newcombe 1998, method 10). Unlike the percentile bootstrap they do not collapse
  to ``[0, 0]`` when the two conditions agree on (almost) every example.
* ``design_effect``: how much clustering inflates the variance of a mean of paired differences; binary
  intervals are computed on the effective sample size ``n / deff`` (a Rao-Scott style adjustment), so the
  clustered interval of a binary delta is a Newcombe interval that neither collapses nor ignores clusters.
* ``mde_paired_binary`` / ``mde_paired_mean``: minimum detectable effects (80% power, two-sided 5%), a planning
  quantity computed at an *assumed* discordance, with the observed one reported beside it.
* ``pool_seeds``: a delta pooled over training seeds scored on the same held-out examples: the example-sampling
  variance is not divided by the number of seeds, and the between-seed part uses Student's t with seeds - 1
  degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Z_95, Z_80 = 1.959963984540054, 0.8416212335729143  # two-sided alpha = 0.05; power = 0.8
# Student's t, two-sided 95%, by degrees of freedom (1..30); beyond that the normal quantile is within 2%.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)


def t_975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (normal for df > 30)."""
    if df < 1:
        raise ValueError(f"Student's t needs df >= 1, got {df}")
    return _T_975[df - 1] if df <= len(_T_975) else Z_95


def cluster_index(clusters: Sequence[str]) -> list[torch.Tensor]:
    """Example indices of each cluster, in first-seen order."""
    members: dict[str, list[int]] = {}
    for i, c in enumerate(clusters):
        members.setdefault(str(c), []).append(i)
    return [torch.tensor(m) for m in members.values()]


def bootstrap_ci(n: int, statistic: Callable[[torch.Tensor], dict[str, float]], n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95,
                 clusters: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap: ``statistic(indices)`` recomputed on ``n_boot`` resamples of the ``n`` examples, or
    of whole clusters when ``clusters`` (one label per example) is given."""
    if n == 0:
        return {}
    if clusters is not None and len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} examples")
    groups = cluster_index(clusters) if clusters is not None else None
    g = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        if groups is None:
            idx = torch.randint(0, n, (n,), generator=g)
        else:
            picks = torch.randint(0, len(groups), (len(groups),), generator=g).tolist()
            idx = torch.cat([groups[p] for p in picks])
        for key, value in statistic(idx).items():
            samples.setdefault(key, []).append(value)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for key, values in samples.items():
        t = torch.tensor(values, dtype=torch.float64)
        t = t[~torch.isnan(t)]
        if len(t):
            out[key] = (torch.quantile(t, lo_q).item(), torch.quantile(t, hi_q).item())
    return out


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``n`` may be an effective, non-integer sample size)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_counts(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, int, int]:
    """(both right, only a right, only b right, both wrong) over paired outcomes."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths: {len(a)} vs {len(b)}")
    e = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    f = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    g = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return e, f, g, len(a) - e - f - g


def newcombe_paired_interval(e: float, f: float, g: float, h: float, z: float = Z_95) -> tuple[float, float]:
    """95% interval of p_a - p_b for paired binary outcomes from the 2x2 counts (e both right, f only a,
    g only b, h both wrong): Newcombe (1998) method 10, square-and-add of Wilson intervals with the
    continuity-corrected phi. Counts may be scaled by a design effect (non-integers are fine)."""
    n = e + f + g + h
    if n <= 0:
        return float("nan"), float("nan")
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson_interval(e + f, n, z)
    l2, u2 = wilson_interval(e + g, n, z)
    marginals = (e + f) * (g + h) * (e + g) * (f + h)
    b = e * h - f * g
    c = b - n / 2 if b > n / 2 else (b if b < 0 else 0.0)
    phi = c / math.sqrt(marginals) if marginals > 0 else 0.0
    d = p1 - p2
    lower = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    upper = d + math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return max(-1.0, lower), min(1.0, upper)


def design_effect(values: Sequence[float], clusters: Sequence[str] | None) -> float:
    """Variance of the mean of ``values`` under cluster sampling over its variance under independent sampling
    (>= 1 by convention: clustering is never credited with shrinking an interval; 1 when undefined)."""
    n = len(values)
    if clusters is None or n < 2:
        return 1.0
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dev = x - x.mean()
    iid = float((dev ** 2).sum())
    groups = cluster_index(clusters)
    if iid <= 0 or len(groups) < 2:
        return 1.0
    k = len(groups)
    clustered = float(sum(dev[idx].sum() ** 2 for idx in groups)) * k / (k - 1)
    return max(1.0, clustered / (iid * n / (n - 1)))


def paired_binary_interval(a: Sequence[bool], b: Sequence[bool],
                           clusters: Sequence[str] | None = None) -> dict[str, float]:
    """p_a - p_b with Newcombe's paired interval on the cluster-adjusted effective sample size."""
    e, f, g, h = paired_counts(a, b)
    n = len(a)
    deff = design_effect([float(x) - float(y) for x, y in zip(a, b, strict=True)], clusters)
    lo, hi = newcombe_paired_interval(e / deff, f / deff, g / deff, h / deff)
    return {"delta": (f - g) / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "design_effect": deff,
            "n": n, "discordant": f + g}


def proportion_interval(successes: Sequence[bool], clusters: Sequence[str] | None = None) -> tuple[float, float]:
    """Wilson interval of a share of successes on the cluster-adjusted effective sample size."""
    n = len(successes)
    k = sum(bool(s) for s in successes)
    deff = design_effect([float(bool(s)) for s in successes], clusters)
    return wilson_interval(k / deff, n / deff)


# ---------------------------------------------------------------------------------------------------- power
def mde_paired_binary(n: float, discordance: float, z_alpha: float = Z_95, z_beta: float = Z_80) -> float:
    """Minimum detectable difference of two paired proportions (McNemar, Connor 1987) with ``n`` pairs whose
    share of discordant pairs is ``discordance``: the smallest delta with
    ``n >= (z_a sqrt(p_d) + z_b sqrt(p_d - delta^2))^2 / delta^2``. NaN when no delta <= p_d is detectable."""
    if n <= 0 or discordance <= 0:
        return float("nan")

    def needed(delta: float) -> float:
        return (z_alpha * math.sqrt(discordance) + z_beta * math.sqrt(max(discordance - delta ** 2, 0.0))) ** 2 / delta ** 2

    if needed(discordance) > n:
        return float("nan")
    lo, hi = 1e-9, discordance  # needed() falls as delta grows
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if needed(mid) > n else (lo, mid)
    return hi


def mde_paired_mean(n: float, sd_difference: float, z_alpha: float = Z_95, z_beta: float = Z_80) -> float:
    """Minimum detectable mean of paired differences (normal approximation): (z_a + z_b) sd / sqrt(n)."""
    return (z_alpha + z_beta) * sd_difference / math.sqrt(n) if n > 0 else float("nan")


def pool_seeds(deltas: Sequence[float], within_se: Sequence[float]) -> dict[str, float]:
    """A delta measured once per training seed on the *same* held-out examples, pooled: the mean over seeds,
    and a 95% interval whose half-width is sqrt((z se_w)^2 + (t_{k-1} se_b)^2), with se_w^2 the mean per-seed
    example-sampling variance (shared examples: not divided by k) and se_b^2 the between-seed variance / k.
    ``mde`` is what that interval could detect with 80% power."""
    k = len(deltas)
    if k == 0 or len(within_se) != k:
        raise ValueError(f"pool_seeds needs one within-seed standard error per delta ({k} vs {len(within_se)})")
    mean = sum(deltas) / k
    between = sum((d - mean) ** 2 for d in deltas) / (k - 1) if k > 1 else 0.0
    se_w = math.sqrt(sum(s * s for s in within_se) / k)
    se_b = math.sqrt(between / k)
    t = t_975(k - 1) if k > 1 else Z_95
    half = math.sqrt((Z_95 * se_w) ** 2 + (t * se_b) ** 2)
    return {"delta": mean, "ci_low": mean - half, "ci_high": mean + half, "sd_seeds": math.sqrt(between),
            "seeds": k, "mde": half * (Z_95 + Z_80) / Z_95}


def pool_seed_intervals(deltas: Sequence[float], cis: Sequence[tuple[float, float]]) -> dict[str, float]:
    """``pool_seeds`` with each seed's standard error read off its 95% interval: the one seed pooling of
    ``mode=compare_sweep`` and the recorded report. A single seed keeps its own interval (Newcombe's is asymmetric
    near 0 or 1, and a symmetric one rebuilt from its width would misstate it)."""
    pooled = pool_seeds(deltas, [(hi - lo) / (2 * Z_95) for lo, hi in cis])
    if len(deltas) == 1:
        pooled["ci_low"], pooled["ci_high"] = cis[0]
    return pooled


GAP_TOLERANCE = 1e-4  # a reward gap smaller than this is float noise between equal policies (fp32 tables: ~1e-6)


def share_of_gap(gain: float, gap: float) -> float:
    """``gain / gap`` (what share of a reference's advantage over a baseline was recovered), nan where there is
    no gap: a reference that ties the baseline (e.g. a group oracle that picks the static feature everywhere)
    has nothing to recover, and dividing by its float noise would print a meaningless share."""
    return gain / gap if gap > GAP_TOLERANCE else float("nan")
