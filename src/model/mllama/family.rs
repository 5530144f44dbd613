//! Llama-3.2-Vision at the family boundary: key layouts, module groups (`vision_encoder`,
//! `fusion`, `language_model`, …), parameter shapes from `config.json` alone, the weights HF
//! keeps but never runs, and the image processor.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::MllamaConfig;
use super::MllamaModel;
use crate::data::processor::{
    ImageProcessor, MllamaImageProcessor, MllamaProcessorConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
};
use crate::data::prompt::PromptDefaults;
use crate::error::{Error, Result};
use crate::model::activation_profile::{ActivationProfile, LayerKind, LayerStack, StackTokens};
use crate::model::family::{
    ImageOptions, LinearModule, LoadOptions, ModelFamily, ModelLayout, ModuleGroup, RowSlice,
};
use crate::model::weights::{KeyMap, WeightStore};
use crate::model::VisionLanguageModel;

pub struct MllamaFamily;

const VISION: &str = "model.vision_model";
const PROJECTOR: &str = "model.multi_modal_projector";
const TEXT: &str = "model.language_model";

impl ModelFamily for MllamaFamily {
    fn name(&self) -> &'static str {
        "mllama"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["MllamaForConditionalGeneration"]
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["mllama"]
    }

    fn key_map(&self) -> KeyMap {
        canonical_name
    }

    fn prompt_defaults(&self) -> PromptDefaults {
        PromptDefaults::MLLAMA
    }

    fn layout(&'static self, dir: &Path) -> Result<ModelLayout> {
        let cfg = MllamaConfig::from_file(&dir.join("config.json"))?;
        let params = param_shapes(&cfg);
        let linear_modules = params
            .iter()
            .filter(|(n, s)| s.len() == 2 && is_linear_weight(n))
            .map(|(n, s)| {
                let m = LinearModule {
                    in_dim: s[1],
                    out_dim: s[0],
                    runs: true,
                };
                (n.trim_end_matches(".weight").to_string(), m)
            })
            .collect();
        let unrun = params
            .keys()
            .filter(|n| is_unused_weight(&cfg, n))
            .cloned()
            .collect();
        Ok(ModelLayout {
            family: self,
            dir: dir.to_path_buf(),
            params,
            unrun,
            linear_modules,
            groups: groups(&cfg),
            hidden_size: cfg.text.hidden_size,
            vocab_size: cfg.text.vocab_size,
            max_positions: cfg.text.max_position_embeddings,
            image_token_id: cfg.image_token_id,
            num_image_tokens: 1,
        })
    }

    fn load(
        &self,
        dir: &Path,
        opts: LoadOptions,
    ) -> Result<(Box<dyn VisionLanguageModel>, WeightStore)> {
        let (model, store) = MllamaModel::load(dir, opts)?;
        Ok((Box::new(model), store))
    }

    fn image_processor(&self, layout: &ModelLayout, opts: &ImageOptions) -> Result<ImageProcessor> {
        let cfg = MllamaConfig::from_file(&layout.config_path())?;
        let v = &cfg.vision;
        let mut pcfg = MllamaProcessorConfig::from_model_dir(&layout.dir)?;
        if pcfg.source.is_none() {
            // No processor settings next to config.json (e.g. a bare config for a dry run):
            // the released checkpoints' settings, sized by config.json.
            pcfg = MllamaProcessorConfig {
                tile_size: v.image_size,
                image_mean: OPENAI_CLIP_MEAN,
                image_std: OPENAI_CLIP_STD,
                max_image_tiles: v.max_num_tiles,
                ..pcfg
            };
        }
        let settings = pcfg
            .source
            .clone()
            .unwrap_or_else(|| layout.dir.join("preprocessor_config.json"));
        if pcfg.tile_size != v.image_size {
            return Err(Error::Config {
                path: settings,
                key: "size".into(),
                reason: format!(
                    "{} px tiles, but the vision encoder of {} takes {} px tiles",
                    pcfg.tile_size,
                    layout.config_path().display(),
                    v.image_size
                ),
            });
        }
        // Aspect-ratio ids index the grid list of the tile count the processor packs to; the
        // model's embeddings index its own list, so the two must agree beyond one tile.
        let tiles = opts.max_tiles.unwrap_or(pcfg.max_image_tiles);
        if tiles > 1 && tiles != v.max_num_tiles {
            let reason = format!(
                "{tiles} tiles: the vision encoder's aspect-ratio ids are those of \
                 max_num_tiles = {} (use 1 or {})",
                v.max_num_tiles, v.max_num_tiles
            );
            return Err(match opts.max_tiles {
                Some(_) => Error::Model(format!("max_image_tiles = {tiles}: {reason}")),
                None => Error::Config {
                    path: settings,
                    key: "max_image_tiles".into(),
                    reason,
                },
            });
        }
        let processor = MllamaImageProcessor::new(pcfg, opts.aspect, opts.max_tiles)?;
        Ok(ImageProcessor::Mllama(processor))
    }

    fn activation_profile(
        &self,
        layout: &ModelLayout,
        max_tiles: Option<usize>,
    ) -> Result<ActivationProfile> {
        let cfg = MllamaConfig::from_file(&layout.config_path())?;
        let (v, t) = (&cfg.vision, &cfg.text);
        // Every picture as the processor packs it, `max_image_tiles` tiles (the worst case: a
        // picture with fewer is padded with masked tiles to the batch's count); each tile's
        // patches and class token padded to a multiple of 8 in the encoder.
        let tiles = max_tiles.unwrap_or(v.max_num_tiles);
        let np = v.num_patches();
        let per_image = tiles * np.div_ceil(8) * 8;
        let vision = |name, prefix: &str, layers: usize, gated| LayerStack {
            name,
            layer_prefixes: (0..layers)
                .map(|i| format!("{VISION}.{prefix}layers.{i}."))
                .collect(),
            kind: LayerKind::MllamaVision { gated },
            hidden: v.hidden_size,
            intermediate: v.intermediate_size,
            heads: v.attention_heads,
            kv_dim: v.hidden_size,
            tokens: StackTokens::PerImage(per_image),
        };
        let layers = |cross: bool| -> Vec<String> {
            (0..t.num_hidden_layers)
                .filter(|i| cfg.is_cross_layer(*i) == cross)
                .map(|i| format!("{TEXT}.layers.{i}."))
                .collect()
        };
        let text = |name, kind, layer_prefixes| LayerStack {
            name,
            layer_prefixes,
            kind,
            hidden: t.hidden_size,
            intermediate: t.intermediate_size,
            heads: t.num_attention_heads,
            kv_dim: t.num_key_value_heads * t.head_dim,
            tokens: StackTokens::Text,
        };
        Ok(ActivationProfile {
            stacks: vec![
                vision("vision encoder", "transformer.", v.num_hidden_layers, false),
                vision(
                    "global vision encoder",
                    "global_transformer.",
                    v.num_global_layers,
                    true,
                ),
                text("self-attention layers", LayerKind::Decoder, layers(false)),
                text(
                    "cross-attention layers",
                    LayerKind::CrossAttention {
                        image_tokens: tiles * np,
                    },
                    layers(true),
                ),
            ],
            vision_prefix: format!("{VISION}."),
            text_hidden: t.hidden_size,
            vocab: t.vocab_size,
            projector: (v.vision_output_dim, t.hidden_size, tiles * np),
            vision_embedding: (
                15 * v.hidden_size
                    + v.num_channels * v.patch_size * v.patch_size
                    + 2 * v.vision_output_dim,
                per_image,
            ),
            cross_bias_tokens: tiles * np,
            vision_bias_positions: per_image,
            image_splice: false,
        })
    }
}

