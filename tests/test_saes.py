"""SAE loading (sae-lens formats), validation against the steered model, and training on a tiny model."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from sae_lens import SAE

from crl_exp.cache_integrity import read_manifest
from crl_exp.errors import CRLConfigError
from crl_exp.saes import load_sae, resid_post_hook_name
from crl_exp.saes.activations import collect_resid_post, collect_resid_post_layers, pack_tokens, tokenize_texts
from crl_exp.saes.loading import prepare_trained_saes
from crl_exp.saes.training import SAETrainingSettings, evaluate_sae, train_topk_sae

from helpers import save_standard_sae

TEXTS = [f"Question {i}: what is {i} plus {i + 3}? The answer is {2 * i + 3}." for i in range(200)]


def local_cfg(path, layer: int, **extra):
    return OmegaConf.create({"source": "local", "path": str(path), "layer": layer, **extra})


def test_sae_lens_round_trip_via_local_config(tmp_path, tiny_lm):
    original = save_standard_sae(tmp_path / "sae", tiny_lm.d_model, resid_post_hook_name(1))
    loaded = load_sae(local_cfg(tmp_path / "sae", 1), tiny_lm)
    assert loaded.hook_name == "blocks.1.hook_resid_post"
    assert loaded.d_sae == 32
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, loaded.sae.state_dict()[name]), name
    x = torch.randn(5, tiny_lm.d_model)
    assert torch.allclose(original.encode(x), loaded.sae.encode(x))


def test_width_mismatch_is_refused(tmp_path, tiny_lm):
    save_standard_sae(tmp_path / "sae", tiny_lm.d_model + 8, resid_post_hook_name(1))
    with pytest.raises(CRLConfigError, match=r"d_in=72 does not match the model's d_model=64"):
        load_sae(local_cfg(tmp_path / "sae", 1), tiny_lm)


def test_hook_mismatch_is_refused_unless_overridden(tmp_path, tiny_lm):
    save_standard_sae(tmp_path / "sae", tiny_lm.d_model, resid_post_hook_name(0))
    with pytest.raises(CRLConfigError, match=r"steering blocks\.2\.hook_resid_post.*blocks\.0\.hook_resid_post"):
        load_sae(local_cfg(tmp_path / "sae", 2), tiny_lm)
    loaded = load_sae(local_cfg(tmp_path / "sae", 2, allow_hook_mismatch=True), tiny_lm)
    assert loaded.layer == 2


def test_layer_out_of_range_names_the_valid_range(tmp_path, tiny_lm):
    save_standard_sae(tmp_path / "sae", tiny_lm.d_model, resid_post_hook_name(1))
    with pytest.raises(CRLConfigError, match=r"valid 0\.\.2"):
        load_sae(local_cfg(tmp_path / "sae", 7), tiny_lm)


def test_missing_local_sae_and_unknown_source(tmp_path, tiny_lm):
    with pytest.raises(CRLConfigError, match="No sae-lens SAE"):
        load_sae(local_cfg(tmp_path / "nowhere", 1), tiny_lm)
    with pytest.raises(CRLConfigError, match="Unknown sae.source"):
        load_sae(OmegaConf.create({"source": "neuronpedia", "layer": 1}), tiny_lm)


def test_harvest_drops_bos_and_matches_a_plain_forward(tiny_lm):
    tokenized = tokenize_texts(tiny_lm.tokenizer, TEXTS, max_tokens=600)
    rows = pack_tokens(tokenized, context_size=32, bos_token_id=tiny_lm.tokenizer.bos_token_id)
    assert (rows[:, 0] == tiny_lm.tokenizer.bos_token_id).all()
    acts = collect_resid_post(tiny_lm.model, 1, rows, batch_size=4)
    assert acts.shape == (rows.shape[0] * 31, tiny_lm.d_model)
    with torch.no_grad():
        hidden = tiny_lm.model(input_ids=rows[:1], output_hidden_states=True).hidden_states[2]  # after block 1
    assert torch.allclose(acts[:31], hidden[0, 1:], atol=1e-5)


@pytest.mark.slow
def test_training_reduces_reconstruction_error(tiny_lm):
    tokenized = tokenize_texts(tiny_lm.tokenizer, TEXTS, max_tokens=6000)
    rows = pack_tokens(tokenized, 32, tiny_lm.tokenizer.bos_token_id)
    acts = collect_resid_post(tiny_lm.model, 1, rows, batch_size=16)
    train, heldout = acts[:-512], acts[-512:]
    settings = SAETrainingSettings(d_sae=128, k=8, epochs=1, batch_size=64, lr=1e-3, context_size=32)
    short = train_topk_sae(train[:128], SAETrainingSettings(**{**settings.__dict__, "epochs": 1}), "tiny",
                           resid_post_hook_name(1))
    trained = train_topk_sae(train, SAETrainingSettings(**{**settings.__dict__, "epochs": 6}), "tiny",
                             resid_post_hook_name(1))
    before, after = evaluate_sae(short, heldout), evaluate_sae(trained, heldout)
    assert after["mse"] < 0.7 * before["mse"]
    assert after["explained_variance"] > before["explained_variance"]
    assert after["l0"] <= 8 + 1e-6
    assert isinstance(trained, SAE) and trained.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def trained_cfg(layer=1, **training):
    base = dict(d_sae=64, k=4, train_tokens=1500, heldout_tokens=300, context_size=32, epochs=2, batch_size=64,
                lr=1e-3, harvest_batch_size=8, seed=0)
    return OmegaConf.create({"source": "trained", "layer": layer, "corpus": ["gsm8k_train", "mmlu_dev"],
                             "training": {**base, **training}})


def test_trained_sae_is_cached_then_rebuilt_when_corrupted(tmp_path, tiny_lm, data_dir):
    seen = []
    first = load_sae(trained_cfg(), tiny_lm, data_dir=data_dir, cache_dir=tmp_path, on_trained=seen.append)
    assert first.info["trained_now"] and len(seen) == 1
    assert set(first.metrics) >= {"explained_variance", "l0", "dead_feature_share", "resid_norm"}
    assert first.metrics["l0"] <= 4 + 1e-6
    second = load_sae(trained_cfg(), tiny_lm, data_dir=data_dir, cache_dir=tmp_path, on_trained=seen.append)
    assert not second.info["trained_now"] and len(seen) == 1
    assert torch.equal(first.sae.W_dec, second.sae.W_dec)
    # Damage the weights file: the manifest check notices and the SAE is retrained.
    weights = next(p for p in (tmp_path / "saes").rglob("sae_weights.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    third = load_sae(trained_cfg(), tiny_lm, data_dir=data_dir, cache_dir=tmp_path, on_trained=seen.append)
    assert third.info["trained_now"] and len(seen) == 2
    # Other settings -> another cache entry.
    other = load_sae(trained_cfg(k=2), tiny_lm, data_dir=data_dir, cache_dir=tmp_path)
    assert other.info["key"] != first.info["key"]


def test_unwritable_cache_dir_is_refused(tmp_path, tiny_lm, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CRLConfigError, match="not writable"):
        load_sae(trained_cfg(), tiny_lm, data_dir=data_dir, cache_dir=blocker / "cache")


def test_one_harvest_for_several_layers_equals_one_per_layer(tiny_lm):
    tokenized = tokenize_texts(tiny_lm.tokenizer, TEXTS, max_tokens=600)
    rows = pack_tokens(tokenized, context_size=32, bos_token_id=tiny_lm.tokenizer.bos_token_id)
    together = collect_resid_post_layers(tiny_lm.model, [2, 0, 1], rows, batch_size=4)
    assert sorted(together) == [0, 1, 2]
    for layer in (0, 1, 2):
        assert torch.equal(together[layer], collect_resid_post(tiny_lm.model, layer, rows, batch_size=4))


def test_several_layers_trained_in_one_pass_are_the_single_layer_saes(tmp_path, tiny_lm, data_dir):
    """``prepare_trained_saes`` caches under the same keys as one-layer training, with the same weights."""
    prepared = prepare_trained_saes(trained_cfg(), tiny_lm, [0, 2], data_dir=data_dir, cache_dir=tmp_path / "multi")
    assert [p.layer for p in prepared] == [0, 2] and all(p.retrained_reason for p in prepared)
    assert read_manifest(prepared[0].target)["harvested_layers"] == [0, 2]
    seen = []
    cached = load_sae(trained_cfg(layer=2), tiny_lm, data_dir=data_dir, cache_dir=tmp_path / "multi",
                      on_trained=seen.append)
    assert not seen and not cached.info["trained_now"]  # found under the one-layer key
    alone = load_sae(trained_cfg(layer=2), tiny_lm, data_dir=data_dir, cache_dir=tmp_path / "single")
    assert alone.info["trained_now"] and torch.equal(alone.sae.W_dec, cached.sae.W_dec)
    again = prepare_trained_saes(trained_cfg(), tiny_lm, [0, 2], data_dir=data_dir, cache_dir=tmp_path / "multi")
    assert not any(p.retrained_reason for p in again)
    with pytest.raises(CRLConfigError, match="out of range"):
        prepare_trained_saes(trained_cfg(), tiny_lm, [0, 7], data_dir=data_dir, cache_dir=tmp_path / "multi")


def test_sae_corpus_reads_every_task_train_split_and_no_heldout_text(data_dir):
    from hydra import compose, initialize_config_dir

    from crl_exp.paths import CONFIG_DIR
    from crl_exp.saes.corpus import benchmark_corpus
    from crl_exp.tasks import build_task

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config")
    corpus = set(benchmark_corpus(data_dir, list(cfg.sae.corpus)))
    for name in ("bbq", "xstest", "harmbench"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            task = build_task(compose("config", overrides=[f"task={name}"]).task, data_dir)
        train = {task.user_text(ex) for ex in task.split("train")}
        heldout = {task.user_text(ex) for s in ("validation", "test") for ex in task.split(s)} - train
        assert train <= corpus, name
        assert not heldout & corpus, name
    with pytest.raises(CRLConfigError, match="Unknown corpus source"):
        next(benchmark_corpus(data_dir, ["bbq_test"]))


def test_sae_without_a_residual_norm_gets_one_measured_and_cached(tmp_path, tiny_model_dir, data_dir):
    """sae=local (and pretrained) SAEs carry no resid_norm; coefficient_scale=resid_norm measures it on the fly."""
    from hydra import compose, initialize_config_dir

    from crl_exp.paths import CONFIG_DIR
    from crl_exp.runtime import load_model, load_sae_for
    from crl_exp.saes.corpus import RESID_NORM_SOURCES, benchmark_corpus

    save_standard_sae(tmp_path / "sae", 64, resid_post_hook_name(1), d_sae=32)
    overrides = ["model=hf", f"model.path={tiny_model_dir}", "sae=local", f"sae.path={tmp_path / 'sae'}",
                 "sae.layer=1", "steering.coefficient_scale=resid_norm", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"data_dir={data_dir}"])
        again = compose("config", overrides=[*overrides, f"data_dir={tmp_path / 'no-data'}"])
    lm = load_model(cfg)
    sae = load_sae_for(cfg, lm)
    tokenized = tokenize_texts(lm.tokenizer, benchmark_corpus(data_dir, RESID_NORM_SOURCES), int(8192 * 1.2))
    rows = pack_tokens(tokenized, 128, lm.tokenizer.bos_token_id)[: -(-8192 // 127)]
    by_hand = collect_resid_post(lm.model, 1, rows, 8).norm(dim=-1).median().item()
    assert sae.metrics["resid_norm"] == pytest.approx(by_hand) and sae.info["resid_norm_measured"]
    # cached: a second load reads it without touching the benchmark files (a missing data_dir would fail)
    assert load_sae_for(again, lm).metrics["resid_norm"] == pytest.approx(by_hand)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [0, 5, 40])
def test_sparse_topk_step_matches_sae_lens_dense_step(n_dead, rescale):
    """Same weights, same batch: the sparse training step gives sae-lens' TopK losses and gradients (MSE and
    AuxK, with no, few (< d_in / 2) and many dead latents), so training follows the same trajectory."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from crl_exp.saes.training import SparseTopKTrainingSAE

    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=24, d_sae=96, k=6, device="cpu", normalize_activations="none",
                                rescale_acts_by_decoder_norm=rescale)
    dense = TopKTrainingSAE(cfg)
    sparse = SparseTopKTrainingSAE(cfg)
    with torch.no_grad():  # a non-trivial decoder bias, and decoder rows of different norms
        dense.b_dec.normal_()
        dense.W_dec.mul_(torch.rand(96, 1) + 0.5)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(50, 24) * 3
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    outputs = {}
    for name, sae in (("dense", dense), ("sparse", sparse)):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        outputs[name] = out
    for key in ("mse_loss", "auxiliary_reconstruction_loss"):
        torch.testing.assert_close(outputs["sparse"].losses[key], outputs["dense"].losses[key], rtol=1e-5, atol=1e-6)
    assert (outputs["dense"].losses["auxiliary_reconstruction_loss"] > 0) == (n_dead > 0)
    torch.testing.assert_close(outputs["sparse"].sae_out, outputs["dense"].sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["sparse"].feature_acts, outputs["dense"].feature_acts, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="use_sparse_activations"):
        SparseTopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, use_sparse_activations=True))


