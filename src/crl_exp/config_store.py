"""Typed (structured) configs: the dataclasses behind ``ppo/``, ``masking/``, ``policy/``, ``budget/``, ``eval/``, ``model/`` and
``sae.training`` (``sae=trained``).

Each default is defined once, in its dataclass; the YAML files of those groups start from the registered
``base_*`` node and set only what differs. Composition then refuses an unknown or misspelled key with its name
(``Key 'clip' not in 'PPOConfig'``) before anything runs.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from crl_exp.analysis.config import ANALYSIS_CONFIGS
from crl_exp.crl.config import BudgetConfig
from crl_exp.crl.masking import MaskingConfig
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.evaluation.config import EvalConfig
from crl_exp.models.config import ModelConfig
from crl_exp.saes.training import SAETrainingSettings
from crl_exp.tasks.config import TASK_CONFIGS

STRUCTURED = {"ppo": PPOConfig, "masking": MaskingConfig, "policy": PolicyConfig, "budget": BudgetConfig, "eval": EvalConfig, "model": ModelConfig}


def register_configs() -> None:
    """Register ``<group>/base_<group>`` for every typed group (idempotent; runs on ``import crl_exp``)."""
    store = ConfigStore.instance()
    for group, cls in STRUCTURED.items():
        store.store(group=group, name=f"base_{group}", node=cls)
    for name, cls in ANALYSIS_CONFIGS.items():
        store.store(group="analysis", name=f"base_{name}", node=cls)
    for name, cls in TASK_CONFIGS.items():  # task=<name> starts from base_<name>: its typed fields
        store.store(group="task", name=f"base_{name}", node=cls)
    # sae=trained starts from this node: its training knobs typed, each default once (SAETrainingSettings)
    store.store(group="sae", name="base_trained", node={"training": SAETrainingSettings})
