"""The "best single static feature" baseline (CorrSteer-style), selected on the *train* split only.

1. Run the unsteered model on train episodes, recording the residual state at the steered layer at every
   generated step; average each feature's SAE activation over the episode's steps.
2. Correlate every feature's mean activation with the episode reward (Pearson) and keep the ``candidates``
   most positively correlated features (features that never fire are skipped).
3. Steer the same train episodes with each candidate (same coefficient as CRL) and keep the best mean reward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from crl_exp.episodes import rollout_batch
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.hook import NO_FEATURE

log = logging.getLogger(__name__)


@dataclass
class StaticSelection:
    feature: int
    train_reward: float
    candidates: dict[int, float]  # feature -> train reward when steered
    correlations: dict[int, float]
    unsteered_train_reward: float


def pearson_per_feature(acts: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Correlation of each column of ``acts`` [N, F] with ``reward`` [N]; NaN where either is constant."""
    a = acts - acts.mean(0)
    r = reward - reward.mean()
    denom = a.norm(dim=0) * r.norm()
    return torch.where(denom > 0, (a * r[:, None]).sum(0) / denom, torch.full_like(denom, float("nan")))


@torch.no_grad()
def select_static_feature(env, examples, candidates: int, batch_size: int) -> StaticSelection:
    lm, sae, task, steerer = env.lm, env.sae.sae, env.task, env.steerer
    mean_acts, rewards = [], []
    steerer.record_states = True
    try:
        for start in range(0, len(examples), batch_size):
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
    if bool((score > -2).any()):
        top = score.topk(min(candidates, int((score > -2).sum()))).indices.tolist()
    else:  # constant reward: fall back to the most active features
        top = acts.mean(0).topk(candidates).indices.tolist()
    results = {}
    for feature in top:
        recs = []
        for start in range(0, len(examples), batch_size):
            recs += rollout_batch(task, lm, examples[start:start + batch_size], steerer,
                                  StaticController(feature, env.coefficient))[0]
        results[feature] = sum(r["reward"] for r in recs) / len(recs)
    best = max(results, key=lambda f: (results[f], float(score[f])))
    log.info("Best static feature %d (train reward %.3f; candidates %s)", best, results[best], results)
    return StaticSelection(best, results[best], results, {f: float(corr[f]) for f in top},
                           float(reward.mean()))
