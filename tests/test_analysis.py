"""Interpretability outputs: intervention log, branch points (planted + cache identity), critic, HTML report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from crl_exp.analysis.branch_points import Episode, track_branches
from crl_exp.analysis.critic import analyse_critic, auroc, outcome_group
from crl_exp.analysis.intervention_log import COLUMNS, log_rows, to_frame
from crl_exp.analysis.report import render_report
from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.rollout import PolicyController
from crl_exp.episodes import rollout_batch

from helpers import COEF, D_SAE, PLANTED, PLANTED_PROMPTS, PlantedTask, planted_env, save_standard_sae


class ThirdTokenTask(PlantedTask):
    """Correct iff the third generated character is the target: only step 2's choice should matter."""

    def __init__(self, prompts, max_new_tokens=4):
        super().__init__(prompts)
        self.cfg.max_new_tokens = max_new_tokens

    def score_batch(self, examples, prompts, completions, option_probs=None):
        return [{"parsed": c[2:3], "valid": True, "correct": float(c[2:3] == "Z"), "reward": float(c[2:3] == "Z")}
                for c in completions]


def constant_policy(d_model: int, feature: int) -> ActorCritic:
    policy = ActorCritic(d_model, D_SAE, hidden=16)
    with torch.no_grad():
        policy.actor_head.weight.zero_()
        policy.actor_head.bias.zero_()
        policy.actor_head.bias[feature] = 10.0
    return policy


def rollout(env, policy, task, prompts_idx=(0, 1, 2)):
    examples = [task.split("train")[i] for i in prompts_idx]
    ctrl = PolicyController(policy, COEF, greedy=True, sae=env.sae.sae)
    records, gen = rollout_batch(task, env.lm, examples, env.steerer, ctrl)
    traj = ctrl.stacked()
    valid = gen.valid
    return examples, records, gen, traj, valid


def test_intervention_log_schema_and_row_counts(tiny_lm):
    env = planted_env(tiny_lm)
    task = ThirdTokenTask(PLANTED_PROMPTS, max_new_tokens=5)
    policy = ActorCritic(tiny_lm.d_model, D_SAE, hidden=16)
    examples, records, gen, traj, valid = rollout(env, policy, task)
    rows = log_rows(records, gen.new_tokens, traj, valid, tiny_lm.tokenizer, episode_offset=10)
    df = to_frame(rows)
    assert list(df.columns) == COLUMNS
    assert len(df) == int(valid.sum())
    assert sorted(df["episode"].unique()) == [10, 11, 12]
    first = df[df["episode"] == 10].sort_values("position")
    assert first["feature"].tolist() == traj["feature"][0, : len(first)].tolist()
    assert first["token_id"].tolist() == gen.new_tokens[0, : len(first)].tolist()
    assert torch.allclose(torch.tensor(first["value"].tolist()), traj["value"][0, : len(first)])
    assert df["prompt_id"].iloc[0] == examples[0].id


def test_planted_branch_point_is_found(tiny_lm):
    env = planted_env(tiny_lm)
    task = ThirdTokenTask(PLANTED_PROMPTS)
    policy = constant_policy(tiny_lm.d_model, PLANTED)
    examples, records, gen, traj, valid = rollout(env, policy, task, (0,))
    assert records[0]["correct"] == 1.0  # the planted feature writes the target at every step
    episode = Episode(examples[0], gen.new_tokens[0][valid[0]].tolist(), traj["feature"][0][valid[0]].tolist(), True)
    result = track_branches(task, env.lm, env.steerer, policy, COEF, episode, 0, k_alternatives=2)
    points = result.branch_points()
    assert [p["position"] for p in points] == [2]
    assert points[0]["chosen_feature"] == PLANTED and -1 in points[0]["flipping_alternatives"]
    scores = result.scores()
    assert scores[2] == 1.0 and scores[0] == scores[1] == scores[3] == 0.0
    controls = [r for r in result.rows if r["control"]]
    assert [r["alternative"] for r in controls] == [PLANTED] * 4 and result.control_flips() == []


