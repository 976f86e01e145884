"""A known-answer task: the best feature provably depends on the prompt, built from the real model and SAE.

Prompts are real MMLU questions of K subjects (the *classes*; the subject header makes the class visible in the
prompt, zero-shot). Class k is paid the full-vocabulary probability of its own target token set T_k at the
steered step. The design (``crl_exp.known_answer``) picks, from exact steered next-token distributions on *train*
prompts, K features of an action pool whose steering puts mass on K disjoint token sets, each far more than any
other pool feature does: so the best feature differs between classes, the class oracle (each class's best train
feature) beats any single static feature by a wide margin, and a policy that reads the class off the state can
recover that margin. Like CleanRL's environments with known scores, it proves that the learner learns.

``correct`` = the class's target set holds more mass than every other class's set (the binary metric the
intervals need); the reward is the mass itself.
"""

from __future__ import annotations

from typing import Any

import torch

from crl_exp.errors import CRLConfigError
from crl_exp.tasks.config import KnownAnswerConfig
from crl_exp.tasks.metrics import GroupedMean
from crl_exp.tasks.mmlu import MMLUTask
from crl_exp.tasks.schema import Example


class KnownAnswerTask(MMLUTask):
    config_class = KnownAnswerConfig  # the typed task/ node (tasks/config.py)
    name = "known_answer"
    kind = "known_answer"
    folder = "mmlu"

    def __init__(self, cfg: Any, data_dir=None, judge=None):
        super().__init__(cfg, data_dir, judge)
        self.classes = list(cfg.subjects or [])
        if len(self.classes) < 4:
            raise CRLConfigError(f"task=known_answer needs at least 4 classes (task.subjects), got {self.classes}")
        self.targets: list[list[int]] | None = None  # token ids of each class's target set (from the design)
        self.design_pool: list[int] | None = None  # the action pool the design was made for (None: the dictionary)
        self.extra_static: list[int] = []  # features the static baseline also tries (dictionary designs)

    def set_design(self, targets: list[list[int]], pool: list[int] | None, static_candidates=()) -> None:
        if len(targets) != len(self.classes) or any(not t for t in targets):
            raise ValueError(f"{len(self.classes)} classes need one non-empty target set each, got {targets}")
        self.targets = [list(map(int, t)) for t in targets]
        self.design_pool = None if pool is None else list(map(int, pool))
        self.extra_static = list(map(int, static_candidates))

    def require_design(self) -> list[list[int]]:
        if self.targets is None:
            raise CRLConfigError("task=known_answer has no design yet: it is made from the loaded model and SAE "
                                 "(crl_exp.known_answer_design.design_task, called when the environment is built)")
        return self.targets

    def cluster(self, ex: Example) -> str:
        """Questions are independent draws; the subjects are the design's strata (every sample holds all four),
        not clusters of near-twins, so intervals resample questions."""
        return ex.id

    def class_of(self, ex: Example) -> int:
        return self.classes.index(ex.group)

    def action_pool(self) -> list[int] | None:
        return self.design_pool

    def static_candidates(self) -> list[int]:
        return self.extra_static

    def scored_token_groups(self, tokenizer, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor] | None:
        targets = self.require_design()
        ids = [t for group in targets for t in group]
        owner = [k for k, group in enumerate(targets) for _ in group]
        return torch.tensor(ids), torch.tensor(owner)

    def score_batch(self, examples, prompts, completions, option_probs):
        if option_probs is None:
            raise ValueError("known_answer scores the first step's target-set probabilities; none were returned")
        records = []
        for i, ex in enumerate(examples):
            k = self.class_of(ex)
            mass = option_probs[i]
            records.append({"parsed": completions[i][:8], "valid": True, "group": ex.group,
                            "correct": float(int(mass.argmax()) == k), "reward": float(mass[k]),
                            "class_mass": float(mass[k]), "other_mass": float(mass.sum() - mass[k])})
        return records

    def group_names(self) -> list[str]:
        return self.classes

    def metrics_from_records(self, records: list[dict[str, Any]]) -> dict[str, float]:
        metric = GroupedMean("accuracy", self.classes)
        if records:
            metric.update(torch.tensor([r["correct"] for r in records]),
                          torch.tensor([self.classes.index(r["group"]) for r in records]))
        out = metric.compute()
        out["reward"] = sum(r["reward"] for r in records) / max(1, len(records))
        return out
