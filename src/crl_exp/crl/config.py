"""Typed training configuration from the Hydra nodes: dataclasses that refuse unknown keys, budget caps."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict

from crl_exp.crl.masking import MaskingConfig
from crl_exp.errors import CRLConfigError


def config_dataclass(cls, node) -> Any:
    """A dataclass from a config node, refusing unknown keys."""
    data = dict(node)
    unknown = set(data) - set(cls.__dataclass_fields__)
    if unknown:
        raise CRLConfigError(f"Unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)


def masking_config(node: DictConfig) -> MaskingConfig:
    data = {k: v for k, v in dict(node).items() if k != "eval_with_mask"}
    return config_dataclass(MaskingConfig, data)


def apply_budget(cfg: DictConfig) -> None:
    """Cap generation length to the budget (the task config keeps its own value for other budgets)."""
    cap = cfg.budget.get("max_new_tokens_cap")
    if cap is not None and cfg.task.max_new_tokens > cap:
        with open_dict(cfg):
            cfg.task.max_new_tokens = int(cap)
