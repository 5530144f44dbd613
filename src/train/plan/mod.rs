//! One stage of a recipe, validated and loaded into a [`TrainPlan`] before any heavy work:
//! model with its trainable set (LoRA / full groups / proxy vectors, carried over from the
//! previous stage), data, optimizer layout, step counts. `--dry-run` prints [`TrainPlan::describe`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Var};

use crate::adapter::read_adapter;
use crate::config::{InstructionMode, ProxyInit, StageSpec, TrainConfig};
use crate::data::batch::BatchMaker;
use crate::data::collate::{Instruction, IGNORE_INDEX};
use crate::data::pairs::{load_pair_sources, PairSource};
use crate::data::processor::{ClipImageProcessor, ClipProcessorConfig};
use crate::data::prompt::{ChatTemplate, TextProcessor};
use crate::error::{Error, Result};
use crate::method::proxy::ProxyInstruction;
use crate::model::checkpoint::resolve_model;
use crate::model::llava::{LlavaModel, LoadOptions};
use crate::model::lora::LoraFactory;
use crate::model::parse_device;
use crate::model::weights::WeightStore;
use crate::model::VisionLanguageModel;
use crate::train::checkpoint::load_float_safetensors;
use crate::train::optim::{AdamW, AdamWConfig, ParamGroup};
use crate::train::schedule::{Schedule, Warmup};

mod checks;
use checks::{
    check_every_choice_trains, check_sequence_bounds, describe_targets, epochs_key,
    recipe_lora_error,
};

/// Files a finished stage leaves for the next one (and for users).
pub const ADAPTER_DIR: &str = "adapter";
pub const FULL_WEIGHTS: &str = "full_weights.safetensors";
pub const PROXY_FILE: &str = "proxy.safetensors";
/// The name of the proxy vectors among the trainable tensors.
pub const PROXY_PARAM: &str = "proxy";

/// One trainable tensor: its export name and which group it belongs to.
#[derive(Clone)]
pub struct TrainParam {
    /// Canonical weight name, `{module}.lora_A.weight` / `.lora_B.weight`, or `proxy`.
    pub name: String,
    pub var: Var,
    /// "lora", "proxy" or the full-training group name.
    pub group: String,
}

/// Everything a stage needs, loaded and validated, before the first step.
pub struct TrainPlan {
    pub cfg: TrainConfig,
    pub stage: StageSpec,
    pub model_dir: PathBuf,
    pub model: LlavaModel,
    pub store: WeightStore,
    pub batches: BatchMaker,
    pub proxy: Option<ProxyInstruction>,
    pub params: Vec<TrainParam>,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub device: Device,
    /// Where the previous stage's outputs came from, if any.
    pub previous: Option<PathBuf>,
}

