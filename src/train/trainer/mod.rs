//! The training loop of one stage: deterministic data order per epoch, batches prefetched on
//! worker threads, gradient accumulation, clipping, AdamW, LR schedule, the proxy's momentum
//! hooks, metrics, atomic checkpoints, exact resume, and the stage's outputs.
//!
//! [`Trainer::new`] (`setup`) loads what a [`TrainPlan`] announced; `persist` holds the
//! checkpoint contents, resume and exports; `ranks` what data-parallel ranks add (shared token
//! counts, summed gradients); this file the loop. With several ranks every rank runs this loop
//! on its shard of each global micro-batch, and rank 0 alone writes metrics, checkpoints and
//! outputs.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::NonFinitePolicy;
use crate::data::batch::{BatchMaker, BatchPicture, HostBatch};
use crate::data::feature_cache::hex;
use crate::data::loader::Prefetcher;
use crate::error::{Error, Result};
use crate::method::proxy::ProxyInstruction;
use crate::model::lora::LoraRuntime;
use crate::model::loss::LossRows;
use crate::model::recompute::Recompute;
use crate::model::weights::WeightStore;
use crate::model::{Injection, LogitRows, VisionInput, VisionLanguageModel};
use crate::train::checkpoint::CheckpointManager;
use crate::train::distributed::{shard, Collective};
use crate::train::metrics::{plot_loss, MetricsLog, StepMetrics, TrainProgress};
use crate::train::optim::{AdamW, Gradients};
use crate::train::plan::{TrainPlan, PROXY_PARAM};
use crate::train::schedule::Schedule;

mod persist;
mod ranks;
mod setup;
pub use setup::{ParamRole, TrainParam};

/// Saved in every checkpoint next to the weights and optimizer moments.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// Data-parallel ranks that wrote this state (a resume needs as many: the data position and
    /// the dropout streams depend on it).
    #[serde(default = "one_rank")]
    pub world_size: usize,
}

