"""Architecture-agnostic access to the decoder blocks of a causal LM (Gemma 2/3, Llama, GPT-2 style)."""

from __future__ import annotations

from torch import nn

# Attribute paths, tried in order, at which HF causal LMs keep their list of transformer blocks.
_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` whose element ``L`` outputs resid_post of block ``L``."""
    for path in _LAYER_PATHS:
        obj = model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(
        f"Cannot find the decoder blocks of {type(model).__name__}; looked at {', '.join(_LAYER_PATHS)}."
    )


def model_dims(model: nn.Module) -> tuple[int, int]:
    """(number of blocks, residual width) of a HF causal LM."""
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    return len(decoder_layers(model)), int(text_cfg.hidden_size)
