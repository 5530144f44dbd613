//! Training engine end to end on the tiny checkpoint and pair set: exact resume, outputs, merge.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use lvlm_ift::config::TrainConfig;
use lvlm_ift::train::checkpoint::load_safetensors;
use lvlm_ift::train::recipe::{run_recipe, Resume};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The LoRA fixture recipe with dropout on (so the RNG state matters), 2 epochs, checkpoints every 3
/// steps, written to `out`.
fn recipe(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut ov = common::fixture_overrides(out);
    ov.extend(
        [
            "train.epochs=2",
            "train.save_every=3",
            "train.keep_last=10",
            "lora.dropout=0.1",
        ]
        .map(String::from),
    );
    ov.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(&repo().join("tests/fixtures/recipes/lora.toml"), &ov).unwrap()
}

#[test]
fn resume_from_a_checkpoint_reproduces_the_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let out = run_recipe(&recipe(&straight, &[]), Resume::No, true).unwrap();
    assert_eq!(out[0].steps, 6);
    // The same recipe interrupted after step 3 (schedule unchanged), then resumed by a fresh run.
    let resumed = tmp.path().join("resumed");
    let halted = run_recipe(&recipe(&resumed, &["train.stop_after=3"]), Resume::No, true).unwrap();
    assert_eq!((halted[0].steps, halted[0].complete), (3, false));
    let out2 = run_recipe(&recipe(&resumed, &[]), Resume::Latest, true).unwrap();
    assert_eq!((out2[0].steps, out2[0].complete), (6, true));
    let a = load_safetensors(
        &straight.join("checkpoints/checkpoint-6/trainable.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let b = load_safetensors(
        &resumed.join("checkpoints/checkpoint-6/trainable.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (k, ta) in &a {
        let d = (ta - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    println!(
        "straight vs resumed after 6 steps: max abs diff {worst:e} over {} tensors",
        a.len()
    );
    assert!(worst <= 1e-6, "{worst}");
    // The metrics log of the resumed run has each step once.
    let m = lvlm_ift::train::metrics::MetricsLog::read_all(&resumed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = m.iter().map(|s| s.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
}

fn lvlm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_train_writes_adapter_metrics_plot_and_merge_matches_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = repo().join("tests/fixtures/recipes/lora.toml");
    let o = lvlm(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--set",
        &format!("train.output_dir={}", out.display()),
        "--set",
        "train.epochs=2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "full_weights.safetensors",
        "config.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let meta = lvlm_ift::train::checkpoint::read_safetensors_metadata(
        &out.join("adapter/adapter_model.safetensors"),
    )
    .unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let merged = tmp.path().join("merged");
    let o = lvlm(&[
        "merge",
        "--model",
        "tests/fixtures/tiny-llava",
        "--adapter",
        out.join("adapter").to_str().unwrap(),
        "--full-weights",
        out.join("full_weights.safetensors").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let score = |model: &str, adapter: Option<&Path>| -> Vec<f64> {
        let mut args = vec![
            "score",
            "--model",
            model,
            "--image",
            "tests/fixtures/pairs/images/03_big_green_circle.png",
            "--prompt",
            "Describe this medical scan.",
            "--continuation",
            " big size, round shape, green colour, circle",
            "--json",
        ];
        let a;
        if let Some(p) = adapter {
            a = p.to_string_lossy().to_string();
            args.extend(["--adapter", a.as_str()]);
        }
        let o = lvlm(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let via_merge = score(merged.to_str().unwrap(), None);
    // The adapter alone lacks the fully trained projector, so compare merge(adapter only) too.
    let merged_lora = tmp.path().join("merged-lora");
    let o = lvlm(&[
        "merge",
        "--model",
        "tests/fixtures/tiny-llava",
        "--adapter",
        out.join("adapter").to_str().unwrap(),
        "--out",
        merged_lora.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let a = score(merged_lora.to_str().unwrap(), None);
    let b = score("tests/fixtures/tiny-llava", Some(&out.join("adapter")));
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max);
    println!("score merged vs base+adapter: max abs {max:e}");
    assert!(max < 1e-4);
    let base = score("tests/fixtures/tiny-llava", None);
    assert!(
        via_merge
            .iter()
            .zip(&base)
            .any(|(x, y)| (x - y).abs() > 1e-3),
        "training changed nothing"
    );
}

#[test]
fn bad_recipes_fail_with_the_key_named() {
    let tmp = tempfile::tempdir().unwrap();
    let o = lvlm(&[
        "train",
        "--config",
        "configs/smoke.toml",
        "--set",
        "optim.lrr=1",
        "--dry-run",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("lrr"));
    let o = lvlm(&[
        "train",
        "--config",
        "configs/smoke.toml",
        "--dry-run",
        "--set",
        &format!(
            "data.train=[{{ manifest = \"{}/none.jsonl\" }}]",
            tmp.path().display()
        ),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("none.jsonl"));
    let o = lvlm(&["train", "--config", "configs/smoke.toml", "--dry-run"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "trainable",
        "steps/epoch",
        "total steps",
        "memory estimate",
        "loss mask",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle}: {plan}");
    }
}

/// `model.trainable_dtype = "bf16"` (the reference's numerics, on a bf16 model): the trainable
/// weights and AdamW's moments are bf16 in memory and in every checkpoint, the proxy-free LoRA +
/// projector stage trains, and a resume continues bit for bit.
#[test]
fn bf16_trainable_weights_and_moments_train_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = [
        "model.dtype=bf16",
        "model.trainable_dtype=bf16",
        "train.epochs=1",
    ];
    let straight = tmp.path().join("straight");
    let out = run_recipe(&recipe(&straight, &bf16), Resume::No, true).unwrap();
    assert_eq!(out[0].steps, 3);
    assert!(out[0].final_loss.unwrap().is_finite());
    let ckpt = straight.join("checkpoints/checkpoint-3");
    let weights = load_safetensors(&ckpt.join("trainable.safetensors"), &Device::Cpu).unwrap();
    let moments = load_safetensors(&ckpt.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    assert!(weights
        .values()
        .all(|t| t.dtype() == candle_core::DType::BF16));
    let exp_avg: Vec<_> = moments
        .iter()
        .filter(|(k, _)| k.starts_with("exp_avg"))
        .collect();
    assert!(!exp_avg.is_empty());
    assert!(exp_avg
        .iter()
        .all(|(_, t)| t.dtype() == candle_core::DType::BF16));
    let resumed = tmp.path().join("resumed");
    let mut halt = bf16.to_vec();
    halt.push("train.stop_after=2");
    run_recipe(&recipe(&resumed, &halt), Resume::No, true).unwrap();
    run_recipe(&recipe(&resumed, &bf16), Resume::Latest, true).unwrap();
    let again = load_safetensors(
        &resumed.join("checkpoints/checkpoint-3/trainable.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (k, t) in &weights {
        let d = common::diff(t, &again[k]).0;
        assert_eq!(d, 0.0, "{k}: resumed run differs by {d}");
    }
}
