#!/usr/bin/env python3
"""HF parity fixtures for lvlm-ift's port of ``MllamaImageProcessor`` (Llama-3.2-Vision).

Purpose
-------
Runs transformers' own (slow, PIL-based) ``MllamaImageProcessor`` on small pictures and saves
what it returns, so ``tests/mllama_processor.rs`` can check the Rust port
(``src/data/processor/mllama/``) value for value: ``pixel_values``, ``aspect_ratio_ids``,
``aspect_ratio_mask`` and ``num_tiles``.

Two processor settings, each saved with ``save_pretrained`` so the Rust test reads the file HF
writes:

* ``tiles2``: 28 px tiles, at most 2 (the tiny ``tests/fixtures/mllama-model`` geometry), OpenAI
  CLIP mean/std, bilinear. The real tiles of ``pixel_values`` per case. Cases: the CLIP
  fixture images of ``tests/fixtures/images/`` (wide photo, small picture needing upscale, RGBA
  picture -- HF composites it onto white --, tall grey picture), generated tall/wide pictures, one
  needing upscale and one needing downscale; the crate's aspect modes as HF-side recipes (squash:
  ``PIL.resize((28, 28), BILINEAR)`` first, as the reference's ``torchvision Resize`` does on a
  PIL image; pad: LLaVA's ``expand2square`` with ``int(mean * 255)``); and
  ``preprocess(max_image_tiles=1)``.
* ``llama-3.2-vision``: the released checkpoints' settings (560 px tiles, at most 4). Full pixel
  values would be 15 MB a picture, so only every ``SAMPLE_STRIDE``-th value of the flattened
  ``pixel_values`` and each tile's float64 sum are kept, with the exact ids, mask and counts.

Generated pictures (no file needed, the Rust test computes the same pixels) are
``gradient(w, h)``: ``R = x * 255 // w``, ``G = y * 255 // h``, ``B = (x * 37 + y * 91) % 256``.

The gray16 CLIP fixture image is left out: PIL clips ``I;16`` to 8 bits on conversion, the crate
scales on purpose (see ``src/data/image.rs``).

Writes::

    tests/fixtures/mllama-processor/{tiles2,llama-3.2-vision}/preprocessor_config.json
    tests/fixtures/parity/mllama-processor.safetensors
        tiles2.<case>.pixel_values [num_tiles, 3, 28, 28] f32 (the real tiles; HF's packing
        tiles up to max_tiles, checked to be exact zeros here, are left out), .aspect_ratio_ids [1] i64,
        .aspect_ratio_mask [max_tiles] i64, .num_tiles [1] i64;
        llama.<case>.sample [k] f32, .tile_sums [4] f64, and the same ids/mask/num_tiles
    tests/fixtures/parity/mllama-processor.json
        the cases (image, aspect mode, max_tiles override), sample stride, versions

Pinned versions (scripts/requirements-fixtures.txt)::

    transformers==4.57.1 pillow==13.0.0 numpy==2.4.6 safetensors==0.8.0 (torch for safetensors)

How to run, from the repository root (deterministic, CPU, a second or two; prints the size,
which must stay under 300 KB)::

    python scripts/make_mllama_processor_fixtures.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import safetensors
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers import MllamaImageProcessor

PINNED = {"transformers": "4.57.1", "pillow": "13.0.0", "numpy": "2.4.6", "safetensors": "0.8.0"}
INSTALLED = {
    "transformers": transformers.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
}

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
IMG_DIR = FIX / "images"
CFG_DIR = FIX / "mllama-processor"
OUT = FIX / "parity" / "mllama-processor.safetensors"
OUT_JSON = FIX / "parity" / "mllama-processor.json"
MAX_BYTES = 300 * 1024
SAMPLE_STRIDE = 997

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# (case, image, aspect mode, max_image_tiles override). An image is a file of
# tests/fixtures/images/ or "gradient:WxH".
TILES2_CASES = [
    ("photo", "photo_67x45.png", "resize", None),
    ("small_up", "small_20x26.png", "resize", None),
    ("rgba", "rgba_40x40.png", "resize", None),
    ("gray8_tall", "gray8_33x50.png", "resize", None),
    ("tall", "gradient:9x40", "resize", None),
    ("wide", "gradient:100x30", "resize", None),
    ("tiny_up", "gradient:7x5", "resize", None),
    ("big_down", "gradient:120x90", "resize", None),
    ("photo_squash", "photo_67x45.png", "squash", None),
    ("photo_pad", "photo_67x45.png", "pad", None),
    ("wide_one_tile", "gradient:100x30", "resize", 1),
]
LLAMA_CASES = [
    ("photo", "photo_67x45.png", "resize", None),
    ("wide", "gradient:700x200", "resize", None),
    ("big_down", "gradient:1300x1250", "resize", None),
]


def check_versions() -> None:
    for name, want in PINNED.items():
        have = INSTALLED[name]
        if have.split("+")[0] != want:
            print(f"WARNING: {name} {have} is installed, fixtures are pinned to {want}", file=sys.stderr)


def gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    rgb = np.stack([x * 255 // w, y * 255 // h, (x * 37 + y * 91) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def load(spec: str) -> Image.Image:
    """The picture as HF gets it: a PIL image in its file's mode (HF's `convert_to_rgb` runs
    inside the processor)."""
    if spec.startswith("gradient:"):
        w, h = (int(v) for v in spec.split(":")[1].split("x"))
        return gradient(w, h)
    img = Image.open(IMG_DIR / spec)
    img.load()
    return img


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """As in the original LLaVA code (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def run(proc: MllamaImageProcessor, spec: str, aspect: str, max_tiles):
    img = load(spec)
    tile = proc.size["height"]
    if aspect == "squash":
        img = img.convert("RGB").resize((tile, tile), Image.BILINEAR)
    elif aspect == "pad":
        img = expand2square(img.convert("RGB"), tuple(int(x * 255) for x in proc.image_mean))
    kwargs = {} if max_tiles is None else {"max_image_tiles": max_tiles}
    out = proc(images=[[img]], return_tensors="np", **kwargs)
    pv = out["pixel_values"][0, 0].astype(np.float32)
    ids = out["aspect_ratio_ids"][0].astype(np.int64)
    mask = out["aspect_ratio_mask"][0, 0].astype(np.int64)
    num_tiles = np.array([out["num_tiles"][0][0]], dtype=np.int64)
    return pv, ids, mask, num_tiles


def saved_processor(name: str, **kwargs) -> MllamaImageProcessor:
    proc = MllamaImageProcessor(**kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        proc.save_pretrained(tmp)
        text = (Path(tmp) / "preprocessor_config.json").read_text()
    (CFG_DIR / name).mkdir(parents=True, exist_ok=True)
    (CFG_DIR / name / "preprocessor_config.json").write_text(text)
    # The test reads the file back, so build the processor from it too.
    return MllamaImageProcessor.from_pretrained(CFG_DIR / name)


def main() -> None:
    check_versions()
    tensors: dict[str, np.ndarray] = {}
    summary: dict[str, dict] = {}

    tiles2 = saved_processor(
        "tiles2",
        size={"height": 28, "width": 28},
        max_image_tiles=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    for case, spec, aspect, max_tiles in TILES2_CASES:
        pv, ids, mask, num_tiles = run(tiles2, spec, aspect, max_tiles)
        key = f"tiles2.{case}"
        real = int(num_tiles[0])
        # HF's packing tiles are exact zeros; only the real tiles are stored.
        assert not pv[real:].any(), key
        tensors.update({
            f"{key}.pixel_values": np.ascontiguousarray(pv[:real]),
            f"{key}.aspect_ratio_ids": ids,
            f"{key}.aspect_ratio_mask": mask,
            f"{key}.num_tiles": num_tiles,
        })
        summary[key] = {"image": spec, "aspect": aspect, "max_tiles": max_tiles,
                        "shape": list(pv.shape), "id": int(ids[0]), "num_tiles": int(num_tiles[0])}

    llama = saved_processor(
        "llama-3.2-vision",
        size={"height": 560, "width": 560},
        max_image_tiles=4,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    for case, spec, aspect, max_tiles in LLAMA_CASES:
        pv, ids, mask, num_tiles = run(llama, spec, aspect, max_tiles)
        key = f"llama.{case}"
        tensors.update({
            f"{key}.sample": np.ascontiguousarray(pv.reshape(-1)[::SAMPLE_STRIDE]),
            f"{key}.tile_sums": pv.astype(np.float64).reshape(pv.shape[0], -1).sum(axis=1),
            f"{key}.aspect_ratio_ids": ids,
            f"{key}.aspect_ratio_mask": mask,
            f"{key}.num_tiles": num_tiles,
        })
        summary[key] = {"image": spec, "aspect": aspect, "max_tiles": max_tiles,
                        "shape": list(pv.shape), "id": int(ids[0]), "num_tiles": int(num_tiles[0])}

    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT))
    OUT.chmod(0o644)
    OUT_JSON.write_text(json.dumps({
        "cases": summary,
        "sample_stride": SAMPLE_STRIDE,
        "gradient": "R = x * 255 // w, G = y * 255 // h, B = (x * 37 + y * 91) % 256",
        "notes": [
            "tiles2.*: 28 px tiles, max 2, CLIP mean/std, bilinear; pixel_values[0, 0, :num_tiles]"
            " (the packing tiles after them are exact zeros)",
            "llama.*: 560 px tiles, max 4; every sample_stride-th flattened value and tile sums",
            "rgba: HF's convert_to_rgb composites onto white (not CLIP's convert('RGB'))",
            "squash: PIL resize to one tile (bilinear) before the processor; pad: expand2square",
        ],
        "versions": INSTALLED,
    }, indent=2, sort_keys=True) + "\n")
    size = OUT.stat().st_size + OUT_JSON.stat().st_size + sum(
        p.stat().st_size for p in CFG_DIR.rglob("*") if p.is_file())
    for key, s in summary.items():
        print(f"{key:>24}: {s['image']:>20} {s['aspect']:>6} grid id {s['id']} tiles {s['num_tiles']}")
    print(f"total fixture size: {size} bytes")
    if size > MAX_BYTES:
        sys.exit(f"fixtures are {size} bytes, over the {MAX_BYTES} byte budget")


if __name__ == "__main__":
    main()
