#!/usr/bin/env bash
# The GPU path in one go, on a machine with CUDA (about 5 minutes on one modern GPU):
#   1. the CUDA-marked tests (pytest -m cuda): SISA on CUDA is bit-identical run to run,
#      the unlearned shard equals the shard retrained on CUDA, CUDA and CPU predictions
#      agree;
#   2. B1 on the GPU (bench/b1_gpu.py): samples/s, the unlearning ratio against the
#      schedule's theoretical one, and NVML energy per job.
# Usage: bench/gpu.sh [--quick]. Creates .venv (with the `gpu` extra) if it is missing.
# Environment: PYTHON (default python3.11, else python3), GPU_SH_TIMEOUT (seconds for
# each of the two steps, default 270: both fit in ten minutes).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=()
if [[ "${1:-}" == "--quick" ]]; then
    quick=(--quick)
fi
step_timeout="${GPU_SH_TIMEOUT:-270}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: nvidia-smi not found: this machine has no NVIDIA driver" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [[ ! -x .venv/bin/python ]]; then
    python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    echo "gpu.sh: creating .venv with ${python}"
    "${python}" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # PyPI's Linux torch wheels carry CUDA; the `gpu` extra adds NVML (energy).
    .venv/bin/python -m pip install -q -e '.[dev,gpu]'
elif ! .venv/bin/python -c "import pynvml" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q -e '.[dev,gpu]'
fi

if ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: torch in .venv does not see CUDA ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))." >&2
    echo "        Install a CUDA build, e.g. .venv/bin/pip install 'torch>=2.4,<2.14' --index-url https://download.pytorch.org/whl/cu124" >&2
    exit 2
fi

export PALIMPSEST_DEVICE=cuda
export CUBLAS_WORKSPACE_CONFIG=:4096:8

echo "== CUDA tests"
timeout "${step_timeout}" .venv/bin/python -m pytest tests/ml/test_cuda.py -m cuda -q -rs \
    -p no:cacheprovider

echo "== B1 on the GPU"
timeout "${step_timeout}" .venv/bin/python -m bench.b1_gpu --device cuda ${quick[@]+"${quick[@]}"}
echo "gpu.sh: done; figures in bench/results/b1_gpu.json"
