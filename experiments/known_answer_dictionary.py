"""The known-answer task over the whole dictionary (issue 45's pass marks): run the seeds, record, report.

    .venv/bin/python experiments/known_answer_dictionary.py run --seeds 0 1 2   # resumable: a seed already recorded
                                                                            # on this commit is skipped
    .venv/bin/python experiments/known_answer_dictionary.py report            # the table and the figure

Each seed is one ``python -m crl_exp +experiment=known_answer_dictionary seed=S`` (through ``shared/tools/capped``
when it is there: 18 GiB, 45 minutes), logged to the project's MLflow store. A record per seed
(``experiments/results/known_answer_dictionary_s<S>.json``) keeps the command, commit, wall time, MLflow run id, the
held-out rows, the design's checks and the training curve (estimated reward against model rows). The report
(``known_answer_dictionary.md`` and ``figures/known_answer_dictionary.png``) reads only those records.

Pass marks (issue 45): CRL recovers >= 80% of the static-to-class-optimum reward gap on held-out (dev) prompts and
picks its class's feature (or one at least as good by exact reward) on >= 90% of them, in <= 30 minutes a seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
EXPERIMENT = "known_answer_dictionary"
MLFLOW_EXPERIMENT = "crl-known-answer-dictionary"
TRACKING = f"sqlite:///{ROOT / 'mlflow.db'}"
ROWS = ("none", "random", "random_dictionary", "static", "untrained", "crl", "group_oracle")
LEARNER_PARAMS = ("policy.head", "ppo.advantage", "ppo.screen_top", "budget.group_size", "budget.iterations",
                  "budget.episodes_per_iteration")


def record_path(seed: int, label: str | None = None) -> Path:
    """A pass-mark seed's record, or (``label``) one kept apart: the dev seed that chose settings, an earlier round."""
    return RESULTS / (f"{EXPERIMENT}_{label}_s{seed}.json" if label else f"{EXPERIMENT}_s{seed}.json")


def commit() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from crl_exp.tracking.provenance import git_commit

    return git_commit(ROOT)


def run_seed(seed: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "crl_exp", f"+experiment={EXPERIMENT}", f"seed={seed}",
               "trainer.progress_bar=false", f"logger.tracking_uri={TRACKING}", *extra]
    capped = ROOT.parent / "shared" / "tools" / "capped"
    log = RESULTS / "logs" / f"{EXPERIMENT}_s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    full = [str(capped), "-m", "18", "-t", "45", "-l", str(log), "--", *command] if capped.exists() else command
    code = commit()
    t0 = time.time()
    proc = subprocess.run(full, cwd=ROOT, capture_output=not capped.exists(), text=True)
    wall = time.time() - t0
    keep_tail(log)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {proc.returncode}); see {log}")
    return collect(seed, " ".join(command[1:]), code, wall)


def keep_tail(log: Path, lines: int = 120) -> None:
    """The log without progress-bar redraws, its last ``lines`` lines (what is worth committing)."""
    if log.is_file():
        text = [line for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()
                if line.strip() and "it/s]" not in line and "prompt/s]" not in line and "batch/s]" not in line]
        log.write_text("\n".join(text[-lines:]) + "\n")


