"""One learner, two sources: the first ``Learner.iterate`` on a planted one-token environment makes the same update
whether its episodes are rolled out through the model (``RolloutSource``, what ``mode=train`` runs) or read off the
exact reward table of the same prompts (``TableSource``, what sweeps and benchmarks run)."""

from __future__ import annotations

import pytest
import torch

from crl_exp.crl.learner import Learner, RolloutSource, TableSource, iteration_prompts
from crl_exp.crl.masking import MaskingConfig
from crl_exp.crl.module import PromptDataModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.errors import CRLConfigError
from crl_exp.reward_table import reward_table

from helpers import D_SAE, class_planted_env

SEED = 3


def make_learner(env, advantage: str, noop: bool, obs_norm: bool = True, screen_top: int = 0) -> Learner:
    return Learner.from_config(env.lm.d_model, D_SAE, PolicyConfig(hidden=16, noop_action=noop, obs_norm=obs_norm),
                               PPOConfig(advantage=advantage, lr=1e-2, screen_top=screen_top),
                               MaskingConfig(schedule="none"), 5, SEED)


@pytest.mark.parametrize("advantage, prompts, group_size, noop", [("group", 12, 4, False), ("gae", 24, 2, True),
                                                                   ("all_actions", 6, 1, True),
                                                                   ("sampled_set", 6, 4, True)])
def test_the_first_update_is_the_same_from_rollouts_and_from_the_reward_table(tiny_lm, advantage, prompts, group_size,
                                                                             noop):
    env = class_planted_env(tiny_lm)
    train = env.task.split("train")
    table = reward_table(env, train, list(range(D_SAE)), use_cache=False)
    rewards_differ = table.reward.std(1) > 0
    assert rewards_differ.any()  # a world where the choice matters
    learners, results = [], []
    for make_source in (lambda: RolloutSource(env, PromptDataModule(env.task, prompts * group_size, seed=SEED,
                                                                    group_size=group_size).batch_for(0)),
                        lambda: TableSource(table, prompts, group_size)):
        learner = make_learner(env, advantage, noop)
        learner.warm_up_obs_norm(table.states)
        optimizer = learner.make_optimizer()
        results.append(learner.iterate(make_source(), 0, optimizer))
        learners.append(learner)
    rolled, read = results
    if advantage in ("all_actions", "sampled_set"):
        assert torch.equal(rolled.episodes.actions, read.episodes.actions)
        assert torch.allclose(rolled.episodes.rewards, read.episodes.rewards, atol=1e-6)
        assert rolled.episodes.rewards.std() > 0
    else:
        assert torch.equal(rolled.episodes.trajectory["feature"], read.episodes.trajectory["feature"])
        assert torch.allclose(rolled.episodes.rewards, read.episodes.rewards, atol=1e-6)
        assert rolled.episodes.rewards.std() > 0  # the update had something to learn from
    assert rolled.episodes.model_rows == read.episodes.model_rows
    after, other = learners[0].policy.state_dict(), learners[1].policy.state_dict()
    for name, value in after.items():
        assert torch.allclose(value, other[name], atol=1e-5), name
    initial = make_learner(env, advantage, noop).policy.state_dict()
    assert not torch.allclose(after["value_head.weight"], initial["value_head.weight"])  # the update changed the policy: the equality above is not two untouched copies
    assert learners[0].reward_scale() == pytest.approx(learners[1].reward_scale())
    assert rolled.metrics["reward_mean"] == pytest.approx(read.metrics["reward_mean"])


def test_both_sources_draw_the_same_prompts_for_an_iteration(tiny_lm):
    env = class_planted_env(tiny_lm)
    train = env.task.split("train")
    batch = PromptDataModule(env.task, 12, seed=7, group_size=3).batch_for(4)
    drawn = iteration_prompts(len(train), 4, 7, 4)
    assert [ex.id for ex in batch] == [train[i].id for i in drawn for _ in range(3)]


