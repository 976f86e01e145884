"""sae-lens' dense TopK training step vs the sparse one (``saes/training.py``) at the embedded SAE's shape.

Usage: .venv/bin/python benchmarks/sae_training.py [--steps 20] [--dead-share 0.1] [--out FILE.json]

One optimiser step = ``training_forward_pass`` + backward + Adam, as ``SAETrainer`` runs it, on d_in 640,
d_sae 4096, k 32, batches of 1024 (conf/sae/trained.yaml), alternating the two classes step by step in this one
process so both see the same machine load. ``--dead-share`` marks that share of latents dead, which switches
the AuxK loss on (the trained layer-12 SAE ends with 9% dead; early steps have none): the script times both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from crl_exp.models.hardware import with_machine
from crl_exp.saes.training import SAETrainingSettings, SparseTopKTrainingSAE


def step_seconds(sae, optimizer, x: torch.Tensor, dead: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--dead-share", type=float, default=0.1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    s = SAETrainingSettings()
    cfg = TopKTrainingSAEConfig(d_in=args.d_in, d_sae=s.d_sae, k=s.k, device="cpu")
    torch.manual_seed(0)
    saes = {"dense": TopKTrainingSAE(cfg), "sparse": SparseTopKTrainingSAE(cfg)}
    saes["sparse"].load_state_dict(saes["dense"].state_dict())
    optimizers = {name: torch.optim.Adam(sae.parameters(), lr=s.lr) for name, sae in saes.items()}
    x = torch.randn(s.batch_size, args.d_in)
    n_dead = round(args.dead_share * s.d_sae)
    rows = {}
    for label, dead in (("no_dead", torch.zeros(s.d_sae, dtype=torch.bool)),
                        (f"dead_{n_dead}", torch.arange(s.d_sae) < n_dead)):
        seconds = {name: 0.0 for name in saes}
        for name in saes:  # warm-up
            step_seconds(saes[name], optimizers[name], x, dead)
        for _ in range(args.steps):
            for name in saes:
                seconds[name] += step_seconds(saes[name], optimizers[name], x, dead)
        rows[label] = {f"{name}_step_seconds": v / args.steps for name, v in seconds.items()}
        rows[label]["speedup"] = seconds["dense"] / seconds["sparse"]
    result = {"d_in": args.d_in, "d_sae": s.d_sae, "k": s.k, "batch": s.batch_size, "steps": args.steps,
              "threads": torch.get_num_threads(), **rows}
    print(json.dumps(with_machine(result)), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(with_machine(result), indent=1))


if __name__ == "__main__":
    main()
