"""Batched, left-padded, KV-cached greedy generation, optionally under a steering hook."""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from crl_exp.models import LoadedModel
from crl_exp.models.greedy_head import screened_greedy_head
from crl_exp.models.inplace_cache import adopt_inplace_layers
from crl_exp.steering.hook import NO_FEATURE, Controller, ResidualSteerer

# Bound on the few-shot prefix caches kept per model (``PrefixStore``). Gemma 3 270M in fp32 holds ~21 MB for a
# 1,000-token prefix (global layers keep every token, sliding layers their 512-token window), so 1 GiB holds
# all 57 MMLU subjects' 5-shot prefixes.
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30


@dataclass
class Generation:
    prompts: list[str]
    completions: list[str]
    new_tokens: torch.Tensor  # [B, T_new] (pad after EOS)
    seconds: float
    valid: torch.Tensor  # [B, T_new] bool: the steps that belong to each row's episode (see ``valid_steps``)
    first_step_logits: torch.Tensor | None = None  # [B, len(score_token_ids)] at the first generated position
    first_step_logsumexp: torch.Tensor | None = None  # [B] log of the full-vocabulary softmax normaliser there
    last_prompt_tokens: torch.Tensor | None = None  # [B] each row's last prompt token (left padding: column -1)
    reference_likelihood: torch.Tensor | None = None  # [B] see ``reference_likelihood``

    @property
    def steered_tokens(self) -> torch.Tensor:
        """[B, T]: the token whose residual stream step t reads and steers (the newest position): the last prompt
        token at step 0, generated token t-1 after that."""
        return torch.cat([self.last_prompt_tokens[:, None], self.new_tokens[:, :-1]], dim=1)

    @property
    def n_generated(self) -> int:
        return int(self.new_tokens.numel())


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


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a transformers ``DynamicCache`` (sliding layers hold their window only)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(not getattr(layer, "is_initialized", True) for layer in layers):
        raise RuntimeError(f"Unsupported KV cache {type(cache).__name__}: expected an initialised DynamicCache")
    return [(layer.keys, layer.values) for layer in layers]


def left_padded_cache(lm: LoadedModel, rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None],
                      lengths: list[int]) -> DynamicCache:
    """One left-padded batch cache from per-row batch-1 caches of ``lengths[i]`` tokens (``None``: no tokens).

    Every row is right-aligned in ``max(lengths)`` columns (zeros where a row has no token: its attention mask
    hides them). A global layer holds all columns; a sliding-window layer only the last ``window - 1`` (all a
    left-padded prefill of the same rows would keep) while counting the full length, so memory stays at one copy.
    A row's own sliding-window cache always covers those columns: rows are never cropped below what they hold.
    """
    width = max(lengths)
    template = next(r for r in rows if r is not None)
    cache = DynamicCache(config=lm.model.config)
    if len(cache.layers) != len(template):
        raise RuntimeError(f"Cache layout mismatch: {len(cache.layers)} cache layers, {len(template)} in the rows")
    for index, (layer, (k0, v0)) in enumerate(zip(cache.layers, template, strict=True)):
        window = getattr(layer, "sliding_window", None)
        cols = width if window is None else min(width, int(window) - 1)
        keys = k0.new_zeros((len(rows), k0.shape[1], cols, k0.shape[3]))
        values = v0.new_zeros((len(rows), v0.shape[1], cols, v0.shape[3]))
        for i, row in enumerate(rows):
            if row is not None:
                k, v = row[index]
                n = min(k.shape[-2], cols)
                keys[i, :, cols - n:] = k[0, :, k.shape[-2] - n:]
                values[i, :, cols - n:] = v[0, :, v.shape[-2] - n:]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if window is not None:
            layer.cumulative_length = width
    adopt_inplace_layers(cache)  # decoding then writes into spare columns instead of re-copying (inplace_cache.py)
    return cache


def tensors_bytes(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


class PrefixStore:
    """Few-shot prefix KV caches of one model (batch 1, unsteered), keyed by their token ids; least recently used
    entries are evicted beyond ``max_bytes``. Entries are read, never written: users copy them into new caches."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    @torch.inference_mode()
    def get(self, lm: LoadedModel, key: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        layers = cache_tensors(prefill(lm, torch.tensor([key], device=lm.device)))
        self.entries[key] = layers
        self.bytes += tensors_bytes(layers)
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= tensors_bytes(old)
        return layers


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefix_store(lm: LoadedModel) -> PrefixStore:
    """The model's prefix store (one per model object, created on first use)."""
    if lm.model not in _STORES:
        _STORES[lm.model] = PrefixStore()
    return _STORES[lm.model]


def prefix_key(prefix_ids: list[int], prompt_ids: list[int]) -> tuple[int, ...]:
    """The cacheable part of a declared prefix: its tokens minus the last (a prefix tokenised alone can end
    differently than inside the prompt), cut further to where the prompt's own tokens agree, and always short of
    the prompt's last token (the steered one)."""
    n = min(len(prefix_ids) - 1, len(prompt_ids) - 1)
    agree = 0
    while agree < n and prefix_ids[agree] == prompt_ids[agree]:
        agree += 1
    return tuple(prompt_ids[:agree])


@torch.inference_mode()
def prefill(lm: LoadedModel, input_ids: torch.Tensor, cache=None):
    """The KV cache after ``input_ids``, from the model's body alone: a prefill's logits are never read, and the
    output head is a 262k x 640 matmul (in bf16 on one row, torch's CPU matmul even copies the whole weight
    first: ~1.4 s a call)."""
    body = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else None
    if body is None or body is lm.model:
        return lm.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).past_key_values
    return body(input_ids=input_ids, cache=cache, use_cache=True).past_key_values


