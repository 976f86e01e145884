"""PPO arithmetic against hand-computed values: GAE with terminal rewards, iteration-wide advantage normalisation."""

from __future__ import annotations

import pytest
import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.ppo import (
    Batch,
    PPOConfig,
    annealed_lr,
    compute_gae,
    normalise_advantages,
    ppo_update,
    terminal_rewards,
)


def test_gae_by_hand():
    valid = torch.tensor([[True, True, True], [True, True, False]])
    values = torch.tensor([[0.2, 0.5, 0.8], [0.4, 0.6, 0.9]])
    rewards = terminal_rewards(torch.tensor([1.0, 0.0]), valid)
    assert rewards.tolist() == [[0, 0, 1], [0, 0, 0]]
    adv, ret = compute_gae(rewards, values, valid, gamma=1.0, lam=0.5)
    # row 0: deltas 0.3, 0.3, 0.2 -> A2 = 0.2, A1 = 0.3 + 0.5*0.2 = 0.4, A0 = 0.3 + 0.5*0.4 = 0.5
    # row 1 ends at t=1 (no bootstrap from the invalid step): A1 = -0.6, A0 = 0.2 + 0.5*(-0.6) = -0.1
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.2], [-0.1, -0.6, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.7, 0.9, 1.0], [0.3, 0.0, 0.0]]))


