"""Shared test helpers: tiny randomly initialised Gemma models, a byte-level tokenizer, sae-lens SAEs saved to
disk, a planted-feature environment and the steering-placement probes. Test modules import these from here,
never from each other."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from omegaconf import OmegaConf
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from crl_exp.episodes import SteeringEnv
from crl_exp.models.architecture import decoder_layers
from crl_exp.models.loading import LoadedModel, freeze, prepare_tokenizer
from crl_exp.saes.loading import LoadedSAE, resid_post_hook_name
from crl_exp.steering import NO_FEATURE, ResidualSteerer, StaticController, SteeringDirections
from crl_exp.steering.hook import SteeringStep
from crl_exp.tasks.base import Task
from crl_exp.tasks.schema import Example

# ---------------------------------------------------------------- tiny models
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer with Gemma's special-token ids (pad 0, eos 1, bos 2)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", add_bos_token=True)
    from tokenizers import processors

    fast._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return prepare_tokenizer(fast)


def tiny_gemma3(n_layers: int = 3, d_model: int = 64, seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=264, hidden_size=d_model, intermediate_size=2 * d_model,
                           num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                           max_position_embeddings=512, sliding_window=16, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2, layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    return freeze(Gemma3ForCausalLM(cfg))


def tiny_gemma2(n_layers: int = 2, d_model: int = 64, seed: int = 0) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=264, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                       sliding_window=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return freeze(Gemma2ForCausalLM(cfg))


def as_loaded(model, name: str = "tiny") -> LoadedModel:
    n_layers = model.config.num_hidden_layers
    return LoadedModel(model, byte_tokenizer(), name, n_layers, model.config.hidden_size, "memory", 0.0)


# ---------------------------------------------------------------- SAEs on disk
def save_standard_sae(path, d_in: int, hook_name: str | None, d_sae: int = 32):
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    cfg.metadata.model_name = "tiny"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(path)
    return sae


# ---------------------------------------------------------------- steering placement probes
STEER_PROMPTS = ["Hello there, how are", "A", "The quick brown fox jumps over"]  # different lengths -> left padding


def random_directions(d_model: int, d_sae: int = 16, seed: int = 1) -> SteeringDirections:
    g = torch.Generator().manual_seed(seed)
    # Non-unit rows on purpose: the steerer must normalise them.
    return SteeringDirections.from_decoder(3.0 * torch.randn(d_sae, d_model, generator=g))


class PreHookSteerer(ResidualSteerer):
    """The known-wrong placement: a forward *pre*-hook on layers[L] edits resid_post of L-1."""

    def attached(self, controller=None):

        @contextmanager
        def ctx():
            self.controller = controller or self.controller
            self.steps = []

            def pre_hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                out = self.controller(hidden[:, -1])
                feats, coefs = out if isinstance(out, tuple) else (out, self.own_coefficients(out))
                self.steps.append(SteeringStep(feats, coefs))
                hidden = hidden.clone()
                hidden[:, -1] += self.delta(feats, coefs)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handle = self._block.register_forward_pre_hook(pre_hook, with_kwargs=True)
            try:
                yield self
            finally:
                handle.remove()

        return ctx()


def capture_resid_post(lm, layer: int, enc, steerer=None, controller=None) -> torch.Tensor:
    """Full-sequence output of layers[layer], recorded by a second hook registered after the steerer's."""
    seen = []
    ctx = steerer.attached(controller) if steerer is not None else None
    if ctx is not None:
        ctx.__enter__()
    handle = decoder_layers(lm.model)[layer].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        with torch.no_grad():
            lm.model(**enc)
    finally:
        handle.remove()
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return seen[0]


def resid_change(lm, steerer_cls, layer: int = 1) -> tuple[bool, bool]:
    """(did the steerer change resid_post of ``layer`` at all, is the change exactly c*d(f) at the last position)."""
    enc = lm.tokenizer(STEER_PROMPTS, return_tensors="pt", padding=True)
    dirs = random_directions(lm.d_model)
    steerer = steerer_cls(lm.model, layer, dirs)
    feats = torch.tensor([3, 7, NO_FEATURE])
    coefs = torch.tensor([2.0, -1.5, 5.0])
    base = capture_resid_post(lm, layer, enc)
    steered = capture_resid_post(lm, layer, enc, steerer, StaticController(feats, coefs))
    expected = torch.zeros_like(base)
    expected[0, -1] = 2.0 * dirs.unit[3]
    expected[1, -1] = -1.5 * dirs.unit[7]
    # Exact up to float rounding of x + delta at the residual's magnitude (Gemma's residuals reach ~1e5).
    atol = 1e-5 + 8 * torch.finfo(base.dtype).eps * base.abs().max().item()
    return not torch.equal(steered, base), torch.allclose(steered - base, expected, rtol=0, atol=atol)


# ---------------------------------------------------------------- planted-feature environment
TARGET = "Z"
LAYER = 1
D_SAE = 8
PLANTED = 5
COEF = 15.0


