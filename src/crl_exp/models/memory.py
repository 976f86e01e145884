"""Rollout memory estimate from a model's shape alone, so a batch that cannot fit is refused before any load.

The estimate is an upper bound of what one batched, KV-cached generate holds at its peak: the weights, the KV
cache of every row at full length (prompt + new tokens; sliding-window layers counted at full length too), the
attention scores of the largest single prefill (one prompt when prefixes are shared, else every row at once),
and the fp32 logits of one decoding step (times 2: softmax/argmax work space).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The few shape facts the estimate needs (from the ``model/`` config node or a config.json)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_params: int
    dtype: str = "float32"

    @property
    def bytes_per_value(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.bytes_per_value


def shape_from_hf_config(hf: Any, dtype: str) -> ModelShape:
    """``ModelShape`` of a transformers config (text config of multimodal ones); parameters approximated as
    embeddings + 12 d_model^2 per layer when the config does not say."""
    hf = getattr(hf, "text_config", None) or hf
    heads = int(hf.num_attention_heads)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // heads)
    params = int(hf.vocab_size * hf.hidden_size + 12 * hf.num_hidden_layers * hf.hidden_size ** 2)
    return ModelShape(int(hf.num_hidden_layers), int(hf.hidden_size), heads,
                      int(getattr(hf, "num_key_value_heads", None) or heads), head_dim, int(hf.vocab_size),
                      params, dtype)


@dataclass(frozen=True)
class MemoryEstimate:
    total_bytes: int
    parts: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in self.parts.items())


def rollout_memory(shape: ModelShape, rows: int, prompt_tokens: int, new_tokens: int,
                   prefill_rows: int) -> MemoryEstimate:
    """Peak bytes of one generate of ``rows`` rows whose prompts have at most ``prompt_tokens`` tokens."""
    seq = prompt_tokens + new_tokens
    parts = {
        "weights": shape.n_params * shape.bytes_per_value,
        "kv_cache": rows * seq * shape.kv_bytes_per_token,
        "prefill_attention": prefill_rows * shape.n_heads * prompt_tokens ** 2 * 4,
        "prefill_activations": prefill_rows * prompt_tokens * shape.d_model * 4 * 8,
        "logits": 2 * rows * shape.vocab_size * 4,
    }
    return MemoryEstimate(sum(parts.values()), parts)
