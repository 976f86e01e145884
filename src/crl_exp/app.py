"""Mode dispatch: validate the config cheaply, then load what the mode needs and run it inside an MLflow run.

Every mode follows the same order: pre-flight checks that need no weights (layer range, SAE width/hook for
local SAEs, writable cache), then model, then SAE, then work. Bad input therefore fails in well under a second.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from crl_exp.crl.ppo import resolve_advantage
from crl_exp.errors import CRLConfigError
from crl_exp.models.loading import package_folder
from crl_exp.models.memory import ModelShape, rollout_memory, shape_from_hf_config
from crl_exp.paths import default_cache_dir, ensure_writable_dir
from crl_exp.saes.loading import preflight_sae, validate_layer
from crl_exp.tracking import RunTracker, start_tracked_run
from crl_exp.tracking.mlflow_run import current_sweep, descriptive_run_name
from crl_exp.tracking.sweep import config_hash, finished_run_with_hash

log = logging.getLogger(__name__)


# mode name -> module under crl_exp/modes with ``run(cfg, tracker)``; imported on use, so a mode's heavy imports
# (Lightning, pandas, ...) cost nothing to the others and bad input fails before they load.
MODES: dict[str, str] = {
    "train": "train",
    "analyse": "analyse",
    "compare_layers": "compare_layers",
    "compare_sweep": "compare_sweep",
    "steer": "steer",
    "train_sae": "train_sae",
    "eval": "eval",
    "select_coefficient": "select_coefficient",
}


def runner(mode: str) -> Callable[[DictConfig, RunTracker], object]:
    return importlib.import_module(f"crl_exp.modes.{MODES[mode]}").run


def preflight(cfg: DictConfig) -> str | None:
    """All checks that need no weights. Returns the MLflow run a resumed checkpoint was logging to (or None)."""
    if cfg.mode not in MODES:
        raise CRLConfigError(f"Unknown mode {cfg.mode!r}; valid modes: {', '.join(MODES)}")
    check_tracking_uri(cfg.logger.get("tracking_uri"))
    ckpt = cfg.get("trainer", {}).get("ckpt_path")
    resume_run_id = check_checkpoint(str(ckpt)).get("crl_mlflow_run_id") if ckpt else None
    if cfg.mode in ("analyse", "compare_layers", "compare_sweep"):
        return resume_run_id  # these read the model/SAE settings of the runs they analyse
    check_budget(cfg)
    coefficient = cfg.get("steering", {}).get("coefficient")
    if coefficient is not None and not math.isfinite(float(coefficient)):
        raise CRLConfigError(f"steering.coefficient={coefficient} is invalid: it must be a finite number")
    n_layers = peek_n_layers(cfg.model)
    for layer in [cfg.sae.layer, *(cfg.sae.get("layers") or [])]:
        validate_layer(layer, n_layers)
    preflight_sae(cfg.sae, cfg.model.d_model)
    ensure_writable_dir(cfg.cache_dir or default_cache_dir(), "cache")
    if cfg.model.source == "gguf_package":
        package_folder(cfg.model.package)
    return resume_run_id


def check_tracking_uri(uri: str | None, timeout: float = 5.0) -> None:
    """An MLflow server URI must answer before any work starts (a SQLite file needs a writable folder)."""
    if not uri:
        return
    uri = str(uri)
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise CRLConfigError(f"MLflow tracking server {uri} cannot be reached ({exc}): start it (make "
                                 f"mlflow-server) or set logger.tracking_uri to a reachable server or a "
                                 f"sqlite:/// file") from exc
    elif uri.startswith("sqlite:///"):
        ensure_writable_dir(Path(uri.removeprefix("sqlite:///")).parent, "MLflow store")


def check_checkpoint(path: str) -> dict:
    """A resume checkpoint must exist and load (a truncated or corrupted file fails here, not mid-run)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CRLConfigError(f"trainer.ckpt_path={path}: no such file (resume from <run outputs>/checkpoints/"
                             f"last.ckpt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle; all mean the same to the user
        raise CRLConfigError(f"trainer.ckpt_path={path} is unreadable ({type(exc).__name__}: {exc}): the file is "
                             f"truncated or corrupted; resume from an earlier iteration's checkpoint in the same "
                             f"folder or start afresh") from exc
    if not isinstance(state, dict) or "state_dict" not in state or "afm" not in state:
        raise CRLConfigError(f"trainer.ckpt_path={path} is not a crl-exp training checkpoint (no policy/mask "
                             f"state)")
    return state


def check_budget(cfg: DictConfig) -> None:
    """Refuse budget/model combinations that cannot work, before anything is loaded."""
    budget = cfg.get("budget")
    if budget is None or cfg.mode != "train":
        return
    if cfg.model.name not in budget.models and not (cfg.model.source == "hf" and "hf" in budget.models):
        raise CRLConfigError(f"budget={budget.name} is for model(s) {list(budget.models)}, not model={cfg.model.name}"
                             f" (use budget=paper with model=gemma2_2b sae=gemmascope_2b_res_16k on a GPU, or "
                             f"budget=cpu with the embedded model)")
    if budget.device != str(cfg.model.device).split(":")[0]:
        raise CRLConfigError(f"budget={budget.name} expects model.device={budget.device}, got {cfg.model.device}")
    from crl_exp.crl.config import config_dataclass, masking_config, validate_budget
    from crl_exp.crl.policy import PolicyConfig
    from crl_exp.crl.ppo import PPOConfig, validate_ppo

    ppo = config_dataclass(PPOConfig, cfg.ppo)
    policy = config_dataclass(PolicyConfig, cfg.policy)
    validate_ppo(ppo)
    validate_budget(budget)
    group = int(budget.group_size)
    if group < 1 or int(budget.episodes_per_iteration) % group:
        raise CRLConfigError(f"budget.group_size={group} must divide budget.episodes_per_iteration="
                             f"{budget.episodes_per_iteration}")
    if ppo.advantage in ("all_actions", "sampled_set") and int(cfg.task.max_new_tokens) != 1:
        raise CRLConfigError(f"ppo.advantage={ppo.advantage} needs a one-token task (every action's reward from one "
                             f"forward); task={cfg.task.name} generates {cfg.task.max_new_tokens} tokens: use gae")
    if ppo.advantage == "group" and group < 2:
        raise CRLConfigError("ppo.advantage=group compares episodes of the same prompt: set budget.group_size >= 2")
    d_sae = int(cfg.sae.training.d_sae) if cfg.sae.source == "trained" else None
    masking = masking_config(cfg.masking)
    masking.validate(d_sae or 16384)
    if policy.action_pool is not None:
        masking.check_action_pool(policy.action_pool, d_sae)
    check_rollout_memory(cfg)


def check_rollout_memory(cfg: DictConfig) -> None:
    """Refuse a budget whose largest batched generate cannot fit, with the estimate that refused it."""
    from crl_exp.crl.config import capped_new_tokens

    shape = peek_model_shape(cfg.model)
    if shape is None:
        return
    budget, task = cfg.budget, cfg.task
    episodes, eval_rows = int(budget.episodes_per_iteration), int(budget.eval_batch_size)
    new_tokens = capped_new_tokens(budget, task)
    prompt_tokens = int(task.max_prompt_tokens)
    # grouped training prefills one prompt at a time; ungrouped training and evaluation prefill a whole batch
    prefill_rows = max(eval_rows, 1 if int(budget.group_size) > 1 else episodes)
    estimate = rollout_memory(shape, max(episodes, eval_rows), prompt_tokens, new_tokens, prefill_rows)
    limit, source = memory_limit(cfg)
    if limit is not None and estimate.total_bytes > limit:
        raise CRLConfigError(
            f"budget={budget.name}: a rollout of {max(episodes, eval_rows)} rows x ({prompt_tokens} prompt + "
            f"{new_tokens} new) tokens of {cfg.model.name} needs an estimated {estimate.total_bytes / 2**30:.1f} GiB "
            f"({estimate.describe()}), more than the {limit / 2**30:.1f} GiB {source}: lower "
            f"budget.episodes_per_iteration (or budget.group_size / budget.eval_batch_size)")


def memory_limit(cfg: DictConfig) -> tuple[int | None, str]:
    """Bytes a rollout may use: ``budget.max_memory_gb``, else the GPU's memory or the machine's available RAM."""
    if cfg.budget.get("max_memory_gb") is not None:
        return int(float(cfg.budget.max_memory_gb) * 2**30), "allowed by budget.max_memory_gb"
    if str(cfg.model.device).startswith("cuda"):
        if not torch.cuda.is_available():
            return None, ""
        return torch.cuda.get_device_properties(0).total_memory, "of GPU memory"
    return available_ram(), "of available RAM"


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peek_model_shape(model_cfg: DictConfig) -> ModelShape | None:
    """The model's shape from its config node, or from its config.json (no weights) for ``model=hf``."""
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "n_params")
    if all(model_cfg[k] for k in keys):
        return ModelShape(**{k: int(model_cfg[k]) for k in keys}, dtype=str(model_cfg.dtype))
    hf_cfg = read_hf_config(model_cfg)
    return shape_from_hf_config(hf_cfg, str(model_cfg.dtype)) if hf_cfg is not None else None


