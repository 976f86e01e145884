"""Batched, KV-cached steered rollouts driven by the policy.

``PolicyController`` is called by the steering hook at every forward step (prefill, then each cached decoding
step): it reads the residual state of every row, samples (or takes the argmax of) the masked categorical,
and records state, feature, log-prob, probability, value and the chosen feature's own SAE activation. There is
no re-forward of the sequence: one ``generate`` call per batch is the whole rollout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.episodes import rollout_batch
from crl_exp.steering.hook import NO_FEATURE


@dataclass
class StepRecord:
    state: torch.Tensor
    feature: torch.Tensor
    logprob: torch.Tensor
    prob: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    feature_act: torch.Tensor


class PolicyController:
    """Steering controller backed by an ``ActorCritic``; keeps a per-step record of what it did."""

    def __init__(self, policy: ActorCritic, coefficient: float | None = None, allowed: torch.Tensor | None = None,
                 greedy: bool = False, seed: int = 0, sae=None, top_k: int = 1):
        """``coefficient``: None (CRL runs) returns features only and the steerer applies its own coefficient; a
        number returns (features, coefficients) for a steerer without one."""
        self.policy, self.coefficient, self.allowed, self.greedy, self.sae = policy, coefficient, allowed, greedy, sae
        self.top_k = top_k
        self.generator = torch.Generator().manual_seed(seed)
        self.steps: list[StepRecord] = []

    @torch.no_grad()
    def __call__(self, state: torch.Tensor):
        # the policy reads fp32 on its own device, whatever the model's dtype/device (bf16 on a GPU)
        device = next(self.policy.parameters()).device
        allowed = self.allowed.to(device) if self.allowed is not None else None
        dist, value = self.policy.distribution(state.to(device, torch.float32), allowed)
        probs = dist.probs
        k = self.top_k
        if self.greedy:
            chosen = probs.topk(k, dim=-1).indices
        else:  # k distinct features; their log-probs are summed (independent-draw approximation for k > 1)
            chosen = torch.multinomial(probs.cpu(), k, replacement=False, generator=self.generator).to(device)
        act = torch.zeros(chosen.shape)
        if self.sae is not None:
            acts = self.sae.encode(state.to(self.sae.W_dec.device, self.sae.W_dec.dtype))
            index = chosen.clamp_max(acts.shape[1] - 1).to(acts.device)  # the no-op has no activation: 0 below
            act = acts.gather(1, index).float().cpu()
            if self.policy.noop_index is not None:
                act = torch.where(chosen.cpu() == self.policy.noop_index, torch.zeros_like(act), act)
        chosen_probs = probs.gather(1, chosen)
        logprob = chosen_probs.clamp_min(1e-30).log().sum(-1)
        squeeze = (lambda t: t.squeeze(1)) if k == 1 else (lambda t: t)
        feature = squeeze(chosen)
        self.steps.append(StepRecord(state.detach().float().cpu(), feature.cpu(), logprob.cpu(),
                                     chosen_probs.sum(-1).cpu(), value.cpu(), dist.entropy().cpu(),
                                     act.sum(-1) if k > 1 else squeeze(act)))
        noop = self.policy.noop_index
        steered = feature if noop is None else torch.where(feature == noop, NO_FEATURE, feature)
        if self.coefficient is None:
            return steered.to(state.device)
        return steered.to(state.device), torch.full((len(feature),), self.coefficient, device=state.device)

    def trajectory_for_logs(self) -> dict[str, torch.Tensor]:
        """``stacked()`` with the no-op action written as ``NO_FEATURE`` (what the hook did), for logs and analyses."""
        traj = self.stacked()
        noop = self.policy.noop_index
        if noop is not None:
            traj["feature"] = torch.where(traj["feature"] == noop, NO_FEATURE, traj["feature"])
        return traj

    def stacked(self) -> dict[str, torch.Tensor]:
        """Each field stacked to ``[B, T, ...]`` (T = number of forward steps)."""
        fields = StepRecord.__dataclass_fields__
        return {name: torch.stack([getattr(s, name) for s in self.steps], dim=1) for name in fields}


@dataclass
class PolicyRollout:
    """One batch of policy-driven episodes in one object: the scored records, the generation (tokens, valid
    steps) and the policy's per-step trajectory ([B, T] fields): ``trajectory`` with the actions as trained (the
    no-op as its index), ``logged`` with the no-op written as ``NO_FEATURE`` (what the hook did)."""

    records: list[dict[str, Any]]
    generation: Any
    trajectory: dict[str, torch.Tensor]
    logged: dict[str, torch.Tensor]

    @property
    def valid(self) -> torch.Tensor:
        return self.generation.valid


def policy_rollout(task, lm, batch: list, steerer, controller: PolicyController,
                   share_prefix: bool = False) -> PolicyRollout:
    """Roll ``batch`` out under ``controller`` and return records and trajectory together (the controller's
    per-step record is emptied before and after, so one controller serves batch after batch)."""
    controller.steps = []
    records, gen = rollout_batch(task, lm, batch, steerer, controller, share_prefix=share_prefix)
    out = PolicyRollout(records, gen, controller.stacked(), controller.trajectory_for_logs())
    controller.steps = []
    return out
