#!/usr/bin/env bash
# Checks that `--features cuda` compiles, with no GPU and no system CUDA toolkit: installs the
# pinned CUDA compiler and headers from PyPI (scripts/requirements-cuda.txt) into target/cuda-venv,
# points cudarc and candle-kernels at them (scripts/cuda-env.sh), then runs `cargo check` and
# clippy on every target with the features (`cuda`, and `nccl` for multi-GPU training). About 9
# minutes cold and ~400 MB of wheels; the venv and target/ are reused after.
#   scripts/check-cuda.sh            # check + clippy
#   CUDA_COMPUTE_CAP=80 scripts/check-cuda.sh   # kernels for another GPU generation (default 90)
set -euo pipefail
cd "$(dirname "$0")/.."
# Always the pinned wheels here, whatever toolkit the machine has: what CI checks is reproducible.
export LVLM_CUDA_WHEELS=1
source scripts/cuda-env.sh
cuda_env
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "check-cuda: compute cap $CUDA_COMPUTE_CAP"
# `cuda` alone, then with NCCL (multi-GPU data parallel), which adds code and implies `cuda`.
cargo check --locked --features cuda --all-targets
cargo clippy --locked --features nccl --all-targets -- -D warnings
echo "check-cuda: ok"
