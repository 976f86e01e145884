"""KV-cache plumbing of batched steered generation: a prompt's prefix computed once and laid out left-padded.

A one-token task scores one prompt under many features (rows of one batch) and a few-shot task repeats one prefix
across its prompts: both prefill once and copy the cache into each row (``left_padded_cache``: copies, never crops,
because Gemma's sliding-window layers hold their window only). ``PrefixStore`` keeps few-shot prefixes per model.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from transformers import DynamicCache

from crl_exp.models import LoadedModel
from crl_exp.models.inplace_cache import adopt_inplace_layers

# Bound on the few-shot prefix caches kept per model (``PrefixStore``). Gemma 3 270M in fp32 holds ~21 MB for a
# 1,000-token prefix (global layers keep every token, sliding layers their 512-token window), so 1 GiB holds
# all 57 MMLU subjects' 5-shot prefixes.
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30


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
