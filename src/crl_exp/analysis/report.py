"""A self-contained HTML report of an intervention log: opens offline in any browser (no scripts, no assets).

Each episode's completion is shown token by token, coloured by the chosen feature, with the feature id,
its probability, its SAE activation and V_t on hover (``title``) and inline on request; branch points are
marked. A summary lists the most-used features with the contexts where they were chosen.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

import pandas as pd

from crl_exp.saes.neuronpedia import feature_url
from crl_exp.tasks.schema import LETTERS

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}
.ep{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ok{border-left:6px solid #2a2}.bad{border-left:6px solid #c22}
.tok{border-radius:3px;padding:0 1px;white-space:pre-wrap}
.tok sub{font-size:.6em;color:#333}
.branch{outline:2px solid #000;font-weight:bold}
.branch::after{content:"\\2691";color:#c00;font-size:.8em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
.prompt{color:#555;white-space:pre-wrap;font-size:.85em;max-height:6em;overflow:auto}
"""


def feature_colour(feature: int) -> str:
    hue = (feature * 137) % 360  # golden-angle spacing: nearby ids get distinct colours
    return f"hsl({hue},70%,82%)"


def token_span(row: dict[str, Any], is_branch: bool, inline: bool) -> str:
    text = html.escape(row["token_text"]) or "&#9251;"
    tip = (f"feature {row['feature']} | p={row['feature_prob']:.3f} | act={row['feature_act']:.2f} | "
           f"V={row['value']:.3f} | step {row['position']}")
    cls = "tok branch" if is_branch else "tok"
    sub = f"<sub>{row['feature']}</sub>" if inline else ""
    return (f'<span class="{cls}" data-feature="{row["feature"]}" data-position="{row["position"]}" '
            f'style="background:{feature_colour(row["feature"])}" title="{html.escape(tip)}">{text}{sub}</span>')


def episode_context(ex) -> dict[str, Any]:
    """What a reader needs to judge an episode beyond its question: the passage it is about and the lettered
    options (BBQ's "Who forgets things?" means nothing without them)."""
    if ex is None:
        return {}
    out: dict[str, Any] = {}
    if getattr(ex, "context", ""):
        out["context"] = ex.context
    if getattr(ex, "choices", ()):
        out["options"] = [f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)]
    return out


