"""One entry point, ``load_sae``, for the three SAE sources of ``conf/sae/``.

* ``pretrained``: sae-lens ``SAE.from_pretrained(release, sae_id)`` (Gemma Scope on the hub);
* ``local``: a folder written by sae-lens ``save_model`` (``SAE.load_from_disk``);
* ``trained``: a TopK SAE trained here on benchmark training text and cached per (model, layer, settings).

Whatever the source, ``validate_sae`` checks the SAE against the steered model and layer: width
(``d_in == d_model``) and recorded hook (``blocks.L.hook_resid_post``), refusing a mismatch unless
``allow_hook_mismatch`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from crl_exp.cache_integrity import commit, read_manifest, staging_dir, verify_manifest
from crl_exp.errors import CRLConfigError
from crl_exp.paths import default_cache_dir, default_data_dir, ensure_writable_dir
from crl_exp.saes import gemma_scope_2
from crl_exp.saes.neuronpedia import neuronpedia_id

log = logging.getLogger(__name__)

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_[a-z_]+)$")
SAE_CACHE_VERSION = 1  # bump when the training recipe changes in a way that invalidates cached SAEs


def resid_post_hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def parse_hook_name(hook_name: str | None) -> tuple[int | None, str | None]:
    m = _HOOK_RE.match(hook_name or "")
    return (int(m.group(1)), m.group(2)) if m else (None, None)


@dataclass
class LoadedSAE:
    sae: SAE
    layer: int
    hook_name: str
    source: str
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    neuronpedia_id: str | None = None  # feature pages (``saes/neuronpedia.py``): catalogue releases, or named by config

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)


def validate_layer(layer: int, n_layers: int | None) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise CRLConfigError(f"sae.layer must be an integer, got {layer!r}")
    if n_layers is not None and not 0 <= layer < n_layers:
        raise CRLConfigError(f"sae.layer={layer} is out of range: the model has {n_layers} layers, valid 0..{n_layers - 1}")


def validate_sae(sae_cfg_d_in: int, hook_name: str | None, d_model: int | None, layer: int,
                 allow_hook_mismatch: bool = False) -> None:
    """Refuse an SAE that cannot be steered at ``layer`` of a model of width ``d_model``."""
    if d_model is not None and sae_cfg_d_in != d_model:
        raise CRLConfigError(f"SAE d_in={sae_cfg_d_in} does not match the model's d_model={d_model}: "
                             f"this SAE was trained on another model")
    hook_layer, hook_kind = parse_hook_name(hook_name)
    expected = resid_post_hook_name(layer)
    if hook_name != expected and not allow_hook_mismatch:
        what = ("no hook recorded" if hook_name is None else
                f"it was trained on {hook_name!r}" + (f" (layer {hook_layer})" if hook_layer is not None else ""))
        raise CRLConfigError(f"SAE/hook mismatch: steering {expected} but {what}. Use the SAE for layer {layer}, "
                             f"or set sae.allow_hook_mismatch=true to steer with it anyway.")
    if hook_name != expected:
        log.warning("Steering %s with an SAE trained on %s (allow_hook_mismatch=true)", expected, hook_name)


def peek_local_sae(path: str | Path) -> dict[str, Any]:
    """Read a sae-lens folder's cfg.json without loading weights (cheap pre-flight checks)."""
    cfg_path = Path(path).expanduser() / "cfg.json"
    if not cfg_path.is_file():
        raise CRLConfigError(f"No sae-lens SAE at {str(Path(path))!r} (expected cfg.json + sae_weights.safetensors)")
    return json.loads(cfg_path.read_text())


def preflight_sae(cfg: Any, d_model: int | None) -> None:
    """Checks that need no weights: layer type, source name, and for local SAEs width and hook."""
    source = cfg.get("source")
    if source not in ("pretrained", "local", "trained"):
        raise CRLConfigError(f"Unknown sae.source {source!r}; valid: pretrained, local, trained")
    if source == "pretrained" and cfg.get("family") == gemma_scope_2.FAMILY:
        release, sid = gemma_scope_2.resolve(cfg)  # refused here, with the valid choices, if not catalogued
        validate_sae(gemma_scope_2.GEMMA3_D_MODEL.get(str(cfg.size), d_model or 0), gemma_scope_2.hook_of(release, sid),
                     d_model, int(cfg.layer), bool(cfg.get("allow_hook_mismatch", False)))
    if source == "local" and cfg.get("format") == "gemma_scope_2":
        from safetensors import safe_open

        params = Path(cfg.path).expanduser() / "params.safetensors"
        if not params.is_file():
            raise CRLConfigError(f"No Gemma Scope 2 SAE at {str(cfg.path)!r} (expected params.safetensors)")
        with safe_open(str(params), "pt") as fh:
            d_in = int(fh.get_slice("w_enc").get_shape()[0])
        validate_sae(d_in, resid_post_hook_name(int(cfg.layer)), d_model, int(cfg.layer))
    elif source == "local":
        raw = peek_local_sae(cfg.path)
        validate_sae(int(raw["d_in"]), (raw.get("metadata") or {}).get("hook_name", raw.get("hook_name")),
                     d_model, int(cfg.layer), bool(cfg.get("allow_hook_mismatch", False)))


