"""Hydra multiruns: joblib in parallel, failing jobs, skipping finished jobs, submitit, Ray, the sweep table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from crl_exp.saes import resid_post_hook_name

from helpers import save_standard_sae


@pytest.fixture
def sweep_env(tmp_path, tiny_model_dir, data_dir):
    save_standard_sae(tmp_path / "sae", 64, resid_post_hook_name(1), d_sae=32)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["model=hf", f"model.path={tiny_model_dir}", "sae=local", f"sae.path={tmp_path / 'sae'}",
            f"logger.tracking_uri={db}", f"data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    return tmp_path, db, base


def multirun(tmp_path, args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "crl_exp", "-m", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def sweep_runs(db, prefix="crl-"):
    client = MlflowClient(db)
    (exp,) = [e for e in client.search_experiments() if "-sweep-" in e.name and e.name.startswith(prefix)]
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep_parent"]
    children = [r for r in runs if r.data.tags.get("kind") != "sweep_parent"]
    return client, exp, parents, children


@pytest.mark.slow
def test_joblib_parallel_training_sweep_logs_children_under_one_parent(sweep_env):
    tmp_path, db, base = sweep_env
    multirun(tmp_path, ["+experiment=bbq_layer12", *base, "sae.layer=1", "seed=0,1",
                        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "budget.iterations=2",
                        "budget.episodes_per_iteration=4", "budget.group_size=2", "budget.eval_examples=4",
                        "budget.static_feature.train_examples=4", "budget.static_feature.candidates=1",
                        "masking=none", "steering.coefficient_scale=absolute", "steering.coefficient=5",
                        "eval.n_bootstrap=20", "trainer.progress_bar=false"])
    client, exp, parents, children = sweep_runs(db, "crl-bbq")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs_finished"] == "2"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep_config.yaml", "sweep_overrides.txt"}
    assert sorted(c.data.tags["seed"] for c in children) == ["0", "1"]
    policies = []
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["task"] == "bbq" and child.data.tags["masking"] == "none"
        assert child.data.tags["layer"] == "1"
        assert "heldout/crl/accuracy" in child.data.metrics and "delta/crl_minus_none/accuracy" in child.data.metrics
        ckpt = client.download_artifacts(child.info.run_id, "checkpoints/last.ckpt", str(tmp_path / child.info.run_id))
        policies.append(torch.load(ckpt, weights_only=False)["state_dict"])
    assert any(not torch.equal(policies[0][k], policies[1][k]) for k in policies[0])  # seeds: different policies
    # the sweep table lists both seeds and aggregates them (CI including seed variance)
    proc = subprocess.run([sys.executable, "-m", "crl_exp", "mode=compare_sweep", f"compare.experiment_name={exp.name}",
                           f"logger.tracking_uri={db}", "logger.experiment_name=summaries"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Over seeds" in proc.stdout and "| 0,1 |" in proc.stdout


def eval_sweep_args(base, features="0,999"):
    return ["mode=eval", "task=bbq", "steering=static", f"steering.feature={features}", "steering.coefficient=1",
            "steering.coefficient_scale=absolute", "sae.layer=1", "eval.limit=4", "eval.n_bootstrap=10", *base]


@pytest.mark.slow
def test_failing_job_is_recorded_and_others_finish_then_rerun_skips(sweep_env):
    tmp_path, db, base = sweep_env
    multirun(tmp_path, eval_sweep_args(base))  # feature 999 does not exist in a 32-feature SAE
    client, exp, parents, children = sweep_runs(db, "crl-exp")
    by_feature = {c.data.params["steering.feature"]: c for c in children}
    assert by_feature["0"].info.status == "FINISHED"
    failed = by_feature["999"]
    assert failed.info.status == "FAILED"
    error = client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))
    assert "steering.feature=999 is out of range" in open(error).read()
    assert parents[0].data.tags["jobs_failed"] == "1" and parents[0].info.status == "FAILED"

    # Rerunning the same sweep skips the finished job and retries the failed one.
    multirun(tmp_path, eval_sweep_args(base))
    client, exp, parents, children = sweep_runs(db, "crl-exp")
    assert len([c for c in children if c.data.params["steering.feature"] == "0"]) == 1
    assert len([c for c in children if c.data.params["steering.feature"] == "999"]) == 2
    newest_parent = max(parents, key=lambda p: p.info.start_time)
    assert newest_parent.data.tags["jobs_skipped"] == "1"
    # ... unless forced.
    multirun(tmp_path, [*eval_sweep_args(base), "sweep.force=true"])
    client, exp, parents, children = sweep_runs(db, "crl-exp")
    assert len([c for c in children if c.data.params["steering.feature"] == "0"]) == 2

    # The sweep table: one row per job with its held-out metric.
    proc = subprocess.run([sys.executable, "-m", "crl_exp", "mode=compare_sweep", f"compare.experiment_name={exp.name}",
                           f"logger.tracking_uri={db}", "logger.experiment_name=summaries"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| bbq | 1 |" in proc.stdout and "FAILED" in proc.stdout


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(sweep_env):
    tmp_path, db, base = sweep_env
    multirun(tmp_path, [*eval_sweep_args(base, "0"), "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"])
    client, exp, parents, children = sweep_runs(db, "crl-exp")
    assert [c.info.status for c in children] == ["FINISHED"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="hydra-ray-launcher is an optional extra (.[ray]); it pins cloudpickle<3, which conflicts "
                           "with joblib>=1.6 used by the joblib launcher, so the test env does not install it")
def test_ray_local_launcher_runs_a_job(sweep_env):
    tmp_path, db, base = sweep_env
    multirun(tmp_path, [*eval_sweep_args(base, "0"), "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=1"])
    client, exp, parents, children = sweep_runs(db, "crl-exp")
    assert [c.info.status for c in children] == ["FINISHED"]


def test_skip_cache_key_changes_with_the_code_version():
    """A rerun after a code change must not reuse runs made by the old code (the key hashed the config only)."""
    from hydra import compose, initialize_config_dir

    from crl_exp.paths import CONFIG_DIR
    from crl_exp.tracking.provenance import git_commit
    from crl_exp.tracking.sweep import config_hash

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config")
    assert config_hash(cfg, "abc123") == config_hash(cfg, "abc123")
    assert config_hash(cfg, "abc123") != config_hash(cfg, "def456")
    assert config_hash(cfg, "abc123") != config_hash(cfg, "abc123-dirty-0badc0de")
    assert config_hash(cfg) == config_hash(cfg, git_commit())


@pytest.mark.slow
def test_sweep_logs_through_a_real_mlflow_server_without_loss_or_duplicates(sweep_env):
    """`make mlflow-server`'s command (SQLite backend, artifacts served over HTTP): a 4-job sweep, 2 in parallel,
    logs every child run and every iteration's metric exactly once through the HTTP URI."""
    import socket
    import time
    import urllib.request

    tmp_path, _, base = sweep_env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                               str(tmp_path / "server-artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        args = [a for a in base if not a.startswith("logger.tracking_uri=")]
        multirun(tmp_path, ["+experiment=bbq_layer12", *args, f"logger.tracking_uri={uri}", "sae.layer=1",
                            "seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "budget.iterations=2",
                            "budget.episodes_per_iteration=4", "budget.group_size=2", "budget.eval_examples=4",
                            "budget.static_feature.train_examples=4", "budget.static_feature.candidates=1",
                            "budget.static_feature.oracle_candidates=2", "budget.eval_sampled_seeds=1",
                            "masking=none", "steering.coefficient_scale=absolute", "steering.coefficient=5",
                            "eval.n_bootstrap=20", "trainer.progress_bar=false"])
        client, exp, parents, children = sweep_runs(uri, "crl-bbq")
        assert len(parents) == 1 and sorted(c.data.tags["seed"] for c in children) == ["0", "1", "2", "3"]
        for child in children:
            assert child.info.status == "FINISHED"
            history = client.get_metric_history(child.info.run_id, "train/reward_mean")
            assert sorted(m.step for m in history) == [0, 1]  # each iteration exactly once
            assert "heldout/crl/accuracy" in child.data.metrics
        assert parents[0].data.tags["jobs_finished"] == "4"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_confirmation_ledger_does_not_make_the_checkout_dirty(tmp_path):
    """Each confirmation run appends to the ledger inside the checkout, and record scripts write results between
    seeds; the next run's commit must stay clean (code changes still make it dirty)."""
    import subprocess

    from crl_exp.tracking.provenance import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "code")
    (tmp_path / "experiments" / "confirmation_ledger.jsonl").write_text('{"seed": 0}\n')
    for record in ("results/run_s0.json", "figures/curve.png", "report.md"):  # records written between seeds
        (tmp_path / "experiments" / record).parent.mkdir(exist_ok=True)
        (tmp_path / "experiments" / record).write_text("{}")
    clean = git_commit(tmp_path)
    assert "dirty" not in clean and len(clean) == 40
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit.__wrapped__(tmp_path).startswith(f"{clean}-dirty-")


