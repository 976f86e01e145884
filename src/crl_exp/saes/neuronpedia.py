"""Feature pages on Neuronpedia for SAEs from a catalogue release.

A feature the project shows (intervention log, HTML report, top-features table, branch points) is more use with
its page: top activations, explanations and steering examples made by others. sae-lens' catalogue of pretrained
SAEs (shipped with the package, read offline) names each SAE's Neuronpedia id (e.g. Gemma Scope 16k at layer 12 of
Gemma-2 2B: ``gemma-2-2b/12-gemmascope-res-16k``); a page is ``https://www.neuronpedia.org/<id>/<feature>``. A
locally trained SAE has no page: the project shows its own top contexts instead.
"""

from __future__ import annotations

NEURONPEDIA = "https://www.neuronpedia.org/"


def neuronpedia_id(release: str, sae_id: str) -> str | None:
    """The Neuronpedia id sae-lens' catalogue gives ``release``/``sae_id`` (None where it gives none)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None:
        return None
    return (getattr(lookup, "neuronpedia_id", None) or {}).get(sae_id) or None


def feature_url(np_id: str | None, feature: int) -> str | None:
    """The page of ``feature`` of the SAE with Neuronpedia id ``np_id`` (None: no page; negative: the no-op)."""
    if not np_id or int(feature) < 0:
        return None
    return f"{NEURONPEDIA}{np_id.strip('/')}/{int(feature)}"
