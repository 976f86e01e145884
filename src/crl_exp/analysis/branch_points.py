"""Branch-point tracking (DESIGN §6): which tokens' feature choice decides whether the answer is right?

For an episode (prompt, generated tokens, the policy's actions), the steered prefix is replayed **once**, one
cached token per step with that step's recorded edit, so the KV cache always holds exactly the prefix before
step t (snapshots are copied, never cropped: cropping is wrong for sliding-window layers). For each step t and
each alternative choice (no steering, the policy's next-best features), generation continues from the
snapshot: the alternative at step t, then the policy (greedy); all alternatives of a step are rows of one cached
``generate`` (the snapshot copied to every row). The prefix is never regenerated. A step's *branch score* is the share
of alternatives whose outcome (correct or not) differs from the original; a *branch point* has score > 0.

Every step also replays the **original action** as a *control* alternative: it must reproduce the original
outcome, so a control that flips is numerical noise (reported as ``control_flips``, never a branch point). The
original episode must therefore come from the same unpadded, batch-1 path as the branches (``analyse_branches``
generates it so); an episode from a left-padded batch can differ from its unpadded replay in the last bits.

``naive=True`` regenerates every branch from the prompt instead (replaying the recorded actions before t): the
reference for the token-identity test and for the speed benchmark.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.episodes import render_prompt
from crl_exp.generation import generate, stop_criteria
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.hook import NO_FEATURE, ResidualSteerer
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


class ScriptedController:
    """Replays ``forced`` actions (one per step), then ``first_free`` once (one feature, or one per row), then
    the greedy policy."""

    def __init__(self, policy: ActorCritic, coefficient: float, forced: list[int],
                 first_free: int | list[int] | None = None):
        self.policy, self.coefficient, self.forced, self.first_free = policy, coefficient, list(forced), first_free
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
            logits, _ = self.policy(state)
            feature = logits.argmax(-1).cpu()
        return feature.to(state.device), torch.full((len(state),), self.coefficient, device=state.device)


def alternatives_for(policy: ActorCritic, state: torch.Tensor, chosen: int, k: int) -> list[int]:
    """No steering plus the policy's ``k`` next-best features at this state."""
    with torch.no_grad():
        logits, _ = policy(state[None])
    ranked = [f for f in logits[0].argsort(descending=True).tolist() if f != chosen][:k]
    return [NO_FEATURE, *ranked]


def track_branches(task: Task, lm, steerer: ResidualSteerer, policy: ActorCritic, coefficient: float,
                   episode: Episode, episode_index: int, k_alternatives: int = 2, steps: list[int] | None = None,
                   naive: bool = False) -> BranchResult:
    ex = episode.example
    prompt = render_prompt(task, lm, ex)
    chat = task.cfg.get("template", "base") == "chat"
    prompt_ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).input_ids.to(lm.device)
    P, T = prompt_ids.shape[1], len(episode.new_tokens)
    full = torch.cat([prompt_ids, torch.tensor([episode.new_tokens[:-1]], device=lm.device, dtype=torch.long)], 1)
    wanted = set(range(T) if steps is None else steps)
    result = BranchResult(episode_index)
    original_completion = lm.tokenizer.decode(episode.new_tokens, skip_special_tokens=True)
    cache = None
    if not naive:  # the prompt minus its last token, cached once
        with torch.no_grad():
            cache = lm.model(input_ids=prompt_ids[:, :-1], use_cache=True).past_key_values
    for t in range(T):
        if t > max(wanted, default=-1):
            break
        snapshot = None
        if not naive:
            # Snapshot the prefix cache before step t, then advance it by step t's own token and action.
            snapshot = copy.deepcopy(cache) if t in wanted else None
            steerer.record_states = True
            with torch.no_grad(), steerer.attached(StaticController(episode.actions[t], coefficient)):
                out = lm.model(input_ids=full[:, P - 1 + t: P + t], cache=cache, use_cache=True)
            steerer.record_states = False
            cache = out.past_key_values
            state = steerer.steps[-1].state[0]
        if t not in wanted:
            continue
        if naive:
            state = _state_by_replay(lm, steerer, prompt, chat, policy, coefficient, episode.actions[: t + 1])
        control = episode.actions[t]
        alts = [control, *alternatives_for(policy, state, control, k_alternatives)]
        if naive:
            continuations = []
            for alt in alts:
                ctrl = ScriptedController(policy, coefficient, episode.actions[:t], alt)
                gen = generate(lm, [prompt], task.max_new_tokens, steerer, ctrl, add_special_tokens=not chat,
                               stop_strings=task.stop_strings)
                continuations.append(_strip_pad(gen.new_tokens[0].tolist(), lm.tokenizer.pad_token_id))
        else:  # every alternative of this step is a row of one cached generate
            rows = copy.deepcopy(snapshot)
            rows.reorder_cache(torch.zeros(len(alts), dtype=torch.long))
            ctrl = ScriptedController(policy, coefficient, [], alts)
            continuations = [episode.new_tokens[:t] + c for c in continue_from_cache(
                lm, full[:, : P + t].repeat(len(alts), 1), rows, steerer, ctrl, task.max_new_tokens - t,
                task.stop_strings)]
        completions = [_cut(lm.tokenizer.decode(tokens, skip_special_tokens=True), task.stop_strings)
                       for tokens in continuations]
        records = task.score_batch([ex] * len(alts), [prompt] * len(alts), completions, None)
        for alt, tokens, completion, rec in zip(alts, continuations, completions, records, strict=True):
            correct = bool(rec["correct"] > 0.5)
            result.rows.append({"episode": episode_index, "prompt_id": ex.id, "position": t,
                                "chosen_feature": episode.actions[t], "alternative": alt, "control": alt == control,
                                "original_correct": episode.correct, "alternative_correct": correct,
                                "flips": correct != episode.correct, "tokens": tokens,
                                "completion": completion, "original_completion": original_completion})
    return result


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
    from crl_exp.generation import cut_at_stop_strings

    return cut_at_stop_strings(text, stops) if stops else text


@torch.no_grad()
def continue_from_cache(lm, input_ids: torch.Tensor, cache, steerer: ResidualSteerer, controller,
                        max_new_tokens: int, stop_strings: list[str]) -> list[list[int]]:
    """Generate from ``input_ids`` [R, n] whose first ``cache`` positions are already cached (prefix reuse); the
    R rows' new tokens, trailing pads removed."""
    kwargs = stop_criteria(lm.tokenizer, stop_strings, input_ids.shape[1])
    with steerer.attached(controller):
        out = lm.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id, **kwargs)
    return [_strip_pad(row[input_ids.shape[1]:].tolist(), lm.tokenizer.pad_token_id) for row in out]