def test_advantages_are_normalised_over_the_whole_iteration_not_per_minibatch():
    """One-step episodes in minibatches of 2: per-minibatch normalisation makes every advantage +-0.707 (a
    minibatch's policy loss at ratio 1 is then exactly 0); over the iteration, the losses are hand-computable."""
    torch.manual_seed(0)
    policy = ActorCritic(8, 5, 16)
    n = 8
    states, actions = torch.randn(n, 8), torch.randint(0, 5, (n,))
    with torch.no_grad():
        logits, values = policy(states, None)
    old_logprobs = torch.distributions.Categorical(logits=logits).log_prob(actions)
    advantages = torch.tensor([3.0, 1.0, 0.0, 0.5, -2.0, 4.0, 1.5, -1.0])
    cfg = PPOConfig(lr=0.0, update_epochs=1, num_minibatches=4, ent_coef=0.0, vf_coef=0.0, target_kl=None)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    losses: list[float] = []

    def backward(loss):
        losses.append(loss.item())
        loss.backward()

    batch = Batch(states, actions, old_logprobs, values, advantages, advantages.clone())
    ppo_update(policy, optimizer, cfg, 0, batch, None, torch.Generator().manual_seed(7), backward=backward)
    normed = (advantages - advantages.mean()) / advantages.std()
    torch.testing.assert_close(normalise_advantages(advantages), normed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    expected = [-normed[perm[i:i + 2]].mean().item() for i in range(0, n, 2)]
    assert losses == [pytest.approx(e, abs=1e-5) for e in expected]
    assert max(abs(x) for x in losses) > 0.1  # per-minibatch normalisation would give all zeros



def test_batch_holds_only_valid_steps_and_lr_anneals_linearly():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    traj = {"state": torch.arange(6.0).reshape(2, 3, 1), "feature": torch.tensor([[1, 2, 3], [4, 5, 6]]),
            "logprob": torch.zeros(2, 3), "value": torch.zeros(2, 3)}
    batch = Batch.from_rollout(traj, valid, torch.tensor([1.0, 0.0]), gamma=1.0, lam=1.0)
    assert len(batch) == 3 and batch.actions.tolist() == [1, 2, 4]
    assert batch.returns.tolist() == [1.0, 1.0, 0.0]
    cfg = PPOConfig(lr=1e-3)
    assert [annealed_lr(cfg, i, 4) for i in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert annealed_lr(PPOConfig(lr=1e-3, anneal_lr=False), 3, 4) == 1e-3


def test_group_advantage_is_reward_minus_the_group_mean_on_every_valid_step():
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    traj = {"state": torch.zeros(4, 2, 1), "feature": torch.zeros(4, 2, dtype=torch.long),
            "logprob": torch.zeros(4, 2), "value": torch.full((4, 2), 0.3)}
    rewards, groups = torch.tensor([1.0, 0.0, 0.2, 0.6]), torch.tensor([0, 0, 1, 1])
    batch = Batch.from_rollout(traj, valid, rewards, 1.0, 0.95, advantage="group", groups=groups)
    assert batch.advantages.tolist() == pytest.approx([0.5, 0.5, -0.5, -0.2, -0.2, 0.2, 0.2])
    gae = Batch.from_rollout(traj, valid, rewards, 1.0, 0.95)
    torch.testing.assert_close(batch.returns, gae.returns)  # the critic still learns the GAE returns


def test_running_obs_norm_merges_batches_exactly_and_is_identity_before_data():
    from crl_exp.crl.policy import RunningObsNorm

    torch.manual_seed(0)
    norm = RunningObsNorm(6, clip=100.0)
    x = torch.randn(4, 6)
    assert torch.equal(norm(x), x)  # no statistics yet
    data = torch.randn(50, 6) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 10
    for chunk in (data[:7], data[7:8], data[8:]):
        norm.update(chunk)
    torch.testing.assert_close(norm.mean, data.double().mean(0))
    torch.testing.assert_close(norm.var, data.double().var(0, unbiased=False))
    z = norm(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(6), atol=1e-5, rtol=0)
    assert RunningObsNorm(6, clip=1.0).eval()(torch.full((1, 6), 9.0)).max() == 9.0  # clip applies only once fitted
    norm.clip = 1.0
    assert norm(torch.full((1, 6), 1e3)).max() == 1.0


def contextual_bandit(obs_norm: bool, iterations: int = 12) -> float:
    """States = one large direction every prompt shares + a small prompt-specific sign (BBQ's last-token states
    at layer 12 share 96.6% of their LayerNorm'd energy); reward 1 for feature 0 on + prompts, feature 1 on -
    prompts. Trains with ``ppo_update`` on sampled actions; returns the greedy policy's accuracy."""
    torch.manual_seed(0)
    d, n = 32, 64
    shared = torch.zeros(d)
    shared[0] = 40.0
    sign = torch.tensor([1.0, -1.0]).repeat(n // 2)
    noise = torch.randn(n, d) * 0.3
    states = shared + noise + sign[:, None] * 0.3 * torch.nn.functional.one_hot(torch.tensor(1), d)
    policy = ActorCritic(d, 4, 32, obs_norm=obs_norm)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    cfg = PPOConfig(lr=3e-3, update_epochs=4, num_minibatches=2, ent_coef=0.0, target_kl=None)
    gen = torch.Generator().manual_seed(0)
    best = (sign < 0).long()
    for it in range(iterations):
        with torch.no_grad():
            dist, values = policy.distribution(states)
            actions = torch.multinomial(dist.probs, 1, generator=gen).squeeze(1)
            logprobs = dist.log_prob(actions)
        rewards = (actions == best).float()
        batch = Batch(states, actions, logprobs, values, rewards - values, rewards)
        ppo_update(policy, optimizer, cfg, it, batch, None, gen, backward=lambda loss: loss.backward())
        policy.update_obs_norm(states)
    with torch.no_grad():
        return (policy(states)[0].argmax(-1) == best).float().mean().item()


def test_obs_norm_lets_the_policy_condition_on_a_small_prompt_specific_component():
    """In as many iterations as ``budget=cpu`` runs, without the running standardisation the trunk's inputs are
    nearly identical and the greedy policy still picks one feature for every prompt (accuracy 0.5; it gets
    there after ~30 iterations); with it, it picks each prompt's own."""
    assert contextual_bandit(obs_norm=True) >= 0.95
    assert contextual_bandit(obs_norm=False) <= 0.6


def test_the_critic_cannot_throttle_the_actor_and_starts_near_zero():
    """Actor and critic gradients are clipped separately: a huge value loss leaves the actor's clipped gradient
    as it would be alone (one global clip scaled it down by the critic's norm). The untrained value head outputs
    ~0, not +-0.6 against rewards that vary by ~0.05."""
    from crl_exp.crl.policy import ActorCritic
    from crl_exp.crl.ppo import PPOConfig, gradient_step

    torch.manual_seed(0)
    states = torch.randn(32, 16)
    policy = ActorCritic(16, 8, hidden=16)
    assert policy(states)[1].abs().max() < 0.05

    def actor_grad_norm(value_scale: float) -> float:
        torch.manual_seed(0)
        p = ActorCritic(16, 8, hidden=16)
        opt = torch.optim.SGD(p.parameters(), lr=0.0)
        logits, values = p(states)
        loss = -logits.log_softmax(-1)[:, 0].mean() + value_scale * ((values - 100.0) ** 2).mean()
        gradient_step(p, opt, PPOConfig(max_grad_norm=0.5), 0, loss)
        return float(torch.sqrt(sum((q.grad ** 2).sum() for q in p.actor_parameters())))

    assert actor_grad_norm(1000.0) == pytest.approx(actor_grad_norm(0.0), rel=1e-5)


def test_auto_resolves_to_the_scored_set_on_one_token_tasks_and_gae_on_generating_ones():
    """The default estimator (issue 45): sampled_set wherever a prompt's set costs one shared-prefix forward (one
    token, one feature a step); the per-prompt group baseline with top-k steering; GAE for generating tasks."""
    from crl_exp.crl.ppo import resolve_advantage

    assert resolve_advantage("auto", one_token=True, group_size=16) == "sampled_set"
    assert resolve_advantage("auto", one_token=True, group_size=1) == "sampled_set"
    assert resolve_advantage("auto", one_token=True, group_size=4, top_k=2) == "group"
    assert resolve_advantage("auto", one_token=False, group_size=4) == "gae"
    assert resolve_advantage("group", one_token=True, group_size=4) == "group"
    with pytest.raises(ValueError, match="one-token"):
        resolve_advantage("sampled_set", one_token=False, group_size=4)
