"""CRL learns: the planted-feature test, resume from checkpoints, masking, and NaN guards."""

from __future__ import annotations

import copy

import pytest
import torch

from crl_exp.crl.masking import AdaptiveFeatureMask, MaskingConfig
from crl_exp.crl.module import CRLModule, PromptDataModule
from crl_exp.crl.policy import PolicyConfig
from crl_exp.crl.ppo import PPOConfig
from crl_exp.crl.trainer import build_trainer, fit_policy
from crl_exp.errors import CRLConfigError
from crl_exp.generation import generate
from crl_exp.saes.loading import resid_post_hook_name
from crl_exp.steering import StaticController

from helpers import COEF, D_SAE, PLANTED, TARGET, planted_env, save_standard_sae
from helpers import PLANTED_PROMPTS as PROMPTS


def static_reward(env, feature: int) -> float:
    gen = generate(env.lm, PROMPTS, 1, env.steerer, StaticController(feature, COEF))
    return sum(c.startswith(TARGET) for c in gen.completions) / len(PROMPTS)


def make_module(env, iterations, masking=None, policy=None, **ppo):
    # the clipped-PPO path (the planted tests below are its checks); ppo.advantage=auto would pick sampled_set here
    ppo_cfg = PPOConfig(**{"advantage": "gae", "lr": 3e-3, "ent_coef": 0.0, "update_epochs": 4, "num_minibatches": 2,
                           **ppo})
    module = CRLModule(env.lm.d_model, D_SAE, policy or PolicyConfig(hidden=32), ppo_cfg, masking or MaskingConfig(),
                       iterations, seed=0)
    return module.attach(env)


def train(env, tmp_path, iterations=25, group_size=1, **kw):
    module = make_module(env, iterations, **kw)
    fit_policy(module, PromptDataModule(env.task, 12, seed=0, group_size=group_size),
               build_trainer(iterations, tmp_path / "ckpt", progress_bar=False))
    return module


def test_planted_feature_is_found(tiny_lm, tmp_path):
    env = planted_env(tiny_lm)
    rewards = {f: static_reward(env, f) for f in range(D_SAE)}
    assert rewards[PLANTED] >= 0.9 and max(v for f, v in rewards.items() if f != PLANTED) <= 0.3
    module = train(env, tmp_path)
    first, last = module.history[0], module.history[-3:]
    assert first["train/reward_mean"] < 0.5
    assert sum(h["train/reward_mean"] for h in last) / 3 >= 0.8 * rewards[PLANTED]
    share = PolicyShare.of(module, env)
    assert share >= 0.8, f"planted feature share {share:.2f}"


class PolicyShare:
    @staticmethod
    def of(module, env) -> float:
        """Share of greedy choices equal to the planted feature on the training prompts."""
        from crl_exp.crl.rollout import PolicyController

        ctrl = PolicyController(module.policy, COEF, greedy=True)
        generate(env.lm, PROMPTS, 1, env.steerer, ctrl)
        return (ctrl.stacked()["feature"] == PLANTED).float().mean().item()


def test_sign_flipped_ppo_does_not_find_it(tiny_lm, tmp_path, monkeypatch):
    """Guard that the planted test can fail: flipping the advantage sign must break learning."""
    import crl_exp.crl.ppo as ppo_mod

    env = planted_env(tiny_lm)
    real_gae = ppo_mod.compute_gae
    monkeypatch.setattr(ppo_mod, "compute_gae", lambda *a, **k: tuple(-x for x in real_gae(*a, **k)))
    module = train(env, tmp_path, iterations=15)
    assert PolicyShare.of(module, env) < 0.5


