"""Build the Lightning ``Trainer`` for a CRL run and fit (or resume) the policy."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from crl_exp.crl.module import CRLModule, PromptDataModule

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _DropAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def route_lightning_logs() -> None:
    """Lightning prints through its own stderr handlers *and* (under Hydra) the root logger, so every line came
    twice, plus advertising tips: send its records through the root logger only, without the tips."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        if not any(isinstance(f, _DropAdvertising) for f in logger.filters):
            logger.addFilter(_DropAdvertising())
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertising) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertising())


class RunOwnedMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger for a run that the ``RunTracker`` owns: Lightning would mark the run FINISHED at
    the end of ``fit``, before the held-out evaluation, so a crash there left a FINISHED run that sweeps then skip.
    The tracker ends the run when the whole job has ended.

    ``resumed=True`` (a run continued from a checkpoint): an iteration whose metrics were logged before the crash
    but whose checkpoint was not written is computed again on resume (identically: every random stream is seeded
    by the iteration); its (metric, step) points already in the run are not logged a second time."""

    def __init__(self, *args, resumed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._logged_steps: dict[str, set[int]] | None = {} if resumed else None

    def log_metrics(self, metrics, step: int | None = None) -> None:
        if self._logged_steps is not None:
            metrics = {k: v for k, v in metrics.items() if (step or 0) not in self._steps(k)}
            if not metrics:
                return
        super().log_metrics(metrics, step)

    def _steps(self, key: str) -> set[int]:
        if key not in self._logged_steps:
            self._logged_steps[key] = {m.step for m in self.experiment.get_metric_history(self.run_id, key)}
        return self._logged_steps[key]

    def finalize(self, status: str = "success") -> None:
        return None


def accelerator_for(device: torch.device | str) -> str:
    """Lightning's accelerator for the steered model's device: the policy trains where the states live."""
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def build_trainer(iterations: int, checkpoint_dir: str | Path, logger: MLFlowLogger | None = None,
                  checkpoint_every: int = 1, progress_bar: bool = True, accelerator: str = "cpu") -> L.Trainer:
    route_lightning_logs()
    checkpoint = ModelCheckpoint(dirpath=str(checkpoint_dir), filename="iter-{epoch:04d}", save_last=True,
                                 save_top_k=-1, every_n_epochs=checkpoint_every, save_on_train_epoch_end=True)
    return L.Trainer(max_epochs=iterations, accelerator=accelerator, devices=1, logger=logger if logger else False,
                     callbacks=[checkpoint], reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                     enable_progress_bar=progress_bar, enable_model_summary=False, log_every_n_steps=1,
                     default_root_dir=str(checkpoint_dir))


def fit_policy(module: CRLModule, data: PromptDataModule, trainer: L.Trainer, ckpt_path: str | None = None) -> None:
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
