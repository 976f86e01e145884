"""Load the model and SAE a config names, logging what was loaded (and any SAE trained on the way)."""

from __future__ import annotations

from omegaconf import DictConfig

from crl_exp.models import LoadedModel, load_language_model
from crl_exp.paths import default_cache_dir, default_data_dir
from crl_exp.saes import LoadedSAE, load_sae
from crl_exp.saes.loading import prepare_trained_saes
from crl_exp.saes.resid_norm import measured_resid_norm
from crl_exp.tracking import RunTracker


def load_model(cfg: DictConfig, tracker: RunTracker | None = None) -> LoadedModel:
    lm = load_language_model(cfg.model, cache_dir=cfg.get("cache_dir"))
    if tracker is not None:
        tracker.log_metrics({"model_load_seconds": lm.load_seconds})
        tracker.set_tags({"model_path": lm.source, "model_converted_now": lm.info.get("converted", False)})
    return lm


def log_sae_training(tracker: RunTracker | None, lm: LoadedModel, loaded: LoadedSAE) -> None:
    """A nested MLflow run for an SAE trained now: its settings, corpus, held-out metrics and weights."""
    if tracker is None:
        return
    child = tracker.child(f"sae-{lm.name}-L{loaded.layer}", tags={"kind": "sae_training", "layer": loaded.layer})
    child.log_params({f"sae.training.{k}": v for k, v in loaded.info["settings"].items()})
    child.log_params({"sae.corpus": loaded.info["corpus"], "model": lm.name, "layer": loaded.layer})
    child.log_metrics({f"sae/{k}": v for k, v in loaded.metrics.items()})
    child.log_metrics({"sae/train_seconds": loaded.info["train_seconds"]})
    child.log_artifact(loaded.info["cache_dir"], "sae")
    child.finish()


def prepare_layer_saes(cfg: DictConfig, lm: LoadedModel, layers: list[int],
                       tracker: RunTracker | None = None) -> list[LoadedSAE]:
    """The ``sae=trained`` SAEs of several layers; the missing ones are trained after one shared harvest."""
    prepared = prepare_trained_saes(cfg.sae, lm, layers, data_dir=cfg.get("data_dir") or default_data_dir(),
                                    cache_dir=cfg.get("cache_dir"), device=str(lm.device))
    loaded = []
    for p in prepared:
        node = cfg.sae.copy()
        node.layer = p.layer
        node.force_retrain = False  # trained just now if it had to be
        sae = load_sae(node, lm, cache_dir=cfg.get("cache_dir"), device=str(lm.device))
        if p.retrained_reason is not None:
            sae.info["trained_now"] = True
            log_sae_training(tracker, lm, sae)
        loaded.append(sae)
    return loaded


def load_sae_for(cfg: DictConfig, lm: LoadedModel, tracker: RunTracker | None = None) -> LoadedSAE:
    """The configured SAE, validated against ``lm``; a freshly trained SAE also gets a nested MLflow run."""
    sae = load_sae(cfg.sae, lm, data_dir=cfg.get("data_dir") or default_data_dir(), cache_dir=cfg.get("cache_dir"),
                   device=str(lm.device), on_trained=lambda loaded: log_sae_training(tracker, lm, loaded))
    if "resid_norm" not in sae.metrics and cfg.get("steering", {}).get("coefficient_scale") == "resid_norm":
        # pretrained / local SAEs carry no residual norm: measure it (cached per model and layer)
        sae.metrics["resid_norm"] = measured_resid_norm(lm, sae.layer, cfg.get("data_dir") or default_data_dir(),
                                                        cfg.get("cache_dir") or default_cache_dir())
        sae.info["resid_norm_measured"] = True
    if tracker is not None:
        tracker.log_metrics({f"sae/{k}": v for k, v in sae.metrics.items()})
        tracker.set_tags({"sae": sae.source, "sae_hook": sae.hook_name, "d_sae": sae.d_sae})
    return sae


def load_model_and_sae(cfg: DictConfig, tracker: RunTracker | None = None) -> tuple[LoadedModel, LoadedSAE]:
    lm = load_model(cfg, tracker)
    return lm, load_sae_for(cfg, lm, tracker)
