"""Training on an exact reward table: the learner without the language model, for one-token tasks.

On a one-token task an episode is fully described by (prompt state, chosen feature) -> reward, and the exact
reward table (``reward_table``) holds that for every pair. ``train_on_table`` runs the one learner
(``Learner.iterate``, what ``mode=train`` runs) over a ``TableSource``: the same prompt draws per iteration, actions
sampled from the policy and their rewards read off the table. It is exact, and thousands of times cheaper than
rolling out the model: sweeps of the learner's settings and the episodes-to-learn benchmark run on it, and their
winners are then confirmed by real ``mode=train`` runs.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from crl_exp.crl.learner import Learner, TableSource
from crl_exp.crl.masking import MaskingConfig
from crl_exp.crl.policy import ActorCritic, PolicyConfig
from crl_exp.crl.ppo import PPOConfig, resolve_advantage
from crl_exp.reward_table import RewardTable

WARM_UP_STATES = 64  # states folded into the observation norm before the first iteration


@torch.no_grad()
def greedy_reward(policy: ActorCritic, table: RewardTable, allowed: torch.Tensor, columns: torch.Tensor) -> float:
    """Mean reward of the greedy policy on ``table``'s prompts (``columns``: each action's column of
    ``[unsteered, *features]``, -1 outside)."""
    actions = policy(table.states, allowed)[0].argmax(-1)
    full = torch.cat([table.unsteered_reward[:, None], table.reward], 1)
    return float(full[torch.arange(len(actions)), columns[actions]].mean())


def train_on_table(train: RewardTable, policy_cfg: PolicyConfig, ppo_cfg: PPOConfig, iterations: int,
                   prompts_per_iteration: int, group_size: int, d_sae: int, seed: int = 0,
                   evaluate: RewardTable | None = None, action_directions: torch.Tensor | None = None,
                   masking_cfg: MaskingConfig | None = None,
                   screen: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Train a fresh learner on ``train`` (the action space = its features, plus the no-op if
    ``policy.noop_action``); after every iteration, record the model rows a rollout of the same episodes would have
    spent and the greedy reward on ``evaluate``. ``group_size`` episodes per prompt for gae/group. AFM is off unless
    ``masking_cfg`` is given. ``screen`` [train prompts, d_sae]: predicted reward changes (``ppo.screen_top``)."""
    cfg = replace(ppo_cfg, advantage=resolve_advantage(ppo_cfg.advantage, True, group_size))
    learner = Learner.from_config(train.states.shape[1], d_sae, policy_cfg, cfg,
                                  masking_cfg or MaskingConfig(schedule="none"), iterations, seed, action_directions,
                                  action_pool=None if len(train.features) == d_sae else train.features)
    optimizer = learner.make_optimizer()
    source = TableSource(train, prompts_per_iteration, 1 if cfg.advantage == "all_actions" else group_size, screen)
    learner.warm_up_obs_norm(train.states[:WARM_UP_STATES])
    history = []
    for iteration in range(iterations):
        result = learner.iterate(source, iteration, optimizer)
        row = {"iteration": iteration, "episodes": learner.model_rows, "reward_mean": result.metrics["reward_mean"],
               "mask_size": result.metrics["mask_size"], "entropy_train": result.metrics["entropy"]}
        if evaluate is not None:
            allowed = learner.action_space()
            row["greedy_reward"] = greedy_reward(learner.policy, evaluate, allowed, source.columns(learner))
            if iteration == iterations - 1:  # where it ended: each held-out prompt's greedy feature, and entropy
                with torch.no_grad():
                    logits = learner.policy(evaluate.states, allowed)[0]
                    row["greedy_features"] = logits.argmax(-1).tolist()
                    row["entropy"] = float(torch.distributions.Categorical(logits=logits).entropy().mean())
        history.append(row)
    return history
