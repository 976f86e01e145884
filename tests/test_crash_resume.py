"""Training survives a real crash: SIGKILL in the middle of an iteration, resume from ``last.ckpt``, and the MLflow
run holds every iteration's metrics exactly once and the same final policy as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from crl_exp.crl.trainer import RunOwnedMLFlowLogger
from crl_exp.saes.loading import resid_post_hook_name

from helpers import save_standard_sae

ITERATIONS = 8


def train_cmd(tmp_path, tiny_model_dir, data_dir, name: str, *extra: str, run_dir: str | None = None) -> list[str]:
    return [sys.executable, "-m", "crl_exp", "+experiment=bbq_layer12", "model=hf", f"model.path={tiny_model_dir}",
            "sae=local", f"sae.path={tmp_path / 'sae'}", "sae.layer=1", f"budget.iterations={ITERATIONS}",
            "budget.episodes_per_iteration=8", "budget.group_size=2", "budget.eval_examples=4",
            "budget.eval_sampled_seeds=2", "budget.static_feature.train_examples=4", "budget.static_feature.candidates=2",
            "budget.static_feature.oracle_candidates=4", "masking.min_unmasked=4", "steering.coefficient_scale=absolute",
            "steering.coefficient=5", "eval.n_bootstrap=20", f"logger.tracking_uri=sqlite:///{tmp_path / name}.db",
            f"hydra.run.dir={tmp_path / (run_dir or name)}", "trainer.progress_bar=false", f"data_dir={data_dir}",
            "ppo.advantage=group", *extra]  # the resume mechanics as recorded with PPO (auto: sampled_set)


def train_metrics(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("train/") and "seconds" not in k
            and k != "train/update_to_rollout"]  # wall-clock timings differ between any two runs
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.slow
def test_sigkill_mid_iteration_then_resume_logs_each_iteration_once_and_matches_an_uninterrupted_run(
        tmp_path, tiny_model_dir, data_dir):
    save_standard_sae(tmp_path / "sae", 64, resid_post_hook_name(1), d_sae=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(train_cmd(tmp_path, tiny_model_dir, data_dir, "whole"), capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    crashed = subprocess.Popen(train_cmd(tmp_path, tiny_model_dir, data_dir, "crash"), cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # iteration 2's checkpoint is written at the end of its epoch: the process is then between iterations 2 and 3
    # (last.ckpt may still be iteration 1's), so the kill lands inside an iteration that is not checkpointed
    marker = tmp_path / "crash" / "checkpoints" / "iter-epoch=0002.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and crashed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert crashed.poll() is None, "the run ended before it could be killed"
    os.kill(crashed.pid, signal.SIGKILL)
    crashed.wait()
    client = MlflowClient(f"sqlite:///{tmp_path / 'crash'}.db")
    (killed,) = client.search_runs([client.get_experiment_by_name("crl-bbq").experiment_id])
    assert killed.info.status == "RUNNING"  # a SIGKILLed process cannot close its run
    logged_before = len(client.get_metric_history(killed.info.run_id, "train/reward_mean"))
    assert 2 <= logged_before < ITERATIONS

    last = tmp_path / "crash" / "checkpoints" / "last.ckpt"
    resumed = subprocess.run(train_cmd(tmp_path, tiny_model_dir, data_dir, "crash", f"trainer.ckpt_path={last}",
                                       run_dir="resumed"),
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    (run,) = client.search_runs([client.get_experiment_by_name("crl-bbq").experiment_id])  # the same run, continued
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == str(last)
    got = train_metrics(client, run.info.run_id)
    whole_client = MlflowClient(f"sqlite:///{tmp_path / 'whole'}.db")
    (reference,) = whole_client.search_runs([whole_client.get_experiment_by_name("crl-bbq").experiment_id])
    expected = train_metrics(whole_client, reference.info.run_id)
    assert set(got) == set(expected) and "train/reward_mean" in got
    for key, points in got.items():
        assert [s for s, _ in points] == list(range(ITERATIONS)), key  # every iteration exactly once
        assert [v for _, v in points] == pytest.approx([v for _, v in expected[key]], rel=1e-6, abs=1e-9), key
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    uninterrupted = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert final.keys() == uninterrupted.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, uninterrupted[name]), name
    # the run's training curve and summary cover the iterations before the crash too
    history = client.download_artifacts(run.info.run_id, "heldout/summary.json", str(tmp_path))
    import json

    assert [h["iteration"] for h in json.loads(open(history).read())["train_history"]] == list(range(ITERATIONS))


def test_a_resumed_logger_does_not_log_an_iteration_twice(tmp_path):
    """An iteration logged before a crash but never checkpointed is computed again on resume: not logged again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("resume", artifact_location=str(tmp_path / "art")))
    for step in range(3):
        client.log_metric(run.info.run_id, "train/reward_mean", 0.1 * step, step=step)
    logger = RunOwnedMLFlowLogger(experiment_name="resume", tracking_uri=uri, run_id=run.info.run_id, resumed=True)
    logger.log_metrics({"train/reward_mean": 0.2, "train/entropy": 1.0}, step=2)
    logger.log_metrics({"train/reward_mean": 0.3, "train/entropy": 0.9}, step=3)
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/reward_mean"))
    assert steps == [0, 1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/entropy")) == [2, 3]
