"""The reference rows of a one-token task's held-out comparison, from exact reward tables over the action pool.

The per-prompt oracle (reads the answers: headroom), the group oracle and the learnability ceiling (read train
answers only: what a learner could reach), how much of the static-to-reference gap CRL recovered, and the markdown
of those rows. A share of a gap is stated only where the gap exceeds what the held-out set can detect.
"""

from __future__ import annotations

from typing import Any

import torch

from crl_exp.evaluation.ceiling import at_least_as_good, ceiling, group_means, group_oracle
from crl_exp.evaluation.comparison import paired_delta
from crl_exp.evaluation.headroom import per_prompt_oracle
from crl_exp.reward_table import RewardTable, reward_table
from crl_exp.stats import share_of_gap
from crl_exp.steering.hook import NO_FEATURE


def one_token_references(env, task, selection, ref_pool: list[int], validation: list, test_pool: list,
                         results: dict, greedy_first: list[int], seed: int, reference_train_examples: int,
                         scored_table: RewardTable | None = None, records: dict[str, list[dict]] | None = None,
                         key: str = "accuracy", n_boot: int = 1000,
                         assumed_discordance: float = 0.2) -> dict[str, Any]:
    """Reference rows from exact reward tables over ``ref_pool`` (train, validation, held-out): the per-prompt
    oracle (reads the answers), the group oracle and the learnability ceiling (read train answers only), and how
    much of the static-to-group-oracle gap CRL recovered, with how often it picked its group's best feature.
    ``greedy_first``: CRL's greedy feature on each held-out prompt; ``scored_table``: the held-out table the
    conditions were read from, reused when it holds ``ref_pool``; then the ceiling's own held-out records give
    paired intervals for CRL - ceiling and ceiling - static (``records``: the conditions' records)."""
    heldout_table = (scored_table.select(list(ref_pool)) if scored_table is not None
                     and set(ref_pool) <= set(scored_table.features)
                     else reward_table(env, test_pool, ref_pool, desc="held-out reward table"))
    val_table = (selection.table if selection.table is not None and selection.table.features == list(ref_pool)
                 else reward_table(env, validation, ref_pool, desc="validation reward table"))
    train_examples = task.representative("train", reference_train_examples)
    train_table = reward_table(env, train_examples, ref_pool, desc="train reward table")
    groups = group_oracle(train_table, [e.group for e in train_examples], heldout_table, [e.group for e in test_pool])
    static_column = list(ref_pool).index(selection.feature) if selection.feature in ref_pool else None
    ceiling_row = ceiling(train_table, val_table, heldout_table, seed=seed, static_column=static_column)
    held_groups = [ex.group for ex in test_pool]
    picks = [f == groups["best_feature"].get(g) for f, g in zip(greedy_first, held_groups, strict=True)]
    # picks that are not the group's best train feature are judged by exact validation reward on their group
    judged = sorted({f for f in greedy_first if f != NO_FEATURE} | set(groups["best_feature"].values()))
    judged_table = (val_table.select(judged) if set(judged) <= set(val_table.features)
                    else reward_table(env, validation, judged, desc="validation reward of CRL's picks"))
    validation_means = group_means(judged_table, [ex.group for ex in validation])
    as_good = at_least_as_good(greedy_first, held_groups, groups["best_feature"], validation_means)
    static, crl = results["static"]["metrics"]["reward"], results["crl"]["metrics"]["reward"]
    gap = groups["reward"] - static
    learner = {"gap_recovered": share_of_gap(crl - static, gap),
               "group_best_pick_rate": sum(picks) / len(picks) if picks else float("nan"),
               "as_good_pick_rate": sum(as_good) / len(as_good) if as_good else float("nan"),
               "validation_reward_by_group": {g: {str(f): v for f, v in m.items()}
                                              for g, m in validation_means.items()},
               "ceiling_gap_recovered": share_of_gap(crl - static, ceiling_row["reward"] - static)}
    if records is not None:  # per group: the pass mark's gap, class by class (the pooled one hides the class mix)
        learner["gap_recovered_by_group"] = {}
        for g, oracle_g in groups["reward_by_group"].items():
            idx = [i for i, ex in enumerate(test_pool) if ex.group == g]
            crl_g, static_g = (sum(records[name][i]["reward"] for i in idx) / len(idx) for name in ("crl", "static"))
            learner["gap_recovered_by_group"][g] = share_of_gap(crl_g - static_g, oracle_g - static_g)
    paired = {}
    if heldout_table.records is not None and records is not None:
        ceiling_records = heldout_table.cell_records(torch.tensor(ceiling_row["actions"]) + 1)
        paired = {"crl_minus_ceiling": paired_delta(task, records["crl"], ceiling_records, key, n_boot, seed,
                                                    assumed_discordance),
                  "ceiling_minus_static": paired_delta(task, ceiling_records, records["static"], key, n_boot, seed,
                                                       assumed_discordance)}
    ceiling_row = {k: v for k, v in ceiling_row.items() if k != "actions"}
    return {"oracle": per_prompt_oracle(heldout_table), "group_oracle": groups, "ceiling": ceiling_row,
            "learner": learner, "paired": paired, "episodes": heldout_table.episodes + train_table.episodes}


