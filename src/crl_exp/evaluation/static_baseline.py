"""The "best single static feature" baseline (CorrSteer-style), selected without ever reading the test split.

1. Run the unsteered model on a stratified train subset, recording the residual state at the steered layer at
   every generated step; average each feature's SAE activation over the episode's steps.
2. Correlate every feature's mean activation with the episode reward (Pearson) and rank the features (those
   that never fire are skipped). The top ``pool`` form the *candidate pool*: ``policy.action_pool`` restricts CRL
   to it, and the headroom oracle draws from it.
3. Steer *validation* episodes (a stratified subset) with each of the top ``candidates`` features (same
   coefficient as CRL) and keep the best mean reward: choosing on other episodes than those ranked avoids
   rewarding the ranking's own noise. On one-token tasks (``exhaustive``) the trials are one exact reward table
   (``reward_table``: a shared prefill and one row per feature), so every feature of CRL's action space is tried,
   on more validation prompts, for the price a generating task pays for a handful.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from crl_exp.episodes import rollout_batch
from crl_exp.errors import CRLConfigError
from crl_exp.reward_table import RewardTable, reward_table
from crl_exp.steering.controllers import RandomController, StaticController
from crl_exp.steering.hook import NO_FEATURE

log = logging.getLogger(__name__)


@dataclass
class StaticSelection:
    feature: int
    validation_reward: float
    candidates: dict[int, float]  # feature -> validation reward when steered
    correlations: dict[int, float]
    unsteered_train_reward: float
    ranking: list[int]  # features ranked by correlation with reward (best first), or the task's own action pool
    episodes: int  # episodes spent selecting (train ranking + validation trials)
    table: RewardTable | None = None  # the validation reward table of an exhaustive selection


def pearson_per_feature(acts: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Correlation of each column of ``acts`` [N, F] with ``reward`` [N]; NaN where either is constant."""
    a = acts - acts.mean(0)
    r = reward - reward.mean()
    denom = a.norm(dim=0) * r.norm()
    return torch.where(denom > 0, (a * r[:, None]).sum(0) / denom, torch.full_like(denom, float("nan")))


