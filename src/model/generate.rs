//! Inference helpers on top of [`VisionLanguageModel`]: greedy decoding with the KV cache, and the
//! log-probability of a continuation given a prompt.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::model::{VisionInput, VisionLanguageModel};

/// Greedy decoding for one sequence: prefill the prompt, then one cached step per token, stopping
/// after `max_new_tokens`, at (and including) the first token in `eos`, or when prompt and
/// generated tokens fill the model's [`VisionLanguageModel::max_positions`] — decoding never runs
/// past `max_position_embeddings` (callers that want an error instead check
/// `prompt.len() + max_new_tokens` up front, as [`crate::session::Session::generate`] does).
/// Returns the generated ids; `max_new_tokens == 0` generates nothing.
pub fn greedy(
    model: &dyn VisionLanguageModel,
    prompt: &[u32],
    vision: Option<&VisionInput>,
    max_new_tokens: usize,
    eos: &[u32],
    device: &Device,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Model("cannot generate from an empty prompt".into()));
    }
    let limit = model.max_positions();
    if prompt.len() >= limit {
        return Err(Error::Model(format!(
            "the prompt is {} tokens, which leaves no room to generate within the model's \
             max_position_embeddings {limit}",
            prompt.len()
        )));
    }
    // Every generated token but the last is fed back, so the sequence ends at
    // prompt + generated <= limit.
    let max_new_tokens = max_new_tokens.min(limit - prompt.len());
    let mut out = Vec::with_capacity(max_new_tokens);
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let mut cache = model.new_cache();
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), device)?;
    let mut logits = model.prefill(&ids, vision, &mut cache)?;
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
    vision: Option<&VisionInput>,
    device: &Device,
) -> Result<Vec<f32>> {
    if prompt.is_empty() || continuation.is_empty() {
        return Err(Error::Model(
            "scoring needs a non-empty prompt and a non-empty continuation".into(),
        ));
    }
    let ids: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
    let input = Tensor::from_slice(&ids, (1, ids.len()), device)?;
    let logits = model.forward(&input, vision, None)?.squeeze(0)?;
    // Position p predicts token p + 1.
    let pred = logits.narrow(0, prompt.len() - 1, continuation.len())?;
    let logp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    let targets = Tensor::from_slice(continuation, (continuation.len(), 1), device)?;
    Ok(logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::model::{Injection, KvCache, VisionInput};

    /// A model that always predicts token 5 and records the longest sequence it was fed.
    struct Always5 {
        limit: usize,
        fed: Cell<usize>,
    }

    impl Always5 {
        fn logits(&self) -> Result<Tensor> {
            let mut v = vec![0f32; 8];
            v[5] = 1.0;
            Ok(Tensor::from_vec(v, (1, 8), &Device::Cpu)?)
        }
    }

    impl VisionLanguageModel for Always5 {
        fn image_features(&self, _: &VisionInput) -> Result<Tensor> {
            Err(Error::Model("no vision".into()))
        }
        fn num_image_tokens(&self) -> usize {
            0
        }
        fn image_token_id(&self) -> u32 {
            7
        }
        fn forward_rows(
            &self,
            _: &Tensor,
            _: Option<&VisionInput>,
            _: Option<&Tensor>,
            _: Option<&Injection>,
            _: crate::model::LogitRows<'_>,
        ) -> Result<Tensor> {
            Err(Error::Model("not used".into()))
        }
        fn hidden_size(&self) -> usize {
            1
        }
        fn embed_ids(&self, _: &[u32]) -> Result<Tensor> {
            Err(Error::Model("not used".into()))
        }
        fn new_cache(&self) -> KvCache {
            KvCache::new(0, 0)
        }
        fn max_positions(&self) -> usize {
            self.limit
        }
        fn vocab_size(&self) -> usize {
            8
        }
        fn prefill(
            &self,
            ids: &Tensor,
            _: Option<&VisionInput>,
            _: &mut KvCache,
        ) -> Result<Tensor> {
            self.fed.set(ids.dim(1)?);
            self.logits()
        }
        fn step(&self, t: &Tensor, _: &mut KvCache) -> Result<Tensor> {
            self.fed.set(self.fed.get() + t.dim(1)?);
            assert!(self.fed.get() <= self.limit, "fed past max_positions");
            self.logits()
        }
    }

    #[test]
    fn greedy_stops_at_max_positions_whatever_max_new_tokens() {
        let m = Always5 {
            limit: 10,
            fed: Cell::new(0),
        };
        // EOS outside what the model ever predicts: only the position limit stops it.
        let out = greedy(&m, &[1, 2, 3], None, 1_000_000, &[2], &Device::Cpu).unwrap();
        assert_eq!(out, vec![5; 7]);
        assert!(m.fed.get() < 10);
        // Within the limit, max_new_tokens rules.
        let out = greedy(&m, &[1, 2, 3], None, 4, &[2], &Device::Cpu).unwrap();
        assert_eq!(out.len(), 4);
        let err = greedy(&m, &[1; 10], None, 1, &[2], &Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("max_position_embeddings 10"),
            "{err}"
        );
    }
}
