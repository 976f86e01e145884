"""``mode=analyze analysis=branch_points run_id=...``: branch points of a trained policy on held-out episodes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from crl_exp.analysis.branch_points import Episode, track_branches
from crl_exp.analysis.intervention_log import log_rows, to_frame
from crl_exp.analysis.report import render_report
from crl_exp.analysis.runs import download_checkpoint, load_policy_state, load_run_config
from crl_exp.crl.experiment import apply_budget, build_env, masking_config
from crl_exp.crl.module import CRLModule, config_dataclass
from crl_exp.crl.ppo import PPOConfig
from crl_exp.crl.rollout import PolicyController
from crl_exp.errors import CRLConfigError
from crl_exp.evaluation import rollout_batch
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker


def run_branch_analysis(cfg: DictConfig, tracker: RunTracker) -> list[dict]:
    if not cfg.get("run_id"):
        raise CRLConfigError("mode=analyze needs run_id=<MLflow run id of a mode=train run>")
    client = MlflowClient(tracker.tracking_uri)
    src = load_run_config(client, str(cfg.run_id))
    acfg = cfg.analysis
    with open_dict(src):
        src.data_dir = cfg.get("data_dir") or src.get("data_dir")
        src.cache_dir = cfg.get("cache_dir") or src.get("cache_dir")
    apply_budget(src)
    tracker.set_tags({"source_run_id": cfg.run_id, "analysis": "branch_points", "task": src.task.name})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = download_checkpoint(client, str(cfg.run_id), Path(tmp))
        task = build_task(src.task, src.get("data_dir"))
        env = build_env(src, task)
        module = CRLModule(env.lm.d_model, env.sae.d_sae, dict(src.policy), config_dataclass(PPOConfig, src.ppo),
                           masking_config(src.masking), int(src.budget.iterations), seed=int(src.seed))
        load_policy_state(module, ckpt)
    if module.top_k != 1:
        raise CRLConfigError("Branch-point tracking needs a top-1 policy (one feature per token); this run used "
                             f"policy.top_k={module.top_k}")
    return analyse_branches(env, module.policy, task, acfg, tracker, title=f"run {cfg.run_id}")


def analyse_branches(env, policy, task, acfg: DictConfig, tracker: RunTracker, title: str = "") -> list[dict]:
    """Branch points of ``policy`` on ``acfg.episodes`` held-out episodes; artifacts under ``branch_points/``."""
    examples = task.split("test", int(acfg.episodes))
    if not examples:
        raise CRLConfigError(f"No held-out episodes to analyse for {task.name}")
    # Originals are generated one episode at a time (unpadded), exactly as the branches are replayed.
    records, log, all_rows, points, noise = [], [], [], {}, 0
    for i, ex in enumerate(examples):
        controller = PolicyController(policy, env.coefficient, greedy=True, sae=env.sae.sae)
        (rec,), gen = rollout_batch(task, env.lm, [ex], env.steerer, controller)
        traj, valid = controller.stacked(), gen.valid
        records.append(rec)
        log += log_rows([rec], gen.new_tokens, traj, valid, env.lm.tokenizer, episode_offset=i)
        episode = Episode(ex, gen.new_tokens[0][valid[0]].tolist(), traj["feature"][0][valid[0]].tolist(),
                          bool(rec["correct"] > 0.5))
        steps = list(range(min(len(episode.new_tokens), int(acfg.max_steps))))
        result = track_branches(task, env.lm, env.steerer, policy, env.coefficient, episode, i,
                                k_alternatives=int(acfg.k_alternatives), steps=steps)
        all_rows += result.rows
        points[i] = result.branch_points()
        noise += len(result.control_flips())
    log = to_frame(log)
    if noise:
        print(f"WARNING: {noise} control continuations (the original action replayed) changed the outcome: "
              f"numerical noise between the original generation and its cached replay")
    out = Path(tempfile.mkdtemp(prefix="branch-points-"))
    pd.DataFrame([{k: v for k, v in r.items() if k != "tokens"} for r in all_rows]).to_csv(out / "branches.csv",
                                                                                          index=False)
    (out / "branch_points.json").write_text(json.dumps({str(k): v for k, v in points.items()}, indent=1))
    episodes = {i: {"prompt": r["prompt"], "completion": r["completion"]} for i, r in enumerate(records)}
    (out / "report.html").write_text(render_report(log, episodes, f"Branch points: {task.name} {title}",
                                                   branch_points=points))
    n_points = sum(len(v) for v in points.values())
    n_controls = sum(r["control"] for r in all_rows)
    tracker.log_metrics({"branch/episodes": len(examples), "branch/points": n_points,
                         "branch/points_per_episode": n_points / len(examples),
                         "branch/alternatives_evaluated": len(all_rows) - n_controls,
                         "branch/controls_evaluated": n_controls, "branch/control_flips": noise})
    tracker.log_artifact(out, "branch_points")
    print(f"{n_points} branch points in {len(examples)} episodes ({len(all_rows) - n_controls} counterfactual "
          f"continuations; {noise} of {n_controls} controls flipped)")
    for ep, pts in points.items():
        for p in pts:
            print(f"  episode {ep} step {p['position']}: feature {p['chosen_feature']} "
                  f"({'right' if p['chosen_correct'] else 'wrong'}) vs {p['flipping_alternatives']}")
    return all_rows
