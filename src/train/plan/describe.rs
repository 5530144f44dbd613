//! `--dry-run`: the plan of a stage in words, from the layout alone (no weight is read): what
//! trains per module group, how long, how much memory, one rendered sample with its loss mask.

use super::{describe_targets, TrainPlan};
use crate::data::collate::IGNORE_INDEX;
use crate::error::Result;

impl TrainPlan {
    /// Human-readable plan: what trains, how long, how much memory, one rendered sample.
    pub fn describe(&self) -> Result<String> {
        let mut out = String::new();
        let layout = &self.layout;
        let total_params = layout.total_params();
        let by_role = self.trainable_counts();
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
            "model            {} ({}; images: {}; {})\n",
            layout.dir.display(),
            layout.family.name(),
            self.cfg.model.image_aspect,
            self.processor.describe()
        ));
        out.push_str(&format!(
            "base parameters  {total_params} ({:.1} MB as {})\n",
            total_params as f64 * bytes / 1e6,
            self.cfg.model.dtype.as_str()
        ));
        for (group, how, trained) in self.group_trainability() {
            let n = layout.group_params(group);
            out.push_str(&format!(
                "group            {:<22} {:>14} params  {}{}\n",
                group.name,
                n,
                how.as_str(),
                if trained > 0 {
                    format!(" ({trained} trainable)")
                } else {
                    String::new()
                }
            ));
        }
        for (role, n) in &by_role {
            out.push_str(&format!(
                "trainable        {role}: {n} ({:.4}% of base)\n",
                100.0 * *n as f64 / total_params.max(1) as f64
            ));
        }
        if let Some(lora) = &self.lora {
            let spec = &lora.spec;
            let unrun = self.lora_modules.values().filter(|m| !m.runs).count();
            out.push_str(&format!(
                "lora             r {} alpha {} dropout {} on {} modules{}, targets {}{}\n",
                spec.r,
                spec.alpha,
                spec.dropout,
                self.lora_modules.len(),
                if unrun > 0 {
                    format!(" ({unrun} in layers that never run, kept for a complete PEFT adapter)")
                } else {
                    String::new()
                },
                describe_targets(&spec.target_modules),
                match (&lora.from, lora.trains) {
                    (Some(d), true) => format!(" (from {}, trained further)", d.display()),
                    (Some(d), false) => format!(" (from {}, frozen)", d.display()),
                    (None, _) => String::new(),
                }
            ));
            if let Some(ex) = &spec.exclude_modules {
                let why = if self.lora_excluded_groups.is_empty() {
                    String::new()
                } else {
                    let names: Vec<&str> =
                        self.lora_excluded_groups.iter().map(|g| g.name).collect();
                    format!(
                        " (with {}: trained in full by a stage, not adapted)",
                        names.join(", ")
                    )
                };
                out.push_str(&format!("lora excludes    {}{why}\n", describe_targets(ex)));
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
            "activation checkpointing {}\n",
            if self.activation_checkpointing() {
                "on: each vision/decoder layer keeps its input only and runs again in the backward pass"
            } else {
                "off: every layer keeps its activations for the backward pass"
            }
        ));
        out.push_str(&match self.vision_cache() {
            super::VisionCacheUse::On { dir, max_bytes } => format!(
                "vision cache     on: {} (at most {:.1} GiB); cached pictures skip decoding and the tower\n",
                dir.display(),
                max_bytes as f64 / (1u64 << 30) as f64
            ),
            super::VisionCacheUse::Off(why) => format!("vision cache     off: {why}\n"),
        });
        out.push_str(&format!(
            "training pairs   {} (after repeats)\nsteps/epoch      {} (batch {}, accumulation {}{})\ntotal steps      {} ({} epochs{})\n",
            self.pairs.len(),
            self.steps_per_epoch,
            self.cfg.train.batch_size,
            self.cfg.train.grad_accum,
            if self.world_size > 1 {
                format!(
                    ", {} data-parallel ranks: {} samples per step",
                    self.world_size,
                    self.global_micro_batch() * self.cfg.train.grad_accum
                )
            } else {
                String::new()
            },
            self.total_steps,
            self.stage.epochs,
            self.stage.max_steps.map(|m| format!(", max_steps {m}")).unwrap_or_default()
        ));
        out.push_str(&self.describe_memory()?);
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
        let Some(batches) = &self.batches else {
            return Ok(format!(
                "sample           not rendered: {} has no tokenizer.json (training needs it)\n",
                self.model_dir().display()
            ));
        };
        let first = &batches.pairs[0];
        let description = batches.description(0, 0);
        let enc = batches.encoder().encode(&description)?;
        let text = &batches.text;
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

/// `<image><image>...` (n copies) shown as `<image>×n`.
fn collapse(text: &str, token: &str, n: usize) -> String {
    text.replace(&token.repeat(n), &format!("{token}×{n}"))
}

impl TrainPlan {
    /// The memory lines of the plan: the estimate's parts, and its totals with and without
    /// activation checkpointing for the largest micro-batch.
    fn describe_memory(&self) -> Result<String> {
        let batch = self.worst_batch()?;
        let m = self.memory_estimate(batch)?;
        let gib = |b: f64| b / (1u64 << 30) as f64;
        let path = match self.op_path() {
            super::memory::OpPath::Fused => "fused CPU kernels",
            super::memory::OpPath::Composed => "composed ops",
        };
        Ok(format!(
            "memory estimate  {:.2} GiB on {} per rank ({}): frozen weights {:.2} GiB as {}, trainable {:.2} + AdamW moments {:.2} GiB as {}, gradients {:.2} GiB in f32\n\
             activations      {:.2} GiB with checkpointing, {:.2} GiB without (largest micro-batch: {} x {} tokens, {} loss tokens; {path})\n",
            gib(m.total(m.checkpointing)),
            self.cfg.model.device,
            if m.checkpointing { "checkpointing on" } else { "checkpointing off" },
            gib(m.frozen_weights),
            self.cfg.model.dtype.as_str(),
            gib(m.trainable),
            gib(m.moments),
            self.cfg.model.trainable_dtype.as_str(),
            gib(m.gradients),
            gib(m.activations_checkpointed),
            gib(m.activations_full),
            batch.samples,
            batch.seq_len,
            batch.label_tokens,
        ))
    }
}