def test_branch_points_stay_inside_the_policy_action_space(tiny_lm):
    """A pool-trained policy whose untrained logits favour a feature outside its pool: the alternatives and every
    greedy continuation stay inside the pool (and the no-op, when the policy has one, is "no steering")."""
    env = planted_env(tiny_lm)
    task = ThirdTokenTask(PLANTED_PROMPTS)
    pool = [1, 2, PLANTED]
    outside = next(f for f in range(D_SAE) if f not in pool)
    policy = ActorCritic(tiny_lm.d_model, D_SAE, hidden=16, noop_action=True)
    with torch.no_grad():
        policy.actor_head.weight.zero_()
        policy.actor_head.bias.zero_()
        policy.actor_head.bias[outside] = 10.0
        policy.actor_head.bias[D_SAE] = 9.0  # the no-op next
        policy.actor_head.bias[PLANTED] = 8.0
    allowed = torch.zeros(D_SAE + 1, dtype=torch.bool)
    allowed[pool + [D_SAE]] = True
    examples = [task.split("train")[0]]
    ctrl = PolicyController(policy, COEF, allowed=allowed, greedy=True, sae=env.sae.sae)
    records, gen = rollout_batch(task, env.lm, examples, env.steerer, ctrl)
    actions = ctrl.trajectory_for_logs()["feature"][0][gen.valid[0]].tolist()
    assert set(actions) == {-1}  # the no-op, written as no steering
    episode = Episode(examples[0], gen.new_tokens[0][gen.valid[0]].tolist(), actions, bool(records[0]["correct"]))
    for naive in (False, True):
        result = track_branches(task, env.lm, env.steerer, policy, COEF, episode, 0, k_alternatives=2, naive=naive,
                                allowed=allowed)
        alternatives = {r["alternative"] for r in result.rows}
        assert alternatives <= {-1, *pool} and PLANTED in alternatives, alternatives
    unrestricted = track_branches(task, env.lm, env.steerer, policy, COEF, episode, 0, k_alternatives=2)
    assert outside in {r["alternative"] for r in unrestricted.rows}  # what the analysis did before


LONG_PROMPTS = ["x", "The quick brown fox jumps over the lazy dog, and then"]  # > the 16-token sliding window


@pytest.mark.parametrize("prompts, new_tokens, max_rows", [(PLANTED_PROMPTS, 6, 64), (LONG_PROMPTS, 8, 7)])
def test_cached_prefix_branches_match_from_scratch_replay(tiny_lm, prompts, new_tokens, max_rows):
    """All steps' continuations as rows of left-padded cached generates (chunked by ``max_rows``) are
    token-identical to regenerating each from the prompt, also past Gemma 3's sliding window."""
    env = planted_env(tiny_lm)
    task = ThirdTokenTask(prompts, max_new_tokens=new_tokens)
    torch.manual_seed(5)
    policy = ActorCritic(tiny_lm.d_model, D_SAE, hidden=16)
    with torch.no_grad():
        policy.actor_head.weight.normal_(0, 1.0)  # a policy whose choices depend on the state
    examples, records, gen, traj, valid = rollout(env, policy, task, (1,))
    episode = Episode(examples[0], gen.new_tokens[0][valid[0]].tolist(), traj["feature"][0][valid[0]].tolist(),
                      bool(records[0]["correct"]))
    cached = track_branches(task, env.lm, env.steerer, policy, COEF, episode, 0, k_alternatives=2,
                            max_rows=max_rows)
    naive = track_branches(task, env.lm, env.steerer, policy, COEF, episode, 0, k_alternatives=2, naive=True)
    assert len(cached.rows) == len(naive.rows) == len(episode.new_tokens) * 4  # control + none + 2 next-best
    for a, b in zip(cached.rows, naive.rows, strict=True):
        assert (a["position"], a["alternative"]) == (b["position"], b["alternative"])
        assert a["tokens"] == b["tokens"], (a["position"], a["alternative"])
    # Replaying the policy's own choice (the control) reproduces the episode: a check of the replay itself.
    for row in (r for r in cached.rows if r["control"]):
        assert row["tokens"] == episode.new_tokens and not row["flips"]
    assert any(r["tokens"] != episode.new_tokens for r in cached.rows)


