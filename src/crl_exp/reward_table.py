"""The exact reward table of a one-token task: every prompt's outcome under every feature of a pool.

Only the newest position is steered, so on a one-token task the outcome of prompt p under feature f costs one
shared unsteered prefill of p plus one row of a batched last-token forward (``generate(share_prefix=True)``).
One table serves the exhaustive static-feature selection (the best column on validation), the headroom oracle
(the best cell per held-out row, reading the answers) and anything fitted on exact rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from crl_exp.episodes import rollout_batch
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.hook import NO_FEATURE


@dataclass
class RewardTable:
    """``reward``/``correct``: [prompts, features]; ``unsteered_*``: [prompts] (no feature); ``states``: [prompts,
    d_model] the residual state at the steered position before any edit (what a policy observes)."""

    features: list[int]
    example_ids: list[str]
    reward: torch.Tensor
    correct: torch.Tensor
    unsteered_reward: torch.Tensor
    unsteered_correct: torch.Tensor
    states: torch.Tensor

    @property
    def episodes(self) -> int:
        """Episodes this table stands for (every prompt under every feature and unsteered)."""
        return len(self.example_ids) * (len(self.features) + 1)

    def best_column(self) -> int:
        """Index of the feature with the highest mean reward (ties: the earlier, i.e. better ranked, one)."""
        means = self.reward.mean(0)
        return int((means == means.max()).nonzero()[0])


@torch.no_grad()
def reward_table(env, examples: list, features: list[int], chunk: int = 256, desc: str = "reward table") -> RewardTable:
    """Every ``examples`` prompt steered by every feature (``env.coefficient``) and by nothing.

    Rows of one prompt share its prefill; ``chunk`` bounds the rows of one forward (memory)."""
    if env.task.max_new_tokens != 1:
        raise ValueError(f"reward tables need a one-token task; {env.task.name} generates {env.task.max_new_tokens}")
    if not features:
        raise ValueError("reward_table needs at least one feature")
    columns = [NO_FEATURE, *features]
    rewards, correct, states = [], [], []
    env.steerer.record_states = True
    try:
        for ex in tqdm(examples, desc=desc, unit="prompt", disable=len(examples) < 16):
            row_r, row_c = [], []
            for start in range(0, len(columns), chunk):
                part = columns[start:start + chunk]
                records, _ = rollout_batch(env.task, env.lm, [ex] * len(part), env.steerer,
                                           StaticController(torch.tensor(part), env.coefficient), share_prefix=True)
                row_r += [float(r["reward"]) for r in records]
                row_c += [float(r["correct"]) for r in records]
                if start == 0:
                    states.append(env.steerer.steps[0].state[0].float().cpu())
            rewards.append(row_r)
            correct.append(row_c)
    finally:
        env.steerer.record_states = False
    r, c = torch.tensor(rewards), torch.tensor(correct)
    return RewardTable(list(features), [ex.id for ex in examples], r[:, 1:], c[:, 1:], r[:, 0], c[:, 0],
                       torch.stack(states))
