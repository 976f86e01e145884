"""Few-shot prefix caching: a prompt started from its prefix's stored KV cache decodes exactly as from scratch."""

from __future__ import annotations

import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.rollout import PolicyController
from crl_exp.generation import PrefixStore, generate, prefix_key, prefix_store
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
    from crl_exp.generation import cache_tensors, tensors_bytes
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
    from crl_exp.generation import cache_tensors, left_padded_cache

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
