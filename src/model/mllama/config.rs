//! `config.json` of a Llama-3.2-Vision checkpoint (`MllamaConfig`), as transformers 4.x and 5.x
//! write it. Absent fields take the class defaults of `MllamaTextConfig` / `MllamaVisionConfig`
//! (which are the 11B's values, except the vision `image_size`, 448 by default).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::config::{bad, resolve_rope, RopeParameters, TextConfig, TextFamily};

#[derive(Debug, Clone, Deserialize, Default)]
struct RawText {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    hidden_act: Option<String>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    intermediate_size: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeParameters>,
    rope_parameters: Option<RopeParameters>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    cross_attention_layers: Option<Vec<usize>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct RawVision {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    hidden_act: Option<String>,
    num_hidden_layers: Option<usize>,
    num_global_layers: Option<usize>,
    /// Stored as `attention_heads` (the attribute name); `num_attention_heads` is the
    /// constructor's argument name.
    #[serde(alias = "num_attention_heads")]
    attention_heads: Option<usize>,
    num_channels: Option<usize>,
    intermediate_size: Option<usize>,
    vision_output_dim: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    norm_eps: Option<f64>,
    max_num_tiles: Option<usize>,
    intermediate_layers_indices: Option<Vec<usize>>,
    supported_aspect_ratios: Option<Vec<[usize; 2]>>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawMllama {
    model_type: Option<String>,
    #[serde(default)]
    text_config: RawText,
    #[serde(default)]
    vision_config: RawVision,
    image_token_index: Option<u32>,
    image_token_id: Option<u32>,
}

/// The tiled vision encoder's settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct MllamaVisionConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_global_layers: usize,
    pub attention_heads: usize,
    pub num_channels: usize,
    pub intermediate_size: usize,
    pub vision_output_dim: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub norm_eps: f64,
    pub max_num_tiles: usize,
    /// Local layers whose outputs are concatenated to the final features (0-based).
    pub intermediate_layers_indices: Vec<usize>,
    /// `(rows, cols)` tile grids; aspect-ratio id `i + 1` is the `i`-th (0 = padding).
    pub supported_aspect_ratios: Vec<[usize; 2]>,
}

impl MllamaVisionConfig {
    /// Patches per tile plus the class token.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// Rows of the aspect-ratio embedding tables: the ids `0..=len(supported)`.
    pub fn max_aspect_ratio_id(&self) -> usize {
        self.supported_aspect_ratios.len()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.attention_heads
    }
}

/// A fully resolved Mllama config. The text side reuses [`TextConfig`] (its self-attention
/// layers are Llama 3.1's); `cross_attention_layers` are the decoder indices that are gated
/// cross-attention blocks instead.
#[derive(Debug, Clone)]
pub struct MllamaConfig {
    pub text: TextConfig,
    pub cross_attention_layers: Vec<usize>,
    pub vision: MllamaVisionConfig,
    pub image_token_id: u32,
}

impl MllamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse and resolve; `path` only names the file in errors.
    pub fn from_json_str(json: &str, path: &Path) -> Result<Self> {
        let raw: RawMllama = serde_json::from_str(json).map_err(|e| Error::json(path, e))?;
        resolve(raw, path)
    }

    /// Extra embedding rows past the vocabulary (`<|image|>` is the first): HF sizes
    /// `embed_tokens` as `vocab_size + 8`.
    pub const EXTRA_EMBEDDINGS: usize = 8;

    pub fn is_cross_layer(&self, i: usize) -> bool {
        self.cross_attention_layers.contains(&i)
    }
}

