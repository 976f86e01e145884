"""Train a TopK SAE on resid_post of one block with sae-lens' ``SAETrainer``.

Activations are harvested once into memory (see ``activations.py``) and fed to the trainer as shuffled
minibatches over several epochs: on 2 CPU cores the LM forward (~1k tokens/s) is the bottleneck, so re-using
tokens is far cheaper than reading new ones. A held-out slice of tokens (from texts not used for training)
gives the reported explained variance, L0 and dead-feature share.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

log = logging.getLogger(__name__)


@dataclass
class SAETrainingSettings:
    """Knobs of one SAE run; every field is part of the cache key (``conf/sae/trained.yaml``)."""

    d_sae: int = 4096
    k: int = 32
    train_tokens: int = 200_000
    heldout_tokens: int = 16_384
    context_size: int = 128
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 3e-3
    harvest_batch_size: int = 16
    seed: int = 0


def shuffled_batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless stream of minibatches, reshuffled every epoch (the sae-lens DataProvider protocol)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(acts)
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[start:start + batch_size]]


@torch.no_grad()
def evaluate_sae(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Explained variance, mean L0, dead-feature share and MSE of ``sae`` on ``acts`` ([N, d_in])."""
    sae.eval()
    sq_err = 0.0
    l0_sum = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, len(acts), batch_size):
        x = acts[start:start + batch_size].to(sae.W_dec.device, sae.W_dec.dtype)
        feats = sae.encode(x)
        recon = sae.decode(feats)
        sq_err += (recon - x).pow(2).sum().item()
        active = feats != 0
        l0_sum += active.sum().item()
        fired |= active.any(0).cpu()
    total_var = (acts - acts.mean(0)).pow(2).sum().item()
    n = len(acts)
    return {
        "explained_variance": 1.0 - sq_err / total_var,
        "l0": l0_sum / n,
        "dead_feature_share": 1.0 - fired.float().mean().item(),
        "mse": sq_err / (n * acts.shape[1]),
    }


def train_topk_sae(
    train_acts: torch.Tensor, settings: SAETrainingSettings, model_name: str, hook_name: str, device: str = "cpu"
) -> SAE:
    """Fit a TopK SAE with sae-lens and return it as an inference ``SAE`` (normalisation folded in)."""
    torch.manual_seed(settings.seed)
    d_in = train_acts.shape[1]
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=settings.d_sae,
        k=settings.k,
        device=device,
        normalize_activations="expected_average_only_in",
    )
    sae_cfg.metadata.model_name = model_name
    sae_cfg.metadata.hook_name = hook_name
    sae_cfg.metadata.context_size = settings.context_size
    sae_cfg.metadata.prepend_bos = True
    sae = TopKTrainingSAE(sae_cfg)
    # Inputs are scaled to mean norm sqrt(d_in) (sae-lens "expected_average_only_in"; folded back into the
    # weights after training) and b_dec starts at the scaled data mean, because the residual stream carries a
    # large constant offset (Gemma's massive-activation dimensions) that would otherwise dominate early steps.
    scaling_factor = math.sqrt(d_in) / train_acts.norm(dim=-1).mean().item()
    sae.b_dec.data = (train_acts.mean(0) * scaling_factor).to(sae.b_dec.dtype)
    steps_per_epoch = len(train_acts) // settings.batch_size
    total_samples = steps_per_epoch * settings.epochs * settings.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=settings.batch_size,
        lr=settings.lr,
        lr_end=settings.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=max(1, steps_per_epoch // 10),
        lr_decay_steps=0,
        device=device,
        dead_feature_window=max(50, steps_per_epoch // 2),
        feature_sampling_window=10**9,
        n_batches_for_norm_estimate=min(32, max(1, steps_per_epoch)),
    )
    trainer = SAETrainer(trainer_cfg, sae, shuffled_batches(train_acts, settings.batch_size, settings.seed))
    trainer.activation_scaler.scaling_factor = scaling_factor
    trained = trainer.fit()
    # Convert the training SAE into its inference class through sae-lens' own save/load round trip.
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device=device)
