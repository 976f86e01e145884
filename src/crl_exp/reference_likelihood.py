"""The reference-likelihood reward of generating tasks: the log-probability of the reference answer after the
policy's own steered reasoning (a dense signal where exact match is sparse; GSM8K's ``task.reward``).

One batched forward over each row's prompt cache (``kv_cache.prompt_prefix_cache``), the generated tokens kept up
to the answer marker, and the reference answer, with the steering edits the rollout recorded replayed at their
positions.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from crl_exp.kv_cache import prompt_prefix_cache
from crl_exp.models import LoadedModel
from crl_exp.steering.hook import NO_FEATURE
from crl_exp.stopping import cut_at_stop_strings, end_token_ids


def kept_length(tokenizer, tokens: list[int], text: str) -> int:
    """How many leading ``tokens`` decode to no more than ``text`` (a completion cut at a stop string / marker)."""
    k = 0
    while k < len(tokens) and text.startswith(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)):
        k += 1
    return k


def reference_inputs(lm: LoadedModel, new: torch.Tensor, texts: list[str], references: list[str],
                     marker: str | None) -> tuple[list[int], list[list[int]]]:
    """Per row: how many generated tokens the reasoning keeps (up to EOS, the stop string and ``marker``), and
    the reference's token ids, on a line of its own."""
    kept_texts = [cut_at_stop_strings(t, [marker]) if marker else t for t in texts]
    ends = end_token_ids(lm.tokenizer, lm.model)
    kept = []
    for row, text in zip(new.tolist(), kept_texts, strict=True):
        content = row[: next((j for j, t in enumerate(row) if t in ends), len(row))]  # up to EOS/pad
        kept.append(kept_length(lm.tokenizer, content, text))
    ref_ids = [lm.tokenizer(("" if text.endswith("\n") else "\n") + ref, add_special_tokens=False).input_ids
               for text, ref in zip(kept_texts, references, strict=True)]
    return kept, ref_ids


def recorded_edits(steps: list, kept: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """[B, width] features / coefficients of the edits an episode made at feed positions t < kept[b] (position t:
    the token fed at decoding step t), from a steerer's ``steps``; ``None`` when nothing was steered."""
    if not steps:
        return None
    first = steps[0].features
    b = first.shape[0]
    features = torch.full((b, width, *first.shape[1:]), NO_FEATURE, dtype=torch.long)
    coefficients = torch.zeros((b, width))
    for t, step in enumerate(steps[:width]):
        rows = torch.tensor([t < k for k in kept])
        features[rows, t] = step.features.cpu()[rows]
        coefficients[rows, t] = step.coefficients.float().cpu()[rows]
    return features, coefficients


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on selected hidden states (with the model's final logit soft-capping, if any)."""
    logits = model.get_output_embeddings()(hidden)
    config = getattr(model.config, "text_config", model.config)
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.inference_mode()
def reference_likelihood(lm: LoadedModel, prompts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         new_tokens: torch.Tensor, kept: list[int], references: list[list[int]], steerer=None,
                         prefixes: list[str | None] | None = None, add_special_tokens: bool = True) -> torch.Tensor:
    """[B] exp(mean log-prob) of each row's ``references`` token ids right after its first ``kept[i]`` generated
    tokens, teacher-forced (VeriFree's verifier-free reward).

    One batched forward over a fresh cache of every row's prompt but its last token (``prompt_prefix_cache``:
    left-padded, few-shot prefixes from the store), feeding per row, right-padded: the last prompt token and the
    kept tokens (the edits the episode made at those steps replayed from ``steerer.steps``), then the reference,
    unsteered. A row's tokens are contiguous and its padding lies outside them, so its reward does not depend on
    the other rows of its batch (Gemma's sliding-window layers count physical columns: reading a short row after
    a long row's cache would push its prompt out of the window).
    """
    B, W = input_ids.shape
    cache = prompt_prefix_cache(lm, prompts, input_ids, attention_mask, prefixes, add_special_tokens) if W >= 2 else None
    feeds, starts = [], []
    for i in range(B):
        k = kept[i]
        feeds.append([int(input_ids[i, -1]), *[int(t) for t in new_tokens[i, :k]], *references[i]])
        starts.append(int(attention_mask[i].sum()) - 1)
    width = max(len(f) for f in feeds)
    ids = input_ids.new_full((B, width), lm.tokenizer.pad_token_id)
    feed_mask = torch.zeros_like(ids)
    for i, f in enumerate(feeds):
        ids[i, : len(f)] = torch.tensor(f)
        feed_mask[i, : len(f)] = 1
    positions = torch.tensor(starts, device=ids.device)[:, None] + torch.arange(width, device=ids.device)
    mask = torch.cat([attention_mask[:, :-1], feed_mask], 1) if cache is not None else feed_mask
    edits = recorded_edits(steerer.steps if steerer is not None else [], kept, width)
    body = lm.model.get_decoder()
    replay = steerer.replaying(*edits) if edits is not None else nullcontext()
    with replay:
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=cache is not None).last_hidden_state
    scores = []
    for i, ref in enumerate(references):
        if not ref:
            scores.append(torch.tensor(float("nan")))
            continue
        at = kept[i] + torch.arange(len(ref), device=ids.device)  # the positions that predict the reference
        logprobs = head_logits(lm.model, hidden[i, at]).float().log_softmax(-1)
        target = torch.tensor(ref, device=ids.device)
        scores.append(logprobs[torch.arange(len(ref), device=ids.device), target].mean().exp())
    return torch.stack(scores).cpu()
