//! The training loop of one stage: deterministic data order per epoch, batches prefetched on
//! worker threads, gradient accumulation, clipping, AdamW, LR schedule, the proxy's momentum
//! hooks, metrics, atomic checkpoints, exact resume, and the stage's outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::adapter::write_adapter;
use crate::config::NonFinitePolicy;
use crate::data::batch::HostBatch;
use crate::data::loader::Prefetcher;
use crate::error::{Error, Result};
use crate::method::proxy::ProxyInstruction;
use crate::model::lora::LoraRuntime;
use crate::model::loss::causal_lm_loss;
use crate::model::{Injection, VisionLanguageModel};
use crate::train::checkpoint::{
    checkpoint_step, load_float_safetensors, load_safetensors, save_safetensors, write_atomic,
    CheckpointManager,
};
use crate::train::metrics::{plot_loss, MetricsLog, StepMetrics, TrainProgress};
use crate::train::optim::{AdamW, Gradients};
use crate::train::plan::{TrainPlan, ADAPTER_DIR, FULL_WEIGHTS, PROXY_FILE, PROXY_PARAM};

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
    /// Steps dropped for a non-finite loss or gradient (`train.on_nonfinite = "skip"`).
    #[serde(default)]
    pub skipped_nonfinite: u64,
}

/// What a finished (or halted) stage produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub output_dir: PathBuf,
    pub final_loss: Option<f64>,
    pub steps: u64,
    /// False when `train.stop_after` halted the stage early.
    pub complete: bool,
}

/// Decode/preprocess workers and how many batches they may run ahead.
const WORKERS: usize = 2;
const PREFETCH: usize = 4;

