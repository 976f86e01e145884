"""How far the first-order screen reaches on the known-answer task over the whole dictionary (issue 45).

For each class, the median rank the screen gives to chosen features over ``--prompts`` train prompts of that class,
and those features' exact mean reward on the same prompts and on every validation prompt of the class:

    .venv/bin/python benchmarks/screen_reach.py [--prompts 12] [--features 259 3107 ...]

Writes ``benchmarks/results/screen_reach_<commit>.json`` (command, commit, CPU capability). The features default to
the design's class features, the probes' best feature per class and the features the recorded runs picked.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from crl_exp.episodes import build_env
from crl_exp.first_order import first_order_screen
from crl_exp.models.hardware import with_machine
from crl_exp.paths import CONFIG_DIR
from crl_exp.reward_table import reward_table
from crl_exp.tasks import build_task
from crl_exp.tracking.provenance import git_commit

DEFAULT_FEATURES = [259, 3107, 1556, 3354, 3579, 2191, 969, 2137, 1106, 1699, 2328, 2408]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=12, help="train prompts per class")
    ap.add_argument("--features", type=int, nargs="+", default=DEFAULT_FEATURES)
    args = ap.parse_args()
    commit = git_commit()  # the code that runs, read before it runs
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=known_answer_dictionary"])
    task = build_task(cfg.task, cfg.get("data_dir"))
    env = build_env(cfg, task)
    feats = list(args.features)
    by_class: dict[str, list] = collections.defaultdict(list)
    for ex in task.split("train"):
        by_class[ex.group].append(ex)
    result: dict[str, dict] = {}
    for group, examples in sorted(by_class.items()):
        examples = examples[: args.prompts]
        ranks = first_order_screen(env, examples).argsort(-1, descending=True).argsort(-1)
        table = reward_table(env, examples, feats, use_cache=False, desc=f"{group} train")
        result[group] = {"prompts": len(examples),
                         "median_screen_rank": {f: int(ranks[:, f].median()) for f in feats},
                         "train_reward": {f: float(table.reward[:, i].mean()) for i, f in enumerate(feats)}}
    validation = task.split("validation")
    table = reward_table(env, validation, feats, use_cache=False, desc="validation")
    for group in result:
        rows = torch.tensor([i for i, ex in enumerate(validation) if ex.group == group])
        result[group]["validation_reward"] = {f: float(table.reward[rows, i].mean()) for i, f in enumerate(feats)}
        result[group]["validation_prompts"] = len(rows)
    record = with_machine({"command": "python benchmarks/screen_reach.py " + " ".join(sys.argv[1:]), "commit": commit,
                           "features": feats, "classes": result})
    out = Path(__file__).resolve().parent / "results" / f"screen_reach_{commit[:7]}.json"
    out.write_text(json.dumps(record, indent=1))
    for group, r in result.items():
        print(group, {f: (r["median_screen_rank"][f], round(r["train_reward"][f], 3)) for f in feats})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
