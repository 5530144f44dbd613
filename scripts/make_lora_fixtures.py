#!/usr/bin/env python3
"""Generate the PEFT-LoRA parity fixtures for lvlm-ift (tests/fixtures/parity/).

Purpose
-------
Reference values, computed with HF transformers + PEFT, for lvlm-ift's LoRA
implementation (PEFT semantics: injection by target-module suffix, forward, loss,
gradients, one AdamW step, adapter file format, merge). Built on the committed tiny
checkpoint ``tests/fixtures/tiny-llava/`` (Llama 2 layers / hidden 64, CLIP 3 layers /
hidden 32, vision_feature_layer=-2) and the inputs of
``tests/fixtures/parity/tiny-llava.safetensors`` (written by scripts/make_fixtures.py).

* LoRA: ``LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj",
  "v_proj"], bias="none", task_type="CAUSAL_LM")``. The suffix list matches q_proj /
  v_proj in the CLIP vision tower *and* in the language model (10 modules, 20 tensors).
  PEFT init (A kaiming-uniform, B zeros) under ``torch.manual_seed(LORA_INIT_SEED)``,
  then every lora_B is overwritten with N(0, 0.2^2) from a seeded generator (sorted
  name order) so the adapter changes the outputs and A receives gradients.
* ``tests/fixtures/parity/tiny-llava-lora-init/``: that initial adapter, as written by
  ``PeftModel.save_pretrained`` (adapter_config.json + adapter_model.safetensors; the
  auto-generated README.md model card is removed; target_modules sorted for determinism).
* ``tests/fixtures/parity/tiny-llava-lora.safetensors`` + ``.json``: one training
  example (chat prompt + continuation + EOS, labels -100 over the prompt), the LoRA
  model's logits and HF loss, gradients of every LoRA tensor, the LoRA tensors after one
  AdamW step, and the logits of the merged model (``merge_and_unload``) for the same ids.
  Tensor names are the adapter file's names (``base_model.model.<module>.lora_A.weight``).

Pinned versions (see scripts/requirements-fixtures.txt)::

    torch==2.5.1 transformers==4.57.1 peft==0.17.1 (accelerate==1.15.0) safetensors==0.8.0
    numpy==2.4.6

A warning is printed when the installed versions differ.

How to run
----------
From anywhere (paths are relative to the repository root), after
scripts/make_fixtures.py (which wipes tests/fixtures/parity/, so re-run this one after it)::

    python scripts/make_lora_fixtures.py

CPU, float32, eager attention, one thread, ``torch.use_deterministic_algorithms(True)``;
re-runs produce byte-identical files. It runs self-checks (hand-computed loss, expected
no-grad set, AdamW step by hand, adapter reload reproduces the logits bit for bit, merged
vs unmerged logits) and prints the sizes of the files it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

PINNED = {
    "torch": "2.5.1",
    "transformers": "4.57.1",
    "peft": "0.17.1",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
}
INSTALLED = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
}
try:
    import accelerate  # noqa: E402

    INSTALLED["accelerate"] = accelerate.__version__
except ImportError:  # pragma: no cover
    pass

ROOT = Path(__file__).resolve().parent.parent
BASE_REL = "tests/fixtures/tiny-llava"
PARITY_REL = "tests/fixtures/parity"
ADAPTER_REL = f"{PARITY_REL}/tiny-llava-lora-init"
OUT_NAME = "tiny-llava-lora"
MAX_NEW_BYTES = 400 * 1024

EOS_ID = 2
IGNORE_INDEX = -100

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
            task_type="CAUSAL_LM")
LORA_INIT_SEED = 0  # torch.manual_seed before get_peft_model (kaiming-uniform A)
LORA_B_SEED = 1234  # torch.Generator seed for the lora_B overwrite
LORA_B_STD = 0.2
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def log(msg: str) -> None:
    print(msg, flush=True)


def check_versions() -> None:
    for name, want in PINNED.items():
        have = INSTALLED[name]
        if have.split("+")[0] != want:
            warnings.warn(f"{name} {have} is installed but fixtures are pinned to {name}=={want}", stacklevel=1)
            print(f"WARNING: version mismatch: {name} {have} != {want}", file=sys.stderr)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def saved_name(param_name: str) -> str:
    """named_parameters() name -> the name PEFT writes to adapter_model.safetensors."""
    assert ".default." in param_name, param_name
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def load_base() -> LlavaForConditionalGeneration:
    # relative path on purpose: it ends up in adapter_config.json's base_model_name_or_path
    return LlavaForConditionalGeneration.from_pretrained(BASE_REL, attn_implementation="eager").eval()


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    out = {}
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            assert p.requires_grad, n
            out[saved_name(n)] = p
        else:
            assert not p.requires_grad, f"non-LoRA parameter is trainable: {n}"
    return out


def main() -> None:
    check_versions()
    os.chdir(ROOT)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    parity = load_file(f"{PARITY_REL}/tiny-llava.safetensors")
    parity_meta = json.loads(Path(f"{PARITY_REL}/tiny-llava.json").read_text())
    assert parity_meta["eos_token_id"] == EOS_ID

    # ------------------------------------------------------------- training example
    prompt_ids = parity["input_ids.chat"].to(torch.int64)  # [1, L]
    cont_ids = parity["continuation_ids"].to(torch.int64)  # [C]
    pv = parity["pixel_values.photo"].float()  # [1, 3, 30, 30]
    L = prompt_ids.shape[1]
    target = torch.cat([cont_ids, torch.tensor([EOS_ID])])
    input_ids = torch.cat([prompt_ids, target[None]], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, L:] = target
    attention_mask = torch.ones_like(input_ids)
    S = input_ids.shape[1]
    log(f"sequence: prompt {L} (incl. {parity_meta['num_image_tokens']} image tokens) + continuation "
        f"{cont_ids.numel()} + eos = {S}")

    # ------------------------------------------------------------------ LoRA model
    base = load_base()
    with torch.no_grad():
        base_logits = base(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pv).logits.clone()
    torch.manual_seed(LORA_INIT_SEED)
    model = get_peft_model(base, LoraConfig(**LORA))
    params = lora_params(model)
    names = sorted(params)
    state_names = sorted(get_peft_model_state_dict(model))
    assert names == state_names, "named_parameters and PEFT's state dict disagree"
    n_a = sum(".lora_A." in n for n in names)
    log(f"LoRA tensors: {len(names)} ({n_a} A, {len(names) - n_a} B)")

    gen = torch.Generator().manual_seed(LORA_B_SEED)
    with torch.no_grad():
        for n in names:
            if ".lora_B." in n:
                p = params[n]
                assert torch.count_nonzero(p) == 0, f"PEFT did not init {n} to zeros"
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * LORA_B_STD)
    init = {n: params[n].detach().clone() for n in names}

    # ------------------------------------------------------------- save the adapter
    adapter_dir = Path(ADAPTER_REL)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(ADAPTER_REL)
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT stores a set: order is hash-seed dependent
    write_json(cfg_path, cfg)
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        file_meta = f.metadata()
        file_names = sorted(f.keys())
        for n in file_names:
            t = f.get_tensor(n)
            assert t.dtype == torch.float32 and torch.equal(t, init[n]), n
    assert file_meta == {"format": "pt"}, file_meta
    assert file_names == names, (file_names, names)
    log(f"adapter written: {ADAPTER_REL} ({len(file_names)} tensors)")

    # --------------------------------------------------------- forward + backward
    model.train()  # all dropouts are 0: identical to eval (checked below)
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pv, labels=labels, use_cache=False)
    logits = out.logits
    loss = out.loss
    shift_logits = logits[0, :-1].float()
    shift_labels = labels[0, 1:]
    keep = shift_labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="mean")
    lp = torch.log_softmax(shift_logits[keep].double(), dim=-1)
    manual64 = -lp.gather(1, shift_labels[keep][:, None]).mean()
    log(f"loss: HF {loss.item():.8f}  by hand {manual.item():.8f}  (f64 {manual64.item():.8f}) "
        f"over {int(keep.sum())} tokens")
    assert int(keep.sum()) == target.numel()
    assert abs(loss.item() - manual.item()) < 1e-6
    loss.backward()

    grads, no_grad = {}, []
    for n in names:
        g = params[n].grad
        if g is None:
            no_grad.append(n)
        else:
            grads[n] = g.detach().clone()
    expected_no_grad = sorted(n for n in names if ".vision_model.encoder.layers.2." in n)
    assert no_grad == expected_no_grad, f"unexpected no-grad set: {no_grad}"
    for n, g in grads.items():
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == g.numel(), f"zero/non-finite grad in {n}"
    min_abs_grad = min(g.abs().min().item() for g in grads.values())
    log(f"params without grad ({len(no_grad)}): {no_grad}")
    log(f"min |grad| over params with grad: {min_abs_grad:.3e} (AdamW eps {ADAMW['eps']})")

    with torch.no_grad():
        model.eval()
        eval_logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pv).logits
        assert torch.equal(eval_logits, logits), "train/eval logits differ"

    # ---------------------------------------------------------------- AdamW step
    opt = torch.optim.AdamW([params[n] for n in names], **ADAMW)
    opt.step()
    after = {n: params[n].detach().clone() for n in names}
    lr, wd, eps = ADAMW["lr"], ADAMW["weight_decay"], ADAMW["eps"]
    b1, b2 = ADAMW["betas"]
    for n in names:
        if n in grads:
            g = grads[n].double()
            m_hat = ((1 - b1) * g) / (1 - b1)
            v_hat = ((1 - b2) * g * g) / (1 - b2)
            want = init[n].double() * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
            assert torch.allclose(after[n].double(), want, atol=1e-7, rtol=0), n
        else:
            assert torch.equal(after[n], init[n]), f"{n}: no grad but changed (torch skips it: no decay)"

    # --------------------------------------------------- reload + merged reference
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(load_base(), ADAPTER_REL).eval()
        re_logits = reloaded(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pv).logits
        assert torch.equal(re_logits, logits), "reloaded init adapter does not reproduce lora.logits"
        merged = reloaded.merge_and_unload()
        assert type(merged) is LlavaForConditionalGeneration
        assert not any("lora" in k for k in merged.state_dict())
        merged_logits = merged(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pv).logits
    merge_diff = (merged_logits - logits).abs().max().item()
    base_diff = (base_logits - logits).abs().max().item()
    log(f"max |merged - lora| logits: {merge_diff:.3e}; max |base - lora| logits: {base_diff:.3e}")
    assert merge_diff < 1e-4 and base_diff > 1e-2

    # ---------------------------------------------------------------------- write
    tensors = {
        "lora.input_ids": input_ids,
        "lora.labels": labels,
        "lora.pixel_values": pv,
        "lora.logits": logits.detach().float(),
        "lora.loss": loss.detach().float().reshape(1),
        "merged.logits": merged_logits.float(),
    }
    for n in names:
        if n in grads:
            tensors[f"grad.{n}"] = grads[n]
        tensors[f"after.{n}"] = after[n]
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    for k, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    out_st = Path(f"{PARITY_REL}/{OUT_NAME}.safetensors")
    save_file(tensors, out_st, metadata={"format": "pt"})

    meta = {
        "base_model_dir": BASE_REL,
        "adapter_dir": ADAPTER_REL,
        "parity_inputs": f"{PARITY_REL}/tiny-llava.safetensors (input_ids.chat, continuation_ids, pixel_values.photo)",
        "lora_config": {**LORA, "scaling": LORA["lora_alpha"] / LORA["r"]},
        "init": {
            "lora_A": f"PEFT default (kaiming_uniform_(a=sqrt(5))) after torch.manual_seed({LORA_INIT_SEED})",
            "lora_B": (f"overwritten: g = torch.Generator().manual_seed({LORA_B_SEED}); for each lora_B name in "
                       f"sorted order: torch.randn(shape, generator=g) * {LORA_B_STD}"),
            "values": f"exact initial values are in {ADAPTER_REL}/adapter_model.safetensors",
        },
        "example": {
            "input_ids": "input_ids.chat ++ continuation_ids ++ [eos=2]",
            "prompt_len": L,
            "continuation_len": int(cont_ids.numel()),
            "seq_len": S,
            "labels": "-100 over the prompt (incl. image tokens), token ids over continuation + eos",
            "attention_mask": "all ones (not stored)",
            "num_loss_tokens": int(keep.sum()),
        },
        "loss": {
            "value": loss.item(),
            "definition": "mean over positions t with labels[t+1] != -100 of -log_softmax(logits[t])[labels[t+1]] "
                          "(HF ForCausalLMLoss, shifted; no num_items_in_batch)",
            "by_hand_f32": manual.item(),
            "by_hand_f64": manual64.item(),
        },
        "optimizer": {
            "type": "torch.optim.AdamW",
            **ADAMW,
            "betas": list(ADAMW["betas"]),
            "amsgrad": False,
            "maximize": False,
            "steps": 1,
            "grad_clipping": None,
            "param_order": "sorted adapter names",
            "note": "params whose .grad is None are skipped by torch: after == init (no weight decay either)",
        },
        "params": names,
        "params_without_grad": no_grad,
        "params_without_grad_reason": "vision_feature_layer=-2: the last CLIP layer's output is never used "
                                      "(HF runs it, lvlm-ift need not)",
        "min_abs_grad": min_abs_grad,
        "checks": {
            "max_abs_merged_minus_lora_logits": merge_diff,
            "max_abs_base_minus_lora_logits": base_diff,
            "reloaded_adapter_logits_bit_identical": True,
            "train_eval_logits_bit_identical": True,
        },
        "tensors": {
            "lora.input_ids": "[1, S] int64",
            "lora.labels": "[1, S] int64",
            "lora.pixel_values": "[1, 3, 30, 30] f32 (= pixel_values.photo)",
            "lora.logits": "[1, S, vocab] f32, LoRA model with the init adapter (before the AdamW step)",
            "lora.loss": "[1] f32, HF outputs.loss",
            "grad.<name>": "f32, d loss / d param, for params with a grad",
            "after.<name>": "f32, every LoRA param after one AdamW step",
            "merged.logits": "[1, S, vocab] f32, merge_and_unload() of the init adapter, same ids, no labels",
        },
        "adapter_files": {
            "notes": ["README.md model card written by save_pretrained removed",
                      "adapter_config.json target_modules sorted (PEFT serialises a set)"],
        },
        "versions": INSTALLED,
        "notes": [
            "attention: eager, float32, CPU, single thread, deterministic algorithms",
            "tensor names = adapter_model.safetensors names: base_model.model.<module path>.lora_{A,B}.weight",
        ],
    }
    write_json(Path(f"{PARITY_REL}/{OUT_NAME}.json"), meta)

    total = 0
    log("== files")
    files = sorted(adapter_dir.iterdir()) + [out_st, Path(f"{PARITY_REL}/{OUT_NAME}.json")]
    for p in files:
        sz = p.stat().st_size
        total += sz
        log(f"  {p}  {sz}  {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")
    log(f"TOTAL new: {total} bytes")
    assert total < MAX_NEW_BYTES, "LoRA fixtures exceed 400 KB"


if __name__ == "__main__":
    main()
