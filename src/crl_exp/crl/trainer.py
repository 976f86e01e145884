"""Build the Lightning ``Trainer`` for a CRL run and fit (or resume) the policy."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from crl_exp.crl.module import CRLModule, PromptDataModule


def build_trainer(iterations: int, checkpoint_dir: str | Path, logger: MLFlowLogger | None = None,
                  checkpoint_every: int = 1, progress_bar: bool = True) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=str(checkpoint_dir), filename="iter-{epoch:04d}", save_last=True,
                                 save_top_k=-1, every_n_epochs=checkpoint_every, save_on_train_epoch_end=True)
    return L.Trainer(max_epochs=iterations, accelerator="cpu", devices=1, logger=logger if logger else False,
                     callbacks=[checkpoint], reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                     enable_progress_bar=progress_bar, enable_model_summary=False, log_every_n_steps=1,
                     default_root_dir=str(checkpoint_dir))


def fit_policy(module: CRLModule, data: PromptDataModule, trainer: L.Trainer, ckpt_path: str | None = None) -> None:
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
