"""The first-order screen of a one-token task: every feature's predicted reward change, from one backward pass.

Steering adds ``distance(c) * u_f`` to the residual at the steered position. To first order the reward changes by
``distance(c) * <grad_x r, u_f>``, so one backward pass of the dense reward with respect to that residual ranks the
whole dictionary at once (measured on the embedded model, DESIGN §10: Spearman 0.93 against the exact change of all
4,096 features at BBQ's coefficient, 0.51 at the known-answer task's; the exact best five in the predicted top 64
for 83% and 55% of prompts). It is a screen, not a ranking: ``ppo.advantage=sampled_set`` scores its top exactly
and keeps drawing features it ranks low.

The task's reward is read as a linear function of its scored token-group masses (option letters, target sets):
its coefficients are the task's own rewards for one-hot masses (``Task.score_batch`` on the identity), exact for
the dense rewards of MMLU, BBQ and the known-answer task (the mass of the right group).
"""

from __future__ import annotations

import torch

from crl_exp.episodes import letter_token_ids, render_prompt
from crl_exp.errors import CRLConfigError
from crl_exp.models.architecture import decoder_layers


def group_reward_weights(task, example, n_groups: int) -> torch.Tensor:
    """[n_groups] the reward of ``example`` if all probability sat on each scored group in turn."""
    one_hot = torch.eye(n_groups)
    records = task.score_batch([example] * n_groups, [""] * n_groups, [""] * n_groups, one_hot)
    return torch.tensor([float(r["reward"]) for r in records])


def scored_groups(task, tokenizer, example) -> tuple[torch.Tensor, torch.Tensor]:
    groups = task.scored_token_groups(tokenizer, [example])
    if groups is not None:
        return groups
    letters = task.scored_letters([example])
    if not letters:
        raise CRLConfigError(f"the first-order screen needs a one-token task scored on token groups; {task.name} "
                             f"scores none")
    return letter_token_ids(tokenizer, letters)


def first_order_screen(env, examples: list) -> torch.Tensor:
    """[len(examples), d_sae]: each feature's first-order reward change for each prompt, at ``env.coefficient``."""
    task, lm = env.task, env.lm
    if task.max_new_tokens != 1:
        raise CRLConfigError(f"the first-order screen is for one-token tasks; {task.name} generates "
                             f"{task.max_new_tokens} tokens")
    directions = env.steerer.directions
    unit = directions.unit.detach().float().cpu()
    distance = float(directions.distance(float(env.coefficient)))
    block = decoder_layers(lm.model)[env.sae.layer]
    chat = task.cfg.template == "chat"
    device = next(lm.model.parameters()).device
    out = torch.empty(len(examples), unit.shape[0])
    for i, ex in enumerate(examples):
        ids, owner = scored_groups(task, lm.tokenizer, ex)
        n_groups = int(owner.max()) + 1
        weights = group_reward_weights(task, ex, n_groups)
        if not weights.any():
            raise CRLConfigError(f"the first-order screen needs a reward that reads the group masses ({task.name}'s "
                                 f"reward does not move with them: set task.reward=dense, or ppo.screen_top=0)")
        enc = lm.tokenizer(render_prompt(task, lm, ex), return_tensors="pt", add_special_tokens=not chat).to(device)
        delta = torch.zeros(lm.d_model, device=device, dtype=next(lm.model.parameters()).dtype, requires_grad=True)

        def add_delta(module, inputs, output, delta=delta):
            hidden = output[0] if isinstance(output, tuple) else output
            steered = torch.cat([hidden[:, :-1], hidden[:, -1:] + delta], 1)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handle = block.register_forward_hook(add_delta)
        try:
            with torch.enable_grad():
                logits = lm.model(**enc, logits_to_keep=1).logits[0, -1].float()
                probs = logits.log_softmax(-1)[ids.to(device)].exp()
                masses = torch.zeros(n_groups, device=device).index_add(0, owner.to(device), probs)
                reward = (masses * weights.to(device)).sum()
                (grad,) = torch.autograd.grad(reward, delta)
        finally:
            handle.remove()
        out[i] = distance * (unit @ grad.float().cpu())
    return out
