"""Gemma Scope 2 for the users with a hub: every shipped config names a catalogued SAE of the right hook and width,
bad combinations are refused before anything loads, and the release's saved format loads and steers offline."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from crl_exp.errors import CRLConfigError
from crl_exp.paths import CONFIG_DIR
from crl_exp.saes import gemma_scope_2
from crl_exp.saes.loading import load_sae, preflight_sae

SHIPPED = [("gemmascope2_res", "gemma3_270m_hub"), ("gemmascope2_res", "gemma3_270m_it"),
           ("gemmascope2_res_all", "gemma3_270m_hub"), ("gemmascope2_res_all", "gemma3_270m_it"),
           ("gemmascope2_1b_res", "gemma3_1b_it")]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("sae, model", SHIPPED)
@pytest.mark.parametrize("variant", ["pt", "it"])
def test_every_shipped_config_names_a_catalogued_residual_sae_of_the_models_width(sae, model, variant):
    cfg = composed(f"sae={sae}", f"model={model}", f"sae.variant={variant}")
    release, sid = gemma_scope_2.resolve(cfg.sae)
    assert (release, sid) == (cfg.sae.release, cfg.sae.sae_id)  # the YAML's derived names are the checked ones
    entry = gemma_scope_2.catalogue()[release]
    assert sid in entry.saes_map
    assert gemma_scope_2.hook_of(release, sid) == f"blocks.{cfg.sae.layer}.hook_resid_post"
    assert gemma_scope_2.GEMMA3_D_MODEL[cfg.sae.size] == cfg.model.d_model
    base = entry.model.removesuffix("-it").removesuffix("-pt")
    assert cfg.model.path.removesuffix("-it").removesuffix("-pt") == base  # the same Gemma 3 size
    preflight_sae(cfg.sae, cfg.model.d_model)


@pytest.mark.parametrize("overrides, message", [
    (["sae.layer=6"], r"no SAE at sae.layer=6; its layers: \[5, 9, 12, 15\]"),
    (["sae.width=2m"], r"the \(width, l0\) choices are .*width=16k l0=medium"),
    (["sae.kind=res-all", "sae.l0=medium"], r"width=16k l0=big, width=16k l0=small"),
    (["sae.size=3b"], r"No Gemma Scope 2 release 'gemma-scope-2-3b-pt-res'"),
])
def test_combinations_the_catalogue_lacks_are_refused_with_the_valid_choices(overrides, message):
    cfg = composed("sae=gemmascope2_res", "model=gemma3_270m_hub", *overrides)
    with pytest.raises(CRLConfigError, match=message):
        preflight_sae(cfg.sae, cfg.model.d_model)


def test_a_size_that_does_not_match_the_model_is_refused_before_loading():
    from crl_exp.app import preflight

    cfg = composed("+experiment=scope2_layer12", "sae=gemmascope2_1b_res", "sae.layer=13")  # 1B SAEs, 270M model
    with pytest.raises(CRLConfigError, match="d_in=1152 does not match the model's d_model=640"):
        preflight(cfg)


def write_gemma_scope_2_folder(path, d_in: int, d_sae: int = 32, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({"w_enc": torch.randn(d_in, d_sae, generator=g), "w_dec": torch.randn(d_sae, d_in, generator=g),
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in), "threshold": torch.full((d_sae,), 0.5)},
              str(path / "params.safetensors"))


def test_the_saved_format_loads_as_a_jumprelu_sae_and_steers(tiny_lm, tmp_path):
    from crl_exp.generation import generate
    from crl_exp.steering.controllers import StaticController
    from crl_exp.steering.directions import SteeringDirections
    from crl_exp.steering.hook import ResidualSteerer

    write_gemma_scope_2_folder(tmp_path / "sae", tiny_lm.d_model)
    cfg = composed("sae=gemmascope2_local", f"sae.path={tmp_path / 'sae'}", "sae.layer=1").sae
    loaded = load_sae(cfg, tiny_lm)
    assert type(loaded.sae).__name__ == "JumpReLUSAE" and loaded.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(4, tiny_lm.d_model)
    pre = x @ loaded.sae.W_enc + loaded.sae.b_enc
    assert torch.allclose(loaded.sae.encode(x), torch.where(pre > 0.5, torch.relu(pre), torch.zeros_like(pre)), atol=1e-5)
    steerer = ResidualSteerer(tiny_lm.model, 1, SteeringDirections.from_decoder(loaded.sae.W_dec))
    plain = generate(tiny_lm, ["Hello there"], 4).completions
    steered = generate(tiny_lm, ["Hello there"], 4, steerer, StaticController(3, 50.0)).completions
    assert steered != plain
    (tmp_path / "bad").mkdir()
    with pytest.raises(CRLConfigError, match="expected params.safetensors"):
        preflight_sae(composed("sae=gemmascope2_local", f"sae.path={tmp_path / 'bad'}").sae, tiny_lm.d_model)
    write_gemma_scope_2_folder(tmp_path / "wide", tiny_lm.d_model + 8)
    with pytest.raises(CRLConfigError, match="does not match the model's d_model"):
        preflight_sae(composed("sae=gemmascope2_local", f"sae.path={tmp_path / 'wide'}", "sae.layer=1").sae,
                      tiny_lm.d_model)


@pytest.mark.integration
def test_a_gemma_scope_2_folder_steers_the_embedded_model_with_a_measured_residual_norm(tmp_path, data_dir):
    """The path a hub user takes, offline: the embedded Gemma 3 270M, a 640-wide SAE in the release's format at
    layer 12, the coefficient scaled by the residual norm measured for it (pretrained SAEs carry none)."""
    from crl_exp.episodes import build_env
    from crl_exp.generation import generate
    from crl_exp.steering.controllers import StaticController
    from crl_exp.tasks import build_task

    write_gemma_scope_2_folder(tmp_path / "sae", 640, d_sae=64)
    cfg = composed("+experiment=bbq_layer12", "sae=gemmascope2_local", f"sae.path={tmp_path / 'sae'}",
                   "sae.layer=12", "steering.coefficient=0.5")
    env = build_env(cfg, build_task(cfg.task, data_dir))
    assert env.sae.d_sae == 64 and env.steerer.directions.coefficient_scale == "resid_norm"
    assert env.steerer.directions.resid_norm > 100  # Gemma's residuals are in the thousands
    prompt = ["The capital of France is"]
    plain = generate(env.lm, prompt, 6).completions
    steered = generate(env.lm, prompt, 6, env.steerer, StaticController(5, env.coefficient)).completions
    assert steered != plain


def test_precision_and_the_screened_head_follow_the_hardware(tiny_model_dir):
    """model.dtype=auto: bf16 only where it is native; the screened greedy head (a bf16 screen proven on CPUs) only
    on a CPU with native bf16, never on CUDA; both choices recorded with the machine's capability."""
    from omegaconf import OmegaConf

    from crl_exp.models import hardware
    from crl_exp.models.loading import load_language_model

    cpu = torch.device("cpu")
    assert hardware.auto_dtype(cpu) == (torch.bfloat16 if hardware.cpu_native_bf16() else torch.float32)
    assert hardware.screened_head_default(torch.device("cuda")) is False
    assert hardware.screened_head_default(cpu) == hardware.cpu_native_bf16()
    cfg = OmegaConf.create({"name": "tiny", "source": "hf", "path": str(tiny_model_dir), "dtype": "auto",
                            "device": "cpu"})
    lm = load_language_model(cfg)
    assert next(lm.model.parameters()).dtype == hardware.auto_dtype(cpu)
    assert lm.info["dtype"] == str(hardware.auto_dtype(cpu)).removeprefix("torch.")
    assert lm.screened_greedy_head == hardware.cpu_native_bf16() and "cpu_capability" in lm.info["machine"]
    forced = load_language_model(OmegaConf.merge(cfg, {"dtype": "float32", "screened_greedy_head": False}))
    assert next(forced.model.parameters()).dtype == torch.float32 and forced.screened_greedy_head is False


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_end_to_end_at_tiny_shapes(tmp_path):
    """benchmarks/gpu_throughput.py --smoke: the script a GPU session runs, checked here on the CPU at tiny shapes
    (its figures mean nothing here; on a GPU they are the README's)."""
    import importlib.util
    import json

    from crl_exp.paths import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("gpu_throughput", PROJECT_ROOT / "benchmarks" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--out", str(tmp_path / "gpu.json"), "--ppo-iterations", "1"])
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert set(summary["models"]) == set(module.MODELS) and "cpu_capability" in summary["machine"]
    assert all(m["steered_tokens_per_s"] > 0 and m["ppo_update_over_rollout"] > 0 for m in summary["models"].values())
