"""The residual-stream norm that ``coefficient_scale=resid_norm`` scales steering by, for SAEs that carry none.

A trained SAE records the median resid_post norm of its held-out tokens. Pretrained SAEs (Gemma Scope via
``SAE.from_pretrained``) and any ``sae=local`` folder carry no such statistic, so it is measured here on the fly:
the median norm over a few batches of train-split task text (``corpus.RESID_NORM_SOURCES``), cached per
(model, layer, token count) so later runs read one small JSON file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from crl_exp.paths import ensure_writable_dir

log = logging.getLogger(__name__)

RESID_NORM_TOKENS = 8192  # enough for a stable median (a few batches of 128-token rows)
RESID_NORM_CONTEXT = 128


def resid_norm_file(cache_dir: Path, model_name: str, layer: int, n_tokens: int) -> Path:
    from crl_exp.saes.loading import layer_cache_dir

    return layer_cache_dir(cache_dir, model_name, layer) / f"resid_norm_{n_tokens}.json"


def measured_resid_norm(lm, layer: int, data_dir, cache_dir, n_tokens: int = RESID_NORM_TOKENS,
                        batch_size: int = 8) -> float:
    """Median resid_post[layer] norm of ``lm`` on train-split text (BOS position excluded), cached."""
    from crl_exp.saes.activations import collect_resid_post, pack_tokens, tokenize_texts
    from crl_exp.saes.corpus import RESID_NORM_SOURCES, benchmark_corpus

    path = resid_norm_file(ensure_writable_dir(cache_dir, "cache"), lm.name, layer, n_tokens)
    if path.is_file():
        return float(json.loads(path.read_text())["resid_norm"])
    tok = lm.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    tokenized = tokenize_texts(tok, benchmark_corpus(data_dir, RESID_NORM_SOURCES), int(n_tokens * 1.2))
    rows = pack_tokens(tokenized, RESID_NORM_CONTEXT, bos)[: -(-n_tokens // (RESID_NORM_CONTEXT - 1))]
    acts = collect_resid_post(lm.model, layer, rows, batch_size, desc=f"Measuring resid_post[{layer}] norm")
    norm = acts.norm(dim=-1).median().item()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"resid_norm": norm, "n_tokens": len(acts), "model": lm.name, "layer": layer}))
    os.replace(tmp, path)
    log.info("Measured resid_post[%d] median norm of %s: %.1f (%d tokens; cached at %s)", layer, lm.name, norm,
             len(acts), path)
    return norm
