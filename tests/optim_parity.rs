//! Parity of our AdamW, gradient clipping and lr schedules with torch 2.5.1 / transformers 4.57.1
//! (fixtures from `scripts/make_optim_fixtures.py`), and an exact resume through saved state.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use lvlm_ift::train::optim::{AdamW, AdamWConfig, Gradients, ParamGroup};
use lvlm_ift::train::schedule::{Schedule, ScheduleKind, Warmup};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim")
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    meta: Value,
}

impl Fixture {
    fn load() -> Self {
        let dir = fixture_dir();
        let tensors = candle_core::safetensors::load(dir.join("adamw.safetensors"), &Device::Cpu)
            .expect("optim fixture tensors");
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adamw.json")).expect("optim fixture json"),
        )
        .expect("optim fixture json parses");
        Self { tensors, meta }
    }

    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no `{key}`"))
    }

    fn adamw(&self) -> &Value {
        &self.meta["adamw"]
    }

    fn f64(&self, key: &str) -> f64 {
        self.adamw()[key].as_f64().unwrap()
    }

    fn f64s(&self, key: &str) -> Vec<f64> {
        self.adamw()[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    }

    /// Param names in group order, with their group index.
    fn params(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for (gi, g) in self.adamw()["groups"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            for p in g["params"].as_array().unwrap() {
                out.push((p.as_str().unwrap().to_string(), gi));
            }
        }
        out
    }

    fn groups(&self) -> Vec<ParamGroup> {
        self.adamw()["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| ParamGroup {
                name: g["name"].as_str().unwrap().to_string(),
                weight_decay: g["weight_decay"].as_f64().unwrap(),
                lr_scale: g["lr_scale"].as_f64().unwrap(),
            })
            .collect()
    }

    fn config(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.f64("beta1"),
            beta2: self.f64("beta2"),
            eps: self.f64("eps"),
        }
    }

    fn schedule(&self) -> Schedule {
        Schedule::new(
            ScheduleKind::Cosine,
            self.f64("base_lr"),
            Warmup::Steps(self.adamw()["warmup_steps"].as_u64().unwrap() as usize),
            self.adamw()["steps"].as_u64().unwrap() as usize,
            0.0,
        )
        .unwrap()
    }

    fn steps(&self) -> usize {
        self.adamw()["steps"].as_u64().unwrap() as usize
    }

    /// A fresh optimizer over Vars holding `init.{p}`.
    fn optimizer(&self) -> AdamW {
        let params = self
            .params()
            .into_iter()
            .map(|(n, gi)| {
                let v = Var::from_tensor(self.tensor(&format!("init.{n}"))).unwrap();
                (n, v, gi)
            })
            .collect();
        AdamW::new(self.config(), self.groups(), params).unwrap()
    }

    /// The gradients of step `k`, through a real backward pass: two micro-batches with
    /// loss = sum(p * g) each, accumulated then halved (exact in float).
    fn gradients(&self, opt: &AdamW, k: usize) -> Gradients {
        let params = opt.params();
        let mut acc = Gradients::new();
        for _ in 0..2 {
            let mut loss: Option<Tensor> = None;
            for (n, v) in &params {
                let Some(g) = self.tensors.get(&format!("grad.{k}.{n}")) else {
                    continue;
                };
                let term = (v.as_tensor() * g).unwrap().sum_all().unwrap();
                loss = Some(match loss {
                    None => term,
                    Some(l) => (l + term).unwrap(),
                });
            }
            let store = loss.unwrap().backward().unwrap();
            acc.accumulate(Gradients::from_store(&params, &store).unwrap())
                .unwrap();
        }
        acc.scale(0.5).unwrap();
        acc
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// One training step as the training loop does it: grads, clip, scheduled lr, step.
fn train_step(fx: &Fixture, opt: &mut AdamW, sched: &Schedule, k: usize) -> (f64, f64) {
    let mut grads = fx.gradients(opt, k);
    let norm = grads.clip_global_norm(fx.f64("max_norm")).unwrap();
    let lr = sched.lr(k);
    opt.step(&grads, lr).unwrap();
    (norm, lr)
}

#[test]
fn adamw_clipping_and_cosine_schedule_match_torch() {
    let fx = Fixture::load();
    let mut opt = fx.optimizer();
    let sched = fx.schedule();
    let lrs = fx.f64s("lrs");
    let norms = fx.f64s("norms");
    let (mut max_param, mut max_m, mut max_v, mut max_lr, mut max_norm) =
        (0f64, 0f64, 0f64, 0f64, 0f64);
    for k in 0..fx.steps() {
        let (norm, lr) = train_step(&fx, &mut opt, &sched, k);
        max_lr = max_lr.max((lr - lrs[k]).abs());
        max_norm = max_norm.max((norm - norms[k]).abs());
        assert!(
            (lr - lrs[k]).abs() < 1e-12,
            "step {k}: lr {lr} vs {}",
            lrs[k]
        );
        assert!(
            (norm - norms[k]).abs() < 1e-5,
            "step {k}: norm {norm} vs {}",
            norms[k]
        );
        let state = opt.state_tensors().unwrap();
        let counts = &fx.adamw()["step_counts"][k];
        for (n, v) in opt.params() {
            let d = max_abs_diff(v.as_tensor(), fx.tensor(&format!("param.{k}.{n}")));
            assert!(d < 1e-6, "step {k}: param {n} differs by {d}");
            max_param = max_param.max(d);
            let want = counts[&n].as_u64().unwrap();
            assert_eq!(
                opt.param_step(&n),
                Some(want),
                "step {k}: step count of {n}"
            );
            if want == 0 {
                continue;
            }
            let d = max_abs_diff(
                &state[&format!("exp_avg.{n}")],
                fx.tensor(&format!("exp_avg.{k}.{n}")),
            );
            assert!(d < 1e-6, "step {k}: exp_avg {n} differs by {d}");
            max_m = max_m.max(d);
            let d = max_abs_diff(
                &state[&format!("exp_avg_sq.{n}")],
                fx.tensor(&format!("exp_avg_sq.{k}.{n}")),
            );
            assert!(d < 1e-6, "step {k}: exp_avg_sq {n} differs by {d}");
            max_v = max_v.max(d);
        }
    }
    assert_eq!(opt.num_steps(), fx.steps() as u64);
    eprintln!(
        "max |diff| vs torch: params {max_param:.3e}, exp_avg {max_m:.3e}, exp_avg_sq {max_v:.3e}, \
         lr {max_lr:.3e}, clip norm {max_norm:.3e}"
    );
}

#[test]
fn resume_from_saved_state_is_exact() {
    let fx = Fixture::load();
    let sched = fx.schedule();
    let split = 2;

    // Uninterrupted run.
    let mut straight = fx.optimizer();
    for k in 0..fx.steps() {
        train_step(&fx, &mut straight, &sched, k);
    }

    // Run to `split`, save params + optimizer state to disk, rebuild everything from the files.
    let mut first = fx.optimizer();
    for k in 0..split {
        train_step(&fx, &mut first, &sched, k);
    }
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("optimizer.safetensors");
    let params_path = dir.path().join("params.safetensors");
    candle_core::safetensors::save(&first.state_tensors().unwrap(), &state_path).unwrap();
    let params: HashMap<String, Tensor> = first
        .params()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect();
    candle_core::safetensors::save(&params, &params_path).unwrap();
    drop(first);

    let saved_params = candle_core::safetensors::load(&params_path, &Device::Cpu).unwrap();
    let vars = fx
        .params()
        .into_iter()
        .map(|(n, gi)| (n.clone(), Var::from_tensor(&saved_params[&n]).unwrap(), gi))
        .collect();
    let mut resumed = AdamW::new(fx.config(), fx.groups(), vars).unwrap();
    let state = candle_core::safetensors::load(&state_path, &Device::Cpu).unwrap();
    resumed.load_state_tensors(&state).unwrap();
    assert_eq!(resumed.num_steps(), split as u64);
    for k in split..fx.steps() {
        train_step(&fx, &mut resumed, &sched, k);
    }

    assert_eq!(resumed.num_steps(), straight.num_steps());
    let (a, b) = (
        straight.state_tensors().unwrap(),
        resumed.state_tensors().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (key, t) in &a {
        let u = &b[key];
        assert_eq!(t.dtype(), u.dtype(), "{key}");
        if t.dtype() == DType::I64 {
            assert_eq!(
                t.to_scalar::<i64>().unwrap(),
                u.to_scalar::<i64>().unwrap(),
                "{key}"
            );
        } else {
            assert_eq!(flat(t), flat(u), "{key} differs after resume");
        }
    }
    for ((n, v), (m, w)) in straight.params().into_iter().zip(resumed.params()) {
        assert_eq!(n, m);
        assert_eq!(
            flat(v.as_tensor()),
            flat(w.as_tensor()),
            "param {n} differs after resume"
        );
    }
}

#[test]
fn schedules_match_hf() {
    let fx = Fixture::load();
    let s = &fx.meta["schedules"];
    let base_lr = s["base_lr"].as_f64().unwrap();
    let cases = s["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    let mut max_diff = 0f64;
    for case in cases {
        let kind: ScheduleKind = case["kind"].as_str().unwrap().parse().unwrap();
        let warmup = if let Some(w) = case["warmup"].get("steps") {
            Warmup::Steps(w.as_u64().unwrap() as usize)
        } else {
            Warmup::Ratio(case["warmup"]["ratio"].as_f64().unwrap())
        };
        let total = case["total_steps"].as_u64().unwrap() as usize;
        let min_lr = case["min_lr"].as_f64().unwrap();
        let sched = Schedule::new(kind, base_lr, warmup, total, min_lr).unwrap();
        assert_eq!(
            sched.warmup_steps() as u64,
            case["warmup_steps"].as_u64().unwrap(),
            "{case}"
        );
        let want: Vec<f64> = case["lrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(want.len(), total + 1);
        for (step, w) in want.iter().enumerate() {
            let got = sched.lr(step);
            let d = (got - w).abs();
            max_diff = max_diff.max(d);
            assert!(
                d < 1e-12,
                "{kind} {:?} min_lr {min_lr}: step {step}: {got} vs {w}",
                case["warmup"]
            );
        }
    }
    eprintln!(
        "schedules: {} cases, max |lr diff| vs HF {max_diff:.3e}",
        cases.len()
    );
}

/// The reference's numerics: torch's AdamW on bf16 parameters keeps them, the moments and the
/// update math in bf16 (`scripts/make_optim_bf16_fixture.py`, torch 2.15.0). Replayed with
/// moments in the parameters' dtype (each op in f32, rounded once, as torch's ops do), three
/// steps give torch's parameters and moments bit for bit.
#[test]
fn adamw_on_bf16_params_follows_torch() {
    let fx =
        candle_core::safetensors::load(fixture_dir().join("adamw_bf16.safetensors"), &Device::Cpu)
            .expect("bf16 optim fixture");
    let names = ["a", "b", "c"];
    let vars: Vec<(String, Var, usize)> = names
        .iter()
        .map(|n| {
            let init = &fx[&format!("init.{n}")];
            assert_eq!(init.dtype(), DType::BF16);
            ((*n).to_string(), Var::from_tensor(init).unwrap(), 0)
        })
        .collect();
    let groups = vec![ParamGroup {
        name: "all".into(),
        weight_decay: 0.01,
        lr_scale: 1.0,
    }];
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let mut opt = AdamW::new(cfg, groups, vars.clone())
        .unwrap()
        .with_moments_in_param_dtype()
        .unwrap();
    let mut worst = 0f32;
    for k in 0..3 {
        let mut grads = Gradients::new();
        for n in names {
            grads.insert(n, &fx[&format!("grad.{k}.{n}")]).unwrap();
        }
        opt.step(&grads, 1e-2).unwrap();
        let state = opt.state_tensors().unwrap();
        for (n, var, _) in &vars {
            assert_eq!(var.dtype(), DType::BF16);
            for (ours, key) in [
                (var.as_tensor().clone(), format!("param.{k}.{n}")),
                (
                    state[&format!("exp_avg.{n}")].clone(),
                    format!("exp_avg.{k}.{n}"),
                ),
                (
                    state[&format!("exp_avg_sq.{n}")].clone(),
                    format!("exp_avg_sq.{k}.{n}"),
                ),
            ] {
                assert_eq!(ours.dtype(), DType::BF16, "{key}");
                let theirs = fx[&key].to_dtype(DType::F32).unwrap();
                let ours = ours.to_dtype(DType::F32).unwrap();
                // Relative to each element's magnitude: bf16 keeps 8 significant bits.
                let rel = ((&ours - &theirs).unwrap().abs().unwrap()
                    / (theirs.abs().unwrap() + 1e-12).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
                worst = worst.max(rel);
                assert_eq!(rel, 0.0, "{key}: relative difference {rel}");
            }
        }
    }
    assert_eq!(worst, 0.0);
}
