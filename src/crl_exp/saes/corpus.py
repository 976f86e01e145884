"""Offline text for SAE training: the *training* splits of the benchmark files (no hub, no test text).

GSM8K train (~1.5M tokens) and the MMLU dev rows (the few-shot pool) hold most of the text; BBQ, XSTest and
HarmBench contribute the prompts of their task's own *train* split (the same seeded split the tasks use, so
validation and test prompts are never read). Texts are interleaved so every source is represented even when the
token budget is small, and the SAE sees the distribution every task steers.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

from crl_exp.errors import CRLConfigError
from crl_exp.paths import config_option

_CALC = re.compile(r"<<[^>]*>>")


def _gsm8k_train(root: Path) -> Iterator[str]:
    with (root / "gsm8k" / "train.jsonl").open() as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                yield f"Question: {row['question']}\nAnswer: {_CALC.sub('', row['answer'])}"


def _mmlu_dev(root: Path) -> Iterator[str]:
    for path in sorted((root / "mmlu" / "dev").glob("*_dev.csv")):
        subject = path.stem.removesuffix("_dev").replace("_", " ")
        with path.open(newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 6:
                    q, a, b, c, d, ans = row[:6]
                    yield (f"The following is a question about {subject}.\n{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n"
                           f"Answer: {ans}")


def _task_train(name: str):
    """The prompt bodies (``Task.user_text``) of a task's train split."""
    def read(root: Path) -> Iterator[str]:
        from crl_exp.tasks import build_task

        cfg = config_option("task", name)  # the typed node's default judge is enough to read prompts
        task = build_task(cfg, root)
        for ex in task.split("train"):
            yield task.user_text(ex)
    return read


# What the on-the-fly residual norm of an SAE without one is measured on (``saes/resid_norm.py``).
RESID_NORM_SOURCES = ["gsm8k_train", "mmlu_dev", "bbq_train", "xstest_train", "harmbench_train"]

SOURCES = {"gsm8k_train": _gsm8k_train, "mmlu_dev": _mmlu_dev, "bbq_train": _task_train("bbq"),
           "xstest_train": _task_train("xstest"), "harmbench_train": _task_train("harmbench")}


def benchmark_corpus(data_dir: str | Path, sources: list[str]) -> Iterator[str]:
    """Interleave the named sources' texts (round-robin), reading the files in place."""
    root = Path(data_dir)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise CRLConfigError(f"Unknown corpus source(s) {unknown}; valid: {sorted(SOURCES)}")
    if not root.is_dir():
        raise CRLConfigError(
            f"Benchmark data folder {str(root)!r} not found. Point CRL_DATA_DIR (or data_dir=...) at the folder "
            f"holding gsm8k/, mmlu/, ... (by default ../shared/benchmarks beside the checkout)."
        )
    iters = [SOURCES[s](root) for s in sources]
    for group in zip_longest(*iters):
        for text in group:
            if text is not None:
                yield text
