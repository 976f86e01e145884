"""Screened greedy head vs the plain fp32 head on the real model: decoding speed and greedy-token agreement.

Usage: .venv/bin/python benchmarks/greedy_head.py [--experiment gsm8k_layer12] [--prompts 32] [--group 1]
       [--max-new-tokens N] [--repeats 1] [--out FILE.json]

Training prompts of ``+experiment=<experiment>`` (GSM8K: 4-shot, prefix-cached, >= 128 tokens; XSTest: short
chat turns, 48 tokens, most rows finishing early), each ``--group`` times (one shared prefill per prompt, as in a
rollout), steered with a fixed SAE feature at every token, decoded in one batch three times per repeat: with the
fp32 head (``screened_greedy_head=False``), with the bf16-screened head (``models/greedy_head.py``), and with the
screen as it was before its candidates were settled by one matmul (``GatherSettledHead``, below). Reports each
arm's decoding seconds (ratios measured in this one process, arms alternating), the share of greedy tokens that
agree with fp32's (position by position up to each row's first disagreement), identical rows, and how many
tokens per row each screen had to settle in fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from crl_exp.episodes import prompt_prefix, render_prompt
from crl_exp.generation import generate
from crl_exp.models.greedy_head import _HEADS, ScreenedGreedyHead, screened_greedy_head
from crl_exp.models.hardware import with_machine
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


def steered_setup(feature: int, n_prompts: int, group: int = 1, experiment: str = "gsm8k_layer12",
                  overrides: tuple[str, ...] = ()):
    """The real model and SAE of ``+experiment=<experiment>`` (plus Hydra ``overrides``), a steerer with a
    fixed-feature controller, and ``n_prompts`` training prompts (each ``group`` times in a row) with their
    few-shot prefixes (if any)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}", *overrides])
    lm, sae = load_model_and_sae(cfg)
    task = build_task(cfg.task, cfg.get("data_dir"))
    steerer = ResidualSteerer(lm.model, sae.layer, steering_directions(cfg.steering, sae))
    controller = StaticController(feature, float(cfg.steering.coefficient))
    examples = [ex for ex in task.split("train", n_prompts) for _ in range(group)]
    prompts = [render_prompt(task, lm, ex) for ex in examples]
    prefixes = [prompt_prefix(task, ex, p) for ex, p in zip(examples, prompts, strict=True)]
    return lm, task, steerer, controller, prompts, prefixes


class GatherSettledHead(ScreenedGreedyHead):
    """The screen as it was before 2026-11-27 (the reference arm): each candidate settled by gathering its own
    weight row (memory-bound when candidates number thousands per row)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = F.linear(flat.to(torch.bfloat16), self.weight_bf16).float()
        bound = self.bound_per_norm * flat.norm(dim=-1)
        rows, cols = (logits >= (logits.max(-1).values - 2 * bound)[:, None]).nonzero(as_tuple=True)
        logits[rows, cols] = (self.head.weight[cols] * flat[rows]).sum(-1)
        self.calls, self.rows, self.candidates = self.calls + 1, self.rows + len(flat), self.candidates + len(rows)
        return logits.view(*hidden.shape[:-1], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="gsm8k_layer12", help="gsm8k_layer12 or xstest_layer12 (its shape)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=1, help="rows per prompt (a training rollout: 8)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    ap.add_argument("--feature", type=int, default=0, help="the steered SAE feature; -1: no steering")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm, task, steerer, controller, prompts, prefixes = steered_setup(max(args.feature, 0), args.prompts, args.group,
                                                                     args.experiment)
    steps = args.max_new_tokens or task.max_new_tokens
    with screened_greedy_head(lm.model) as head:  # the cached head object generate() will use
        gather = GatherSettledHead(head.head)
    arms = {"fp32": None, "screened": head, "screened_gather": gather}

    def decode(arm: str):
        lm.screened_greedy_head = arm != "fp32"
        if arm == "screened_gather":
            _HEADS[lm.model] = gather
        try:
            return generate(lm, prompts, steps, steerer if args.feature >= 0 else None, controller, stop_strings=task.stop_strings,
                            prefixes=prefixes if any(prefixes) else None, share_prefix=args.group > 1)
        finally:
            _HEADS[lm.model] = head

    decode("screened")  # warm-up: the prefix store, the bf16 weight copy
    seconds = dict.fromkeys(arms, 0.0)
    counts = {a: (h.rows, h.candidates) for a, h in arms.items() if h is not None}
    gens = {}
    for _ in range(args.repeats):
        for arm in arms:
            gens[arm] = decode(arm)
            seconds[arm] += gens[arm].seconds
    row = {"experiment": args.experiment, "feature": args.feature, "rows": len(prompts), "distinct_prompts": args.prompts,
           "max_new_tokens": steps, "generated_steps": int(gens["fp32"].new_tokens.shape[1]),
           "repeats": args.repeats, **{f"{a}_seconds": v for a, v in seconds.items()},
           "speedup_vs_fp32": seconds["fp32"] / seconds["screened"],
           "speedup_vs_gather": seconds["screened_gather"] / seconds["screened"]}
    for arm in ("screened", "screened_gather"):
        agree, identical = agreement(gens["fp32"].new_tokens.tolist(), gens[arm].new_tokens.tolist())
        rows0, cand0 = counts[arm]
        row.update({f"{arm}_token_agreement": agree, f"{arm}_identical_rows": identical,
                    f"{arm}_settled_tokens_per_row": (arms[arm].candidates - cand0) / max(1, arms[arm].rows - rows0)})
    print(json.dumps(with_machine(row)), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(with_machine(row), indent=1))


if __name__ == "__main__":
    main()
