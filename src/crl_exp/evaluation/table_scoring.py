"""Every held-out condition of a one-token task read off one exact reward table.

On a one-token task the outcome of a prompt depends only on the feature applied at its last prompt position, and
every condition (no steering, a random or the static feature, the untrained or the trained policy, greedy,
sampled, mask on or off) picks one feature per prompt from the unsteered state there. So one table of every
prompt under every feature of the action space (plus a fixed random sample of the dictionary, for the
``random_dictionary`` row) holds every condition's records: a condition is a column per prompt. The table does not
depend on the policy or the seed (``reward_table`` caches it), so the three seeds of a configuration score
thousands of held-out prompts for the price of one, and a held-out n large enough for a small MDE is affordable
on a CPU. The records are the rollouts' own (same prompt, same steered forward), which ``check_against_rollouts``
re-verifies on the prompts whose intervention log is rolled out.
"""

from __future__ import annotations

from typing import Any

import torch

from crl_exp.reward_table import RewardTable
from crl_exp.steering.hook import NO_FEATURE

UNSTEERED = 0  # column index of "no feature" in ``RewardTable.cell_records``


def dictionary_sample(d_sae: int, exclude: list[int], k: int, seed: int) -> list[int]:
    """``k`` dictionary features outside ``exclude``, drawn per run seed: the ``random_dictionary`` condition draws
    among them per prompt, so each seed's row is a fresh sample of the dictionary (not one fixed 32-feature set
    shared by every run)."""
    g = torch.Generator().manual_seed(seed)
    banned = set(exclude)
    out: list[int] = []
    for f in torch.randperm(d_sae, generator=g).tolist():
        if f not in banned:
            out.append(f)
        if len(out) == k:
            break
    return out


def feature_columns(table: RewardTable, features: torch.Tensor) -> torch.Tensor:
    """Column of each chosen feature (``NO_FEATURE``: the unsteered column); a feature outside the table is an
    error, never a silent unsteered row."""
    index = {f: 1 + j for j, f in enumerate(table.features)}
    missing = sorted({int(f) for f in features.tolist() if int(f) != NO_FEATURE and int(f) not in index})
    if missing:
        raise ValueError(f"features {missing[:5]} are not columns of the reward table")
    return torch.tensor([UNSTEERED if int(f) == NO_FEATURE else index[int(f)] for f in features.tolist()])


def random_columns(table: RewardTable, features: list[int], seed: int) -> torch.Tensor:
    """A uniformly random feature of ``features`` per prompt (seeded), as columns."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(features), (len(table.example_ids),), generator=g)
    return feature_columns(table, torch.tensor(features)[pick])


@torch.no_grad()
def policy_columns(controller, table: RewardTable, chunk: int = 512) -> torch.Tensor:
    """The column a policy controller picks for each prompt from the table's unsteered states (what it observes
    at the steered position in a rollout); its per-step records are kept by the controller as in a rollout."""
    chosen = []
    for i in range(0, len(table.example_ids), chunk):
        out = controller(table.states[i:i + chunk])
        chosen.append((out[0] if isinstance(out, tuple) else out).cpu())
    return feature_columns(table, torch.cat(chosen))


def sampled_variant(controller, table: RewardTable, task, key: str, samples: int, with_mask: bool) -> dict[str, Any]:
    """The policy sampling its action, ``samples`` draws per prompt (one sampling stream), as ``policy_variants``
    reports it."""
    per_sample = [task.metrics_from_records(table.cell_records(policy_columns(controller, table)))
                  for _ in range(samples)]
    values = torch.tensor([m.get(key, float("nan")) for m in per_sample], dtype=torch.float64)
    rewards = torch.tensor([m.get("reward", float("nan")) for m in per_sample], dtype=torch.float64)
    return {"seeds": samples, key: values.tolist(), "mean": values.mean().item(),
            "sd": values.std().item() if samples > 1 else 0.0, "reward_mean": rewards.mean().item(),
            "with_mask": with_mask}


def check_against_rollouts(table_records: list[dict], rollout_records: list[dict]) -> float:
    """Largest |reward difference| between table-read and rolled-out records of the same prompts and actions."""
    if [r["id"] for r in table_records] != [r["id"] for r in rollout_records]:
        raise ValueError("table and rollout records are not the same prompts in the same order")
    return max((abs(float(a["reward"]) - float(b["reward"])) for a, b in zip(table_records, rollout_records,
                                                                             strict=True)), default=0.0)


def table_policy_variants(module, env, table: RewardTable, task, key: str, samples: int, headline_with_mask: bool,
                          headline_columns: torch.Tensor) -> dict[str, Any]:
    """``heldout.policy_variants`` read off the table: the policy sampled (``samples`` draws per prompt, mask as
    in the headline) and greedy with the mask the other way, always inside its action space."""
    out: dict[str, Any] = {}
    if samples:
        controller = module.controller(greedy=False, with_mask=headline_with_mask, seed=1000)
        out["crl_sampled"] = sampled_variant(controller, table, task, key, samples, headline_with_mask)
    name = "crl_mask_off" if headline_with_mask else "crl_mask_on"
    columns = policy_columns(module.controller(greedy=True, with_mask=not headline_with_mask), table)
    recs = table.cell_records(columns)
    metrics = task.metrics_from_records(recs)
    out[name] = {key: metrics.get(key, float("nan")), "reward": metrics.get("reward", float("nan")),
                 "same_episodes_as_greedy": bool(torch.equal(columns, headline_columns)), "records": recs}
    return out
