//! Training recipes: one TOML file, `--set key=value` overrides, unknown keys rejected by name.
//!
//! The same structs are the TOML schema and what `--set` addresses (`--set optim.lr=1e-4`,
//! `--set lora.target_modules='["q_proj","v_proj"]'`): an override is parsed as a TOML value
//! (falling back to a plain string) and placed at its dotted path before validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lora::LoraSpec;

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
    /// Ordered stages (e.g. proxy warm-up, then the main stage); absent = one stage from the
    /// sections above, written directly to `train.output_dir`.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Number of placeholder positions / learnable vectors.
    #[serde(default = "default_proxy_tokens")]
    pub tokens: usize,
    /// "uniform" (U(-bound, bound), the reference) or "text" (embeddings of `init_text`).
    #[serde(default = "default_proxy_init")]
    pub init: String,
    #[serde(default)]
    pub init_text: Option<String>,
    #[serde(default = "default_proxy_bound")]
    pub bound: f64,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            tokens: default_proxy_tokens(),
            init: default_proxy_init(),
            init_text: None,
            bound: default_proxy_bound(),
        }
    }
}

/// One stage of a recipe. Unset values come from the top-level sections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Also the name of the stage's output subdirectory.
    pub name: String,
    /// What trains: any of "proxy", "lora", "full" (the groups of `full.groups`).
    pub trainable: Vec<String>,
    #[serde(default)]
    pub epochs: Option<usize>,
    #[serde(default)]
    pub lr: Option<f64>,
    /// EMA momentum of the proxy vectors (reset to the average before each step); absent = none.
    #[serde(default)]
    pub momentum: Option<f64>,
    #[serde(default)]
    pub instruction_mode: Option<String>,
    #[serde(default)]
    pub max_steps: Option<usize>,
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
    pub instruction_mode: String,
    pub max_steps: Option<usize>,
    pub output_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Checkpoint directory or Hub repo id.
    pub path: String,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_device")]
    pub device: String,
    /// "resize" (HF processor) or "pad" (LLaVA expand-to-square).
    #[serde(default = "default_aspect")]
    pub image_aspect: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Manifests (CSV `image,text`, JSONL, LLaVA JSON).
    pub train: Vec<DataSource>,
    /// "proxy" (learnable vectors, see `[proxy]`), "fixed" (the `instruction` text) or "none".
    #[serde(default = "default_instruction_mode")]
    pub instruction_mode: String,
    /// Response shuffling: "comma" (default), "sentence" or "none".
    #[serde(default = "default_shuffle")]
    pub shuffle: String,
    #[serde(default = "default_instruction")]
    pub instruction: String,
    /// Longest token sequence; longer descriptions are cut at the end (logged).
    #[serde(default)]
    pub max_len: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub manifest: PathBuf,
    /// Image paths are relative to this (default: the manifest's directory).
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    #[serde(default = "one")]
    pub repeat: usize,
}

