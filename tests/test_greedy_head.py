"""The screened greedy head: bf16 screen + fp32 settle picks the fp32 head's argmax, also where plain bf16 does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.rollout import PolicyController
from crl_exp.generation import generate
from crl_exp.models.greedy_head import ScreenedGreedyHead, screenable, screened_greedy_head
from crl_exp.steering import ResidualSteerer

from helpers import random_directions


def near_tie_head(vocab: int = 20_000, d: int = 64, rows: int = 256, seed: int = 0):
    """A head and hidden states whose logits are large (so bf16 rounding is ~0.1-1 logit) with many close calls."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=g) / d ** 0.5)
    hidden = 40 * torch.randn(rows, d, generator=g)
    return head, hidden


def test_screened_argmax_is_the_fp32_argmax_where_plain_bf16_is_not():
    head, hidden = near_tie_head()
    exact = head(hidden)
    plain_bf16 = (hidden.bfloat16() @ head.weight.bfloat16().T).float()
    assert (plain_bf16.argmax(-1) != exact.argmax(-1)).sum() > 0  # the screen has something to fix
    screened = ScreenedGreedyHead(head)
    out = screened(hidden[:, None, :])  # [B, 1, V] like a decoding step
    assert out.shape == (len(hidden), 1, head.out_features)
    assert torch.equal(out[:, 0].argmax(-1), exact.argmax(-1))
    # candidates (within twice the rounding bound of the bf16 maximum) carry their fp32 logit; the rest keep
    # bf16 values below the row's fp32 maximum
    bound = screened.bound_per_norm * hidden.norm(dim=-1, keepdim=True)
    candidate = plain_bf16 >= plain_bf16.max(-1, keepdim=True).values - 2 * bound
    assert candidate.sum() == screened.candidates and screened.candidates < 0.01 * exact.numel()
    torch.testing.assert_close(out[:, 0][candidate], exact[candidate], rtol=0, atol=1e-4)
    assert (out[:, 0][~candidate] < exact.max(-1, keepdim=True).values.expand_as(exact)[~candidate]).all()
    assert ((plain_bf16 - exact).abs() <= bound).all()  # the bound holds


def test_many_candidates_are_settled_exactly():
    """A hidden state whose norm lies mostly off the head's rows (e.g. padding rows of finished sequences) makes
    the bound wide next to the logits' spread: hundreds of candidates per row, settled together (one matmul over
    their columns) to the fp32 logits."""
    head, hidden = near_tie_head(vocab=5_000, rows=16, seed=2)
    with torch.no_grad():
        head.weight[:, 0] = 0.0  # no row reads dimension 0 ...
    hidden[:, 0] = 3e3  # ... which carries most of the hidden state's norm
    exact = head(hidden)
    screened = ScreenedGreedyHead(head)
    out = screened(hidden[:, None, :])[:, 0]
    assert screened.candidates > 10 * len(hidden)
    assert torch.equal(out.argmax(-1), exact.argmax(-1))
    bound = screened.bound_per_norm * hidden.norm(dim=-1, keepdim=True)
    plain_bf16 = (hidden.bfloat16() @ head.weight.bfloat16().T).float()
    candidate = plain_bf16 >= plain_bf16.max(-1, keepdim=True).values - 2 * bound
    torch.testing.assert_close(out[candidate], exact[candidate], rtol=1e-6, atol=1e-3)


def test_generation_is_token_identical_with_and_without_the_screen(tiny_lm):
    def run(screen: bool):
        tiny_lm.screened_greedy_head = screen
        steerer = ResidualSteerer(tiny_lm.model, 1, random_directions(tiny_lm.d_model, 16))
        torch.manual_seed(0)
        policy = ActorCritic(tiny_lm.d_model, 16, 16)
        with torch.no_grad():
            policy.actor_head.weight.normal_(0, 1)
        controller = PolicyController(policy, 3.0, greedy=True)
        gen = generate(tiny_lm, ["Hello there, how are", "A", "The quick brown fox jumps over"], 24, steerer,
                       controller)
        return gen, controller.stacked()

    plain, a = run(False)
    screened, b = run(True)
    assert torch.equal(plain.new_tokens, screened.new_tokens) and torch.equal(a["feature"], b["feature"])
    assert isinstance(tiny_lm.model.lm_head, nn.Linear) and not isinstance(tiny_lm.model.lm_head, ScreenedGreedyHead)
    with screened_greedy_head(tiny_lm.model) as head:
        assert tiny_lm.model.get_output_embeddings() is head and head.calls == 24  # one call per step of run 2
    assert tiny_lm.model.get_output_embeddings() is not head  # restored


def test_the_head_is_restored_after_an_error_and_refused_where_logits_are_edited(tiny_lm):
    original = tiny_lm.model.lm_head
    with pytest.raises(RuntimeError), screened_greedy_head(tiny_lm.model):
        raise RuntimeError("boom")
    assert tiny_lm.model.lm_head is original
    assert screenable(tiny_lm.model)
    tiny_lm.model.generation_config.repetition_penalty = 1.3  # generate would edit logits before its argmax
    assert not screenable(tiny_lm.model)
    with screened_greedy_head(tiny_lm.model) as head:
        assert head is None and tiny_lm.model.lm_head is original


def test_scored_first_step_logits_come_from_the_fp32_head(tiny_lm):
    letters = torch.tensor([5, 6, 7])
    gen = generate(tiny_lm, ["Answer:"], 1, score_token_ids=letters)
    enc = tiny_lm.tokenizer(["Answer:"], return_tensors="pt")
    with torch.no_grad():
        logits = tiny_lm.model(**enc).logits[:, -1]
    torch.testing.assert_close(gen.first_step_logits, logits[:, letters], rtol=0, atol=1e-5)
    torch.testing.assert_close(gen.first_step_logsumexp, logits.logsumexp(-1), rtol=0, atol=1e-5)