def load_sae(cfg: Any, lm=None, data_dir: str | Path | None = None, cache_dir: str | Path | None = None,
             device: str | torch.device = "cpu", on_trained=None) -> LoadedSAE:
    """Load (or train and cache) the SAE described by a ``sae/`` config node and validate it against ``lm``."""
    layer = int(cfg.layer)
    validate_layer(layer, lm.n_layers if lm is not None else None)
    source = cfg.source
    allow = bool(cfg.get("allow_hook_mismatch", False))
    device = str(device)
    if source == "pretrained":
        release, sae_id = (gemma_scope_2.resolve(cfg) if cfg.get("family") == gemma_scope_2.FAMILY
                           else (str(cfg.release), str(cfg.sae_id)))
        sae = SAE.from_pretrained(release, sae_id, device=device)
        loaded = LoadedSAE(sae, layer, sae.cfg.metadata.hook_name, f"pretrained:{release}/{sae_id}",
                           neuronpedia_id=neuronpedia_id(release, sae_id))
    elif source == "local" and cfg.get("format") == "gemma_scope_2":
        preflight_sae(cfg, lm.d_model if lm is not None else None)
        sae = gemma_scope_2.load_folder(cfg.path, layer, device=device)
        loaded = LoadedSAE(sae, layer, sae.cfg.metadata.hook_name, f"local:{cfg.path}",
                           neuronpedia_id=cfg.get("neuronpedia_id"))
    elif source == "local":
        preflight_sae(cfg, lm.d_model if lm is not None else None)
        sae = SAE.load_from_disk(str(Path(cfg.path).expanduser()), device=device)
        loaded = LoadedSAE(sae, layer, sae.cfg.metadata.hook_name, f"local:{cfg.path}",
                           neuronpedia_id=cfg.get("neuronpedia_id"))
    elif source == "trained":
        if lm is None:
            raise ValueError("Training an SAE needs the language model")
        loaded = load_or_train_sae(cfg, lm, data_dir=data_dir, cache_dir=cache_dir, device=device,
                                   on_trained=on_trained)
    else:
        raise CRLConfigError(f"Unknown sae.source {source!r}; valid: pretrained, local, trained")
    validate_sae(int(loaded.sae.cfg.d_in), loaded.hook_name, lm.d_model if lm is not None else None, layer, allow)
    loaded.sae.eval()
    loaded.sae.requires_grad_(False)
    return loaded


# --------------------------------------------------------------------------------------------------------------
# Trained SAEs: cache key, cache folder, training run