def prompt_prefix_cache(lm: LoadedModel, prompts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prefixes: list[str | None] | None = None, add_special_tokens: bool = True) -> DynamicCache:
    """KV cache of ``input_ids[:, :-1]`` (left-padded, so column -1 is every row's last prompt token).

    Computed once per *distinct* prompt, unpadded (batch 1): from its few-shot prefix's stored cache when
    ``prefixes`` declares one (``PrefixStore``), else from scratch; then laid out left-padded for all rows
    (``left_padded_cache``; copies, never crops: Gemma's sliding-window layers).
    """
    store = prefix_store(lm)
    per_prompt: dict[str, tuple[list | None, int]] = {}
    prefix_ids: dict[str, list[int]] = {}  # a few-shot prefix is shared by many prompts: tokenise it once
    for i, prompt in enumerate(prompts):
        if prompt in per_prompt:
            continue
        ids = input_ids[i][attention_mask[i].bool()].tolist()
        n = len(ids) - 1  # cached tokens: everything but the steered last one
        start, base = 0, None
        if prefixes is not None and prefixes[i]:
            if prefixes[i] not in prefix_ids:
                prefix_ids[prefixes[i]] = lm.tokenizer(prefixes[i], add_special_tokens=add_special_tokens).input_ids
            key = prefix_key(prefix_ids[prefixes[i]], ids)
            if key:
                start, base = len(key), store.get(lm, key)
        layers = base
        if n > start:
            cache = left_padded_cache(lm, [base], [start]) if base is not None else None
            layers = cache_tensors(prefill(lm, torch.tensor([ids[start:n]], device=lm.device), cache))
        per_prompt[prompt] = (layers if n > 0 else None, n)
    rows = [per_prompt[p] for p in prompts]
    return left_padded_cache(lm, [r for r, _ in rows], [n for _, n in rows])


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


@torch.inference_mode()
def generate(lm: LoadedModel, prompts: list[str], max_new_tokens: int, steerer: ResidualSteerer | None = None,
             controller: Controller | None = None, add_special_tokens: bool = True,
             stop_strings: list[str] | None = None, score_token_ids: torch.Tensor | None = None,
             min_new_tokens: int | None = None, share_prefix: bool = False,
             prefixes: list[str | None] | None = None, references: list[str] | None = None,
             reference_marker: str | None = None) -> Generation:
    """Greedy-decode ``prompts`` in one batch; with ``steerer`` every forward step is steered by ``controller``.

    ``share_prefix``: only the newest position is ever steered, so everything before a prompt's last token is
    the same under every action. Each *distinct* prompt's ``prompt[:-1]`` is prefilled once, unsteered, and its
    KV cache copied to every row holding that prompt (a group of G samples costs one prefill); generation then
    starts from the last prompt token, which is steered exactly as in the full-prompt path.
    ``prefixes`` (implies the same path): each row's few-shot prefix text (a leading part of its prompt, or
    ``None``); each distinct prefix is prefilled once per model and kept (``PrefixStore``), so a prompt costs
    only its own tail.

    ``stop_strings`` end a row early (and are cut from its completion); ``score_token_ids`` returns the raw
    logits of those tokens at the first generated position (e.g. option letters, for constrained answers) and
    the full-vocabulary log-normaliser there, so their probabilities are exact, not renormalised.
    ``references``: each row's reference answer text (e.g. ``#### 42``); ``Generation.reference_likelihood`` is
    its teacher-forced likelihood after the row's completion, cut at ``reference_marker`` (the model's own answer
    marker) and ended with a newline (``reference_likelihood``).
    """
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(lm.device)
    ctx = steerer.attached(controller) if steerer is not None else nullcontext()
    kwargs = stop_criteria(lm.tokenizer, stop_strings, enc.input_ids.shape[1])
    if score_token_ids is not None:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    if references is not None:
        kwargs.update(return_dict_in_generate=True)
    if min_new_tokens:
        kwargs.update(min_new_tokens=min_new_tokens)
    t0 = time.perf_counter()
    if (share_prefix or prefixes) and enc.input_ids.shape[1] >= 2:  # 1-token prompts: no prefix to share
        kwargs["cache"] = prompt_prefix_cache(lm, prompts, enc.input_ids, enc.attention_mask, prefixes,
                                              add_special_tokens)
    # plain greedy steps need only the argmax: screen the head in bf16 (models/greedy_head.py); scored first-step
    # logits and min_new_tokens' logit edits need the fp32 head
    screen = lm.screened_greedy_head and score_token_ids is None and not min_new_tokens
    with ctx, screened_greedy_head(lm.model, screen):
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id, **kwargs)
    seconds = time.perf_counter() - t0
    sequences = out.sequences if "return_dict_in_generate" in kwargs else out
    first = lse = None
    if score_token_ids is not None:
        first = out.logits[0][:, score_token_ids.to(lm.device)].float().cpu()
        lse = out.logits[0].float().logsumexp(-1).cpu()
    new = sequences[:, enc.input_ids.shape[1]:].cpu()
    valid = valid_steps(new, end_token_ids(lm.tokenizer, lm.model), stop_steps(kwargs))
    texts = lm.tokenizer.batch_decode(new, skip_special_tokens=True)
    if stop_strings:
        texts = [cut_at_stop_strings(t, stop_strings) for t in texts]
    likelihood = None
    if references is not None:
        kept, ref_ids = reference_inputs(lm, new, texts, references, reference_marker)
        likelihood = reference_likelihood(lm, prompts, enc.input_ids, enc.attention_mask, new.to(lm.device), kept,
                                          ref_ids, steerer, prefixes, add_special_tokens)
    return Generation(prompts, texts, new, seconds, valid, first, lse, enc.input_ids[:, -1].cpu(), likelihood)
