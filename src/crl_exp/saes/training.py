"""Train a TopK SAE on resid_post of one block with sae-lens' ``SAETrainer``.

Activations are harvested once into memory (see ``activations.py``) and fed to the trainer as shuffled
minibatches over several epochs: on 2 CPU cores the LM forward (~1k tokens/s) is the bottleneck, so re-using
tokens is far cheaper than reading new ones. A held-out slice of tokens (from texts not used for training)
gives the reported explained variance, L0 and dead-feature share.

The training step is sae-lens' TopK step computed with sparse products (``SparseTopKTrainingSAE``): with k of
d_sae latents active (k << d_sae), a dense decoder and the dense encoder/decoder gradients spend almost all of their
multiply-adds on zeros, and on a CPU those matmuls are most of the step. Same losses and gradients up to float rounding
(``tests/test_sae_training.py``), so the cache key does not change.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
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


def _csr(idx: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """CSR matrix [B, d_sae] holding ``values`` [B, k] at columns ``idx`` [B, k] (sorted within each row)."""
    b, k = idx.shape
    crow = torch.arange(0, b * k + 1, k, device=idx.device)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": these ops are tested here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, idx.reshape(-1), values.reshape(-1), (b, d_sae), check_invariants=False)


class _SelectedPreActivations(torch.autograd.Function):
    """``(sae_in @ W_enc)[b, idx[b]]`` from the product already computed without autograd; the backward
    multiplies only the selected entries' gradients (two CSR x dense products instead of two dense matmuls)."""

    @staticmethod
    def forward(ctx, sae_in: torch.Tensor, w_enc: torch.Tensor, idx: torch.Tensor, product: torch.Tensor):
        ctx.save_for_backward(sae_in, w_enc, idx)
        return product.gather(1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sae_in, w_enc, idx = ctx.saved_tensors
        g = _csr(idx, grad.contiguous(), w_enc.shape[1])
        grad_in = g @ w_enc.T.contiguous() if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ sae_in).T if ctx.needs_input_grad[1] else None
        return grad_in, grad_w, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j weights[b, j] * W_dec[idx[b, j]]`` as a CSR x dense product; the weights' gradient is a sampled
    dense-dense product (only the selected entries of ``grad @ W_dec.T``)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, w_dec: torch.Tensor, idx: torch.Tensor):
        ctx.save_for_backward(weights, w_dec, idx)
        return _csr(idx, weights.contiguous(), w_dec.shape[0]) @ w_dec

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, w_dec, idx = ctx.saved_tensors
        grad_weights = grad_w = None
        if ctx.needs_input_grad[0]:
            pattern = _csr(idx, torch.zeros_like(weights), w_dec.shape[0])
            grad_weights = torch.sparse.sampled_addmm(pattern, grad.contiguous(), w_dec.T, beta=0.0)
            grad_weights = grad_weights.values().reshape(weights.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _csr(idx, weights.contiguous(), w_dec.shape[0]).t() @ grad
        return grad_weights, grad_w, None


class SparseTopKTrainingSAE(TopKTrainingSAE):
    """sae-lens' ``TopKTrainingSAE`` whose training step touches only the latents that fire.

    The pre-activations are computed densely without autograd, only to choose each row's top k (and, for the
    AuxK loss, the top dead latents). The chosen pre-activations and the reconstruction then go through sparse
    (CSR) products whose gradients reach only the encoder columns and decoder rows that were used, which is
    exactly where the dense step's gradients are nonzero. The AuxK loss works on the dead latents' columns
    alone (the dead set is shared by every row). ``rescale_acts_by_decoder_norm`` (sae-lens' default for
    training) is kept: the selection sees pre-activations times decoder-row norms, the decoder divides them
    out again. Saved and loaded as the plain class: only ``training_forward_pass`` differs.
    """

    def __init__(self, cfg: TopKTrainingSAEConfig, use_error_term: bool = False):
        if cfg.use_sparse_activations:
            raise ValueError("SparseTopKTrainingSAE replaces use_sparse_activations (COO, fails in backward on CPU); set it false")
        super().__init__(cfg, use_error_term)

    def _decoder_scale(self) -> torch.Tensor | None:
        """Per-latent factor on the pre-activations (decoder-row norms, with autograd), or None."""
        return self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = self.process_sae_in(step_input.sae_in)
        scale = self._decoder_scale()
        with torch.no_grad():
            product = sae_in @ self.W_enc
            hidden_pre = product + self.b_enc
            if scale is not None:
                hidden_pre = hidden_pre * scale
            idx = hidden_pre.topk(self.cfg.k, dim=-1, sorted=False).indices.sort(dim=-1).values  # [B, k]
        pre = _SelectedPreActivations.apply(sae_in, self.W_enc, idx, product) + self.b_enc[idx]
        values = (pre if scale is None else pre * scale[idx]).relu()
        weights = values if scale is None else values / scale[idx]
        recon = _SparseDecode.apply(weights, self.W_dec, idx) + self.b_dec
        sae_out = self.reshape_fn_out(self.run_time_activation_norm_fn_out(recon), self.d_head)
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        aux_loss = self._aux_loss(step_input, sae_in, sae_out, scale)
        feature_acts = torch.zeros_like(hidden_pre).scatter_(-1, idx, values.detach())
        return TrainStepOutput(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=feature_acts,
                               hidden_pre=hidden_pre, loss=mse_loss + aux_loss,
                               losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss})

    def _aux_loss(self, step_input: TrainStepInput, sae_in: torch.Tensor, sae_out: torch.Tensor,
                  scale: torch.Tensor | None) -> torch.Tensor:
        """sae-lens' AuxK loss (``calculate_topk_aux_loss``): the top ``d_in / 2`` dead latents of each row
        reconstruct the detached residual with ``W_dec`` alone; computed on the dead columns only."""
        dead = step_input.dead_neuron_mask
        if dead is None or (num_dead := int(dead.sum())) == 0:
            return sae_out.new_tensor(0.0)
        k_aux = step_input.sae_in.shape[-1] // 2
        loss_scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        cols = dead.nonzero().squeeze(1)
        pre = sae_in @ self.W_enc[:, cols] + self.b_enc[cols]  # [B, n_dead], with autograd
        if scale is not None:
            pre = pre * scale[cols]
        top = pre.detach().topk(k_aux, dim=-1, sorted=False).indices
        acts = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))  # no ReLU, as in sae-lens
        if scale is not None:
            acts = acts / scale[cols]
        recon = self.reshape_fn_out(acts @ self.W_dec[cols], self.d_head)
        residual = (step_input.sae_in - sae_out).detach()
        return self.cfg.aux_loss_coefficient * loss_scale * (recon - residual).pow(2).sum(dim=-1).mean()


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
    sae = SparseTopKTrainingSAE(sae_cfg)
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
