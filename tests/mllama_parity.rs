//! Llama-3.2-Vision (`MllamaForConditionalGeneration`) against HF transformers + PEFT on the tiny
//! random checkpoint of `scripts/make_mllama_fixtures.py` (`tests/fixtures/tiny-mllama`):
//! prompt token ids through our chat template and tokenizer, logits for 1- and 2-tile images and
//! a right-padded batch mixing them, text-only logits, continuation log-probs, greedy generation
//! with the cached image keys/values, the transformers-5 key layout, one training step's
//! gradients (every weight, and the 8 extra embedding rows on their own), a PEFT LoRA adapter
//! (logits and gradients) and its merge; and the 11B's shapes from its `config.json` against
//! transformers' parameter counts.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::fixtures;
use lvlm_ift::adapter::{adapter_tensors, merge_into_copy, read_adapter};
use lvlm_ift::model::checkpoint::weight_files;
use lvlm_ift::model::family::{layout, RowSlice};
use lvlm_ift::model::generate::{continuation_logprobs, greedy};
use lvlm_ift::model::lora::LoraFactory;
use lvlm_ift::model::loss::causal_lm_loss;
use lvlm_ift::model::mllama::{canonical_name, MllamaModel};
use lvlm_ift::model::weights::WeightStore;
use lvlm_ift::model::{LoadOptions, VisionInput, VisionLanguageModel};

