"""Typed training configuration from the Hydra nodes: dataclasses that refuse unknown keys, budget caps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from crl_exp.crl.masking import MaskingConfig
from crl_exp.errors import CRLConfigError


@dataclass
class StaticFeatureBudget:
    train_examples: int = 8  # train-split episodes used to select the best static feature
    candidates: int = 2  # top-correlated features evaluated as static steering


@dataclass
class BudgetConfig:
    """The ``budget/`` node: how much a ``mode=train`` run may spend (defaults: the 2-core CPU budget)."""

    name: str = "cpu"
    models: list[str] = field(default_factory=lambda: ["gemma3_270m", "hf"])  # models this budget is sized for
    device: str = "cpu"
    iterations: int = 10  # PPO iterations
    episodes_per_iteration: int = 8
    group_size: int = 1  # episodes per training prompt per iteration, sharing one prefill (must divide the above)
    max_new_tokens_cap: int | None = 48  # caps task.max_new_tokens during training and evaluation
    eval_examples: int | None = 24  # held-out (test split) subset per condition; null = all
    eval_batch_size: int = 8
    max_memory_gb: float | None = None  # rollout memory allowed; null = the GPU's memory or the available RAM
    static_feature: StaticFeatureBudget = field(default_factory=StaticFeatureBudget)


def config_dataclass(cls, node) -> Any:
    """A dataclass from a config node (or a plain dict), refusing unknown keys."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    data = dict(node)
    unknown = set(data) - set(cls.__dataclass_fields__)
    if unknown:
        raise CRLConfigError(f"Unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)


def masking_config(node: DictConfig) -> MaskingConfig:
    return config_dataclass(MaskingConfig, node)


def apply_budget(cfg: DictConfig) -> None:
    """Cap generation length to the budget (the task config keeps its own value for other budgets)."""
    cap = cfg.budget.get("max_new_tokens_cap")
    if cap is not None and cfg.task.max_new_tokens > cap:
        with open_dict(cfg):
            cfg.task.max_new_tokens = int(cap)
