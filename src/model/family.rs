//! The model-family boundary: the one place that reads `config.json`'s `architectures` (or
//! `model_type`) and picks the family, and the trait every family implements.
//!
//! A family owns everything about its checkpoints that the rest of the crate must not guess:
//! its key layouts (mapped onto one canonical naming), its module groups, its parameter shapes
//! computed from `config.json` alone (so `train --dry-run` needs no weight files), its
//! unused-weight rules (inside `load`), its image processor, and its prompt defaults (image
//! token, chat-template fallback). Adding a family is a folder under `model/` implementing
//! [`ModelFamily`] plus one line in [`FAMILIES`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::data::processor::{AspectMode, ImageProcessor};
use crate::data::prompt::{ChatTemplate, PromptDefaults, TextProcessor};
use crate::error::{Error, Result};
use crate::model::llava::LlavaFamily;
use crate::model::lora::LoraFactory;
use crate::model::mllama::MllamaFamily;
use crate::model::weights::{KeyMap, TrainableFilter, WeightStore};
use crate::model::VisionLanguageModel;

/// Every family lvlm-ift runs, in the order they are tried.
pub static FAMILIES: &[&dyn ModelFamily] = &[&LlavaFamily, &MllamaFamily];

/// Rows `start..end` of a 2-D weight that a group owns while the rest of the weight belongs to
/// another group (Mllama's `fusion` owns the 8 embedding rows past the vocabulary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSlice {
    pub weight: String,
    pub start: usize,
    pub end: usize,
}

/// A set of weights a recipe can train in full (`full.groups`), named by the family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleGroup {
    pub name: &'static str,
    /// What the group holds, for plans and error messages.
    pub about: &'static str,
    /// Canonical-name prefixes of the group's weights.
    prefixes: Vec<String>,
    /// Parts of weights outside `prefixes` that the group also holds.
    rows: Vec<RowSlice>,
}

impl ModuleGroup {
    pub fn new(name: &'static str, about: &'static str, prefixes: Vec<String>) -> Self {
        Self {
            name,
            about,
            prefixes,
            rows: Vec::new(),
        }
    }

    pub fn with_rows(mut self, rows: Vec<RowSlice>) -> Self {
        self.rows = rows;
        self
    }

    pub fn rows(&self) -> &[RowSlice] {
        &self.rows
    }

    /// Whether the weight of this canonical name belongs to the group.
    pub fn contains(&self, canonical: &str) -> bool {
        self.prefixes.iter().any(|p| canonical.starts_with(p))
    }

    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }
}

/// A linear layer LoRA may adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearModule {
    pub in_dim: usize,
    pub out_dim: usize,
    /// False for layers the checkpoint holds but the model never runs (CLIP layers past the
    /// deepest feature layer): they get adapters only so the PEFT adapter is complete.
    pub runs: bool,
}

/// A model as its `config.json` describes it, before any weight is read.
pub struct ModelLayout {
    pub family: &'static dyn ModelFamily,
    pub dir: PathBuf,
    /// Every parameter of the HF model by canonical name, with its shape: what
    /// `model.named_parameters()` lists in transformers (buffers excluded, a tied head absent).
    pub params: BTreeMap<String, Vec<usize>>,
    /// Parameters the checkpoint holds but the model never runs (e.g. CLIP layers past LLaVA's
    /// deepest feature layer): never loaded, so never trained.
    pub unrun: BTreeSet<String>,
    /// Linear layers by canonical module name (no `.weight`).
    pub linear_modules: BTreeMap<String, LinearModule>,
    pub groups: Vec<ModuleGroup>,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub image_token_id: u32,
    /// Placeholder tokens one image occupies in the prompt.
    pub num_image_tokens: usize,
}

