"""The five benchmarks behind one interface (``Task``): rows, splits, prompts, scoring, metrics."""

from __future__ import annotations

import importlib
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


def task_class(cfg: Any) -> type[Task]:
    """``cfg.cls`` (``module:Class``, so a new task needs only its module and its config file), else a built-in
    task by ``cfg.name``."""
    path = cfg.get("cls")
    if not path:
        if cfg.name not in TASKS:
            raise CRLConfigError(f"Unknown task {cfg.name!r}; valid: {', '.join(TASKS)} (or set task.cls)")
        return TASKS[cfg.name]
    module, _, name = str(path).partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CRLConfigError(f"task.cls={path!r} cannot be imported ({exc}); expected 'module:Class'") from exc
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise CRLConfigError(f"task.cls={path!r} is not a Task subclass")
    return cls


def build_task(cfg: Any, data_dir: str | Path | None) -> Task:
    """The task a ``task/`` config node names; refusal tasks get the configured judge."""
    cls = task_class(cfg)
    task = cls(cfg, data_dir or default_data_dir())  # the task types its node (tasks/config.py)
    if cls.kind == "refusal":
        task.judge = build_judge(task.cfg.judge)
    return task


__all__ = ["TASKS", "Example", "Task", "build_task"]
