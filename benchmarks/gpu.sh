#!/usr/bin/env bash
# GPU benchmark: reference-style fp32 PyTorch vs edm-deploy's fastest path, CIFAR-10 DDPM++,
# batch 64/256/512, NFE 35. Needs a CUDA GPU with torch (TensorRT optional). Prepared to finish
# in under 5 minutes including compilation. Results go to $OUT (or the current folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 290 python3 benchmarks/gpu_bench.py --device cuda --batches "${BATCHES:-64,256,512}" --repeats "${REPEATS:-3}" --out "${OUT:-.}"