impl std::fmt::Debug for ModelLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelLayout")
            .field("family", &self.family.name())
            .field("dir", &self.dir)
            .field("params", &self.params.len())
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl ModelLayout {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The family's group of this name; an unknown name is an error listing the family's groups.
    pub fn group(&self, name: &str) -> Result<&ModuleGroup> {
        self.groups.iter().find(|g| g.name == name).ok_or_else(|| {
            Error::Model(format!(
                "`{name}` is not a module group of {} models ({}); the groups are: {}",
                self.family.name(),
                self.config_path().display(),
                self.describe_groups()
            ))
        })
    }

    /// `name (about), ...` of every group, for messages.
    pub fn describe_groups(&self) -> String {
        self.groups
            .iter()
            .map(|g| format!("{} ({})", g.name, g.about))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn total_params(&self) -> usize {
        self.params
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Parameters whose canonical name passes `keep`.
    pub fn count_params(&self, keep: impl Fn(&str) -> bool) -> usize {
        self.params
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Parameters of a group, its row slices included.
    pub fn group_params(&self, group: &ModuleGroup) -> usize {
        let rows: usize = group
            .rows()
            .iter()
            .filter(|r| !group.contains(&r.weight))
            .filter_map(|r| {
                let shape = self.params.get(&r.weight)?;
                Some((r.end - r.start) * shape[1..].iter().product::<usize>())
            })
            .sum();
        self.count_params(|p| group.contains(p)) + rows
    }

    /// The chat template and tokenizer of the model directory, with the family's defaults, the
    /// image token checked against `config.json` and EOS within the model's vocabulary.
    pub fn prompt(&self) -> Result<(ChatTemplate, TextProcessor)> {
        let defaults = self.family.prompt_defaults();
        let template = ChatTemplate::from_model_dir_with(&self.dir, &defaults)?;
        let text = TextProcessor::from_model_dir_with(
            &self.dir,
            self.image_token_id,
            self.num_image_tokens,
            &defaults,
        )?;
        text.check_eos_within(self.vocab_size, &self.config_path())?;
        Ok((template, text))
    }
}

/// How a family's image processor is set up beyond its `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageOptions {
    /// How a non-square picture reaches the processor (recipe `model.image_aspect`).
    pub aspect: AspectMode,
    /// At most this many tiles per picture (recipe `model.max_image_tiles`); only for families
    /// whose processor tiles (Mllama), an error elsewhere.
    pub max_tiles: Option<usize>,
}

/// What to load and how.
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Canonical weight names that become trainable `Var`s (kept in f32).
    pub trainable: Option<TrainableFilter>,
    /// LoRA adapters to attach (fresh or loaded) as the model is built.
    pub lora: Option<LoraFactory>,
    /// Weights replacing the checkpoint's, by canonical name (e.g. from an earlier stage).
    pub overrides: std::collections::HashMap<String, Tensor>,
    /// Row slices of weights that train while the rest of each weight stays frozen.
    pub trainable_rows: Vec<RowSlice>,
    /// What trainable weights are held in (f32 unless the reference's bf16 numerics are asked
    /// for; an f64 model keeps f64).
    pub trainable_dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            trainable: None,
            lora: None,
            overrides: Default::default(),
            trainable_dtype: DType::F32,
            trainable_rows: Vec::new(),
        }
    }
}

impl LoadOptions {
    /// The store of the checkpoint in `dir` (keys mapped by `key_map`) with these options
    /// applied: trainable weights and rows, LoRA, overrides. What every family's `load` starts
    /// from.
    pub fn open_store(self, dir: &Path, key_map: KeyMap) -> Result<WeightStore> {
        let files = crate::model::checkpoint::weight_files(dir)?;
        let mut store = WeightStore::open(dir, &files, &self.device, self.dtype, key_map)?
            .with_trainable_dtype(self.trainable_dtype);
        if let Some(filter) = self.trainable {
            store = store.with_trainable(filter);
        }
        if let Some(lora) = self.lora {
            store = store.with_lora(lora);
        }
        if !self.overrides.is_empty() {
            store = store.with_overrides(self.overrides)?;
        }
        if !self.trainable_rows.is_empty() {
            let rows = self
                .trainable_rows
                .into_iter()
                .map(|r| (r.weight, r.start, r.end))
                .collect();
            store = store.with_trainable_rows(rows);
        }
        Ok(store)
    }
}

