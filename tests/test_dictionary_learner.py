"""The learner at dictionary scale (issue 36): a planted-feature bandit over 4,096 actions whose rewards depend on
each feature's decoder direction as steering's do (a smooth first-order part <w_class, d_f> plus one planted
class-specific feature), run through the project's own ``ActorCritic``, ``Batch.from_rollout`` and ``ppo_update``
(``crl.table_training.train_on_table``). The paper's independent head (one free logit per feature) sees 0.5 draws
per action in 1,920 episodes and stays at its start; the action-embedding head shares what each draw teaches
across features whose directions are alike."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from crl_exp.crl.policy import ActorCritic, PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.crl.table_training import train_on_table
from crl_exp.errors import CRLConfigError
from crl_exp.reward_table import RewardTable

K, D_MODEL, CLASSES = 4096, 32, 4


def planted_bandit(n: int, seed: int, bonus: float = 0.3):
    """(table, directions): class c pays 0.2 + 0.1 <w_c, d_f> for feature f, plus ``bonus`` on the feature whose
    direction is most aligned with w_c; states carry the class. The world (directions, classes) is fixed."""
    g = torch.Generator().manual_seed(1234)
    directions = torch.nn.functional.normalize(torch.randn(K, D_MODEL, generator=g), dim=-1)
    means = torch.randn(CLASSES, D_MODEL, generator=g)
    w = torch.nn.functional.normalize(torch.randn(CLASSES, D_MODEL, generator=g), dim=-1)
    best = (w @ directions.T).argmax(1)
    cls = torch.arange(n) % CLASSES
    states = 3 * means[cls] + torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(seed))
    reward = 0.2 + 0.1 * (w[cls] @ directions.T)
    reward[torch.arange(n), best[cls]] += bonus
    table = RewardTable(list(range(K)), [f"c{int(c)}/{i}" for i, c in enumerate(cls)], reward,
                        (reward > 0.2 + bonus / 2).float(), torch.full((n,), 0.2), torch.zeros(n), states)
    return table, directions


def final_greedy_reward(head: str) -> float:
    train, directions = planted_bandit(256, 0)
    heldout, _ = planted_bandit(128, 1)
    cfg = replace(PPOConfig(), advantage="group", lr=1e-3)
    history = train_on_table(train, PolicyConfig(obs_norm=True, head=head), cfg, 30, 8, 8, K, seed=0,
                             evaluate=heldout, action_directions=directions)
    assert history[-1]["episodes"] == 1920
    return history[-1]["greedy_reward"]


def test_the_embedding_head_finds_a_planted_answer_among_4096_features_where_the_independent_head_cannot():
    heldout, _ = planted_bandit(128, 1)
    static = float(heldout.reward.mean(0).max())  # the best single feature for every state
    optimum = float(heldout.reward.max(1).values.mean())  # each class's planted feature
    embedding, independent = final_greedy_reward("embedding"), final_greedy_reward("independent")
    assert embedding >= static + 0.5 * (optimum - static)  # measured: 0.48 against static 0.30, optimum 0.56
    assert independent < static  # measured: 0.22, at the uniform start


def test_embedding_head_logits_are_inner_products_with_decoder_directions():
    torch.manual_seed(0)
    directions = torch.randn(50, 8)
    policy = ActorCritic(8, 50, hidden=16, noop_action=True, head="embedding", action_directions=directions)
    with torch.no_grad():
        policy.actor_head.bias.zero_()
        policy.actor_head.query.weight.normal_()
    logits, _ = policy(torch.randn(4, 8))
    assert logits.shape == (4, 51) and torch.all(logits[:, 50] == 0)  # the no-op: its bias alone
    twin = ActorCritic(8, 50, hidden=16, head="embedding", action_directions=torch.cat([directions[:1], directions[:49]]))
    assert twin.actor_head.embeddings[0].allclose(twin.actor_head.embeddings[1])  # same direction, same embedding
    with pytest.raises(ValueError, match="decoder directions"):
        ActorCritic(8, 50, hidden=16, head="embedding")
    with pytest.raises(CRLConfigError, match="policy.head"):
        PolicyConfig(head="tree")
    projected = ActorCritic(8, 50, hidden=16, head="embedding", action_directions=directions, embedding_dim=4)
    assert projected.actor_head.embeddings.shape == (50, 4)
