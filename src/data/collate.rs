//! Turning an (image, description) pair into a training sample — chat-formatted user turn with
//! the image and the instruction, assistant turn with the description, loss only on the assistant
//! tokens and the end-of-turn token — and samples into padded batches.

use crate::data::prompt::{ChatTemplate, TextProcessor, Turn};
use crate::error::{Error, Result};

/// Label value the loss ignores (HF's `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// What stands in the user turn beside the image.
#[derive(Debug, Clone, PartialEq)]
pub enum Instruction {
    /// A fixed text, e.g. "Describe this medical scan.".
    Fixed(String),
    /// No user text at all.
    None,
}

impl Instruction {
    fn text(&self) -> &str {
        match self {
            Instruction::Fixed(t) => t,
            Instruction::None => "",
        }
    }
}

/// Token ids and labels of one sample (pixels are handled separately).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedText {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; `IGNORE_INDEX` outside the assistant turn.
    pub labels: Vec<i64>,
    /// Tokens dropped from the end because the sample exceeded `max_len`.
    pub truncated: usize,
}

/// Renders and tokenizes training samples the same way for every stage and recipe.
pub struct SampleEncoder<'a> {
    pub template: &'a ChatTemplate,
    pub text: &'a TextProcessor,
    pub instruction: Instruction,
    /// Longest sequence kept; the description is cut from its end (never the image span).
    pub max_len: Option<usize>,
}

impl SampleEncoder<'_> {
    /// The prompt part (user turn + generation prompt) as text.
    pub fn prompt_text(&self) -> Result<String> {
        self.template
            .render(&[Turn::user(self.instruction.text(), true)], true)
    }

    pub fn encode(&self, description: &str) -> Result<EncodedText> {
        let prompt_text = self.prompt_text()?;
        let full_text = self.template.render(
            &[
                Turn::user(self.instruction.text(), true),
                Turn::assistant(description),
            ],
            false,
        )?;
        let prompt = self.text.encode_prompt(&prompt_text)?;
        let mut ids = self.text.encode_prompt(&full_text)?;
        if ids.len() <= prompt.len() || ids[..prompt.len()] != prompt[..] {
            return Err(Error::Template(format!(
                "the chat template's assistant turn does not extend its generation prompt token-wise \
                 (prompt {:?} vs conversation {:?}); cannot place the loss mask",
                prompt_text, full_text
            )));
        }
        // Templates that do not close the assistant turn with EOS still need the model to learn
        // to stop.
        let eos = self.text.eos_token_ids();
        if let Some(&first_eos) = eos.first() {
            if !ids.last().is_some_and(|t| eos.contains(t)) {
                ids.push(first_eos);
            }
        }
        let mut labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if i < prompt.len() {
                    IGNORE_INDEX
                } else {
                    t as i64
                }
            })
            .collect();
        let mut truncated = 0;
        if let Some(max) = self.max_len {
            if prompt.len() >= max {
                return Err(Error::Model(format!(
                    "max_len {max} leaves no room for the description: the prompt with the image alone is {} tokens",
                    prompt.len()
                )));
            }
            if ids.len() > max {
                truncated = ids.len() - max;
                ids.truncate(max);
                labels.truncate(max);
            }
        }
        Ok(EncodedText {
            input_ids: ids,
            labels,
            truncated,
        })
    }
}

/// A padded batch as plain data; the trainer turns it into tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct TextBatch {
    /// `[b][s]`, right-padded with `pad_id`.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// `IGNORE_INDEX` on padding.
    pub labels: Vec<Vec<i64>>,
    /// Number of label tokens (what the loss averages over).
    pub num_label_tokens: usize,
    pub num_tokens: usize,
}

/// Right-pad samples to the longest one.
pub fn pad_batch(samples: &[EncodedText], pad_id: u32) -> TextBatch {
    let width = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let mut batch = TextBatch {
        input_ids: Vec::with_capacity(samples.len()),
        attention_mask: Vec::with_capacity(samples.len()),
        labels: Vec::with_capacity(samples.len()),
        num_label_tokens: 0,
        num_tokens: 0,
    };
    for s in samples {
        let pad = width - s.input_ids.len();
        let mut ids = s.input_ids.clone();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        let mut mask = vec![1u32; s.input_ids.len()];
        mask.extend(std::iter::repeat_n(0, pad));
        let mut labels = s.labels.clone();
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        // Label p is predicted at p-1: the first position never counts.
        batch.num_label_tokens += s
            .labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
        batch.num_tokens += s.input_ids.len();
        batch.input_ids.push(ids);
        batch.attention_mask.push(mask);
        batch.labels.push(labels);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_masks_and_counts() {
        let a = EncodedText {
            input_ids: vec![1, 5, 6],
            labels: vec![IGNORE_INDEX, IGNORE_INDEX, 6],
            truncated: 0,
        };
        let b = EncodedText {
            input_ids: vec![1, 7],
            labels: vec![IGNORE_INDEX, 7],
            truncated: 0,
        };
        let batch = pad_batch(&[a, b], 0);
        assert_eq!(batch.input_ids, vec![vec![1, 5, 6], vec![1, 7, 0]]);
        assert_eq!(batch.attention_mask, vec![vec![1, 1, 1], vec![1, 1, 0]]);
        assert_eq!(batch.labels[1], vec![IGNORE_INDEX, 7, IGNORE_INDEX]);
        assert_eq!(batch.num_label_tokens, 2);
        assert_eq!(batch.num_tokens, 5);
    }
}
