"""``mode=select_coefficient``: choose the steering coefficient on the *validation* split, by a small sweep.

The same coefficient then serves CRL and the random/static baselines (``steering.coefficient``). For each value
in ``select.grid``: the best static feature is selected exactly as ``mode=train`` does (features ranked once on a
stratified train subset, the top candidates tried on a stratified validation subset) and a random feature per
token is scored on the same validation episodes. The chosen coefficient maximises the best static feature's
validation reward (ties: the smaller coefficient, the gentler edit). The test split is never read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig

from crl_exp.crl.config import apply_budget
from crl_exp.episodes import build_env
from crl_exp.errors import CRLConfigError
from crl_exp.evaluation.static_baseline import mean_reward, rank_features, select_static_feature
from crl_exp.steering.controllers import RandomController
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker


def run(cfg: DictConfig, tracker: RunTracker) -> dict[str, Any]:
    grid = sorted(float(c) for c in cfg.select.grid)
    if not grid or any(c < 0 for c in grid):
        raise CRLConfigError(f"select.grid must list coefficients >= 0, got {list(cfg.select.grid)}")
    apply_budget(cfg)
    budget = cfg.budget
    task = build_task(cfg.task, cfg.get("data_dir"))
    env = build_env(cfg, task, tracker)
    n, bs = int(budget.static_feature.train_examples), int(budget.eval_batch_size)
    train, validation = task.representative("train", n), task.representative("validation", n)
    ranking = rank_features(env, train, bs)
    rows = []
    for c in grid:
        at_c = dataclasses.replace(env, coefficient=c, steerer=dataclasses.replace(env.steerer))  # its own strength
        selection = select_static_feature(at_c, train, validation, int(budget.static_feature.candidates), bs,
                                          ranking=ranking)
        random_reward = mean_reward(at_c, validation, RandomController(env.sae.d_sae, c, seed=int(cfg.seed)), bs)
        rows.append({"coefficient": c, "static_feature": selection.feature,
                     "static_validation_reward": selection.validation_reward, "random_validation_reward": random_reward})
        tracker.log_metrics({"select/static_validation_reward": selection.validation_reward,
                             "select/random_validation_reward": random_reward}, step=grid.index(c))
    best = max(rows, key=lambda r: (r["static_validation_reward"], -r["coefficient"]))
    table = "\n".join([
        f"Coefficient sweep on {task.name} validation (n={len(validation)}; features ranked on {len(train)} train "
        f"episodes; unsteered train reward {ranking[2]:.3f}); chosen: steering.coefficient={best['coefficient']}",
        "", "| coefficient | best static feature | its validation reward | random feature validation reward |",
        "|---|---|---|---|",
        *(f"| {r['coefficient']} | {r['static_feature']} | {r['static_validation_reward']:.3f} | "
          f"{r['random_validation_reward']:.3f} |" for r in rows)])
    print(table)
    tracker.log_text(table, "select/coefficient.md")
    tracker.log_metrics({"select/chosen_coefficient": best["coefficient"]})
    tracker.set_tags({"chosen_coefficient": best["coefficient"]})
    return {"rows": rows, "chosen": best["coefficient"]}
