//! Checks on a parsed recipe that the schema cannot express: every count at least 1 and bounded
//! before anything is sized from it, every real number finite and inside the range the method
//! gives it meaning in, stage names safe as directory names and unique, and each stage's
//! trainable set consistent with its instruction mode and the recipe's sections. Limits that
//! depend on the model (sequence length, LoRA rank) are checked when the plan loads it.

use std::collections::HashSet;
use std::path::Path;

use super::sections::{InstructionMode, ProxyInit, Trainable};
use super::TrainConfig;
use crate::error::{Error, Result};

/// Largest `data.train[].repeat`: beyond it the expanded pair list, not the data, is the cost.
pub const MAX_REPEAT: usize = 10_000;

/// Names a stage output directory may not take: the files `train` writes in `output_dir`.
const RESERVED_STAGE_NAMES: &[&str] =
    &["checkpoints", "adapter", super::sections::VISION_CACHE_DIR];

struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn bad(&self, key: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn at_least_one(&self, key: &str, v: usize) -> Result<()> {
        if v == 0 {
            return Err(self.bad(key, "must be >= 1"));
        }
        Ok(())
    }

    fn positive(&self, key: &str, v: f64) -> Result<()> {
        if !(v.is_finite() && v > 0.0) {
            return Err(self.bad(key, format!("must be a finite number > 0, got {v}")));
        }
        Ok(())
    }

    fn non_negative(&self, key: &str, v: f64) -> Result<()> {
        if !(v.is_finite() && v >= 0.0) {
            return Err(self.bad(key, format!("must be a finite number >= 0, got {v}")));
        }
        Ok(())
    }

    /// `[0, 1)`: momenta, betas, dropout.
    fn unit_open(&self, key: &str, v: f64) -> Result<()> {
        if !(0.0..1.0).contains(&v) {
            return Err(self.bad(key, format!("must be in [0, 1), got {v}")));
        }
        Ok(())
    }
}

impl TrainConfig {
    pub(super) fn validate(&self, path: &Path) -> Result<()> {
        let c = Checker { path };
        if self.model.path.trim().is_empty() {
            return Err(c.bad(
                "model.path",
                "must name a checkpoint directory or Hub repo id",
            ));
        }
        // Syntax only: `--dry-run` of a CUDA recipe works on a machine without the GPU.
        let device = self.model.device.as_str();
        let cuda_index = device
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !(device == "cpu" || device == "cuda" || cuda_index) {
            return Err(c.bad(
                "model.device",
                format!("`{device}` is not one of cpu, cuda, cuda:N"),
            ));
        }
        if let Some(n) = self.model.max_image_tiles {
            c.at_least_one("model.max_image_tiles", n)?;
        }
        self.validate_data(&c)?;
        self.validate_full(&c)?;
        self.validate_proxy(&c)?;
        self.validate_lora(&c)?;
        self.validate_optim(&c)?;
        self.validate_train(&c)?;
        if self.stages.is_empty() {
            if self.lora.is_none()
                && self.full.groups.is_empty()
                && self.data.instruction_mode != InstructionMode::Proxy
            {
                return Err(c.bad(
                    "lora / full.groups",
                    "nothing to train: configure [lora], full.groups or instruction_mode = \"proxy\"",
                ));
            }
        } else {
            self.validate_stages(&c)?;
        }
        Ok(())
    }

    fn validate_data(&self, c: &Checker) -> Result<()> {
        if self.data.train.is_empty() {
            return Err(c.bad("data.train", "at least one manifest is needed"));
        }
        for (i, s) in self.data.train.iter().enumerate() {
            let key = format!("data.train[{i}].repeat");
            c.at_least_one(&key, s.repeat)?;
            if s.repeat > MAX_REPEAT {
                return Err(c.bad(
                    key,
                    format!("{} is above the limit of {MAX_REPEAT}", s.repeat),
                ));
            }
        }
        if let Some(n) = self.data.max_len {
            c.at_least_one("data.max_len", n)?;
        }
        let fixed_anywhere = self.data.instruction_mode == InstructionMode::Fixed
            || self
                .stages
                .iter()
                .any(|s| s.instruction_mode == Some(InstructionMode::Fixed));
        if fixed_anywhere && self.data.instruction.trim().is_empty() {
            return Err(c.bad(
                "data.instruction",
                "empty, but instruction_mode \"fixed\" uses it (use \"none\" for no user text)",
            ));
        }
        Ok(())
    }

