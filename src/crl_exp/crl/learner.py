"""The one CRL learner: what learns, and one iteration of learning from a source of episodes.

``Learner`` owns the actor-critic (built only by ``Learner.from_config``: head, no-op, embedding size and top-k
hold wherever a policy is built), its Adaptive Feature Mask, the running reward scale and the observation norm.
``Learner.iterate(source, iteration)`` draws the iteration's episodes from a source, normalises their rewards once,
runs the estimator's update, then updates the mask and the observation norm, in that order.

Two sources behind one protocol (``EpisodeSource``):

* ``RolloutSource``: steered rollouts of the environment (any task, a decision per generated token), what
  ``mode=train`` runs through ``CRLModule``;
* ``TableSource``: an exact reward table of a one-token task (``reward_table``): sampled actions are read off
  it, or every action's reward is (``ppo.advantage=all_actions``), the unsteered column being the no-op. Learner
  sweeps and benchmarks run on it in seconds.

Both draw the same prompts for an iteration (``iteration_prompts``), sample actions from the same seeded stream
(``iteration_seed``) and hand the update the same tensors, so a setting chosen on a table is the setting
``mode=train`` runs (tests/test_learner.py checks that the first update is the same from both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from crl_exp.crl.masking import AdaptiveFeatureMask, MaskingConfig
from crl_exp.crl.policy import ActorCritic, PolicyConfig, RunningObsNorm
from crl_exp.crl.ppo import (
    Batch,
    PPOConfig,
    all_actions_update,
    annealed_lr,
    check_finite,
    gumbel_top_k,
    ppo_update,
    resolve_advantage,
    sampled_set_update,
)
from crl_exp.errors import CRLConfigError

MAX_ALL_ACTIONS = 512  # one model row per action and prompt: beyond this, restrict the action space


def iteration_seed(seed: int, iteration: int) -> int:
    """The seed of every random stream of one iteration (prompts, actions, minibatches): a resumed or replayed
    iteration draws exactly what it drew the first time."""
    return (seed * 1_000_003 + iteration) % (2**31)


def iteration_prompts(n_available: int, n_prompts: int, seed: int, iteration: int) -> list[int]:
    """Indices of the distinct prompts of one iteration (the same draw for rollouts and tables)."""
    if n_available < 1:
        raise ValueError("no training prompts to draw from")
    g = torch.Generator().manual_seed(iteration_seed(seed, iteration))
    return torch.randperm(n_available, generator=g)[:n_prompts].tolist()


@dataclass
class SampledEpisodes:
    """Episodes whose actions the policy sampled: one terminal reward each, a trajectory of [B, T] steps."""

    trajectory: dict[str, torch.Tensor]  # state [B, T, d], feature [B, T(, k)], logprob [B, T], value [B, T]
    valid: torch.Tensor  # [B, T] bool
    rewards: torch.Tensor  # [B] in the reward's units
    correct: torch.Tensor  # [B]
    groups: torch.Tensor  # [B] the prompt number of each episode
    model_rows: int  # model rows spent (episodes rolled out; 0 when read off a cached table)
    records: list[dict[str, Any]] | None = None  # rollouts: the scored records
    extra: dict[str, Any] = field(default_factory=dict)  # what a source also keeps (a rollout's logged trajectory)


@dataclass
class ExactRewards:
    """Every allowed action's reward for each of the iteration's prompts (one-token tasks)."""

    states: torch.Tensor  # [P, d]
    actions: torch.Tensor  # [A] action indices (the no-op, when the policy has one, as its index)
    rewards: torch.Tensor  # [P, A]
    correct: torch.Tensor  # [P, A]
    model_rows: int


@dataclass
class ScoredSets:
    """One-token tasks, ``ppo.advantage=sampled_set``: a set of distinct actions per prompt, each scored exactly."""

    states: torch.Tensor  # [P, d]
    actions: torch.Tensor  # [P, n] (-1: padding)
    weights: torch.Tensor  # [P, n] pi(a) for screened actions, pi(a)/q(a) for sampled ones, 0 for padding
    sampled: torch.Tensor  # [P, n] bool: drawn from the policy (not the screen)
    rewards: torch.Tensor  # [P, n] in the reward's units
    correct: torch.Tensor  # [P, n]
    model_rows: int


class EpisodeSource(Protocol):
    """Where an iteration's episodes come from."""

    group_size: int  # episodes (sampled_set: distinct actions drawn from the policy) per prompt
    one_token: bool  # one decision per episode (what ppo.advantage=auto resolves by)

    def sample(self, learner: Learner, iteration: int) -> SampledEpisodes: ...

    def every_action(self, learner: Learner, iteration: int) -> ExactRewards: ...

    def prompt_states(self, learner: Learner, iteration: int) -> tuple[list, torch.Tensor]:
        """The iteration's distinct prompts and their states, before any action."""

    def score(self, learner: Learner, prompts: list, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(rewards, correct, model rows) of each prompt under each of its actions [P, n] (-1: padding)."""

    def screen(self, prompts: list) -> torch.Tensor | None:
        """[P, d_sae] each feature's predicted reward change (a first-order screen), or None."""

    has_screen: bool  # whether ``screen`` gives scores (then a screen covering the action space is skipped)


@dataclass
class IterationResult:
    """What one ``iterate`` did: the update's diagnostics and the learner's metrics (``train/`` keys without the
    prefix), the episodes it learned from, and where the seconds went."""

    metrics: dict[str, float]
    episodes: SampledEpisodes | ExactRewards | ScoredSets
    draw_seconds: float
    update_seconds: float


class StepOutcome(NamedTuple):
    """What an estimator's step hands back to ``Learner.iterate``."""

    episodes: SampledEpisodes | ExactRewards | ScoredSets
    stats: dict[str, float]  # the update's diagnostics
    metrics: dict[str, float]  # reward, accuracy and the estimator's own
    chosen: torch.Tensor  # the actions the iteration's metrics count (greedy for all_actions)
    afm_picks: torch.Tensor  # the policy's own picks, what AFM counts
    states: torch.Tensor  # folded into the observation norm after the update
    drawn_at: float  # perf_counter when drawing ended and the update began


class Learner:
    def __init__(self, policy: ActorCritic, policy_cfg: PolicyConfig, ppo_cfg: PPOConfig, mask: AdaptiveFeatureMask,
                 total_iterations: int, seed: int = 0):
        self.policy, self.policy_cfg, self.ppo_cfg, self.mask = policy, policy_cfg, ppo_cfg, mask
        self.total_iterations, self.seed, self.top_k = total_iterations, seed, policy_cfg.top_k
        self.reward_stats = RunningObsNorm(1)  # running reward variance (ppo.norm_rewards)
        self.model_rows = 0

    @classmethod
    def from_config(cls, d_model: int, d_sae: int, policy_cfg: PolicyConfig, ppo_cfg: PPOConfig,
                    masking_cfg: MaskingConfig, total_iterations: int, seed: int = 0,
                    action_directions: torch.Tensor | None = None,
                    action_pool: list[int] | None = None) -> Learner:
        """The one place an actor-critic is built. ``action_directions``: the SAE's decoder rows [d_sae, d_model]
        (``policy.head=embedding``); ``action_pool``: restrict the action space to these features for good."""
        top_k = policy_cfg.top_k
        if not 1 <= top_k <= d_sae or (masking_cfg.schedule != "none" and top_k > masking_cfg.min_unmasked):
            raise CRLConfigError(f"policy.top_k={top_k} must be in [1, d_sae] and <= masking.min_unmasked")
        with torch.random.fork_rng():  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            policy = ActorCritic(d_model, d_sae, policy_cfg.hidden, policy_cfg.shared_trunk, policy_cfg.obs_norm,
                                 policy_cfg.noop_action, policy_cfg.head, action_directions, policy_cfg.embedding_dim)
        mask = AdaptiveFeatureMask(d_sae, masking_cfg)
        if action_pool is not None:
            mask.restrict(list(action_pool))
        return cls(policy, policy_cfg, ppo_cfg, mask, total_iterations, seed)

    # ---------------------------------------------------------------- the action space
    def action_space(self) -> torch.Tensor:
        """Bool [actions]: the features this policy chooses among (``policy.action_pool`` or the dictionary),
        plus the no-op when it has one; no evaluation may act outside it."""
        return self.with_noop(self.mask.action_pool.clone())

    def allowed_actions(self) -> torch.Tensor:
        """Bool [actions]: the action space minus what Adaptive Feature Masking masks now (never the no-op)."""
        return self.with_noop(self.mask.allowed())

    def with_noop(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.policy.noop_index is None else torch.cat([features, torch.ones(1, dtype=torch.bool)])

    def features_only(self, actions: torch.Tensor) -> torch.Tensor:
        """The chosen actions that are features (the no-op dropped), for AFM's selection counts."""
        noop = self.policy.noop_index
        return actions if noop is None else actions[actions != noop]

    def steered_share(self, actions: torch.Tensor) -> float:
        noop = self.policy.noop_index
        return 1.0 if noop is None else float((actions != noop).float().mean())

    # ---------------------------------------------------------------- normalisers and the optimiser
    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.parameters(), lr=self.ppo_cfg.lr, eps=self.ppo_cfg.adam_eps)

    @torch.no_grad()
    def warm_up_obs_norm(self, states: torch.Tensor) -> None:
        """Fold unsteered states in before the first iteration (``policy.obs_norm``): otherwise iteration 0 acts
        and trains on raw inputs and the normaliser switches on at iteration 1, under the policy's feet."""
        self.policy.update_obs_norm(states)

    def scaled_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """Episode rewards divided by their running std (``ppo.norm_rewards``), folding this batch in first: the one
        reward normalisation of sampled episodes (``all_actions`` centres each prompt's exact rewards itself)."""
        if not self.ppo_cfg.norm_rewards:
            return rewards
        self.reward_stats.update(rewards[:, None].double())
        return rewards / self.reward_scale()

    def reward_scale(self) -> float:
        """sigma: what the critic's targets were divided by (1 without ``ppo.norm_rewards`` or before any
        episode). V times sigma is in the reward's units: every comparison of values with rewards uses it."""
        if not self.ppo_cfg.norm_rewards or float(self.reward_stats.count) == 0:
            return 1.0
        return float(torch.sqrt(self.reward_stats.var + 1e-8).item())

    # ---------------------------------------------------------------- one iteration
    def iterate(self, source: EpisodeSource, iteration: int, optimizer: torch.optim.Optimizer,
                backward=None) -> IterationResult:
        """One iteration: draw, normalise, update, then the mask and the observation norm. ``backward``: Lightning's
        ``manual_backward`` (plain ``Tensor.backward`` otherwise)."""
        cfg = self.ppo_cfg
        for group in optimizer.param_groups:
            group["lr"] = annealed_lr(cfg, iteration, self.total_iterations)
        seed = iteration_seed(self.seed, iteration)
        advantage = resolve_advantage(cfg.advantage, source.one_token, source.group_size, self.top_k)
        step = {"all_actions": self._exact_step, "sampled_set": self._set_step}.get(advantage, self._sampled_step)
        t0 = time.perf_counter()
        done = step(source, iteration, seed, optimizer, backward)
        episodes, metrics, chosen = done.episodes, done.metrics, done.chosen
        update_seconds = time.perf_counter() - done.drawn_at
        self.mask.update(self.features_only(done.afm_picks), entropy=done.stats["entropy"])
        # after the update, so this iteration's stored log-probs and its PPO ratios used one normaliser
        self.policy.update_obs_norm(done.states)
        self.model_rows += episodes.model_rows
        metrics.update(done.stats)
        metrics.update({"distinct_features": float(self.features_only(chosen).unique().numel()),
                        "steered_share": self.steered_share(chosen), "mask_size": float(self.mask.mask_size),
                        "mask_threshold": float(self.mask.effective_threshold), "model_rows": float(self.model_rows),
                        "lr": optimizer.param_groups[0]["lr"]})
        return IterationResult(metrics, episodes, done.drawn_at - t0, update_seconds)

    def _exact_step(self, source, iteration, seed, optimizer, backward):
        """``all_actions``: every allowed action's exact reward, the exact expected-reward update."""
        exact = source.every_action(self, iteration)
        t1 = time.perf_counter()
        allowed = self.allowed_actions()
        stats = all_actions_update(self.policy, optimizer, self.ppo_cfg, iteration, exact.states, exact.rewards,
                                   exact.actions, allowed, backward=backward)
        with torch.no_grad():  # what the policy chose: one sample per prompt (AFM) and the greedy choice
            device = next(self.policy.parameters()).device
            probs = self.policy(exact.states.to(device), allowed.to(device))[0].softmax(-1).cpu()
            sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).flatten()
            greedy = probs.argmax(-1)
        column = torch.full((probs.shape[1],), -1, dtype=torch.long)
        column[exact.actions] = torch.arange(len(exact.actions))
        metrics = {"reward_mean": stats["expected_reward_before"],
                   "accuracy": float(exact.correct[torch.arange(len(greedy)), column[greedy]].mean())}
        return StepOutcome(exact, stats, metrics, greedy, sampled, exact.states, t1)

    def _set_step(self, source, iteration, seed, optimizer, backward):
        """``sampled_set``: a screened and a sampled set of distinct actions per prompt, each scored exactly, and
        the policy-improvement update."""
        sets = self.scored_sets(source, iteration, seed)
        t1 = time.perf_counter()
        drawn = sets.actions >= 0
        scaled = torch.zeros_like(sets.rewards)
        scaled[drawn] = self.scaled_rewards(sets.rewards[drawn])
        stats = sampled_set_update(self.policy, optimizer, self.ppo_cfg, iteration, sets.states, sets.actions,
                                   scaled, sets.weights, self.allowed_actions(), backward=backward)
        w = sets.weights * drawn

        def estimate(x: torch.Tensor) -> float:  # the policy's expected value of x, from the weighted set
            return float(((w * x).sum(-1) / w.sum(-1).clamp_min(1e-12)).mean())

        metrics = {"reward_mean": estimate(sets.rewards), "accuracy": estimate(sets.correct),
                   "reward_scale": self.reward_scale(), "set_size": float(drawn.sum(1).float().mean())}
        chosen = sets.actions[sets.sampled]
        return StepOutcome(sets, stats, metrics, chosen, chosen, sets.states, t1)

    def _sampled_step(self, source, iteration, seed, optimizer, backward):
        """``gae``/``group``: episodes whose actions the policy sampled, and the clipped PPO update."""
        cfg = self.ppo_cfg
        episodes = source.sample(self, iteration)
        t1 = time.perf_counter()
        check_finite(iteration, rewards=episodes.rewards)
        group_size = len(episodes.groups) // (int(episodes.groups.max()) + 1)
        advantage = resolve_advantage(cfg.advantage, episodes.valid.shape[1] == 1, group_size, self.top_k)
        batch = Batch.from_rollout(episodes.trajectory, episodes.valid, self.scaled_rewards(episodes.rewards),
                                   cfg.gamma, cfg.gae_lambda, advantage=advantage, groups=episodes.groups)
        stats = ppo_update(self.policy, optimizer, cfg, iteration, batch, self.allowed_actions(),
                           torch.Generator().manual_seed(seed), backward=backward)
        chosen = episodes.trajectory["feature"][episodes.valid]
        metrics = {"reward_mean": float(episodes.rewards.mean()), "accuracy": float(episodes.correct.mean()),
                   "reward_scale": self.reward_scale(),
                   "steps_per_episode": float(episodes.valid.sum(1).float().mean())}
        return StepOutcome(episodes, stats, metrics, chosen, chosen, episodes.trajectory["state"][episodes.valid], t1)

    @torch.no_grad()
    def scored_sets(self, source: EpisodeSource, iteration: int, seed: int) -> ScoredSets:
        """Each prompt's set: the screen's top ``ppo.screen_top`` features (when the source has a screen), then
        ``source.group_size`` distinct actions drawn from the policy without replacement among the rest; all scored
        exactly by the source."""
        prompts, states = source.prompt_states(self, iteration)
        allowed = self.allowed_actions()
        device = next(self.policy.parameters()).device
        logits = self.policy(states.to(device), allowed.to(device))[0].cpu()
        probs = logits.softmax(-1)
        features = allowed[: self.policy.d_sae]
        screened = torch.zeros(len(states), 0, dtype=torch.long)
        exclude = None
        if self.ppo_cfg.screen_top > 0 and source.has_screen:
            if self.ppo_cfg.screen_top >= int(features.sum()):  # the screen's top holds every feature: no backward
                screened = features.nonzero().flatten().expand(len(states), -1)
            else:
                screen = source.screen(prompts)
                screened = screen.masked_fill(~features, float("-inf")).topk(self.ppo_cfg.screen_top, dim=-1).indices
            exclude = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, screened, True)
        drawn, inclusion = gumbel_top_k(logits, source.group_size, torch.Generator().manual_seed(seed), exclude)
        actions = torch.cat([screened, drawn], 1)
        pi = probs.gather(1, actions.clamp_min(0))
        weights = torch.cat([pi[:, : screened.shape[1]],
                             pi[:, screened.shape[1]:] / inclusion.clamp_min(1e-12)], 1) * (actions >= 0)
        sampled = torch.cat([torch.zeros(screened.shape, dtype=torch.bool), drawn >= 0], 1)
        rewards, correct, rows = source.score(self, prompts, actions)
        return ScoredSets(states, actions, weights, sampled, rewards.float(), correct.float(), rows)