/// The groups `full.groups` may name for Llama-3.2-Vision. `fusion` is what the reference
/// recipe trains next to the vision encoder: the gated cross-attention layers, the projector and
/// the 8 embedding rows past the vocabulary (the `<|image|>` token's among them).
fn groups(cfg: &MllamaConfig) -> Vec<ModuleGroup> {
    let t = &cfg.text;
    let layer = |i: usize| format!("{TEXT}.layers.{i}.");
    let cross: Vec<String> = cfg
        .cross_attention_layers
        .iter()
        .map(|&i| layer(i))
        .collect();
    let self_layers: Vec<String> = (0..t.num_hidden_layers)
        .filter(|i| !cfg.is_cross_layer(*i))
        .map(layer)
        .collect();
    let embed = format!("{TEXT}.embed_tokens.weight");
    let extra_rows = RowSlice {
        weight: embed.clone(),
        start: t.vocab_size,
        end: t.vocab_size + MllamaConfig::EXTRA_EMBEDDINGS,
    };
    let mut fusion = cross.clone();
    fusion.push(format!("{PROJECTOR}."));
    let mut language = self_layers;
    language.push(format!("{TEXT}.norm."));
    vec![
        ModuleGroup::new(
            "vision_encoder",
            "the tiled vision encoder (local and global layers, tile embeddings)",
            vec![format!("{VISION}.")],
        ),
        ModuleGroup::new(
            "fusion",
            "the gated cross-attention layers, the projector and the 8 extra embedding rows",
            fusion,
        )
        .with_rows(vec![extra_rows.clone()]),
        ModuleGroup::new(
            "language_model",
            "the self-attention decoder layers and the final norm",
            language,
        ),
        ModuleGroup::new(
            "cross_attention",
            "the gated cross-attention layers only",
            cross,
        ),
        ModuleGroup::new(
            "multi_modal_projector",
            "the projector from vision features to the text model",
            vec![format!("{PROJECTOR}.")],
        ),
        ModuleGroup::new(
            "embed_tokens",
            "the whole token embedding table",
            vec![format!("{TEXT}.embed_tokens.")],
        ),
        ModuleGroup::new("lm_head", "the output head", vec!["lm_head.".into()]),
    ]
}

