"""What a trained policy's steering costs elsewhere: the policy scored on *another* task.

A safety policy (trained on XSTest or HarmBench) that raises refusals but also breaks knowledge answers is not a
free win; scoring it on MMLU says what it costs. The policy acts as in its headline: greedy, inside its action
space, the Adaptive Feature Mask off, at the run's coefficient. Beside it on the same prompts: no steering and
the run's static feature (the baseline it was compared with on its own task), with paired intervals and the
fixed/broken side effects against no steering.
"""

from __future__ import annotations

from typing import Any

from crl_exp.evaluation.comparison import condition_summary, paired_delta, side_effects
from crl_exp.evaluation.heldout import run_conditions
from crl_exp.steering.controllers import StaticController

# (a, b) pairs reported as a - b on the same prompts
OFF_TASK_DELTAS = (("crl", "none"), ("static", "none"), ("crl", "static"))


def score_off_task(env, module, examples: list, key: str, static_feature: int | None, batch_size: int,
                   n_boot: int, seed: int, assumed_discordance: float) -> dict[str, Any]:
    """Conditions none / static (when the run had one) / crl on ``examples`` of ``env.task``: each condition's
    metrics, the paired deltas of ``OFF_TASK_DELTAS`` and every steered condition's side effects."""
    controllers: dict[str, Any] = {"none": None}
    if static_feature is not None:
        controllers["static"] = StaticController(int(static_feature))
    controllers["crl"] = module.controller(greedy=True, with_mask=False, sae=env.sae.sae)
    records, _ = run_conditions(env, examples, controllers, batch_size)
    task = env.task
    return {
        "task": task.name, "primary_metric": key, "n": len(examples),
        "conditions": {name: condition_summary(task, recs, key, n_boot, seed) for name, recs in records.items()},
        "deltas": {f"{a}_minus_{b}": paired_delta(task, records[a], records[b], key, n_boot, seed, assumed_discordance)
                   for a, b in OFF_TASK_DELTAS if a in records and b in records},
        "side_effects": {name: side_effects(records["none"], recs) for name, recs in records.items() if name != "none"},
    }


def format_off_task(result: dict[str, Any]) -> str:
    """A plain table: each condition's primary metric, then the paired deltas and side effects."""
    key = result["primary_metric"]
    lines = [f"{result['task']} (n={result['n']}), {key}:", ""]
    for name, s in result["conditions"].items():
        lo, hi = s["ci95"].get(key, (float("nan"), float("nan")))
        lines.append(f"  {name:<8} {s['metrics'][key]:.3f} [{lo:.3f}, {hi:.3f}]  reward {s['metrics']['reward']:.4f}")
    lines.append("")
    for name, d in result["deltas"].items():
        e = d[key]
        lines.append(f"  {name:<18} {e['delta']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] "
                     f"(MDE {d['power']['mde_correct']:.3f})")
    lines.append("")
    for name, e in result["side_effects"].items():
        lines.append(f"  {name:<8} fixed {e['fixed']}, broken {e['broken']}, side-effect ratio {e['ratio']:.2f}, "
                     f"reward lowered on {e['reward_worse_share']:.1%}")
    return "\n".join(lines)
