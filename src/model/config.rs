//! `config.json` of a llava-hf checkpoint, as written by transformers 4.x and 5.x.
//!
//! HF writes sparse configs: any field equal to the class default is left out (llava-1.5-7b-hf's
//! `text_config` has five keys). So every field is optional here and resolved against the defaults
//! of the sub-model's own class (`LlamaConfig`, `MistralConfig`, `CLIPVisionConfig`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// `vision_feature_layer`: one layer index or a list whose features are concatenated.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

impl FeatureLayer {
    pub fn layers(&self) -> Vec<i64> {
        match self {
            FeatureLayer::One(i) => vec![*i],
            FeatureLayer::Many(v) => v.clone(),
        }
    }
}

/// RoPE settings: transformers 4.x `rope_scaling` or 5.x `rope_parameters` (which also carries theta).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// The text half of the config as found in the file (all optional, see module docs).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawTextConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParameters>,
    pub rope_parameters: Option<RopeParameters>,
    pub max_position_embeddings: Option<usize>,
    pub hidden_act: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub sliding_window: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RawVisionConfig {
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_channels: Option<usize>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub hidden_act: Option<String>,
    pub layer_norm_eps: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawLlavaConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub text_config: RawTextConfig,
    #[serde(default)]
    pub vision_config: RawVisionConfig,
    pub image_token_index: Option<u32>,
    pub image_token_id: Option<u32>,
    pub vision_feature_layer: Option<FeatureLayer>,
    pub vision_feature_select_strategy: Option<String>,
    pub projector_hidden_act: Option<String>,
    pub multimodal_projector_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
}

/// Which decoder family the text model is. Both share one implementation (Mistral = Llama with GQA
/// and a sliding window that never binds at the lengths we run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFamily {
    Llama,
    Mistral,
}

/// RoPE frequency rule, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    Default,
    /// Positions divided by `factor` (HF "linear").
    Linear {
        factor: f64,
    },
    /// Llama-3.1 frequency smoothing.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone)]
pub struct TextConfig {
    pub family: TextFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope: RopeKind,
    pub max_position_embeddings: usize,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// Which CLIP tokens are handed to the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop the CLS token.
    Default,
    /// Keep every token, CLS included.
    Full,
}

/// A fully resolved LLaVA config: every default filled in, every value checked.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    /// Indices into CLIP's hidden-state list (0 = embeddings, i = after layer i; negative from the end).
    pub vision_feature_layers: Vec<i64>,
    pub select_strategy: SelectStrategy,
    pub projector_bias: bool,
}

impl LlavaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse and resolve; `path` is only used to name the file in errors.
    pub fn from_json_str(json: &str, path: &Path) -> Result<Self> {
        let raw: RawLlavaConfig = serde_json::from_str(json).map_err(|e| Error::json(path, e))?;
        resolve(raw, path)
    }

    /// Number of image features each image contributes to the token stream.
    pub fn num_image_tokens(&self) -> usize {
        let patches = self.vision.num_patches();
        match self.select_strategy {
            SelectStrategy::Default => patches,
            SelectStrategy::Full => patches + 1,
        }
    }

    /// Resolved, non-negative hidden-state indices (0..=num_hidden_layers).
    pub fn feature_layer_indices(&self) -> Vec<usize> {
        let n = self.vision.num_hidden_layers as i64 + 1;
        self.vision_feature_layers
            .iter()
            .map(|&i| if i < 0 { (n + i) as usize } else { i as usize })
            .collect()
    }
}

