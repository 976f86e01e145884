"""``mode=train_sae`` (also ``python -m crl_exp.sae``): train (or re-use) and cache the SAE of ``sae.layer``."""

from __future__ import annotations

from omegaconf import DictConfig

from crl_exp.runtime import load_model_and_sae
from crl_exp.tracking import RunTracker


def run(cfg: DictConfig, tracker: RunTracker) -> None:
    lm, sae = load_model_and_sae(cfg, tracker)
    print(f"SAE for {lm.name} layer {sae.layer} ({sae.source})")
    for key, value in sae.metrics.items():
        print(f"  {key:>20}: {value:.4f}")
