//! The training loop: a validated [`TrainConfig`] becomes a [`TrainPlan`] (printable with
//! `--dry-run`), then runs: deterministic data order per epoch, gradient accumulation, clipping,
//! AdamW, LR schedule, metrics, atomic checkpoints, exact resume, adapter/weights export.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::adapter::write_adapter;
use crate::config::TrainConfig;
use crate::data::collate::{pad_batch, EncodedText, Instruction, SampleEncoder, IGNORE_INDEX};
use crate::data::image::load_rgb;
use crate::data::pairs::{load_pair_sources, Pair, PairSource};
use crate::data::processor::{AspectMode, ClipImageProcessor, ClipProcessorConfig};
use crate::data::prompt::{ChatTemplate, TextProcessor};
use crate::error::{Error, Result};
use crate::model::checkpoint::resolve_model;
use crate::model::llava::{LlavaModel, LoadOptions};
use crate::model::lora::{LoraFactory, LoraRuntime};
use crate::model::loss::causal_lm_loss;
use crate::model::weights::WeightStore;
use crate::model::VisionLanguageModel;
use crate::train::checkpoint::{
    load_safetensors, save_safetensors, write_atomic, CheckpointManager,
};
use crate::train::metrics::{plot_loss, MetricsLog, StepMetrics, TrainProgress};
use crate::train::optim::{AdamW, AdamWConfig, Gradients, ParamGroup};
use crate::train::schedule::{Schedule, ScheduleKind, Warmup};

const STAGE: &str = "train";

/// Everything a run needs, loaded and validated, before the first step.
pub struct TrainPlan {
    pub cfg: TrainConfig,
    pub model_dir: PathBuf,
    pub model: LlavaModel,
    pub store: WeightStore,
    pub processor: ClipImageProcessor,
    pub template: ChatTemplate,
    pub text: TextProcessor,
    pub pairs: Vec<Pair>,
    pub params: Vec<TrainParam>,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub device: Device,
}

/// One trainable tensor: its export name and which group it belongs to.
#[derive(Clone)]
pub struct TrainParam {
    /// Canonical weight name, or `{module}.lora_A.weight` / `.lora_B.weight` for adapters.
    pub name: String,
    pub var: Var,
    /// "lora" or the full-training group name.
    pub group: String,
}

/// Saved in every checkpoint next to the weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the next micro-batch and its index within that epoch's order.
    pub epoch: usize,
    pub micro_batch: usize,
    /// LoRA dropout RNG (seed as hex, stream, word position as decimal string).
    pub dropout_rng: Option<(String, u64, String)>,
    pub elapsed_sec: f64,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub output_dir: PathBuf,
    pub final_loss: Option<f64>,
    pub steps: u64,
}