pub(crate) fn bad(path: &Path, key: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn resolve(raw: RawLlavaConfig, path: &Path) -> Result<LlavaConfig> {
    if let Some(mt) = &raw.model_type {
        if mt != "llava" {
            return Err(bad(
                path,
                "model_type",
                format!("`{mt}` is not a LLaVA checkpoint (expected \"llava\")"),
            ));
        }
    }
    let text = resolve_text(&raw.text_config, raw.tie_word_embeddings, path)?;
    let vision = resolve_vision(&raw.vision_config, path)?;
    let image_token_id = raw
        .image_token_id
        .or(raw.image_token_index)
        .unwrap_or(32000);
    let vision_feature_layers = raw
        .vision_feature_layer
        .unwrap_or(FeatureLayer::One(-2))
        .layers();
    let n = vision.num_hidden_layers as i64;
    if vision_feature_layers.is_empty() {
        return Err(bad(path, "vision_feature_layer", "empty list"));
    }
    for &l in &vision_feature_layers {
        if l > n || l < -(n + 1) {
            return Err(bad(
                path,
                "vision_feature_layer",
                format!("{l} is out of range for a vision tower with {n} layers"),
            ));
        }
    }
    let select_strategy = match raw.vision_feature_select_strategy.as_deref() {
        None | Some("default") => SelectStrategy::Default,
        Some("full") => SelectStrategy::Full,
        Some(other) => {
            return Err(bad(
                path,
                "vision_feature_select_strategy",
                format!("`{other}` is not one of \"default\", \"full\""),
            ))
        }
    };
    match raw.projector_hidden_act.as_deref() {
        None | Some("gelu") => {}
        Some(other) => {
            return Err(bad(
                path,
                "projector_hidden_act",
                format!("`{other}` is not supported (only \"gelu\")"),
            ))
        }
    }
    Ok(LlavaConfig {
        text,
        vision,
        image_token_id,
        vision_feature_layers,
        select_strategy,
        projector_bias: raw.multimodal_projector_bias.unwrap_or(true),
    })
}

fn resolve_text(raw: &RawTextConfig, top_tie: Option<bool>, path: &Path) -> Result<TextConfig> {
    let family = match raw.model_type.as_deref() {
        None | Some("llama") => TextFamily::Llama,
        Some("mistral") => TextFamily::Mistral,
        Some(other) => {
            return Err(bad(
                path,
                "text_config.model_type",
                format!("`{other}` is not supported (llama, mistral)"),
            ))
        }
    };
    // Class defaults of LlamaConfig / MistralConfig.
    let (d_inter, d_kv, d_rms, d_maxpos) = match family {
        TextFamily::Llama => (11008, None, 1e-6, 2048),
        TextFamily::Mistral => (14336, Some(8), 1e-6, 4096 * 32),
    };
    let hidden_size = raw.hidden_size.unwrap_or(4096);
    let num_attention_heads = raw.num_attention_heads.unwrap_or(32);
    let num_key_value_heads = raw
        .num_key_value_heads
        .or(d_kv)
        .unwrap_or(num_attention_heads);
    let head_dim = raw
        .head_dim
        .unwrap_or(hidden_size / num_attention_heads.max(1));
    if num_attention_heads == 0 || num_key_value_heads == 0 {
        return Err(bad(path, "text_config.num_attention_heads", "must be > 0"));
    }
    if !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(bad(
            path,
            "text_config.num_key_value_heads",
            format!(
                "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
            ),
        ));
    }
    if !head_dim.is_multiple_of(2) {
        return Err(bad(path, "text_config.head_dim", "must be even for RoPE"));
    }
    if let Some(act) = &raw.hidden_act {
        if act != "silu" {
            return Err(bad(
                path,
                "text_config.hidden_act",
                format!("`{act}` is not supported (silu)"),
            ));
        }
    }
    // 5.x moves theta into rope_parameters; 4.x keeps it top-level and scaling in rope_scaling.
    let params = raw.rope_parameters.clone().or(raw.rope_scaling.clone());
    let rope_theta = raw
        .rope_theta
        .or(params.as_ref().and_then(|p| p.rope_theta))
        .unwrap_or(10000.0);
    let rope = resolve_rope(params.as_ref(), path)?;
    Ok(TextConfig {
        family,
        vocab_size: raw.vocab_size.unwrap_or(32000),
        hidden_size,
        intermediate_size: raw.intermediate_size.unwrap_or(d_inter),
        num_hidden_layers: raw.num_hidden_layers.unwrap_or(32),
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(d_rms),
        rope_theta,
        rope,
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(d_maxpos),
        attention_bias: raw.attention_bias.unwrap_or(false),
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        tie_word_embeddings: raw.tie_word_embeddings.or(top_tie).unwrap_or(false),
    })
}

