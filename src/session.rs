//! An inference session: one checkpoint with its processor, tokenizer and chat template, and the
//! two questions users ask of it — "how likely is this continuation?" and "what do you answer?".
//! Used by the `score` and `generate` commands and, later, by the evaluator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::adapter::{check_adapter_fits, read_adapter};
use crate::data::feature_cache::{content_key, CacheLocation, FeatureCache};
use crate::data::processor::{AspectMode, ImageProcessor};
use crate::data::prompt::{ChatTemplate, TextProcessor};
use crate::error::{Error, Result};
use crate::model::checkpoint::resolve_model;
use crate::model::family::{layout, open_with_layout};
use crate::model::generate::{continuation_logprobs, greedy};
use crate::model::lora::LoraFactory;
use crate::model::vision_key::vision_cache_key;
use crate::model::{ImageOptions, LoadOptions, ModelLayout, VisionInput, VisionLanguageModel};
use crate::train::checkpoint::load_float_safetensors;

/// How the prompt text is turned into tokens.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A user question, rendered through the model's chat template with the image.
    Chat(String),
    /// Used literally: the image placeholder (e.g. `<image>`) is expanded, BOS added by the
    /// tokenizer's post-processor, nothing else.
    Raw(String),
}

#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub device: Device,
    pub dtype: DType,
    pub aspect: AspectMode,
    /// At most this many tiles per picture (tiling processors only).
    pub max_tiles: Option<usize>,
    /// A PEFT LoRA adapter directory applied on top of the base weights.
    pub adapter: Option<PathBuf>,
    /// Fully trained weights replacing the base ones (a run's `full_weights.safetensors`, or a
    /// checkpoint's `trainable.safetensors`, whose LoRA and proxy tensors are skipped here).
    pub full_weights: Option<PathBuf>,
    /// The frozen-vision feature cache to read and fill (families that have one; see
    /// [`crate::data::feature_cache`]).
    pub vision_cache: Option<CacheLocation>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            aspect: AspectMode::Resize,
            max_tiles: None,
            adapter: None,
            full_weights: None,
            vision_cache: None,
        }
    }
}

pub struct Session {
    pub model: Box<dyn VisionLanguageModel>,
    /// What the checkpoint is (family, shapes, limits), from its `config.json`.
    pub layout: ModelLayout,
    pub processor: ImageProcessor,
    pub template: ChatTemplate,
    pub text: TextProcessor,
    pub device: Device,
    pub dir: PathBuf,
    /// This model's entries of the frozen-vision feature cache, when one was asked for.
    pub vision_cache: Option<FeatureCache>,
}

/// `score`'s answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScoreOutput {
    /// Sum of the token log-probabilities (natural log).
    pub logprob: f32,
    pub token_logprobs: Vec<f32>,
    pub token_ids: Vec<u32>,
    pub tokens: Vec<String>,
}

/// `generate`'s answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    pub text: String,
    /// Generated ids only (the prompt excluded), EOS included when reached.
    pub token_ids: Vec<u32>,
}

