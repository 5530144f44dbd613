#!/usr/bin/env python3
"""Side-by-side CPU benchmark of lvlm-ift against PyTorch + PEFT (run by scripts/bench_train.sh).

Subcommands:
  make-model  a random ~100M LLaVA (CLIP 384x6 + Llama 768x12, vocab 8192) in HF layout, so both
              tools load the same files;
  peer-train  PyTorch + PEFT LoRA training steps on the same pairs, the same sequences and batch;
  peer-eval   HF `generate` on the same MCQ items and prompts as `lvlm-ift eval --scoring generate`;
  run         everything: builds the models and data, runs each tool as its own process (peak RSS is
              that process's ru_maxrss), and prints one table.

Work is identical by construction: both tools tokenize the same chat-template text with the same
tokenizer.json, train LoRA r=8 alpha=16 (no dropout) on the language model's q/k/v/o with AdamW and
gradient clipping at 1.0, batch 4, and the script checks that their token counts agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-llava"
INSTRUCTION = (
    "Describe the cell in this blood smear image: its size, shape, nucleus, cytoplasm and "
    "granules, then name its type."
)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
VARIANTS = {
    # name: (image size, patch size) -> 196 or 576 image tokens
    "196": (224, 16),
    "576": (336, 14),
    "1152": (476, 14),  # 34x34 = 1156 patches; the memory-growth point
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# make-model


def make_model(out: Path, image_size: int, patch: int, seed: int) -> None:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    patches = (image_size // patch) ** 2
    vision = CLIPVisionConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        image_size=image_size,
        patch_size=patch,
        projection_dim=384,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=4,
        image_seq_length=patches,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        pad_token_id=3,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ]:
        shutil.copy(TINY / name, out / name)
    pre = json.loads((TINY / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": image_size, "width": image_size}
    pre["size"] = {"shortest_edge": image_size}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    proc = json.loads((TINY / "processor_config.json").read_text())
    proc["patch_size"] = patch
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    n = sum(p.numel() for p in model.parameters())
    log(f"made {out}: {n / 1e6:.1f}M parameters, {patches} image tokens")


# ---------------------------------------------------------------------------------------------
# shared by the peer runs: the sequences lvlm-ift builds, from the same files


class Prompter:
    """Renders the model's chat template and tokenizes like lvlm-ift's TextProcessor (and HF's
    LlavaProcessor): `<image>` expands to one token per image feature, BOS comes from the
    tokenizer's post-processor, the response is the assistant turn."""

    def __init__(self, model_dir: Path):
        import jinja2
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        env = jinja2.Environment()
        self.template = env.from_string((model_dir / "chat_template.jinja").read_text())
        special = json.loads((model_dir / "special_tokens_map.json").read_text())
        eos = special["eos_token"]
        self.eos = eos["content"] if isinstance(eos, dict) else eos
        cfg = json.loads((model_dir / "config.json").read_text())
        self.image_tokens = cfg["image_seq_length"]
        self.image_id = cfg["image_token_index"]

    def render(self, user: str, assistant: str | None) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]}]
        if assistant is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
        return self.template.render(
            messages=msgs, add_generation_prompt=assistant is None, eos_token=self.eos
        )

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text.replace("<image>", "<image>" * self.image_tokens)).ids

    def training_sample(self, description: str) -> tuple[list[int], list[int]]:
        prompt = self.encode(self.render(INSTRUCTION, None))
        full = self.encode(self.render(INSTRUCTION, description))
        labels = [-100] * len(prompt) + full[len(prompt) :]
        return full, labels


def pixel_values(model_dir: Path, paths: list[Path]):
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(model_dir)
    images = [Image.open(p).convert("RGB") for p in paths]
    return proc(images=images, return_tensors="pt")["pixel_values"]


