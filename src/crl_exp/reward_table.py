"""The exact reward table of a one-token task: every prompt's outcome under every feature of a pool.

Only the newest position is steered, so on a one-token task the outcome of prompt p under feature f costs one
shared unsteered prefill of p plus one row of a batched last-token forward (``generate(share_prefix=True)``).
One table serves the exhaustive static-feature selection (the best column on validation), the held-out scoring
of every one-token condition (``evaluation/table_scoring.py``), the headroom oracle (the best cell per held-out
row, reading the answers) and anything fitted on exact rewards.

A table depends on the model, the SAE directions, the coefficient, the task's prompts and the code, never on a
policy or a seed: with ``env.table_cache`` set it is kept on disk under a key of all of these (the commit
included), so the seeds of one configuration compute it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from crl_exp.episodes import rollout_batch
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.hook import NO_FEATURE
from crl_exp.tracking.provenance import git_commit

log = logging.getLogger(__name__)
TABLE_FORMAT = 2  # bump when what a cached table holds changes
SHARED_FIELDS = ("prompt", "question")  # the same in every column of a prompt: kept in column 0 only


@dataclass
class RewardTable:
    """``reward``/``correct``: [prompts, features]; ``unsteered_*``: [prompts] (no feature); ``states``: [prompts,
    d_model] the residual state at the steered position before any edit (what a policy observes)."""

    features: list[int]
    example_ids: list[str]
    reward: torch.Tensor
    correct: torch.Tensor
    unsteered_reward: torch.Tensor
    unsteered_correct: torch.Tensor
    states: torch.Tensor
    records: list[list[dict]] | None = None  # per prompt, columns [unsteered, *features] (``keep_records``)

    @property
    def episodes(self) -> int:
        """Episodes this table stands for (every prompt under every feature and unsteered)."""
        return len(self.example_ids) * (len(self.features) + 1)

    def best_column(self) -> int:
        """Index of the feature with the highest mean reward (ties: the earlier, i.e. better ranked, one)."""
        means = self.reward.mean(0)
        return int((means == means.max()).nonzero()[0])

    def select(self, features: list[int]) -> RewardTable:
        """The same table restricted to ``features`` (a subset of its columns, in that order)."""
        index = [self.features.index(f) for f in features]
        cols = torch.tensor(index, dtype=torch.long)
        records = None
        if self.records is not None:
            records = [[row[0], *(row[1 + j] for j in index)] for row in self.records]
        return RewardTable(list(features), self.example_ids, self.reward[:, cols], self.correct[:, cols],
                           self.unsteered_reward, self.unsteered_correct, self.states, records)

    def cell_records(self, columns: torch.Tensor) -> list[dict]:
        """The full record of each prompt's chosen column (0 = unsteered, 1 + j = ``features[j]``): exactly the
        record a rollout of that prompt under that feature returns."""
        if self.records is None:
            raise ValueError("this reward table was built without keep_records=True")
        out = []
        for row, col in zip(self.records, columns.tolist(), strict=True):
            rec = dict(row[col])
            rec.update({k: row[0][k] for k in SHARED_FIELDS if k in row[0]})
            out.append(rec)
        return out


def table_key(env, examples: list, features: list[int], keep_records: bool) -> str:
    """Everything a table's values depend on, hashed: code, model, SAE directions, coefficient, task, prompts."""
    task_cfg = env.task.cfg
    task_cfg = OmegaConf.to_container(task_cfg, resolve=True) if isinstance(task_cfg, DictConfig) else task_cfg
    directions = env.steerer.directions
    h = hashlib.sha256()
    h.update(json.dumps({"format": TABLE_FORMAT, "commit": git_commit(), "model": env.lm.name,
                         "model_source": env.lm.source, "dtype": str(next(env.lm.model.parameters()).dtype),
                         "sae": env.sae.source, "layer": env.sae.layer, "scale": directions.coefficient_scale,
                         "resid_norm": directions.resid_norm, "coefficient": env.coefficient, "task": env.task.name,
                         "task_cfg": task_cfg, "ids": [ex.id for ex in examples], "features": list(features),
                         "records": keep_records}, sort_keys=True, default=str).encode())
    h.update(directions.unit.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def reward_table(env, examples: list, features: list[int], chunk: int = 256, desc: str = "reward table",
                 keep_records: bool = False, use_cache: bool = True) -> RewardTable:
    """Every ``examples`` prompt steered by every feature (``env.coefficient``) and by nothing.

    Rows of one prompt share its prefill; ``chunk`` bounds the rows of one forward (memory). ``keep_records``:
    keep every cell's full record (held-out scoring). Read from / written to ``env.table_cache`` when it is set
    and ``use_cache``."""
    if env.task.max_new_tokens != 1:
        raise ValueError(f"reward tables need a one-token task; {env.task.name} generates {env.task.max_new_tokens}")
    if not features:
        raise ValueError("reward_table needs at least one feature")
    cache_dir = getattr(env, "table_cache", None) if use_cache else None
    path = Path(cache_dir) / f"{table_key(env, examples, features, keep_records)}.pt" if cache_dir else None
    if path is not None and path.is_file():
        table = RewardTable(**torch.load(path, weights_only=False))
        log.info("%s: %d prompts x %d features read from the table cache (%s)", desc, len(examples), len(features),
                 path.name)
        return table
    table = compute_reward_table(env, examples, features, chunk, desc, keep_records)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(table.__dict__, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves half a table under the key
    return table


def compute_reward_table(env, examples: list, features: list[int], chunk: int, desc: str,
                         keep_records: bool) -> RewardTable:
    columns = [NO_FEATURE, *features]
    rewards, correct, states, kept = [], [], [], []
    env.steerer.record_states = True
    try:
        for ex in tqdm(examples, desc=desc, unit="prompt", disable=len(examples) * len(columns) < 2048):
            row_r, row_c, row_records = [], [], []
            for start in range(0, len(columns), chunk):
                part = columns[start:start + chunk]
                records, _ = rollout_batch(env.task, env.lm, [ex] * len(part), env.steerer,
                                           StaticController(torch.tensor(part)), share_prefix=True)
                row_r += [float(r["reward"]) for r in records]
                row_c += [float(r["correct"]) for r in records]
                if keep_records:
                    row_records += [r if start == 0 and j == 0 else {k: v for k, v in r.items() if k not in SHARED_FIELDS}
                                    for j, r in enumerate(records)]
                if start == 0:
                    states.append(env.steerer.steps[0].state[0].float().cpu())
            rewards.append(row_r)
            correct.append(row_c)
            kept.append(row_records)
    finally:
        env.steerer.record_states = False
    r, c = torch.tensor(rewards), torch.tensor(correct)
    return RewardTable(list(features), [ex.id for ex in examples], r[:, 1:], c[:, 1:], r[:, 0], c[:, 0],
                       torch.stack(states), kept if keep_records else None)
