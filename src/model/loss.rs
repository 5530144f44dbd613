//! Causal-LM cross-entropy with HF semantics: logits at position p predict label p+1, labels of
//! -100 are ignored, the loss is the mean over the remaining tokens of the whole batch.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::model::precomputed::with_backward;

pub use crate::data::collate::IGNORE_INDEX;

/// The positions of a batch whose next token carries a label, and those labels: the only rows at
/// which the LM head and the cross-entropy need to run (the prompt, the image tokens and the
/// padding carry none).
#[derive(Debug, Clone, PartialEq)]
pub struct LossRows {
    /// Flat positions `batch * s + p` (u32), in order.
    pub rows: Vec<u32>,
    /// The label each row predicts (the token at `p + 1`).
    pub targets: Vec<u32>,
}

impl LossRows {
    /// From labels `[b][s]` (-100 = ignored): position `p` predicts label `p + 1`, HF's shift.
    pub fn from_labels(labels: &[Vec<i64>], vocab: usize) -> Result<Self> {
        let s = labels.first().map_or(0, Vec::len);
        if s < 2 {
            return Err(Error::Model(
                "sequences of length < 2 have no next-token labels".into(),
            ));
        }
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (bi, row) in labels.iter().enumerate() {
            if row.len() != s {
                return Err(Error::Model(format!(
                    "label rows differ in length: {} and {s}",
                    row.len()
                )));
            }
            for (p, &t) in row.iter().enumerate().skip(1) {
                if t == IGNORE_INDEX {
                    continue;
                }
                if t < 0 || t as usize >= vocab {
                    return Err(Error::Model(format!(
                        "label {t} is outside the vocabulary of {vocab}"
                    )));
                }
                rows.push((bi * s + p - 1) as u32);
                targets.push(t as u32);
            }
        }
        if rows.is_empty() {
            return Err(Error::Model(
                "the batch has no label tokens (all -100)".into(),
            ));
        }
        Ok(Self { rows, targets })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows as a u32 tensor, for [`crate::model::LogitRows::Flat`].
    pub fn index(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.rows, self.rows.len(), device)?)
    }

    /// Mean negative log-likelihood of the targets under `logits: [n, vocab]` (the logits at
    /// [`LossRows::rows`], any float dtype, computed in f32).
    ///
    /// One op in the graph that keeps only the logits: its value is computed outside the graph
    /// with the ops of a log-softmax and a gather (so it is the value those give, to the bit),
    /// its backward is `softmax − one-hot`. Differentiating the composed
    /// log-softmax instead kept three vocabulary-wide f32 tensors per loss row for the backward
    /// pass and made about seven more in it; at Llama 3's 128 k vocabulary that is 0.5 MiB a row
    /// each.
    pub fn loss(&self, logits: &Tensor) -> Result<Tensor> {
        let (n, _) = logits.dims2()?;
        if n != self.rows.len() {
            return Err(Error::Model(format!(
                "{n} logit rows for {} loss positions",
                self.rows.len()
            )));
        }
        let logits = match logits.dtype() {
            DType::F64 => logits.contiguous()?,
            _ => logits.to_dtype(DType::F32)?.contiguous()?,
        };
        let targets = Tensor::from_slice(&self.targets, (n, 1), logits.device())?;
        let value = {
            let x = logits.detach();
            // log_softmax(x)[t] = (x[t] - max) - log Σ exp(x - max), as candle's log_softmax.
            let max = x.max_keepdim(D::Minus1)?;
            let diff = x.broadcast_sub(&max)?;
            let log_sum = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
            let picked = diff.gather(&targets, 1)?.broadcast_sub(&log_sum)?;
            (picked.sum_all()?.neg()? / n as f64)?
        };
        if !logits.track_op() {
            return Ok(value);
        }
        // Backward: (softmax(logits) − one-hot(targets)) · grad / n.
        Ok(with_backward(
            &logits,
            &value,
            "cross-entropy",
            move |logits, grad| {
                let probs = candle_nn::ops::softmax_last_dim(&logits.detach())?;
                let minus_one =
                    Tensor::full(-1f32, (n, 1), logits.device())?.to_dtype(logits.dtype())?;
                probs.scatter_add_set(&targets, &minus_one, 1)?;
                let scale = (grad.to_dtype(logits.dtype())? / n as f64)?;
                Ok(Some(probs.broadcast_mul(&scale)?))
            },
        )?)
    }
}

/// Returns `(mean loss, number of label tokens)`. `logits: [b, s, vocab]` (any float dtype,
/// computed in f32), `labels: [b, s]` i64 with -100 for ignored positions.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    if labels.dims() != [b, s] {
        return Err(Error::Model(format!(
            "labels have shape {:?}, logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    let host = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let rows = LossRows::from_labels(&host, v)?;
    let picked = logits
        .reshape((b * s, v))?
        .index_select(&rows.index(logits.device())?, 0)?;
    Ok((rows.loss(&picked)?, rows.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ignores_minus_100_and_averages_over_label_tokens() {
        let dev = Device::Cpu;
        let logits = Tensor::new(
            &[[[0.0f32, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 3.0]]],
            &dev,
        )
        .unwrap();
        let labels = Tensor::new(&[[IGNORE_INDEX, 2, IGNORE_INDEX]], &dev).unwrap();
        let (loss, n) = causal_lm_loss(&logits, &labels).unwrap();
        assert_eq!(n, 1);
        // Only position 0 predicts label 2: -log softmax([0,1,2])[2].
        let want = -(2f32 - (1f32 + 1f32.exp() + 2f32.exp()).ln());
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        let none = Tensor::new(&[[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]], &dev).unwrap();
        assert!(causal_lm_loss(&logits, &none).is_err());
        let bad = Tensor::new(&[[0i64, 7, 1]], &dev).unwrap();
        assert!(causal_lm_loss(&logits, &bad)
            .unwrap_err()
            .to_string()
            .contains("7"));
    }

    /// The op's gradient (`softmax − one-hot`, scaled by the upstream gradient) against the
    /// autograd gradient of the composed log-softmax and gather, in f64 and f32, with the loss
    /// weighted as the trainer weights each micro-batch; and its value, bitwise.
    #[test]
    fn cross_entropy_gradient_matches_the_composed_log_softmax() {
        let dev = Device::Cpu;
        let rows = LossRows {
            rows: vec![0, 1, 2, 3, 4],
            targets: vec![3, 0, 6, 3, 1],
        };
        for dtype in [DType::F64, DType::F32] {
            let x = candle_core::Var::from_tensor(
                &(Tensor::randn(0f64, 3.0, (5, 7), &dev).unwrap())
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let share = 0.375;
            let ours = rows.loss(x.as_tensor()).unwrap();
            let g_ours = (&ours * share).unwrap().backward().unwrap();
            let index = Tensor::from_slice(&rows.targets, (5, 1), &dev).unwrap();
            let composed = (candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
                .unwrap()
                .gather(&index, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .neg()
                .unwrap()
                / 5.0)
                .unwrap();
            let g_composed = (&composed * share).unwrap().backward().unwrap();
            let v = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert_eq!(v(&ours).to_bits(), v(&composed).to_bits(), "{dtype:?}");
            let flat = |g: &candle_core::backprop::GradStore| -> Vec<f64> {
                g.get(x.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let tol = if dtype == DType::F64 { 1e-14 } else { 1e-7 };
            for (a, b) in flat(&g_ours).iter().zip(flat(&g_composed)) {
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
        }
    }
}