/// What every model family implements.
pub trait ModelFamily: Sync {
    /// Short name used in plans and messages (`llava`).
    fn name(&self) -> &'static str;
    /// The `architectures` entries of `config.json` this family loads.
    fn architectures(&self) -> &'static [&'static str];
    /// The `model_type` values it loads (used when `architectures` is absent).
    fn model_types(&self) -> &'static [&'static str];
    /// Checkpoint key (any layout the family accepts) → canonical name.
    fn key_map(&self) -> KeyMap;
    /// Image token and chat template assumed when the model directory names none.
    fn prompt_defaults(&self) -> PromptDefaults;
    /// Shapes, groups and limits from `config.json` alone.
    fn layout(&'static self, dir: &Path) -> Result<ModelLayout>;
    /// Build the model from the directory's weights. Returns the store too, so callers can
    /// collect trainable variables and adapters.
    fn load(
        &self,
        dir: &Path,
        opts: LoadOptions,
    ) -> Result<(Box<dyn VisionLanguageModel>, WeightStore)>;
    /// The family's image processor, configured from the directory and checked against the
    /// vision encoder `layout` describes.
    fn image_processor(&self, layout: &ModelLayout, opts: &ImageOptions) -> Result<ImageProcessor>;
    /// The layer stacks of a training forward (for the memory estimate); `max_tiles` caps
    /// Mllama's tiles per image (`model.max_image_tiles`).
    fn activation_profile(
        &self,
        layout: &ModelLayout,
        max_tiles: Option<usize>,
    ) -> Result<crate::model::activation_profile::ActivationProfile>;
    /// The group whose output [`VisionLanguageModel::vision_states`] returns, when the family can
    /// take those states back ([`crate::model::VisionInput::States`]) so that the frozen-vision
    /// feature cache can serve them; `None` when it cannot. Mllama cannot: its tiled states
    /// are 1601 × 7680 values per tile, ~100 MB per four-tile picture in bf16, a cache
    /// thousands of times the size of the images.
    fn cached_vision_group(&self) -> Option<&'static str> {
        None
    }
}

/// The family of the checkpoint in `dir`, from its `config.json`.
pub fn family_of(dir: &Path) -> Result<&'static dyn ModelFamily> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(&path, e))?;
    let supported = || {
        FAMILIES
            .iter()
            .map(|f| format!("{} ({})", f.architectures().join(", "), f.name()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let bad = |key: &str, reason: String| Error::Config {
        path: path.clone(),
        key: key.into(),
        reason,
    };
    if let Some(archs) = json.get("architectures").filter(|v| !v.is_null()) {
        let names: Vec<&str> = archs
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            return Err(bad(
                "architectures",
                format!("expected a list of class names, found {archs}"),
            ));
        }
        for name in &names {
            if let Some(f) = FAMILIES.iter().find(|f| f.architectures().contains(name)) {
                return Ok(*f);
            }
        }
        return Err(bad(
            "architectures",
            format!(
                "{} is not a supported architecture; supported: {}",
                names.join(", "),
                supported()
            ),
        ));
    }
    match json.get("model_type").and_then(|v| v.as_str()) {
        Some(t) => FAMILIES
            .iter()
            .find(|f| f.model_types().contains(&t))
            .copied()
            .ok_or_else(|| {
                bad(
                    "model_type",
                    format!(
                        "`{t}` is not a supported model type; supported: {}",
                        supported()
                    ),
                )
            }),
        None => Err(bad(
            "architectures",
            format!(
                "neither `architectures` nor `model_type` says which model this is; supported: {}",
                supported()
            ),
        )),
    }
}

/// [`ModelLayout`] of the checkpoint in `dir` (reads `config.json` only).
pub fn layout(dir: &Path) -> Result<ModelLayout> {
    family_of(dir)?.layout(dir)
}

/// A loaded checkpoint: what it is, the model, its weights and its image processor.
pub struct OpenedModel {
    pub layout: ModelLayout,
    pub model: Box<dyn VisionLanguageModel>,
    pub store: WeightStore,
    pub processor: ImageProcessor,
}

/// Load the checkpoint in `dir` with the family its `config.json` names.
pub fn open(dir: &Path, opts: LoadOptions, image: &ImageOptions) -> Result<OpenedModel> {
    let layout = layout(dir)?;
    open_with_layout(layout, opts, image)
}

/// [`open`] for a layout already read (the plan reads it first, to check the recipe).
pub fn open_with_layout(
    layout: ModelLayout,
    opts: LoadOptions,
    image: &ImageOptions,
) -> Result<OpenedModel> {
    let processor = layout.family.image_processor(&layout, image)?;
    let (model, store) = layout.family.load(&layout.dir, opts)?;
    Ok(OpenedModel {
        layout,
        model,
        store,
        processor,
    })
}
