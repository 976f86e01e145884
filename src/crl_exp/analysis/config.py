"""The typed ``analysis/`` node: one dataclass per analysis (``mode=analyse analysis=<name>``; ``branch_points``
also at the end of ``mode=train``), each field documented and each default defined once. ``conf/analysis/*.yaml``
start from the registered ``base_<name>`` node, so a misspelled key fails at composition with its name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crl_exp.errors import CRLConfigError
from crl_exp.structured import to_dataclass


@dataclass
class BranchPointsConfig:
    """Branch points: ``episodes`` held-out (dev) episodes, the policy's ``k_alternatives`` next-best features
    (plus "no steering") at each of at most ``max_steps`` steps; ``at_end_of_training``: ``mode=train`` runs it
    on its policy before finishing."""

    name: str = "branch_points"
    episodes: int = 4
    k_alternatives: int = 2
    max_steps: int = 32
    at_end_of_training: bool = False

    def __post_init__(self) -> None:
        if min(self.episodes, self.k_alternatives, self.max_steps) < 1:
            raise CRLConfigError("analysis=branch_points needs episodes, k_alternatives and max_steps >= 1")


@dataclass
class OffTaskConfig:
    """A safety policy scored on another task: ``task`` (a ``conf/task/`` name) on its ``split`` (train or
    validation: the test split stays for the pre-registered comparisons), a seeded subset of ``limit`` (None =
    all), in batches of ``batch_size``; ``template`` None = the source run's prompt template."""

    name: str = "off_task"
    task: str = "mmlu"
    template: str | None = None
    split: str = "validation"
    limit: int | None = 500
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation"):
            raise CRLConfigError(f"analysis.split must be train or validation (the test split is kept for the "
                                 f"pre-registered comparisons), got {self.split!r}")


@dataclass
class TopFeaturesConfig:
    """A run's ``n_features`` most-used features: their top activating contexts over ``corpus_tokens`` tokens of
    benchmark text, and their effect."""

    name: str = "top_features"
    n_features: int = 10
    corpus_tokens: int = 16384


ANALYSIS_CONFIGS = {"branch_points": BranchPointsConfig, "off_task": OffTaskConfig, "top_features": TopFeaturesConfig}


def analysis_config(node: Any):
    """The typed, validated ``analysis/`` node of its ``name``."""
    name = node.name if not isinstance(node, dict) else node.get("name")
    if name not in ANALYSIS_CONFIGS:
        raise CRLConfigError(f"Unknown analysis {name!r}; valid: {', '.join(ANALYSIS_CONFIGS)}")
    return to_dataclass(ANALYSIS_CONFIGS[name], node, "analysis")
