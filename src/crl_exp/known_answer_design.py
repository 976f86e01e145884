"""The design of the known-answer task (``task=known_answer``), made from the loaded model and SAE.

Everything is measured on *train* prompts, at the run's coefficient:

1. Candidates: the ``candidates`` features most active at the steered position of train prompts.
2. For ``probe_prompts`` train prompts (every class), the full next-token distribution unsteered and steered by
   each candidate (one shared-prefix forward per prompt); each candidate's *target set* = the ``n_targets``
   tokens its steering raises most (mean over the probes).
3. ``mass[f, g]``: the probability feature f's steering puts on g's target set. The action pool = the
   ``pool_size`` candidates with the most mass on their own set. Among them, the K class features are chosen
   greedily by *margin*, their own mass minus the largest mass any other pool feature puts on their set, with
   pairwise disjoint target sets. Class k (the k-th subject) is paid the mass of feature k's set.
4. Checks, recorded with the design: the margins, the class oracle against the best single feature on the
   probes, and the linear decodability of the class from the policy's state (a logistic regression fitted on
   train states, scored on validation states).

The design is cached per (SAE, layer, coefficient, subjects, settings); it never reads validation or test
answers (the decodability check reads validation *classes*, the task's visible subject headers).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from crl_exp.episodes import observed_states, render_prompt
from crl_exp.generation import generate
from crl_exp.paths import default_cache_dir
from crl_exp.steering.controllers import StaticController
from crl_exp.steering.hook import NO_FEATURE

log = logging.getLogger(__name__)


@torch.no_grad()
def steered_distributions(env, examples: list, features: list[int]) -> torch.Tensor:
    """[1 + F, vocab]: the mean over ``examples`` of the next-token distribution unsteered (row 0) and steered by
    each feature."""
    ids = torch.arange(env.lm.model.get_output_embeddings().weight.shape[0])
    columns = [NO_FEATURE, *features]
    total = None
    for ex in examples:
        prompt = render_prompt(env.task, env.lm, ex)
        gen = generate(env.lm, [prompt] * len(columns), 1, env.steerer,
                       StaticController(torch.tensor(columns)), share_prefix=True, score_token_ids=ids)
        probs = (gen.first_step_logits - gen.first_step_logsumexp[:, None]).exp()
        total = probs if total is None else total + probs
    return total / len(examples)


def choose_classes(mass: torch.Tensor, targets: list[list[int]], k: int) -> tuple[list[int], list[float]]:
    """Indices (into the pool) of ``k`` features with pairwise disjoint target sets, greedily by margin: own mass
    minus the largest mass another pool feature puts on the same set."""
    own = mass.diagonal()
    others = mass.clone()
    others.fill_diagonal_(float("-inf"))
    margins = own - others.max(0).values
    chosen: list[int] = []
    for j in margins.argsort(descending=True).tolist():
        if all(not set(targets[j]) & set(targets[c]) for c in chosen):
            chosen.append(j)
        if len(chosen) == k:
            return chosen, [float(margins[c]) for c in chosen]
    raise ValueError(f"only {len(chosen)} pool features have disjoint target sets; need {k}")


def decodability(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 k: int, steps: int = 300) -> float:
    """Validation accuracy of a multinomial logistic regression on standardised states (L2 1e-3)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (val_x - mean) / std
    w = torch.zeros(a.shape[1], k, requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, train_y) + 1e-3 * (w ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == val_y).float().mean())


def design_key(env, task, settings: dict) -> str:
    parts = [env.sae.source, env.sae.hook_name, env.lm.name, f"{env.coefficient:.6g}", *task.classes,
             json.dumps(settings, sort_keys=True)]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


def make_design(env, task, settings: dict) -> dict[str, Any]:
    """Steps 1-4 of the module doc; returns the JSON-able design."""
    k = len(task.classes)
    train = task.representative("train", int(settings["decode_train"]))
    states = observed_states(env, train, 16)
    sae = env.sae.sae
    acts = sae.encode(states.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
    candidates = acts.mean(0).topk(int(settings["candidates"])).indices.tolist()
    probes = task.representative("train", int(settings["probe_prompts"]))
    dist = steered_distributions(env, probes, candidates)
    gain = dist[1:] - dist[:1]
    targets = gain.topk(int(settings["n_targets"]), dim=1).indices  # [F, n]
    mass = torch.stack([dist[1:, t].sum(1) for t in targets], dim=1)  # mass[f, g]: f's steering on g's targets
    pool_rows = mass.diagonal().topk(int(settings["pool_size"])).indices.tolist()
    pool = [candidates[j] for j in pool_rows]
    pool_targets = [targets[j].tolist() for j in pool_rows]
    pool_mass = mass[pool_rows][:, pool_rows]
    chosen, margins = choose_classes(pool_mass, pool_targets, k)
    class_features = [pool[c] for c in chosen]
    class_targets = [pool_targets[c] for c in chosen]
    on_targets = pool_mass[:, chosen]  # [pool, K]: mass of each pool feature on each class's set (probes)
    validation = task.representative("validation", int(settings["decode_validation"]))
    decode = decodability(states, torch.tensor([task.class_of(e) for e in train]),
                          observed_states(env, validation, 16), torch.tensor([task.class_of(e) for e in validation]),
                          k)
    tok = env.lm.tokenizer
    return {"classes": task.classes, "class_features": class_features, "targets": class_targets,
            "target_text": [[tok.decode([t]) for t in ts] for ts in class_targets], "pool": pool,
            "margins": margins, "class_oracle_mass_probes": float(on_targets.max(0).values.mean()),
            "best_static_mass_probes": float(on_targets.mean(1).max()),
            "unsteered_mass_probes": [float(dist[0, t].sum()) for t in class_targets],
            "linear_decodability_validation": decode, "settings": settings}


def design_task(env, cfg=None, tracker=None) -> dict[str, Any]:
    """Make (or read from the cache) the design of ``env.task`` and set it on the task."""
    task = env.task
    settings = dict(task.cfg.design)
    cache_root = Path(cfg.get("cache_dir") or default_cache_dir()) if cfg is not None else default_cache_dir()
    path = cache_root / "known_answer" / f"{design_key(env, task, settings)}.json"
    if path.is_file():
        design = json.loads(path.read_text())
    else:
        log.info("Designing the known-answer task from the model and SAE (one-time, cached at %s)", path)
        design = make_design(env, task, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(design, indent=1))
    task.set_design(design["targets"], design["pool"])
    log.info("known_answer design: class features %s, targets %s, margins %s, linear decodability %.2f",
             design["class_features"], design["target_text"], [round(m, 3) for m in design["margins"]],
             design["linear_decodability_validation"])
    if tracker is not None:
        tracker.log_dict(design, "task/known_answer_design.json")
        tracker.log_metrics({"design/linear_decodability": design["linear_decodability_validation"],
                             "design/class_oracle_mass_probes": design["class_oracle_mass_probes"],
                             "design/best_static_mass_probes": design["best_static_mass_probes"],
                             "design/min_margin": min(design["margins"])})
    return design
