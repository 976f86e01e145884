"""Greedy decoding's output head: screened in bf16, settled in fp32.

Greedy decoding reads only the argmax of each step's logits, yet on a CPU the fp32 262k x 640 head of Gemma 3 270M
is a large share of a decoding step (docs/performance.md). ``ScreenedGreedyHead``
computes the head in bf16, bounds the rounding error of every bf16 logit rigorously, and recomputes in fp32 every
token that could still be the maximum; the other entries keep their bf16 values, which the bound places below the
fp32 maximum. How many tokens that is varies widely (a handful per row on reasoning text, thousands on rows that
decode padding); so the candidates are settled by one fp32 matmul
over the union of their columns, not by gathering one weight row per (row, token) pair. So the argmax is the fp32
head's (up to fp32 summation order, as between any two batch sizes), but the logits are *not* the fp32 logits: only argmax
consumers may read them. ``generate`` uses it only for plain greedy decoding (no scored first-step logits, no
logit processors) and never for teacher-forced scores.

The bound, for bf16 rounding with unit roundoff u = 2^-8 of the weight row w and the hidden state h, fp32
accumulation over d terms and a bf16 output: |l~ - l| <= e = (3u + 3u^2 + d 2^-23) max_j ||w_j|| ||h||. A row's
candidates are every token whose bf16 logit is within 2e of the row's bf16 maximum: the true maximum is among
them, and every other token's bf16 value is below every candidate's exact value that could win. (A bound per
weight row, ||w_j|| instead of the largest, settles nearly as many tokens on Gemma 3, 3,901 vs 3,934 per row on
XSTest, and costs three more [rows, vocab] passes per step.)
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

BF16_UNIT_ROUNDOFF = 2.0 ** -8

# generation-config fields that make ``generate`` edit logits before its argmax (a screened head's non-candidate
# entries are bounds, not logits, so any such edit could pick a token the fp32 head would not)
_LOGIT_EDITING_FIELDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                         "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                         "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
                         "min_new_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
                         "renormalize_logits": False, "diversity_penalty": 0.0}


class ScreenedGreedyHead(nn.Module):
    """Drop-in for a bias-free fp32 ``nn.Linear`` head whose outputs feed an argmax only (see module doc)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        if head.bias is not None or head.weight.dtype != torch.float32:
            raise ValueError("ScreenedGreedyHead needs a bias-free fp32 linear head")
        self.head = head
        weight = head.weight.detach()
        self.weight_bf16 = weight.to(torch.bfloat16)
        u, d = BF16_UNIT_ROUNDOFF, head.in_features
        self.bound_per_norm = (3 * u + 3 * u * u + d * 2.0 ** -23) * float(weight.norm(dim=1).max())
        self.calls = self.rows = self.candidates = 0  # screening statistics (candidates recomputed in fp32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype != torch.float32:
            return self.head(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = F.linear(flat.to(torch.bfloat16), self.weight_bf16.to(flat.device)).float()
        bound = self.bound_per_norm * flat.norm(dim=-1)
        rows, cols = (logits >= (logits.max(-1).values - 2 * bound)[:, None]).nonzero(as_tuple=True)
        columns, at = torch.unique(cols, return_inverse=True)
        logits[rows, cols] = F.linear(flat, self.head.weight[columns])[rows, at]
        self.calls, self.rows, self.candidates = self.calls + 1, self.rows + len(flat), self.candidates + len(rows)
        return logits.view(*hidden.shape[:-1], -1)


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _head_attribute(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, child in model.named_children() if child is head), None)


def screenable(model: nn.Module) -> bool:
    """Whether greedy decoding of ``model`` may use a screened head: a bias-free fp32 linear head that is a direct
    child of the model, and a generation config that edits no logits."""
    name = _head_attribute(model)
    head = getattr(model, name) if name else None
    if isinstance(head, ScreenedGreedyHead):
        return True
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
        return False
    config = getattr(model, "generation_config", None)
    return all(getattr(config, key, default) in (default, None) for key, default in _LOGIT_EDITING_FIELDS.items())


@contextmanager
def screened_greedy_head(model: nn.Module, enabled: bool = True):
    """Swap ``model``'s output head for its ``ScreenedGreedyHead`` (built once per model) inside the block; a
    no-op when disabled or when ``screenable`` says no. Yields the screened head or ``None``."""
    if not enabled or not screenable(model):
        yield None
        return
    name = _head_attribute(model)
    original = getattr(model, name)
    if isinstance(original, ScreenedGreedyHead):  # nested use: already swapped
        yield original
        return
    if model not in _HEADS or _HEADS[model].head is not original:
        _HEADS[model] = ScreenedGreedyHead(original)
    screened = _HEADS[model]
    setattr(model, name, screened)
    try:
        yield screened
    finally:
        setattr(model, name, original)
