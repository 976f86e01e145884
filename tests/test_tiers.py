"""Test tiers a contributor can use: data-dependent tests skip with their reason where the benchmark files are
absent (and fail in CI, so a missing folder never passes it), and the fast tier deselects the slow ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | env_extra
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_data_tests_skip_with_a_reason_without_the_benchmarks_and_fail_in_ci(tmp_path):
    target = "tests/test_tasks.py::test_documented_split_sizes"
    missing = {"CRL_DATA_DIR": str(tmp_path / "no-benchmarks")}
    local = run_pytest(missing, target, "-rs")
    assert local.returncode == 0 and "1 skipped" in local.stdout and "benchmark data not found" in local.stdout
    ci = run_pytest(missing | {"CI": "true"}, target)
    assert ci.returncode != 0 and "1 error" in ci.stdout and "benchmark data not found" in ci.stdout


def test_the_data_marker_and_the_timeout_are_configured(pytestconfig):
    markers = "\n".join(pytestconfig.getini("markers"))
    assert "data:" in markers and "slow:" in markers
    assert float(pytestconfig.getini("timeout")) > 0


def test_runs_are_named_after_what_they_ran():
    from hydra import compose, initialize_config_dir

    from crl_exp.paths import CONFIG_DIR
    from crl_exp.tracking.mlflow_run import descriptive_run_name

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        train = compose("config", overrides=["+experiment=bbq_layer12", "policy.action_pool=32", "seed=3"])
        steer = compose("config", overrides=["mode=steer"])
    assert descriptive_run_name(train) == "train-bbq-gemma3_270m-L12-pool32-independent-auto-s3"
    assert descriptive_run_name(steer).startswith("steer-")
    # what the app names them: the estimator auto resolved to, the known-answer design's pool
    from crl_exp.app import run_name

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        bbq = compose("config", overrides=["+experiment=bbq_layer12", "policy.action_pool=32", "seed=3"])
        known = compose("config", overrides=["+experiment=known_answer_layer12"])
        dictionary = compose("config", overrides=["+experiment=known_answer_dictionary", "seed=1"])
        gsm8k = compose("config", overrides=["+experiment=gsm8k_layer12"])
    assert run_name(bbq) == "train-bbq-gemma3_270m-L12-pool32-independent-sampled_set-s3"
    assert "-pool32-" in run_name(known) and "auto" not in run_name(known)
    assert run_name(dictionary).endswith("-dict-independent-sampled_set-s1")
    assert "-gae-" in run_name(gsm8k) and "auto" not in run_name(gsm8k)
