"""experiments/run_grid.py: groups are experiment files, and the report pools seeds with seed variance in the CI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "run_grid.py"


@pytest.fixture
def grid(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "HERE", tmp_path)
    monkeypatch.setattr(module, "FIGURES", tmp_path / "figures")
    (tmp_path / "results").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return module


def outcomes(accuracy: float, n: int = 200) -> dict:
    k = round(accuracy * n)
    return {"id": [f"ex{i}" for i in range(n)], "correct": [1.0] * k + [0.0] * (n - k), "reward": [accuracy / 2] * n}


def record(seed: int, crl: float, static: float, ci_half: float) -> dict:
    metrics = {c: {"metrics": {"accuracy": v, "reward": v / 2}, "ci95": {"accuracy": [v - 0.05, v + 0.05]}}
               for c, v in {"none": 0.3, "random": 0.3, "static": static, "crl": crl}.items()}
    deltas = {}
    for b in ("none", "random", "static"):
        d = crl - metrics[b]["metrics"]["accuracy"]
        deltas[b] = {m: {"delta": d * scale, "ci95": [(d - ci_half) * scale, (d + ci_half) * scale]}
                     for m, scale in (("accuracy", 1.0), ("reward", 0.5))}
        deltas[b]["power"] = {"mde_correct": 0.06 if b != "none" else float("nan"), "discordance": 0.02, "mde_reward": 0.01}
    return {"key": f"bbq_s{seed}", "seed": seed, "task": "bbq", "model": "gemma3_270m", "layer": 12, "budget": "cpu",
            "action_space": "full:4096", "masking": "adaptive", "reward": "dense", "coefficient": 0.1, "primary_metric": "accuracy",
            "n_heldout": 200, "episodes": {"crl_training": 832, "static_selecting": 192}, "commit": "abc1234",
            "wall_s": 600.0, "peak_rss_gb": 2.5, "run_id": f"run{seed}", "static_feature": 7, "curve_artifact": None,
            "results": metrics, "deltas": deltas, "oracle": None, "masked_action_share": 0.0,
            "examples": {c: outcomes(v) for c, v in {"none": 0.3, "random": 0.3, "static": static, "crl": crl}.items()},
            "references": {"none": 0.2, "random": 0.18, "static": 0.21},
            "train_history": [{"iteration": i, "train/reward_mean": 0.2 + 0.01 * i, "train/accuracy": 0.3}
                              for i in range(3)],
            "crl_variants": {"crl_sampled": {"seeds": 5, "mean": crl, "sd": 0.01, "reward_mean": crl / 2}}}


def test_report_recomputes_clustered_newcombe_intervals_and_pools_seeds_with_t(grid, tmp_path, data_dir):
    from crl_exp.stats import mde_paired_binary, newcombe_paired_interval, pool_seeds, t_975

    for seed, crl in enumerate((0.40, 0.44)):
        (grid.RESULTS / f"bbq_s{seed}.json").write_text(json.dumps(record(seed, crl, 0.38, 0.04)))
    (grid.RESULTS / "analyses").mkdir()
    analyses = {"top_features": {"command": "c1", "commit": "abc", "run_id": "t1", "table": "head\n\n| f |"},
                "branch_points": {"command": "c2", "run_id": "b1", "printed": "1 branch points in 4 episodes\n"}}
    (grid.RESULTS / "analyses" / "bbq_s0.json").write_text(json.dumps(analyses))
    text = grid.write_report(tmp_path / "out.md")
    assert (tmp_path / "out.md").read_text().strip() == text.strip()
    assert json.loads((grid.RESULTS / "analyses" / "bbq_s0.json").read_text()) == analyses  # not overwritten
    assert "1 branch points in 4 episodes" in text
    assert "| 0 | static | 0.380 [" in text and "| 1 | crl | 0.440 [" in text
    # seed 0: CRL right on 80 examples, static on 76 of them (nested): 4 discordant pairs, one cluster each
    lo, hi = newcombe_paired_interval(76, 4, 0, 120)
    row = next(x for x in text.splitlines() if x.startswith("| 0 | static |"))
    assert f"+0.020 [{lo:+.3f}, {hi:+.3f}]" in row
    assert f"MDE {mde_paired_binary(200, 0.2):.3f} " in row  # at the assumed 20% discordance
    assert "(observed 2% discordant: none)" in row  # 4 pairs cannot power anything: said, not hidden
    assert len(list((tmp_path / "figures").glob("*_training_curves.png"))) == 1  # one figure per configuration
    ses = [(h - low) / (2 * 1.959963984540054) for low, h in (newcombe_paired_interval(76, 4, 0, 120),
                                                            newcombe_paired_interval(76, 12, 0, 112))]
    expected = pool_seeds([0.02, 0.06], ses)
    line = next(x for x in text.splitlines() if x.startswith("| accuracy | static | +0.040"))
    low, high = (float(v) for v in line.split("[")[1].split("]")[0].split(","))
    assert low == pytest.approx(expected["ci_low"], abs=1e-3) and high == pytest.approx(expected["ci_high"], abs=1e-3)
    assert high - 0.04 > t_975(1) * 0.02 / math.sqrt(2)  # Student's t with 1 degree of freedom, not z


def test_stale_rows_are_marked_with_their_reason(grid, tmp_path, data_dir):
    pooled = {**record(0, 0.40, 0.38, 0.04), "action_space": "candidates:32", "masked_action_share": 1.0}
    (grid.RESULTS / "bbq_s0.json").write_text(json.dumps(pooled))
    text = grid.write_report(tmp_path / "out.md")
    assert "| 0 | crl (stale) |" in text and "greedy actions left the trained action space" in text
    assert "it was the random baseline" in text and "| 0 | random_dictionary |" in text


def test_obs_norm_group_size_dtype_top_k_and_advantage_runs_are_reported_apart_from_the_default_configuration(
        grid, tmp_path, data_dir):
    (grid.RESULTS / "bbq_s0.json").write_text(json.dumps(record(0, 0.40, 0.38, 0.04)))
    (grid.RESULTS / "bbq_obsnorm_s0.json").write_text(json.dumps({**record(0, 0.50, 0.38, 0.04), "obs_norm": True,
                                                                  "key": "bbq_obsnorm_s0"}))
    (grid.RESULTS / "bbq_obsnorm_g8_s1.json").write_text(json.dumps({  # the default group size: pooled with s0
        **record(1, 0.50, 0.38, 0.04), "obs_norm": True, "group_size": 8, "key": "bbq_obsnorm_g8_s1"}))
    (grid.RESULTS / "bbq_obsnorm_g2_s0.json").write_text(json.dumps({
        **record(0, 0.45, 0.38, 0.04), "obs_norm": True, "group_size": 2, "key": "bbq_obsnorm_g2_s0"}))
    (grid.RESULTS / "bbq_fp32_s1.json").write_text(json.dumps({  # the default dtype: pooled with s0
        **record(1, 0.40, 0.38, 0.04), "dtype": "float32", "key": "bbq_fp32_s1"}))
    (grid.RESULTS / "bbq_bf16_s0.json").write_text(json.dumps({
        **record(0, 0.40, 0.38, 0.04), "dtype": "bfloat16", "key": "bbq_bf16_s0"}))
    (grid.RESULTS / "bbq_top1_s1.json").write_text(json.dumps({  # the default top-k: pooled with s0
        **record(1, 0.40, 0.38, 0.04), "top_k": 1, "key": "bbq_top1_s1"}))
    (grid.RESULTS / "bbq_top2_s0.json").write_text(json.dumps({
        **record(0, 0.40, 0.38, 0.04), "top_k": 2, "key": "bbq_top2_s0"}))
    (grid.RESULTS / "bbq_gae_s1.json").write_text(json.dumps({  # the default advantage: pooled with s0
        **record(1, 0.40, 0.38, 0.04), "advantage": "gae", "key": "bbq_gae_s1"}))
    (grid.RESULTS / "bbq_groupadv_s0.json").write_text(json.dumps({
        **record(0, 0.40, 0.38, 0.04), "advantage": "group", "key": "bbq_groupadv_s0"}))
    text = grid.write_report(tmp_path / "out.md")
    headers = [line for line in text.splitlines() if line.startswith("## bbq / gemma3_270m")]
    assert len(headers) == 6 and sum(h.endswith(" / obs_norm") for h in headers) == 1
    assert sum(h.endswith(" / obs_norm / G=2") for h in headers) == 1
    assert sum(h.endswith(" / bfloat16") for h in headers) == 1
    assert sum(h.endswith(" / top-2") for h in headers) == 1
    assert sum(h.endswith(" / group advantage") for h in headers) == 1


def test_groups_are_experiment_files_and_record_reads_only_what_mlflow_holds(grid, capsys):
    """The grid is Hydra experiment files; ``record`` refuses an unknown one with the list, names the MLflow
    experiment a file logs to, and records nothing for an experiment that has not run."""
    names = grid.experiment_files()
    assert "answer_bbq" in names and "grid/cpu_obs_norm" in names and "bbq_layer12" not in names
    assert grid.mlflow_experiment_of("answer_bbq") == "answer-bbq"
    assert grid.mlflow_experiment_of("grid/cpu_coefficient") == "grid-cpu_coefficient"
    with pytest.raises(SystemExit, match="no experiment file"):
        grid.record(["no_such_group"], None)
    grid.record(["answer_mmlu"], None)
    assert "nothing logged yet" in capsys.readouterr().out and not list(grid.RESULTS.glob("*.json"))


def test_state_diversity_separates_a_shared_direction_from_prompt_specific_energy():
    spec = importlib.util.spec_from_file_location("state_diversity", SCRIPT.parent / "state_diversity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    torch.manual_seed(0)
    shared = torch.zeros(64)
    shared[:4] = 30.0
    states = shared + torch.randn(16, 64)  # a large direction every prompt shares, small prompt-specific noise
    row = module.diversity(states)
    assert row["mean_pairwise_cosine"] > 0.9 and row["prompt_specific_energy_share"] < 0.1
    assert abs(row["mean_pairwise_cosine_standardised"]) < 0.1  # independent noise once standardised
    spread = module.diversity(torch.randn(16, 64))
    assert spread["mean_pairwise_cosine"] < 0.2 and spread["prompt_specific_energy_share"] > 0.85


def test_the_answer_reports_mmlu_under_each_safety_policy_from_its_off_task_analysis(grid, tmp_path, data_dir):
    rec = record(0, 0.40, 0.38, 0.04)
    rec["examples"]["untrained"] = outcomes(0.30)
    rec.update(key="xstest_s0", task="xstest", group="answer_xstest", heldout_part="confirm")
    (grid.RESULTS / "xstest_s0.json").write_text(json.dumps(rec))
    text = grid.write_report(tmp_path / "out.md")
    assert "What the safety policies cost elsewhere" not in text  # no off_task analysis yet: no table, no blank row
    delta = lambda d: {"accuracy": {"delta": d, "ci95": [d - 0.03, d + 0.03]}}  # noqa: E731
    result = {"task": "mmlu", "primary_metric": "accuracy", "n": 500, "split": "validation",
              "conditions": {c: {"metrics": {"accuracy": v}} for c, v in (("none", .40), ("static", .38), ("crl", .35))},
              "deltas": {"crl_minus_none": delta(-.05), "static_minus_none": delta(-.02)},
              "side_effects": {"crl": {"fixed": 10, "broken": 35}, "static": {"fixed": 5, "broken": 15}}}
    (grid.RESULTS / "analyses").mkdir()
    (grid.RESULTS / "analyses" / "xstest_s0.json").write_text(json.dumps({"off_task": {"run_id": "off1",
                                                                                      "result": result}}))
    text = grid.write_report(tmp_path / "out.md")
    row = next(x for x in text.splitlines() if x.startswith("| `answer_xstest` | 0 | 500 |"))
    assert "| 0.400 | 0.380 | 0.350 | -0.050 [-0.080, -0.020] | -0.020 [-0.050, +0.010] | 10 / 35 | `off1` |" in row
    assert "## Interpretability: `xstest_s0`" in text and "Branch points" not in text  # only what was analysed


def test_files_sharing_an_mlflow_experiment_record_only_their_own_runs(grid):
    """answer_bbq and answer_bbq_pool128 both log to `answer-bbq`: recording one must not relabel the other's runs."""
    assert grid.mlflow_experiment_of("answer_bbq") == grid.mlflow_experiment_of("answer_bbq_pool128")
    bbq, pool = grid.run_name_pattern("answer_bbq"), grid.run_name_pattern("answer_bbq_pool128")
    assert bbq.match("answer_bbq_s2") and not bbq.match("answer_bbq_pool128_s0")
    assert pool.match("answer_bbq_pool128_s0") and not pool.match("answer_bbq_s0")
    layers = grid.run_name_pattern("grid/layer_sweep")
    assert layers.match("bbq_gemma3_cand32_layer6_s0") and not layers.match("bbq_gemma3_l12_cand32_s0")


