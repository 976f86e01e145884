"""``mode=train``: train a CRL policy, then compare it with the baselines on held-out data, all in one MLflow run.

Held-out comparison (test split, same examples for every condition): no steering, a random feature per
token, the best single static feature (selected on the train split), and CRL (greedy actions, mask off unless
``masking.eval_with_mask``). Each gets bootstrap 95% CIs; CRL-minus-baseline deltas get paired-bootstrap CIs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from crl_exp.analysis.branch_report import analyse_branches
from crl_exp.analysis.critic import analyse_critic, plot_value_trajectories
from crl_exp.analysis.feature_profile import TopActivations, usage_weighted_syntactic_share
from crl_exp.analysis.headroom import per_prompt_oracle
from crl_exp.analysis.intervention_log import log_rows as intervention_rows
from crl_exp.analysis.intervention_log import to_frame
from crl_exp.analysis.report import render_report
from crl_exp.analysis.training_curve import plot_training_curve
from crl_exp.crl.config import apply_budget, config_dataclass, heldout_size, masking_config
from crl_exp.crl.feature_selection import mean_reward, select_static_feature
from crl_exp.crl.module import CRLModule, PromptDataModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.crl.rollout import PolicyController
from crl_exp.crl.trainer import RunOwnedMLFlowLogger, accelerator_for, build_trainer, fit_policy
from crl_exp.episodes import build_env, run_episodes, summarize
from crl_exp.modes.evaluation_log import log_evaluation
from crl_exp.steering.controllers import RandomController, StaticController
from crl_exp.tasks import build_task
from crl_exp.tasks.metrics import bootstrap_ci, mde_paired_binary, mde_paired_mean, wilson_interval
from crl_exp.tracking import RunTracker

log = logging.getLogger(__name__)
CONDITIONS = ("none", "random", "static", "crl")


def primary_key(task, cfg: DictConfig) -> str:
    judge = task.judge.name if task.judge is not None else ""
    return str(cfg.task.primary_metric).format(judge=judge)


def paired_deltas(task, crl: list[dict], base: list[dict], key: str, n_boot: int, seed: int) -> dict[str, Any]:
    """CRL minus baseline on the same examples, with a paired percentile-bootstrap 95% CI."""
    def stat(idx):
        a = task.metrics_from_records([crl[i] for i in idx.tolist()])
        b = task.metrics_from_records([base[i] for i in idx.tolist()])
        return {k: a[k] - b[k] for k in (key, "reward") if k in a and k in b}

    point = stat(torch.arange(len(crl)))
    cis = bootstrap_ci(len(crl), stat, n_boot=n_boot, seed=seed)
    out = {k: {"delta": v, "ci95": list(cis.get(k, (float("nan"), float("nan"))))} for k, v in point.items()}
    out["power"] = detectable_effects(crl, base)
    return out


def detectable_effects(crl: list[dict], base: list[dict]) -> dict[str, float]:
    """What this held-out set could detect (80% power, two-sided 5%): the minimum detectable difference in
    per-example correctness given the observed share of discordant pairs, and in mean reward given the observed
    spread of paired reward differences."""
    n = len(crl)
    correct = [(float(a["correct"]) > 0.5, float(b["correct"]) > 0.5) for a, b in zip(crl, base, strict=True)]
    discordance = sum(a != b for a, b in correct) / n if n else float("nan")
    diffs = torch.tensor([float(a["reward"]) - float(b["reward"]) for a, b in zip(crl, base, strict=True)])
    sd = diffs.std().item() if n > 1 else float("nan")
    return {"n": n, "discordance": discordance, "mde_correct": mde_paired_binary(n, discordance),
            "mde_reward": mde_paired_mean(n, sd)}


def proportion_ci(records: list[dict], value: float, bootstrap: tuple[float, float]) -> list[float]:
    """A Wilson interval where the metric is the share of correct examples with 0/1 or n-1/n of them (the
    percentile bootstrap degenerates there to [0, 0] or [1, 1]); the bootstrap interval otherwise."""
    n, k = len(records), sum(float(r["correct"]) > 0.5 for r in records)
    if n and abs(value - k / n) < 1e-9 and (k <= 1 or k >= n - 1):
        return list(wilson_interval(k, n))
    return list(bootstrap)


def run(cfg: DictConfig, tracker: RunTracker) -> dict[str, Any]:
    apply_budget(cfg)
    budget = cfg.budget
    task = build_task(cfg.task, cfg.get("data_dir"))
    test_pool = task.split("test", heldout_size(budget, task.max_new_tokens))
    tracker.log_metrics({f"data/{s}_size": n for s, n in task.split_sizes().items()})
    tracker.log_metrics({"data/malformed_rows": task.n_malformed, "data/heldout_eval_size": len(test_pool)})
    env = build_env(cfg, task, tracker)
    lm, sae = env.lm, env.sae
    seed = int(cfg.seed)
    iterations = int(budget.iterations)
    ppo_cfg = config_dataclass(PPOConfig, cfg.ppo)
    policy_cfg = config_dataclass(PolicyConfig, cfg.policy)
    # The static baseline is selected first (train ranking, validation trials): its ranked pool is also CRL's
    # action space under policy.candidates=N, and the headroom oracle's candidates.
    n_select = int(budget.static_feature.train_examples)
    validation = task.representative("validation", n_select)
    selection = select_static_feature(
        env, task.representative("train", n_select), validation, int(budget.static_feature.candidates),
        int(budget.eval_batch_size),
        pool_size=max(policy_cfg.candidates or 0, int(budget.static_feature.get("oracle_candidates", 0))))
    episodes_training = iterations * int(budget.episodes_per_iteration)
    episodes_baselines = selection.episodes + len(validation)  # + the random reference below
    tracker.log_dict({"feature": selection.feature, "validation_reward": selection.validation_reward,
                      "candidates": selection.candidates, "correlations": selection.correlations,
                      "unsteered_train_reward": selection.unsteered_train_reward, "pool": selection.pool,
                      "episodes_selecting": episodes_baselines, "episodes_training_crl": episodes_training},
                     "heldout/static_feature.json")
    tracker.log_metrics({"static/feature": selection.feature, "static/validation_reward": selection.validation_reward,
                         "static/episodes_selecting": episodes_baselines, "crl/episodes_training": episodes_training})
    random_reward = mean_reward(env, validation, RandomController(sae.d_sae, env.coefficient, seed=seed),
                                int(budget.eval_batch_size))
    references = {"static": selection.validation_reward, "none": selection.unsteered_train_reward,
                  "random": random_reward}
    tracker.log_metrics({f"reference/{k}_reward": v for k, v in references.items()})
    module = CRLModule(lm.d_model, sae.d_sae, policy_cfg, ppo_cfg, masking_config(cfg.masking), iterations,
                       seed=seed).attach(env)
    module.run_id = tracker.run_id
    if policy_cfg.candidates:
        module.mask.restrict(selection.pool[: policy_cfg.candidates])
    tracker.set_tags({"action_space": f"candidates:{policy_cfg.candidates}" if policy_cfg.candidates
                      else f"full:{sae.d_sae}"})
    data = PromptDataModule(task, int(budget.episodes_per_iteration), seed=seed, group_size=int(budget.group_size))
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path("outputs") / tracker.run_id
    logger = RunOwnedMLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=tracker.tracking_uri,
                          run_id=tracker.run_id, resumed=bool(cfg.trainer.get("ckpt_path")))
    trainer = build_trainer(iterations, out_dir / "checkpoints", logger=logger,
                            checkpoint_every=int(cfg.trainer.checkpoint_every), progress_bar=bool(cfg.trainer.progress_bar),
                            accelerator=accelerator_for(lm.device))
    fit_policy(module, data, trainer, ckpt_path=cfg.trainer.get("ckpt_path"))
    curve = plot_training_curve(module.history, references, f"CRL on {task.name}, layer {sae.layer} ({lm.name})",
                                out_dir / "training_curve.png")
    tracker.log_artifact(curve, "training")
    last = out_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        tracker.log_artifact(last, "checkpoints")

    # ---------------------------------------------------------------- baselines and CRL on held-out data
    n_boot, bs = int(cfg.eval.n_bootstrap), int(budget.eval_batch_size)
    eval_mask = module.mask.allowed() if cfg.masking.get("eval_with_mask") else None
    controllers = {
        "none": (None, None),
        "random": (env.steerer, RandomController(sae.d_sae, env.coefficient, seed=seed)),
        "static": (env.steerer, StaticController(selection.feature, env.coefficient)),
        "crl": (env.steerer, PolicyController(module.policy, env.coefficient, allowed=eval_mask, greedy=True,
                                              sae=sae.sae, top_k=module.top_k)),
    }
    key = primary_key(task, cfg)
    results: dict[str, Any] = {}
    records: dict[str, list[dict]] = {}
    log_rows: list[dict] = []
    episodes_seen = [0]
    crl_controller = controllers["crl"][1]

    top_acts = TopActivations(sae.d_sae)

    def collect_interventions(batch_records, gen):
        traj = crl_controller.stacked()
        crl_controller.steps = []
        valid = gen.valid
        if valid.any():  # every steered position, step 0 (the last prompt token) included
            with torch.no_grad():
                top_acts.update(sae.sae.encode(traj["state"][valid].to(sae.sae.W_dec.dtype)).float().cpu(),
                                gen.steered_tokens[valid])
        log_rows.extend(intervention_rows(batch_records, gen.new_tokens, traj, valid,
                                          lm.tokenizer, episode_offset=episodes_seen[0]))
        episodes_seen[0] += len(batch_records)

    for name, (steerer, controller) in controllers.items():
        recs, speed = run_episodes(task, lm, test_pool, bs, steerer, controller, desc=f"held-out {name}",
                                   on_batch=collect_interventions if name == "crl" else None)
        metrics, cis = summarize(task, recs, n_boot, seed)
        if key in metrics and key in cis:
            cis[key] = tuple(proportion_ci(recs, metrics[key], cis[key]))
        log_evaluation(tracker, f"heldout/{name}", metrics, cis, recs, speed)
        records[name] = recs
        results[name] = {"metrics": metrics, "ci95": {k: list(v) for k, v in cis.items()}}
    deltas = {b: paired_deltas(task, records["crl"], records[b], key, n_boot, seed) for b in ("none", "random", "static")}
    for base, d in deltas.items():
        tracker.log_metrics({f"power/crl_minus_{base}/{k}": float(v) for k, v in d["power"].items()})
        for metric, v in d.items():
            if metric == "power":
                continue
            tracker.log_metrics({f"delta/crl_minus_{base}/{metric}": v["delta"],
                                 f"delta/crl_minus_{base}/{metric}_ci_low": v["ci95"][0],
                                 f"delta/crl_minus_{base}/{metric}_ci_high": v["ci95"][1]})
    final_mask = module.mask.allowed()
    masked_share = (sum(not bool(final_mask[int(r["feature"])]) for r in log_rows) / len(log_rows)
                    if log_rows else float("nan"))
    tracker.log_metrics({"heldout/crl/masked_action_share": masked_share})
    # greedy with the mask on picks what greedy without it picked wherever that was allowed: if no greedy action
    # was masked, every step (hence every episode) is the same, so the headline's episodes are reused
    unmasked_greedy = records["crl"] if eval_mask is None and masked_share == 0 and module.top_k == 1 else None
    variants = evaluate_policy_variants(cfg, env, module, task, test_pool, eval_mask, key, tracker,
                                        unmasked_greedy=unmasked_greedy)
    oracle = None
    n_oracle = int(budget.static_feature.get("oracle_candidates", 0))
    if task.max_new_tokens == 1 and n_oracle:  # one-token tasks: every candidate costs one last-token forward
        oracle = per_prompt_oracle(env, test_pool, selection.pool[:n_oracle])
        tracker.log_metrics({f"heldout/oracle/{k}": float(v) for k, v in oracle.items()})
    write_interpretability_outputs(tracker, task.name, log_rows, records, out_dir)
    usage = Counter(r["feature"] for r in log_rows)
    syntactic, per_feature = usage_weighted_syntactic_share(dict(usage.most_common(50)), top_acts, lm.tokenizer)
    tracker.log_metrics({"features/syntactic_share": syntactic, "features/distinct_heldout": float(len(usage))})
    tracker.log_dict({str(k): v for k, v in per_feature.items()}, "interventions/feature_profiles.json")
    if cfg.analysis.get("at_end_of_training") and module.top_k == 1:
        analyse_branches(env, module.policy, task, cfg.analysis, tracker, title="(end of training)")
    table = comparison_table(task.name, key, results, deltas, len(test_pool))
    table += (f"\n\nTraining curve (train reward per iteration; static/random/none references on train and "
              f"validation episodes): {curve}")
    table += "\n\n" + variants_table(key, variants, masked_share)
    if oracle is not None:
        static_acc = sum(float(r["correct"]) for r in records["static"]) / len(records["static"])
        table += (f"\n\nHeadroom (reference, reads the answers): per-prompt oracle over the {oracle['candidates']} "
                  f"top-correlated features: correct {oracle['oracle_accuracy']:.3f}, reward "
                  f"{oracle['oracle_reward']:.3f}; best static feature: correct {static_acc:.3f}; no steering: "
                  f"correct {oracle['unsteered_accuracy']:.3f}.")
    print(table)
    tracker.log_text(table, "heldout/comparison.md")
    summary = {"task": task.name, "primary_metric": key, "n_heldout": len(test_pool), "results": results,
               "crl_variants": variants, "masked_action_share": masked_share, "oracle": oracle,
               "deltas": deltas, "static_feature": selection.feature, "train_history": module.history,
               "config": OmegaConf.to_container(cfg, resolve=True)}
    tracker.log_text(json.dumps(summary, indent=1, default=float), "heldout/summary.json")
    return summary


def evaluate_policy_variants(cfg: DictConfig, env, module, task, test_pool: list, eval_mask, key: str,
                             tracker: RunTracker, unmasked_greedy: list[dict] | None = None) -> dict[str, Any]:
    """The trained policy as evaluated other ways than the headline (greedy, mask as configured): sampled
    (``budget.eval_sampled_seeds`` independent samples per prompt: mean and spread over the samples) and greedy
    with the mask switched the other way (on when the headline runs it off, the default).
    ``unmasked_greedy``: the headline's records when none of its actions was masked; greedy with the mask on is
    then the same episodes, so they are reused instead of generated again."""
    bs, seeds = int(cfg.budget.eval_batch_size), int(cfg.budget.get("eval_sampled_seeds", 0))
    out: dict[str, Any] = {}

    def controller(allowed, greedy, seed=0):
        return PolicyController(module.policy, env.coefficient, allowed=allowed, greedy=greedy, seed=seed,
                                sae=env.sae.sae, top_k=module.top_k)

    if seeds:
        # the samples of a prompt are rows of one batch sharing its prefill (one sampling stream; sample j of every
        # prompt forms "seed" j)
        repeated = [ex for ex in test_pool for _ in range(seeds)]
        recs, _ = run_episodes(task, env.lm, repeated, seeds * max(1, bs // seeds), env.steerer,
                               controller(eval_mask, False, seed=1000), desc=f"held-out crl sampled x{seeds}",
                               share_prefix=True)
        per_seed = [task.metrics_from_records(recs[j::seeds]) for j in range(seeds)]
        values = torch.tensor([m.get(key, float("nan")) for m in per_seed], dtype=torch.float64)
        rewards = torch.tensor([m.get("reward", float("nan")) for m in per_seed], dtype=torch.float64)
        out["crl_sampled"] = {"seeds": seeds, key: values.tolist(), "mean": values.mean().item(),
                              "sd": values.std().item() if seeds > 1 else 0.0, "reward_mean": rewards.mean().item()}
        tracker.log_metrics({f"heldout/crl_sampled/{key}_mean": out["crl_sampled"]["mean"],
                             f"heldout/crl_sampled/{key}_sd": out["crl_sampled"]["sd"],
                             "heldout/crl_sampled/reward_mean": out["crl_sampled"]["reward_mean"]})
    other = module.mask.allowed() if eval_mask is None else None
    name = "crl_mask_on" if eval_mask is None else "crl_mask_off"
    reused = name == "crl_mask_on" and unmasked_greedy is not None
    recs = unmasked_greedy if reused else run_episodes(task, env.lm, test_pool, bs, env.steerer,
                                                       controller(other, True), desc=f"held-out {name}")[0]
    metrics = task.metrics_from_records(recs)
    out[name] = {key: metrics.get(key, float("nan")), "reward": metrics.get("reward", float("nan")),
                 "same_episodes_as_greedy": reused}
    tracker.log_metrics({f"heldout/{name}/{key}": out[name][key], f"heldout/{name}/reward": out[name]["reward"]})
    return out


def variants_table(key: str, variants: dict[str, Any], masked_share: float) -> str:
    lines = [f"CRL evaluated other ways (same held-out examples); share of greedy held-out actions on features "
             f"masked at the end of training: {masked_share:.3f}", "",
             f"| policy | {key} | spread over samples | reward |", "|---|---|---|---|"]
    if "crl_sampled" in variants:
        v = variants["crl_sampled"]
        lines.append(f"| sampled (mean of {v['seeds']} samples per prompt) | {v['mean']:.3f} | sd {v['sd']:.3f} | "
                     f"{v['reward_mean']:.3f} |")
    for name in ("crl_mask_on", "crl_mask_off"):
        if name in variants:
            same = " (no greedy action was masked: the same episodes)" if variants[name].get(
                "same_episodes_as_greedy") else ""
            lines.append(f"| greedy, {name.removeprefix('crl_').replace('_', ' ')}{same} | {variants[name][key]:.3f} | "
                         f"- | {variants[name]['reward']:.3f} |")
    return "\n".join(lines)


def write_interpretability_outputs(tracker: RunTracker, task_name: str, log_rows: list[dict],
                                   records: dict[str, list[dict]], out_dir: Path) -> None:
    """Intervention log (parquet), HTML report and critic analysis of the CRL held-out episodes."""
    log_df = to_frame(log_rows)
    analysis_dir = out_dir / "interventions"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    log_df.to_parquet(analysis_dir / "intervention_log.parquet", index=False)
    episodes = {i: {"prompt": r["prompt"], "question": r["question"], "answer": r["answer"],
                    "completion": r["completion"], "correct": r["correct"], "unsteered": base["completion"],
                    "unsteered_correct": base["correct"]}
                for i, (r, base) in enumerate(zip(records["crl"], records["none"], strict=True))}
    (analysis_dir / "report.html").write_text(render_report(log_df, episodes, f"CRL interventions: {task_name}"))
    if not log_df.empty:
        baseline = {r["id"]: r["correct"] for r in records["none"]}
        critic = analyse_critic(log_df, baseline)
        tracker.log_metrics(critic.metrics)
        critic.episodes.to_csv(analysis_dir / "critic_episodes.csv", index=False)
        plot_value_trajectories(log_df, critic, analysis_dir / "critic_trajectories.png")
    tracker.log_artifact(analysis_dir, "interventions")


def comparison_table(task: str, key: str, results: dict, deltas: dict, n: int) -> str:
    lines = [f"Held-out comparison on {task} (test split, n={n}); primary metric: {key}. MDE: the smallest "
             f"CRL - condition difference in per-example correctness (reward) this n detects with 80% power.", "",
             f"| condition | {key} | 95% CI | reward | 95% CI | CRL - condition ({key}) | 95% CI | "
             f"MDE correct | MDE reward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in CONDITIONS:
        m, ci = results[name]["metrics"], results[name]["ci95"]
        k_ci, r_ci = ci.get(key, [float("nan")] * 2), ci.get("reward", [float("nan")] * 2)
        d = deltas.get(name, {}).get(key)
        power = deltas.get(name, {}).get("power")
        d_txt = f"{d['delta']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "- | -"
        d_txt += f" | {power['mde_correct']:.3f} | {power['mde_reward']:.3f}" if power else " | - | -"
        lines.append(f"| {name} | {m.get(key, float('nan')):.3f} | [{k_ci[0]:.3f}, {k_ci[1]:.3f}] | "
                     f"{m.get('reward', float('nan')):.3f} | [{r_ci[0]:.3f}, {r_ci[1]:.3f}] | {d_txt} |")
    return "\n".join(lines)
