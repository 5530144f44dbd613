//! Parity of our LLaVA implementation with HF transformers 4.57.1 on the committed tiny checkpoints
//! (one Llama in the hub key layout, one Mistral/GQA in the transformers-5 sharded layout).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{diff, fixtures, Expected, MODELS};
use lvlm_ift::model::generate::{continuation_logprobs, greedy};
use lvlm_ift::model::llava::LlavaModel;
use lvlm_ift::model::VisionLanguageModel;
use lvlm_ift::model::{LoadOptions, VisionInput};

fn load(model: &str) -> LlavaModel {
    LlavaModel::load(&fixtures().join(model), LoadOptions::default())
        .unwrap_or_else(|e| panic!("{model}: {e}"))
        .0
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap()
}

#[test]
fn logits_match_hf_given_hf_pixel_values() {
    for model in MODELS {
        let m = load(model);
        let exp = Expected::load(model);
        for which in ["raw", "chat"] {
            let ids = exp.ids(&format!("input_ids.{which}"));
            let logits = m
                .forward(
                    &ids_tensor(&ids),
                    Some(&VisionInput::pixels(exp.tensor("pixel_values.photo"))),
                    None,
                )
                .unwrap();
            let (max, mean) = diff(&logits, exp.tensor(&format!("logits.{which}")));
            println!("{model} logits.{which}: max abs {max:.3e}, mean abs {mean:.3e}");
            assert!(max < 1e-4, "{model} logits.{which}: max abs diff {max}");
        }
    }
}

#[test]
fn padded_batch_matches_hf_on_real_tokens() {
    for model in MODELS {
        let m = load(model);
        let exp = Expected::load(model);
        let ids = exp.tensor("batch.input_ids").to_dtype(DType::U32).unwrap();
        let mask = exp
            .tensor("batch.attention_mask")
            .to_dtype(DType::U32)
            .unwrap();
        let pixels = Tensor::cat(
            &[
                exp.tensor("pixel_values.photo"),
                exp.tensor("pixel_values.photo"),
            ],
            0,
        )
        .unwrap();
        let logits = m
            .forward(&ids, Some(&VisionInput::pixels(&pixels)), Some(&mask))
            .unwrap();
        let want = exp.tensor("batch.logits");
        let rows = mask.to_vec2::<u32>().unwrap();
        let mut worst = 0f32;
        for (b, row) in rows.iter().enumerate() {
            let n = row.iter().filter(|&&v| v == 1).count();
            assert!(row[..n].iter().all(|&v| v == 1), "fixture is right-padded");
            let got = logits.get(b).unwrap().narrow(0, 0, n).unwrap();
            let exp_b = want.get(b).unwrap().narrow(0, 0, n).unwrap();
            worst = worst.max(diff(&got, &exp_b).0);
        }
        println!("{model} padded batch: max abs {worst:.3e}");
        assert!(worst < 1e-4, "{model} batch logits: max abs diff {worst}");
    }
}

#[test]
fn continuation_logprobs_match_hf() {
    for model in MODELS {
        let m = load(model);
        let exp = Expected::load(model);
        let prompt = exp.ids("input_ids.chat");
        let cont = exp.ids("continuation_ids");
        let got = continuation_logprobs(
            &m,
            &prompt,
            &cont,
            Some(&VisionInput::pixels(exp.tensor("pixel_values.photo"))),
            &Device::Cpu,
        )
        .unwrap();
        let want = exp.tensor("score.token_logprobs").to_vec1::<f32>().unwrap();
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let sum: f32 = got.iter().sum();
        let want_sum = exp.tensor("score.logprob").to_vec1::<f32>().unwrap()[0];
        println!("{model} score: token max abs {max:.3e}, sum {sum} vs {want_sum}");
        assert!(max < 1e-4, "{model}: token log-prob diff {max}");
        assert!(
            (sum - want_sum).abs() < 1e-4,
            "{model}: sum {sum} vs {want_sum}"
        );
    }
}

#[test]
fn greedy_generation_matches_hf_token_for_token() {
    for model in MODELS {
        let m = load(model);
        let exp = Expected::load(model);
        let max_new = exp.meta["max_new_tokens"].as_u64().unwrap() as usize;
        let eos = exp.meta["eos_token_id"].as_u64().unwrap() as u32;
        for which in ["raw", "chat"] {
            let prompt = exp.ids(&format!("input_ids.{which}"));
            let got = greedy(
                &m,
                &prompt,
                Some(&VisionInput::pixels(exp.tensor("pixel_values.photo"))),
                max_new,
                &[eos],
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(
                got,
                exp.ids(&format!("generate.{which}_ids")),
                "{model} {which}"
            );
        }
    }
}

#[test]
fn cached_prefill_equals_full_forward() {
    let m = load("tiny-llava-mistral");
    let exp = Expected::load("tiny-llava-mistral");
    let ids = exp.ids("input_ids.raw");
    let pixels = exp.tensor("pixel_values.photo");
    let mut cache = m.new_cache();
    let split = ids.len() - 3;
    m.prefill(
        &ids_tensor(&ids[..split]),
        Some(&VisionInput::pixels(pixels)),
        &mut cache,
    )
    .unwrap();
    let last = m.step(&ids_tensor(&ids[split..]), &mut cache).unwrap();
    let full = m
        .forward(&ids_tensor(&ids), Some(&VisionInput::pixels(pixels)), None)
        .unwrap();
    let full_last = full
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (max, _) = diff(&last, &full_last);
    let scale = full_last
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("cached vs full: max abs {max:.3e} (logit scale {scale})");
    assert!(max < 1e-4, "cached vs full: {max}");
}

/// A generated image token is embedded like any other token (HF's generate does the same):
/// image features enter only with the prompt.
#[test]
fn decoding_step_accepts_an_image_token() {
    let m = load("tiny-llava");
    let exp = Expected::load("tiny-llava");
    let ids = exp.ids("input_ids.raw");
    let mut cache = m.new_cache();
    m.prefill(
        &ids_tensor(&ids),
        Some(&VisionInput::pixels(exp.tensor("pixel_values.photo"))),
        &mut cache,
    )
    .unwrap();
    let logits = m
        .step(&ids_tensor(&[m.image_token_id()]), &mut cache)
        .unwrap();
    assert_eq!(logits.dims(), &[1, 400]);
}
