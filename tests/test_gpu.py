"""CUDA checks (``make test-gpu``): bf16 hook arithmetic, device placement of the policy and its PPO update, a
short steered generate. Skipped, with that reason, where no GPU exists."""

from __future__ import annotations

import pytest
import torch

from crl_exp.crl.policy import ActorCritic
from crl_exp.crl.ppo import Batch, PPOConfig, ppo_update
from crl_exp.crl.rollout import PolicyController
from crl_exp.generation import generate
from crl_exp.steering import ResidualSteerer, StaticController

from helpers import as_loaded, random_directions, tiny_gemma3

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")]


@pytest.fixture
def cuda_lm():
    lm = as_loaded(tiny_gemma3().to("cuda", torch.bfloat16))
    assert lm.device.type == "cuda"
    return lm


def test_bf16_hook_adds_in_the_model_dtype_on_cuda(cuda_lm):
    directions = random_directions(cuda_lm.d_model, 16)
    steerer = ResidualSteerer(cuda_lm.model, 1, directions)
    assert steerer.directions.unit.device.type == "cuda" and steerer.directions.unit.dtype == torch.bfloat16
    plain = generate(cuda_lm, ["hello there"], 4)
    zero = generate(cuda_lm, ["hello there"], 4, steerer, StaticController(3, 0.0))
    assert torch.equal(plain.new_tokens, zero.new_tokens)
    steered = generate(cuda_lm, ["hello there"], 4, steerer, StaticController(3, 50.0))
    assert steered.new_tokens.shape == plain.new_tokens.shape


def test_policy_reads_fp32_on_its_device_and_ppo_updates_there(cuda_lm):
    policy = ActorCritic(cuda_lm.d_model, 16, 16).to("cuda")
    steerer = ResidualSteerer(cuda_lm.model, 1, random_directions(cuda_lm.d_model, 16))
    controller = PolicyController(policy, 1.0)
    gen = generate(cuda_lm, ["abc", "hello"], 3, steerer, controller)
    traj = controller.stacked()
    assert traj["state"].dtype == torch.float32 and traj["feature"].device.type == "cpu"
    batch = Batch.from_rollout(traj, gen.valid, torch.tensor([1.0, 0.0]), 1.0, 0.95)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    stats = ppo_update(policy, optimizer, PPOConfig(num_minibatches=1, update_epochs=1), 0, batch, None,
                       torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert next(policy.parameters()).device.type == "cuda"
