//! Model stage: architectures in our own differentiable candle code, and weight loading.
//!
//! Every model family implements [`VisionLanguageModel`]; training, scoring and generation only
//! talk to that trait. [`family`] is the one place that reads `config.json` and picks the family
//! ([`open`]).

pub mod activation_profile;
pub mod cache;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod family;
pub mod generate;
#[cfg(test)]
mod gradcheck;
pub mod kernels;
pub mod layers;
pub mod llama;
pub mod llava;
pub mod lora;
pub mod loss;
pub mod mllama;
pub mod precomputed;
pub mod recompute;
pub mod vision_input;
pub mod vision_key;
pub mod weights;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
pub use cache::KvCache;
pub use family::{
    open, ImageOptions, LoadOptions, ModelFamily, ModelLayout, ModuleGroup, OpenedModel,
};
pub use vision_input::VisionInput;

/// Rows that replace token embeddings at given positions (e.g. proxy-instruction vectors).
#[derive(Debug, Clone)]
pub struct Injection {
    /// Flat positions `b * seq_len + s` in the batch, one per row.
    pub positions: Vec<usize>,
    /// `[positions.len(), hidden]`; gradients flow back into it.
    pub rows: Tensor,
}

impl Injection {
    /// `embeds: [b, s, hidden]` with the rows in place (gradients reach `rows`).
    pub fn apply(&self, embeds: &Tensor) -> Result<Tensor> {
        let (b, s, h) = embeds.dims3()?;
        if self.rows.dims() != [self.positions.len(), h] {
            return Err(Error::Model(format!(
                "injected rows have shape {:?}, expected [{}, {h}]",
                self.rows.dims(),
                self.positions.len()
            )));
        }
        let flat = embeds.reshape((b * s, h))?;
        Ok(layers::scatter_rows(&flat, &self.rows, &self.positions)?.reshape((b, s, h))?)
    }
}

/// `attention_mask: [b, s]` (1 = token, 0 = padding) as rows of booleans; all valid when absent.
pub fn valid_rows(attention_mask: Option<&Tensor>, b: usize, s: usize) -> Result<Vec<Vec<bool>>> {
    let Some(m) = attention_mask else {
        return Ok(vec![vec![true; s]; b]);
    };
    if m.dims() != [b, s] {
        return Err(Error::Model(format!(
            "attention mask has shape {:?}, expected [{b}, {s}]",
            m.dims()
        )));
    }
    Ok(m.to_dtype(candle_core::DType::U32)?
        .to_vec2::<u32>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v != 0).collect())
        .collect())
}

/// Which positions of a `[b, s]` sequence get logits: the LM head (`hidden × vocab` per row) is the
/// largest single product of a small model's step, and training needs it only where a label
/// follows, generation only at the last position.
#[derive(Debug, Clone, Copy)]
pub enum LogitRows<'a> {
    /// Every position: `[b, s, vocab]`.
    All,
    /// The last position of each sequence: `[b, vocab]`.
    Last,
    /// The given flat positions (`i = batch * s + position`, u32): `[n, vocab]`.
    Flat(&'a Tensor),
}

impl LogitRows<'_> {
    /// `hidden: [b, s, h]` narrowed to the selected rows (before the final norm and the head,
    /// which act row by row).
    pub fn select(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, h) = hidden.dims3()?;
        match self {
            LogitRows::All => Ok(hidden.clone()),
            LogitRows::Last => hidden.narrow(1, s - 1, 1)?.squeeze(1),
            LogitRows::Flat(idx) => hidden.reshape((b * s, h))?.index_select(idx, 0),
        }
    }
}

/// What every vision-language model family offers the rest of the crate.
pub trait VisionLanguageModel {
    /// Projected image features `[n_images, num_image_tokens, hidden]`.
    fn image_features(&self, vision: &VisionInput) -> Result<Tensor>;
    /// What the family's cached vision group ([`ModelFamily::cached_vision_group`]) makes of
    /// each picture, `[n, tokens, dim]`: given back as [`VisionInput::States`], the model goes on
    /// from there exactly as from the pixels. An error for families without such a group.
    fn vision_states(&self, vision: &VisionInput) -> Result<Tensor> {
        let _ = vision;
        Err(Error::Model(
            "this model family cannot take precomputed vision states".into(),
        ))
    }
    /// Run every vision and decoder layer of training forwards through `recompute` (activation
    /// checkpointing), or none (`None`). Generation with a cache never recomputes.
    fn set_recompute(&mut self, recompute: Option<recompute::Recompute>);
    /// How many placeholder tokens one image occupies in the prompt.
    fn num_image_tokens(&self) -> usize;
    fn image_token_id(&self) -> u32;
    /// Full-sequence f32 logits `[b, s, vocab]` for `input_ids: [b, s]` (u32), images spliced in at
    /// the image-token positions, `attention_mask: [b, s]` (1 = token, 0 = padding).
    fn forward(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_injected(input_ids, vision, attention_mask, None)
    }
    /// [`VisionLanguageModel::forward`] with some token embeddings replaced by `inject`'s rows.
    fn forward_injected(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
        attention_mask: Option<&Tensor>,
        inject: Option<&Injection>,
    ) -> Result<Tensor> {
        self.forward_rows(input_ids, vision, attention_mask, inject, LogitRows::All)
    }
    /// [`VisionLanguageModel::forward_injected`] with logits only at `rows` (see [`LogitRows`]
    /// for the shapes).
    fn forward_rows(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
        attention_mask: Option<&Tensor>,
        inject: Option<&Injection>,
        rows: LogitRows<'_>,
    ) -> Result<Tensor>;
    /// Hidden size of the token embeddings (what injected rows must have).
    fn hidden_size(&self) -> usize;
    /// Token embeddings `[n, hidden]` of `ids` (e.g. to initialise vectors from a text).
    fn embed_ids(&self, ids: &[u32]) -> Result<Tensor>;
    /// A fresh, empty generation cache.
    fn new_cache(&self) -> KvCache;
    /// The longest sequence (prompt + generated tokens) the text model was built for
    /// (`max_position_embeddings`); generation never runs past it.
    fn max_positions(&self) -> usize;
    /// Rows of the output head (`vocab_size` of the text config).
    fn vocab_size(&self) -> usize;
    /// Run the prompt through the cache; returns the last position's logits `[b, vocab]`.
    fn prefill(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
        cache: &mut KvCache,
    ) -> Result<Tensor>;
    /// Append `tokens: [b, s]` (text only) to the cache; returns the last position's logits.
    fn step(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.step_rows(tokens, cache, LogitRows::Last)
    }
    /// [`VisionLanguageModel::step`] with logits at `rows` of the new tokens (e.g. every position,
    /// to score a continuation fed at once).
    fn step_rows(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        rows: LogitRows<'_>,
    ) -> Result<Tensor>;
}

/// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
pub fn parse_device(spec: &str) -> Result<Device> {
    let dev = match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .map_err(|_| Error::Model(format!("device `{s}`: expected cuda:N")))?;
            Device::new_cuda(n)
        }
        other => {
            return Err(Error::Model(format!(
                "device `{other}`: expected cpu, cuda or cuda:N"
            )))
        }
    };
    dev.map_err(|e| Error::Model(format!("cannot open device `{spec}`: {e}")))
}
