"""The steering vectors: SAE decoder rows, unit-normalised, and how a coefficient is scaled.

Coefficient semantics (docs/design.md §2), chosen so a number means the same thing across SAEs and layers:

* decoder rows are divided by their L2 norm (the original norms are kept in ``decoder_norms`` and logged),
  because not every SAE has unit-norm rows;
* ``coefficient_scale="absolute"``: the residual moves by exactly ``c`` in L2 norm;
* ``coefficient_scale="resid_norm"``: ``c`` is a fraction of the typical residual norm at that layer
  (``resid_norm``, measured on text), so ``c=0.5`` means "half a typical residual vector" at any layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crl_exp.errors import CRLConfigError

SCALES = ("absolute", "resid_norm")


@dataclass
class SteeringDirections:
    """Unit directions ``[d_sae, d_model]`` plus the factor that turns a coefficient into a distance."""

    unit: torch.Tensor
    decoder_norms: torch.Tensor
    coefficient_scale: str = "absolute"
    resid_norm: float | None = None

    @classmethod
    def from_decoder(
        cls, W_dec: torch.Tensor, coefficient_scale: str = "absolute", resid_norm: float | None = None
    ) -> SteeringDirections:
        if coefficient_scale not in SCALES:
            raise CRLConfigError(f"steering.coefficient_scale must be one of {SCALES}, got {coefficient_scale!r}")
        if coefficient_scale == "resid_norm" and not resid_norm:
            raise CRLConfigError("coefficient_scale='resid_norm' needs a measured residual norm for the layer")
        W = W_dec.detach().float()
        norms = W.norm(dim=-1)
        unit = W / norms.clamp_min(1e-8)[:, None]
        return cls(unit=unit, decoder_norms=norms, coefficient_scale=coefficient_scale, resid_norm=resid_norm)

    @property
    def d_sae(self) -> int:
        return self.unit.shape[0]

    @property
    def d_model(self) -> int:
        return self.unit.shape[1]

    def distance(self, coefficient: torch.Tensor | float) -> torch.Tensor | float:
        """L2 distance the residual moves for a given coefficient."""
        if self.coefficient_scale == "resid_norm":
            return coefficient * self.resid_norm
        return coefficient

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SteeringDirections:
        self.unit = self.unit.to(device=device, dtype=dtype or self.unit.dtype)
        return self
