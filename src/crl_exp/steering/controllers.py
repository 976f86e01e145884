"""Controllers decide, per row and per token, which feature to add and how strongly.

A controller is any callable ``state [B, d_model] -> (features [B] long, coefficients [B])``; the learned CRL
policy is one, these are the fixed baselines.
"""

from __future__ import annotations

import torch


class StaticController:
    """Same feature and coefficient at every token: classic static steering (per-row features allowed)."""

    def __init__(self, features: torch.Tensor | int, coefficients: torch.Tensor | float):
        self.features = torch.as_tensor(features, dtype=torch.long)
        self.coefficients = torch.as_tensor(coefficients, dtype=torch.float32)

    def __call__(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = state.shape[0]
        feats = self.features.expand(b) if self.features.ndim == 0 else self.features
        coefs = self.coefficients.expand(b) if self.coefficients.ndim == 0 else self.coefficients
        if feats.shape[0] != b or coefs.shape[0] != b:
            raise ValueError(f"StaticController has {feats.shape[0]} features for a batch of {b}")
        return feats.to(state.device), coefs.to(state.device)


class RandomController:
    """A uniformly random feature per row and token (seeded), the random-steering baseline: over ``features``
    (a policy's action space) when given, else over the whole dictionary of ``d_sae`` features."""

    def __init__(self, d_sae: int, coefficient: float, seed: int = 0, features=None):
        self.features = (torch.as_tensor(list(features), dtype=torch.long) if features is not None
                         else torch.arange(d_sae))
        if len(self.features) == 0:
            raise ValueError("RandomController needs at least one feature to draw from")
        self.d_sae = d_sae
        self.coefficient = float(coefficient)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = state.shape[0]
        feats = self.features[torch.randint(0, len(self.features), (b,), generator=self.generator)]
        return feats.to(state.device), torch.full((b,), self.coefficient, device=state.device)