def test_a_single_seed_answer_row_keeps_newcombes_asymmetric_interval_at_the_floor(grid, tmp_path, data_dir):
    """GSM8K at 270M: CRL solves 0 of 64 and static 1. Rebuilding a symmetric interval from the Newcombe interval's
    width (what pooling over seeds does) would put its upper end above what 1 discordant pair allows."""
    from crl_exp.stats import newcombe_paired_interval

    rec = record(0, 0.0, 1 / 64, 0.04)
    for c, k in (("none", 3), ("random", 0), ("static", 1), ("crl", 0), ("untrained", 0)):
        rec["examples"][c] = {"id": [f"ex{i}" for i in range(64)], "correct": [1.0] * k + [0.0] * (64 - k),
                              "reward": [0.05] * 64}
    rec.update(key="gsm8k_s0", task="gsm8k", group="answer_gsm8k", heldout_part="confirm",
               primary_metric="exact_match", n_heldout=64)
    (grid.RESULTS / "gsm8k_s0.json").write_text(json.dumps(rec))
    text = grid.write_report(tmp_path / "out.md")
    lo, hi = newcombe_paired_interval(0, 0, 1, 63)  # CRL right on none, static on 1: one discordant pair
    assert hi + lo < -0.005  # asymmetric: further below the delta than above it
    row = next(x for x in text.splitlines() if x.startswith("| `answer_gsm8k` | 0 | 64 |"))
    assert f"| -0.016 [{lo:+.3f}, {hi:+.3f}] |" in row