impl TrainPlan {
    /// Load `stage` of `cfg`, continuing from the outputs of the stage before it (`previous`).
    pub fn build(cfg: &TrainConfig, stage: &StageSpec, previous: Option<&Path>) -> Result<Self> {
        let device = parse_device(&cfg.model.device)?;
        let dtype = cfg.model.dtype.dtype();
        let model_dir = resolve_model(&cfg.model.path)?;
        let prefixes = if stage.train_full {
            cfg.full_prefixes()
        } else {
            Vec::new()
        };
        let lora = lora_for_stage(cfg, stage, previous, &device)?;
        let overrides = match previous
            .map(|p| p.join(FULL_WEIGHTS))
            .filter(|p| p.is_file())
        {
            Some(f) => load_float_safetensors(&f, &device)?,
            None => HashMap::new(),
        };
        let (model, store) = LlavaModel::load(
            &model_dir,
            LoadOptions {
                device: device.clone(),
                dtype,
                trainable: Some(Box::new(move |name: &str| {
                    prefixes.iter().any(|p| name.starts_with(p))
                })),
                lora,
                overrides,
            },
        )
        .map_err(|e| recipe_lora_error(cfg, e))?;
        let processor = ClipImageProcessor::new(
            ClipProcessorConfig::from_model_dir(&model_dir)?,
            cfg.model.image_aspect,
        )?;
        let max_positions = model.config().text.max_position_embeddings;
        check_sequence_bounds(
            cfg,
            stage,
            &model_dir,
            max_positions,
            model.num_image_tokens(),
        )?;
        let template = ChatTemplate::from_model_dir(&model_dir)?;
        let text = TextProcessor::from_model_dir(
            &model_dir,
            model.image_token_id(),
            model.num_image_tokens(),
        )?;
        // Every sample ends with EOS, which must be a row of the model's head.
        text.check_eos_within(
            model.config().text.vocab_size,
            &model_dir.join("config.json"),
        )?;
        let proxy = proxy_for_stage(cfg, stage, previous, &model, &text, &device)?;
        let instruction = match stage.instruction_mode {
            InstructionMode::Proxy => Instruction::Proxy {
                tokens: cfg.proxy.tokens,
                placeholder_id: text.pad_token_id().or(text.bos_token_id()).unwrap_or(0),
            },
            InstructionMode::None => Instruction::None,
            InstructionMode::Fixed => Instruction::Fixed(cfg.data.instruction.clone()),
        };
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
        let pairs = load_pair_sources(&sources)?;
        if pairs.is_empty() {
            return Err(Error::Model("the training set is empty".into()));
        }
        let batches = BatchMaker {
            pairs: Arc::new(pairs),
            template,
            text,
            processor,
            instruction,
            max_len: cfg.data.max_len,
            max_positions,
            shuffle: cfg.data.shuffle,
            seed: cfg.train.seed,
        };
        let params = collect_params(cfg, stage, &store, proxy.as_ref());
        check_every_choice_trains(cfg, stage, &params, &store, &model_dir)?;
        let micro_per_epoch = batches.pairs.len().div_ceil(cfg.train.batch_size);
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
        Ok(Self {
            cfg: cfg.clone(),
            stage: stage.clone(),
            model_dir,
            model,
            store,
            batches,
            proxy,
            params,
            steps_per_epoch,
            total_steps,
            device,
            previous: previous.map(Path::to_path_buf),
        })
    }

    pub fn micro_batches_per_epoch(&self) -> usize {
        self.batches.pairs.len().div_ceil(self.cfg.train.batch_size)
    }

