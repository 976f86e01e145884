"""The learner's settings chosen on the known-answer task's *validation* split (issue 24), a recorded sweep.

Builds the exact reward tables of the known-answer task (``+experiment=known_answer_layer12``: the designed
32-feature pool, train and validation prompts) once, then trains the learner on the train table
(``crl.table_training``: the same update functions as ``mode=train``, rewards read off the table) for every
setting of the grid, at the CPU budget's shape (13 iterations x 8 prompts; G = 8 episodes per prompt for the
sampling estimators), 3 seeds each, and scores the greedy policy on the validation table. Nothing reads test.

Usage: .venv/bin/python experiments/learner_sweep.py [--out experiments/learner_sweep]
Writes <out>.json (every trial) and <out>.md (the table and the winners), with the command and commit.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
GRID = {
    "all_actions": {"lr": (3e-4, 1e-3, 3e-3, 1e-2), "update_epochs": (1, 4, 8), "ent_coef": (0.0, 0.01)},
    "group": {"lr": (3e-4, 1e-3, 3e-3), "update_epochs": (4, 8), "ent_coef": (0.0, 0.01)},
    "gae": {"lr": (3e-4, 1e-3, 3e-3), "update_epochs": (4, 8), "ent_coef": (0.0, 0.01)},
}
ITERATIONS, PROMPTS, GROUP = 13, 8, 8


# the task the learner is tuned on, and the one it is confirmed on (make train's setting: 32 ranked candidates)
TASKS = {"known_answer": ["+experiment=known_answer_layer12"],
         "bbq": ["+experiment=bbq_layer12", "policy.action_pool=32", "steering.coefficient=0.1"]}


def task_tables(name: str = "known_answer", train_n: int = 240, validation_n: int = 128):
    """(env, train table, validation table) over the task's action pool (known_answer: its designed pool; bbq:
    the 32 features ranked as ``mode=train`` ranks them), cached."""
    from hydra import compose, initialize_config_dir

    from crl_exp.episodes import build_env
    from crl_exp.evaluation.static_baseline import candidate_pool, rank_features
    from crl_exp.paths import CONFIG_DIR, default_cache_dir
    from crl_exp.reward_table import RewardTable, reward_table
    from crl_exp.tasks import build_task

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=TASKS[name])
    task = build_task(cfg.task, os.environ.get("CRL_DATA_DIR") or HERE.parent.parent / "shared" / "benchmarks")
    env = build_env(cfg, task)
    pool = task.action_pool()
    if pool is None:
        score, mean_act, _ = rank_features(env, task.representative("train", int(cfg.budget.static_feature.train_examples)),
                                           int(cfg.budget.eval_batch_size))
        pool = candidate_pool(score, mean_act, int(cfg.policy.action_pool))
    key = f"{name}|{env.sae.source}|{env.coefficient}|{pool}|{train_n}|{validation_n}"
    path = default_cache_dir() / "known_answer" / f"tables_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        saved = torch.load(path)
        return env, RewardTable(**saved["train"]), RewardTable(**saved["validation"])
    train = reward_table(env, task.representative("train", train_n), pool, desc="train table")
    validation = reward_table(env, task.representative("validation", validation_n), pool, desc="validation table")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": vars(train), "validation": vars(validation)}, path)
    return env, train, validation


def known_answer_tables():
    return task_tables("known_answer")


def references(env, train, validation) -> dict[str, float]:
    """Validation rewards of the best single train feature and of each class's best train feature."""
    from crl_exp.evaluation.ceiling import group_oracle

    classes_train = [ex_id.split("/")[0] for ex_id in train.example_ids]  # MMLU subject / BBQ category
    classes_val = [ex_id.split("/")[0] for ex_id in validation.example_ids]
    static = float(validation.reward[:, train.best_column()].mean())
    oracle = group_oracle(train, classes_train, validation, classes_val)
    return {"static": static, "group_oracle": oracle["reward"], "unsteered": float(validation.unsteered_reward.mean())}


