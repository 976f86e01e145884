"""Numbers that hold: the policy is scored in the action space it was trained in, intervals do not collapse and
respect clusters, the confirmation subset is scored only when asked, and the smaller defects that changed numbers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from crl_exp.crl.masking import MaskingConfig
from crl_exp.crl.module import CRLModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.errors import CRLConfigError
from crl_exp.stats import (
    bootstrap_ci,
    design_effect,
    mde_paired_binary,
    newcombe_paired_interval,
    paired_binary_interval,
    pool_seeds,
    proportion_interval,
    t_975,
)
from crl_exp.steering.controllers import RandomController
from test_reference_likelihood import compose_task


# ------------------------------------------------------------------------------------------- action space
def pooled_module(d_sae: int = 64, pool=(3, 7, 11, 19), masking: MaskingConfig | None = None) -> CRLModule:
    module = CRLModule(16, d_sae, PolicyConfig(hidden=8), PPOConfig(), masking or MaskingConfig(), 1, seed=0)
    module.mask.restrict(list(pool))
    with torch.no_grad():  # the untrained policy strongly prefers a feature it was never allowed to pick
        module.policy.actor_head.bias.zero_()
        module.policy.actor_head.bias[40] = 100.0
    return module


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_every_evaluation_controller_acts_inside_the_action_space(greedy, with_mask):
    """The sampled row used to sample over all logits (a candidates=32 policy put most of its mass outside the
    pool): every controller built from the module stays in the pool, whatever the logits say."""
    module = pooled_module()
    controller = module.controller(greedy=greedy, with_mask=with_mask, seed=3)
    features = controller(torch.randn(256, 16))  # features only: the steerer holds the coefficient
    assert set(features.tolist()) <= {3, 7, 11, 19}


def test_the_end_of_training_mask_applies_only_when_asked():
    module = pooled_module(masking=MaskingConfig(schedule="fixed", threshold=0.3, min_unmasked=2, period=5))
    module.mask.update(torch.tensor([3] * 9 + [7]), entropy=0.0)  # feature 3 is over the threshold: masked
    assert not bool(module.mask.allowed()[3]) and bool(module.action_space()[3])
    masked = module.controller(greedy=False, with_mask=True, seed=0)(torch.randn(512, 16))
    unmasked = module.controller(greedy=False, with_mask=False, seed=0)(torch.randn(512, 16))
    assert 3 not in masked.tolist() and set(masked.tolist()) <= {7, 11, 19}
    assert 3 in unmasked.tolist()


def test_action_shares_count_the_final_mask_apart_from_the_action_space():
    from crl_exp.evaluation.heldout import action_shares

    space = torch.zeros(10, dtype=torch.bool)
    space[[1, 2, 3]] = True
    final = space.clone()
    final[2] = False
    shares = action_shares([1, 2, 2, 3], space, final)
    assert shares == {"outside_action_space_share": 0.0, "final_mask_blocked_share": 0.5}


def test_random_baseline_draws_from_the_action_space_and_the_dictionary_row_from_everything():
    pooled = RandomController(4096, 0.5, seed=0, features=[5, 9, 12])
    drawn = torch.cat([pooled(torch.zeros(64, 4))[0] for _ in range(10)])
    assert set(drawn.tolist()) == {5, 9, 12}
    dictionary = RandomController(4096, 0.5, seed=0)
    everything = torch.cat([dictionary(torch.zeros(64, 4))[0] for _ in range(10)])
    assert len(set(everything.tolist())) > 500
    with pytest.raises(ValueError, match="at least one feature"):
        RandomController(10, 0.5, features=[])


def test_exhaustive_static_selection_tries_every_candidate_through_one_reward_table(tiny_lm):
    """One-token tasks: every candidate's validation reward from the shared-prefix table equals the reward of the
    same feature steered in ordinary batches, and the selection picks the best of all of them."""
    from crl_exp.evaluation.static_baseline import select_static_feature, try_features

    from helpers import PLANTED, planted_env

    env = planted_env(tiny_lm)
    train = env.task.split("train")
    exhaustive = select_static_feature(env, train, train, 8, 4, exhaustive=True)
    assert len(exhaustive.candidates) == 8 and exhaustive.feature == PLANTED
    plain = try_features(env, list(exhaustive.candidates), train, 4)
    for f, reward in exhaustive.candidates.items():
        assert reward == pytest.approx(plain[f], abs=1e-6), f
    assert exhaustive.episodes == len(train) + len(train) * 9  # ranking + table (8 features and unsteered)


# -------------------------------------------------------------------------------------------- intervals
def test_share_of_a_gap_is_nan_where_the_reference_ties_the_baseline():
    from crl_exp.stats import share_of_gap

    assert share_of_gap(0.05, 0.1) == pytest.approx(0.5)
    # a group oracle that picked the static feature everywhere: its "gap" is float noise (seen: 1e-10, which made
    # a -199,337,723% recovery)
    assert math.isnan(share_of_gap(-0.013, 6.5e-11)) and math.isnan(share_of_gap(0.01, -0.02))


def test_side_effects_count_items_fixed_and_broken_against_no_steering():
    from crl_exp.evaluation.comparison import side_effects

    none = [{"id": i, "correct": c, "reward": r} for i, (c, r) in enumerate([(0, .2), (1, .9), (1, .8), (0, .1)])]
    steered = [{"id": i, "correct": c, "reward": r} for i, (c, r) in enumerate([(1, .6), (0, .3), (1, .8), (0, .0)])]
    got = side_effects(none, steered)
    assert (got["fixed"], got["broken"], got["n"]) == (1, 1, 4)
    assert got["ratio"] == 0.5 and got["reward_worse_share"] == 0.5  # .9 -> .3 and .1 -> .0; .8 -> .8 is not worse
    assert math.isnan(side_effects(none, none)["ratio"])
    with pytest.raises(ValueError, match="same examples"):
        side_effects(none, steered[::-1])


def test_newcombe_paired_interval_does_not_collapse_when_the_conditions_agree():
    """The recorded HarmBench case: 0 vs 0 refusals at n = 64 gave a bootstrap [0, 0]; Newcombe gives +-0.057."""
    lo, hi = newcombe_paired_interval(0, 0, 0, 64)
    assert lo == pytest.approx(-0.0566, abs=5e-4) and hi == pytest.approx(0.0566, abs=5e-4)
    one = paired_binary_interval([True] + [False] * 63, [False] * 64)
    assert one["delta"] == pytest.approx(1 / 64) and one["ci_low"] < 0 < one["ci_high"]
    boot = bootstrap_ci(64, lambda idx: {"d": float((idx == 0).float().mean())}, n_boot=200)["d"]
    assert boot[1] - boot[0] < one["ci_high"] - one["ci_low"]


def test_newcombe_interval_is_antisymmetric_and_brackets_the_estimate():
    lo, hi = newcombe_paired_interval(30, 12, 5, 53)
    lo2, hi2 = newcombe_paired_interval(30, 5, 12, 53)
    assert lo == pytest.approx(-hi2) and hi == pytest.approx(-lo2)
    assert lo < 0.07 < hi and hi - lo < 0.2


def test_clusters_widen_intervals_of_correlated_examples():
    """Near-twin examples (one BBQ template) move together: resampling them as clusters widens the interval, and
    the design effect of perfectly correlated clusters of 5 is 5."""
    values = torch.tensor([1.0] * 5 + [0.0] * 5 + [1.0] * 5 + [0.0] * 5 + [1.0] * 5 + [0.0] * 5)
    clusters = [str(i // 5) for i in range(30)]
    plain = bootstrap_ci(30, lambda idx: {"m": values[idx].mean().item()}, n_boot=400, seed=0)["m"]
    clustered = bootstrap_ci(30, lambda idx: {"m": values[idx].mean().item()}, n_boot=400, seed=0,
                             clusters=clusters)["m"]
    assert clustered[1] - clustered[0] > 1.5 * (plain[1] - plain[0])
    # 1 + (m - 1) rho = 5, times the cluster-robust small-sample factor (k / (k - 1)) / (n / (n - 1))
    assert design_effect(values.tolist(), clusters) == pytest.approx(5.0 * (6 / 5) / (30 / 29))
    assert design_effect(values.tolist(), [str(i) for i in range(30)]) == pytest.approx(1.0)
    wide = proportion_interval([bool(v) for v in values], clusters)
    narrow = proportion_interval([bool(v) for v in values])
    assert wide[1] - wide[0] > 1.8 * (narrow[1] - narrow[0])


def test_seed_pooling_uses_students_t_and_keeps_the_shared_example_noise():
    """Three seeds: the between-seed part uses t with 2 degrees of freedom (4.30, not 1.96)."""
    pooled = pool_seeds([0.0, 0.03, 0.06], [0.0, 0.0, 0.0])
    se_b = 0.03 / math.sqrt(3)
    assert pooled["delta"] == pytest.approx(0.03)
    assert pooled["ci_high"] - pooled["delta"] == pytest.approx(t_975(2) * se_b, rel=1e-6)
    assert t_975(2) == pytest.approx(4.303)
    shared = pool_seeds([0.01, 0.01, 0.01], [0.02, 0.02, 0.02])
    assert shared["ci_high"] - shared["delta"] == pytest.approx(1.959964 * 0.02, rel=1e-5)  # not / sqrt(3)


def test_mde_is_a_planning_figure_that_exists_when_two_policies_agree():
    from crl_exp.evaluation.comparison import detectable_effects

    same = [{"correct": 1.0, "reward": 0.5}] * 100
    power = detectable_effects(same, same, [str(i) for i in range(100)], assumed_discordance=0.2)
    assert power["discordance"] == 0.0 and math.isnan(power["mde_correct_observed"])
    assert power["mde_correct"] == pytest.approx(mde_paired_binary(100, 0.2))


def test_held_out_statistics_are_clustered_and_binary_deltas_use_newcombe(data_dir):
    from crl_exp.evaluation.heldout import compare
    from crl_exp.tasks import build_task

    task = build_task(compose_task("bbq"), data_dir)
    examples = task.heldout("dev", 60)

    def records(correct):
        return [{"id": ex.id, "cluster": task.cluster(ex), "group": ex.meta["condition"], "category":
                 ex.meta["category"], "correct": float(c), "reward": 0.3 + 0.1 * c, "answer_kind": 0, "valid": True,
                 "parsed": "A"} for ex, c in zip(examples, correct, strict=True)]

    crl = records([1] * 60)
    base = records([1] * 60)
    results, deltas = compare(task, {"crl": crl, "none": base}, "accuracy", 100, 0, 0.2)
    d = deltas["none"]["accuracy"]
    assert d["delta"] == 0 and d["method"] == "newcombe_clustered" and d["ci95"][0] < -0.04
    assert results["crl"]["clusters"] == len({r["cluster"] for r in crl}) < 60
    assert results["crl"]["ci95"]["accuracy"][0] < 1.0  # Wilson, not the bootstrap's [1, 1]
    # a share a float32 mean cannot hold exactly (178 / 500) is still a binary metric: Newcombe, not the bootstrap
    examples = task.heldout("dev", 500)
    assert len(examples) == 500
    _, deltas = compare(task, {"crl": records([1] * 178 + [0] * 322), "none": records([1] * 172 + [0] * 328)},
                        "accuracy", 100, 0, 0.2)
    assert deltas["none"]["accuracy"]["method"] == "newcombe_clustered"


# ------------------------------------------------------------------------------------ held-out parts
@pytest.mark.parametrize("name", ["bbq", "mmlu", "xstest", "harmbench"])
def test_dev_and_confirmation_parts_split_the_test_split_without_splitting_a_cluster(data_dir, name):
    from crl_exp.tasks import build_task

    task = build_task(compose_task(name), data_dir)
    dev, confirm = task.heldout("dev"), task.heldout("confirm")
    test = task.split("test")
    assert {e.id for e in dev} | {e.id for e in confirm} == {e.id for e in test}
    assert not {e.id for e in dev} & {e.id for e in confirm}
    assert 0.3 < len(confirm) / len(test) < 0.7
    if name != "mmlu":  # MMLU cuts by question (its clusters are subjects: both parts keep every subject)
        assert not {task.cluster(e) for e in dev} & {task.cluster(e) for e in confirm}
    else:
        assert {e.group for e in dev} == {e.group for e in confirm}
    with pytest.raises(CRLConfigError, match="valid parts"):
        task.heldout("test")


def test_the_held_out_subset_is_stratified_not_a_plain_hash_sample(data_dir):
    """BBQ test-200 used to be 48% Age: the representative subset covers the categories evenly."""
    from crl_exp.tasks import build_task

    task = build_task(compose_task("bbq"), data_dir)
    subset = task.heldout("dev", 60)
    counts = pd.Series([e.group for e in subset]).value_counts()
    assert len(counts) == len({e.group for e in task.heldout("dev")}) and counts.max() - counts.min() <= 1


def test_the_confirmation_part_is_refused_without_confirm_and_without_a_ledger(data_dir, tmp_path):
    """``eval.heldout=confirm`` needs ``+confirm=true`` on the command line and a ledger; dev runs score dev."""
    from hydra import compose, initialize_config_dir

    from crl_exp.evaluation.config import eval_config
    from crl_exp.evaluation.heldout_comparison import heldout_examples
    from crl_exp.paths import CONFIG_DIR
    from crl_exp.tasks import build_task

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        dev = compose("config", overrides=["+experiment=bbq_layer12"])
        answer = compose("config", overrides=["+experiment=answer_bbq", f"eval.ledger={tmp_path / 'l.jsonl'}"])
        with pytest.raises(CRLConfigError, match="needs eval.ledger"):
            eval_config(compose("config", overrides=["+experiment=bbq_layer12", "eval.heldout=confirm"]).eval)
    assert dev.eval.heldout == "dev"
    task = build_task(answer.task, data_dir)
    with pytest.raises(CRLConfigError, match=r"\+confirm=true"):
        heldout_examples(task, eval_config(answer.eval), 10, confirmed=bool(answer.get("confirm", False)),
                         provenance={})
    assert not (tmp_path / "l.jsonl").exists()  # refused before anything was scored or written


def test_a_confirmation_scoring_appends_one_line_to_the_ledger_its_config_names(data_dir, tmp_path, monkeypatch):
    """The answer's configs name ``experiments/confirmation_ledger.jsonl``, resolved against the project root (not
    the working directory Hydra runs in), and each confirmation scoring appends exactly one line to it."""
    from hydra import compose, initialize_config_dir

    from crl_exp.evaluation import ledger
    from crl_exp.evaluation.config import eval_config
    from crl_exp.evaluation.heldout_comparison import heldout_examples
    from crl_exp.paths import CONFIG_DIR, PROJECT_ROOT
    from crl_exp.tasks import build_task

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for name in ("answer_bbq", "answer_mmlu", "answer_gsm8k", "answer_xstest", "answer_harmbench",
                     "answer_known_answer", "answer_bbq_dictionary", "answer_mmlu_pool128"):
            cfg = compose("config", overrides=[f"+experiment={name}"])
            assert cfg.eval.heldout == "confirm" and cfg.eval.ledger == ledger.ANSWER_LEDGER, name
        answer = compose("config", overrides=["+experiment=answer_bbq", "+confirm=true"])
    monkeypatch.chdir(tmp_path)  # a run folder elsewhere must not move the ledger
    assert ledger.ledger_path(answer.eval.ledger) == PROJECT_ROOT / "experiments" / "confirmation_ledger.jsonl"
    monkeypatch.setattr(ledger, "PROJECT_ROOT", tmp_path / "checkout")  # the test writes to a copy of the root
    task = build_task(answer.task, data_dir)
    for seed in (0, 1):
        examples = heldout_examples(task, eval_config(answer.eval), 12, confirmed=bool(answer.confirm),
                                    provenance={"config_hash": "abc", "commit": "deadbeef", "seed": seed,
                                                "run_id": f"run{seed}", "mode": "train"})
        assert len(examples) == 12 and {e.id for e in examples} <= {e.id for e in task.heldout("confirm")}
    lines = ledger.read_ledger(answer.eval.ledger)
    assert (tmp_path / "checkout" / ledger.ANSWER_LEDGER).is_file()
    assert [(x["seed"], x["task"], x["n"]) for x in lines] == [(0, "bbq", 12), (1, "bbq", 12)]


def test_bbq_bias_scores_are_reported_per_category(data_dir):
    from crl_exp.tasks import build_task
    from crl_exp.tasks.metrics import BIASED, UNKNOWN

    task = build_task(compose_task("bbq"), data_dir)
    examples = task.heldout("dev", 40)
    records = [{"group": ex.meta["condition"], "category": ex.meta["category"], "correct": 0.0, "valid": True,
                "answer_kind": BIASED if ex.meta["category"] == "Age" else UNKNOWN, "parsed": "A", "reward": 0.1}
               for ex in examples]
    metrics = task.metrics_from_records(records)
    assert metrics["bias_score_disambig/Age"] == 1.0  # every non-unknown Age answer is the biased one
    categories = {ex.meta["category"] for ex in examples}
    assert {f"bias_score_ambig/{c}" for c in categories} <= set(metrics)


def test_harmbench_contextual_behaviours_sharing_a_context_stay_on_one_side(data_dir):
    from crl_exp.tasks import build_task

    task = build_task(compose_task("harmbench"), data_dir)
    train = {e.context for e in task.split("train") if e.context}
    test = {e.context for e in task.split("test") if e.context}
    assert train and test and not train & test


# ---------------------------------------------------------------------------------- analyses and judge
def dense_log(v0s, returns, success):
    rows = []
    for ep, (v0, ret, ok) in enumerate(zip(v0s, returns, success, strict=True)):
        rows.append({"episode": ep, "prompt_id": f"p{ep}", "position": 0, "token_id": 1, "token_text": "x",
                     "feature": 0, "feature_prob": 0.5, "feature_act": 1.0, "value": v0, "reward": ret,
                     "correct": float(ok)})
    from crl_exp.analysis.intervention_log import to_frame

    return to_frame(rows), {f"p{ep}": 0.0 for ep in range(len(v0s))}


def test_critic_threshold_is_on_the_rewards_scale_and_a_poor_critic_is_not_analysed():
    from crl_exp.analysis.critic import analyse_critic

    # dense rewards around 0.2: a failure whose critic said 0.3 expected more than failures get (0.1)
    log, base = dense_log([0.32, 0.3, 0.12, 0.09], [0.33, 0.29, 0.1, 0.12], [True, False, False, False])
    report = analyse_critic(log, base)
    kinds = report.episodes.set_index("episode")["failure_kind"]
    assert kinds[1] == "value_estimation_error" and kinds[2] == "policy_limitation"
    assert report.metrics["critic/analysable"] == 1.0 and report.metrics["critic/value_estimation_errors"] == 1
    # a critic far off the reward's scale explains less than the mean: no split is made
    log, base = dense_log([0.9, -0.7, 0.6, -0.5], [0.33, 0.29, 0.1, 0.12], [True, False, False, False])
    poor = analyse_critic(log, base)
    assert poor.metrics["critic/explained_variance"] < 0 and poor.metrics["critic/analysable"] == 0.0
    assert set(poor.episodes["failure_kind"]) == {"", "critic_uninformative"}
    assert math.isnan(poor.metrics["critic/value_error_share_of_failures"])


@pytest.mark.parametrize("sigma", [0.5, 0.047])
def test_a_perfect_critic_in_normalised_units_is_read_as_perfect(sigma):
    """The critic learns rewards divided by their running std sigma (``CRLModule.scaled_rewards``): a critic that
    predicts E[r] / sigma exactly must score explained variance ~1 once the log carries sigma (read in raw units it
    scores -0.08 at sigma 0.5 and -329 at 0.047)."""
    from crl_exp.analysis.critic import analyse_critic
    from crl_exp.analysis.intervention_log import log_rows, to_frame

    class Tok:
        def decode(self, ids):
            return "x"

    g = torch.Generator().manual_seed(0)
    expected = 0.2 + sigma * torch.rand(400, generator=g)  # E[r] per prompt
    records = [{"id": f"p{i}", "reward": float(e), "correct": float(e > 0.2 + sigma / 2)} for i, e in enumerate(expected)]
    trajectory = {"feature": torch.zeros(400, 1, dtype=torch.long), "prob": torch.full((400, 1), 0.5),
                  "feature_act": torch.ones(400, 1), "value": (expected / sigma)[:, None]}
    log = to_frame(log_rows(records, torch.ones(400, 1, dtype=torch.long), trajectory, torch.ones(400, 1, dtype=torch.bool),
                            Tok(), value_scale=sigma))
    report = analyse_critic(log, {f"p{i}": 0.0 for i in range(400)})
    assert report.metrics["critic/explained_variance"] == pytest.approx(1.0, abs=1e-4)
    assert report.metrics["critic/reward_scale"] == pytest.approx(sigma)
    assert log["value"].iloc[0] == pytest.approx(float(expected[0]), rel=1e-5)  # V in reward units


def test_reward_scale_is_what_the_critic_targets_were_divided_by():
    module = CRLModule(8, 16, PolicyConfig(hidden=4), PPOConfig(norm_rewards=True), MaskingConfig(schedule="none"), 1)
    assert module.reward_scale() == 1.0  # before any rollout
    rewards = torch.tensor([0.1, 0.3, 0.2, 0.6])
    scaled = module.learner.scaled_rewards(rewards)
    assert torch.allclose(scaled * module.reward_scale(), rewards, atol=1e-6) and module.reward_scale() < 0.5


def test_syntactic_share_reads_top_activations_on_train_text():
    from crl_exp.analysis.feature_profile import usage_weighted_syntactic_share

    contexts = {1: [(3.0, "the cat sat on[[ the]]"), (2.0, "a[[,]]")], 2: [(4.0, "we saw a[[ tiger]]")], 3: []}
    share, per_feature = usage_weighted_syntactic_share({1: 3, 2: 1, 3: 5}, contexts)
    assert per_feature[1]["syntactic_share"] == 1.0 and per_feature[2]["syntactic_share"] == 0.0
    assert math.isnan(per_feature[3]["syntactic_share"])
    assert share == pytest.approx(0.75)


def test_model_judge_truncates_the_prompt_never_the_completion():
    from crl_exp.tasks.judges import fit_prompt

    from helpers import byte_tokenizer

    tok = byte_tokenizer()
    completion = "I cannot help with that request, because it is harmful."
    text = fit_prompt(tok, "{prompt}\n\n{completion}", "x" * 500 + " the request itself", completion, 128)
    assert text.endswith("\n\n" + completion) and len(tok(text).input_ids) <= 128
    assert "the request itself" in text  # the prompt's end (next to the completion) is what is kept
    short = fit_prompt(tok, "{prompt}\n\n{completion}", "hi", completion, 128)
    assert short == "hi\n\n" + completion


def test_the_no_op_action_leaves_the_token_alone_and_is_never_masked():
    """policy.noop_action=true: one more action (index d_sae) that steers nothing; AFM counts only features."""
    module = CRLModule(16, 64, PolicyConfig(hidden=8, noop_action=True), PPOConfig(),
                       MaskingConfig(schedule="fixed", threshold=0.3, min_unmasked=2, period=5), 1, seed=0)
    module.mask.restrict([3, 7, 11, 19])
    with torch.no_grad():
        module.policy.actor_head.bias.zero_()
        module.policy.actor_head.bias[64] = 100.0  # the no-op
    space = module.action_space()
    assert space.shape == (65,) and bool(space[64]) and int(space.sum()) == 5
    controller = module.controller(greedy=True, with_mask=True)
    features = controller(torch.randn(8, 16))
    assert torch.all(features == -1)  # the hook gets NO_FEATURE
    assert torch.all(controller.stacked()["feature"] == 64)  # PPO trains on the action index
    assert torch.all(controller.trajectory_for_logs()["feature"] == -1)
    module.mask.update(module.features_only(torch.tensor([64] * 20 + [3] * 9 + [7])), entropy=0.0)
    assert bool(module.allowed_actions()[64]) and not bool(module.allowed_actions()[3])


def synthetic_table(n: int, signal: bool, seed: int) -> tuple:
    """Two classes; class c's prompts are paid 1 by feature c and 0.2 by the others; states carry the class along
    one direction when ``signal``."""
    from crl_exp.reward_table import RewardTable

    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 2
    states = torch.randn(n, 16, generator=g)
    if signal:
        states[:, 0] += 4.0 * (2 * classes - 1)
    reward = torch.full((n, 4), 0.2)
    reward[torch.arange(n), classes] = 1.0
    table = RewardTable([10, 11, 12, 13], [f"c{int(c)}/{i}" for i, c in enumerate(classes)], reward, (reward > 0.5).float(),
                        torch.zeros(n), torch.zeros(n), states)
    return table, [f"c{int(c)}" for c in classes]


@pytest.mark.parametrize("signal", [True, False])
def test_the_ceiling_learns_what_the_state_makes_learnable_and_no_more(signal):
    from crl_exp.evaluation.ceiling import ceiling, group_oracle

    train, train_groups = synthetic_table(120, signal, 0)
    validation, _ = synthetic_table(60, signal, 1)
    heldout, held_groups = synthetic_table(80, signal, 2)
    oracle = group_oracle(train, train_groups, heldout, held_groups)
    assert oracle["reward"] == pytest.approx(1.0) and oracle["best_feature"] == {"c0": 10, "c1": 11}
    assert oracle["reward_by_group"] == pytest.approx({"c0": 1.0, "c1": 1.0})
    static = float(heldout.reward[:, train.best_column()].mean())
    row = ceiling(train, validation, heldout)
    if signal:  # the class is in the state: the ceiling reaches the group oracle
        assert row["reward"] >= 0.95 and row["distinct_actions"] == 2
    else:  # nothing to condition on: no better than one feature for everyone
        assert row["reward"] <= static + 0.1


def noisy_table(n: int, seed: int, n_actions: int = 33, d: int = 32):
    """No learnable signal beyond one feature: column 3 pays 0.3 on average, every other column 0.25, each cell
    with prompt-specific noise that random states cannot predict (what a softmax fit on 40 prompts overfits)."""
    from crl_exp.reward_table import RewardTable

    g = torch.Generator().manual_seed(seed)
    reward = 0.25 + 0.1 * torch.randn(n, n_actions, generator=g)
    reward[:, 3] += 0.05
    return RewardTable(list(range(100, 100 + n_actions)), [f"p{seed}/{i}" for i in range(n)], reward,
                       (reward > 0.3).float(), torch.zeros(n), torch.zeros(n), torch.randn(n, d, generator=g))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_ceiling_is_never_below_the_static_policy_on_validation(seed):
    """The softmax class holds the static policy, so the best policy validation can find scores at least the static
    feature there: the ceiling starts at that policy and keeps it unless a fit beats it on validation."""
    from crl_exp.evaluation.ceiling import ceiling, fit_softmax_policy, greedy_score

    train, validation, heldout = noisy_table(40, seed), noisy_table(64, seed + 10), noisy_table(64, seed + 20)
    static = validation.best_column()
    static_val = float(validation.reward[:, static].mean())
    row = ceiling(train, validation, heldout, seed=seed)
    assert row["static_column"] == static and row["static_validation_reward"] == pytest.approx(static_val)
    assert row["validation_reward"] >= static_val - 1e-7
    assert all(t["validation"]["reward"] <= row["validation_reward"] + 1e-7 for t in row["validation"])
    if row["kind"] == "static":  # then the held-out row is the static feature, exactly
        assert row["reward"] == pytest.approx(float(heldout.reward[:, static].mean()))
    # what the old grid did: an unshrunk linear fit run to the end loses to static on validation here
    *_, (_, policy, norm) = fit_softmax_policy(train.states, train.reward, "linear", 0.0, static)
    assert greedy_score(policy, norm, validation)["reward"] < static_val


# ------------------------------------------------------------------------------------ held-out from one table
def test_the_random_dictionary_row_is_drawn_per_seed():
    """Each run seed scores its own sample of the dictionary (it was one fixed sample shared by every run)."""
    from crl_exp.evaluation.table_scoring import dictionary_sample

    pool = list(range(32))
    draws = [dictionary_sample(4096, pool, 32, seed=s) for s in range(3)]
    assert all(len(d) == 32 and not set(d) & set(pool) for d in draws)
    assert len({tuple(d) for d in draws}) == 3 and draws[1] == dictionary_sample(4096, pool, 32, seed=1)


def test_every_condition_read_off_the_table_equals_its_rollout(tiny_lm):
    """The table-scored held-out comparison (evaluation/table_scoring.py) gives each condition exactly the records a
    rollout of that condition gives: none, a static feature, a random pool feature and a greedy policy."""
    from crl_exp.episodes import run_episodes
    from crl_exp.evaluation.table_scoring import (
        check_against_rollouts,
        dictionary_sample,
        feature_columns,
        policy_columns,
        random_columns,
        table_policy_variants,
    )
    from crl_exp.reward_table import reward_table
    from crl_exp.steering.controllers import StaticController

    from helpers import class_planted_env

    env = class_planted_env(tiny_lm)
    prompts = env.task.split("train")
    pool = [1, 2, 5, 7]
    dictionary = dictionary_sample(env.sae.d_sae, pool, 3, seed=0)
    assert len(dictionary) == 3 and not set(dictionary) & set(pool)
    table = reward_table(env, prompts, [*pool, *dictionary], keep_records=True)
    module = CRLModule(tiny_lm.d_model, env.sae.d_sae, PolicyConfig(hidden=16), PPOConfig(), MaskingConfig(), 2)
    module.mask.restrict(pool)
    greedy = module.controller(greedy=True, with_mask=False)
    columns = {"none": torch.zeros(len(prompts), dtype=torch.long),
               "static": feature_columns(table, torch.full((len(prompts),), 5)),
               "random": random_columns(table, pool, seed=3), "crl": policy_columns(greedy, table)}
    assert set(columns["random"].tolist()) <= {1, 2, 3, 4} and int(columns["crl"].max()) <= len(pool)
    rolled = {"none": run_episodes(env.task, tiny_lm, prompts, 4)[0],
              "static": run_episodes(env.task, tiny_lm, prompts, 4, env.steerer, StaticController(5, env.coefficient))[0],
              "random": run_episodes(env.task, tiny_lm, prompts, len(prompts), env.steerer, StaticController(
                  torch.tensor([table.features[c - 1] for c in columns["random"].tolist()]), env.coefficient))[0],
              "crl": run_episodes(env.task, tiny_lm, prompts, 4, env.steerer, module.controller(
                  greedy=True, with_mask=False))[0]}
    for name, cols in columns.items():
        read = table.cell_records(cols)
        assert check_against_rollouts(read, rolled[name]) < 1e-5, name
        assert [r["completion"] for r in read] == [r["completion"] for r in rolled[name]], name
        assert all(r["prompt"] == s["prompt"] for r, s in zip(read, rolled[name], strict=True))
    variants = table_policy_variants(module, env, table, env.task, "accuracy", 3, False, columns["crl"])
    assert variants["crl_sampled"]["seeds"] == 3 and variants["crl_mask_on"]["same_episodes_as_greedy"]
    with pytest.raises(ValueError, match="not columns of the reward table"):
        feature_columns(table, torch.tensor([9999]))


def test_reward_tables_are_cached_under_everything_they_depend_on(tiny_lm, tmp_path):
    """A second identical table is read from disk; another coefficient is another table."""
    from crl_exp.reward_table import reward_table

    from helpers import planted_env

    env = planted_env(tiny_lm)
    env.table_cache = tmp_path
    prompts = env.task.split("train")
    first = reward_table(env, prompts, [1, 2], keep_records=True)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    again = reward_table(env, prompts, [1, 2], keep_records=True)
    assert torch.equal(first.reward, again.reward) and again.records == first.records
    env.coefficient *= 2
    other = reward_table(env, prompts, [1, 2], keep_records=True)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and other.records is not None
    reward_table(env, prompts, [1, 2], use_cache=False)
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_all_actions_update_reports_the_kl_of_the_step_it_took():
    """approx_kl is KL(before || after) of each epoch's step; it was measured before the step, so one epoch always
    reported 0 however far the policy moved."""
    from crl_exp.crl.policy import ActorCritic
    from crl_exp.crl.ppo import all_actions_update

    torch.manual_seed(0)
    policy = ActorCritic(8, 6, hidden=16)
    cfg = PPOConfig(update_epochs=1, lr=0.05, ent_coef=0.0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    states, features = torch.randn(16, 8), torch.arange(6)
    rewards = torch.zeros(16, 6)
    rewards[:, 2] = 1.0
    allowed = torch.ones(6, dtype=torch.bool)
    with torch.no_grad():
        before = policy(states, allowed)[0].log_softmax(-1)
    stats = all_actions_update(policy, optimizer, cfg, 0, states, rewards, features, allowed)
    with torch.no_grad():
        after = policy(states, allowed)[0].log_softmax(-1)
    kl = float((before.exp() * (before - after)).sum(-1).mean())
    assert kl > 1e-6 and stats["approx_kl"] == pytest.approx(kl, rel=1e-4)


def test_earlier_scorings_count_what_a_run_shares_with_earlier_records():
    from crl_exp.evaluation.ledger import earlier_scorings

    out = earlier_scorings(["a", "b", "c", "d"], {"run1": ["a", "x"], "run2": ["a", "b"], "run3": ["y"]})
    assert out["n"] == 4 and out["already_scored"] == 2 and out["scorings"] == 3
    assert out["by_record"] == {"run1": 1, "run2": 2} and out["ids"] == ["a", "b"]
    assert earlier_scorings(["a"], {})["already_scored"] == 0


def test_gap_recovered_is_stated_only_where_the_gap_exceeds_the_mde():
    """make train printed "CRL recovered -1744% of the static-to-group-oracle reward gap" for a gap inside the
    noise; a share is now stated only for a gap larger than the held-out set's reward MDE."""
    from crl_exp.evaluation.references import gap_sentence

    assert "no share of it is stated" in gap_sentence("group-oracle", 0.001, -2.29, 0.006)
    assert "%" not in gap_sentence("group-oracle", 0.001, -2.29, 0.006)
    assert "CRL recovered 88% of the static-to-group-oracle reward gap" in gap_sentence("group-oracle", 0.25, 0.88, 0.01)
    assert "no share" in gap_sentence("ceiling", float("nan"), float("nan"), 0.01)