def read_pairs(pairs_dir: Path) -> list[tuple[Path, str]]:
    out = []
    for line in (pairs_dir / "pairs.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.append((pairs_dir / row["image"], row["text"]))
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# peer-train


def peer_train(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = Path(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    prompter = Prompter(model_dir)
    pairs = read_pairs(Path(args.pairs))
    batches = []
    for step in range(args.steps):
        chunk = [pairs[(step * args.batch + i) % len(pairs)] for i in range(args.batch)]
        seqs = [prompter.training_sample(text) for _, text in chunk]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((args.batch, width), 3, dtype=torch.long)
        labels = torch.full((args.batch, width), -100, dtype=torch.long)
        mask = torch.zeros((args.batch, width), dtype=torch.long)
        for i, (s, lab) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        # Images are preprocessed up front (outside the timed step): a DataLoader's job.
        pix = pixel_values(model_dir, [p for p, _ in chunk])
        batches.append((ids, labels, mask, pix, int(mask.sum())))
    times, tokens, losses = [], [], []
    for ids, labels, mask, pix, ntok in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        tokens.append(ntok)
        losses.append(float(out.loss))
    json.dump(
        {"step_sec": times, "tokens": tokens, "loss": losses, "peak_rss_mib": peak_rss_mib()},
        sys.stdout,
    )


# ---------------------------------------------------------------------------------------------
# peer-eval


def key_phrase(key: str) -> str:
    phrase = key.replace("_", " ")
    return "mass margin" if phrase == "mass margins" else phrase


def question_prompt(key: str, options: list[str]) -> str:
    letters = [chr(ord("A") + i) for i in range(len(options))]
    s = f"What is the {key_phrase(key)}?\n"
    for letter, opt in zip(letters, options):
        s += f"{letter}. {opt}\n"
    s += (
        'Response with only the letter of the correct choice, starting with "The correct answer is ['
        + " or ".join(letters)
        + '].".'
    )
    return s


def peer_eval(args) -> None:
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    prompter = Prompter(model_dir)
    items_path = Path(args.items)
    items = [json.loads(l) for l in items_path.read_text().splitlines() if l.strip()]
    outputs = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for item in items:
            text = prompter.render(question_prompt(item["key"], item["options"]), None)
            ids = torch.tensor([prompter.encode(text)])
            pix = pixel_values(model_dir, [items_path.parent / item["image"]])
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pix,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=2,
                pad_token_id=3,
            )
            outputs[item["id"]] = gen[0, ids.shape[1] :].tolist()
    elapsed = time.perf_counter() - start
    json.dump(
        {
            "items": len(items),
            "elapsed_s": elapsed,
            "items_per_sec": len(items) / elapsed,
            "new_tokens": {k: len(v) for k, v in outputs.items()},
            "texts": {k: prompter.tok.decode(v, skip_special_tokens=True) for k, v in outputs.items()},
            "peak_rss_mib": peak_rss_mib(),
        },
        sys.stdout,
    )


# ---------------------------------------------------------------------------------------------
# run: the whole comparison


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, str, float]:
    """Runs `cmd`, returning (stdout, stderr, peak RSS of that process in MiB) via wait4."""
    log("$ " + " ".join(cmd))
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}.out"
    err_path = out_path.with_suffix(".err")
    with open(out_path, "w") as so, open(err_path, "w") as se:
        pid = os.posix_spawnp(cmd[0], cmd, env or os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, so.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, se.fileno(), 2),
        ])
        _, status, usage = os.wait4(pid, 0)
    out, err = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}")
    return out, err, usage.ru_maxrss / 1024.0


def recipe(model: Path, manifest: Path, out: Path, dtype: str, steps: int | None, batch: int,
           epochs: int = 1000, cache: bool = False) -> str:
    """The lvlm-ift recipe of the benchmark. The frozen-vision feature cache is off unless asked
    for: PyTorch has none, so the side-by-side table compares the same work."""
    max_steps = f"max_steps = {steps}" if steps else ""
    return f"""# written by scripts/bench_train.py
[model]
path = "{model}"
dtype = "{dtype}"

[data]
train = [{{ manifest = "{manifest}" }}]
instruction_mode = "fixed"
instruction = "{INSTRUCTION}"
shuffle = "none"

[lora]
r = 8
alpha = 16
dropout = 0.0
target_modules = '{LORA_TARGETS}'

[optim]
lr = 1e-4
weight_decay = 0.0
max_grad_norm = 1.0

[schedule]
kind = "constant"

[train]
output_dir = "{out}"
batch_size = {batch}
grad_accum = 1
seed = 0
epochs = {epochs}
{max_steps}

[vision_cache]
enabled = {"true" if cache else "false"}
"""


