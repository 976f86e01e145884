"""Screened greedy head vs the plain fp32 head on the real model: decoding speed and greedy-token agreement.

Usage: .venv/bin/python benchmarks/greedy_head.py [--prompts 32] [--max-new-tokens N] [--repeats 1] [--out FILE.json]

GSM8K 4-shot training prompts (prefix-cached, the task's stop strings and its >= 128-token cap, as in a rollout),
steered with a fixed SAE feature at every token, decoded in one batch twice per repeat: once with the fp32 head
(``screened_greedy_head=False``), once with the bf16-screened head (``models/greedy_head.py``). Reports the
decoding seconds of each (the ratio is measured in this one process, alternating the two), the share of greedy
tokens that agree (position by position up to each row's first disagreement), identical rows, and how many
tokens per row the screen had to settle in fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from crl_exp.episodes import prompt_prefix, render_prompt
from crl_exp.generation import generate
from crl_exp.models.greedy_head import screened_greedy_head
from crl_exp.paths import CONFIG_DIR
from crl_exp.runtime import load_model_and_sae
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.factory import steering_directions
from crl_exp.steering.hook import ResidualSteerer
from crl_exp.tasks import build_task


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """Share of tokens that agree position by position up to each row's first disagreement (the rest of that
    row counts as not agreeing), and the share of identical rows."""
    agree = same = total = 0
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (s, t) in enumerate(zip(x, y, strict=True)) if s != t), len(x))
        agree, same, total = agree + n, same + (n == len(x)), total + len(x)
    return agree / total, same / len(a)


def steered_gsm8k(feature: int, n_prompts: int, group: int = 1):
    """The real model and SAE of ``+experiment=gsm8k_layer12``, a steerer with a fixed-feature controller, and
    ``n_prompts`` 4-shot training prompts (each ``group`` times in a row) with their few-shot prefixes."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=gsm8k_layer12"])
    lm, sae = load_model_and_sae(cfg)
    task = build_task(cfg.task, cfg.get("data_dir"))
    steerer = ResidualSteerer(lm.model, sae.layer, steering_directions(cfg.steering, sae))
    controller = StaticController(feature, float(cfg.steering.coefficient))
    examples = [ex for ex in task.split("train", n_prompts) for _ in range(group)]
    prompts = [render_prompt(task, lm, ex) for ex in examples]
    prefixes = [prompt_prefix(task, ex, p) for ex, p in zip(examples, prompts, strict=True)]
    return lm, task, steerer, controller, prompts, prefixes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (160)")
    ap.add_argument("--feature", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm, task, steerer, controller, prompts, prefixes = steered_gsm8k(args.feature, args.prompts)

    def decode(screen: bool):
        lm.screened_greedy_head = screen
        return generate(lm, prompts, args.max_new_tokens or task.max_new_tokens, steerer, controller, stop_strings=task.stop_strings,
                        prefixes=prefixes)

    decode(True)  # warm-up: the prefix store, the bf16 weight copy
    seconds = {"fp32": 0.0, "screened": 0.0}
    with screened_greedy_head(lm.model) as head:  # the same cached head object generate() will use: its counters
        rows0, cand0 = head.rows, head.candidates
    for _ in range(args.repeats):
        plain, screened = decode(False), decode(True)
        seconds["fp32"] += plain.seconds
        seconds["screened"] += screened.seconds
    token_agreement, identical = agreement(plain.new_tokens.tolist(), screened.new_tokens.tolist())
    row = {"task": "gsm8k", "prompts": len(prompts), "max_new_tokens": args.max_new_tokens or task.max_new_tokens,
           "generated_steps": int(plain.new_tokens.shape[1]), "repeats": args.repeats,
           "fp32_head_seconds": seconds["fp32"], "screened_head_seconds": seconds["screened"],
           "speedup": seconds["fp32"] / seconds["screened"], "greedy_token_agreement": token_agreement,
           "identical_rows": identical,
           "settled_tokens_per_row": (head.candidates - cand0) / max(1, head.rows - rows0)}
    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
