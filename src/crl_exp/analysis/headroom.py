"""Headroom: how much any per-prompt choice of one feature could add over the best static feature.

On a one-token task an episode's outcome under every candidate feature costs one shared prefill of the prompt
plus one batched last-token forward (the rows of one ``generate(share_prefix=True)``), so the per-prompt oracle
is affordable: for each held-out prompt, the best candidate *chosen knowing the answer*. The gap between the
oracle and the best static feature bounds what a per-token policy could add with that candidate pool; it is a
reference row, never a baseline (it reads the answers).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from crl_exp.episodes import rollout_batch
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.hook import NO_FEATURE


@torch.no_grad()
def per_prompt_oracle(env, examples: list, candidates: list[int]) -> dict[str, Any]:
    """Each prompt steered by every candidate (and by nothing): the best outcome per prompt, and how often the
    oracle's best is some candidate other than what no steering already gets right."""
    features = [NO_FEATURE, *candidates]
    best_correct, best_reward, unsteered_correct = [], [], []
    for ex in tqdm(examples, desc="headroom oracle", unit="prompt"):
        records, _ = rollout_batch(env.task, env.lm, [ex] * len(features), env.steerer,
                                   StaticController(torch.tensor(features), env.coefficient), share_prefix=True)
        correct = [float(r["correct"]) for r in records]
        rewards = [float(r["reward"]) for r in records]
        unsteered_correct.append(correct[0])
        best_correct.append(max(correct[1:]))
        best_reward.append(max(rewards[1:]))
    n = len(examples)
    return {"n": n, "candidates": len(candidates), "oracle_accuracy": sum(best_correct) / n,
            "oracle_reward": sum(best_reward) / n, "unsteered_accuracy": sum(unsteered_correct) / n}