def test_features_of_catalogue_saes_link_to_their_neuronpedia_pages(tmp_path, tiny_lm):
    """Gemma Scope's id comes from sae-lens' offline catalogue; a local copy names its own; a trained SAE has none,
    and every view of features (report, branch points, top-features table) links only where a page exists."""
    import pandas as pd

    from crl_exp.analysis.report import render_report
    from crl_exp.analysis.top_features import FeatureEffect, effects_table
    from crl_exp.saes.neuronpedia import feature_url, neuronpedia_id

    np_id = neuronpedia_id("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
    assert np_id == "gemma-2-2b/12-gemmascope-res-16k"
    assert feature_url(np_id, 42) == "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/42"
    assert neuronpedia_id("no-such-release", "x") is None and feature_url(None, 3) is None
    assert feature_url(np_id, -1) is None  # the no-op has no page
    save_standard_sae(tmp_path / "sae", tiny_lm.d_model, resid_post_hook_name(1))
    assert load_sae(local_cfg(tmp_path / "sae", 1), tiny_lm).neuronpedia_id is None
    assert load_sae(local_cfg(tmp_path / "sae", 1, neuronpedia_id=np_id), tiny_lm).neuronpedia_id == np_id

    log = pd.DataFrame([{"episode": 0, "prompt_id": "p0", "position": 0, "token_id": 5, "token_text": "A",
                         "feature": 7, "features": "7", "feature_prob": 0.5, "feature_act": 1.0, "value": 0.1,
                         "value_scale": 1.0, "reward": 1.0, "correct": 1.0}])
    points = {0: [{"position": 0, "chosen_feature": 7, "chosen_correct": True, "flipping_alternatives": [9]}]}
    linked = render_report(log, {}, "t", branch_points=points, neuronpedia=np_id)
    assert f"href='{feature_url(np_id, 7)}'" in linked and f"href='{feature_url(np_id, 9)}'" in linked
    assert "href=" not in render_report(log, {}, "t", branch_points=points)
    effect = FeatureEffect(feature=7, steered_tokens=1, episodes=1, url=feature_url(np_id, 7))
    assert f"| [7]({feature_url(np_id, 7)}) |" in effects_table([effect])
    assert "| 7 |" in effects_table([FeatureEffect(feature=7, steered_tokens=1, episodes=1)])
