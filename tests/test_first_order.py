"""The first-order screen: one backward pass predicts every feature's reward change on a one-token task."""

from __future__ import annotations

import pytest
import torch

from crl_exp.errors import CRLConfigError
from crl_exp.first_order import first_order_screen, group_reward_weights
from crl_exp.reward_table import reward_table

from helpers import CLASS_TARGETS, D_SAE, dense_class_env, planted_env


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_the_screen_predicts_the_exact_reward_change_of_every_feature(tiny_lm):
    env = dense_class_env(tiny_lm, coefficient=0.05)  # small steps: first order should be nearly exact
    prompts = env.task.split("train")[:6]
    screen = first_order_screen(env, prompts)
    table = reward_table(env, prompts, list(range(D_SAE)), use_cache=False)
    change = table.reward - table.unsteered_reward[:, None]
    assert screen.shape == (6, D_SAE)
    for p in range(6):
        assert spearman(screen[p], change[p]) > 0.9, p
    assert torch.allclose(screen, change, rtol=0.2, atol=0.05 * float(change.abs().max()))
    # at the planted coefficient the class's own feature is the screen's best for its class
    strong = dense_class_env(tiny_lm)
    screen = first_order_screen(strong, strong.task.split("train"))
    for ex, row in zip(strong.task.split("train"), screen, strict=True):
        assert int(row.argmax()) == CLASS_TARGETS[ex.group][1], ex.question


def test_the_reward_is_read_as_linear_in_the_group_masses_and_binary_tasks_are_refused(tiny_lm):
    env = dense_class_env(tiny_lm)
    question = next(e for e in env.task.split("train") if e.group == "question")
    assert group_reward_weights(env.task, question, 2).tolist() == [1.0, 0.0]
    with pytest.raises(CRLConfigError, match="token groups"):
        first_order_screen(planted_env(tiny_lm), planted_env(tiny_lm).task.split("train")[:1])
