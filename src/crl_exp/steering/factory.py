"""Build the steerer + controller that a ``steering/`` config node names (none, static, random)."""

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


def _static(steering_cfg: DictConfig, sae: LoadedSAE, seed: int) -> StaticController:
    feature = int(steering_cfg.feature)
    if not 0 <= feature < sae.d_sae:
        raise CRLConfigError(f"steering.feature={feature} is out of range: the SAE has features 0..{sae.d_sae - 1}")
    return StaticController(feature, float(steering_cfg.coefficient))


def _random(steering_cfg: DictConfig, sae: LoadedSAE, seed: int) -> RandomController:
    return RandomController(sae.d_sae, float(steering_cfg.coefficient), seed=seed)


# steering.kind -> the controller that picks each step's feature (none: no steerer at all)
CONTROLLERS = {"none": None, "static": _static, "random": _random}


def build_steerer(steering_cfg: DictConfig, lm: LoadedModel, sae: LoadedSAE, seed: int = 0):
    """(steerer, controller) for ``steering=none|static|random``; (None, None) for none."""
    kind = steering_cfg.kind
    if kind not in CONTROLLERS:
        raise CRLConfigError(f"Unknown steering.kind {kind!r}; valid: {', '.join(CONTROLLERS)}")
    if CONTROLLERS[kind] is None:
        return None, None
    controller = CONTROLLERS[kind](steering_cfg, sae, seed)
    return ResidualSteerer(lm.model, sae.layer, steering_directions(steering_cfg, sae)), controller
