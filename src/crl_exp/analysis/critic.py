"""Critic trajectory analysis (docs/design.md §6): is a failure the policy's limit or a
value-estimation error?

Episodes are grouped by outcome against the unsteered baseline on the same prompt: ``correct`` (both right),
``incorrect`` (both wrong), ``corrected`` (steering turned wrong into right), ``misguided`` (right into
wrong). A failed CRL episode whose critic expected success is a *value-estimation error*; one whose critic foresaw
failure is a *policy limitation*. "Expected success" is judged on the reward's own scale: V_0 at or above the
midpoint between the mean return of successful and of failed episodes (a fixed 0.5 would call every failure a
policy limitation when the dense reward averages 0.2). A critic that explains less of the return than its mean
does (explained variance < 0) cannot tell the two apart: the split is then not made, and the report says so.
Calibration of V_0 against the return is reported as continuous figures as well (explained variance,
correlation, AUROC for success). Values and returns are compared in the reward's units: the intervention log's
``value`` is the critic's output times the reward scale it was trained in (``value_scale``); explained variance is
not scale-invariant, so a critic read in its own normalised units would look broken however good it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from crl_exp.crl.ppo import explained_variance


def outcome_group(crl_correct: bool, base_correct: bool) -> str:
    if crl_correct and base_correct:
        return "correct"
    if not crl_correct and not base_correct:
        return "incorrect"
    return "corrected" if crl_correct else "misguided"


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN if one class."""
    pos, neg = scores[labels.bool()], scores[~labels.bool()]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


@dataclass
class CriticReport:
    episodes: pd.DataFrame  # one row per episode: v0, return, success, baseline_correct, group, failure_kind
    metrics: dict[str, float]


def success_threshold(returns: torch.Tensor, success: torch.Tensor) -> float:
    """The midpoint between the mean return of successes and of failures (the mean return if one is absent)."""
    if success.all() or (~success).all():
        return returns.mean().item()
    return 0.5 * (returns[success].mean().item() + returns[~success].mean().item())


def analyse_critic(log: pd.DataFrame, baseline_correct: dict[str, float], threshold: float | None = None) -> CriticReport:
    """``log``: intervention log; ``baseline_correct``: prompt_id -> unsteered correctness on the same prompt.
    ``threshold``: V_0 at or above it means "the critic expected success" (default: ``success_threshold``)."""
    if log.empty:
        raise ValueError("Critic analysis needs a non-empty intervention log")
    first = log.sort_values("position").groupby("episode").first()
    ep = pd.DataFrame({"prompt_id": first["prompt_id"], "v0": first["value"], "return": first["reward"],
                       "success": first["correct"] > 0.5})
    missing = set(ep["prompt_id"]) - set(baseline_correct)
    if missing:
        raise ValueError(f"No unsteered baseline for {len(missing)} prompts, e.g. {sorted(missing)[:3]}")
    ep["baseline_correct"] = ep["prompt_id"].map(lambda p: baseline_correct[p] > 0.5)
    ep["group"] = [outcome_group(s, b) for s, b in zip(ep["success"], ep["baseline_correct"], strict=True)]
    v0 = torch.tensor(ep["v0"].to_numpy(), dtype=torch.float)
    y = torch.tensor(ep["success"].to_numpy(), dtype=torch.float)
    returns = torch.tensor(ep["return"].to_numpy(), dtype=torch.float)
    ev = explained_variance(v0, returns)
    analysable = ev == ev and ev >= 0
    if threshold is None:
        threshold = success_threshold(returns, y.bool())
    ep["failure_kind"] = ["" if s else (("value_estimation_error" if v >= threshold else "policy_limitation")
                                        if analysable else "critic_uninformative")
                          for s, v in zip(ep["success"], ep["v0"], strict=True)]
    failures = (~ep["success"]).sum()
    corr = torch.corrcoef(torch.stack([v0, returns]))[0, 1].item() if len(v0) > 1 else float("nan")
    metrics = {
        "critic/explained_variance": ev,
        "critic/analysable": float(analysable),
        "critic/threshold": float(threshold),
        "critic/v0_return_correlation": corr,
        "critic/v0_auroc": auroc(v0, y),
        "critic/v0_brier": ((v0.clamp(0, 1) - y) ** 2).mean().item(),
        "critic/value_estimation_errors": float((ep["failure_kind"] == "value_estimation_error").sum()),
        "critic/policy_limitations": float((ep["failure_kind"] == "policy_limitation").sum()),
        "critic/value_error_share_of_failures": float((ep["failure_kind"] == "value_estimation_error").sum()
                                                       / failures) if failures and analysable else float("nan"),
        "critic/return_mean": float(ep["return"].mean()),
        "critic/reward_scale": float(first["value_scale"].iloc[0]) if "value_scale" in first else float("nan"),
    }
    for g in ("correct", "incorrect", "corrected", "misguided"):
        metrics[f"critic/group_{g}"] = float((ep["group"] == g).sum())
    return CriticReport(ep.reset_index(), metrics)


def plot_value_trajectories(log: pd.DataFrame, report: CriticReport, path) -> None:
    """PNG: V_t along each episode, coloured by outcome group, with the realised returns as end markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"correct": "tab:green", "incorrect": "tab:gray", "corrected": "tab:blue", "misguided": "tab:red"}
    group = dict(zip(report.episodes["episode"], report.episodes["group"], strict=True))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ep, rows in log.groupby("episode"):
        rows = rows.sort_values("position")
        c = colours[group[ep]]
        ax.plot(rows["position"], rows["value"], color=c, alpha=0.6, lw=1, marker=".")
        ax.scatter([rows["position"].iloc[-1]], [rows["reward"].iloc[-1]], color=c, marker="x", s=20)
    for g, c in colours.items():
        ax.plot([], [], color=c, label=g)
    ax.set(xlabel="generated step t", ylabel="V_t (line) / realised return (x)", title="Critic value trajectories")
    ax.legend(fontsize=8)
    eps = report.episodes
    for ok, c in ((True, "tab:green"), (False, "tab:red")):
        ax2.hist(eps.loc[eps["success"] == ok, "v0"], bins=15, alpha=0.6, color=c, label="success" if ok else "failure")
    ax2.set(xlabel="V_0", ylabel="episodes",
            title=f"V_0 calibration (AUROC {report.metrics['critic/v0_auroc']:.2f}, "
                  f"Brier {report.metrics['critic/v0_brier']:.2f})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
