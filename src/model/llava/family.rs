//! LLaVA at the family boundary: key layouts, module groups, parameter shapes from
//! `config.json` alone, the weights HF keeps but LLaVA never runs, and its image processor.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;

use super::LlavaModel;
use crate::data::processor::{ClipImageProcessor, ClipProcessorConfig, ImageProcessor};
use crate::data::prompt::PromptDefaults;
use crate::error::{Error, Result};
use crate::model::activation_profile::{ActivationProfile, LayerKind, LayerStack, StackTokens};
use crate::model::config::LlavaConfig;
use crate::model::family::{
    ImageOptions, LinearModule, LoadOptions, ModelFamily, ModelLayout, ModuleGroup,
};
use crate::model::lora::LoraFactory;
use crate::model::weights::{KeyMap, WeightStore};
use crate::model::VisionLanguageModel;

pub struct LlavaFamily;

const VISION: &str = "model.vision_tower.vision_model";
const PROJECTOR: &str = "model.multi_modal_projector";
const TEXT: &str = "model.language_model";

impl ModelFamily for LlavaFamily {
    fn name(&self) -> &'static str {
        "llava"
    }

    /// CLIP's selected hidden states, before the projector (which may train).
    fn cached_vision_group(&self) -> Option<&'static str> {
        Some("vision_tower")
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["LlavaForConditionalGeneration"]
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["llava"]
    }

    fn key_map(&self) -> KeyMap {
        canonical_name
    }

    fn prompt_defaults(&self) -> PromptDefaults {
        PromptDefaults::LLAVA
    }

    fn layout(&'static self, dir: &Path) -> Result<ModelLayout> {
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let params = param_shapes(&cfg);
        let depth = feature_depth(&cfg);
        let linear_modules = params
            .iter()
            .filter(|(n, s)| s.len() == 2 && is_linear_weight(n))
            .map(|(n, s)| {
                let module = n.trim_end_matches(".weight").to_string();
                let runs = vision_layer_index(n).is_none_or(|i| i < depth);
                let m = LinearModule {
                    in_dim: s[1],
                    out_dim: s[0],
                    runs,
                };
                (module, m)
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
            unrun,
            params,
            linear_modules,
            groups: groups(),
            hidden_size: cfg.text.hidden_size,
            vocab_size: cfg.text.vocab_size,
            max_positions: cfg.text.max_position_embeddings,
            image_token_id: cfg.image_token_id,
            num_image_tokens: cfg.num_image_tokens(),
        })
    }

    fn load(
        &self,
        dir: &Path,
        opts: LoadOptions,
    ) -> Result<(Box<dyn VisionLanguageModel>, WeightStore)> {
        let (model, store) = LlavaModel::load(dir, opts)?;
        Ok((Box::new(model), store))
    }

    fn image_processor(&self, layout: &ModelLayout, opts: &ImageOptions) -> Result<ImageProcessor> {
        if let Some(n) = opts.max_tiles {
            return Err(Error::Model(format!(
                "max_image_tiles = {n}: LLaVA's CLIP processor does not tile images (the setting \
                 is for Llama-3.2-Vision)"
            )));
        }
        let aspect = opts.aspect;
        let cfg = LlavaConfig::from_file(&layout.config_path())?;
        let processor =
            ClipImageProcessor::new(ClipProcessorConfig::from_model_dir(&layout.dir)?, aspect)?;
        let want = (cfg.vision.image_size, cfg.vision.image_size);
        if processor.output_size() != want {
            return Err(Error::Config {
                path: layout.dir.join("preprocessor_config.json"),
                key: "crop_size".into(),
                reason: format!(
                    "the processor makes {:?} images but the vision tower expects {want:?}",
                    processor.output_size()
                ),
            });
        }
        Ok(ImageProcessor::Clip(processor))
    }

    fn activation_profile(
        &self,
        layout: &ModelLayout,
        _max_tiles: Option<usize>,
    ) -> Result<ActivationProfile> {
        let cfg = LlavaConfig::from_file(&layout.config_path())?;
        let (v, t) = (&cfg.vision, &cfg.text);
        let features = cfg.vision_feature_layers.len() * v.hidden_size;
        Ok(ActivationProfile {
            stacks: vec![
                LayerStack {
                    name: "vision tower",
                    // Only the layers up to the deepest one read run.
                    layer_prefixes: (0..feature_depth(&cfg))
                        .map(|i| format!("{VISION}.encoder.layers.{i}."))
                        .collect(),
                    kind: LayerKind::ClipEncoder,
                    hidden: v.hidden_size,
                    intermediate: v.intermediate_size,
                    heads: v.num_attention_heads,
                    kv_dim: v.hidden_size,
                    tokens: StackTokens::PerImage(v.num_patches() + 1),
                },
                LayerStack {
                    name: "language model",
                    layer_prefixes: (0..t.num_hidden_layers)
                        .map(|i| format!("{TEXT}.layers.{i}."))
                        .collect(),
                    kind: LayerKind::Decoder,
                    hidden: t.hidden_size,
                    intermediate: t.intermediate_size,
                    heads: t.num_attention_heads,
                    kv_dim: t.num_key_value_heads * t.head_dim,
                    tokens: StackTokens::Text,
                },
            ],
            vision_prefix: format!("{VISION}."),
            text_hidden: t.hidden_size,
            vocab: t.vocab_size,
            projector: (features, t.hidden_size, layout.num_image_tokens),
            vision_embedding: (
                4 * v.hidden_size + v.num_channels * v.patch_size * v.patch_size,
                v.num_patches() + 1,
            ),
            cross_bias_tokens: 0,
            vision_bias_positions: 0,
            image_splice: true,
        })
    }
}

