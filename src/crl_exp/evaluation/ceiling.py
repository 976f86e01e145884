"""Reference rows of one-token tasks, from exact reward tables (``reward_table``) over the action pool.

* **group oracle**: each group's (class, subject, category) best feature on the *train* table, applied to every
  held-out prompt of that group: what a policy that reads only the group could get;
* **ceiling**: the best policy of the softmax class (over the same state and action space) that validation can
  find. The class contains the static policy (one action everywhere), so the search starts there: every fit is
  initialised *at* the static policy (zero weights, the bias on the validation-best feature) and shrunk towards it
  (an L2 penalty on the weights only, ``CEILING_GRID``'s strengths, from bias-only to almost free), with early
  stopping; kind, strength and stopping step are chosen on the validation table, step 0 (the static policy itself)
  included, so on validation the ceiling is never below the static feature by construction. Fitted on train
  answers only and scored once, greedy, on the held-out table: CRL far below it says the learner is the
  bottleneck; a ceiling that stays at the static policy says validation found no prompt-dependent signal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crl_exp.reward_table import RewardTable
from crl_exp.steering.hook import NO_FEATURE

# (kind, L2 strength on the weights): "bias" learns one logit per action (a state-independent policy); "linear" and
# "mlp" read the standardised state, shrunk towards the static policy by the penalty (1e2: almost bias-only).
CEILING_GRID = (("bias", 0.0), ("linear", 1e2), ("linear", 1.0), ("linear", 1e-2), ("linear", 1e-4),
                ("mlp", 1.0), ("mlp", 1e-2), ("mlp", 1e-4))
CEILING_CHECKPOINTS = (0, 10, 25, 50, 100, 200, 400)  # early stopping: validation scores the fit at these steps
STATIC_INIT_LOGIT = 2.0  # the static action's starting logit: greedy = static at step 0, gradients not saturated


def group_rows(groups: list[str]) -> dict[str, torch.Tensor]:
    """Each group's row indices, groups in sorted order."""
    return {g: torch.tensor([i for i, x in enumerate(groups) if x == g]) for g in sorted(set(groups))}


def group_oracle(train: RewardTable, train_groups: list[str], heldout: RewardTable,
                 heldout_groups: list[str]) -> dict[str, Any]:
    """Each group's best train feature applied to its held-out prompts (groups unseen in train: the best
    overall train feature)."""
    overall = train.best_column()
    best: dict[str, int] = {}
    for g, rows in group_rows(train_groups).items():
        means = train.reward[rows].mean(0)
        best[g] = int((means == means.max()).nonzero()[0])
    columns = torch.tensor([best.get(g, overall) for g in heldout_groups])
    rows = torch.arange(len(heldout_groups))
    paid = heldout.reward[rows, columns]
    by_group = {g: float(paid[rows].mean()) for g, rows in group_rows(heldout_groups).items()}
    return {"reward": float(paid.mean()), "accuracy": float(heldout.correct[rows, columns].mean()),
            "best_feature": {g: heldout.features[c] for g, c in best.items()}, "reward_by_group": by_group}


def group_means(table: RewardTable, groups: list[str]) -> dict[str, dict[int, float]]:
    """Each group's mean reward under each feature of ``table`` (and, as ``NO_FEATURE``, unsteered)."""
    out: dict[str, dict[int, float]] = {}
    for g, rows in group_rows(groups).items():
        means = table.reward[rows].mean(0).tolist()
        out[g] = {**dict(zip(table.features, means, strict=True)),
                  NO_FEATURE: float(table.unsteered_reward[rows].mean())}
    return out


def at_least_as_good(picks: list[int], groups: list[str], best: dict[str, int],
                     validation_means: dict[str, dict[int, float]]) -> list[bool]:
    """Per prompt: is its pick its group's best train feature, or one whose exact validation reward on that group
    is at least the best feature's? (A learner over a whole dictionary may find an equally good feature the train
    table ranked lower.) Groups without validation prompts count only the best feature itself."""
    out = []
    for f, g in zip(picks, groups, strict=True):
        means = validation_means.get(g)
        out.append(f == best.get(g) or (means is not None and g in best and f in means
                                        and means[f] >= means[best[g]]))
    return out


