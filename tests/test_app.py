"""The Hydra app end to end on a tiny local model: modes, MLflow records and pre-flight errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from mlflow.tracking import MlflowClient

from crl_exp.app import check_rollout_memory, preflight, run
from crl_exp.errors import CRLConfigError, MissingDependencyError
from crl_exp.paths import CONFIG_DIR
from crl_exp.saes import resid_post_hook_name

from helpers import save_standard_sae

CONF = str(CONFIG_DIR)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture
def tiny_sae_dir(tmp_path):
    path = tmp_path / "sae"
    sae = save_standard_sae(path, 64, resid_post_hook_name(1), d_sae=32)
    return path, sae


@pytest.mark.slow
def test_steer_command_prints_side_by_side_and_logs_to_mlflow(tmp_path, tiny_model_dir, tiny_sae_dir):
    db = tmp_path / "mlflow.db"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "crl_exp", "mode=steer", "model=hf", f"model.path={tiny_model_dir}", "sae=local",
           f"sae.path={tiny_sae_dir[0]}", "sae.layer=1", "steering.feature=3", "steering.coefficient=80",
           "steering.coefficient_scale=absolute", f"logger.tracking_uri=sqlite:///{db}",
           "prompts=[Hello there,A longer prompt here]", "generation.max_new_tokens=6", f"hydra.run.dir={out}",
           f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline" in proc.stdout and "| steered" in proc.stdout
    assert "PROMPT: 'A longer prompt here'" in proc.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("crl-exp")
    (run_,) = client.search_runs([exp.experiment_id])
    assert run_.info.status == "FINISHED"
    assert run_.data.params["model.path"] == str(tiny_model_dir)
    assert run_.data.params["steering.feature"] == "3"
    assert run_.data.tags["outputs_dir"] == str(out)
    assert len(run_.data.tags["git_commit"]) >= 40
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"config.yaml", "package_versions.json", "steering", "hydra"} <= artifacts
    rows = json.loads(Path(client.download_artifacts(run_.info.run_id, "steering/side_by_side.json",
                                                     str(tmp_path))).read_text())
    assert [r["prompt"] for r in rows] == ["Hello there", "A longer prompt here"]
    assert any(r["baseline"] != r["steered"] for r in rows)  # coefficient 80 on a tiny model moves the text
    versions = json.loads(Path(client.download_artifacts(run_.info.run_id, "package_versions.json",
                                                         str(tmp_path))).read_text())
    assert versions["torch"].startswith("2.13.0")
    assert run_.data.metrics["steer/changed_share"] > 0


def test_zero_coefficient_steer_in_process_changes_nothing(tmp_path, tiny_model_dir, tiny_sae_dir):
    cfg = compose_cfg(["mode=steer", "model=hf", f"model.path={tiny_model_dir}", "sae=local",
                       f"sae.path={tiny_sae_dir[0]}", "sae.layer=1", "steering.coefficient=0",
                       "steering.coefficient_scale=absolute", f"logger.tracking_uri=sqlite:///{tmp_path / 'db'}",
                       "generation.max_new_tokens=5"])
    from crl_exp.modes.steer import run as run_static_steering
    from crl_exp.tracking import start_tracked_run

    with start_tracked_run(cfg) as tracker:
        rows = run_static_steering(cfg, tracker)
    assert rows and all(r["baseline"] == r["steered"] for r in rows)


@pytest.mark.parametrize("overrides, error, message", [
    (["sae.layer=18"], CRLConfigError, r"sae\.layer=18 is out of range: the model has 18 layers, valid 0\.\.17"),
    (["sae.layer=-1"], CRLConfigError, r"valid 0\.\.17"),
    (["model.package=no-such-model-pkg"], MissingDependencyError, r"pip install no-such-model-pkg"),
    (["sae=local", "sae.path=/nonexistent/sae"], CRLConfigError, r"No sae-lens SAE"),
])
def test_bad_config_fails_fast_before_loading(tmp_path, overrides, error, message):
    cfg = compose_cfg(overrides + [f"logger.tracking_uri=sqlite:///{tmp_path / 'db'}"])
    with pytest.raises(error, match=message):
        run(cfg)
    assert not (tmp_path / "db").exists()  # refused before any run (or work) started


def test_local_sae_width_checked_against_known_model_before_loading(tmp_path, tiny_sae_dir):
    cfg = compose_cfg(["sae=local", f"sae.path={tiny_sae_dir[0]}", "sae.layer=1",
                       f"logger.tracking_uri=sqlite:///{tmp_path / 'db'}"])
    with pytest.raises(CRLConfigError, match="d_in=64 does not match the model's d_model=640"):
        run(cfg)


def test_unwritable_cache_dir_fails_fast(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = compose_cfg([f"cache_dir={tmp_path / 'file' / 'sub'}", f"logger.tracking_uri=sqlite:///{tmp_path / 'db'}"])
    with pytest.raises(CRLConfigError, match="not writable"):
        run(cfg)


def test_unknown_model_sae_and_mode_names_list_the_options():
    with pytest.raises(MissingConfigException, match=r"(?s)mode/fly.*compare_layers.*train_sae"):
        compose_cfg(["mode=fly"])
    with pytest.raises(MissingConfigException, match="gemma3_270m"):
        compose_cfg(["model=llama_9000"])
    with pytest.raises(MissingConfigException, match="gemmascope_2b_res_16k"):
        compose_cfg(["sae=mystery"])


def test_paper_configs_compose():
    cfg = compose_cfg(["model=gemma2_2b", "sae=gemmascope_2b_res_16k", "sae.layer=20"])
    assert cfg.model.path == "google/gemma-2-2b-it" and cfg.model.dtype == "bfloat16"
    assert cfg.sae.release == "gemma-scope-2b-pt-res-canonical"
    assert cfg.sae.sae_id == "layer_20/width_16k/canonical"


@pytest.mark.parametrize("overrides, message", [
    (["+experiment=gsm8k_layer12", "budget=paper"], r"budget=paper is for model\(s\) \['gemma2_2b', 'gemma3_1b_it'\]"),
    (["+experiment=gsm8k_layer12", "model=gemma2_2b", "sae=gemmascope_2b_res_16k"], r"budget=cpu expects model.device=cpu, got cuda"),
    (["+experiment=gsm8k_layer12", "masking=fixed", "masking.threshold=0.0001"], r"could mask all"),
    (["+experiment=gsm8k_layer12", "+ppo.clip=0.1"], r"Unknown PPOConfig keys: \['clip'\]"),
    (["+experiment=gsm8k_layer12", "+policy.coefficient=0.5"], r"Unknown PolicyConfig keys: \['coefficient'\]"),
    (["+experiment=mmlu_layer12", "budget.group_size=3"], r"group_size=3 must divide"),
    (["+experiment=mmlu_layer12", "ppo.advantage=group", "budget.group_size=1"], r"set budget.group_size >= 2"),
    (["+experiment=mmlu_layer12", "ppo.advantage=reinforce"], r"ppo.advantage must be one of auto, gae, group, all_actions, sampled_set"),
    (["+experiment=gsm8k_layer12", "ppo.advantage=sampled_set"], r"sampled_set needs a one-token task"),
    (["+experiment=gsm8k_layer12", "ppo.advantage=all_actions"], r"all_actions needs a one-token task"),
    (["+experiment=bbq_layer12", "ppo.lr=-1"], r"ppo.lr=-1.0 is invalid: it must be > 0"),
    (["+experiment=bbq_layer12", "ppo.gamma=1.5"], r"ppo.gamma=1.5 is invalid: it must be in \(0, 1\]"),
    (["+experiment=bbq_layer12", "budget.iterations=0"], r"budget.iterations=0 is invalid: it must be an integer >= 1"),
    (["+experiment=bbq_layer12", "budget.static_feature.candidates=0"], r"budget.static_feature.candidates=0"),
    (["+experiment=bbq_layer12", "steering.coefficient=nan"], r"steering.coefficient=nan is invalid"),
    (["+experiment=mmlu_layer12", "budget.episodes_per_iteration=8192", "budget.group_size=512"],
     r"a rollout of 8192 rows x \(3200 prompt \+ 1 new\) tokens of gemma3_270m needs an estimated \d+\.\d GiB "
     r"\(weights 1.00 GiB, kv_cache .*more than the .* GiB of available RAM"),
    (["+experiment=gsm8k_layer12", "budget.max_memory_gb=1"], r"more than the 1.0 GiB allowed by budget.max_memory_gb"),
    (["+experiment=mmlu_layer12", "policy.action_pool=8"], r"policy.action_pool=8 must exceed masking.min_unmasked=\d+"),
    (["+experiment=mmlu_layer12", "policy.action_pool=5000"], r"policy.action_pool=5000 must be in"),
])
def test_incompatible_training_configs_fail_before_loading(tmp_path, overrides, message):
    cfg = compose_cfg(overrides + [f"logger.tracking_uri=sqlite:///{tmp_path / 'db'}"])
    with pytest.raises(CRLConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "db").exists()


def test_experiment_appends_and_sets_training_mode():
    cfg = compose_cfg(["+experiment=mmlu_layer12"])
    assert cfg.mode == "train" and cfg.task.name == "mmlu" and cfg.sae.layer == 12 and cfg.task.reward == "dense"
    assert cfg.logger.experiment_name == "crl-mmlu"
    for name in ("gsm8k", "bbq", "harmbench", "xstest"):
        assert compose_cfg([f"+experiment={name}_layer12"]).task.name == name


def config_options() -> list[tuple[str, str]]:
    """Every (group, option) under conf/ that a user can pick on the command line."""
    return sorted((path.parent.name, path.stem) for path in CONFIG_DIR.glob("*/*.yaml")
                  if path.parent.name not in ("experiment", "hydra"))


@pytest.mark.parametrize("group, option", config_options())
def test_every_config_option_composes_and_passes_preflight(group, option, tmp_path, tiny_model_dir, tiny_sae_dir):
    # groups that come with a mode (conf/mode/<mode>.yaml) are picked together with it
    mode = {"policy": "train", "ppo": "train", "masking": "train", "trainer": "train", "budget": "train",
            "analysis": "train", "eval": "eval"}.get(group)
    overrides = [f"{group}={option}"] + ([f"mode={mode}"] if mode else [])
    if group == "budget" and option == "paper":
        overrides += ["model=gemma2_2b", "sae=gemmascope_2b_res_16k"]
    if group == "model" and option == "hf":
        overrides += [f"model.path={tiny_model_dir}", "sae=local", f"sae.path={tiny_sae_dir[0]}", "sae.layer=1"]
    if group == "sae" and option == "local":
        overrides += ["model=hf", f"model.path={tiny_model_dir}", f"sae.path={tiny_sae_dir[0]}", "sae.layer=1"]
    if group == "model" and option == "gemma2_2b" or group == "sae" and option == "gemmascope_2b_res_16k":
        overrides += ["model=gemma2_2b", "sae=gemmascope_2b_res_16k"]
    if group == "model" and option == "gemma3_1b_it" or group == "sae" and option == "gemmascope2_1b_res":
        overrides += ["model=gemma3_1b_it", "sae=gemmascope2_1b_res"]
    if group == "sae" and option == "gemmascope2_local":  # a folder in Gemma Scope 2's format, on the tiny model
        from test_gemma_scope_2 import write_gemma_scope_2_folder

        write_gemma_scope_2_folder(tmp_path / "scope2", 64)
        overrides += ["model=hf", f"model.path={tiny_model_dir}", f"sae.path={tmp_path / 'scope2'}", "sae.layer=1"]
    cfg = compose_cfg(overrides + [f"cache_dir={tmp_path / 'cache'}"])
    preflight(cfg)


def test_a_misspelled_typed_key_fails_at_composition_with_its_name():
    with pytest.raises(ConfigCompositionException, match=r"ppo\.clip"):
        compose_cfg(["+experiment=gsm8k_layer12", "ppo.clip=0.1"])
    with pytest.raises(ConfigCompositionException, match=r"masking\.treshold"):
        compose_cfg(["+experiment=gsm8k_layer12", "masking.treshold=0.1"])


SMALL_SAE = ["sae.training.d_sae=64", "sae.training.k=4", "sae.training.train_tokens=1500",
             "sae.training.heldout_tokens=300", "sae.training.context_size=32", "sae.training.epochs=1",
             "sae.training.batch_size=64", "sae.training.harvest_batch_size=8"]


def test_train_sae_mode_trains_several_layers_in_one_pass(tmp_path, tiny_model_dir, data_dir):  # corpus: benchmarks
    db = tmp_path / "db"
    cfg = compose_cfg(["mode=train_sae", "model=hf", f"model.path={tiny_model_dir}", "sae.layers=[0,2]", "sae.layer=0",
                       f"cache_dir={tmp_path / 'cache'}", f"logger.tracking_uri=sqlite:///{db}", *SMALL_SAE])
    run(cfg)
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trained = sorted(r.data.tags["layer"] for r in runs if r.data.tags.get("kind") == "sae_training")
    assert trained == ["0", "2"]
    main = next(r for r in runs if r.data.tags.get("kind") != "sae_training")
    assert {"sae/L0/explained_variance", "sae/L2/explained_variance"} <= set(main.data.metrics)
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "saes").rglob("crl_manifest.json")]
    assert len(manifests) == 2 and all(m["harvested_layers"] == [0, 2] for m in manifests)
    with pytest.raises(CRLConfigError, match="out of range"):
        preflight(compose_cfg(["mode=train_sae", "sae.layers=[3,30]"]))


def test_a_layer_sweep_prepares_its_saes_once_before_its_jobs(tmp_path, tiny_model_dir, data_dir):
    from crl_exp.modes.train_sae import SweepSAEs, swept_layers

    assert swept_layers(["task=mmlu", "sae.layer=4,8,12"]) == [4, 8, 12]
    assert swept_layers(["sae.layer=12", "seed=0,1"]) == []
    assert swept_layers(["sae.layer=12", "sae.layer=3,6"]) == []  # the command line's single layer wins
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        sweep = compose("config", overrides=["+experiment=layer_sweep"], return_hydra_config=True)
    params = sweep.hydra.sweeper.params
    assert swept_layers([f"{k}={v}" for k, v in params.items()]) == [3, 6, 9, 12, 15]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["model=hf", f"model.path={tiny_model_dir}",
                                           f"cache_dir={tmp_path / 'cache'}", *SMALL_SAE], return_hydra_config=True)
    cfg.hydra.overrides.task = ["sae.layer=0,1"]
    SweepSAEs().on_multirun_start(cfg)
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "saes").rglob("crl_manifest.json")]
    assert len(manifests) == 2 and all(m["harvested_layers"] == [0, 1] for m in manifests)


def test_cpu_budget_sizes_the_heldout_set_by_generation_length():
    from crl_exp.crl.config import heldout_size

    mmlu, gsm8k = compose_cfg(["+experiment=mmlu_layer12"]), compose_cfg(["+experiment=gsm8k_layer12"])
    assert heldout_size(mmlu.budget, mmlu.task.max_new_tokens) == 200
    assert heldout_size(gsm8k.budget, gsm8k.task.max_new_tokens) == 64
    paper = compose_cfg(["+experiment=gsm8k_layer12", "budget=paper"])
    assert heldout_size(paper.budget, 512) is None
    cpu = mmlu.budget
    assert cpu.iterations * cpu.episodes_per_iteration >= 800 and cpu.episodes_per_iteration % cpu.group_size == 0


def test_safety_experiments_on_the_instruct_model_compose_and_pass_preflight(tmp_path):
    for task in ("xstest", "harmbench"):
        cfg = compose_cfg([f"+experiment={task}_smollm2", f"cache_dir={tmp_path}"])
        assert (cfg.model.name, cfg.task.template, cfg.sae.layer, cfg.task.name) == (
            "smollm2_135m_instruct", "chat", 20, task)
        assert cfg.sae.layer == round(2 * cfg.model.n_layers / 3)
        preflight(cfg)


@pytest.mark.slow  # starts the app in a subprocess
@pytest.mark.parametrize("override, message", [
    ("sae.layer=30", "sae.layer=30 is out of range: the model has 18 layers, valid 0..17"),
    ("model.package=no-such-model-pkg", "pip install no-such-model-pkg"),
])
def test_configuration_errors_reach_the_user_as_one_line_not_a_traceback(tmp_path, override, message):
    proc = subprocess.run([sys.executable, "-m", "crl_exp", override, f"hydra.run.dir={tmp_path / 'out'}",
                           f"logger.tracking_uri=sqlite:///{tmp_path / 'db'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("crl-exp: error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr


def test_no_budget_caps_gsm8k_below_a_chain_of_thought():
    from crl_exp.crl.config import apply_budget

    for budget in ("cpu", "paper"):
        cfg = compose_cfg(["+experiment=gsm8k_layer12", f"budget={budget}"])
        apply_budget(cfg)
        assert cfg.task.max_new_tokens >= 128, budget
    xstest = compose_cfg(["+experiment=xstest_layer12"])
    apply_budget(xstest)
    assert xstest.task.max_new_tokens == 48  # tasks without a floor keep the budget's cap


def test_cpu_long_budget_holds_at_least_500_heldout_examples_for_mmlu_and_bbq():
    from crl_exp.crl.config import heldout_size

    for task in ("mmlu", "bbq"):
        cfg = compose_cfg([f"+experiment={task}_layer12", "budget=cpu_long"])
        assert heldout_size(cfg.budget, cfg.task.max_new_tokens) >= 500
        assert cfg.budget.iterations * cfg.budget.episodes_per_iteration >= 2000


def test_damaged_checkpoint_and_unreachable_tracking_server_fail_before_work(tmp_path):
    import socket

    good = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"policy.w": torch.ones(3)}, "afm": {}, "epoch": 1}, good)
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(blob[: len(blob) // 2])
    db = [f"logger.tracking_uri=sqlite:///{tmp_path / 'db'}"]
    preflight(compose_cfg(["+experiment=bbq_layer12", f"trainer.ckpt_path={good}", *db]))
    with pytest.raises(CRLConfigError, match=r"truncated.ckpt is unreadable .*truncated or corrupted"):
        preflight(compose_cfg(["+experiment=bbq_layer12", f"trainer.ckpt_path={truncated}", *db]))
    with pytest.raises(CRLConfigError, match=r"no such file"):
        preflight(compose_cfg(["+experiment=bbq_layer12", f"trainer.ckpt_path={tmp_path / 'none.ckpt'}", *db]))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CRLConfigError, match=rf"MLflow tracking server http://127.0.0.1:{port} cannot be reached"):
        preflight(compose_cfg(["mode=steer", f"logger.tracking_uri=http://127.0.0.1:{port}"]))


@pytest.mark.parametrize("task", ["gsm8k", "mmlu", "bbq", "xstest", "harmbench"])
def test_paper_budget_fits_one_80gb_gpu_for_every_task(task):
    """budget=paper (64 episodes, eval batches of 32, each task's longest prompt) passes the pre-load memory check
    for Gemma-2 2B on an 80 GB GPU, and would be refused on a 16 GB one."""
    overrides = [f"+experiment={task}_layer12", "budget=paper", "model=gemma2_2b", "sae=gemmascope_2b_res_16k"]
    check_rollout_memory(compose_cfg([*overrides, "budget.max_memory_gb=80"]))
    if task == "mmlu":  # the 5-shot prompts make it the largest
        with pytest.raises(CRLConfigError, match=r"needs an estimated .* GiB"):
            check_rollout_memory(compose_cfg([*overrides, "budget.max_memory_gb=16"]))


def test_mode_eval_reports_the_primary_metric_with_the_interval_mode_train_uses(tmp_path, tiny_model_dir,
                                                                                 tiny_sae_dir, data_dir):
    """mode=eval and mode=train share ``condition_summary``: the primary metric's interval is the clustered
    proportion interval, not a bootstrap of the same share (what the old ``episodes.summarize`` gave)."""
    from crl_exp.evaluation.comparison import clusters_of
    from crl_exp.modes.eval import run as run_eval
    from crl_exp.stats import proportion_interval
    from crl_exp.tracking import start_tracked_run

    db = tmp_path / "db"
    cfg = compose_cfg(["mode=eval", "task=bbq", "model=hf", f"model.path={tiny_model_dir}", "sae=local",
                       f"sae.path={tiny_sae_dir[0]}", "sae.layer=1", "steering=none", "eval.split=validation",
                       "eval.limit=12", "eval.n_bootstrap=50", f"logger.tracking_uri=sqlite:///{db}",
                       f"data_dir={data_dir}", f"cache_dir={tmp_path / 'cache'}"])
    with start_tracked_run(cfg) as tracker:
        result = run_eval(cfg, tracker)
        run_id = tracker.run_id
    table = json.loads(Path(MlflowClient(f"sqlite:///{db}").download_artifacts(
        run_id, "eval/bbq/validation/none/examples.json", str(tmp_path))).read_text())
    records = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]] if "columns" in table else [
        {k: table[k][i] for k in table} for i in range(len(table["id"]))]
    expected = proportion_interval([float(r["correct"]) > 0.5 for r in records], clusters_of(records))
    assert result["n"] == len(records) == 12
    assert result["ci95"]["accuracy"] == pytest.approx(list(expected))