def read_hf_config(model_cfg: DictConfig):
    """The transformers config of a ``model=hf`` model (config.json only), or ``None`` for other sources."""
    if model_cfg.source != "hf" or not model_cfg.path:
        return None
    return _hf_config(str(model_cfg.path))


@functools.lru_cache(maxsize=8)
def _hf_config(path: str):
    """Read once per path: the layer check and the memory check both need it (a hub id costs a request)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CRLConfigError(f"Cannot read the config of model {path!r}: {exc}") from exc


def peek_n_layers(model_cfg: DictConfig) -> int | None:
    """Layer count from the config, or from the model's config.json (no weights) for arbitrary HF models."""
    if model_cfg.n_layers:
        return int(model_cfg.n_layers)
    hf_cfg = read_hf_config(model_cfg)
    if hf_cfg is None:
        return None
    return int((getattr(hf_cfg, "text_config", None) or hf_cfg).num_hidden_layers)


def run_name(cfg: DictConfig) -> str:
    """``logger.run_name``, or a name that says what ran, with the estimator ``ppo.advantage`` resolves to."""
    if cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    estimator = None
    if cfg.mode == "train":
        estimator = resolve_advantage(str(cfg.ppo.advantage), int(cfg.task.max_new_tokens) == 1,
                                      int(cfg.budget.group_size), int(cfg.policy.top_k))
    return descriptive_run_name(cfg, estimator)


def run(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    torch.manual_seed(int(cfg.seed))
    resume_run_id = preflight(cfg)
    output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    tags = {"model": cfg.model.name, "layer": cfg.sae.layer, "sae_source": cfg.sae.source,
            "task": cfg.task.name, "steering": cfg.steering.kind}
    sweep = current_sweep()
    if sweep is not None and not cfg.get("sweep", {}).get("force", False):
        client = MlflowClient(sweep["tracking_uri"])
        done = finished_run_with_hash(client, sweep["experiment_id"], config_hash(cfg))
        if done is not None:
            log.info("Skipping job: run %s already finished this config (sweep.force=true to rerun)", done)
            if output_dir:
                Path(output_dir, "SKIPPED").write_text(done)
            return
    try:
        with start_tracked_run(cfg, run_name=run_name(cfg), output_dir=output_dir, tags=tags,
                               resume_run_id=resume_run_id) as tracker:
            runner(cfg.mode)(cfg, tracker)
    except Exception:
        if sweep is None:
            raise
        # In a sweep one failing job must not take the others down: it is recorded as FAILED (with its
        # error text as an artifact) by start_tracked_run, counted on the parent run, and logged here.
        log.exception("Sweep job failed (recorded as FAILED in MLflow); continuing with the other jobs")
