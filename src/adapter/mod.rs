//! PEFT adapters: reading and writing `adapter_config.json` + `adapter_model.safetensors` exactly
//! as PEFT does, and merging an adapter into a copy of the base checkpoint.
//!
//! Tensor names are `base_model.model.` + HF module path + `.lora_A.weight` / `.lora_B.weight`.
//! We write the module paths of transformers >= 4.52 (`model.language_model.layers.0...`), which
//! are our canonical names; on read, any key layout of the base model's family is accepted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lora::{AdapterEntry, LoraSpec, TargetModules};
use crate::model::weights::KeyMap;
use crate::train::checkpoint::{load_float_safetensors, save_safetensors, write_atomic};

mod fit;
mod merge;

pub use fit::{base_linear_modules, check_adapter_fits};
pub use merge::{merge_into_copy, merge_output_problem, MergeReport};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// `adapter_config.json`, the fields PEFT writes for LoRA (unknown ones are ignored on read,
/// because every PEFT release adds some).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    /// Modules the targets match that get no adapter (PEFT >= 0.14).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "none_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT features that change which layers or ranks get adapters; refused when set, rather
    /// than read as if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_pattern: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_pattern: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha_pattern: Option<serde_json::Value>,
}

fn none_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    pub fn from_spec(spec: &LoraSpec, base_model: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: spec.r,
            lora_alpha: spec.alpha,
            lora_dropout: spec.dropout,
            target_modules: spec.target_modules.clone(),
            exclude_modules: spec.exclude_modules.clone(),
            base_model_name_or_path: Some(base_model.to_string()),
            bias: "none".into(),
            use_rslora: spec.use_rslora,
            use_dora: false,
            inference_mode: true,
            fan_in_fan_out: false,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: None,
            alpha_pattern: None,
        }
    }

    /// The LoRA spec, refusing features we do not implement (rather than silently ignoring them).
    pub fn to_spec(&self, path: &Path) -> Result<LoraSpec> {
        let bad = |key: &str, reason: String| Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            reason,
        };
        if self.peft_type != "LORA" {
            return Err(bad(
                "peft_type",
                format!("`{}` is not supported (LORA)", self.peft_type),
            ));
        }
        if self.use_dora {
            return Err(bad("use_dora", "DoRA adapters are not supported".into()));
        }
        if self.bias != "none" {
            return Err(bad(
                "bias",
                format!("`{}` is not supported (none)", self.bias),
            ));
        }
        if self.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out",
                "not supported (only for GPT-2 Conv1D layers)".into(),
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad("modules_to_save", "not supported".into()));
        }
        // PEFT writes these as null / {} when unused.
        let set = |v: &Option<serde_json::Value>| match v {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(m)) => !m.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        for (key, v) in [
            ("layers_to_transform", &self.layers_to_transform),
            ("layers_pattern", &self.layers_pattern),
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            if set(v) {
                return Err(bad(
                    key,
                    "not supported (every matched layer gets the one r and lora_alpha)".into(),
                ));
            }
        }
        let spec = LoraSpec {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            use_rslora: self.use_rslora,
        };
        spec.validate().map_err(|e| match e {
            Error::Config { key, reason, .. } => bad(&key, reason),
            e => e,
        })?;
        Ok(spec)
    }
}

/// A loaded adapter: its spec and A/B per canonical module name.
pub struct Adapter {
    pub spec: LoraSpec,
    pub weights: HashMap<String, (Tensor, Tensor)>,
    pub dir: PathBuf,
    /// `base_model_name_or_path` of `adapter_config.json`: what it says it was trained on.
    pub base_model: Option<String>,
}

/// Map a PEFT tensor name to (canonical module, "A"|"B").
fn parse_tensor_name(name: &str, key_map: KeyMap) -> Option<(String, char)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, 'A')
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, 'B')
    } else if let Some(m) = rest.strip_suffix(".lora_A.default.weight") {
        (m, 'A')
    } else if let Some(m) = rest.strip_suffix(".lora_B.default.weight") {
        (m, 'B')
    } else {
        return None;
    };
    let canonical = key_map(&format!("{module}.weight"))?;
    Some((canonical.strip_suffix(".weight")?.to_string(), which))
}

/// `adapter_config.json` of an adapter directory and the LoRA spec it describes (no weights
/// read).
pub fn read_adapter_config(dir: &Path) -> Result<(AdapterConfig, LoraSpec)> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::json(&cfg_path, e))?;
    let spec = cfg.to_spec(&cfg_path)?;
    Ok((cfg, spec))
}

