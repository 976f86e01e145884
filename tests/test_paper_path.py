"""The paper-scale path (``model=gemma2_2b sae=gemmascope_2b_res_16k budget=paper``) on CPU, with the same formats:
a tiny Gemma-2 saved as a local HF folder (``model=hf``, bf16, chat template) and a tiny JumpReLU SAE written as
Gemma Scope publishes it (``params.npz`` under ``layer_L/width_16k/average_l0_N`` of ``google/gemma-scope-2b-pt-res``)
in an offline Hugging Face cache, so ``SAE.from_pretrained(release, sae_id)`` runs unchanged. Only the budget's
sizes and its device are overridden down."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from crl_exp.models.loading import freeze

from helpers import byte_tokenizer

GEMMA_SCOPE_REPO = "google/gemma-scope-2b-pt-res"
D_MODEL, D_SAE, LAYER = 2304, 16384, 1  # Gemma Scope's 2b widths: sae-lens derives d_in from the repo id
CHAT_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                 "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def gemma_scope_cache(root, layer: int, seed: int = 0) -> None:
    """A Hugging Face hub cache holding one Gemma Scope residual SAE (the canonical 16k of ``layer``)."""
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    repo_id, folder = get_repo_id_and_folder_name("gemma-scope-2b-pt-res-canonical", f"layer_{layer}/width_16k/canonical")
    assert repo_id == GEMMA_SCOPE_REPO
    revision = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    target = repo / "snapshots" / revision / folder
    target.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((D_SAE, D_MODEL), dtype=np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    np.savez(target / "params.npz", W_enc=np.ascontiguousarray(w_dec.T * 0.05), W_dec=w_dec,
             b_enc=np.zeros(D_SAE, np.float32), b_dec=np.zeros(D_MODEL, np.float32),
             threshold=np.full(D_SAE, 0.01, np.float32))


def tiny_gemma2_folder(path) -> None:
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=264, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                       sliding_window=32, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    freeze(Gemma2ForCausalLM(cfg)).to(torch.bfloat16).save_pretrained(path)
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)


@pytest.mark.slow
def test_paper_budget_runs_end_to_end_with_gemma_scope_format_and_a_local_gemma2(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient

    hub = tmp_path / "hub"
    gemma_scope_cache(hub, LAYER)
    tiny_gemma2_folder(tmp_path / "gemma2")
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "crl_exp", "+experiment=gsm8k_layer12", "budget=paper",
           "model=hf", f"model.path={tmp_path / 'gemma2'}", "model.dtype=bfloat16", "model.chat_template=true",
           "sae=gemmascope_2b_res_16k", f"sae.layer={LAYER}",
           # the budget's sizes and device, down to CPU scale; every other setting is budget=paper's
           "budget.models=[hf]", "budget.device=cpu", "budget.iterations=2", "budget.episodes_per_iteration=4",
           "budget.group_size=2", "budget.max_new_tokens_cap=512", "budget.eval_examples=3",
           "budget.eval_examples_generating=3", "budget.eval_batch_size=3", "budget.eval_sampled_seeds=2",
           "budget.static_feature.train_examples=2", "budget.static_feature.candidates=2",
           "task.max_new_tokens=4", "task.max_new_tokens_floor=4", "eval.n_bootstrap=20",
           "analysis.at_end_of_training=false", f"cache_dir={tmp_path / 'cache'}", f"data_dir={data_dir}",
           f"logger.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'out'}", "trainer.progress_bar=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("crl-gsm8k").experiment_id])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert sorted(x.step for x in client.get_metric_history(run.info.run_id, "train/reward_mean")) == [0, 1]
    for cond in ("none", "random", "static", "crl"):
        assert f"heldout/{cond}/exact_match" in m
    assert run.data.params["sae.source"] == "pretrained"
    assert run.data.tags["action_space"] == f"full:{D_SAE}"
    # the Gemma Scope SAE carries no residual-norm statistic: it was measured on train text and cached
    assert list((tmp_path / "cache").rglob("resid_norm*.json"))
