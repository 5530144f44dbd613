#!/usr/bin/env python3
"""Generate the HF-transformers parity fixtures for Llama-3.2-Vision (Mllama) in lvlm-ift.

Purpose
-------
The Mllama counterpart of ``scripts/make_fixtures.py`` (LLaVA). Builds, fully
deterministically and on CPU in float32 (eager attention, one thread):

* a real Llama-3-style byte-level BPE tokenizer (384 ids + ``<|image|>``): the Llama-3
  pre-tokenizer regex + ByteLevel, ``ignore_merges``, BOS-prepending
  ``TemplateProcessing`` post-processor, and Llama 3.1/3.2's special-token layout
  (``<|begin_of_text|>`` .. ``<|python_tag|>`` + reserved tokens in the 16 ids below
  ``vocab_size``, at the same relative offsets as 128000..128010), with ``<|image|>`` at
  id ``text_config.vocab_size`` (one of Mllama's 8 extra embedding rows);
* a tiny random ``MllamaForConditionalGeneration`` (vision: hidden 24, 3 local + 2
  global layers, intermediate layers [0, 2] -> output dim 72, 28 px tiles of 7 px patches
  -> 17 positions, padded to 24 by HF, max 2 tiles; text: hidden 32, 4 layers of which 1
  and 3 are cross-attention, GQA 4/2, llama3 RoPE; 93,987 parameters), every
  parameter re-initialised at random -- the tanh gates (which HF initialises to 0 or pi/4),
  the padding row and the 8 extra embedding rows included -- saved with
  ``save_pretrained`` (transformers 4.57 writes the hub 4.x key layout
  ``language_model.model.*`` / ``language_model.lm_head.*`` / ``vision_model.*`` /
  ``multi_modal_projector.*``; checked) plus tokenizer, ``MllamaImageProcessor`` and
  ``MllamaProcessor`` files with the official Llama-3.2-11B-Vision-Instruct chat template,
  into ``tests/fixtures/tiny-mllama/``;
* expected outputs in ``tests/fixtures/parity/tiny-mllama.safetensors`` + ``.json``:
  processor outputs, logits, vision-encoder and projected cross-attention states, a
  right-padded batch, a text-only prompt, continuation scores, greedy generations, loss and
  gradients of a training example, a PEFT LoRA (adapter in
  ``tests/fixtures/parity/tiny-mllama-lora-init/``) with its logits, loss and gradients, and
  the merged model's logits; plus parameter names/shapes and per-group counts;
* per-group parameter counts of Llama-3.2-11B-Vision-Instruct (instantiated on the meta
  device), recorded in tiny-mllama.json; the committed ``tests/fixtures/mllama-11b/``
  (config.json + param_counts.json, written by scripts/make_mllama_11b_fixture.py) is
  checked against them, not written.

Pinned versions (see scripts/requirements-fixtures.txt)::

    torch==2.5.1 transformers==4.57.1 tokenizers==0.22.2 peft==0.17.1 pillow==13.0.0
    numpy==2.4.6 safetensors==0.8.0

A warning is printed when the installed versions differ.

How to run
----------
From anywhere (paths are relative to the repository root)::

    python scripts/make_mllama_fixtures.py

It deletes and rewrites only its own outputs: ``tests/fixtures/tiny-mllama/``,
``tests/fixtures/parity/tiny-mllama.{safetensors,json}`` and
``tests/fixtures/parity/tiny-mllama-lora-init/``. It reads ``tests/fixtures/mllama-11b/``. It reuses
(reads, never writes) ``tests/fixtures/images/{small_20x26,photo_67x45,gray8_33x50}.png``
written by scripts/make_fixtures.py. NOTE: make_fixtures.py wipes ``tests/fixtures/parity/``,
so re-run this script after it. Re-runs are deterministic (seeded, single threaded). It
prints the minimum greedy top-1/top-2 margin, runs reload self-checks (``from_pretrained``
reproduces the logits bit for bit; the adapter reloads; merged == unmerged) and prints the
sizes of what it wrote (all of it must stay < 1 MiB).
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
import PIL  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    GenerationConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig  # noqa: E402

PINNED = {
    "torch": "2.5.1",
    "transformers": "4.57.1",
    "tokenizers": "0.22.2",
    "peft": "0.17.1",
    "pillow": "13.0.0",
    "numpy": "2.4.6",
    "safetensors": "0.8.0",
}
INSTALLED = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "peft": peft.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
}

ROOT = Path(__file__).resolve().parent.parent
FIX_REL = "tests/fixtures"
MODEL_REL = f"{FIX_REL}/tiny-mllama"
PARITY_REL = f"{FIX_REL}/parity"
ADAPTER_REL = f"{PARITY_REL}/tiny-mllama-lora-init"
B11_REL = f"{FIX_REL}/mllama-11b"
OUT_NAME = "tiny-mllama"
MAX_NEW_BYTES = 1024 * 1024

# ------------------------------------------------------------------ tokenizer layout
VOCAB_SIZE = 384  # text_config.vocab_size == lm_head rows; embed_tokens has VOCAB_SIZE + 8 rows
N_SPECIAL = 16  # Llama 3 has 256 special ids 128000..128255; here 16 ids VOCAB_SIZE-16..VOCAB_SIZE-1
N_REGULAR = VOCAB_SIZE - N_SPECIAL  # 256 byte tokens + BPE merges
SB = N_REGULAR  # first special id (Llama 3: 128000)
# Same relative offsets as Llama 3.1 / 3.2 (128000 + offset).
SPECIALS = [
    "<|begin_of_text|>",  # +0  (128000)
    "<|end_of_text|>",  # +1  (128001)
    "<|reserved_special_token_0|>",  # +2
    "<|reserved_special_token_1|>",  # +3
    "<|finetune_right_pad_id|>",  # +4  (128004)
    "<|reserved_special_token_2|>",  # +5
    "<|start_header_id|>",  # +6  (128006)
    "<|end_header_id|>",  # +7  (128007)
    "<|eom_id|>",  # +8  (128008)
    "<|eot_id|>",  # +9  (128009)
    "<|python_tag|>",  # +10 (128010)
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + N_SPECIAL - 11)]
assert len(SPECIALS) == N_SPECIAL
BOS_ID = SB + 0
END_OF_TEXT_ID = SB + 1
PAD_ID = SB + 4
START_HEADER_ID = SB + 6
END_HEADER_ID = SB + 7
EOM_ID = SB + 8
EOT_ID = SB + 9
PYTHON_TAG_ID = SB + 10
IMAGE_TOKEN = "<|image|>"
IMAGE_ID = VOCAB_SIZE  # Llama 3.2 Vision: 128256 == text_config.vocab_size
EOS_IDS = [END_OF_TEXT_ID, EOM_ID, EOT_ID]  # like generation_config.json [128001, 128008, 128009]

# Llama 3 pre-tokenizer split regex (tokenizer.json of Meta-Llama-3 / 3.1 / 3.2).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ------------------------------------------------------------------ image processor
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # preprocessor_config.json of Llama-3.2-11B-Vision
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TILE = 28
PATCH = 7  # (28/7)^2 + 1 = 17 positions per tile: not a multiple of 8 -> HF pads to 24
MAX_TILES = 2
ASPECT_RATIOS = [[1, 1], [1, 2], [2, 1]]  # == get_all_supported_aspect_ratios(2); ids 1, 2, 3

# images reused from tests/fixtures/images (written by make_fixtures.py)
IMAGES = {
    "small": "images/small_20x26.png",  # 20 w x 26 h -> canvas 28x28, 1 tile (+1 padding tile), aspect id 1
    "photo": "images/photo_67x45.png",  # 67 w x 45 h -> canvas h28 x w56, 2 tiles side by side, aspect id 2
    "gray8": "images/gray8_33x50.png",  # 33 w x 50 h (mode L) -> canvas h56 x w28, 2 tiles stacked, aspect id 3
}
TRAIN_IMAGE = "small"  # image of the score / training / LoRA example

USER_TEXT = "Describe the image."
BATCH = [("small", "Describe the image."), ("photo", "What is shown in the image? Describe the cell in detail please.")]
TEXT_ONLY_USER = "What is a cell?"
DATE_STRING = "26 Jul 2024"  # passed to the template: otherwise it calls strftime_now (today's date)
RAW_PROMPT = "<|image|>Describe the image."  # no chat template: the processor inserts BOS after leading images
CONTINUATION = " a small red circle<|eot_id|>"
MAX_NEW_TOKENS = 8
MIN_MARGIN = 1e-2  # hard requirement (brief: > 1e-3)
TARGET_MARGIN = 0.1  # preferred: first seed reaching it is used
SEED_TRIES = 1000
BASE_SEED = 3000
IGNORE_INDEX = -100

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
            init_lora_weights=False, task_type="CAUSAL_LM")
LORA_INIT_SEED = 0  # torch.manual_seed before get_peft_model (init_lora_weights=False: nn.Linear default init of A and B)

# The official Llama-3.2-11B-Vision-Instruct chat template (tokenizer_config.json "chat_template" /
# chat_template.json of meta-llama/Llama-3.2-11B-Vision-Instruct), verbatim. Source used: the copy
# embedded as `llama3_2visionChatTemplate` in the swift-jinja tests (ChatTemplateTests.swift /
# VisionTests.swift), cross-checked against NVIDIA NeMo's MLlamaTemplateConfig copy; both identical.
# Note the 6 trailing spaces after the `{% set image_ns ... %}` line (part of the original).
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- Find out if there are any images #}\n"
    "{% set image_ns = namespace(has_images=false) %}      \n"
    "{%- for message in messages %}\n"
    "    {%- for content in message['content'] %}\n"
    "        {%- if content['type'] == 'image' %}\n"
    "            {%- set image_ns.has_images = true %}\n"
    "        {%- endif %}\n"
    "    {%- endfor %}\n"
    "{%- endfor %}\n"
    "\n"
    "{#- Error out if there are images and system message #}\n"
    "{%- if image_ns.has_images and not system_message == \"\" %}\n"
    "    {{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}\n"
    "{%- endif %}\n"
    "\n"
    "{#- System message if there are no images #}\n"
    "{%- if not image_ns.has_images %}\n"
    "    {{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "    {%- if tools is not none %}\n"
    "        {{- \"Environment: ipython\\n\" }}\n"
    "    {%- endif %}\n"
    "    {{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "    {{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "    {%- if tools is not none and not tools_in_user_message %}\n"
    "        {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n"
    "        {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "        {{- \"Do not use variables.\\n\\n\" }}\n"
    "        {%- for t in tools %}\n"
    "            {{- t | tojson(indent=4) }}\n"
    "            {{- \"\\n\\n\" }}\n"
    "        {%- endfor %}\n"
    "    {%- endif %}\n"
    "    {{- system_message }}\n"
    "    {{- \"<|eot_id|>\" }}\n"
    "{%- endif %}\n"
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n"
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "    {{- first_user_message + \"<|eot_id|>\"}}\n"
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] }}\n"
    "        {%- else %}\n"
    "            {%- for content in message['content'] %}\n"
    "                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n"
    "                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n"
    "        {{- \"}\" }}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Focused on the fixture prompts (the text between the special tokens of the rendered chat
# prompts) so that the 112 merges make them short, hence small logits tensors.
CORPUS = [
    "user", "assistant", "system", "\n\n",
    "Describe the image.",
    "What is shown in the image? Describe the cell in detail please.",
    "What is a cell?",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    " a small red circle",
] * 3 + [
    "The image shows a small red circle. The cell has a small cell size and a round cell shape.",
    "A neutrophil is a white blood cell. A lymphocyte is a small round cell with a large nucleus.",
    "The chest x-ray shows clear lungs, a normal heart size and no pleural effusion.",
    "The skin lesion is a pigmented lesion with an irregular border and uneven color.",
    "The mammogram shows a dense breast with a small mass in the upper outer quadrant.",
]

# parameters whose gradients are saved (in-memory 4.57 names); every Mllama-specific block is covered
GRAD_PARAMS = [
    "model.vision_model.patch_embedding.weight",
    "model.vision_model.class_embedding",
    "model.vision_model.gated_positional_embedding.embedding",
    "model.vision_model.gated_positional_embedding.gate",
    "model.vision_model.gated_positional_embedding.tile_embedding.weight",
    "model.vision_model.pre_tile_positional_embedding.embedding.weight",
    "model.vision_model.pre_tile_positional_embedding.gate",
    "model.vision_model.post_tile_positional_embedding.embedding.weight",
    "model.vision_model.post_tile_positional_embedding.gate",
    "model.vision_model.layernorm_pre.weight",
    "model.vision_model.layernorm_pre.bias",
    "model.vision_model.layernorm_post.weight",
    "model.vision_model.layernorm_post.bias",
    "model.vision_model.transformer.layers.0.self_attn.q_proj.weight",
    "model.vision_model.transformer.layers.0.mlp.fc1.bias",
    "model.vision_model.transformer.layers.2.input_layernorm.weight",
    "model.vision_model.global_transformer.layers.0.gate_attn",
    "model.vision_model.global_transformer.layers.0.gate_ffn",
    "model.vision_model.global_transformer.layers.0.mlp.fc1.weight",
    "model.vision_model.global_transformer.layers.1.self_attn.v_proj.weight",
    "model.multi_modal_projector.weight",
    "model.multi_modal_projector.bias",
    "model.language_model.embed_tokens.weight",
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.language_model.layers.0.self_attn.k_proj.weight",
    "model.language_model.layers.0.mlp.down_proj.weight",
    "model.language_model.layers.1.input_layernorm.weight",
    "model.language_model.layers.1.cross_attn.q_proj.weight",
    "model.language_model.layers.1.cross_attn.k_proj.weight",
    "model.language_model.layers.1.cross_attn.v_proj.weight",
    "model.language_model.layers.1.cross_attn.o_proj.weight",
    "model.language_model.layers.1.cross_attn.q_norm.weight",
    "model.language_model.layers.1.cross_attn.k_norm.weight",
    "model.language_model.layers.1.cross_attn_attn_gate",
    "model.language_model.layers.1.cross_attn_mlp_gate",
    "model.language_model.layers.1.mlp.gate_proj.weight",
    "model.language_model.layers.3.cross_attn_attn_gate",
    "model.language_model.layers.3.cross_attn_mlp_gate",
    "model.language_model.layers.2.self_attn.q_proj.weight",
    "model.language_model.norm.weight",
]

# ----------------------------------------------------- Llama-3.2-11B-Vision-Instruct
B11_VISION = dict(
    hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8, num_attention_heads=16,
    num_channels=3, intermediate_size=5120, vision_output_dim=7680, image_size=560, patch_size=14, norm_eps=1e-5,
    max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30],
    supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    initializer_range=0.02, torch_dtype="bfloat16",
)
B11_TEXT = dict(
    vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0,
    rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    rms_norm_eps=1e-5, max_position_embeddings=131072, initializer_range=0.02, use_cache=True,
    tie_word_embeddings=False, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], dropout=0,
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004, torch_dtype="bfloat16",
)


# --------------------------------------------------------------------------- utils
def log(msg: str) -> None:
    print(msg, flush=True)


def check_versions() -> None:
    for name, want in PINNED.items():
        have = INSTALLED[name]
        if have.split("+")[0] != want:
            warnings.warn(f"{name} {have} is installed but fixtures are pinned to {name}=={want}; "
                          "outputs may differ from the committed fixtures", stacklevel=1)
            print(f"WARNING: version mismatch: {name} {have} != {want}", file=sys.stderr)
        elif have != want:
            log(f"note: {name} {have} (local variant of pinned {want})")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def contig(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous().clone()
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        out[k] = v
    return out


def i64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.int64)


# ----------------------------------------------------------------------- tokenizer
def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=N_REGULAR,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == N_REGULAR, f"BPE trained {tok.get_vocab_size()} tokens, want {N_REGULAR}"
    # Llama 3's tokenizer.json: model.ignore_merges = true
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                       single_word=False) for t in SPECIALS + [IMAGE_TOKEN]])
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == SB + i, (t, tok.token_to_id(t))
    assert tok.token_to_id(IMAGE_TOKEN) == IMAGE_ID
    # Llama 3.2: Sequence[ByteLevel(trim_offsets=False), TemplateProcessing(<|begin_of_text|> $A)]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A:0",
            pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", BOS_ID)],
        ),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        padding_side="right",
        clean_up_tokenization_spaces=True,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
    )
    assert len(fast) == VOCAB_SIZE + 1
    assert fast.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_ID
    assert fast.pad_token_id == PAD_ID and fast.bos_token_id == BOS_ID and fast.eos_token_id == EOT_ID
    return fast


# ----------------------------------------------------------------- model / processor
def make_processor(tok) -> MllamaProcessor:
    ip = MllamaImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": TILE, "width": TILE},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_pad=True,
        max_image_tiles=MAX_TILES,
    )
    return MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def make_config() -> MllamaConfig:
    vision = MllamaVisionConfig(
        hidden_size=24,
        hidden_act="gelu",
        num_hidden_layers=3,
        num_global_layers=2,
        num_attention_heads=2,
        num_channels=3,
        intermediate_size=40,
        vision_output_dim=24 * 3,  # hidden * (1 + len(intermediate_layers_indices))
        image_size=TILE,
        patch_size=PATCH,
        norm_eps=1e-5,
        max_num_tiles=MAX_TILES,
        intermediate_layers_indices=[0, 2],
        supported_aspect_ratios=ASPECT_RATIOS,
    )
    text = MllamaTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        hidden_act="silu",
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        cross_attention_layers=[1, 3],
        dropout=0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_IDS,
        pad_token_id=PAD_ID,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)


GATE_SUFFIXES = (".gate", ".gate_attn", ".gate_ffn", ".cross_attn_attn_gate", ".cross_attn_mlp_gate")


def reinit_(model: torch.nn.Module, seed: int) -> dict[str, float]:
    """Re-initialise every parameter at random so that every path matters (HF inits the gates to 0 /
    pi/4 and the padding embedding row to 0). Gates: random sign, |g| in [0.4, 1.2]."""
    g = torch.Generator().manual_seed(seed)
    gates = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(GATE_SUFFIXES) and p.numel() == 1:
                u = torch.rand(2, generator=g)
                val = (0.4 + 0.8 * u[0]) * (1.0 if u[1] < 0.5 else -1.0)
                p.fill_(float(val))
                gates[name] = float(p.item())
            elif p.ndim >= 2 or name.endswith("class_embedding"):
                p.copy_(0.3 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                raise ValueError(f"unhandled parameter {name} {tuple(p.shape)}")
    return gates


def build_model(seed: int) -> tuple[MllamaForConditionalGeneration, dict[str, float]]:
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration._from_config(make_config(), attn_implementation="eager")
    gates = reinit_(model, seed)
    model.generation_config = make_generation_config()
    model.eval()
    return model, gates


def make_generation_config() -> GenerationConfig:
    # as generation_config.json of Llama-3.2-11B-Vision-Instruct (bos, eos list, pad, sampling defaults)
    return GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_IDS, pad_token_id=PAD_ID,
                            do_sample=True, temperature=0.6, top_p=0.9)


# ------------------------------------------------------------------ expectations
def image_messages(text: str):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def model_inputs(enc) -> dict:
    keys = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
            "cross_attention_mask")
    return {k: enc[k] for k in keys if k in enc}


@torch.no_grad()
def compute_forward(model, proc, images: dict[str, Image.Image]):
    """Everything that only needs forward passes; also returns the min greedy margin."""
    t: dict[str, torch.Tensor] = {}
    info: dict = {"images": {}}
    margins: list[float] = []
    chat_text = proc.apply_chat_template(image_messages(USER_TEXT), add_generation_prompt=True, tokenize=False)
    info["chat_text"] = chat_text
    for name, img in images.items():
        enc = proc(text=chat_text, images=[[img]], add_special_tokens=False, return_tensors="pt")
        only = proc.image_processor(images=[[img]], return_tensors="pt")
        assert torch.equal(only["pixel_values"], enc["pixel_values"])
        t[f"pixel_values.{name}"] = enc["pixel_values"].float()
        t[f"aspect_ratio_ids.{name}"] = i64(enc["aspect_ratio_ids"])
        t[f"aspect_ratio_mask.{name}"] = i64(enc["aspect_ratio_mask"])
        t[f"num_tiles.{name}"] = i64(only["num_tiles"][0])
        t[f"input_ids.{name}"] = i64(enc["input_ids"])
        t[f"cross_attention_mask.{name}"] = i64(enc["cross_attention_mask"])
        inp = model_inputs(enc)
        t[f"logits.{name}"] = model(**inp).logits.float()
        vis = model.model.vision_model(pixel_values=enc["pixel_values"], aspect_ratio_ids=enc["aspect_ratio_ids"],
                                       aspect_ratio_mask=enc["aspect_ratio_mask"]).last_hidden_state
        t[f"vision.{name}"] = vis.float()
        t[f"cross_states.{name}"] = model.model.multi_modal_projector(vis).reshape(
            -1, vis.shape[-2], model.config.text_config.hidden_size).float()
        info["images"][name] = {
            "file": IMAGES[name], "size_wh": list(img.size), "mode": img.mode,
            "num_tiles": int(only["num_tiles"][0][0]),
            "aspect_ratio_id": int(enc["aspect_ratio_ids"][0, 0]),
        }
        # greedy generation (KV cache), new tokens only
        out = model.generate(**inp, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                             output_logits=True, return_dict_in_generate=True)
        L = enc["input_ids"].shape[1]
        gen = out.sequences[:, L:].to(torch.int64)
        t[f"generate.{name}_ids"] = gen
        for step_logits in out.logits:
            top2 = torch.topk(step_logits[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
    # apply_chat_template(tokenize=True) == processor(text=chat_text, add_special_tokens=False)
    msgs = [{"role": "user", "content": [{"type": "image", "image": images["small"]},
                                         {"type": "text", "text": USER_TEXT}]}]
    tok_enc = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
    assert torch.equal(i64(tok_enc["input_ids"]), t["input_ids.small"]), "apply_chat_template(tokenize) differs"
    assert torch.equal(tok_enc["pixel_values"], t["pixel_values.small"])
    assert torch.equal(i64(tok_enc["cross_attention_mask"]), t["cross_attention_mask.small"])
    # the processor with default add_special_tokens on chat text -> double BOS (HF docs pass add_special_tokens=False)
    dbl = proc(text=chat_text, images=[[images["small"]]], return_tensors="pt")
    info["double_bos_ids_if_add_special_tokens"] = dbl["input_ids"][0].tolist()[:4]
    # raw prompt, no chat template
    raw = proc(text=RAW_PROMPT, images=[[images["small"]]], return_tensors="pt")
    t["input_ids.raw"] = i64(raw["input_ids"])
    t["cross_attention_mask.raw"] = i64(raw["cross_attention_mask"])

    # right-padded batch, one image per sample, different prompt lengths
    texts = [proc.apply_chat_template(image_messages(q), add_generation_prompt=True, tokenize=False) for _, q in BATCH]
    info["batch_texts"] = texts
    batch = proc(text=texts, images=[[images[n]] for n, _ in BATCH], padding=True, add_special_tokens=False,
                 return_tensors="pt")
    for k in ("input_ids", "attention_mask", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"):
        t[f"batch.{k}"] = i64(batch[k])
    assert torch.equal(batch["pixel_values"], torch.cat([t[f"pixel_values.{n}"] for n, _ in BATCH]))
    t["batch.logits"] = model(**model_inputs(batch)).logits.float()

    # text only: no image -> no cross_attention_mask, HF skips the cross-attention layers
    text_only = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": TEXT_ONLY_USER}]}],
                                         add_generation_prompt=True, tokenize=False, date_string=DATE_STRING)
    info["text_only_text"] = text_only
    enc = proc(text=text_only, add_special_tokens=False, return_tensors="pt")
    assert "cross_attention_mask" not in enc and "pixel_values" not in enc
    t["text.input_ids"] = i64(enc["input_ids"])
    t["text.logits"] = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    return t, info, min(margins)


def search_seed(proc, images):
    best = None
    for seed in range(BASE_SEED, BASE_SEED + SEED_TRIES):
        model, gates = build_model(seed)
        t, info, margin = compute_forward(model, proc, images)
        gens = [t[f"generate.{n}_ids"][0].tolist() for n in IMAGES]
        varied = len({x for g in gens for x in g}) >= 5 and len({tuple(g) for g in gens}) == len(gens) \
            and all(len(set(g)) >= 3 for g in gens)
        if not varied:
            log(f"  seed {seed}: degenerate greedy generations {gens}, retrying")
            continue
        if best is None or margin > best[4]:
            best = (seed, model, t, info, margin, gates)
        if margin >= TARGET_MARGIN:
            return best
        log(f"  seed {seed}: min greedy margin {margin:.3g} < {TARGET_MARGIN}, retrying")
    if best is not None and best[4] > MIN_MARGIN:
        return best
    raise RuntimeError("no seed with a sufficient greedy margin")


@torch.no_grad()
def manual_greedy(model, ids, pv, ari, arm, cam, n):
    """Greedy decoding without KV cache (full recompute); cross mask extended with its last row, like HF."""
    out = []
    for _ in range(n):
        lg = model(input_ids=ids, pixel_values=pv, aspect_ratio_ids=ari, aspect_ratio_mask=arm,
                   cross_attention_mask=cam, use_cache=False).logits[0, -1]
        nxt = int(lg.argmax())
        out.append(nxt)
        if nxt in EOS_IDS:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        cam = torch.cat([cam, cam[:, -1:]], dim=1)
    return out


def train_example(proc, t, images, chat_text):
    """prompt (train image) ++ continuation; labels -100 over the prompt."""
    cont = proc.tokenizer(CONTINUATION, add_special_tokens=False).input_ids
    prompt = t[f"input_ids.{TRAIN_IMAGE}"]
    L = prompt.shape[1]
    enc = proc(text=chat_text + CONTINUATION, images=[[images[TRAIN_IMAGE]]], add_special_tokens=False,
               return_tensors="pt")
    ids = i64(enc["input_ids"])
    assert ids[0, :L].tolist() == prompt[0].tolist() and ids[0, L:].tolist() == cont, "joint tokenization differs"
    cam = i64(enc["cross_attention_mask"])
    pc = t[f"cross_attention_mask.{TRAIN_IMAGE}"]
    assert torch.equal(cam[:, :L], pc) and torch.equal(cam[:, L:], pc[:, -1:].expand(-1, len(cont), -1, -1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, L:] = ids[0, L:]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": t[f"pixel_values.{TRAIN_IMAGE}"],
        "aspect_ratio_ids": t[f"aspect_ratio_ids.{TRAIN_IMAGE}"],
        "aspect_ratio_mask": t[f"aspect_ratio_mask.{TRAIN_IMAGE}"],
        "cross_attention_mask": cam,
    }, labels, cont, L


def image_inputs(t, name):
    return {
        "input_ids": t[f"input_ids.{name}"],
        "attention_mask": torch.ones_like(t[f"input_ids.{name}"]),
        "pixel_values": t[f"pixel_values.{name}"],
        "aspect_ratio_ids": t[f"aspect_ratio_ids.{name}"],
        "aspect_ratio_mask": t[f"aspect_ratio_mask.{name}"],
        "cross_attention_mask": t[f"cross_attention_mask.{name}"],
    }


@torch.no_grad()
def logits_check(model, t, label):
    for name in IMAGES:
        lg = model(**image_inputs(t, name)).logits
        d = (lg - t[f"logits.{name}"]).abs().max().item()
        assert d == 0.0, f"{label}: logits.{name} differ by {d}"
    b = {k: t[f"batch.{k}"] for k in ("input_ids", "attention_mask", "aspect_ratio_ids", "aspect_ratio_mask",
                                      "cross_attention_mask")}
    b["pixel_values"] = torch.cat([t[f"pixel_values.{n}"] for n, _ in BATCH])
    d = (model(**b).logits - t["batch.logits"]).abs().max().item()
    assert d == 0.0, f"{label}: batch.logits differ by {d}"
    d = (model(input_ids=t["text.input_ids"]).logits - t["text.logits"]).abs().max().item()
    assert d == 0.0, f"{label}: text.logits differ by {d}"
    log(f"  self-check OK ({label}): logits bit-identical")


def param_groups(model, cross_layers) -> dict[str, int]:
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    hidden = model.config.text_config.hidden_size

    def s(pred):
        return sum(p.numel() for n, p in named.items() if pred(n))

    cross_prefixes = tuple(f"model.language_model.layers.{i}." for i in cross_layers)
    g = {
        "total": total,
        "vision_model": s(lambda n: n.startswith("model.vision_model.")),
        "multi_modal_projector": s(lambda n: n.startswith("model.multi_modal_projector.")),
        "cross_attention_layers": s(lambda n: n.startswith(cross_prefixes)),
        "self_attention_layers": s(lambda n: n.startswith("model.language_model.layers.")
                                   and not n.startswith(cross_prefixes)),
        "embed_tokens": s(lambda n: n == "model.language_model.embed_tokens.weight"),
        "embed_tokens_extra_rows": 8 * hidden,
        "norm": s(lambda n: n == "model.language_model.norm.weight"),
        "lm_head": s(lambda n: n == "lm_head.weight"),
    }
    assert g["vision_model"] + g["multi_modal_projector"] + g["cross_attention_layers"] + \
        g["self_attention_layers"] + g["embed_tokens"] + g["norm"] + g["lm_head"] == total
    assert g["embed_tokens"] == (model.config.text_config.vocab_size + 8) * hidden
    g["fusion"] = g["cross_attention_layers"] + g["multi_modal_projector"] + g["embed_tokens_extra_rows"]
    g["vision_encoder"] = g["vision_model"]
    g["per_cross_attention_layer"] = g["cross_attention_layers"] // len(cross_layers)
    n_self = model.config.text_config.num_hidden_layers - len(cross_layers)
    g["per_self_attention_layer"] = g["self_attention_layers"] // n_self
    return g


# ------------------------------------------------------------------------- 11B
def check_11b() -> dict:
    """Parameter counts of Llama-3.2-11B-Vision-Instruct (meta device) per group.

    ``tests/fixtures/mllama-11b/{config.json,param_counts.json}`` belong to
    scripts/make_mllama_11b_fixture.py (read by tests/mllama_parity.rs); this script does not
    write them. It checks that the committed config.json carries the 11B's values (B11_VISION /
    B11_TEXT) and that the committed counts equal its own, and returns a finer breakdown for
    tiny-mllama.json."""
    cfg = MllamaConfig(vision_config=MllamaVisionConfig(**B11_VISION), text_config=MllamaTextConfig(**B11_TEXT),
                       image_token_index=128256, architectures=["MllamaForConditionalGeneration"],
                       torch_dtype="bfloat16")
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(cfg)
    counts = param_groups(model, cfg.text_config.cross_attention_layers)
    # the groups of tests/fixtures/mllama-11b/param_counts.json (lvlm-ift's layout groups)
    counts["cross_attention"] = counts["cross_attention_layers"]
    counts["language_model"] = counts["self_attention_layers"] + counts["norm"]
    out_dir = Path(B11_REL)
    result = {"counts": counts, "committed_config_matches": None, "committed_counts_match": None}
    if not (out_dir / "config.json").is_file():
        log(f"  note: {B11_REL}/config.json not found; nothing compared")
        return result
    back = MllamaConfig.from_pretrained(out_dir)
    mism = []
    for sub, want in (("text_config", B11_TEXT), ("vision_config", B11_VISION)):
        have = getattr(back, sub)
        for k, v in want.items():
            if k == "torch_dtype":
                got = str(getattr(have, "dtype", None) or getattr(have, "torch_dtype", None)).replace("torch.", "")
                hv = got if got != "None" else str(getattr(back, "dtype", "")).replace("torch.", "")
            else:
                hv = getattr(have, "attention_heads" if k == "num_attention_heads" and sub == "vision_config" else k)
            if hv != v:
                mism.append(f"{sub}.{k}: {hv!r} != {v!r}")
    if back.image_token_index != 128256 or back.architectures != ["MllamaForConditionalGeneration"]:
        mism.append("image_token_index / architectures")
    result["committed_config_matches"] = not mism
    assert not mism, f"{B11_REL}/config.json differs from the 11B values: {mism}"
    pc_path = out_dir / "param_counts.json"
    if pc_path.is_file():
        committed = json.loads(pc_path.read_text())
        bad = {k: (v, counts.get(k)) for k, v in committed.items() if counts.get(k) != v}
        result["committed_counts_match"] = not bad
        assert not bad, f"{pc_path} differs: {bad}"
    log(f"  {B11_REL}/config.json has the 11B values; param_counts.json agrees: {result['committed_counts_match']}")
    return result


# --------------------------------------------------------------------------- main
def main() -> None:
    check_versions()
    os.chdir(ROOT)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    for d in (MODEL_REL, ADAPTER_REL):
        if Path(d).exists():
            shutil.rmtree(d)
    for f in (f"{PARITY_REL}/{OUT_NAME}.safetensors", f"{PARITY_REL}/{OUT_NAME}.json"):
        if Path(f).exists():
            Path(f).unlink()
    Path(PARITY_REL).mkdir(parents=True, exist_ok=True)

    tpl_sha = hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    log(f"chat template sha256 {tpl_sha} ({len(CHAT_TEMPLATE)} chars)")

    # ------------------------------------------------------------- tokenizer + processor
    tok = build_tokenizer()
    log(f"tokenizer: {len(tok)} ids, vocab_size={VOCAB_SIZE}, bos={BOS_ID} eot={EOT_ID} pad={PAD_ID} "
        f"image={IMAGE_ID}")
    out_dir = Path(MODEL_REL)
    out_dir.mkdir(parents=True)
    make_processor(tok).save_pretrained(out_dir)
    proc_files = sorted(p.name for p in out_dir.iterdir())
    log(f"  processor.save_pretrained wrote: {proc_files}")
    assert (out_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    # like the hub's tokenizer_config.json, also carry the template there (identical text)
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    assert "chat_template" not in tc
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    proc = AutoProcessor.from_pretrained(out_dir)
    assert type(proc) is MllamaProcessor, type(proc)
    assert type(proc.image_processor) is MllamaImageProcessor, type(proc.image_processor)
    assert proc.chat_template == CHAT_TEMPLATE and proc.tokenizer.chat_template == CHAT_TEMPLATE
    assert proc.image_token_id == IMAGE_ID and proc.tokenizer.padding_side == "right"
    assert proc.image_processor.max_image_tiles == MAX_TILES

    images = {}
    for n, rel in IMAGES.items():
        im = Image.open(Path(FIX_REL) / rel)
        im.load()
        images[n] = im

    # ----------------------------------------------------------------------- model
    log("== tiny-mllama")
    seed, model, t, info, margin, gates = search_seed(proc, images)
    chat_text = info["chat_text"]
    log(f"  seed={seed} min greedy top1-top2 margin={margin:.4f}")
    log(f"  chat_text={chat_text!r}")
    log(f"  text_only={info['text_only_text']!r}")
    for n in IMAGES:
        log(f"  {n}: {info['images'][n]} generate={t[f'generate.{n}_ids'].tolist()}")
        man = manual_greedy(model, *(image_inputs(t, n)[k] for k in ("input_ids", "pixel_values", "aspect_ratio_ids",
                                                                      "aspect_ratio_mask", "cross_attention_mask")),
                            MAX_NEW_TOKENS)
        assert man == t[f"generate.{n}_ids"][0].tolist(), (n, man)
    log("  generate (KV cache) == full-recompute greedy with the cross mask's last row repeated")
    assert [info["images"][n]["aspect_ratio_id"] for n in IMAGES] == [1, 2, 3]
    assert [info["images"][n]["num_tiles"] for n in IMAGES] == [1, 2, 2]

    # HF semantics probes (recorded in the json)
    checks = {}
    with torch.no_grad():
        L = t["input_ids.small"].shape[1]
        img_pos = int((t["input_ids.small"][0] == IMAGE_ID).nonzero()[0, 0])
        no_img = model(input_ids=t["input_ids.small"]).logits
        checks["max_abs_logits_image_vs_no_image_before_image_token"] = \
            (no_img[0, :img_pos] - t["logits.small"][0, :img_pos]).abs().max().item()
        checks["max_abs_logits_image_vs_no_image_after_image_token"] = \
            (no_img[0, img_pos:] - t["logits.small"][0, img_pos:]).abs().max().item()
        # padded batch rows vs the unpadded single-sample forward
        n0 = int(t["batch.attention_mask"][0].sum())
        d = (t["batch.logits"][0, :n0] - t["logits.small"][0, :n0]).abs().max().item()
        checks["max_abs_batch_row0_valid_minus_single"] = d
        assert d < 1e-4, d
        # the padding tile's pixels matter for the 1-tile image (real patches attend to it)
        pv2 = t["pixel_values.small"].clone()
        pv2[:, :, 1] = 0.5
        inp = image_inputs(t, "small")
        inp["pixel_values"] = pv2
        checks["max_abs_logits_change_when_padding_tile_pixels_change"] = \
            (model(**inp).logits - t["logits.small"]).abs().max().item()
        assert torch.equal(t["pixel_values.small"][:, :, 1], torch.zeros_like(t["pixel_values.small"][:, :, 1]))
    log(f"  semantics probes: {checks}")

    # ----------------------------------------------------- score + training example
    inputs, labels, cont, Lp = train_example(proc, t, images, chat_text)
    t["score.continuation_ids"] = i64(cont)
    with torch.no_grad():
        lg = model(**inputs).logits.float()
    lp = torch.log_softmax(lg[0], dim=-1)
    tok_lp = torch.stack([lp[Lp - 1 + i, c] for i, c in enumerate(cont)])
    t["score.token_logprobs"] = tok_lp
    t["score.logprob"] = tok_lp.sum().reshape(1)
    t["train.input_ids"] = inputs["input_ids"]
    t["train.labels"] = labels
    t["train.cross_attention_mask"] = inputs["cross_attention_mask"]

    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs, labels=labels, use_cache=False)
    assert torch.equal(out.logits, lg), "train/eval logits differ"
    loss = out.loss
    keep = labels[0, 1:] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(lg[0, :-1][keep], labels[0, 1:][keep])
    assert abs(loss.item() - manual.item()) < 1e-6, (loss.item(), manual.item())
    assert abs(loss.item() + tok_lp.mean().item()) < 1e-5
    loss.backward()
    named = dict(model.named_parameters())
    t["train.loss"] = loss.detach().float().reshape(1)
    for n in GRAD_PARAMS:
        gr = named[n].grad
        assert gr is not None and torch.isfinite(gr).all() and gr.abs().max() > 0, f"no/zero grad for {n}"
        t[f"grad.{n}"] = gr.detach().clone()
    no_grad = sorted(n for n, p in named.items() if p.grad is None)
    emb_grad = named["model.language_model.embed_tokens.weight"].grad
    emb_rows = sorted(int(i) for i in (emb_grad.abs().sum(1) > 0).nonzero()[:, 0])
    assert emb_rows == sorted(set(inputs["input_ids"][0].tolist())), emb_rows
    log(f"  train loss {loss.item():.6f} over {int(keep.sum())} tokens; params without grad: {no_grad}")
    model.eval()
    model.zero_grad(set_to_none=True)

    # --------------------------------------------------------------- save + reload
    model.save_pretrained(out_dir, safe_serialization=True)
    sd = load_file(out_dir / "model.safetensors")
    saved_keys = sorted(sd)
    for k in saved_keys:
        assert (k.startswith(("language_model.model.", "vision_model.", "multi_modal_projector."))
                or k == "language_model.lm_head.weight"), f"unexpected key for hub 4.x layout: {k}"
    assert "language_model.lm_head.weight" in sd and "language_model.model.embed_tokens.weight" in sd
    assert len(saved_keys) == len(named)
    with safe_open(out_dir / "model.safetensors", "pt") as f:
        st_meta = f.metadata()
    log(f"  save_pretrained wrote the hub 4.x layout ({len(saved_keys)} tensors, metadata {st_meta})")
    reloaded = MllamaForConditionalGeneration.from_pretrained(MODEL_REL, attn_implementation="eager").eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.language_model.embed_tokens.weight.data_ptr()
    logits_check(reloaded, t, "from_pretrained")
    files_cfg = json.loads((out_dir / "config.json").read_text())

    # ------------------------------------------------------------------------ LoRA
    log("== LoRA")
    base = MllamaForConditionalGeneration.from_pretrained(MODEL_REL, attn_implementation="eager").eval()
    torch.manual_seed(LORA_INIT_SEED)
    pm = get_peft_model(base, LoraConfig(**LORA))
    lora_params = {}
    for n, p in pm.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            assert ".default." in n and p.requires_grad, n
            lora_params[n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = p
        else:
            assert not p.requires_grad, f"non-LoRA parameter is trainable: {n}"
    lora_names = sorted(lora_params)
    assert lora_names == sorted(get_peft_model_state_dict(pm)), "named_parameters and PEFT's state dict disagree"
    lora_modules = sorted({n.rsplit(".lora_", 1)[0] for n in lora_names})
    log(f"  LoRA on {len(lora_modules)} modules ({len(lora_names)} tensors)")
    for n in lora_names:
        assert torch.count_nonzero(lora_params[n]) == lora_params[n].numel(), f"{n} has zeros"
    pm.save_pretrained(ADAPTER_REL)
    adir = Path(ADAPTER_REL)
    if (adir / "README.md").exists():
        (adir / "README.md").unlink()
    acfg = json.loads((adir / "adapter_config.json").read_text())
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    write_json(adir / "adapter_config.json", acfg)
    assert sorted(p.name for p in adir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(adir / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        file_names = sorted(f.keys())
        for n in file_names:
            assert torch.equal(f.get_tensor(n), lora_params[n].detach()), n
    assert file_names == lora_names, (file_names[:3], lora_names[:3])

    with torch.no_grad():
        t["lora.logits"] = pm(**image_inputs(t, TRAIN_IMAGE)).logits.float()
    pm.train()
    out = pm(**inputs, labels=labels, use_cache=False)
    out.loss.backward()
    t["lora.loss"] = out.loss.detach().float().reshape(1)
    lora_no_grad = []
    for n in lora_names:
        gr = lora_params[n].grad
        if gr is None or gr.abs().max() == 0:
            lora_no_grad.append(n)
        else:
            t[f"lora.grad.{n}"] = gr.detach().clone()
    assert not lora_no_grad, f"LoRA params without grad: {lora_no_grad}"
    pm.eval()
    base_diff = (t["lora.logits"] - t[f"logits.{TRAIN_IMAGE}"]).abs().max().item()
    log(f"  lora loss {out.loss.item():.6f}; max |lora - base| logits {base_diff:.3e}")
    assert base_diff > 1e-2
    with torch.no_grad():
        re_pm = PeftModel.from_pretrained(
            MllamaForConditionalGeneration.from_pretrained(MODEL_REL, attn_implementation="eager").eval(),
            ADAPTER_REL).eval()
        re_lg = re_pm(**image_inputs(t, TRAIN_IMAGE)).logits
        assert torch.equal(re_lg, t["lora.logits"]), "reloaded adapter does not reproduce lora.logits"
        merged = re_pm.merge_and_unload()
        assert type(merged) is MllamaForConditionalGeneration
        assert not any("lora" in k for k in merged.state_dict())
        t["merged.logits"] = merged(**image_inputs(t, TRAIN_IMAGE)).logits.float()
    merge_diff = (t["merged.logits"] - t["lora.logits"]).abs().max().item()
    log(f"  max |merged - lora| logits {merge_diff:.3e}")
    assert merge_diff < 1e-4

    # ------------------------------------------------------------------------- 11B
    log("== Llama-3.2-11B-Vision-Instruct parameter counts (meta device)")
    b11 = check_11b()
    counts_11b = b11["counts"]
    for k, v in counts_11b.items():
        log(f"  {k:28s} {v:>14,d}")

    # ----------------------------------------------------------------------- write
    tiny_counts = param_groups(model, model.config.text_config.cross_attention_layers)
    tensors = contig(t)
    save_file(tensors, f"{PARITY_REL}/{OUT_NAME}.safetensors", metadata={"format": "pt"})
    vc, txc = model.config.vision_config, model.config.text_config
    meta = {
        "model_dir": MODEL_REL,
        "adapter_dir": ADAPTER_REL,
        "layout": "transformers-4.x hub (single model.safetensors, as written by 4.57 save_pretrained): "
                  "language_model.model.*, language_model.lm_head.weight, vision_model.*, multi_modal_projector.*",
        "checkpoint_keys": saved_keys,
        "seed": seed,
        "min_greedy_margin": round(margin, 6),
        "config": files_cfg,
        "gates": gates,
        "tokenizer": {
            "vocab_size": VOCAB_SIZE, "len_tokenizer": len(tok), "n_regular": N_REGULAR,
            "special_tokens": {s: SB + i for i, s in enumerate(SPECIALS)}, "image_token": IMAGE_TOKEN,
            "image_token_id": IMAGE_ID, "bos_token_id": BOS_ID, "eos_token": "<|eot_id|>", "eos_token_id": EOT_ID,
            "pad_token_id": PAD_ID, "generation_eos_token_ids": EOS_IDS, "padding_side": "right",
            "notes": ["Llama 3 split regex + ByteLevel(use_regex=False), BPE ignore_merges=true, "
                      "post_processor Sequence[ByteLevel(trim_offsets=False), TemplateProcessing(<|begin_of_text|> $A)]",
                      "special tokens at ids vocab_size-16.. with Llama 3.1's relative offsets; <|image|> = vocab_size"],
        },
        "chat_template": {
            "source": "official Llama-3.2-11B-Vision-Instruct template (copy in swift-jinja tests "
                      "`llama3_2visionChatTemplate`, identical to NeMo's MLlamaTemplateConfig copy)",
            "sha256": tpl_sha,
            "files": ["tiny-mllama/chat_template.jinja (written by MllamaProcessor.save_pretrained in 4.57)",
                      "tiny-mllama/tokenizer_config.json \"chat_template\" (added, like the hub; identical)"],
            "date_string": DATE_STRING,
        },
        "prompts": {
            "user_text": USER_TEXT,
            "chat_text": chat_text,
            "raw": RAW_PROMPT,
            "batch": [{"image": n, "user_text": q} for n, q in BATCH],
            "batch_texts": info["batch_texts"],
            "text_only_user": TEXT_ONLY_USER,
            "text_only_text": info["text_only_text"],
            "continuation": CONTINUATION,
            "train_image": TRAIN_IMAGE,
        },
        "images": info["images"],
        "image_processor": {"size": {"height": TILE, "width": TILE}, "max_image_tiles": MAX_TILES, "resample": 2,
                            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "rescale_factor": 1 / 255,
                            "supported_aspect_ratios_hw": ASPECT_RATIOS},
        "processor": {
            "add_special_tokens": False,
            "double_bos_ids_if_add_special_tokens": info["double_bos_ids_if_add_special_tokens"],
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_ids": EOS_IDS,
        "image_token_id": IMAGE_ID,
        "bos_token_id": BOS_ID,
        "pad_token_id": PAD_ID,
        "vocab_size": VOCAB_SIZE,
        "num_vision_tokens_per_tile": (vc.image_size // vc.patch_size) ** 2 + 1,
        "vision_padded_tokens_per_tile": ((vc.image_size // vc.patch_size) ** 2 + 1 + 7) // 8 * 8,
        "train": {
            "prompt_len": Lp, "continuation_len": len(cont), "seq_len": int(inputs["input_ids"].shape[1]),
            "num_loss_tokens": int(keep.sum()), "loss": loss.item(),
            "labels": "-100 over the prompt, token ids over the continuation (which ends with <|eot_id|>)",
            "attention_mask": "all ones (not stored)",
            "pixel_values / aspect_ratio_*": f"those of {TRAIN_IMAGE}",
            "loss_definition": "HF ForCausalLMLoss: mean over t with labels[t+1] != -100 of "
                               "-log_softmax(logits[t])[labels[t+1]]",
            "params_without_grad": no_grad,
            "embed_tokens_grad_rows": emb_rows,
            "grad_params": GRAD_PARAMS,
        },
        "lora": {
            "config": {**{k: v for k, v in LORA.items()}, "scaling": LORA["lora_alpha"] / LORA["r"]},
            "init": f"init_lora_weights=False (nn.Linear default kaiming-uniform for A and B) after "
                    f"torch.manual_seed({LORA_INIT_SEED}); exact values in {ADAPTER_REL}/adapter_model.safetensors",
            "modules": lora_modules,
            "params": lora_names,
            "loss": t["lora.loss"].item(),
            "max_abs_lora_minus_base_logits": base_diff,
            "max_abs_merged_minus_lora_logits": merge_diff,
            "adapter_files_notes": ["README.md model card removed", "target_modules sorted (PEFT writes a set)"],
        },
        "param_counts": tiny_counts,
        "param_counts_11b": counts_11b,
        "param_counts_11b_checks": {k: v for k, v in b11.items() if k != "counts"},
        "param_counts_notes": [
            "sum(p.numel()) over MllamaForConditionalGeneration(config).named_parameters() (11B: on the meta "
            "device), transformers 4.57.1 in-memory names",
            "vision_model = vision_encoder = model.vision_model.*; multi_modal_projector = model.multi_modal_projector.*",
            "cross_attention_layers = cross_attention = model.language_model.layers.{i}.* for i in "
            "cross_attention_layers; self_attention_layers = the other decoder layers",
            "embed_tokens = (vocab_size + 8) x hidden; embed_tokens_extra_rows = 8 x hidden (rows vocab_size.., "
            "<|image|> = vocab_size); norm = model.language_model.norm.weight; lm_head = vocab_size x hidden "
            "(not tied)",
            "fusion = cross_attention_layers + multi_modal_projector + embed_tokens_extra_rows; language_model "
            "(11B only, as in tests/fixtures/mllama-11b/param_counts.json) = self_attention_layers + norm",
            "11B config values: B11_TEXT / B11_VISION in scripts/make_mllama_fixtures.py, checked against "
            "tests/fixtures/mllama-11b/config.json",
        ],
        "parameters": [[n, list(p.shape)] for n, p in model.named_parameters()],
        "checks": checks,
        "tensors": {
            "pixel_values.<img>": "[1, 1, max_tiles=2, 3, 28, 28] f32 (padding tiles are exact zeros)",
            "aspect_ratio_ids.<img>": "[1, 1] i64 (1=(1,1), 2=(1,2) h x w tiles, 3=(2,1))",
            "aspect_ratio_mask.<img>": "[1, 1, 2] i64",
            "num_tiles.<img>": "[1] i64",
            "input_ids.<img>": "[1, L] i64 chat prompt (add_special_tokens=False; same ids for every image)",
            "cross_attention_mask.<img>": "[1, L, 1, 2] i64 from the processor",
            "logits.<img>": "[1, L, vocab] f32",
            "vision.<img>": "[1, 1, 2, 17, vision_output_dim=72] f32: vision_model(...).last_hidden_state "
                            "= cat(global output, intermediate states interleaved (stack dim=-1 then flatten))",
            "cross_states.<img>": "[num_tiles_total=2, 17, text_hidden=32] f32: multi_modal_projector(vision)"
                                  ".reshape(-1, 17, hidden) as HF computes it",
            "generate.<img>_ids": "[1, n<=8] i64 greedy new tokens (KV cache), eos kept if produced",
            "input_ids.raw / cross_attention_mask.raw": "RAW_PROMPT via the processor with default "
                                                        "add_special_tokens (BOS inserted after the leading image)",
            "batch.*": "2 samples (images small, photo), right padded with pad_token_id; input_ids, "
                       "attention_mask, aspect_ratio_ids [2,1], aspect_ratio_mask [2,1,2], cross_attention_mask "
                       "[2,Lmax,1,2], logits [2,Lmax,vocab] (pad positions included); pixel_values not stored: "
                       "= cat(pixel_values.small, pixel_values.photo) [2,1,2,3,28,28]",
            "text.input_ids / text.logits": "text-only chat prompt (system block, date_string fixed); no "
                                            "pixel_values / cross_attention_mask: HF skips the cross layers",
            "score.continuation_ids": "[C] i64 tokenizer(CONTINUATION, add_special_tokens=False)",
            "score.token_logprobs": "[C] f32: log_softmax(logits(train.input_ids)[L-1+i])[cont[i]], natural log",
            "score.logprob": "[1] f32 sum",
            "train.input_ids / train.labels / train.cross_attention_mask": "[1, S] / [1, S] / [1, S, 1, 2]",
            "train.loss": "[1] f32",
            "grad.<param>": "f32 d train.loss / d param, in-memory 4.57 names",
            "lora.logits": "[1, L, vocab] f32 LoRA model on input_ids.<train_image>",
            "lora.loss": "[1] f32 LoRA model, train batch",
            "lora.grad.<adapter name>": "f32, adapter-file names base_model.model.<module>.lora_{A,B}.weight",
            "merged.logits": "[1, L, vocab] f32 merge_and_unload() on input_ids.<train_image>",
        },
        "versions": INSTALLED,
        "notes": [
            "attention: eager, float32, CPU, single thread, deterministic algorithms",
            "images are read from tests/fixtures/images (small 1 tile, photo 2 tiles side by side, gray8 2 tiles "
            "stacked); resize (PIL bilinear) to fit the canvas keeping aspect ratio, zero-pad bottom/right BEFORE "
            "rescale/normalize (padded pixels become -mean/std), split into tiles row-major; padding tiles up to "
            "max_image_tiles are exact zeros (after normalization)",
            "mode L / RGBA images: MllamaImageProcessor's convert_to_rgb composites on white via RGBA",
            "cross_attention_mask: 0 for tokens before the first <|image|>, 1 from the image token on (through "
            "padding positions), only for the image's real tiles",
            "HF zeroes only the MLP branch of a cross-attention layer for text rows with no visible tile "
            "(full_text_row_masked_out_mask); the attention branch of such rows attends uniformly to all vision "
            "tokens (masked-out row of finfo.min multiplied by 0), so tokens before <|image|> ARE changed by the "
            "image (see checks); Meta's reference multiplies the attention output by the row mask too",
            "vision encoder: 17 positions per tile padded with zeros to 24 (after layernorm_pre); local and "
            "global transformers attend across all tiles jointly; the mask only blocks (padding query, padding "
            "key) pairs (padding = pad positions + padding tiles), so real positions attend to padding ones",
            "intermediate_layers_indices index the outputs of local layers (0 = after the first layer)",
            "position ids: arange(seq) in forward (also with right padding); generate derives them from "
            "attention_mask",
            "text-only inputs skip the cross-attention layers entirely",
            "embed_tokens has padding_idx = pad_token_id: its gradient row is always zero",
            "generation_config.json mirrors the 11B instruct one (do_sample true, temperature 0.6, top_p 0.9); "
            "the fixtures pass do_sample=False",
        ],
    }
    write_json(Path(PARITY_REL) / f"{OUT_NAME}.json", meta)

    total = 0
    log("== files")
    files = sorted(p for d in (MODEL_REL, ADAPTER_REL) for p in Path(d).iterdir()) + [
        Path(PARITY_REL) / f"{OUT_NAME}.safetensors", Path(PARITY_REL) / f"{OUT_NAME}.json"]
    for p in files:
        sz = p.stat().st_size
        total += sz
        log(f"  {p}  {sz}  {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")
    log(f"TOTAL new: {total} bytes ({total / 1024:.1f} KiB)")
    assert total < MAX_NEW_BYTES, "mllama fixtures exceed 1 MiB"


if __name__ == "__main__":
    main()