def test_a_table_source_refuses_actions_its_table_does_not_hold(tiny_lm):
    env = class_planted_env(tiny_lm)
    table = reward_table(env, env.task.split("train")[:4], [1, 2, 3], use_cache=False)
    learner = make_learner(env, "group", noop=False)  # the whole dictionary: more than the table's 3 features
    with pytest.raises(ValueError, match="does not hold"):
        learner.iterate(TableSource(table, 2, 2), 0, learner.make_optimizer())
    with pytest.raises(CRLConfigError, match="top_k"):
        Learner.from_config(8, 4, PolicyConfig(top_k=5), PPOConfig(), MaskingConfig(schedule="none"), 1)


def test_gumbel_top_k_draws_distinct_actions_and_its_weights_estimate_the_expectation_without_bias():
    from crl_exp.crl.ppo import gumbel_top_k

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 20, generator=g) * 2
    logits[0, 3] = float("-inf")  # masked: never drawn
    f = torch.randn(20, generator=g)
    pi = logits.softmax(-1)[0]
    exact = float((pi * f).sum())
    draws = 4000
    actions, q = gumbel_top_k(logits.expand(draws, -1), 5, g)
    assert all(len(set(row)) == 5 for row in actions.tolist()) and not (actions == 3).any()
    estimates = (pi[actions] / q * f[actions]).sum(1)
    assert float(estimates.mean()) == pytest.approx(exact, abs=4 * float(estimates.std()) / draws ** 0.5)
    excluded = torch.zeros(1, 20, dtype=torch.bool)
    excluded[0, :17] = True  # three actions left, four asked: all three, certain, and one padding slot
    rest, q_rest = gumbel_top_k(logits, 4, g, excluded)
    assert sorted(rest[0, :3].tolist()) == [17, 18, 19] and rest[0, 3] == -1
    assert torch.allclose(q_rest[0], torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_a_live_screen_and_a_table_screen_give_the_same_scored_sets(tiny_lm):
    """``sampled_set`` with the screen's top 4: the rollout source screens the live model (one backward pass per
    prompt), the table source reads the same screen off a tensor; both score the same sets and update alike."""
    from crl_exp.first_order import first_order_screen

    from helpers import dense_class_env

    env = dense_class_env(tiny_lm)
    train = env.task.split("train")
    table = reward_table(env, train, list(range(D_SAE)), use_cache=False)
    screen = first_order_screen(env, train)
    results, learners = [], []
    for source in (RolloutSource(env, PromptDataModule(env.task, 24, seed=SEED, group_size=4).batch_for(0)),
                   TableSource(table, 6, 4, screen)):
        learner = make_learner(env, "sampled_set", noop=True, screen_top=4)
        learner.warm_up_obs_norm(table.states)
        results.append(learner.iterate(source, 0, learner.make_optimizer()))
        learners.append(learner)
    rolled, read = (r.episodes for r in results)
    assert rolled.actions.shape == (6, 8) and torch.equal(rolled.actions, read.actions)
    assert torch.equal(rolled.sampled, read.sampled) and not rolled.sampled[:, :4].any()
    assert torch.allclose(rolled.rewards, read.rewards, atol=1e-6)
    for name, value in learners[0].policy.state_dict().items():
        assert torch.allclose(value, learners[1].policy.state_dict()[name], atol=1e-5), name


def test_a_screen_that_would_hold_the_whole_action_space_is_skipped(tiny_lm):
    """With ``ppo.screen_top`` at least the action space (a 32-feature pool under the default 64) every feature is
    scored without the screen's backward passes; the scored set is the same."""
    env = class_planted_env(tiny_lm)
    train = env.task.split("train")
    table = reward_table(env, train, list(range(D_SAE)), use_cache=False)

    class NoScreenCalls(TableSource):
        def screen(self, prompts):
            raise AssertionError("the screen was computed although its top held every feature")

    learner = make_learner(env, "sampled_set", noop=False, screen_top=D_SAE)
    learner.warm_up_obs_norm(table.states)
    result = learner.iterate(NoScreenCalls(table, 6, 4, screen=torch.zeros(len(train), D_SAE)), 0,
                             learner.make_optimizer())
    assert result.metrics["set_size"] == D_SAE  # every feature scored, nothing left to draw
    assert sorted(a for a in result.episodes.actions[0].tolist() if a >= 0) == list(range(D_SAE))  # -1: no draw left
