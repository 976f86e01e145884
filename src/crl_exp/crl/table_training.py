"""Training on an exact reward table: the learner without the language model, for one-token tasks.

On a one-token task an episode is fully described by (prompt state, chosen feature) -> reward, and the exact
reward table (``reward_table``) holds that for every pair. So the learner (``ActorCritic`` with ``ppo_update`` or
``all_actions_update``, the very functions ``CRLModule`` calls) can be run on the table alone, with the same
prompt draws per iteration, sampling actions from the policy and reading their rewards off the table. It is
exact, and thousands of times cheaper than rolling out the model: sweeps of the learner's settings and the
episodes-to-learn benchmark run on it, and their winners are then confirmed by real ``mode=train`` runs.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from crl_exp.crl.policy import ActorCritic, PolicyConfig
from crl_exp.crl.ppo import Batch, PPOConfig, all_actions_update, annealed_lr, ppo_update, resolve_advantage
from crl_exp.reward_table import RewardTable


@torch.no_grad()
def greedy_reward(policy: ActorCritic, table: RewardTable, allowed: torch.Tensor, columns: torch.Tensor) -> float:
    """Mean reward of the greedy policy on ``table``'s prompts (``columns``: each feature's column, -1 outside)."""
    actions = policy(table.states, allowed)[0].argmax(-1)
    return float(table.reward[torch.arange(len(actions)), columns[actions]].mean())


def train_on_table(train: RewardTable, policy_cfg: PolicyConfig, ppo_cfg: PPOConfig, iterations: int,
                   prompts_per_iteration: int, group_size: int, d_sae: int, seed: int = 0,
                   evaluate: RewardTable | None = None,
                   action_directions: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Train a fresh policy on ``train`` (the pool = its features); after every iteration, record the episodes
    spent so far and the greedy reward on ``evaluate``. ``group_size`` episodes per prompt for gae/group."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = ActorCritic(train.states.shape[1], d_sae, policy_cfg.hidden, policy_cfg.shared_trunk,
                             policy_cfg.obs_norm, head=policy_cfg.head, action_directions=action_directions,
                             embedding_dim=policy_cfg.embedding_dim)
    advantage = resolve_advantage(ppo_cfg.advantage, True, group_size)
    cfg = replace(ppo_cfg, advantage=advantage)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    allowed = torch.zeros(d_sae, dtype=torch.bool)
    features = torch.tensor(train.features)
    allowed[features] = True
    columns = torch.full((d_sae,), -1, dtype=torch.long)
    columns[features] = torch.arange(len(features))
    if policy_cfg.obs_norm:  # mode=train's warm-up: states folded in before the first update
        policy.update_obs_norm(train.states[: min(64, len(train.states))])
    reward_var = torch.tensor(0.0)
    episodes, history = 0, []
    for iteration in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = annealed_lr(cfg, iteration, iterations)
        g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
        prompts = torch.randperm(len(train.example_ids), generator=g)[:prompts_per_iteration]
        states = train.states[prompts]
        if advantage == "all_actions":
            all_actions_update(policy, optimizer, cfg, iteration, states, train.reward[prompts], features, allowed)
            episodes += len(prompts) * (len(features) + 1)
        else:
            rows = prompts.repeat_interleave(group_size)
            with torch.no_grad():
                logits, values = policy(train.states[rows], allowed)
                probs = logits.softmax(-1)
                actions = torch.multinomial(probs, 1, generator=g).flatten()
                logprobs = probs.gather(1, actions[:, None]).clamp_min(1e-30).log().flatten()
            rewards = train.reward[rows, columns[actions]]
            if cfg.norm_rewards:
                reward_var = reward_var * 0.9 + rewards.var() * 0.1 if iteration else rewards.var()
                rewards = rewards / torch.sqrt(reward_var + 1e-8)
            trajectory = {"state": train.states[rows][:, None], "feature": actions[:, None],
                          "logprob": logprobs[:, None], "value": values[:, None]}
            batch = Batch.from_rollout(trajectory, torch.ones(len(rows), 1, dtype=torch.bool), rewards, cfg.gamma,
                                       cfg.gae_lambda, advantage=advantage,
                                       groups=torch.arange(len(prompts)).repeat_interleave(group_size))
            ppo_update(policy, optimizer, cfg, iteration, batch, allowed, g)
            episodes += len(rows)
        policy.update_obs_norm(states)
        row = {"iteration": iteration, "episodes": episodes}
        if evaluate is not None:
            row["greedy_reward"] = greedy_reward(policy, evaluate, allowed, columns)
            if iteration == iterations - 1:  # where it ended: each held-out prompt's greedy feature, and entropy
                with torch.no_grad():
                    logits = policy(evaluate.states, allowed)[0]
                    row["greedy_features"] = logits.argmax(-1).tolist()
                    row["entropy"] = float(torch.distributions.Categorical(logits=logits).entropy().mean())
        history.append(row)
    return history
