//! After one backward pass with every weight trainable, every weight the model loaded has a
//! non-zero gradient: no op on the path silently cuts the graph.

mod common;

use candle_core::{Device, Tensor, D};
use common::{fixtures, Expected, MODELS};
use lvlm_ift::model::llava::LlavaModel;
use lvlm_ift::model::VisionLanguageModel;
use lvlm_ift::model::{LoadOptions, VisionInput};

#[test]
fn every_weight_receives_a_nonzero_gradient() {
    for model in MODELS {
        let opts = LoadOptions {
            trainable: Some(Box::new(|_| true)),
            ..LoadOptions::default()
        };
        let (m, store) = LlavaModel::load(&fixtures().join(model), opts).unwrap();
        let exp = Expected::load(model);
        let ids = exp.ids("input_ids.raw");
        let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let logits = m
            .forward(
                &input,
                Some(&VisionInput::pixels(exp.tensor("pixel_values.photo"))),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        // Next-token cross-entropy over the whole sequence.
        let n = ids.len() - 1;
        let logp =
            candle_nn::ops::log_softmax(&logits.narrow(0, 0, n).unwrap(), D::Minus1).unwrap();
        let targets = Tensor::from_slice(&ids[1..], (n, 1), &Device::Cpu).unwrap();
        let loss = logp
            .gather(&targets, 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = store.trainable_vars();
        assert!(
            vars.len() > 40,
            "{model}: only {} trainable tensors",
            vars.len()
        );
        let mut dead = vec![];
        for (name, var) in &vars {
            let norm = grads
                .get(var.as_tensor())
                .map(|g| {
                    g.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .unwrap_or(0.0);
            if !(norm > 0.0 && norm.is_finite()) {
                dead.push(name.clone());
            }
        }
        assert!(dead.is_empty(), "{model}: no gradient for {dead:?}");
        println!(
            "{model}: all {} weights have non-zero gradients",
            vars.len()
        );
    }
}

/// With LoRA on every linear layer and the base frozen, backward computes no gradient for any
/// frozen weight (no weight-sized buffers), while every adapter gets one.
#[test]
fn frozen_weights_get_no_gradient_buffers() {
    use lvlm_ift::model::lora::{LoraFactory, LoraSpec, TargetModules};
    let spec = LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        exclude_modules: None,
        use_rslora: false,
    };
    let opts = LoadOptions {
        lora: Some(LoraFactory::new(spec, true, 3).unwrap()),
        ..LoadOptions::default()
    };
    let (m, store) = LlavaModel::load(&fixtures().join("tiny-llava"), opts).unwrap();
    let exp = Expected::load("tiny-llava");
    let ids = exp.ids("input_ids.raw");
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let logits = m
        .forward(
            &input,
            Some(&VisionInput::pixels(exp.tensor("pixel_values.photo"))),
            None,
        )
        .unwrap();
    let grads = logits
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backward()
        .unwrap();
    let frozen = store.frozen_tensors();
    assert!(frozen.len() > 40);
    let with_grad: Vec<&String> = frozen
        .iter()
        .filter(|(_, t)| grads.get(t).is_some())
        .map(|(n, _)| n)
        .collect();
    assert!(
        with_grad.is_empty(),
        "frozen weights with gradients: {with_grad:?}"
    );
    let (entries, unrun): (Vec<_>, Vec<_>) = store
        .lora()
        .unwrap()
        .entries()
        .into_iter()
        .partition(|e| e.a_var.is_some());
    // Every linear layer that runs: 2 text layers x 7 + 2 vision layers x 6 + projector 2 (+ lm_head excluded).
    assert_eq!(entries.len(), 2 * 7 + 2 * 6 + 2);
    // CLIP's last layer never runs (vision_feature_layer = -2): its 6 adapters are recorded
    // frozen, for a complete PEFT adapter.
    assert_eq!(unrun.len(), 6);
    assert!(unrun
        .iter()
        .all(|e| e.module.contains("vision_model.encoder.layers.2.") && e.b_var.is_none()));
    for e in entries {
        assert!(
            grads.get(e.a_var.as_ref().unwrap().as_tensor()).is_some(),
            "{}",
            e.module
        );
    }
}