impl TrainPlan {
    pub fn build(cfg: TrainConfig) -> Result<Self> {
        let device = parse_device(&cfg.model.device)?;
        let dtype = match cfg.model.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            _ => DType::F32,
        };
        let model_dir = resolve_model(&cfg.model.path)?;
        let prefixes = cfg.full_prefixes();
        let lora = match &cfg.lora {
            Some(spec) => Some(LoraFactory::new(spec.clone(), true, cfg.train.seed)?),
            None => None,
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
            },
        )?;
        let aspect = if cfg.model.image_aspect == "pad" {
            AspectMode::Pad
        } else {
            AspectMode::Resize
        };
        let processor =
            ClipImageProcessor::new(ClipProcessorConfig::from_model_dir(&model_dir)?, aspect)?;
        let template = ChatTemplate::from_model_dir(&model_dir)?;
        let text = TextProcessor::from_model_dir(
            &model_dir,
            model.image_token_id(),
            model.num_image_tokens(),
        )?;
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
        let params = collect_params(&cfg, &store);
        if params.is_empty() {
            return Err(Error::Model(
                "no trainable parameters were created (do the LoRA targets match any module?)"
                    .into(),
            ));
        }
        let micro_per_epoch = pairs.len().div_ceil(cfg.train.batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(cfg.train.grad_accum);
        let total_steps = cfg
            .train
            .max_steps
            .unwrap_or(steps_per_epoch * cfg.train.epochs)
            .min(steps_per_epoch * cfg.train.epochs);
        Ok(Self {
            cfg,
            model_dir,
            model,
            store,
            processor,
            template,
            text,
            pairs,
            params,
            steps_per_epoch,
            total_steps,
            device,
        })
    }

    fn encoder(&self) -> SampleEncoder<'_> {
        SampleEncoder {
            template: &self.template,
            text: &self.text,
            instruction: match self.cfg.data.instruction_mode.as_str() {
                "none" => Instruction::None,
                _ => Instruction::Fixed(self.cfg.data.instruction.clone()),
            },
            max_len: self.cfg.data.max_len,
        }
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
        out.push_str(&format!("model            {}\n", self.model_dir.display()));
        out.push_str(&format!(
            "base parameters  {total_params} ({:.1} MB as {})\n",
            total_params as f64 * dtype_bytes(&self.cfg.model.dtype) / 1e6,
            self.cfg.model.dtype
        ));
        for (g, n) in &by_group {
            out.push_str(&format!(
                "trainable        {g}: {n} ({:.4}% of base)\n",
                100.0 * *n as f64 / total_params.max(1) as f64
            ));
        }
        out.push_str(&format!(
            "training pairs   {} (after repeats)\nsteps/epoch      {} (batch {}, accumulation {})\ntotal steps      {} ({} epochs{})\n",
            self.pairs.len(),
            self.steps_per_epoch,
            self.cfg.train.batch_size,
            self.cfg.train.grad_accum,
            self.total_steps,
            self.cfg.train.epochs,
            self.cfg.train.max_steps.map(|m| format!(", max_steps {m}")).unwrap_or_default()
        ));
        // Weights + f32 trainable copy, grads and two Adam moments; activations are not estimated.
        let mem =
            total_params as f64 * dtype_bytes(&self.cfg.model.dtype) + trainable as f64 * 4.0 * 4.0;
        out.push_str(&format!(
            "memory estimate  {:.1} MB (weights + trainable params, grads, Adam moments; activations extra)\n",
            mem / 1e6
        ));
        out.push_str(&format!(
            "optimizer        AdamW lr {} wd {} betas {:?} clip {:?}, schedule {} warmup {:?}/{:?} min_lr {}\n",
            self.cfg.optim.lr,
            self.cfg.optim.weight_decay,
            self.cfg.optim.betas,
            self.cfg.optim.max_grad_norm,
            self.cfg.schedule.kind,
            self.cfg.schedule.warmup_steps,
            self.cfg.schedule.warmup_ratio,
            self.cfg.schedule.min_lr
        ));
        let first = &self.pairs[0];
        let enc = self.encoder().encode(&first.text)?;
        out.push_str(&format!(
            "sample           {} ({})\n",
            first.image.display(),
            first.source
        ));
        out.push_str(&format!("  text           {:?}\n", first.text));
        let mut shown = String::new();
        let mut run: Option<(bool, Vec<u32>)> = None;
        let flush = |run: &mut Option<(bool, Vec<u32>)>, shown: &mut String| -> Result<()> {
            if let Some((learn, ids)) = run.take() {
                let t = self.text.decode(&ids, false)?;
                let t = collapse_image_tokens(
                    &t,
                    self.text.image_token(),
                    self.text.num_image_tokens(),
                );
                shown.push_str(&if learn { format!("[{t}]") } else { t });
            }
            Ok(())
        };
        for (&id, &label) in enc.input_ids.iter().zip(&enc.labels) {
            let learn = label != IGNORE_INDEX;
            if run.as_ref().is_some_and(|(l, _)| *l != learn) {
                flush(&mut run, &mut shown)?;
            }
            run.get_or_insert((learn, Vec::new())).1.push(id);
        }
        flush(&mut run, &mut shown)?;
        out.push_str(&format!(
            "  rendered       {shown:?}\n  loss mask      [brackets] = {} of {} tokens carry loss\n",
            enc.labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
            enc.input_ids.len()
        ));
        Ok(out)
    }

    /// Data order of an epoch: a permutation seeded by (seed, epoch).
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.pairs.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.train.seed ^ ((epoch as u64 + 1) << 32));
        order.shuffle(&mut rng);
        order
    }

    fn build_batch(&self, indices: &[usize]) -> Result<(Tensor, Tensor, Tensor, Tensor, usize)> {
        let enc = self.encoder();
        let mut texts: Vec<EncodedText> = Vec::with_capacity(indices.len());
        let mut pixels: Vec<f32> = Vec::new();
        let (h, w) = self.processor.output_size();
        for &i in indices {
            let pair = &self.pairs[i];
            let e = enc
                .encode(&pair.text)
                .map_err(|e| Error::Model(format!("{}: {e}", pair.source)))?;
            if e.truncated > 0 {
                tracing::warn!(
                    "{}: description cut by {} tokens to fit max_len",
                    pair.source,
                    e.truncated
                );
            }
            texts.push(e);
            let img = load_rgb(&pair.image)?;
            pixels.extend(self.processor.preprocess(&img)?.data);
        }
        let pad = self
            .text
            .pad_token_id()
            .or(self.text.eos_token_ids().first().copied())
            .unwrap_or(0);
        let batch = pad_batch(&texts, pad);
        let (b, s) = (batch.input_ids.len(), batch.input_ids[0].len());
        let flat_ids: Vec<u32> = batch.input_ids.into_iter().flatten().collect();
        let flat_mask: Vec<u32> = batch.attention_mask.into_iter().flatten().collect();
        let flat_labels: Vec<i64> = batch.labels.into_iter().flatten().collect();
        Ok((
            Tensor::from_vec(flat_ids, (b, s), &self.device)?,
            Tensor::from_vec(flat_mask, (b, s), &self.device)?,
            Tensor::from_vec(flat_labels, (b, s), &self.device)?,
            Tensor::from_vec(pixels, (b, 3, h, w), &self.device)?,
            batch.num_tokens,
        ))
    }

    fn optimizer(&self) -> Result<AdamW> {
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

    fn schedule(&self) -> Result<Schedule> {
        let kind: ScheduleKind = self.cfg.schedule.kind.parse()?;
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
            self.cfg.optim.lr,
            warmup,
            self.total_steps,
            self.cfg.schedule.min_lr,
        )
    }

    /// Run (or resume) training to the end; writes checkpoints, metrics, plot and final outputs.
    pub fn run(self, resume: Option<&Path>, quiet: bool) -> Result<TrainOutcome> {
        let out_dir = self.cfg.train.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        let resolved = toml::to_string_pretty(&self.cfg)
            .map_err(|e| Error::Model(format!("cannot serialise the config: {e}")))?;
        write_atomic(&out_dir.join("config.toml"), resolved.as_bytes())?;
        let mut optim = self.optimizer()?;
        let schedule = self.schedule()?;
        let runtime = self.store.lora().map(|l| l.runtime());
        let mut state = TrainerState {
            step: 0,
            epoch: 0,
            micro_batch: 0,
            dropout_rng: None,
            elapsed_sec: 0.0,
        };
        if let Some(dir) = resume {
            state = self.restore(dir, &mut optim, runtime.as_deref())?;
            tracing::info!("resumed from {} at step {}", dir.display(), state.step);
        }
        let checkpoints =
            CheckpointManager::new(&out_dir.join("checkpoints"), self.cfg.train.keep_last);
        let metrics_path = out_dir.join("metrics.jsonl");
        let mut metrics = MetricsLog::open(
            &metrics_path,
            resume.map(|_| (STAGE.to_string(), state.step)),
        )?;
        let progress = TrainProgress::new(STAGE, self.total_steps as u64, state.step, quiet);
        if let Some(rt) = &runtime {
            rt.set_training(true);
        }
        let started = Instant::now();
        let elapsed_before = state.elapsed_sec;
        let micro_per_epoch = self.pairs.len().div_ceil(self.cfg.train.batch_size);
        let accum = self.cfg.train.grad_accum;
        let mut last_loss = None;
        let named: Vec<(String, Var)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect();
        let halt_at = self
            .cfg
            .train
            .stop_after
            .unwrap_or(usize::MAX)
            .min(self.total_steps);
        while (state.step as usize) < halt_at && state.epoch < self.cfg.train.epochs {
            let order = self.epoch_order(state.epoch);
            let step_start = Instant::now();
            let mut grads = Gradients::new();
            let mut loss_sum = 0.0;
            let mut tokens = 0usize;
            let mut micro_done = 0usize;
            while micro_done < accum && state.micro_batch < micro_per_epoch {
                let lo = state.micro_batch * self.cfg.train.batch_size;
                let hi = (lo + self.cfg.train.batch_size).min(order.len());
                let (ids, mask, labels, pixels, n_tok) = self.build_batch(&order[lo..hi])?;
                let logits = self.model.forward(&ids, Some(&pixels), Some(&mask))?;
                let (loss, _) = causal_lm_loss(&logits, &labels)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                let scaled = (loss / accum as f64)?;
                let g = Gradients::from_store(&named, &scaled.backward()?)?;
                grads.accumulate(g)?;
                tokens += n_tok;
                micro_done += 1;
                state.micro_batch += 1;
            }
            // A short last window (end of epoch) is averaged over the micro-batches it had.
            if micro_done < accum {
                grads.scale(accum as f64 / micro_done as f64)?;
            }
            let grad_norm = match self.cfg.optim.max_grad_norm {
                Some(max) => grads.clip_global_norm(max)?,
                None => grads.global_norm()?,
            };
            let lr = schedule.lr(state.step as usize);
            optim.step(&grads, lr)?;
            state.step += 1;
            let loss = loss_sum / micro_done as f64;
            last_loss = Some(loss);
            let epoch_done = state.micro_batch >= micro_per_epoch;
            if epoch_done {
                state.epoch += 1;
                state.micro_batch = 0;
            }
            let secs = step_start.elapsed().as_secs_f64().max(1e-9);
            state.elapsed_sec = elapsed_before + started.elapsed().as_secs_f64();
            let m = StepMetrics {
                stage: STAGE.into(),
                step: state.step,
                epoch: state.epoch as f64 + state.micro_batch as f64 / micro_per_epoch as f64,
                loss,
                lr,
                grad_norm,
                tokens_per_sec: tokens as f64 / secs,
                elapsed_sec: state.elapsed_sec,
            };
            metrics.write(&m)?;
            progress.update(&m);
            let periodic = self
                .cfg
                .train
                .save_every
                .is_some_and(|n| state.step % n as u64 == 0);
            let last = state.step as usize >= halt_at;
            if periodic || epoch_done || last {
                state.dropout_rng = runtime.as_ref().map(|rt| {
                    let (seed, stream, pos) = rt.rng_state();
                    (hex(&seed), stream, pos.to_string())
                });
                let snapshot = state.clone();
                checkpoints.save(state.step, |dir| {
                    self.write_checkpoint(dir, &optim, &snapshot)
                })?;
            }
        }
        progress.finish();
        if let Some(rt) = &runtime {
            rt.set_training(false);
        }
        self.export(&out_dir)?;
        let all = MetricsLog::read_all(&metrics_path)?;
        if !all.is_empty() {
            plot_loss(&all, &out_dir.join("loss.png"), "training loss")?;
        }
        Ok(TrainOutcome {
            output_dir: out_dir,
            final_loss: last_loss,
            steps: state.step,
        })
    }

    fn trainable_tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.params
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().detach())))
            .collect()
    }

    fn write_checkpoint(&self, dir: &Path, optim: &AdamW, state: &TrainerState) -> Result<()> {
        save_safetensors(
            &dir.join("trainable.safetensors"),
            &self.trainable_tensors()?,
            &HashMap::new(),
        )?;
        save_safetensors(
            &dir.join("optimizer.safetensors"),
            &optim.state_tensors()?,
            &HashMap::new(),
        )?;
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| Error::json(dir.join("trainer_state.json"), e))?;
        write_atomic(&dir.join("trainer_state.json"), json.as_bytes())
    }

    fn restore(
        &self,
        dir: &Path,
        optim: &mut AdamW,
        runtime: Option<&LoraRuntime>,
    ) -> Result<TrainerState> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| Error::json(&state_path, e))?;
        let weights = load_safetensors(&dir.join("trainable.safetensors"), &self.device)?;
        for p in &self.params {
            let t = weights.get(&p.name).ok_or_else(|| {
                Error::Weights(format!(
                    "checkpoint {} lacks trainable tensor `{}` (different recipe?)",
                    dir.display(),
                    p.name
                ))
            })?;
            if t.dims() != p.var.dims() {
                return Err(Error::Weights(format!(
                    "checkpoint {}: `{}` has shape {:?}, the model {:?}",
                    dir.display(),
                    p.name,
                    t.dims(),
                    p.var.dims()
                )));
            }
            p.var.set(&t.to_dtype(p.var.dtype())?)?;
        }
        let opt_state = load_safetensors(&dir.join("optimizer.safetensors"), &self.device)?;
        optim.load_state_tensors(&opt_state)?;
        if let (Some(rt), Some((seed, stream, pos))) = (runtime, &state.dropout_rng) {
            let seed = unhex(seed).ok_or_else(|| {
                Error::Model(format!("{}: bad dropout_rng seed", state_path.display()))
            })?;
            let pos: u128 = pos.parse().map_err(|_| {
                Error::Model(format!(
                    "{}: bad dropout_rng position",
                    state_path.display()
                ))
            })?;
            rt.set_rng_state(seed, *stream, pos);
        }
        Ok(state)
    }

    /// Final outputs: PEFT adapter (if LoRA) and fully trained groups under HF names.
    fn export(&self, out_dir: &Path) -> Result<()> {
        if let (Some(lora), Some(spec)) = (self.store.lora(), &self.cfg.lora) {
            write_adapter(
                &out_dir.join("adapter"),
                spec,
                &lora.entries(),
                &self.cfg.model.path,
            )?;
        }
        let full: HashMap<String, Tensor> = self
            .params
            .iter()
            .filter(|p| p.group != "lora")
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect();
        if !full.is_empty() {
            save_safetensors(
                &out_dir.join("full_weights.safetensors"),
                &full,
                &HashMap::new(),
            )?;
        }
        Ok(())
    }
}

fn collect_params(cfg: &TrainConfig, store: &WeightStore) -> Vec<TrainParam> {
    let mut params: Vec<TrainParam> = store
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let group = cfg
                .full
                .groups
                .iter()
                .zip(cfg.full_prefixes())
                .find(|(_, p)| name.starts_with(p.as_str()))
                .map(|(g, _)| g.clone())
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
    params
}

/// `<image><image>...` (n copies) shown as `<image>×n` in the dry-run sample.
fn collapse_image_tokens(text: &str, token: &str, n: usize) -> String {
    let run = token.repeat(n);
    text.replace(&run, &format!("{token}×{n}"))
}

fn dtype_bytes(dtype: &str) -> f64 {
    match dtype {
        "bf16" | "f16" => 2.0,
        _ => 4.0,
    }
}

fn parse_device(spec: &str) -> Result<Device> {
    let dev = match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .map_err(|_| Error::Model(format!("device `{s}`: expected cuda:N")))?;
            Device::new_cuda(n)
        }
        other => {
            return Err(Error::Model(format!(
                "device `{other}`: expected cpu, cuda or cuda:N"
            )))
        }
    };
    dev.map_err(|e| Error::Model(format!("cannot open device `{spec}`: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}
