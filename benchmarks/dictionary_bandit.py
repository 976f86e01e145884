"""Learners over a whole dictionary, on a planted bandit shaped like steering (seconds a run, no model).

The world (``crl_exp.crl.planted.PlantedDictionary``): K unit directions with a real SAE's cosine spread (clusters of
near-twins among random directions), prompts of C classes whose states carry the class, and a reward that is
linear in the direction (``<w_c, d_f>``, the first-order part steering rewards measurably have) plus a bonus on one
planted feature per class that the linear part ranks high but not first. The screen is the linear part: the
planted feature lies in its top 64, not at its argmax. Every learner runs through ``train_on_table`` (the one
``Learner``), and the table reports greedy held-out reward against model rows spent, as a share of the gap between
the best single feature and the class optimum.

    .venv/bin/python benchmarks/dictionary_bandit.py [--seeds 0 1 2] [--features 4096] [--out results/x.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from crl_exp.crl.planted import PlantedDictionary
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.crl.table_training import train_on_table
from crl_exp.tracking.provenance import git_commit

LEARNERS = {  # name -> (policy head, estimator, group size, screen_top[, masking preset])
    "independent+group (paper's head, PPO)": ("independent", "group", 8, 0),
    "independent+group, masking=adaptive": ("independent", "group", 8, 0, "adaptive"),
    "embedding+group": ("embedding", "group", 8, 0),
    "independent+sampled_set (no screen)": ("independent", "sampled_set", 16, 0),
    "embedding+sampled_set (no screen)": ("embedding", "sampled_set", 16, 0),
    "independent+sampled_set+screen64": ("independent", "sampled_set", 16, 64),
    "embedding+sampled_set+screen64": ("embedding", "sampled_set", 16, 64),
}


def shipped_masking(name: str):
    """The ``masking=<name>`` preset a user gets, composed by Hydra."""
    from hydra import compose, initialize_config_dir

    from crl_exp.crl.config import masking_config
    from crl_exp.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return masking_config(compose("config", overrides=["mode=train", f"masking={name}"]).masking)


def run(args) -> dict:
    commit = git_commit()  # the code that runs, read before it runs
    world = PlantedDictionary(args.features, seed=args.world_seed)
    train, heldout = world.table(args.train_prompts, seed=1), world.table(args.heldout_prompts, seed=2)
    static, optimum = world.static_reward(heldout), world.optimum_reward(heldout)
    rows = []
    for name, (head, advantage, group, screen_top, *masking) in LEARNERS.items():
        if args.only and args.only not in name:
            continue
        for seed in args.seeds:
            t0 = time.perf_counter()
            cfg = replace(PPOConfig(), advantage=advantage, screen_top=screen_top)
            history = train_on_table(train, PolicyConfig(obs_norm=True, head=head), cfg, args.iterations,
                                     args.prompts, group, args.features, seed=seed, evaluate=heldout,
                                     action_directions=world.directions,
                                     screen=world.screen(train) if screen_top else None,
                                     masking_cfg=shipped_masking(masking[0]) if masking else None)
            classes = world.classes_of(heldout)
            picks = torch.tensor(history[-1]["greedy_features"]) == world.planted[classes]
            curve = [(h["episodes"], h["greedy_reward"]) for h in history]
            final = curve[-1][1]
            rows.append({"learner": name, "seed": seed, "final_greedy_reward": final,
                         "gap_recovered": (final - static) / (optimum - static), "model_rows": curve[-1][0],
                         "class_feature_share": float(picks.float().mean()),
                         "rows_to_80_percent": next((n for n, v in curve if (v - static) / (optimum - static) >= 0.8),
                                                    None),
                         "curve": curve, "entropy": history[-1]["entropy"], "seconds": time.perf_counter() - t0,
                         "mask_size": [h["mask_size"] for h in history],
                         "train_entropy": [h["entropy_train"] for h in history]})
            print(f"{name:40s} seed {seed}: {final:.3f} ({rows[-1]['gap_recovered']:+.0%} of the gap) after "
                  f"{curve[-1][0]} rows, entropy {history[-1]['entropy']:.2f}, largest mask "
                  f"{max(rows[-1]['mask_size']):.0f}, {rows[-1]['seconds']:.0f} s", flush=True)
    return {"command": " ".join(["benchmarks/dictionary_bandit.py", *args.argv]), "commit": commit,
            "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform()},
            "world": world.describe(), "static": static, "optimum": optimum, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world-seed", type=int, default=1234)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--train-prompts", type=int, default=256)
    parser.add_argument("--heldout-prompts", type=int, default=128)
    parser.add_argument("--only", default="", help="run only the learners whose name contains this")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.argv = argv or []
    result = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