def lvlm_train(binary: Path, work: Path, model: Path, pairs: Path, dtype: str, steps: int, batch: int, threads: int):
    out = work / f"run-{model.name}-{dtype}"
    if out.exists():
        shutil.rmtree(out)
    cfg = work / f"recipe-{model.name}-{dtype}.toml"
    cfg.write_text(recipe(model, pairs / "pairs.jsonl", out, "f32" if dtype == "fp32" else "bf16", steps, batch))
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    _, _, rss = run_measured([str(binary), "train", "--config", str(cfg), "--quiet"], env)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    times = [m["step_sec"] for m in metrics]
    tokens = [round(m["tokens_per_sec"] * m["step_sec"]) for m in metrics]
    return {"step_sec": times, "tokens": tokens, "loss": [m["loss"] for m in metrics], "peak_rss_mib": rss}


def cache_compare(binary: Path, work: Path, model: Path, pairs: Path, batch: int, threads: int) -> dict:
    """lvlm-ift alone (no peer has a feature cache): two epochs over the first 16 pairs with the
    frozen-vision feature cache on, epoch 1 filling it and epoch 2 served from it."""
    manifest = pairs / "pairs16.jsonl"
    lines = [l for l in (pairs / "pairs.jsonl").read_text().splitlines() if l.strip()]
    manifest.write_text("\n".join(lines[:16]) + "\n")
    out = work / f"run-{model.name}-cache"
    if out.exists():
        shutil.rmtree(out)
    cfg = work / f"recipe-{model.name}-cache.toml"
    cfg.write_text(recipe(model, manifest, out, "f32", None, batch, epochs=2, cache=True))
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    _, _, rss = run_measured([str(binary), "train", "--config", str(cfg), "--quiet"], env)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    per_epoch = 16 // batch
    # Step 1 pays one-off costs: epoch 1's figure is the median of its other steps.
    e1 = statistics.median(m["step_sec"] for m in metrics[1:per_epoch])
    e2 = statistics.median(m["step_sec"] for m in metrics[per_epoch:2 * per_epoch])
    files = [f for f in (out / "vision-cache").rglob("*.safetensors")]
    return {
        "epoch1_s_per_step": e1,
        "epoch2_s_per_step": e2,
        "speedup": e1 / e2,
        "entries": len(files),
        "cache_mib": sum(f.stat().st_size for f in files) / 2**20,
        "peak_rss_mib": rss,
    }


def peer_train_run(py: str, model: Path, pairs: Path, dtype: str, steps: int, batch: int, threads: int):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out, _, rss = run_measured(
        [py, __file__, "peer-train", "--model", str(model), "--pairs", str(pairs), "--dtype", dtype,
         "--steps", str(steps), "--batch", str(batch), "--threads", str(threads)],
        env,
    )
    res = json.loads(out)
    res["peak_rss_mib"] = rss
    return res


def summarise(res: dict) -> dict:
    # The first step pays one-off costs in both tools (allocator growth, lazy init): excluded.
    steady = res["step_sec"][1:] or res["step_sec"]
    toks = res["tokens"][1:] or res["tokens"]
    med = statistics.median(steady)
    return {
        "s_per_step": med,
        "tokens_per_sec": statistics.median(t / s for t, s in zip(toks, steady)),
        "tokens_per_step": statistics.median(toks),
        "peak_rss_mib": res["peak_rss_mib"],
    }


