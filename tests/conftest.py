"""Shared fixtures: tiny randomly initialised Gemma-architecture models and a byte-level tokenizer.

Everything here is built in the test process (no downloads, no cached weights) so unit tests run in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from crl_exp.models.loading import LoadedModel, freeze, prepare_tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
DATA_DIR = Path(os.environ.get("CRL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer with Gemma's special-token ids (pad 0, eos 1, bos 2)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", add_bos_token=True)
    from tokenizers import processors

    fast._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return prepare_tokenizer(fast)


def tiny_gemma3(n_layers: int = 3, d_model: int = 64, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=264, hidden_size=d_model, intermediate_size=2 * d_model,
                           num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                           max_position_embeddings=512, sliding_window=16, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2, layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    return freeze(Gemma3ForCausalLM(cfg))


def tiny_gemma2(n_layers: int = 2, d_model: int = 64, seed: int = 0) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=264, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                       sliding_window=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return freeze(Gemma2ForCausalLM(cfg))


def as_loaded(model, name: str = "tiny") -> LoadedModel:
    n_layers = model.config.num_hidden_layers
    return LoadedModel(model, byte_tokenizer(), name, n_layers, model.config.hidden_size, "memory", 0.0)


@pytest.fixture
def tiny_lm() -> LoadedModel:
    return as_loaded(tiny_gemma3())


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny Gemma-3 checkpoint + tokenizer saved as a regular local HF folder."""
    path = tmp_path / "tiny-gemma3"
    tiny_gemma3().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"benchmark data not found at {DATA_DIR}: set CRL_DATA_DIR to the benchmarks folder")
    return DATA_DIR
