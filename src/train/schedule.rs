//! Learning-rate schedules with linear warmup and an optional lr floor, with the semantics of HF
//! transformers' `get_{constant,linear,cosine}_schedule_with_warmup` (+ `cosine_with_min_lr`)
//! driven by torch's `LambdaLR`: the lr of optimizer step `s` (0-based) is
//! `base_lr * lambda(s)`, evaluated in f64 exactly as the Python code does.
//!
//! Multipliers, with `w` warmup steps and `T` total steps:
//! - warmup (`s < w`): `s / max(1, w)`;
//! - constant: `1`;
//! - linear: `max(0, (T - s) / max(1, T - w))`;
//! - cosine: `0.5 * (1 + cos(pi * 2 * 0.5 * (s - w) / max(1, T - w)))`;
//! - with `min_lr > 0` (linear and cosine, after warmup): `f * (1 - r) + r`, `r = min_lr / base_lr`,
//!   then `max(0, .)` (HF's `cosine_with_min_lr`; the linear variant is our extension).
//!
//! Past `T` the values follow the HF formulas too (linear stays at its floor, cosine rises again);
//! a training loop only asks for steps `0..T`.

use std::f64::consts::PI;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl ScheduleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScheduleKind {
    type Err = Error;

    /// `constant`, `linear` or `cosine` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(bad(
                "kind",
                format!("unknown schedule `{s}` (expected constant, linear or cosine)"),
            )),
        }
    }
}

/// Length of the linear warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    /// A number of optimizer steps.
    Steps(usize),
    /// A fraction of the total steps, rounded up like HF's `TrainingArguments.get_warmup_steps`:
    /// `math.ceil(total_steps * ratio)` (in f64, so `100 * 0.07` gives 8).
    Ratio(f64),
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup::Steps(0)
    }
}

/// A validated lr schedule; see the module docs for the formulas.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: ScheduleKind,
    base_lr: f64,
    warmup_steps: usize,
    total_steps: usize,
    min_lr: f64,
    /// `min_lr / base_lr` (0 when `base_lr` is 0).
    min_lr_rate: f64,
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        path: "schedule".into(),
        key: key.into(),
        reason: reason.into(),
    }
}

