//! The recipe's sections: the TOML schema and what `--set` addresses. Every value with a fixed
//! set of choices is an enum (a typo is a parse error listing the choices); numbers are checked
//! in `validate`.

use std::path::PathBuf;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::data::processor::AspectMode;
use crate::data::shuffle::Separator;
use crate::train::schedule::ScheduleKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl WeightDType {
    pub fn dtype(self) -> DType {
        match self {
            WeightDType::F32 => DType::F32,
            WeightDType::Bf16 => DType::BF16,
            WeightDType::F16 => DType::F16,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            WeightDType::Bf16 | WeightDType::F16 => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            WeightDType::F32 => "f32",
            WeightDType::Bf16 => "bf16",
            WeightDType::F16 => "f16",
        }
    }
}

/// What the user turn of a training sample holds besides the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstructionMode {
    /// N placeholder positions whose embeddings are the learnable proxy vectors (`[proxy]`).
    Proxy,
    /// The fixed `data.instruction` text.
    Fixed,
    /// No user text.
    None,
}

impl InstructionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            InstructionMode::Proxy => "proxy",
            InstructionMode::Fixed => "fixed",
            InstructionMode::None => "none",
        }
    }
}

/// How fresh proxy vectors are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyInit {
    /// U(-bound, bound), the reference.
    Uniform,
    /// The token embeddings of `init_text` (cycled to `tokens` rows).
    Text,
}

/// What a stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    /// The proxy vectors (the stage's instruction mode must be `proxy`).
    Proxy,
    /// The LoRA adapters of `[lora]` (or the previous stage's adapter).
    Lora,
    /// The module groups of `full.groups`.
    Full,
}

/// What a step with a non-finite loss or gradient norm does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Stop the stage with an error naming the step and the samples of its batch; the last
    /// checkpoint (all of whose steps were finite) stays the newest.
    #[default]
    Error,
    /// Drop the step (no update, the proxy's average untouched) and count it in the metrics.
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Number of placeholder positions / learnable vectors.
    #[serde(default = "default_proxy_tokens")]
    pub tokens: usize,
    #[serde(default = "default_proxy_init")]
    pub init: ProxyInit,
    #[serde(default)]
    pub init_text: Option<String>,
    /// Half-width of the uniform initialisation.
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
    /// Also the name of the stage's output subdirectory: letters, digits, `_` and `-`.
    pub name: String,
    /// What trains: any of `proxy`, `lora`, `full` (the groups of `full.groups`).
    pub trainable: Vec<Trainable>,
    #[serde(default)]
    pub epochs: Option<usize>,
    #[serde(default)]
    pub lr: Option<f64>,
    /// EMA momentum of the proxy vectors (reset to the average before each step); absent = none.
    #[serde(default)]
    pub momentum: Option<f64>,
    #[serde(default)]
    pub instruction_mode: Option<InstructionMode>,
    #[serde(default)]
    pub max_steps: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Checkpoint directory or Hub repo id.
    pub path: String,
    #[serde(default = "default_dtype")]
    pub dtype: WeightDType,
    #[serde(default = "default_device")]
    pub device: String,
    /// `resize` (HF processor), `pad` (LLaVA expand-to-square) or `squash` (the reference: plain
    /// resize to the processor's square size).
    #[serde(default)]
    pub image_aspect: AspectMode,
    /// At most this many tiles per picture, for families whose processor tiles images
    /// (Llama-3.2-Vision; the reference recipe uses 1). Absent: the processor's
    /// `max_image_tiles`.
    #[serde(default)]
    pub max_image_tiles: Option<usize>,
    /// What the trainable weights (full groups and LoRA adapters) and AdamW's moments are kept
    /// in. `f32` (default): f32 master weights and moments whatever `dtype` is. `bf16`: the
    /// reference recipe's numerics — torch's AdamW on bf16 parameters keeps them, their
    /// moments and its update math in bf16. The proxy vectors stay f32 either way.
    #[serde(default = "default_trainable_dtype")]
    pub trainable_dtype: WeightDType,
}