def run_all(args) -> None:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    binary = Path(args.binary).resolve()
    py = sys.executable
    pairs = work / "pairs"
    if not (pairs / "pairs.jsonl").exists():
        run_measured([str(binary), "synth-pairs", "--out", str(pairs), "--count", "64", "--image-size", "256", "--seed", "0"])
    rows = []
    for variant in args.variants:
        size, patch = VARIANTS[variant]
        model = work / f"llava-100m-{variant}"
        if not (model / "config.json").exists():
            run_measured([py, __file__, "make-model", "--out", str(model), "--image-size", str(size), "--patch", str(patch)])
        for dtype in args.dtypes:
            # PyTorch's bf16 matmul has no fast path on CPUs without AMX/AVX-512-BF16: a step takes
            # minutes there, so its bf16 steps may be fewer (the one-off first step is excluded
            # only when there are two or more).
            steps = args.peer_bf16_steps if dtype == "bf16" and args.peer_bf16_steps else args.steps
            key = f"{variant}/{dtype}/{steps}/{args.batch}/{args.threads}"
            cache = work / "peer-results.json"
            cached = json.loads(cache.read_text()) if cache.exists() else {}
            if args.reuse_peer and key in cached:
                theirs = cached[key]
                log(f"{variant} {dtype}: peer figures reused from {cache}")
            else:
                theirs = summarise(peer_train_run(py, model, pairs, dtype, steps, args.batch, args.threads))
                cached[key] = theirs
                cache.write_text(json.dumps(cached, indent=2))
            ours = summarise(lvlm_train(binary, work, model, pairs, dtype, args.steps, args.batch, args.threads))
            rows.append((variant, dtype, ours, theirs))
            log(f"{variant} {dtype}: lvlm-ift {ours}, peer {theirs}")
    cache_res = None
    if args.cache:
        model = work / f"llava-100m-{args.variants[0]}"
        cache_res = cache_compare(binary, work, model, pairs, args.batch, args.threads)
        log(f"vision cache: {cache_res}")
    evals = None
    if args.eval:
        evals = eval_compare(binary, py, work, args)
    print_table(rows, evals, cache_res, args)
    (work / "results.json").write_text(json.dumps({"train": rows, "cache": cache_res, "eval": evals}, indent=2))


def eval_compare(binary: Path, py: str, work: Path, args) -> dict:
    model = work / "llava-100m-196"
    data = work / "wbcatt"
    if not (data / "mcq_test.jsonl").exists():
        run_measured([str(binary), "prepare", "--benchmark", "wbcatt", "--source",
                      str(ROOT / "tests/fixtures/bench/wbcatt"), "--out", str(data)])
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    ours = {}
    for scoring in ("generate", "likelihood"):
        out_dir = work / f"eval-{scoring}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        _, _, rss = run_measured(
            [str(binary), "eval", "--benchmark", "wbcatt", "--data", str(data), "--model", str(model),
             "--scoring", scoring, "--split", "test", "--out", str(out_dir), "--quiet"], env)
        report = json.loads(next(out_dir.rglob("report.json")).read_text())
        preds = [json.loads(l) for l in (out_dir / "predictions.jsonl").read_text().splitlines() if l.strip()]
        ours[scoring] = {"items_per_sec": report["items_per_sec"], "peak_rss_mib": rss,
                         "texts": {p["id"]: p.get("raw") for p in preds}}
    penv = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out, _, prss = run_measured(
        [py, __file__, "peer-eval", "--model", str(model), "--items", str(data / "mcq_test.jsonl"),
         "--threads", str(args.threads)], penv)
    theirs = json.loads(out)
    theirs["peak_rss_mib"] = prss
    # Same work: both tools must have generated the same answers (hence the same token counts).
    mine = ours["generate"]["texts"]
    differ = [k for k, v in theirs["texts"].items() if mine.get(k) != v]
    if differ:
        log(f"eval: WARNING: lvlm-ift and HF generated different texts for {len(differ)} of "
            f"{len(mine)} items, e.g. {differ[0]}: {mine.get(differ[0])!r} vs "
            f"{theirs['texts'][differ[0]]!r}")
    else:
        log(f"eval: equal texts for all {len(mine)} items; HF new tokens per item: "
            f"{sorted(set(theirs['new_tokens'].values()))}")
    for v in ours.values():
        del v["texts"]
    hf = {k: theirs[k] for k in ("items_per_sec", "peak_rss_mib", "items")}
    hf["new_tokens"] = sorted(set(theirs["new_tokens"].values()))
    return {"lvlm-ift": ours["generate"], "lvlm-ift-likelihood": ours["likelihood"],
            "hf-generate": hf, "texts_differ": differ}


