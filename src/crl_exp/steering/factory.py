"""Build the steerer + controller that a ``steering/`` config node names (none, fixed, random)."""

from __future__ import annotations

from omegaconf import DictConfig

from crl_exp.errors import CRLConfigError
from crl_exp.models import LoadedModel
from crl_exp.saes import LoadedSAE
from crl_exp.steering.controllers import RandomController, StaticController
from crl_exp.steering.directions import SteeringDirections
from crl_exp.steering.hook import ResidualSteerer


def steering_directions(steering_cfg: DictConfig, sae: LoadedSAE) -> SteeringDirections:
    return SteeringDirections.from_decoder(sae.sae.W_dec, steering_cfg.coefficient_scale,
                                           resid_norm=sae.metrics.get("resid_norm"))


def build_steerer(steering_cfg: DictConfig, lm: LoadedModel, sae: LoadedSAE, seed: int = 0):
    """(steerer, controller) for ``steering=none|fixed|random``; (None, None) for none."""
    kind = steering_cfg.kind
    if kind == "none":
        return None, None
    steerer = ResidualSteerer(lm.model, sae.layer, steering_directions(steering_cfg, sae))
    if kind == "fixed":
        feature = int(steering_cfg.feature)
        if not 0 <= feature < sae.d_sae:
            raise CRLConfigError(f"steering.feature={feature} is out of range: the SAE has features 0..{sae.d_sae - 1}")
        return steerer, StaticController(feature, float(steering_cfg.coefficient))
    if kind == "random":
        return steerer, RandomController(sae.d_sae, float(steering_cfg.coefficient), seed=seed)
    raise CRLConfigError(f"Unknown steering.kind {kind!r}; valid: none, fixed, random")