def test_ceiling_intervals_are_newcombe_from_the_recorded_margins(grid):
    """Records stored the ceiling's paired deltas as cluster bootstraps; the report rebuilds the 2x2 table from
    n, the shares, the delta and the discordance and gives the Newcombe interval every other binary delta has."""
    import answer_checks as checks

    from crl_exp.stats import newcombe_paired_interval, paired_binary_interval

    a = [True] * 300 + [False] * 200 + [True] * 60 + [False] * 40  # 600 paired outcomes
    b = [True] * 250 + [True] * 50 + [False] * 200 + [False] * 60 + [True] * 40
    n, delta = len(a), (sum(a) - sum(b)) / len(a)
    discordance = sum(x != y for x, y in zip(a, b, strict=True)) / n
    counts = checks.counts_from_margins(n, sum(a) / n, delta, discordance)
    e, f, g, h = counts
    assert (e, f, g, h) == (sum(x and y for x, y in zip(a, b, strict=True)), sum(x and not y for x, y in zip(a, b, strict=True)),
                            sum(y and not x for x, y in zip(a, b, strict=True)), sum(not x and not y for x, y in zip(a, b, strict=True)))
    record = {"primary_metric": "accuracy", "results": {"crl": {"metrics": {"accuracy": sum(a) / n}}},
              "reference_rows": {"ceiling": {"accuracy": sum(b) / n}, "paired": {"crl_minus_ceiling": {
                  "accuracy": {"delta": delta, "ci95": [-0.9, 0.9], "method": "bootstrap_clustered"},
                  "power": {"n": n, "discordance": discordance, "design_effect": 1.0}}}}}
    d, ci = checks.ceiling_interval(record, "crl_minus_ceiling")
    expected = paired_binary_interval(a, b)
    assert d == pytest.approx(delta) and ci == pytest.approx((expected["ci_low"], expected["ci_high"]))
    assert ci == pytest.approx(newcombe_paired_interval(*counts)) and ci[1] - ci[0] < 1.0


