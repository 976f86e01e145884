"""Two ways to score the held-out conditions, behind one interface: roll every condition out, or read every
condition off one exact reward table (one-token tasks over a small action pool).

Both return the same ``Scored`` result (every condition's records in example order, throughput, CRL's greedy
features, the intervention-log rows of the trained policy) and score the policy variants (sampled; greedy with
the mask the other way) the same way, so ``evaluation.heldout_comparison`` never asks which one ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from crl_exp.analysis.intervention_log import log_rows as intervention_rows
from crl_exp.crl.rollout import policy_rollout
from crl_exp.errors import CRLConfigError
from crl_exp.evaluation.heldout import baseline_controllers, policy_variants, run_conditions
from crl_exp.evaluation.table_scoring import (
    check_against_rollouts,
    dictionary_sample,
    feature_columns,
    policy_columns,
    random_columns,
    table_policy_variants,
)
from crl_exp.reward_table import RewardTable, reward_table
from crl_exp.steering.hook import NO_FEATURE


@dataclass
class Conditions:
    """What every held-out comparison scores: the action space, the static feature, the untrained control and the
    trained policy (both greedy controllers), the run's seed and the critic's unit for the intervention log."""

    action_space: list[int]
    static_feature: int
    untrained: Any
    crl: Any
    seed: int
    value_scale: float


@dataclass
class Scored:
    """Every condition's records (same examples, same order), throughput, and what the trained policy did."""

    records: dict[str, list[dict]]
    speeds: dict[str, dict]
    greedy_features: torch.Tensor  # CRL's greedy feature at every scored step (NO_FEATURE: left alone)
    distinct: dict[str, int]  # distinct greedy features of crl and untrained
    steered_share: float
    log_rows: list[dict] = field(default_factory=list)  # the intervention log of the trained policy
    logged_index: list[int] | None = None  # examples whose episodes the log holds (None: all of them)
    table: RewardTable | None = None
    columns: dict[str, torch.Tensor] | None = None  # each condition's table column per prompt (table scoring)
    checks: dict[str, float] = field(default_factory=dict)  # logged as heldout/<name>

    def logged_records(self) -> dict[str, list[dict]]:
        """Each condition's records of the logged examples (those the intervention log and report show)."""
        if self.logged_index is None:
            return self.records
        return {k: [v[i] for i in self.logged_index] for k, v in self.records.items()}


class Scorer(Protocol):
    name: str

    def score(self, env, examples: list, conditions: Conditions) -> Scored: ...

    def variants(self, env, module, examples: list, scored: Scored, key: str, sampled_seeds: int,
                 with_mask: bool, blocked_share: float) -> dict[str, Any]: ...


@dataclass
class RolloutScorer:
    """Every condition rolled out on the held-out examples (one-token conditions share a prefill per prompt)."""

    batch_size: int
    share_prefill: bool = True
    name: str = "rollout"

    def score(self, env, examples: list, conditions: Conditions) -> Scored:
        lm, crl, control = env.lm, conditions.crl, conditions.untrained
        log_rows: list[dict] = []
        control_features: list[torch.Tensor] = []

        def collect_interventions(batch_records, gen):
            traj = crl.trajectory_for_logs()
            crl.steps = []
            log_rows.extend(intervention_rows(batch_records, gen.new_tokens, traj, gen.valid, lm.tokenizer,
                                              episode_offset=collect_interventions.seen,
                                              value_scale=conditions.value_scale))
            collect_interventions.seen += len(batch_records)

        collect_interventions.seen = 0

        def collect_control(batch_records, gen):
            control_features.append(control.trajectory_for_logs()["feature"][gen.valid])
            control.steps = []

        controllers = {**baseline_controllers(env, conditions.action_space, conditions.static_feature,
                                              conditions.seed), "untrained": control, "crl": crl}
        records, speeds = run_conditions(env, examples, controllers, self.batch_size,
                                         on_batch={"crl": collect_interventions, "untrained": collect_control},
                                         share_prefill=self.share_prefill)
        chosen = torch.cat(control_features) if control_features else torch.zeros(0, dtype=torch.long)
        greedy = torch.tensor([int(r["feature"]) for r in log_rows], dtype=torch.long)
        return Scored(records, speeds, greedy_features=greedy,
                      distinct={"crl": len({r["feature"] for r in log_rows} - {NO_FEATURE}),
                                "untrained": int(chosen[chosen != NO_FEATURE].unique().numel())},
                      steered_share=float((greedy != NO_FEATURE).float().mean()) if len(greedy) else float("nan"),
                      log_rows=log_rows)

    def variants(self, env, module, examples, scored, key, sampled_seeds, with_mask, blocked_share):
        return policy_variants(env, module, examples, key, self.batch_size, sampled_seeds, with_mask,
                               headline_records=scored.records["crl"], headline_blocked_share=blocked_share)


