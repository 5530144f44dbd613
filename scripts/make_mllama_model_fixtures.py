#!/usr/bin/env python3
"""Model-level HF parity fixtures for the Llama-3.2-Vision family (MllamaForConditionalGeneration).

Purpose
-------
A tiny random ``MllamaForConditionalGeneration`` (2 self-attention + 2 gated cross-attention text
layers with GQA and llama3 RoPE; a vision encoder with 3 local + 1 gated global layer, 28 px tiles
of 7 px patches, so 17 tokens per tile padded to 24 by HF, 2 tiles max, intermediate layers [0, 2])
with every parameter -- the tanh gates included, which HF initialises to 0 -- drawn at random so
every path matters. Inputs are given as tensors (no tokenizer, no image processor): a batch with a
2-tile and a 1-tile image (one padding tile), text before the image token (rows that see no
image), a text-only prompt, greedy generation, and one training step's gradients.

Writes (deterministic, CPU, float32, eager attention)::

    tests/fixtures/mllama-model/{config.json,generation_config.json,model.safetensors}
        the checkpoint as transformers 4.57 saves it (hub key layout ``language_model.model.*``,
        ``vision_model.*``, ``multi_modal_projector.*``, ``language_model.lm_head.*``)
    tests/fixtures/parity/mllama-model.safetensors
        ids [2, 8], pv [2, 2, 3, 28, 28], ar_ids [2], ar_mask [2, 2], num_tiles [2],
        cross_mask [2, 8, 1, 2] (HF's cross_attention_mask), logits [2, 8, 64], vision (the
        vision encoder's output) [2, 2, 17, 48], text_ids [1, 5], text_logits [1, 5, 64],
        gen [6] (greedy new ids of sample 0), labels [2, 8], loss [], grad.<in-memory name>

    tests/fixtures/mllama-11b/config.json
        Llama-3.2-11B-Vision-Instruct's config (the values of its hub config.json), so plans and
        shapes of the real model can be checked without its 20 GB of weights
    tests/fixtures/mllama-11b/param_counts.json
        parameter counts of that config as transformers reports them (the model instantiated on
        the meta device): total and per group

Pinned versions: see scripts/requirements-fixtures.txt (torch 2.5.1, transformers 4.57.1).

How to run, from the repository root::

    python scripts/make_mllama_model_fixtures.py
"""

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import MllamaConfig, MllamaForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "tests/fixtures/mllama-model"
EXPECTED = ROOT / "tests/fixtures/parity/mllama-model.safetensors"

GRADS = [
    "model.vision_model.class_embedding",
    "model.vision_model.patch_embedding.weight",
    "model.vision_model.gated_positional_embedding.gate",
    "model.vision_model.gated_positional_embedding.tile_embedding.weight",
    "model.vision_model.pre_tile_positional_embedding.embedding.weight",
    "model.vision_model.post_tile_positional_embedding.gate",
    "model.vision_model.layernorm_pre.weight",
    "model.vision_model.transformer.layers.0.self_attn.q_proj.weight",
    "model.vision_model.global_transformer.layers.0.gate_attn",
    "model.vision_model.global_transformer.layers.0.mlp.fc1.weight",
    "model.multi_modal_projector.weight",
    "model.language_model.layers.1.cross_attn.q_proj.weight",
    "model.language_model.layers.1.cross_attn.k_norm.weight",
    "model.language_model.layers.1.cross_attn_attn_gate",
    "model.language_model.layers.3.cross_attn_mlp_gate",
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.language_model.embed_tokens.weight",
    "lm_head.weight",
]


ELEVEN_B = dict(
    architectures=["MllamaForConditionalGeneration"],
    image_token_index=128256,
    torch_dtype="bfloat16",
    text_config=dict(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], pad_token_id=128004,
    ),
    vision_config=dict(
        hidden_size=1280, image_size=560, patch_size=14, num_hidden_layers=32,
        num_global_layers=8, attention_heads=16, intermediate_size=5120,
        intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680, max_num_tiles=4,
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        norm_eps=1e-5, num_channels=3,
    ),
)


