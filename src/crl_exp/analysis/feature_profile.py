"""What the chosen features respond to: syntactic (function words, punctuation) vs semantic (content) tokens.

Method (documented in the README): while the CRL policy runs on held-out episodes, every recorded residual
state is encoded by the SAE and each feature's top-``k`` activating tokens are kept (the token whose residual
it is: the newest position at that step, i.e. the last prompt token at step 0 and generated token t-1 after
that, so one-token tasks get a profile too). A token counts as *syntactic* if, stripped and
lower-cased, it is empty/whitespace, punctuation, a digit string, or an English function word. A feature's
syntactic share is the share of syntactic tokens among its top activations; a run's profile is the
usage-weighted mean over the features the policy chose.
"""

from __future__ import annotations

import string

import torch

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


class TopActivations:
    """Running top-k (activation, token id) per SAE feature."""

    def __init__(self, d_sae: int, k: int = 10):
        self.values = torch.full((d_sae, k), float("-inf"))
        self.tokens = torch.full((d_sae, k), -1, dtype=torch.long)

    def update(self, acts: torch.Tensor, token_ids: torch.Tensor) -> None:
        """``acts`` [N, d_sae] for N token positions with ids ``token_ids`` [N]."""
        if len(acts) == 0:
            return
        vals = torch.cat([self.values, acts.T.float()], dim=1)
        toks = torch.cat([self.tokens, token_ids[None].expand(acts.shape[1], -1)], dim=1)
        top = vals.topk(self.values.shape[1], dim=1)
        self.values, self.tokens = top.values, toks.gather(1, top.indices)

    def profile(self, feature: int, tokenizer) -> tuple[float, list[str]]:
        """(syntactic share, token texts) over the feature's positive top activations."""
        keep = self.values[feature] > 0
        texts = [tokenizer.decode([int(t)]) for t in self.tokens[feature][keep]]
        if not texts:
            return float("nan"), []
        return sum(is_syntactic(x) for x in texts) / len(texts), texts


def usage_weighted_syntactic_share(usage: dict[int, int], top: TopActivations, tokenizer) -> tuple[float, dict]:
    per_feature, total, weight = {}, 0.0, 0
    for feature, n in usage.items():
        share, texts = top.profile(feature, tokenizer)
        per_feature[feature] = {"uses": n, "syntactic_share": share, "top_tokens": texts}
        if share == share:  # not NaN
            total += share * n
            weight += n
    return (total / weight if weight else float("nan")), per_feature
