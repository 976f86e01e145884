"""Sparse autoencoders: load (Gemma Scope, any sae-lens folder) or train-and-cache one, and check it fits."""

from crl_exp.saes.loading import LoadedSAE, load_sae, resid_post_hook_name, validate_sae

__all__ = ["LoadedSAE", "load_sae", "resid_post_hook_name", "validate_sae"]