/// The groups `full.groups` may name for LLaVA.
fn groups() -> Vec<ModuleGroup> {
    let g = |name, about, prefixes: &[&str]| {
        ModuleGroup::new(
            name,
            about,
            prefixes.iter().map(|p| format!("{p}.")).collect(),
        )
    };
    vec![
        g("vision_tower", "the CLIP vision tower", &[VISION]),
        g(
            "multi_modal_projector",
            "the MLP from CLIP features to the text model",
            &[PROJECTOR],
        ),
        g(
            "language_model",
            "the text decoder with its embeddings (not the head)",
            &[TEXT],
        ),
        g(
            "embed_tokens",
            "the token embeddings",
            &["model.language_model.embed_tokens"],
        ),
        g("lm_head", "the output head", &["lm_head"]),
    ]
}

/// LLaVA: map a checkpoint key of any supported layout to its canonical name; `None` for keys no
/// layout knows (reported as unexpected).
///
/// Canonical names are the in-memory module names of transformers >= 4.52
/// (`model.language_model.layers.0.self_attn.q_proj.weight`, `model.vision_tower.vision_model...`,
/// `model.multi_modal_projector...`, `lm_head.weight`), because those are what PEFT adapters name.
pub fn canonical_name(key: &str) -> Option<String> {
    // transformers 4.x hub layout and 5.x saved layout share the language-model prefix.
    if let Some(rest) = key.strip_prefix("language_model.model.") {
        return Some(format!("model.language_model.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("language_model.lm_head.") {
        return Some(format!("lm_head.{rest}"));
    }
    if key.starts_with("lm_head.") {
        return Some(key.to_string());
    }
    let rest = key.strip_prefix("model.").unwrap_or(key);
    if rest.starts_with("language_model.") || rest.starts_with("multi_modal_projector.") {
        return Some(format!("model.{rest}"));
    }
    if let Some(v) = rest.strip_prefix("vision_tower.") {
        // 5.x drops the `vision_model.` segment.
        let v = v.strip_prefix("vision_model.").unwrap_or(v);
        return Some(format!("model.vision_tower.vision_model.{v}"));
    }
    None
}

/// Number of CLIP layers LLaVA runs: up to the deepest feature layer.
fn feature_depth(cfg: &LlavaConfig) -> usize {
    cfg.feature_layer_indices().into_iter().max().unwrap_or(0)
}

fn vision_layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.vision_tower.vision_model.encoder.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
}

/// 2-D weights of linear layers (not embedding tables).
fn is_linear_weight(name: &str) -> bool {
    name.ends_with(".weight")
        && !name.ends_with("embed_tokens.weight")
        && !name.ends_with("position_embedding.weight")
}

/// Weights HF keeps but LLaVA never runs: the pooled-output norm, vision layers past the deepest
/// feature layer, buffers, and the head when it is tied to the embeddings.
pub fn is_unused_weight(cfg: &LlavaConfig, name: &str) -> bool {
    let unused_layer = vision_layer_index(name).is_some_and(|i| i >= feature_depth(cfg));
    name.starts_with("model.vision_tower.vision_model.post_layernorm.")
        || name.ends_with(".position_ids")
        || name.ends_with("rotary_emb.inv_freq")
        || unused_layer
        || (cfg.text.tie_word_embeddings && name == "lm_head.weight")
}

/// Every parameter of HF's `LlavaForConditionalGeneration` for `cfg`, canonical name → shape
/// (what `named_parameters()` lists: buffers excluded, a tied head absent).
pub fn param_shapes(cfg: &LlavaConfig) -> BTreeMap<String, Vec<usize>> {
    let mut p = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>| {
        p.insert(name, shape);
    };
    let v = &cfg.vision;
    let (vh, vi) = (v.hidden_size, v.intermediate_size);
    add(format!("{VISION}.embeddings.class_embedding"), vec![vh]);
    add(
        format!("{VISION}.embeddings.patch_embedding.weight"),
        vec![vh, v.num_channels, v.patch_size, v.patch_size],
    );
    add(
        format!("{VISION}.embeddings.position_embedding.weight"),
        vec![v.num_patches() + 1, vh],
    );
    for norm in ["pre_layrnorm", "post_layernorm"] {
        add(format!("{VISION}.{norm}.weight"), vec![vh]);
        add(format!("{VISION}.{norm}.bias"), vec![vh]);
    }
    for i in 0..v.num_hidden_layers {
        let l = format!("{VISION}.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{l}.self_attn.{proj}.weight"), vec![vh, vh]);
            add(format!("{l}.self_attn.{proj}.bias"), vec![vh]);
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}.{norm}.weight"), vec![vh]);
            add(format!("{l}.{norm}.bias"), vec![vh]);
        }
        add(format!("{l}.mlp.fc1.weight"), vec![vi, vh]);
        add(format!("{l}.mlp.fc1.bias"), vec![vi]);
        add(format!("{l}.mlp.fc2.weight"), vec![vh, vi]);
        add(format!("{l}.mlp.fc2.bias"), vec![vh]);
    }
    let t = &cfg.text;
    let (h, d) = (t.hidden_size, t.head_dim);
    let proj_in = vh * cfg.vision_feature_layers.len();
    add(format!("{PROJECTOR}.linear_1.weight"), vec![h, proj_in]);
    add(format!("{PROJECTOR}.linear_2.weight"), vec![h, h]);
    if cfg.projector_bias {
        add(format!("{PROJECTOR}.linear_1.bias"), vec![h]);
        add(format!("{PROJECTOR}.linear_2.bias"), vec![h]);
    }
    add(format!("{TEXT}.embed_tokens.weight"), vec![t.vocab_size, h]);
    let (q, kv) = (t.num_attention_heads * d, t.num_key_value_heads * d);
    for i in 0..t.num_hidden_layers {
        let l = format!("{TEXT}.layers.{i}");
        for (proj, out, inp) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            add(format!("{l}.self_attn.{proj}.weight"), vec![out, inp]);
            if t.attention_bias {
                add(format!("{l}.self_attn.{proj}.bias"), vec![out]);
            }
        }
        for (proj, out, inp) in [
            ("gate_proj", t.intermediate_size, h),
            ("up_proj", t.intermediate_size, h),
            ("down_proj", h, t.intermediate_size),
        ] {
            add(format!("{l}.mlp.{proj}.weight"), vec![out, inp]);
            if t.mlp_bias {
                add(format!("{l}.mlp.{proj}.bias"), vec![out]);
            }
        }
        add(format!("{l}.input_layernorm.weight"), vec![h]);
        add(format!("{l}.post_attention_layernorm.weight"), vec![h]);
    }
    add(format!("{TEXT}.norm.weight"), vec![h]);
    if !t.tie_word_embeddings {
        add("lm_head.weight".into(), vec![t.vocab_size, h]);
    }
    p
}

