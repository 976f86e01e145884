"""Few-shot prefix caching: a prompt started from its prefix's stored KV cache decodes exactly as from scratch."""

from __future__ import annotations

import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.rollout import PolicyController
from crl_exp.generation import generate
from crl_exp.kv_cache import PrefixStore, prefix_key, prefix_store
from crl_exp.steering import ResidualSteerer

from helpers import random_directions

# Byte tokenizer: one token per character, so both prefixes exceed the tiny Gemma 3's 16-token sliding window.
SHOTS_A = "Q: two plus two?\nA: four\nQ: one plus one?\nA: two\n"
SHOTS_B = "Subject: birds.\nQ: do owls fly?\nA: yes\n"
SUFFIXES = ["Q: three plus one?\nA:", "Q: five?\nA:", "Q: a rather longer question about sums?\nA:"]


def steered_run(lm, prompts, prefixes=None, share=False):
    steerer = ResidualSteerer(lm.model, 1, random_directions(lm.d_model, 16))
    torch.manual_seed(0)
    policy = ActorCritic(lm.d_model, 16, 16)
    with torch.no_grad():
        policy.actor_head.weight.normal_(0, 1)  # state-dependent choices
    controller = PolicyController(policy, 3.0, greedy=True)
    gen = generate(lm, prompts, 10, steerer, controller, share_prefix=share, prefixes=prefixes)
    return gen, controller.stacked()


def test_prefix_cached_prompts_match_the_full_prompt_path(tiny_lm):
    prompts = [SHOTS_A + s for s in SUFFIXES] + [SHOTS_B + s for s in SUFFIXES[:2]] + ["no shots here", ""]
    prefixes = [SHOTS_A] * 3 + [SHOTS_B] * 2 + [None, None]
    full, a = steered_run(tiny_lm, prompts)
    cached, b = steered_run(tiny_lm, prompts, prefixes=prefixes)
    assert torch.equal(full.new_tokens, cached.new_tokens) and full.completions == cached.completions
    assert torch.equal(a["feature"], b["feature"]) and torch.equal(full.valid, cached.valid)
    for key in ("state", "logprob", "value"):
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-5)
    assert len(set(a["feature"][:, 0].tolist())) > 1  # the policy did react to the state
    store = prefix_store(tiny_lm)
    assert store.misses == 2 and store.hits == 3  # one prefill per distinct prefix


def test_groups_of_prefix_cached_prompts_match_too(tiny_lm):
    prompts = [SHOTS_A + SUFFIXES[0]] * 4 + [SHOTS_A + SUFFIXES[2]] * 4
    full, a = steered_run(tiny_lm, prompts)
    cached, b = steered_run(tiny_lm, prompts, prefixes=[SHOTS_A] * 8, share=True)
    assert torch.equal(full.new_tokens, cached.new_tokens) and torch.equal(a["feature"], b["feature"])
    torch.testing.assert_close(a["state"], b["state"], atol=1e-4, rtol=1e-5)


def test_the_store_is_reused_across_calls_and_bounded(tiny_lm):
    prompts = [SHOTS_A + SUFFIXES[0], SHOTS_B + SUFFIXES[1]]
    generate(tiny_lm, prompts, 2, prefixes=[SHOTS_A, SHOTS_B])
    store = prefix_store(tiny_lm)
    generate(tiny_lm, prompts, 2, prefixes=[SHOTS_A, SHOTS_B])
    assert (store.misses, store.hits) == (2, 2) and len(store.entries) == 2
    small = PrefixStore(max_bytes=1)  # keeps only the newest entry
    for shots in (SHOTS_A, SHOTS_B):
        small.get(tiny_lm, tuple(tiny_lm.tokenizer(shots).input_ids))
    assert len(small.entries) == 1 and small.bytes > 0


def test_prefix_key_keeps_only_tokens_the_prompt_shares_and_never_its_last():
    assert prefix_key([2, 5, 6, 7], [2, 5, 6, 7, 8, 9]) == (2, 5, 6)  # the prefix's own last token is dropped
    assert prefix_key([2, 5, 6, 7], [2, 5, 9, 7, 8]) == (2, 5)  # cut where the tokenisations disagree
    assert prefix_key([2, 5, 6, 7, 8, 9], [2, 5, 6]) == (2, 5)  # the steered last prompt token is never cached
    assert prefix_key([3], [2, 5]) == ()


def test_memory_estimate_kv_part_equals_a_real_cache(tiny_lm):
    """The pre-load estimate's KV term is exactly the cache a generate holds (prompts inside the window)."""
    from crl_exp.kv_cache import cache_tensors, tensors_bytes
    from crl_exp.models.memory import rollout_memory, shape_from_hf_config

    prompts = ["abcdefgh"] * 3  # 8 tokens + BOS, under the 16-token sliding window
    enc = tiny_lm.tokenizer(prompts, return_tensors="pt")
    out = tiny_lm.model(**enc, use_cache=True)
    actual = tensors_bytes(cache_tensors(out.past_key_values))
    shape = shape_from_hf_config(tiny_lm.model.config, "float32")
    estimate = rollout_memory(shape, rows=3, prompt_tokens=enc.input_ids.shape[1], new_tokens=0, prefill_rows=3)
    assert estimate.parts["kv_cache"] == actual
    assert estimate.total_bytes > actual + estimate.parts["logits"]


