//! Causal-LM cross-entropy with HF semantics: logits at position p predict label p+1, labels of
//! -100 are ignored, the loss is the mean over the remaining tokens of the whole batch.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

pub use crate::data::collate::IGNORE_INDEX;

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
    if s < 2 {
        return Err(Error::Model(
            "sequences of length < 2 have no next-token labels".into(),
        ));
    }
    let logits = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let targets = labels
        .narrow(1, 1, s - 1)?
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let mut valid = Vec::with_capacity(targets.len());
    let mut index = Vec::with_capacity(targets.len());
    for &t in &targets {
        if t == IGNORE_INDEX {
            valid.push(0f32);
            index.push(0u32);
        } else if t < 0 || t as usize >= v {
            return Err(Error::Model(format!(
                "label {t} is outside the vocabulary of {v}"
            )));
        } else {
            valid.push(1f32);
            index.push(t as u32);
        }
    }
    let count = valid.iter().filter(|&&m| m > 0.0).count();
    if count == 0 {
        return Err(Error::Model(
            "the batch has no label tokens (all -100)".into(),
        ));
    }
    let dev = logits.device();
    let n = index.len();
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp
        .gather(&Tensor::from_vec(index, (n, 1), dev)?, 1)?
        .squeeze(1)?;
    let mask = Tensor::from_vec(valid, n, dev)?;
    let loss = ((picked * mask)?.sum_all()?.neg()? / count as f64)?;
    Ok((loss, count))
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
}
