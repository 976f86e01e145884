"""The held-out comparison of a trained policy with its baselines, all in the policy's own action space.

Conditions (same held-out examples, same coefficient):

* ``none``: no steering;
* ``random``: a uniformly random feature per token from the policy's action space (does the *learned* choice
  among these features matter?);
* ``random_dictionary``: a uniformly random feature from the whole SAE dictionary (does steering with any
  feature at all matter?);
* ``static``: the best single feature, selected on train/validation (``evaluation.static_baseline``);
* ``untrained``: the policy's initial weights (same seed, same action space, greedy; with the trained run's
  observation statistics), the control for "the policy learned to condition on the prompt";
* ``crl``: the trained policy, greedy, inside its action space; with the end-of-training Adaptive Feature Mask
  on or off as ``masking.eval_with_mask`` says (the headline rule, see ``HEADLINE_MASK_RULE``).

Also scored (``policy_variants``): the policy sampling its actions, and greedy with the mask the other way. An
action outside the action space cannot happen (``CRLModule.controller``); the share the final mask would have
blocked is reported apart from it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from crl_exp.episodes import rollout_batch, run_episodes
from crl_exp.evaluation.comparison import condition_summary, paired_delta
from crl_exp.steering.controllers import RandomController, RowDispatch, StaticController
from crl_exp.steering.hook import NO_FEATURE

CONDITIONS = ("none", "random", "random_dictionary", "static", "untrained", "crl")
BASELINES = ("none", "random", "random_dictionary", "static", "untrained")
HEADLINE_MASK_RULE = (
    "The headline scores the policy greedy inside its action space with the Adaptive Feature Mask off "
    "(masking.eval_with_mask=false): the mask is a training-time exploration device whose contents at the last "
    "iteration depend on where training stopped within the masking period, not on what the policy learned; "
    "greedy with the mask on is reported beside it.")


def baseline_controllers(env, action_space: list[int], static_feature: int, seed: int) -> dict[str, Any]:
    """The fixed conditions' controllers (``None``: unsteered)."""
    return {"none": None,
            "random": RandomController(env.sae.d_sae, seed=seed, features=action_space),
            "random_dictionary": RandomController(env.sae.d_sae, seed=seed),
            "static": StaticController(static_feature)}  # all at the steerer's coefficient (the run's)


def untrained_controller(initial_policy, module, sae=None):
    """Greedy over the trained policy's action space with its initial weights; the observation normaliser's
    statistics are the trained run's, so the control differs from CRL only by what training changed."""
    if module.policy.obs_norm is not None and initial_policy.obs_norm is not None:
        initial_policy.obs_norm.load_state_dict(module.policy.obs_norm.state_dict())
    return module.controller(greedy=True, with_mask=False, sae=sae, policy=initial_policy)


def run_conditions(env, examples: list, controllers: dict[str, Any], batch_size: int,
                   on_batch: dict[str, Callable] | None = None,
                   share_prefill: bool = True) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Every condition's records and throughput on the same ``examples``. One-token tasks (with one feature per
    step, ``share_prefill``) run all conditions of a prompt as rows of one batch sharing its prefill
    (``RowDispatch``): the steered state is the same for every row of a prompt, so each row is exactly that
    condition's episode, at 1/C of the prefill cost."""
    if env.task.max_new_tokens == 1 and share_prefill:
        return run_conditions_shared(env, examples, controllers, batch_size, on_batch or {})
    records, speeds = {}, {}
    for name, controller in controllers.items():
        steerer = env.steerer if controller is not None else None
        records[name], speeds[name] = run_episodes(env.task, env.lm, examples, batch_size, steerer, controller,
                                                   desc=f"held-out {name}",
                                                   on_batch=(on_batch or {}).get(name))
    return records, speeds


