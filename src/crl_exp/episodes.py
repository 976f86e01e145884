"""The steering environment every consumer shares: frozen LM + SAE + task + hook, and episodes in it.

An *episode* is one prompt's (steered) generation, scored by its task. Training (``crl``), the analyses and
every mode runner roll out episodes through ``rollout_batch``/``run_episodes`` here, so a number is computed one
way wherever it appears: prompts rendered by ``render_prompt``, option-letter probabilities under the full
next-token distribution, records scored by the task.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from crl_exp.errors import CRLConfigError
from crl_exp.generation import generate
from crl_exp.models import LoadedModel
from crl_exp.paths import default_cache_dir
from crl_exp.runtime import load_model, load_sae_for
from crl_exp.saes import LoadedSAE
from crl_exp.steering.factory import steering_directions
from crl_exp.steering.hook import ResidualSteerer
from crl_exp.tasks import Task
from crl_exp.tasks.schema import Example


@dataclass
class SteeringEnv:
    """Frozen parts of a CRL run (never in checkpoints): the LM, its SAE, the task and the steering hook."""

    lm: LoadedModel
    sae: LoadedSAE
    task: Task
    steerer: ResidualSteerer
    coefficient: float
    table_cache: Path | None = None  # where exact reward tables are kept (``reward_table``); None = not kept

    def __post_init__(self) -> None:
        self.steerer.coefficient = float(self.coefficient)

    def __setattr__(self, name: str, value) -> None:
        """``coefficient`` is the run's one steering strength: the steerer applies it to every controller that
        returns features only (the policy), so setting it here sets it there."""
        super().__setattr__(name, value)
        if name == "coefficient" and "steerer" in self.__dict__:
            self.steerer.coefficient = float(value)


def build_env(cfg: DictConfig, task: Task, tracker=None) -> SteeringEnv:
    """Model, SAE and steering hook for a CRL run; ``steering.coefficient``/``coefficient_scale`` set the strength
    of every steered condition (CRL and the random/static baselines alike)."""
    lm = load_model(cfg, tracker)
    sae = load_sae_for(cfg, lm, tracker)
    directions = steering_directions(cfg.steering, sae)
    table_cache = None
    if cfg.get("eval") is not None and cfg.eval.get("table_cache"):
        table_cache = Path(cfg.get("cache_dir") or default_cache_dir()) / "reward_tables"
    env = SteeringEnv(lm, sae, task, ResidualSteerer(lm.model, sae.layer, directions), float(cfg.steering.coefficient),
                      table_cache)
    if tracker is not None:
        tracker.log_metrics({"steer/coefficient": env.coefficient,
                             "steer/distance": float(directions.distance(env.coefficient)),
                             "steer/decoder_norm_mean": directions.decoder_norms.mean().item()})
    designer = getattr(task.cfg, "designer", None)  # tasks made from the loaded model and SAE (task=known_answer)
    if designer:
        module, _, name = str(designer).partition(":")
        getattr(importlib.import_module(module), name)(env, cfg, tracker)
    return env


def letter_token_ids(tokenizer, letters: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the single-token spellings of each option letter (``"A"``, ``" A"``) and, for each id,
    the index of its letter. A letter with no single-token spelling is an error."""
    ids, owner = [], []
    for i, letter in enumerate(letters):
        found = {toks[0] for v in (letter, " " + letter)
                 if len(toks := tokenizer(v, add_special_tokens=False).input_ids) == 1}
        if not found:
            raise ValueError(f"Option letter {letter!r} is not a single token for this tokenizer")
        ids += sorted(found)
        owner += [i] * len(found)
    return torch.tensor(ids), torch.tensor(owner)


def option_probabilities(logits: torch.Tensor, logsumexp: torch.Tensor, owner: torch.Tensor,
                         n_options: int) -> torch.Tensor:
    """[B, n_options] probability of each letter (all its spellings summed) under the *full* next-token
    distribution. Not renormalised over the letters: that would let a policy push mass off the letters for free.
    """
    probs = (logits - logsumexp[:, None]).exp()
    return torch.zeros(len(logits), n_options).index_add_(1, owner, probs)


def render_prompt(task: Task, lm: LoadedModel, ex: Example) -> str:
    """The task text in the task's template: ``base`` (``base_template`` around the text) or ``chat``."""
    text = task.user_text(ex)
    if task.cfg.template == "chat":
        if not lm.tokenizer.chat_template:
            raise CRLConfigError(f"task.template=chat but {lm.name} has no chat template; use task.template=base")
        return lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
    return str(task.cfg.base_template or "{text}").format(text=text)


