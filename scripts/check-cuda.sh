#!/usr/bin/env bash
# Checks that `--features cuda` compiles, with no GPU and no system CUDA toolkit: installs the
# pinned CUDA compiler and headers from PyPI (scripts/requirements-cuda.txt) into target/cuda-venv,
# points cudarc and candle-kernels at them, then runs `cargo check` and clippy on every target with
# the features (`cuda`, and `nccl` for multi-GPU training). About 9 minutes cold and ~400 MB of
# wheels; the venv and target/ are reused after.
#   scripts/check-cuda.sh            # check + clippy
#   CUDA_COMPUTE_CAP=80 scripts/check-cuda.sh   # kernels for another GPU generation (default 90)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/cuda-venv
req=scripts/requirements-cuda.txt
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/requirements-cuda.txt"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 10 --timeout 60 -r "$req"
    cp "$req" "$venv/requirements-cuda.txt"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
root=$(ls -d "$site"/nvidia/cu1[0-9]* 2>/dev/null | head -n1)
if [ -z "$root" ] || [ ! -x "$root/bin/nvcc" ]; then
    echo "check-cuda: no nvcc under $site/nvidia (wheel layout changed?)" >&2
    exit 1
fi
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root"
export PATH="$root/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudarc reads the toolkit version from this when it is set (0.19.10 panics on 13.5+).
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
echo "check-cuda: nvcc $("$root/bin/nvcc" --version | grep -o 'release [0-9.]*'), CUDA_ROOT=$root, compute cap $CUDA_COMPUTE_CAP"
# `cuda` alone, then with NCCL (multi-GPU data parallel), which adds code and implies `cuda`.
cargo check --locked --features cuda --all-targets
cargo clippy --locked --features nccl --all-targets -- -D warnings
echo "check-cuda: ok"
