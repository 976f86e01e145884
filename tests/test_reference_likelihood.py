"""VeriFree-style reward: the reference answer's teacher-forced likelihood after the generated reasoning."""

from __future__ import annotations

import pytest
import torch

from crl_exp.errors import CRLConfigError
from crl_exp.generation import generate

PROMPTS = ["ab", "hello", "xyz12"]  # different lengths: left padding; all inside the 16-token sliding window


def by_hand(lm, prompt: str, kept_text: str, reference: str) -> float:
    """exp(mean log p(reference | prompt + kept reasoning)), one unpadded forward from scratch."""
    ids = lm.tokenizer(prompt).input_ids + lm.tokenizer(kept_text, add_special_tokens=False).input_ids
    ref = lm.tokenizer(("" if kept_text.endswith("\n") else "\n") + reference, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids + ref])).logits[0].float()
    lp = logits[len(ids) - 1: len(ids) - 1 + len(ref)].log_softmax(-1)[torch.arange(len(ref)), torch.tensor(ref)]
    return lp.mean().exp().item()


def test_reference_likelihood_equals_a_hand_computed_teacher_forced_probability(tiny_lm):
    plain = generate(tiny_lm, PROMPTS, 5)
    first = plain.completions[0]
    marker = next(ch for i, ch in enumerate(first) if i > 0 and first.find(ch) == i)  # cuts row 0 mid-reasoning
    refs = ["# 7", "#12", "#"]  # cache + fed tokens stay inside the window, where the reward is exact
    gen = generate(tiny_lm, PROMPTS, 5, references=refs, reference_marker=marker)
    assert gen.completions == plain.completions  # scoring the reference does not change the episode
    kept = [c[: c.find(marker)] if marker in c else c for c in plain.completions]
    assert 0 < len(kept[0]) < len(first)
    for i, prompt in enumerate(PROMPTS):
        assert abs(gen.reference_likelihood[i].item() - by_hand(tiny_lm, prompt, kept[i], refs[i])) < 1e-5, i
    assert ((gen.reference_likelihood > 0) & (gen.reference_likelihood < 1)).all()


def test_gsm8k_reference_likelihood_is_the_reward_and_exact_match_the_metric(tiny_lm, data_dir):
    from hydra import compose, initialize_config_dir

    from crl_exp.episodes import rollout_batch
    from crl_exp.paths import CONFIG_DIR
    from crl_exp.tasks import build_task

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=gsm8k_layer12", "task.shot_rows=[]",
                                           "task.max_new_tokens=6"])
    assert cfg.task.reward == "reference_likelihood"
    task = build_task(cfg.task, data_dir)
    batch = task.split("train", 3)
    records, gen = rollout_batch(task, tiny_lm, batch)
    for rec, p in zip(records, gen.reference_likelihood.tolist(), strict=True):
        assert rec["reward"] == rec["reference_likelihood"] == p and 0 < p < 1
        assert rec["correct"] == 0.0  # a random tiny model does not solve GSM8K: the metric is still exact match
    metrics = task.metrics_from_records(records)
    assert metrics["exact_match"] == 0.0 and metrics["reward"] == pytest.approx(sum(gen.reference_likelihood) / 3)
    exact = build_task(compose_task("gsm8k"), data_dir)
    assert exact.reference_answers(batch) is None
    with pytest.raises(CRLConfigError, match="task.reward for gsm8k"):
        build_task(compose_task("gsm8k", "task.reward=likelihood"), data_dir)


def compose_task(name, *overrides):
    from hydra import compose, initialize_config_dir

    from crl_exp.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=[f"task={name}", *overrides]).task


def test_a_rows_reward_does_not_depend_on_its_batch(tiny_lm):
    """A row that stops early scores the same alone and beside a row that runs long: with the reference read after
    the whole batch's cache, the long row's extra columns pushed the short row's prompt out of the 16-token
    sliding window."""
    prompt, other = "abcdefgh", "a much longer prompt"
    plain = generate(tiny_lm, [prompt], 24).completions[0]
    marker = plain[2]  # stops the short row after two characters of reasoning
    cut = plain.find(marker)
    assert 0 < cut < 6
    alone = generate(tiny_lm, [prompt], 24, stop_strings=[marker], references=["#1"], reference_marker=marker)
    batch = generate(tiny_lm, [prompt, other], 24, stop_strings=[marker], references=["#1", "#2"],
                     reference_marker=marker)
    assert batch.completions[0] == alone.completions[0] == plain[:cut]
    assert batch.new_tokens.shape[1] > alone.new_tokens.shape[1] + 8  # the other row really runs longer
    assert batch.reference_likelihood[0].item() == pytest.approx(alone.reference_likelihood[0].item(), rel=1e-4)


def test_the_reference_is_read_after_the_reasoning_as_it_was_steered(tiny_lm):
    """Steered episodes: the kept tokens are read with the episode's own edits replayed (a different reward from
    reading the same tokens unsteered), and the replay is what incremental steered decoding computed."""
    from crl_exp.steering.controllers import StaticController
    from crl_exp.steering.directions import SteeringDirections
    from crl_exp.steering.hook import ResidualSteerer

    torch.manual_seed(0)
    directions = SteeringDirections.from_decoder(torch.randn(8, tiny_lm.d_model))
    steerer = ResidualSteerer(tiny_lm.model, 1, directions)
    prompt = "abc"
    steered = generate(tiny_lm, [prompt], 6, steerer, StaticController(3, 4.0), references=["#5"])
    unsteered_read = by_hand(tiny_lm, prompt, steered.completions[0], "#5")
    assert abs(steered.reference_likelihood[0].item() - unsteered_read) > 1e-4