class SoftmaxPolicy(nn.Module):
    """Logits = bias + g(state), where g is zero (``bias``), linear or a one-hidden-layer MLP whose output layer
    starts at zero: at initialisation every kind is the state-independent policy its bias sets."""

    def __init__(self, d_in: int, n_actions: int, kind: str, hidden: int = 64):
        super().__init__()
        if kind not in ("bias", "linear", "mlp"):
            raise ValueError(f"ceiling policy kind must be bias, linear or mlp, got {kind!r}")
        self.bias = nn.Parameter(torch.zeros(n_actions))
        self.body = (None if kind == "bias" else nn.Linear(d_in, n_actions, bias=False) if kind == "linear" else
                     nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_actions, bias=False)))
        if self.body is not None:
            nn.init.zeros_(self.body.weight if kind == "linear" else self.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias if self.body is None else self.bias + self.body(x)

    def weights(self) -> list[nn.Parameter]:
        """What the shrinkage penalty acts on (everything but the bias)."""
        return [] if self.body is None else list(self.body.parameters())


def standardiser(states: torch.Tensor):
    """LayerNorm (no affine, as the policy's) then per-dimension standardisation with train statistics."""
    normed = nn.functional.layer_norm(states.float(), states.shape[-1:])
    mean, std = normed.mean(0), normed.std(0) + 1e-6
    return lambda s: (nn.functional.layer_norm(s.float(), s.shape[-1:]) - mean) / std


def fit_softmax_policy(states: torch.Tensor, rewards: torch.Tensor, kind: str, shrinkage: float, start_action: int,
                       checkpoints=CEILING_CHECKPOINTS, lr: float = 1e-2, seed: int = 0):
    """Maximise the exact expected reward sum_a pi(a|s) r(s,a) over the train prompts (rewards centred per prompt
    and scaled to unit spread) minus ``shrinkage`` * the weights' squared norm, from the static policy on
    ``start_action``. Yields (step, policy, norm) at every checkpoint, step 0 first (the static policy itself)."""
    torch.manual_seed(seed)
    norm = standardiser(states)
    x = norm(states)
    centred = rewards - rewards.mean(1, keepdim=True)
    scaled = centred / (centred.std() + 1e-8)
    policy = SoftmaxPolicy(x.shape[1], rewards.shape[1], kind)
    with torch.no_grad():
        policy.bias[start_action] = STATIC_INIT_LOGIT
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for step in range(max(checkpoints) + 1):
        if step in checkpoints:
            yield step, policy, norm
        opt.zero_grad()
        loss = -(policy(x).softmax(-1) * scaled).sum(-1).mean()
        loss = loss + shrinkage * sum((w ** 2).sum() for w in policy.weights())
        loss.backward()
        opt.step()


@torch.no_grad()
def greedy_actions(policy: SoftmaxPolicy, norm, table: RewardTable) -> torch.Tensor:
    """The fitted policy's greedy column (index into ``table.features``) for every prompt of ``table``."""
    return policy(norm(table.states)).expand(len(table.example_ids), -1).argmax(-1)


def score_actions(table: RewardTable, actions: torch.Tensor) -> dict[str, float]:
    rows = torch.arange(len(actions))
    return {"reward": float(table.reward[rows, actions].mean()), "accuracy": float(table.correct[rows, actions].mean()),
            "distinct_actions": int(actions.unique().numel())}


def greedy_score(policy: SoftmaxPolicy, norm, table: RewardTable) -> dict[str, float]:
    return score_actions(table, greedy_actions(policy, norm, table))


def ceiling(train: RewardTable, validation: RewardTable, heldout: RewardTable, seed: int = 0,
            static_column: int | None = None) -> dict[str, Any]:
    """The learnability ceiling (module doc). ``static_column``: the static policy's column (default: the
    validation table's best, as the static baseline selects it). Every (kind, shrinkage) of ``CEILING_GRID`` is
    fitted on train from that policy and scored on validation at every checkpoint; the best validation reward wins
    (ties: the earlier step, then the earlier grid entry, so the static policy wins every tie), then it is scored
    once on the held-out table."""
    if not (train.features == validation.features == heldout.features):
        raise ValueError("the ceiling's train, validation and held-out tables must share one action pool")
    start = validation.best_column() if static_column is None else int(static_column)
    static_val = score_actions(validation, torch.full((len(validation.example_ids),), start))
    best = {"kind": "static", "shrinkage": float("inf"), "steps": 0, "validation": static_val,
            "actions": torch.full((len(heldout.example_ids),), start)}
    trials = [{k: best[k] for k in ("kind", "shrinkage", "steps", "validation")}]
    for kind, strength in CEILING_GRID:
        for step, policy, norm in fit_softmax_policy(train.states, train.reward, kind, strength, start, seed=seed):
            if step == 0:
                continue  # the static policy, already the first trial
            val = greedy_score(policy, norm, validation)
            trials.append({"kind": kind, "shrinkage": strength, "steps": step, "validation": val})
            if val["reward"] > best["validation"]["reward"]:
                best = {**trials[-1], "actions": greedy_actions(policy, norm, heldout)}
    held = score_actions(heldout, best["actions"])
    return {**held, "actions": best["actions"].tolist(), "kind": best["kind"], "shrinkage": best["shrinkage"],
            "steps": best["steps"], "static_column": start, "validation_reward": best["validation"]["reward"],
            "static_validation_reward": static_val["reward"], "train_prompts": len(train.example_ids),
            "validation": trials}
