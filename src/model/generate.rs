//! Inference helpers on top of [`VisionLanguageModel`]: greedy decoding with the KV cache, and the
//! log-probability of a continuation given a prompt.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::model::{KvCache, VisionInput, VisionLanguageModel};

/// A prompt run through the cache: ready to decode from, or to score continuations after.
#[derive(Debug, Clone)]
pub struct Prefilled {
    /// The prompt's keys and values (one row).
    pub cache: KvCache,
    /// Logits `[1, vocab]` at the prompt's last position.
    pub logits: Tensor,
    /// Prompt tokens (positions) in the cache.
    pub len: usize,
}

/// Run one prompt through a fresh cache.
pub fn prefill(
    model: &dyn VisionLanguageModel,
    prompt: &[u32],
    vision: Option<&VisionInput>,
    device: &Device,
) -> Result<Prefilled> {
    if prompt.is_empty() {
        return Err(Error::Model("cannot run an empty prompt".into()));
    }
    let mut cache = model.new_cache();
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), device)?;
    let logits = model.prefill(&ids, vision, &mut cache)?;
    Ok(Prefilled {
        cache,
        logits,
        len: prompt.len(),
    })
}

/// Prefill several prompts about the same image (e.g. the questions asked of one picture): the
/// longest prefix they share is run once — with the image, the bulk of the work — and each
/// prompt's remaining tokens are fed on its own clone of that cache. The result equals prefilling
/// each prompt alone (attention is causal), up to float rounding. The prefix is shared only when
/// it holds every image token (what follows it is fed as text), otherwise each prompt is
/// prefilled in full.
pub fn prefill_shared(
    model: &dyn VisionLanguageModel,
    prompts: &[Vec<u32>],
    vision: Option<&VisionInput>,
    device: &Device,
) -> Result<Vec<Prefilled>> {
    let Some(first) = prompts.first() else {
        return Ok(Vec::new());
    };
    let shared = prompts[1..].iter().fold(first.len(), |n, p| {
        n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count())
    });
    let image = model.image_token_id();
    let holds_every_image_token = prompts.iter().all(|p| !p[shared..].contains(&image));
    if prompts.len() < 2 || shared == 0 || !holds_every_image_token {
        return prompts
            .iter()
            .map(|p| prefill(model, p, vision, device))
            .collect();
    }
    let base = prefill(model, &first[..shared], vision, device)?;
    prompts
        .iter()
        .map(|p| {
            let rest = &p[shared..];
            if rest.is_empty() {
                return Ok(base.clone());
            }
            let mut cache = base.cache.clone();
            let ids = Tensor::from_slice(rest, (1, rest.len()), device)?;
            let logits = model.step(&ids, &mut cache)?;
            Ok(Prefilled {
                cache,
                logits,
                len: p.len(),
            })
        })
        .collect()
}

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
    check_room(model, prompt.len())?;
    if max_new_tokens == 0 {
        return Ok(Vec::new());
    }
    let start = prefill(model, prompt, vision, device)?;
    let mut out = greedy_batch(model, vec![start], max_new_tokens, eos, device)?;
    Ok(out.pop().unwrap_or_default())
}

/// A prompt of `len` tokens must leave room for one generated token.
fn check_room(model: &dyn VisionLanguageModel, len: usize) -> Result<()> {
    let limit = model.max_positions();
    if len >= limit {
        return Err(Error::Model(format!(
            "the prompt is {len} tokens, which leaves no room to generate within the model's \
             max_position_embeddings {limit}"
        )));
    }
    Ok(())
}

/// Greedy decoding of several prefilled prompts at once: their caches are stacked into one batch
/// ([`KvCache::stack`]), so each generated position reads every weight once for all rows — decoding
/// is bound by weight reads, not arithmetic — while each row attends to and is positioned by its
/// own tokens only, generating what [`greedy`] generates for it alone (up to float rounding).
/// A row stops as [`greedy`] does (`max_new_tokens`, EOS included, or `max_position_embeddings`)
/// and leaves the batch. Returns the generated ids per prompt, in order.
pub fn greedy_batch(
    model: &dyn VisionLanguageModel,
    starts: Vec<Prefilled>,
    max_new_tokens: usize,
    eos: &[u32],
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let limit = model.max_positions();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); starts.len()];
    // Every generated token but the last is fed back, so each sequence ends at
    // prompt + generated <= limit.
    let mut budget = Vec::with_capacity(starts.len());
    for s in &starts {
        check_room(model, s.len)?;
        budget.push(max_new_tokens.min(limit - s.len));
    }
    // Rows still generating, as indices into `out`.
    let mut live: Vec<usize> = (0..starts.len()).filter(|&i| budget[i] > 0).collect();
    if live.is_empty() {
        return Ok(out);
    }
    let kept: Vec<&Prefilled> = live.iter().map(|&i| &starts[i]).collect();
    let mut caches: Vec<KvCache> = kept.iter().map(|s| s.cache.clone()).collect();
    let mut cache = if caches.len() == 1 {
        caches.remove(0)
    } else {
        KvCache::stack(&caches)?
    };
    let mut logits = Tensor::cat(&kept.iter().map(|s| &s.logits).collect::<Vec<_>>(), 0)?;
    // The stacked batch is a copy: the single-row caches go now.
    drop(caches);
    drop(starts);
    loop {
        let next = argmax_rows(&logits)?;
        let mut keep = Vec::with_capacity(live.len());
        for (row, (&i, &t)) in live.iter().zip(&next).enumerate() {
            out[i].push(t);
            if !eos.contains(&t) && out[i].len() < budget[i] {
                keep.push(row);
            }
        }
        if keep.is_empty() {
            return Ok(out);
        }
        let fed: Vec<u32> = keep.iter().map(|&r| next[r]).collect();
        if keep.len() < live.len() {
            cache = cache.select_rows(&keep)?;
            live = keep.iter().map(|&r| live[r]).collect();
        }
        let t = Tensor::from_vec(fed, (live.len(), 1), device)?;
        logits = model.step(&t, &mut cache)?;
    }
}

/// Index of the largest logit of each row of `[b, vocab]`; ties go to the lowest index, as torch's
/// argmax.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let mut best = 0usize;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
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
    use crate::model::{Injection, VisionInput};

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
        fn set_recompute(&mut self, _: Option<crate::model::recompute::Recompute>) {}
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
        fn step_rows(
            &self,
            t: &Tensor,
            _: &mut KvCache,
            _: crate::model::LogitRows<'_>,
        ) -> Result<Tensor> {
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
