"""The features a trained policy used most on held-out episodes: what they respond to, and what they did.

For each of the ``n`` most-used features (by steered tokens in the intervention log):
* **responds to**: its top activating contexts over train-split task text (the SAE encodes resid_post of the
  steered layer; contexts are the last few tokens up to the activating one), the usual way to read a feature,
  since at the positions where the policy steers with it the feature itself is often silent;
* **produced**: the most common tokens generated at the steps where the policy chose it;
* **did**: on the held-out episodes that used it, correctness and reward steered vs unsteered (the same
  prompts under no steering), with the flips each way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

CONTEXT_TOKENS = 8  # tokens of context shown before an activating token
CORPUS_TOKENS = 16384  # train-split tokens scanned for top activations
PROFILE_TOKENS = 4096  # task train-text tokens scanned to profile the features a report shows


@dataclass
class FeatureEffect:
    feature: int
    steered_tokens: int  # positions steered with it
    episodes: int  # held-out episodes that used it at least once
    produced: list[str] = field(default_factory=list)  # most common tokens generated under it
    top_contexts: list[tuple[float, str]] = field(default_factory=list)  # (activation, context) on train text
    correct_steered: float = float("nan")  # mean correctness of those episodes under CRL
    correct_unsteered: float = float("nan")  # ... and of the same prompts without steering
    reward_steered: float = float("nan")
    reward_unsteered: float = float("nan")
    fixed: int = 0  # wrong unsteered -> right under CRL
    broke: int = 0  # right unsteered -> wrong under CRL
    url: str | None = None  # its Neuronpedia page (``saes/neuronpedia.py``), where the SAE has pages


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def most_used(log: pd.DataFrame, n: int) -> list[int]:
    return [int(f) for f in log["feature"].value_counts().head(n).index]


def feature_effects(log: pd.DataFrame, crl: list[dict], unsteered: list[dict], features: list[int],
                    n_tokens: int = 5) -> dict[int, FeatureEffect]:
    """Usage and outcome of each feature from the intervention log (episode i = held-out record i)."""
    out = {}
    for f in features:
        rows = log[log["feature"] == f]
        eps = sorted({int(e) for e in rows["episode"]})
        tokens = Counter(str(t) for t in rows["token_text"]).most_common(n_tokens)
        c = [float(crl[e]["correct"]) for e in eps]
        u = [float(unsteered[e]["correct"]) for e in eps]
        out[f] = FeatureEffect(
            feature=f, steered_tokens=len(rows), episodes=len(eps), produced=[t for t, _ in tokens],
            correct_steered=_mean(c), correct_unsteered=_mean(u),
            reward_steered=_mean([float(crl[e]["reward"]) for e in eps]),
            reward_unsteered=_mean([float(unsteered[e]["reward"]) for e in eps]),
            fixed=sum(a > 0.5 >= b for a, b in zip(c, u, strict=True)),
            broke=sum(b > 0.5 >= a for a, b in zip(c, u, strict=True)))
    return out


def task_top_contexts(lm, sae, layer: int, task, features: list[int],
                      n_tokens: int = PROFILE_TOKENS) -> dict[int, list[tuple[float, str]]]:
    """Each feature's strongest activations on the task's own train-split text (what a reader of an episode
    report needs to judge a feature); empty when no feature was used."""
    if not features:
        return {}
    train = task.split("train")  # in stratified order: the first n_tokens cover every group, not the first ones
    texts = (task.user_text(train[i]) for i in task.analysis_sample(train, None))  # lazily: read up to n_tokens
    return corpus_top_contexts(lm, sae, layer, texts, features, n_tokens=n_tokens)


@torch.inference_mode()
def corpus_top_contexts(lm, sae, layer: int, texts, features: list[int], n_tokens: int = CORPUS_TOKENS, k: int = 5,
                        context_size: int = 128, batch_size: int = 8) -> dict[int, list[tuple[float, str]]]:
    """Each feature's ``k`` strongest activations on ``texts`` with the context that led to them."""
    from crl_exp.saes.activations import collect_resid_post, pack_tokens, tokenize_texts

    tok = lm.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = pack_tokens(tokenize_texts(tok, texts, int(n_tokens * 1.1)), context_size, bos)
    rows = rows[: -(-n_tokens // (context_size - 1))]
    acts = collect_resid_post(lm.model, layer, rows, batch_size, desc=f"Top activations at layer {layer}")
    body = rows[:, 1:].reshape(-1)  # the token whose residual each activation row is (BOS dropped)
    index = torch.tensor(features, dtype=torch.long)
    feats = torch.cat([sae.encode(chunk.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()[:, index]
                       for chunk in acts.split(4096)])
    width = context_size - 1
    out: dict[int, list[tuple[float, str]]] = {}
    for j, f in enumerate(features):
        vals, pos = feats[:, j].topk(min(k, len(feats)))
        contexts = []
        for v, p in zip(vals.tolist(), pos.tolist(), strict=True):
            if v <= 0:
                break
            start = max(p - CONTEXT_TOKENS, (p // width) * width)  # stay within the row
            before = tok.decode(body[start:p].tolist())
            contexts.append((v, f"{before}[[{tok.decode([int(body[p])])}]]"))
        out[f] = contexts
    return out


def effects_table(effects: list[FeatureEffect]) -> str:
    """Markdown: one row per feature, most used first."""
    lines = ["| feature | steered tokens | episodes | tokens it produced | top activating contexts (train text) | "
             "correct: CRL vs unsteered | fixed / broke | reward: CRL vs unsteered |", "|---|---|---|---|---|---|---|---|"]

    def clean(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "\\n")

    for e in effects:
        contexts = "<br>".join(f"{v:.1f}: `{clean(c)[-60:]}`" for v, c in e.top_contexts[:3]) or "(silent on 16k tokens)"
        name = f"[{e.feature}]({e.url})" if e.url else str(e.feature)
        lines.append(f"| {name} | {e.steered_tokens} | {e.episodes} | {', '.join(repr(t) for t in e.produced)} | "
                     f"{contexts} | {e.correct_steered:.3f} vs {e.correct_unsteered:.3f} | {e.fixed} / {e.broke} | "
                     f"{e.reward_steered:.3f} vs {e.reward_unsteered:.3f} |")
    return "\n".join(lines)


def as_json(effects: list[FeatureEffect]) -> list[dict]:
    return [asdict(e) for e in effects]