def main(argv: list[str]) -> None:
    from crl_exp.crl.policy import PolicyConfig
    from crl_exp.crl.ppo import PPOConfig
    from crl_exp.crl.table_training import train_on_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="known_answer")
    parser.add_argument("--confirm", action="store_true",
                        help="only CleanRL's lr and the chosen one, at the chosen epochs/entropy (the BBQ check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.out = args.out or str(HERE / ("learner_sweep" if args.task == "known_answer" else f"learner_sweep_{args.task}"))
    grid_of = ({a: {"lr": (3e-4, PPOConfig.lr), "update_epochs": (PPOConfig.update_epochs,),
                    "ent_coef": (PPOConfig.ent_coef,)} for a in GRID} if args.confirm else GRID)
    env, train, validation = task_tables(args.task)
    refs = references(env, train, validation)
    gap = refs["group_oracle"] - refs["static"]
    policy_cfg = PolicyConfig(obs_norm=True)
    trials = []
    t0 = time.perf_counter()
    for advantage, grid in grid_of.items():
        for lr, epochs, ent in itertools.product(grid["lr"], grid["update_epochs"], grid["ent_coef"]):
            cfg = replace(PPOConfig(), advantage=advantage, lr=lr, update_epochs=epochs, ent_coef=ent)
            finals, curves = [], []
            for seed in SEEDS:
                history = train_on_table(train, policy_cfg, cfg, ITERATIONS, PROMPTS, 1 if advantage == "all_actions"
                                         else GROUP, env.sae.d_sae, seed=seed, evaluate=validation)
                finals.append(history[-1]["greedy_reward"])
                curves.append(history)
            mean = sum(finals) / len(finals)
            trials.append({"advantage": advantage, "lr": lr, "update_epochs": epochs, "ent_coef": ent,
                           "validation_reward": finals, "mean": mean, "gap_recovered": (mean - refs["static"]) / gap,
                           "episodes": curves[0][-1]["episodes"], "curves": curves})
            print(f"{advantage:12s} lr={lr:g} epochs={epochs} ent={ent:g}: {mean:.3f} "
                  f"({(mean - refs['static']) / gap:.0%} of the gap)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    winners = {a: max((t for t in trials if t["advantage"] == a), key=lambda t: t["mean"]) for a in grid_of}
    record = {"command": " ".join([".venv/bin/python", "experiments/learner_sweep.py", *argv]), "commit": commit,
              "seeds": list(SEEDS), "split": "validation", "train_prompts": len(train.example_ids),
              "validation_prompts": len(validation.example_ids), "pool": train.features, "references": refs,
              "budget": {"iterations": ITERATIONS, "prompts_per_iteration": PROMPTS, "group_size": GROUP},
              "seconds": round(time.perf_counter() - t0, 1), "trials": trials}
    Path(args.out + ".json").write_text(json.dumps(record, indent=1))
    lines = [f"# Learner sweep on {args.task} (validation split){' (confirmation of the chosen settings)' if args.confirm else ''}", "",
             f"Command: `{record['command']}` (commit `{commit}`); seeds {list(SEEDS)}; train table "
             f"{len(train.example_ids)} prompts, validation table {len(validation.example_ids)} prompts, the designed "
             f"{len(train.features)}-feature pool; {ITERATIONS} iterations x {PROMPTS} prompts (G = {GROUP} sampled "
             f"episodes per prompt for group/gae; all_actions scores every action). Learner trained on the train "
             f"table (`crl/table_training.py`), greedy reward on the validation table. References (validation): "
             f"unsteered {refs['unsteered']:.3f}, best static feature {refs['static']:.3f}, class oracle "
             f"{refs['group_oracle']:.3f} (each class's best train feature). Sweep time {record['seconds']:.0f} s.", "",
             "| estimator | lr | update epochs | ent coef | validation reward (mean of 3 seeds) | per seed | "
             "gap recovered | training episodes |", "|---|---|---|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: (t["advantage"], -t["mean"])):
        lines.append(f"| {t['advantage']} | {t['lr']:g} | {t['update_epochs']} | {t['ent_coef']:g} | {t['mean']:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in t['validation_reward'])} | {t['gap_recovered']:.0%} | "
                     f"{t['episodes']} |")
    lines += ["", "Winners (highest mean validation reward):", ""]
    lines += [f"- {a}: lr {w['lr']:g}, update epochs {w['update_epochs']}, ent coef {w['ent_coef']:g} -> "
              f"{w['mean']:.3f} ({w['gap_recovered']:.0%} of the static-to-class-oracle gap)" for a, w in winners.items()]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))


if __name__ == "__main__":
    main(sys.argv[1:])
