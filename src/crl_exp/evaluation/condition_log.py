"""How an evaluated condition is printed and logged: metrics with CI bounds, the per-example table, a summary."""

from __future__ import annotations

from crl_exp.tracking import RunTracker


def format_table(metrics: dict[str, float], cis: dict[str, tuple[float, float]]) -> str:
    width = max(len(k) for k in metrics) if metrics else 10
    lines = [f"{'metric':<{width}}  {'value':>8}  95% CI"]
    for key, value in metrics.items():
        lo, hi = cis.get(key, (float("nan"), float("nan")))
        lines.append(f"{key:<{width}}  {value:8.4f}  [{lo:.4f}, {hi:.4f}]")
    return "\n".join(lines)


def log_evaluation(tracker: RunTracker, prefix: str, metrics: dict, cis: dict, records: list[dict],
                   extra: dict[str, float]) -> None:
    tracker.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()})
    tracker.log_metrics({f"{prefix}/{k}_ci_low": lo for k, (lo, _) in cis.items()})
    tracker.log_metrics({f"{prefix}/{k}_ci_high": hi for k, (_, hi) in cis.items()})
    tracker.log_metrics({f"{prefix}/{k}": v for k, v in extra.items()})
    columns = sorted({k for r in records for k in r}, key=lambda k: (k not in ("id", "prompt", "completion"), k))
    table = {c: [_jsonable(r.get(c)) for r in records] for c in columns}
    tracker.log_table(table, f"{prefix}/examples.json")
    tracker.log_dict({"metrics": metrics, "ci95": {k: list(v) for k, v in cis.items()}, **extra},
                     f"{prefix}/summary.json")


def _jsonable(v):
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)