def synthetic_log() -> tuple[pd.DataFrame, dict[str, float]]:
    rows = []
    # episode: (v0, success, baseline correct)
    spec = {0: (0.9, True, True), 1: (0.8, False, True), 2: (0.1, False, False), 3: (0.7, True, False),
            4: (0.2, False, True)}
    for ep, (v0, ok, _) in spec.items():
        for t in range(3):
            rows.append({"episode": ep, "prompt_id": f"p{ep}", "position": t, "token_id": 1, "token_text": "x",
                         "feature": t, "feature_prob": 0.5, "feature_act": 1.0, "value": v0 - 0.1 * t,
                         "reward": float(ok), "correct": float(ok)})
    return to_frame(rows), {f"p{ep}": float(base) for ep, (_, _, base) in spec.items()}


def test_critic_analysis_on_synthetic_trajectories():
    log, baseline = synthetic_log()
    report = analyse_critic(log, baseline, threshold=0.5)
    eps = report.episodes.set_index("episode")
    assert eps.loc[1, "failure_kind"] == "value_estimation_error"  # failed although V_0 = 0.8
    assert eps.loc[2, "failure_kind"] == "policy_limitation" and eps.loc[4, "failure_kind"] == "policy_limitation"
    assert list(eps["group"]) == ["correct", "misguided", "incorrect", "corrected", "misguided"]
    m = report.metrics
    assert m["critic/v0_auroc"] == pytest.approx(5 / 6)  # successes {0.9, 0.7} vs failures {0.8, 0.1, 0.2}
    expected_brier = ((0.9 - 1) ** 2 + 0.8**2 + 0.1**2 + (0.7 - 1) ** 2 + 0.2**2) / 5
    assert m["critic/v0_brier"] == pytest.approx(expected_brier)
    assert m["critic/value_estimation_errors"] == 1 and m["critic/policy_limitations"] == 2
    assert outcome_group(True, False) == "corrected" and auroc(torch.tensor([1.0]), torch.tensor([1.0])) != 0.5
    with pytest.raises(ValueError, match="non-empty"):
        analyse_critic(to_frame([]), baseline)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is required for the report test (make test installs it)")
    return path


def test_report_shows_a_bbq_episode_with_its_context_options_and_the_features_top_contexts():
    """A BBQ episode is judged by its passage and options, not "Who forgets things?" alone; each used feature comes
    with its top activating train contexts."""
    from crl_exp.analysis.report import episode_context
    from crl_exp.tasks.schema import Example

    log, _ = synthetic_log()
    ex = Example("bbq-1", "bbq", "Who forgets things?", "C", "ambig",
                 choices=("The grandfather", "The grandson", "Can't be determined"),
                 context="I saw a grandson and their grandfather last week outside the Walmart.")
    info = {"question": ex.question, "answer": ex.answer, **episode_context(ex)}
    features = sorted(set(log["feature"].tolist()))
    html = render_report(log, {1: info}, "BBQ", feature_contexts={features[0]: [(7.5, "the old man [[forgot]]")]})
    assert "grandfather last week outside the Walmart" in html
    assert "A. The grandfather" in html and "C. Can&#x27;t be determined" in html
    assert "7.5: &hellip;the old man [[forgot]]" in html
    assert episode_context(None) == {} and "options" not in episode_context(Example("g", "gsm8k", "1+1?", "2", "all"))


