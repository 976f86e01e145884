"""The typed ``task/`` node: one dataclass per benchmark, each field documented and each default defined once.

``conf/task/<name>.yaml`` starts from the registered ``base_<name>`` node and sets the benchmark's values, so a
misspelled key fails at composition with its name; ``build_task`` merges any node (a test's plain dict too) onto
its task's dataclass, which validates it, so task code reads attributes and never a ``.get`` default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from crl_exp.errors import CRLConfigError

SOURCES = ("local", "hub")
TEMPLATES = ("base", "chat")
JUDGE_KINDS = ("string_match", "model", "behaviour_classifier")


@dataclass
class HubConfig:
    """Where ``task.source=hub`` reads the benchmark: ``datasets.load_dataset(path, name, split=split)``;
    ``data_files`` maps splits to local files in the hub's format (tests); ``categories``: BBQ's configs."""

    path: str = ""
    name: str | None = None
    data_files: Any = None
    split: str | None = None
    categories: list[str] = field(default_factory=list)


@dataclass
class JudgeConfig:
    """A safety judge. Refusal judges: ``string_match`` (readable rules, no model) or ``model`` (a sequence
    classifier ``model`` whose labels ``refusal_labels`` count as refusals). ``behaviour_classifier``: a causal LM
    (``model``, e.g. ``cais/HarmBench-Llama-2-13b-cls``) answering whether a generation carries out the behaviour,
    on the pinned prompt ``template`` (``tasks/behaviour_judges.py``): attack success, not refusal. Models run in
    batches of ``batch_size`` on ``device``."""

    kind: str = "string_match"
    model: str | None = None
    refusal_labels: list[str] = field(default_factory=list)
    template: str = "harmbench"
    batch_size: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in JUDGE_KINDS:
            raise CRLConfigError(f"Unknown judge kind {self.kind!r}; valid: {', '.join(JUDGE_KINDS)}")


@dataclass
class TaskConfig:
    """What every benchmark has.

    Fields:
        name: the task's name in runs and tables.
        cls: the ``Task`` class as ``module:Class`` (a new task needs only its module and its config file).
        source: ``local`` (the upstream files under the data folder) or ``hub`` (``hub`` below).
        split_fractions: train/validation/test shares of a benchmark that ships one split.
        split_seed: the seed of those splits (by cluster).
        confirm_fraction: the share of the test split's clusters kept for the confirmation part.
        max_new_tokens: tokens generated per episode (1: one-token tasks, read off the first step).
        max_new_tokens_floor: the least the budget's cap may leave (GSM8K's chain of thought).
        max_prompt_tokens: the longest prompt the rollout memory check plans for.
        stop_strings: generation stops at any of these.
        reward: the task's reward (exact | dense | margin | reference_likelihood, as the task allows).
        primary_metric: the metric a comparison decides on (``{judge}`` becomes the judge's name).
        template: ``base`` (``base_template`` around the text) or ``chat`` (the tokenizer's chat template).
        base_template: the base template, ``{text}`` the prompt body (None = the text itself).
    """

    name: str = ""
    cls: str | None = None
    source: str = "local"
    hub: HubConfig = field(default_factory=HubConfig)
    split_fractions: dict[str, float] = field(default_factory=dict)
    split_seed: int = 0
    confirm_fraction: float = 0.5
    max_new_tokens: int = 1
    max_new_tokens_floor: int | None = None
    max_prompt_tokens: int = 2048
    stop_strings: list[str] = field(default_factory=list)
    reward: str = "exact"
    primary_metric: str = "accuracy"
    template: str = "base"
    base_template: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise CRLConfigError(f"task.source must be 'local' or 'hub', got {self.source!r}")
        if self.template not in TEMPLATES:
            raise CRLConfigError(f"task.template must be base or chat, got {self.template!r}")
        if not 0 < self.confirm_fraction < 1:
            raise CRLConfigError(f"task.confirm_fraction={self.confirm_fraction} must be in (0, 1)")
        if self.max_new_tokens < 1:
            raise CRLConfigError(f"task.max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclass
class MMLUConfig(TaskConfig):
    """MMLU: ``subjects`` (empty = all 57) with ``n_shots`` exemplars from the subject's dev split."""

    subjects: list[str] = field(default_factory=list)
    n_shots: int = 5


@dataclass
class BBQConfig(TaskConfig):
    """BBQ: ``categories`` (empty = all present) and context ``conditions`` (ambig, disambig)."""

    categories: list[str] = field(default_factory=list)
    conditions: list[str] = field(default_factory=lambda: ["ambig", "disambig"])


@dataclass
class GSM8KConfig(TaskConfig):
    """GSM8K: the train rows of the few-shot chain-of-thought exemplars (``shot_rows``)."""

    shot_rows: list[int] = field(default_factory=lambda: [0, 1, 2, 3])


@dataclass
class RefusalTaskConfig(TaskConfig):
    """A task scored by a refusal judge."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class XSTestConfig(RefusalTaskConfig):
    """XSTest: prompt ``types`` (empty = all)."""

    types: list[str] = field(default_factory=list)


@dataclass
class HarmBenchConfig(RefusalTaskConfig):
    """HarmBench: ``functional_categories`` (standard | contextual | copyright; empty = all)."""

    functional_categories: list[str] = field(default_factory=list)


@dataclass
class KnownAnswerDesignConfig:
    """How the known-answer design is made (``known_answer_design.py``): ``pool_size`` features in the action
    pool (null: the whole dictionary is the action space, and the design is checked against every feature),
    ``n_targets`` tokens per class target set, ``candidates`` features considered (the most active on train
    prompts), ``probe_prompts`` train prompts steering is probed on, the train/validation prompts of the
    class-decodability check, and (dictionary designs) ``static_candidates`` features by mean probe reward over
    the whole dictionary that the static baseline also tries on validation."""

    pool_size: int | None = 32
    n_targets: int = 3
    candidates: int = 128
    probe_prompts: int = 8
    decode_train: int = 128
    decode_validation: int = 64
    static_candidates: int = 16


@dataclass
class KnownAnswerConfig(MMLUConfig):
    """The known-answer task: MMLU ``subjects`` as classes, designed from the loaded model and SAE by
    ``designer`` (``module:function``)."""

    designer: str = "crl_exp.known_answer_design:design_task"
    design: KnownAnswerDesignConfig = field(default_factory=KnownAnswerDesignConfig)


def typed_task_node(config_class: type[TaskConfig], node: Any) -> DictConfig:
    """``node`` merged onto ``config_class`` (unknown keys refused), validated by the dataclass; the typed node
    stays a DictConfig so a run can still edit it (e.g. the budget's cap on ``max_new_tokens``)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_class), node)
        OmegaConf.to_object(merged)  # runs __post_init__
    except OmegaConfBaseException as exc:
        raise CRLConfigError(f"task config: {exc}".splitlines()[0]) from exc
    return merged


TASK_CONFIGS = {"mmlu": MMLUConfig, "bbq": BBQConfig, "gsm8k": GSM8KConfig, "xstest": XSTestConfig,
                "harmbench": HarmBenchConfig, "known_answer": KnownAnswerConfig}