/// Adapters for the linear layers of the vision layers from `depth` on, which LLaVA keeps but
/// never runs (see [`LoraFactory::register_unrun`]).
pub(super) fn register_unrun_vision_layers(
    lora: &LoraFactory,
    cfg: &LlavaConfig,
    device: &Device,
) -> Result<()> {
    let (h, inter) = (cfg.vision.hidden_size, cfg.vision.intermediate_size);
    for i in feature_depth(cfg)..cfg.vision.num_hidden_layers {
        let layer = format!("{VISION}.encoder.layers.{i}");
        for (module, in_dim, out_dim) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", h, h),
            ("self_attn.v_proj", h, h),
            ("self_attn.out_proj", h, h),
            ("mlp.fc1", h, inter),
            ("mlp.fc2", inter, h),
        ] {
            lora.register_unrun(&format!("{layer}.{module}"), in_dim, out_dim, device)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_maps_to_the_same_canonical_names() {
        let canon = "model.language_model.layers.0.self_attn.q_proj.weight";
        for k in [
            "language_model.model.layers.0.self_attn.q_proj.weight",
            "model.language_model.layers.0.self_attn.q_proj.weight",
        ] {
            assert_eq!(canonical_name(k).as_deref(), Some(canon));
        }
        let canon = "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight";
        for k in [
            "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
            "vision_tower.encoder.layers.1.mlp.fc1.weight",
            "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
            "model.vision_tower.encoder.layers.1.mlp.fc1.weight",
        ] {
            assert_eq!(canonical_name(k).as_deref(), Some(canon), "{k}");
        }
        for k in ["language_model.lm_head.weight", "lm_head.weight"] {
            assert_eq!(canonical_name(k).as_deref(), Some("lm_head.weight"));
        }
        for k in [
            "multi_modal_projector.linear_1.bias",
            "model.multi_modal_projector.linear_1.bias",
        ] {
            assert_eq!(
                canonical_name(k).as_deref(),
                Some("model.multi_modal_projector.linear_1.bias")
            );
        }
        assert_eq!(canonical_name("text_model.embeddings.weight"), None);
    }
}