def print_table(rows, evals, cache_res, args) -> None:
    bf16 = (f"; PyTorch bf16: {args.peer_bf16_steps} steps"
            if args.peer_bf16_steps and "bf16" in args.dtypes else "")
    print(f"\nTraining: batch {args.batch}, LoRA r=8 on LM q/k/v/o, AdamW, {args.threads} threads, "
          f"{args.steps} steps (median of steps 2..{args.steps}){bf16}")
    print("| image tokens | precision | tool | s/step | tokens/s | peak RSS MiB | speed vs peer | RSS vs peer |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, dtype, ours, theirs in rows:
        speed = theirs["s_per_step"] / ours["s_per_step"]
        mem = ours["peak_rss_mib"] / theirs["peak_rss_mib"]
        print(f"| {variant} | {dtype} | PyTorch+PEFT | {theirs['s_per_step']:.3f} | {theirs['tokens_per_sec']:.0f} | "
              f"{theirs['peak_rss_mib']:.0f} | 1.00 | 1.00 |")
        print(f"| {variant} | {dtype} | lvlm-ift | {ours['s_per_step']:.3f} | {ours['tokens_per_sec']:.0f} | "
              f"{ours['peak_rss_mib']:.0f} | {speed:.2f}x | {mem:.2f}x |")
        if abs(ours["tokens_per_step"] - theirs["tokens_per_step"]) > 0.02 * theirs["tokens_per_step"]:
            print(f"  WARNING: tokens per step differ: {ours['tokens_per_step']} vs {theirs['tokens_per_step']}")
    if cache_res:
        c = cache_res
        print(f"\nFrozen-vision feature cache (lvlm-ift only; {args.variants[0]} image tokens, fp32, "
              f"16 pairs, 2 epochs): epoch 1 {c['epoch1_s_per_step']:.3f} s/step, epoch 2 "
              f"{c['epoch2_s_per_step']:.3f} s/step ({c['speedup']:.2f}x); {c['entries']} entries, "
              f"{c['cache_mib']:.1f} MiB; peak RSS {c['peak_rss_mib']:.0f} MiB")
    if evals:
        o, t = evals["lvlm-ift"], evals["hf-generate"]
        print(f"\nEval (WBCAtt fixture test split, {t['items']} items, generate, 50 new tokens max):")
        print("| tool | items/s | peak RSS MiB | speed vs HF |")
        print("|---|---|---|---|")
        print(f"| HF generate | {t['items_per_sec']:.3f} | {t['peak_rss_mib']:.0f} | 1.00 |")
        print(f"| lvlm-ift eval | {o['items_per_sec']:.3f} | {o['peak_rss_mib']:.0f} | "
              f"{o['items_per_sec'] / t['items_per_sec']:.2f}x |")
        lk = evals["lvlm-ift-likelihood"]
        print(f"| lvlm-ift eval, likelihood scoring | {lk['items_per_sec']:.3f} | {lk['peak_rss_mib']:.0f} | "
              f"{lk['items_per_sec'] / t['items_per_sec']:.2f}x |")
        if evals["texts_differ"]:
            print(f"  WARNING: generated texts differ for {len(evals['texts_differ'])} items")
        else:
            print(f"  Both generated the same texts for every item ({', '.join(map(str, t['new_tokens']))} new tokens each).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--out", required=True)
    m.add_argument("--image-size", type=int, default=224)
    m.add_argument("--patch", type=int, default=16)
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("peer-train")
    t.add_argument("--model", required=True)
    t.add_argument("--pairs", required=True)
    t.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("peer-eval")
    e.add_argument("--model", required=True)
    e.add_argument("--items", required=True)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--max-new-tokens", type=int, default=50)
    r = sub.add_parser("run")
    r.add_argument("--binary", default=str(ROOT / "target/release/lvlm-ift"))
    r.add_argument("--work", default=str(ROOT / "target/bench-train"))
    r.add_argument("--variants", nargs="+", default=["196", "576"], choices=sorted(VARIANTS))
    r.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--no-eval", dest="eval", action="store_false")
    r.add_argument("--no-cache", dest="cache", action="store_false",
                   help="skip the frozen-vision feature cache measurement (lvlm-ift only)")
    r.add_argument("--peer-bf16-steps", type=int, default=None,
                   help="PyTorch's bf16 steps (default --steps): minutes each on CPUs without AMX")
    r.add_argument("--reuse-peer", action="store_true",
                   help="take PyTorch's figures from an earlier run's peer-results.json (development only: "
                        "a table for the record runs both tools)")
    args = ap.parse_args()
    if args.cmd == "make-model":
        make_model(Path(args.out), args.image_size, args.patch, args.seed)
    elif args.cmd == "peer-train":
        peer_train(args)
    elif args.cmd == "peer-eval":
        peer_eval(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