def test_left_padded_cache_keeps_one_window_per_sliding_layer(tiny_lm):
    """Memory: a sliding-window layer holds window - 1 columns (not the full width) yet counts the full length."""
    from crl_exp.kv_cache import cache_tensors, left_padded_cache

    rows, lengths = [], []
    for text in ("a" * 39, "b" * 29):  # + BOS: 40 and 30 tokens, beyond the 16-token window
        ids = tiny_lm.tokenizer(text, return_tensors="pt").input_ids
        rows.append(cache_tensors(tiny_lm.model(input_ids=ids, use_cache=True).past_key_values))
        lengths.append(ids.shape[1])
    cache = left_padded_cache(tiny_lm, rows, lengths)
    widths = [layer.keys.shape[-2] for layer in cache.layers]
    assert widths == [15, 15, 40]  # two sliding layers, one global layer (tiny_gemma3)
    assert all(layer.get_seq_length() == 40 for layer in cache.layers)
    assert torch.equal(cache.layers[2].keys[1, :, 10:], rows[1][2][0][0])  # right-aligned, left zeros
    assert not cache.layers[2].keys[1, :, :10].any()


def test_inplace_layers_return_what_the_stock_layers_return_and_keep_old_views(monkeypatch):
    """A prefill then 60 one-token steps (and a 3-token step) through both layer kinds, with 2 spare columns so
    the global buffer grows and the sliding one compacts many times: every returned key/value tensor equals the
    stock layer's, and a view taken early is never overwritten."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    import crl_exp.models.inplace_cache as ic

    monkeypatch.setattr(ic, "MIN_SPARE", 2)
    torch.manual_seed(0)
    for stock, inplace in ((DynamicLayer(), ic.InplaceLayer()),
                           (DynamicSlidingWindowLayer(16), ic.InplaceSlidingWindowLayer(16))):
        steps = [torch.randn(2, 1, 20, 4)] + [torch.randn(2, 1, 1, 4) for _ in range(30)] + [torch.randn(2, 1, 3, 4)]
        steps += [torch.randn(2, 1, 1, 4) for _ in range(30)]
        snapshot = None
        for i, k in enumerate(steps):
            want, got = stock.update(k, -k), inplace.update(k, -k)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), (type(inplace).__name__, i)
            assert torch.equal(stock.keys, inplace.keys) and stock.get_seq_length() == inplace.get_seq_length()
            assert stock.get_mask_sizes(1) == inplace.get_mask_sizes(1)
            if i == 5:
                snapshot, frozen = inplace.keys, inplace.keys.clone()
            held = inplace.get_seq_length() if isinstance(inplace, ic.InplaceLayer) else 15 + 20  # window - 1 + max step
            assert inplace._k.shape[-2] <= held * 1.25 + ic.MIN_SPARE  # the stated memory bound
        assert torch.equal(snapshot, frozen)


def test_long_generations_through_the_inplace_cache_match_the_stock_cache(tiny_lm, monkeypatch):
    """80 steered steps from prefix caches (buffers grow and sliding windows compact, 4 spare columns) decode
    exactly as the full-prompt path, which runs on transformers' own cache layers."""
    import crl_exp.models.inplace_cache as ic

    monkeypatch.setattr(ic, "MIN_SPARE", 4)
    prompts = [SHOTS_A + SUFFIXES[0], SHOTS_A + SUFFIXES[2], SHOTS_B + SUFFIXES[1]]
    steerer = ResidualSteerer(tiny_lm.model, 1, random_directions(tiny_lm.d_model, 16))
    runs = []
    for prefixes in (None, [SHOTS_A, SHOTS_A, SHOTS_B]):
        torch.manual_seed(0)
        policy = ActorCritic(tiny_lm.d_model, 16, 16)
        with torch.no_grad():
            policy.actor_head.weight.normal_(0, 1)
        controller = PolicyController(policy, 3.0, greedy=True)
        runs.append((generate(tiny_lm, prompts, 80, steerer, controller, prefixes=prefixes), controller.stacked()))
    (full, a), (cached, b) = runs
    assert full.new_tokens.shape[1] == 80 and torch.equal(full.new_tokens, cached.new_tokens)
    assert torch.equal(a["feature"], b["feature"])
    torch.testing.assert_close(a["state"], b["state"], atol=1e-4, rtol=1e-5)


def test_prefill_skips_the_output_head_and_keeps_the_same_cache(tiny_lm):
    """A prefill's logits are never read: its cache comes from the model's body alone, equal to the full model's."""
    from crl_exp.kv_cache import cache_tensors, prefill

    ids = tiny_lm.tokenizer(["The quick brown fox jumps over"], return_tensors="pt").input_ids
    calls = []
    hook = tiny_lm.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        body = cache_tensors(prefill(tiny_lm, ids))
        assert not calls  # the head never ran
        full = cache_tensors(tiny_lm.model(input_ids=ids, use_cache=True).past_key_values)
    finally:
        hook.remove()
    assert len(body) == len(full)
    for (k, v), (k2, v2) in zip(body, full, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
