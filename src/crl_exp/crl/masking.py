"""Adaptive Feature Masking (AFM, docs/design.md §4): push the policy to discover diverse features.

After every PPO iteration the mask updates an exponential moving average of each feature's selection share.
A feature whose share exceeds the current threshold is masked (its logit becomes -inf) for ``period``
iterations, so the policy must find alternatives while each token still gets exactly one feature. The
threshold follows the schedule:

* ``none``      never mask;
* ``fixed``     constant ``threshold``;
* ``decaying``  ``threshold * decay**iteration`` (exponential) down to ``min_threshold``;
* ``adaptive``  the threshold moves down (more masking) while policy entropy is below ``target_entropy`` and
                back up when above, within [``min_threshold``, ``threshold``];
* ``module:function``  any threshold rule in its own module (see ARCHITECTURE.md, "add a masking schedule").

A share above the threshold is not enough: selections are samples, and near uniform over a dictionary one pick
of a feature is already a share far above any threshold (64 picks over 4,096 features: 1/128 against a uniform
1/4,096). With ``significance`` set (the default), a feature is masked only when its count over the window is
significantly more than a policy choosing it at exactly the threshold share would give: a one-sided binomial test,
``P(X >= count | window picks, threshold share) < significance / |action space|`` (Bonferroni over the features
tested, so a uniform policy masks nothing at any dictionary size, and a collapsed one is masked at once). The
window is the EMA-weighted count: ``count <- ema * count + picks`` (and the same for all picks), whose ratio is the
EMA selection share.

``relative_to`` sets the threshold's unit: ``share`` (a share of all selections, the paper's; 0.2 is unreachable
near uniform over a dictionary: 1/4,096 is 0.00024) or ``uniform`` (a multiple of the uniform share
1/|action space|: 8 masks a feature chosen 8x as often as uniform would, at any dictionary size). The logged
``train/mask_threshold`` is always the effective share.

At least ``min_unmasked`` features always stay available (the least selected ones are released first), and
a schedule that could mask every feature is refused when the config is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from crl_exp.errors import CRLConfigError


@dataclass
class MaskingConfig:
    schedule: str = "none"
    threshold: float = 0.2
    min_threshold: float = 0.05
    decay: float = 0.9
    period: int = 3
    ema: float = 0.5
    min_unmasked: int = 16
    target_entropy: float = 1.0
    adapt_rate: float = 0.8
    relative_to: str = "share"  # the unit of threshold/min_threshold: "share" or "uniform" (x 1/|action space|)
    # family-wise rate of masking a feature on sampling noise alone, per update (binomial test, Bonferroni over the
    # action space); null: the share alone decides (masks every feature picked once near uniform over 4,096)
    significance: float | None = 0.05
    # The headline rule, fixed before any run it scores: held-out greedy CRL with the end-of-training mask off
    # (the mask is exploration pressure whose last contents depend on where training stopped in the masking
    # period). Greedy with the mask on is always reported beside it; both stay inside the action space.
    eval_with_mask: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # numbers a custom schedule needs (its own names)

    def validate(self, d_sae: int) -> None:
        threshold_rule(self.schedule)  # unknown names fail here, with the valid ones
        if self.schedule == "none":
            return
        if not 1 <= self.min_unmasked < d_sae:
            raise CRLConfigError(f"masking.min_unmasked={self.min_unmasked} must be in [1, {d_sae - 1}]: otherwise "
                                 f"every feature could be masked")
        if self.relative_to not in ("share", "uniform"):
            raise CRLConfigError(f"masking.relative_to must be share or uniform, got {self.relative_to!r}")
        lowest = self.threshold if self.schedule == "fixed" else self.min_threshold
        # Shares sum to 1, so at most floor(1/lowest) features can be above the threshold at once.
        if self.relative_to == "uniform":
            if lowest <= 1:
                raise CRLConfigError(f"masking threshold {lowest} x uniform could mask all features (needs > 1)")
        elif lowest <= 0 or 1.0 / lowest >= d_sae:
            raise CRLConfigError(f"masking threshold {lowest} could mask all {d_sae} features (needs > 1/d_sae)")
        if self.period < 1 or not 0 <= self.ema < 1 or not 0 < self.decay <= 1:
            raise CRLConfigError("masking needs period >= 1, 0 <= ema < 1 and 0 < decay <= 1")
        if self.significance is not None and not 0 < self.significance < 1:
            raise CRLConfigError(f"masking.significance must be in (0, 1) or null, got {self.significance}")

    def check_action_pool(self, size: int, d_sae: int | None = None) -> None:
        """A restricted action pool must fit the dictionary and leave AFM something to keep unmasked (the one
        check: preflight calls it for ``policy.action_pool``, ``restrict`` for a task's own pool)."""
        if not 1 <= size <= (d_sae or size):
            raise CRLConfigError(f"policy.action_pool={size} must be in [1, d_sae={d_sae}]")
        if not (self.schedule == "none" or size > self.min_unmasked):
            raise CRLConfigError(f"policy.action_pool={size} must exceed masking.min_unmasked={self.min_unmasked} "
                                 f"(or use masking=none), or AFM could mask every feature of it")


# ---------------------------------------------------------------- schedules
# A schedule is a threshold rule: (config, current threshold, iteration, policy entropy) -> next threshold.
ThresholdRule = Callable[["MaskingConfig", float, int, float], float]


def fixed(cfg: MaskingConfig, current: float, iteration: int, entropy: float) -> float:
    return cfg.threshold


def decaying(cfg: MaskingConfig, current: float, iteration: int, entropy: float) -> float:
    return max(cfg.min_threshold, cfg.threshold * cfg.decay ** iteration)


def adaptive(cfg: MaskingConfig, current: float, iteration: int, entropy: float) -> float:
    factor = cfg.adapt_rate if entropy < cfg.target_entropy else 1.0 / cfg.adapt_rate
    return min(cfg.threshold, max(cfg.min_threshold, current * factor))


THRESHOLD_RULES: dict[str, ThresholdRule | None] = {"none": None, "fixed": fixed, "decaying": decaying,
                                                     "adaptive": adaptive}


def threshold_rule(schedule: str) -> ThresholdRule | None:
    """The built-in rule of that name, or ``module:function`` imported (a schedule in its own module)."""
    if schedule in THRESHOLD_RULES:
        return THRESHOLD_RULES[schedule]
    module, _, name = schedule.partition(":")
    try:
        return getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError):
        pass
    raise CRLConfigError(f"masking.schedule={schedule!r}: not one of {', '.join(THRESHOLD_RULES)} and not an "
                         f"importable 'module:function'")


