"""The CRL actor-critic: a small MLP over the normalised residual state.

Actor: one ``Linear`` head over the SAE's features (a masked categorical; logits of masked features are
-inf), or with ``policy.head=embedding`` logits that are inner products with the features' decoder directions.
Critic: a value head on its own trunk (default) or on the actor's trunk (``shared_trunk``). Init follows
CleanRL (orthogonal weights, actor head gain 0.01: a near-uniform initial policy) except the value head, also at
gain 0.01: at gain 1 the untrained critic's outputs dwarf the reward spread between actions, so nearly all of the
first advantages' variance is critic error pushed into the actor as random preferences (docs/design.md §3).

The state is the detached residual vector x_t at the steered layer; ``LayerNorm`` without affine parameters
removes its scale (Gemma residual norms are in the thousands) before the trunk. ``obs_norm`` adds CleanRL's
per-dimension running standardisation after it: the LayerNorm'd last-token states of a one-token task's prompts
share most of their energy (experiments/state_diversity.py), so without it the trunk sees nearly the same input
for every prompt and a learned policy picks one feature everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Categorical

from crl_exp.errors import CRLConfigError


@dataclass
class PolicyConfig:
    """The ``policy/`` config node (the steering coefficient is ``steering.*``, shared with the baselines)."""

    hidden: int = 256  # trunk width
    shared_trunk: bool = False  # true: value head on the actor's trunk
    top_k: int = 1  # features added per token; > 1 sums k directions (each c/k) at a cost in interpretability
    # null: the whole SAE dictionary is the action space (the paper). N: only the N features most correlated with
    # reward on a stratified train subset (CorrSteer's ranking, the static baseline's pool); AFM masks within them
    action_pool: int | None = None
    # per-dimension running mean/variance standardisation of the LayerNorm'd state (CleanRL's NormalizeObservation),
    # updated from each iteration's rollout states after its PPO update, frozen in evaluation, kept in checkpoints
    obs_norm: bool = False
    # an explicit "leave this token alone" action (index d_sae): AFM never masks it, and the share of steered
    # tokens is logged; a policy forced to steer every token cannot say "not here"
    noop_action: bool = False
    # the actor's head over the features: "independent" (the paper's: one free logit per feature, Linear(hidden,
    # d_sae)) or "embedding" (logit_f = <q(s), e_f> + b_f with e_f feature f's unit decoder direction, projected to
    # embedding_dim when set: a sampled feature moves every feature whose direction is alike)
    head: str = "independent"
    embedding_dim: int | None = None  # null: the decoder rows themselves (d_model dims)

    def __post_init__(self):
        if self.head not in HEADS:
            raise CRLConfigError(f"policy.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise CRLConfigError(f"policy.embedding_dim must be >= 1 or null, got {self.embedding_dim}")


HEADS = ("independent", "embedding")
VALUE_HEAD_GAIN = 0.01  # the untrained critic predicts ~0, not +-0.6 (see the module doc)


def _layer(linear: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(linear.weight, gain)
    nn.init.zeros_(linear.bias)
    return linear


def _trunk(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(_layer(nn.Linear(d_in, hidden), math.sqrt(2)), nn.Tanh(),
                         _layer(nn.Linear(hidden, hidden), math.sqrt(2)), nn.Tanh())


class RunningObsNorm(nn.Module):
    """Per-dimension running standardisation, ``clip((x - mean) / sqrt(var + eps))``; the identity until the
    first ``update``. Statistics merge batch moments exactly (Chan et al.), so the order of updates with equal
    data does not matter; they are buffers, hence saved with the policy and moved with it."""

    def __init__(self, dim: int, clip: float = 5.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            return x
        z = (x - self.mean.to(x.dtype)) / torch.sqrt(self.var + self.eps).to(x.dtype)
        return z.clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the moments of a batch ``[N, dim]`` into the running ones."""
        x = x.reshape(-1, self.mean.numel()).to(self.mean)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.var.copy_((self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)


class EmbeddingHead(nn.Module):
    """Action-embedding actor head: logits_f = <q(h), e_f> + b_f over fixed feature embeddings ``e_f`` (unit decoder
    directions, optionally through a seeded random projection). Every feature's logit moves with q, so what one
    sampled feature teaches reaches the features whose directions are alike: the sample-sharing that an
    independent logit per feature (``Linear(hidden, d_sae)``, 0.2 draws per action at 832 episodes over 4,096) lacks.
    The no-op (if any) has no direction: its logit is its bias alone. ``q`` starts at gain 0.01 (a near-uniform
    policy, as the independent head)."""

    def __init__(self, hidden: int, directions: torch.Tensor, n_extra: int = 0, embedding_dim: int | None = None,
                 seed: int = 0):
        super().__init__()
        e = nn.functional.normalize(directions.detach().float(), dim=-1)
        if embedding_dim is not None and embedding_dim < e.shape[1]:
            g = torch.Generator().manual_seed(seed)
            projection = torch.linalg.qr(torch.randn(e.shape[1], embedding_dim, generator=g))[0]
            e = nn.functional.normalize(e @ projection, dim=-1)
        e = e * math.sqrt(e.shape[1])  # unit-variance logits for a unit-variance q
        self.register_buffer("embeddings", torch.cat([e, torch.zeros(n_extra, e.shape[1])]), persistent=False)
        self.query = nn.Linear(hidden, e.shape[1], bias=False)
        nn.init.orthogonal_(self.query.weight, 0.01)
        self.bias = nn.Parameter(torch.zeros(len(self.embeddings)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.query(h) @ self.embeddings.T + self.bias


class ActorCritic(nn.Module):
    def __init__(self, d_model: int, d_sae: int, hidden: int = 256, shared_trunk: bool = False, obs_norm: bool = False,
                 noop_action: bool = False, head: str = "independent", action_directions: torch.Tensor | None = None,
                 embedding_dim: int | None = None):
        super().__init__()
        self.d_model, self.d_sae = d_model, d_sae
        self.noop_index = d_sae if noop_action else None  # the last logit: no steering
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.obs_norm = RunningObsNorm(d_model) if obs_norm else None
        self.actor_trunk = _trunk(d_model, hidden)
        self.critic_trunk = None if shared_trunk else _trunk(d_model, hidden)
        if head == "embedding":
            if action_directions is None or tuple(action_directions.shape) != (d_sae, d_model):
                raise ValueError(f"policy.head=embedding needs the SAE's decoder directions [{d_sae}, {d_model}]")
            self.actor_head = EmbeddingHead(hidden, action_directions, int(noop_action), embedding_dim)
        elif head == "independent":
            self.actor_head = _layer(nn.Linear(hidden, d_sae + int(noop_action)), 0.01)
        else:
            raise ValueError(f"unknown actor head {head!r}: one of {', '.join(HEADS)}")
        self.value_head = _layer(nn.Linear(hidden, 1), VALUE_HEAD_GAIN)

    def forward(self, state: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked logits [B, d_sae], values [B]) for states [B, d_model]; ``allowed`` is a bool [d_sae] mask."""
        x = self.observe(state)
        h = self.actor_trunk(x)
        logits = self.actor_head(h)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        hv = h if self.critic_trunk is None else self.critic_trunk(x)
        return logits, self.value_head(hv).squeeze(-1)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The value head and its own trunk: clipped apart from the actor's, so the critic cannot throttle it."""
        own = [] if self.critic_trunk is None else list(self.critic_trunk.parameters())
        return own + list(self.value_head.parameters())

    def actor_parameters(self) -> list[nn.Parameter]:
        critic = {id(p) for p in self.critic_parameters()}
        return [p for p in self.parameters() if id(p) not in critic]

    def observe(self, state: torch.Tensor) -> torch.Tensor:
        """The trunks' input: LayerNorm'd state, then the running standardisation if ``obs_norm``."""
        x = self.norm(state.float())
        return x if self.obs_norm is None else self.obs_norm(x)

    @torch.no_grad()
    def update_obs_norm(self, states: torch.Tensor) -> None:
        """Fold rollout states ``[N, d_model]`` into the running statistics (a no-op without ``obs_norm``)."""
        if self.obs_norm is not None:
            self.obs_norm.update(self.norm(states.float()))

    def distribution(self, state: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[Categorical, torch.Tensor]:
        logits, value = self(state, allowed)
        return Categorical(logits=logits), value