def test_masking_state_schedules_and_refusal():
    with pytest.raises(CRLConfigError, match="could mask all"):
        AdaptiveFeatureMask(16, MaskingConfig(schedule="fixed", threshold=0.05, min_unmasked=4))
    with pytest.raises(CRLConfigError, match="min_unmasked"):
        AdaptiveFeatureMask(16, MaskingConfig(schedule="fixed", threshold=0.5, min_unmasked=16))
    mask = AdaptiveFeatureMask(16, MaskingConfig(schedule="fixed", threshold=0.5, period=2, ema=0.0, min_unmasked=4,
                                                 significance=None))  # the share rule alone: 4 picks decide
    mask.update(torch.tensor([3, 3, 3, 1]), entropy=0.1)
    assert not mask.allowed()[3] and mask.allowed()[1] and mask.mask_size == 1
    mask.update(torch.tensor([1, 2]), entropy=0.1)
    assert not mask.allowed()[3]
    mask.update(torch.tensor([1, 2]), entropy=0.1)
    assert mask.allowed()[3]  # period over
    restored = AdaptiveFeatureMask(16, mask.cfg)
    restored.load_state_dict(mask.state_dict())
    assert torch.equal(restored.allowed(), mask.allowed()) and restored.iteration == mask.iteration
    decaying = AdaptiveFeatureMask(16, MaskingConfig(schedule="decaying", threshold=0.5, min_threshold=0.1, decay=0.5,
                                                     min_unmasked=4))
    for _ in range(5):
        decaying.update(torch.tensor([0]), entropy=1.0)
    assert decaying.threshold == pytest.approx(0.1)
    adaptive = AdaptiveFeatureMask(16, MaskingConfig(schedule="adaptive", threshold=0.5, min_threshold=0.1,
                                                     target_entropy=1.0, adapt_rate=0.5, min_unmasked=4))
    adaptive.update(torch.tensor([0]), entropy=0.2)
    assert adaptive.threshold == pytest.approx(0.25)
    adaptive.update(torch.tensor([0]), entropy=2.0)
    assert adaptive.threshold == pytest.approx(0.5)


def test_same_seed_same_first_iteration_actions(tiny_lm, tmp_path):
    env = planted_env(tiny_lm)
    a = train(env, tmp_path / "a", iterations=1)
    b = train(env, tmp_path / "b", iterations=1)
    fa, fb = a.last_rollout["trajectory"]["feature"], b.last_rollout["trajectory"]["feature"]
    assert torch.equal(fa, fb) and fa.unique().numel() > 1


def test_resume_continues_iteration_optimizer_and_logging(tiny_lm, tmp_path):
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    env = planted_env(tiny_lm)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="resume", tracking_uri=uri)
    first = make_module(env, 5)
    data = PromptDataModule(env.task, 12, seed=0)
    fit_policy(first, data, build_trainer(3, tmp_path / "ckpt", logger=logger, progress_bar=False))
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 2 and "afm" in ckpt

    class Capture(Callback):
        def on_train_start(self, trainer, pl_module):
            self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.params = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}

    capture = Capture()
    resumed = make_module(env, 5)
    trainer = build_trainer(5, tmp_path / "ckpt", logger=MLFlowLogger(experiment_name="resume", tracking_uri=uri,
                                                                      run_id=logger.run_id), progress_bar=False)
    trainer.callbacks.append(capture)
    fit_policy(resumed, PromptDataModule(env.task, 12, seed=0), trainer, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # the history (training curve) carries over from the checkpoint: the first run's iterations, then 3 and 4
    assert [h["iteration"] for h in resumed.history] == [0, 1, 2, 3, 4]
    assert [h["train/reward_mean"] for h in resumed.history[:3]] == [h["train/reward_mean"] for h in first.history]
    saved = ckpt["optimizer_states"][0]
    for key, state in capture.optimizer_state["state"].items():
        assert torch.equal(state["exp_avg"], saved["state"][key]["exp_avg"])
        assert state["step"] == saved["state"][key]["step"]
    for k, v in capture.params.items():
        assert torch.equal(v, ckpt["state_dict"][f"policy.{k}"])
    history = MlflowClient(uri).get_metric_history(logger.run_id, "train/reward_mean")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]