@pytest.mark.slow  # starts a browser
def test_html_report_renders_in_headless_chromium(tmp_path):
    log, _ = synthetic_log()
    log.loc[log["episode"] == 1, "token_text"] = ["Al", "pha", "!"]
    few_shot = "Q: say beta\nA: Beta!\n\n" * 20
    html = render_report(log, {1: {"prompt": few_shot + "Q: Say alpha\nA:", "question": "Say alpha", "answer": "Alpha",
                                   "completion": "Alpha!", "correct": 0.0, "unsteered": "Beta?",
                                   "unsteered_correct": 0.0}}, "Test report",
                         branch_points={1: [{"position": 1, "chosen_feature": 1, "chosen_correct": False,
                                             "flipping_alternatives": [-1, 7], "branch_score": 1.0}]})
    page = tmp_path / "report.html"
    page.write_text(html)
    assert "http" not in html  # self-contained: no external resources
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "Test report" in dom and "Most-used features" in dom
    assert 'data-position="1"' in dom and ">pha<" in dom
    assert dom.count('class="tok branch"') == 1
    assert "flips with -1, 7" in dom
    assert 'title="feature 1 | p=0.500 | act=1.00 | V=0.700 | step 1"' in dom
    # the reader sees the question (not the few-shot exemplars), the gold answer and the unsteered completion
    assert "Say alpha" in dom and "say beta" not in dom and "Gold answer</b> Alpha" in dom
    assert "unsteered (wrong)" in dom and "Beta?" in dom


