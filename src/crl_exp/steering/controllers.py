"""Controllers decide, per row and per token, which feature to add and how strongly.

A controller is any callable ``state [B, d_model] -> features [B] long`` (the steerer's coefficient applies, as
for the learned CRL policy) or ``-> (features [B] long, coefficients [B])`` (its own strengths, as these static
baselines carry for standalone use).
"""

from __future__ import annotations

import torch


class StaticController:
    """Same feature and coefficient at every token: classic static steering (per-row features allowed)."""

    def __init__(self, features: torch.Tensor | int, coefficients: torch.Tensor | float | None = None):
        """``coefficients`` None: features only, at the steerer's coefficient (the run's)."""
        self.features = torch.as_tensor(features, dtype=torch.long)
        self.coefficients = None if coefficients is None else torch.as_tensor(coefficients, dtype=torch.float32)

    def __call__(self, state: torch.Tensor):
        b = state.shape[0]
        feats = self.features.expand(b) if self.features.ndim == 0 else self.features
        if feats.shape[0] != b:
            raise ValueError(f"StaticController has {feats.shape[0]} features for a batch of {b}")
        if self.coefficients is None:
            return feats.to(state.device)
        coefs = self.coefficients.expand(b) if self.coefficients.ndim == 0 else self.coefficients
        if coefs.shape[0] != b:
            raise ValueError(f"StaticController has {coefs.shape[0]} coefficients for a batch of {b}")
        return feats.to(state.device), coefs.to(state.device)


class RandomController:
    """A uniformly random feature per row and token (seeded), the random-steering baseline: over ``features``
    (a policy's action space) when given, else over the whole dictionary of ``d_sae`` features."""

    def __init__(self, d_sae: int, coefficient: float | None = None, seed: int = 0, features=None):
        self.features = (torch.as_tensor(list(features), dtype=torch.long) if features is not None
                         else torch.arange(d_sae))
        if len(self.features) == 0:
            raise ValueError("RandomController needs at least one feature to draw from")
        self.d_sae = d_sae
        self.coefficient = None if coefficient is None else float(coefficient)  # None: the steerer's
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, state: torch.Tensor):
        b = state.shape[0]
        feats = self.features[torch.randint(0, len(self.features), (b,), generator=self.generator)]
        if self.coefficient is None:
            return feats.to(state.device)
        return feats.to(state.device), torch.full((b,), self.coefficient, device=state.device)


class RowDispatch:
    """Several controllers in one batch: row ``i`` is driven by ``controllers[assignment[i]]`` (each sub-controller
    sees only its own rows, in order). Lets conditions that differ only in the steering share one prefill."""

    def __init__(self, controllers: list, assignment: list[int]):
        self.controllers = controllers
        self.rows = [torch.tensor([i for i, a in enumerate(assignment) if a == c], dtype=torch.long)
                     for c in range(len(controllers))]
        self.size = len(assignment)

    def __call__(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if state.shape[0] != self.size:
            raise ValueError(f"RowDispatch was built for {self.size} rows, got {state.shape[0]}")
        features = coefficients = None
        for controller, rows in zip(self.controllers, self.rows, strict=True):
            if not len(rows):
                continue
            out = controller(state[rows.to(state.device)])
            # a controller of features only takes the steerer's coefficient: NaN asks the hook for it
            f, c = out if isinstance(out, tuple) else (out, torch.full((len(out),), float("nan"), device=out.device))
            if features is None:
                features = torch.full((self.size, *f.shape[1:]), -1, dtype=torch.long, device=state.device)
                coefficients = torch.zeros(self.size, device=state.device, dtype=c.dtype)
            features[rows.to(state.device)] = f
            coefficients[rows.to(state.device)] = c
        return features, coefficients
