"""``mode=eval``: score a task split with no / random / static steering, with bootstrap CIs and a per-example table."""

from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig

from crl_exp.episodes import run_episodes
from crl_exp.errors import CRLConfigError
from crl_exp.evaluation.comparison import condition_summary
from crl_exp.evaluation.condition_log import format_table, log_evaluation
from crl_exp.evaluation.config import eval_config
from crl_exp.evaluation.heldout_comparison import heldout_examples
from crl_exp.runtime import load_model, load_sae_for
from crl_exp.steering.factory import build_steerer
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker
from crl_exp.tracking.provenance import git_commit
from crl_exp.tracking.sweep import config_hash


def run(cfg: DictConfig, tracker: RunTracker) -> dict[str, Any]:
    """Evaluate ``cfg.task`` on ``cfg.eval.split``; returns metrics, CIs, speed and split sizes."""
    ecfg = eval_config(cfg.eval)
    task = build_task(cfg.task, cfg.get("data_dir"))
    if ecfg.split == "test":  # the test split is scored by parts: dev unless the confirmation part is asked for
        provenance = {"config_hash": config_hash(cfg), "commit": git_commit(), "seed": int(cfg.seed),
                      "run_id": tracker.run_id, "mode": "eval"}
        examples = heldout_examples(task, ecfg, ecfg.limit, confirmed=bool(cfg.get("confirm", False)),
                                    provenance=provenance)
    else:
        examples = task.split(ecfg.split, ecfg.limit)
    if not examples:
        raise CRLConfigError(f"{task.name} {ecfg.split} split is empty (after subsets)")
    tracker.log_metrics({f"data/{s}_size": n for s, n in task.split_sizes().items()})
    tracker.log_metrics({"data/malformed_rows": task.n_malformed, "eval/n_examples": len(examples)})
    lm = load_model(cfg, tracker)
    steerer = controller = None
    if cfg.steering.kind != "none":
        sae = load_sae_for(cfg, lm, tracker)
        steerer, controller = build_steerer(cfg.steering, lm, sae, seed=int(cfg.seed))
    t0 = time.perf_counter()
    records, speed = run_episodes(task, lm, examples, ecfg.batch_size, steerer, controller,
                                  desc=f"{task.name}/{ecfg.split} steering={cfg.steering.kind}")
    speed["eval_seconds"] = time.perf_counter() - t0
    summary = condition_summary(task, records, task.primary_key, ecfg.n_bootstrap, int(cfg.seed))  # as mode=train
    metrics, cis = summary["metrics"], summary["ci95"]
    prefix = f"eval/{task.name}/{ecfg.split}/{cfg.steering.kind}"
    log_evaluation(tracker, prefix, metrics, cis, records, speed)
    print(f"{task.name} | split={ecfg.split} (n={len(examples)}) | steering={cfg.steering.kind} | "
          f"{speed['eval_seconds']:.0f}s, {speed['tokens_per_second']:.1f} generated tokens/s | "
          f"malformed rows skipped: {task.n_malformed}")
    print(format_table(metrics, cis))
    return {"metrics": metrics, "ci95": cis, "speed": speed, "n": len(examples), "split_sizes": task.split_sizes(),
            "malformed_rows": task.n_malformed}
