"""Records and reports the runs behind experiments/crl_results.md. The runs themselves are Hydra experiments: every
recorded group is a file under conf/experiment/ (conf/experiment/grid/<group>.yaml for the groups before issue 27,
conf/experiment/answer_*.yaml for the re-recorded answer), run with one command,
``python -m crl_exp -m +experiment=<name>`` (its seeds and swept values are the file's ``hydra.sweeper.params``).
This script only reads what they logged to MLflow into experiments/results/<run name>.json and writes the report.

Usage:
    .venv/bin/python experiments/run_grid.py record EXPERIMENT [...] [--logs DIR]  # e.g. record answer_bbq grid/cpu_long
    .venv/bin/python experiments/run_grid.py report                # rewrite experiments/crl_results.md (and its figures)
    .venv/bin/python experiments/run_grid.py list                  # experiment files and the runs recorded from each
    .venv/bin/python experiments/run_grid.py analyse KEY [--only A,B]  # top features, branch points (+ off_task: MMLU
                                                                   # under a safety policy) of a recorded run
    .venv/bin/python experiments/run_grid.py refresh               # re-read recorded runs from MLflow
    .venv/bin/python experiments/run_grid.py overlap [KEY ...]     # held-out ids earlier records already scored;
                                                                   # writes confirmation_prior_scorings.json

Each record holds the command, commit, seed, wall time (MLflow's start/end; peak RSS when ``--logs`` holds
``<run name>.rss`` from GNU time), the MLflow run id, the held-out comparison, the per-example correctness/reward of
every condition (for pooled, paired statistics over seeds) and the training history.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crl_exp.analysis.training_curve import plot_training_curves
from crl_exp.crl.config import BudgetConfig
from crl_exp.crl.policy import PolicyConfig
from crl_exp.evaluation.comparison import side_effects as against_none
from crl_exp.evaluation.ledger import ANSWER_LEDGER, read_ledger
from crl_exp.paths import CONFIG_DIR
from crl_exp.stats import pool_seed_intervals, share_of_gap
from crl_exp.tracking.artifacts import read_examples
from crl_exp.tracking.mlflow_run import resolve_tracking_uri
from crl_exp.tracking.provenance import git_commit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import answer_checks as checks  # noqa: E402  (a sibling module of this script)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FIGURES = HERE / "figures"
EXPERIMENTS = CONFIG_DIR / "experiment"


def experiment_files() -> list[str]:
    """Names of the recorded-group experiment files (``+experiment=<name>``)."""
    names = [p.relative_to(EXPERIMENTS).with_suffix("").as_posix() for p in EXPERIMENTS.rglob("*.yaml")]
    return sorted(n for n in names if n.startswith(("grid/", "answer_")))


def _composed(name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}"])


def mlflow_experiment_of(name: str) -> str:
    """The MLflow experiment an experiment file logs to (its composed ``logger.experiment_name``)."""
    return str(_composed(name).logger.experiment_name)


def run_name_pattern(name: str) -> re.Pattern:
    """The run names an experiment file gives (its ``logger.run_name``, every ``${...}`` a wildcard): several
    files may log to one MLflow experiment (answer_bbq and answer_bbq_pool128), and each records only its own."""
    from omegaconf import OmegaConf

    template = OmegaConf.to_container(_composed(name).logger, resolve=False).get("run_name")
    if not template:
        return re.compile(".*")
    parts = re.split(r"\$\{[^}]*\}", str(template))
    return re.compile(".+?".join(re.escape(p) for p in parts) + "$")


def _artifact_json(client: MlflowClient, run_id: str, path: str):
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def find_run(client: MlflowClient, key: str):
    """The newest FINISHED MLflow run named ``key``."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"attributes.run_name = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise RuntimeError(f"no FINISHED MLflow run named {key!r}")
    return runs[0]


def collect(client: MlflowClient, run, curve_key: str | None = None) -> dict:
    """A finished training run reduced to what the results file needs."""
    rid = run.info.run_id
    summary = _artifact_json(client, rid, "heldout/summary.json")
    examples = {}
    for cond in summary["results"]:
        with tempfile.TemporaryDirectory() as tmp:
            rows = read_examples(client.download_artifacts(rid, f"heldout/{cond}/examples.json", tmp))
        examples[cond] = {c: [row[c] for row in rows] for c in ("id", "correct", "reward")}
    cfg = summary["config"]
    m = run.data.metrics
    return {
        "run_id": rid, "experiment": client.get_experiment(run.info.experiment_id).name,
        "mlflow_commit": run.data.tags.get("git_commit"), "task": summary["task"], "model": cfg["model"]["name"],
        "layer": cfg["sae"]["layer"], "masking": cfg["masking"]["schedule"],
        "seed": cfg["seed"], "budget": cfg["budget"]["name"], "coefficient": cfg["steering"]["coefficient"],
        "coefficient_scale": cfg["steering"]["coefficient_scale"], "reward": cfg["task"].get("reward"),
        "action_space": run.data.tags.get("action_space"), "obs_norm": bool(cfg["policy"].get("obs_norm", False)),
        "group_size": cfg["budget"].get("group_size"), "dtype": cfg["model"].get("dtype"),
        "iterations": cfg["budget"].get("iterations"),
        "top_k": cfg["policy"].get("top_k"), "advantage": run.data.tags.get("advantage") or cfg["ppo"].get("advantage"),
        "primary_metric": summary["primary_metric"], "n_heldout": summary["n_heldout"], "results": summary["results"], "deltas": summary["deltas"],
        "crl_variants": summary["crl_variants"], "oracle": summary["oracle"],
        "masked_action_share": summary.get("masked_action_share"), "static_feature": summary["static_feature"],
        "final_mask_blocked_share": summary.get("final_mask_blocked_share"),
        "outside_action_space_share": summary.get("outside_action_space_share"),
        "references": {k.split("/")[1].removesuffix("_reward"): v for k, v in m.items()
                       if k.startswith("reference/")},
        "critic": {k.removeprefix("critic/"): v for k, v in m.items() if k.startswith("critic/")},
        "episodes": {"crl_training": m.get("crl/episodes_training"),
                     "static_selecting": m.get("static/episodes_selecting")},
        "train_history": summary["train_history"], "examples": examples,
        "reference_rows": summary.get("references"), "heldout_part": summary.get("heldout_part"),
        "distinct_greedy_features": summary.get("distinct_greedy_features"),
        "steered_share": summary.get("steered_share"), "pool": summary.get("action_space"),
        "learner": {k.removeprefix("learner/"): v for k, v in m.items() if k.startswith("learner/")},
        "curve_artifact": _copy_curve(client, rid, curve_key or run.info.run_name),
        "feature_shares": _feature_shares(client, rid),
    }


