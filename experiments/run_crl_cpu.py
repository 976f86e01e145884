"""Recorded CPU runs: `python -m crl_exp +experiment=<task>_layer12` for every task with the embedded model.

Usage: .venv/bin/python experiments/run_crl_cpu.py [task ...] [-- extra hydra overrides]
Each run is its own process (as a user would run it); its wall time is measured here and its held-out
comparison table (written by the run as the MLflow artifact heldout/comparison.md) is collected into
experiments/crl_cpu_runs.md. Nothing here tunes on the test split: settings are the budget=cpu defaults.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from crl_exp.tracking.mlflow_run import resolve_tracking_uri

TASKS = ["gsm8k", "mmlu", "bbq", "harmbench", "xstest"]


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    tasks = [a for a in (argv[: argv.index("--")] if "--" in argv else argv)] or TASKS
    out = Path(__file__).with_name("crl_cpu_runs.md")
    client = MlflowClient(resolve_tracking_uri(None))
    sections = []
    for task in tasks:
        cmd = [sys.executable, "-m", "crl_exp", f"+experiment={task}_layer12", "trainer.progress_bar=false", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sections.append(f"## {task}\n\nFAILED after {wall:.0f}s:\n```\n{proc.stderr[-2000:]}\n```\n")
            continue
        exp = client.get_experiment_by_name(f"crl-{task}")
        run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
        table = Path(client.download_artifacts(run.info.run_id, "heldout/comparison.md")).read_text()
        m = run.data.metrics
        sections.append(
            f"## {task}\n\nCommand: `{' '.join(['.venv/bin/python', *cmd[1:]])}`  \n"
            f"MLflow run `{run.info.run_id}` (experiment `crl-{task}`); wall time {wall / 60:.1f} min "
            f"(model load + cached SAE + {int(m.get('data/heldout_eval_size', 0))} held-out examples x 4 conditions)."
            f"  \nTraining: final-iteration reward {m.get('train/reward_mean', float('nan')):.3f}, "
            f"distinct features {m.get('train/distinct_features', float('nan')):.0f}, mask size "
            f"{m.get('train/mask_size', float('nan')):.0f}, static feature {int(m.get('static/feature', -1))}.\n\n"
            f"{table}\n")
        out.write_text("# CRL on CPU (budget=cpu, embedded Gemma 3 270M, layer 12)\n\n" + "\n".join(sections))
        print(sections[-1], flush=True)
    out.write_text("# CRL on CPU (budget=cpu, embedded Gemma 3 270M, layer 12)\n\n" + "\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1:])