@pytest.mark.slow
def test_layer_comparison_and_branch_analysis_from_mlflow_runs(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    from hydra import compose, initialize_config_dir
    from mlflow.tracking import MlflowClient

    from crl_exp.app import run
    from crl_exp.errors import CRLConfigError
    from crl_exp.paths import CONFIG_DIR
    from crl_exp.saes import resid_post_hook_name


    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'db'}"

    def cfg(*overrides):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=[f"logger.tracking_uri={db}", f"data_dir={data_dir}",
                                                "model=hf", f"model.path={tiny_model_dir}", *overrides])

    small = ["budget.iterations=2", "budget.episodes_per_iteration=4", "budget.group_size=2", "budget.eval_examples=4",
             "budget.static_feature.train_examples=4", "budget.static_feature.candidates=1", "masking=none",
             "steering.coefficient_scale=absolute", "steering.coefficient=5", "eval.n_bootstrap=20",
             "trainer.progress_bar=false", "task.max_new_tokens=3"]
    for layer in (0, 1):
        save_standard_sae(tmp_path / f"sae{layer}", 64, resid_post_hook_name(layer), d_sae=32)
        run(cfg("+experiment=gsm8k_layer12", "sae=local", f"sae.path={tmp_path / f'sae{layer}'}",
                f"sae.layer={layer}", *small, f"analysis.at_end_of_training={layer == 1}", "analysis.episodes=1",
                "analysis.max_steps=1"))
    client = MlflowClient(db)
    train_runs = client.search_runs([client.get_experiment_by_name("crl-gsm8k").experiment_id])
    assert len(train_runs) == 2
    with_branches = [r for r in train_runs if "branch/points" in r.data.metrics]
    assert len(with_branches) == 1 and with_branches[0].data.tags["layer"] == "1"
    html = (tmp_path / "outputs" / train_runs[0].info.run_id / "interventions" / "report.html").read_text()
    assert "Most-used features" in html

    run(cfg("mode=compare_layers", "compare.experiment_name=crl-gsm8k", "logger.experiment_name=summaries"))
    summary = client.search_runs([client.get_experiment_by_name("summaries").experiment_id])[0]
    local = client.download_artifacts(summary.info.run_id, "compare_layers", str(tmp_path / "dl"))
    table = pd.read_csv(f"{local}/layers.csv")
    assert table["layer"].tolist() == [0, 1]
    assert {"gain", "gain_ci_low", "gain_ci_high", "distinct_features_heldout", "syntactic_share"} <= set(table.columns)
    assert (tmp_path / "dl" / "compare_layers" / "layers.png").stat().st_size > 1000

    # a sweep mixing tasks is refused unless grouped explicitly
    save_standard_sae(tmp_path / "sae_b", 64, resid_post_hook_name(1), d_sae=32)
    run(cfg("+experiment=bbq_layer12", "sae=local", f"sae.path={tmp_path / 'sae_b'}", "sae.layer=1", *small,
            "logger.experiment_name=crl-gsm8k"))
    with pytest.raises(CRLConfigError, match="mixes models/tasks"):
        run(cfg("mode=compare_layers", "compare.experiment_name=crl-gsm8k", "logger.experiment_name=summaries"))
    run(cfg("mode=compare_layers", "compare.experiment_name=crl-gsm8k", "compare.group_by_task_model=true",
            "logger.experiment_name=summaries"))

    # branch points of a trained run, read back from MLflow
    source = train_runs[0].info.run_id
    run(cfg("mode=analyse", f"run_id={source}", "analysis.episodes=2", "analysis.max_steps=2",
            "logger.experiment_name=analyses"))
    analysis = client.search_runs([client.get_experiment_by_name("analyses").experiment_id])[0]
    assert analysis.data.tags["source_run_id"] == source
    assert analysis.data.metrics["branch/alternatives_evaluated"] == 2 * 2 * 3
    assert analysis.data.metrics["branch/controls_evaluated"] == 2 * 2
    assert analysis.data.metrics["branch/control_flips"] == 0
    branch_html = Path(client.download_artifacts(analysis.info.run_id, "branch_points/report.html",
                                                 str(tmp_path / "bp"))).read_text()
    assert "top activating train contexts" in branch_html and ": &hellip;" in branch_html  # each feature's contexts
    with pytest.raises(CRLConfigError, match="Unknown MLflow run id"):
        run(cfg("mode=analyse", "run_id=0123456789abcdef", "logger.experiment_name=analyses"))
    with pytest.raises(CRLConfigError, match="not a CRL training run"):
        run(cfg("mode=analyse", f"run_id={summary.info.run_id}", "logger.experiment_name=analyses"))

    # the most-used features of the same run: usage, top contexts on train text, and what they did
    run(cfg("mode=analyse", "analysis=top_features", f"run_id={source}", "analysis.n_features=3",
            "analysis.corpus_tokens=512", "logger.experiment_name=analyses"))
    top = client.search_runs([client.get_experiment_by_name("analyses").experiment_id],
                             "tags.analysis = 'top_features'")[0]
    rows = json.loads(Path(client.download_artifacts(top.info.run_id, "top_features/top_features.json",
                                                     str(tmp_path / "top"))).read_text())
    log = pd.read_parquet(client.download_artifacts(source, "interventions/intervention_log.parquet",
                                                    str(tmp_path / "log")))
    assert [r["feature"] for r in rows] == log["feature"].value_counts().head(3).index.tolist()
    assert [r["steered_tokens"] for r in rows] == log["feature"].value_counts().head(3).tolist()
    assert all(r["top_contexts"] and r["top_contexts"][0][1].endswith("]]") for r in rows)

    # what the same policy's steering costs on another task: no steering, its static feature and the policy on the
    # same MMLU prompts, with paired deltas and side effects
    run(cfg("mode=analyse", "analysis=off_task", f"run_id={source}", "analysis.limit=4", "analysis.batch_size=4",
            "logger.experiment_name=analyses"))
    off = client.search_runs([client.get_experiment_by_name("analyses").experiment_id],
                             "tags.analysis = 'off_task'")[0]
    result = json.loads(Path(client.download_artifacts(off.info.run_id, "off_task/mmlu.json",
                                                       str(tmp_path / "off"))).read_text())
    assert off.data.tags["off_task"] == "mmlu" and result["source_task"] == "gsm8k" and result["n"] == 4
    assert set(result["conditions"]) == {"none", "static", "crl"}
    acc = {c: off.data.metrics[f"off_task/{c}/accuracy"] for c in ("none", "static", "crl")}
    assert off.data.metrics["off_task/crl_minus_none"] == pytest.approx(acc["crl"] - acc["none"])
    assert off.data.metrics["off_task/static_minus_none"] == pytest.approx(acc["static"] - acc["none"])
    for cond in ("static", "crl"):
        e = result["side_effects"][cond]
        assert e["fixed"] - e["broken"] == round(4 * (acc[cond] - acc["none"])) and e["n"] == 4
    with pytest.raises(CRLConfigError, match="not a task; valid: .*mmlu"):
        run(cfg("mode=analyse", "analysis=off_task", "analysis.task=mmlu_pro", f"run_id={source}",
                "logger.experiment_name=analyses"))
    with pytest.raises(CRLConfigError, match="train or validation"):
        run(cfg("mode=analyse", "analysis=off_task", "analysis.split=test", f"run_id={source}",
                "logger.experiment_name=analyses"))


