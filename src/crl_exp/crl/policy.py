"""The CRL actor-critic: a small MLP over the normalised residual state.

Actor: one ``Linear`` head over the SAE's features (a masked categorical; logits of masked features are
-inf). Critic: a value head on its own trunk (default) or on the actor's trunk (``shared_trunk``). Init follows
CleanRL: orthogonal weights, actor head gain 0.01 (near-uniform initial policy), value head gain 1.

The state is the detached residual vector x_t at the steered layer; ``LayerNorm`` without affine parameters
removes its scale (Gemma residual norms are in the thousands) before the trunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Categorical


@dataclass
class PolicyConfig:
    """The ``policy/`` config node (the steering coefficient is ``steering.*``, shared with the baselines)."""

    hidden: int = 256  # trunk width
    shared_trunk: bool = False  # true: value head on the actor's trunk
    top_k: int = 1  # features added per token; > 1 sums k directions (each c/k) at a cost in interpretability
    # null: the whole SAE dictionary is the action space (the paper). N: only the N features most correlated with
    # reward on a stratified train subset (CorrSteer's ranking, the static baseline's pool); AFM masks within them
    candidates: int | None = None


def _layer(linear: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(linear.weight, gain)
    nn.init.zeros_(linear.bias)
    return linear


def _trunk(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(_layer(nn.Linear(d_in, hidden), math.sqrt(2)), nn.Tanh(),
                         _layer(nn.Linear(hidden, hidden), math.sqrt(2)), nn.Tanh())


class ActorCritic(nn.Module):
    def __init__(self, d_model: int, d_sae: int, hidden: int = 256, shared_trunk: bool = False):
        super().__init__()
        self.d_model, self.d_sae = d_model, d_sae
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.actor_trunk = _trunk(d_model, hidden)
        self.critic_trunk = None if shared_trunk else _trunk(d_model, hidden)
        self.actor_head = _layer(nn.Linear(hidden, d_sae), 0.01)
        self.value_head = _layer(nn.Linear(hidden, 1), 1.0)

    def forward(self, state: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked logits [B, d_sae], values [B]) for states [B, d_model]; ``allowed`` is a bool [d_sae] mask."""
        x = self.norm(state.float())
        h = self.actor_trunk(x)
        logits = self.actor_head(h)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        hv = h if self.critic_trunk is None else self.critic_trunk(x)
        return logits, self.value_head(hv).squeeze(-1)

    def distribution(self, state: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[Categorical, torch.Tensor]:
        logits, value = self(state, allowed)
        return Categorical(logits=logits), value