impl TrainPlan {
    /// Data order of an epoch: a permutation seeded by (seed, epoch).
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.batches.pairs.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.train.seed ^ ((epoch as u64 + 1) << 32));
        order.shuffle(&mut rng);
        order
    }

    /// Micro-batches of `epoch` from `start` on, built ahead on worker threads.
    fn epoch_batches(&self, epoch: usize, start: usize) -> Prefetcher<HostBatch> {
        let order = self.epoch_order(epoch);
        let bs = self.cfg.train.batch_size;
        let jobs: Vec<Vec<usize>> = order
            .chunks(bs)
            .skip(start)
            .map(<[usize]>::to_vec)
            .collect();
        let maker = self.batches.clone();
        Prefetcher::new(jobs, WORKERS, PREFETCH, move |idx: Vec<usize>| {
            maker.make(epoch, &idx)
        })
    }

    /// Forward + mean loss over the label tokens of one host batch (its pixel buffer moves into
    /// the tensor).
    fn loss(&self, batch: &mut HostBatch) -> Result<Tensor> {
        let pixels = std::mem::take(&mut batch.pixels);
        let t = &batch.text;
        let (b, s) = (t.input_ids.len(), t.input_ids[0].len());
        let ids = Tensor::from_vec(t.input_ids.concat(), (b, s), &self.device)?;
        let mask = Tensor::from_vec(t.attention_mask.concat(), (b, s), &self.device)?;
        let labels = Tensor::from_vec(t.labels.concat(), (b, s), &self.device)?;
        let pixels = Tensor::from_vec(pixels, (b, 3, batch.height, batch.width), &self.device)?;
        let inject = match &self.proxy {
            Some(p) => Some(Injection {
                positions: t.proxy_positions.clone(),
                rows: p.rows_for_batch(b)?,
            }),
            None => None,
        };
        let logits =
            self.model
                .forward_injected(&ids, Some(&pixels), Some(&mask), inject.as_ref())?;
        Ok(causal_lm_loss(&logits, &labels)?.0)
    }

    /// Run (or resume from checkpoint `resume`) this stage to its end, or to `train.stop_after`.
    pub fn run(mut self, resume: Option<&Path>, quiet: bool) -> Result<TrainOutcome> {
        let out_dir = self.stage.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        let mut optim = self.optimizer()?;
        let schedule = self.schedule()?;
        let runtime = self.store.lora().map(|l| l.runtime());
        let mut state = TrainerState {
            step: 0,
            epoch: 0,
            micro_batch: 0,
            dropout_rng: None,
            elapsed_sec: 0.0,
            skipped_nonfinite: 0,
        };
        if let Some(dir) = resume {
            state = self.restore(dir, &mut optim, runtime.as_deref())?;
            tracing::info!(
                "stage {}: resumed from {} at step {}",
                self.stage.name,
                dir.display(),
                state.step
            );
        }
        let stage_name = self.stage.name.clone();
        let checkpoints =
            CheckpointManager::new(&out_dir.join("checkpoints"), self.cfg.train.keep_last);

        let metrics_path = out_dir.join("metrics.jsonl");
        let mut metrics = MetricsLog::open(
            &metrics_path,
            resume.map(|_| (stage_name.clone(), state.step)),
        )?;
        let progress = TrainProgress::new(&stage_name, self.total_steps as u64, state.step, quiet);
        if let Some(rt) = &runtime {
            rt.set_training(true);
        }
        let started = Instant::now();
        let elapsed_before = state.elapsed_sec;
        let micro_per_epoch = self.micro_batches_per_epoch();
        let accum = self.cfg.train.grad_accum;
        let halt_at = self
            .cfg
            .train
            .stop_after
            .unwrap_or(usize::MAX)
            .min(self.total_steps);
        let named: Vec<(String, Var)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect();
        let mut last_loss = None;
        let mut batches = self.epoch_batches(state.epoch, state.micro_batch);
        let mut waited = batches.wait_time();
        while (state.step as usize) < halt_at && state.epoch < self.stage.epochs {
            let step_start = Instant::now();
            // The whole accumulation window first: each micro-batch's loss is weighted by its
            // share of the window's loss tokens, so k micro-batches of b samples give the update
            // of one batch of k·b (HF >= 4.46, torchtune). A short last window (epoch end) is
            // simply a smaller batch.
            let first_micro = state.micro_batch;
            let mut window = Vec::with_capacity(accum);
            while window.len() < accum && state.micro_batch < micro_per_epoch {
                let batch = batches
                    .next()
                    .ok_or_else(|| Error::Model("data loader ended early".into()))??;
                for (source, n) in &batch.truncated {
                    tracing::warn!("{source}: description cut by {n} tokens to fit data.max_len");
                }
                window.push(batch);
                state.micro_batch += 1;
            }
            let window_tokens: usize = window.iter().map(|b| b.text.num_label_tokens).sum();
            if let Some(p) = &self.proxy {
                p.before_step()?;
            }
            let mut grads = Gradients::new();
            let (mut loss_sum, mut tokens) = (0.0, 0usize);
            let mut fault: Option<String> = None;
            for batch in &mut window {
                let loss = self.loss(batch)?;
                let value = loss.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    fault = Some(format!("non-finite loss ({value})"));
                    break;
                }
                let share = batch.text.num_label_tokens as f64 / window_tokens as f64;
                loss_sum += value * share;
                let g = Gradients::from_store(&named, &(loss * share)?.backward()?)?;
                grads.accumulate(g)?;
                tokens += batch.text.num_tokens;
            }
            let grad_norm = match fault {
                Some(_) => f64::NAN,
                None => self.clip(&mut grads)?,
            };
            if fault.is_none() && !grad_norm.is_finite() {
                fault = Some(format!("non-finite gradient norm ({grad_norm})"));
            }
            let lr = schedule.lr(state.step as usize);
            let micro_range = (state.epoch, first_micro, state.micro_batch);
            if let Some(what) = &fault {
                let sources: Vec<&str> = window
                    .iter()
                    .flat_map(|b| b.sources.iter().map(String::as_str))
                    .collect();
                if self.cfg.train.on_nonfinite == NonFinitePolicy::Error {
                    return Err(self.nonfinite_error(
                        state.step + 1,
                        micro_range,
                        what,
                        &sources,
                        &checkpoints,
                    ));
                }
                state.skipped_nonfinite += 1;
                tracing::warn!(
                    "stage {stage_name}: step {} skipped: {what}; samples {}",
                    state.step + 1,
                    sources.join(", ")
                );
            } else {
                optim.step(&grads, lr)?;
                self.check_finite_params(state.step + 1)?;
                if let Some(p) = &mut self.proxy {
                    p.after_step()?;
                }
            }
            state.step += 1;
            let loss = if fault.is_some() { f64::NAN } else { loss_sum };
            last_loss = Some(loss).filter(|l| l.is_finite()).or(last_loss);
            let data_wait = batches.wait_time() - waited;
            waited = batches.wait_time();
            let epoch_done = state.micro_batch >= micro_per_epoch;
            if epoch_done {
                state.epoch += 1;
                state.micro_batch = 0;
                if state.epoch < self.stage.epochs {
                    batches = self.epoch_batches(state.epoch, 0);
                    waited = batches.wait_time();
                }
            }
            let secs = step_start.elapsed().as_secs_f64().max(1e-9);
            state.elapsed_sec = elapsed_before + started.elapsed().as_secs_f64();
            let m = StepMetrics {
                stage: stage_name.clone(),
                step: state.step,
                epoch: state.epoch as f64 + state.micro_batch as f64 / micro_per_epoch as f64,
                loss,
                lr,
                grad_norm,
                tokens_per_sec: tokens as f64 / secs,
                elapsed_sec: state.elapsed_sec,
                data_wait_sec: data_wait.as_secs_f64(),
                skipped_nonfinite: state.skipped_nonfinite,
            };
            metrics.write(&m)?;
            progress.update(&m);
            let periodic = self
                .cfg
                .train
                .save_every
                .is_some_and(|n| state.step.is_multiple_of(n as u64));
            if periodic || epoch_done || state.step as usize >= halt_at {
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
        drop(batches);
        progress.finish();
        if let Some(rt) = &runtime {
            rt.set_training(false);
        }
        self.export(&out_dir)?;
        let all = MetricsLog::read_all(&metrics_path)?;
        if !all.is_empty() {
            plot_loss(
                &all,
                &out_dir.join("loss.png"),
                &format!("training loss ({stage_name})"),
            )?;
        }
        Ok(TrainOutcome {
            output_dir: out_dir,
            final_loss: last_loss,
            steps: state.step,
            complete: state.step as usize >= self.total_steps,
        })
    }

    /// Clips the gradients by global norm over the clip scope and returns the norm of that
    /// scope. The scope is the model's parameters; the proxy vectors join it only with
    /// `optim.clip_proxy` (the reference never clips them). A non-finite proxy gradient makes the
    /// returned norm non-finite either way, so the step is caught.
    fn clip(&self, grads: &mut Gradients) -> Result<f64> {
        let proxy = if self.cfg.optim.clip_proxy {
            None
        } else {
            grads.remove(PROXY_PARAM)
        };
        let norm = match self.cfg.optim.max_grad_norm {
            Some(max) => grads.clip_global_norm(max)?,
            None => grads.global_norm()?,
        };
        let Some(g) = proxy else {
            return Ok(norm);
        };
        let proxy_sq = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?;
        let proxy_finite = proxy_sq.to_scalar::<f64>()?.is_finite();
        grads.insert(PROXY_PARAM, &g)?;
        Ok(if proxy_finite { norm } else { f64::NAN })
    }

    /// The error that stops a stage at a non-finite step: which step, which samples, and which
    /// checkpoint still holds the last finite state.
    fn nonfinite_error(
        &self,
        step: u64,
        (epoch, first, end): (usize, usize, usize),
        what: &str,
        sources: &[&str],
        checkpoints: &CheckpointManager,
    ) -> Error {
        let last_good = match checkpoints.latest() {
            Ok(Some(dir)) => format!(
                "the newest checkpoint, {}, holds the last finite state",
                dir.display()
            ),
            _ => "no checkpoint was written before it".to_string(),
        };
        Error::Model(format!(
            "stage `{}`: step {step} (epoch {}, micro-batches {}..{}) has a {what}; samples of its \
             batch: {}. Nothing of this step was applied and {last_good}. Lower optim.lr, check \
             those samples, or set train.on_nonfinite = \"skip\" to drop such steps",
            self.stage.name,
            epoch + 1,
            first + 1,
            end,
            sources.join(", ")
        ))
    }

    /// After an update: every trainable tensor still finite (a huge `optim.lr` can overflow).
    fn check_finite_params(&self, step: u64) -> Result<()> {
        for p in &self.params {
            let sum = p
                .var
                .as_tensor()
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            if !sum.is_finite() {
                return Err(Error::Model(format!(
                    "stage `{}`: the update of step {step} made `{}` non-finite (optim.lr = {} \
                     too large?); nothing of it was saved",
                    self.stage.name, p.name, self.stage.lr
                )));
            }
        }
        Ok(())
    }

    fn trainable_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .filter(|p| p.group != "proxy")
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect()
    }

    /// A checkpoint holds what resume needs (trainable tensors, optimizer moments, proxy, state)
    /// and, when LoRA trains, the PEFT adapter too, so `eval --checkpoints` can score it.
    fn write_checkpoint(&self, dir: &Path, optim: &AdamW, state: &TrainerState) -> Result<()> {
        if let Some(lora) = self.store.lora() {
            write_adapter(
                &dir.join(ADAPTER_DIR),
                &lora.spec,
                &lora.entries(),
                &self.cfg.model.path,
            )?;
        }
        save_safetensors(
            &dir.join("trainable.safetensors"),
            &self.trainable_tensors(),
            &HashMap::new(),
        )?;
        save_safetensors(
            &dir.join("optimizer.safetensors"),
            &optim.state_tensors()?,
            &HashMap::new(),
        )?;
        if let Some(p) = &self.proxy {
            p.save(&dir.join(PROXY_FILE))?;
        }
        let path = dir.join("trainer_state.json");
        let json = serde_json::to_string_pretty(state).map_err(|e| Error::json(&path, e))?;
        write_atomic(&path, json.as_bytes())
    }

    fn restore(
        &mut self,
        dir: &Path,
        optim: &mut AdamW,
        runtime: Option<&LoraRuntime>,
    ) -> Result<TrainerState> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| Error::json(&state_path, e))?;
        self.check_resume_state(dir, &state_path, &state)?;
        let weights = load_float_safetensors(&dir.join("trainable.safetensors"), &self.device)?;
        for p in self.params.iter().filter(|p| p.group != "proxy") {
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
        if let Some(proxy) = &mut self.proxy {
            let saved = ProxyInstruction::load(&dir.join(PROXY_FILE), &self.device)?;
            proxy.restore_from(&saved)?;
        }
        optim.load_state_tensors(&load_safetensors(
            &dir.join("optimizer.safetensors"),
            &self.device,
        )?)?;
        if let (Some(rt), Some((seed, stream, pos))) = (runtime, &state.dropout_rng) {
            let bad = || Error::Model(format!("{}: bad dropout_rng", state_path.display()));
            let seed = unhex(seed).ok_or_else(bad)?;
            let pos: u128 = pos.parse().map_err(|_| bad())?;
            rt.set_rng_state(seed, *stream, pos);
        }
        Ok(state)
    }

    /// A checkpoint's position must be one this stage can reach: its step within the stage, its
    /// data position inside an epoch, the two agreeing with each other and with the directory's
    /// name. A checkpoint of another recipe (other batch size, data or epochs) fails here
    /// instead of silently finishing early or skipping data.
    fn check_resume_state(
        &self,
        dir: &Path,
        state_path: &Path,
        state: &TrainerState,
    ) -> Result<()> {
        let bad = |reason: String| {
            Error::Model(format!(
                "cannot resume stage `{}` from {}: {reason}",
                self.stage.name,
                state_path.display()
            ))
        };
        if let Some(named) = checkpoint_step(dir) {
            if named != state.step {
                return Err(bad(format!(
                    "the directory is checkpoint-{named} but its step is {}",
                    state.step
                )));
            }
        }
        if state.step as usize > self.total_steps {
            return Err(bad(format!(
                "step {} is past the {} steps of this stage (a checkpoint of a different recipe?)",
                state.step, self.total_steps
            )));
        }
        let micro_per_epoch = self.micro_batches_per_epoch();
        if state.epoch > self.stage.epochs
            || (state.epoch == self.stage.epochs && state.micro_batch != 0)
        {
            return Err(bad(format!(
                "epoch {} is past the {} epochs of this stage",
                state.epoch, self.stage.epochs
            )));
        }
        if state.micro_batch >= micro_per_epoch {
            return Err(bad(format!(
                "micro_batch {} is beyond the {micro_per_epoch} micro-batches of an epoch \
                 (train.batch_size = {} on {} pairs; batch size or data changed since the \
                 checkpoint?)",
                state.micro_batch,
                self.cfg.train.batch_size,
                self.batches.pairs.len()
            )));
        }
        let expected = state.epoch * self.steps_per_epoch
            + state.micro_batch.div_ceil(self.cfg.train.grad_accum);
        if expected as u64 != state.step {
            return Err(bad(format!(
                "epoch {}, micro-batch {} is step {expected} of this recipe, but the checkpoint \
                 says step {} (batch size, accumulation or data changed since the checkpoint?)",
                state.epoch, state.micro_batch, state.step
            )));
        }
        Ok(())
    }

    /// Stage outputs: PEFT adapter (if LoRA), fully trained groups under HF names, proxy vectors.
    fn export(&self, out_dir: &Path) -> Result<()> {
        if let Some(lora) = self.store.lora() {
            write_adapter(
                &out_dir.join(ADAPTER_DIR),
                &lora.spec,
                &lora.entries(),
                &self.cfg.model.path,
            )?;
        }
        let mut full = self.store.overridden();
        for p in self
            .params
            .iter()
            .filter(|p| p.group != "lora" && p.group != "proxy")
        {
            full.insert(p.name.clone(), p.var.as_tensor().detach());
        }
        if !full.is_empty() {
            save_safetensors(&out_dir.join(FULL_WEIGHTS), &full, &HashMap::new())?;
        }
        if let Some(p) = &self.proxy {
            p.save(&out_dir.join(PROXY_FILE))?;
        }
        Ok(())
    }
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
