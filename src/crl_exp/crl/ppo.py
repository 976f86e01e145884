"""PPO for the steering policy, following CleanRL's ``ppo.py`` checklist (docs/design.md §3).

GAE(γ, λ) over each episode's valid steps with the terminal reward on the last step; advantages normalised
once over the whole iteration's valid steps (CleanRL normalises per minibatch because its minibatches hold
hundreds of steps; on one-step tasks a minibatch of 2 would turn every advantage into ±0.707); several epochs
of shuffled minibatches; clipped surrogate; optional value clipping;
entropy bonus; gradient clipping of actor and critic *separately* (one global norm let the critic's 2-10x
larger gradient scale every actor step down by 5-20x); target-KL early stop; diagnostics approx_kl, clipfrac,
explained_variance and entropy. Only the policy/critic learn: states are detached residual vectors, so an
update costs nothing next to a rollout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.errors import CRLConfigError


class NonFiniteError(FloatingPointError):
    """A NaN/inf appeared in a training quantity; the message names the iteration and the quantity."""


def check_finite(iteration: int, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise NonFiniteError(f"Non-finite {name} at iteration {iteration}: {bad} of {t.numel()} values are "
                                 f"NaN/inf. Check the reward function, the learning rate and the coefficient.")


@dataclass
class PPOConfig:
    # chosen on the known-answer task's validation split, confirmed on BBQ validation (experiments/learner_sweep.md,
    # learner_sweep_bbq.md)
    lr: float = 3e-3
    anneal_lr: bool = True
    gamma: float = 1.0
    gae_lambda: float = 0.95
    update_epochs: int = 4
    num_minibatches: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = 0.05
    adam_eps: float = 1e-5
    # auto: sampled_set on one-token tasks with policy.top_k=1 (the estimator that found a planted answer among
    # 4,096 features and most of the real known-answer gap over the dictionary; all_actions is its k = K case),
    # group (G > 1) or gae with top_k > 1, gae on generating tasks |
    # gae: GAE with the critic (the
    # paper's per-token PPO; what generating tasks use) | group: each episode's reward minus the mean reward of the
    # episodes of the same prompt (budget.group_size > 1), on every step of the episode | all_actions: one-token
    # tasks with a finite action space: every action's exact reward per prompt (one shared-prefix forward) and the
    # exact expected-reward gradient (``all_actions_update``)
    advantage: str = "auto"
    # divide episode rewards by their running std before GAE, so the critic's targets are on a unit scale
    norm_rewards: bool = True
    # sampled_set (one-token tasks): each prompt's scored set is the first-order screen's top ``screen_top`` (when
    # the source has a screen) plus budget.group_size distinct features drawn from the policy without replacement
    # (Gumbel top-k); the policy moves towards softmax(log pi + improvement_scale * advantage / sigma) over the set
    screen_top: int = 64
    improvement_scale: float = 1.0


ADVANTAGES = ("auto", "gae", "group", "all_actions", "sampled_set")


def validate_ppo(cfg: PPOConfig) -> None:
    """One line per bad value, naming the key and its valid range, before anything loads."""
    checks = [("lr", cfg.lr > 0, "> 0"), ("gamma", 0 < cfg.gamma <= 1, "in (0, 1]"),
              ("gae_lambda", 0 <= cfg.gae_lambda <= 1, "in [0, 1]"), ("update_epochs", cfg.update_epochs >= 1, ">= 1"),
              ("num_minibatches", cfg.num_minibatches >= 1, ">= 1"), ("clip_coef", cfg.clip_coef > 0, "> 0"),
              ("ent_coef", cfg.ent_coef >= 0, ">= 0"), ("vf_coef", cfg.vf_coef >= 0, ">= 0"),
              ("max_grad_norm", cfg.max_grad_norm > 0, "> 0"), ("adam_eps", cfg.adam_eps > 0, "> 0"),
              ("target_kl", cfg.target_kl is None or cfg.target_kl > 0, "> 0 or null"),
              ("screen_top", cfg.screen_top >= 0, ">= 0"), ("improvement_scale", cfg.improvement_scale > 0, "> 0")]
    for key, ok, valid in checks:
        value = getattr(cfg, key)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise CRLConfigError(f"ppo.{key}={value} is invalid: it must be {valid} (and finite)")
    if cfg.advantage not in ADVANTAGES:
        raise CRLConfigError(f"ppo.advantage must be one of {', '.join(ADVANTAGES)}, got {cfg.advantage!r}")


def resolve_advantage(advantage: str, one_token: bool, group_size: int, top_k: int = 1) -> str:
    """The estimator ``ppo.advantage`` means for this task (``auto``: ``sampled_set`` on one-token tasks with one
    feature per step, where a prompt's scored set costs one shared-prefix forward; with ``policy.top_k`` > 1 the
    per-prompt group baseline (or GAE without groups); GAE on generating tasks)."""
    if advantage not in ADVANTAGES:
        raise ValueError(f"ppo.advantage must be one of {', '.join(ADVANTAGES)}, got {advantage!r}")
    if advantage in ("all_actions", "sampled_set") and not one_token:
        raise ValueError(f"ppo.advantage={advantage} needs a one-token task (every action's reward from one forward)")
    if advantage == "auto":
        if one_token and top_k == 1:
            return "sampled_set"
        return "group" if one_token and group_size > 1 else "gae"
    return advantage


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns [B, T]; invalid steps get 0 and never bootstrap (terminal = last valid step)."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    last = torch.zeros(B)
    for t in reversed(range(T)):
        next_valid = valid[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=torch.bool)
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros(B)
        nonterminal = next_valid.float()
        delta = rewards[:, t] + gamma * next_value * nonterminal - values[:, t]
        last = delta + gamma * lam * nonterminal * last
        last = last * valid[:, t].float()
        adv[:, t] = last
    return adv, adv + values * valid.float()


def terminal_rewards(episode_rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T] with each episode's reward on its last valid step."""
    rewards = torch.zeros(valid.shape)
    last = valid.long().cumsum(1).argmax(1)  # index of the last valid step
    rewards[torch.arange(len(last)), last] = episode_rewards.float()
    return rewards