fn default_trainable_dtype() -> WeightDType {
    WeightDType::F32
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Manifests (CSV `image,text`, JSONL, LLaVA JSON).
    pub train: Vec<DataSource>,
    #[serde(default = "default_instruction_mode")]
    pub instruction_mode: InstructionMode,
    /// Response shuffling.
    #[serde(default)]
    pub shuffle: Separator,
    #[serde(default = "default_instruction")]
    pub instruction: String,
    /// Longest token sequence; longer descriptions are cut at the end (logged). Absent: a
    /// sample longer than the model's `max_position_embeddings` is an error.
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

/// Module groups trained in full (all their weights). They are excluded from the LoRA targets,
/// as LLaVA's own LoRA scripts do: a module is either fully trained or adapted, never both.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullSection {
    /// Names of groups the model's family defines (`model::family`), e.g. LLaVA's
    /// `multi_modal_projector`; checked against the family when the plan loads the model's
    /// `config.json`, where an unknown name is an error listing the family's groups.
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
    /// Whether the proxy vectors count in (and are scaled by) the grad-norm clip. The reference
    /// clips the model's parameters only, so the default is `false`.
    #[serde(default)]
    pub clip_proxy: bool,
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
            clip_proxy: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    #[serde(default = "default_schedule")]
    pub kind: ScheduleKind,
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
    /// Micro-batches per optimizer step; their losses are weighted by their loss tokens, so k
    /// micro-batches of b samples give the update of one batch of k·b.
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
    /// A step whose loss or gradient norm is not finite: `error` (stop) or `skip` (counted).
    #[serde(default)]
    pub on_nonfinite: NonFinitePolicy,
    /// Activation checkpointing: keep only each vision/decoder layer's input for the backward
    /// pass and run the layer again there (one more forward per layer, a fraction of the
    /// activation memory). Absent = on for `model.device = "cuda…"`, off on the CPU.
    #[serde(default)]
    pub activation_checkpointing: Option<bool>,
}

/// The frozen-vision feature cache ([`crate::data::feature_cache`]): used by a stage whose
/// vision tower is frozen (no trained weight, no LoRA adapter with dropout in it), so that later
/// epochs, later stages and `eval --vision-cache` skip decoding, preprocessing and the tower.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionCacheSection {
    /// Off: the tower runs on every picture of every step.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where entries live; absent = `<train.output_dir>/vision-cache`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// At most this many GiB in `dir` (every model's entries together); once full, nothing more
    /// is stored and what is there keeps serving.
    #[serde(default = "default_cache_gib")]
    pub max_gib: f64,
}

impl Default for VisionCacheSection {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            max_gib: default_cache_gib(),
        }
    }
}

impl VisionCacheSection {
    /// The cache folder of a run writing to `output_dir`.
    pub fn dir_for(&self, output_dir: &std::path::Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| output_dir.join(VISION_CACHE_DIR))
    }

    pub fn max_bytes(&self) -> u64 {
        crate::data::feature_cache::gib_to_bytes(self.max_gib)
    }
}

/// The default cache folder's name inside `train.output_dir`.
pub const VISION_CACHE_DIR: &str = "vision-cache";

fn yes() -> bool {
    true
}
fn default_cache_gib() -> f64 {
    8.0
}
fn default_dtype() -> WeightDType {
    WeightDType::F32
}
fn default_device() -> String {
    "cpu".into()
}
fn default_instruction_mode() -> InstructionMode {
    InstructionMode::Fixed
}
fn default_instruction() -> String {
    "Describe this medical scan.".into()
}
fn default_proxy_tokens() -> usize {
    8
}
fn default_proxy_init() -> ProxyInit {
    ProxyInit::Uniform
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
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Constant
}
fn default_seed() -> u64 {
    1
}
