"""Branch points of a policy on held-out episodes, written as artifacts (``branch_points/``): CSV of every
continuation, JSON of the branch points, an HTML report with them marked. Used by ``mode=analyse`` and at the
end of training (``analysis.at_end_of_training``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from crl_exp.analysis.branch_points import Episode, track_branches
from crl_exp.analysis.intervention_log import log_rows, to_frame
from crl_exp.analysis.report import episode_context, render_report
from crl_exp.analysis.top_features import task_top_contexts
from crl_exp.crl.rollout import policy_rollout
from crl_exp.errors import CRLConfigError


def analyse_branches(env, module, task, acfg: DictConfig, tracker, title: str = "") -> list[dict]:
    """Branch points of a trained ``CRLModule``'s policy on ``acfg.episodes`` held-out episodes, acting inside its
    action space (greedy, alternatives, continuations); artifacts under ``branch_points/``."""
    policy, allowed = module.policy, module.action_space()
    examples = task.heldout("dev", int(acfg.episodes))
    if not examples:
        raise CRLConfigError(f"No held-out episodes to analyse for {task.name}")
    # Originals are generated one episode at a time (unpadded), exactly as the branches are replayed.
    records, log, all_rows, points, noise = [], [], [], {}, 0
    for i, ex in enumerate(tqdm(examples, desc="branch points", unit="episode")):
        controller = module.controller(greedy=True, with_mask=False, sae=env.sae.sae)
        rollout = policy_rollout(task, env.lm, [ex], env.steerer, controller)
        (rec,), gen, traj, valid = rollout.records, rollout.generation, rollout.logged, rollout.valid
        records.append(rec)
        log += log_rows([rec], gen.new_tokens, traj, valid, env.lm.tokenizer, episode_offset=i,
                        value_scale=module.reward_scale())
        episode = Episode(ex, gen.new_tokens[0][valid[0]].tolist(), traj["feature"][0][valid[0]].tolist(),
                          bool(rec["correct"] > 0.5))
        steps = list(range(min(len(episode.new_tokens), int(acfg.max_steps))))
        result = track_branches(task, env.lm, env.steerer, policy, env.coefficient, episode, i,
                                k_alternatives=int(acfg.k_alternatives), steps=steps, allowed=allowed)
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
    episodes = {i: {"prompt": r["prompt"], "question": r["question"], "answer": r["answer"],
                    "completion": r["completion"], **episode_context(ex)}
                for i, (r, ex) in enumerate(zip(records, examples, strict=True))}
    used = [int(f) for f in log["feature"].value_counts().index if int(f) >= 0] if len(log) else []
    contexts = task_top_contexts(env.lm, env.sae.sae, env.sae.layer, task, used)
    (out / "report.html").write_text(render_report(log, episodes, f"Branch points: {task.name} {title}",
                                                   branch_points=points, feature_contexts=contexts,
                                                   neuronpedia=env.sae.neuronpedia_id))
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