def test_obs_norm_statistics_follow_every_rollout_step_and_live_in_the_checkpoint(tiny_lm, tmp_path):
    env = planted_env(tiny_lm)
    module = train(env, tmp_path, iterations=3, policy=PolicyConfig(hidden=32, obs_norm=True))
    steps = sum(round(h["train/steps_per_episode"] * 12) for h in module.history)
    norm = module.policy.obs_norm
    assert norm.count.item() == steps > 0
    states = module.last_rollout["trajectory"]["state"][module.last_rollout["valid"]]
    assert not torch.allclose(module.policy.observe(states), module.policy.norm(states))  # it standardises
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    for name in ("mean", "var", "count"):
        assert torch.equal(saved[f"policy.obs_norm.{name}"], getattr(norm, name))
    assert make_module(env, 3).policy.obs_norm is None  # off by default: the recorded runs' policy


def test_nan_reward_stops_with_a_diagnostic(tiny_lm, tmp_path):
    env = planted_env(tiny_lm)
    env.task.score_batch = lambda ex, p, c, o=None: [{"parsed": "", "valid": True, "correct": 0.0,
                                                       "reward": float("nan")} for _ in c]
    from crl_exp.crl.ppo import NonFiniteError

    with pytest.raises(NonFiniteError, match="Non-finite rewards at iteration 0"):
        train(env, tmp_path, iterations=1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["policy.action_pool=6", "policy.noop_action=true"],
                                     ["policy.top_k=2", "policy.obs_norm=true"]],
                         ids=["top-1-pool", "top-2-dictionary"])
def test_train_mode_end_to_end_logs_iterations_baselines_and_deltas(tmp_path, tiny_model_dir, data_dir, variant):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient


    save_standard_sae(tmp_path / "sae", 64, resid_post_hook_name(1), d_sae=32)
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "crl_exp", "+experiment=bbq_layer12", "model=hf", f"model.path={tiny_model_dir}",
           "sae=local", f"sae.path={tmp_path / 'sae'}", "sae.layer=1", "budget.iterations=3",
           "budget.episodes_per_iteration=4", "budget.group_size=2", "budget.eval_examples=8", "budget.eval_sampled_seeds=2", "budget.static_feature.train_examples=4",
           "budget.static_feature.validation_examples=4", "budget.static_feature.candidates=2",
           "budget.reference_train_examples=6", "budget.static_feature.oracle_candidates=6", "masking.min_unmasked=4", "steering.coefficient_scale=absolute",
           "steering.coefficient=5", "eval.n_bootstrap=50", f"logger.tracking_uri=sqlite:///{db}",
           f"hydra.run.dir={tmp_path / 'out'}", "trainer.progress_bar=false", f"data_dir={data_dir}",
           "ppo.advantage=group", *variant]  # the PPO path's logging (sampled_set: the known-answer e2e test)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| crl |" in proc.stdout and "| static |" in proc.stdout
    assert "| sampled (mean of 2 samples per prompt) |" in proc.stdout and "| greedy, mask on" in proc.stdout
    logs = proc.stdout + proc.stderr  # every log line once (Lightning printed twice), no advertising tips
    assert logs.count("GPU available") == 1 and "Tip:" not in logs
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("crl-bbq").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train/reward_mean", "train/accuracy", "train/policy_loss", "train/value_loss", "train/entropy",
                "train/approx_kl", "train/clipfrac", "train/explained_variance", "train/distinct_features",
                "train/mask_size"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2], key
    metrics = run.data.metrics
    for cond in ("none", "random", "random_dictionary", "static", "crl"):
        assert f"heldout/{cond}/accuracy" in metrics and f"heldout/{cond}/accuracy_ci_low" in metrics
    assert "delta/crl_minus_static/accuracy" in metrics and "delta/crl_minus_none/reward_ci_high" in metrics
    assert metrics["power/crl_minus_static/n"] == 8 and "power/crl_minus_static/mde_reward" in metrics
    assert "heldout/crl_sampled/accuracy_mean" in metrics and "heldout/crl_mask_on/accuracy" in metrics
    assert metrics["heldout/oracle/n"] == 8 and metrics["heldout/oracle/candidates"] == 6  # pool of a 32-wide SAE
    # the static feature is one of the oracle's candidates, so the oracle can only do better
    assert metrics["heldout/oracle/oracle_accuracy"] >= metrics["heldout/static/accuracy"]
    assert "Reference rows on the same held-out prompts" in proc.stdout and "| ceiling (" in proc.stdout
    assert {"heldout/group_oracle/reward", "heldout/ceiling/reward", "learner/gap_recovered",
            "heldout/untrained/accuracy", "heldout/untrained/distinct_greedy_features"} <= set(metrics)
    # one-token task: the static selection tries every feature of a 6-feature pool (2 ranked ones of the whole
    # dictionary) through one reward table on 4 validation prompts (each also unsteered), + the random reference
    tried = 6 if "policy.action_pool=6" in variant else 2
    assert metrics["static/candidates_tried"] == tried
    assert metrics["static/episodes_selecting"] == 4 + 4 * (tried + 1) + 4 and metrics["crl/episodes_training"] == 3 * 4
    assert {"reference/static_reward", "reference/random_reward", "reference/none_reward"} <= set(metrics)
    assert "training/training_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "training")}
    assert "Training curve (train reward per iteration" in proc.stdout
    # impossible by construction (NaN when every greedy action was the no-op: no feature was chosen at all)
    assert not metrics["heldout/crl/outside_action_space_share"] > 0.0
    assert 0.0 <= metrics["heldout/crl/steered_share"] <= 1.0
    if "policy.noop_action=true" not in variant:
        assert metrics["heldout/crl/steered_share"] == 1.0
    assert not metrics["heldout/crl/final_mask_blocked_share"] > 1.0
    assert "heldout/crl/masked_action_share" not in metrics
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "heldout/summary.json", tmp_path)).read_text())
    assert summary["heldout_part"] == "dev" and summary["n_heldout"] == 8
    if "policy.action_pool=6" in variant:  # the record names the action space it was trained and scored in
        assert len(summary["action_space"]) == 6
        # a 6-feature pool: every condition read off one held-out reward table, re-checked by the rollouts
        assert metrics["heldout/table_vs_rollout_max_abs_diff"] <= 1e-4
        assert set(summary["references"]["paired"]) == {"crl_minus_ceiling", "ceiling_minus_static"}
        assert summary["deltas"]["static"]["accuracy"]["method"] == "newcombe_clustered"
    else:
        assert summary["action_space"] is None
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "heldout")}
    assert {"heldout/comparison.md", "heldout/summary.json", "heldout/static_feature.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.ckpt"]
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()


