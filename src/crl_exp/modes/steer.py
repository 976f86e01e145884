"""``mode=steer``: baseline vs steered continuations side by side (Neuronpedia-style static steering, offline)."""

from __future__ import annotations

import shutil
import textwrap

from omegaconf import DictConfig

from crl_exp.errors import CRLConfigError
from crl_exp.generation import generate
from crl_exp.runtime import load_model_and_sae
from crl_exp.steering.factory import build_steerer
from crl_exp.tracking import RunTracker


def side_by_side(rows: list[dict], width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((120, 20)).columns
    col = max(30, (width - 7) // 2)
    lines = []
    for r in rows:
        lines.append("=" * min(width, 2 * col + 3))
        lines.append(f"PROMPT: {r['prompt']!r}")
        left = textwrap.wrap(r["baseline"].replace("\n", " ⏎ "), col) or [""]
        right = textwrap.wrap(r["steered"].replace("\n", " ⏎ "), col) or [""]
        lines.append(f"{'baseline':<{col}} | steered")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"{a:<{col}} | {b}")
    return "\n".join(lines)


def run(cfg: DictConfig, tracker: RunTracker) -> list[dict]:
    lm, sae = load_model_and_sae(cfg, tracker)
    if cfg.steering.kind == "none":
        raise CRLConfigError("mode=steer compares baseline with steered text: use steering=static or steering=random")
    steerer, controller = build_steerer(cfg.steering, lm, sae, seed=int(cfg.seed))
    prompts = list(cfg.prompts)
    if not prompts:
        raise CRLConfigError("mode=steer needs at least one prompt (prompts=[...])")
    rows, base_s, steer_s, n_tok = [], 0.0, 0.0, 0
    bs = int(cfg.generation.batch_size)
    for start in range(0, len(prompts), bs):
        batch = prompts[start:start + bs]
        base = generate(lm, batch, cfg.generation.max_new_tokens)
        steered = generate(lm, batch, cfg.generation.max_new_tokens, steerer, controller)
        base_s, steer_s, n_tok = base_s + base.seconds, steer_s + steered.seconds, n_tok + base.n_generated
        rows += [{"prompt": p, "baseline": b, "steered": s} for p, b, s in
                 zip(batch, base.completions, steered.completions, strict=True)]
    d = steerer.directions
    header = (f"{lm.name} | layer {sae.layer} | {sae.source} | steering={cfg.steering.kind}"
              + (f" feature {cfg.steering.feature}" if cfg.steering.kind == "static" else "")
              + f" | coefficient {cfg.steering.coefficient} ({d.coefficient_scale}"
              + (f", resid norm {d.resid_norm:.1f}" if d.resid_norm else "") + ")")
    print(header)
    print(side_by_side(rows))
    tracker.log_dict(rows, "steering/side_by_side.json")
    tracker.log_text(header + "\n" + side_by_side(rows, 160), "steering/side_by_side.txt")
    changed = sum(r["baseline"] != r["steered"] for r in rows) / len(rows)
    tracker.log_metrics({"steer/changed_share": changed, "steer/baseline_seconds": base_s,
                         "steer/steered_seconds": steer_s, "steer/steered_vs_plain_throughput": base_s / steer_s})
    if cfg.steering.kind == "static":
        tracker.log_metrics({"steer/decoder_norm": float(d.decoder_norms[int(cfg.steering.feature)])})
    return rows
