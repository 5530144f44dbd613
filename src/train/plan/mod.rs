//! One stage of a recipe, validated into a [`TrainPlan`] before any heavy work: the model as its
//! `config.json` describes it ([`ModelLayout`]), what trains per module group (frozen / LoRA /
//! full, carried over from the previous stage), the proxy vectors, data, step counts.
//! No weight is read here, so `--dry-run` ([`TrainPlan::describe`]) works on a directory that
//! holds only `config.json` and the tokenizer files; the `Trainer` loads the weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use crate::adapter::read_adapter_config;
use crate::config::{InstructionMode, StageSpec, TrainConfig};
use crate::data::batch::BatchMaker;
use crate::data::collate::Instruction;
use crate::data::pairs::{load_pair_sources, Pair, PairSource};
use crate::data::processor::ImageProcessor;
use crate::error::{Error, Result};
use crate::model::checkpoint::resolve_model;
use crate::model::family::{layout, LinearModule};
use crate::model::lora::LoraSpec;
use crate::model::parse_device;
use crate::model::{ImageOptions, ModelLayout, ModuleGroup};
use crate::train::schedule::{Schedule, Warmup};

mod checks;
mod describe;
pub mod memory;
use checks::{check_every_choice_trains, check_lora_ranks, check_sequence_bounds, epochs_key};
pub(crate) use checks::{describe_targets, recipe_lora_error};

/// Files a finished stage leaves for the next one (and for users).
pub const ADAPTER_DIR: &str = "adapter";
pub const FULL_WEIGHTS: &str = "full_weights.safetensors";
pub const PROXY_FILE: &str = "proxy.safetensors";
/// The name of the proxy vectors among the trainable tensors.
pub const PROXY_PARAM: &str = "proxy";

/// How a module group takes part in a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainability {
    Frozen,
    /// Some of its linear layers carry trained LoRA adapters; the base weights stay frozen.
    Lora,
    /// Every weight of the group trains.
    Full,
    /// Some of its weights train in full (through an overlapping group, or a row slice), the
    /// rest stays frozen.
    PartlyFull,
}

impl Trainability {
    pub fn as_str(self) -> &'static str {
        match self {
            Trainability::Frozen => "frozen",
            Trainability::Lora => "lora",
            Trainability::Full => "full",
            Trainability::PartlyFull => "partly full",
        }
    }
}

/// A stage's use of the frozen-vision feature cache ([`TrainPlan::vision_cache`]).
#[derive(Debug, Clone, PartialEq)]
pub enum VisionCacheUse {
    /// Read and fill the cache under `dir`, bounded by `max_bytes`.
    On { dir: PathBuf, max_bytes: u64 },
    /// Not used, and why.
    Off(String),
}

/// The stage's LoRA: the previous stage's adapter (trained further or frozen), or fresh adapters.
#[derive(Debug, Clone)]
pub struct StageLora {
    pub spec: LoraSpec,
    /// The previous stage's adapter directory; `None` = freshly initialised adapters.
    pub from: Option<PathBuf>,
    /// Whether this stage trains the adapters.
    pub trains: bool,
}

/// Everything a stage needs, validated, before any weight is read.
pub struct TrainPlan {
    pub cfg: TrainConfig,
    pub stage: StageSpec,
    pub layout: ModelLayout,
    /// The recipe's device, opened (the CPU in a dry-run plan, which never runs).
    pub device: Device,
    /// The groups fresh adapters leave out: `full.groups` when some stage of the recipe trains
    /// `full` (within a recipe a module trains one way, in full or through an adapter), whatever
    /// this stage trains; none when no stage does (those groups are then frozen base weights).
    pub lora_excluded_groups: Vec<ModuleGroup>,
    /// The groups this stage trains in full (empty unless it trains `full`).
    pub full_groups: Vec<ModuleGroup>,
    pub lora: Option<StageLora>,
    /// Linear layers that get an adapter, by canonical module name.
    pub lora_modules: BTreeMap<String, LinearModule>,
    /// The training pairs, after repeats.
    pub pairs: Arc<Vec<Pair>>,
    pub processor: ImageProcessor,
    /// `None` only in a plan for `--dry-run` of a model directory without tokenizer files
    /// (e.g. a checkpoint's bare `config.json`): nothing is tokenized then.
    pub batches: Option<BatchMaker>,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    /// Data-parallel ranks: each step's global batch is `world_size` × `train.batch_size` ×
    /// `train.grad_accum` samples, every rank taking its shard of each micro-batch.
    pub world_size: usize,
    /// Where the previous stage's outputs came from, if any.
    pub previous: Option<PathBuf>,
}

