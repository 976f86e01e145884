"""``mode=train_sae`` (also ``python -m crl_exp.sae``): train (or re-use) and cache the SAE of ``sae.layer``, or
with ``sae.layers=[3,6,9,12,15]`` the SAEs of several layers from one shared harvesting pass.

``SweepSAEs`` (a Hydra callback in ``conf/config.yaml``) does the latter once before a multirun whose jobs sweep
``sae.layer`` over trained SAEs, so the jobs find their SAEs cached instead of each harvesting on its own.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from crl_exp.errors import CRLConfigError
from crl_exp.runtime import load_model, load_model_and_sae, prepare_layer_saes
from crl_exp.tracking import RunTracker

log = logging.getLogger(__name__)


def run(cfg: DictConfig, tracker: RunTracker) -> None:
    layers = [int(x) for x in (cfg.sae.get("layers") or [])]
    if not layers:
        lm, sae = load_model_and_sae(cfg, tracker)
        print_metrics(lm.name, [sae])
        return
    if cfg.sae.source != "trained":
        raise CRLConfigError(f"sae.layers trains several SAEs in one pass: it needs sae=trained, not "
                             f"sae.source={cfg.sae.source}")
    lm = load_model(cfg, tracker)
    saes = prepare_layer_saes(cfg, lm, layers, tracker)
    for sae in saes:
        tracker.log_metrics({f"sae/L{sae.layer}/{k}": v for k, v in sae.metrics.items()})
    print_metrics(lm.name, saes)


def print_metrics(model_name: str, saes: list) -> None:
    for sae in saes:
        print(f"SAE for {model_name} layer {sae.layer} ({sae.source})")
        for key, value in sae.metrics.items():
            print(f"  {key:>20}: {value:.4f}")


def swept_layers(overrides: list[str]) -> list[int]:
    """The layers a multirun's ``sae.layer=...`` override sweeps over (empty when it does not sweep them); the
    first ``sae.layer`` override counts (pass command-line overrides before the sweeper's params)."""
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.get_key_element() == "sae.layer":
            return [int(v) for v in override.sweep_iterator()] if override.is_sweep_override() else []
    return []


class SweepSAEs(Callback):
    """Before a layer sweep's jobs start: train the missing SAEs of every swept layer in one harvesting pass."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.get("sweeper", {}).get("params") or {}  # e.g. +experiment=layer_sweep's
        layers = swept_layers([*config.hydra.overrides.task, *(f"{k}={v}" for k, v in params.items())])
        if len(layers) < 2 or config.sae.source != "trained":
            return
        log.info("Preparing the SAEs of layers %s in one harvesting pass before the sweep's jobs", layers)
        lm = load_model(config)
        prepare_layer_saes(config, lm, layers)
