"""``mode=analyse analysis=<name> run_id=...``: analyses of a finished ``mode=train`` run, read back from MLflow.

* ``branch_points``: counterfactual continuations per token of the trained policy on held-out episodes;
* ``top_features``: the policy's most-used held-out features, what they respond to and what they did.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from crl_exp.analysis.branch_report import analyse_branches
from crl_exp.analysis.runs import download_checkpoint, load_policy_state, load_run_config
from crl_exp.analysis.top_features import as_json, corpus_top_contexts, effects_table, feature_effects, most_used
from crl_exp.crl.config import apply_budget, config_dataclass, masking_config
from crl_exp.crl.module import CRLModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.episodes import build_env
from crl_exp.errors import CRLConfigError
from crl_exp.paths import default_data_dir
from crl_exp.saes.corpus import RESID_NORM_SOURCES, benchmark_corpus
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker

ANALYSES = ("branch_points", "top_features")


def run(cfg: DictConfig, tracker: RunTracker) -> list[dict]:
    if cfg.analysis.name not in ANALYSES:
        raise CRLConfigError(f"Unknown analysis {cfg.analysis.name!r}; valid: {', '.join(ANALYSES)}")
    if not cfg.get("run_id"):
        raise CRLConfigError("mode=analyse needs run_id=<MLflow run id of a mode=train run>")
    client = MlflowClient(tracker.tracking_uri)
    src = load_run_config(client, str(cfg.run_id))
    acfg = cfg.analysis
    with open_dict(src):
        src.data_dir = cfg.get("data_dir") or src.get("data_dir")
        src.cache_dir = cfg.get("cache_dir") or src.get("cache_dir")
    apply_budget(src)
    tracker.set_tags({"source_run_id": cfg.run_id, "analysis": acfg.name, "task": src.task.name})
    if acfg.name == "top_features":
        return top_features(client, src, cfg, tracker)
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
    return analyse_branches(env, module, task, acfg, tracker, title=f"run {cfg.run_id}")


def top_features(client: MlflowClient, src: DictConfig, cfg: DictConfig, tracker: RunTracker) -> list[dict]:
    """Artifacts ``top_features/top_features.{md,json}`` of this run; the table is also printed."""
    run_id, acfg = str(cfg.run_id), cfg.analysis
    with tempfile.TemporaryDirectory() as tmp:
        try:
            log = pd.read_parquet(client.download_artifacts(run_id, "interventions/intervention_log.parquet", tmp))
            crl, none = (read_examples(client.download_artifacts(run_id, f"heldout/{c}/examples.json", tmp))
                         for c in ("crl", "none"))
        except MlflowException as exc:
            raise CRLConfigError(f"Run {run_id} has no held-out intervention log/examples: was it finished?") from exc
    features = most_used(log, int(acfg.n_features))
    effects = feature_effects(log, crl, none, features)
    task = build_task(src.task, src.get("data_dir"))
    env = build_env(src, task)
    texts = benchmark_corpus(src.get("data_dir") or default_data_dir(), RESID_NORM_SOURCES)
    contexts = corpus_top_contexts(env.lm, env.sae.sae, int(src.sae.layer), texts, features,
                                   n_tokens=int(acfg.corpus_tokens))
    for f, e in effects.items():
        e.top_contexts = contexts[f]
    ordered = [effects[f] for f in features]
    table = (f"Top {len(ordered)} features of run {run_id} ({src.task.name}, layer {src.sae.layer}, "
             f"{len(log)} steered held-out tokens):\n\n" + effects_table(ordered))
    print(table)
    tracker.log_text(table, "top_features/top_features.md")
    tracker.log_dict(as_json(ordered), "top_features/top_features.json")
    return as_json(ordered)


def read_examples(path: str) -> list[dict]:
    """An MLflow table artifact (columns + rows) as one dict per held-out example."""
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
