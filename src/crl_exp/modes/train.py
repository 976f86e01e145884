"""``mode=train``: train a CRL policy, then compare it with the baselines on held-out data, all in one MLflow run.

This runner wires config to library calls: the static baseline and the action space (``crl.feature_selection``),
training (``crl``), the held-out comparison and its statistics (``evaluation``), the interpretability outputs
(``analysis``). Held-out = the ``eval.heldout`` part of the test split (``dev`` unless asked otherwise; scoring
``confirm`` appends a line to the confirmation ledger).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from crl_exp.analysis.branch_report import analyse_branches
from crl_exp.analysis.critic import analyse_critic, plot_value_trajectories
from crl_exp.analysis.feature_profile import usage_weighted_syntactic_share
from crl_exp.analysis.intervention_log import log_rows as intervention_rows
from crl_exp.analysis.intervention_log import to_frame
from crl_exp.analysis.report import episode_context, render_report
from crl_exp.analysis.top_features import task_top_contexts
from crl_exp.analysis.training_curve import plot_training_curve
from crl_exp.crl.config import apply_budget, budget_config, config_dataclass, heldout_size, masking_config
from crl_exp.crl.feature_selection import mean_reward, select_static_feature
from crl_exp.crl.module import CRLModule, PromptDataModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig, resolve_advantage
from crl_exp.crl.rollout import policy_rollout
from crl_exp.crl.trainer import RunOwnedMLFlowLogger, accelerator_for, build_trainer, fit_policy
from crl_exp.episodes import build_env, observed_states
from crl_exp.errors import CRLConfigError
from crl_exp.evaluation.ceiling import ceiling, group_oracle
from crl_exp.evaluation.comparison import paired_delta
from crl_exp.evaluation.headroom import per_prompt_oracle
from crl_exp.evaluation.heldout import (
    HEADLINE_MASK_RULE,
    action_shares,
    baseline_controllers,
    compare,
    comparison_table,
    policy_variants,
    run_conditions,
    untrained_controller,
    variants_table,
)
from crl_exp.evaluation.ledger import record_confirmation
from crl_exp.evaluation.table_scoring import (
    check_against_rollouts,
    dictionary_sample,
    feature_columns,
    policy_columns,
    random_columns,
    table_policy_variants,
)
from crl_exp.modes.evaluation_log import log_evaluation
from crl_exp.reward_table import RewardTable, reward_table
from crl_exp.stats import share_of_gap
from crl_exp.steering.controllers import RandomController
from crl_exp.steering.hook import NO_FEATURE
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker
from crl_exp.tracking.provenance import git_commit
from crl_exp.tracking.sweep import config_hash

log = logging.getLogger(__name__)


def table_scoring(cfg: DictConfig, one_token: bool, top_k: int, pool: list[int] | None) -> bool:
    """Score the held-out conditions from one reward table (``evaluation/table_scoring.py``): one-token tasks,
    one feature per step, a pool of at most ``eval.table_max_features`` (``eval.table_scoring``: auto|false)."""
    mode = str(cfg.eval.table_scoring)
    if mode not in ("auto", "false", "False"):
        raise CRLConfigError(f"eval.table_scoring must be auto or false, got {mode!r}")
    return (mode == "auto" and one_token and top_k == 1 and pool is not None
            and len(pool) <= int(cfg.eval.table_max_features))


def table_tolerance(lm) -> float:
    """How far a table-read reward may sit from the rolled-out one: shared-prefill batches reorder float sums,
    exact to ~1e-6 in fp32; half precision rounds each matmul."""
    return 1e-4 if next(lm.model.parameters()).dtype == torch.float32 else 3e-2


def primary_key(task, cfg: DictConfig) -> str:
    judge = task.judge.name if task.judge is not None else ""
    return str(cfg.task.primary_metric).format(judge=judge)


def heldout_examples(cfg: DictConfig, task, tracker: RunTracker) -> tuple[str, list]:
    """The held-out subset this run scores; scoring the confirmation part is written to the ledger first."""
    part = str(cfg.eval.heldout)
    examples = task.heldout(part, heldout_size(cfg.budget, task.max_new_tokens))
    if part == "confirm":
        entry = record_confirmation(cfg.eval.get("ledger"), task=task.name, config_hash=config_hash(cfg),
                                    commit=git_commit(), seed=int(cfg.seed), n=len(examples), run_id=tracker.run_id,
                                    mode=str(cfg.mode))
        log.warning("Scoring the CONFIRMATION subset of %s (n=%d); ledger line: %s", task.name, len(examples), entry)
    return part, examples


def run(cfg: DictConfig, tracker: RunTracker) -> dict[str, Any]:
    apply_budget(cfg)
    budget = budget_config(cfg.budget)  # typed: every default is BudgetConfig's
    task = build_task(cfg.task, cfg.get("data_dir"))
    part, test_pool = heldout_examples(cfg, task, tracker)
    tracker.log_metrics({f"data/{s}_size": n for s, n in task.split_sizes().items()})
    tracker.log_metrics({"data/malformed_rows": task.n_malformed, "data/heldout_eval_size": len(test_pool)})
    tracker.set_tags({"heldout_part": part})
    env = build_env(cfg, task, tracker)
    lm, sae = env.lm, env.sae
    seed = int(cfg.seed)
    iterations = budget.iterations
    ppo_cfg = config_dataclass(PPOConfig, cfg.ppo)
    policy_cfg = config_dataclass(PolicyConfig, cfg.policy)
    ppo_cfg.advantage = resolve_advantage(ppo_cfg.advantage, task.max_new_tokens == 1, int(budget.group_size))
    tracker.set_tags({"advantage": ppo_cfg.advantage})
    # The static baseline is selected first (train ranking, validation trials): its ranked pool is also CRL's
    # action space under policy.action_pool=N, and the headroom oracle's candidates. On one-token tasks it tries
    # every feature of that action space (one exact reward table), on more validation prompts.
    sf = budget.static_feature
    one_token = task.max_new_tokens == 1
    phase = time.perf_counter()
    fixed_pool = task.action_pool()  # a task designed for its own action space (known_answer)
    if fixed_pool is not None and policy_cfg.action_pool not in (None, len(fixed_pool)):
        raise CRLConfigError(f"task={task.name} defines its action pool ({len(fixed_pool)} features): leave "
                             f"policy.action_pool unset")
    n_pool = len(fixed_pool) if fixed_pool is not None else policy_cfg.action_pool
    n_tried = n_pool if one_token and n_pool else int(sf.candidates)
    validation = task.representative("validation", int(sf.validation_examples if one_token else sf.train_examples))
    selection = select_static_feature(
        env, task.representative("train", int(sf.train_examples)), validation, n_tried, int(budget.eval_batch_size),
        pool_size=max(n_pool or 0, sf.oracle_candidates), exhaustive=one_token, fixed_pool=fixed_pool)
    pool = selection.pool[:n_pool] if n_pool else None
    action_features = pool if pool is not None else list(range(sae.d_sae))
    episodes_training = iterations * int(budget.episodes_per_iteration)
    episodes_baselines = selection.episodes + len(validation)  # + the random reference below
    tracker.log_dict({"feature": selection.feature, "validation_reward": selection.validation_reward,
                      "candidates": selection.candidates, "correlations": selection.correlations,
                      "unsteered_train_reward": selection.unsteered_train_reward, "pool": selection.pool,
                      "action_space": pool, "exhaustive": one_token, "validation_prompts": len(validation),
                      "episodes_selecting": episodes_baselines, "episodes_training_crl": episodes_training},
                     "heldout/static_feature.json")
    tracker.log_metrics({"static/feature": selection.feature, "static/validation_reward": selection.validation_reward,
                         "static/candidates_tried": float(len(selection.candidates)),
                         "static/episodes_selecting": episodes_baselines, "crl/episodes_training": episodes_training})
    if selection.table is not None and selection.table.features == list(action_features):
        random_reward = float(selection.table.reward.mean())  # uniform over the pool, exactly, from the table
    else:
        random_reward = mean_reward(env, validation, RandomController(sae.d_sae, seed=seed,
                                                                      features=action_features),
                                    int(budget.eval_batch_size))
    references = {"static": selection.validation_reward, "none": selection.unsteered_train_reward,
                  "random": random_reward}
    tracker.log_metrics({f"reference/{k}_reward": v for k, v in references.items()})
    tracker.log_metrics({"time/static_selection_seconds": time.perf_counter() - phase})
    log.info("Static feature selected in %.0f s", time.perf_counter() - phase)
    module = CRLModule(lm.d_model, sae.d_sae, policy_cfg, ppo_cfg, masking_config(cfg.masking), iterations,
                       seed=seed, action_directions=sae.sae.W_dec.detach().cpu()).attach(env)
    module.run_id = tracker.run_id
    if pool is not None:
        module.mask.restrict(pool)
    initial_policy = copy.deepcopy(module.policy)  # the untrained control
    if policy_cfg.obs_norm:
        module.warm_up_obs_norm(observed_states(env, task.representative("train", int(sf.train_examples) * 2),
                                                int(budget.eval_batch_size)))
    tracker.set_tags({"action_space": f"candidates:{n_pool}" if n_pool else f"full:{sae.d_sae}"})
    data = PromptDataModule(task, int(budget.episodes_per_iteration), seed=seed, group_size=int(budget.group_size))
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path("outputs") / tracker.run_id
    logger = RunOwnedMLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=tracker.tracking_uri,
                          run_id=tracker.run_id, resumed=bool(cfg.trainer.get("ckpt_path")))
    trainer = build_trainer(iterations, out_dir / "checkpoints", logger=logger,
                            checkpoint_every=int(cfg.trainer.checkpoint_every), progress_bar=bool(cfg.trainer.progress_bar),
                            accelerator=accelerator_for(lm.device))
    phase = time.perf_counter()
    fit_policy(module, data, trainer, ckpt_path=cfg.trainer.get("ckpt_path"))
    tracker.log_metrics({"time/training_seconds": time.perf_counter() - phase})
    log.info("Trained %d iterations in %.0f s", iterations, time.perf_counter() - phase)
    episodes_training = module.episodes_seen  # the estimator decides what an iteration costs (all_actions: P x A)
    tracker.log_metrics({"crl/episodes_training": episodes_training})
    curve = plot_training_curve(module.history, references, f"CRL on {task.name}, layer {sae.layer} ({lm.name})",
                                out_dir / "training_curve.png")
    tracker.log_artifact(curve, "training")
    last = out_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        tracker.log_artifact(last, "checkpoints")

    # ---------------------------------------------------------------- baselines and CRL on held-out data
    n_boot, bs = int(cfg.eval.n_bootstrap), int(budget.eval_batch_size)
    phase = time.perf_counter()
    with_mask = bool(cfg.masking.get("eval_with_mask"))
    crl_controller = module.controller(greedy=True, with_mask=with_mask, sae=sae.sae)
    control = untrained_controller(initial_policy, module, sae=sae.sae)
    controllers = {**baseline_controllers(env, action_features, selection.feature, seed), "untrained": control,
                   "crl": crl_controller}
    key = primary_key(task, cfg)
    value_scale = module.reward_scale()  # the critic's unit: V * sigma is in reward units (intervention log)
    tracker.log_metrics({"critic/reward_scale": value_scale})
    log_rows: list[dict] = []
    episodes_logged = [0]

    def collect_interventions(batch_records, gen):
        traj = crl_controller.trajectory_for_logs()
        crl_controller.steps = []
        log_rows.extend(intervention_rows(batch_records, gen.new_tokens, traj, gen.valid, lm.tokenizer,
                                          episode_offset=episodes_logged[0], value_scale=value_scale))
        episodes_logged[0] += len(batch_records)

    control_features: list[torch.Tensor] = []

    def collect_control(batch_records, gen):
        control_features.append(control.trajectory_for_logs()["feature"][gen.valid])
        control.steps = []

    heldout_table = None
    if table_scoring(cfg, one_token, module.top_k, pool):
        # every condition read off one exact reward table (evaluation/table_scoring.py); the intervention log rolls
        # the trained policy out on the first eval.log_examples prompts, which also re-checks the table
        dictionary = dictionary_sample(sae.d_sae, list(pool), int(cfg.eval.random_dictionary_columns), seed)
        table_phase = time.perf_counter()
        heldout_table = reward_table(env, test_pool, [*pool, *dictionary], keep_records=True,
                                     desc="held-out reward table")
        columns = {"none": torch.zeros(len(test_pool), dtype=torch.long),
                   "random": random_columns(heldout_table, list(pool), seed),
                   "random_dictionary": random_columns(heldout_table, dictionary, seed),
                   "static": feature_columns(heldout_table, torch.full((len(test_pool),), selection.feature)),
                   "untrained": policy_columns(control, heldout_table), "crl": policy_columns(crl_controller, heldout_table)}
        records = {name: heldout_table.cell_records(c) for name, c in columns.items()}
        speed = {"table_seconds": time.perf_counter() - table_phase}
        speeds = {name: speed for name in records}
        chosen = {name: torch.tensor([NO_FEATURE if c == 0 else heldout_table.features[c - 1] for c in columns[name].tolist()])
                  for name in ("crl", "untrained")}
        logged_index = task.analysis_sample(test_pool, int(cfg.eval.log_examples))  # stratified, not file order
        logged = [test_pool[i] for i in logged_index]
        rolled = []
        for start in tqdm(range(0, len(logged), bs), desc="intervention log", unit="batch"):
            batch = policy_rollout(task, lm, logged[start:start + bs], env.steerer, crl_controller)
            log_rows.extend(intervention_rows(batch.records, batch.generation.new_tokens, batch.logged, batch.valid,
                                              lm.tokenizer, episode_offset=start, value_scale=value_scale))
            rolled += batch.records
        mismatch = check_against_rollouts([records["crl"][i] for i in logged_index], rolled)
        tracker.log_metrics({"heldout/table_vs_rollout_max_abs_diff": mismatch})
        if mismatch > table_tolerance(lm):
            raise RuntimeError(f"held-out reward table and rollouts disagree by {mismatch:.2e} (> {table_tolerance(lm)}) "
                               f"on the same prompts and actions: set eval.table_scoring=false and report this")
        distinct = {k: int(v[v != NO_FEATURE].unique().numel()) for k, v in chosen.items()}
        steered_share = float((chosen["crl"] != NO_FEATURE).float().mean())
        greedy_features = chosen["crl"]
    else:
        records, speeds = run_conditions(env, test_pool, controllers, bs,
                                         on_batch={"crl": collect_interventions, "untrained": collect_control},
                                         share_prefill=module.top_k == 1)
        control_chosen = torch.cat(control_features) if control_features else torch.zeros(0, dtype=torch.long)
        distinct = {"crl": len({r["feature"] for r in log_rows} - {NO_FEATURE}),
                    "untrained": int(control_chosen[control_chosen != NO_FEATURE].unique().numel())}
        steered_share = (sum(r["feature"] != NO_FEATURE for r in log_rows) / len(log_rows)) if log_rows else float("nan")
        greedy_features = torch.tensor([int(r["feature"]) for r in log_rows], dtype=torch.long)
    tracker.log_metrics({"heldout/crl/steered_share": steered_share})
    tracker.log_metrics({f"heldout/{k}/distinct_greedy_features": float(v) for k, v in distinct.items()})
    results, deltas = compare(task, records, key, n_boot, seed, float(cfg.eval.assumed_discordance))
    for name, res in results.items():
        log_evaluation(tracker, f"heldout/{name}", res["metrics"], res["ci95"], records[name], speeds[name])
    for base, d in deltas.items():
        tracker.log_metrics({f"power/crl_minus_{base}/{k}": float(v) for k, v in d["power"].items()})
        for metric, v in d.items():
            if metric != "power":
                tracker.log_metrics({f"delta/crl_minus_{base}/{metric}": v["delta"],
                                     f"delta/crl_minus_{base}/{metric}_ci_low": v["ci95"][0],
                                     f"delta/crl_minus_{base}/{metric}_ci_high": v["ci95"][1]})
    shares = action_shares(greedy_features[greedy_features != NO_FEATURE].tolist(),
                           module.mask.candidates, module.mask.allowed())
    tracker.log_metrics({f"heldout/crl/{k}": v for k, v in shares.items()})
    sampled_seeds = budget.eval_sampled_seeds
    if heldout_table is not None:
        variants = table_policy_variants(module, env, heldout_table, task, key, sampled_seeds, with_mask,
                                         columns["crl"])
    else:
        variants = policy_variants(env, module, test_pool, key, bs, sampled_seeds, with_mask,
                                   headline_records=records["crl"],
                                   headline_blocked_share=shares["final_mask_blocked_share"])
    for name, v in variants.items():
        v.pop("records", None)
        if name == "crl_sampled":
            tracker.log_metrics({f"heldout/{name}/{key}_mean": v["mean"], f"heldout/{name}/{key}_sd": v["sd"],
                                 f"heldout/{name}/reward_mean": v["reward_mean"]})
        else:
            tracker.log_metrics({f"heldout/{name}/{key}": v[key], f"heldout/{name}/reward": v["reward"]})
    tracker.log_metrics({"time/heldout_seconds": time.perf_counter() - phase})
    log.info("Held-out comparison in %.0f s", time.perf_counter() - phase)
    phase = time.perf_counter()
    oracle = refs = None
    n_oracle = sf.oracle_candidates
    if one_token and n_oracle:  # one-token tasks: every candidate costs one row of a last-token forward
        refs = one_token_references(env, task, cfg, selection, pool or selection.pool[:n_oracle], validation,
                                    test_pool, results, greedy_features.tolist(), seed, heldout_table,
                                    records=records, key=key, n_boot=n_boot,
                                    assumed_discordance=float(cfg.eval.assumed_discordance))
        oracle = refs["oracle"]
        tracker.log_metrics({f"heldout/oracle/{k}": float(v) for k, v in oracle.items()})
        tracker.log_metrics({f"heldout/{name}/{k}": float(v) for name in ("group_oracle", "ceiling")
                             for k, v in refs[name].items() if isinstance(v, (int, float))})
        tracker.log_metrics({f"learner/{k}": float(v) for k, v in refs["learner"].items() if not isinstance(v, dict)})
    if refs is not None:
        tracker.log_metrics({"time/references_seconds": time.perf_counter() - phase})
        log.info("Reference rows (reward tables, ceiling) in %.0f s", time.perf_counter() - phase)
    usage = dict(Counter(f for f in greedy_features.tolist() if f != NO_FEATURE).most_common(50))
    contexts = task_top_contexts(lm, sae.sae, sae.layer, task, list(usage))
    logged_records = (records if heldout_table is None else
                      {k: [v[i] for i in logged_index] for k, v in records.items()})
    write_interpretability_outputs(tracker, task.name, log_rows, logged_records, out_dir,
                                   examples={ex.id: ex for ex in test_pool}, feature_contexts=contexts)
    syntactic, per_feature = usage_weighted_syntactic_share(usage, contexts)
    tracker.log_metrics({"features/syntactic_share": syntactic, "features/distinct_heldout": float(len(usage))})
    tracker.log_dict({str(k): v for k, v in per_feature.items()}, "interventions/feature_profiles.json")
    if cfg.analysis.get("at_end_of_training") and module.top_k == 1:
        analyse_branches(env, module, task, cfg.analysis, tracker, title="(end of training)")
    table = comparison_table(task.name, key, results, deltas, len(test_pool), part)
    table += (f"\n\nTraining curve (train reward per iteration; static/random/none references on train and "
              f"validation episodes): {curve}")
    table += (f"\n\nDistinct greedy features on the held-out prompts: CRL {distinct['crl']}, untrained control "
              f"{distinct['untrained']} (estimator: {ppo_cfg.advantage}); share of steered tokens {steered_share:.3f}"
              f"{' (the policy may choose no steering)' if policy_cfg.noop_action else ''}.")
    table += f"\n\n{HEADLINE_MASK_RULE}\n\n" + variants_table(key, variants, shares)
    if refs is not None:
        table += "\n\n" + references_table(refs, results, key, deltas["static"]["power"]["mde_reward"])
    table += (f"\n\nEpisodes spent: CRL training {episodes_training}; static selection {episodes_baselines} "
              f"({len(selection.candidates)} candidates on {len(validation)} validation prompts"
              f"{', exhaustive over the action space' if one_token and n_pool else ''}).")
    print(table)
    tracker.log_text(table, "heldout/comparison.md")
    summary = {"task": task.name, "primary_metric": key, "n_heldout": len(test_pool), "heldout_part": part,
               "action_space": pool, "advantage": ppo_cfg.advantage, "distinct_greedy_features": distinct,
               "steered_share": steered_share,
               "results": results, "crl_variants": variants, **shares,
               "headline_with_mask": with_mask, "oracle": oracle, "deltas": deltas,
               "references": {k: v for k, v in (refs or {}).items() if k != "oracle"},
               "static_feature": selection.feature, "static_candidates_tried": len(selection.candidates),
               "episodes": {"crl_training": episodes_training, "static_selecting": episodes_baselines},
               "train_history": module.history, "config": OmegaConf.to_container(cfg, resolve=True)}
    tracker.log_text(json.dumps(summary, indent=1, default=float), "heldout/summary.json")
    return summary


def write_interpretability_outputs(tracker: RunTracker, task_name: str, log_rows: list[dict],
                                   records: dict[str, list[dict]], out_dir: Path, examples: dict | None = None,
                                   feature_contexts: dict | None = None) -> None:
    """Intervention log (parquet), HTML report and critic analysis of the CRL held-out episodes. ``examples`` (by
    id) give the report each episode's context and options; ``feature_contexts`` each used feature's top
    activating train contexts."""
    examples = examples or {}
    log_df = to_frame(log_rows)
    analysis_dir = out_dir / "interventions"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    log_df.to_parquet(analysis_dir / "intervention_log.parquet", index=False)
    episodes = {i: {"prompt": r["prompt"], "question": r["question"], "answer": r["answer"],
                    "completion": r["completion"], "correct": r["correct"], "unsteered": base["completion"],
                    "unsteered_correct": base["correct"], **episode_context(examples.get(r["id"]))}
                for i, (r, base) in enumerate(zip(records["crl"], records["none"], strict=True))}
    (analysis_dir / "report.html").write_text(render_report(log_df, episodes, f"CRL interventions: {task_name}",
                                                            feature_contexts=feature_contexts))
    if not log_df.empty:
        baseline = {r["id"]: r["correct"] for r in records["none"]}
        critic = analyse_critic(log_df, baseline)
        tracker.log_metrics(critic.metrics)
        critic.episodes.to_csv(analysis_dir / "critic_episodes.csv", index=False)
        plot_value_trajectories(log_df, critic, analysis_dir / "critic_trajectories.png")
    tracker.log_artifact(analysis_dir, "interventions")


def one_token_references(env, task, cfg: DictConfig, selection, ref_pool: list[int], validation: list, test_pool: list,
                         results: dict, greedy_first: list[int], seed: int,
                         scored_table: RewardTable | None = None, records: dict[str, list[dict]] | None = None,
                         key: str = "accuracy", n_boot: int = 1000,
                         assumed_discordance: float = 0.2) -> dict[str, Any]:
    """Reference rows from exact reward tables over ``ref_pool`` (train, validation, held-out): the per-prompt
    oracle (reads the answers), the group oracle and the learnability ceiling (read train answers only), and how
    much of the static-to-group-oracle gap CRL recovered, with how often it picked its group's best feature.
    ``greedy_first``: CRL's greedy feature on each held-out prompt; ``scored_table``: the held-out table the
    conditions were read from, reused when it holds ``ref_pool``; then the ceiling's own held-out records give
    paired intervals for CRL - ceiling and ceiling - static (``records``: the conditions' records)."""
    heldout_table = (scored_table.select(list(ref_pool)) if scored_table is not None
                     and set(ref_pool) <= set(scored_table.features)
                     else reward_table(env, test_pool, ref_pool, desc="held-out reward table"))
    val_table = (selection.table if selection.table is not None and selection.table.features == list(ref_pool)
                 else reward_table(env, validation, ref_pool, desc="validation reward table"))
    train_examples = task.representative("train", budget_config(cfg.budget).reference_train_examples)
    train_table = reward_table(env, train_examples, ref_pool, desc="train reward table")
    groups = group_oracle(train_table, [e.group for e in train_examples], heldout_table, [e.group for e in test_pool])
    static_column = list(ref_pool).index(selection.feature) if selection.feature in ref_pool else None
    ceiling_row = ceiling(train_table, val_table, heldout_table, seed=seed, static_column=static_column)
    picks = [f == groups["best_feature"].get(ex.group) for f, ex in zip(greedy_first, test_pool, strict=True)]
    static, crl = results["static"]["metrics"]["reward"], results["crl"]["metrics"]["reward"]
    gap = groups["reward"] - static
    learner = {"gap_recovered": share_of_gap(crl - static, gap),
               "group_best_pick_rate": sum(picks) / len(picks) if picks else float("nan"),
               "ceiling_gap_recovered": share_of_gap(crl - static, ceiling_row["reward"] - static)}
    if records is not None:  # per group: the pass mark's gap, class by class (the pooled one hides the class mix)
        learner["gap_recovered_by_group"] = {}
        for g, oracle_g in groups["reward_by_group"].items():
            idx = [i for i, ex in enumerate(test_pool) if ex.group == g]
            mean = lambda name: sum(records[name][i]["reward"] for i in idx) / len(idx)  # noqa: E731
            learner["gap_recovered_by_group"][g] = share_of_gap(mean("crl") - mean("static"), oracle_g - mean("static"))
    paired = {}
    if heldout_table.records is not None and records is not None:
        ceiling_records = heldout_table.cell_records(torch.tensor(ceiling_row["actions"]) + 1)
        paired = {"crl_minus_ceiling": paired_delta(task, records["crl"], ceiling_records, key, n_boot, seed,
                                                    assumed_discordance),
                  "ceiling_minus_static": paired_delta(task, ceiling_records, records["static"], key, n_boot, seed,
                                                       assumed_discordance)}
    ceiling_row = {k: v for k, v in ceiling_row.items() if k != "actions"}
    return {"oracle": per_prompt_oracle(heldout_table), "group_oracle": groups, "ceiling": ceiling_row,
            "learner": learner, "paired": paired, "episodes": heldout_table.episodes + train_table.episodes}


def ceiling_label(c: dict[str, Any]) -> str:
    """What validation chose as the ceiling: the static policy itself, or a kind, shrinkage and stopping step."""
    if c["kind"] == "static":
        return "the static policy: no fit beat it on validation"
    return f"{c['kind']}, shrinkage {c['shrinkage']:g}, {c['steps']} steps"


def gap_sentence(name: str, gap: float, share: float, mde_reward: float) -> str:
    """What CRL recovered of a reference's reward gap over static, stated only where that gap exceeds what this
    held-out set can detect (a share of a gap inside the noise reads -1744% and means nothing)."""
    if not gap > mde_reward:
        return (f"the {name} gap over static ({gap:+.4f} reward) is below this held-out set's MDE ({mde_reward:.4f}): "
                f"no share of it is stated")
    return f"CRL recovered {share:.0%} of the static-to-{name} reward gap ({gap:+.3f})"


def references_table(refs: dict[str, Any], results: dict, key: str, mde_reward: float = 0.0) -> str:
    g, c, o, learner = refs["group_oracle"], refs["ceiling"], refs["oracle"], refs["learner"]
    rows = [("static (selected on validation)", results["static"]["metrics"].get(key), results["static"]["metrics"]["reward"], "-"),
            ("untrained control", results["untrained"]["metrics"].get(key), results["untrained"]["metrics"]["reward"], "-"),
            ("CRL", results["crl"]["metrics"].get(key), results["crl"]["metrics"]["reward"], "-"),
            ("group oracle (each group's best train feature)", g["accuracy"], g["reward"], "-"),
            (f"ceiling ({ceiling_label(c)}; fitted on {c['train_prompts']} train prompts, chosen on validation)",
             c["accuracy"], c["reward"], str(c["distinct_actions"])),
            ("per-prompt oracle (reads the answers)", o["oracle_accuracy"], o["oracle_reward"], "-")]
    lines = [f"Reference rows on the same held-out prompts, from exact reward tables over the {o['candidates']}-feature "
             f"pool:", "", f"| row | {key} | reward | distinct actions |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.3f} | {r:.3f} | {d} |" for name, a, r, d in rows]
    static = results["static"]["metrics"]["reward"]
    lines += ["", f"{gap_sentence('group-oracle', g['reward'] - static, learner['gap_recovered'], mde_reward)}; "
                  f"{gap_sentence('ceiling', c['reward'] - static, learner['ceiling_gap_recovered'], mde_reward)}; "
                  f"CRL's greedy action was its group's best train feature on {learner['group_best_pick_rate']:.0%} "
                  f"of held-out prompts."]
    for name, d in refs.get("paired", {}).items():
        cells = [f"{metric} {v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for metric, v in d.items()
                 if metric != "power"]
        lines.append(f"{name.replace('_', ' ')} (paired, clustered): {'; '.join(cells)}.")
    return "\n".join(lines)
