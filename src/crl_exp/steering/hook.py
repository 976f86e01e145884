"""The forward hook that steers resid_post of block L at the newest position.

Placement (docs/design.md §2): resid_post of block L is the **output** of ``layers[L]``, so this is a
``register_forward_hook`` on that block. A forward *pre*-hook on ``layers[L]`` would edit resid_post of L-1
(the off-by-one the test-suite guards against).

At every forward call the hook reads ``x = output[:, -1]`` (with left padding the newest token of every row is
at position -1: the last prompt token during prefill, the new token during KV-cached decoding), asks its
controller for one feature and one coefficient per row, and writes back ``x + distance(c) * d(f)``. Feature
``NO_FEATURE`` (-1) leaves a row untouched. Earlier positions are never edited; with a KV cache later tokens
attend to the steered keys/values, which is the intended semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from crl_exp.errors import CRLConfigError
from crl_exp.models.architecture import decoder_layers
from crl_exp.steering.directions import SteeringDirections

NO_FEATURE = -1

# A controller maps the residual state at the newest position [B, d_model] to (features [B] or [B, k] long,
# coeffs [B]).
Controller = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SteeringStep:
    """What the hook did at one forward call (one generated token for every row)."""

    features: torch.Tensor
    coefficients: torch.Tensor
    state: torch.Tensor | None = None


@dataclass
class ResidualSteerer:
    """Steers ``layers[layer]`` of ``model`` along SAE directions chosen by ``controller``.

    Use as a context manager (``with steerer.attached(): model.generate(...)``) so the hook is always removed.
    ``record_states`` keeps the pre-steering state of every step (what a policy observed).
    """

    model: nn.Module
    layer: int
    directions: SteeringDirections
    controller: Controller | None = None
    # the strength of a controller that returns only features (the CRL policy): set once by the environment
    # (``SteeringEnv``), not threaded through every controller
    coefficient: float | None = None
    record_states: bool = False
    steps: list[SteeringStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        layers = decoder_layers(self.model)
        if not 0 <= self.layer < len(layers):
            raise CRLConfigError(f"Layer {self.layer} is out of range: this model has layers 0..{len(layers) - 1}")
        self._block = layers[self.layer]
        self._handle = None
        param = next(self.model.parameters())
        self.directions.to(param.device, param.dtype)

    @contextmanager
    def attached(self, controller: Controller | None = None):
        if controller is not None:
            self.controller = controller
        if self.controller is None:
            raise ValueError("ResidualSteerer needs a controller before it is attached")
        self.steps = []
        self._handle = self._block.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            self._handle.remove()
            self._handle = None

    @contextmanager
    def replaying(self, features: torch.Tensor, coefficients: torch.Tensor):
        """Re-apply recorded edits to a multi-token forward: position t of row b gets the edit of
        ``features[b, t]`` (``[B, T]`` or ``[B, T, k]``; ``NO_FEATURE``: none) at ``coefficients[b, t]``, for
        the first T positions of the forward's input. Used to read an episode's tokens as they were steered."""
        b, t = coefficients.shape

        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[0] != b or hidden.shape[1] < t:
                raise RuntimeError(f"replaying {b} x {t} edits on a forward of shape {tuple(hidden.shape[:2])}")
            flat = features.reshape(b * t, *features.shape[2:]).to(hidden.device)
            edit = self.delta(flat, coefficients.reshape(-1).to(hidden.device)).reshape(b, t, -1)
            steered = hidden.clone()
            steered[:, :t] = hidden[:, :t] + edit.to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handle = self._block.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    def delta(self, features: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """The edit ``distance(c) * d(f)`` per row; zero for ``NO_FEATURE`` rows.

        ``features`` is ``[B]`` (top-1) or ``[B, k]`` (top-k: each of the k directions gets ``c / k``)."""
        feats = features if features.ndim == 2 else features[:, None]
        dist = self.directions.distance(coefficients.to(self.directions.unit.dtype)) / feats.shape[1]
        scale = torch.where(feats >= 0, dist[:, None].expand(feats.shape), torch.zeros((), dtype=dist.dtype,
                                                                                         device=dist.device))
        return (self.directions.unit[feats.clamp_min(0)] * scale[..., None]).sum(1)

    def own_coefficients(self, features: torch.Tensor) -> torch.Tensor:
        """The steerer's coefficient for every row (controllers that return features only)."""
        if self.coefficient is None:
            raise RuntimeError("the controller returned features only and this steerer has no coefficient: set "
                               "ResidualSteerer.coefficient (SteeringEnv does) or return (features, coefficients)")
        return torch.full((features.shape[0],), float(self.coefficient), device=features.device)

    def _hook(self, module: nn.Module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        state = hidden[:, -1, :]
        out = self.controller(state.detach())
        features, coefficients = out if isinstance(out, tuple) else (out, self.own_coefficients(out))
        if bool(torch.isnan(coefficients).any()):  # rows of a features-only controller inside a RowDispatch
            coefficients = torch.where(torch.isnan(coefficients), self.own_coefficients(features).to(coefficients),
                                       coefficients)
        if features.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"Controller returned {features.shape[0]} features for batch {hidden.shape[0]}")
        if bool((features >= self.directions.d_sae).any()):
            raise CRLConfigError(f"Feature index out of range: the SAE has {self.directions.d_sae} features")
        self.steps.append(SteeringStep(features.detach(), coefficients.detach(),
                                       state.detach().clone() if self.record_states else None))
        steered = hidden.clone()
        steered[:, -1, :] = state + self.delta(features, coefficients).to(hidden.dtype)
        if isinstance(output, tuple):
            return (steered, *output[1:])
        return steered
