"""The CRL ``LightningModule`` (manual optimisation) and the prompt ``LightningDataModule``.

One Lightning *epoch* is one PPO iteration: the data module serves one batch of training prompts per epoch
(seeded by the iteration, so a resumed run sees exactly the prompts it would have seen), ``training_step``
runs the steered rollout, scores it, and performs the PPO update. Checkpoints are taken at epoch ends and
contain the policy, the optimiser, the Adaptive Feature Mask, the training history and the MLflow run id, so
``ckpt_path`` resumes at the next iteration in the same MLflow run with nothing logged twice. Metrics are
logged with ``step = iteration``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from crl_exp.crl.learner import Learner, RolloutSource, SampledEpisodes, iteration_prompts
from crl_exp.crl.masking import MaskingConfig
from crl_exp.crl.policy import ActorCritic, PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.crl.rollout import PolicyController
from crl_exp.episodes import SteeringEnv
from crl_exp.errors import CRLConfigError
from crl_exp.tasks import Task


class PromptDataModule(L.LightningDataModule):
    """Serves the training prompts of iteration ``current_epoch`` (reload every epoch).

    With ``group_size`` G > 1 an iteration holds ``episodes_per_iteration / G`` distinct prompts, each G times in
    a row: G sampled episodes of one prompt share one prefill (``generate(share_prefix=True)``)."""

    def __init__(self, task: Task, episodes_per_iteration: int, seed: int = 0, group_size: int = 1):
        super().__init__()
        if group_size < 1 or episodes_per_iteration % group_size:
            raise CRLConfigError(f"budget.group_size={group_size} must divide budget.episodes_per_iteration="
                                 f"{episodes_per_iteration}")
        self.task, self.episodes, self.seed, self.group_size = task, episodes_per_iteration, seed, group_size

    def batch_for(self, iteration: int) -> list:
        pool = self.task.split("train")
        if not pool:
            raise ValueError(f"{self.task.name} has an empty train split")
        idx = iteration_prompts(len(pool), self.episodes // self.group_size, self.seed, iteration)
        return [pool[i] for i in idx for _ in range(self.group_size)]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a list of Examples (text); the rollout moves token tensors itself

    def train_dataloader(self) -> DataLoader:
        batch = self.batch_for(self.trainer.current_epoch if self.trainer else 0)
        return DataLoader([batch], batch_size=None, collate_fn=lambda b: b)


class CRLModule(L.LightningModule):
    """Lightning's view of a ``Learner``: one epoch is one ``Learner.iterate`` over a ``RolloutSource``; this class
    adds checkpoints, timing and logging, nothing that learns."""

    def __init__(self, d_model: int, d_sae: int, policy_cfg: PolicyConfig, ppo_cfg: PPOConfig, masking_cfg: MaskingConfig,
                 total_iterations: int, seed: int = 0, action_directions: torch.Tensor | None = None):
        """``action_directions``: the SAE's decoder rows [d_sae, d_model], needed by ``policy.head=embedding``."""
        super().__init__()
        self.automatic_optimization = False
        self.learner = Learner.from_config(d_model, d_sae, policy_cfg, ppo_cfg, masking_cfg, total_iterations, seed,
                                           action_directions)
        self.policy = self.learner.policy
        self.reward_stats = self.learner.reward_stats  # saved in checkpoints with the policy
        self.ppo_cfg, self.total_iterations, self.seed = ppo_cfg, total_iterations, seed
        self.env: SteeringEnv | None = None
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None  # the MLflow run training logs to; a resume continues it
        self.last_rollout: dict[str, Any] | None = None

    @property
    def top_k(self) -> int:
        return self.learner.top_k

    @property
    def mask(self):
        return self.learner.mask

    @property
    def episodes_seen(self) -> int:
        """Model rows spent on training so far (all_actions: prompts x (actions + 1) per iteration)."""
        return self.learner.model_rows

    def action_space(self) -> torch.Tensor:
        return self.learner.action_space()

    def allowed_actions(self) -> torch.Tensor:
        return self.learner.allowed_actions()

    def features_only(self, actions: torch.Tensor) -> torch.Tensor:
        return self.learner.features_only(actions)

    def controller(self, *, greedy: bool, with_mask: bool, seed: int = 0, sae=None,
                   policy: ActorCritic | None = None) -> PolicyController:
        """The one way to act with this policy outside training (evaluation, analyses): inside its action space
        always, and inside the current Adaptive Feature Mask too when ``with_mask`` (the mask-on evaluation).
        ``policy``: another network over the same action space (the untrained control)."""
        allowed = self.allowed_actions() if with_mask else self.action_space()
        return PolicyController(policy or self.policy, allowed=allowed, greedy=greedy, seed=seed, sae=sae,
                                top_k=self.top_k)  # features only: the steerer holds the run's coefficient

    def warm_up_obs_norm(self, states: torch.Tensor) -> None:
        self.learner.warm_up_obs_norm(states)

    def attach(self, env: SteeringEnv) -> CRLModule:
        self.__dict__["env"] = env  # plain attribute: the frozen LM/SAE never enter state_dict or checkpoints
        return self

    def configure_optimizers(self):
        return self.learner.make_optimizer()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["afm"] = self.mask.state_dict()
        checkpoint["crl_iteration_done"] = self.current_epoch
        checkpoint["crl_history"] = self.history
        checkpoint["crl_mlflow_run_id"] = self.run_id
        checkpoint["crl_episodes_seen"] = self.episodes_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.mask.load_state_dict(checkpoint["afm"])
        self.history = list(checkpoint.get("crl_history", []))  # the training curve covers every iteration
        self.learner.model_rows = int(checkpoint.get("crl_episodes_seen", 0))

    def reward_scale(self) -> float:
        return self.learner.reward_scale()

    def training_step(self, batch: list, batch_idx: int) -> None:
        iteration = self.current_epoch
        result = self.learner.iterate(RolloutSource(self.env, batch), iteration, self.optimizers(),
                                      backward=self.manual_backward)
        episodes = result.episodes
        self.last_rollout = None
        if isinstance(episodes, SampledEpisodes):
            self.last_rollout = {"records": episodes.records, "trajectory": episodes.trajectory,
                                 "valid": episodes.valid}
        metrics = {f"train/{k}": v for k, v in result.metrics.items() if k != "model_rows"}
        metrics.update({"train/rollout_seconds": result.draw_seconds, "train/update_seconds": result.update_seconds,
                        "train/update_to_rollout": result.update_seconds / result.draw_seconds})
        self.record(iteration, metrics)
        self.log_dict({"reward": metrics["train/reward_mean"], "acc": metrics["train/accuracy"],
                       "kl": metrics.get("train/approx_kl", 0.0)}, prog_bar=True, logger=False, on_step=True,
                      batch_size=len(batch))

    def record(self, iteration: int, metrics: dict[str, float]) -> None:
        """One iteration's metrics into the history (with the model rows spent so far) and the logger."""
        metrics["train/episodes"] = float(self.episodes_seen)
        self.history.append({"iteration": iteration, **metrics})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=iteration)