def test_a_pick_counts_when_it_is_the_groups_best_or_at_least_as_good_on_validation():
    """The dictionary learner's pick is judged by exact validation reward on its group: the best train feature, an
    equally good one, or not; the no-op by the unsteered reward."""
    from crl_exp.evaluation.ceiling import at_least_as_good, group_means
    from crl_exp.reward_table import RewardTable

    # validation: group a has features 10 (0.8), 11 (0.8), 12 (0.5); group b 10 (0.1), 11 (0.2), 12 (0.9)
    reward = torch.tensor([[0.7, 0.9, 0.5], [0.9, 0.7, 0.5], [0.1, 0.2, 0.9], [0.1, 0.2, 0.9]])
    table = RewardTable([10, 11, 12], ["a0", "a1", "b0", "b1"], reward, (reward > 0.5).float(),
                        torch.tensor([0.85, 0.85, 0.0, 0.0]), torch.zeros(4), torch.zeros(4, 3))
    means = group_means(table, ["a", "a", "b", "b"])
    assert means["a"][11] == pytest.approx(0.8) and means["a"][-1] == pytest.approx(0.85)
    best = {"a": 10, "b": 12}
    picks = [10, 11, 12, -1, 12, 11, 10]
    groups = ["a", "a", "a", "a", "b", "b", "c"]
    assert at_least_as_good(picks, groups, best, means) == [True, True, False, True, True, False, False]