/// Module groups trained in full (all their weights), e.g. `vision_tower`, `multi_modal_projector`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullSection {
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Parameters whose name contains one of these get no weight decay.
    #[serde(default = "default_no_decay")]
    pub no_decay: Vec<String>,
    /// Global grad-norm clip; absent = no clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            weight_decay: default_wd(),
            betas: default_betas(),
            eps: default_eps(),
            no_decay: default_no_decay(),
            max_grad_norm: default_clip(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// constant | linear | cosine
    #[serde(default = "default_schedule")]
    pub kind: String,
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    #[serde(default)]
    pub min_lr: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            kind: default_schedule(),
            warmup_steps: None,
            warmup_ratio: None,
            min_lr: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub output_dir: PathBuf,
    #[serde(default = "one")]
    pub epochs: usize,
    #[serde(default = "one")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Stop after this many optimizer steps (the schedule spans them); absent = all epochs.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Stop after this many optimizer steps without changing the schedule, checkpointing there,
    /// as a pre-empted job would (continue with `--resume latest`).
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// Checkpoint every N optimizer steps (and always at each epoch end).
    #[serde(default)]
    pub save_every: Option<usize>,
    /// Keep only the newest K checkpoints; absent = keep all.
    #[serde(default)]
    pub keep_last: Option<usize>,
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "cpu".into()
}
fn default_aspect() -> String {
    "resize".into()
}
fn default_instruction_mode() -> String {
    "fixed".into()
}
fn default_instruction() -> String {
    "Describe this medical scan.".into()
}
fn default_shuffle() -> String {
    "comma".into()
}
fn default_proxy_tokens() -> usize {
    8
}
fn default_proxy_init() -> String {
    "uniform".into()
}
fn default_proxy_bound() -> f64 {
    crate::method::proxy::REFERENCE_BOUND
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    2e-5
}
fn default_wd() -> f64 {
    0.01
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_no_decay() -> Vec<String> {
    [
        "bias",
        "norm",
        "class_embedding",
        "position_embedding",
        "proxy",
    ]
    .map(String::from)
    .to_vec()
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_schedule() -> String {
    "constant".into()
}
fn default_seed() -> u64 {
    1
}

/// Module groups `full.groups` may name, and the canonical weight-name prefix of each.
pub const FULL_GROUPS: &[(&str, &str)] = &[
    ("vision_tower", "model.vision_tower."),
    ("multi_modal_projector", "model.multi_modal_projector."),
    ("language_model", "model.language_model."),
    ("embed_tokens", "model.language_model.embed_tokens."),
    ("lm_head", "lm_head."),
];

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
        let cfg: TrainConfig = value
            .try_into()
            .map_err(|e: toml::de::Error| bad("(schema)", e.to_string()))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, reason: String| Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            reason,
        };
        if self.data.train.is_empty() {
            return Err(bad("data.train", "at least one manifest is needed".into()));
        }
        for (i, s) in self.data.train.iter().enumerate() {
            if s.repeat == 0 {
                return Err(bad(
                    &format!("data.train[{i}].repeat"),
                    "must be >= 1".into(),
                ));
            }
        }
        check_mode("data.instruction_mode", &self.data.instruction_mode)
            .map_err(|r| bad("data.instruction_mode", r))?;
        if !matches!(self.data.shuffle.as_str(), "comma" | "sentence" | "none") {
            return Err(bad(
                "data.shuffle",
                format!(
                    "`{}` is not one of comma, sentence, none",
                    self.data.shuffle
                ),
            ));
        }
        if self.proxy.tokens == 0 {
            return Err(bad("proxy.tokens", "must be >= 1".into()));
        }
        match (self.proxy.init.as_str(), &self.proxy.init_text) {
            ("uniform", _) => {}
            ("text", Some(t)) if !t.trim().is_empty() => {}
            ("text", _) => {
                return Err(bad(
                    "proxy.init_text",
                    "required (non-empty) when proxy.init = \"text\"".into(),
                ))
            }
            (other, _) => {
                return Err(bad(
                    "proxy.init",
                    format!("`{other}` is not one of uniform, text"),
                ))
            }
        }
        if !matches!(self.model.dtype.as_str(), "f32" | "bf16" | "f16") {
            return Err(bad(
                "model.dtype",
                format!("`{}` is not one of f32, bf16, f16", self.model.dtype),
            ));
        }
        if !matches!(self.model.image_aspect.as_str(), "resize" | "pad") {
            return Err(bad(
                "model.image_aspect",
                format!("`{}` is not one of resize, pad", self.model.image_aspect),
            ));
        }
        for g in &self.full.groups {
            if !FULL_GROUPS.iter().any(|(n, _)| n == g) {
                let known: Vec<&str> = FULL_GROUPS.iter().map(|(n, _)| *n).collect();
                return Err(bad(
                    "full.groups",
                    format!("unknown group `{g}` (known: {})", known.join(", ")),
                ));
            }
        }
        if self.lora.is_none() && self.full.groups.is_empty() {
            return Err(bad(
                "lora / full.groups",
                "nothing to train: configure [lora] or full.groups".into(),
            ));
        }
        if let Some(l) = &self.lora {
            l.validate().map_err(|e| bad("lora", e.to_string()))?;
        }
        for (k, v) in [
            ("train.epochs", self.train.epochs),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
        ] {
            if v == 0 {
                return Err(bad(k, "must be >= 1".into()));
            }
        }
        if self.optim.lr.is_nan() || self.optim.lr <= 0.0 {
            return Err(bad("optim.lr", "must be > 0".into()));
        }
        if self.schedule.warmup_steps.is_some() && self.schedule.warmup_ratio.is_some() {
            return Err(bad(
                "schedule.warmup_steps",
                "set warmup_steps or warmup_ratio, not both".into(),
            ));
        }
        if !matches!(
            self.schedule.kind.as_str(),
            "constant" | "linear" | "cosine"
        ) {
            return Err(bad(
                "schedule.kind",
                format!(
                    "`{}` is not one of constant, linear, cosine",
                    self.schedule.kind
                ),
            ));
        }
        Ok(())
    }

    /// The stages to run, in order, every value resolved.
    pub fn stage_specs(&self) -> Vec<StageSpec> {
        if self.stages.is_empty() {
            return vec![StageSpec {
                name: "train".into(),
                train_proxy: self.data.instruction_mode == "proxy",
                train_lora: self.lora.is_some(),
                train_full: !self.full.groups.is_empty(),
                epochs: self.train.epochs,
                lr: self.optim.lr,
                momentum: None,
                instruction_mode: self.data.instruction_mode.clone(),
                max_steps: self.train.max_steps,
                output_dir: self.train.output_dir.clone(),
            }];
        }
        self.stages
            .iter()
            .map(|s| StageSpec {
                name: s.name.clone(),
                train_proxy: s.trainable.iter().any(|t| t == "proxy"),
                train_lora: s.trainable.iter().any(|t| t == "lora"),
                train_full: s.trainable.iter().any(|t| t == "full"),
                epochs: s.epochs.unwrap_or(self.train.epochs),
                lr: s.lr.unwrap_or(self.optim.lr),
                momentum: s.momentum,
                instruction_mode: s
                    .instruction_mode
                    .clone()
                    .unwrap_or_else(|| self.data.instruction_mode.clone()),
                max_steps: s.max_steps,
                output_dir: self.train.output_dir.join(&s.name),
            })
            .collect()
    }

    /// Canonical-name predicate of the fully trained weights.
    pub fn full_prefixes(&self) -> Vec<String> {
        self.full
            .groups
            .iter()
            .filter_map(|g| {
                FULL_GROUPS
                    .iter()
                    .find(|(n, _)| n == g)
                    .map(|(_, p)| p.to_string())
            })
            .collect()
    }
}

