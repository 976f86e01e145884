"""Does the shared-prefix / prefix-cache path decode like the full-prompt path on the real model, in its dtype?

Usage: .venv/bin/python benchmarks/prefix_path_agreement.py [--prompts 16] [--new-tokens 32] [--out FILE.json]

For MMLU (5-shot) and GSM8K (4-shot) training prompts, steered with a fixed SAE feature at every token:
- next-token logits at the last prompt token: full-prompt prefill vs the cached path (few-shot prefix from the
  ``PrefixStore``, the prompt's tail prefilled from it, the last token steered): max |difference|;
- greedy tokens of a batched ``generate`` of ``--new-tokens`` tokens, both paths, same rows: share of tokens that
  agree (position by position, up to the first disagreement of each row, which then counts the rest as not
  agreeing) and the share of rows whose whole continuation is identical.
"""

from __future__ import annotations

import argparse
import json

import torch
from greedy_head import agreement  # benchmarks/ is the script's folder, so on sys.path
from hydra import compose, initialize_config_dir

from crl_exp.episodes import prompt_prefix, render_prompt
from crl_exp.generation import generate
from crl_exp.kv_cache import prompt_prefix_cache
from crl_exp.models.hardware import with_machine
from crl_exp.paths import CONFIG_DIR
from crl_exp.runtime import load_model_and_sae
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.factory import steering_directions
from crl_exp.steering.hook import ResidualSteerer
from crl_exp.tasks import build_task


@torch.inference_mode()
def last_logits(lm, steerer, controller, prompts, prefixes):
    """Logits at the last prompt token, steered, for each prompt alone (batch 1): full vs cached path."""
    diffs = []
    for prompt, prefix in zip(prompts, prefixes, strict=True):
        enc = lm.tokenizer([prompt], return_tensors="pt")
        with steerer.attached(controller):
            full = lm.model(**enc).logits[0, -1]
        cache = prompt_prefix_cache(lm, [prompt], enc.input_ids, enc.attention_mask, [prefix])
        with steerer.attached(controller):
            cached = lm.model(input_ids=enc.input_ids[:, -1:], cache=cache, use_cache=True).logits[0, -1]
        diffs.append((full.float() - cached.float()).abs().max().item())
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--feature", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["mode=train"])
    lm, sae = load_model_and_sae(cfg)
    steerer = ResidualSteerer(lm.model, sae.layer, steering_directions(cfg.steering, sae))
    controller = StaticController(args.feature, float(cfg.steering.coefficient))
    rows = []
    for name in ("mmlu", "gsm8k"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            task = build_task(compose("config", overrides=[f"task={name}"]).task, cfg.get("data_dir"))
        examples = task.split("train", args.prompts)
        prompts = [render_prompt(task, lm, ex) for ex in examples]
        prefixes = [prompt_prefix(task, ex, p) for ex, p in zip(examples, prompts, strict=True)]
        diffs = last_logits(lm, steerer, controller, prompts, prefixes)
        full = generate(lm, prompts, args.new_tokens, steerer, controller, min_new_tokens=args.new_tokens)
        cached = generate(lm, prompts, args.new_tokens, steerer, controller, min_new_tokens=args.new_tokens,
                          prefixes=prefixes)
        token_agreement, identical = agreement(full.new_tokens.tolist(), cached.new_tokens.tolist())
        row = {"task": name, "dtype": str(next(lm.model.parameters()).dtype), "prompts": len(prompts),
               "new_tokens": args.new_tokens, "max_abs_logit_diff": max(diffs),
               "mean_max_abs_logit_diff": sum(diffs) / len(diffs),
               "greedy_token_agreement": token_agreement, "identical_rows": identical}
        rows.append(row)
        print(json.dumps(with_machine(row)), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