class AdaptiveFeatureMask:
    """Mask state (EMA shares, masked-until iteration, current threshold); part of every checkpoint."""

    def __init__(self, d_sae: int, cfg: MaskingConfig):
        cfg.validate(d_sae)
        self.cfg, self.d_sae = cfg, d_sae
        self.rule = threshold_rule(cfg.schedule)
        self.counts = torch.zeros(d_sae, dtype=torch.float64)  # EMA-weighted selections over the window
        self.total = 0.0  # EMA-weighted selections of all features
        self.masked_until = torch.zeros(d_sae, dtype=torch.long)
        self.iteration = 0
        self.threshold = cfg.threshold
        self.action_pool = torch.ones(d_sae, dtype=torch.bool)  # the action space AFM works within

    def restrict(self, features: list[int]) -> None:
        """Limit the action space to ``features`` for good (``policy.action_pool``); AFM masks within them."""
        self.cfg.check_action_pool(len(features), self.d_sae)
        self.action_pool = torch.zeros(self.d_sae, dtype=torch.bool)
        self.action_pool[torch.tensor(features, dtype=torch.long)] = True

    def allowed(self) -> torch.Tensor:
        """Bool [d_sae]: features the policy may pick this iteration."""
        return (self.masked_until <= self.iteration) & self.action_pool

    @property
    def effective_threshold(self) -> float:
        """The selection share above which a feature is masked (``relative_to=uniform``: threshold / |space|)."""
        if self.cfg.relative_to == "uniform":
            return self.threshold / max(1, int(self.action_pool.sum()))
        return self.threshold

    @property
    def mask_size(self) -> int:
        """Features of the action pool masked now."""
        return int((self.action_pool & ~self.allowed()).sum())

    @property
    def share(self) -> torch.Tensor:
        """[d_sae] each feature's EMA selection share."""
        return (self.counts / self.total).float() if self.total > 0 else torch.zeros(self.d_sae)

    def update(self, features: torch.Tensor, entropy: float) -> None:
        """Feed the features selected this iteration (any shape) and the mean policy entropy."""
        picks = torch.bincount(features.flatten().long().cpu(), minlength=self.d_sae).double()
        self.counts = self.cfg.ema * self.counts + picks
        self.total = self.cfg.ema * self.total + float(picks.sum())
        self.iteration += 1
        if self.rule is None:
            return
        self.threshold = float(self.rule(self.cfg, self.threshold, self.iteration, entropy))
        over = (self.share > self.effective_threshold) & self.allowed()
        if self.cfg.significance is not None and over.any():
            over &= self.significantly_over()
        self.masked_until[over] = self.iteration + self.cfg.period
        self._keep_minimum_available()

    def significantly_over(self) -> torch.Tensor:
        """Bool [d_sae]: counts a policy choosing the feature at the threshold share would reach with probability
        below ``significance / |action space|`` (one-sided binomial on the EMA-weighted window)."""
        from scipy.special import betainc

        p0 = min(self.effective_threshold, 1.0)
        n = self.total
        k = self.counts.numpy()
        # P(X >= k) for X ~ Binomial(n, p0) = I_p0(k, n - k + 1), continuous in k and n (EMA-weighted counts)
        tail = betainc(k.clip(1e-9, None), (n - k + 1).clip(1e-9, None), p0)
        tail[k <= 0] = 1.0
        alpha = self.cfg.significance / max(1, int(self.action_pool.sum()))
        return torch.from_numpy(tail < alpha)

    def _keep_minimum_available(self) -> None:
        allowed = self.allowed()
        missing = self.cfg.min_unmasked - int(allowed.sum())
        if missing > 0:
            masked = (self.action_pool & ~allowed).nonzero().flatten()
            release = masked[self.share[masked].argsort()[:missing]]
            self.masked_until[release] = self.iteration

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "total": self.total, "masked_until": self.masked_until.clone(),
                "iteration": self.iteration, "threshold": self.threshold, "action_pool": self.action_pool.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts, self.total = state["counts"].clone(), float(state["total"])
        self.masked_until = state["masked_until"].clone()
        self.iteration = int(state["iteration"])
        self.threshold = float(state["threshold"])
        self.action_pool = state["action_pool"].clone()
