//! Instruction-free tuning end to end on the tiny checkpoint: the proxy's momentum arithmetic in
//! a real training stage, multi-stage recipes with resume, and a falling loss on synthetic pairs.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lvlm_ift::config::TrainConfig;
use lvlm_ift::method::proxy::ProxyInstruction;
use lvlm_ift::train::recipe::{run_recipe, Resume};

mod common;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The smoke recipe pointed at absolute fixture paths and `out`.
fn smoke(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut ov = common::fixture_overrides(out);
    ov.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(&repo().join("configs/smoke.toml"), &ov).unwrap()
}

/// One-stage recipe training only the proxy for one optimizer step.
fn proxy_step(out: &Path, momentum: Option<f64>) -> ProxyInstruction {
    let mut text = std::fs::read_to_string(repo().join("configs/smoke.toml")).unwrap();
    let cut = text.find("[[stages]]").unwrap();
    text.truncate(cut);
    text.push_str(&format!(
        "[[stages]]\nname = \"only\"\ntrainable = [\"proxy\"]\nepochs = 1\nmax_steps = 1\nlr = 0.05\n{}",
        momentum.map(|m| format!("momentum = {m}\n")).unwrap_or_default()
    ));
    let mut ov = common::fixture_overrides(out);
    ov.extend(["schedule.kind=constant", "schedule.warmup_ratio=0.0"].map(String::from));
    let cfg = TrainConfig::from_toml_str(&text, Path::new("inline.toml"), &ov).unwrap();
    run_recipe(&cfg, Resume::No, true).unwrap();
    ProxyInstruction::load(&out.join("only/proxy.safetensors"), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn momentum_moves_the_proxy_by_one_minus_m_of_the_optimizer_step() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = proxy_step(&tmp.path().join("plain"), None);
    let with_m = proxy_step(&tmp.path().join("momentum"), Some(0.9));
    // Both start from the same seeded vectors and see the same batch: the optimizer's own move
    // is the plain run's delta. With momentum the average (what the next step starts from) moves
    // by (1 - m) of it, while P itself took the full step.
    let p0 = ProxyInstruction::uniform(
        8,
        64,
        lvlm_ift::method::proxy::REFERENCE_BOUND,
        1,
        &Device::Cpu,
    )
    .unwrap();
    let p0 = flat(p0.var().as_tensor());
    let full: Vec<f32> = flat(plain.var().as_tensor())
        .iter()
        .zip(&p0)
        .map(|(a, b)| a - b)
        .collect();
    let ema = flat(with_m.ema().expect("momentum run saves its average"));
    let moved: Vec<f32> = ema.iter().zip(&p0).map(|(a, b)| a - b).collect();
    let step_norm: f32 = full.iter().map(|d| d * d).sum::<f32>().sqrt();
    assert!(
        step_norm > 1e-3,
        "the optimizer step moved the proxy by {step_norm}"
    );
    let err = moved
        .iter()
        .zip(&full)
        .map(|(m, f)| (m - 0.1 * f).abs())
        .fold(0f32, f32::max);
    println!("optimizer step norm {step_norm:.4}, max |EMA move - 0.1 * step| = {err:.2e}");
    assert!(err < 1e-6, "{err}");
    assert_eq!(
        flat(with_m.var().as_tensor()),
        flat(plain.var().as_tensor())
    );
}

#[test]
fn two_stage_recipe_runs_resumes_and_chains_its_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Only warm-up 1 epoch + main 2 epochs to keep the test quick.
    let mut cfg = smoke(&out, &["train.save_every=2"]);
    cfg.stages[0].epochs = Some(1);
    cfg.stages[1].epochs = Some(2);
    cfg.train.stop_after = Some(4);
    // Warm-up has 3 steps, so it completes; main halts at its step 4... of 6.
    let first = run_recipe(&cfg, Resume::No, true).unwrap();
    assert_eq!(first.len(), 2);
    assert!(first[0].complete && !first[1].complete);
    assert!(out.join("warmup/COMPLETE").is_file() && !out.join("main/COMPLETE").exists());
    let warm = ProxyInstruction::load(&out.join("warmup/proxy.safetensors"), &Device::Cpu).unwrap();
    assert!(warm.ema().is_none(), "no momentum in warm-up");
    cfg.train.stop_after = None;
    let rest = run_recipe(&cfg, Resume::Latest, true).unwrap();
    assert_eq!(rest.len(), 1, "the finished warm-up is skipped");
    assert_eq!((rest[0].steps, rest[0].complete), (6, true));
    for f in [
        "main/adapter/adapter_model.safetensors",
        "main/full_weights.safetensors",
        "main/proxy.safetensors",
        "loss.png",
        "config.toml",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // The main stage started from the warm-up's vectors and moved them only a little.
    let main = ProxyInstruction::load(&out.join("main/proxy.safetensors"), &Device::Cpu).unwrap();
    let drift: f32 = flat(main.ema().unwrap())
        .iter()
        .zip(flat(warm.var().as_tensor()))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("main-stage proxy drift from warm-up (EMA): {drift:.2e}");
    assert!(drift < 1e-3, "{drift}");
}

/// A few hundred steps of proxy + shuffling on synthetic attribute pairs: the loss falls clearly.
#[test]
fn loss_falls_on_synthetic_pairs_with_proxy_and_shuffling() {
    use lvlm_ift::data::synthetic::{write_synthetic_pairs, SynthSpec};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("synth");
    write_synthetic_pairs(
        &data,
        &SynthSpec {
            count: 48,
            image_size: 48,
            seed: 3,
        },
    )
    .unwrap();
    let out = tmp.path().join("run");
    let ov: Vec<String> = vec![
        format!(
            "model.path={}",
            repo().join("tests/fixtures/tiny-llava").display()
        ),
        format!(
            "data.train=[{{ manifest = \"{}\" }}]",
            data.join("pairs.jsonl").display()
        ),
        format!("train.output_dir={}", out.display()),
        "data.instruction_mode=proxy".into(),
        "data.shuffle=comma".into(),
        "train.epochs=13".into(),
        "train.grad_accum=1".into(),
        "schedule.kind=constant".into(),
        "optim.lr=3e-3".into(),
    ];
    let cfg = TrainConfig::load(&repo().join("tests/fixtures/recipes/lora.toml"), &ov).unwrap();
    let outcome = run_recipe(&cfg, Resume::No, true).unwrap();
    assert_eq!(outcome[0].steps, 13 * 24);
    let m = lvlm_ift::train::metrics::MetricsLog::read_all(&out.join("metrics.jsonl")).unwrap();
    let mean = |s: &[lvlm_ift::train::metrics::StepMetrics]| {
        s.iter().map(|x| x.loss).sum::<f64>() / s.len() as f64
    };
    let (first, last) = (mean(&m[..24]), mean(&m[m.len() - 24..]));
    println!(
        "synthetic pairs, {} steps: mean loss first epoch {first:.3}, last epoch {last:.3}",
        m.len()
    );
    assert!(last < 0.6 * first, "loss {first} -> {last}");
}
