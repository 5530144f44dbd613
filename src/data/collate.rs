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
    /// `tokens` placeholder positions whose embeddings the model replaces by the proxy vectors.
    /// The placeholder id is arbitrary (its embedding is never used), so no spare vocabulary
    /// entry is needed.
    Proxy { tokens: usize, placeholder_id: u32 },
}

impl Instruction {
    fn text(&self) -> &str {
        match self {
            Instruction::Fixed(t) => t,
            Instruction::None | Instruction::Proxy { .. } => "",
        }
    }
}

/// Stands in for the proxy while the template is rendered; split on afterwards. A private-use
/// character no tokenizer or template will produce.
const PROXY_SENTINEL: &str = "\u{F8FF}proxy\u{F8FF}";

/// Token ids and labels of one sample (pixels are handled separately).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedText {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; `IGNORE_INDEX` outside the assistant turn.
    pub labels: Vec<i64>,
    /// Tokens dropped from the end because the sample exceeded `max_len`.
    pub truncated: usize,
    /// Positions of the proxy placeholders (empty unless the instruction is a proxy).
    pub proxy_positions: Vec<usize>,
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
        if let Instruction::Proxy {
            tokens,
            placeholder_id,
        } = self.instruction
        {
            return self.encode_with_proxy(description, tokens, placeholder_id);
        }
        let prompt_text = self.prompt_text()?;
        let full_text = self.template.render(
            &[
                Turn::user(self.instruction.text(), true),
                Turn::assistant(description),
            ],
            false,
        )?;
        let prompt = self.text.encode_prompt(&prompt_text)?;
        let ids = self.text.encode_prompt(&full_text)?;
        if ids.len() <= prompt.len() || ids[..prompt.len()] != prompt[..] {
            return Err(Error::Template(format!(
                "the chat template's assistant turn does not extend its generation prompt token-wise \
                 (prompt {:?} vs conversation {:?}); cannot place the loss mask",
                prompt_text, full_text
            )));
        }
        // Templates that do not close the assistant turn with EOS still need the model to learn
        // to stop: `finish` appends it.
        let prompt_len = prompt.len();
        self.finish(ids, prompt_len, Vec::new())
    }

    /// Proxy mode: the template is rendered with a sentinel as the user text; the text before it
    /// (image included) is tokenized as a prompt, N placeholder ids stand where the sentinel was,
    /// and the rest is tokenized as plain text. The placeholders' positions are recorded.
    fn encode_with_proxy(
        &self,
        description: &str,
        tokens: usize,
        placeholder_id: u32,
    ) -> Result<EncodedText> {
        let user = Turn::user(PROXY_SENTINEL, true);
        let full = self
            .template
            .render(&[user.clone(), Turn::assistant(description)], false)?;
        let prompt = self.template.render(&[user], true)?;
        let split = |text: &str| -> Result<(String, String)> {
            let (a, b) = text.split_once(PROXY_SENTINEL).ok_or_else(|| {
                Error::Template(
                    "the chat template dropped the user text; cannot place the proxy instruction"
                        .into(),
                )
            })?;
            Ok((a.to_string(), b.to_string()))
        };
        let (before, after_full) = split(&full)?;
        let (before_prompt, after_prompt) = split(&prompt)?;
        if before != before_prompt {
            return Err(Error::Template(
                "the chat template renders the user turn differently with and without the answer"
                    .into(),
            ));
        }
        let head = self.text.encode_prompt(&before)?;
        let tail_prompt = self.text.encode_plain(&after_prompt)?;
        let tail = self.text.encode_plain(&after_full)?;
        if tail.len() <= tail_prompt.len() || tail[..tail_prompt.len()] != tail_prompt[..] {
            return Err(Error::Template(format!(
                "the chat template's assistant turn does not extend its generation prompt \
                 token-wise ({after_prompt:?} vs {after_full:?}); cannot place the loss mask"
            )));
        }
        let mut ids = head.clone();
        ids.extend(std::iter::repeat_n(placeholder_id, tokens));
        let prompt_len = ids.len() + tail_prompt.len();
        ids.extend(&tail);
        let positions = (head.len()..head.len() + tokens).collect();
        self.finish(ids, prompt_len, positions)
    }

    /// Append EOS if missing, mask the prompt, apply `max_len`.
    fn finish(
        &self,
        mut ids: Vec<u32>,
        prompt_len: usize,
        proxy_positions: Vec<usize>,
    ) -> Result<EncodedText> {
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
                if i < prompt_len {
                    IGNORE_INDEX
                } else {
                    t as i64
                }
            })
            .collect();
        let mut truncated = 0;
        if let Some(max) = self.max_len {
            if prompt_len >= max {
                return Err(Error::Model(format!(
                    "max_len {max} leaves no room for the description: the prompt with the \
                     image alone is {prompt_len} tokens"
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
            proxy_positions,
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
    /// Flat positions `b * width + p` of every proxy placeholder, sample by sample.
    pub proxy_positions: Vec<usize>,
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
        proxy_positions: Vec::new(),
        num_label_tokens: 0,
        num_tokens: 0,
    };
    for (b, s) in samples.iter().enumerate() {
        batch
            .proxy_positions
            .extend(s.proxy_positions.iter().map(|p| b * width + p));
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
            proxy_positions: vec![],
        };
        let b = EncodedText {
            input_ids: vec![1, 7],
            labels: vec![IGNORE_INDEX, 7],
            truncated: 0,
            proxy_positions: vec![],
        };
        let batch = pad_batch(&[a, b], 0);
        assert_eq!(batch.input_ids, vec![vec![1, 5, 6], vec![1, 7, 0]]);
        assert_eq!(batch.attention_mask, vec![vec![1, 1, 1], vec![1, 1, 0]]);
        assert_eq!(batch.labels[1], vec![IGNORE_INDEX, 7, IGNORE_INDEX]);
        assert_eq!(batch.num_label_tokens, 2);
        assert_eq!(batch.num_tokens, 5);
    }
}