def training_key(model_name: str, layer: int, training: dict[str, Any], corpus: list[str]) -> str:
    payload = json.dumps({"v": SAE_CACHE_VERSION, "model": model_name, "layer": layer, "training": training,
                          "corpus": list(corpus)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def layer_cache_dir(cache_dir: Path, model_name: str, layer: int) -> Path:
    """Per (model, layer) cache folder, inside ``cache_dir`` whatever the model is called (``model=hf`` names a
    model by its path)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", model_name).strip("-.") or "model"
    return cache_dir / "saes" / safe / f"layer_{layer}"


def trained_sae_dir(cache_dir: Path, model_name: str, layer: int, key: str) -> Path:
    return layer_cache_dir(cache_dir, model_name, layer) / key


def load_or_train_sae(cfg: Any, lm, data_dir=None, cache_dir=None, device: str = "cpu", on_trained=None) -> LoadedSAE:
    layer = int(cfg.layer)
    (prepared,) = prepare_trained_saes(cfg, lm, [layer], data_dir, cache_dir, device)
    manifest = read_manifest(prepared.target)
    sae = SAE.load_from_disk(str(prepared.target), device=device)
    loaded = LoadedSAE(sae, layer, sae.cfg.metadata.hook_name, f"trained:{prepared.target}", manifest["metrics"],
                       {"cache_dir": str(prepared.target), "key": prepared.key,
                        "trained_now": prepared.retrained_reason is not None,
                        "settings": asdict(prepared.settings), "corpus": prepared.corpus,
                        "train_seconds": manifest.get("train_seconds")})
    if prepared.retrained_reason is not None and on_trained is not None:
        on_trained(loaded)
    return loaded


@dataclass
class PreparedSAE:
    """A trained SAE's cache folder, and why it was (re)trained now (``None``: it was cached)."""

    layer: int
    target: Path
    key: str
    settings: Any
    corpus: list[str]
    retrained_reason: str | None


def prepare_trained_saes(cfg: Any, lm, layers: list[int], data_dir=None, cache_dir=None,
                         device: str = "cpu") -> list[PreparedSAE]:
    """Make sure the ``sae=trained`` SAE of every layer in ``layers`` is cached: the missing ones are trained
    after one shared harvesting pass (``mode=train_sae sae.layers=[...]``, and sweeps before their jobs)."""
    from crl_exp.saes.training import SAETrainingSettings

    settings = SAETrainingSettings(**dict(cfg.training))
    corpus = list(cfg.corpus)
    cache_root = ensure_writable_dir(cache_dir or default_cache_dir(), "SAE cache")
    prepared = []
    for layer in dict.fromkeys(int(x) for x in layers):
        validate_layer(layer, lm.n_layers)
        key = training_key(lm.name, layer, asdict(settings), corpus)
        target = trained_sae_dir(cache_root, lm.name, layer, key)
        problem = verify_manifest(target)
        reason = problem or ("force_retrain" if bool(cfg.get("force_retrain", False)) else None)
        if reason is not None and target.exists():
            log.warning("Cached SAE at %s is unusable (%s); retraining", target, reason)
        prepared.append(PreparedSAE(layer, target, key, settings, corpus, reason))
    todo = {p.layer: p.target for p in prepared if p.retrained_reason is not None}
    if todo:
        train_and_cache_saes(lm, todo, settings, corpus, data_dir or default_data_dir(), device)
    return prepared


def train_and_cache_saes(lm, targets: dict[int, Path], settings, corpus: list[str], data_dir,
                         device: str = "cpu") -> None:
    """Harvest activations of every layer in ``targets`` in one pass, then per layer train with sae-lens,
    evaluate on held-out tokens, and commit to its cache folder."""
    from crl_exp.saes.activations import collect_resid_post_layers, pack_tokens, tokenize_texts
    from crl_exp.saes.corpus import benchmark_corpus
    from crl_exp.saes.training import evaluate_sae, train_topk_sae

    t0 = time.perf_counter()
    tok = lm.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    tokenized = tokenize_texts(tok, benchmark_corpus(data_dir, corpus),
                               int((settings.train_tokens + settings.heldout_tokens) * 1.1))
    # Held-out tokens come from the last texts of the stream, which training never reads.
    n_heldout_texts = _texts_covering(tokenized, settings.heldout_tokens)
    train_rows = pack_tokens(tokenized[:-n_heldout_texts], settings.context_size, bos)
    train_rows = train_rows[: -(-settings.train_tokens // (settings.context_size - 1))]
    heldout_rows = pack_tokens(tokenized[-n_heldout_texts:], settings.context_size, bos)
    layers = sorted(targets)
    names = ",".join(map(str, layers))
    train_acts = collect_resid_post_layers(lm.model, layers, train_rows, settings.harvest_batch_size,
                                           desc=f"Harvesting resid_post[{names}] (train)")
    heldout_acts = collect_resid_post_layers(lm.model, layers, heldout_rows, settings.harvest_batch_size,
                                             desc=f"Harvesting resid_post[{names}] (held-out)")
    harvest_seconds = time.perf_counter() - t0
    n_train_tokens = len(train_acts[layers[0]])
    for layer in layers:
        t1 = time.perf_counter()
        sae = train_topk_sae(train_acts.pop(layer), settings, model_name=lm.name,
                             hook_name=resid_post_hook_name(layer), device=device)
        held = heldout_acts.pop(layer)
        metrics = evaluate_sae(sae, held)
        metrics["resid_norm"] = held.norm(dim=-1).median().item()
        seconds = time.perf_counter() - t1
        log.info("Trained SAE for %s layer %d in %.0fs (+%.0fs shared harvest of layers %s): EV %.3f, L0 %.1f, "
                 "dead %.1f%%", lm.name, layer, seconds, harvest_seconds, names, metrics["explained_variance"],
                 metrics["l0"], 100 * metrics["dead_feature_share"])
        tmp = staging_dir(targets[layer])
        sae.save_model(str(tmp))
        commit(tmp, targets[layer], metrics=metrics, train_seconds=seconds + harvest_seconds,
               harvest_seconds=harvest_seconds, harvested_layers=layers,
               n_train_tokens=n_train_tokens, n_heldout_tokens=len(held))


def _texts_covering(tokenized: list[list[int]], n_tokens: int) -> int:
    """How many texts, counted from the end, hold at least ``n_tokens`` tokens (plus room for row packing)."""
    count = 0
    for i, ids in enumerate(reversed(tokenized), start=1):
        count += len(ids)
        if count >= n_tokens * 1.05 and i < len(tokenized):
            return i
    raise CRLConfigError(f"The SAE corpus is too small for {n_tokens} held-out tokens")
