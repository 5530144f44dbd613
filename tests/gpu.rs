//! GPU against CPU on the tiny fixtures (`scripts/gpu-check.sh` runs these with `--features cuda`
//! on a machine with a GPU). Without a CUDA build or device every test says so and returns, so
//! CI stays green; each check prints one `GPU-CHECK <name>: ok|skipped …` line.
//!
//! - forward parity: per-token log-probabilities of a continuation (both families), f32 on the
//!   GPU within 1e-4 of the CPU, bf16 on the GPU within 0.1 nats of f32 on the CPU;
//! - one training step (LoRA + the projector in full, tiny LLaVA) to the CPU's weights within
//!   1e-4 (relative to each tensor's largest value);
//! - greedy generation: the same tokens;
//! - the smoke recipe (proxy warm-up + main stage) with `model.device = "cuda"`;
//! - `eval` of the WBCAtt fixture benchmark with `--device cuda`: the CPU's answers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use common::fixtures;
use lvlm_ift::config::TrainConfig;
use lvlm_ift::data::processor::AspectMode;
use lvlm_ift::session::{Prompt, Session, SessionOptions};
use lvlm_ift::train::checkpoint::load_safetensors;
use lvlm_ift::train::recipe::{run_recipe, Resume};

/// The GPU, or why not (printed as the check's skip reason).
fn gpu() -> Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("built without --features cuda".into());
    }
    Device::new_cuda(0).map_err(|e| format!("no CUDA device ({e})"))
}

fn skip_unless_gpu(check: &str) -> Option<Device> {
    match gpu() {
        Ok(d) => Some(d),
        Err(why) => {
            println!("GPU-CHECK {check}: skipped: {why}");
            None
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn session(model: &str, device: Device, dtype: DType) -> Session {
    let opts = SessionOptions {
        device,
        dtype,
        aspect: AspectMode::Squash,
        max_tiles: (model == "tiny-mllama").then_some(1),
        ..SessionOptions::default()
    };
    Session::load(&fixtures().join(model).to_string_lossy(), opts).unwrap()
}

fn image() -> PathBuf {
    fixtures().join("images/photo_67x45.png")
}

#[test]
fn forward_parity_gpu_vs_cpu() {
    let Some(gpu) = skip_unless_gpu("forward-parity") else {
        return;
    };
    let prompt = Prompt::Chat("What is shown?".into());
    let mut worst = (0f32, 0f32);
    for model in ["tiny-llava", "tiny-mllama"] {
        let cpu = session(model, Device::Cpu, DType::F32)
            .score(&image(), &prompt, "a small round cell")
            .unwrap();
        let f32 = session(model, gpu.clone(), DType::F32)
            .score(&image(), &prompt, "a small round cell")
            .unwrap();
        let bf16 = session(model, gpu.clone(), DType::BF16)
            .score(&image(), &prompt, "a small round cell")
            .unwrap();
        assert_eq!(cpu.token_ids, f32.token_ids);
        for ((c, g), b) in cpu
            .token_logprobs
            .iter()
            .zip(&f32.token_logprobs)
            .zip(&bf16.token_logprobs)
        {
            worst.0 = worst.0.max((c - g).abs());
            worst.1 = worst.1.max((c - b).abs());
        }
    }
    assert!(worst.0 <= 1e-4, "f32 GPU vs CPU: {}", worst.0);
    assert!(worst.1 <= 0.1, "bf16 GPU vs f32 CPU: {}", worst.1);
    println!(
        "GPU-CHECK forward-parity: ok (max |Δ logprob| f32 {:.2e}, bf16 {:.2e})",
        worst.0, worst.1
    );
}

#[test]
fn greedy_generation_gpu_equals_cpu() {
    let Some(gpu) = skip_unless_gpu("greedy-generation") else {
        return;
    };
    let prompt = Prompt::Chat("Describe the image.".into());
    for model in ["tiny-llava", "tiny-mllama"] {
        let cpu = session(model, Device::Cpu, DType::F32)
            .generate(&image(), &prompt, 20)
            .unwrap();
        let gpu = session(model, gpu.clone(), DType::F32)
            .generate(&image(), &prompt, 20)
            .unwrap();
        assert_eq!(cpu.token_ids, gpu.token_ids, "{model}");
    }
    println!("GPU-CHECK greedy-generation: ok (20 tokens, both families)");
}

fn lora_step(out: &Path, device: &str) -> Vec<(String, candle_core::Tensor)> {
    let mut ov = common::fixture_overrides(out);
    ov.extend([
        format!("model.device={device}"),
        "lora.dropout=0.0".into(),
        "train.stop_after=1".into(),
        "train.activation_checkpointing=false".into(),
    ]);
    let cfg = TrainConfig::load(&repo().join("tests/fixtures/recipes/lora.toml"), &ov).unwrap();
    run_recipe(&cfg, Resume::No, true).unwrap();
    let mut w: Vec<_> = load_safetensors(
        &out.join("checkpoints/checkpoint-1/trainable.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn one_training_step_gpu_vs_cpu() {
    if skip_unless_gpu("training-step").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cpu = lora_step(&tmp.path().join("cpu"), "cpu");
    let gpu = lora_step(&tmp.path().join("gpu"), "cuda");
    let mut worst = 0f32;
    for ((n, a), (m, b)) in cpu.iter().zip(&gpu) {
        assert_eq!(n, m);
        worst = worst.max(common::rel_diff(a, b));
    }
    assert!(worst <= 1e-4, "one LoRA step, GPU vs CPU: {worst:e}");
    println!("GPU-CHECK training-step: ok (max relative difference {worst:.2e})");
}

fn lvlm(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .current_dir(repo())
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lvlm-ift {args:?}: {text}");
    text
}

#[test]
fn smoke_recipe_on_cuda() {
    if skip_unless_gpu("smoke-recipe").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smoke");
    let log = lvlm(&[
        "train",
        "--config",
        "configs/smoke.toml",
        "--quiet",
        "--set",
        "model.device=cuda",
        "--set",
        &format!("train.output_dir={}", out.display()),
    ]);
    assert!(log.contains("done:"), "{log}");
    println!(
        "GPU-CHECK smoke-recipe: ok ({})",
        log.lines().last().unwrap_or("")
    );
}

#[test]
fn eval_on_cuda_answers_as_on_cpu() {
    if skip_unless_gpu("eval").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    lvlm(&[
        "prepare",
        "--benchmark",
        "wbcatt",
        "--source",
        "tests/fixtures/bench/wbcatt",
        "--out",
        &s(&data),
    ]);
    let eval = |device: &str| {
        let out = tmp.path().join(format!("eval-{device}"));
        lvlm(&[
            "eval",
            "--benchmark",
            "wbcatt",
            "--data",
            &s(&data),
            "--model",
            "tests/fixtures/tiny-llava",
            "--split",
            "test",
            "--device",
            device,
            "--out",
            &s(&out),
            "--quiet",
        ]);
        let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
        preds
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["id"].clone(), v["key"].clone(), v["predicted"].clone())
            })
            .collect::<Vec<_>>()
    };
    let (cpu, gpu) = (eval("cpu"), eval("cuda"));
    assert_eq!(cpu, gpu);
    println!(
        "GPU-CHECK eval: ok ({} WBCAtt fixture items, answers equal to the CPU's)",
        cpu.len()
    );
}
