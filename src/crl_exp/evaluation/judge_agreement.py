"""How far a refusal judge agrees with human labels of real completions (XSTest's labelled completions).

The XSTest authors labelled each completion full compliance, full refusal or partial refusal. A judge is read by
three numbers, per model and overall: **any-refusal agreement** (both say "some refusal", full or partial, or
both say compliance), **full-refusal agreement** (both say full refusal, or both say something else) and the
share of **human-compliant completions the judge calls full refusals** (over-refusal it would invent); then the
confusion counts per class and the agreement per prompt type, so a rule change shows where it helps or hurts.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

from crl_exp.tasks.judges import FULL_COMPLIANCE, FULL_REFUSAL, LABELS, PARTIAL_REFUSAL

HUMAN_LABELS = {"1_full_compliance": FULL_COMPLIANCE, "2_full_refusal": FULL_REFUSAL,
                "3_partial_refusal": PARTIAL_REFUSAL}


def read_labelled_completions(path: str | Path) -> list[dict]:
    """Rows of one ``labelled_completions`` CSV: id, type, prompt, completion and the human label (``human``)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"id", "type", "prompt", "completion", "final_label"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: not a labelled-completions file (missing columns {sorted(missing)})")
    out = []
    for row in rows:
        label = row["final_label"].strip()
        if label not in HUMAN_LABELS:
            raise ValueError(f"{path}: row {row['id']} has an unknown human label {label!r}")
        out.append({"id": row["id"], "type": row["type"], "prompt": row["prompt"], "completion": row["completion"],
                    "human": HUMAN_LABELS[label]})
    return out


def agreement(human: list[str], judged: list[str], types: list[str]) -> dict:
    """The three headline numbers, the confusion counts ``confusion[human][judge]`` and agreement per prompt type."""
    if not (len(human) == len(judged) == len(types)) or not human:
        raise ValueError("agreement needs one judge label and one prompt type per human label, and at least one")
    refusing = {FULL_REFUSAL, PARTIAL_REFUSAL}
    any_agree = [(h in refusing) == (j in refusing) for h, j in zip(human, judged, strict=True)]
    full_agree = [(h == FULL_REFUSAL) == (j == FULL_REFUSAL) for h, j in zip(human, judged, strict=True)]
    compliant = [j == FULL_REFUSAL for h, j in zip(human, judged, strict=True) if h == FULL_COMPLIANCE]
    confusion = {h: dict(Counter(j for hh, j in zip(human, judged, strict=True) if hh == h)) for h in LABELS}
    by_type: dict[str, list[bool]] = defaultdict(list)
    for t, ok in zip(types, any_agree, strict=True):
        by_type[t].append(ok)
    return {"n": len(human), "any_refusal_agreement": sum(any_agree) / len(any_agree),
            "full_refusal_agreement": sum(full_agree) / len(full_agree),
            "full_refusal_on_human_compliant": sum(compliant) / len(compliant) if compliant else float("nan"),
            "human_full_refusals_missed": sum(1 for h, j in zip(human, judged, strict=True)
                                              if h == FULL_REFUSAL and j != FULL_REFUSAL),
            "confusion": confusion,
            "any_refusal_agreement_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())}}


def judge_file(judge, path: str | Path) -> tuple[dict, list[dict]]:
    """``judge``'s agreement with one labelled-completions file, and the rows it disagreed on (any refusal)."""
    rows = read_labelled_completions(path)
    judged = judge.classify([r["prompt"] for r in rows], [r["completion"] for r in rows])
    result = agreement([r["human"] for r in rows], judged, [r["type"] for r in rows])
    refusing = {FULL_REFUSAL, PARTIAL_REFUSAL}
    misses = [{**r, "judge": j} for r, j in zip(rows, judged, strict=True) if (r["human"] in refusing) != (j in refusing)
              or (r["human"] == FULL_REFUSAL) != (j == FULL_REFUSAL)]
    return result, misses