fn check_mode(_key: &str, mode: &str) -> std::result::Result<(), String> {
    if matches!(mode, "proxy" | "fixed" | "none") {
        Ok(())
    } else {
        Err(format!("`{mode}` is not one of proxy, fixed, none"))
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "m"
[data]
train = [{ manifest = "pairs.jsonl" }]
[lora]
r = 4
target_modules = ["q_proj", "v_proj"]
[train]
output_dir = "out"
"#;

    fn load(text: &str, ov: &[&str]) -> Result<TrainConfig> {
        let ov: Vec<String> = ov.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_toml_str(text, Path::new("x.toml"), &ov)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = load(
            MINIMAL,
            &[
                "optim.lr=1e-4",
                "train.epochs=3",
                "lora.target_modules=.*q_proj",
                "schedule.kind=cosine",
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 1e-4);
        assert_eq!(c.train.epochs, 3);
        assert_eq!(c.schedule.kind, "cosine");
        assert_eq!(
            c.lora.unwrap().target_modules,
            crate::model::lora::TargetModules::Pattern(".*q_proj".into())
        );
        assert_eq!(c.optim.max_grad_norm, Some(1.0));
        assert_eq!(c.data.instruction, "Describe this medical scan.");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = load(MINIMAL, &["optim.learning_rate=1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = load(&format!("{MINIMAL}\n[extra]\na=1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra"), "{e}");
        let e = load(MINIMAL, &["full.groups=[\"vision\"]"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision") && e.contains("full.groups"), "{e}");
        let e = load(MINIMAL, &["nonsense"]).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
    }
}
