//! LLaVA (HF `LlavaForConditionalGeneration`): CLIP features of chosen layers → 2-layer MLP
//! projector → spliced into the token embeddings at the image-token positions → Llama/Mistral.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use super::family::{canonical_name, is_unused_weight, register_unrun_vision_layers};
use crate::error::{Error, Result};
use crate::model::cache::KvCache;
use crate::model::clip::ClipVisionTower;
use crate::model::config::{LlavaConfig, SelectStrategy};
use crate::model::family::LoadOptions;
use crate::model::layers::{scatter_rows, Linear};
use crate::model::llama::{attention_mask, position_ids, LlamaForCausalLm};
use crate::model::weights::{WeightStore, Weights};
use crate::model::{valid_rows, Injection, LogitRows, VisionInput, VisionLanguageModel};

/// `linear_2(gelu(linear_1(x)))`, erf GELU as torch's default.
#[derive(Debug, Clone)]
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
}

impl Projector {
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&w.pp("linear_1"), in_dim, out_dim, bias)?,
            linear_2: Linear::new(&w.pp("linear_2"), out_dim, out_dim, bias)?,
        })
    }
}

impl Module for Projector {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&self.linear_1.forward(x)?.gelu_erf()?)
    }
}

#[derive(Debug, Clone)]
pub struct LlavaModel {
    vision_tower: ClipVisionTower,
    projector: Projector,
    language_model: LlamaForCausalLm,
    cfg: LlavaConfig,
    feature_layers: Vec<usize>,
    device: Device,
}

impl LlavaModel {
    /// Load config and weights from a model directory. Returns the store too, so callers can
    /// collect trainable variables.
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<(Self, WeightStore)> {
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let store = opts.open_store(dir, canonical_name)?;
        let model = Self::new(&store, &cfg)?;
        Ok((model, store))
    }

    /// Build from a store; fails on missing, mis-shaped or unexpected weights.
    pub fn new(store: &WeightStore, cfg: &LlavaConfig) -> Result<Self> {
        let root = Weights::root(store);
        let feature_layers = cfg.feature_layer_indices();
        let depth = feature_layers.iter().copied().max().unwrap_or(0);
        let vision_tower = ClipVisionTower::new(
            &root.pp("model.vision_tower.vision_model"),
            &cfg.vision,
            depth,
        )?;
        let proj_in = cfg.vision.hidden_size * feature_layers.len();
        let projector = Projector::new(
            &root.pp("model.multi_modal_projector"),
            proj_in,
            cfg.text.hidden_size,
            cfg.projector_bias,
        )?;
        let language_model = LlamaForCausalLm::new(
            &root.pp("model.language_model"),
            &root.pp("lm_head"),
            &cfg.text,
        )?;
        if let Some(lora) = store.lora() {
            register_unrun_vision_layers(lora, cfg, store.device())?;
        }
        store.finish(|name| is_unused_weight(cfg, name))?;
        if let Some(lora) = store.lora() {
            let stray: Vec<String> = lora
                .unused_loaded()
                .into_iter()
                .filter(|m| !is_unused_weight(cfg, &format!("{m}.weight")))
                .collect();
            if !stray.is_empty() {
                return Err(Error::Weights(format!(
                    "the adapter has LoRA weights for module(s) this model does not have: {}",
                    stray.join(", ")
                )));
            }
        }
        Ok(Self {
            vision_tower,
            projector,
            language_model,
            cfg: cfg.clone(),
            feature_layers,
            device: store.device().clone(),
        })
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }

    /// Embeddings for `input_ids: [b, s]` with image features spliced in at image-token positions
    /// (in row-major order, image after image), like HF's `masked_scatter`.
    fn input_embeds(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
        inject: Option<&Injection>,
    ) -> Result<Tensor> {
        let embeds = self.token_and_image_embeds(input_ids, vision)?;
        match inject {
            Some(inj) => inj.apply(&embeds),
            None => Ok(embeds),
        }
    }