def test_top_k_policy_steers_with_k_features_and_trains(tiny_lm, tmp_path):
    env = planted_env(tiny_lm)
    d = env.steerer.delta(torch.tensor([[1, 3]]), torch.tensor([4.0]))[0]
    assert torch.allclose(d, 2.0 * env.steerer.directions.unit[1] + 2.0 * env.steerer.directions.unit[3])
    module = make_module(env, 2, policy=PolicyConfig(hidden=32, top_k=2))
    fit_policy(module, PromptDataModule(env.task, 12, seed=0), build_trainer(2, tmp_path / "ckpt", progress_bar=False))
    features = module.last_rollout["trajectory"]["feature"]
    assert features.shape[-1] == 2 and bool((features[..., 0] != features[..., 1]).all())
    assert all(h["train/approx_kl"] == h["train/approx_kl"] for h in module.history)  # finite, not NaN
    with pytest.raises(CRLConfigError, match="top_k"):
        CRLModule(64, D_SAE, PolicyConfig(top_k=9), PPOConfig(), MaskingConfig(), 2)


def test_a_masking_schedule_in_its_own_module(tmp_path, monkeypatch):
    """A new schedule = a module with a threshold rule + a config naming it (module:function)."""
    (tmp_path / "halving_schedule.py").write_text(
        "def next_threshold(cfg, current, iteration, entropy):\n"
        "    return max(cfg.params['floor'], current / 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mask = AdaptiveFeatureMask(64, MaskingConfig(schedule="halving_schedule:next_threshold", threshold=0.4,
                                                 min_threshold=0.05, min_unmasked=4, params={"floor": 0.1}))
    for expected in (0.2, 0.1, 0.1):
        mask.update(torch.zeros(8, dtype=torch.long), entropy=0.0)
        assert mask.threshold == pytest.approx(expected)
    assert mask.mask_size == 1  # feature 0 took every selection
    with pytest.raises(CRLConfigError, match="not one of none, fixed, decaying, adaptive"):
        MaskingConfig(schedule="no_such_module:rule").validate(64)