@dataclass
class Batch:
    """One iteration's valid steps, flattened to [N, ...]: everything the update trains on, built once."""

    states: torch.Tensor  # [N, d_model] detached residual states
    actions: torch.Tensor  # [N] feature ids ([N, k] for top-k)
    logprobs: torch.Tensor  # [N] log-probs of the actions when they were taken
    values: torch.Tensor  # [N] critic values when they were taken
    advantages: torch.Tensor  # [N] GAE advantages (not yet normalised)
    returns: torch.Tensor  # [N] advantages + values: the critic's targets

    @classmethod
    def from_rollout(cls, trajectory: dict[str, torch.Tensor], valid: torch.Tensor, episode_rewards: torch.Tensor,
                     gamma: float, lam: float, advantage: str = "gae", groups: torch.Tensor | None = None) -> Batch:
        """From ``PolicyController.stacked()`` ([B, T] fields), the valid-step mask and each episode's reward;
        ``groups`` [B] numbers the prompt of each episode (for ``advantage="group"``)."""
        rewards = terminal_rewards(episode_rewards, valid)
        advantages, returns = compute_gae(rewards, trajectory["value"], valid, gamma, lam)
        if advantage == "group":
            advantages = group_advantages(episode_rewards, groups)[:, None].expand(valid.shape) * valid.float()
        elif advantage != "gae":
            raise ValueError(f"Batch.from_rollout needs advantage gae or group, got {advantage!r}")
        flat = valid.flatten()
        return cls(trajectory["state"].flatten(0, 1)[flat], trajectory["feature"].flatten(0, 1)[flat],
                   trajectory["logprob"].flatten()[flat], trajectory["value"].flatten()[flat],
                   advantages.flatten()[flat], returns.flatten()[flat])

    def __len__(self) -> int:
        return len(self.states)

    def to(self, device: torch.device | str) -> Batch:
        """The same steps on ``device`` (the policy's: rollouts record them on the CPU)."""
        return Batch(*(t.to(device) for t in (self.states, self.actions, self.logprobs, self.values,
                                              self.advantages, self.returns)))