pub(crate) fn resolve_rope(p: Option<&RopeParameters>, path: &Path) -> Result<RopeKind> {
    let Some(p) = p else {
        return Ok(RopeKind::Default);
    };
    let key = "text_config.rope_parameters";
    let need = |v: Option<f64>, name: &str| {
        v.ok_or_else(|| bad(path, &format!("{key}.{name}"), "missing"))
    };
    Ok(match p.rope_type.as_deref() {
        None | Some("default") => RopeKind::Default,
        Some("linear") => RopeKind::Linear {
            factor: need(p.factor, "factor")?,
        },
        Some("llama3") => RopeKind::Llama3 {
            factor: need(p.factor, "factor")?,
            low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: p.original_max_position_embeddings.ok_or_else(
                || {
                    bad(
                        path,
                        &format!("{key}.original_max_position_embeddings"),
                        "missing",
                    )
                },
            )?,
        },
        Some(other) => {
            return Err(bad(
                path,
                &format!("{key}.rope_type"),
                format!("`{other}` is not supported (default, linear, llama3)"),
            ))
        }
    })
}

fn resolve_vision(raw: &RawVisionConfig, path: &Path) -> Result<VisionConfig> {
    match raw.model_type.as_deref() {
        None | Some("clip_vision_model") => {}
        Some(other) => {
            return Err(bad(
                path,
                "vision_config.model_type",
                format!("`{other}` is not supported (clip_vision_model)"),
            ))
        }
    }
    match raw.hidden_act.as_deref() {
        None | Some("quick_gelu") => {}
        Some(other) => {
            return Err(bad(
                path,
                "vision_config.hidden_act",
                format!("`{other}` is not supported (quick_gelu)"),
            ))
        }
    }
    let cfg = VisionConfig {
        hidden_size: raw.hidden_size.unwrap_or(768),
        intermediate_size: raw.intermediate_size.unwrap_or(3072),
        num_hidden_layers: raw.num_hidden_layers.unwrap_or(12),
        num_attention_heads: raw.num_attention_heads.unwrap_or(12),
        num_channels: raw.num_channels.unwrap_or(3),
        image_size: raw.image_size.unwrap_or(224),
        patch_size: raw.patch_size.unwrap_or(32),
        layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
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
    if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(bad(
            path,
            "vision_config.num_attention_heads",
            "must divide hidden_size",
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LlavaConfig> {
        LlavaConfig::from_json_str(s, Path::new("config.json"))
    }

    #[test]
    fn sparse_hub_config_gets_class_defaults() {
        // The real llava-1.5-7b-hf config, abridged to what it holds.
        let c = parse(
            r#"{"model_type":"llava","image_token_index":32000,"projector_hidden_act":"gelu",
            "text_config":{"model_type":"llama","max_position_embeddings":4096,"rms_norm_eps":1e-05,"vocab_size":32064},
            "vision_config":{"hidden_size":1024,"image_size":336,"intermediate_size":4096,"model_type":"clip_vision_model",
            "num_attention_heads":16,"num_hidden_layers":24,"patch_size":14,"projection_dim":768},
            "vision_feature_layer":-2,"vision_feature_select_strategy":"default"}"#,
        )
        .unwrap();
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.num_image_tokens(), 576);
        assert_eq!(c.feature_layer_indices(), vec![23]);
        assert!(!c.text.tie_word_embeddings);
    }

    #[test]
    fn transformers5_rope_parameters_and_image_token_id() {
        let c = parse(
            r#"{"model_type":"llava","image_token_id":7,"vision_feature_layer":[-3,-1],
            "vision_feature_select_strategy":"full",
            "text_config":{"model_type":"mistral","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2,
            "head_dim":16,"rope_parameters":{"rope_type":"default","rope_theta":1000000.0}},
            "vision_config":{"hidden_size":32,"num_hidden_layers":3,"num_attention_heads":4,"image_size":30,"patch_size":6}}"#,
        )
        .unwrap();
        assert_eq!(c.image_token_id, 7);
        assert_eq!(c.text.rope_theta, 1e6);
        assert_eq!(c.text.family, TextFamily::Mistral);
        assert_eq!(c.feature_layer_indices(), vec![1, 3]);
        assert_eq!(c.num_image_tokens(), 26);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse(r#"{"vision_feature_select_strategy":"cls"}"#).unwrap_err();
        assert!(
            e.to_string().contains("vision_feature_select_strategy"),
            "{e}"
        );
        let e = parse(r#"{"text_config":{"rope_scaling":{"rope_type":"yarn","factor":2.0}}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("rope_type"), "{e}");
        let e = parse(r#"{"text_config":{"num_attention_heads":6,"num_key_value_heads":4}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let e = parse(r#"{"text_config": 3}"#).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }
}