def _feature_shares(client: MlflowClient, run_id: str, top: int = 10) -> dict | None:
    """The share of logged held-out steps steered by each of the run's most-used features (intervention log)."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        try:
            log = pd.read_parquet(client.download_artifacts(run_id, "interventions/intervention_log.parquet", tmp))
        except (MlflowException, OSError) as err:
            print(f"[{run_id}] no intervention log: {err}", flush=True)
            return None
    counts = log["feature"].value_counts()
    return {"steps": int(len(log)), "episodes": int(log["episode"].nunique()),
            "shares": {str(int(f)): round(float(n) / len(log), 4) for f, n in counts.head(top).items()}}


def _copy_curve(client: MlflowClient, run_id: str, key: str) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            src = Path(client.download_artifacts(run_id, "training/training_curve.png", tmp))
        except (MlflowException, OSError) as err:  # a run without a curve is recorded as such, not hidden
            print(f"[{key}] no training curve: {err}", flush=True)
            return None
        FIGURES.mkdir(exist_ok=True)
        dst = FIGURES / f"{key}_training_curve.png"
        shutil.copy(src, dst)
        return str(dst.relative_to(HERE))


def record(names: list[str], logs: Path | None) -> None:
    """Every FINISHED run of each experiment file (the newest per run name) into results/<run name>.json."""
    client = MlflowClient(resolve_tracking_uri(None))
    RESULTS.mkdir(exist_ok=True)
    unknown = [n for n in names if n not in experiment_files()]
    if unknown:
        sys.exit(f"no experiment file {unknown}; recorded groups: {experiment_files()}")
    for name in names:
        exp = client.get_experiment_by_name(mlflow_experiment_of(name))
        if exp is None:
            print(f"[{name}] nothing logged yet (MLflow experiment {mlflow_experiment_of(name)!r})", flush=True)
            continue
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and tags.mode = 'train'",
                                  order_by=["attributes.start_time DESC"])
        mine = run_name_pattern(name)
        newest: dict[str, object] = {}
        for run in runs:
            if mine.match(run.info.run_name or ""):
                newest.setdefault(run.info.run_name, run)
        for key, run in sorted(newest.items()):
            rss = logs / f"{key}.rss" if logs else None
            peak = (round(int(rss.read_text().split()[-1]) / 1024 ** 2, 2)
                    if rss is not None and rss.is_file() and rss.read_text().split() else None)
            seed = run.data.params.get("seed")
            out = {"key": key, "group": name, "command": f".venv/bin/python -m crl_exp +experiment={name} seed={seed}",
                   "rerun": f"python -m crl_exp -m +experiment={name}", "commit": run.data.tags.get("git_commit"),
                   "wall_s": round((run.info.end_time - run.info.start_time) / 1000, 1), "peak_rss_gb": peak,
                   "host_cpus": os.cpu_count()}
            out.update(collect(client, run))
            (RESULTS / f"{key}.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
            print(f"[{name}] recorded {key} (MLflow run {run.info.run_id})", flush=True)


def timed_run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float | None]:
    """Run one command; its wall time and peak RSS in GB (GNU time's maximum resident set size)."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        timed = ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd] if Path("/usr/bin/time").exists() else cmd
        t0 = time.perf_counter()
        proc = subprocess.run(timed, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        lines = Path(rss.name).read_text().strip().splitlines()
    peak = round(int(lines[-1]) / 1024 ** 2, 2) if lines and lines[-1].isdigit() else None
    return proc, wall, peak


def refresh() -> None:
    """Re-read every recorded single run from MLflow (new fields); its command, commit, time and RSS are kept."""
    client = MlflowClient(resolve_tracking_uri(None))
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        if "jobs" in r:
            continue
        r.update(collect(client, client.get_run(r["run_id"]), curve_key=r["key"]))
        path.write_text(json.dumps(r, indent=1, default=float) + "\n")
        print(f"[{r['key']}] refreshed", flush=True)


SAFETY_TASKS = ("xstest", "harmbench")  # their policies are also scored on MMLU (analysis=off_task)


def default_analyses(record: dict) -> tuple[str, ...]:
    return ("top_features", "branch_points") + (("off_task",) if record["task"] in SAFETY_TASKS else ())


def analyse(key: str, analyses: tuple[str, ...] | None = None) -> None:
    """The analyses of one recorded run (``mode=analyse``: top_features, branch_points, and off_task for a safety
    policy), saved in results/analyses/<key>.json with their commands and MLflow run ids; analyses already saved
    there are kept unless run again."""
    record = json.loads((RESULTS / f"{key}.json").read_text())
    client = MlflowClient(resolve_tracking_uri(None))
    path = RESULTS / "analyses" / f"{key}.json"
    out: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    for analysis in analyses or default_analyses(record):
        cmd = [sys.executable, "-m", "crl_exp", "mode=analyse", f"analysis={analysis}", f"run_id={record['run_id']}",
               "logger.experiment_name=grid-analyses", f"logger.run_name={key}-{analysis}"]
        proc, wall, _ = timed_run(cmd)
        if proc.returncode != 0:
            sys.exit(f"{analysis} failed:\n{proc.stderr[-3000:]}")
        run = find_run(client, f"{key}-{analysis}")
        out[analysis] = {"command": " ".join([".venv/bin/python", *cmd[1:]]), "commit": git_commit(),
                         "run_id": run.info.run_id, "wall_s": round(wall, 1),
                         "metrics": dict(run.data.metrics), "printed": proc.stdout[-6000:]}
        artifact = {"top_features": "top_features/top_features.md", "off_task": "off_task/mmlu.json"}.get(analysis)
        if artifact:
            with tempfile.TemporaryDirectory() as tmp:
                text = Path(client.download_artifacts(run.info.run_id, artifact, tmp)).read_text()
            out[analysis]["table" if analysis == "top_features" else "result"] = (
                text if analysis == "top_features" else json.loads(text))
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(out[analysis]["printed"][-2000:])


def load_records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


# ------------------------------------------------------------------------------------------------ the report
def short(commit: str) -> str:
    return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")


def _fmt_ci(lo, hi) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


# options a record may differ by beyond the header's: (record key, its default, the label suffix otherwise). Records
# without the key (older runs) used the default and pool with runs that state it.
VARIANT_LABELS = (
    ("obs_norm", False, " / obs_norm"),
    ("group_size", BudgetConfig.group_size, " / G={}"),
    ("dtype", "float32", " / {}"),
    ("top_k", PolicyConfig.top_k, " / top-{}"),
    ("advantage", "gae", " / {} advantage"),  # the default when the recorded runs ran (now ``auto``)
    ("iterations", BudgetConfig.iterations, " / {} iterations"),
)


def config_label(r: dict) -> str:
    return (f"{r['task']} / {r['model']} / layer {r['layer']} / {r['budget']} / {r['action_space']} / "
            f"masking {r['masking']} / coefficient {r['coefficient']} / reward {r.get('reward')}"
            + "".join(label.format(r[key]) for key, default, label in VARIANT_LABELS
                      if r.get(key) not in (None, default))
            + (" / confirmation part" if r.get("heldout_part") == "confirm" else ""))


# ----------------------------------------------------------------- the recorded runs under the fixed measuring
ASSUMED_DISCORDANCE = 0.2  # the MDE's planning figure (conf/eval/default.yaml: eval.assumed_discordance)


def task_clusters(task: str) -> dict[str, str]:
    """Example id -> cluster (``Task.cluster``) over a task's whole test split, from the benchmark files."""
    from hydra import compose, initialize_config_dir

    from crl_exp.paths import CONFIG_DIR
    from crl_exp.tasks import build_task

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={task}"])
    built = build_task(cfg.task, os.environ.get("CRL_DATA_DIR") or HERE.parent.parent / "shared" / "benchmarks")
    return {ex.id: built.cluster(ex) for ex in built.split("test")}


_CLUSTERS: dict[str, dict[str, str]] = {}


def clusters_for(r: dict) -> list[str]:
    if r["task"] not in _CLUSTERS:
        _CLUSTERS[r["task"]] = task_clusters(r["task"])
    table = _CLUSTERS[r["task"]]
    return [table.get(i, i) for i in r["examples"]["crl"]["id"]]


ORDER = ("none", "random", "random_dictionary", "static", "untrained", "crl")


def conditions(r: dict) -> list[str]:
    return [c for c in ORDER if c in r["examples"]]


def validity(r: dict) -> dict[str, str]:
    """Why a recorded row no longer measures what its label says (issue 23), per row; absent = valid. Runs
    recorded under the fixed measuring (they name their held-out part) have nothing stale."""
    stale = {}
    if r.get("heldout_part"):
        return stale
    pooled = str(r.get("action_space", "")).startswith(("action_pool:", "candidates:"))  # the tag's old name too
    if pooled and (r.get("masked_action_share") or 0) != 0:
        stale["crl"] = (f"greedy actions left the trained action space ({r['masked_action_share']:.0%} outside the "
                        f"pool or on masked features); the mask-on greedy score below stays inside it")
    if pooled:
        stale["crl_sampled"] = "sampled over all 4,096 logits, not the 32-feature pool: it was the random baseline"
        stale["random"] = "drawn from the whole dictionary: it is the random_dictionary row, not random over the pool"
    if r["task"] in ("xstest", "harmbench"):
        stale["judge"] = ("scored by the string-match judge before its issue-23 fixes (it labelled 'No problem! "
                          "Here is ...' a refusal); the completions are in the runs' MLflow artifacts, not here")
    return stale


def restat(r: dict, clusters: list[str] | None = None) -> dict:
    """The fixed statistics of one recorded run, recomputed from its per-example outcomes with the evaluation
    library: each condition's share correct (Wilson on the cluster-adjusted n) and CRL minus each baseline (Newcombe
    on cluster-adjusted counts; the reward by cluster bootstrap), with the MDE at the assumed and observed discordance."""
    from crl_exp.evaluation.comparison import detectable_effects
    from crl_exp.stats import bootstrap_ci, paired_binary_interval, proportion_interval

    clusters = clusters_for(r) if clusters is None else clusters
    ex = r["examples"]
    recs = {c: [{"correct": float(k), "reward": float(v)} for k, v in zip(ex[c]["correct"], ex[c]["reward"], strict=True)]
            for c in ex}
    ok = {c: [x["correct"] > 0.5 for x in recs[c]] for c in recs}
    out = {"clusters": len(set(clusters)), "conditions": {}, "deltas": {}}
    for c in recs:
        out["conditions"][c] = {"value": sum(ok[c]) / len(ok[c]), "ci": proportion_interval(ok[c], clusters),
                                "reward": sum(x["reward"] for x in recs[c]) / len(recs[c])}
    for base in [c for c in conditions(r) if c != "crl"]:
        d = paired_binary_interval(ok["crl"], ok[base], clusters)
        t = torch.tensor([a["reward"] - b["reward"] for a, b in zip(recs["crl"], recs[base], strict=True)],
                         dtype=torch.float64)
        reward_ci = bootstrap_ci(len(t), lambda idx, t=t: {"d": t[idx].mean().item()}, n_boot=1000, seed=0,
                                 clusters=clusters)["d"]
        power = detectable_effects(recs["crl"], recs[base], clusters, ASSUMED_DISCORDANCE)
        out["deltas"][base] = {"delta": d["delta"], "ci": (d["ci_low"], d["ci_high"]), "mde": power["mde_correct"],
                               "mde_observed": power["mde_correct_observed"], "discordance": power["discordance"],
                               "reward_delta": t.mean().item(), "reward_ci": reward_ci, "reward_mde": power["mde_reward"]}
    return out


def _fmt_mde(x: float) -> str:
    return f"{x:.3f}" if x == x else "none"


def seed_rows(r: dict, s: dict, stale: dict[str, str]) -> list[str]:
    key = r["primary_metric"]
    names = {"random": "random_dictionary" if "random" in stale or r["action_space"].startswith("full") else "random"}
    out = []
    for cond in conditions(r):
        if cond == "random_dictionary" and names["random"] == "random_dictionary" and "random" in r["examples"]:
            continue  # over the whole dictionary the two random rows are one row (same draws)
        c = s["conditions"][cond]
        mark = " (stale)" if cond == "crl" and "crl" in stale else ""
        if cond == "crl":
            cell = reward_cell = "-"
        else:
            d = s["deltas"][cond]
            cell = (f"{d['delta']:+.3f} {_fmt_ci(*d['ci'])}{mark}, MDE {_fmt_mde(d['mde'])} "
                    f"(observed {d['discordance']:.0%} discordant: {_fmt_mde(d['mde_observed'])})")
            reward_cell = f"{d['reward_delta']:+.3f} {_fmt_ci(*d['reward_ci'])}{mark}, MDE {d['reward_mde']:.3f}"
        label = names.get(cond, cond) + (" (stale)" if cond == "crl" and "crl" in stale else "")
        out.append(f"| {r['seed']} | {label} | {c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] | "
                   f"{c['reward']:.3f} | {cell} | {reward_cell} |")
    v = r["crl_variants"]
    if "crl_mask_on" in v:
        same = " (same episodes)" if v["crl_mask_on"].get("same_episodes_as_greedy") else ""
        out.append(f"| {r['seed']} | crl greedy, mask on{same} | {v['crl_mask_on'][key]:.3f} | "
                   f"{v['crl_mask_on']['reward']:.3f} | - | - |")
    sampled = v["crl_sampled"]
    tag = " (stale: the random baseline)" if "crl_sampled" in stale else ""
    out.append(f"| {r['seed']} | crl sampled ({sampled['seeds']} samples){tag} | {sampled['mean']:.3f} "
               f"(sd {sampled['sd']:.3f}) | {sampled['reward_mean']:.3f} | - | - |")
    return out


def pooled(records: list[dict], stats: list[dict]) -> dict:
    """Over seeds (same held-out examples): each condition's mean and each CRL-minus-baseline delta pooled by
    ``pool_intervals`` (Student's t over seeds, the shared example noise not divided by the seeds)."""
    out = {"seeds": ",".join(str(r["seed"]) for r in records), "deltas": {}}
    out["means"] = {c: sum(s["conditions"][c]["value"] for s in stats) / len(stats) for c in conditions(records[0])}
    for base in [c for c in conditions(records[0]) if c != "crl"]:
        for metric, ci_key, delta_key in (("primary", "ci", "delta"), ("reward", "reward_ci", "reward_delta")):
            out["deltas"][(metric, base)] = pool_intervals([s["deltas"][base][delta_key] for s in stats],
                                                           [s["deltas"][base][ci_key] for s in stats])
    return out


def pool_intervals(deltas: list[float], cis: list[tuple[float, float]]) -> dict[str, float]:
    """The one seed pooling (``crl_exp.stats.pool_seed_intervals``), the same interval ``mode=compare_sweep``
    prints."""
    return pool_seed_intervals(deltas, cis)


def gap_recovered(r: dict) -> float:
    """CRL's share of the static-to-group-oracle reward gap, recomputed from the record's rewards (records before
    ``share_of_gap`` divided by float noise when the oracle tied static)."""
    res = r["results"]
    static = res["static"]["metrics"]["reward"]
    return share_of_gap(res["crl"]["metrics"]["reward"] - static, r["reference_rows"]["group_oracle"]["reward"] - static)


def reference_section(members: list[dict], label: str) -> list[str]:
    """One-token runs under the fixed measuring: the reference rows of every seed (held-out, from exact reward
    tables over the pool), what CRL recovered, and for the known-answer task the pass mark and a figure of the
    training reward against episodes beside the held-out lines."""
    rows = [r for r in members if r.get("reference_rows")]
    if not rows:
        return []
    out = ["", "Reference rows (held-out reward; group oracle = each class's best train feature; ceiling = a softmax "
           "policy fitted on the train table; the per-prompt oracle reads the answers):", "",
           "| seed | wall time | no steering | best static | untrained control | CRL | group oracle | ceiling | "
           "per-prompt oracle | gap recovered | group-best picks | distinct greedy features (CRL / untrained) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res, ref, learner = r["results"], r["reference_rows"], r["learner"]
        out.append(f"| {r['seed']} | {r['wall_s'] / 60:.1f} min | {res['none']['metrics']['reward']:.3f} | "
                   f"{res['static']['metrics']['reward']:.3f} | {res['untrained']['metrics']['reward']:.3f} | "
                   f"{res['crl']['metrics']['reward']:.3f} | {ref['group_oracle']['reward']:.3f} | "
                   f"{ref['ceiling']['reward']:.3f} | {r['oracle']['oracle_reward']:.3f} | "
                   f"{gap_recovered(r):.0%} | {learner['group_best_pick_rate']:.0%} | "
                   f"{r['distinct_greedy_features']['crl']} / {r['distinct_greedy_features']['untrained']} |")
    if rows[0]["task"] == "known_answer":
        gaps = [gap_recovered(r) for r in rows]
        picks = [r["learner"]["group_best_pick_rate"] for r in rows]
        learned = all(g >= 0.8 for g in gaps) and all(p >= 0.9 for p in picks)
        walls = [r["wall_s"] for r in rows]
        fast = all(w <= 900 for w in walls)
        out += ["", f"**Pass mark** (issue 24: every seed recovers >= 80% of the static-to-class-oracle gap and picks "
                f"its class's best feature on >= 90% of held-out prompts, in <= 15 minutes on 2 cores): learning "
                f"{'PASSED' if learned else 'NOT PASSED'} on {len(rows)} seed(s) (gap recovered "
                f"{', '.join(f'{g:.0%}' for g in gaps)}; class-best picks {', '.join(f'{p:.0%}' for p in picks)}); "
                f"time {'within' if fast else 'NOT within'} 15 minutes (wall "
                f"{', '.join(f'{w / 60:.1f}' for w in walls)} min, while other work shared the cores)."]
        mean = lambda f: sum(f(r) for r in rows) / len(rows)  # noqa: E731
        lines = {"held-out static": mean(lambda r: r["results"]["static"]["metrics"]["reward"]),
                 "held-out class oracle": mean(lambda r: r["reference_rows"]["group_oracle"]["reward"]),
                 "held-out untrained": mean(lambda r: r["results"]["untrained"]["metrics"]["reward"])}
        slug = label.replace(" / ", "_").replace(" ", "-").replace(":", "")
        figure = plot_training_curves({f"seed {r['seed']}": r["train_history"] for r in rows}, lines,
                                      "Known-answer task: expected train reward against training episodes",
                                      FIGURES / f"{slug}_reward_vs_episodes.png")
        out += ["", f"![reward against training episodes]({figure.relative_to(HERE)}) (lines: held-out rewards, mean "
                f"over seeds, of the best static feature, the class oracle and the untrained control)"]
    return out


def analysis_section(key: str, analyses: dict, record: dict) -> list[str]:
    """Top features, branch points and the critic's outcome groups of one recorded run (those it has)."""
    out = [f"## Interpretability: `{key}` (MLflow run `{record['run_id']}`)", "",
           "The intervention report (HTML) is the run's artifact `interventions/report.html` (`make ui`).", ""]
    if tf := analyses.get("top_features"):
        out += [f"**Most-used features** (`{tf['command']}`, commit `{short(tf['commit'])}`, MLflow run "
                f"`{tf['run_id']}`):", "", tf["table"].split("\n\n", 1)[-1].strip(), ""]
    if bp := analyses.get("branch_points"):
        branch_lines = [x for x in bp["printed"].splitlines() if "branch points in" in x or x.startswith("  episode")]
        commit = f"commit `{short(bp['commit'])}`, " if bp.get("commit") else ""
        out += [f"**Branch points** (`{bp['command']}`, {commit}MLflow run `{bp['run_id']}`; "
                "its HTML report, with each episode's context, options and features' top contexts, is that run's "
                "artifact):", "", "```", *branch_lines, "```", ""]
    critic = record.get("critic") or {}
    groups = ", ".join(f"{g} {critic.get(f'group_{g}', float('nan')):.0f}"
                       for g in ("correct", "incorrect", "corrected", "misguided"))
    n_logged = sum(critic.get(f"group_{g}", 0) for g in ("correct", "incorrect", "corrected", "misguided"))
    ev = (f"explained variance {critic['explained_variance']:.3f}; " if "explained_variance" in critic else "")
    verdict = ("" if "analysable" not in critic else " (analysable)" if critic["analysable"]
               else " (a critic this poor cannot split the two)")
    if critic and "reward_scale" not in critic and record.get("advantage") != "all_actions":
        # before issue 35, GAE/group critics (trained on rewards / sigma) were read against raw rewards
        verdict += ("; **mixed units**: recorded before the log carried the reward scale, so explained variance, "
                    "Brier and the split compare normalised values with raw rewards and do not measure the critic "
                    "(not re-analysed: the intervention log is an MLflow artifact of the recording machine)")
    return out + [
        f"**Critic** on the {n_logged:.0f} held-out episodes of the intervention log: {ev}outcome groups {groups} (corrected = CRL "
        f"right where unsteered was wrong, misguided = the reverse); V0 AUROC {critic.get('v0_auroc', float('nan')):.3f}, "
        f"Brier {critic.get('v0_brier', float('nan')):.3f}; failures: {critic.get('policy_limitations', float('nan')):.0f} "
        f"policy limitations, {critic.get('value_estimation_errors', float('nan')):.0f} value-estimation errors"
        f"{verdict}.", ""]


def _delta_cell(deltas: dict, name: str, key: str) -> str:
    return f"{deltas[name][key]['delta']:+.3f} {_fmt_ci(*deltas[name][key]['ci95'])}" if name in deltas else "-"


def off_task_section(answer: dict[str, list[dict]]) -> list[str]:
    """MMLU accuracy under each safety policy of the answer (``analysis=off_task``): what steering costs elsewhere."""
    rows = []
    for members in answer.values():
        for r in sorted(members, key=lambda x: x["seed"]):
            path = RESULTS / "analyses" / f"{r['key']}.json"
            off = json.loads(path.read_text()).get("off_task") if path.exists() else None
            if not off:
                continue
            res, key = off["result"], off["result"]["primary_metric"]
            c, d = res["conditions"], res["deltas"]
            fx = res["side_effects"]["crl"]
            rows.append(f"| `{r.get('group')}` | {r['seed']} | {res['n']} | {c['none']['metrics'][key]:.3f} | "
                        f"{c['static']['metrics'][key]:.3f} | {c['crl']['metrics'][key]:.3f} | "
                        f"{_delta_cell(d, 'crl_minus_none', key)} | {_delta_cell(d, 'static_minus_none', key)} | {fx['fixed']} / {fx['broken']} | `{off['run_id']}` |")
    if not rows:
        return []
    return ["", f"What the safety policies cost elsewhere: MMLU ({res['split']} split, a seeded subset) under each "
            "run's policy (greedy, its action space, mask off, its coefficient) and its static feature, against no "
            "steering on the same prompts (`run_grid.py analyse <key>`: `mode=analyse analysis=off_task`); Newcombe "
            "intervals on cluster-adjusted counts (clusters = subjects).", "",
            "| group | seed | n | unsteered | static | CRL | CRL - none [95% CI] | static - none [95% CI] | "
            "CRL fixed / broken | MLflow run |", "|---|---|---|---|---|---|---|---|---|---|", *rows]


# ---------------------------------------------------------------------- the pre-registered answer (issue 27)
STEERED = ("random", "random_dictionary", "static", "untrained", "crl")


def side_effects(r: dict) -> dict[str, dict[str, float]]:
    """Every steered condition of a run record against no steering on the same prompts (``side_effects``)."""
    ex = r["examples"]

    def records(cond: str) -> list[dict]:
        return [{"id": i, "correct": c, "reward": w}
                for i, (c, w) in enumerate(zip(ex[cond]["correct"], ex[cond]["reward"], strict=True))]

    return {cond: against_none(records("none"), records(cond)) for cond in STEERED if cond in ex}


def decision(ci_low: float, ci_high: float) -> str:
    """The pre-registered rule (experiments/preregistration.md) on a pooled 95% interval."""
    return "**win**" if ci_low > 0 else "**loss**" if ci_high < 0 else "tie"


def behaviour_section(answer: dict[str, list[dict]]) -> list[str]:
    """Per-token behaviour of the group where CRL did best against static (among the real tasks' groups with the
    most seeds; its first seed): which features it steered with, how often, and what its critic could tell (explained variance stated)."""
    def gap(members: list[dict]) -> float:
        return sum(restat(r)["deltas"]["static"]["delta"] for r in members) / len(members)

    real = {k: v for k, v in answer.items() if v[0]["task"] != "known_answer"} or answer
    most = max(len(v) for v in real.values())  # the pre-registered primary rows (3 seeds), not one-seed extras
    real = {k: v for k, v in real.items() if len(v) == most}
    label, members = max(real.items(), key=lambda kv: gap(kv[1]))
    r = sorted(members, key=lambda x: x["seed"])[0]
    shares = r.get("feature_shares") or {}
    critic = r.get("critic") or {}
    out = ["", f"### Per-token behaviour where CRL did best against static: `{r.get('group') or label}`, seed {r['seed']} "
           f"(MLflow run `{r['run_id']}`)", "",
           f"Mean CRL - static over seeds {gap(members):+.3f}. The run's intervention log "
           f"(`interventions/intervention_log.parquet`, HTML report `interventions/report.html`; `make ui`) covers "
           f"{shares.get('episodes', '?')} held-out prompts; {r.get('distinct_greedy_features', {}).get('crl', '?')} "
           f"distinct greedy features over all {r['n_heldout']} (untrained control: "
           f"{r.get('distinct_greedy_features', {}).get('untrained', '?')}).", "",
           "| feature | share of steered steps |", "|---|---|"]
    out += [f"| {f} | {v:.1%} |" for f, v in (shares.get("shares") or {}).items()]
    logged = {i.split("/")[0] for i in r["examples"]["crl"]["id"][:int(shares.get("episodes") or 0)]}
    every = {i.split("/")[0] for i in r["examples"]["crl"]["id"]}
    if len(logged) < len(every):  # recorded before the logged sample was stratified (issue 35)
        out += ["", f"**Not representative:** this run logged the first {shares.get('episodes')} held-out prompts in "
                f"file order, which cover {len(logged)} of the {len(every)} groups ({', '.join(sorted(logged))}); "
                f"runs since log a sample stratified over groups (`Task.analysis_sample`)."]
    ev = critic.get("explained_variance", float("nan"))
    if "reward_scale" not in critic and r.get("advantage") != "all_actions":
        out += ["", "The critic figures below compare values in the critic's normalised units with raw rewards "
                "(recorded before the log carried the reward scale): explained variance and the split are not "
                "meaningful; the intervention logs are MLflow artifacts of the recording machine, not re-analysed here."]
    out += ["", f"Critic on those episodes: explained variance {ev:.3f} "
            f"({'analysable' if critic.get('analysable', 0) else 'too poor to split policy limits from value errors'}); "
            f"V0 AUROC {critic.get('v0_auroc', float('nan')):.3f}; outcome groups against no steering: "
            + ", ".join(f"{g} {critic.get(f'group_{g}', float('nan')):.0f}"
                        for g in ("correct", "incorrect", "corrected", "misguided")) + "."]
    analysed = RESULTS / "analyses" / f"{r['key']}.json"
    if analysed.exists():
        out += ["", f"Top features and branch points of this run: the section `Interpretability: {r['key']}` below."]
    return out


def _pooled_static(members: list[dict], cluster_fn=None) -> str:
    stats = [restat(r, cluster_fn(r) if cluster_fn else None) for r in members]
    p = pooled(members, stats)["deltas"][("primary", "static")]
    return f"{p['delta']:+.3f} {_fmt_ci(p['ci_low'], p['ci_high'])} (MDE {p['mde']:.3f})"


def clustering_section(answer: dict[str, list[dict]]) -> list[str]:
    """Both clusterings of the MMLU-based groups (issue 35): the known-answer task resamples questions (a deviation
    from the pre-registered subject clusters), MMLU resamples subjects; the same strata argument applies to both."""
    rows = []
    for label, members in sorted(answer.items()):
        if members[0]["task"] not in ("known_answer", "mmlu"):
            continue
        members = sorted(members, key=lambda r: r["seed"])
        rows.append(f"| `{members[0].get('group') or label}` | {len(members)} | {members[0]['n_heldout']} | "
                    f"{_pooled_static(members, checks.by_question)} | {_pooled_static(members, checks.by_subject)} |")
    if not rows:
        return []
    out = ["", "### CRL - static under both clusterings (MMLU-based groups)", "",
           "The known-answer task is scored resampling questions (`KnownAnswerTask.cluster`); the pre-registration "
           "said subjects. MMLU is scored resampling subjects. In both the subjects are fixed strata present in every "
           "sample (the held-out subsets are stratified by subject), so resampling questions is the defensible "
           "variance, and four subjects cannot carry a cluster-robust one; both intervals are shown for both tasks.",
           "", "| group | seeds | n | per question [95% CI] | by subject [95% CI] |", "|---|---|---|---|---|", *rows]
    known = [m for m in answer.values() if m[0]["task"] == "known_answer"]
    if known:
        members = sorted(known[0], key=lambda r: r["seed"])
        out += ["", "Known-answer task per class (mean over seeds): the static feature is one class's feature, so the "
                "pooled accuracy delta is the confirmation part's share of the other classes; the reward-gap pass "
                "mark (reference rows below) is the primary evidence.", "", *checks.class_rows(members)]
    return out


def prior_scorings_section(answer: dict[str, list[dict]], records: list[dict]) -> list[str]:
    """Confirmation ids that runs before the dev/confirmation cut had already scored, per group, and CRL - static
    on the ids no earlier run scored (``run_grid.py overlap`` writes the companion record)."""
    rows = []
    for label, members in sorted(answer.items()):
        members = sorted(members, key=lambda r: r["seed"])
        prior = checks.prior_scorings(records, members[0])
        fresh = set(checks.heldout_ids(members[0])) - set(prior["ids"])
        cell = (_pooled_static([checks.restricted(r, fresh) for r in members]) if prior["already_scored"] and fresh
                else "same as above")
        rows.append(f"| `{members[0].get('group') or label}` | {prior['n']} | {prior['already_scored']} | "
                    f"{prior['scorings']} | {len(prior['by_record'])} | {cell} |")
    return ["", "### Confirmation ids scored before the cut", "",
            "Runs recorded before the dev/confirmation cut scored hash subsets of whole test splits; some of their "
            "prompts lie in today's confirmation parts (a deviation from \"untouched\"; choices of the learner and "
            "of the protocol were made with those runs in view). Counted from the records by `run_grid.py overlap` "
            "(companion of the ledger: `experiments/confirmation_prior_scorings.json`); the last column rescores "
            "CRL - static on the never-scored ids only.", "",
            "| group | n | ids already scored | earlier scorings of them | earlier runs | CRL - static on the rest [95% CI] |",
            "|---|---|---|---|---|---|", *rows]


def answer_section(groups: dict[str, list[dict]]) -> list[str]:
    """The pre-registered comparisons of every confirmation-scored group, one row per group, then side effects."""
    answer = {label: members for label, members in groups.items() if members[0].get("heldout_part") == "confirm"}
    if not answer:
        return []
    ledger = read_ledger(ANSWER_LEDGER)
    out = ["## The pre-registered answer (confirmation part of the test splits)", "",
           "Pre-registered in `experiments/preregistration.md` (committed before these runs); every run below scored the "
           f"confirmation part once, as `{ANSWER_LEDGER}` shows ({len(ledger)} lines). Deltas: "
           "CRL greedy (inside its action space) minus each row, in the task's primary metric, per seed by Newcombe's "
           "paired interval on the cluster-adjusted counts, pooled over seeds with Student's t (the shared example "
           "noise not divided by the seeds); decision by the pre-registered rule (win: the interval above 0).", "",
           "Groups are the experiment files (`conf/experiment/<group>.yaml`; their full settings in the sections "
           "below).", "",
           "| group | seeds | n | CRL | best static | CRL - static [95% CI] | MDE | decision | CRL - ceiling [95% CI] | "
           "ceiling - static [95% CI] | CRL - untrained [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    effects = []
    for label, members in sorted(answer.items(), key=lambda kv: (kv[1][0]["task"] != "known_answer", kv[0])):
        members = sorted(members, key=lambda r: r["seed"])
        stats = [restat(r) for r in members]
        agg = pooled(members, stats)
        key = members[0]["primary_metric"]
        st, un = agg["deltas"][("primary", "static")], agg["deltas"][("primary", "untrained")]
        cells = []
        for name in ("crl_minus_ceiling", "ceiling_minus_static"):
            per = [(r.get("reference_rows") or {}).get("paired", {}).get(name, {}).get(key) for r in members]
            if all(per):  # Newcombe from the recorded margins (the records stored the cluster bootstrap)
                per = [checks.ceiling_interval(r, name) for r in members]
                p = pool_intervals([d for d, _ in per], [ci for _, ci in per])
                cells.append(f"{p['delta']:+.3f} {_fmt_ci(p['ci_low'], p['ci_high'])} (old ceiling)")
            else:
                cells.append("-")
        crl = sum(s["conditions"]["crl"]["value"] for s in stats) / len(stats)
        static = sum(s["conditions"]["static"]["value"] for s in stats) / len(stats)
        name = f"`{members[0].get('group') or label}`"
        out.append(f"| {name} | {agg['seeds']} | {members[0]['n_heldout']} | {crl:.3f} | {static:.3f} | "
                   f"{st['delta']:+.3f} {_fmt_ci(st['ci_low'], st['ci_high'])} | {st['mde']:.3f} | "
                   f"{decision(st['ci_low'], st['ci_high'])} | {cells[0]} | {cells[1]} | "
                   f"{un['delta']:+.3f} {_fmt_ci(un['ci_low'], un['ci_high'])} |")
        for r in members:
            for cond, e in side_effects(r).items():
                effects.append(f"| {name} | {r['seed']} | {cond} | {e['fixed']} | {e['broken']} | "
                               f"{_fmt_mde(e['ratio'])} | {e['reward_worse_share']:.3f} |")
    out += clustering_section(answer)
    out += prior_scorings_section(answer, [r for members in groups.values() for r in members])
    out += behaviour_section(answer)
    out += off_task_section(answer)
    out += ["", "Side effects against no steering on the same prompts (fixed: wrong unsteered, right steered; broken: the "
            "reverse; ratio = broken / (fixed + broken); reward worse = the share of prompts whose reward the steering "
            "lowered):", "", "| group | seed | condition | fixed | broken | side-effect ratio | reward worse |",
            "|---|---|---|---|---|---|---|", *effects, ""]
    return out


def write_report(path: Path = HERE / "crl_results.md") -> str:
    records = load_records()
    sweeps = [r for r in records if "jobs" in r]
    groups: dict[str, list[dict]] = {}
    for r in records:
        if "jobs" not in r:
            groups.setdefault(config_label(r), []).append(r)
    parts = ["# The recorded answer: CRL against no steering, a random feature and the best static feature", "",
             "Written by `.venv/bin/python experiments/run_grid.py report` from `experiments/results/*.json` "
             "(one file per run: command, commit, seed, wall time, peak RSS, MLflow run id, per-example "
             "outcomes), with the statistics of issue 23 recomputed from those outcomes: clustered intervals, "
             "Newcombe paired intervals for binary deltas, Student's t over seeds, MDE at a stated discordance. These "
             "runs scored a plain hash subset of the whole test split (same examples for every condition and seed), "
             "before the dev/confirmation cut; the static feature, the coefficient and everything else were chosen "
             "on train/validation. Rows the fixed measuring shows to measure something else are marked stale.", "",
             "READING_PLACEHOLDER", ""]
    parts += answer_section(groups)
    for label, members in sorted(groups.items(), key=lambda kv: (kv[1][0]["task"] != "known_answer", kv[0])):
        members.sort(key=lambda r: r["seed"])
        r0 = members[0]
        key = r0["primary_metric"]
        parts += [f"## {label}", "",
                  f"Primary metric `{key}` on n = {r0['n_heldout']} held-out examples; "
                  f"{r0['episodes']['crl_training']:.0f} CRL training episodes, "
                  f"{r0['episodes']['static_selecting']:.0f} episodes spent selecting the static feature.", "",
                  "| seed | commit | wall time | peak RSS | MLflow run | static feature | curve |", "|---|---|---|---|---|---|---|"]
        for r in members:
            curve = f"[png]({r['curve_artifact']})" if r.get("curve_artifact") else "-"
            parts.append(f"| {r['seed']} | `{short(r['commit'])}` | {r['wall_s'] / 60:.1f} min | "
                         f"{r['peak_rss_gb']} GB | `{r['run_id']}` | {r['static_feature']} | {curve} |")
        stales = [validity(r) for r in members]
        stats = [restat(r) for r in members]
        reasons: dict[str, list[str]] = {}
        for r, st in zip(members, stales, strict=True):
            for k, why in st.items():
                reasons.setdefault(f"`{k}`: {why}", []).append(str(r["seed"]))
        if reasons:
            parts += ["", "**Stale rows (issue 23), kept with the reason, not silently:** " + "; ".join(
                f"{why} (seeds {', '.join(seeds)})" for why, seeds in reasons.items()) + "."]
        parts += ["", f"Intervals: clustered ({stats[0]['clusters']} clusters in the held-out set); binary deltas by "
                  f"Newcombe's paired interval on the cluster-adjusted counts, rewards by cluster bootstrap. MDE at an "
                  f"assumed {ASSUMED_DISCORDANCE:.0%} discordance (observed in brackets).", "",
                  "| seed | condition | " + key + " [95% CI] | reward | CRL - condition [95% CI], MDE | "
                  "CRL - condition, reward [95% CI], MDE |", "|---|---|---|---|---|---|"]
        for r, st, stale in zip(members, stats, stales, strict=True):
            parts += seed_rows(r, st, stale)
        if len(members) > 1:
            refs = {k: sum(r["references"][k] for r in members) / len(members) for k in ("none", "random", "static")
                    if all(k in r["references"] for r in members)}
            slug = label.replace(" / ", "_").replace(" ", "-").replace(":", "")
            figure = plot_training_curves({f"seed {r['seed']}": r["train_history"] for r in members}, refs,
                                          f"CRL train reward, {r0['task']} ({r0['model']}, layer {r0['layer']})",
                                          FIGURES / f"{slug}_training_curves.png")
            parts += ["", f"![training curves]({figure.relative_to(HERE)}) (references: mean over seeds of the "
                      f"train/validation rewards of no steering, a random feature and the static feature)"]
            agg = pooled(members, stats)
            parts += ["", f"Pooled over seeds {agg['seeds']} (means of {key}: " + ", ".join(
                f"{c} {v:.3f}" for c, v in agg["means"].items()) + "):", "",
                "| metric | CRL minus | mean delta | 95% CI (t over seeds + shared example noise) | seed sd | "
                "MDE (80% power) |", "|---|---|---|---|---|---|"]
            for (metric, base), p in agg["deltas"].items():
                note = " (stale)" if any("crl" in st for st in stales) else ""
                parts.append(f"| {key if metric == 'primary' else 'reward'} | {base} | {p['delta']:+.3f}{note} | "
                             f"{_fmt_ci(p['ci_low'], p['ci_high'])} | {p['sd_seeds']:.3f} | {p['mde']:.3f} |")
        parts += reference_section(members, label)
        if r0.get("oracle") and not r0.get("reference_rows"):
            o = [r["oracle"] for r in members if r.get("oracle")]
            parts += ["", f"Headroom (reads the answers): per-prompt oracle over {o[0]['candidates']} candidates "
                      f"correct on {sum(x['oracle_accuracy'] for x in o) / len(o):.3f} of prompts."]
        parts.append("")
    for analysed in sorted((RESULTS / "analyses").glob("*.json")):
        parts += analysis_section(analysed.stem, json.loads(analysed.read_text()),
                                  json.loads((RESULTS / f"{analysed.stem}.json").read_text()))
    for r in sweeps:
        parts += [f"## Sweep `{r['key']}`", "", f"Command: `{r['command']}` (commit `{short(r['commit'])}`, "
                  f"{r['wall_s'] / 60:.0f} min for {len(r['jobs'])} jobs); MLflow experiment `{r['sweep_experiment']}`, "
                  f"comparison run `{r['compare_run_id']}`.", "", r["comparison_table"].strip(), ""]
        parts += [f"![{r['key']}]({p})" for p in r["plots"]] + [""]
        parts += ["The comparison table above is the compare mode's output as logged (old statistics); the job rows "
                  "below are recomputed with the fixed ones (clustered Newcombe interval).", "",
                  "| job (layer / masking) | MLflow run | CRL | static | none | CRL - static [95% CI] | stale |",
                  "|---|---|---|---|---|---|---|"]
        for j in sorted(r["jobs"], key=lambda j: (j["layer"], j["masking"])):
            st, stale = restat(j), validity(j)
            c, d = st["conditions"], st["deltas"]["static"]
            parts.append(f"| {j['layer']} / {j['masking']} | `{j['run_id']}` | {c['crl']['value']:.3f} | "
                         f"{c['static']['value']:.3f} | {c['none']['value']:.3f} | {d['delta']:+.3f} {_fmt_ci(*d['ci'])} | "
                         f"{'CRL greedy outside the action space' if 'crl' in stale else '-'} |")
        parts.append("")
    text = "\n".join(parts)
    reading = (HERE / "crl_results_reading.md")
    text = text.replace("READING_PLACEHOLDER", reading.read_text().strip() if reading.exists() else
                        "_(reading not written yet)_")
    path.write_text(text + "\n")
    return text


def main(argv: list[str]) -> None:
    if argv and argv[0] == "overlap":
        records = load_records()
        for key in argv[1:] or [r["key"] for r in records if "jobs" not in r]:
            r = next(x for x in records if x.get("key") == key)
            p = checks.prior_scorings(records, r)
            print(f"{key}: {p['already_scored']} of {p['n']} held-out ids already scored by earlier records "
                  f"({p['scorings']} scorings: {p['by_record']})")
        out = checks.write_prior_scorings(records)
        print(f"wrote {checks.PRIOR_SCORINGS.relative_to(HERE.parent)} ({len(out)} confirmation runs)")
        return
    if not argv or argv[0] not in ("record", "report", "list", "refresh", "analyse"):
        sys.exit(__doc__)
    if argv[0] == "record":
        args = argv[1:]
        logs = None
        if "--logs" in args:
            i = args.index("--logs")
            logs, args = Path(args[i + 1]), args[:i] + args[i + 2:]
        record(args, logs)
    elif argv[0] == "refresh":
        refresh()
    elif argv[0] == "analyse":
        keys, only = argv[1:], None
        if "--only" in keys:
            i = keys.index("--only")
            only, keys = tuple(keys[i + 1].split(",")), keys[:i] + keys[i + 2:]
        for key in keys:
            analyse(key, only)
    elif argv[0] == "report":
        print(write_report())
    else:
        recorded: dict[str, list[str]] = {}
        for r in load_records():
            recorded.setdefault(r.get("group", "?"), []).append(r["key"])
        for name in experiment_files():
            keys = recorded.get(name, [])
            print(f"{name:32s} {len(keys)} recorded  {' '.join(sorted(keys))}")


if __name__ == "__main__":
    main(sys.argv[1:])
