#!/usr/bin/env python3
"""The reference's numerics fixture: torch's AdamW on bf16 parameters (tests/fixtures/optim/).

The reference recipe trains a bf16 model with torch.optim.AdamW, which then keeps the
parameters, both moments and its update math in bf16. This records three such steps
(single-tensor path, ``foreach=False``; lr 1e-2, betas (0.9, 0.999), eps 1e-8, weight decay 0.01,
no clipping) on three bf16 parameters of shapes [4,3], [3], [2,2,2] with seeded bf16 gradients,
so that ``tests/optim_parity.rs`` can replay them with ``AdamW::with_moments_in_param_dtype``.

Outputs ``tests/fixtures/optim/adamw_bf16.safetensors``: ``init.{p}``, ``grad.{k}.{p}``,
``param.{k}.{p}``, ``exp_avg.{k}.{p}``, ``exp_avg_sq.{k}.{p}`` (after step k), all bf16.

Pinned: torch==2.15.0 (the version of scripts/requirements-bench.txt; a warning is printed when
another is installed). Run from the repository root, e.g. with the bench venv:

    target/bench-venv/bin/python scripts/make_optim_bf16_fixture.py
"""

import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

PINNED_TORCH = "2.15.0"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "optim"
SHAPES = {"a": [4, 3], "b": [3], "c": [2, 2, 2]}
STEPS = 3
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.01


def main() -> int:
    if torch.__version__.split("+")[0] != PINNED_TORCH:
        warnings.warn(f"torch {torch.__version__} installed, fixture pinned to {PINNED_TORCH}")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(4321)
    params = {
        n: torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16))
        for n, s in SHAPES.items()
    }
    tensors = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(
        list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False
    )
    for k in range(STEPS):
        for n, p in params.items():
            grad = (torch.randn(SHAPES[n], generator=g) * 0.1).to(torch.bfloat16)
            tensors[f"grad.{k}.{n}"] = grad.clone()
            p.grad = grad
        opt.step()
        for n, p in params.items():
            st = opt.state[p]
            assert st["exp_avg"].dtype == torch.bfloat16
            tensors[f"param.{k}.{n}"] = p.detach().clone()
            tensors[f"exp_avg.{k}.{n}"] = st["exp_avg"].clone()
            tensors[f"exp_avg_sq.{k}.{n}"] = st["exp_avg_sq"].clone()
    path = OUT / "adamw_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path))
    print(f"wrote {len(tensors)} tensors, {path.stat().st_size} bytes to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
