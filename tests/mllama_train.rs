//! Training Llama-3.2-Vision end to end on the tiny checkpoint: the shipped reference recipe
//! (proxy warm-up, then the vision encoder and the fusion layers in full with the proxy under
//! momentum, the language model frozen) and a LoRA recipe, each for a few steps; their outputs
//! load back for scoring.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, IndexOp};
use lvlm_ift::config::TrainConfig;
use lvlm_ift::train::checkpoint::load_safetensors;
use lvlm_ift::train::recipe::{run_recipe, Resume};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    repo().join("tests/fixtures/tiny-mllama")
}

/// The shipped WBCAtt recipe on the tiny checkpoint and pairs, on the CPU in f32, two steps a
/// stage, with `extra` overrides.
fn recipe(out: &Path, extra: &[&str]) -> TrainConfig {
    recipe_from(
        &repo().join("configs/instfree-mllama-wbcatt.toml"),
        out,
        extra,
    )
}

fn recipe_from(config: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut ov = common::tiny_mllama_overrides(out);
    ov.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(config, &ov).unwrap()
}

fn score(model: &Path, extra: &[&str]) -> f64 {
    let image = repo().join("tests/fixtures/images/small_20x26.png");
    let o = Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(["score", "--model"])
        .arg(model)
        .args(extra)
        .arg("--image")
        .arg(&image)
        .args([
            "--prompt",
            "Describe the image.",
            "--continuation",
            " a small red circle",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    v["logprob"].as_f64().unwrap()
}

#[test]
fn the_reference_recipe_trains_the_vision_encoder_and_fusion_only() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let outcomes = run_recipe(&recipe(&out, &[]), Resume::No, true).unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes
        .iter()
        .all(|o| o.final_loss.is_some_and(f64::is_finite)));
    let full = load_safetensors(&out.join("main/full_weights.safetensors"), &Device::Cpu).unwrap();
    let base = load_safetensors(&tiny().join("model.safetensors"), &Device::Cpu).unwrap();
    // Vision encoder, cross-attention layers and projector are there; no self-attention layer.
    assert!(full.contains_key("model.vision_model.class_embedding"));
    assert!(full.contains_key("model.language_model.layers.1.cross_attn.q_proj.weight"));
    assert!(full.contains_key("model.multi_modal_projector.weight"));
    assert!(!full
        .keys()
        .any(|k| k.starts_with("model.language_model.layers.0.")));
    assert!(!full.contains_key("lm_head.weight"));
    // The embedding table goes out whole: its first 384 rows as in the base, the 8 extra rows
    // (the image token's first among them) trained.
    let emb = full["model.language_model.embed_tokens.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    let base_emb = base["language_model.model.embed_tokens.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    let diff = |a: candle_core::Tensor, b: candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(
        diff(emb.i(0..384).unwrap(), base_emb.i(0..384).unwrap()),
        0.0
    );
    assert!(diff(emb.i(384..385).unwrap(), base_emb.i(384..385).unwrap()) > 0.0);
    // The trained weights score differently from the base, through the CLI.
    let trained = score(
        &tiny(),
        &[
            "--full-weights",
            out.join("main/full_weights.safetensors").to_str().unwrap(),
        ],
    );
    let untouched = score(&tiny(), &[]);
    assert!(
        (trained - untouched).abs() > 1e-4,
        "{trained} vs {untouched}"
    );
}

#[test]
fn lora_on_the_family_writes_a_peft_adapter_that_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    // The shipped recipe with LoRA instead of full training, as its header suggests.
    let shipped =
        std::fs::read_to_string(repo().join("configs/instfree-mllama-wbcatt.toml")).unwrap();
    let text = shipped
        .replace("groups = [\"vision_encoder\", \"fusion\"]", "groups = []")
        .replace(
            "trainable = [\"proxy\", \"full\"]",
            "trainable = [\"proxy\", \"lora\"]",
        )
        + "\n[lora]\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    assert_ne!(text, shipped);
    let config = tmp.path().join("lora.toml");
    std::fs::write(&config, text).unwrap();
    let cfg = recipe_from(&config, &out, &[]);
    run_recipe(&cfg, Resume::No, true).unwrap();
    let adapter = out.join("main/adapter");
    let a = lvlm_ift::adapter::read_adapter(
        &adapter,
        &Device::Cpu,
        lvlm_ift::model::mllama::canonical_name,
    )
    .unwrap();
    // q/v of every vision layer (5) and text layer (4).
    assert_eq!(a.weights.len(), 18);
    assert!(a
        .weights
        .contains_key("model.language_model.layers.1.cross_attn.q_proj"));
    let with = score(&tiny(), &["--adapter", adapter.to_str().unwrap()]);
    let without = score(&tiny(), &[]);
    assert!((with - without).abs() > 1e-4, "{with} vs {without}");
}

/// The reference recipe in the model's own dtype, bf16: the vision encoder and the fusion layers
/// trained in full hold f32 weights (the default) or bf16 ones (`model.trainable_dtype`, the
/// reference's numerics), both next to the frozen bf16 language model.
#[test]
fn the_reference_recipe_trains_a_bf16_model_with_f32_or_bf16_trainable_weights() {
    for trainable in ["f32", "bf16"] {
        let tmp = tempfile::tempdir().unwrap();
        let dtype = format!("model.trainable_dtype={trainable}");
        let cfg = recipe(tmp.path(), &["model.dtype=bf16", &dtype]);
        let outs = run_recipe(&cfg, Resume::No, true).unwrap();
        assert_eq!(outs.len(), 2, "{trainable}");
        for o in &outs {
            assert!(o.final_loss.unwrap().is_finite(), "{trainable}: {o:?}");
        }
        let ckpt = CheckpointManagerLatest::of(&tmp.path().join("main"));
        let weights = load_safetensors(&ckpt.join("trainable.safetensors"), &Device::Cpu).unwrap();
        let want = if trainable == "bf16" {
            DType::BF16
        } else {
            DType::F32
        };
        assert!(weights.values().all(|t| t.dtype() == want), "{trainable}");
    }
}

/// The newest checkpoint of a stage directory.
struct CheckpointManagerLatest;
impl CheckpointManagerLatest {
    fn of(stage: &Path) -> PathBuf {
        lvlm_ift::train::checkpoint::CheckpointManager::new(&stage.join("checkpoints"), None)
            .latest()
            .unwrap()
            .expect("a checkpoint")
    }
}