/// Drop LoRA and proxy tensors from a trainable-weights file, keeping base-weight replacements.
fn base_weights_only(mut tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors.retain(|name, _| {
        !(name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight") || name == "proxy")
    });
    tensors
}

impl Session {
    /// `model`: a local directory or a Hub repo id.
    pub fn load(model: &str, opts: SessionOptions) -> Result<Self> {
        let dir = resolve_model(model)?;
        let layout = layout(&dir)?;
        let lora = match &opts.adapter {
            Some(path) => {
                let adapter = read_adapter(path, &opts.device, layout.family.key_map())?;
                check_adapter_fits(&adapter, &dir)?;
                Some(LoraFactory::new(adapter.spec, false, 0)?.with_loaded(adapter.weights))
            }
            None => None,
        };
        let opened = open_with_layout(
            layout,
            LoadOptions {
                device: opts.device.clone(),
                dtype: opts.dtype,
                trainable: None,
                lora,
                overrides: match &opts.full_weights {
                    Some(f) => base_weights_only(load_float_safetensors(f, &opts.device)?),
                    None => Default::default(),
                },
                trainable_rows: Vec::new(),
                // Nothing trains here.
                trainable_dtype: candle_core::DType::F32,
            },
            &ImageOptions {
                aspect: opts.aspect,
                max_tiles: opts.max_tiles,
            },
        )?;
        if let (Some(path), Some(factory)) = (&opts.adapter, opened.store.lora()) {
            let missing = factory.missing_loaded();
            if let Some(first) = missing.first() {
                return Err(Error::Weights(format!(
                    "adapter {}: its target_modules match {} module(s) of base {} that {} has no \
                     LoRA weights for, e.g. `{first}` (an adapter made for another model?)",
                    path.display(),
                    missing.len(),
                    dir.display(),
                    path.join(crate::adapter::ADAPTER_WEIGHTS).display()
                )));
            }
        }
        let (template, text) = opened.layout.prompt()?;
        let vision_cache = match &opts.vision_cache {
            Some(loc) => {
                match vision_cache_key(&opened.layout, &opened.store, &opened.processor)? {
                    Some(key) => Some(FeatureCache::open(&loc.dir, &key.key, loc.max_bytes)?),
                    None => {
                        tracing::warn!(
                            "vision cache {}: not used, the {} family's vision states are not \
                             cached",
                            loc.dir.display(),
                            opened.layout.family.name()
                        );
                        None
                    }
                }
            }
            None => None,
        };
        Ok(Self {
            model: opened.model,
            layout: opened.layout,
            processor: opened.processor,
            template,
            text,
            device: opts.device,
            dir,
            vision_cache,
        })
    }

    /// The model's vision input for one image file: with a feature cache, the tower's states
    /// (from the cache, or computed now and stored); otherwise the processed pixels.
    pub fn vision_input(&self, image: &Path) -> Result<VisionInput> {
        let key = match &self.vision_cache {
            Some(cache) => {
                let key = content_key(image)?;
                if let Some(states) = cache.get(&key)? {
                    return Ok(VisionInput::States(
                        states.to_device(&self.device)?.unsqueeze(0)?,
                    ));
                }
                Some((cache, key))
            }
            None => None,
        };
        let rgb = self.processor.load(image)?;
        let processed = self.processor.preprocess(&rgb)?;
        let pixels = VisionInput::from_processed(&[processed], &self.device)?;
        let Some((cache, key)) = key else {
            return Ok(pixels);
        };
        let states = self.model.vision_states(&pixels)?;
        cache.put(&key, &states.squeeze(0)?)?;
        Ok(VisionInput::States(states))
    }

    /// Token ids of a prompt, image placeholder expanded.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = match prompt {
            Prompt::Chat(q) => self.template.render_user_prompt(q)?,
            Prompt::Raw(t) => t.clone(),
        };
        let ids = self.text.encode_prompt(&text)?;
        let n_image = ids
            .iter()
            .filter(|&&t| t == self.model.image_token_id())
            .count();
        if n_image != self.model.num_image_tokens() {
            return Err(Error::Model(format!(
                "the prompt must hold exactly one image placeholder `{}` (found {} image tokens, \
                 expected {}); with --raw-prompt, write it where the image goes",
                self.text.image_token(),
                n_image,
                self.model.num_image_tokens()
            )));
        }
        Ok(ids)
    }

    pub fn score(&self, image: &Path, prompt: &Prompt, continuation: &str) -> Result<ScoreOutput> {
        let vision = self.vision_input(image)?;
        let prompt_ids = self.prompt_ids(prompt)?;
        let cont = self.text.encode_plain(continuation)?;
        if cont.is_empty() {
            return Err(Error::Model(
                "the continuation is empty after tokenization".into(),
            ));
        }
        let token_logprobs = continuation_logprobs(
            self.model.as_ref(),
            &prompt_ids,
            &cont,
            Some(&vision),
            &self.device,
        )?;
        let tokens = cont
            .iter()
            .map(|&t| self.text.decode(&[t], false))
            .collect::<Result<Vec<_>>>()?;
        Ok(ScoreOutput {
            logprob: token_logprobs.iter().sum(),
            token_logprobs,
            token_ids: cont,
            tokens,
        })
    }

    /// Refuse a generation that cannot be done in full: `max_new_tokens == 0`, or a prompt of
    /// `prompt_len` tokens plus `max_new_tokens` longer than the model's
    /// `max_position_embeddings` (decoding never runs past it).
    pub fn check_generation_length(&self, prompt_len: usize, max_new_tokens: usize) -> Result<()> {
        if max_new_tokens == 0 {
            return Err(Error::Model(
                "max_new_tokens is 0: at least one new token must be asked for".into(),
            ));
        }
        let limit = self.model.max_positions();
        if prompt_len.saturating_add(max_new_tokens) > limit {
            return Err(Error::Model(format!(
                "the prompt is {prompt_len} tokens; with {max_new_tokens} new tokens the sequence \
                 would be {} tokens, past the model's max_position_embeddings {limit} ({}); ask \
                 for at most {} new tokens",
                prompt_len.saturating_add(max_new_tokens),
                self.dir.join("config.json").display(),
                limit.saturating_sub(prompt_len)
            )));
        }
        Ok(())
    }

    /// Greedy decoding of at most `max_new_tokens` (at least 1; prompt + `max_new_tokens` must
    /// fit in `max_position_embeddings`, see [`Session::check_generation_length`]).
    pub fn generate(
        &self,
        image: &Path,
        prompt: &Prompt,
        max_new_tokens: usize,
    ) -> Result<GenerateOutput> {
        let prompt_ids = self.prompt_ids(prompt)?;
        self.check_generation_length(prompt_ids.len(), max_new_tokens)?;
        let vision = self.vision_input(image)?;
        let eos = self.text.eos_token_ids();
        let token_ids = greedy(
            self.model.as_ref(),
            &prompt_ids,
            Some(&vision),
            max_new_tokens,
            &eos,
            &self.device,
        )?;
        let text = self.text.decode(&token_ids, true)?;
        Ok(GenerateOutput { text, token_ids })
    }
}
