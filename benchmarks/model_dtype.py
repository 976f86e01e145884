"""The embedded model in fp32 vs bf16 on a CPU: decoding speed of GSM8K episodes and greedy-token agreement.

Usage: .venv/bin/python benchmarks/model_dtype.py [--prompts 16] [--max-new-tokens 128] [--feature 2490] [--out F]

``+experiment=gsm8k_layer12``'s shape: ``--prompts`` 4-shot training prompts (prefix-cached), steered with a fixed
SAE feature at every token, greedy-decoded in one batch for up to ``--max-new-tokens`` tokens with the task's stop
strings, once with the model loaded in fp32 and once in bf16 (``model.dtype``; fp32 uses the screened greedy head,
bf16 its own head). Each arm is timed after a short warm-up (the few-shot prefix store, the bf16 head copy).
Reports both arms' decoding seconds, their ratio (one process, same prompts) and how far their greedy tokens
agree: bf16 is a different rounding of the same model, so rows drift apart once a near-tie falls the other way.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from greedy_head import agreement, steered_setup

from crl_exp.generation import generate
from crl_exp.models.hardware import with_machine


def decode_in(dtype: str, args) -> tuple[float, list[list[int]], list[str], list]:
    """Decoding seconds, greedy tokens and completions of the prompts with the model loaded in ``dtype``."""
    lm, task, steerer, controller, prompts, prefixes = steered_setup(
        args.feature, args.prompts, overrides=(f"model.dtype={dtype}",))
    generate(lm, prompts[:2], 4, steerer, controller, stop_strings=task.stop_strings, prefixes=prefixes[:2])
    gen = generate(lm, prompts, args.max_new_tokens, steerer, controller, stop_strings=task.stop_strings,
                   prefixes=prefixes)
    scores = task.score_batch(task.split("train", args.prompts), prompts, gen.completions)
    return gen.seconds, gen.new_tokens.tolist(), gen.completions, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--feature", type=int, default=2490, help="the steered SAE feature (default: a static choice)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    arms = {}
    for dtype in ("float32", "bfloat16"):
        arms[dtype] = decode_in(dtype, args)
        gc.collect()
    (fp32_s, fp32_tokens, _, fp32_scores), (bf16_s, bf16_tokens, _, bf16_scores) = arms["float32"], arms["bfloat16"]
    token_agreement, identical = agreement(fp32_tokens, bf16_tokens)
    row = {"experiment": "gsm8k_layer12", "rows": args.prompts, "max_new_tokens": args.max_new_tokens,
           "feature": args.feature, "float32_seconds": fp32_s, "bfloat16_seconds": bf16_s,
           "speedup": fp32_s / bf16_s, "greedy_token_agreement": token_agreement, "identical_rows": identical,
           "exact_match_rows": {"float32": sum(r["correct"] for r in fp32_scores),
                                "bfloat16": sum(r["correct"] for r in bf16_scores)}}
    print(json.dumps(with_machine(row)), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(with_machine(row), indent=1))


if __name__ == "__main__":
    main()