impl Schedule {
    /// Errors (`Error::Config`, path `schedule`, naming the key) when `base_lr` is negative or not
    /// finite, `min_lr` is outside `[0, base_lr]`, a warmup ratio is outside `[0, 1]`,
    /// `total_steps` is 0, or the warmup is longer than `total_steps`.
    pub fn new(
        kind: ScheduleKind,
        base_lr: f64,
        warmup: Warmup,
        total_steps: usize,
        min_lr: f64,
    ) -> Result<Self> {
        if !base_lr.is_finite() || base_lr < 0.0 {
            return Err(bad(
                "learning_rate",
                format!("must be finite and >= 0, got {base_lr}"),
            ));
        }
        if !min_lr.is_finite() || min_lr < 0.0 || min_lr > base_lr {
            return Err(bad(
                "min_lr",
                format!("must be in [0, learning_rate = {base_lr}], got {min_lr}"),
            ));
        }
        if total_steps == 0 {
            return Err(bad("total_steps", "must be > 0"));
        }
        let warmup_steps = match warmup {
            Warmup::Steps(w) => w,
            Warmup::Ratio(r) => {
                if !(0.0..=1.0).contains(&r) {
                    return Err(bad("warmup_ratio", format!("must be in [0, 1], got {r}")));
                }
                (total_steps as f64 * r).ceil() as usize
            }
        };
        if warmup_steps > total_steps {
            return Err(bad(
                "warmup_steps",
                format!("{warmup_steps} warmup steps exceed the {total_steps} total steps"),
            ));
        }
        let min_lr_rate = if base_lr > 0.0 { min_lr / base_lr } else { 0.0 };
        Ok(Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
            min_lr,
            min_lr_rate,
        })
    }

    /// The multiplier of `base_lr` at optimizer step `step` (HF's `lr_lambda`).
    pub fn factor(&self, step: usize) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            return step as f64 / w.max(1) as f64;
        }
        // Python ints: differences may be negative past the end.
        let (s, w, t) = (step as i128, w as i128, self.total_steps as i128);
        let decay_len = (t - w).max(1) as f64;
        let r = self.min_lr_rate;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => {
                let f = ((t - s) as f64 / decay_len).max(0.0);
                (f * (1.0 - r) + r).max(0.0)
            }
            ScheduleKind::Cosine => {
                let progress = (s - w) as f64 / decay_len;
                let f = 0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos());
                (f * (1.0 - r) + r).max(0.0)
            }
        }
    }

    /// LR used for optimizer step `step` (0-based), as HF's `LambdaLR` gives it after `step`
    /// `scheduler.step()` calls: `base_lr * factor(step)`.
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    pub fn min_lr(&self) -> f64 {
        self.min_lr
    }

    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: Warmup, total: usize, min_lr: f64) -> Schedule {
        Schedule::new(kind, 1e-3, warmup, total, min_lr).unwrap()
    }

    fn key_of(err: Error) -> String {
        match err {
            Error::Config { key, .. } => key,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn zero_warmup_starts_at_base_lr() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = sched(kind, Warmup::Steps(0), 10, 0.0);
            assert_eq!(s.warmup_steps(), 0);
            assert_eq!(s.lr(0), 1e-3, "{kind}");
            let s = sched(kind, Warmup::Ratio(0.0), 10, 0.0);
            assert_eq!(s.lr(0), 1e-3, "{kind}");
        }
    }

    #[test]
    fn warmup_is_linear_from_zero_and_reaches_base_lr() {
        let s = sched(ScheduleKind::Cosine, Warmup::Steps(4), 10, 0.0);
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(2), 1e-3 * 0.5);
        assert_eq!(s.lr(4), 1e-3);
    }

    #[test]
    fn decays_to_zero_or_min_lr_at_the_end() {
        let s = sched(ScheduleKind::Linear, Warmup::Steps(2), 10, 0.0);
        assert_eq!(s.lr(10), 0.0);
        assert_eq!(s.lr(12), 0.0, "linear stays at 0 past the end");
        let s = sched(ScheduleKind::Cosine, Warmup::Steps(2), 10, 0.0);
        assert!(s.lr(10).abs() < 1e-18);
        let s = sched(ScheduleKind::Linear, Warmup::Steps(2), 10, 1e-4);
        assert!((s.lr(10) - 1e-4).abs() < 1e-18);
        assert!((s.lr(6) - (0.5 * 0.9 + 0.1) * 1e-3).abs() < 1e-15);
        let s = sched(ScheduleKind::Cosine, Warmup::Steps(2), 10, 1e-4);
        assert!((s.lr(10) - 1e-4).abs() < 1e-18);
        assert!((s.lr(6) - (0.5 * 0.9 + 0.1) * 1e-3).abs() < 1e-15);
        // Warmup ignores the floor (HF), and so does the constant schedule.
        assert_eq!(s.lr(0), 0.0);
        let s = sched(ScheduleKind::Constant, Warmup::Steps(0), 10, 1e-4);
        assert_eq!(s.lr(9), 1e-3);
    }

    #[test]
    fn ratio_rounds_up_like_hf() {
        // 100 * 0.07 = 7.000000000000001 in f64 -> 8, as math.ceil gives it.
        assert_eq!(
            sched(ScheduleKind::Linear, Warmup::Ratio(0.07), 100, 0.0).warmup_steps(),
            8
        );
        assert_eq!(
            sched(ScheduleKind::Linear, Warmup::Ratio(0.15), 10, 0.0).warmup_steps(),
            2
        );
        assert_eq!(
            sched(ScheduleKind::Linear, Warmup::Ratio(1.0), 10, 0.0).warmup_steps(),
            10
        );
    }

    #[test]
    fn warmup_equal_to_total() {
        let s = sched(ScheduleKind::Linear, Warmup::Steps(5), 5, 0.0);
        assert_eq!(s.lr(4), 1e-3 * 0.8);
        assert_eq!(s.lr(5), 0.0);
        let s = sched(ScheduleKind::Cosine, Warmup::Steps(5), 5, 0.0);
        assert_eq!(s.lr(5), 1e-3);
    }

    #[test]
    fn zero_base_lr_is_allowed() {
        let s = Schedule::new(ScheduleKind::Cosine, 0.0, Warmup::Steps(1), 3, 0.0).unwrap();
        assert!((0..4).all(|i| s.lr(i) == 0.0));
    }

    #[test]
    fn invalid_settings_name_the_key() {
        let new = |base, warmup, total, min| {
            Schedule::new(ScheduleKind::Cosine, base, warmup, total, min).unwrap_err()
        };
        assert_eq!(key_of(new(1e-3, Warmup::Steps(0), 10, 2e-3)), "min_lr");
        assert_eq!(key_of(new(1e-3, Warmup::Steps(0), 10, -1e-9)), "min_lr");
        assert_eq!(
            key_of(new(-1e-3, Warmup::Steps(0), 10, 0.0)),
            "learning_rate"
        );
        assert_eq!(
            key_of(new(f64::NAN, Warmup::Steps(0), 10, 0.0)),
            "learning_rate"
        );
        assert_eq!(
            key_of(new(1e-3, Warmup::Ratio(1.5), 10, 0.0)),
            "warmup_ratio"
        );
        assert_eq!(
            key_of(new(1e-3, Warmup::Ratio(-0.1), 10, 0.0)),
            "warmup_ratio"
        );
        assert_eq!(
            key_of(new(1e-3, Warmup::Ratio(f64::NAN), 10, 0.0)),
            "warmup_ratio"
        );
        assert_eq!(
            key_of(new(1e-3, Warmup::Steps(11), 10, 0.0)),
            "warmup_steps"
        );
        assert_eq!(key_of(new(1e-3, Warmup::Steps(0), 0, 0.0)), "total_steps");
    }

    #[test]
    fn kind_parses_from_str_and_serde() {
        assert_eq!(
            "cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
        assert_eq!(
            "Linear".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Linear
        );
        assert_eq!(
            key_of("cosine_with_restarts".parse::<ScheduleKind>().unwrap_err()),
            "kind"
        );
        let k: ScheduleKind = serde_json::from_str("\"constant\"").unwrap();
        assert_eq!(k, ScheduleKind::Constant);
        assert!(serde_json::from_str::<ScheduleKind>("\"Constant\"").is_err());
        assert_eq!(ScheduleKind::Linear.to_string(), "linear");
    }
}
