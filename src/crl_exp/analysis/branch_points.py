"""Branch-point tracking (docs/design.md §6): which tokens' feature choice decides whether the answer is right?

For an episode (prompt, generated tokens, the policy's actions), the steered prefix is replayed **once**, one
cached token per step with that step's recorded edit, so the KV cache always holds exactly the prefix before
step t (snapshots are copied, never cropped: cropping is wrong for sliding-window layers). For each step t and
each alternative choice (no steering, the policy's next-best features), generation continues from the
snapshot: the alternative at step t, then the policy (greedy). All continuations of an episode, every step's
alternatives alike, are rows of one left-padded cached ``generate`` (``max_rows`` at a time): each row starts
from its step's snapshot and is cut to the tokens its step had left. The prefix is never regenerated. A step's *branch score* is the share
of alternatives whose outcome (correct or not) differs from the original; a *branch point* has score > 0.

Every step also replays the **original action** as a *control* alternative: it must reproduce the original
outcome, so a control that flips is numerical noise (reported as ``control_flips``, never a branch point). The
original episode must therefore come from the same unpadded, batch-1 path as the branches (``analyse_branches``
generates it so); an episode from a left-padded batch can differ from its unpadded replay in the last bits.

``naive=True`` regenerates every branch from the prompt instead (replaying the recorded actions before t): the
reference for the token-identity test and for the speed benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.episodes import render_prompt
from crl_exp.generation import generate
from crl_exp.kv_cache import cache_tensors, left_padded_cache
from crl_exp.models.greedy_head import screened_greedy_head
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.hook import NO_FEATURE, ResidualSteerer
from crl_exp.stopping import stop_criteria
from crl_exp.tasks import Task
from crl_exp.tasks.schema import Example


@dataclass
class Episode:
    example: Example
    new_tokens: list[int]  # the episode's generated tokens (valid steps only)
    actions: list[int]  # feature chosen at each step
    correct: bool


@dataclass
class BranchResult:
    episode: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (step, alternative)

    @property
    def alternatives(self) -> list[dict[str, Any]]:
        """The counterfactual rows (controls excluded)."""
        return [r for r in self.rows if not r["control"]]

    def control_flips(self) -> list[dict[str, Any]]:
        """Control rows (the original action replayed) whose outcome differs: numerical noise, not branching."""
        return [r for r in self.rows if r["control"] and r["flips"]]

    def branch_points(self) -> list[dict[str, Any]]:
        by_step: dict[int, list[dict]] = {}
        for r in self.alternatives:
            by_step.setdefault(r["position"], []).append(r)
        out = []
        for pos, rows in sorted(by_step.items()):
            flips = [r for r in rows if r["flips"]]
            if flips:
                out.append({"position": pos, "chosen_feature": rows[0]["chosen_feature"],
                            "chosen_correct": rows[0]["original_correct"],
                            "flipping_alternatives": [r["alternative"] for r in flips],
                            "branch_score": len(flips) / len(rows)})
        return out

    def scores(self) -> dict[int, float]:
        by_step: dict[int, list[bool]] = {}
        for r in self.alternatives:
            by_step.setdefault(r["position"], []).append(r["flips"])
        return {p: sum(v) / len(v) for p, v in sorted(by_step.items())}


def greedy_steered(policy: ActorCritic, state: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """The greedy action inside ``allowed`` (the policy's action space), its no-op written as ``NO_FEATURE``."""
    logits, _ = policy(state, allowed)
    feature = logits.argmax(-1).cpu()
    return feature if policy.noop_index is None else torch.where(feature == policy.noop_index, NO_FEATURE, feature)


class ScriptedController:
    """Replays ``forced`` actions (one per step), then ``first_free`` once (one feature, or one per row), then
    the greedy policy inside ``allowed``."""

    def __init__(self, policy: ActorCritic, coefficient: float, forced: list[int],
                 first_free: int | list[int] | None = None, allowed: torch.Tensor | None = None):
        self.policy, self.coefficient, self.forced, self.first_free = policy, coefficient, list(forced), first_free
        self.allowed = allowed
        self.calls = 0

    @torch.no_grad()
    def __call__(self, state: torch.Tensor):
        t = self.calls
        self.calls += 1
        if t < len(self.forced):
            feature = torch.full((len(state),), self.forced[t], dtype=torch.long)
        elif t == len(self.forced) and self.first_free is not None:
            feature = (torch.tensor(self.first_free, dtype=torch.long) if isinstance(self.first_free, list)
                       else torch.full((len(state),), self.first_free, dtype=torch.long))
        else:
            feature = greedy_steered(self.policy, state, self.allowed)
        return feature.to(state.device), torch.full((len(state),), self.coefficient, device=state.device)


def alternatives_for(policy: ActorCritic, state: torch.Tensor, chosen: int, k: int,
                     allowed: torch.Tensor | None = None) -> list[int]:
    """No steering plus the policy's ``k`` next-best features at this state, inside ``allowed``."""
    with torch.no_grad():
        logits, _ = policy(state[None], allowed)
    order = logits[0].argsort(descending=True)
    ranked = [f for f in order[logits[0][order] > float("-inf")].tolist()
              if f != chosen and f != policy.noop_index][:k]
    return [NO_FEATURE, *ranked]


def track_branches(task: Task, lm, steerer: ResidualSteerer, policy: ActorCritic, coefficient: float,
                   episode: Episode, episode_index: int, k_alternatives: int = 2, steps: list[int] | None = None,
                   naive: bool = False, max_rows: int = 64, allowed: torch.Tensor | None = None) -> BranchResult:
    """Every (step, alternative) continuation of ``episode``; ``max_rows``: continuations per cached generate;
    ``allowed``: the policy's action space (alternatives and greedy continuations stay inside it)."""
    ex = episode.example
    prompt = render_prompt(task, lm, ex)
    chat = task.cfg.template == "chat"
    prompt_ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).input_ids.to(lm.device)
    P, T = prompt_ids.shape[1], len(episode.new_tokens)
    full = torch.cat([prompt_ids, torch.tensor([episode.new_tokens[:-1]], device=lm.device, dtype=torch.long)], 1)
    wanted = sorted(set(range(T) if steps is None else steps) & set(range(T)))
    jobs: list[tuple[int, int, bool]] = []  # (step, alternative, is the control)
    continuations: list[list[int]] = []
    if naive:
        for t in wanted:
            state = _state_by_replay(lm, steerer, prompt, chat, policy, coefficient, episode.actions[: t + 1])
            for alt in step_alternatives(policy, state, episode.actions[t], k_alternatives, allowed):
                jobs.append((t, alt, alt == episode.actions[t]))
                ctrl = ScriptedController(policy, coefficient, episode.actions[:t], alt, allowed)
                gen = generate(lm, [prompt], task.max_new_tokens, steerer, ctrl, add_special_tokens=not chat,
                               stop_strings=task.stop_strings)
                continuations.append(_strip_pad(gen.new_tokens[0].tolist(), lm.tokenizer.pad_token_id))
    else:
        snapshots, states = replay_prefix(lm, steerer, full, P, episode.actions, coefficient, wanted)
        for t in wanted:
            jobs += [(t, alt, alt == episode.actions[t])
                     for alt in step_alternatives(policy, states[t], episode.actions[t], k_alternatives, allowed)]
        for start in range(0, len(jobs), max_rows):  # every continuation is a row of one cached generate
            chunk = jobs[start:start + max_rows]
            tails = continue_steps(lm, full, P, [t for t, _, _ in chunk], snapshots, steerer,
                                   ScriptedController(policy, coefficient, [], [alt for _, alt, _ in chunk], allowed),
                                   task.max_new_tokens, task.stop_strings)
            continuations += [episode.new_tokens[:t] + tail for (t, _, _), tail in zip(chunk, tails, strict=True)]
    result = BranchResult(episode_index)
    original_completion = lm.tokenizer.decode(episode.new_tokens, skip_special_tokens=True)
    completions = [_cut(lm.tokenizer.decode(tokens, skip_special_tokens=True), task.stop_strings)
                   for tokens in continuations]
    records = task.score_batch([ex] * len(jobs), [prompt] * len(jobs), completions, None) if jobs else []
    for (t, alt, control), tokens, completion, rec in zip(jobs, continuations, completions, records, strict=True):
        correct = bool(rec["correct"] > 0.5)
        result.rows.append({"episode": episode_index, "prompt_id": ex.id, "position": t,
                            "chosen_feature": episode.actions[t], "alternative": alt, "control": control,
                            "original_correct": episode.correct, "alternative_correct": correct,
                            "flips": correct != episode.correct, "tokens": tokens,
                            "completion": completion, "original_completion": original_completion})
    return result


