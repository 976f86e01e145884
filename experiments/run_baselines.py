"""Unsteered baselines of the configured model on every task's validation split (issue: benchmarks).

Usage: .venv/bin/python experiments/run_baselines.py [task ...] [hydra overrides for every task, e.g. model=...]
Writes experiments/baselines_<model>.md with metrics, bootstrap 95% CIs, split sizes and timings; every
evaluation is also an MLflow run (experiment "baselines").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from crl_exp.modes.eval import run as run_evaluation
from crl_exp.paths import CONFIG_DIR
from crl_exp.tracking import start_tracked_run
from crl_exp.tracking.provenance import git_commit

# (task, validation-subset size) chosen to fit a CPU budget of a few minutes per task; null = whole split.
PLAN = [("mmlu", 200), ("bbq", 400), ("gsm8k", 48), ("xstest", None), ("harmbench", None)]
HEADLINE = {"mmlu": ["accuracy", "accuracy_macro", "accuracy_constrained", "invalid_rate"],
            "bbq": ["accuracy/ambig", "accuracy/disambig", "accuracy_constrained", "bias_score_disambig",
                    "bias_score_ambig", "invalid_rate", "gold_prob", "letter_mass"],
            "gsm8k": ["exact_match", "invalid_rate"],
            "xstest": ["refusal_rate:string_match/safe", "refusal_rate:string_match/unsafe",
                       "partial_refusal:string_match/safe", "partial_refusal:string_match/unsafe"],
            "harmbench": ["refusal_rate:string_match", "partial_refusal:string_match",
                          "attack_success_rate:string_match"]}
HEADLINE["mmlu"] += ["gold_prob", "letter_mass"]


def main(extra: list[str]) -> None:
    rows = []
    model_name = "model"
    for task, limit in PLAN:
        if TASKS_ONLY and task not in TASKS_ONLY:
            continue
        overrides = ["mode=eval", f"task={task}", "steering=none", "eval.split=validation",
                     f"eval.limit={'null' if limit is None else limit}", "logger.experiment_name=baselines", *extra]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        model_name = cfg.model.name
        t0 = time.perf_counter()
        with start_tracked_run(cfg, run_name=f"baseline-{task}") as tracker:
            result = run_evaluation(cfg, tracker)
            result["run_id"] = tracker.run_id
        result["wall_seconds"] = time.perf_counter() - t0
        rows.append((task, cfg, result))
        write_table(rows, model_name, extra)


def write_table(rows, model_name: str, extra: list[str]) -> None:
    seeds = sorted({(int(c.seed), int(c.task.split_seed)) for _t, c, _r in rows})
    lines = [f"# Unsteered baselines: {model_name}, validation splits", "",
             "Produced by `.venv/bin/python experiments/run_baselines.py " + " ".join(extra) + "` at commit "
             f"`{git_commit()}` (seed, split seed: {seeds}; greedy decoding, string-match refusal judge, 1000-sample "
             "percentile bootstrap 95% CIs; validation subsets are seeded hash subsets of the size shown). "
             "Refusal rates count full refusals only; partial refusals are their own class. MMLU/BBQ `gold_prob` is "
             "the right letter's probability under the full next-token distribution, `letter_mass` the probability "
             "on any option letter. MLflow experiment `baselines`.", "",
             "| task | n evaluated (split sizes train/val/test) | MLflow run | metric | value | 95% CI | "
             "eval / wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for task, _cfg, r in rows:
        sizes = r["split_sizes"]
        size_txt = f"{r['n']} ({sizes['train']}/{sizes['validation']}/{sizes['test']})"
        for i, key in enumerate(HEADLINE[task]):
            lo, hi = r["ci95"].get(key, (float("nan"), float("nan")))
            lines.append(f"| {task} | {size_txt} | `{r['run_id']}` | {key} | "
                         f"{r['metrics'][key]:.3f} | [{lo:.3f}, {hi:.3f}] | "
                         f"{r['speed']['eval_seconds']:.0f} / {r['wall_seconds']:.0f} |" if i == 0 else
                         f"| | | | {key} | {r['metrics'][key]:.3f} | [{lo:.3f}, {hi:.3f}] | |")
    out = Path(__file__).with_name(f"baselines_{model_name}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")


TASKS_ONLY: list[str] = []

if __name__ == "__main__":
    args = sys.argv[1:]
    TASKS_ONLY = [a for a in args if "=" not in a]
    main([a for a in args if "=" in a])
