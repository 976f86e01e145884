"""How different are the policy's inputs across prompts? (Why every trained greedy policy picks one feature.)

Usage: .venv/bin/python experiments/state_diversity.py [--experiment bbq_layer12] [--prompts 48] [--out FILE.json]
(recorded: experiments/diagnostics/state_diversity_<experiment>.json)

For ``--prompts`` training prompts (train split only) of an experiment, the residual state the policy sees at the
first steered step: resid_post of ``sae.layer`` (the output of that block, where the steering hook sits) at the
last prompt token, through the policy's LayerNorm. Reports the mean and minimum pairwise cosine, the share of the
states' energy that is prompt-specific (deviation from the mean state), and the same cosine after per-dimension
standardisation (what ``policy.obs_norm=true`` feeds the trunk once its statistics have settled).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from crl_exp.episodes import render_prompt
from crl_exp.paths import CONFIG_DIR
from crl_exp.runtime import load_model_and_sae
from crl_exp.tasks import build_task


def off_diagonal_cosines(x: torch.Tensor) -> torch.Tensor:
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T)[~torch.eye(len(x), dtype=torch.bool)]


def diversity(states: torch.Tensor) -> dict[str, float]:
    """Statistics of LayerNorm'd states ``[N, d]`` (N >= 2)."""
    x = torch.nn.functional.layer_norm(states.float(), (states.shape[1],))
    cos = off_diagonal_cosines(x)
    deviation = x - x.mean(0)
    standardised = deviation / x.std(0).clamp_min(1e-6)
    return {"mean_pairwise_cosine": cos.mean().item(), "min_pairwise_cosine": cos.min().item(),
            "prompt_specific_energy_share": (deviation.pow(2).sum() / x.pow(2).sum()).item(),
            "mean_pairwise_cosine_standardised": off_diagonal_cosines(standardised).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="bbq_layer12")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.prompts < 2:
        raise SystemExit("--prompts must be >= 2 (pairwise statistics)")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={args.experiment}"])
    lm, sae = load_model_and_sae(cfg)
    task = build_task(cfg.task, cfg.get("data_dir"))
    states = []
    for ex in task.split("train", args.prompts):
        ids = lm.tokenizer(render_prompt(task, lm, ex), return_tensors="pt").to(lm.device)
        with torch.no_grad():  # hidden_states[L + 1] is the output of layers[L]: the steering hook's resid_post
            out = lm.model(**ids, output_hidden_states=True)
        states.append(out.hidden_states[sae.layer + 1][0, -1].float().cpu())
    row = {"experiment": args.experiment, "model": lm.name, "layer": sae.layer, "split": "train",
           "prompts": len(states), **diversity(torch.stack(states))}
    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