    /// Group names are the family's to define (checked when the plan reads `config.json`); here
    /// only that each is named once.
    fn validate_full(&self, c: &Checker) -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, g) in self.full.groups.iter().enumerate() {
            if !seen.insert(g.as_str()) {
                return Err(c.bad(
                    format!("full.groups[{i}]"),
                    format!("`{g}` is listed twice"),
                ));
            }
        }
        Ok(())
    }

    fn validate_proxy(&self, c: &Checker) -> Result<()> {
        c.at_least_one("proxy.tokens", self.proxy.tokens)?;
        c.positive("proxy.bound", self.proxy.bound)?;
        if self.proxy.init == ProxyInit::Text
            && self
                .proxy
                .init_text
                .as_deref()
                .is_none_or(|t| t.trim().is_empty())
        {
            return Err(c.bad(
                "proxy.init_text",
                "required (non-empty) when proxy.init = \"text\"",
            ));
        }
        Ok(())
    }

    fn validate_lora(&self, c: &Checker) -> Result<()> {
        let Some(l) = &self.lora else {
            return Ok(());
        };
        c.at_least_one("lora.r", l.r)?;
        c.positive("lora.alpha", l.alpha)?;
        c.unit_open("lora.dropout", l.dropout)?;
        l.target_modules
            .matcher()
            .map_err(|e| c.bad("lora.target_modules", e.to_string()))?;
        Ok(())
    }

    fn validate_optim(&self, c: &Checker) -> Result<()> {
        let o = &self.optim;
        c.positive("optim.lr", o.lr)?;
        c.non_negative("optim.weight_decay", o.weight_decay)?;
        c.unit_open("optim.betas[0]", o.betas[0])?;
        c.unit_open("optim.betas[1]", o.betas[1])?;
        c.positive("optim.eps", o.eps)?;
        if let Some(m) = o.max_grad_norm {
            c.positive("optim.max_grad_norm", m)?;
        }
        let s = &self.schedule;
        if s.warmup_steps.is_some() && s.warmup_ratio.is_some() {
            return Err(c.bad(
                "schedule.warmup_steps",
                "set warmup_steps or warmup_ratio, not both",
            ));
        }
        if let Some(r) = s.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(c.bad(
                    "schedule.warmup_ratio",
                    format!("must be in [0, 1], got {r}"),
                ));
            }
        }
        c.non_negative("schedule.min_lr", s.min_lr)?;
        Ok(())
    }

    fn validate_train(&self, c: &Checker) -> Result<()> {
        let t = &self.train;
        c.at_least_one("train.epochs", t.epochs)?;
        c.at_least_one("train.batch_size", t.batch_size)?;
        c.at_least_one("train.grad_accum", t.grad_accum)?;
        for (key, v) in [
            ("train.max_steps", t.max_steps),
            ("train.stop_after", t.stop_after),
            ("train.save_every", t.save_every),
            ("train.keep_last", t.keep_last),
        ] {
            if v == Some(0) {
                let hint = match key {
                    "train.max_steps" => "; leave it out to run every epoch",
                    "train.save_every" => "; leave it out to checkpoint at epoch ends only",
                    "train.keep_last" => "; leave it out to keep every checkpoint",
                    _ => "",
                };
                return Err(c.bad(key, format!("must be >= 1{hint}")));
            }
        }
        if t.output_dir.as_os_str().is_empty() {
            return Err(c.bad("train.output_dir", "must not be empty"));
        }
        let gib = self.vision_cache.max_gib;
        if !(gib.is_finite() && gib > 0.0) {
            return Err(c.bad(
                "vision_cache.max_gib",
                format!("{gib} is not a positive size in GiB; set vision_cache.enabled = false to turn the cache off"),
            ));
        }
        if self
            .vision_cache
            .dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(c.bad(
                "vision_cache.dir",
                "must not be empty; leave it out for <train.output_dir>/vision-cache",
            ));
        }
        Ok(())
    }

    fn validate_stages(&self, c: &Checker) -> Result<()> {
        let mut names = HashSet::new();
        for (i, s) in self.stages.iter().enumerate() {
            let key = |k: &str| format!("stages[{i}].{k}");
            check_stage_name(&s.name).map_err(|r| c.bad(key("name"), r))?;
            if !names.insert(s.name.as_str()) {
                return Err(c.bad(
                    key("name"),
                    format!(
                        "`{}` is used by an earlier stage; stage names must be unique",
                        s.name
                    ),
                ));
            }
            if s.trainable.is_empty() {
                return Err(c.bad(
                    key("trainable"),
                    "empty: name what trains (proxy, lora, full)",
                ));
            }
            let set: HashSet<Trainable> = s.trainable.iter().copied().collect();
            if set.len() != s.trainable.len() {
                return Err(c.bad(key("trainable"), "lists an entry twice"));
            }
            let mode = s.instruction_mode.unwrap_or(self.data.instruction_mode);
            if set.contains(&Trainable::Proxy) && mode != InstructionMode::Proxy {
                return Err(c.bad(
                    key("trainable"),
                    format!(
                        "trains `proxy`, but the stage's instruction_mode is `{}`: proxy vectors \
                         exist only with instruction_mode = \"proxy\"",
                        mode.as_str()
                    ),
                ));
            }
            if set.contains(&Trainable::Lora) && self.lora.is_none() {
                return Err(c.bad(
                    key("trainable"),
                    "trains `lora`, but the recipe has no [lora] section",
                ));
            }
            if set.contains(&Trainable::Full) && self.full.groups.is_empty() {
                return Err(c.bad(key("trainable"), "trains `full`, but full.groups is empty"));
            }
            if let Some(m) = s.momentum {
                c.unit_open(&key("momentum"), m)?;
                if !set.contains(&Trainable::Proxy) {
                    return Err(c.bad(
                        key("momentum"),
                        "is the proxy vectors' momentum, but this stage does not train `proxy`",
                    ));
                }
            }
            if let Some(e) = s.epochs {
                c.at_least_one(&key("epochs"), e)?;
            }
            if let Some(m) = s.max_steps {
                c.at_least_one(&key("max_steps"), m)?;
            }
            if let Some(lr) = s.lr {
                c.positive(&key("lr"), lr)?;
            }
        }
        Ok(())
    }
}

/// A stage name becomes `output_dir/<name>/`: one plain path component, nothing that could climb
/// out of `output_dir` or hide among its files.
fn check_stage_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("empty; it names the stage's subdirectory of train.output_dir".into());
    }
    if !name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    {
        return Err(format!(
            "`{name}` may hold only letters, digits, `_` and `-` (it names the stage's \
             subdirectory of train.output_dir)"
        ));
    }
    if RESERVED_STAGE_NAMES.contains(&name) {
        return Err(format!("`{name}` is reserved for train's own outputs"));
    }
    Ok(())
}
