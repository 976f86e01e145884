"""The steering hook edits resid_post of block L (output of layers[L]) at the newest position, exactly."""

from __future__ import annotations

import pytest
import torch

from crl_exp.errors import CRLConfigError
from crl_exp.generation import generate
from crl_exp.models.architecture import decoder_layers
from crl_exp.steering import NO_FEATURE, ResidualSteerer, StaticController, SteeringDirections

from helpers import STEER_PROMPTS as PROMPTS
from helpers import PreHookSteerer, capture_resid_post, random_directions, resid_change


def test_resid_post_changes_by_exactly_c_times_direction_only_at_newest_position(tiny_lm):
    changed, exact = resid_change(tiny_lm, ResidualSteerer)
    assert changed and exact


def test_pre_hook_placement_fails_the_same_check(tiny_lm):
    # A pre-hook edits the block's *input*; the block then transforms the edit, so resid_post of L does not
    # move by exactly c*d(f). This guards against the off-by-one.
    changed, exact = resid_change(tiny_lm, PreHookSteerer)
    assert changed and not exact


def test_rows_get_their_own_directions(tiny_lm):
    enc = tiny_lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    dirs = random_directions(tiny_lm.d_model)
    steerer = ResidualSteerer(tiny_lm.model, 2, dirs)
    base = capture_resid_post(tiny_lm, 2, enc)
    steered = capture_resid_post(tiny_lm, 2, enc, steerer, StaticController(torch.tensor([0, 5, 9]), 1.0))
    moved = (steered - base)[:, -1]
    for row, f in enumerate([0, 5, 9]):
        assert torch.allclose(moved[row], dirs.unit[f], atol=1e-5)
    assert not torch.allclose(moved[0], moved[1])


def test_coefficient_zero_generation_is_token_identical(tiny_lm):
    plain = generate(tiny_lm, PROMPTS, max_new_tokens=8)
    steerer = ResidualSteerer(tiny_lm.model, 1, random_directions(tiny_lm.d_model))
    zero = generate(tiny_lm, PROMPTS, 8, steerer, StaticController(torch.tensor([1, 2, 3]), 0.0))
    assert torch.equal(plain.new_tokens, zero.new_tokens)
    # One controller call per forward: prefill + (max_new_tokens - 1) cached decoding steps.
    assert len(steerer.steps) == 8
    assert all(step.features.shape == (3,) for step in steerer.steps)


def test_steering_changes_generation_and_respects_no_feature_rows(tiny_lm):
    plain = generate(tiny_lm, PROMPTS, max_new_tokens=8)
    steerer = ResidualSteerer(tiny_lm.model, 1, random_directions(tiny_lm.d_model))
    strong = generate(tiny_lm, PROMPTS, 8, steerer, StaticController(torch.tensor([4, 4, NO_FEATURE]), 200.0))
    assert not torch.equal(plain.new_tokens[:2], strong.new_tokens[:2])
    assert torch.equal(plain.new_tokens[2], strong.new_tokens[2])


def test_kv_cached_steering_matches_full_recompute(tiny_lm):
    """With a KV cache, later positions attend to the *steered* earlier activations: replaying the generated
    sequence without a cache, steering every position the same way, gives the same next-token logits."""
    steerer = ResidualSteerer(tiny_lm.model, 1, random_directions(tiny_lm.d_model), record_states=True)
    gen = generate(tiny_lm, ["Hello world"], 5, steerer, StaticController(2, 30.0))
    enc = tiny_lm.tokenizer(["Hello world"], return_tensors="pt")
    full = torch.cat([enc.input_ids, gen.new_tokens[:, :-1]], dim=1)
    n_prompt = enc.input_ids.shape[1]
    block = decoder_layers(tiny_lm.model)[1]
    delta = steerer.delta(torch.tensor([2]), torch.tensor([30.0]))[0]

    def steer_all_from_prompt_end(m, i, o):
        o = o.clone()
        o[:, n_prompt - 1:] += delta
        return o

    handle = block.register_forward_hook(steer_all_from_prompt_end)
    try:
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=full, use_cache=False).logits
    finally:
        handle.remove()
    replay = logits[0, n_prompt - 1:].argmax(-1)
    assert torch.equal(replay, gen.new_tokens[0])


def test_layer_out_of_range_and_bad_feature(tiny_lm):
    with pytest.raises(CRLConfigError, match=r"layers 0\.\.2"):
        ResidualSteerer(tiny_lm.model, 3, random_directions(tiny_lm.d_model))
    steerer = ResidualSteerer(tiny_lm.model, 0, random_directions(tiny_lm.d_model, d_sae=4))
    with pytest.raises(CRLConfigError, match="4 features"):
        generate(tiny_lm, ["Hi"], 2, steerer, StaticController(9, 1.0))


def test_coefficient_scales():
    W = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    d = SteeringDirections.from_decoder(W, "resid_norm", resid_norm=10.0)
    assert torch.allclose(d.decoder_norms, torch.tensor([5.0, 2.0]))
    assert torch.allclose(d.unit.norm(dim=-1), torch.ones(2))
    assert d.distance(0.5) == 5.0
    with pytest.raises(CRLConfigError):
        SteeringDirections.from_decoder(W, "resid_norm")
    with pytest.raises(CRLConfigError):
        SteeringDirections.from_decoder(W, "percent")


