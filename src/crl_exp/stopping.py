"""Where a generation ends: stop strings, end tokens, and the valid (generated, not padding) steps of a batch.

Shared by ``generation.generate`` (stopping criteria) and the reference-likelihood reward (where a completion's
answer was cut), so it sits below both.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class StopOnStrings(StoppingCriteria):
    """Ends a row once its generated text contains a stop string.

    Replaces ``generate(stop_strings=...)``, whose ``StopStringCriteria`` pre-processes the whole vocabulary on
    every call (seconds with Gemma's 262k tokens: docs/performance.md); this only decodes each row's last few
    tokens per step.
    """

    def __init__(self, tokenizer, stop_strings: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stop_strings), prompt_length
        self.window = max(len(s) for s in self.stops) + 2  # tokens: each holds at least one character
        self.stopped_at: dict[int, int] = {}  # row -> index of the generated token that completed a stop string

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:][:, -self.window:],
                                            skip_special_tokens=True)
        done = [any(s in t for s in self.stops) for t in tails]
        step = input_ids.shape[1] - self.prompt_length - 1
        for row, hit in enumerate(done):
            if hit:
                self.stopped_at.setdefault(row, step)
        return torch.tensor(done, device=input_ids.device)


def stop_criteria(tokenizer, stop_strings: list[str] | None, prompt_length: int) -> dict:
    """``generate`` kwargs for stop strings (empty when there are none)."""
    if not stop_strings:
        return {}
    return {"stopping_criteria": StoppingCriteriaList([StopOnStrings(tokenizer, stop_strings, prompt_length)])}


def stop_steps(kwargs: dict) -> dict[int, int]:
    """Row -> step at which a stop string ended it, read back from ``stop_criteria``'s criterion after generate."""
    criteria = kwargs.get("stopping_criteria") or []
    return next((c.stopped_at for c in criteria if isinstance(c, StopOnStrings)), {})


def end_token_ids(tokenizer, model) -> set[int]:
    """Token ids that end a row: pad, the tokenizer's EOS and the generation config's EOS id(s)."""
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return {i for i in ids if i is not None}


def valid_steps(new_tokens: torch.Tensor, end_ids: set[int], stopped_at: dict[int, int] | None = None) -> torch.Tensor:
    """Bool [B, T]: the steps of each row's episode.

    A row's episode ends with the step that emitted an end token (EOS) or completed a stop string: that step's
    action still chose the ending, so it is valid; every later step (pads forced by ``generate``) is not.
    """
    is_end = torch.zeros_like(new_tokens, dtype=torch.bool)
    for tok in end_ids:
        is_end |= new_tokens == tok
    for row, step in (stopped_at or {}).items():
        if step < new_tokens.shape[1]:
            is_end[row, step] = True
    ended_before = torch.cumsum(is_end.long(), dim=1) - is_end.long() > 0
    return ~ended_before


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
