//! Training recipes: one TOML file, `--set key=value` overrides, unknown keys rejected by name.
//!
//! The same structs are the TOML schema and what `--set` addresses (`--set optim.lr=1e-4`,
//! `--set lora.target_modules='["q_proj","v_proj"]'`): an override is parsed as a TOML value
//! (falling back to a plain string) and placed at its dotted path before validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lora::LoraSpec;

mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use sections::{
    DataSection, DataSource, FullSection, InstructionMode, ModelSection, NonFinitePolicy,
    OptimSection, ProxyInit, ProxySection, ScheduleSection, StageConfig, TrainSection, Trainable,
    VisionCacheSection, WeightDType, VISION_CACHE_DIR,
};
pub use validate::MAX_REPEAT;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    /// LoRA on the targeted linear layers; absent = no LoRA.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub full: FullSection,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    pub train: TrainSection,
    /// The momentum proxy instruction (used when an instruction mode is `proxy`).
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub vision_cache: VisionCacheSection,
    /// Ordered stages (e.g. proxy warm-up, then the main stage); absent = one stage from the
    /// sections above, written directly to `train.output_dir`.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// The recipe file this was read from, for errors found later (when the model is loaded).
    #[serde(skip)]
    pub source: PathBuf,
}

/// A stage with every value resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub train_proxy: bool,
    pub train_lora: bool,
    pub train_full: bool,
    pub epochs: usize,
    pub lr: f64,
    pub momentum: Option<f64>,
    pub instruction_mode: InstructionMode,
    pub max_steps: Option<usize>,
    pub output_dir: PathBuf,
}

impl StageSpec {
    /// What trains, as the recipe names it (`proxy`, `lora`, `full`).
    pub fn trainable_names(&self) -> Vec<&'static str> {
        [
            (self.train_proxy, "proxy"),
            (self.train_lora, "lora"),
            (self.train_full, "full"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect()
    }
}

impl TrainConfig {
    /// Read a TOML recipe, apply `key=value` overrides, validate. Relative paths in the file are
    /// resolved against the current directory (like every CLI path).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path, overrides)
    }

    pub fn from_toml_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let bad = |key: &str, reason: String| Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            reason,
        };
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| bad("(syntax)", e.to_string()))?;
        for ov in overrides {
            let (key, raw) = ov
                .split_once('=')
                .ok_or_else(|| bad(ov, "--set expects key=value".into()))?;
            set_path(&mut value, key.trim(), parse_value(raw.trim()))
                .map_err(|reason| bad(key.trim(), reason))?;
        }
        let mut cfg: TrainConfig = value.try_into().map_err(|e: toml::de::Error| {
            // toml ends the message with "in `key.path`": make that the key of the error.
            let msg = e.to_string();
            let msg = msg.trim_end();
            match msg.rsplit_once("\nin `") {
                Some((reason, key)) => bad(key.trim_end_matches('`'), reason.trim().to_string()),
                None => bad("(schema)", msg.to_string()),
            }
        })?;
        cfg.validate(path)?;
        cfg.source = path.to_path_buf();
        Ok(cfg)
    }

    /// The stages to run, in order, every value resolved.
    pub fn stage_specs(&self) -> Vec<StageSpec> {
        if self.stages.is_empty() {
            return vec![StageSpec {
                name: "train".into(),
                train_proxy: self.data.instruction_mode == InstructionMode::Proxy,
                train_lora: self.lora.is_some(),
                train_full: !self.full.groups.is_empty(),
                epochs: self.train.epochs,
                lr: self.optim.lr,
                momentum: None,
                instruction_mode: self.data.instruction_mode,
                max_steps: self.train.max_steps,
                output_dir: self.train.output_dir.clone(),
            }];
        }
        self.stages
            .iter()
            .map(|s| StageSpec {
                name: s.name.clone(),
                train_proxy: s.trainable.contains(&Trainable::Proxy),
                train_lora: s.trainable.contains(&Trainable::Lora),
                train_full: s.trainable.contains(&Trainable::Full),
                epochs: s.epochs.unwrap_or(self.train.epochs),
                lr: s.lr.unwrap_or(self.optim.lr),
                momentum: s.momentum,
                instruction_mode: s.instruction_mode.unwrap_or(self.data.instruction_mode),
                max_steps: s.max_steps,
                output_dir: self.train.output_dir.join(&s.name),
            })
            .collect()
    }
}

/// `1e-4` → float, `true` → bool, `["a"]` → array, anything unparseable → string.
fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(
    root: &mut toml::Value,
    key: &str,
    value: toml::Value,
) -> std::result::Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("empty segment in key".into());
    }
    let mut cur = root;
    for part in &parts[..parts.len() - 1] {
        let table = cur
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is inside a value that is not a table"))?;
        cur = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    let table = cur
        .as_table_mut()
        .ok_or_else(|| "the parent of this key is not a table".to_string())?;
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
