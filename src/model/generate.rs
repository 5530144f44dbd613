//! Inference helpers on top of [`VisionLanguageModel`]: greedy decoding with the KV cache, and the
//! log-probability of a continuation given a prompt.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::model::VisionLanguageModel;

/// Greedy decoding for one sequence: prefill the prompt, then one cached step per token, stopping
/// after `max_new_tokens` or at (and including) the first token in `eos`. Returns generated ids.
pub fn greedy(
    model: &dyn VisionLanguageModel,
    prompt: &[u32],
    pixel_values: Option<&Tensor>,
    max_new_tokens: usize,
    eos: &[u32],
    device: &Device,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Model("cannot generate from an empty prompt".into()));
    }
    let mut out = Vec::with_capacity(max_new_tokens);
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let mut cache = model.new_cache();
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), device)?;
    let mut logits = model.prefill(&ids, pixel_values, &mut cache)?;
    loop {
        let next = argmax(&logits)?;
        out.push(next);
        if eos.contains(&next) || out.len() >= max_new_tokens {
            return Ok(out);
        }
        let t = Tensor::from_slice(&[next], (1, 1), device)?;
        logits = model.step(&t, &mut cache)?;
    }
}

/// Index of the largest logit of `[1, vocab]`; ties go to the lowest index, as torch's argmax.
fn argmax(logits: &Tensor) -> Result<u32> {
    let row = logits
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let mut best = 0usize;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// Per-token log-probabilities (natural log) of `continuation` following `prompt`, from one
/// full-sequence forward pass over their concatenation.
pub fn continuation_logprobs(
    model: &dyn VisionLanguageModel,
    prompt: &[u32],
    continuation: &[u32],
    pixel_values: Option<&Tensor>,
    device: &Device,
) -> Result<Vec<f32>> {
    if prompt.is_empty() || continuation.is_empty() {
        return Err(Error::Model(
            "scoring needs a non-empty prompt and a non-empty continuation".into(),
        ));
    }
    let ids: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
    let input = Tensor::from_slice(&ids, (1, ids.len()), device)?;
    let logits = model.forward(&input, pixel_values, None)?.squeeze(0)?;
    // Position p predicts token p + 1.
    let pred = logits.narrow(0, prompt.len() - 1, continuation.len())?;
    let logp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    let targets = Tensor::from_slice(continuation, (continuation.len(), 1), device)?;
    Ok(logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?)
}
