"""Learning efficiency on the known-answer task: held-out reward against training episodes, per estimator.

For ``gae``, ``group`` (G = 8 sampled episodes per prompt) and ``all_actions`` (every action of each prompt scored
exactly: 33 episodes per prompt), at the PPO defaults chosen by ``experiments/learner_sweep.py``, 3 seeds: the
learner trains on the known-answer train table (``crl.table_training``: the update functions of ``mode=train``,
rewards read off the exact table) and its greedy policy is scored on the dev part of the test split after every
iteration. Reports the episodes each estimator needs to recover 80% of the held-out gap between the best static
feature and the class oracle (both chosen on train), per seed too, with each seed's final entropy and how often
its greedy policy picks each class's oracle feature (premature convergence shows there), and writes a PNG.

Usage: .venv/bin/python benchmarks/learning_efficiency.py [--iterations 40]
Writes benchmarks/results/learning_efficiency_<commit>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

ESTIMATORS = {"gae": 8, "group": 8, "all_actions": 1}  # estimator -> sampled episodes per prompt
SEEDS = (0, 1, 2)


def main(argv: list[str]) -> None:
    from learner_sweep import known_answer_tables

    from crl_exp.crl.policy import PolicyConfig
    from crl_exp.crl.ppo import PPOConfig
    from crl_exp.crl.table_training import train_on_table
    from crl_exp.evaluation.ceiling import group_oracle
    from crl_exp.models.hardware import machine_capability
    from crl_exp.reward_table import reward_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--heldout", type=int, default=200)
    args = parser.parse_args(argv)
    env, train, _ = known_answer_tables()
    examples = env.task.heldout("dev", args.heldout)
    heldout = reward_table(env, examples, train.features, desc="held-out table")
    static = float(heldout.reward[:, train.best_column()].mean())
    oracle = group_oracle(train, [i.split("/")[0] for i in train.example_ids], heldout, [e.group for e in examples])
    target = static + 0.8 * (oracle["reward"] - static)
    results = {}
    for estimator, group in ESTIMATORS.items():
        cfg = replace(PPOConfig(), advantage=estimator)
        curves = [train_on_table(train, PolicyConfig(obs_norm=True), cfg, args.iterations, args.prompts, group,
                                 env.sae.d_sae, seed=s, evaluate=heldout) for s in SEEDS]
        mean = [sum(c[i]["greedy_reward"] for c in curves) / len(curves) for i in range(args.iterations)]
        episodes = [curves[0][i]["episodes"] for i in range(args.iterations)]
        reached = next((e for e, r in zip(episodes, mean, strict=True) if r >= target), None)
        per_class = [{g: sum(c[-1]["greedy_features"][i] == f for i, e in enumerate(examples) if e.group == g)
                      / sum(e.group == g for e in examples) for g, f in oracle["best_feature"].items()} for c in curves]
        results[estimator] = {"episodes": episodes, "mean_heldout_reward": mean,
                              "per_seed": [[row["greedy_reward"] for row in c] for c in curves],
                              "per_seed_episodes_to_80pct_gap": [
                                  next((e for e, row in zip(episodes, c, strict=True) if row["greedy_reward"] >= target),
                                       None) for c in curves],
                              "final_entropy": [c[-1]["entropy"] for c in curves],
                              "final_class_feature_pick_rate": per_class,
                              "episodes_to_80pct_gap": reached, "final": mean[-1]}
        print(f"{estimator:12s} final {mean[-1]:.3f}; 80% of the gap ({target:.3f}) after "
              f"{reached if reached is not None else 'never'} episodes", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = ROOT / "benchmarks" / "results" / f"learning_efficiency_{commit}"
    record = {"command": " ".join([".venv/bin/python", "benchmarks/learning_efficiency.py", *argv]), "commit": commit,
              "machine": machine_capability(),
              "seeds": list(SEEDS), "heldout": {"part": "dev", "n": len(examples)}, "train_prompts": len(train.example_ids),
              "prompts_per_iteration": args.prompts, "static": static, "class_oracle": oracle["reward"],
              "class_features": oracle["best_feature"], "target_80pct": target, "unsteered": float(heldout.unsteered_reward.mean()), "estimators": results}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for estimator, r in results.items():
        ax.plot(r["episodes"], r["mean_heldout_reward"], label=estimator)
    for value, name, style in ((static, "best static", "--"), (oracle["reward"], "class oracle", ":"),
                               (record["unsteered"], "no steering", "-.")):
        ax.axhline(value, color="gray", linestyle=style, label=name)
    ax.set(xscale="log", xlabel="training episodes", ylabel="held-out reward (greedy)",
           title="Known-answer task: learning efficiency (mean of 3 seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out}.json and .png")


if __name__ == "__main__":
    main(sys.argv[1:])
