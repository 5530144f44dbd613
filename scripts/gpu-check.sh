#!/usr/bin/env bash
# On a machine with a GPU (about 5 minutes): builds the tests with `--features cuda` and runs the
# GPU checks of tests/gpu.rs — forward parity GPU vs CPU on the tiny fixtures (f32 within 1e-4,
# bf16 within 0.1 nats), one training step GPU vs CPU, greedy generation equal, the smoke recipe
# on `device = "cuda"`, an eval of the WBCAtt fixture benchmark — and prints one line per check.
# The toolkit: nvcc on PATH, else the pinned wheels (scripts/cuda-env.sh). The full log is kept
# in target/gpu-check.log.
#   scripts/gpu-check.sh
#   GPU_CHECK_FEATURES=nccl scripts/gpu-check.sh   # with NCCL (libnccl needed at run time)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-env.sh
cuda_env
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.' || true)
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
fi
nvidia-smi -L 2>/dev/null || echo "gpu-check: nvidia-smi found no GPU (the checks will say skipped)"
mkdir -p target
start=$(date +%s)
status=0
cargo test --locked --features "${GPU_CHECK_FEATURES:-cuda}" --test gpu -- --nocapture --test-threads 1 \
    >target/gpu-check.log 2>&1 || status=$?
grep -E '^GPU-CHECK|^test result|panicked at|^error' target/gpu-check.log || true
echo "gpu-check: exit $status after $(( $(date +%s) - start )) s (log: target/gpu-check.log)"
exit "$status"
