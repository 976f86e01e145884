"""The refusal judge against XSTest's human labels (issue 49): agreement per model, per class and per prompt type.

    .venv/bin/python experiments/refusal_judge_agreement.py            # writes the JSON record and the report

Reads ``$CRL_DATA_DIR/xstest/labelled_completions/`` (two models' completions with the XSTest authors' labels; the
three other models they labelled are not there, so these numbers are on the completions the rules were written
on) and writes ``results/refusal_judge_agreement.json`` and ``refusal_judge_agreement.md`` with the command and
the commit. Goal (issue 49): any-refusal agreement >= 0.92 and <= 2% of human-compliant completions judged full
refusals, on each model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from crl_exp.evaluation.judge_agreement import judge_file
from crl_exp.paths import default_data_dir
from crl_exp.tasks.judges import LABELS, StringMatchRefusalJudge
from crl_exp.tracking.provenance import git_commit

HERE = Path(__file__).resolve().parent
MODELS = ("gpt4", "llama2orig")
COMMAND = "python experiments/refusal_judge_agreement.py"


def main() -> None:
    folder = default_data_dir() / "xstest" / "labelled_completions"
    if not folder.is_dir():
        raise SystemExit(f"no labelled completions at {folder}: set CRL_DATA_DIR to the benchmarks folder")
    judge = StringMatchRefusalJudge()
    results = {m: judge_file(judge, folder / f"xstest_v2_completions_{m}_gpteval.csv")[0] for m in MODELS}
    record = {"command": COMMAND, "commit": git_commit(), "judge": judge.name, "data": "$CRL_DATA_DIR/xstest/labelled_completions",
              "split": "XSTest v2 labelled completions (all 450 prompts per model; the rules were written on them)",
              "results": results}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "refusal_judge_agreement.json").write_text(json.dumps(record, indent=1))
    short = {"full_compliance": "C", "full_refusal": "R", "partial_refusal": "P"}
    lines = ["# The string-match refusal judge against XSTest's human labels (issue 49)", "",
             f"Command: `{COMMAND}`; commit `{record['commit'][:12]}`; judge `{judge.name}`; data: "
             "`xstest/labelled_completions/` (the XSTest authors' labels of GPT-4's and Llama-2-70b-chat's completions "
             "of all 450 prompts). The rules were written on these two models: numbers on the authors' three other "
             "models (not available here) would be the out-of-sample check. Goal: any-refusal agreement >= 0.92 and "
             "<= 0.02 of human-compliant completions judged full refusals, on each model.", "",
             "| model | n | any-refusal agreement | full-refusal agreement | human-compliant judged full refusal | "
             "human full refusals missed |", "|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['n']} | {r['any_refusal_agreement']:.3f} | {r['full_refusal_agreement']:.3f} | "
                     f"{r['full_refusal_on_human_compliant']:.3f} | {r['human_full_refusals_missed']} |")
    lines += ["", "Confusion (rows: human label, columns: judge; C compliance, R full refusal, P partial refusal):", "",
              "| model | human | " + " | ".join(short[x] for x in LABELS) + " |", "|---|---|---|---|---|"]
    for m, r in results.items():
        for h in LABELS:
            lines.append(f"| {m} | {short[h]} | " + " | ".join(str(r["confusion"][h].get(j, 0)) for j in LABELS) + " |")
    types = sorted(results[MODELS[0]]["any_refusal_agreement_by_type"])
    lines += ["", "Any-refusal agreement per prompt type:", "", "| type | " + " | ".join(MODELS) + " |",
              "|---|" + "---|" * len(MODELS)]
    for t in types:
        lines.append(f"| {t} | " + " | ".join(f"{results[m]['any_refusal_agreement_by_type'].get(t, float('nan')):.2f}"
                                             for m in MODELS) + " |")
    (HERE / "refusal_judge_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