    /// Plain token embeddings `[b, s, h]`; the image token may sit past the embedding table
    /// (HF zeroes those ids before the lookup).
    fn text_embeds(&self, id_rows: &[Vec<u32>]) -> Result<Tensor> {
        let (b, s) = (id_rows.len(), id_rows.first().map_or(0, Vec::len));
        let image_id = self.cfg.image_token_id;
        let vocab = self.cfg.text.vocab_size as u32;
        let safe: Vec<u32> = id_rows
            .iter()
            .flatten()
            .map(|&t| if t == image_id && t >= vocab { 0 } else { t })
            .collect();
        if let Some(bad) = safe.iter().find(|&&t| t >= vocab) {
            return Err(Error::Model(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let safe = Tensor::from_vec(safe, (b, s), &self.device)?;
        Ok(self.language_model.embed(&safe)?)
    }

    fn token_and_image_embeds(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let id_rows = ids.to_vec2::<u32>()?;
        let image_id = self.cfg.image_token_id;
        let positions: Vec<usize> = id_rows
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, &t)| t == image_id)
            .map(|(p, _)| p)
            .collect();
        let embeds = self.text_embeds(&id_rows)?;
        let hidden = embeds.dim(2)?;
        let Some(vision) = vision else {
            if !positions.is_empty() {
                return Err(Error::Model(format!(
                    "the prompt holds {} image token(s) but no image was given",
                    positions.len()
                )));
            }
            return Ok(embeds);
        };
        let features = self.image_features(vision)?; // [n, t, h]
        let (n, t, _) = features.dims3()?;
        if positions.len() != n * t {
            return Err(Error::Model(format!(
                "the prompt holds {} image tokens but {n} image(s) give {} features ({t} each): \
                 the prompt must expand the image placeholder to {t} tokens per image",
                positions.len(),
                n * t
            )));
        }
        let flat = embeds.reshape((b * s, hidden))?;
        let feats = features.reshape((n * t, hidden))?;
        Ok(scatter_rows(&flat, &feats, &positions)?.reshape((b, s, hidden))?)
    }
}

impl VisionLanguageModel for LlavaModel {
    fn image_features(&self, vision: &VisionInput) -> Result<Tensor> {
        let selected = match vision {
            VisionInput::States(states) => states.clone(),
            other => self.vision_states(other)?,
        };
        let projected = self.projector.forward(&selected)?;
        Ok(projected.to_dtype(self.language_model.embedding_dtype())?)
    }

    /// CLIP's hidden states at the feature layer(s), the class token dropped under the
    /// `default` strategy, concatenated along the feature axis: the projector's input.
    fn vision_states(&self, vision: &VisionInput) -> Result<Tensor> {
        let pixel_values = match vision {
            VisionInput::Pixels(p) => p,
            VisionInput::States(s) => return Ok(s.clone()),
            VisionInput::Tiles { .. } => {
                return Err(Error::Model(
                    "LLaVA takes one fixed-size image per picture, not tiles".into(),
                ))
            }
        };
        let states = self
            .vision_tower
            .hidden_states(pixel_values, &self.feature_layers)?;
        let states = states
            .into_iter()
            .map(|h| match self.cfg.select_strategy {
                SelectStrategy::Default => {
                    let n = h.dim(1)?;
                    h.narrow(1, 1, n - 1)
                }
                SelectStrategy::Full => Ok(h),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&states, 2)?)
    }

    fn set_recompute(&mut self, recompute: Option<crate::model::recompute::Recompute>) {
        self.vision_tower.set_recompute(recompute.clone());
        self.language_model.set_recompute(recompute);
    }

    fn num_image_tokens(&self) -> usize {
        self.cfg.num_image_tokens()
    }

    fn hidden_size(&self) -> usize {
        self.cfg.text.hidden_size
    }

    fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(self.language_model.embed(&t)?)
    }

    fn image_token_id(&self) -> u32 {
        self.cfg.image_token_id
    }

    fn forward_rows(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
        attention_mask: Option<&Tensor>,
        inject: Option<&Injection>,
        rows: LogitRows<'_>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let embeds = self.input_embeds(input_ids, vision, inject)?;
        let valid = valid_rows(attention_mask, b, s)?;
        let positions = position_ids(&valid, 0, &self.device)?;
        let mask = attention_mask_if_needed(&valid, &self.device)?;
        Ok(self
            .language_model
            .forward_embeds(&embeds, &positions, mask.as_ref(), None, rows)?)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.text.num_hidden_layers, 0)
    }

    fn max_positions(&self) -> usize {
        self.cfg.text.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.cfg.text.vocab_size
    }

    fn prefill(
        &self,
        input_ids: &Tensor,
        vision: Option<&VisionInput>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let embeds = self.input_embeds(input_ids, vision, None)?;
        self.extend(&embeds, cache, LogitRows::Last)
    }

    fn step_rows(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        rows: LogitRows<'_>,
    ) -> Result<Tensor> {
        // Generated tokens are embedded as they are, an image token included: image features
        // enter only with the prompt, as in HF's generate.
        let embeds = self.text_embeds(&tokens.to_dtype(DType::U32)?.to_vec2::<u32>()?)?;
        self.extend(&embeds, cache, rows)
    }
}

impl LlavaModel {
    /// Append `embeds: [b, s, h]` to the cache; returns the logits at `rows`.
    fn extend(&self, embeds: &Tensor, cache: &mut KvCache, rows: LogitRows<'_>) -> Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let offset = cache.len();
        let valid = cache.key_valid(b, s)?;
        let positions = Tensor::from_vec(cache.positions(b, s)?, (b, s), &self.device)?;
        let mask = if s > 1 || cache.is_padded() {
            Some(attention_mask(&valid, s, offset, &self.device)?)
        } else {
            None
        };
        Ok(self.language_model.forward_embeds(
            embeds,
            &positions,
            mask.as_ref(),
            Some(cache),
            rows,
        )?)
    }
}

/// The causal mask is always needed for s > 1; padding is folded into the same tensor.
fn attention_mask_if_needed(valid: &[Vec<bool>], device: &Device) -> Result<Option<Tensor>> {
    let s = valid.first().map_or(0, |r| r.len());
    if s <= 1 {
        return Ok(None);
    }
    Ok(Some(attention_mask(valid, s, 0, device)?))
}