def test_prior_scorings_count_ids_that_runs_before_the_cut_scored(grid):
    import answer_checks as checks

    def rec(key, part, ids, commit="0" * 40):
        return {"key": key, "task": "bbq", "heldout_part": part, "commit": commit, "examples": {"crl": {"id": ids}}}

    before = rec("old_s0", None, ["a", "b", "x"])
    other = rec("mmlu_old", None, ["a"]) | {"task": "mmlu"}
    answer = rec("answer_s0", "confirm", ["a", "b", "c"])
    out = checks.prior_scorings([before, other, answer], answer)
    assert out["already_scored"] == 2 and out["by_record"] == {"old_s0": 2}
    assert checks.prior_scorings([before, answer], before)["already_scored"] == 0  # nothing came before it


def test_compare_sweep_and_the_recorded_report_pool_seeds_the_same_way(grid):
    """One seed pooling: the sweep table and the recorded report give the same interval for the same seeds."""
    from crl_exp.analysis.sweep_table import seed_aggregate

    deltas, cis = [0.02, -0.01, 0.05], [(-0.03, 0.07), (-0.05, 0.04), (0.0, 0.09)]
    rows = [{"task": "bbq", "layer": "12", "masking": "none", "seed": s, "delta_vs_static": d,
             "delta_vs_static_ci_low": lo, "delta_vs_static_ci_high": hi}
            for s, d, (lo, hi) in zip(range(3), deltas, cis, strict=True)]
    (agg,) = seed_aggregate(rows)
    report = grid.pool_intervals(deltas, cis)
    assert agg["crl_minus_static"] == pytest.approx(report["delta"])
    assert (agg["crl_minus_static_ci_low"], agg["crl_minus_static_ci_high"]) == pytest.approx(
        (report["ci_low"], report["ci_high"]))