def group_advantages(episode_rewards: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """[B]: each episode's reward minus the mean reward of its group (episodes of the same prompt)."""
    if groups is None:
        raise ValueError("ppo.advantage=group needs groups of episodes of the same prompt (budget.group_size > 1)")
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups).index_add_(0, groups, episode_rewards.float())
    counts = torch.zeros(n_groups).index_add_(0, groups, torch.ones(len(groups)))
    return episode_rewards.float() - (sums / counts)[groups]


def annealed_lr(cfg: PPOConfig, iteration: int, total_iterations: int) -> float:
    """CleanRL's linear annealing: lr at the first iteration, approaching 0 at the last (if ``anneal_lr``)."""
    if not cfg.anneal_lr:
        return cfg.lr
    return cfg.lr * (1.0 - iteration / max(1, total_iterations))


def normalise_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (sample) std over all of the iteration's valid steps; unchanged if fewer than 2."""
    if len(advantages) < 2:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    var = target.var()
    return float("nan") if var == 0 else (1 - (target - pred).var() / var).item()


def gradient_step(policy: ActorCritic, optimizer: torch.optim.Optimizer, cfg: PPOConfig, iteration: int,
                  loss: torch.Tensor, backward=None) -> None:
    """One optimiser step, with the actor's and the critic's gradients clipped *separately* (one global clip let
    the critic's larger gradient scale every actor step down)."""
    check_finite(iteration, loss=loss)
    optimizer.zero_grad()
    (backward or torch.Tensor.backward)(loss)
    torch.nn.utils.clip_grad_norm_(policy.actor_parameters(), cfg.max_grad_norm)
    torch.nn.utils.clip_grad_norm_(policy.critic_parameters(), cfg.max_grad_norm)
    optimizer.step()


def ppo_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, cfg: PPOConfig, iteration: int,
               batch: Batch, allowed: torch.Tensor | None, generator: torch.Generator,
               backward=None) -> dict[str, float]:
    """Several epochs of minibatch PPO on ``batch``; returns the diagnostics averaged over every minibatch run.

    Advantages are normalised once, over the whole batch, if ``norm_adv``. ``backward`` lets Lightning's
    ``manual_backward`` run the backward pass.
    """
    check_finite(iteration, advantages=batch.advantages, returns=batch.returns)
    device = next(policy.parameters()).device
    batch = batch.to(device)
    allowed = allowed.to(device) if allowed is not None else None
    states, actions, old_logprobs = batch.states, batch.actions, batch.logprobs
    returns, old_values = batch.returns, batch.values
    advantages = normalise_advantages(batch.advantages) if cfg.norm_adv else batch.advantages
    n = len(states)
    mb_size = max(1, n // cfg.num_minibatches)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")}
    stopped_early = False
    for _epoch in range(cfg.update_epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, mb_size):
            idx = perm[start:start + mb_size].to(device)
            logits, new_values = policy(states[idx], allowed)
            check_finite(iteration, logits=logits.masked_fill(torch.isneginf(logits), 0.0), values=new_values)
            dist = torch.distributions.Categorical(logits=logits)
            mb_actions = actions[idx]
            if mb_actions.ndim == 2:  # top-k: sum of the k features' log-probs (as in the rollout)
                new_logprob = dist.log_prob(mb_actions.T).sum(0)
            else:
                new_logprob = dist.log_prob(mb_actions)
            entropy = dist.entropy()
            logratio = new_logprob - old_logprobs[idx]
            ratio = logratio.exp()
            with torch.no_grad():
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfrac = ((ratio - 1.0).abs() > cfg.clip_coef).float().mean()
            mb_adv = advantages[idx]
            pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
            if cfg.clip_vloss:
                v_unclipped = (new_values - returns[idx]) ** 2
                v_clipped = old_values[idx] + (new_values - old_values[idx]).clamp(-cfg.clip_coef, cfg.clip_coef)
                v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - returns[idx]) ** 2).mean()
            else:
                v_loss = 0.5 * ((new_values - returns[idx]) ** 2).mean()
            loss = pg_loss - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v_loss
            gradient_step(policy, optimizer, cfg, iteration, loss, backward)
            for k, v in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy.mean()),
                         ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                stats[k].append(v.item())
        if cfg.target_kl is not None and stats["approx_kl"] and stats["approx_kl"][-1] > cfg.target_kl:
            stopped_early = True
            break
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out["explained_variance"] = explained_variance(old_values, returns)
    out["kl_early_stop"] = float(stopped_early)
    return out


