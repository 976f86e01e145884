"""crl-exp: Control Reinforcement Learning (learned per-token SAE-feature steering) as an interpretability tool."""

from crl_exp.config_store import register_configs

register_configs()
