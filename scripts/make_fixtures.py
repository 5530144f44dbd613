#!/usr/bin/env python3
"""Generate the HF-transformers parity fixtures for lvlm-ift (tests/fixtures/).

Purpose
-------
Builds, fully deterministically and on CPU in float32:

* a real byte-level BPE tokenizer (GPT-2 style, ~400 tokens, special tokens
  <unk>=0 <s>=1 </s>=2 <pad>=3 <image>=4, BOS-prepending post-processor, chat
  template in the llava-hf style), trained on a small embedded corpus;
* two tiny ``LlavaForConditionalGeneration`` checkpoints (llava-hf format):
    - ``tests/fixtures/tiny-llava/``          Llama text model, transformers 4.x hub
      key layout, one ``model.safetensors``, vision_feature_layer=-2,
      strategy "default";
    - ``tests/fixtures/tiny-llava-mistral/``  Mistral text model (GQA), rewritten
      into the transformers 5.x layout (no ``vision_model.`` segment,
      ``rope_parameters``, ``image_token_id``), sharded in 2 files + index,
      vision_feature_layer=[-3, -1], strategy "full";
* small test images in ``tests/fixtures/images/``;
* expected outputs (pixel values, input ids, logits, continuation scores,
  greedy generations, a right-padded batch) in
  ``tests/fixtures/parity/<model>.safetensors`` + ``<model>.json``.

Pinned versions (see scripts/requirements-fixtures.txt)::

    torch==2.5.1 transformers==4.57.1 tokenizers==0.22.2 pillow==13.0.0
    numpy==2.4.6 safetensors==0.8.0

A warning is printed when the installed versions differ (outputs may then
differ in the last bits, or the 4.x-specific layout handling may break).

How to run
----------
From the repository root::

    python scripts/make_fixtures.py

It deletes and rewrites the generated parts of tests/fixtures/ (the two model
dirs, images/, parity/). It is re-runnable and deterministic (seeded, single
threaded); it prints the minimum greedy top-1/top-2 logit margin, runs reload
self-checks and prints the total fixture size (must stay < 3 MiB).

Expected outputs of the 5.x-layout Mistral model are computed from the in-memory
model (transformers 4.57 cannot load the 5.x layout); the rewritten files are
then verified by mapping their keys back to the 4.57 layout and re-running.
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
import PIL  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)

PINNED = {
    "torch": "2.5.1",
    "transformers": "4.57.1",
    "tokenizers": "0.22.2",
    "pillow": "13.0.0",
    "numpy": "2.4.6",
    "safetensors": "0.8.0",
}
INSTALLED = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
}

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
IMG_DIR = FIX / "images"
PARITY_DIR = FIX / "parity"
MAX_TOTAL_BYTES = 3 * 1024 * 1024

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
BOS_ID, EOS_ID, PAD_ID = 1, 2, 3
VOCAB_TARGET = 400

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = 30
PATCH_SIZE = 6

RAW_PROMPT = "USER: <image>\nDescribe the cell. ASSISTANT:"  # differs from the chat-templated prompt on purpose
CHAT_USER_TEXT = "What is shown?"
BATCH_PROMPTS = [
    "USER: <image>\nWhat is shown? ASSISTANT:",
    "USER: <image>\nDescribe the cell in detail please. ASSISTANT:",
]
CONTINUATION = " small cell size, round cell shape"
MAX_NEW_TOKENS = 12
MIN_MARGIN = 1e-2  # hard requirement
TARGET_MARGIN = 0.1  # preferred: first seed reaching it is used
SEED_TRIES = 100

# llava-hf style chat template: user -> "USER: " + "<image>\n" per image + text,
# assistant -> " ASSISTANT: " + text + eos, generation prompt -> " ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + '\\n' }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + '\\n' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

CORPUS = """
USER: What is shown? ASSISTANT: The image shows a small round cell with a dark nucleus.
USER: What is shown? ASSISTANT: The correct answer is A.
USER: What is shown? ASSISTANT: The correct answer is B.
USER: What is shown? ASSISTANT: The correct answer is C.
USER: What is shown? ASSISTANT: The correct answer is D.
USER: Describe the cell in detail please. ASSISTANT: The cell has a small cell size, a round cell shape,
a smooth membrane and a large nucleus. The cytoplasm is pale and the chromatin is fine.
USER: Describe the skin lesion. ASSISTANT: The skin lesion is a pigmented lesion with an irregular border,
uneven color and a diameter larger than six millimeters. The lesion may be a melanoma or a benign nevus.
A dermatoscopic image of the skin shows a brown lesion with a regular network and no blue white veil.
USER: What does the mammogram show? ASSISTANT: The mammogram shows a dense breast with a small mass
in the upper outer quadrant. The mass has a spiculated margin and there are fine calcifications.
The breast density is high, and the finding is suspicious for malignancy. A biopsy is recommended.
USER: What does the chest x-ray show? ASSISTANT: The chest x-ray shows clear lungs, a normal heart size
and no pleural effusion. There is no pneumonia, no pneumothorax and no consolidation in the lung.
A frontal chest radiograph of the patient shows an opacity in the right lower lobe, consistent with pneumonia.
The heart is not enlarged. The lungs are clear. The image is a chest x-ray of an adult patient.
Blood cells: red blood cells, white blood cells and platelets are shown in the blood smear.
A neutrophil is a white blood cell with a segmented nucleus. A lymphocyte is a small round cell
with a large round nucleus and little cytoplasm. A monocyte is a large cell with a kidney shaped nucleus.
An eosinophil has red granules. A basophil has dark blue granules. The cell shape is round or oval.
The cell size is small, medium or large. The nucleus shape is round, oval, or irregular.
Question: Which cell type is shown? Options: A. neutrophil B. lymphocyte C. monocyte D. eosinophil
Answer: The correct answer is B. The image shows a lymphocyte with a small cell size and round cell shape.
Question: Is the lesion benign or malignant? Answer: The lesion is benign.
Question: Is there a mass in the mammogram? Answer: Yes, there is a mass.
Question: Is there an effusion on the chest x-ray? Answer: No, there is no effusion.
The pathology slide shows tissue stained with hematoxylin and eosin. The cells are arranged in sheets.
The tumor cells have large nuclei, prominent nucleoli and frequent mitoses. The stroma is fibrous.
What is shown? What is shown in the image? What is the diagnosis? What is the cell type?
The image shows a cell. The image shows a lesion. The image shows a mammogram. The image shows a chest x-ray.
Describe the image in detail please. Describe the cell. Describe the lesion. Describe the finding.
"""


# --------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    print(msg, flush=True)


def check_versions() -> None:
    for name, want in PINNED.items():
        have = INSTALLED[name]
        if have.split("+")[0] != want:
            warnings.warn(
                f"{name} {have} is installed but fixtures are pinned to {name}=={want}; "
                "outputs may differ from the committed fixtures",
                stacklevel=1,
            )
            print(f"WARNING: version mismatch: {name} {have} != {want}", file=sys.stderr)
        elif have != want:
            log(f"note: {name} {have} (local variant of pinned {want})")


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def contig(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


# ----------------------------------------------------------------------- tokenizer
def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [ln for ln in CORPUS.strip().splitlines() if ln.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_ID)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    assert fast.convert_tokens_to_ids("<image>") == 4
    return fast


# -------------------------------------------------------------------------- images
def make_images() -> dict[str, str]:
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)

    def grad_rgb(w: int, h: int) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        r = 255.0 * x / max(w - 1, 1)
        g = 255.0 * y / max(h - 1, 1)
        b = 127.5 + 127.5 * np.sin(2 * np.pi * (x + y) / (w + h) * 2)
        img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (h, w, 3))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)

    files = {}
    Image.fromarray(grad_rgb(67, 45), "RGB").save(IMG_DIR / "photo_67x45.png")
    files["photo"] = "images/photo_67x45.png"
    Image.fromarray(grad_rgb(20, 26), "RGB").save(IMG_DIR / "small_20x26.png")
    files["small"] = "images/small_20x26.png"

    rgb = grad_rgb(40, 40)
    y, x = np.mgrid[0:40, 0:40]
    alpha = np.clip(np.round(255.0 * (x + y) / 78.0), 0, 255).astype(np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=-1), "RGBA").save(IMG_DIR / "rgba_40x40.png")
    files["rgba"] = "images/rgba_40x40.png"

    y, x = np.mgrid[0:37, 0:41].astype(np.float64)
    g16 = 65535.0 * (x / 40.0 * 0.7 + y / 36.0 * 0.3) + rng.normal(0, 900, (37, 41))
    g16 = np.clip(np.round(g16), 0, 65535).astype(np.uint16)
    g16[0, 0], g16[-1, -1] = 0, 65535
    im16 = Image.fromarray(g16)
    assert im16.mode == "I;16", im16.mode
    im16.save(IMG_DIR / "gray16_41x37.png")
    back = Image.open(IMG_DIR / "gray16_41x37.png")
    assert back.mode in ("I;16", "I"), back.mode
    assert np.array_equal(np.array(back).astype(np.int64), g16.astype(np.int64))
    files["gray16"] = "images/gray16_41x37.png"

    y, x = np.mgrid[0:50, 0:33].astype(np.float64)
    g8 = 255.0 * (0.5 + 0.5 * np.cos(x / 5.0) * np.sin(y / 7.0)) + rng.normal(0, 10, (50, 33))
    Image.fromarray(np.clip(np.round(g8), 0, 255).astype(np.uint8), "L").save(IMG_DIR / "gray8_33x50.png")
    files["gray8"] = "images/gray8_33x50.png"
    return files


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Exactly as in the original LLaVA code (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


# -------------------------------------------------------------------------- models
def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def make_config(kind: str, vocab_size: int) -> LlavaConfig:
    common = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    if kind == "llama":
        text = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=256,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            **common,
        )
        layer, strategy, n_img = -2, "default", n_patches
    else:
        text = MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=vocab_size,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            sliding_window=None,
            **common,
        )
        layer, strategy, n_img = [-3, -1], "full", n_patches + 1
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text,
        image_token_index=4,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        image_seq_length=n_img,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Large-variance re-init so that logits are well separated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2 or name.endswith("class_embedding"):
                p.copy_(0.3 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                raise ValueError(f"unhandled parameter {name} {tuple(p.shape)}")


def build_model(kind: str, vocab_size: int, seed: int) -> LlavaForConditionalGeneration:
    seed_all(seed)
    cfg = make_config(kind, vocab_size)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    reinit_(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.eval()
    return model


def make_processor(tok, strategy: str) -> LlavaProcessor:
    ip = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


# ------------------------------------------------------------------ key layouts
def to_hub4_key(k: str) -> str:
    """Whatever 4.57 wrote -> transformers 4.x hub layout."""
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k.startswith("lm_head."):
        return "language_model." + k
    if k.startswith("model.vision_tower."):
        return k[len("model."):]
    if k.startswith("model.multi_modal_projector."):
        return k[len("model."):]
    return k


def hub4_to_hub5(k: str) -> str:
    if k.startswith("vision_tower.vision_model."):
        return "vision_tower." + k[len("vision_tower.vision_model."):]
    return k


def hub5_to_hub4(k: str) -> str:
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + k[len("vision_tower."):]
    return k


def check_hub4_layout(keys) -> None:
    for k in keys:
        ok = (
            k.startswith("language_model.model.layers.")
            or k in ("language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
                     "language_model.lm_head.weight")
            or k.startswith("vision_tower.vision_model.embeddings.")
            or k.startswith("vision_tower.vision_model.pre_layrnorm.")
            or k.startswith("vision_tower.vision_model.encoder.layers.")
            or k.startswith("vision_tower.vision_model.post_layernorm.")
            or k.startswith("multi_modal_projector.linear_")
        )
        assert ok, f"unexpected key for hub 4.x layout: {k}"


# ------------------------------------------------------------------ expectations
@torch.no_grad()
def compute_expected(model, proc, images: dict[str, Image.Image]):
    t: dict[str, torch.Tensor] = {}
    margins: list[float] = []

    # LlavaProcessor 4.57 rejects images without text, so the image-only path goes through
    # the processor's (slow) image processor; the text+image path is checked equal below.
    ip = proc.image_processor
    for name in ("photo", "small", "rgba", "gray8"):
        t[f"pixel_values.{name}"] = ip(images[name], return_tensors="pt")["pixel_values"]
    bg = tuple(int(x * 255) for x in ip.image_mean)
    t["pixel_values.photo_pad"] = ip(expand2square(images["photo"], bg), return_tensors="pt")["pixel_values"]
    for k in list(t):
        assert tuple(t[k].shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE), (k, t[k].shape)

    photo = images["photo"]
    raw = proc(text=RAW_PROMPT, images=photo, return_tensors="pt")
    assert torch.equal(raw["pixel_values"], t["pixel_values.photo"])
    chat_text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_USER_TEXT}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    chat = proc(text=chat_text, images=photo, return_tensors="pt")
    t["input_ids.raw"] = raw["input_ids"].to(torch.int64)
    t["input_ids.chat"] = chat["input_ids"].to(torch.int64)
    pv = t["pixel_values.photo"]

    t["logits.raw"] = model(input_ids=t["input_ids.raw"], pixel_values=pv).logits.float()
    t["logits.chat"] = model(input_ids=t["input_ids.chat"], pixel_values=pv).logits.float()

    cont = proc.tokenizer(CONTINUATION, add_special_tokens=False).input_ids
    t["continuation_ids"] = torch.tensor(cont, dtype=torch.int64)
    full = torch.cat([t["input_ids.chat"], t["continuation_ids"][None]], dim=1)
    lg = model(input_ids=full, pixel_values=pv).logits.float()
    lp = torch.log_softmax(lg[0], dim=-1)
    L = t["input_ids.chat"].shape[1]
    tok_lp = torch.stack([lp[L - 1 + i, c] for i, c in enumerate(cont)])
    t["score.token_logprobs"] = tok_lp
    t["score.logprob"] = tok_lp.sum().reshape(1)

    for name, inp in (("raw", raw), ("chat", chat)):
        out = model.generate(
            input_ids=inp["input_ids"],
            attention_mask=inp["attention_mask"],
            pixel_values=pv,
            do_sample=False,
            num_beams=1,
            max_new_tokens=MAX_NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
        gen = out.sequences[:, inp["input_ids"].shape[1]:].to(torch.int64)
        t[f"generate.{name}_ids"] = gen
        for step_logits in out.logits:
            top2 = torch.topk(step_logits[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))

    assert proc.tokenizer.padding_side == "right"
    batch = proc(text=BATCH_PROMPTS, images=[photo, photo], padding=True, return_tensors="pt")
    t["batch.input_ids"] = batch["input_ids"].to(torch.int64)
    t["batch.attention_mask"] = batch["attention_mask"].to(torch.int64)
    t["batch.logits"] = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    ).logits.float()

    n_img = int((t["input_ids.raw"] == model.config.image_token_index).sum())
    return contig(t), chat_text, min(margins), n_img


def search_seed(kind, vocab_size, proc, images, base_seed):
    """First seed whose minimum greedy top-1/top-2 margin reaches TARGET_MARGIN; falls back to
    the best seed seen if it is still above the hard minimum MIN_MARGIN."""
    best = None
    for seed in range(base_seed, base_seed + SEED_TRIES):
        model = build_model(kind, vocab_size, seed)
        tensors, chat_text, margin, n_img = compute_expected(model, proc, images)
        if best is None or margin > best[4]:
            best = (seed, model, tensors, chat_text, margin, n_img)
        if margin >= TARGET_MARGIN:
            return best
        log(f"  seed {seed}: min greedy margin {margin:.3g} < {TARGET_MARGIN}, retrying")
    if best[4] > MIN_MARGIN:
        return best
    raise RuntimeError("no seed with a sufficient greedy margin")


@torch.no_grad()
def logits_check(model, tensors, label):
    for name in ("raw", "chat"):
        lg = model(input_ids=tensors[f"input_ids.{name}"], pixel_values=tensors["pixel_values.photo"]).logits
        diff = (lg - tensors[f"logits.{name}"]).abs().max().item()
        assert diff == 0.0, f"{label}: logits.{name} differ by {diff}"
    lg = model(input_ids=tensors["batch.input_ids"], attention_mask=tensors["batch.attention_mask"],
               pixel_values=torch.cat([tensors["pixel_values.photo"]] * 2)).logits
    diff = (lg - tensors["batch.logits"]).abs().max().item()
    assert diff == 0.0, f"{label}: batch.logits differ by {diff}"
    log(f"  self-check OK ({label}): logits bit-identical")


# ------------------------------------------------------------------------ writers
def rewrite_hub4(out_dir: Path) -> list[str]:
    """Ensure the single model.safetensors is in the transformers 4.x hub key layout."""
    path = out_dir / "model.safetensors"
    sd = load_file(path)
    renamed = {to_hub4_key(k): v for k, v in sd.items()}
    check_hub4_layout(renamed)
    if list(sorted(renamed)) != list(sorted(sd)):
        log("  note: 4.57 wrote non-hub keys; renamed to hub 4.x layout")
        save_file(contig(renamed), path, metadata={"format": "pt"})
    else:
        log("  4.57 save_pretrained already wrote the hub 4.x layout")
    return sorted(sd)


def rewrite_hub5_sharded(out_dir: Path):
    """Rewrite a 4.57 save into the transformers 5.x layout, 2 shards + index."""
    path = out_dir / "model.safetensors"
    sd = load_file(path)
    hub4 = {to_hub4_key(k): v for k, v in sd.items()}
    check_hub4_layout(hub4)
    hub5 = {hub4_to_hub5(k): v for k, v in hub4.items()}
    assert not any("vision_model." in k for k in hub5)
    path.unlink()

    keys = sorted(hub5)
    nbytes = {k: hub5[k].numel() * hub5[k].element_size() for k in keys}
    total = sum(nbytes.values())
    shards: list[list[str]] = [[], []]
    acc = 0
    for k in keys:
        shards[0 if acc < total / 2 else 1].append(k)
        acc += nbytes[k]
    assert shards[0] and shards[1]
    weight_map = {}
    for i, ks in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(contig({k: hub5[k] for k in ks}), out_dir / fname, metadata={"format": "pt"})
        for k in ks:
            weight_map[k] = fname
    write_json(out_dir / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_token_id"] = cfg.pop("image_token_index")
    tc = cfg["text_config"]
    theta = float(tc.pop("rope_theta"))
    tc.pop("rope_scaling", None)
    tc["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    tc["head_dim"] = 16
    cfg["transformers_version"] = "5.0.0"
    write_json(cfg_path, cfg)


def load_hub5_into_457(out_dir: Path, cfg457: LlavaConfig) -> LlavaForConditionalGeneration:
    """Self-check for the 5.x dir: undo the layout by hand and load with 4.57."""
    idx = json.loads((out_dir / "model.safetensors.index.json").read_text())
    sd = {}
    for f in sorted(set(idx["weight_map"].values())):
        sd.update(load_file(out_dir / f))
    assert set(sd) == set(idx["weight_map"])
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["text_config"]["rope_parameters"]["rope_theta"] == cfg457.text_config.rope_theta
    assert cfg["image_token_id"] == cfg457.image_token_index
    model = LlavaForConditionalGeneration._from_config(cfg457, attn_implementation="eager")
    hub4 = {hub5_to_hub4(k): v for k, v in sd.items()}
    # 4.57 module names: model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*, lm_head.*
    mod = {}
    for k, v in hub4.items():
        if k.startswith("language_model.model."):
            mod["model.language_model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            mod[k[len("language_model."):]] = v
        else:
            mod["model." + k] = v
    model.load_state_dict(mod, strict=True)
    model.eval()
    return model


def key_families(keys) -> dict[str, list[str]]:
    fam: dict[str, list[str]] = {}
    for k in sorted(keys):
        parts = k.split(".")
        p = ".".join(parts[:3]) if parts[0] != "multi_modal_projector" else parts[0]
        fam.setdefault(p, []).append(k)
    return fam


# --------------------------------------------------------------------------- main
def main() -> None:
    check_versions()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    seed_all(0)

    for d in (IMG_DIR, PARITY_DIR, FIX / "tiny-llava", FIX / "tiny-llava-mistral"):
        if d.exists():
            shutil.rmtree(d)
    FIX.mkdir(parents=True, exist_ok=True)
    PARITY_DIR.mkdir(parents=True)

    tok = build_tokenizer()
    vocab_size = len(tok)
    log(f"tokenizer: vocab_size={vocab_size} image_token_id={tok.convert_tokens_to_ids('<image>')}")

    image_files = make_images()

    specs = [
        ("tiny-llava", "llama", "default", 1000),
        ("tiny-llava-mistral", "mistral", "full", 2000),
    ]
    for dir_name, kind, strategy, base_seed in specs:
        log(f"== {dir_name}")
        out_dir = FIX / dir_name
        # Save processor (+ tokenizer) first, then reload it exactly as a user would.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        make_processor(tok, strategy).save_pretrained(out_dir)
        proc = AutoProcessor.from_pretrained(out_dir, use_fast=False)
        assert type(proc).__name__ == "LlavaProcessor", type(proc)
        assert type(proc.image_processor) is CLIPImageProcessor, type(proc.image_processor)
        assert proc.num_additional_image_tokens == 1 and proc.patch_size == PATCH_SIZE
        assert proc.vision_feature_select_strategy == strategy
        assert proc.tokenizer.padding_side == "right"
        images = {n: Image.open(FIX / p) for n, p in image_files.items()}
        for im in images.values():
            im.load()

        seed, model, tensors, chat_text, margin, n_img = search_seed(kind, vocab_size, proc, images, base_seed)
        log(f"  seed={seed} min greedy top1-top2 margin={margin:.4f} num_image_tokens={n_img}")
        log(f"  chat_text={chat_text!r}")
        log(f"  generate.raw_ids={tensors['generate.raw_ids'].tolist()} chat={tensors['generate.chat_ids'].tolist()}")

        model.save_pretrained(out_dir, safe_serialization=True)
        # reload with 4.57 before any rewrite
        reloaded = LlavaForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
        logits_check(reloaded, tensors, f"{dir_name} from_pretrained (4.57 native save)")
        if kind == "llama":
            saved_keys = rewrite_hub4(out_dir)
            reloaded = LlavaForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
            logits_check(reloaded, tensors, f"{dir_name} from_pretrained (hub 4.x layout)")
        else:
            saved_keys = sorted(load_file(out_dir / "model.safetensors"))
            cfg457 = model.config
            rewrite_hub5_sharded(out_dir)
            reloaded = load_hub5_into_457(out_dir, cfg457)
            logits_check(reloaded, tensors, f"{dir_name} 5.x files mapped back to 4.57")
        log(f"  keys as written by transformers {transformers.__version__} save_pretrained: "
            f"{ {f: ks[:2] for f, ks in key_families(saved_keys).items()} }")

        save_file(tensors, PARITY_DIR / f"{dir_name}.safetensors", metadata={"format": "pt"})
        meta = {
            "model_dir": dir_name,
            "layout": "transformers-4.x hub (single file)" if kind == "llama" else "transformers-5.x (2 shards + index)",
            "text_model": kind,
            "seed": seed,
            "prompts": {"raw": RAW_PROMPT, "chat_user_text": CHAT_USER_TEXT, "batch": BATCH_PROMPTS},
            "chat_text": chat_text,
            "continuation": CONTINUATION,
            "max_new_tokens": MAX_NEW_TOKENS,
            "images": dict(image_files),
            "pad_background": list(int(x * 255) for x in CLIP_MEAN),
            "num_image_tokens": n_img,
            "image_token_id": int(model.config.image_token_index),
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "vocab_size": vocab_size,
            "vision_feature_layer": model.config.vision_feature_layer,
            "vision_feature_select_strategy": strategy,
            "versions": INSTALLED,
            "min_greedy_margin": round(margin, 6),
            "notes": [
                "pixel_values.* from the slow CLIPImageProcessor; rgba: alpha dropped via PIL convert('RGB') (no compositing)",
                "pixel_values.photo_pad: LLaVA expand2square with pad_background, then the processor",
                "gray16 image has no expected pixel_values (PIL I;16 -> RGB conversion clips, not scales)",
                "score.token_logprobs[i] = log_softmax(logits(input_ids.chat ++ continuation_ids)[L-1+i])[continuation_ids[i]]",
                "batch: right padding with pad_token_id, attention_mask given; logits at pad positions included",
                "generate.*_ids: greedy, new tokens only (EOS kept if produced)",
                "attention: eager, float32, CPU, single thread",
            ],
        }
        write_json(PARITY_DIR / f"{dir_name}.json", meta)

    # report sizes + hashes
    total = 0
    log("== files")
    for p in sorted(FIX.rglob("*")):
        if p.is_file():
            sz = p.stat().st_size
            total += sz
            h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            log(f"  {p.relative_to(FIX)}  {sz}  {h}")
    log(f"TOTAL tests/fixtures size: {total} bytes ({total / 1024 / 1024:.3f} MiB)")
    assert total < MAX_TOTAL_BYTES, "fixtures exceed 3 MiB"


if __name__ == "__main__":
    main()
