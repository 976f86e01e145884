"""The five benchmarks behind one interface (``Task``): rows, splits, prompts, scoring, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crl_exp.errors import CRLConfigError
from crl_exp.paths import default_data_dir
from crl_exp.tasks.base import Task
from crl_exp.tasks.bbq import BBQTask
from crl_exp.tasks.gsm8k import GSM8KTask
from crl_exp.tasks.harmbench import HarmBenchTask
from crl_exp.tasks.judges import build_judge
from crl_exp.tasks.mmlu import MMLUTask
from crl_exp.tasks.schema import Example
from crl_exp.tasks.xstest import XSTestTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (MMLUTask, BBQTask, GSM8KTask, HarmBenchTask, XSTestTask)}


def build_task(cfg: Any, data_dir: str | Path | None) -> Task:
    """The task named by a ``task/`` config node; refusal tasks get the configured judge."""
    if cfg.name not in TASKS:
        raise CRLConfigError(f"Unknown task {cfg.name!r}; valid: {', '.join(TASKS)}")
    cls = TASKS[cfg.name]
    judge = build_judge(cfg.judge) if cls.kind == "refusal" else None
    return cls(cfg, data_dir or default_data_dir(), judge=judge)


__all__ = ["TASKS", "Example", "Task", "build_task"]
