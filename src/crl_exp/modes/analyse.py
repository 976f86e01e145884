"""``mode=analyse analysis=<name> run_id=...``: analyses of a finished ``mode=train`` run, read back from MLflow.

* ``branch_points``: counterfactual continuations per token of the trained policy on held-out episodes;
* ``top_features``: the policy's most-used held-out features, what they respond to and what they did;
* ``off_task``: the policy scored on another task (default MMLU): what its steering costs elsewhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from crl_exp.analysis.branch_report import analyse_branches
from crl_exp.analysis.config import OffTaskConfig, TopFeaturesConfig, analysis_config
from crl_exp.analysis.runs import download_checkpoint, load_policy_state, load_run_config
from crl_exp.analysis.top_features import as_json, corpus_top_contexts, effects_table, feature_effects, most_used
from crl_exp.crl.config import apply_budget, config_dataclass, masking_config
from crl_exp.crl.module import CRLModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.episodes import build_env
from crl_exp.errors import CRLConfigError
from crl_exp.evaluation.config import eval_config
from crl_exp.evaluation.off_task import format_off_task, score_off_task
from crl_exp.paths import config_option, default_data_dir
from crl_exp.saes.corpus import RESID_NORM_SOURCES, benchmark_corpus
from crl_exp.saes.neuronpedia import feature_url
from crl_exp.tasks import build_task
from crl_exp.tracking import RunTracker
from crl_exp.tracking.artifacts import read_examples


def run(cfg: DictConfig, tracker: RunTracker) -> list[dict]:
    acfg = analysis_config(cfg.analysis)  # typed: unknown names and bad values refused here
    if not cfg.get("run_id"):
        raise CRLConfigError("mode=analyse needs run_id=<MLflow run id of a mode=train run>")
    client = MlflowClient(tracker.tracking_uri)
    src = load_run_config(client, str(cfg.run_id))
    with open_dict(src):
        src.data_dir = cfg.get("data_dir") or src.get("data_dir")
        src.cache_dir = cfg.get("cache_dir") or src.get("cache_dir")
    apply_budget(src)
    tracker.set_tags({"source_run_id": cfg.run_id, "analysis": acfg.name, "task": src.task.name})
    if acfg.name == "top_features":
        return top_features(client, src, cfg, acfg, tracker)
    if acfg.name == "off_task":
        return off_task(client, src, cfg, acfg, tracker)
    task = build_task(src.task, src.get("data_dir"))
    env, module = load_trained(client, src, str(cfg.run_id), task)
    if module.top_k != 1:
        raise CRLConfigError("Branch-point tracking needs a top-1 policy (one feature per token); this run used "
                             f"policy.top_k={module.top_k}")
    return analyse_branches(env, module, task, acfg, tracker, title=f"run {cfg.run_id}")


def load_trained(client: MlflowClient, src: DictConfig, run_id: str, task):
    """(env, module): the run's model, SAE and coefficient around ``task``, and its trained policy and mask."""
    env = build_env(src, task)
    module = CRLModule(env.lm.d_model, env.sae.d_sae, config_dataclass(PolicyConfig, src.policy),
                       config_dataclass(PPOConfig, src.ppo), masking_config(src.masking), int(src.budget.iterations),
                       seed=int(src.seed), action_directions=env.sae.sae.W_dec.detach().cpu())
    with tempfile.TemporaryDirectory() as tmp:
        load_policy_state(module, download_checkpoint(client, run_id, Path(tmp)))
    return env, module


def off_task(client: MlflowClient, src: DictConfig, cfg: DictConfig, acfg: OffTaskConfig, tracker: RunTracker) -> dict:
    """Artifact ``off_task/<task>.json`` and metrics ``off_task/*``: the run's policy, its static feature and no
    steering on ``analysis.task``'s ``analysis.split`` (seeded subset of ``analysis.limit``)."""
    run_id = str(cfg.run_id)
    task_cfg = off_task_config(src, acfg.task, acfg.template)
    task = build_task(task_cfg, src.get("data_dir"))
    split = acfg.split
    examples = task.split(split, acfg.limit)
    if not examples:
        raise CRLConfigError(f"{task.name} {split} split is empty")
    env, module = load_trained(client, src, run_id, task)
    static = client.get_run(run_id).data.metrics.get("static/feature")
    key, settings = task.primary_key, eval_config(src.eval)  # the source run's interval settings
    result = score_off_task(env, module, examples, key, None if static is None else int(static),
                            acfg.batch_size, settings.n_bootstrap, int(cfg.seed), settings.assumed_discordance)
    result.update(source_task=src.task.name, split=split, source_run_id=run_id)
    tracker.set_tags({"off_task": task.name})
    tracker.log_metrics({f"off_task/{name}/{key}": s["metrics"][key] for name, s in result["conditions"].items()})
    tracker.log_metrics({f"off_task/{name}": d[key]["delta"] for name, d in result["deltas"].items()})
    tracker.log_metrics({f"off_task/{name}/ci_{end}": d[key]["ci95"][i] for name, d in result["deltas"].items()
                         for i, end in enumerate(("low", "high"))})
    table = (f"Run {run_id} ({src.task.name} policy, {src.model.name}, layer {src.sae.layer}) scored on "
             f"{task.name} {split}:\n\n" + format_off_task(result))
    print(table)
    tracker.log_text(table, f"off_task/{task.name}.md")
    tracker.log_dict(result, f"off_task/{task.name}.json")
    return result


def off_task_config(src: DictConfig, name: str, template: str | None) -> DictConfig:
    """``conf/task/<name>.yaml``, rendered with the source run's prompt template (chat for an instruct-model run)
    unless ``template`` says otherwise."""
    task_cfg = config_option("task", name)
    with open_dict(task_cfg):
        task_cfg.template = template or src.task.get("template", "base")
    return task_cfg


def top_features(client: MlflowClient, src: DictConfig, cfg: DictConfig, acfg: TopFeaturesConfig,
                 tracker: RunTracker) -> list[dict]:
    """Artifacts ``top_features/top_features.{md,json}`` of this run; the table is also printed."""
    run_id = str(cfg.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            log = pd.read_parquet(client.download_artifacts(run_id, "interventions/intervention_log.parquet", tmp))
            crl, none = (read_examples(client.download_artifacts(run_id, f"heldout/{c}/examples.json", tmp))
                         for c in ("crl", "none"))
        except MlflowException as exc:
            raise CRLConfigError(f"Run {run_id} has no held-out intervention log/examples: was it finished?") from exc
    features = most_used(log, acfg.n_features)
    effects = feature_effects(log, crl, none, features)
    task = build_task(src.task, src.get("data_dir"))
    env = build_env(src, task)
    texts = benchmark_corpus(src.get("data_dir") or default_data_dir(), RESID_NORM_SOURCES)
    contexts = corpus_top_contexts(env.lm, env.sae.sae, int(src.sae.layer), texts, features,
                                   n_tokens=acfg.corpus_tokens)
    for f, e in effects.items():
        e.top_contexts = contexts[f]
        e.url = feature_url(env.sae.neuronpedia_id, f)
    ordered = [effects[f] for f in features]
    table = (f"Top {len(ordered)} features of run {run_id} ({src.task.name}, layer {src.sae.layer}, "
             f"{len(log)} steered held-out tokens):\n\n" + effects_table(ordered))
    print(table)
    tracker.log_text(table, "top_features/top_features.md")
    tracker.log_dict(as_json(ordered), "top_features/top_features.json")
    return as_json(ordered)