@dataclass
class TableScorer:
    """Every condition read off one exact reward table over the action pool plus ``dictionary_columns`` sampled
    dictionary features (``evaluation/table_scoring.py``); the trained policy is also rolled out on ``log_examples``
    stratified prompts for the intervention log, which re-checks the table within ``tolerance``."""

    action_pool: list[int]
    dictionary_columns: int
    log_examples: int
    batch_size: int
    tolerance: float
    name: str = "reward_table"

    def score(self, env, examples: list, conditions: Conditions) -> Scored:
        task, seed = env.task, conditions.seed
        dictionary = dictionary_sample(env.sae.d_sae, list(self.action_pool), self.dictionary_columns, seed)
        t0 = time.perf_counter()
        table = reward_table(env, examples, [*self.action_pool, *dictionary], keep_records=True,
                             desc="held-out reward table")
        columns = {"none": torch.zeros(len(examples), dtype=torch.long),
                   "random": random_columns(table, list(self.action_pool), seed),
                   "random_dictionary": random_columns(table, dictionary, seed),
                   "static": feature_columns(table, torch.full((len(examples),), conditions.static_feature)),
                   "untrained": policy_columns(conditions.untrained, table),
                   "crl": policy_columns(conditions.crl, table)}
        records = {name: table.cell_records(c) for name, c in columns.items()}
        speed = {"table_seconds": time.perf_counter() - t0}
        chosen = {name: torch.tensor([NO_FEATURE if c == 0 else table.features[c - 1] for c in columns[name].tolist()])
                  for name in ("crl", "untrained")}
        logged_index = task.analysis_sample(examples, self.log_examples)  # stratified, not file order
        log_rows, rolled = self.roll_out_logged(env, [examples[i] for i in logged_index], conditions)
        mismatch = check_against_rollouts([records["crl"][i] for i in logged_index], rolled)
        if mismatch > self.tolerance:
            raise RuntimeError(f"held-out reward table and rollouts disagree by {mismatch:.2e} (> {self.tolerance}) "
                               f"on the same prompts and actions: set eval.table_scoring=false and report this")
        return Scored(records, {name: speed for name in records}, greedy_features=chosen["crl"],
                      distinct={k: int(v[v != NO_FEATURE].unique().numel()) for k, v in chosen.items()},
                      steered_share=float((chosen["crl"] != NO_FEATURE).float().mean()), log_rows=log_rows,
                      logged_index=logged_index, table=table,
                      columns=columns, checks={"table_vs_rollout_max_abs_diff": mismatch})

    def roll_out_logged(self, env, logged: list, conditions: Conditions) -> tuple[list[dict], list[dict]]:
        rows, rolled, bs = [], [], self.batch_size
        for start in tqdm(range(0, len(logged), bs), desc="intervention log", unit="batch"):
            batch = policy_rollout(env.task, env.lm, logged[start:start + bs], env.steerer, conditions.crl)
            rows.extend(intervention_rows(batch.records, batch.generation.new_tokens, batch.logged, batch.valid,
                                          env.lm.tokenizer, episode_offset=start, value_scale=conditions.value_scale))
            rolled += batch.records
        return rows, rolled

    def variants(self, env, module, examples, scored, key, sampled_seeds, with_mask, blocked_share):
        return table_policy_variants(module, env, scored.table, env.task, key, sampled_seeds, with_mask,
                                     scored.columns["crl"])


def table_tolerance(lm) -> float:
    """How far a table-read reward may sit from the rolled-out one: shared-prefill batches reorder float sums,
    exact to ~1e-6 in fp32; half precision rounds each matmul."""
    return 1e-4 if next(lm.model.parameters()).dtype == torch.float32 else 3e-2


def choose_scorer(settings, env, top_k: int, action_pool: list[int] | None, batch_size: int) -> Scorer:
    """The reward-table scorer where it is exact and affordable (``eval.table_scoring=auto``: a one-token task,
    one feature per step, a pool of at most ``eval.table_max_features``), else rollouts."""
    mode = str(settings.table_scoring)
    if mode not in ("auto", "false", "False"):
        raise CRLConfigError(f"eval.table_scoring must be auto or false, got {mode!r}")
    one_token = env.task.max_new_tokens == 1
    if mode == "auto" and one_token and top_k == 1 and action_pool is not None and len(action_pool) <= settings.table_max_features:
        return TableScorer(list(action_pool), settings.random_dictionary_columns, settings.log_examples, batch_size,
                           table_tolerance(env.lm))
    return RolloutScorer(batch_size, share_prefill=top_k == 1)
