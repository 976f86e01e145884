"""Harvest resid_post activations of one or several blocks from text, cheaply.

The forward pass stops right after the deepest requested block (an exception from the hook), so neither the later blocks nor the
262k-entry LM head are computed. Texts are packed into fixed-length rows that start with BOS; the BOS position
is dropped because its residual norm is an outlier that would dominate SAE training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from crl_exp.models.architecture import decoder_layers


class _StopForward(Exception):
    pass


def tokenize_texts(tokenizer, texts: Iterable[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (EOS appended), stopping once ``max_tokens`` have been read."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids + eos
        out.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    return out


def pack_tokens(tokenized: list[list[int]], context_size: int, bos_token_id: int) -> torch.Tensor:
    """Rows of ``[BOS, t1, ..., t_{context_size-1}]`` from the concatenated token lists (remainder dropped)."""
    body = context_size - 1
    flat = [t for ids in tokenized for t in ids]
    n_rows = len(flat) // body
    if n_rows == 0:
        raise ValueError(f"Corpus too small: {len(flat)} tokens for one row of {context_size}")
    rows = torch.tensor(flat[: n_rows * body], dtype=torch.long).view(n_rows, body)
    return torch.cat([torch.full((n_rows, 1), bos_token_id, dtype=torch.long), rows], dim=1)


@torch.inference_mode()
def collect_resid_post(model, layer: int, token_rows: torch.Tensor, batch_size: int = 16,
                       desc: str = "Collecting activations") -> torch.Tensor:
    """``[n_rows * (context_size - 1), d_model]`` fp32 activations of resid_post[layer], BOS dropped."""
    return collect_resid_post_layers(model, [layer], token_rows, batch_size, desc)[layer]


@torch.inference_mode()
def collect_resid_post_layers(model, layers: list[int], token_rows: torch.Tensor, batch_size: int = 16,
                              desc: str = "Collecting activations") -> dict[int, torch.Tensor]:
    """resid_post activations of every block in ``layers`` from one forward pass per batch, which stops after the
    deepest of them: a layer sweep's SAEs cost one harvest, not one per layer."""
    blocks = decoder_layers(model)
    deepest = max(layers)
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def hook_for(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer].append(hidden[:, 1:].reshape(-1, hidden.shape[-1]).float().cpu())
            if layer == deepest:
                raise _StopForward
        return hook

    base = getattr(model, "base_model", model)  # skip the LM head: the hook stops the forward inside the trunk
    device = next(model.parameters()).device
    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
    try:
        for start in tqdm(range(0, len(token_rows), batch_size), desc=desc, unit="batch"):
            try:
                base(input_ids=token_rows[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(parts) for layer, parts in captured.items()}
