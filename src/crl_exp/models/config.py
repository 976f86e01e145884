"""The typed ``model/`` node: where a language model comes from, how it is loaded, and the shape facts the rollout
memory check reads before any weight is loaded.

Every default is defined here once; ``conf/model/*.yaml`` start from the registered ``base_model`` node and set
what differs, so a misspelled key fails at composition with its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crl_exp.errors import CRLConfigError
from crl_exp.structured import to_dataclass

SOURCES = ("hf", "gguf_package")
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelConfig:
    """A causal LM.

    Fields:
        name: the name runs and caches use (``gemma3_270m``).
        source: ``hf`` (a hub id or local folder in ``path``) or ``gguf_package`` (a PyPI package shipping a
            GGUF, converted once into the cache).
        package: the PyPI package of a ``gguf_package`` model.
        path: hub id or local folder of an ``hf`` model.
        revision: hub revision (None = the default branch).
        dtype: float32 | bfloat16 | float16 | auto (bf16 where the device has it natively).
        device: cpu | cuda | cuda:N | auto.
        pad_token: the pad token a converted GGUF tokenizer gets when it has none (None = its eos).
        screened_greedy_head: greedy decoding through a bf16 screen settled in fp32 (None = where it pays off).
        chat_template: whether the tokenizer carries a chat template (the instruct models).
        n_layers, d_model, n_heads, n_kv_heads, head_dim, vocab_size, n_params: shape facts for the memory check
            and layer checks before loading (None = read from the model's config.json).
    """

    name: str = "custom"
    source: str = "hf"
    package: str | None = None
    path: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    pad_token: str | None = None
    screened_greedy_head: bool | None = None
    chat_template: bool = False
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    n_params: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise CRLConfigError(f"Unknown model.source {self.source!r}; use 'gguf_package' or 'hf'")
        if str(self.dtype).lower() not in DTYPES:
            raise CRLConfigError(f"Unknown dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        if self.source == "gguf_package" and not self.package:
            raise CRLConfigError("model.source=gguf_package needs model.package (the PyPI package with the GGUF)")


def model_config(node: Any) -> ModelConfig:
    """The typed, validated ``model/`` node."""
    return to_dataclass(ModelConfig, node, "model")
