"""``mode=train``: train a CRL policy, then compare it with the baselines on held-out data, all in one MLflow run.

Wiring only: the baselines and the action space (``evaluation.static_baseline``), training (``crl``), the held-out
comparison (``evaluation.heldout_comparison``, with the scorer ``evaluation.scorers`` chooses). Held-out = the
``eval.heldout`` part of the test split (``dev`` unless asked otherwise; ``confirm`` needs ``+confirm=true``).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from crl_exp.analysis.branch_report import analyse_branches
from crl_exp.analysis.config import analysis_config
from crl_exp.analysis.training_curve import plot_training_curve
from crl_exp.crl.config import apply_budget, budget_config, config_dataclass, heldout_size, masking_config
from crl_exp.crl.module import CRLModule, PromptDataModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig, resolve_advantage
from crl_exp.crl.trainer import RunOwnedMLFlowLogger, accelerator_for, build_trainer, fit_policy
from crl_exp.episodes import build_env, observed_states
from crl_exp.evaluation.config import eval_config
from crl_exp.evaluation.heldout_comparison import ComparisonSetup, heldout_comparison, heldout_examples
from crl_exp.evaluation.scorers import choose_scorer
from crl_exp.evaluation.static_baseline import measure_baselines
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker
from crl_exp.tracking.provenance import git_commit
from crl_exp.tracking.sweep import config_hash

log = logging.getLogger(__name__)


def output_dir(tracker: RunTracker) -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path("outputs") / tracker.run_id


def run(cfg: DictConfig, tracker: RunTracker) -> dict[str, Any]:
    apply_budget(cfg)
    budget, settings = budget_config(cfg.budget), eval_config(cfg.eval)  # typed: every default is the dataclass's
    seed = int(cfg.seed)
    task = build_task(cfg.task, cfg.get("data_dir"))
    provenance = {"config_hash": config_hash(cfg), "commit": git_commit(), "seed": seed, "run_id": tracker.run_id,
                  "mode": str(cfg.mode)}
    examples = heldout_examples(task, settings, heldout_size(budget, task.max_new_tokens),
                                confirmed=bool(cfg.get("confirm", False)), provenance=provenance)
    tracker.log_metrics({f"data/{s}_size": n for s, n in task.split_sizes().items()})
    tracker.log_metrics({"data/malformed_rows": task.n_malformed, "data/heldout_eval_size": len(examples)})
    tracker.set_tags({"heldout_part": settings.heldout})
    env = build_env(cfg, task, tracker)
    ppo_cfg, policy_cfg = config_dataclass(PPOConfig, cfg.ppo), config_dataclass(PolicyConfig, cfg.policy)
    ppo_cfg.advantage = resolve_advantage(ppo_cfg.advantage, task.max_new_tokens == 1, int(budget.group_size),
                                          policy_cfg.top_k)
    tracker.set_tags({"advantage": ppo_cfg.advantage})
    baselines = measure_baselines(env, budget, policy_cfg.action_pool, seed, tracker)
    module = CRLModule(env.lm.d_model, env.sae.d_sae, policy_cfg, ppo_cfg, masking_config(cfg.masking),
                       budget.iterations, seed=seed, action_directions=env.sae.sae.W_dec.detach().cpu()).attach(env)
    module.run_id = tracker.run_id
    if baselines.action_pool is not None:
        module.mask.restrict(baselines.action_pool)
    initial_policy = copy.deepcopy(module.policy)  # the untrained control
    if policy_cfg.obs_norm:
        train_states = task.representative("train", int(budget.static_feature.train_examples) * 2)
        module.warm_up_obs_norm(observed_states(env, train_states, int(budget.eval_batch_size)))
    action_pool_size = len(baselines.action_pool) if baselines.action_pool is not None else None
    space = f"action_pool:{action_pool_size}" if action_pool_size else f"full:{env.sae.d_sae}"
    tracker.set_tags({"action_space": space})
    out_dir = output_dir(tracker)
    logger = RunOwnedMLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=tracker.tracking_uri,
                                  run_id=tracker.run_id, resumed=bool(cfg.trainer.get("ckpt_path")))
    trainer = build_trainer(budget.iterations, out_dir / "checkpoints", logger=logger,
                            checkpoint_every=int(cfg.trainer.checkpoint_every),
                            progress_bar=bool(cfg.trainer.progress_bar), accelerator=accelerator_for(env.lm.device))
    phase = time.perf_counter()
    data = PromptDataModule(task, int(budget.episodes_per_iteration), seed=seed, group_size=int(budget.group_size))
    fit_policy(module, data, trainer, ckpt_path=cfg.trainer.get("ckpt_path"))
    tracker.log_metrics({"time/training_seconds": time.perf_counter() - phase,
                         "crl/episodes_training": module.episodes_seen})  # all_actions: P x A per iteration
    log.info("Trained %d iterations in %.0f s", budget.iterations, time.perf_counter() - phase)
    curve = plot_training_curve(module.history, baselines.references,
                                f"CRL on {task.name}, layer {env.sae.layer} ({env.lm.name})", out_dir / "training_curve.png")
    tracker.log_artifact(curve, "training")
    if (out_dir / "checkpoints" / "last.ckpt").is_file():
        tracker.log_artifact(out_dir / "checkpoints" / "last.ckpt", "checkpoints")
    sel, one_token = baselines.selection, task.max_new_tokens == 1
    setup = ComparisonSetup(
        key=task.primary_key, part=settings.heldout, seed=seed, batch_size=int(budget.eval_batch_size),
        sampled_seeds=budget.eval_sampled_seeds, reference_train_examples=budget.reference_train_examples,
        oracle_candidates=budget.static_feature.oracle_candidates, with_mask=bool(cfg.masking.eval_with_mask),
        advantage=ppo_cfg.advantage, noop_action=policy_cfg.noop_action,
        notes_after_table=[f"Training curve (train reward per iteration; static/random/none references on train and "
                           f"validation episodes): {curve}"],
        notes_at_end=[f"Episodes spent: CRL training {module.episodes_seen}; static selection {baselines.episodes} "
                      f"({len(sel.candidates)} candidates on {len(baselines.validation)} validation prompts"
                      f"{', exhaustive over the action space' if one_token and action_pool_size else ''})."],
        extra_summary={"episodes": {"crl_training": module.episodes_seen, "static_selecting": baselines.episodes},
                       "train_history": module.history, "config": OmegaConf.to_container(cfg, resolve=True)})
    scorer = choose_scorer(settings, env, module.top_k, baselines.action_pool, setup.batch_size)
    summary = heldout_comparison(env, module, initial_policy, examples, scorer, baselines, settings, setup, tracker,
                                 out_dir)
    branch_cfg = analysis_config(cfg.analysis)
    if getattr(branch_cfg, "at_end_of_training", False) and module.top_k == 1:
        analyse_branches(env, module, task, branch_cfg, tracker, title="(end of training)")
    return summary
