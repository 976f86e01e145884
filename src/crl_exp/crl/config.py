"""Typed training configuration from the Hydra nodes: dataclasses that refuse unknown keys, budget caps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from crl_exp.crl.masking import MaskingConfig
from crl_exp.errors import CRLConfigError
from crl_exp.structured import to_dataclass


def _check(key: str, value: Any, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CRLConfigError(f"budget.{key}={value} is invalid: it must be an integer >= 1"
                             + (" or null (all)" if nullable else ""))


@dataclass
class StaticFeatureBudget:
    train_examples: int = 32  # train episodes ranked by correlation, and validation episodes per candidate trial
    candidates: int = 4  # top-correlated features tried as static steering on validation (generating tasks, and
    # one-token tasks over the whole dictionary; one-token tasks with policy.action_pool=N try all N)
    validation_examples: int = 128  # one-token tasks: validation prompts of the exhaustive reward table
    oracle_candidates: int = 32  # one-token tasks: the per-prompt oracle's pool (headroom reference row)


@dataclass
class BudgetConfig:
    """The ``budget/`` node: how much a ``mode=train`` run may spend (defaults: the 2-core CPU budget, sized so
    every ``+experiment=<task>_layer12`` finishes in <= 15 minutes; measured times in conf/budget/cpu.yaml)."""

    name: str = "cpu"
    models: list[str] = field(default_factory=lambda: ["gemma3_270m", "gemma3_270m_hub", "gemma3_270m_it",
                                                      "smollm2_135m_instruct", "hf"])  # models this budget is sized for
    device: str = "cpu"
    iterations: int = 13  # PPO iterations
    episodes_per_iteration: int = 64  # rows of one batched, steered generate
    group_size: int = 8  # episodes per training prompt per iteration, sharing one prefill (must divide the above)
    max_new_tokens_cap: int | None = 48  # caps task.max_new_tokens during training and evaluation
    eval_examples: int | None = 200  # held-out (test split) subset per condition; null = all
    # the same for tasks that generate text (max_new_tokens > 1: gsm8k, xstest, harmbench), where an example
    # costs up to max_new_tokens decoding steps instead of one; null = eval_examples
    eval_examples_generating: int | None = 64
    eval_batch_size: int = 16
    eval_sampled_seeds: int = 5  # CRL also evaluated sampling its actions: this many samples per held-out prompt
    # one-token tasks: train prompts of the exact reward table behind the group oracle and the ceiling rows
    reference_train_examples: int = 240
    max_memory_gb: float | None = None  # rollout memory allowed; null = the GPU's memory or the available RAM
    static_feature: StaticFeatureBudget = field(default_factory=StaticFeatureBudget)

    def validate(self) -> None:
        """One line per bad value of ``budget.*``, naming the key and its valid range."""
        for key in ("iterations", "episodes_per_iteration", "group_size", "eval_batch_size", "reference_train_examples"):
            _check(key, getattr(self, key))
        for key in ("eval_examples", "eval_examples_generating", "max_new_tokens_cap"):
            _check(key, getattr(self, key), nullable=True)
        if self.eval_sampled_seeds is None or int(self.eval_sampled_seeds) < 0:
            raise CRLConfigError(f"budget.eval_sampled_seeds={self.eval_sampled_seeds} is invalid: it must be >= 0")
        for key in ("train_examples", "candidates", "validation_examples"):
            _check(f"static_feature.{key}", getattr(self.static_feature, key))


def budget_config(node: Any) -> BudgetConfig:
    """The typed ``budget/`` node of a run (unknown keys refused), validated: what run-time code reads, so every
    default stays the dataclass's."""
    if isinstance(node, BudgetConfig):
        return node
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    static = config_dataclass(StaticFeatureBudget, data.pop("static_feature", {}) or {})
    budget = config_dataclass(BudgetConfig, {**data, "static_feature": static})
    budget.validate()
    return budget


def validate_budget(node: Any) -> None:
    """``budget_config`` for its refusals only (preflight)."""
    budget_config(node)


def config_dataclass(cls, node) -> Any:
    """A dataclass from a config node (or a plain dict), refusing unknown keys."""
    return to_dataclass(cls, node)


def masking_config(node: DictConfig) -> MaskingConfig:
    return config_dataclass(MaskingConfig, node)


def heldout_size(budget: Any, max_new_tokens: int) -> int | None:
    """Held-out examples per condition for a task generating ``max_new_tokens`` tokens (``None``: all)."""
    budget = budget_config(budget)
    if max_new_tokens > 1 and budget.eval_examples_generating is not None:
        return budget.eval_examples_generating
    return budget.eval_examples


def capped_new_tokens(budget: Any, task: DictConfig) -> int:
    """The task's generation length under the budget's cap, never below the task's ``max_new_tokens_floor``
    (GSM8K: a 4-shot chain of thought needs ~100 tokens)."""
    tokens, cap = int(task.max_new_tokens), budget_config(budget).max_new_tokens_cap
    if cap is None:
        return tokens
    return min(tokens, max(int(cap), int(task.get("max_new_tokens_floor") or 0)))


def apply_budget(cfg: DictConfig) -> None:
    """Cap generation length to the budget (the task config keeps its own value for other budgets)."""
    tokens = capped_new_tokens(cfg.budget, cfg.task)
    if tokens != cfg.task.max_new_tokens:
        with open_dict(cfg):
            cfg.task.max_new_tokens = tokens
