"""GPU check at real shapes with random weights (nothing downloaded): steered vs plain generation and PPO updates.

Weights do not change speed, so a model built from the real architecture's config with random weights (Gemma 3
270M in fp32 and bf16; Gemma-2 2B and Gemma 3 1B in bf16) and a random SAE of the real width (16k) time like the
real ones. For each model: plain and steered ``generate`` throughput at ``budget=paper`` shapes (64 rows, 128 new
tokens), a few PPO iterations of the real ``CRLModule`` update on those rollouts, and peak GPU memory. Writes one
JSON summary. ``--smoke`` runs tiny shapes on the CPU (to check the script itself, not to time anything).

Usage: python benchmarks/gpu_throughput.py --out benchmarks/results/gpu_check.json [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from crl_exp.models.hardware import machine_capability

GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   max_position_embeddings=32768)
GEMMA3_1B = dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                 max_position_embeddings=32768)
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
                 max_position_embeddings=8192)
MODELS = {"gemma3_270m_fp32": ("gemma3", GEMMA3_270M, torch.float32), "gemma3_270m_bf16": ("gemma3", GEMMA3_270M, torch.bfloat16),
          "gemma3_1b_bf16": ("gemma3", GEMMA3_1B, torch.bfloat16), "gemma2_2b_bf16": ("gemma2", GEMMA2_2B, torch.bfloat16)}


def build(kind: str, shape: dict, dtype: torch.dtype, device: str, smoke: bool):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    shape = dict(shape)
    if smoke:
        shape.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, sliding_window=16)
    if kind == "gemma3":
        n = shape["num_hidden_layers"]
        cfg = Gemma3TextConfig(**shape, layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                      for i in range(n)], pad_token_id=0, eos_token_id=1,
                               bos_token_id=2)
        model = Gemma3ForCausalLM(cfg)
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    return model.to(device, dtype).eval().requires_grad_(False)


def main(argv: list[str]) -> None:
    from crl_exp.crl.masking import MaskingConfig
    from crl_exp.crl.module import CRLModule
    from crl_exp.crl.policy import PolicyConfig
    from crl_exp.crl.ppo import Batch, PPOConfig, ppo_update
    from crl_exp.steering.directions import SteeringDirections
    from crl_exp.steering.hook import ResidualSteerer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--ppo-iterations", type=int, default=3)
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    rows, new, prompt_len = ((4, 4, 8) if args.smoke else (args.rows, args.new_tokens, args.prompt_tokens))
    d_sae = 64 if args.smoke else 16384
    summary = {"machine": machine_capability(), "device": device, "rows": rows, "new_tokens": new,
               "prompt_tokens": prompt_len, "d_sae": d_sae, "models": {}}
    for name, (kind, shape, dtype) in MODELS.items():
        torch.manual_seed(0)
        model = build(kind, shape, dtype, device, args.smoke)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        d_model = model.config.hidden_size
        layer = model.config.num_hidden_layers // 2
        steerer = ResidualSteerer(model, layer, SteeringDirections.from_decoder(torch.randn(d_sae, d_model)),
                                  coefficient=1.0)
        module = CRLModule(d_model, d_sae, PolicyConfig(), PPOConfig(), MaskingConfig(), args.ppo_iterations).to(device)
        ids = torch.randint(3, model.config.vocab_size, (rows, prompt_len), device=device)
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        def timed(fn):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out, time.perf_counter() - t0

        with torch.inference_mode():
            model.generate(ids[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up (kernels, caches)
            _, plain_s = timed(lambda m=model, i=ids, k=kwargs: m.generate(i, **k))
        controller = module.controller(greedy=False, with_mask=True)
        with torch.inference_mode(), steerer.attached(controller):
            _, steered_s = timed(lambda m=model, i=ids, k=kwargs: m.generate(i, **k))
        traj = controller.stacked()
        valid = torch.ones(traj["feature"].shape, dtype=torch.bool)
        optimizer = torch.optim.Adam(module.policy.parameters(), lr=3e-3)
        batch = Batch.from_rollout(traj, valid, torch.rand(rows), 1.0, 0.95, advantage="gae")

        def updates(module=module, optimizer=optimizer, batch=batch):
            for it in range(args.ppo_iterations):
                ppo_update(module.policy, optimizer, PPOConfig(), it, batch, module.allowed_actions(),
                           torch.Generator().manual_seed(it))

        _, update_s = timed(updates)
        tokens = rows * new
        summary["models"][name] = {
            "dtype": str(dtype).removeprefix("torch."), "plain_tokens_per_s": tokens / plain_s,
            "steered_tokens_per_s": tokens / steered_s, "steered_over_plain_time": steered_s / plain_s,
            "episodes_per_s_steered": rows / steered_s,
            "ppo_update_over_rollout": update_s / args.ppo_iterations / steered_s,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
        print(name, json.dumps(summary["models"][name]), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