fn resolve(raw: RawMllama, path: &Path) -> Result<MllamaConfig> {
    if let Some(mt) = &raw.model_type {
        if mt != "mllama" {
            return Err(bad(
                path,
                "model_type",
                format!("`{mt}` is not a Llama-3.2-Vision checkpoint (expected \"mllama\")"),
            ));
        }
    }
    let t = &raw.text_config;
    if let Some(mt) = t
        .model_type
        .as_deref()
        .filter(|m| *m != "mllama_text_model")
    {
        return Err(bad(
            path,
            "text_config.model_type",
            format!("`{mt}` is not supported (mllama_text_model)"),
        ));
    }
    if let Some(act) = t.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(bad(
            path,
            "text_config.hidden_act",
            format!("`{act}` is not supported (silu)"),
        ));
    }
    let hidden_size = t.hidden_size.unwrap_or(4096);
    let heads = t.num_attention_heads.unwrap_or(32);
    let kv_heads = t.num_key_value_heads.unwrap_or(8);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(bad(
            path,
            "text_config.num_key_value_heads",
            format!("{kv_heads} must be > 0 and divide num_attention_heads {heads}"),
        ));
    }
    if !hidden_size.is_multiple_of(heads) || !(hidden_size / heads).is_multiple_of(2) {
        return Err(bad(
            path,
            "text_config.num_attention_heads",
            format!("{heads} must divide hidden_size {hidden_size} into even head dims"),
        ));
    }
    let params = t.rope_parameters.clone().or(t.rope_scaling.clone());
    let rope_theta = t
        .rope_theta
        .or(params.as_ref().and_then(|p| p.rope_theta))
        .unwrap_or(500_000.0);
    let num_hidden_layers = t.num_hidden_layers.unwrap_or(40);
    let text = TextConfig {
        family: TextFamily::Llama,
        vocab_size: t.vocab_size.unwrap_or(128_256),
        hidden_size,
        intermediate_size: t.intermediate_size.unwrap_or(14_336),
        num_hidden_layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden_size / heads,
        rms_norm_eps: t.rms_norm_eps.unwrap_or(1e-5),
        rope_theta,
        rope: resolve_rope(params.as_ref(), path)?,
        max_position_embeddings: t.max_position_embeddings.unwrap_or(131_072),
        attention_bias: false,
        mlp_bias: false,
        tie_word_embeddings: t.tie_word_embeddings.unwrap_or(false),
    };
    let cross_attention_layers = t
        .cross_attention_layers
        .clone()
        .unwrap_or_else(|| vec![3, 8, 13, 18, 23, 28, 33, 38]);
    if let Some(&l) = cross_attention_layers
        .iter()
        .find(|&&l| l >= num_hidden_layers)
    {
        return Err(bad(
            path,
            "text_config.cross_attention_layers",
            format!("layer {l} is past the {num_hidden_layers} decoder layers"),
        ));
    }
    let vision = resolve_vision(&raw.vision_config, path)?;
    let image_token_id = raw
        .image_token_id
        .or(raw.image_token_index)
        .unwrap_or(128_256);
    let rows = text.vocab_size + MllamaConfig::EXTRA_EMBEDDINGS;
    if image_token_id as usize >= rows {
        return Err(bad(
            path,
            "image_token_index",
            format!("{image_token_id} is outside the {rows} embedding rows (vocab_size + 8)"),
        ));
    }
    Ok(MllamaConfig {
        text,
        cross_attention_layers,
        vision,
        image_token_id,
    })
}

