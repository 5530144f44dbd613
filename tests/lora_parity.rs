//! LoRA parity with PEFT 0.17.1 on the tiny checkpoint (fixture from scripts/make_lora_fixtures.py):
//! logits and loss, gradients of every adapter, weights after one AdamW step, merged weights.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{diff, fixtures, Expected};
use lvlm_ift::adapter::{merge_into_copy, read_adapter};
use lvlm_ift::model::llava::LlavaModel;
use lvlm_ift::model::lora::LoraFactory;
use lvlm_ift::model::loss::causal_lm_loss;
use lvlm_ift::model::weights::WeightStore;
use lvlm_ift::model::VisionLanguageModel;
use lvlm_ift::model::{LoadOptions, VisionInput};
use lvlm_ift::train::optim::{AdamW, AdamWConfig, Gradients, ParamGroup};

fn load_with_init_adapter(trainable: bool) -> (LlavaModel, WeightStore) {
    let adapter = read_adapter(
        &fixtures().join("parity/tiny-llava-lora-init"),
        &Device::Cpu,
        lvlm_ift::model::llava::canonical_name,
    )
    .unwrap();
    let lora = LoraFactory::new(adapter.spec, trainable, 0)
        .unwrap()
        .with_loaded(adapter.weights);
    LlavaModel::load(
        &fixtures().join("tiny-llava"),
        LoadOptions {
            lora: Some(lora),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

/// PEFT name of each trainable adapter tensor, with its Var. The adapters of CLIP's last layer,
/// which never runs under `vision_feature_layer = -2`, are kept frozen (no Var).
fn named_vars(store: &WeightStore) -> Vec<(String, candle_core::Var)> {
    let mut out = vec![];
    for e in store.lora().unwrap().entries() {
        let (Some(a), Some(b)) = (e.a_var, e.b_var) else {
            assert!(
                e.module.contains("vision_model.encoder.layers.2."),
                "{}",
                e.module
            );
            continue;
        };
        out.push((format!("base_model.model.{}.lora_A.weight", e.module), a));
        out.push((format!("base_model.model.{}.lora_B.weight", e.module), b));
    }
    out
}

#[test]
fn lora_logits_loss_grads_and_adamw_step_match_peft() {
    let exp = Expected::load("tiny-llava-lora");
    let (model, store) = load_with_init_adapter(true);
    let ids = exp
        .tensor("lora.input_ids")
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let labels = exp.tensor("lora.labels");
    let logits = model
        .forward(
            &ids,
            Some(&VisionInput::pixels(exp.tensor("lora.pixel_values"))),
            None,
        )
        .unwrap();
    let (max, _) = diff(&logits, exp.tensor("lora.logits"));
    println!("LoRA logits: max abs {max:.3e}");
    assert!(max < 1e-4, "logits {max}");
    let (loss, n) = causal_lm_loss(&logits, labels).unwrap();
    assert_eq!(n, 9);
    let want = exp
        .tensor("lora.loss")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    println!("LoRA loss: {got} vs PEFT {want}");
    assert!((got - want).abs() < 1e-4);

    let named = named_vars(&store);
    let grads = Gradients::from_store(&named, &loss.backward().unwrap()).unwrap();
    let mut worst = 0f64;
    let mut compared = 0;
    for (name, _) in &named {
        let Some(want) = exp.tensors.get(&format!("grad.{name}")) else {
            // PEFT has no gradient only for adapters of the vision layer LLaVA never reads; we do
            // not even build that layer.
            panic!("fixture has no gradient for {name}");
        };
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let err = (got - want)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let norm = want
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        let rel = (err / norm) as f64;
        worst = worst.max(rel);
        compared += 1;
    }
    println!("LoRA grads: {compared} tensors, worst relative error {worst:.3e}");
    assert_eq!(
        compared, 16,
        "q/v in 2 text layers and the 2 vision layers that run"
    );
    assert!(worst <= 1e-3, "relative gradient error {worst}");

    let params = named
        .iter()
        .map(|(n, v)| (n.clone(), v.clone(), 0))
        .collect();
    let group = ParamGroup {
        name: "all".into(),
        weight_decay: 0.01,
        lr_scale: 1.0,
    };
    let mut opt = AdamW::new(AdamWConfig::default(), vec![group], params).unwrap();
    opt.step(&grads, 1e-3).unwrap();
    let mut worst = 0f32;
    for (name, var) in &named {
        worst = worst.max(diff(var.as_tensor(), exp.tensor(&format!("after.{name}"))).0);
    }
    println!("LoRA after one AdamW step: max abs {worst:.3e}");
    assert!(worst < 1e-5, "weights after AdamW {worst}");
}

#[test]
fn merged_checkpoint_matches_peft_merge_and_unmerged_adapter() {
    let exp = Expected::load("tiny-llava-lora");
    let adapter = read_adapter(
        &fixtures().join("parity/tiny-llava-lora-init"),
        &Device::Cpu,
        lvlm_ift::model::llava::canonical_name,
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let merged_dir = out.path().join("merged");
    let report = merge_into_copy(
        &fixtures().join("tiny-llava"),
        &merged_dir,
        Some(&adapter.spec),
        &adapter.weights,
        &HashMap::new(),
    )
    .unwrap();
    assert_eq!(
        report.merged, 10,
        "every adapted weight of the base file, unused vision layer included"
    );
    let (merged, _) = LlavaModel::load(&merged_dir, LoadOptions::default()).unwrap();
    let ids = exp
        .tensor("lora.input_ids")
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let px = exp.tensor("lora.pixel_values");
    let merged_logits = merged
        .forward(&ids, Some(&VisionInput::pixels(px)), None)
        .unwrap();
    let (max, _) = diff(&merged_logits, exp.tensor("merged.logits"));
    println!("merged vs PEFT merge_and_unload: max abs {max:.3e}");
    assert!(max < 1e-4);
    let (with_adapter, _) = load_with_init_adapter(false);
    let unmerged: Tensor = with_adapter
        .forward(&ids, Some(&VisionInput::pixels(px)), None)
        .unwrap();
    assert!(diff(&merged_logits, &unmerged).0 < 1e-4);
    // Same file names, config and tokenizer copied.
    for f in [
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        assert!(merged_dir.join(f).is_file(), "{f}");
    }
}
