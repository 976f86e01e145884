"""Residual-stream steering through SAE decoder directions (one feature per batch row per token)."""

from crl_exp.steering.controllers import RandomController, StaticController
from crl_exp.steering.directions import SteeringDirections
from crl_exp.steering.hook import NO_FEATURE, ResidualSteerer

__all__ = ["NO_FEATURE", "RandomController", "ResidualSteerer", "StaticController", "SteeringDirections"]
