//! Activation checkpointing changes memory, not training: with every vision and decoder layer
//! recomputed in the backward pass, both families train to the weights they reach without it —
//! LoRA with dropout (the masks replayed) plus a full group on LLaVA, and the reference recipe on
//! Mllama (proxy warm-up, then the vision encoder and the cross-attention layers in full, whose
//! image states enter the checkpointed cross-attention layers as inputs).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lvlm_ift::config::TrainConfig;
use lvlm_ift::train::checkpoint::{load_safetensors, CheckpointManager};
use lvlm_ift::train::plan::TrainPlan;
use lvlm_ift::train::recipe::{run_recipe, Resume};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn llava(out: &Path, on: bool) -> TrainConfig {
    let mut ov = common::fixture_overrides(out);
    ov.push(format!("train.activation_checkpointing={on}"));
    ov.push("lora.dropout=0.1".into());
    ov.push("train.epochs=1".into());
    TrainConfig::load(&repo().join("tests/fixtures/recipes/lora.toml"), &ov).unwrap()
}

fn mllama(out: &Path, on: bool) -> TrainConfig {
    let mut ov = common::tiny_mllama_overrides(out);
    ov.extend([
        // At eps 1e-8 AdamW moves a weight whose gradient is ~0 by about lr·sign(g), turning
        // last-bit differences into lr-sized ones; a larger eps keeps the comparison about the
        // gradients (measured: up to 1.4e-5 at eps 1e-8, 2.2e-6 at 1e-3).
        "optim.eps=1e-3".into(),
        format!("train.activation_checkpointing={on}"),
    ]);
    TrainConfig::load(&repo().join("configs/instfree-mllama-wbcatt.toml"), &ov).unwrap()
}

/// Every tensor of a checkpoint's trainable and proxy files, by file and name.
fn checkpoint(dir: &Path) -> Vec<(String, Tensor)> {
    let mut all = Vec::new();
    for file in ["trainable.safetensors", "proxy.safetensors"] {
        let path = dir.join(file);
        if path.is_file() {
            for (k, t) in load_safetensors(&path, &Device::Cpu).unwrap() {
                all.push((format!("{file}:{k}"), t));
            }
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!all.is_empty(), "{} holds no tensors", dir.display());
    all
}

/// Equal within `rel` of each tensor's largest value.
fn assert_same(a: &Path, b: &Path, rel: f32) {
    let (ta, tb) = (checkpoint(a), checkpoint(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let diff = common::rel_diff(x, y);
        assert!(
            diff <= rel,
            "{na}: checkpointed training differs by {diff:e} (relative)"
        );
    }
}

#[test]
fn llava_lora_with_dropout_trains_the_same_with_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    let (off, on) = (tmp.path().join("off"), tmp.path().join("on"));
    let cfg = llava(&on, true);
    let plan = TrainPlan::build(&cfg, &cfg.stage_specs()[0], None).unwrap();
    assert!(plan.activation_checkpointing());
    assert!(plan
        .describe()
        .unwrap()
        .contains("activation checkpointing on"));
    let a = run_recipe(&llava(&off, false), Resume::No, true).unwrap();
    let b = run_recipe(&cfg, Resume::No, true).unwrap();
    assert_eq!(a[0].steps, b[0].steps);
    let step = format!("checkpoints/checkpoint-{}", a[0].steps);
    // The same ops on the same values, in the same order: bitwise equal.
    assert_same(&off.join(&step), &on.join(&step), 0.0);
}

#[test]
fn mllama_reference_recipe_trains_the_same_with_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    let (off, on) = (tmp.path().join("off"), tmp.path().join("on"));
    run_recipe(&mllama(&off, false), Resume::No, true).unwrap();
    run_recipe(&mllama(&on, true), Resume::No, true).unwrap();
    for stage in ["warmup", "main"] {
        let newest = |root: &Path| {
            CheckpointManager::new(&root.join(stage).join("checkpoints"), None)
                .latest()
                .unwrap()
                .unwrap()
        };
        let (a, b) = (newest(&off), newest(&on));
        assert_eq!(a.file_name(), b.file_name());
        // The image states' gradient sums its cross-attention layers' parts in another order,
        // so the gradients differ in their last bits, which the AdamW steps carry on. Measured:
        // 5.3e-6 at most (layernorm_pre's bias; under 5e-6 while the loss's gradient came from
        // the composed log-softmax, whose last bits differ from softmax − one-hot's).
        assert_same(&a, &b, 1e-5);
    }
}

#[test]
fn checkpointing_defaults_to_on_for_cuda_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ov = common::fixture_overrides(tmp.path());
    ov.push("model.device=cuda".into());
    let cuda = TrainConfig::load(&repo().join("tests/fixtures/recipes/lora.toml"), &ov).unwrap();
    let plan = TrainPlan::build_for_dry_run(&cuda, &cuda.stage_specs()[0], None, 1).unwrap();
    assert!(plan.activation_checkpointing());
    let cpu = llava(tmp.path(), false);
    let mut cpu = cpu;
    cpu.train.activation_checkpointing = None;
    let plan = TrainPlan::build(&cpu, &cpu.stage_specs()[0], None).unwrap();
    assert!(!plan.activation_checkpointing());
}