def test_stop_strings_end_rows_and_are_cut(tiny_lm):
    plain = generate(tiny_lm, PROMPTS, max_new_tokens=10)
    first = plain.completions[0]
    stop = first[2:4]  # a string the first row is known to produce
    stopped = generate(tiny_lm, PROMPTS, 10, stop_strings=[stop])
    assert stopped.completions[0] == first[: first.find(stop)]
    row = stopped.new_tokens[0].tolist()
    assert row.count(tiny_lm.tokenizer.pad_token_id) > 0  # the row ended early and was padded


def test_steps_after_a_stop_string_are_not_valid(tiny_lm):
    """The forced pad after a stop string is no step: it gets no reward and enters no log (was marked valid)."""
    plain = generate(tiny_lm, PROMPTS, max_new_tokens=10)
    first = plain.completions[0]
    stop = first[2:4]
    stopped = generate(tiny_lm, PROMPTS, 10, stop_strings=[stop])
    end = first.find(stop) + len(stop)  # byte-level tokens: one character each
    assert stopped.valid[0].tolist() == [t < end for t in range(stopped.new_tokens.shape[1])]
    pad = tiny_lm.tokenizer.pad_token_id
    assert pad in stopped.new_tokens[0].tolist()
    assert pad not in stopped.new_tokens[stopped.valid].tolist()
    assert stopped.valid[1].all() or not stopped.valid[1][-1]  # rows that did not stop keep their steps


def test_steered_tokens_are_the_newest_position_at_each_step(tiny_lm):
    gen = generate(tiny_lm, PROMPTS, max_new_tokens=3)
    enc = tiny_lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert gen.steered_tokens[:, 0].tolist() == enc.input_ids[:, -1].tolist()
    assert gen.steered_tokens[:, 1:].tolist() == gen.new_tokens[:, :-1].tolist()


def test_shared_prefix_rollout_matches_the_full_prompt_path(tiny_lm):
    """One prefill per distinct prompt (left-padded, past Gemma 3's 16-token sliding window here) gives the same
    tokens and actions as prefilling every row, and the same states, log-probs and values up to fp32 rounding."""
    from crl_exp.crl.policy import ActorCritic
    from crl_exp.crl.rollout import PolicyController

    prompts = (["The quick brown fox jumps over the lazy dog, again and again"] * 3 + ["Short one"] * 2
               + ["A much longer prompt that exceeds the sliding window of sixteen tokens easily."] * 3 + ["Q"])
    steerer = ResidualSteerer(tiny_lm.model, 1, random_directions(tiny_lm.d_model, 16))
    torch.manual_seed(0)
    policy = ActorCritic(tiny_lm.d_model, 16, 16)
    with torch.no_grad():
        policy.actor_head.weight.normal_(0, 1)  # state-dependent choices
    runs = {}
    for share in (False, True):
        controller = PolicyController(policy, 3.0, greedy=True)
        runs[share] = generate(tiny_lm, prompts, 12, steerer, controller, share_prefix=share), controller.stacked()
    (full, a), (shared, b) = runs[False], runs[True]
    assert torch.equal(full.new_tokens, shared.new_tokens) and full.completions == shared.completions
    assert torch.equal(a["feature"], b["feature"]) and torch.equal(full.valid, shared.valid)
    for key in ("state", "logprob", "value"):
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-5)
    assert len(set(a["feature"][:, 0].tolist())) > 1  # the policy did react to the state


def test_a_one_token_batch_has_no_prefix_to_share(tiny_lm):
    enc = tiny_lm.tokenizer(["", ""], return_tensors="pt", padding=True)
    assert enc.input_ids.shape[1] == 1  # just <bos>
    assert generate(tiny_lm, ["", ""], 3, share_prefix=True).new_tokens.shape == (2, 3)


def test_the_policy_steers_at_the_steerer_coefficient_alone_or_inside_a_row_dispatch(tiny_lm):
    """The coefficient lives on the steerer (set by the environment): a policy controller returns features only,
    the hook applies the steerer's coefficient, also to its rows inside a RowDispatch next to a baseline that
    carries its own; a steerer without a coefficient refuses instead of steering at some default."""
    from crl_exp.crl.policy import ActorCritic
    from crl_exp.crl.rollout import PolicyController
    from crl_exp.steering.controllers import RowDispatch

    steerer = ResidualSteerer(tiny_lm.model, 1, random_directions(tiny_lm.d_model, 16))
    policy = ActorCritic(tiny_lm.d_model, 16, 16)
    prompts = ["The quick brown fox", "Short one"]
    with pytest.raises(RuntimeError, match="has no coefficient"):
        generate(tiny_lm, prompts, 2, steerer, PolicyController(policy, greedy=True))
    steerer.coefficient = 2.5
    generate(tiny_lm, prompts, 2, steerer, PolicyController(policy, greedy=True))
    assert all(torch.all(step.coefficients == 2.5) for step in steerer.steps)
    dispatch = RowDispatch([PolicyController(policy, greedy=True), StaticController(3, 0.5)], [0, 1])
    generate(tiny_lm, prompts, 2, steerer, dispatch)
    assert all(step.coefficients.tolist() == [2.5, 0.5] for step in steerer.steps)
