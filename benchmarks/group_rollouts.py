"""Training episodes and held-out examples per second: today's path vs shared prefixes (one run, ratios).

Usage: .venv/bin/python benchmarks/group_rollouts.py [--repeats 2] [--eval-examples 64] [--out FILE.json]

Training rows: for each task, the same training prompts, each sampled G times with the CRL policy (sampling,
critic, SAE activation, recording, residual edit), are rolled out by each path in turn, per repeat:
- ``today``: every row prefills its whole prompt, in batches of 8 rows (the batch every iteration used before
  group rollouts: ``budget.episodes_per_iteration=8``);
- ``full@N``: every row prefills its whole prompt, in batches of the new iteration's N rows (isolates batching);
- ``shared``: the new path: N rows per batch, one unsteered prefill of ``prompt[:-1]`` per distinct prompt that
  starts from the task's cached few-shot prefix (``PrefixStore``), its KV cache laid out for the prompt's G rows.
Held-out evaluation (no groups): the same MMLU test examples, scored under two conditions (no steering, a static
feature) in batches of 8, without and with the few-shot prefix cache (the store starts empty).
Reported: rates of each path and the ratios (median over repeats), the first-step action agreement of the
training paths, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.rollout import PolicyController
from crl_exp.episodes import render_prompt, rollout_batch, run_episodes
from crl_exp.kv_cache import prefix_store
from crl_exp.models.hardware import with_machine
from crl_exp.paths import CONFIG_DIR
from crl_exp.runtime import load_model_and_sae
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.factory import steering_directions
from crl_exp.steering.hook import ResidualSteerer
from crl_exp.tasks import build_task

TODAY_ROWS = 8
# task, G, distinct prompts per iteration, new tokens (None: the task's own)
PLAN = [("mmlu", 16, 2, None), ("bbq", 16, 2, None), ("gsm8k", 8, 4, 128)]


def load_task(name: str, new_tokens: int | None, data_dir):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        tcfg = compose("config", overrides=[f"task={name}"]).task
    if new_tokens:
        with open_dict(tcfg):
            tcfg.max_new_tokens = new_tokens
            tcfg.stop_strings = []  # every episode generates the full length in every path
    return build_task(tcfg, data_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=[t for t, *_ in PLAN])
    ap.add_argument("--eval-examples", type=int, default=64, help="MMLU held-out examples (0: skip)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["mode=train", *args.overrides])
    lm, sae = load_model_and_sae(cfg)
    steerer = ResidualSteerer(lm.model, sae.layer, steering_directions(cfg.steering, sae))
    coefficient = float(cfg.steering.coefficient)
    torch.manual_seed(0)
    policy = ActorCritic(lm.d_model, sae.d_sae, int(cfg.policy.hidden))
    rows = []
    for name, group, n_prompts, new_tokens in PLAN:
        if name not in args.tasks:
            continue
        task = load_task(name, new_tokens, cfg.get("data_dir"))
        prompts = task.split("train", n_prompts)
        batch = [ex for ex in prompts for _ in range(group)]
        paths = {"today": (TODAY_ROWS, False), f"full@{len(batch)}": (len(batch), False),
                 "shared": (len(batch), True)}
        seconds: dict[str, list[float]] = {p: [] for p in paths}
        agree = []
        for rep in range(args.repeats):
            prefix_store(lm).entries.clear()  # the shared path pays for its prefix once per repeat
            firsts = {}
            for path, (rows_per_batch, share) in paths.items():
                controller = PolicyController(policy, coefficient, seed=rep, sae=sae.sae)
                t0 = time.perf_counter()
                for start in range(0, len(batch), rows_per_batch):
                    rollout_batch(task, lm, batch[start:start + rows_per_batch], steerer, controller,
                                  share_prefix=share, cache_prefixes=share)
                seconds[path].append(time.perf_counter() - t0)
                firsts[path] = controller.steps[0].feature  # one batch: its first step covers every row
            agree.append(float((firsts["shared"] == firsts[f"full@{len(batch)}"]).float().mean()))
        med = {p: statistics.median(s) for p, s in seconds.items()}
        row = {"task": name, "group_size": group, "prompts": n_prompts, "episodes": len(batch),
               "new_tokens": task.max_new_tokens,
               **{f"{p}_episodes_per_s": len(batch) / s for p, s in med.items()},
               "ratio_vs_today": med["today"] / med["shared"],
               "ratio_same_rows": med[f"full@{len(batch)}"] / med["shared"],
               "first_step_sampled_action_agreement": statistics.mean(agree) if agree else None,
               "prompt_tokens_mean": statistics.mean(len(lm.tokenizer(render_prompt(task, lm, ex)).input_ids)
                                                     for ex in prompts)}
        rows.append(row)
        print(json.dumps(with_machine(row)), flush=True)
    eval_row = None
    if args.eval_examples:
        task = load_task("mmlu", None, cfg.get("data_dir"))
        examples = task.split("test", args.eval_examples)
        subjects = len({ex.group for ex in examples})
        conditions = [(None, None), (steerer, StaticController(0, coefficient))]
        seconds = {False: [], True: []}
        for _ in range(args.repeats):
            for cached in (False, True):
                prefix_store(lm).entries.clear()
                t0 = time.perf_counter()
                for st, ctrl in conditions:
                    run_episodes(task, lm, examples, TODAY_ROWS, st, ctrl, desc=f"eval cache={cached}",
                                 cache_prefixes=cached)
                seconds[cached].append(time.perf_counter() - t0)
        n = len(examples) * len(conditions)
        off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
        eval_row = {"eval": "mmlu", "examples": len(examples), "subjects": subjects, "conditions": len(conditions),
                    "no_cache_examples_per_s": n / off, "prefix_cache_examples_per_s": n / on, "ratio": off / on,
                    "store_mb": prefix_store(lm).bytes / 2**20}
        print(json.dumps(with_machine(eval_row)), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("| task | G x prompts | new tokens | prompt tokens | today eps/s (8 rows, full prompts) | "
          "full prompts, same rows | shared prefix | vs today | same rows |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = f"full@{r['episodes']}_episodes_per_s"
        print(f"| {r['task']} | {r['group_size']} x {r['prompts']} | {r['new_tokens']} | "
              f"{r['prompt_tokens_mean']:.0f} | {r['today_episodes_per_s']:.2f} | {r[same]:.2f} | "
              f"{r['shared_episodes_per_s']:.2f} | {r['ratio_vs_today']:.2f}x | {r['ratio_same_rows']:.2f}x |")
    if eval_row:
        print(f"MMLU held-out eval: {eval_row['examples']} examples ({eval_row['subjects']} subjects) x "
              f"{eval_row['conditions']} conditions: {eval_row['no_cache_examples_per_s']:.2f} -> "
              f"{eval_row['prefix_cache_examples_per_s']:.2f} examples/s ({eval_row['ratio']:.2f}x)")
    print(f"peak RSS {peak:.2f} GB")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"training": rows, "eval": eval_row, "peak_rss_gb": peak}, fh, indent=1)


if __name__ == "__main__":
    main()
