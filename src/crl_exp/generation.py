"""Batched, left-padded, KV-cached greedy generation, optionally under a steering hook.

Where it ends: ``stopping.py``; its prefix caches: ``kv_cache.py``; the reward it can compute on the way, the
reference answer's likelihood: ``reference_likelihood.py``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from crl_exp.kv_cache import prompt_prefix_cache
from crl_exp.models import LoadedModel
from crl_exp.models.greedy_head import screened_greedy_head
from crl_exp.reference_likelihood import reference_inputs, reference_likelihood
from crl_exp.steering.hook import Controller, ResidualSteerer
from crl_exp.stopping import cut_at_stop_strings, end_token_ids, stop_criteria, stop_steps, valid_steps


@dataclass
class Generation:
    prompts: list[str]
    completions: list[str]
    new_tokens: torch.Tensor  # [B, T_new] (pad after EOS)
    seconds: float
    valid: torch.Tensor  # [B, T_new] bool: the steps that belong to each row's episode (see ``valid_steps``)
    first_step_logits: torch.Tensor | None = None  # [B, len(score_token_ids)] at the first generated position
    first_step_logsumexp: torch.Tensor | None = None  # [B] log of the full-vocabulary softmax normaliser there
    last_prompt_tokens: torch.Tensor | None = None  # [B] each row's last prompt token (left padding: column -1)
    reference_likelihood: torch.Tensor | None = None  # [B] see ``reference_likelihood``

    @property
    def steered_tokens(self) -> torch.Tensor:
        """[B, T]: the token whose residual stream step t reads and steers (the newest position): the last prompt
        token at step 0, generated token t-1 after that."""
        return torch.cat([self.last_prompt_tokens[:, None], self.new_tokens[:, :-1]], dim=1)

    @property
    def n_generated(self) -> int:
        return int(self.new_tokens.numel())


@torch.inference_mode()
def generate(lm: LoadedModel, prompts: list[str], max_new_tokens: int, steerer: ResidualSteerer | None = None,
             controller: Controller | None = None, add_special_tokens: bool = True,
             stop_strings: list[str] | None = None, score_token_ids: torch.Tensor | None = None,
             min_new_tokens: int | None = None, share_prefix: bool = False,
             prefixes: list[str | None] | None = None, references: list[str] | None = None,
             reference_marker: str | None = None) -> Generation:
    """Greedy-decode ``prompts`` in one batch; with ``steerer`` every forward step is steered by ``controller``.

    ``share_prefix``: only the newest position is ever steered, so everything before a prompt's last token is
    the same under every action. Each *distinct* prompt's ``prompt[:-1]`` is prefilled once, unsteered, and its
    KV cache copied to every row holding that prompt (a group of G samples costs one prefill); generation then
    starts from the last prompt token, which is steered exactly as in the full-prompt path.
    ``prefixes`` (implies the same path): each row's few-shot prefix text (a leading part of its prompt, or
    ``None``); each distinct prefix is prefilled once per model and kept (``PrefixStore``), so a prompt costs
    only its own tail.

    ``stop_strings`` end a row early (and are cut from its completion); ``score_token_ids`` returns the raw
    logits of those tokens at the first generated position (e.g. option letters, for constrained answers) and
    the full-vocabulary log-normaliser there, so their probabilities are exact, not renormalised.
    ``references``: each row's reference answer text (e.g. ``#### 42``); ``Generation.reference_likelihood`` is
    its teacher-forced likelihood after the row's completion, cut at ``reference_marker`` (the model's own answer
    marker) and ended with a newline (``reference_likelihood``).
    """
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(lm.device)
    ctx = steerer.attached(controller) if steerer is not None else nullcontext()
    kwargs = stop_criteria(lm.tokenizer, stop_strings, enc.input_ids.shape[1])
    if score_token_ids is not None:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    if references is not None:
        kwargs.update(return_dict_in_generate=True)
    if min_new_tokens:
        kwargs.update(min_new_tokens=min_new_tokens)
    t0 = time.perf_counter()
    if (share_prefix or prefixes) and enc.input_ids.shape[1] >= 2:  # 1-token prompts: no prefix to share
        kwargs["cache"] = prompt_prefix_cache(lm, prompts, enc.input_ids, enc.attention_mask, prefixes,
                                              add_special_tokens)
    # plain greedy steps need only the argmax: screen the head in bf16 (models/greedy_head.py); scored first-step
    # logits and min_new_tokens' logit edits need the fp32 head
    screen = lm.screened_greedy_head and score_token_ids is None and not min_new_tokens
    with ctx, screened_greedy_head(lm.model, screen):
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id, **kwargs)
    seconds = time.perf_counter() - t0
    sequences = out.sequences if "return_dict_in_generate" in kwargs else out
    first = lse = None
    if score_token_ids is not None:
        first = out.logits[0][:, score_token_ids.to(lm.device)].float().cpu()
        lse = out.logits[0].float().logsumexp(-1).cpu()
    new = sequences[:, enc.input_ids.shape[1]:].cpu()
    valid = valid_steps(new, end_token_ids(lm.tokenizer, lm.model), stop_steps(kwargs))
    texts = lm.tokenizer.batch_decode(new, skip_special_tokens=True)
    if stop_strings:
        texts = [cut_at_stop_strings(t, stop_strings) for t in texts]
    likelihood = None
    if references is not None:
        kept, ref_ids = reference_inputs(lm, new, texts, references, reference_marker)
        likelihood = reference_likelihood(lm, prompts, enc.input_ids, enc.attention_mask, new.to(lm.device), kept,
                                          ref_ids, steerer, prefixes, add_special_tokens)
    return Generation(prompts, texts, new, seconds, valid, first, lse, enc.input_ids[:, -1].cpu(), likelihood)
