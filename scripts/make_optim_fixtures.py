#!/usr/bin/env python3
"""Generate the optimizer / LR-schedule parity fixtures for lvlm-ift (tests/fixtures/optim/).

Purpose
-------
Records, deterministically on CPU in float32, what PyTorch and HF transformers do so that
``tests/optim_parity.rs`` can replay it with our own ``AdamW``, ``Gradients`` and ``Schedule``
(src/train/optim.rs, src/train/schedule.rs):

* ``torch.optim.AdamW`` (single-tensor path, ``foreach=False``) over two param groups
  (weight_decay 0.01 with lr scale 1, weight_decay 0.0 with lr scale 0.5) and three params
  of shapes [4,3], [3], [2,2,2];
* a seeded sequence of 4 gradient sets; at step 2 param ``c`` has no gradient (torch skips it:
  no weight decay, no moment update, its step count does not advance);
* ``torch.nn.utils.clip_grad_norm_(max_norm=1.0)`` before every step (pre-clip total norms
  recorded; some steps are clipped, some are not);
* lr from ``transformers.get_cosine_schedule_with_warmup(num_warmup_steps=1,
  num_training_steps=4)`` (group-0 lr before every step recorded);
* params, ``exp_avg``, ``exp_avg_sq`` and step counts after every step;
* lr sequences (steps 0..=total) of HF's constant / linear / cosine schedules with warmup
  given as steps and as ratio (``TrainingArguments.get_warmup_steps``: ceil(total * ratio),
  including 100 * 0.07 = 7.000000000000001 -> 8),
  and of ``get_cosine_with_min_lr_schedule_with_warmup`` (``min_lr`` and ``min_lr_rate``).

Outputs: ``tests/fixtures/optim/adamw.safetensors`` (tensors) and
``tests/fixtures/optim/adamw.json`` (metadata, lrs, norms, schedule sequences).
Tensor keys: ``init.{p}``, ``grad.{k}.{p}`` (raw, pre-clip), ``param.{k}.{p}``,
``exp_avg.{k}.{p}``, ``exp_avg_sq.{k}.{p}`` (after step k).

Pinned versions (see scripts/requirements-fixtures.txt)::

    torch==2.5.1 transformers==4.57.1 safetensors==0.8.0

A warning is printed when the installed versions differ.

How to run
----------
From the repository root::

    /work/pyenv/bin/python scripts/make_optim_fixtures.py

It rewrites tests/fixtures/optim/ (re-runnable, deterministic) and prints the total size
(must stay < 100 KB).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    TrainingArguments,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

PINNED = {"torch": "2.5.1", "transformers": "4.57.1", "safetensors": "0.8.0"}
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "optim"

BASE_LR = 0.1
BETAS = (0.9, 0.999)
EPS = 1e-8
MAX_NORM = 1.0
STEPS = 4
WARMUP = 1
SHAPES = {"a": [4, 3], "b": [3], "c": [2, 2, 2]}
# (name, weight_decay, lr_scale, params)
GROUPS = [("decay", 0.01, 1.0, ["a", "c"]), ("no_decay", 0.0, 0.5, ["b"])]
# Per-step gradient scale (so that some steps are clipped, some not) and missing grads.
GRAD_SCALE = [3.0, 0.3, 2.0, 0.5]
MISSING = {2: ["c"]}

SCHED_TOTAL = 10
SCHED_BASE_LR = 3e-4


def check_versions() -> dict:
    found = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
             "safetensors": safetensors.__version__}
    for k, v in PINNED.items():
        if found[k] != v:
            warnings.warn(f"{k} {found[k]} installed, fixtures pinned to {v}")
    return found


def adamw_run(tensors: dict, meta: dict) -> None:
    g = torch.Generator().manual_seed(1234)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}
    for n, p in params.items():
        tensors[f"init.{n}"] = p.detach().clone()
    groups = [
        {"params": [params[n] for n in names], "weight_decay": wd, "lr": BASE_LR * scale}
        for (_, wd, scale, names) in GROUPS
    ]
    opt = torch.optim.AdamW(groups, lr=BASE_LR, betas=BETAS, eps=EPS, foreach=False)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    lrs, norms, steps = [], [], []
    for k in range(STEPS):
        for n, p in params.items():
            if n in MISSING.get(k, []):
                p.grad = None
            else:
                grad = torch.randn(SHAPES[n], generator=g) * GRAD_SCALE[k]
                tensors[f"grad.{k}.{n}"] = grad.clone()
                p.grad = grad
        with_grad = [p for p in params.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm=MAX_NORM)
        norms.append(float(norm))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        step_counts = {}
        for n, p in params.items():
            tensors[f"param.{k}.{n}"] = p.detach().clone()
            st = opt.state.get(p, {})
            if st:
                tensors[f"exp_avg.{k}.{n}"] = st["exp_avg"].clone()
                tensors[f"exp_avg_sq.{k}.{n}"] = st["exp_avg_sq"].clone()
                step_counts[n] = int(st["step"].item())
            else:
                step_counts[n] = 0
        steps.append(step_counts)
    meta["adamw"] = {
        "base_lr": BASE_LR,
        "beta1": BETAS[0],
        "beta2": BETAS[1],
        "eps": EPS,
        "max_norm": MAX_NORM,
        "steps": STEPS,
        "warmup_steps": WARMUP,
        "shapes": SHAPES,
        "groups": [
            {"name": name, "weight_decay": wd, "lr_scale": scale, "params": names}
            for (name, wd, scale, names) in GROUPS
        ],
        "missing": {str(k): v for k, v in MISSING.items()},
        "lrs": lrs,
        "norms": norms,
        "step_counts": steps,
    }


def record(make, total: int = SCHED_TOTAL) -> list:
    """Group lr before each of the steps 0..=total (LambdaLR: base_lr * lambda(step))."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=SCHED_BASE_LR)
    sched = make(opt)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def warmup_steps_from_ratio(ratio: float, total: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, warmup_ratio=ratio, report_to=[])
        w = args.get_warmup_steps(total)
    assert w == math.ceil(total * ratio)
    return w