def render_report(log: pd.DataFrame, episodes: dict[int, dict[str, Any]], title: str,
                  branch_points: dict[int, list[dict[str, Any]]] | None = None, inline_ids: bool = True,
                  top_features: int = 15, feature_contexts: dict[int, list] | None = None,
                  neuronpedia: str | None = None) -> str:
    """HTML text; ``episodes[e]`` holds the question (not the few-shot exemplars), its context and options when the
    task has them (``episode_context``), the gold answer, the unsteered completion of the same prompt (optional)
    and correct; ``branch_points[e]`` lists branch dicts; ``feature_contexts[f]``: (activation, text) pairs, each
    used feature's top activating train contexts; ``neuronpedia``: the SAE's Neuronpedia id (every feature shown
    links to its page), None for an SAE without pages."""
    branch_points = branch_points or {}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append(summary_section(log, top_features, feature_contexts or {}, neuronpedia))
    for ep, rows in log.groupby("episode", sort=True):
        info = episodes.get(int(ep), {})
        marks = {b["position"]: b for b in branch_points.get(int(ep), [])}
        ok = bool(rows["correct"].iloc[0])
        parts.append(f'<div class="ep {"ok" if ok else "bad"}" id="episode-{int(ep)}"><h3>Episode {int(ep)} '
                     f'({html.escape(str(rows["prompt_id"].iloc[0]))}) - {"correct" if ok else "wrong"}, '
                     f'reward {rows["reward"].iloc[0]:.3f}, V<sub>0</sub> {rows["value"].iloc[0]:.3f}</h3>')
        if info.get("context"):
            parts.append(f'<div class="prompt"><b>Context</b> {html.escape(str(info["context"]))}</div>')
        if info.get("question"):
            parts.append(f'<div class="prompt"><b>Question</b> {html.escape(str(info["question"]))}</div>')
        elif info.get("prompt"):  # no question field: the end of the prompt
            parts.append(f'<div class="prompt">{html.escape(info["prompt"][-600:])}</div>')
        if info.get("options"):
            items = "".join(f"<li>{html.escape(o)}</li>" for o in info["options"])
            parts.append(f'<ul class="prompt options">{items}</ul>')
        if info.get("answer") is not None:
            parts.append(f'<p class="gold"><b>Gold answer</b> {html.escape(str(info["answer"]))}</p>')
        steered = "".join(token_span(r, r["position"] in marks, inline_ids)
                          for r in rows.sort_values("position").to_dict("records"))
        if "unsteered" in info:
            mark = "correct" if info.get("unsteered_correct") else "wrong"
            parts.append(f'<table class="side"><tr><th>steered (CRL)</th><th>unsteered ({mark})</th></tr><tr>'
                         f'<td>{steered}</td><td class="tok">{html.escape(str(info["unsteered"]))}</td></tr></table>')
        else:
            parts.append(f"<p>{steered}</p>")
        if marks:
            items = "".join(f"<li>step {p}: chosen feature {feature_link(b['chosen_feature'], neuronpedia)} "
                            f"({'correct' if b['chosen_correct'] else 'wrong'}); flips with "
                            f"{', '.join(feature_link(a, neuronpedia) for a in b['flipping_alternatives'])}</li>"
                            for p, b in sorted(marks.items()))
            parts.append(f"<p><b>Branch points</b></p><ul class='branches'>{items}</ul>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def feature_link(feature, neuronpedia: str | None) -> str:
    """A feature id, linked to its Neuronpedia page where the SAE has pages."""
    url = feature_url(neuronpedia, int(feature)) if str(feature).lstrip("-").isdigit() else None
    text = html.escape(str(feature))
    return f"<a href='{html.escape(url)}' target='_blank'>{text}</a>" if url else text


def summary_section(log: pd.DataFrame, top: int, feature_contexts: dict[int, list],
                    neuronpedia: str | None = None) -> str:
    if log.empty:
        return "<p>No steered tokens.</p>"
    counts = Counter(log["feature"].tolist())
    rows = []
    for feature, n in counts.most_common(top):
        sub = log[log["feature"] == feature]
        contexts = Counter(sub["token_text"].tolist()).most_common(5)
        ctx = ", ".join(f"{html.escape(repr(t))}&times;{c}" for t, c in contexts)
        rows.append(f"<tr><td><span class='tok' style='background:{feature_colour(feature)}'>"
                    f"{feature_link(feature, neuronpedia)}</span></td>"
                    f"<td>{n}</td><td>{n / len(log):.1%}</td><td>{sub['feature_act'].mean():.2f}</td>"
                    f"<td>{sub['correct'].mean():.2f}</td><td>{ctx}</td><td>{top_contexts(feature_contexts, feature)}</td></tr>")
    return ("<h2>Most-used features</h2><table><tr><th>feature</th><th>tokens</th><th>share</th>"
            "<th>mean activation</th><th>episode accuracy</th><th>tokens produced (top 5)</th>"
            "<th>top activating train contexts</th></tr>"
            + "".join(rows) + f"</table><p>{len(counts)} distinct features over {len(log)} steered tokens in "
            f"{log['episode'].nunique()} episodes.</p>")


def top_contexts(feature_contexts: dict[int, list], feature: int, k: int = 3) -> str:
    """A feature's strongest train-text activations, each context's last characters (the activating token last)."""
    items = feature_contexts.get(int(feature)) or []
    return "<br>".join(f"{float(act):.1f}: &hellip;{html.escape(str(text)[-80:])}" for act, text in items[:k]) or "-"