/// Map a checkpoint key of any supported layout to its canonical name (the in-memory names of
/// transformers >= 4.52, what PEFT adapters name): the hub layout `language_model.model.*`,
/// `vision_model.*`, `multi_modal_projector.*`, `language_model.lm_head.*`, and the layout
/// transformers 5 saves, which is the canonical one.
pub fn canonical_name(key: &str) -> Option<String> {
    if let Some(rest) = key.strip_prefix("language_model.model.") {
        return Some(format!("{TEXT}.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("language_model.lm_head.") {
        return Some(format!("lm_head.{rest}"));
    }
    if key.starts_with("lm_head.") {
        return Some(key.to_string());
    }
    let rest = key.strip_prefix("model.").unwrap_or(key);
    for part in ["language_model.", "vision_model.", "multi_modal_projector."] {
        if rest.starts_with(part) {
            return Some(format!("model.{rest}"));
        }
    }
    None
}

/// 2-D weights of linear layers (not the embedding tables of tokens, tiles and positions).
fn is_linear_weight(name: &str) -> bool {
    name.ends_with(".weight")
        && !name.ends_with("embed_tokens.weight")
        && !name.ends_with("embedding.weight")
}

/// Buffers HF may store, and the head when it is tied to the embeddings.
pub fn is_unused_weight(cfg: &MllamaConfig, name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || (cfg.text.tie_word_embeddings && name == "lm_head.weight")
}

/// Every parameter of HF's `MllamaForConditionalGeneration` for `cfg`, canonical name → shape.
pub fn param_shapes(cfg: &MllamaConfig) -> BTreeMap<String, Vec<usize>> {
    let mut p = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>| {
        p.insert(name, shape);
    };
    let v = &cfg.vision;
    let (h, i, np) = (v.hidden_size, v.intermediate_size, v.num_patches());
    let ar = v.max_aspect_ratio_id() + 1;
    add(
        format!("{VISION}.patch_embedding.weight"),
        vec![h, v.num_channels, v.patch_size, v.patch_size],
    );
    add(format!("{VISION}.class_embedding"), vec![h]);
    let g = format!("{VISION}.gated_positional_embedding");
    add(format!("{g}.embedding"), vec![np, h]);
    add(format!("{g}.gate"), vec![1]);
    add(
        format!("{g}.tile_embedding.weight"),
        vec![ar, v.max_num_tiles * np * h],
    );
    for t in [
        "pre_tile_positional_embedding",
        "post_tile_positional_embedding",
    ] {
        add(
            format!("{VISION}.{t}.embedding.weight"),
            vec![ar, v.max_num_tiles * h],
        );
        add(format!("{VISION}.{t}.gate"), vec![1]);
    }
    for n in ["layernorm_pre", "layernorm_post"] {
        add(format!("{VISION}.{n}.weight"), vec![h]);
        add(format!("{VISION}.{n}.bias"), vec![h]);
    }
    for (stack, n, gated) in [
        ("transformer", v.num_hidden_layers, false),
        ("global_transformer", v.num_global_layers, true),
    ] {
        for k in 0..n {
            let l = format!("{VISION}.{stack}.layers.{k}");
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                add(format!("{l}.self_attn.{proj}.weight"), vec![h, h]);
            }
            add(format!("{l}.mlp.fc1.weight"), vec![i, h]);
            add(format!("{l}.mlp.fc1.bias"), vec![i]);
            add(format!("{l}.mlp.fc2.weight"), vec![h, i]);
            add(format!("{l}.mlp.fc2.bias"), vec![h]);
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                add(format!("{l}.{norm}.weight"), vec![h]);
                add(format!("{l}.{norm}.bias"), vec![h]);
            }
            if gated {
                add(format!("{l}.gate_attn"), vec![1]);
                add(format!("{l}.gate_ffn"), vec![1]);
            }
        }
    }
    let t = &cfg.text;
    let (th, d) = (t.hidden_size, t.head_dim);
    add(format!("{PROJECTOR}.weight"), vec![th, v.vision_output_dim]);
    add(format!("{PROJECTOR}.bias"), vec![th]);
    add(
        format!("{TEXT}.embed_tokens.weight"),
        vec![t.vocab_size + MllamaConfig::EXTRA_EMBEDDINGS, th],
    );
    let (q, kv) = (t.num_attention_heads * d, t.num_key_value_heads * d);
    for k in 0..t.num_hidden_layers {
        let l = format!("{TEXT}.layers.{k}");
        let attn = if cfg.is_cross_layer(k) {
            add(format!("{l}.cross_attn.q_norm.weight"), vec![d]);
            add(format!("{l}.cross_attn.k_norm.weight"), vec![d]);
            add(format!("{l}.cross_attn_attn_gate"), vec![1]);
            add(format!("{l}.cross_attn_mlp_gate"), vec![1]);
            "cross_attn"
        } else {
            "self_attn"
        };
        for (proj, out, inp) in [
            ("q_proj", q, th),
            ("k_proj", kv, th),
            ("v_proj", kv, th),
            ("o_proj", th, q),
        ] {
            add(format!("{l}.{attn}.{proj}.weight"), vec![out, inp]);
        }
        for (proj, out, inp) in [
            ("gate_proj", t.intermediate_size, th),
            ("up_proj", t.intermediate_size, th),
            ("down_proj", th, t.intermediate_size),
        ] {
            add(format!("{l}.mlp.{proj}.weight"), vec![out, inp]);
        }
        add(format!("{l}.input_layernorm.weight"), vec![th]);
        add(format!("{l}.post_attention_layernorm.weight"), vec![th]);
    }
    add(format!("{TEXT}.norm.weight"), vec![th]);
    if !t.tie_word_embeddings {
        add("lm_head.weight".into(), vec![t.vocab_size, th]);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_and_transformers5_layouts_map_to_the_same_names() {
        for (k, canon) in [
            (
                "language_model.model.layers.3.cross_attn.q_proj.weight",
                "model.language_model.layers.3.cross_attn.q_proj.weight",
            ),
            (
                "model.language_model.layers.3.cross_attn.q_proj.weight",
                "model.language_model.layers.3.cross_attn.q_proj.weight",
            ),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("lm_head.weight", "lm_head.weight"),
            (
                "vision_model.global_transformer.layers.0.gate_attn",
                "model.vision_model.global_transformer.layers.0.gate_attn",
            ),
            (
                "model.vision_model.class_embedding",
                "model.vision_model.class_embedding",
            ),
            (
                "multi_modal_projector.bias",
                "model.multi_modal_projector.bias",
            ),
        ] {
            assert_eq!(canonical_name(k).as_deref(), Some(canon), "{k}");
        }
        assert_eq!(
            canonical_name("vision_tower.encoder.layers.0.fc1.weight"),
            None
        );
    }
}