def all_actions_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, cfg: PPOConfig, iteration: int,
                       states: torch.Tensor, rewards: torch.Tensor, features: torch.Tensor,
                       allowed: torch.Tensor, backward=None) -> dict[str, float]:
    """The all-action policy gradient on one-token tasks: with the exact reward ``rewards[p, a]`` of every allowed
    action ``features[a]`` for each prompt state ``states[p]``, ascend the exact expected reward
    ``mean_p sum_a pi(a|s_p) r~(s_p, a)`` plus the entropy bonus, for ``update_epochs`` full-batch steps, where
    ``r~ = (r - mean_a r(s_p, a)) / sd`` is the reward centred on each prompt's *uniform* mean (a per-prompt
    constant: it leaves the gradient unchanged, since sum_a pi = 1) and divided by the centred rewards' spread, so
    the learning rate means the same on every task. No sampling noise, no ratio clipping (the objective is exact,
    not a surrogate). ``approx_kl`` is KL(pi_before || pi_after) measured after each epoch's step. The critic learns
    the policy's expected reward in raw units (what the critic analyses read)."""
    check_finite(iteration, rewards=rewards)
    device = next(policy.parameters()).device
    states, rewards, features, allowed = (t.to(device) for t in (states, rewards, features, allowed))
    centred = rewards - rewards.mean(1, keepdim=True)
    scale = centred.std() if centred.numel() > 1 else torch.tensor(1.0, device=device)
    scaled = centred / (scale + 1e-8)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "expected_reward",
                                                        "approx_kl")}
    with torch.no_grad():
        old_logp = policy(states, allowed)[0].log_softmax(-1)[:, features]
    for _epoch in range(cfg.update_epochs):
        logits, values = policy(states, allowed)
        logp = logits.log_softmax(-1)
        probs = logp[:, features].exp()  # [P, A]: the allowed actions hold all the mass
        objective = (probs * scaled).sum(-1).mean()
        entropy = -(probs * logp[:, features]).sum(-1).mean()
        expected = (probs * rewards).sum(-1)
        v_loss = 0.5 * ((values - expected.detach()) ** 2).mean()
        loss = -objective - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
        gradient_step(policy, optimizer, cfg, iteration, loss, backward)
        with torch.no_grad():  # after the step: how far the policy has moved from where the update began
            new_logp = policy(states, allowed)[0].log_softmax(-1)[:, features]
            kl = (old_logp.exp() * (old_logp - new_logp)).sum(-1).mean()
        for k, v in (("policy_loss", -objective), ("value_loss", v_loss), ("entropy", entropy),
                     ("expected_reward", expected.mean()), ("approx_kl", kl)):
            stats[k].append(v.item())
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["expected_reward_before"] = stats["expected_reward"][0]
    return out


def gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct actions per row drawn from softmax(logits) without replacement (Gumbel top-k: the k largest of
    log pi + Gumbel noise), and each drawn action's inclusion probability given the (k+1)-th perturbed value kappa,
    ``q = 1 - exp(-exp(log pi - kappa))`` (Kool, van Hoof, Welling 2019-2020; priority sampling), so that
    ``sum_{a in S} pi(a) / q(a) f(a)`` is an unbiased estimate of ``sum_a pi(a) f(a)``. ``exclude`` [P, A]: actions
    already scored exactly (the screen's), drawn from the rest with pi renormalised over it. Rows with at most k
    actions left return all of them (q = 1; the padding beyond them has q = 0 and index -1)."""
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    logp = logits.log_softmax(-1)
    u = torch.rand(logp.shape, generator=generator).clamp(1e-12, 1 - 1e-7).to(logp.device)
    perturbed = logp - torch.log(-torch.log(u))
    n = min(k + 1, logp.shape[1])
    top = perturbed.topk(n, dim=-1)
    actions = top.indices[:, :k]
    kappa = top.values[:, k] if n > k else torch.full((len(logp),), float("-inf"), device=logp.device)
    chosen = logp.gather(1, actions)
    inclusion = -torch.expm1(-torch.exp(chosen - kappa[:, None]))  # 1 where kappa = -inf (every action drawn)
    drawn = torch.isfinite(chosen)
    return actions.masked_fill(~drawn, -1), inclusion.masked_fill(~drawn, 0.0)


def sampled_set_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, cfg: PPOConfig, iteration: int,
                       states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor,
                       allowed: torch.Tensor, backward=None) -> dict[str, float]:
    """Policy improvement from a scored set of actions per prompt (one-token tasks), as Sampled/Gumbel MuZero do
    at depth one. ``actions`` [P, n] (index -1: padding), their exact ``rewards`` [P, n] in units of the reward's
    running sigma, and ``weights`` [P, n]: pi(a) for the screen's actions (summed exactly) and pi(a)/q(a) for the
    sampled ones, so that ``v = sum w r / sum w`` estimates the policy's expected reward (the set's own baseline).
    The target is ``pi'(a) ~ pi(a) exp(improvement_scale * (r_a - v))`` on the scored actions, ``pi'(a) ~ pi(a)``
    elsewhere; ``update_epochs`` full-batch steps descend the cross-entropy to it (minus the entropy bonus), and the
    critic learns v. A scored action's logit moves in proportion to its advantage whatever its probability: an
    expected-reward gradient moves it in proportion to pi(a), about 1/K at a uniform start over K features."""
    device = next(policy.parameters()).device
    states, actions, rewards, weights, allowed = (t.to(device) for t in (states, actions, rewards, weights, allowed))
    check_finite(iteration, rewards=rewards, weights=weights)
    scored = actions >= 0
    index = actions.clamp_min(0)
    w = weights * scored
    value = (w * rewards).sum(-1) / w.sum(-1).clamp_min(1e-12)
    advantage = ((rewards - value[:, None]) * scored).clamp(-5, 5)
    with torch.no_grad():
        old_logp = policy(states, allowed)[0].log_softmax(-1)
        boost = torch.zeros_like(old_logp).scatter_add_(1, index, cfg.improvement_scale * advantage)
        target = (old_logp + boost).softmax(-1)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl")}
    for _epoch in range(cfg.update_epochs):
        logits, values = policy(states, allowed)
        logp = logits.log_softmax(-1)
        finite = torch.isfinite(logp)
        safe_logp = logp.masked_fill(~finite, 0.0)
        cross_entropy = -(target * safe_logp).sum(-1).mean()
        entropy = -(logp.exp() * safe_logp).sum(-1).mean()
        v_loss = 0.5 * ((values - value) ** 2).mean()
        loss = cross_entropy - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
        gradient_step(policy, optimizer, cfg, iteration, loss, backward)
        with torch.no_grad():
            new_logp = policy(states, allowed)[0].log_softmax(-1)
            kl = (old_logp.exp() * (old_logp - new_logp).masked_fill(~finite, 0.0)).sum(-1).mean()
        for k, v in (("policy_loss", cross_entropy), ("value_loss", v_loss), ("entropy", entropy), ("approx_kl", kl)):
            stats[k].append(v.item())  # no target-KL stop: the target itself bounds the step (improvement_scale)
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["set_value"] = float(value.mean())
    out["explained_variance"] = explained_variance(values.detach(), value)
    return out
