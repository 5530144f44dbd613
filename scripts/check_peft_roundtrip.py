#!/usr/bin/env python3
"""Check lvlm-ift's PEFT adapter support against HF transformers + PEFT (developer tool).

Not run in CI. Loads a base checkpoint -- LLaVA (``LlavaForConditionalGeneration``) or
Llama-3.2-Vision (``MllamaForConditionalGeneration``), through ``AutoModelForImageTextToText`` --
plus a LoRA adapter with ``PeftModel.from_pretrained``,
scores a continuation after a chat prompt exactly as HF would, and compares the per-token
log-probabilities with ``lvlm-ift score --model BASE --adapter ADAPTER ... --json``.
With ``--merged DIR`` (a full merged checkpoint, e.g. from ``lvlm-ift merge``) it also loads
that with ``from_pretrained`` and compares it with
``lvlm-ift score --model MERGED ...`` (and prints HF merged vs HF base+adapter for reference).

HF side, as in scripts/make_fixtures.py: the processor is ``AutoProcessor.from_pretrained(dir,
use_fast=False)`` (slow CLIPImageProcessor for LLaVA, MllamaImageProcessor); the prompt is
``processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
{"type": "text", "text": PROMPT}]}], add_generation_prompt=True, tokenize=False)`` then
``processor(text=..., images=image)``; the continuation is tokenized on its own with
``add_special_tokens=False`` and appended (for Mllama the cross-attention mask's last row is
repeated for it, as ``generate`` does); token_logprobs[i] =
log_softmax(logits[L-1+i])[cont[i]]. Eager attention, float32 (or --dtype).

Exit status: 0 when every comparison is within --tol (default 1e-4), 1 when one is not,
2 when lvlm-ift failed or its output could not be compared (token ids differ, bad JSON).
``--hf-only`` skips lvlm-ift and just prints HF's log-probabilities.

Pinned versions: see scripts/requirements-fixtures.txt (torch 2.5.1, transformers 4.57.1,
peft 0.17.1).

Example (tiny fixture, from the repository root)::

    python scripts/check_peft_roundtrip.py --base tests/fixtures/tiny-llava \\
        --adapter tests/fixtures/parity/tiny-llava-lora-init \\
        --image tests/fixtures/images/photo_67x45.png --prompt "What is shown?" \\
        --continuation " small cell size, round cell shape" --lvlm target/release/lvlm-ift
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def log(msg: str) -> None:
    print(msg, flush=True)


def load_processor(model_dir: str):
    proc = AutoProcessor.from_pretrained(model_dir, use_fast=False)
    ip = type(proc.image_processor).__name__
    if ip not in ("CLIPImageProcessor", "MllamaImageProcessor"):
        log(f"warning: image processor is {ip}, not the slow CLIPImageProcessor or MllamaImageProcessor")
    return proc


def build_inputs(proc, image_path: str, prompt: str, continuation: str):
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    image = Image.open(image_path)
    # A chat template that writes the BOS itself (Llama 3's) must not get a second one.
    bos = proc.tokenizer.bos_token
    extra = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    enc = proc(text=text, images=image, return_tensors="pt", **extra)
    cont = proc.tokenizer(continuation, add_special_tokens=False).input_ids
    if not cont:
        raise SystemExit("the continuation tokenizes to nothing")
    ids = torch.cat([enc["input_ids"].to(torch.int64), torch.tensor([cont], dtype=torch.int64)], dim=1)
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "cross_attention_mask" in vision:
        cam = vision["cross_attention_mask"]
        vision["cross_attention_mask"] = torch.cat([cam] + [cam[:, -1:]] * len(cont), dim=1)
    return text, ids, vision, enc["input_ids"].shape[1], cont


@torch.no_grad()
def hf_token_logprobs(model, ids, vision, prompt_len, cont, device) -> list[float]:
    dtype = next(model.parameters()).dtype
    extra = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in vision.items()}
    logits = model(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        **extra,
    ).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[prompt_len - 1 + i, c].item() for i, c in enumerate(cont)]


def run_lvlm(args, model: str, adapter: str | None) -> dict | None:
    cmd = [args.lvlm, "score", "--model", model]
    if adapter is not None:
        cmd += ["--adapter", adapter]
    cmd += ["--image", args.image, "--prompt", args.prompt, "--continuation", args.continuation, "--json",
            "--dtype", args.dtype, "--device", args.device]
    log("$ " + shlex.join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        log(f"lvlm-ift failed (exit {res.returncode}):\n{res.stderr.strip()}")
        return None
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        log(f"lvlm-ift printed no JSON:\n{res.stdout}\n{res.stderr}")
        return None


def compare(label: str, hf: list[float], cont: list[int], out: dict | None, tol: float) -> int:
    """0 ok, 1 diff > tol, 2 not comparable."""
    if out is None:
        return 2
    if "token_ids" in out and list(out["token_ids"]) != list(cont):
        log(f"[{label}] continuation token ids differ: lvlm-ift {out['token_ids']} vs HF {cont}")
        return 2
    ours = out.get("token_logprobs")
    if not isinstance(ours, list) or len(ours) != len(hf):
        log(f"[{label}] token_logprobs missing or of length {len(ours) if isinstance(ours, list) else None} "
            f"(HF: {len(hf)})")
        return 2
    diffs = [abs(a - b) for a, b in zip(ours, hf)]
    worst = max(diffs)
    log(f"[{label}] lvlm-ift token_logprobs: {[round(x, 6) for x in ours]}")
    log(f"[{label}] max abs diff vs HF: {worst:.3e} (tol {tol:g}) -> {'OK' if worst <= tol else 'FAIL'}")
    return 0 if worst <= tol else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="base checkpoint directory (HF layout)")
    ap.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    ap.add_argument("--merged", help="merged checkpoint directory (optional)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True, help="user question (rendered through the chat template)")
    ap.add_argument("--continuation", required=True)
    ap.add_argument("--lvlm", help="path to the lvlm-ift binary (required unless --hf-only)")
    ap.add_argument("--hf-only", action="store_true", help="only print HF's log-probs, do not run lvlm-ift")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="for both HF and lvlm-ift")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for both HF and lvlm-ift")
    args = ap.parse_args()
    if not args.hf_only and not args.lvlm:
        ap.error("--lvlm is required unless --hf-only")

    from peft import PeftModel  # noqa: E402 (only needed here; keeps --help fast)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    dtype = DTYPES[args.dtype]

    proc = load_processor(args.base)
    text, ids, pv, prompt_len, cont = build_inputs(proc, args.image, args.prompt, args.continuation)
    log(f"chat prompt: {text!r}")
    log(f"prompt tokens: {prompt_len}, continuation ids: {cont}")

    base = AutoModelForImageTextToText.from_pretrained(args.base, attn_implementation="eager", torch_dtype=dtype)
    model = PeftModel.from_pretrained(base, args.adapter).to(args.device).eval()
    hf = hf_token_logprobs(model, ids, pv, prompt_len, cont, args.device)
    log(f"[base+adapter] HF token_logprobs: {[round(x, 6) for x in hf]}  (sum {sum(hf):.6f})")
    del model, base

    hf_m = None
    if args.merged:
        try:
            mproc = load_processor(args.merged)
        except Exception as e:  # noqa: BLE001 - a merged dir without processor files
            log(f"note: no processor in {args.merged} ({type(e).__name__}); using the base's")
            mproc = proc
        mtext, mids, mpv, mlen, mcont = build_inputs(mproc, args.image, args.prompt, args.continuation)
        same = mpv.keys() == pv.keys() and all(torch.equal(mpv[k], pv[k]) for k in pv)
        if mtext != text or not torch.equal(mids, ids) or not same:
            log("warning: the merged dir's processor gives different inputs than the base's")
        merged = AutoModelForImageTextToText.from_pretrained(
            args.merged, attn_implementation="eager", torch_dtype=dtype).to(args.device).eval()
        hf_m = hf_token_logprobs(merged, mids, mpv, mlen, mcont, args.device)
        del merged
        log(f"[merged] HF token_logprobs: {[round(x, 6) for x in hf_m]}  (sum {sum(hf_m):.6f})")
        log(f"[merged] HF merged vs HF base+adapter: max abs diff "
            f"{max(abs(a - b) for a, b in zip(hf_m, hf)):.3e} (for reference)")

    if args.hf_only:
        return 0

    status = [compare("base+adapter", hf, cont, run_lvlm(args, args.base, args.adapter), args.tol)]
    if args.merged:
        status.append(compare("merged", hf_m, mcont, run_lvlm(args, args.merged, None), args.tol))
    if 2 in status:
        return 2
    return 1 if 1 in status else 0


if __name__ == "__main__":
    sys.exit(main())