def collect(seed: int, command: str, code: str | None, wall: float, label: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(TRACKING)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"params.seed = '{seed}'", order_by=["start_time DESC"],
                              max_results=1)
    if not runs:
        raise SystemExit(f"no MLflow run of seed {seed} in {MLFLOW_EXPERIMENT}")
    run = runs[0]
    m = run.data.metrics
    code = code or run.data.tags.get("git_commit", "unknown")
    if wall != wall and run.info.end_time:  # recorded afterwards: the run's own start-to-end time
        wall = (run.info.end_time - run.info.start_time) / 1000
    design = json.loads(Path(client.download_artifacts(run.info.run_id, "task/known_answer_design.json",
                                                       str(RESULTS))).read_text())
    rows = {name: m.get(f"heldout/{name}/reward") for name in ROWS}
    curve = sorted((s.step, s.value) for s in client.get_metric_history(run.info.run_id, "train/reward_mean"))
    spent = dict(sorted((s.step, s.value) for s in client.get_metric_history(run.info.run_id, "train/episodes")))
    record = {"experiment": EXPERIMENT, "seed": seed, "command": f"python {command}", "commit": code,
              "mlflow_run_id": run.info.run_id, "wall_seconds": wall, "split": "test (dev part)",
              "n_heldout": m.get("heldout/crl/n", m.get("data/heldout_eval_size")),
              "heldout_reward": rows, "heldout_accuracy": {n: m.get(f"heldout/{n}/accuracy") for n in ROWS},
              "gap_recovered": m.get("learner/gap_recovered"), "class_pick_rate": m.get("learner/group_best_pick_rate"),
              "as_good_pick_rate": m.get("learner/as_good_pick_rate"),
              "learner": {k: run.data.params.get(k) for k in LEARNER_PARAMS},
              "model_rows_training": m.get("crl/episodes_training"),
              "training_seconds": m.get("time/training_seconds"),
              "curve": [(spent.get(step), value) for step, value in curve],
              "design": {k: design.get(k) for k in ("class_features", "target_text", "margins",
                                                    "linear_decodability_validation", "dictionary")}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    record["label"] = label
    record_path(seed, label).write_text(json.dumps(record, indent=1))
    return record


def learner_cell(record: dict) -> str:
    """The learner a record ran, in the config's own keys (records from before they were kept: '-')."""
    settings = record.get("learner")
    return "-" if not settings else ", ".join(f"{k}={v}" for k, v in settings.items())


def report() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{EXPERIMENT}_s*.json"))]
    if not records:
        raise SystemExit("no records yet: run `... run --seeds 0 1 2` first")
    kept = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{EXPERIMENT}_*_s*.json"))]
    lines = ["# Known-answer task over the whole dictionary (issue 45)", "",
             "Command per seed: `python -m crl_exp +experiment=known_answer_dictionary seed=S` "
             "(recorded by `experiments/known_answer_dictionary.py`). Split: the dev part of the test split. "
             "Reward = the class's target-set mass; gap = static (best single feature, searched over the dictionary) "
             "to the class optimum (each class's best train feature, `group_oracle`). Class pick: CRL's greedy feature "
             "is its class's best train feature; or as good: or one whose exact validation reward on that class is at "
             "least the best one's. Learner settings per row.", "",
             "| seed | commit | MLflow run | n | none | static | untrained | CRL | class optimum | gap recovered | "
             "class pick | or as good | model rows | minutes | learner |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def cell(x):
        return "-" if x is None else f"{x:.3f}"

    for r in records + kept:
        if r is (kept[0] if kept else None):
            lines.append("| **kept apart** (label: dev = used to choose settings, round1 = the first settings) "
                         "| | | | | | | | | | | | | | |")
        h = r["heldout_reward"]

        lines.append(f"| {r['seed']}{' (' + r['label'] + ')' if r.get('label') else ''} | `{r['commit'][:12]}` | `{r['mlflow_run_id'][:12]}` | {r['n_heldout']} | "
                     f"{cell(h['none'])} | {cell(h['static'])} | {cell(h['untrained'])} | {cell(h['crl'])} | "
                     f"{cell(h['group_oracle'])} | {cell(r['gap_recovered'] if r['gap_recovered'] is None else 100 * r['gap_recovered'])}% | "
                     f"{cell(r['class_pick_rate'])} | {cell(r.get('as_good_pick_rate'))} | "
                     f"{r['model_rows_training']:.0f} | {r['wall_seconds'] / 60:.1f} | {learner_cell(r)} |")
    check = records[0]["design"].get("dictionary") or {}
    lines += ["", f"Design check against every feature on the probes (train): class features rank "
                  f"{check.get('class_feature_rank_in_dictionary')} in the dictionary for their class; class optimum "
                  f"{check.get('class_optimum_over_dictionary_probes', float('nan')):.3f} vs best static "
                  f"{check.get('best_static_over_dictionary_probes', float('nan')):.3f} over all features; the probes' "
                  f"best single feature ({check.get('best_static_feature_probes')}) is among the static candidates "
                  f"tried on validation.", ""]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        xs, ys = zip(*[(x, y) for x, y in r["curve"] if x is not None], strict=True)
        ax.plot(xs, ys, label=f"CRL seed {r['seed']} (train, estimated)")
    h = records[0]["heldout_reward"]
    for name, style in (("static", "--"), ("group_oracle", ":"), ("untrained", "-.")):
        if h.get(name) is not None:
            ax.axhline(h[name], linestyle=style, color="grey", label=f"{name} (held-out, seed {records[0]['seed']})")
    ax.set(xlabel="model rows spent in training", ylabel="reward (class target-set mass)",
           title="Known-answer task over 4,096 features")
    ax.legend(fontsize=7)
    figure = HERE / "figures" / f"{EXPERIMENT}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    lines.append(f"![reward against model rows](figures/{EXPERIMENT}.png)")
    text = "\n".join(lines) + "\n"
    (HERE / f"{EXPERIMENT}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("overrides", nargs="*")
    record = sub.add_parser("record", help="record a finished run of a seed (no rerun)")
    record.add_argument("seed", type=int)
    record.add_argument("--label", default=None, help="file label, e.g. dev (used for a choice) or round1")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.what == "run":
        code = commit()
        for seed in args.seeds:
            path = record_path(seed)
            if path.is_file() and json.loads(path.read_text())["commit"] == code:
                print(f"seed {seed}: recorded on {code[:12]}, skipped")
                continue
            rec = run_seed(seed, args.overrides)
            print(f"seed {seed}: gap recovered {rec['gap_recovered']}, class pick {rec['class_pick_rate']}")
        print(report())
    elif args.what == "record":  # a run made outside ``run`` (e.g. the dev seed): its own commit and wall time
        print(json.dumps(collect(args.seed, "(recorded afterwards)", None, float("nan"), args.label), indent=1)[:2000])
    else:
        print(report())


if __name__ == "__main__":
    main()
