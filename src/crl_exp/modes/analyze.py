"""``mode=analyze analysis=branch_points run_id=...``: branch points of a trained policy on held-out episodes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from crl_exp.analysis.branch_report import analyse_branches
from crl_exp.analysis.runs import download_checkpoint, load_policy_state, load_run_config
from crl_exp.crl.config import apply_budget, config_dataclass, masking_config
from crl_exp.crl.module import CRLModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.episodes import build_env
from crl_exp.errors import CRLConfigError
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker

ANALYSES = ("branch_points",)


def run(cfg: DictConfig, tracker: RunTracker) -> list[dict]:
    if cfg.analysis.name not in ANALYSES:
        raise CRLConfigError(f"Unknown analysis {cfg.analysis.name!r}; valid: {', '.join(ANALYSES)}")
    if not cfg.get("run_id"):
        raise CRLConfigError("mode=analyze needs run_id=<MLflow run id of a mode=train run>")
    client = MlflowClient(tracker.tracking_uri)
    src = load_run_config(client, str(cfg.run_id))
    acfg = cfg.analysis
    with open_dict(src):
        src.data_dir = cfg.get("data_dir") or src.get("data_dir")
        src.cache_dir = cfg.get("cache_dir") or src.get("cache_dir")
    apply_budget(src)
    tracker.set_tags({"source_run_id": cfg.run_id, "analysis": "branch_points", "task": src.task.name})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = download_checkpoint(client, str(cfg.run_id), Path(tmp))
        task = build_task(src.task, src.get("data_dir"))
        env = build_env(src, task)
        module = CRLModule(env.lm.d_model, env.sae.d_sae, config_dataclass(PolicyConfig, src.policy), config_dataclass(PPOConfig, src.ppo),
                           masking_config(src.masking), int(src.budget.iterations), seed=int(src.seed))
        load_policy_state(module, ckpt)
    if module.top_k != 1:
        raise CRLConfigError("Branch-point tracking needs a top-1 policy (one feature per token); this run used "
                             f"policy.top_k={module.top_k}")
    return analyse_branches(env, module.policy, task, acfg, tracker, title=f"run {cfg.run_id}")
