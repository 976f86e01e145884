"""The held-out comparison of a trained policy: one function from (environment, trained module, held-out examples,
scorer) to the logged comparison, its markdown and its summary.

It owns everything the comparison writes: the conditions' records and intervals (``heldout/<condition>/...``),
the paired deltas and their power, the policy variants, the reference rows of one-token tasks, the intervention
log, HTML report and critic analysis (``interventions/``), ``heldout/comparison.md`` and ``heldout/summary.json``;
and ``heldout_examples`` is the one place that chooses the held-out part and writes the confirmation ledger.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crl_exp.analysis.feature_profile import usage_weighted_syntactic_share
from crl_exp.analysis.heldout_outputs import write_interpretability_outputs
from crl_exp.analysis.top_features import task_top_contexts
from crl_exp.errors import CRLConfigError
from crl_exp.evaluation.condition_log import log_evaluation
from crl_exp.evaluation.config import EvalConfig
from crl_exp.evaluation.heldout import (
    HEADLINE_MASK_RULE,
    action_shares,
    compare,
    comparison_table,
    untrained_controller,
    variants_table,
)
from crl_exp.evaluation.ledger import record_confirmation
from crl_exp.evaluation.references import one_token_references, references_table
from crl_exp.evaluation.scorers import Conditions, Scorer
from crl_exp.evaluation.static_baseline import Baselines
from crl_exp.steering.hook import NO_FEATURE
from crl_exp.tracking import RunTracker

log = logging.getLogger(__name__)


def heldout_examples(task, settings: EvalConfig, n: int | None, *, confirmed: bool, provenance: dict) -> list:
    """The held-out examples of ``settings.heldout``. The confirmation part is refused unless the command says
    ``+confirm=true``, and each scoring of it appends a ledger line first (``provenance``: config_hash, commit,
    seed, run_id, mode)."""
    if settings.heldout == "confirm" and not confirmed:
        raise CRLConfigError(f"eval.heldout=confirm scores the confirmation part of {task.name}, kept for the recorded "
                             f"answer: add +confirm=true to the command if that is what you mean (each scoring is "
                             f"written to the confirmation ledger); dev runs use eval.heldout=dev")
    examples = task.heldout(settings.heldout, n)
    if settings.heldout == "confirm":
        entry = record_confirmation(settings.ledger, task=task.name, n=len(examples), **provenance)
        log.warning("Scoring the CONFIRMATION subset of %s (n=%d); ledger line: %s", task.name, len(examples), entry)
    return examples


@dataclass
class ComparisonSetup:
    """The run facts the comparison reports with its numbers."""

    key: str  # the task's primary metric
    part: str  # dev | confirm | all
    seed: int
    batch_size: int
    sampled_seeds: int
    reference_train_examples: int
    oracle_candidates: int
    with_mask: bool  # the headline's mask rule (masking.eval_with_mask)
    advantage: str
    noop_action: bool
    notes_after_table: list[str] = field(default_factory=list)  # e.g. where the training curve is
    notes_at_end: list[str] = field(default_factory=list)  # e.g. the episodes each side spent
    extra_summary: dict[str, Any] = field(default_factory=dict)


def heldout_comparison(env, module, initial_policy, examples: list, scorer: Scorer, baselines: Baselines,
                       settings: EvalConfig, setup: ComparisonSetup, tracker: RunTracker,
                       out_dir: Path) -> dict[str, Any]:
    """Score every condition on ``examples`` with ``scorer``, log and write the comparison; returns its summary."""
    task, lm, sae, key = env.task, env.lm, env.sae, setup.key
    phase = time.perf_counter()
    value_scale = module.reward_scale()  # the critic's unit: V * sigma is in reward units (intervention log)
    tracker.log_metrics({"critic/reward_scale": value_scale})
    crl = module.controller(greedy=True, with_mask=setup.with_mask, sae=sae.sae)
    conditions = Conditions(baselines.action_space, baselines.selection.feature,
                            untrained_controller(initial_policy, module, sae=sae.sae), crl, setup.seed, value_scale)
    scored = scorer.score(env, examples, conditions)
    records = scored.records
    tracker.log_metrics({f"heldout/{k}": v for k, v in scored.checks.items()})
    tracker.log_metrics({"heldout/crl/steered_share": scored.steered_share})
    tracker.log_metrics({f"heldout/{k}/distinct_greedy_features": float(v) for k, v in scored.distinct.items()})
    results, deltas = compare(task, records, key, settings.n_bootstrap, setup.seed, settings.assumed_discordance)
    for name, res in results.items():
        log_evaluation(tracker, f"heldout/{name}", res["metrics"], res["ci95"], records[name], scored.speeds[name])
    log_deltas(tracker, deltas)
    greedy = scored.greedy_features
    shares = action_shares(greedy[greedy != NO_FEATURE].tolist(), module.mask.action_pool, module.mask.allowed())
    tracker.log_metrics({f"heldout/crl/{k}": v for k, v in shares.items()})
    variants = scorer.variants(env, module, examples, scored, key, setup.sampled_seeds, setup.with_mask,
                               shares["final_mask_blocked_share"])
    log_variants(tracker, variants, key)
    tracker.log_metrics({"time/heldout_seconds": time.perf_counter() - phase})
    log.info("Held-out comparison (%s scoring) in %.0f s", scorer.name, time.perf_counter() - phase)

    refs = oracle = None
    if task.max_new_tokens == 1 and setup.oracle_candidates:  # one-token tasks: a candidate costs one table row
        phase = time.perf_counter()
        sel = baselines.selection
        refs = one_token_references(env, task, sel, baselines.action_pool or sel.ranking[:setup.oracle_candidates],
                                    baselines.validation, examples, results, greedy.tolist(), setup.seed,
                                    setup.reference_train_examples, scored.table, records=records, key=key,
                                    n_boot=settings.n_bootstrap, assumed_discordance=settings.assumed_discordance)
        oracle = refs["oracle"]
        tracker.log_metrics({f"heldout/oracle/{k}": float(v) for k, v in oracle.items()})
        tracker.log_metrics({f"heldout/{name}/{k}": float(v) for name in ("group_oracle", "ceiling")
                             for k, v in refs[name].items() if isinstance(v, (int, float))})
        tracker.log_metrics({f"learner/{k}": float(v) for k, v in refs["learner"].items() if not isinstance(v, dict)})
        tracker.log_metrics({"time/references_seconds": time.perf_counter() - phase})
        log.info("Reference rows (reward tables, ceiling) in %.0f s", time.perf_counter() - phase)

    usage = dict(Counter(f for f in greedy.tolist() if f != NO_FEATURE).most_common(50))
    contexts = task_top_contexts(lm, sae.sae, sae.layer, task, list(usage))
    write_interpretability_outputs(tracker, task.name, scored.log_rows, scored.logged_records(), out_dir,
                                   examples={ex.id: ex for ex in examples}, feature_contexts=contexts,
                                   neuronpedia=sae.neuronpedia_id)
    syntactic, per_feature = usage_weighted_syntactic_share(usage, contexts)
    tracker.log_metrics({"features/syntactic_share": syntactic, "features/distinct_heldout": float(len(usage))})
    tracker.log_dict({str(k): v for k, v in per_feature.items()}, "interventions/feature_profiles.json")

    markdown = comparison_markdown(task.name, results, deltas, variants, shares, refs, scored, setup, len(examples))
    print(markdown)
    tracker.log_text(markdown, "heldout/comparison.md")
    summary = {"task": task.name, "primary_metric": key, "n_heldout": len(examples), "heldout_part": setup.part,
               "scoring": scorer.name, "action_space": baselines.action_pool, "advantage": setup.advantage,
               "distinct_greedy_features": scored.distinct, "steered_share": scored.steered_share,
               "results": results, "crl_variants": variants, **shares, "headline_with_mask": setup.with_mask,
               "oracle": oracle, "deltas": deltas,
               "references": {k: v for k, v in (refs or {}).items() if k != "oracle"},
               "static_feature": baselines.selection.feature,
               "static_candidates_tried": len(baselines.selection.candidates), **setup.extra_summary}
    tracker.log_text(json.dumps(summary, indent=1, default=float), "heldout/summary.json")
    return summary


def log_deltas(tracker: RunTracker, deltas: dict[str, Any]) -> None:
    for base, d in deltas.items():
        tracker.log_metrics({f"power/crl_minus_{base}/{k}": float(v) for k, v in d["power"].items()})
        for metric, v in d.items():
            if metric != "power":
                tracker.log_metrics({f"delta/crl_minus_{base}/{metric}": v["delta"],
                                     f"delta/crl_minus_{base}/{metric}_ci_low": v["ci95"][0],
                                     f"delta/crl_minus_{base}/{metric}_ci_high": v["ci95"][1]})


def log_variants(tracker: RunTracker, variants: dict[str, Any], key: str) -> None:
    for name, v in variants.items():
        v.pop("records", None)
        if name == "crl_sampled":
            tracker.log_metrics({f"heldout/{name}/{key}_mean": v["mean"], f"heldout/{name}/{key}_sd": v["sd"],
                                 f"heldout/{name}/reward_mean": v["reward_mean"]})
        else:
            tracker.log_metrics({f"heldout/{name}/{key}": v[key], f"heldout/{name}/reward": v["reward"]})


def comparison_markdown(task_name: str, results, deltas, variants, shares, refs, scored, setup: ComparisonSetup,
                        n: int) -> str:
    """The comparison as the run prints it and logs it (``heldout/comparison.md``)."""
    text = comparison_table(task_name, setup.key, results, deltas, n, setup.part)
    text += "".join(f"\n\n{note}" for note in setup.notes_after_table)
    text += (f"\n\nDistinct greedy features on the held-out prompts: CRL {scored.distinct['crl']}, untrained control "
             f"{scored.distinct['untrained']} (estimator: {setup.advantage}); share of steered tokens "
             f"{scored.steered_share:.3f}{' (the policy may choose no steering)' if setup.noop_action else ''}.")
    text += f"\n\n{HEADLINE_MASK_RULE}\n\n" + variants_table(setup.key, variants, shares)
    if refs is not None:
        text += "\n\n" + references_table(refs, results, setup.key, deltas["static"]["power"]["mde_reward"])
    text += "".join(f"\n\n{note}" for note in setup.notes_at_end)
    return text