fn one_rank() -> usize {
    1
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

/// What one optimizer step did.
struct StepDone {
    /// The window's token-weighted mean loss; `None` for a skipped (non-finite) step.
    loss: Option<f64>,
    grad_norm: f64,
    tokens: usize,
    /// Why the step was not applied.
    fault: Option<String>,
}

impl StepDone {
    fn fault(what: String, grad_norm: f64, tokens: usize) -> Self {
        Self {
            loss: None,
            grad_norm,
            tokens,
            fault: Some(what),
        }
    }
}

/// Decode/preprocess workers and how many batches they may run ahead.
const WORKERS: usize = 2;
const PREFETCH: usize = 4;

/// One stage being trained: the plan, the loaded model with its trainable parameters, the
/// optimizer and schedule, and the position in the data.
pub struct Trainer {
    pub plan: TrainPlan,
    pub model: Box<dyn VisionLanguageModel>,
    pub store: WeightStore,
    pub proxy: Option<ProxyInstruction>,
    pub params: Vec<TrainParam>,
    batches: BatchMaker,
    optim: AdamW,
    schedule: Schedule,
    lora_runtime: Option<Arc<LoraRuntime>>,
    state: TrainerState,
    /// This process's ranks ([`crate::train::distributed::Solo`] when alone).
    collective: Rc<dyn Collective>,
    /// Activation checkpointing: the parameter gradients of recomputed layers come from here.
    recompute: Option<Recompute>,
}

impl Trainer {
    /// Data order of an epoch: a permutation seeded by (seed, epoch).
    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.plan.pairs.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.plan.cfg.train.seed ^ ((epoch as u64 + 1) << 32));
        order.shuffle(&mut rng);
        order
    }

    /// This rank's micro-batches of `epoch` from `start` on, built ahead on worker threads: its
    /// shard of each global micro-batch (all of it with one rank).
    fn epoch_batches(&self, epoch: usize, start: usize) -> Prefetcher<HostBatch> {
        let order = self.epoch_order(epoch);
        let (rank, world) = (self.collective.rank(), self.world_size());
        let jobs: Vec<Vec<usize>> = order
            .chunks(self.plan.global_micro_batch())
            .skip(start)
            .map(|global| shard(global, rank, world).to_vec())
            .collect();
        let maker = self.batches.clone();
        Prefetcher::new(jobs, WORKERS, PREFETCH, move |idx: Vec<usize>| {
            maker.make(epoch, &idx)
        })
    }

    /// Forward + mean loss over the label tokens of one host batch (its pictures are consumed).
    fn loss(&self, batch: &mut HostBatch) -> Result<Tensor> {
        let images = std::mem::take(&mut batch.images);
        let t = &batch.text;
        let (b, s) = (t.input_ids.len(), t.input_ids[0].len());
        let ids = Tensor::from_vec(t.input_ids.concat(), (b, s), &self.plan.device)?;
        let mask = Tensor::from_vec(t.attention_mask.concat(), (b, s), &self.plan.device)?;
        // The LM head and the cross-entropy run only where a label follows.
        let loss_rows = LossRows::from_labels(&t.labels, self.model.vocab_size())?;
        let rows = loss_rows.index(&self.plan.device)?;
        let vision = self.vision_input(images)?;
        let inject = match &self.proxy {
            Some(p) => Some(Injection {
                positions: t.proxy_positions.clone(),
                rows: p.rows_for_batch(b)?,
            }),
            None => None,
        };
        let logits = self.model.forward_rows(
            &ids,
            Some(&vision),
            Some(&mask),
            inject.as_ref(),
            LogitRows::Flat(&rows),
        )?;
        loss_rows.loss(&logits)
    }

    /// A batch's pictures as the model's vision input: the pixels when no feature cache is in
    /// use; otherwise the tower's states, from the cache or computed now for the pictures it
    /// lacks (in one pass) and stored.
    fn vision_input(&self, pictures: Vec<BatchPicture>) -> Result<VisionInput> {
        let device = &self.plan.device;
        let mut processed = Vec::new();
        let mut keys = Vec::new();
        let mut cached = Vec::new();
        for p in pictures {
            match p {
                BatchPicture::Processed { image, cache_key } => {
                    processed.push(image);
                    keys.push(cache_key);
                    cached.push(None);
                }
                BatchPicture::Cached(states) => cached.push(Some(states)),
            }
        }
        let Some(cache) = &self.batches.vision_cache else {
            if cached.iter().any(Option::is_some) {
                return Err(Error::Model(
                    "a batch holds cached vision states but the stage uses no cache".into(),
                ));
            }
            return VisionInput::from_processed(&processed, device);
        };
        let computed = if processed.is_empty() {
            None
        } else {
            let pixels = VisionInput::from_processed(&processed, device)?;
            drop(processed);
            Some(self.model.vision_states(&pixels)?)
        };
        let mut rows = Vec::with_capacity(cached.len());
        let mut next = 0;
        for c in cached {
            match (c, &computed) {
                (Some(states), _) => rows.push(states.to_device(device)?.unsqueeze(0)?),
                (None, Some(all)) => {
                    let row = all.narrow(0, next, 1)?;
                    if let Some(key) = &keys[next] {
                        cache.put(key, &row.squeeze(0)?)?;
                    }
                    rows.push(row);
                    next += 1;
                }
                (None, None) => {
                    return Err(Error::Model(
                        "vision cache: a picture was neither cached nor processed".into(),
                    ))
                }
            }
        }
        Ok(VisionInput::States(Tensor::cat(&rows, 0)?))
    }

    /// Run (or resume from checkpoint `resume`) this stage to its end, or to `train.stop_after`.
    pub fn run(mut self, resume: Option<&Path>, quiet: bool) -> Result<TrainOutcome> {
        let out_dir = self.plan.stage.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
        if let Some(dir) = resume {
            self.state = self.restore(dir)?;
            tracing::info!(
                "stage {}: resumed from {} at step {}",
                self.plan.stage.name,
                dir.display(),
                self.state.step
            );
        }
        self.state.world_size = self.world_size();
        self.sync_params_from_rank0()?;
        let rank0 = self.is_rank0();
        let quiet = quiet || !rank0;
        let stage_name = self.plan.stage.name.clone();
        let checkpoints =
            CheckpointManager::new(&out_dir.join("checkpoints"), self.plan.cfg.train.keep_last);
        let metrics_path = out_dir.join("metrics.jsonl");
        let mut metrics = if rank0 {
            Some(MetricsLog::open(
                &metrics_path,
                resume.map(|_| (stage_name.clone(), self.state.step)),
            )?)
        } else {
            None
        };
        let total_steps = self.plan.total_steps;
        let progress = TrainProgress::new(&stage_name, total_steps as u64, self.state.step, quiet);
        self.set_training(true);
        let started = Instant::now();
        let elapsed_before = self.state.elapsed_sec;
        let micro_per_epoch = self.plan.micro_batches_per_epoch();
        let epochs = self.plan.stage.epochs;
        let halt_at = self
            .plan
            .cfg
            .train
            .stop_after
            .unwrap_or(usize::MAX)
            .min(total_steps);
        let mut last_loss = None;
        let mut batches = self.epoch_batches(self.state.epoch, self.state.micro_batch);
        let mut waited = batches.wait_time();
        while (self.state.step as usize) < halt_at && self.state.epoch < epochs {
            let step_start = Instant::now();
            let first_micro = self.state.micro_batch;
            let mut window = self.next_window(&mut batches, micro_per_epoch)?;
            let lr = self.schedule.lr(self.state.step as usize);
            self.reseed_dropout_for_step();
            let done = self.step(&mut window, lr)?;
            if let Some(what) = &done.fault {
                let sources: Vec<&str> = window
                    .iter()
                    .flat_map(|b| b.sources.iter().map(String::as_str))
                    .collect();
                if self.plan.cfg.train.on_nonfinite == NonFinitePolicy::Error {
                    let micro_range = (self.state.epoch, first_micro, self.state.micro_batch);
                    return Err(self.nonfinite_error(
                        self.state.step + 1,
                        micro_range,
                        what,
                        &sources,
                        &checkpoints,
                    ));
                }
                self.state.skipped_nonfinite += 1;
                tracing::warn!(
                    "stage {stage_name}: step {} skipped: {what}; samples {}",
                    self.state.step + 1,
                    sources.join(", ")
                );
            }
            self.state.step += 1;
            last_loss = done.loss.or(last_loss);
            let data_wait = batches.wait_time() - waited;
            waited = batches.wait_time();
            let epoch_done = self.state.micro_batch >= micro_per_epoch;
            if epoch_done {
                self.state.epoch += 1;
                self.state.micro_batch = 0;
                if self.state.epoch < epochs {
                    batches = self.epoch_batches(self.state.epoch, 0);
                    waited = batches.wait_time();
                }
            }
            let secs = step_start.elapsed().as_secs_f64().max(1e-9);
            self.state.elapsed_sec = elapsed_before + started.elapsed().as_secs_f64();
            let state = &self.state;
            let m = StepMetrics {
                stage: stage_name.clone(),
                step: state.step,
                epoch: state.epoch as f64 + state.micro_batch as f64 / micro_per_epoch as f64,
                loss: done.loss.unwrap_or(f64::NAN),
                lr,
                grad_norm: done.grad_norm,
                tokens_per_sec: done.tokens as f64 / secs,
                elapsed_sec: state.elapsed_sec,
                step_sec: secs,
                data_wait_sec: data_wait.as_secs_f64(),
                skipped_nonfinite: state.skipped_nonfinite,
            };
            if let Some(log) = &mut metrics {
                log.write(&m)?;
            }
            progress.update(&m);
            let periodic = self
                .plan
                .cfg
                .train
                .save_every
                .is_some_and(|n| self.state.step.is_multiple_of(n as u64));
            if rank0 && (periodic || epoch_done || self.state.step as usize >= halt_at) {
                self.state.dropout_rng = self.lora_runtime.as_ref().map(|rt| {
                    let (seed, stream, pos) = rt.rng_state();
                    (hex(&seed), stream, pos.to_string())
                });
                let snapshot = self.state.clone();
                checkpoints.save(snapshot.step, |dir| self.write_checkpoint(dir, &snapshot))?;
            }
        }
        drop(batches);
        progress.finish();
        if let Some(cache) = &self.batches.vision_cache {
            let s = cache.stats();
            tracing::info!(
                "stage {stage_name}: vision cache served {} of {} pictures, stored {} ({} not: \
                 full); {:.1} MiB in {}",
                s.hits,
                s.hits + s.misses,
                s.stored,
                s.refused,
                s.bytes as f64 / (1u64 << 20) as f64,
                cache.root().display()
            );
        }
        self.set_training(false);
        if !rank0 {
            return Ok(TrainOutcome {
                output_dir: out_dir,
                final_loss: last_loss,
                steps: self.state.step,
                complete: self.state.step as usize >= total_steps,
            });
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
            steps: self.state.step,
            complete: self.state.step as usize >= total_steps,
        })
    }

    /// With several ranks, each step's LoRA dropout masks come from (seed, step, rank): every
    /// rank draws its own, and a resume needs no rank's generator state but the step. One rank
    /// keeps one stream for the whole stage (saved in its checkpoints).
    fn reseed_dropout_for_step(&self) {
        if let (Some(rt), true) = (&self.lora_runtime, self.world_size() > 1) {
            let seed = self.plan.cfg.train.seed.wrapping_add(1) ^ self.state.step.rotate_left(32);
            rt.reseed(seed, self.collective.rank() as u64);
        }
    }

    /// LoRA dropout on (training) or off.
    fn set_training(&self, on: bool) {
        if let Some(rt) = &self.lora_runtime {
            rt.set_training(on);
        }
    }

    /// The micro-batches of the next accumulation window, all fetched first: each micro-batch's
    /// loss is weighted by its share of the window's loss tokens, so k micro-batches of b
    /// samples give the update of one batch of k·b (HF >= 4.46, torchtune). A short last window
    /// (epoch end) is simply a smaller batch.
    fn next_window(
        &mut self,
        batches: &mut Prefetcher<HostBatch>,
        micro_per_epoch: usize,
    ) -> Result<Vec<HostBatch>> {
        let accum = self.plan.cfg.train.grad_accum;
        let mut window = Vec::with_capacity(accum);
        while window.len() < accum && self.state.micro_batch < micro_per_epoch {
            let batch = batches
                .next()
                .ok_or_else(|| Error::Model("data loader ended early".into()))??;
            for (source, n) in &batch.truncated {
                tracing::warn!("{source}: description cut by {n} tokens to fit data.max_len");
            }
            window.push(batch);
            self.state.micro_batch += 1;
        }
        Ok(window)
    }

    /// One optimizer step on a window: the proxy's before-step hook, forward and backward of
    /// every micro-batch, clipping, and — only when loss and gradients are finite — the update
    /// and the proxy's after-step hook. A non-finite step applies nothing and reports why.
    ///
    /// With several ranks the window's loss tokens are counted over all ranks first, so each
    /// micro-batch's loss is weighted by its share of the global window and the summed gradients
    /// are those of one batch holding every rank's samples; a non-finite loss on any rank skips
    /// (or stops) the step on all.
    fn step(&mut self, window: &mut [HostBatch], lr: f64) -> Result<StepDone> {
        let local_tokens: usize = window.iter().map(|b| b.text.num_label_tokens).sum();
        let window_tokens = self.sum_figures(&[local_tokens as f64])?[0] as usize;
        if let Some(p) = &self.proxy {
            p.before_step()?;
        }
        let named: Vec<(String, Var)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect();
        let mut grads = Gradients::new();
        let (mut loss_sum, mut tokens) = (0.0, 0usize);
        let mut fault = None;
        for batch in window.iter_mut() {
            if batch.sources.is_empty() {
                // This rank's shard of a short last micro-batch is empty.
                continue;
            }
            let loss = self.loss(batch)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                fault = Some(format!("non-finite loss ({value})"));
                break;
            }
            let share = batch.text.num_label_tokens as f64 / window_tokens as f64;
            loss_sum += value * share;
            let g = Gradients::from_store(&named, &self.backward(&(loss * share)?)?)?;
            grads.accumulate(g)?;
            tokens += batch.text.num_tokens;
        }
        if self.world_size() > 1 {
            let flag = f64::from(u8::from(fault.is_some()));
            let sums = self.sum_figures(&[loss_sum, tokens as f64, flag])?;
            (loss_sum, tokens) = (sums[0], sums[1] as usize);
            if sums[2] > 0.0 && fault.is_none() {
                fault = Some(format!("non-finite loss on {} of the ranks", sums[2]));
            }
        }
        if let Some(what) = fault {
            return Ok(StepDone::fault(what, f64::NAN, tokens));
        }
        self.sum_gradients(&mut grads, &named)?;
        let grad_norm = self.clip(&mut grads)?;
        if !grad_norm.is_finite() {
            return Ok(StepDone::fault(
                format!("non-finite gradient norm ({grad_norm})"),
                grad_norm,
                tokens,
            ));
        }
        self.optim.step(&grads, lr)?;
        self.check_finite_params(self.state.step + 1)?;
        if let Some(p) = &mut self.proxy {
            p.after_step()?;
        }
        Ok(StepDone {
            loss: Some(loss_sum),
            grad_norm,
            tokens,
            fault: None,
        })
    }

    /// The backward pass of a micro-batch's weighted loss, with the parameter gradients of
    /// recomputed (checkpointed) layers merged in.
    fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let Some(rc) = &self.recompute else {
            return Ok(loss.backward()?);
        };
        match loss.backward() {
            Ok(mut store) => {
                rc.merge_into(&mut store)?;
                Ok(store)
            }
            Err(e) => {
                rc.clear();
                Err(e.into())
            }
        }
    }

    /// Clips the gradients by global norm over the clip scope and returns the norm of that
    /// scope. The scope is the model's parameters; the proxy vectors join it only with
    /// `optim.clip_proxy` (the reference never clips them). A non-finite proxy gradient makes the
    /// returned norm non-finite either way, so the step is caught.
    fn clip(&self, grads: &mut Gradients) -> Result<f64> {
        let proxy = if self.plan.cfg.optim.clip_proxy {
            None
        } else {
            grads.remove(PROXY_PARAM)
        };
        let norm = match self.plan.cfg.optim.max_grad_norm {
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
            self.plan.stage.name,
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
                    self.plan.stage.name, p.name, self.plan.stage.lr
                )));
            }
        }
        Ok(())
    }
}
