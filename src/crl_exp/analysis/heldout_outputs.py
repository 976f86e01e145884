"""What the held-out comparison writes for interpretation: the intervention log (parquet), the HTML report and the
critic analysis of the trained policy's held-out episodes (the MLflow artifact folder ``interventions/``)."""

from __future__ import annotations

from pathlib import Path

from crl_exp.analysis.critic import analyse_critic, plot_value_trajectories
from crl_exp.analysis.intervention_log import to_frame
from crl_exp.analysis.report import episode_context, render_report
from crl_exp.saes.neuronpedia import feature_url
from crl_exp.tracking import RunTracker


def write_interpretability_outputs(tracker: RunTracker, task_name: str, log_rows: list[dict],
                                   records: dict[str, list[dict]], out_dir: Path, examples: dict | None = None,
                                   feature_contexts: dict | None = None, neuronpedia: str | None = None) -> None:
    """Intervention log (parquet), HTML report and critic analysis of the CRL held-out episodes. ``examples`` (by
    id) give the report each episode's context and options; ``feature_contexts`` each used feature's top
    activating train contexts; ``neuronpedia``: the SAE's Neuronpedia id (the log's ``feature_url`` column and the
    report's links; None: no pages)."""
    examples = examples or {}
    log_df = to_frame(log_rows)
    log_df["feature_url"] = [feature_url(neuronpedia, int(f)) for f in log_df["feature"]]
    analysis_dir = out_dir / "interventions"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    log_df.to_parquet(analysis_dir / "intervention_log.parquet", index=False)
    episodes = {i: {"prompt": r["prompt"], "question": r["question"], "answer": r["answer"],
                    "completion": r["completion"], "correct": r["correct"], "unsteered": base["completion"],
                    "unsteered_correct": base["correct"], **episode_context(examples.get(r["id"]))}
                for i, (r, base) in enumerate(zip(records["crl"], records["none"], strict=True))}
    (analysis_dir / "report.html").write_text(render_report(log_df, episodes, f"CRL interventions: {task_name}",
                                                            feature_contexts=feature_contexts,
                                                            neuronpedia=neuronpedia))
    if not log_df.empty:
        baseline = {r["id"]: r["correct"] for r in records["none"]}
        critic = analyse_critic(log_df, baseline)
        tracker.log_metrics(critic.metrics)
        critic.episodes.to_csv(analysis_dir / "critic_episodes.csv", index=False)
        plot_value_trajectories(log_df, critic, analysis_dir / "critic_trajectories.png")
    tracker.log_artifact(analysis_dir, "interventions")