def run_conditions_shared(env, examples: list, controllers: dict[str, Any], batch_size: int,
                          on_batch: dict[str, Callable]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    names = list(controllers)
    subs = [c if c is not None else StaticController(NO_FEATURE, 0.0) for c in controllers.values()]
    prompts_per_batch = max(1, batch_size // len(names))
    records: dict[str, list[dict]] = {n: [] for n in names}
    seconds = 0.0
    for start in tqdm(range(0, len(examples), prompts_per_batch), desc=f"held-out, {len(names)} conditions",
                      unit="batch"):
        batch = examples[start:start + prompts_per_batch]
        rows = [ex for ex in batch for _ in names]
        assignment = [c for _ in batch for c in range(len(names))]
        recs, gen = rollout_batch(env.task, env.lm, rows, env.steerer, RowDispatch(subs, assignment), share_prefix=True)
        seconds += gen.seconds
        for c, name in enumerate(names):
            idx = torch.tensor([i for i, a in enumerate(assignment) if a == c])
            mine = [recs[i] for i in idx.tolist()]
            records[name] += mine
            if name in on_batch:
                on_batch[name](mine, SimpleNamespace(new_tokens=gen.new_tokens[idx], valid=gen.valid[idx]))
    speed = {"generate_seconds": seconds, "generated_tokens": len(examples) * len(names),
             "tokens_per_second": len(examples) * len(names) / seconds if seconds else float("nan")}
    return records, {n: speed for n in names}


def compare(task, records: dict[str, list[dict]], key: str, n_boot: int, seed: int,
            assumed_discordance: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-condition summaries, CRL-minus-baseline paired deltas) with clustered intervals."""
    results = {name: condition_summary(task, recs, key, n_boot, seed) for name, recs in records.items()}
    deltas = {base: paired_delta(task, records["crl"], records[base], key, n_boot, seed, assumed_discordance)
              for base in BASELINES if base in records}
    return results, deltas


def action_shares(features: list[int], action_space: torch.Tensor, final_mask: torch.Tensor) -> dict[str, float]:
    """Of the greedy held-out actions: the share outside the action space (0 by construction) and the share the
    end-of-training mask would have blocked."""
    if not features:
        return {"outside_action_space_share": float("nan"), "final_mask_blocked_share": float("nan")}
    f = torch.tensor(features, dtype=torch.long)
    return {"outside_action_space_share": float((~action_space[f]).float().mean()),
            "final_mask_blocked_share": float((action_space[f] & ~final_mask[f]).float().mean())}


def policy_variants(env, module, examples: list, key: str, batch_size: int, sampled_seeds: int,
                    headline_with_mask: bool, headline_records: list[dict] | None = None,
                    headline_blocked_share: float = float("nan")) -> dict[str, Any]:
    """The trained policy scored other ways than the headline, always inside its action space: sampled
    (``sampled_seeds`` samples per prompt, mask as in the headline) and greedy with the mask the other way.
    ``headline_records`` are reused for greedy-with-mask-on when the headline ran with the mask off and none of
    its actions was blocked (then it is the same episodes)."""
    task, out = env.task, {}
    if sampled_seeds:
        # the samples of a prompt are rows of one batch sharing its prefill (one sampling stream; sample j of every
        # prompt forms "seed" j)
        repeated = [ex for ex in examples for _ in range(sampled_seeds)]
        controller = module.controller(greedy=False, with_mask=headline_with_mask, seed=1000,
                                       sae=env.sae.sae)
        recs, _ = run_episodes(task, env.lm, repeated, sampled_seeds * max(1, batch_size // sampled_seeds),
                               env.steerer, controller, desc=f"held-out crl sampled x{sampled_seeds}",
                               share_prefix=True)
        per_seed = [task.metrics_from_records(recs[j::sampled_seeds]) for j in range(sampled_seeds)]
        values = torch.tensor([m.get(key, float("nan")) for m in per_seed], dtype=torch.float64)
        rewards = torch.tensor([m.get("reward", float("nan")) for m in per_seed], dtype=torch.float64)
        out["crl_sampled"] = {"seeds": sampled_seeds, key: values.tolist(), "mean": values.mean().item(),
                              "sd": values.std().item() if sampled_seeds > 1 else 0.0,
                              "reward_mean": rewards.mean().item(), "with_mask": headline_with_mask}
    name = "crl_mask_off" if headline_with_mask else "crl_mask_on"
    reused = (not headline_with_mask and headline_records is not None and headline_blocked_share == 0
              and module.top_k == 1)
    if reused:
        recs = headline_records
    else:
        controller = module.controller(greedy=True, with_mask=not headline_with_mask,
                                       sae=env.sae.sae)
        recs = run_episodes(task, env.lm, examples, batch_size, env.steerer, controller, desc=f"held-out {name}")[0]
    metrics = task.metrics_from_records(recs)
    out[name] = {key: metrics.get(key, float("nan")), "reward": metrics.get("reward", float("nan")),
                 "same_episodes_as_greedy": reused, "records": recs}
    return out


# ------------------------------------------------------------------------------------------------------ tables
def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def comparison_table(task: str, key: str, results: dict, deltas: dict, n: int, part: str) -> str:
    lines = [f"Held-out comparison on {task} (test split, {part} part, n={n}, "
             f"{next(iter(results.values()))['clusters']} clusters); primary metric: {key}. Intervals are clustered "
             f"(binary deltas: Newcombe on the cluster-adjusted counts). MDE: the smallest CRL - condition difference "
             f"in per-example correctness this n detects with 80% power at the assumed discordance (observed in "
             f"brackets), and in reward.", "",
             f"| condition | {key} | 95% CI | reward | 95% CI | CRL - condition ({key}) | 95% CI | MDE correct | "
             f"MDE reward |", "|---|---|---|---|---|---|---|---|---|"]
    nan2 = [float("nan")] * 2
    for name, res in results.items():
        m, ci = res["metrics"], res["ci95"]
        d = deltas.get(name, {}).get(key)
        power = deltas.get(name, {}).get("power")
        d_txt = f"{d['delta']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "- | -"
        d_txt += (f" | {power['mde_correct']:.3f} ({power['mde_correct_observed']:.3f}) | {power['mde_reward']:.3f}"
                  if power else " | - | -")
        lines.append(f"| {name} | {m.get(key, float('nan')):.3f} | {_ci(ci.get(key, nan2))} | "
                     f"{m.get('reward', float('nan')):.3f} | {_ci(ci.get('reward', nan2))} | {d_txt} |")
    return "\n".join(lines)


def variants_table(key: str, variants: dict[str, Any], shares: dict[str, float]) -> str:
    lines = [f"CRL evaluated other ways (same held-out examples, always inside its action space). Greedy held-out "
             f"actions outside the action space: {shares['outside_action_space_share']:.3f}; blocked by the "
             f"end-of-training mask: {shares['final_mask_blocked_share']:.3f}.", "",
             f"| policy | {key} | spread over samples | reward |", "|---|---|---|---|"]
    if "crl_sampled" in variants:
        v = variants["crl_sampled"]
        lines.append(f"| sampled (mean of {v['seeds']} samples per prompt) | {v['mean']:.3f} | sd {v['sd']:.3f} | "
                     f"{v['reward_mean']:.3f} |")
    for name in ("crl_mask_on", "crl_mask_off"):
        if name in variants:
            same = " (no greedy action was masked: the same episodes)" if variants[name].get(
                "same_episodes_as_greedy") else ""
            lines.append(f"| greedy, {name.removeprefix('crl_').replace('_', ' ')}{same} | {variants[name][key]:.3f} | "
                         f"- | {variants[name]['reward']:.3f} |")
    return "\n".join(lines)