def step_alternatives(policy: ActorCritic, state: torch.Tensor, chosen: int, k: int,
                      allowed: torch.Tensor | None = None) -> list[int]:
    """The control (the original action) first, then no steering and the policy's next-best features."""
    return [chosen, *alternatives_for(policy, state, chosen, k, allowed)]


@torch.no_grad()
def replay_prefix(lm, steerer: ResidualSteerer, full: torch.Tensor, P: int, actions: list[int], coefficient: float,
                  wanted: list[int]):
    """Replay the episode once, one cached token per step with its recorded edit. Returns, for each wanted step
    t, the KV tensors of the prefix before step t (references: a cache update makes new tensors, so they stay
    valid) and the policy's state at step t."""
    cache = lm.model(input_ids=full[:, : P - 1], use_cache=True).past_key_values if P > 1 else None
    snapshots: dict[int, tuple[list | None, int]] = {}
    states: dict[int, torch.Tensor] = {}
    for t in range(max(wanted, default=-1) + 1):
        if t in wanted:
            snapshots[t] = (cache_tensors(cache) if cache is not None else None, P - 1 + t)
        steerer.record_states = True
        try:
            with steerer.attached(StaticController(actions[t], coefficient)):
                cache = lm.model(input_ids=full[:, P - 1 + t: P + t], cache=cache, use_cache=True).past_key_values
        finally:
            steerer.record_states = False
        states[t] = steerer.steps[-1].state[0]
    return snapshots, states


