#!/usr/bin/env bash
# The GPU check (issue 25), prepared for a lent GPU machine: <= 8 minutes on one GPU, nothing downloaded.
# That machine has torch and transformers but no package registry and no hub: the project's other packages travel as
# wheels in ./wheels (fill it here with `pip download -d wheels sae-lens hydra-core omegaconf mlflow lightning
# torchmetrics datasets --no-deps` plus their small pure-Python dependencies; <= 64 MiB in all).
# Runs: the CUDA tests (make test-gpu's selection), then benchmarks/gpu_throughput.py (random-weight Gemma 3 270M
# fp32/bf16, Gemma 3 1B and Gemma-2 2B in bf16 at budget=paper shapes: steered vs plain generate, PPO update /
# rollout, peak memory). Writes $OUT/gpu_check.json (or benchmarks/results/gpu_check.json without $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
if ! python -c "import sae_lens, hydra, mlflow" 2>/dev/null; then
  python -m venv --system-site-packages .venv-gpu
  .venv-gpu/bin/pip install --no-index --find-links wheels --no-deps wheels/*.whl >/dev/null
  .venv-gpu/bin/pip install --no-index --no-deps -e . >/dev/null
  PY=.venv-gpu/bin/python
else
  PY=python
fi
timeout 180 "$PY" -m pytest -q -m gpu -rs tests/test_gpu.py | tee "$OUT_DIR/gpu_tests.txt"
timeout 300 "$PY" benchmarks/gpu_throughput.py --out "$OUT_DIR/gpu_check.json"
