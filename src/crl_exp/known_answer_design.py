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
5. ``pool_size: null`` (``+experiment=known_answer_dictionary``): the action space is the whole dictionary. The
   class features are still chosen as above, and then checked against *every* feature: the probes' exact reward
   under each of the d_sae features (``reward_table``, chunks of rows reduced to the target-set masses at once,
   never a [features x vocab] array) gives, per class, the dictionary's best feature on that class's probes and
   the class feature's rank there, and the ``static_candidates`` features with the best mean probe reward, which
   the static baseline tries on validation beside its own ranking (so the static row is found over the
   dictionary, and its recall is stated: the probes' best single feature is among the features tried).

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
    pool_rows = mass.diagonal().topk(int(settings["pool_size"] or len(candidates))).indices.tolist()
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
    dictionary = settings.get("pool_size") is None
    return {"classes": task.classes, "class_features": class_features, "targets": class_targets,
            "target_text": [[tok.decode([t]) for t in ts] for ts in class_targets], "pool": None if dictionary else pool,
            "margins": margins, "class_oracle_mass_probes": float(on_targets.max(0).values.mean()),
            "best_static_mass_probes": float(on_targets.mean(1).max()),
            "unsteered_mass_probes": [float(dist[0, t].sum()) for t in class_targets],
            "linear_decodability_validation": decode, "settings": settings}


def dictionary_check(env, task, design: dict[str, Any], settings: dict) -> dict[str, Any]:
    """Step 5: the probes under every feature of the dictionary, exactly (one-time, cached with the design)."""
    from crl_exp.reward_table import reward_table

    probes = task.representative("train", int(settings["probe_prompts"]))
    task.set_design(design["targets"], None)
    table = reward_table(env, probes, list(range(env.sae.d_sae)), chunk=512, use_cache=False,
                         desc="known-answer design: probes x dictionary")
    classes = torch.tensor([task.class_of(e) for e in probes])
    per_class = torch.stack([table.reward[classes == k].mean(0) for k in range(len(task.classes))])  # [K, d_sae]
    mean = table.reward.mean(0)
    own = per_class[torch.arange(len(task.classes)), torch.tensor(design["class_features"])]
    return {"dictionary_best_features": per_class.argmax(1).tolist(),
            "dictionary_best_mass_probes": per_class.max(1).values.tolist(),
            "class_feature_mass_probes": own.tolist(),
            "class_feature_rank_in_dictionary": [int((per_class[k] > own[k]).sum()) + 1
                                                 for k in range(len(task.classes))],
            "class_optimum_over_dictionary_probes": float(per_class.max(1).values.mean()),
            "best_static_over_dictionary_probes": float(mean.max()),
            "best_static_feature_probes": int(mean.argmax()),
            "static_candidates": mean.topk(int(settings["static_candidates"])).indices.tolist(),
            "probe_rows": table.episodes}


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
        if design["pool"] is None:
            design["dictionary"] = dictionary_check(env, task, design, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(design, indent=1))
    extra = []
    if "dictionary" in design:  # the class features, each class's best feature over the dictionary and the probes'
        # best single features: tried as static, and first among the group oracle's candidates (the class optimum)
        check = design["dictionary"]
        extra = list(dict.fromkeys([*design["class_features"], *check["dictionary_best_features"],
                                    *check["static_candidates"]]))
    task.set_design(design["targets"], design["pool"], extra)
    log.info("known_answer design: class features %s, targets %s, margins %s, linear decodability %.2f",
             design["class_features"], design["target_text"], [round(m, 3) for m in design["margins"]],
             design["linear_decodability_validation"])
    if "dictionary" in design:
        check = design["dictionary"]
        log.info("known_answer over the dictionary: class features rank %s on their probes; class optimum %.3f vs "
                 "best static %.3f (probes, every feature)", check["class_feature_rank_in_dictionary"],
                 check["class_optimum_over_dictionary_probes"], check["best_static_over_dictionary_probes"])
    if tracker is not None:
        tracker.log_dict(design, "task/known_answer_design.json")
        tracker.log_metrics({"design/linear_decodability": design["linear_decodability_validation"],
                             "design/class_oracle_mass_probes": design["class_oracle_mass_probes"],
                             "design/best_static_mass_probes": design["best_static_mass_probes"],
                             "design/min_margin": min(design["margins"])})
    return design
