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
use crate::data::batch::HostBatch;
use crate::data::loader::Prefetcher;
use crate::error::{Error, Result};
use crate::method::proxy::ProxyInstruction;
use crate::model::lora::LoraRuntime;
use crate::model::loss::causal_lm_loss;
use crate::model::{Injection, VisionLanguageModel};
use crate::train::checkpoint::{
    load_safetensors, save_safetensors, write_atomic, CheckpointManager,
};
use crate::train::metrics::{plot_loss, MetricsLog, StepMetrics, TrainProgress};
use crate::train::optim::{AdamW, Gradients};
use crate::train::plan::{TrainPlan, ADAPTER_DIR, FULL_WEIGHTS, PROXY_FILE};

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

    /// Forward + loss of one host batch (its pixel buffer moves into the tensor).
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
            if let Some(p) = &self.proxy {
                p.before_step()?;
            }
            let mut grads = Gradients::new();
            let (mut loss_sum, mut tokens, mut micro_done) = (0.0, 0usize, 0usize);
            while micro_done < accum && state.micro_batch < micro_per_epoch {
                let mut batch = batches
                    .next()
                    .ok_or_else(|| Error::Model("data loader ended early".into()))??;
                for (source, n) in &batch.truncated {
                    tracing::warn!("{source}: description cut by {n} tokens to fit data.max_len");
                }
                let loss = self.loss(&mut batch)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                let g = Gradients::from_store(&named, &(loss / accum as f64)?.backward()?)?;
                grads.accumulate(g)?;
                tokens += batch.text.num_tokens;
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
            if let Some(p) = &mut self.proxy {
                p.after_step()?;
            }
            state.step += 1;
            let loss = loss_sum / micro_done as f64;
            last_loss = Some(loss);
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
            };
            metrics.write(&m)?;
            progress.update(&m);
            let periodic = self
                .cfg
                .train
                .save_every
                .is_some_and(|n| state.step % n as u64 == 0);
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
        let weights = load_safetensors(&dir.join("trainable.safetensors"), &self.device)?;
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
