"""Headroom: how much any per-prompt choice of one feature could add over the best static feature.

On a one-token task the exact reward table (``reward_table``) gives every held-out prompt's outcome under every
candidate, so the per-prompt oracle is affordable: for each prompt, the best candidate *chosen knowing the
answer*. The gap between the oracle and the best static feature bounds what a per-token policy could add with
that candidate pool; it is a reference row, never a baseline (it reads the answers).
"""

from __future__ import annotations

from typing import Any

from crl_exp.reward_table import RewardTable


def per_prompt_oracle(table: RewardTable) -> dict[str, Any]:
    """From the held-out reward table: each prompt's best candidate (chosen knowing the answer)."""
    return {"n": len(table.example_ids), "candidates": len(table.features),
            "oracle_accuracy": float(table.correct.max(1).values.mean()),
            "oracle_reward": float(table.reward.max(1).values.mean()),
            "unsteered_accuracy": float(table.unsteered_correct.mean()), "episodes": table.episodes}