def ceiling_label(c: dict[str, Any]) -> str:
    """What validation chose as the ceiling: the static policy itself, or a kind, shrinkage and stopping step."""
    if c["kind"] == "static":
        return "the static policy: no fit beat it on validation"
    return f"{c['kind']}, shrinkage {c['shrinkage']:g}, {c['steps']} steps"


def gap_sentence(name: str, gap: float, share: float, mde_reward: float) -> str:
    """What CRL recovered of a reference's reward gap over static, stated only where that gap exceeds what this
    held-out set can detect (a share of a gap inside the noise reads -1744% and means nothing)."""
    if not gap > mde_reward:
        return (f"the {name} gap over static ({gap:+.4f} reward) is below this held-out set's MDE ({mde_reward:.4f}): "
                f"no share of it is stated")
    return f"CRL recovered {share:.0%} of the static-to-{name} reward gap ({gap:+.3f})"


def references_table(refs: dict[str, Any], results: dict, key: str, mde_reward: float = 0.0) -> str:
    g, c, o, learner = refs["group_oracle"], refs["ceiling"], refs["oracle"], refs["learner"]
    rows = [("static (selected on validation)", results["static"]["metrics"].get(key), results["static"]["metrics"]["reward"], "-"),
            ("untrained control", results["untrained"]["metrics"].get(key), results["untrained"]["metrics"]["reward"], "-"),
            ("CRL", results["crl"]["metrics"].get(key), results["crl"]["metrics"]["reward"], "-"),
            ("group oracle (each group's best train feature)", g["accuracy"], g["reward"], "-"),
            (f"ceiling ({ceiling_label(c)}; fitted on {c['train_prompts']} train prompts, chosen on validation)",
             c["accuracy"], c["reward"], str(c["distinct_actions"])),
            ("per-prompt oracle (reads the answers)", o["oracle_accuracy"], o["oracle_reward"], "-")]
    lines = [f"Reference rows on the same held-out prompts, from exact reward tables over the {o['candidates']}-feature "
             f"pool:", "", f"| row | {key} | reward | distinct actions |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.3f} | {r:.3f} | {d} |" for name, a, r, d in rows]
    static = results["static"]["metrics"]["reward"]
    lines += ["", f"{gap_sentence('group-oracle', g['reward'] - static, learner['gap_recovered'], mde_reward)}; "
                  f"{gap_sentence('ceiling', c['reward'] - static, learner['ceiling_gap_recovered'], mde_reward)}; "
                  f"CRL's greedy action was its group's best train feature on {learner['group_best_pick_rate']:.0%} "
                  f"of held-out prompts, its best or one at least as good by exact validation reward on "
                  f"{learner['as_good_pick_rate']:.0%}."]
    for name, d in refs.get("paired", {}).items():
        cells = [f"{metric} {v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for metric, v in d.items()
                 if metric != "power"]
        lines.append(f"{name.replace('_', ' ')} (paired, clustered): {'; '.join(cells)}.")
    return "\n".join(lines)