/// Read a PEFT LoRA adapter directory; module paths are mapped to canonical names by the base
/// model family's `key_map` (`model::family::ModelFamily::key_map`).
pub fn read_adapter(dir: &Path, device: &Device, key_map: KeyMap) -> Result<Adapter> {
    let (cfg, spec) = read_adapter_config(dir)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.is_file() && dir.join("adapter_model.bin").is_file() {
        return Err(Error::Weights(format!(
            "{} holds a pickle adapter_model.bin; lvlm-ift loads only safetensors adapters",
            dir.display()
        )));
    }
    let tensors = load_float_safetensors(&weights_path, device)?;
    let mut a = HashMap::new();
    let mut b = HashMap::new();
    for (name, t) in tensors {
        let (module, which) = parse_tensor_name(&name, key_map).ok_or_else(|| {
            Error::Weights(format!(
                "{}: tensor `{name}` is not a LoRA A/B weight of a known module",
                weights_path.display()
            ))
        })?;
        let slot = if which == 'A' { &mut a } else { &mut b };
        if slot.insert(module.clone(), t).is_some() {
            return Err(Error::Weights(format!(
                "{}: two lora_{which} tensors map to module `{module}`",
                weights_path.display()
            )));
        }
    }
    let mut weights = HashMap::new();
    for (module, ta) in a {
        let tb = b.remove(&module).ok_or_else(|| {
            Error::Weights(format!(
                "{}: `{module}` has lora_A but no lora_B",
                weights_path.display()
            ))
        })?;
        weights.insert(module, (ta, tb));
    }
    if let Some(module) = b.keys().next() {
        return Err(Error::Weights(format!(
            "{}: `{module}` has lora_B but no lora_A",
            weights_path.display()
        )));
    }
    Ok(Adapter {
        spec,
        weights,
        dir: dir.to_path_buf(),
        base_model: cfg.base_model_name_or_path.clone(),
    })
}

/// The adapter's tensors under PEFT names, in f32.
pub fn adapter_tensors(entries: &[AdapterEntry]) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for e in entries {
        let base = format!("base_model.model.{}", e.module);
        out.insert(
            format!("{base}.lora_A.weight"),
            e.a.to_dtype(DType::F32)?.detach(),
        );
        out.insert(
            format!("{base}.lora_B.weight"),
            e.b.to_dtype(DType::F32)?.detach(),
        );
    }
    Ok(out)
}

/// Write a PEFT adapter directory atomically (built in a temp dir, then renamed into place).
pub fn write_adapter(
    dir: &Path,
    spec: &LoraSpec,
    entries: &[AdapterEntry],
    base_model: &str,
) -> Result<()> {
    with_temp_dir(dir, |tmp| {
        let cfg = AdapterConfig::from_spec(spec, base_model);
        let json = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::json(tmp.join(ADAPTER_CONFIG), e))?;
        write_atomic(&tmp.join(ADAPTER_CONFIG), json.as_bytes())?;
        save_safetensors(
            &tmp.join(ADAPTER_WEIGHTS),
            &adapter_tensors(entries)?,
            &HashMap::new(),
        )
    })
}

/// Build `dir` by filling a sibling temp dir and renaming it over `dir` (replacing an old one).
pub fn with_temp_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        return Err(Error::Config {
            path: dir.to_path_buf(),
            key: "output directory".into(),
            reason: "exists and is not a directory; refusing to replace it".into(),
        });
    }
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".old-{name}-{}", std::process::id()));
        if let Err(e) = std::fs::rename(dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(dir, e));
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            // Put the old directory back under its name before reporting.
            let _ = std::fs::rename(&old, dir);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(dir, e));
        }
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_of_every_layout_map_to_canonical_modules() {
        for (name, module) in [
            (
                "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
                "model.language_model.layers.0.self_attn.q_proj",
            ),
            (
                "base_model.model.language_model.model.layers.1.mlp.up_proj.lora_B.weight",
                "model.language_model.layers.1.mlp.up_proj",
            ),
            (
                "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.v_proj.lora_A.weight",
                "model.vision_tower.vision_model.encoder.layers.0.self_attn.v_proj",
            ),
        ] {
            assert_eq!(parse_tensor_name(name, crate::model::llava::canonical_name).map(|p| p.0).as_deref(), Some(module), "{name}");
        }
        assert!(parse_tensor_name(
            "base_model.model.lm_head.weight",
            crate::model::llava::canonical_name
        )
        .is_none());
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let cfg: AdapterConfig = serde_json::from_str(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_dora":true,"new_field_from_peft_9":1}"#,
        )
        .unwrap();
        let e = cfg
            .to_spec(Path::new("adapter_config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_dora"), "{e}");
        // What PEFT writes when the per-layer features are unused is accepted; set, refused.
        let unused: AdapterConfig = serde_json::from_str(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"layers_to_transform":null,"layers_pattern":null,"rank_pattern":{},"alpha_pattern":{}}"#,
        )
        .unwrap();
        unused.to_spec(Path::new("adapter_config.json")).unwrap();
        for field in [
            r#""layers_to_transform":[0]"#,
            r#""rank_pattern":{"q_proj":8}"#,
            r#""alpha_pattern":{"q_proj":8}"#,
        ] {
            let cfg: AdapterConfig = serde_json::from_str(&format!(
                r#"{{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],{field}}}"#
            ))
            .unwrap();
            let e = cfg
                .to_spec(Path::new("adapter_config.json"))
                .unwrap_err()
                .to_string();
            let key = field.split('"').nth(1).unwrap();
            assert!(e.contains(key) && e.contains("not supported"), "{e}");
        }
    }
}