impl TrainPlan {
    /// Plan `stage` of `cfg`, continuing from the outputs of the stage before it (`previous`).
    pub fn build(cfg: &TrainConfig, stage: &StageSpec, previous: Option<&Path>) -> Result<Self> {
        Self::build_with(cfg, stage, previous, false, 1)
    }

    /// [`TrainPlan::build`] for one of `world_size` data-parallel ranks.
    pub fn build_for_world(
        cfg: &TrainConfig,
        stage: &StageSpec,
        previous: Option<&Path>,
        world_size: usize,
    ) -> Result<Self> {
        Self::build_with(cfg, stage, previous, false, world_size)
    }

    /// [`TrainPlan::build`] for `--dry-run`: the device is not opened (a CUDA recipe is planned
    /// on a machine without the GPU) and a model directory without `tokenizer.json` is planned
    /// all the same, without the rendered sample.
    pub fn build_for_dry_run(
        cfg: &TrainConfig,
        stage: &StageSpec,
        previous: Option<&Path>,
        world_size: usize,
    ) -> Result<Self> {
        Self::build_with(cfg, stage, previous, true, world_size)
    }

    fn build_with(
        cfg: &TrainConfig,
        stage: &StageSpec,
        previous: Option<&Path>,
        dry_run: bool,
        world_size: usize,
    ) -> Result<Self> {
        if world_size == 0 {
            return Err(Error::Model("a run needs at least one rank".into()));
        }
        let device = if dry_run {
            Device::Cpu
        } else {
            parse_device(&cfg.model.device)?
        };
        let model_dir = resolve_model(&cfg.model.path)?;
        let layout = layout(&model_dir)?;
        let recipe_full_groups = cfg
            .full
            .groups
            .iter()
            .enumerate()
            .map(|(i, name)| {
                layout.group(name).cloned().map_err(|e| Error::Config {
                    path: cfg.source.clone(),
                    key: format!("full.groups[{i}]"),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let full_groups = if stage.train_full {
            recipe_full_groups.clone()
        } else {
            Vec::new()
        };
        let lora_excluded_groups = if cfg.stage_specs().iter().any(|s| s.train_full) {
            recipe_full_groups
        } else {
            Vec::new()
        };
        let lora = lora_for_stage(cfg, stage, previous, &lora_excluded_groups)?;
        let lora_modules = match &lora {
            Some(l) => {
                let matcher = l.spec.matcher()?;
                layout
                    .linear_modules
                    .iter()
                    .filter(|(m, _)| matcher.matches(m))
                    .map(|(m, l)| (m.clone(), *l))
                    .collect()
            }
            None => BTreeMap::new(),
        };
        if let Some(l) = &lora {
            check_lora_ranks(cfg, l, &lora_modules)?;
        }
        check_sequence_bounds(cfg, stage, &layout)?;
        let processor = layout
            .family
            .image_processor(
                &layout,
                &ImageOptions {
                    aspect: cfg.model.image_aspect,
                    max_tiles: cfg.model.max_image_tiles,
                },
            )
            .map_err(|e| match cfg.model.max_image_tiles {
                Some(_) if matches!(e, Error::Model(_)) => Error::Config {
                    path: cfg.source.clone(),
                    key: "model.max_image_tiles".into(),
                    reason: e.to_string(),
                },
                _ => e,
            })?;
        let sources: Vec<PairSource> = cfg
            .data
            .train
            .iter()
            .map(|s| PairSource {
                manifest: s.manifest.clone(),
                image_root: s.image_root.clone(),
                repeat: s.repeat,
            })
            .collect();
        let pairs = Arc::new(load_pair_sources(&sources)?);
        if pairs.is_empty() {
            return Err(Error::Model("the training set is empty".into()));
        }
        let batches = if !dry_run || layout.dir.join("tokenizer.json").is_file() {
            // Every sample ends with EOS, which must be a row of the model's head (checked there).
            let (template, text) = layout.prompt()?;
            let instruction = match stage.instruction_mode {
                InstructionMode::Proxy => Instruction::Proxy {
                    tokens: cfg.proxy.tokens,
                    placeholder_id: text.pad_token_id().or(text.bos_token_id()).unwrap_or(0),
                },
                InstructionMode::None => Instruction::None,
                InstructionMode::Fixed => Instruction::Fixed(cfg.data.instruction.clone()),
            };
            Some(BatchMaker {
                pairs: pairs.clone(),
                template,
                text,
                processor: processor.clone(),
                instruction,
                max_len: cfg.data.max_len,
                max_positions: layout.max_positions,
                shuffle: cfg.data.shuffle,
                seed: cfg.train.seed,
                // Set by the trainer once the weights are loaded (the cache's key needs them).
                vision_cache: None,
            })
        } else {
            None
        };
        let micro_per_epoch = pairs.len().div_ceil(cfg.train.batch_size * world_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(cfg.train.grad_accum);
        let all = steps_per_epoch
            .checked_mul(stage.epochs)
            .ok_or_else(|| Error::Config {
                path: cfg.source.clone(),
                key: epochs_key(cfg, stage),
                reason: format!(
                    "{} epochs of {steps_per_epoch} steps overflow the step counter",
                    stage.epochs
                ),
            })?;
        let total_steps = stage.max_steps.unwrap_or(all).min(all);
        let plan = Self {
            cfg: cfg.clone(),
            stage: stage.clone(),
            layout,
            device,
            lora_excluded_groups,
            full_groups,
            lora,
            lora_modules,
            pairs,
            processor,
            batches,
            steps_per_epoch,
            total_steps,
            world_size,
            previous: previous.map(Path::to_path_buf),
        };
        check_every_choice_trains(&plan)?;
        Ok(plan)
    }

    pub fn model_dir(&self) -> &Path {
        &self.layout.dir
    }

    /// Global micro-batches per epoch (each of `world_size` × `train.batch_size` samples).
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.pairs.len().div_ceil(self.global_micro_batch())
    }

    /// Whether layers are recomputed in the backward pass (`train.activation_checkpointing`,
    /// by default on for a GPU).
    pub fn activation_checkpointing(&self) -> bool {
        self.cfg
            .train
            .activation_checkpointing
            .unwrap_or_else(|| self.cfg.model.device.starts_with("cuda"))
    }

    /// Samples of one micro-batch over all ranks.
    pub fn global_micro_batch(&self) -> usize {
        self.cfg.train.batch_size * self.world_size
    }

    /// The batch builder; an error for a plan made without tokenizer files.
    pub fn batch_maker(&self) -> Result<&BatchMaker> {
        self.batches.as_ref().ok_or_else(|| {
            Error::Model(format!(
                "{} has no tokenizer.json: training needs the tokenizer files next to config.json",
                self.model_dir().display()
            ))
        })
    }

    /// Whether this canonical weight trains in full in this stage.
    pub fn trains_in_full(&self, name: &str) -> bool {
        self.full_group_of(name).is_some()
    }

    /// The first of this stage's full groups that holds the weight.
    pub fn full_group_of(&self, name: &str) -> Option<&ModuleGroup> {
        self.full_groups.iter().find(|g| g.contains(name))
    }

    /// The row slices this stage trains apart from their weight (their weight not trained whole).
    pub fn trained_row_slices(&self) -> Vec<crate::model::family::RowSlice> {
        self.full_groups
            .iter()
            .flat_map(|g| g.rows().iter().cloned())
            .filter(|r| !self.trains_in_full(&r.weight) && !self.layout.unrun.contains(&r.weight))
            .collect()
    }

    /// The full group a trainable tensor belongs to: a whole weight's, or a row slice's
    /// (`{weight}[{start}:{end}]`).
    pub fn param_group(&self, name: &str) -> Option<&ModuleGroup> {
        if let Some((weight, start, end)) = crate::model::weights::parse_row_param(name) {
            return self.full_groups.iter().find(|g| {
                g.rows()
                    .iter()
                    .any(|r| r.weight == weight && r.start == start && r.end == end)
            });
        }
        self.full_group_of(name)
    }

    /// How each of the family's groups takes part in this stage, with how many of its
    /// parameters train in full (through it or through another group that overlaps it).
    pub fn group_trainability(&self) -> Vec<(&ModuleGroup, Trainability, usize)> {
        let lora_trains = self.lora.as_ref().is_some_and(|l| l.trains);
        let rows = self.trained_row_slices();
        self.layout
            .groups
            .iter()
            .map(|g| {
                let whole = self.layout.count_params(|p| {
                    g.contains(p) && self.trains_in_full(p) && !self.layout.unrun.contains(p)
                });
                let sliced: usize = rows
                    .iter()
                    .filter(|r| g.contains(&r.weight) || g.rows().contains(r))
                    .filter_map(|r| {
                        let shape = self.layout.params.get(&r.weight)?;
                        Some((r.end - r.start) * shape[1..].iter().product::<usize>())
                    })
                    .sum();
                let trained = whole + sliced;
                let runnable = self.layout.group_params(g)
                    - self
                        .layout
                        .count_params(|p| g.contains(p) && self.layout.unrun.contains(p));
                let t = if trained > 0 && trained >= runnable {
                    Trainability::Full
                } else if trained > 0 {
                    Trainability::PartlyFull
                } else if lora_trains
                    && self
                        .lora_modules
                        .iter()
                        .any(|(m, l)| l.runs && g.contains(&format!("{m}.weight")))
                {
                    Trainability::Lora
                } else {
                    Trainability::Frozen
                };
                (g, t, trained)
            })
            .collect()
    }

    /// Whether this stage reads and fills the frozen-vision feature cache, and where; or why not.
    pub fn vision_cache(&self) -> VisionCacheUse {
        let cfg = &self.cfg.vision_cache;
        if !cfg.enabled {
            return VisionCacheUse::Off("vision_cache.enabled = false".into());
        }
        let Some(name) = self.layout.family.cached_vision_group() else {
            return VisionCacheUse::Off(format!(
                "the {} family's vision states are not cached",
                self.layout.family.name()
            ));
        };
        let Some((group, how, _)) = self
            .group_trainability()
            .into_iter()
            .find(|(g, _, _)| g.name == name)
        else {
            return VisionCacheUse::Off(format!("the family has no `{name}` group"));
        };
        if how != Trainability::Frozen {
            return VisionCacheUse::Off(format!("{name} is not frozen ({})", how.as_str()));
        }
        if let Some(lora) = &self.lora {
            let adapted = self
                .lora_modules
                .iter()
                .any(|(m, l)| l.runs && group.contains(&format!("{m}.weight")));
            if adapted && lora.spec.dropout > 0.0 {
                return VisionCacheUse::Off(format!(
                    "LoRA dropout {} on {name}'s adapters makes its output random",
                    lora.spec.dropout
                ));
            }
        }
        VisionCacheUse::On {
            dir: cfg.dir_for(&self.cfg.train.output_dir),
            max_bytes: cfg.max_bytes(),
        }
    }

    /// Trainable parameter counts by role (`full` groups by name, `lora`, `proxy`), from the
    /// layout alone: what the trainer will hold as `Var`s.
    pub fn trainable_counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (name, shape) in &self.layout.params {
            if self.layout.unrun.contains(name) {
                continue;
            }
            if let Some(g) = self.full_group_of(name) {
                *out.entry(g.name.to_string()).or_default() += shape.iter().product::<usize>();
            }
        }
        // Rows a group owns of a weight that does not train whole (Mllama's extra embeddings).
        for g in &self.full_groups {
            for r in g.rows() {
                if self.trains_in_full(&r.weight) || self.layout.unrun.contains(&r.weight) {
                    continue;
                }
                if let Some(shape) = self.layout.params.get(&r.weight) {
                    let per_row: usize = shape[1..].iter().product();
                    *out.entry(g.name.to_string()).or_default() += (r.end - r.start) * per_row;
                }
            }
        }
        if let Some(l) = self.lora.as_ref().filter(|l| l.trains) {
            let n: usize = self
                .lora_modules
                .values()
                .filter(|m| m.runs)
                .map(|m| l.spec.r * (m.in_dim + m.out_dim))
                .sum();
            if n > 0 {
                out.insert("lora".into(), n);
            }
        }
        if self.stage.train_proxy {
            out.insert(
                PROXY_PARAM.into(),
                self.cfg.proxy.tokens * self.layout.hidden_size,
            );
        }
        out
    }

    pub fn schedule(&self) -> Result<Schedule> {
        let kind = self.cfg.schedule.kind;
        let warmup = match (
            self.cfg.schedule.warmup_steps,
            self.cfg.schedule.warmup_ratio,
        ) {
            (Some(s), _) => Warmup::Steps(s),
            (None, Some(r)) => Warmup::Ratio(r),
            (None, None) => Warmup::Steps(0),
        };
        Schedule::new(
            kind,
            self.stage.lr,
            warmup,
            self.total_steps,
            self.cfg.schedule.min_lr,
        )
    }
}

/// LoRA for a stage: the previous stage's adapter if there is one (trained further or frozen),
/// else fresh adapters when this stage trains LoRA (leaving out `excluded`), else none.
fn lora_for_stage(
    cfg: &TrainConfig,
    stage: &StageSpec,
    previous: Option<&Path>,
    excluded: &[ModuleGroup],
) -> Result<Option<StageLora>> {
    let prev_adapter = previous.map(|p| p.join(ADAPTER_DIR)).filter(|p| p.is_dir());
    Ok(match (prev_adapter, &cfg.lora) {
        (Some(dir), _) => Some(StageLora {
            spec: read_adapter_config(&dir)?.1,
            from: Some(dir),
            trains: stage.train_lora,
        }),
        (None, Some(spec)) if stage.train_lora => {
            let prefixes: Vec<String> = excluded
                .iter()
                .flat_map(|g| g.prefixes().iter().cloned())
                .collect();
            let spec = spec.excluding_prefixes(&prefixes);
            spec.validate().map_err(|e| recipe_lora_error(cfg, e))?;
            Some(StageLora {
                spec,
                from: None,
                trains: true,
            })
        }
        _ => None,
    })
}