def prompt_prefix(task: Task, ex: Example, prompt: str) -> str | None:
    """The part of the rendered ``prompt`` up to the end of the task's few-shot prefix (template included)."""
    shots = task.few_shot_prefix(ex)
    if not shots:
        return None
    at = prompt.find(task.user_text(ex))
    return prompt[: at + len(shots)] if at >= 0 else None


def rollout_batch(task: Task, lm: LoadedModel, batch: list[Example], steerer=None, controller=None,
                  share_prefix: bool = False, cache_prefixes: bool = True):
    """Generate and score one batch; returns (per-example records, the ``Generation``). ``share_prefix``: one
    unsteered prefill per distinct prompt (see ``generate``), for groups of episodes of the same prompt.
    ``cache_prefixes``: start prompts from their task's cached few-shot prefix (exact; off only to measure)."""
    chat = task.cfg.template == "chat"
    letter_ids = owner = None
    n_groups = 0
    groups = task.scored_token_groups(lm.tokenizer, batch)
    if groups is not None:
        letter_ids, owner = groups
        n_groups = int(owner.max()) + 1
    elif letters := task.scored_letters(batch):
        letter_ids, owner = letter_token_ids(lm.tokenizer, letters)
        n_groups = len(letters)
    prompts = [render_prompt(task, lm, ex) for ex in batch]
    prefixes = [prompt_prefix(task, ex, p) for ex, p in zip(batch, prompts, strict=True)] if cache_prefixes else []
    gen = generate(lm, prompts, task.max_new_tokens, steerer, controller, add_special_tokens=not chat,
                   stop_strings=task.stop_strings, score_token_ids=letter_ids, share_prefix=share_prefix,
                   prefixes=prefixes if any(prefixes) else None, references=task.reference_answers(batch),
                   reference_marker=task.reference_marker)
    option_probs = None
    if gen.first_step_logits is not None:
        option_probs = option_probabilities(gen.first_step_logits, gen.first_step_logsumexp, owner, n_groups)
    scored = task.score_batch(batch, prompts, gen.completions, option_probs)
    if gen.reference_likelihood is not None:
        task.add_reference_likelihood(scored, gen.reference_likelihood.tolist())
    records = [{"id": ex.id, "group": ex.group, "cluster": task.cluster(ex), "question": ex.question,
                "answer": ex.answer, "prompt": prompt, "completion": completion, **rec}
               for ex, prompt, completion, rec in zip(batch, prompts, gen.completions, scored, strict=True)]
    return records, gen


@torch.no_grad()
def observed_states(env: SteeringEnv, examples: list[Example], batch_size: int) -> torch.Tensor:
    """[N, d_model]: each prompt's residual state at the first steered position (the last prompt token), unsteered:
    what a policy observes at step 0 (one forward per prompt, nothing decoded)."""
    from crl_exp.steering.controllers import StaticController
    from crl_exp.steering.hook import NO_FEATURE

    chat = env.task.cfg.template == "chat"
    out = []
    env.steerer.record_states = True
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            prompts = [render_prompt(env.task, env.lm, ex) for ex in batch]
            prefixes = [prompt_prefix(env.task, ex, p) for ex, p in zip(batch, prompts, strict=True)]
            generate(env.lm, prompts, 1, env.steerer, StaticController(NO_FEATURE, 0.0), add_special_tokens=not chat,
                     prefixes=prefixes if any(prefixes) else None)
            out.append(env.steerer.steps[0].state.float().cpu())
    finally:
        env.steerer.record_states = False
    return torch.cat(out)


def run_episodes(task: Task, lm: LoadedModel, examples: list[Example], batch_size: int, steerer=None,
                 controller=None, desc: str = "Evaluating", on_batch=None,
                 cache_prefixes: bool = True, share_prefix: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate and score ``examples`` in batches; returns per-example records and throughput figures.

    ``on_batch(records, generation)`` is called after every batch (e.g. to collect intervention logs)."""
    records: list[dict[str, Any]] = []
    seconds, n_tokens = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
        batch_records, gen = rollout_batch(task, lm, examples[start:start + batch_size], steerer, controller,
                                           share_prefix=share_prefix, cache_prefixes=cache_prefixes)
        if on_batch is not None:
            on_batch(batch_records, gen)
        records += batch_records
        seconds += gen.seconds
        n_tokens += gen.n_generated
    return records, {"generate_seconds": seconds, "generated_tokens": n_tokens,
                     "tokens_per_second": n_tokens / seconds if seconds else float("nan")}
