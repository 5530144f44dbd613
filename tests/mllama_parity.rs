//! Llama-3.2-Vision (`MllamaForConditionalGeneration`) against HF transformers, on the tiny random
//! checkpoint of `scripts/make_mllama_model_fixtures.py`: logits with a 2-tile and a 1-tile image
//! (a padding tile, text rows before the image), text-only logits, greedy generation with the
//! cached image keys/values, the transformers-5 key layout, and one training step's gradients
//! (every weight, and the 8 extra embedding rows trained on their own).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::fixtures;
use lvlm_ift::model::checkpoint::weight_files;
use lvlm_ift::model::family::{layout, RowSlice};
use lvlm_ift::model::generate::greedy;
use lvlm_ift::model::loss::causal_lm_loss;
use lvlm_ift::model::mllama::MllamaModel;
use lvlm_ift::model::weights::WeightStore;
use lvlm_ift::model::{LoadOptions, VisionInput, VisionLanguageModel};

fn model_dir() -> std::path::PathBuf {
    fixtures().join("mllama-model")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("parity/mllama-model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn vision(e: &HashMap<String, Tensor>, rows: std::ops::Range<usize>) -> VisionInput {
    let n = rows.len();
    let tiles: Vec<i64> = e["num_tiles"].to_vec1().unwrap();
    VisionInput::Tiles {
        pixel_values: e["pv"].narrow(0, rows.start, n).unwrap(),
        aspect_ratio_ids: e["ar_ids"]
            .narrow(0, rows.start, n)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap(),
        aspect_ratio_mask: e["ar_mask"]
            .narrow(0, rows.start, n)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap(),
        num_tiles: tiles[rows].iter().map(|&t| t as usize).collect(),
    }
}

fn ids(e: &HashMap<String, Tensor>, key: &str) -> Tensor {
    e[key].to_dtype(DType::U32).unwrap()
}

#[test]
fn logits_text_only_logits_and_greedy_generation_match_hf() {
    let e = expected();
    let (m, _) = MllamaModel::load(&model_dir(), LoadOptions::default()).unwrap();
    let logits = m
        .forward(&ids(&e, "ids"), Some(&vision(&e, 0..2)), None)
        .unwrap();
    let d = max_abs(&logits, &e["logits"]);
    println!("logits max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    let text = m.forward(&ids(&e, "text_ids"), None, None).unwrap();
    let d = max_abs(&text, &e["text_logits"]);
    println!("text-only logits max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    let prompt: Vec<u32> = ids(&e, "ids").get(0).unwrap().to_vec1().unwrap();
    let got = greedy(&m, &prompt, Some(&vision(&e, 0..1)), 6, &[], &Device::Cpu).unwrap();
    let want: Vec<u32> = e["gen"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    assert_eq!(got, want);
    // Without an image, a prompt holding the image token is refused.
    let err = m.forward(&ids(&e, "ids"), None, None).unwrap_err();
    assert!(err.to_string().contains("no image"), "{err}");
}

#[test]
fn the_transformers5_layout_loads_to_the_same_model() {
    let e = expected();
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let k = if let Some(r) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if let Some(r) = k.strip_prefix("language_model.lm_head.") {
                format!("lm_head.{r}")
            } else {
                format!("model.{k}")
            };
            (k, t)
        })
        .collect();
    assert!(renamed.keys().any(|k| k.starts_with("model.vision_model.")));
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    let (m, _) = MllamaModel::load(tmp.path(), LoadOptions::default()).unwrap();
    let logits = m
        .forward(&ids(&e, "ids"), Some(&vision(&e, 0..2)), None)
        .unwrap();
    assert!(max_abs(&logits, &e["logits"]) < 1e-4);
}

#[test]
fn the_layout_from_config_json_is_the_checkpoint() {
    let dir = model_dir();
    let l = layout(&dir).unwrap();
    assert_eq!(l.family.name(), "mllama");
    assert_eq!(l.num_image_tokens, 1);
    let store = WeightStore::open(
        &dir,
        &weight_files(&dir).unwrap(),
        &Device::Cpu,
        DType::F32,
        l.family.key_map(),
    )
    .unwrap();
    let stored: std::collections::BTreeMap<String, Vec<usize>> = store
        .names()
        .into_iter()
        .map(|n| {
            let s = store.shape_of(&n).unwrap();
            (n, s)
        })
        .collect();
    assert_eq!(l.params, stored);
    // fusion = the cross-attention layers + projector + the 8 extra embedding rows.
    let fusion = l.group("fusion").unwrap();
    assert!(fusion.contains("model.language_model.layers.1.cross_attn.q_proj.weight"));
    assert!(!fusion.contains("model.language_model.layers.0.self_attn.q_proj.weight"));
    assert!(fusion.contains("model.multi_modal_projector.weight"));
    assert_eq!(fusion.rows()[0].start, 64);
    assert_eq!(
        l.group_params(fusion),
        l.count_params(|p| fusion.contains(p)) + 8 * 32
    );
    let err = l.group("vision_tower").unwrap_err().to_string();
    assert!(
        err.contains("vision_encoder") && err.contains("mllama"),
        "{err}"
    );
}

/// Loss of the fixture's training batch and its gradients by parameter name.
fn loss_and_grads(opts: LoadOptions) -> (f32, HashMap<String, Tensor>, Vec<(String, Var)>) {
    let e = expected();
    let (m, store) = MllamaModel::load(&model_dir(), opts).unwrap();
    let logits = m
        .forward(&ids(&e, "ids"), Some(&vision(&e, 0..2)), None)
        .unwrap();
    let (loss, _) = causal_lm_loss(&logits, &e["labels"].to_dtype(DType::I64).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let vars = store.trainable_vars();
    let by_name = vars
        .iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect();
    (loss.to_scalar::<f32>().unwrap(), by_name, vars)
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs(a, b) / scale.max(1e-12)
}

#[test]
fn gradients_match_hf_and_reach_every_weight() {
    let e = expected();
    let (loss, grads, vars) = loss_and_grads(LoadOptions {
        trainable: Some(Box::new(|_| true)),
        ..LoadOptions::default()
    });
    let want = e["loss"].to_scalar::<f32>().unwrap();
    assert!((loss - want).abs() < 1e-4, "loss {loss} vs {want}");
    for (key, g) in e.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let ours = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let r = rel(ours, g);
        println!("{name}: relative diff {r:e}");
        assert!(r < 1e-3, "{name}: {r}");
    }
    for (name, _) in &vars {
        let g = grads
            .get(name)
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
}

#[test]
fn the_extra_embedding_rows_train_on_their_own() {
    let e = expected();
    let weight = "model.language_model.embed_tokens.weight";
    let (_, grads, vars) = loss_and_grads(LoadOptions {
        trainable_rows: vec![RowSlice {
            weight: weight.into(),
            start: 64,
            end: 72,
        }],
        ..LoadOptions::default()
    });
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec!["model.language_model.embed_tokens.weight[64:72]"]
    );
    let ours = &grads["model.language_model.embed_tokens.weight[64:72]"];
    let want = e[&format!("grad.{weight}")].narrow(0, 64, 8).unwrap();
    let r = rel(ours, &want);
    assert!(r < 1e-3, "{r}");
    // The image token (64) is in the batch, so its row has a gradient.
    let row = ours.get(0).unwrap().sqr().unwrap().sum_all().unwrap();
    assert!(row.to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn the_11b_shapes_from_config_json_match_transformers_parameter_counts() {
    let dir = fixtures().join("mllama-11b");
    let l = layout(&dir).unwrap();
    let want: HashMap<String, usize> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("param_counts.json")).unwrap())
            .unwrap();
    assert_eq!(l.total_params(), want["total"]);
    for g in &l.groups {
        println!(
            "{:<22} {:>14}  (transformers {:?})",
            g.name,
            l.group_params(g),
            want.get(g.name)
        );
        assert_eq!(Some(&l.group_params(g)), want.get(g.name), "{}", g.name);
    }
}