@torch.no_grad()
def continue_steps(lm, full: torch.Tensor, P: int, steps: list[int], snapshots, steerer: ResidualSteerer,
                   controller, max_new_tokens: int, stop_strings: list[str]) -> list[list[int]]:
    """One left-padded cached generate whose row i continues the episode from step ``steps[i]`` (its prefix
    cache from ``snapshots``); each row is cut to the tokens a generation from that step could still make."""
    lengths = [snapshots[t][1] for t in steps]
    width = max(lengths) + 1
    input_ids = full.new_full((len(steps), width), lm.tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, t in enumerate(steps):
        input_ids[i, width - (P + t):] = full[0, : P + t]
        mask[i, width - (P + t):] = 1
    cache = None
    if max(lengths) > 0:
        cache = left_padded_cache(lm, [snapshots[t][0] for t in steps], lengths)
    kwargs = stop_criteria(lm.tokenizer, stop_strings, width)
    with steerer.attached(controller), screened_greedy_head(lm.model, lm.screened_greedy_head):
        out = lm.model.generate(input_ids=input_ids, attention_mask=mask, cache=cache,
                                max_new_tokens=max_new_tokens - min(steps), do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id, **kwargs)
    return [_strip_pad(row[width: width + max_new_tokens - t].tolist(), lm.tokenizer.pad_token_id)
            for row, t in zip(out, steps, strict=True)]


def _strip_pad(tokens: list[int], pad: int | None) -> list[int]:
    while tokens and tokens[-1] == pad:
        tokens.pop()
    return tokens


def _state_by_replay(lm, steerer, prompt, chat, policy, coefficient, actions: list[int]) -> torch.Tensor:
    """Naive path: the policy's state at step len(actions)-1, by regenerating the prefix from scratch."""
    steerer.record_states = True
    try:
        generate(lm, [prompt], len(actions), steerer, ScriptedController(policy, coefficient, actions),
                 add_special_tokens=not chat)
        return steerer.steps[len(actions) - 1].state[0]
    finally:
        steerer.record_states = False
def _cut(text: str, stops: list[str]) -> str:
    from crl_exp.stopping import cut_at_stop_strings

    return cut_at_stop_strings(text, stops) if stops else text