@torch.no_grad()
def rank_features(env, examples, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pearson correlation of each feature's mean activation with reward on unsteered ``examples``; returns
    (scores with -2 for features that never fire or are undefined, mean activation per feature, mean reward)."""
    lm, sae, task, steerer = env.lm, env.sae.sae, env.task, env.steerer
    mean_acts, rewards = [], []
    steerer.record_states = True
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="static feature: ranking features", unit="batch"):
            batch = examples[start:start + batch_size]
            records, gen = rollout_batch(task, lm, batch, steerer, StaticController(NO_FEATURE, 0.0))
            states = torch.stack([s.state for s in steerer.steps], dim=1).float()  # [B, T, d]
            valid = gen.valid.float()
            acts = sae.encode(states.to(sae.W_dec.dtype)).float().cpu()  # [B, T, d_sae]
            mean_acts.append((acts * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1))
            rewards += [r["reward"] for r in records]
    finally:
        steerer.record_states = False
    acts = torch.cat(mean_acts)
    reward = torch.tensor(rewards, dtype=torch.float)
    corr = pearson_per_feature(acts, reward)
    fired = acts.abs().sum(0) > 0
    score = torch.where(fired & ~corr.isnan(), corr, torch.full_like(corr, -2.0))
    return score, acts.mean(0), float(reward.mean())


def candidate_pool(score: torch.Tensor, mean_act: torch.Tensor, n: int) -> list[int]:
    """The ``n`` features most correlated with reward; when reward is constant (no correlation is defined), the
    most active features instead."""
    defined = int((score > -2).sum())
    if defined:
        return score.topk(min(n, defined)).indices.tolist()
    return mean_act.topk(min(n, len(mean_act))).indices.tolist()


@torch.no_grad()
def mean_reward(env, examples, controller, batch_size: int) -> float:
    """Mean reward of ``examples`` steered by ``controller`` (a baseline's reference on train/validation)."""
    recs = []
    for start in range(0, len(examples), batch_size):
        recs += rollout_batch(env.task, env.lm, examples[start:start + batch_size], env.steerer, controller)[0]
    return sum(r["reward"] for r in recs) / len(recs)


def try_features(env, features: list[int], examples, batch_size: int) -> dict[int, float]:
    """Mean reward of ``examples`` steered by each feature in turn (``env.coefficient``)."""
    return {f: mean_reward(env, examples, StaticController(f), batch_size)
            for f in tqdm(features, desc=f"static feature: {len(features)} candidates x {len(examples)} episodes",
                          unit="feature")}


@torch.no_grad()
def select_static_feature(env, train_examples, validation_examples, candidates: int, batch_size: int,
                          pool_size: int = 0, ranking=None, exhaustive: bool = False,
                          fixed_pool: list[int] | None = None, extra: list[int] | None = None) -> StaticSelection:
    """``ranking``: a ``rank_features`` result to reuse (it does not depend on the coefficient).
    ``exhaustive``: one-token tasks, the top ``candidates`` tried through one reward table. ``fixed_pool``: a
    task-defined action pool (no ranking; every feature of it is tried, exhaustively). ``extra``: features the
    task knows are worth trying (``Task.static_candidates``), tried first and first in the ranking."""
    table = None
    if fixed_pool is not None:
        if not exhaustive:
            raise ValueError("a task-defined action pool is tried exhaustively, on a one-token task")
        score = torch.zeros(max(fixed_pool) + 1)
        pool, ranked_cost = list(fixed_pool), 0
        tried = pool
    else:
        score, mean_act, unsteered = ranking or rank_features(env, train_examples, batch_size)
        pool = candidate_pool(score, mean_act, max(candidates, pool_size))
        extra = list(extra or [])
        pool = [*extra, *(f for f in pool if f not in extra)]
        tried = pool[:candidates + len(extra)]
        ranked_cost = 0 if ranking is not None else len(train_examples)  # a reused ranking cost nothing here
    if exhaustive:
        table = reward_table(env, validation_examples, tried, desc=f"static feature: {len(tried)} candidates")
        results = {f: float(table.reward[:, j].mean()) for j, f in enumerate(tried)}
        trials = table.episodes
        if fixed_pool is not None:
            unsteered = float(table.unsteered_reward.mean())
    else:
        results = try_features(env, tried, validation_examples, batch_size)
        trials = len(results) * len(validation_examples)
    best = max(results, key=lambda f: (results[f], float(score[f])))
    log.info("Best static feature %d (validation reward %.3f over %d candidates on %d prompts)", best, results[best],
             len(results), len(validation_examples))
    return StaticSelection(best, results[best], results, {f: float(score[f]) for f in tried},
                           unsteered, pool, ranked_cost + trials, table)


@dataclass
class Baselines:
    """What ``measure_baselines`` fixes before training: the static selection, its validation prompts, CRL's action
    space and the reference rewards the training
    curve shows."""

    selection: StaticSelection
    validation: list
    action_space: list[int]  # the features CRL chooses among
    action_pool: list[int] | None  # the restricted action pool (policy.action_pool), None = the whole dictionary
    references: dict[str, float] = field(default_factory=dict)
    episodes: int = 0  # episodes spent selecting and measuring the references


def measure_baselines(env, budget, action_pool: int | None, seed: int, tracker=None) -> Baselines:
    """The static baseline (train ranking, validation trials) and CRL's action space: with ``action_pool=N`` (or a
    task that defines its own pool) the top-N of the static ranking, else the dictionary. One-token tasks try every
    feature of that action space (one exact reward table), on more validation prompts. Logs ``static/*``,
    ``reference/*`` and ``heldout/static_feature.json`` when a tracker is given."""
    task, sae, sf = env.task, env.sae, budget.static_feature
    one_token = task.max_new_tokens == 1
    phase = time.perf_counter()
    fixed_pool = task.action_pool()  # a task designed for its own action space (known_answer)
    if fixed_pool is not None and action_pool not in (None, len(fixed_pool)):
        raise CRLConfigError(f"task={task.name} defines its action pool ({len(fixed_pool)} features): leave "
                             f"policy.action_pool unset")
    action_pool_size = len(fixed_pool) if fixed_pool is not None else action_pool
    # one-token tasks try the whole action pool
    n_tried = action_pool_size if one_token and action_pool_size else int(sf.candidates)
    validation = task.representative("validation", int(sf.validation_examples if one_token else sf.train_examples))
    selection = select_static_feature(
        env, task.representative("train", int(sf.train_examples)), validation, n_tried, int(budget.eval_batch_size),
        pool_size=max(action_pool_size or 0, sf.oracle_candidates), exhaustive=one_token, fixed_pool=fixed_pool,
        extra=task.static_candidates())
    pool = selection.ranking[:action_pool_size] if action_pool_size else None
    action_space = pool if pool is not None else list(range(sae.d_sae))  # the dictionary when unrestricted
    if selection.table is not None and selection.table.features == list(action_space):
        random_reward = float(selection.table.reward.mean())  # uniform over the pool, exactly, from the table
    else:
        random_reward = mean_reward(env, validation, RandomController(sae.d_sae, seed=seed, features=action_space),
                                    int(budget.eval_batch_size))
    references = {"static": selection.validation_reward, "none": selection.unsteered_train_reward,
                  "random": random_reward}
    out = Baselines(selection, validation, action_space, pool, references, selection.episodes + len(validation))
    if tracker is not None:
        tracker.log_dict({"feature": selection.feature, "validation_reward": selection.validation_reward,
                          "candidates": selection.candidates, "correlations": selection.correlations,
                          "unsteered_train_reward": selection.unsteered_train_reward, "ranking": selection.ranking,
                          "action_space": pool, "exhaustive": one_token, "validation_prompts": len(validation),
                          "episodes_selecting": out.episodes}, "heldout/static_feature.json")
        tracker.log_metrics({"static/feature": selection.feature,
                             "static/validation_reward": selection.validation_reward,
                             "static/candidates_tried": float(len(selection.candidates)),
                             "static/episodes_selecting": out.episodes})
        tracker.log_metrics({f"reference/{k}_reward": v for k, v in references.items()})
        tracker.log_metrics({"time/static_selection_seconds": time.perf_counter() - phase})
    log.info("Static feature selected in %.0f s", time.perf_counter() - phase)
    return out
