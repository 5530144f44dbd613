//! Building training micro-batches as plain host data, on worker threads: decode and preprocess
//! the images, shuffle each description afresh, encode prompt + answer with the loss mask, pad.

use std::sync::Arc;

use candle_core::Tensor;

use crate::data::collate::{pad_batch, Instruction, SampleEncoder, TextBatch};
use crate::data::feature_cache::{content_key, FeatureCache};
use crate::data::pairs::Pair;
use crate::data::processor::{ImageProcessor, ProcessedImage};
use crate::data::prompt::{ChatTemplate, TextProcessor};
use crate::data::shuffle::{shuffle_description, Separator};
use crate::error::{Error, Result};

/// Everything needed to build a batch; cheap to share between threads.
#[derive(Clone)]
pub struct BatchMaker {
    pub pairs: Arc<Vec<Pair>>,
    pub template: ChatTemplate,
    pub text: TextProcessor,
    pub processor: ImageProcessor,
    pub instruction: Instruction,
    pub max_len: Option<usize>,
    /// The model's `max_position_embeddings`: a longer sample is an error naming it (set
    /// `max_len` to cut long descriptions instead).
    pub max_positions: usize,
    pub shuffle: Separator,
    pub seed: u64,
    /// The frozen-vision feature cache, when the stage may use it: cached pictures are not
    /// decoded at all.
    pub vision_cache: Option<Arc<FeatureCache>>,
}

/// One sample's picture as a worker prepared it.
#[derive(Debug, Clone)]
pub enum BatchPicture {
    /// Decoded and preprocessed for the vision tower; with the file's content key when a feature
    /// cache is in use, so that what the tower makes of it can be stored.
    Processed {
        image: ProcessedImage,
        cache_key: Option<String>,
    },
    /// The tower's states `[tokens, dim]` from the feature cache, on the CPU.
    Cached(Tensor),
}

/// One micro-batch on the host.
#[derive(Debug, Clone)]
pub struct HostBatch {
    pub text: TextBatch,
    /// One picture per sample, in batch order.
    pub images: Vec<BatchPicture>,
    /// Samples whose description was cut to fit `max_len`: (source, tokens dropped).
    pub truncated: Vec<(String, usize)>,
    /// Where each sample of the batch comes from (`manifest:line`), in batch order.
    pub sources: Vec<String>,
}

impl BatchMaker {
    pub fn encoder(&self) -> SampleEncoder<'_> {
        SampleEncoder {
            template: &self.template,
            text: &self.text,
            instruction: self.instruction.clone(),
            max_len: self.max_len,
        }
    }

    /// The description as the model sees it in `epoch` (a fresh permutation every epoch).
    pub fn description(&self, index: usize, epoch: usize) -> String {
        shuffle_description(
            &self.pairs[index].text,
            self.shuffle,
            self.seed,
            epoch as u64,
            index as u64,
        )
    }

    /// A sample's picture: from the feature cache when it holds the file's content, otherwise
    /// decoded and preprocessed.
    fn picture(&self, path: &std::path::Path) -> Result<BatchPicture> {
        let cache_key = match &self.vision_cache {
            Some(cache) => {
                let key = content_key(path)?;
                if let Some(states) = cache.get(&key)? {
                    return Ok(BatchPicture::Cached(states));
                }
                Some(key)
            }
            None => None,
        };
        let img = self.processor.load(path)?;
        Ok(BatchPicture::Processed {
            image: self.processor.preprocess(&img)?,
            cache_key,
        })
    }

    /// Build the micro-batch of pair `indices` for `epoch`.
    pub fn make(&self, epoch: usize, indices: &[usize]) -> Result<HostBatch> {
        let enc = self.encoder();
        let mut texts = Vec::with_capacity(indices.len());
        let mut images = Vec::with_capacity(indices.len());
        let mut truncated = Vec::new();
        let mut sources = Vec::with_capacity(indices.len());
        for &i in indices {
            let pair = &self.pairs[i];
            let e = enc
                .encode(&self.description(i, epoch))
                .map_err(|e| Error::Model(format!("{}: {e}", pair.source)))?;
            if e.input_ids.len() > self.max_positions {
                return Err(Error::Model(format!(
                    "{}: the sample is {} tokens long, more than the model's \
                     max_position_embeddings ({}); set data.max_len to cut long descriptions",
                    pair.source,
                    e.input_ids.len(),
                    self.max_positions
                )));
            }
            sources.push(pair.source.clone());
            if e.truncated > 0 {
                truncated.push((pair.source.clone(), e.truncated));
            }
            texts.push(e);
            images.push(self.picture(&pair.image)?);
        }
        let pad = self
            .text
            .pad_token_id()
            .or(self.text.eos_token_ids().first().copied())
            .unwrap_or(0);
        Ok(HostBatch {
            text: pad_batch(&texts, pad),
            images,
            truncated,
            sources,
        })
    }
}
