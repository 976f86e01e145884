"""The per-token intervention log (docs/design.md §6): one row per (episode, generated step).

Columns: episode, prompt_id, position (step index; step 0 acts on the last prompt token), token_id and
token_text (the token generated at that step, i.e. what the intervention produced), feature (the first of
``features``, which lists all k with ``policy.top_k > 1``), feature_prob,
feature_act (the chosen feature's own SAE activation on the pre-steering state), value (V_t in the reward's
own units: the critic is trained on rewards divided by their running std sigma, ``CRLModule.reward_scale``, so its
output is multiplied back by sigma here), value_scale (that sigma; the critic's raw output is value / value_scale),
reward and correct (the episode's outcome), completion. Only steps that belong to the episode (up to and including
EOS/stop) are logged.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

COLUMNS = ["episode", "prompt_id", "position", "token_id", "token_text", "feature", "features", "feature_prob",
           "feature_act", "value", "value_scale", "reward", "correct"]


def log_rows(records: list[dict[str, Any]], new_tokens: torch.Tensor, trajectory: dict[str, torch.Tensor],
             valid: torch.Tensor, tokenizer, episode_offset: int = 0, value_scale: float = 1.0) -> list[dict[str, Any]]:
    """Rows for one rollout batch; ``trajectory`` is ``PolicyController.stacked()`` ([B, T] fields);
    ``value_scale``: the reward scale the critic was trained in (its outputs times it are in reward units)."""
    if not value_scale > 0:
        raise ValueError(f"value_scale must be a positive reward scale, got {value_scale}")
    if trajectory["feature"].shape[:2] != valid.shape:
        raise ValueError(f"trajectory {tuple(trajectory['feature'].shape)} and tokens {tuple(valid.shape)} differ")
    rows = []
    for b, rec in enumerate(records):
        for t in range(valid.shape[1]):
            if not valid[b, t]:
                break
            tok = int(new_tokens[b, t])
            chosen = trajectory["feature"][b, t].flatten().tolist()  # 1 feature (top-1) or k (top-k)
            rows.append({"episode": episode_offset + b, "prompt_id": rec["id"], "position": t, "token_id": tok,
                         "token_text": tokenizer.decode([tok]), "feature": int(chosen[0]),
                         "features": ",".join(str(f) for f in chosen),
                         "feature_prob": float(trajectory["prob"][b, t]),
                         "feature_act": float(trajectory["feature_act"][b, t]),
                         "value": float(trajectory["value"][b, t]) * value_scale, "value_scale": value_scale,
                         "reward": float(rec["reward"]),
                         "correct": float(rec["correct"])})
    return rows


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)
