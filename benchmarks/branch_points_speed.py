"""Branch-point tracking with cached prefixes vs naive re-generation from scratch (one run, ratio).

Usage: .venv/bin/python benchmarks/branch_points_speed.py [--episodes 1] [--new-tokens 12] [--k 2] [overrides]

Same episodes, same alternatives (no steering + the policy's k next-best features at every step), same policy
(a randomly initialised actor-critic: the mechanics, not the policy, are measured), embedded Gemma 3 270M with
its layer-12 SAE on GSM8K few-shot prompts (long prefixes, where reuse matters). Also counts continuations
whose tokens differ between the two methods (expected: 0).
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from crl_exp.analysis.branch_points import Episode, track_branches
from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.rollout import PolicyController
from crl_exp.episodes import build_env, rollout_batch
from crl_exp.models.hardware import machine_capability
from crl_exp.paths import CONFIG_DIR
from crl_exp.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["mode=train", "task=gsm8k", *args.overrides])
    with open_dict(cfg):
        cfg.task.max_new_tokens = args.new_tokens
    task = build_task(cfg.task, cfg.get("data_dir"))
    env = build_env(cfg, task)
    torch.manual_seed(0)
    policy = ActorCritic(env.lm.d_model, env.sae.d_sae, int(cfg.policy.hidden))
    examples = task.split("test", args.episodes)
    ctrl = PolicyController(policy, env.coefficient, greedy=True)
    records, gen = rollout_batch(task, env.lm, examples, env.steerer, ctrl)
    traj = ctrl.stacked()
    valid = gen.valid
    timings, mismatches, n = {}, 0, 0
    results = {}
    for naive in (False, True):
        t0 = time.perf_counter()
        results[naive] = [track_branches(task, env.lm, env.steerer, policy, env.coefficient,
                                         Episode(ex, gen.new_tokens[i][valid[i]].tolist(),
                                                 traj["feature"][i][valid[i]].tolist(), bool(records[i]["correct"])),
                                         i, k_alternatives=args.k, naive=naive)
                          for i, ex in enumerate(examples)]
        timings[naive] = time.perf_counter() - t0
    for a, b in zip(results[False], results[True], strict=True):
        for ra, rb in zip(a.rows, b.rows, strict=True):
            n += 1
            mismatches += ra["tokens"] != rb["tokens"]
    prompt_tokens = len(env.lm.tokenizer(task.user_text(examples[0])).input_ids)
    print(f"episodes={len(examples)} prompt_tokens~{prompt_tokens} steps/episode={int(valid.sum(1).float().mean())} "
          f"continuations={n}")
    print(f"cached-prefix: {timings[False]:.1f}s  naive: {timings[True]:.1f}s  "
          f"speed-up naive/cached = {timings[True] / timings[False]:.2f}x  token mismatches: {mismatches}/{n}")
    print(f"machine: {machine_capability()}")


if __name__ == "__main__":
    main()