def test_group_rollouts_with_group_advantage_find_the_planted_feature(tiny_lm, tmp_path):
    """G=4 episodes of each of 3 prompts per iteration share a prefill; group-relative advantages still learn."""
    env = planted_env(tiny_lm)
    module = train(env, tmp_path, iterations=25, group_size=4, advantage="group")
    batch = PromptDataModule(env.task, 12, seed=0, group_size=4).batch_for(0)
    assert [e.id for e in batch[:4]] == [batch[0].id] * 4 and len({e.id for e in batch}) == 3
    assert PolicyShare.of(module, env) >= 0.8
    with pytest.raises(CRLConfigError, match="must divide"):
        PromptDataModule(env.task, 12, group_size=5)


def test_candidate_action_space_restricts_the_policy_and_afm_works_within_it(tiny_lm, tmp_path):
    mask = AdaptiveFeatureMask(16, MaskingConfig(schedule="fixed", threshold=0.5, period=2, ema=0.0, min_unmasked=2,
                                                 significance=None))
    with pytest.raises(CRLConfigError, match="must exceed masking.min_unmasked"):
        mask.restrict([1, 2])
    mask.restrict([1, 3, 5, 7])
    assert mask.allowed().nonzero().flatten().tolist() == [1, 3, 5, 7] and mask.mask_size == 0
    mask.update(torch.tensor([3, 3, 3, 1]), entropy=0.1)
    assert mask.allowed().nonzero().flatten().tolist() == [1, 5, 7] and mask.mask_size == 1
    restored = AdaptiveFeatureMask(16, mask.cfg)
    restored.load_state_dict(mask.state_dict())
    assert torch.equal(restored.allowed(), mask.allowed())
    # training inside a pool that holds the planted feature: every action is a candidate, and it is found
    env = planted_env(tiny_lm)
    pool = [PLANTED, *[f for f in range(D_SAE) if f != PLANTED][:5]]
    module = make_module(env, 25)
    module.mask.restrict(pool)
    fit_policy(module, PromptDataModule(env.task, 12, seed=0), build_trainer(25, tmp_path / "ckpt", progress_bar=False))
    chosen = module.last_rollout["trajectory"]["feature"][module.last_rollout["valid"]]
    assert set(chosen.unique().tolist()) <= set(pool)
    assert sum(h["train/reward_mean"] for h in module.history[-3:]) / 3 >= 0.7


@pytest.mark.slow
def test_select_coefficient_mode_chooses_on_validation(tmp_path, tiny_model_dir, data_dir):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    save_standard_sae(tmp_path / "sae", 64, resid_post_hook_name(1), d_sae=32)
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "crl_exp", "mode=select_coefficient", "task=bbq", "model=hf",
           f"model.path={tiny_model_dir}", "sae=local", f"sae.path={tmp_path / 'sae'}", "sae.layer=1",
           "select.grid=[0,5]", "steering.coefficient_scale=absolute", "budget.static_feature.train_examples=6",
           "budget.static_feature.candidates=2", f"logger.tracking_uri=sqlite:///{db}",
           f"hydra.run.dir={tmp_path / 'out'}", f"data_dir={data_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Coefficient sweep on bbq validation (n=6" in proc.stdout and "| 5.0 |" in proc.stdout
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    chosen = run.data.metrics["select/chosen_coefficient"]
    rewards = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "select/static_validation_reward")}
    assert chosen in (0.0, 5.0) and rewards[[0.0, 5.0].index(chosen)] == max(rewards.values())