def test_every_recorded_group_is_an_experiment_file_that_composes_with_its_seeds():
    """The recorded grid is Hydra: each group under conf/experiment/grid/ (and the answer's answer_*) composes, runs
    in train mode, names its MLflow experiment and runs, and lists the seeds its one multirun command sweeps."""
    from hydra import compose, initialize_config_dir

    from crl_exp.paths import CONFIG_DIR

    files = sorted((CONFIG_DIR / "experiment").glob("grid/*.yaml")) + sorted((CONFIG_DIR / "experiment").glob("answer_*.yaml"))
    assert len(files) >= 30
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for f in files:
            name = f.relative_to(CONFIG_DIR / "experiment").with_suffix("").as_posix()
            cfg = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
            assert cfg.mode == "train", name
            assert "${seed}" in OmegaConf.to_container(cfg.logger)["run_name"], name
            assert str(cfg.hydra.sweeper.params.seed).replace(" ", "") in ("0,1,2", "0"), name
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        long = compose("config", overrides=["+experiment=grid/cpu_long_margin"])
        assert long.budget.name == "cpu_long" and long.task.reward == "margin" and long.policy.action_pool == 32
        answer = compose("config", overrides=["+experiment=answer_bbq"])
        assert (answer.eval.heldout, answer.ppo.advantage, answer.policy.action_pool) == ("confirm", "all_actions", 32)
