#!/usr/bin/env python3
"""The 11B's config and transformers' parameter counts for it (tests/fixtures/mllama-11b/).

Purpose
-------
Plans and shapes of Llama-3.2-11B-Vision-Instruct are checked without its 20 GB of weights:
lvlm-ift computes every parameter shape from ``config.json`` alone, and the test
``tests/mllama_parity.rs`` compares its per-group counts with what transformers reports for the
same config, the model instantiated on the meta device.

Writes::

    tests/fixtures/mllama-11b/config.json
        the values of the hub's config.json (as transformers 4.57 writes a config)
    tests/fixtures/mllama-11b/param_counts.json
        total and per-group parameter counts (groups as lvlm-ift names them: vision_encoder,
        fusion = cross-attention layers + projector + the 8 extra embedding rows, language_model
        = self-attention layers + final norm, cross_attention, multi_modal_projector,
        embed_tokens, lm_head)

The tiny Mllama parity fixtures come from scripts/make_mllama_fixtures.py, which checks these
files too. Pinned versions: see scripts/requirements-fixtures.txt (torch 2.5.1, transformers
4.57.1). Run from the repository root::

    python scripts/make_mllama_11b_fixture.py
"""

from pathlib import Path

import torch
import transformers
from transformers import MllamaConfig, MllamaForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
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


if __name__ == "__main__":
    if transformers.__version__ != "4.57.1" or not torch.__version__.startswith("2.5.1"):
        print(f"warning: pinned torch 2.5.1 / transformers 4.57.1, found {torch.__version__} / "
              f"{transformers.__version__}")
    eleven_b()
