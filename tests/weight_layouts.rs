//! The same weights under other key layouts, tied embeddings and reduced precision load and give
//! the same (or, for bf16/f16, close) logits.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{diff, fixtures, Expected};
use lvlm_ift::model::llava::LlavaModel;
use lvlm_ift::model::VisionLanguageModel;
use lvlm_ift::model::{LoadOptions, VisionInput};

/// Copy a model dir's non-weight files and write `tensors` as its single weight file.
fn copy_with_weights(src: &Path, dst: &Path, tensors: &HashMap<String, Tensor>) {
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".safetensors") && name != "model.safetensors.index.json" {
            std::fs::copy(&p, dst.join(&name)).unwrap();
        }
    }
    candle_core::safetensors::save(tensors, dst.join("model.safetensors")).unwrap();
}

fn raw_logits(dir: &Path, dtype: DType) -> Tensor {
    let exp = Expected::load("tiny-llava");
    let m = LlavaModel::load(
        dir,
        LoadOptions {
            dtype,
            ..LoadOptions::default()
        },
    )
    .unwrap()
    .0;
    let ids = exp.ids("input_ids.raw");
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    m.forward(
        &input,
        Some(&VisionInput::pixels(exp.tensor("pixel_values.photo"))),
        None,
    )
    .unwrap()
}

fn hub_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("tiny-llava/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn in_memory_layout_of_transformers_4_52_loads_identically() {
    let renamed: HashMap<String, Tensor> = hub_tensors()
        .into_iter()
        .map(|(k, v)| {
            let k = if let Some(r) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if k == "language_model.lm_head.weight" {
                "lm_head.weight".to_string()
            } else {
                format!("model.{k}")
            };
            (k, v)
        })
        .collect();
    assert!(renamed.contains_key("model.vision_tower.vision_model.pre_layrnorm.weight"));
    let dir = tempfile::tempdir().unwrap();
    copy_with_weights(&fixtures().join("tiny-llava"), dir.path(), &renamed);
    let a = raw_logits(&fixtures().join("tiny-llava"), DType::F32);
    let b = raw_logits(dir.path(), DType::F32);
    assert_eq!(diff(&a, &b).0, 0.0);
}

#[test]
fn tied_word_embeddings_use_the_embedding_table_as_head() {
    let mut t = hub_tensors();
    let embed = t["language_model.model.embed_tokens.weight"].clone();
    // Reference: an untied checkpoint whose head equals the embeddings.
    t.insert("language_model.lm_head.weight".into(), embed);
    let untied = tempfile::tempdir().unwrap();
    copy_with_weights(&fixtures().join("tiny-llava"), untied.path(), &t);
    // Tied: no head in the file, config says tied.
    t.remove("language_model.lm_head.weight");
    let tied = tempfile::tempdir().unwrap();
    copy_with_weights(&fixtures().join("tiny-llava"), tied.path(), &t);
    let cfg_path = tied.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["tie_word_embeddings"] = serde_json::Value::Bool(true);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let a = raw_logits(untied.path(), DType::F32);
    let b = raw_logits(tied.path(), DType::F32);
    assert_eq!(diff(&a, &b).0, 0.0);
    // Untied config with the head missing names the key.
    std::fs::write(&cfg_path, {
        cfg["text_config"]["tie_word_embeddings"] = serde_json::Value::Bool(false);
        cfg.to_string()
    })
    .unwrap();
    let err = LlavaModel::load(tied.path(), LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lm_head.weight"), "{err}");
}

#[test]
fn wrong_shape_in_a_checkpoint_names_key_and_shapes() {
    let mut t = hub_tensors();
    t.insert(
        "multi_modal_projector.linear_2.bias".into(),
        Tensor::zeros(63, DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    copy_with_weights(&fixtures().join("tiny-llava"), dir.path(), &t);
    let err = LlavaModel::load(dir.path(), LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("multi_modal_projector.linear_2.bias")
            && err.contains("[63]")
            && err.contains("[64]"),
        "{err}"
    );
}

#[test]
fn half_precision_runs_close_to_f32() {
    let dir = fixtures().join("tiny-llava");
    let full = raw_logits(&dir, DType::F32);
    for dtype in [DType::BF16, DType::F16] {
        let half = raw_logits(&dir, dtype);
        assert_eq!(half.dtype(), DType::F32, "logits are returned in f32");
        let (max, mean) = diff(&full, &half);
        println!("{dtype:?} vs f32: max abs {max:.3e}, mean abs {mean:.3e}");
        assert!(mean < 0.1 && max.is_finite(), "{dtype:?}: mean {mean}");
    }
}