def schedules(meta: dict) -> None:
    total = SCHED_TOTAL
    cases = []
    makers = {
        "constant": lambda w: (lambda o: get_constant_schedule_with_warmup(o, w)),
        "linear": lambda w: (lambda o: get_linear_schedule_with_warmup(o, w, total)),
        "cosine": lambda w: (lambda o: get_cosine_schedule_with_warmup(o, w, total)),
    }
    # Warmup as steps (0 included) and as ratios.
    warmups = [{"steps": 0}, {"steps": 3}, {"ratio": 0.15}, {"ratio": 0.5}]
    for kind, mk in makers.items():
        for wu in warmups:
            w = wu["steps"] if "steps" in wu else warmup_steps_from_ratio(wu["ratio"], total)
            cases.append({"kind": kind, "warmup": wu, "warmup_steps": w, "min_lr": 0.0,
                          "total_steps": total, "lrs": record(mk(w))})
    # ceil bites: 100 * 0.07 = 7.000000000000001 -> 8 warmup steps.
    long_total = 100
    w = warmup_steps_from_ratio(0.07, long_total)
    assert w == 8
    for kind, mk in (("linear", get_linear_schedule_with_warmup),
                     ("cosine", get_cosine_schedule_with_warmup)):
        cases.append({"kind": kind, "warmup": {"ratio": 0.07}, "warmup_steps": w, "min_lr": 0.0,
                      "total_steps": long_total,
                      "lrs": record(lambda o, mk=mk: mk(o, w, long_total), long_total)})
    # Cosine with a floor, given as min_lr (HF: rate = min_lr / lr) and as min_lr_rate.
    for w in (0, 2):
        min_lr = SCHED_BASE_LR * 0.1
        cases.append({"kind": "cosine", "warmup": {"steps": w}, "warmup_steps": w, "min_lr": min_lr,
                      "total_steps": total, "lrs": record(lambda o: get_cosine_with_min_lr_schedule_with_warmup(
                          o, w, total, min_lr=min_lr))})
    rate = 0.25
    cases.append({"kind": "cosine", "warmup": {"ratio": 0.15}, "warmup_steps": 2,
                  "min_lr": SCHED_BASE_LR * rate, "total_steps": total,
                  "lrs": record(lambda o: get_cosine_with_min_lr_schedule_with_warmup(
                      o, 2, total, min_lr_rate=rate))})
    meta["schedules"] = {"base_lr": SCHED_BASE_LR, "cases": cases}


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    versions = check_versions()
    OUT.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    meta: dict = {"generator": "scripts/make_optim_fixtures.py", "versions": versions}
    adamw_run(tensors, meta)
    schedules(meta)
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, str(OUT / "adamw.safetensors"))
    os.chmod(OUT / "adamw.safetensors", 0o644)
    (OUT / "adamw.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"norms: {meta['adamw']['norms']}")
    print(f"lrs:   {meta['adamw']['lrs']}")
    print(f"wrote {len(tensors)} tensors; fixture size {size} bytes")
    if size >= 100_000:
        print("fixture too large", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
