"""What every benchmark provides: rows from local upstream files or the hub, one schema, splits, prompts, scores.

A task reads *upstream-format* rows (``read_local`` from ``$CRL_DATA_DIR/<task>/...`` or ``read_hub`` through
``datasets.load_dataset``; hub rows are first mapped to the upstream layout), normalises each to an
``Example`` (malformed rows are skipped, counted and warned about), assigns seeded splits, builds prompts and
scores completions into per-example records from which the metrics are computed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crl_exp.errors import CRLConfigError
from crl_exp.tasks import splits as splitting
from crl_exp.tasks.config import TaskConfig, typed_task_node
from crl_exp.tasks.schema import LETTERS, Example

log = logging.getLogger(__name__)

MALFORMED_ERRORS = (KeyError, ValueError, TypeError, IndexError, AttributeError)
HELDOUT_PARTS = ("dev", "confirm", "all")


class Task(ABC):
    """Base class; subclasses set ``name``/``kind`` and implement reading, normalising, prompting, scoring."""
    config_class = TaskConfig  # the typed task/ node (tasks/config.py)

    name: str = ""
    kind: str = ""  # multiple_choice | generation | refusal
    folder: str = ""

    def __init__(self, cfg: Any, data_dir: str | Path | None = None, judge=None):
        self.cfg = typed_task_node(self.config_class, cfg)  # every field present and validated: no .get defaults
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.judge = judge
        self.seed = int(self.cfg.split_seed)
        self.n_malformed = 0
        self.malformed_examples: list[str] = []
        self._by_split: dict[str, list[Example]] | None = None

    # ------------------------------------------------------------------ loading
    @property
    def root(self) -> Path:
        if self.data_dir is None:
            raise CRLConfigError(f"No data folder for task {self.name}: set CRL_DATA_DIR or data_dir=...")
        folder = self.data_dir / self.folder
        if not folder.is_dir():
            raise CRLConfigError(
                f"Benchmark folder for {self.name} not found: looked at {str(folder)!r}. Point CRL_DATA_DIR "
                f"(or data_dir=...) at the folder holding {self.folder}/, or use task.source=hub.")
        return folder

    def require_file(self, path: Path) -> Path:
        if not path.is_file():
            raise CRLConfigError(f"Missing {self.name} file {str(path)!r}; expected the upstream file layout "
                                 f"(see ../shared/benchmarks/README.md), or use task.source=hub.")
        return path

    @abstractmethod
    def read_local(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(upstream split, upstream row) pairs from the local files."""

    @abstractmethod
    def read_hub(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(upstream split, upstream-layout row) pairs from the Hugging Face hub."""

    @abstractmethod
    def to_example(self, upstream_split: str, row: dict[str, Any], index: int) -> Example:
        """Normalise one upstream row; raise one of MALFORMED_ERRORS if it is malformed."""

    def assign_split(self, ex: Example) -> str:
        """Default: seeded fractions over everything (tasks with an upstream test split override this)."""
        return splitting.assign(ex.id, self.seed, dict(self.cfg.split_fractions))

    # Config key naming the subset filter (e.g. ``subjects``) and the Example attribute it filters on.
    subset_key: str | None = None

    def subset_value(self, ex: Example) -> str:
        return ex.group

    def keep(self, ex: Example) -> bool:
        """Rows that are task items (e.g. not few-shot pool rows); subsets are applied separately."""
        return True

    def hub_dataset(self, split: str, name: str | None = None):
        """``datasets.load_dataset`` for ``task.hub`` (``data_files`` lets tests feed hub-format local files)."""
        import datasets

        hub = self.cfg.hub
        data_files = hub.data_files
        kwargs = {"data_files": dict(data_files)} if data_files else {}
        if name is None:
            name = hub.name
        return datasets.load_dataset(str(hub.path), name, split=split, **kwargs)

    def _load(self) -> dict[str, list[Example]]:
        rows = self.read_local() if self.cfg.source == "local" else self.read_hub()
        by_split: dict[str, list[Example]] = {s: [] for s in splitting.SPLITS}
        requested = set(self.cfg[self.subset_key] or []) if self.subset_key else set()
        seen: set[str] = set()
        for index, (upstream_split, row) in enumerate(rows):
            try:
                ex = self.to_example(upstream_split, row, index)
            except MALFORMED_ERRORS as exc:
                self.n_malformed += 1
                if len(self.malformed_examples) < 5:
                    self.malformed_examples.append(f"row {index} ({upstream_split}): {type(exc).__name__}: {exc}")
                continue
            if not self.keep(ex):
                continue
            value = self.subset_value(ex)
            seen.add(value)
            if not requested or value in requested:
                by_split[self.assign_split(ex)].append(ex)
        unknown = requested - seen
        if unknown:
            raise CRLConfigError(f"Unknown {self.name} {self.subset_key}: {sorted(unknown)}. Valid: {sorted(seen)}")
        if self.n_malformed:
            log.warning("%s: skipped %d malformed rows, e.g. %s", self.name, self.n_malformed,
                        "; ".join(self.malformed_examples))
        return by_split

    def split(self, name: str, limit: int | None = None) -> list[Example]:
        """Examples of one split, optionally a seeded subset of ``limit`` (order-independent)."""
        if name not in splitting.SPLITS:
            raise CRLConfigError(f"Unknown split {name!r}; valid: {splitting.SPLITS}")
        if self._by_split is None:
            self._by_split = self._load()
        examples = self._by_split[name]
        keep = splitting.subsample([e.id for e in examples], limit, self.seed)
        return [examples[i] for i in keep]

    def representative(self, name: str, limit: int | None) -> list[Example]:
        """A seeded subset of a split covering every group (subject, category) as evenly as ``limit`` allows."""
        examples = self.split(name)
        keep = splitting.stratified_subsample([e.id for e in examples], [str(e.group) for e in examples], limit,
                                              self.seed)
        return [examples[i] for i in keep]

    def analysis_sample(self, examples: list[Example], n: int | None) -> list[int]:
        """Indices of ``n`` of ``examples`` for a logged or analysed sample (intervention log, top features, critic
        groups, the table-vs-rollout check), stratified by group: held-out subsets keep file order, so their first
        ``n`` would be one BBQ category or the first MMLU subjects."""
        order = splitting.stratified_order([e.id for e in examples], [str(e.group) for e in examples], self.seed)
        return order if n is None else order[:n]

    def cluster(self, ex: Example) -> str:
        """The unit of near-twin examples (a BBQ template, an MMLU subject, an XSTest contrast pair, a HarmBench
        context): intervals resample whole clusters, and the dev/confirmation cut never splits one."""
        return ex.id

    def confirm_unit(self, ex: Example) -> str:
        """What the dev/confirmation cut hashes: the cluster, so near-twins never sit on both sides."""
        return self.cluster(ex)

    def heldout(self, part: str, limit: int | None = None) -> list[Example]:
        """A representative (stratified by group) subset of one part of the test split.

        The test split is cut, by a seeded hash of each example's cluster, into ``dev`` (what runs, sweeps and
        ``make train`` score) and ``confirm`` (``task.confirm_fraction`` of the clusters: scored only when asked,
        ``eval.heldout=confirm``, for the recorded answer). ``all`` is the whole split."""
        if part not in HELDOUT_PARTS:
            raise CRLConfigError(f"eval.heldout={part!r}: valid parts are {', '.join(HELDOUT_PARTS)}")
        fraction = float(self.cfg.confirm_fraction)
        examples = [ex for ex in self.split("test")
                    if part == "all" or (splitting.unit_hash("confirm:" + self.confirm_unit(ex), self.seed) < fraction)
                    == (part == "confirm")]
        keep = splitting.stratified_subsample([e.id for e in examples], [str(e.group) for e in examples], limit,
                                              self.seed)
        return [examples[i] for i in keep]

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in splitting.SPLITS}

    # ------------------------------------------------------------------ prompting
    @abstractmethod
    def user_text(self, ex: Example) -> str:
        """The prompt body (few-shot examples included) before any chat/base template."""

    def few_shot_prefix(self, ex: Example) -> str | None:
        """The leading part of ``user_text(ex)`` that many prompts share (few-shot exemplars), or ``None``.
        Generation caches its KV once per model and starts every prompt from it (``generation.PrefixStore``)."""
        return None

    @property
    def primary_key(self) -> str:
        """The metric a comparison decides on (``task.primary_metric``, ``{judge}`` filled in with the judge)."""
        judge = self.judge.name if self.judge is not None else ""
        return str(self.cfg.primary_metric).format(judge=judge)

    @property
    def max_new_tokens(self) -> int:
        return int(self.cfg.max_new_tokens)

    @property
    def stop_strings(self) -> list[str]:
        return list(self.cfg.stop_strings or [])

    def option_letters(self, ex: Example) -> str:
        return LETTERS[: len(ex.choices)]

    def scored_token_groups(self, tokenizer, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token ids, group index of each id) whose first-step probabilities the rollout sums per group and
        returns to ``score_batch``, for tasks scored on token sets other than option letters; ``None``: the
        option letters of ``scored_letters``."""
        return None

    def action_pool(self) -> list[int] | None:
        """A task-defined action space (features), when the task was designed for one (``known_answer``)."""
        return None

    def static_candidates(self) -> list[int]:
        """Features the static baseline tries on validation besides its own ranking (a task that knows them)."""
        return []

    def scored_letters(self, batch: list[Example]) -> str:
        """Option letters whose first-step probabilities the rollout must return ("" = none needed)."""
        return ""

    # ------------------------------------------------------------------ scoring
    def reference_answers(self, batch: list[Example]) -> list[str] | None:
        """Reference answer texts whose likelihood after the completion is the reward
        (``task.reward=reference_likelihood``; generation computes it), else ``None``."""
        return None

    reference_marker: str | None = None  # where a completion's own final answer starts (cut before scoring)

    def add_reference_likelihood(self, records: list[dict[str, Any]], likelihoods: list[float]) -> None:
        """Record each episode's reference likelihood; it is the reward (the metric stays exact match)."""
        for rec, p in zip(records, likelihoods, strict=True):
            rec["reference_likelihood"] = p
            rec["reward"] = p

    @abstractmethod
    def score_batch(self, examples: list[Example], prompts: list[str], completions: list[str],
                    option_probs: torch.Tensor | None) -> list[dict[str, Any]]:
        """Per-example records: at least ``parsed``, ``valid``, ``correct``, ``reward``."""

    @abstractmethod
    def metrics_from_records(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Task metrics from per-example records (used for the estimate and every bootstrap resample)."""
