//! What a checkpoint holds and how a stage resumes from one, and the stage's final outputs.
//! Each piece saves and restores its own state (optimizer moments, proxy vectors and average,
//! LoRA dropout RNG); the checkpoint manager only decides when and where.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::{ParamRole, Trainer, TrainerState};
use crate::adapter::write_adapter;
use crate::error::{Error, Result};
use crate::method::proxy::ProxyInstruction;
use crate::model::weights::parse_row_param;
use crate::train::checkpoint::{
    checkpoint_step, load_float_safetensors, load_safetensors, save_safetensors, write_atomic,
};
use crate::train::plan::{ADAPTER_DIR, FULL_WEIGHTS, PROXY_FILE};

impl Trainer {
    fn trainable_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .filter(|p| p.role != ParamRole::Proxy)
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect()
    }

    /// A checkpoint holds what resume needs (trainable tensors, optimizer moments, proxy, state)
    /// and, when LoRA trains, the PEFT adapter too, so `eval --checkpoints` can score it.
    pub(super) fn write_checkpoint(&self, dir: &Path, state: &TrainerState) -> Result<()> {
        if let Some(lora) = self.store.lora() {
            write_adapter(
                &dir.join(ADAPTER_DIR),
                &lora.spec,
                &lora.entries(),
                &self.plan.cfg.model.path,
            )?;
        }
        save_safetensors(
            &dir.join("trainable.safetensors"),
            &self.trainable_tensors(),
            &HashMap::new(),
        )?;
        save_safetensors(
            &dir.join("optimizer.safetensors"),
            &self.optim.state_tensors()?,
            &HashMap::new(),
        )?;
        if let Some(p) = &self.proxy {
            p.save(&dir.join(PROXY_FILE))?;
        }
        let path = dir.join("trainer_state.json");
        let json = serde_json::to_string_pretty(state).map_err(|e| Error::json(&path, e))?;
        write_atomic(&path, json.as_bytes())
    }

    /// Load checkpoint `dir` into the trainable tensors, optimizer, proxy and dropout RNG;
    /// returns the position to continue from.
    pub(super) fn restore(&mut self, dir: &Path) -> Result<TrainerState> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| Error::json(&state_path, e))?;
        self.check_resume_state(dir, &state_path, &state)?;
        let weights =
            load_float_safetensors(&dir.join("trainable.safetensors"), &self.plan.device)?;
        for p in self.params.iter().filter(|p| p.role != ParamRole::Proxy) {
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
            let saved = ProxyInstruction::load(&dir.join(PROXY_FILE), &self.plan.device)?;
            proxy.restore_from(&saved)?;
        }
        self.optim.load_state_tensors(&load_safetensors(
            &dir.join("optimizer.safetensors"),
            &self.plan.device,
        )?)?;
        if let (Some(rt), Some((seed, stream, pos))) = (&self.lora_runtime, &state.dropout_rng) {
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
                self.plan.stage.name,
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
        if state.world_size != self.plan.world_size {
            return Err(bad(format!(
                "it was written by a run of {} data-parallel ranks, this one has {}: resume with \
                 the same number of ranks (its data position and dropout streams depend on it)",
                state.world_size, self.plan.world_size
            )));
        }
        if state.step as usize > self.plan.total_steps {
            return Err(bad(format!(
                "step {} is past the {} steps of this stage (a checkpoint of a different recipe?)",
                state.step, self.plan.total_steps
            )));
        }
        let micro_per_epoch = self.plan.micro_batches_per_epoch();
        if state.epoch > self.plan.stage.epochs
            || (state.epoch == self.plan.stage.epochs && state.micro_batch != 0)
        {
            return Err(bad(format!(
                "epoch {} is past the {} epochs of this stage",
                state.epoch, self.plan.stage.epochs
            )));
        }
        if state.micro_batch >= micro_per_epoch {
            return Err(bad(format!(
                "micro_batch {} is beyond the {micro_per_epoch} micro-batches of an epoch \
                 (train.batch_size = {} on {} pairs; batch size or data changed since the \
                 checkpoint?)",
                state.micro_batch,
                self.plan.cfg.train.batch_size,
                self.plan.pairs.len()
            )));
        }
        let expected = state.epoch * self.plan.steps_per_epoch
            + state.micro_batch.div_ceil(self.plan.cfg.train.grad_accum);
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
    pub(super) fn export(&self, out_dir: &Path) -> Result<()> {
        if let Some(lora) = self.store.lora() {
            write_adapter(
                &out_dir.join(ADAPTER_DIR),
                &lora.spec,
                &lora.entries(),
                &self.plan.cfg.model.path,
            )?;
        }
        let mut full = self.store.overridden();
        for p in self
            .params
            .iter()
            .filter(|p| matches!(p.role, ParamRole::Full(_)))
            .filter(|p| parse_row_param(&p.name).is_none())
        {
            full.insert(p.name.clone(), p.var.as_tensor().detach());
        }
        // Trained row slices go out as their whole weight, which merge and score read.
        full.extend(self.store.assembled_row_weights()?);
        if !full.is_empty() {
            save_safetensors(&out_dir.join(FULL_WEIGHTS), &full, &HashMap::new())?;
        }
        if let Some(p) = &self.proxy {
            p.save(&out_dir.join(PROXY_FILE))?;
        }
        Ok(())
    }
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
