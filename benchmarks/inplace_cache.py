"""In-place KV-cache layers vs transformers' stock layers on the real model: decoding speed and token agreement.

Usage: .venv/bin/python benchmarks/inplace_cache.py [--prompts 8] [--group 8] [--max-new-tokens 64] [--out FILE.json]

A GSM8K training rollout's shape: ``--prompts`` 4-shot training prompts x ``--group`` samples each (one shared
prefill per prompt, ``share_prefix``), steered with a fixed SAE feature at every token, greedy-decoded in one
batch. The same call runs twice per repeat, alternating: once with the stock layers (``adopt_inplace_layers``
switched off for the call), once with the in-place ones (``models/inplace_cache.py``). Reports each arm's
decoding seconds, their ratio (measured in this one process) and the greedy-token agreement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from greedy_head import agreement, steered_setup

import crl_exp.kv_cache as kv_cache
from crl_exp.generation import generate
from crl_exp.models.hardware import with_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--feature", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm, _, steerer, controller, prompts, prefixes = steered_setup(args.feature, args.prompts, args.group)
    adopt = kv_cache.adopt_inplace_layers  # the caches left_padded_cache lays out adopt in-place layers

    def decode(inplace: bool):
        kv_cache.adopt_inplace_layers = adopt if inplace else (lambda cache: None)
        try:
            return generate(lm, prompts, args.max_new_tokens, steerer, controller, share_prefix=True,
                                       prefixes=prefixes)
        finally:
            kv_cache.adopt_inplace_layers = adopt

    decode(True)  # warm-up: the prefix store, the screened head's bf16 copy
    seconds = {"stock": 0.0, "inplace": 0.0}
    for _ in range(args.repeats):
        stock, inplace = decode(False), decode(True)
        seconds["stock"] += stock.seconds
        seconds["inplace"] += inplace.seconds
    token_agreement, identical = agreement(stock.new_tokens.tolist(), inplace.new_tokens.tolist())
    row = {"task": "gsm8k", "rows": len(prompts), "distinct_prompts": args.prompts,
           "prompt_tokens_max": int(max(len(lm.tokenizer(p).input_ids) for p in prompts)),
           "generated_steps": int(stock.new_tokens.shape[1]), "repeats": args.repeats,
           "stock_seconds": seconds["stock"], "inplace_seconds": seconds["inplace"],
           "speedup": seconds["stock"] / seconds["inplace"], "greedy_token_agreement": token_agreement,
           "identical_rows": identical}
    print(json.dumps(with_machine(row)), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(with_machine(row), indent=1))


if __name__ == "__main__":
    main()