fn resolve_vision(v: &RawVision, path: &Path) -> Result<MllamaVisionConfig> {
    if let Some(mt) = v
        .model_type
        .as_deref()
        .filter(|m| *m != "mllama_vision_model")
    {
        return Err(bad(
            path,
            "vision_config.model_type",
            format!("`{mt}` is not supported (mllama_vision_model)"),
        ));
    }
    if let Some(act) = v.hidden_act.as_deref().filter(|a| *a != "gelu") {
        return Err(bad(
            path,
            "vision_config.hidden_act",
            format!("`{act}` is not supported (gelu)"),
        ));
    }
    let max_num_tiles = v.max_num_tiles.unwrap_or(4);
    let supported_aspect_ratios = match &v.supported_aspect_ratios {
        Some(r) => r.clone(),
        None if max_num_tiles == 4 => vec![
            [1, 1],
            [1, 2],
            [1, 3],
            [1, 4],
            [2, 1],
            [2, 2],
            [3, 1],
            [4, 1],
        ],
        None => {
            return Err(bad(
                path,
                "vision_config.supported_aspect_ratios",
                "missing (HF has defaults only for max_num_tiles = 4)",
            ))
        }
    };
    let cfg = MllamaVisionConfig {
        hidden_size: v.hidden_size.unwrap_or(1280),
        num_hidden_layers: v.num_hidden_layers.unwrap_or(32),
        num_global_layers: v.num_global_layers.unwrap_or(8),
        attention_heads: v.attention_heads.unwrap_or(16),
        num_channels: v.num_channels.unwrap_or(3),
        intermediate_size: v.intermediate_size.unwrap_or(5120),
        vision_output_dim: v.vision_output_dim.unwrap_or(7680),
        image_size: v.image_size.unwrap_or(448),
        patch_size: v.patch_size.unwrap_or(14),
        norm_eps: v.norm_eps.unwrap_or(1e-5),
        max_num_tiles,
        intermediate_layers_indices: v
            .intermediate_layers_indices
            .clone()
            .unwrap_or_else(|| vec![3, 7, 15, 23, 30]),
        supported_aspect_ratios,
    };
    if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
        return Err(bad(
            path,
            "vision_config.patch_size",
            format!(
                "{} does not divide image_size {}",
                cfg.patch_size, cfg.image_size
            ),
        ));
    }
    if cfg.attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.attention_heads) {
        return Err(bad(
            path,
            "vision_config.attention_heads",
            "must divide hidden_size",
        ));
    }
    if let Some(&i) = cfg
        .intermediate_layers_indices
        .iter()
        .find(|&&i| i >= cfg.num_hidden_layers)
    {
        return Err(bad(
            path,
            "vision_config.intermediate_layers_indices",
            format!("{i} is past the {} local layers", cfg.num_hidden_layers),
        ));
    }
    let want = cfg.hidden_size * (1 + cfg.intermediate_layers_indices.len());
    if cfg.vision_output_dim != want {
        return Err(bad(
            path,
            "vision_config.vision_output_dim",
            format!(
                "{} != hidden_size × (1 + {} intermediate layers) = {want}",
                cfg.vision_output_dim,
                cfg.intermediate_layers_indices.len()
            ),
        ));
    }
    if let Some(r) = cfg
        .supported_aspect_ratios
        .iter()
        .find(|r| r[0] * r[1] == 0 || r[0] * r[1] > max_num_tiles)
    {
        return Err(bad(
            path,
            "vision_config.supported_aspect_ratios",
            format!("{r:?} is not a grid of 1..={max_num_tiles} tiles"),
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_defaults_are_the_11b_but_image_size() {
        let c =
            MllamaConfig::from_json_str(r#"{"model_type":"mllama"}"#, Path::new("c.json")).unwrap();
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.cross_attention_layers.len(), 8);
        assert_eq!(c.vision.image_size, 448);
        assert_eq!(c.vision.num_patches(), 1025);
        assert_eq!(c.vision.max_aspect_ratio_id(), 8);
        assert_eq!(c.image_token_id, 128_256);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = |json: &str| {
            MllamaConfig::from_json_str(json, Path::new("c.json"))
                .unwrap_err()
                .to_string()
        };
        assert!(e(r#"{"model_type":"llava"}"#).contains("model_type"));
        let s = e(r#"{"text_config":{"num_hidden_layers":4,"cross_attention_layers":[4]}}"#);
        assert!(s.contains("cross_attention_layers"), "{s}");
        let s = e(r#"{"vision_config":{"vision_output_dim":100}}"#);
        assert!(s.contains("vision_output_dim"), "{s}");
        let s = e(r#"{"vision_config":{"max_num_tiles":2}}"#);
        assert!(s.contains("supported_aspect_ratios"), "{s}");
        let s = e(r#"{"image_token_index": 200000}"#);
        assert!(s.contains("image_token_index"), "{s}");
    }
}
