"""Batched, left-padded, KV-cached greedy generation, optionally under a steering hook."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from crl_exp.models import LoadedModel
from crl_exp.steering.hook import Controller, ResidualSteerer


@dataclass
class Generation:
    prompts: list[str]
    completions: list[str]
    new_tokens: torch.Tensor  # [B, T_new] (pad after EOS)
    seconds: float

    @property
    def n_generated(self) -> int:
        return int(self.new_tokens.numel())


@torch.inference_mode()
def generate(lm: LoadedModel, prompts: list[str], max_new_tokens: int, steerer: ResidualSteerer | None = None,
             controller: Controller | None = None, add_special_tokens: bool = True) -> Generation:
    """Greedy-decode ``prompts`` in one batch; with ``steerer`` every forward step is steered by ``controller``."""
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(lm.device)
    ctx = steerer.attached(controller) if steerer is not None else nullcontext()
    t0 = time.perf_counter()
    with ctx:
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    seconds = time.perf_counter() - t0
    new = out[:, enc.input_ids.shape[1]:].cpu()
    return Generation(prompts, lm.tokenizer.batch_decode(new, skip_special_tokens=True), new, seconds)