def test_feature_effects_count_flips_against_the_unsteered_prompts():
    from crl_exp.analysis.top_features import feature_effects, most_used

    log = pd.DataFrame({"episode": [0, 0, 1, 2, 3], "feature": [5, 5, 5, 9, 9],
                        "token_text": ["A", "B", "A", "C", "C"]})
    crl = [{"correct": 1.0, "reward": 0.9}, {"correct": 0.0, "reward": 0.1}, {"correct": 1.0, "reward": 0.8},
           {"correct": 0.0, "reward": 0.2}]
    none = [{"correct": 0.0, "reward": 0.3}, {"correct": 1.0, "reward": 0.6}, {"correct": 1.0, "reward": 0.7},
            {"correct": 0.0, "reward": 0.2}]
    assert most_used(log, 1) == [5]
    effects = feature_effects(log, crl, none, [5, 9])
    five, nine = effects[5], effects[9]
    assert (five.steered_tokens, five.episodes, five.produced[0]) == (3, 2, "A")
    assert (five.fixed, five.broke, five.correct_steered, five.correct_unsteered) == (1, 1, 0.5, 0.5)
    assert five.reward_steered == pytest.approx(0.5) and five.reward_unsteered == pytest.approx(0.45)
    assert (nine.episodes, nine.fixed, nine.broke, nine.correct_unsteered) == (2, 0, 0, 0.5)


def test_off_task_scoring_keeps_the_source_runs_prompt_template_unless_told():
    from omegaconf import OmegaConf

    from crl_exp.errors import CRLConfigError
    from crl_exp.modes.analyse import off_task_config

    chat_run = OmegaConf.create({"task": {"name": "xstest", "template": "chat"}})
    base_run = OmegaConf.create({"task": {"name": "harmbench"}})
    assert off_task_config(chat_run, "mmlu", None).template == "chat"
    assert off_task_config(base_run, "mmlu", None).template == "base"
    assert off_task_config(chat_run, "mmlu", "base").template == "base"
    assert off_task_config(chat_run, "mmlu", None).name == "mmlu"
    with pytest.raises(CRLConfigError, match="valid: bbq, gsm8k"):
        off_task_config(chat_run, "nope", None)


def test_corpus_top_contexts_are_the_strongest_sae_activations(tiny_lm, tmp_path):
    from crl_exp.analysis.top_features import corpus_top_contexts
    from crl_exp.saes.activations import collect_resid_post, pack_tokens, tokenize_texts

    sae = save_standard_sae(tmp_path / "sae", 64, None, d_sae=16)
    texts = ["The cat sat on the mat. " * 4, "Numbers: 1 2 3 4 5 6 7 8 9. " * 4]
    got = corpus_top_contexts(tiny_lm, sae, 1, texts, [3, 7], n_tokens=200, k=2, context_size=32)
    bos = tiny_lm.tokenizer.bos_token_id
    rows = pack_tokens(tokenize_texts(tiny_lm.tokenizer, texts, 220), 32, bos)[: -(-200 // 31)]
    acts = sae.encode(collect_resid_post(tiny_lm.model, 1, rows))
    for f in (3, 7):
        best = acts[:, f].max().item()
        if best > 0:
            assert got[f][0][0] == pytest.approx(best, rel=1e-5) and got[f][0][1].endswith("]]")
            assert len(got[f]) <= 2 and got[f][0][0] >= got[f][-1][0]
        else:
            assert got[f] == []
