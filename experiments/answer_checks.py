"""Checks on the recorded answer that need only its records (issue 35): the confirmation ids earlier runs had
already scored, the ceiling's paired intervals by Newcombe from the recorded 2x2 margins, the known-answer task's
per-class rows and the clustering it was scored with. ``run_grid.py`` renders them; ``run_grid.py overlap`` writes
the companion record of earlier scorings (``confirmation_prior_scorings.json``) and prints the check for any run.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

from crl_exp.evaluation.ledger import earlier_scorings
from crl_exp.stats import newcombe_paired_interval

HERE = Path(__file__).resolve().parent
PRIOR_SCORINGS = HERE / "confirmation_prior_scorings.json"


def heldout_ids(r: dict) -> list[str]:
    return list(r["examples"]["crl"]["id"])


@functools.cache
def commit_time(commit: str) -> int | None:
    """Commit time (seconds) of a recorded run's commit, None when this history does not hold it (then
    ``scored_before`` orders by the dev/confirmation cut alone)."""
    out = subprocess.run(["git", "log", "-1", "--format=%ct", commit, "--"], capture_output=True, text=True, cwd=HERE)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def scored_before(o: dict, r: dict) -> bool:
    """Whether record ``o`` scored its held-out ids before ``r``: runs before the dev/confirmation cut (no
    ``heldout_part``) precede every run after it; within a phase, the earlier commit."""
    phase_o, phase_r = bool(o.get("heldout_part")), bool(r.get("heldout_part"))
    if phase_o != phase_r:
        return phase_o < phase_r
    t_o, t_r = commit_time(o["commit"]), commit_time(r["commit"])
    return t_o is not None and t_r is not None and t_o < t_r


def prior_scorings(records: list[dict], r: dict) -> dict:
    """How many of ``r``'s held-out ids earlier records of the same task had already scored."""
    earlier = {o["key"]: heldout_ids(o) for o in records
               if "jobs" not in o and o["task"] == r["task"] and o["key"] != r["key"] and scored_before(o, r)}
    return earlier_scorings(heldout_ids(r), earlier)


def write_prior_scorings(records: list[dict], path: Path = PRIOR_SCORINGS) -> dict:
    """The companion of the confirmation ledger: for every confirmation-scored run, the ids of its confirmation
    part that earlier runs (before the dev/confirmation cut) had scored, and how often."""
    out = {r["key"]: {"task": r["task"], "commit": r["commit"], **prior_scorings(records, r)}
           for r in sorted(records, key=lambda x: x.get("key", "")) if "jobs" not in r and r.get("heldout_part") == "confirm"}
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def counts_from_margins(n: int, share_a: float, delta: float, discordance: float) -> tuple[float, float, float, float]:
    """The paired 2x2 table (both right, only a, only b, both wrong) from what a record keeps: n, a's share right,
    the delta p_a - p_b and the share of discordant pairs (f - g = n delta, f + g = n discordance, e + f = n p_a)."""
    f = round(n * (discordance + delta) / 2)
    g = round(n * (discordance - delta) / 2)
    e = round(n * share_a) - f
    if min(e, f, g, n - e - f - g) < 0:
        raise ValueError(f"inconsistent margins: n={n}, p_a={share_a}, delta={delta}, discordance={discordance}")
    return e, f, g, n - e - f - g


def ceiling_interval(r: dict, name: str) -> tuple[float, tuple[float, float]]:
    """CRL - ceiling or ceiling - static on the primary metric by Newcombe's paired interval on the cluster-adjusted
    counts, as every other binary delta (records before that fix stored the cluster bootstrap)."""
    key = r["primary_metric"]
    entry = r["reference_rows"]["paired"][name]
    d, power = entry[key], entry["power"]
    if d.get("method") == "newcombe_clustered":
        return d["delta"], tuple(d["ci95"])
    share_a = (r["results"]["crl"]["metrics"][key] if name == "crl_minus_ceiling"
               else r["reference_rows"]["ceiling"]["accuracy"])
    counts = counts_from_margins(power["n"], share_a, d["delta"], power["discordance"])
    deff = max(1.0, float(power["design_effect"]))
    return d["delta"], newcombe_paired_interval(*(c / deff for c in counts))


def restricted(r: dict, keep: set[str]) -> dict:
    """A copy of a record whose per-example outcomes keep only ``keep`` (same order in every condition)."""
    out = dict(r)
    out["examples"] = {}
    for cond, ex in r["examples"].items():
        idx = [i for i, x in enumerate(ex["id"]) if x in keep]
        out["examples"][cond] = {k: [v[i] for i in idx] for k, v in ex.items()}
    return out


def class_rows(members: list[dict]) -> list[str]:
    """Known-answer task, per class (subject), mean over seeds: share right and reward of static and CRL. The
    static feature is one class's feature, so the pooled accuracy delta is set by the confirmation part's class mix;
    the per-class rows show where CRL gains."""
    classes = sorted({i.split("/")[0] for i in heldout_ids(members[0])})
    lines = ["| class | n | static right | CRL right | static reward | CRL reward | untrained reward |",
             "|---|---|---|---|---|---|---|"]
    for k in classes:
        cells = {c: {"right": [], "reward": []} for c in ("static", "crl", "untrained")}
        for r in members:
            for c in cells:
                ex = r["examples"][c]
                idx = [i for i, x in enumerate(ex["id"]) if x.split("/")[0] == k]
                cells[c]["right"].append(sum(ex["correct"][i] > 0.5 for i in idx))
                cells[c]["reward"].append(sum(ex["reward"][i] for i in idx) / len(idx))
        n = sum(1 for x in heldout_ids(members[0]) if x.split("/")[0] == k)
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        lines.append(f"| {k} | {n} | {mean(cells['static']['right']):.0f}/{n} | {mean(cells['crl']['right']):.0f}/{n} | "
                     f"{mean(cells['static']['reward']):.3f} | {mean(cells['crl']['reward']):.3f} | "
                     f"{mean(cells['untrained']['reward']):.3f} |")
    return lines


def by_subject(r: dict) -> list[str]:
    """Subject clusters for an MMLU-based record (the known-answer task's pre-registered clustering)."""
    return [i.split("/")[0] for i in heldout_ids(r)]


def by_question(r: dict) -> list[str]:
    return heldout_ids(r)