fn model_dir() -> std::path::PathBuf {
    fixtures().join("tiny-mllama")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("parity/tiny-mllama.safetensors"),
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

/// Max abs difference relative to the largest magnitude of `b`.
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

fn u32s(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn ids(e: &HashMap<String, Tensor>, key: &str) -> Tensor {
    e[key].to_dtype(DType::U32).unwrap()
}

/// HF's processor outputs for `images` (fixture names), stacked as one batch.
fn vision(e: &HashMap<String, Tensor>, images: &[&str]) -> VisionInput {
    let cat = |key: &str| {
        let parts: Vec<Tensor> = images
            .iter()
            .map(|n| e[&format!("{key}.{n}")].i(0).unwrap())
            .collect();
        Tensor::stack(&parts, 0).unwrap()
    };
    VisionInput::Tiles {
        pixel_values: cat("pixel_values").squeeze(1).unwrap(),
        aspect_ratio_ids: cat("aspect_ratio_ids")
            .squeeze(1)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap(),
        aspect_ratio_mask: cat("aspect_ratio_mask")
            .squeeze(1)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap(),
        num_tiles: images
            .iter()
            .map(|n| u32s(&e[&format!("num_tiles.{n}")])[0] as usize)
            .collect(),
    }
}

fn load(opts: LoadOptions) -> (MllamaModel, WeightStore) {
    MllamaModel::load(&model_dir(), opts).unwrap()
}

#[test]
fn prompt_token_ids_come_out_of_our_template_and_tokenizer_exactly() {
    let e = expected();
    let l = layout(&model_dir()).unwrap();
    let (template, text) = l.prompt().unwrap();
    for (image, question) in [
        ("small", "Describe the image."),
        (
            "photo",
            "What is shown in the image? Describe the cell in detail please.",
        ),
    ] {
        let rendered = template.render_user_prompt(question).unwrap();
        let got = text.encode_prompt(&rendered).unwrap();
        let key = if image == "small" {
            "input_ids.small".to_string()
        } else {
            // The second prompt of the batch, without its right padding.
            let mask = u32s(&e["batch.attention_mask"].i(1).unwrap());
            let n = mask.iter().filter(|&&m| m == 1).count();
            let row = u32s(&e["batch.input_ids"].i(1).unwrap());
            assert_eq!(got, row[..n].to_vec(), "{rendered:?}");
            continue;
        };
        assert_eq!(got, u32s(&e[&key]), "{rendered:?}");
    }
    let cont = text.encode_plain(" a small red circle<|eot_id|>").unwrap();
    assert_eq!(cont, u32s(&e["score.continuation_ids"]));
}

#[test]
fn logits_match_hf_for_one_and_two_tiles_a_padded_batch_and_text_only() {
    let e = expected();
    let (m, _) = load(LoadOptions::default());
    for image in ["small", "photo", "gray8"] {
        let logits = m
            .forward(
                &ids(&e, &format!("input_ids.{image}")),
                Some(&vision(&e, &[image])),
                None,
            )
            .unwrap();
        let d = max_abs(&logits, &e[&format!("logits.{image}")]);
        println!("{image}: logits max abs diff {d:e}");
        assert!(d < 1e-4, "{image}: {d}");
    }
    let mask = ids(&e, "batch.attention_mask");
    let logits = m
        .forward(
            &ids(&e, "batch.input_ids"),
            Some(&vision(&e, &["small", "photo"])),
            Some(&mask),
        )
        .unwrap();
    // HF's logits at padded positions are as meaningless as ours; compare real tokens only.
    for b in 0..2 {
        let n = u32s(&e["batch.attention_mask"].i(b).unwrap())
            .iter()
            .filter(|&&v| v == 1)
            .count();
        let d = max_abs(
            &logits.i(b).unwrap().narrow(0, 0, n).unwrap(),
            &e["batch.logits"].i(b).unwrap().narrow(0, 0, n).unwrap(),
        );
        println!("batch row {b}: logits max abs diff {d:e}");
        assert!(d < 1e-4, "batch row {b}: {d}");
    }
    let text = m.forward(&ids(&e, "text.input_ids"), None, None).unwrap();
    let d = max_abs(&text, &e["text.logits"]);
    println!("text-only: logits max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    // Without an image, a prompt holding the image token is refused.
    let err = m
        .forward(&ids(&e, "input_ids.small"), None, None)
        .unwrap_err();
    assert!(err.to_string().contains("no image"), "{err}");
}

#[test]
fn scores_and_greedy_generation_match_hf() {
    let e = expected();
    let (m, _) = load(LoadOptions::default());
    let prompt = u32s(&e["input_ids.small"]);
    let cont = u32s(&e["score.continuation_ids"]);
    let v = vision(&e, &["small"]);
    let lp = continuation_logprobs(&m, &prompt, &cont, Some(&v), &Device::Cpu).unwrap();
    let lp = Tensor::new(lp.as_slice(), &Device::Cpu).unwrap();
    let d = max_abs(&lp, &e["score.token_logprobs"]);
    println!("score log-probs max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    for image in ["small", "photo", "gray8"] {
        let prompt = u32s(&e[&format!("input_ids.{image}")]);
        let got = greedy(
            &m,
            &prompt,
            Some(&vision(&e, &[image])),
            8,
            &[],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(got, u32s(&e[&format!("generate.{image}_ids")]), "{image}");
    }
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
    assert!(tensors
        .keys()
        .any(|k| k.starts_with("language_model.model.")));
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (canonical_name(&k).unwrap(), t))
        .collect();
    assert!(renamed.keys().any(|k| k.starts_with("model.vision_model.")));
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    let (m, _) = MllamaModel::load(tmp.path(), LoadOptions::default()).unwrap();
    let logits = m
        .forward(
            &ids(&e, "input_ids.photo"),
            Some(&vision(&e, &["photo"])),
            None,
        )
        .unwrap();
    assert!(max_abs(&logits, &e["logits.photo"]) < 1e-4);
}

#[test]
fn the_layout_from_config_json_is_the_checkpoint() {
    let dir = model_dir();
    let l = layout(&dir).unwrap();
    assert_eq!(l.family.name(), "mllama");
    assert_eq!((l.num_image_tokens, l.image_token_id), (1, 384));
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
    assert_eq!(fusion.rows()[0].start, 384);
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

/// Loss of the fixture's training example and the gradients of its backward pass.
fn train_grads(m: &MllamaModel) -> (f32, candle_core::backprop::GradStore) {
    let e = expected();
    let logits = m
        .forward(
            &ids(&e, "train.input_ids"),
            Some(&vision(&e, &["small"])),
            None,
        )
        .unwrap();
    let (loss, _) = causal_lm_loss(&logits, &e["train.labels"]).unwrap();
    let grads = loss.backward().unwrap();
    (loss.to_scalar::<f32>().unwrap(), grads)
}

/// [`train_grads`] by the names of the store's trainable vars.
fn train_step(
    m: &MllamaModel,
    store: &WeightStore,
) -> (f32, HashMap<String, Tensor>, Vec<(String, Var)>) {
    let (loss, grads) = train_grads(m);
    let vars = store.trainable_vars();
    let by_name = vars
        .iter()
        .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect();
    (loss, by_name, vars)
}

#[test]
fn gradients_match_hf_and_reach_every_weight() {
    let e = expected();
    let (m, store) = load(LoadOptions {
        trainable: Some(Box::new(|_| true)),
        ..LoadOptions::default()
    });
    let (loss, grads, vars) = train_step(&m, &store);
    let want = e["train.loss"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!((loss - want).abs() < 1e-4, "loss {loss} vs {want}");
    let mut worst = 0f32;
    for (key, g) in e.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let ours = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let r = rel(ours, g);
        worst = worst.max(r);
        assert!(r < 1e-3, "{name}: {r}");
    }
    println!("worst relative gradient diff {worst:e}");
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
    let (m, store) = load(LoadOptions {
        trainable_rows: vec![RowSlice {
            weight: weight.into(),
            start: 384,
            end: 392,
        }],
        ..LoadOptions::default()
    });
    let (_, grads, vars) = train_step(&m, &store);
    let name = format!("{weight}[384:392]");
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec![name.as_str()]);
    let want = e[&format!("grad.{weight}")].narrow(0, 384, 8).unwrap();
    let r = rel(&grads[&name], &want);
    assert!(r < 1e-3, "{r}");
    // The image token (384) is in the example, so its row has a gradient.
    let row = grads[&name].i(0).unwrap().sqr().unwrap().sum_all().unwrap();
    assert!(row.to_scalar::<f32>().unwrap() > 0.0);
}

fn lora_model(trainable: bool) -> (MllamaModel, WeightStore) {
    let a = read_adapter(
        &fixtures().join("parity/tiny-mllama-lora-init"),
        &Device::Cpu,
        canonical_name,
    )
    .unwrap();
    let lora = LoraFactory::new(a.spec, trainable, 0)
        .unwrap()
        .with_loaded(a.weights);
    load(LoadOptions {
        lora: Some(lora),
        ..LoadOptions::default()
    })
}

#[test]
fn a_peft_lora_adapter_gives_hf_logits_gradients_and_merge() {
    let e = expected();
    let (m, store) = lora_model(true);
    let entries = store.lora().unwrap().entries();
    assert_eq!(entries.len(), 18);
    let logits = m
        .forward(
            &ids(&e, "input_ids.small"),
            Some(&vision(&e, &["small"])),
            None,
        )
        .unwrap();
    let d = max_abs(&logits, &e["lora.logits"]);
    println!("LoRA logits max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    // Gradients of A and B, named as PEFT names them.
    let (loss, grads) = train_grads(&m);
    let want = e["lora.loss"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!((loss - want).abs() < 1e-4, "{loss} vs {want}");
    let mut checked = 0;
    for entry in &entries {
        for (which, var) in [("lora_A", &entry.a_var), ("lora_B", &entry.b_var)] {
            let key = format!("lora.grad.base_model.model.{}.{which}.weight", entry.module);
            let (Some(var), Some(want)) = (var, e.get(&key)) else {
                continue;
            };
            let r = rel(grads.get(var.as_tensor()).unwrap(), want);
            assert!(r < 1e-3, "{key}: {r}");
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
    // The adapter round-trips under PEFT's names, and merging it gives HF's merged model.
    let names = adapter_tensors(&entries).unwrap();
    assert!(names.contains_key(
        "base_model.model.model.language_model.layers.1.cross_attn.q_proj.lora_A.weight"
    ));
    let a = read_adapter(
        &fixtures().join("parity/tiny-mllama-lora-init"),
        &Device::Cpu,
        canonical_name,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge_into_copy(
        &model_dir(),
        &out,
        Some(&a.spec),
        &a.weights,
        &HashMap::new(),
    )
    .unwrap();
    let (merged, _) = MllamaModel::load(&out, LoadOptions::default()).unwrap();
    let logits = merged
        .forward(
            &ids(&e, "input_ids.small"),
            Some(&vision(&e, &["small"])),
            None,
        )
        .unwrap();
    let d = max_abs(&logits, &e["merged.logits"]);
    println!("merged logits max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
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

#[test]
fn the_session_scores_and_generates_like_hf_from_image_files() {
    use lvlm_ift::session::{Prompt, Session, SessionOptions};
    let e = expected();
    let session = Session::load(model_dir().to_str().unwrap(), SessionOptions::default()).unwrap();
    let images = fixtures().join("images");
    let out = session
        .score(
            &images.join("small_20x26.png"),
            &Prompt::Chat("Describe the image.".into()),
            " a small red circle<|eot_id|>",
        )
        .unwrap();
    let got = Tensor::new(out.token_logprobs.as_slice(), &Device::Cpu).unwrap();
    let d = max_abs(&got, &e["score.token_logprobs"]);
    println!("session score max abs diff {d:e}");
    assert!(d < 1e-4, "{d}");
    for (name, file) in [
        ("small", "small_20x26.png"),
        ("photo", "photo_67x45.png"),
        ("gray8", "gray8_33x50.png"),
    ] {
        let g = session
            .generate(
                &images.join(file),
                &Prompt::Chat("Describe the image.".into()),
                8,
            )
            .unwrap();
        assert_eq!(
            g.token_ids,
            u32s(&e[&format!("generate.{name}_ids")]),
            "{name}"
        );
    }
}