def eleven_b() -> None:
    import json
    out = ROOT / "tests/fixtures/mllama-11b"
    out.mkdir(parents=True, exist_ok=True)
    cfg = MllamaConfig(**{k: v for k, v in ELEVEN_B.items() if k != "architectures"})
    cfg.architectures = ELEVEN_B["architectures"]
    cfg.save_pretrained(out)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(cfg)
    named = dict(model.named_parameters())
    count = lambda keep: sum(p.numel() for n, p in named.items() if keep(n))
    cross = [f"model.language_model.layers.{i}." for i in cfg.text_config.cross_attention_layers]
    self_layers = [f"model.language_model.layers.{i}." for i in range(40)
                   if i not in cfg.text_config.cross_attention_layers]
    extra_rows = 8 * cfg.text_config.hidden_size
    counts = {
        "total": count(lambda n: True),
        "vision_encoder": count(lambda n: n.startswith("model.vision_model.")),
        "multi_modal_projector": count(lambda n: n.startswith("model.multi_modal_projector.")),
        "cross_attention": count(lambda n: any(n.startswith(c) for c in cross)),
        "fusion": count(lambda n: any(n.startswith(c) for c in cross)
                        or n.startswith("model.multi_modal_projector.")) + extra_rows,
        "language_model": count(lambda n: any(n.startswith(c) for c in self_layers)
                                or n.startswith("model.language_model.norm.")),
        "embed_tokens": count(lambda n: n.startswith("model.language_model.embed_tokens.")),
        "lm_head": count(lambda n: n.startswith("lm_head.")),
    }
    (out / "param_counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    print("11B parameter counts", counts)


def main() -> None:
    if transformers.__version__ != "4.57.1" or not torch.__version__.startswith("2.5.1"):
        print(f"warning: pinned torch 2.5.1 / transformers 4.57.1, found {torch.__version__} / "
              f"{transformers.__version__}")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = MllamaConfig(
        vision_config=dict(
            hidden_size=16, num_hidden_layers=3, num_global_layers=1, attention_heads=2,
            intermediate_size=32, vision_output_dim=48, image_size=28, patch_size=7,
            max_num_tiles=2, intermediate_layers_indices=[0, 2],
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], norm_eps=1e-5,
        ),
        text_config=dict(
            vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, cross_attention_layers=[1, 3],
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
        image_token_index=64,
    )
    cfg._attn_implementation = "eager"
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.numel() == 1 else 0.2))
    model.save_pretrained(MODEL_DIR, safe_serialization=True)

    ids = torch.tensor([[1, 2, 64, 5, 6, 7, 8, 9], [3, 64, 10, 11, 12, 13, 14, 15]])
    pv = torch.randn(2, 1, 2, 3, 28, 28)
    pv[1, 0, 1] = 0  # sample 1 has one real tile and a zero padding tile
    ar_ids = torch.tensor([[2], [1]])
    ar_mask = torch.tensor([[[1, 1]], [[1, 0]]])
    num_tiles = torch.tensor([2, 1])
    # As MllamaProcessor builds it: from the image token to the end, real tiles only.
    cross = torch.zeros(2, 8, 1, 2, dtype=torch.long)
    cross[0, 2:, 0, :2] = 1
    cross[1, 1:, 0, :1] = 1
    inputs = dict(input_ids=ids, pixel_values=pv, aspect_ratio_ids=ar_ids,
                  aspect_ratio_mask=ar_mask, cross_attention_mask=cross)
    with torch.no_grad():
        logits = model(**inputs).logits
        vision = model.model.vision_model(pixel_values=pv, aspect_ratio_ids=ar_ids,
                                          aspect_ratio_mask=ar_mask).last_hidden_state
        text_ids = torch.tensor([[1, 2, 3, 4, 5]])
        text_logits = model(input_ids=text_ids).logits
        gen = model.generate(**{k: v[:1] for k, v in inputs.items()}, max_new_tokens=6,
                             do_sample=False)[0, ids.shape[1]:]
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(**inputs, labels=labels)
    out.loss.backward()
    params = dict(model.named_parameters())
    tensors = {
        "ids": ids, "pv": pv[:, 0], "ar_ids": ar_ids[:, 0], "ar_mask": ar_mask[:, 0],
        "num_tiles": num_tiles, "cross_mask": cross, "logits": logits, "vision": vision[:, 0],
        "text_ids": text_ids, "text_logits": text_logits, "gen": gen, "labels": labels,
        "loss": out.loss.detach(),
    }
    for name in GRADS:
        tensors[f"grad.{name}"] = params[name].grad
    EXPECTED.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, EXPECTED,
              metadata={"format": "pt"})
    print("greedy", gen.tolist(), "loss", float(out.loss))
    top2 = logits.topk(2, dim=-1).values
    print("min top-1/top-2 margin", float((top2[..., 0] - top2[..., 1]).min()))


if __name__ == "__main__":
    main()
    eleven_b()
