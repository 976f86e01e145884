"""Language-model loading: the embedded GGUF Gemma, hub ids and local HF folders behind one function."""

from crl_exp.models.architecture import decoder_layers, model_dims
from crl_exp.models.loading import LoadedModel, load_language_model

__all__ = ["LoadedModel", "decoder_layers", "load_language_model", "model_dims"]