def test_lightning_leaves_the_run_open_for_the_heldout_evaluation(tiny_lm, tmp_path):
    """Lightning's MLflow logger ended the run as FINISHED after fit, before the held-out evaluation: a crash there
    left a FINISHED run that a rerun of the sweep would skip."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from crl_exp.crl.trainer import RunOwnedMLFlowLogger

    env = planted_env(tiny_lm)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    statuses = {}
    for cls in (MLFlowLogger, RunOwnedMLFlowLogger):
        logger = cls(experiment_name="owned", tracking_uri=uri)
        fit_policy(make_module(env, 1), PromptDataModule(env.task, 12, seed=0),
                   build_trainer(1, tmp_path / cls.__name__, logger=logger, progress_bar=False))
        statuses[cls.__name__] = MlflowClient(uri).get_run(logger.run_id).info.status
    assert statuses == {"MLFlowLogger": "FINISHED", "RunOwnedMLFlowLogger": "RUNNING"}


def test_greedy_with_the_mask_on_reuses_the_unmasked_episodes_only_when_they_are_the_same(tiny_lm, tmp_path):
    """Greedy with a mask picks what greedy without it picked wherever that was allowed: masking only features the
    unmasked greedy policy never chose gives the same episodes (so the evaluation reuses them), masking one it
    chose does not."""
    from crl_exp.crl.rollout import PolicyController
    from crl_exp.episodes import run_episodes
    from crl_exp.evaluation.heldout import policy_variants

    env = planted_env(tiny_lm)
    env.task.cfg.max_new_tokens = 6
    module = make_module(env, 1)
    with torch.no_grad():
        module.policy.actor_head.weight.normal_(0, 1)  # a prompt- and step-dependent greedy choice
    pool = env.task.split("train")

    def greedy(allowed):
        controller = PolicyController(module.policy, COEF, allowed=allowed, greedy=True)
        recs, _ = run_episodes(env.task, env.lm, pool, 4, env.steerer, controller)
        return recs, torch.cat([s.feature for s in controller.steps])

    unmasked, chosen = greedy(None)
    unused = torch.ones(D_SAE, dtype=torch.bool)
    unused[chosen.unique()] = False
    assert unused.any() and not unused.all()
    masked_unused, chosen_unused = greedy(~unused)  # every feature it never chose masked
    assert [r["completion"] for r in masked_unused] == [r["completion"] for r in unmasked]
    assert torch.equal(chosen_unused, chosen)
    top = int(chosen.mode().values)
    _, chosen_masked = greedy(torch.arange(D_SAE) != top)
    assert not torch.equal(chosen_masked, chosen) and top not in chosen_masked.tolist()

    reused = policy_variants(env, module, pool, "reward", 4, 0, headline_with_mask=False, headline_records=unmasked,
                             headline_blocked_share=0.0)["crl_mask_on"]
    run_again = policy_variants(env, module, pool, "reward", 4, 0, headline_with_mask=False)["crl_mask_on"]
    assert reused["same_episodes_as_greedy"] and not run_again["same_episodes_as_greedy"]
    assert reused["reward"] == run_again["reward"] == env.task.metrics_from_records(unmasked)["reward"]


@pytest.mark.parametrize("advantage", ["all_actions", "group"])
def test_the_learner_learns_a_prompt_dependent_choice(tiny_lm, tmp_path, advantage):
    """The tiny known-answer task: prompts ending in '?' are paid for 'Z' (feature 5), prompts ending in '!' for
    'Q' (feature 2). One global feature earns at most half; the learner must read the class off the state, so this
    fails if it stops conditioning on it."""
    from crl_exp.crl.rollout import PolicyController
    from crl_exp.episodes import rollout_batch

    from helpers import CLASS_TARGETS, class_planted_env

    env = class_planted_env(tiny_lm)
    rewards = {}
    for group, (_, feature) in CLASS_TARGETS.items():
        exs = [e for e in env.task.split("train") if e.group == group]
        recs, _ = rollout_batch(env.task, env.lm, exs, env.steerer, StaticController(feature, COEF))
        rewards[group] = sum(r["reward"] for r in recs) / len(recs)
    assert min(rewards.values()) >= 0.9  # each class's feature earns its class's reward ...
    module = make_module(env, 30, policy=PolicyConfig(hidden=32, obs_norm=True), advantage=advantage, lr=1e-2,
                         ent_coef=0.0)
    module.warm_up_obs_norm(torch.randn(4, env.lm.d_model))  # a first fold-in, as mode=train does
    fit_policy(module, PromptDataModule(env.task, 48 if advantage == "group" else 24, seed=0,
                                        group_size=4 if advantage == "group" else 1),
               build_trainer(30, tmp_path / "ckpt", progress_bar=False))
    controller = PolicyController(module.policy, COEF, greedy=True)
    exs = env.task.split("train")
    rollout_batch(env.task, env.lm, exs, env.steerer, controller)
    chosen = controller.steps[0].feature.tolist()
    right = [c == CLASS_TARGETS[e.group][1] for c, e in zip(chosen, exs, strict=True)]
    assert sum(right) / len(right) >= 0.9, (chosen, [e.group for e in exs])


def test_a_policy_rollout_returns_records_generation_and_trajectory_in_one_object(tiny_lm):
    from crl_exp.crl.rollout import policy_rollout

    env = planted_env(tiny_lm)
    module = make_module(env, 2)
    controller = module.controller(greedy=False, with_mask=True, seed=0)
    batch = env.task.split("train")[:3]
    first = policy_rollout(env.task, tiny_lm, batch, env.steerer, controller)
    second = policy_rollout(env.task, tiny_lm, batch, env.steerer, controller)
    assert [r["id"] for r in first.records] == [ex.id for ex in batch]
    assert first.trajectory["feature"].shape[:2] == first.valid.shape == second.valid.shape
    assert controller.steps == []  # nothing left over to stitch: the next batch starts clean
    assert torch.equal(first.logged["feature"], first.trajectory["feature"])  # no no-op action in this policy


@pytest.mark.slow
def test_known_answer_over_the_dictionary_trains_with_scored_sets_end_to_end(tmp_path, tiny_model_dir, data_dir):
    """``+experiment=known_answer_dictionary`` on a tiny model: the design is checked against every feature, the
    static baseline also tries the design's candidates, and training scores a screened and a sampled set per prompt
    (the model rows it spent are what the sets cost)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    save_standard_sae(tmp_path / "sae", 64, resid_post_hook_name(1), d_sae=32)
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "crl_exp", "+experiment=known_answer_dictionary", "model=hf",
           f"model.path={tiny_model_dir}", "sae=local", f"sae.path={tmp_path / 'sae'}", "sae.layer=1",
           "task.design.candidates=16", "task.design.probe_prompts=4", "task.design.decode_train=8",
           "task.design.decode_validation=8", "task.design.static_candidates=3", "ppo.screen_top=4",
           "budget.iterations=2", "budget.episodes_per_iteration=6", "budget.group_size=3", "budget.eval_examples=8",
           "budget.eval_sampled_seeds=2", "budget.static_feature.train_examples=4",
           "budget.static_feature.validation_examples=4", "budget.static_feature.candidates=2",
           "budget.reference_train_examples=6", "budget.static_feature.oracle_candidates=6",
           "steering.coefficient_scale=absolute", "steering.coefficient=5", "eval.n_bootstrap=50",
           f"logger.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'out'}", "trainer.progress_bar=false",
           f"data_dir={data_dir}", f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("crl-known-answer-dictionary").experiment_id])
    metrics = run.data.metrics
    design = json.loads(Path(client.download_artifacts(run.info.run_id, "task/known_answer_design.json",
                                                       tmp_path)).read_text())
    check = design["dictionary"]
    assert design["pool"] is None and check["probe_rows"] == 4 * 33  # 4 probes x (32 features + unsteered)
    assert len(check["class_feature_rank_in_dictionary"]) == 4 and all(r >= 1 for r in
                                                                        check["class_feature_rank_in_dictionary"])
    extra = set(design["class_features"]) | set(check["static_candidates"])
    static = json.loads(Path(client.download_artifacts(run.info.run_id, "heldout/static_feature.json",
                                                       tmp_path)).read_text())
    assert extra <= {int(f) for f in static["candidates"]}  # the static row was looked for over the dictionary
    assert metrics["train/set_size"] == 4 + 3  # the screen's top 4 and 3 policy draws per prompt
    assert metrics["crl/episodes_training"] == 2 * 2 * (4 + 3)  # iterations x prompts x scored actions
    assert run.data.tags["advantage"] == "sampled_set" and run.data.tags["action_space"] == "full:32"
