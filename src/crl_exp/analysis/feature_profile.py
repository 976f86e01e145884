"""What the chosen features respond to: syntactic (function words, punctuation) vs semantic (content) tokens.

Method: each feature the policy used is profiled by its top activating tokens over *train-split task text*
(``top_features.corpus_top_contexts``: the SAE encodes resid_post of the steered layer at every position), the
usual way to read a feature. Profiling at the steered positions instead would say nothing on one-token tasks,
where every steered state sits on the same token (the ``:`` of ``Answer:``). A token counts as *syntactic* if,
stripped and lower-cased, it is empty/whitespace, punctuation, a digit string, or an English function word. A
feature's syntactic share is the share of syntactic tokens among its positive top activations; a run's profile is
the usage-weighted mean over the features the policy chose.
"""

from __future__ import annotations

import string

FUNCTION_WORDS = frozenset("""a an the and or but nor so yet if then than that this these those there here of in on at
by for with from to into onto upon about above below under over between through during before after since until
while as is are was were be been being am do does did have has had will would shall should can could may might
must not no it its he she they them his her their we us our you your i me my mine what which who whom whose when
where why how all any each some such only own same too very just also again further once up down out off""".split())


def is_syntactic(token_text: str) -> bool:
    t = token_text.strip().lower()
    if not t:
        return True
    if all(ch in string.punctuation for ch in t) or t.isdigit():
        return True
    return t in FUNCTION_WORDS


def activating_token(context: str) -> str:
    """The token a ``corpus_top_contexts`` context highlights (``...before[[token]]``)."""
    return context.rsplit("[[", 1)[-1].removesuffix("]]")


def usage_weighted_syntactic_share(usage: dict[int, int],
                                   top_contexts: dict[int, list[tuple[float, str]]]) -> tuple[float, dict]:
    """(usage-weighted syntactic share, per-feature profile) from each feature's top contexts on train text;
    a feature silent on that text has no share (NaN) and no weight."""
    per_feature, total, weight = {}, 0.0, 0
    for feature, n in usage.items():
        texts = [activating_token(c) for v, c in top_contexts.get(feature, []) if v > 0]
        share = sum(is_syntactic(x) for x in texts) / len(texts) if texts else float("nan")
        per_feature[feature] = {"uses": n, "syntactic_share": share, "top_tokens": texts}
        if texts:
            total += share * n
            weight += n
    return (total / weight if weight else float("nan")), per_feature
