"""The CRL ``LightningModule`` (manual optimisation) and the prompt ``LightningDataModule``.

One Lightning *epoch* is one PPO iteration: the data module serves one batch of training prompts per epoch
(seeded by the iteration, so a resumed run sees exactly the prompts it would have seen), ``training_step``
runs the steered rollout, scores it, and performs the PPO update. Checkpoints are taken at epoch ends and
contain the policy, the optimiser, the Adaptive Feature Mask, the training history and the MLflow run id, so
``ckpt_path`` resumes at the next iteration in the same MLflow run with nothing logged twice. Metrics are
logged with ``step = iteration``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from crl_exp.crl.masking import AdaptiveFeatureMask, MaskingConfig
from crl_exp.crl.policy import ActorCritic, PolicyConfig, RunningObsNorm
from crl_exp.crl.ppo import (
    Batch,
    PPOConfig,
    all_actions_update,
    annealed_lr,
    check_finite,
    ppo_update,
    resolve_advantage,
)
from crl_exp.crl.rollout import PolicyController, policy_rollout
from crl_exp.episodes import SteeringEnv
from crl_exp.errors import CRLConfigError
from crl_exp.reward_table import reward_table
from crl_exp.tasks import Task


def iteration_seed(seed: int, iteration: int) -> int:
    return (seed * 1_000_003 + iteration) % (2**31)


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
        g = torch.Generator().manual_seed(iteration_seed(self.seed, iteration))
        idx = torch.randperm(len(pool), generator=g)[: self.episodes // self.group_size].tolist()
        return [pool[i] for i in idx for _ in range(self.group_size)]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a list of Examples (text); the rollout moves token tensors itself

    def train_dataloader(self) -> DataLoader:
        batch = self.batch_for(self.trainer.current_epoch if self.trainer else 0)
        return DataLoader([batch], batch_size=None, collate_fn=lambda b: b)


class CRLModule(L.LightningModule):
    def __init__(self, d_model: int, d_sae: int, policy_cfg: PolicyConfig, ppo_cfg: PPOConfig, masking_cfg: MaskingConfig,
                 total_iterations: int, seed: int = 0, action_directions: torch.Tensor | None = None):
        """``action_directions``: the SAE's decoder rows [d_sae, d_model], needed by ``policy.head=embedding``."""
        super().__init__()
        self.automatic_optimization = False
        with torch.random.fork_rng():  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.policy = ActorCritic(d_model, d_sae, policy_cfg.hidden, policy_cfg.shared_trunk, policy_cfg.obs_norm,
                                      policy_cfg.noop_action, policy_cfg.head, action_directions,
                                      policy_cfg.embedding_dim)
        self.ppo_cfg, self.total_iterations, self.seed = ppo_cfg, total_iterations, seed
        self.top_k = policy_cfg.top_k
        if not 1 <= self.top_k <= d_sae or (masking_cfg.schedule != "none" and self.top_k > masking_cfg.min_unmasked):
            raise CRLConfigError(f"policy.top_k={self.top_k} must be in [1, d_sae] and <= masking.min_unmasked")
        self.mask = AdaptiveFeatureMask(d_sae, masking_cfg)
        self.reward_stats = RunningObsNorm(1)  # running reward variance (ppo.norm_rewards); saved in checkpoints
        self.episodes_seen = 0
        self.env: SteeringEnv | None = None
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None  # the MLflow run training logs to; a resume continues it
        self.last_rollout: dict[str, Any] | None = None

    def action_space(self) -> torch.Tensor:
        """Bool [actions]: the features this policy was trained to choose among (the candidate pool of
        ``policy.action_pool``, or the whole dictionary), and the no-op when it has one; no evaluation may act
        outside it."""
        return self.with_noop(self.mask.candidates.clone())

    def allowed_actions(self) -> torch.Tensor:
        """Bool [actions]: the action space minus what Adaptive Feature Masking masks now (never the no-op)."""
        return self.with_noop(self.mask.allowed())

    def with_noop(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.policy.noop_index is None else torch.cat([features, torch.ones(1, dtype=torch.bool)])

    def features_only(self, actions: torch.Tensor) -> torch.Tensor:
        """The chosen actions that are features (the no-op dropped), for AFM's selection shares."""
        noop = self.policy.noop_index
        return actions if noop is None else actions[actions != noop]

    def controller(self, *, greedy: bool, with_mask: bool, seed: int = 0, sae=None,
                   policy: ActorCritic | None = None) -> PolicyController:
        """The one way to act with this policy (the only place a ``PolicyController`` is built): inside its
        action space always, and inside the current Adaptive Feature Mask too when ``with_mask`` (training, and the
        mask-on evaluation). ``policy``: another network over the same action space (the untrained control)."""
        allowed = self.allowed_actions() if with_mask else self.action_space()
        return PolicyController(policy or self.policy, allowed=allowed, greedy=greedy, seed=seed, sae=sae,
                                top_k=self.top_k)  # features only: the steerer holds the run's coefficient

    @torch.no_grad()
    def warm_up_obs_norm(self, states: torch.Tensor) -> None:
        """Fold unsteered states in before the first rollout (``policy.obs_norm``): otherwise iteration 0 acts and
        trains on raw inputs and the normaliser switches on at iteration 1, under the policy's feet."""
        self.policy.update_obs_norm(states)

    def attach(self, env: SteeringEnv) -> CRLModule:
        self.__dict__["env"] = env  # plain attribute: the frozen LM/SAE never enter state_dict or checkpoints
        return self

    def configure_optimizers(self):
        return torch.optim.Adam(self.policy.parameters(), lr=self.ppo_cfg.lr, eps=self.ppo_cfg.adam_eps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["afm"] = self.mask.state_dict()
        checkpoint["crl_iteration_done"] = self.current_epoch
        checkpoint["crl_history"] = self.history
        checkpoint["crl_mlflow_run_id"] = self.run_id
        checkpoint["crl_episodes_seen"] = self.episodes_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.mask.load_state_dict(checkpoint["afm"])
        self.history = list(checkpoint.get("crl_history", []))  # the training curve covers every iteration
        self.episodes_seen = int(checkpoint.get("crl_episodes_seen", 0))

    def scaled_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """Episode rewards divided by their running std (``ppo.norm_rewards``), folding this batch in first."""
        if not self.ppo_cfg.norm_rewards:
            return rewards
        self.reward_stats.update(rewards[:, None].double())
        return rewards / self.reward_scale()

    def reward_scale(self) -> float:
        """sigma: what the critic's targets were divided by (1 without ``ppo.norm_rewards`` or before any
        rollout). V times sigma is in the reward's units: every comparison of values with rewards uses it."""
        if not self.ppo_cfg.norm_rewards or float(self.reward_stats.count) == 0:
            return 1.0
        return float(torch.sqrt(self.reward_stats.var + 1e-8).item())

    def training_step(self, batch: list, batch_idx: int) -> None:
        iteration = self.current_epoch
        env, cfg = self.env, self.ppo_cfg
        optimizer = self.optimizers()
        for group in optimizer.param_groups:
            group["lr"] = annealed_lr(cfg, iteration, self.total_iterations)
        if cfg.advantage == "all_actions":
            return self.all_actions_step(batch, iteration, optimizer)
        seed = iteration_seed(self.seed, iteration)
        controller = self.controller(greedy=False, with_mask=True, seed=seed, sae=env.sae.sae)
        t0 = time.perf_counter()
        first: dict[str, int] = {}
        groups = torch.tensor([first.setdefault(ex.id, len(first)) for ex in batch])  # prompt number per episode
        rollout = policy_rollout(env.task, env.lm, batch, env.steerer, controller, share_prefix=len(first) < len(batch))
        rollout_seconds = time.perf_counter() - t0
        records, traj, valid = rollout.records, rollout.trajectory, rollout.valid
        episode_rewards = torch.tensor([r["reward"] for r in records], dtype=torch.float)
        check_finite(iteration, rewards=episode_rewards)
        advantage = resolve_advantage(cfg.advantage, env.task.max_new_tokens == 1, len(batch) // len(first))
        batch_steps = Batch.from_rollout(traj, valid, self.scaled_rewards(episode_rewards), cfg.gamma, cfg.gae_lambda,
                                         advantage=advantage, groups=groups)
        t1 = time.perf_counter()
        stats = ppo_update(self.policy, optimizer, cfg, iteration, batch_steps, self.allowed_actions(),
                           torch.Generator().manual_seed(seed), backward=self.manual_backward)
        update_seconds = time.perf_counter() - t1
        chosen = traj["feature"][valid]
        self.last_rollout = {"records": records, "trajectory": traj, "valid": valid}
        self.mask.update(self.features_only(chosen), entropy=stats["entropy"])
        # after the update, so this iteration's stored log-probs and its PPO ratios used one normaliser
        self.policy.update_obs_norm(traj["state"][valid])
        metrics = {
            "train/reward_mean": episode_rewards.mean().item(),
            "train/accuracy": sum(r["correct"] for r in records) / len(records),
            **{f"train/{k}": v for k, v in stats.items()},
            "train/distinct_features": float(self.features_only(chosen).unique().numel()),
            "train/steered_share": float((chosen != self.policy.noop_index).float().mean())
            if self.policy.noop_index is not None else 1.0,
            "train/mask_size": float(self.mask.mask_size),
            "train/mask_threshold": float(self.mask.effective_threshold),
            "train/reward_scale": self.reward_scale(),
            "train/steps_per_episode": valid.sum(1).float().mean().item(),
            "train/rollout_seconds": rollout_seconds,
            "train/update_seconds": update_seconds,
            "train/update_to_rollout": update_seconds / rollout_seconds,
            "train/lr": optimizer.param_groups[0]["lr"],
        }
        self.record(iteration, metrics, len(records))
        self.log_dict({"reward": metrics["train/reward_mean"], "acc": metrics["train/accuracy"],
                       "kl": stats.get("approx_kl", 0.0)}, prog_bar=True, logger=False, on_step=True,
                      batch_size=len(batch))

    def record(self, iteration: int, metrics: dict[str, float], episodes: int) -> None:
        """One iteration's metrics into the history (with the episodes spent so far) and the logger."""
        self.episodes_seen += episodes
        metrics["train/episodes"] = float(self.episodes_seen)
        self.history.append({"iteration": iteration, **metrics})
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=iteration)

    def all_actions_step(self, batch: list, iteration: int, optimizer) -> None:
        """One-token tasks, ``ppo.advantage=all_actions``: the iteration's distinct prompts under every allowed
        action (one exact reward table), then the exact expected-reward update (``ppo.all_actions_update``)."""
        env, cfg = self.env, self.ppo_cfg
        prompts = list({ex.id: ex for ex in batch}.values())
        allowed = self.allowed_actions()
        features = self.mask.allowed().nonzero().flatten()
        if len(features) > MAX_ALL_ACTIONS:
            raise CRLConfigError(f"ppo.advantage=all_actions scores every allowed action of every prompt; "
                                 f"{len(features)} actions is more than {MAX_ALL_ACTIONS}: set policy.action_pool")
        t0 = time.perf_counter()
        table = reward_table(env, prompts, features.tolist(), desc=f"all actions, iteration {iteration}",
                             use_cache=False)
        rollout_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        actions, rewards, correct = features, table.reward, table.correct
        if self.policy.noop_index is not None:  # the no-op's reward is the table's unsteered column
            actions = torch.cat([features, torch.tensor([self.policy.noop_index])])
            rewards = torch.cat([table.reward, table.unsteered_reward[:, None]], 1)
            correct = torch.cat([table.correct, table.unsteered_correct[:, None]], 1)
        stats = all_actions_update(self.policy, optimizer, cfg, iteration, table.states, rewards, actions,
                                   allowed, backward=self.manual_backward)
        update_seconds = time.perf_counter() - t1
        with torch.no_grad():  # what the policy chose this iteration, for AFM and the diagnostics: one sample each
            probs = self.policy(table.states.to(self.device), allowed.to(self.device))[0].softmax(-1).cpu()
            g = torch.Generator().manual_seed(iteration_seed(self.seed, iteration))
            sampled = torch.multinomial(probs, 1, generator=g).flatten()
            greedy = probs.argmax(-1)
        self.mask.update(self.features_only(sampled), entropy=stats["entropy"])
        self.policy.update_obs_norm(table.states)
        column = {int(f): j for j, f in enumerate(actions.tolist())}
        chosen_correct = correct[torch.arange(len(prompts)), torch.tensor([column[int(f)] for f in greedy])]
        metrics = {
            "train/reward_mean": stats["expected_reward_before"],
            "train/accuracy": float(chosen_correct.mean()),
            **{f"train/{k}": v for k, v in stats.items()},
            "train/distinct_features": float(self.features_only(greedy).unique().numel()),
            "train/steered_share": float((greedy != self.policy.noop_index).float().mean())
            if self.policy.noop_index is not None else 1.0,
            "train/mask_size": float(self.mask.mask_size),
            "train/mask_threshold": float(self.mask.effective_threshold),
            "train/rollout_seconds": rollout_seconds,
            "train/update_seconds": update_seconds,
            "train/update_to_rollout": update_seconds / rollout_seconds,
            "train/lr": optimizer.param_groups[0]["lr"],
        }
        self.last_rollout = None
        self.record(iteration, metrics, table.episodes)
        self.log_dict({"reward": metrics["train/reward_mean"], "acc": metrics["train/accuracy"]}, prog_bar=True,
                      logger=False, on_step=True, batch_size=len(prompts))


MAX_ALL_ACTIONS = 512  # one reward table row per action and prompt: beyond this, restrict the action space
