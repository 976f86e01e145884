"""Steered-rollout throughput vs plain ``generate``, and PPO update time vs rollout time (one run, ratios).

Usage: .venv/bin/python benchmarks/rollout_throughput.py [--batch-sizes 8 32] [--new-tokens 32] [--repeats 3]

Same model (embedded Gemma 3 270M), same prompts (GSM8K train questions), same batch size and generated length
(``min_new_tokens = max_new_tokens``) for both. The steered rollout includes everything a CRL rollout does per
token: policy and critic forward, sampling, the chosen feature's SAE activation, recording, and the residual
edit. Plain and steered runs alternate and the median of ``--repeats`` is reported, so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.ppo import Batch, PPOConfig, ppo_update
from crl_exp.crl.rollout import PolicyController
from crl_exp.generation import generate
from crl_exp.models.hardware import with_machine
from crl_exp.paths import CONFIG_DIR, default_data_dir
from crl_exp.runtime import load_model_and_sae
from crl_exp.steering.factory import steering_directions
from crl_exp.steering.hook import ResidualSteerer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="hydra overrides (model=..., sae.layer=...)")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["mode=train", *args.overrides])
    torch.manual_seed(0)
    lm, sae = load_model_and_sae(cfg)
    steerer = ResidualSteerer(lm.model, sae.layer, steering_directions(cfg.steering, sae))
    policy = ActorCritic(lm.d_model, sae.d_sae, int(cfg.policy.hidden))
    questions = [json.loads(line)["question"] for line in (default_data_dir() / "gsm8k" / "train.jsonl").open()]
    results = []
    for bs in args.batch_sizes:
        prompts = [f"Question: {q}\nAnswer:" for q in questions[:bs]]
        generate(lm, prompts, 2)  # warm-up
        plain_tps, steered_tps, update_ratio = [], [], []
        for rep in range(args.repeats):
            plain = generate(lm, prompts, args.new_tokens, min_new_tokens=args.new_tokens)
            plain_tps.append(plain.n_generated / plain.seconds)
            ctrl = PolicyController(policy, float(cfg.steering.coefficient), seed=rep, sae=sae.sae)
            t0 = time.perf_counter()
            steered = generate(lm, prompts, args.new_tokens, steerer, ctrl, min_new_tokens=args.new_tokens)
            traj = ctrl.stacked()
            rollout_seconds = time.perf_counter() - t0
            steered_tps.append(steered.n_generated / rollout_seconds)
            valid = steered.valid
            batch = Batch.from_rollout(traj, valid, torch.rand(bs), 1.0, 0.95)
            opt = torch.optim.Adam(policy.parameters(), lr=1e-4, eps=1e-5)
            t1 = time.perf_counter()
            ppo_update(policy, opt, PPOConfig(target_kl=None), 0, batch, None, torch.Generator().manual_seed(0))
            update_ratio.append((time.perf_counter() - t1) / rollout_seconds)
        row = {"batch_size": bs, "new_tokens": args.new_tokens, "plain_tokens_per_s": statistics.median(plain_tps),
               "steered_tokens_per_s": statistics.median(steered_tps),
               "steered_over_plain": statistics.median(s / p for s, p in zip(steered_tps, plain_tps, strict=True)),
               "ppo_update_over_rollout": statistics.median(update_ratio)}
        results.append(row)
        print(json.dumps(with_machine(row)))
    print("\n| batch | new tokens | plain tok/s | steered tok/s (policy+critic+SAE) | steered/plain | PPO update/rollout |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch_size']} | {r['new_tokens']} | {r['plain_tokens_per_s']:.1f} | "
              f"{r['steered_tokens_per_s']:.1f} | {r['steered_over_plain']:.3f} | {r['ppo_update_over_rollout']:.3f} |")


if __name__ == "__main__":
    main()