class PlantedTask(Task):
    """Reward 1 when the first generated character is the target."""

    name, kind, folder = "planted", "generation", ""

    def __init__(self, prompts):
        super().__init__(OmegaConf.create({"max_new_tokens": 1, "split_fractions": {"train": 1.0}}), None)
        self._by_split = {"train": [Example(f"p{i}", "planted", p, TARGET, "all") for i, p in enumerate(prompts)],
                          "validation": [], "test": []}

    def read_local(self):
        return iter(())

    read_hub = read_local

    def to_example(self, *a):
        raise NotImplementedError

    def user_text(self, ex):
        return ex.question

    def score_batch(self, examples, prompts, completions, option_probs=None):
        out = []
        for c in completions:
            hit = float(c.startswith(TARGET))
            out.append({"parsed": c[:1], "valid": True, "correct": hit, "reward": hit})
        return out

    def metrics_from_records(self, records):
        return {"reward": sum(r["reward"] for r in records) / len(records)}


PLANTED_PROMPTS = ["The cat sat", "Hello wor", "abc de", "One two thr", "Blue sky and", "It is a", "Rain falls on",
           "We go to", "My friend", "Numbers like", "Quiet room", "Tea or"]


def target_direction(tiny_lm, target: str, prompts: list[str]) -> torch.Tensor:
    """The unit direction at resid_post of LAYER (last position) that most raises ``target``'s logit."""
    target_id = tiny_lm.tokenizer(target, add_special_tokens=False).input_ids[0]
    enc = tiny_lm.tokenizer(prompts, return_tensors="pt", padding=True)
    block = decoder_layers(tiny_lm.model)[LAYER]
    captured = {}

    def keep(module, inputs, output):
        captured["h"] = output.detach().requires_grad_(True)
        return captured["h"]

    handle = block.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = tiny_lm.model(**enc).logits[:, -1]
            logits[:, target_id].sum().backward()
    finally:
        handle.remove()
    grads = captured["h"].grad[:, -1]
    return grads.mean(0) / grads.mean(0).norm()


def planted_sae(tiny_lm, planted: dict[int, torch.Tensor]) -> LoadedSAE:
    cfg = StandardSAEConfig(d_in=tiny_lm.d_model, d_sae=D_SAE)
    cfg.metadata.hook_name = resid_post_hook_name(LAYER)
    sae = StandardSAE(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(D_SAE, tiny_lm.d_model, generator=g))
        for feature, direction in planted.items():
            sae.W_dec[feature] = direction
        sae.W_enc.copy_(sae.W_dec.T)
    return LoadedSAE(sae, LAYER, cfg.metadata.hook_name, "planted")


def planted_env(tiny_lm) -> SteeringEnv:
    """An SAE whose feature PLANTED points along the direction that most raises the target's logit."""
    loaded = planted_sae(tiny_lm, {PLANTED: target_direction(tiny_lm, TARGET, PLANTED_PROMPTS)})
    steerer = ResidualSteerer(tiny_lm.model, LAYER, SteeringDirections.from_decoder(loaded.sae.W_dec))
    return SteeringEnv(tiny_lm, loaded, PlantedTask(PLANTED_PROMPTS), steerer, COEF)


# ---------------------------------------------------------------- class-dependent planted environment
CLASS_TARGETS = {"question": ("Z", 5), "exclaim": ("Q", 2)}  # class -> (rewarded first character, its feature)


class ClassPlantedTask(PlantedTask):
    """Two classes of prompts, visible in the prompt (ending in '?' or '!'); each is paid only for its own target
    character, so the best feature depends on the prompt."""

    name = "class_planted"

    def __init__(self, prompts):
        super().__init__(prompts)
        self._by_split["train"] = [Example(f"p{i}", self.name, p, "", "question" if p.endswith("?") else "exclaim")
                                   for i, p in enumerate(prompts)]

    def score_batch(self, examples, prompts, completions, option_probs=None):
        out = []
        for ex, c in zip(examples, completions, strict=True):
            hit = float(c.startswith(CLASS_TARGETS[ex.group][0]))
            out.append({"parsed": c[:1], "valid": True, "correct": hit, "reward": hit})
        return out


CLASS_PROMPTS = [p + end for p in PLANTED_PROMPTS for end in ("?", "!")]


def class_planted_env(tiny_lm) -> SteeringEnv:
    loaded = planted_sae(tiny_lm, {f: target_direction(tiny_lm, t, CLASS_PROMPTS) for t, f in CLASS_TARGETS.values()})
    steerer = ResidualSteerer(tiny_lm.model, LAYER, SteeringDirections.from_decoder(loaded.sae.W_dec))
    return SteeringEnv(tiny_lm, loaded, ClassPlantedTask(CLASS_PROMPTS), steerer, COEF)


class DenseClassTask(ClassPlantedTask):
    """The class-planted prompts, paid the probability of their class's target character (a dense reward over
    scored token groups, as MMLU's and the known-answer task's)."""

    name = "dense_class"
    GROUPS = ("question", "exclaim")

    def scored_token_groups(self, tokenizer, batch):
        ids = [tokenizer(CLASS_TARGETS[g][0], add_special_tokens=False).input_ids[0] for g in self.GROUPS]
        return torch.tensor(ids), torch.tensor([0, 1])

    def score_batch(self, examples, prompts, completions, option_probs=None):
        out = []
        for i, ex in enumerate(examples):
            k = self.GROUPS.index(ex.group)
            mass = float(option_probs[i, k])
            out.append({"parsed": "", "valid": True, "correct": float(int(option_probs[i].argmax()) == k),
                        "reward": mass})
        return out


def dense_class_env(tiny_lm, coefficient: float = COEF) -> SteeringEnv:
    env = class_planted_env(tiny_lm)
    env.task = DenseClassTask(CLASS_PROMPTS)
    env.coefficient = coefficient  # the steerer follows (SteeringEnv.__setattr__)
    return env