# -------------------------------------------------------------------- sources
class RolloutSource:
    """Steered rollouts of ``env`` on the iteration's prompts (``batch``: each prompt ``group_size`` times in a row,
    as ``PromptDataModule`` serves them)."""

    def __init__(self, env, batch: list):
        self.env, self.batch = env, batch
        self.prompts = list({ex.id: ex for ex in batch}.values())
        self.group_size = len(batch) // len(self.prompts)
        self.one_token = env.task.max_new_tokens == 1
        self.has_screen = True

    def sample(self, learner: Learner, iteration: int) -> SampledEpisodes:
        from crl_exp.crl.rollout import PolicyController, policy_rollout

        env = self.env
        controller = PolicyController(learner.policy, allowed=learner.allowed_actions(), greedy=False,
                                      seed=iteration_seed(learner.seed, iteration), sae=env.sae.sae,
                                      top_k=learner.top_k)
        first: dict[str, int] = {}
        groups = torch.tensor([first.setdefault(ex.id, len(first)) for ex in self.batch])
        rollout = policy_rollout(env.task, env.lm, self.batch, env.steerer, controller,
                                 share_prefix=len(first) < len(self.batch))
        records = rollout.records
        return SampledEpisodes(rollout.trajectory, rollout.valid,
                               torch.tensor([r["reward"] for r in records], dtype=torch.float),
                               torch.tensor([float(r["correct"]) for r in records]), groups, len(records), records,
                               {"logged": rollout.logged})

    def every_action(self, learner: Learner, iteration: int) -> ExactRewards:
        from crl_exp.reward_table import reward_table

        prompts = self.prompts
        features = learner.mask.allowed().nonzero().flatten()
        if len(features) > MAX_ALL_ACTIONS:
            raise CRLConfigError(f"ppo.advantage=all_actions scores every allowed action of every prompt; "
                                 f"{len(features)} actions is more than {MAX_ALL_ACTIONS}: set policy.action_pool")
        table = reward_table(self.env, prompts, features.tolist(), desc=f"all actions, iteration {iteration}",
                             use_cache=False)
        return exact_rewards(learner, table, torch.arange(len(prompts)), features, table.episodes)

    def prompt_states(self, learner: Learner, iteration: int) -> tuple[list, torch.Tensor]:
        from crl_exp.episodes import observed_states

        return self.prompts, observed_states(self.env, self.prompts, len(self.prompts))

    def score(self, learner: Learner, prompts: list, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One shared-prefix forward per prompt: its actions' rows (the no-op is the table's unsteered column)."""
        from crl_exp.reward_table import reward_table

        noop_index = learner.policy.noop_index
        rewards, correct = torch.zeros(actions.shape), torch.zeros(actions.shape)
        rows = 0
        for p, (ex, row) in enumerate(zip(prompts, actions.tolist(), strict=True)):
            features = [a for a in row if a >= 0 and a != noop_index] or [0]
            table = reward_table(self.env, [ex], features, use_cache=False)
            by_action = dict(zip(features, zip(table.reward[0].tolist(), table.correct[0].tolist(), strict=True),
                                 strict=True))
            if noop_index is not None:
                by_action[noop_index] = (float(table.unsteered_reward[0]), float(table.unsteered_correct[0]))
            for j, a in enumerate(row):
                if a >= 0:
                    rewards[p, j], correct[p, j] = by_action[a]
            rows += sum(a >= 0 for a in row)
        return rewards, correct, rows

    def screen(self, prompts: list) -> torch.Tensor | None:
        """One backward pass per prompt (``first_order.first_order_screen``)."""
        from crl_exp.first_order import first_order_screen

        return first_order_screen(self.env, prompts)


class TableSource:
    """An exact reward table of a one-token task (``RewardTable``: every prompt under its features and unsteered),
    ``prompts_per_iteration`` distinct prompts an iteration, each ``group_size`` times for sampled estimators.
    Sampled actions read their reward off the table (the no-op reads the unsteered column); ``model_rows`` counts
    the rows a rollout of the same episodes would have cost."""

    def __init__(self, table, prompts_per_iteration: int, group_size: int = 1, screen: torch.Tensor | None = None):
        """``screen`` [table prompts, d_sae]: each feature's predicted reward change for each prompt (optional)."""
        if group_size < 1:
            raise CRLConfigError(f"group_size must be >= 1, got {group_size}")
        self.table, self.prompts, self.group_size, self.screen_scores = table, prompts_per_iteration, group_size, screen
        self.one_token = True
        self.has_screen = screen is not None

    def prompts_of(self, learner: Learner, iteration: int) -> torch.Tensor:
        return torch.tensor(iteration_prompts(len(self.table.example_ids), self.prompts, learner.seed, iteration))

    def columns(self, learner: Learner) -> torch.Tensor:
        """Each action's column of ``[unsteered, *features]`` (-1 for a feature the table lacks)."""
        n_actions = learner.policy.d_sae + int(learner.policy.noop_index is not None)
        columns = torch.full((n_actions,), -1, dtype=torch.long)
        columns[torch.tensor(self.table.features)] = torch.arange(1, len(self.table.features) + 1)
        if learner.policy.noop_index is not None:
            columns[learner.policy.noop_index] = 0
        return columns

    @torch.no_grad()
    def sample(self, learner: Learner, iteration: int) -> SampledEpisodes:
        table = self.table
        prompts = self.prompts_of(learner, iteration)
        rows = prompts.repeat_interleave(self.group_size)
        states = table.states[rows]
        if learner.top_k != 1:
            raise CRLConfigError("a reward table holds one feature per row: policy.top_k must be 1 on a TableSource")
        allowed = learner.allowed_actions()
        not_in_table = allowed & (self.columns(learner) < 0)
        if not_in_table.any():
            raise ValueError(f"the policy may choose {int(not_in_table.sum())} actions the reward table does not hold "
                             f"(restrict the action space to the table's features)")
        device = next(learner.policy.parameters()).device
        logits, values = learner.policy(states.to(device), allowed.to(device))
        probs = logits.softmax(-1).cpu()
        g = torch.Generator().manual_seed(iteration_seed(learner.seed, iteration))
        actions = torch.multinomial(probs, learner.top_k, replacement=False, generator=g)  # as PolicyController
        logprobs = probs.gather(1, actions).clamp_min(1e-30).log().sum(-1)
        actions = actions[:, 0]
        cells = self.columns(learner)[actions]
        reward = torch.cat([table.unsteered_reward[:, None], table.reward], 1)[rows, cells]
        correct = torch.cat([table.unsteered_correct[:, None], table.correct], 1)[rows, cells]
        trajectory = {"state": states[:, None], "feature": actions[:, None], "logprob": logprobs[:, None],
                      "value": values.cpu()[:, None]}
        return SampledEpisodes(trajectory, torch.ones(len(rows), 1, dtype=torch.bool), reward.float(),
                               correct.float(), torch.arange(len(prompts)).repeat_interleave(self.group_size),
                               len(rows))

    def prompt_states(self, learner: Learner, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self.prompts_of(learner, iteration)
        return prompts, self.table.states[prompts]

    def score(self, learner: Learner, prompts: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor,
                                                                                            torch.Tensor, int]:
        drawn = actions >= 0
        cells = self.columns(learner)[actions.clamp_min(0)]
        if (cells[drawn] < 0).any():
            raise ValueError("the policy chose actions the reward table does not hold")
        rows = prompts[:, None].expand(actions.shape)
        full_r = torch.cat([self.table.unsteered_reward[:, None], self.table.reward], 1)
        full_c = torch.cat([self.table.unsteered_correct[:, None], self.table.correct], 1)
        cells = cells.clamp_min(0)
        return full_r[rows, cells] * drawn, full_c[rows, cells] * drawn, int(drawn.sum())

    def screen(self, prompts: torch.Tensor) -> torch.Tensor | None:
        return None if self.screen_scores is None else self.screen_scores[prompts]

    def every_action(self, learner: Learner, iteration: int) -> ExactRewards:
        prompts = self.prompts_of(learner, iteration)
        features = learner.mask.allowed().nonzero().flatten()
        missing = set(features.tolist()) - set(self.table.features)
        if missing:
            raise ValueError(f"{len(missing)} allowed features are not in the reward table")
        return exact_rewards(learner, self.table, prompts, features, len(prompts) * (len(features) + 1))


def exact_rewards(learner: Learner, table, prompts: torch.Tensor, features: torch.Tensor,
                  model_rows: int) -> ExactRewards:
    """The ``prompts`` rows of ``table`` restricted to ``features`` (its columns), with the no-op's column (the
    unsteered one) appended when the policy has a no-op."""
    index = {f: j for j, f in enumerate(table.features)}
    cols = torch.tensor([index[int(f)] for f in features], dtype=torch.long)
    actions, rewards, correct = features, table.reward[prompts][:, cols], table.correct[prompts][:, cols]
    if learner.policy.noop_index is not None:
        actions = torch.cat([features, torch.tensor([learner.policy.noop_index])])
        rewards = torch.cat([rewards, table.unsteered_reward[prompts][:, None]], 1)
        correct = torch.cat([correct, table.unsteered_correct[prompts][:, None]], 1)
    return ExactRewards(table.states[prompts], actions, rewards.float(), correct.float(), model_rows)
