"""Training episodes per second: shared-prefix group rollouts vs the full-prompt path (one run, ratios).

Usage: .venv/bin/python benchmarks/group_rollouts.py [--prompts 2] [--repeats 2] [--out FILE.json]

For each task, the same training prompts, each sampled G times (MMLU and BBQ: G=16, one generated token;
GSM8K: G=8, 128 new tokens), are rolled out with the CRL policy (sampling, critic, SAE activation, recording,
residual edit) twice per repeat, alternating: once prefilling every row's whole prompt (the path before group
rollouts) and once with ``share_prefix=True`` (one unsteered prefill of ``prompt[:-1]`` per distinct prompt,
its KV cache copied to the G rows). Reported: episodes per second of each path and their ratio (median over
repeats), plus the agreement of the two paths' first-step greedy actions as a sanity check.
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
from crl_exp.episodes import render_prompt, rollout_batch
from crl_exp.paths import CONFIG_DIR
from crl_exp.runtime import load_model_and_sae
from crl_exp.steering.factory import steering_directions
from crl_exp.steering.hook import ResidualSteerer
from crl_exp.tasks import build_task

PLAN = [("mmlu", 16, None), ("bbq", 16, None), ("gsm8k", 8, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=2, help="distinct training prompts per task")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=[t for t, _, _ in PLAN])
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["mode=train", *args.overrides])
    lm, sae = load_model_and_sae(cfg)
    steerer = ResidualSteerer(lm.model, sae.layer, steering_directions(cfg.steering, sae))
    torch.manual_seed(0)
    policy = ActorCritic(lm.d_model, sae.d_sae, int(cfg.policy.hidden))
    rows = []
    for name, group, new_tokens in PLAN:
        if name not in args.tasks:
            continue
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            tcfg = compose("config", overrides=[f"task={name}"]).task
        if new_tokens:
            with open_dict(tcfg):
                tcfg.max_new_tokens = new_tokens
                tcfg.stop_strings = []  # every episode generates the full length in both paths
        task = build_task(tcfg, cfg.get("data_dir"))
        prompts = task.split("train", args.prompts)
        batch = [ex for ex in prompts for _ in range(group)]
        seconds = {False: [], True: []}
        agree = []
        for rep in range(args.repeats):
            firsts = {}
            for share in (False, True):
                controller = PolicyController(policy, float(cfg.steering.coefficient), seed=rep, sae=sae.sae)
                t0 = time.perf_counter()
                for start in range(0, len(batch), group):  # one training batch = one prompt's group
                    rollout_batch(task, lm, batch[start:start + group], steerer, controller, share_prefix=share)
                seconds[share].append(time.perf_counter() - t0)
                firsts[share] = controller.steps[0].feature
            agree.append(float((firsts[False] == firsts[True]).float().mean()))
        full, shared = statistics.median(seconds[False]), statistics.median(seconds[True])
        row = {"task": name, "group_size": group, "new_tokens": task.max_new_tokens, "episodes": len(batch),
               "full_prompt_episodes_per_s": len(batch) / full, "shared_prefix_episodes_per_s": len(batch) / shared,
               "ratio": full / shared, "first_step_sampled_action_agreement": statistics.mean(agree),
               "prompt_tokens_mean": statistics.mean(len(lm.tokenizer(render_prompt(task, lm, ex)).input_ids)
                                                     for ex in prompts)}
        rows.append(row)
        print(json.dumps(row))
    rows.append({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
    print("| task | G | new tokens | prompt tokens | full-prompt episodes/s | shared-prefix episodes/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows[:-1]:
        print(f"| {r['task']} | {r['group_size']} | {r['new_tokens']} | {r['prompt_tokens_mean']:.0f} | "
              f"{r['full_prompt_episodes_per_s']:.2f} | {r['shared_prefix_episodes_per_s']:.2f} | {r['ratio']:.2f}x |")
    print(f"peak RSS {rows[-1]['peak_rss_gb']:.2f} GB")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
