"""Gemma Scope 2: Google DeepMind's JumpReLU SAEs for every Gemma 3 size, named by (size, variant, kind, layer,
width, l0) and checked against the catalogue of the *installed* sae-lens before anything loads.

``sae=gemmascope2_res`` (and its 1B twin) derive ``release = gemma-scope-2-{size}-{variant}-{kind}`` and
``sae_id = layer_{L}_width_{width}_l0_{l0}``; a combination the catalogue does not list is refused with the valid
choices. Residual SAEs read ``blocks.{L}.hook_resid_post``, the output of ``model.layers[L]``: the placement the
steering hook edits. With a hub, ``SAE.from_pretrained`` downloads them; offline, a folder in Gemma Scope 2's saved
format (``params.safetensors`` with ``w_enc`` [d_in, d_sae], ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``) is loaded
by ``load_folder`` with the key mapping and config sae-lens' ``gemma_3`` loader uses (fp32, no activation
normalisation, no decoder bias applied to the input).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import torch

from crl_exp.errors import CRLConfigError

FAMILY = "gemma-scope-2"
# d_model of each Gemma 3 size (the SAEs' d_in): what the model config must match
GEMMA3_D_MODEL = {"270m": 640, "1b": 1152, "4b": 2560, "12b": 3840, "27b": 5376}
_ID = re.compile(r"layer_(\d+)_width_(\w+?)_l0_(\w+)$")


@cache
def catalogue() -> dict[str, Any]:
    """sae-lens' pretrained SAE directory (its installed ``pretrained_saes.yaml``)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def release_name(size: str, variant: str, kind: str) -> str:
    return f"{FAMILY}-{size}-{variant}-{kind}"


def sae_id(layer: int, width: str, l0: str) -> str:
    return f"layer_{layer}_width_{width}_l0_{l0}"


def resolve(cfg: Any) -> tuple[str, str]:
    """(release, sae_id) of a Gemma Scope 2 ``sae/`` node, refused with the valid choices if not in the catalogue."""
    size, variant, kind = str(cfg.size), str(cfg.variant), str(cfg.kind)
    release = release_name(size, variant, kind)
    releases = sorted(r for r in catalogue() if r.startswith(FAMILY) and (r.endswith("-res") or r.endswith("-res-all")))
    if release not in catalogue():
        raise CRLConfigError(f"No Gemma Scope 2 release {release!r} (sae.size={size}, sae.variant={variant}, "
                             f"sae.kind={kind}) in the installed sae-lens catalogue; residual releases: "
                             f"{', '.join(releases)}")
    wanted = sae_id(int(cfg.layer), str(cfg.width), str(cfg.l0))
    ids = list(catalogue()[release].saes_map)
    if wanted not in ids:
        parsed = [m for m in (_ID.match(i) for i in ids) if m]
        layers = sorted({int(m.group(1)) for m in parsed})
        at_layer = [m for m in parsed if int(m.group(1)) == int(cfg.layer)]
        if not at_layer:
            raise CRLConfigError(f"{release} has no SAE at sae.layer={cfg.layer}; its layers: {layers}")
        choices = sorted({(m.group(2), m.group(3)) for m in at_layer})
        raise CRLConfigError(f"{release} has no {wanted!r}; at layer {cfg.layer} the (width, l0) choices are "
                             f"{', '.join(f'width={w} l0={z}' for w, z in choices)}")
    return release, wanted


def hook_of(release: str, sid: str) -> str:
    """The hook a catalogued residual SAE reads (from its folder path ``resid_post.../layer_L_...``)."""
    path = catalogue()[release].saes_map[sid]
    layer = int(_ID.match(sid).group(1))
    if not str(path).startswith("resid_post"):
        raise CRLConfigError(f"{release}/{sid} is stored at {path!r}, not a residual-stream SAE")
    return f"blocks.{layer}.hook_resid_post"


def config_dict(d_in: int, d_sae: int, layer: int, model_name: str | None = None) -> dict[str, Any]:
    """The sae-lens config of a Gemma Scope 2 residual SAE, as sae-lens' ``gemma_3`` loader builds it (the
    provenance fields in ``metadata``, where sae-lens 6 keeps them)."""
    metadata = {"model_name": model_name, "hook_name": f"blocks.{layer}.hook_resid_post", "hook_head_index": None,
                "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted", "context_size": 1024,
                "hf_hook_name": f"model.layers.{layer}.output", "sae_lens_training_version": None}
    return {"architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
            "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": metadata}


def load_folder(path: str | Path, layer: int, device: str = "cpu"):
    """A JumpReLU SAE from a folder in Gemma Scope 2's saved format (``params.safetensors``)."""
    from sae_lens import SAE
    from safetensors.torch import load_file

    params = Path(path).expanduser() / "params.safetensors"
    if not params.is_file():
        raise CRLConfigError(f"No Gemma Scope 2 SAE at {str(path)!r}: expected params.safetensors (w_enc, w_dec, "
                             f"b_enc, b_dec, threshold)")
    raw = load_file(str(params), device=device)
    missing = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} - set(raw)
    if missing:
        raise CRLConfigError(f"{params} lacks {sorted(missing)}: not in Gemma Scope 2's format")
    d_in, d_sae = raw["w_enc"].shape
    sae = SAE.from_dict({**config_dict(int(d_in), int(d_sae), layer), "device": device})
    state = {"W_enc": raw["w_enc"], "W_dec": raw["w_dec"], "b_enc": raw["b_enc"], "b_dec": raw["b_dec"],
             "threshold": raw["threshold"]}
    sae.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return sae
