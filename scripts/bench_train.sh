#!/usr/bin/env bash
# Side-by-side CPU benchmark: lvlm-ift against PyTorch + PEFT on identical work (see
# scripts/bench_train.py). Creates target/bench-venv with the pinned peer
# (scripts/requirements-bench.txt), builds the release binary, then runs both tools one after the
# other (never at once) and prints one table. Extra arguments go to `bench_train.py run`, e.g.
#   scripts/bench_train.sh --variants 196 --dtypes fp32 --steps 4 --no-eval
# Do not run it while a build or another benchmark is running: it measures wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/bench-venv
if [ ! -x "$venv/bin/python" ] || ! cmp -s scripts/requirements-bench.txt "$venv/requirements-bench.txt"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-bench.txt
    cp scripts/requirements-bench.txt "$venv/requirements-bench.txt"
fi
cargo build --release --locked --bin lvlm-ift
exec "$venv/bin/python" scripts/bench_train.py run --binary target/release/lvlm-ift "$@"
