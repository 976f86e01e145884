"""Reference rows of one-token tasks, from exact reward tables (``reward_table``) over the action pool.

* **group oracle**: each group's (class, subject, category) best feature on the *train* table, applied to every
  held-out prompt of that group: what a policy that reads only the group could get;
* **ceiling**: the best a policy over the same state and action space could learn: a softmax policy (linear over
  the standardised state, or a one-hidden-layer MLP) fitted on the train table by the exact expected-reward
  gradient, its weight decay and kind chosen on the validation table, scored greedy on the held-out table. It
  reads train answers only, never held-out ones, so unlike the per-prompt oracle it is a fair upper reference:
  CRL far below it says the learner is the bottleneck; the ceiling at the static level says the model and pool
  hold no learnable prompt-dependent signal at this scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crl_exp.reward_table import RewardTable

CEILING_GRID = (("linear", 1e-4), ("linear", 1e-2), ("linear", 1.0), ("mlp", 1e-4), ("mlp", 1e-2))


def group_oracle(train: RewardTable, train_groups: list[str], heldout: RewardTable,
                 heldout_groups: list[str]) -> dict[str, Any]:
    """Each group's best train feature applied to its held-out prompts (groups unseen in train: the best
    overall train feature)."""
    overall = train.best_column()
    best: dict[str, int] = {}
    for g in sorted(set(train_groups)):
        rows = torch.tensor([i for i, x in enumerate(train_groups) if x == g])
        means = train.reward[rows].mean(0)
        best[g] = int((means == means.max()).nonzero()[0])
    columns = torch.tensor([best.get(g, overall) for g in heldout_groups])
    rows = torch.arange(len(heldout_groups))
    return {"reward": float(heldout.reward[rows, columns].mean()), "accuracy": float(heldout.correct[rows, columns].mean()),
            "best_feature": {g: heldout.features[c] for g, c in best.items()}}


class SoftmaxPolicy(nn.Module):
    def __init__(self, d_in: int, n_actions: int, kind: str, hidden: int = 64):
        super().__init__()
        self.net = (nn.Linear(d_in, n_actions) if kind == "linear" else
                    nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_actions)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def standardiser(states: torch.Tensor):
    """LayerNorm (no affine, as the policy's) then per-dimension standardisation with train statistics."""
    normed = nn.functional.layer_norm(states.float(), states.shape[-1:])
    mean, std = normed.mean(0), normed.std(0) + 1e-6
    return lambda s: (nn.functional.layer_norm(s.float(), s.shape[-1:]) - mean) / std


def fit_softmax_policy(states: torch.Tensor, rewards: torch.Tensor, kind: str, weight_decay: float,
                       steps: int = 400, lr: float = 1e-2, seed: int = 0) -> tuple[SoftmaxPolicy, Any]:
    """Maximise the exact expected reward sum_a pi(a|s) r(s,a) over the train prompts (rewards centred per prompt
    and scaled to unit spread) with decoupled weight decay."""
    torch.manual_seed(seed)
    norm = standardiser(states)
    x = norm(states)
    centred = rewards - rewards.mean(1, keepdim=True)
    scaled = centred / (centred.std() + 1e-8)
    policy = SoftmaxPolicy(x.shape[1], rewards.shape[1], kind)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = -(policy(x).softmax(-1) * scaled).sum(-1).mean()
        loss.backward()
        opt.step()
    return policy, norm


@torch.no_grad()
def greedy_actions(policy: SoftmaxPolicy, norm, table: RewardTable) -> torch.Tensor:
    """The fitted policy's greedy column (index into ``table.features``) for every prompt of ``table``."""
    return policy(norm(table.states)).argmax(-1)


def greedy_score(policy: SoftmaxPolicy, norm, table: RewardTable) -> dict[str, float]:
    actions = greedy_actions(policy, norm, table)
    rows = torch.arange(len(actions))
    return {"reward": float(table.reward[rows, actions].mean()), "accuracy": float(table.correct[rows, actions].mean()),
            "distinct_actions": int(actions.unique().numel())}


def ceiling(train: RewardTable, validation: RewardTable, heldout: RewardTable, seed: int = 0) -> dict[str, Any]:
    """The learnability ceiling (module doc): every (kind, weight decay) of ``CEILING_GRID`` fitted on train,
    the best greedy validation reward chosen, then scored once on the held-out table."""
    if not (train.features == validation.features == heldout.features):
        raise ValueError("the ceiling's train, validation and held-out tables must share one action pool")
    trials = []
    for kind, wd in CEILING_GRID:
        policy, norm = fit_softmax_policy(train.states, train.reward, kind, wd, seed=seed)
        trials.append({"kind": kind, "weight_decay": wd, "validation": greedy_score(policy, norm, validation),
                       "policy": policy, "norm": norm})
    best = max(trials, key=lambda t: t["validation"]["reward"])
    held = greedy_score(best["policy"], best["norm"], heldout)
    actions = greedy_actions(best["policy"], best["norm"], heldout)
    return {**held, "actions": actions.tolist(), "kind": best["kind"], "weight_decay": best["weight_decay"], "train_prompts": len(train.example_ids),
            "validation": [{k: t[k] for k in ("kind", "weight_decay", "validation")} for t in trials]}
