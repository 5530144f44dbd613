# Sourced by check-cuda.sh and gpu-check.sh: points cudarc and candle-kernels at a CUDA toolkit.
# A toolkit on PATH (nvcc) is used as it is; otherwise the pinned PyPI wheels of
# scripts/requirements-cuda.txt in target/cuda-venv, installed here when missing (needs PyPI).
cuda_env() {
    local venv=target/cuda-venv req=scripts/requirements-cuda.txt root
    if [ -z "${LVLM_CUDA_WHEELS:-}" ] && command -v nvcc >/dev/null 2>&1; then
        root=$(dirname "$(dirname "$(command -v nvcc)")")
    else
        if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/requirements-cuda.txt"; then
            python3 -m venv "$venv"
            "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 10 --timeout 60 -r "$req"
            cp "$req" "$venv/requirements-cuda.txt"
        fi
        local site
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        root=$(ls -d "$site"/nvidia/cu1[0-9]* 2>/dev/null | head -n1)
        if [ -z "$root" ] || [ ! -x "$root/bin/nvcc" ]; then
            echo "no nvcc under $site/nvidia (wheel layout changed?)" >&2
            return 1
        fi
    fi
    export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_TOOLKIT_ROOT_DIR="$root"
    export PATH="$root/bin:$PATH"
    # cudarc reads the toolkit version from this when it is set (0.19.10 panics on 13.5+).
    export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
    echo "cuda: nvcc $("$root/bin/nvcc" --version | grep -o 'release [0-9.]*'), CUDA_ROOT=$root"
}