    pub fn optimizer(&self) -> Result<AdamW> {
        let groups = vec![
            ParamGroup {
                name: "decay".into(),
                weight_decay: self.cfg.optim.weight_decay,
                lr_scale: 1.0,
            },
            ParamGroup {
                name: "no_decay".into(),
                weight_decay: 0.0,
                lr_scale: 1.0,
            },
        ];
        let params = self
            .params
            .iter()
            .map(|p| {
                let no_decay = self
                    .cfg
                    .optim
                    .no_decay
                    .iter()
                    .any(|k| p.name.contains(k.as_str()));
                (p.name.clone(), p.var.clone(), usize::from(no_decay))
            })
            .collect();
        let cfg = AdamWConfig {
            beta1: self.cfg.optim.betas[0],
            beta2: self.cfg.optim.betas[1],
            eps: self.cfg.optim.eps,
        };
        AdamW::new(cfg, groups, params)
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

    /// Human-readable plan: what trains, how long, how much memory, one rendered sample.
    pub fn describe(&self) -> Result<String> {
        let mut out = String::new();
        let total_params: usize = self
            .store
            .names()
            .iter()
            .filter_map(|n| self.store.shape_of(n))
            .map(|s| s.iter().product::<usize>())
            .sum();
        let mut by_group: std::collections::BTreeMap<String, usize> = Default::default();
        for p in &self.params {
            *by_group.entry(p.group.clone()).or_default() += p.var.elem_count();
        }
        let trainable: usize = by_group.values().sum();
        let bytes = self.cfg.model.dtype.bytes() as f64;
        out.push_str(&format!(
            "stage            {} -> {}{}\n",
            self.stage.name,
            self.stage.output_dir.display(),
            self.previous
                .as_ref()
                .map(|p| format!(" (continuing from {})", p.display()))
                .unwrap_or_default()
        ));
        out.push_str(&format!(
            "model            {} (images: {})\n",
            self.model_dir.display(),
            self.cfg.model.image_aspect
        ));
        out.push_str(&format!(
            "base parameters  {total_params} ({:.1} MB as {})\n",
            total_params as f64 * bytes / 1e6,
            self.cfg.model.dtype.as_str()
        ));
        for (g, n) in &by_group {
            out.push_str(&format!(
                "trainable        {g}: {n} ({:.4}% of base)\n",
                100.0 * *n as f64 / total_params.max(1) as f64
            ));
        }
        if let Some(spec) = self.store.lora().map(|l| l.spec.clone()) {
            let entries = self.store.lora().map(|l| l.entries()).unwrap_or_default();
            let unrun = entries.iter().filter(|e| !e.runs).count();
            out.push_str(&format!(
                "lora             r {} alpha {} dropout {} on {} modules{}, targets {}\n",
                spec.r,
                spec.alpha,
                spec.dropout,
                entries.len(),
                if unrun > 0 {
                    format!(" ({unrun} in layers that never run, kept for a complete PEFT adapter)")
                } else {
                    String::new()
                },
                describe_targets(&spec.target_modules)
            ));
            if let Some(ex) = &spec.exclude_modules {
                out.push_str(&format!(
                    "lora excludes    {} (fully trained groups are trained in full, not adapted)\n",
                    describe_targets(ex)
                ));
            }
        }
        out.push_str(&format!(
            "instruction      {}{}; shuffle {}\n",
            self.stage.instruction_mode.as_str(),
            self.stage
                .momentum
                .map(|m| format!(", proxy momentum {m}"))
                .unwrap_or_default(),
            self.cfg.data.shuffle
        ));
        out.push_str(&format!(
            "training pairs   {} (after repeats)\nsteps/epoch      {} (batch {}, accumulation {})\ntotal steps      {} ({} epochs{})\n",
            self.batches.pairs.len(),
            self.steps_per_epoch,
            self.cfg.train.batch_size,
            self.cfg.train.grad_accum,
            self.total_steps,
            self.stage.epochs,
            self.stage.max_steps.map(|m| format!(", max_steps {m}")).unwrap_or_default()
        ));
        // Weights + f32 trainable copy, gradient and two Adam moments; activations not estimated.
        let mem = total_params as f64 * bytes + trainable as f64 * 4.0 * 4.0;
        out.push_str(&format!(
            "memory estimate  {:.1} MB (weights + trainable params, grads, Adam moments; activations extra)\n",
            mem / 1e6
        ));
        out.push_str(&format!(
            "optimizer        AdamW lr {} wd {} betas {:?} clip {:?} ({}), schedule {} warmup {:?}/{:?} min_lr {}\n",
            self.stage.lr,
            self.cfg.optim.weight_decay,
            self.cfg.optim.betas,
            self.cfg.optim.max_grad_norm,
            if self.cfg.optim.clip_proxy {
                "model params and proxy"
            } else {
                "model params only"
            },
            self.cfg.schedule.kind,
            self.cfg.schedule.warmup_steps,
            self.cfg.schedule.warmup_ratio,
            self.cfg.schedule.min_lr
        ));
        out.push_str(&self.describe_sample()?);
        Ok(out)
    }

    /// The first pair as epoch 0 renders it, `[learned]` tokens bracketed.
    fn describe_sample(&self) -> Result<String> {
        let first = &self.batches.pairs[0];
        let description = self.batches.description(0, 0);
        let enc = self.batches.encoder().encode(&description)?;
        let text = &self.batches.text;
        let mut shown = String::new();
        let mut run: Option<(u8, Vec<u32>)> = None;
        let flush = |run: &mut Option<(u8, Vec<u32>)>, shown: &mut String| -> Result<()> {
            if let Some((kind, ids)) = run.take() {
                let t = match kind {
                    2 => format!("<proxy>×{}", ids.len()),
                    _ => collapse(
                        &text.decode(&ids, false)?,
                        text.image_token(),
                        text.num_image_tokens(),
                    ),
                };
                shown.push_str(&if kind == 1 { format!("[{t}]") } else { t });
            }
            Ok(())
        };
        for (i, (&id, &label)) in enc.input_ids.iter().zip(&enc.labels).enumerate() {
            let kind = if enc.proxy_positions.contains(&i) {
                2
            } else {
                u8::from(label != IGNORE_INDEX)
            };
            if run.as_ref().is_some_and(|(k, _)| *k != kind) {
                flush(&mut run, &mut shown)?;
            }
            run.get_or_insert((kind, Vec::new())).1.push(id);
        }
        flush(&mut run, &mut shown)?;
        Ok(format!(
            "sample           {} ({})\n  text           {:?}\n  epoch-0 order  {:?}\n  rendered       {shown:?}\n  loss mask      [brackets] = {} of {} tokens carry loss\n",
            first.image.display(),
            first.source,
            first.text,
            description,
            enc.labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
            enc.input_ids.len()
        ))
    }
}

/// LoRA for a stage: the previous stage's adapter if there is one (trained further or frozen),
/// else fresh adapters when this stage trains LoRA, else none.
fn lora_for_stage(
    cfg: &TrainConfig,
    stage: &StageSpec,
    previous: Option<&Path>,
    device: &Device,
) -> Result<Option<LoraFactory>> {
    let prev_adapter = previous.map(|p| p.join(ADAPTER_DIR)).filter(|p| p.is_dir());
    Ok(match (prev_adapter, &cfg.lora) {
        (Some(dir), _) => {
            let a = read_adapter(&dir, device)?;
            Some(LoraFactory::new(a.spec, stage.train_lora, cfg.train.seed)?.with_loaded(a.weights))
        }
        (None, Some(spec)) if stage.train_lora => Some(LoraFactory::new(
            spec.excluding_prefixes(&cfg.full_prefixes()),
            true,
            cfg.train.seed,
        )?),
        _ => None,
    })
}

/// Proxy vectors for a proxy-mode stage: the previous stage's, else freshly initialised.
fn proxy_for_stage(
    cfg: &TrainConfig,
    stage: &StageSpec,
    previous: Option<&Path>,
    model: &LlavaModel,
    text: &TextProcessor,
    device: &Device,
) -> Result<Option<ProxyInstruction>> {
    if stage.instruction_mode != InstructionMode::Proxy {
        return Ok(None);
    }
    let hidden = model.hidden_size();
    let mut proxy = match previous.map(|p| p.join(PROXY_FILE)).filter(|p| p.is_file()) {
        Some(f) => {
            let p = ProxyInstruction::load(&f, device)?;
            if p.tokens() != cfg.proxy.tokens || p.hidden() != hidden {
                return Err(Error::Weights(format!(
                    "{} holds {}x{} proxy vectors; this stage needs {}x{hidden}",
                    f.display(),
                    p.tokens(),
                    p.hidden(),
                    cfg.proxy.tokens
                )));
            }
            // A new stage starts its own average from the vectors it inherits.
            ProxyInstruction::from_tensor(p.var().as_tensor().clone())?
        }
        None if cfg.proxy.init == ProxyInit::Text => {
            let t = cfg.proxy.init_text.as_deref().unwrap_or_default();
            let ids = text.encode_plain(t)?;
            ProxyInstruction::from_text_embeddings(&model.embed_ids(&ids)?, cfg.proxy.tokens)?
        }
        None => ProxyInstruction::uniform(
            cfg.proxy.tokens,
            hidden,
            cfg.proxy.bound,
            cfg.train.seed,
            device,
        )?,
    };
    if let Some(m) = stage.momentum {
        proxy.enable_momentum(m)?;
    }
    Ok(Some(proxy))
}

fn collect_params(
    cfg: &TrainConfig,
    stage: &StageSpec,
    store: &WeightStore,
    proxy: Option<&ProxyInstruction>,
) -> Vec<TrainParam> {
    let mut params: Vec<TrainParam> = store
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let group = cfg
                .full
                .groups
                .iter()
                .find(|g| name.starts_with(g.prefix()))
                .map(|g| g.as_str().to_string())
                .unwrap_or_else(|| "full".into());
            TrainParam { name, var, group }
        })
        .collect();
    if let Some(lora) = store.lora() {
        for e in lora.entries() {
            for (suffix, var) in [("lora_A", e.a_var), ("lora_B", e.b_var)] {
                if let Some(var) = var {
                    params.push(TrainParam {
                        name: format!("{}.{suffix}.weight", e.module),
                        var,
                        group: "lora".into(),
                    });
                }
            }
        }
    }
    if let (Some(p), true) = (proxy, stage.train_proxy) {
        params.push(TrainParam {
            name: PROXY_PARAM.into(),
            var: p.var().clone(),
            group: "proxy".into(),
        });
    }
    params
}

/// `<image><image>...` (n copies) shown as `<image>×n`.
fn collapse(text: &str, token: &str, n: usize) -> String {
    text.replace(&token.repeat(n), &format!("{token}×{n}"))
}
