//! Llama-3.2-Vision (HF `MllamaForConditionalGeneration`): the tiled vision encoder → a linear
//! projector → image features the text model's cross-attention layers attend to. Unlike LLaVA
//! the image occupies one `<|image|>` token in the text; the features never enter the token
//! stream.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use super::config::MllamaConfig;
use super::family::{canonical_name, is_unused_weight};
use super::text::{cross_mask, CrossInputs, MllamaTextModel};
use super::vision::MllamaVisionModel;
use crate::error::{Error, Result};
use crate::model::cache::KvCache;
use crate::model::family::LoadOptions;
use crate::model::layers::Linear;
use crate::model::llama::attention_mask;
use crate::model::weights::{WeightStore, Weights};
use crate::model::{valid_rows, Injection, LogitRows, VisionInput, VisionLanguageModel};

#[derive(Debug, Clone)]
pub struct MllamaModel {
    vision: MllamaVisionModel,
    projector: Linear,
    text: MllamaTextModel,
    cfg: MllamaConfig,
    device: Device,
}

impl MllamaModel {
    /// Load config and weights from a model directory (any supported key layout).
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<(Self, WeightStore)> {
        let cfg = MllamaConfig::from_file(&dir.join("config.json"))?;
        let store = opts.open_store(dir, canonical_name)?;
        let model = Self::new(&store, &cfg)?;
        Ok((model, store))
    }

    /// Build from a store; fails on missing, mis-shaped or unexpected weights.
    pub fn new(store: &WeightStore, cfg: &MllamaConfig) -> Result<Self> {
        let root = Weights::root(store);
        let vision = MllamaVisionModel::new(&root.pp("model.vision_model"), &cfg.vision)?;
        let projector = Linear::new(
            &root.pp("model.multi_modal_projector"),
            cfg.vision.vision_output_dim,
            cfg.text.hidden_size,
            true,
        )?;
        let text =
            MllamaTextModel::new(&root.pp("model.language_model"), &root.pp("lm_head"), cfg)?;
        store.finish(|name| is_unused_weight(cfg, name))?;
        if let Some(lora) = store.lora() {
            let stray = lora.unused_loaded();
            if !stray.is_empty() {
                return Err(Error::Weights(format!(
                    "the adapter has LoRA weights for module(s) this model does not have: {}",
                    stray.join(", ")
                )));
            }
        }
        Ok(Self {
            vision,
            projector,
            text,
            cfg: cfg.clone(),
            device: store.device().clone(),
        })
    }

    pub fn config(&self) -> &MllamaConfig {
        &self.cfg
    }

    /// Token embeddings `[b, s, h]`, with `inject`'s rows in place.
    fn embeds(&self, id_rows: &[Vec<u32>], inject: Option<&Injection>) -> Result<Tensor> {
        let (b, s) = (id_rows.len(), id_rows.first().map_or(0, Vec::len));
        let rows = (self.cfg.text.vocab_size + MllamaConfig::EXTRA_EMBEDDINGS) as u32;
        if let Some(bad) = id_rows.iter().flatten().find(|&&t| t >= rows) {
            return Err(Error::Model(format!(
                "token id {bad} is outside the {rows} embedding rows"
            )));
        }
        let ids = Tensor::from_vec(id_rows.concat(), (b, s), &self.device)?;
        let embeds = self.text.embed(&ids)?;
        match inject {
            Some(inj) => inj.apply(&embeds),
            None => Ok(embeds),
        }
    }

    /// The cross-attention inputs of a prompt: image features, and which rows see the image
    /// (from its `<|image|>` token on, as HF's processor builds `cross_attention_mask`).
    fn cross_inputs(&self, id_rows: &[Vec<u32>], vision: &VisionInput) -> Result<CrossInputs> {
        let n = vision.num_images()?;
        if n != id_rows.len() {
            return Err(Error::Model(format!(
                "{n} image(s) for {} prompt(s): each prompt takes one image",
                id_rows.len()
            )));
        }
        let image_id = self.cfg.image_token_id;
        let mut sees = Vec::with_capacity(id_rows.len());
        for (b, row) in id_rows.iter().enumerate() {
            let at: Vec<usize> = (0..row.len()).filter(|&i| row[i] == image_id).collect();
            let [first] = at[..] else {
                return Err(Error::Model(format!(
                    "prompt {b} holds {} image token(s) `<|image|>` (id {image_id}); exactly one \
                     is needed where the image goes",
                    at.len()
                )));
            };
            sees.push((0..row.len()).map(|i| i >= first).collect::<Vec<_>>());
        }
        let tile_valid = self.tiles(vision)?.tile_mask;
        let states = self.image_features(vision)?;
        let per_tile = self.cfg.vision.num_patches();
        let (bias, row_mask) = cross_mask(&sees, &tile_valid, per_tile, &self.device)?;
        Ok(CrossInputs {
            states: Some(states),
            bias,
            row_mask,
        })
    }

    /// The pictures as the vision encoder takes them: as many tiles as the processor packed
    /// (its `max_image_tiles`, as HF runs them: the reference recipe's one tile is one tile, not
    /// the model's `max_num_tiles` of which all but one are masked padding — 4x the encoder's
    /// work and 16x its attention scores for the released checkpoints).
    fn tiles(&self, vision: &VisionInput) -> Result<Tiles> {
        let VisionInput::Tiles {
            pixel_values,
            aspect_ratio_ids,
            aspect_ratio_mask,
            num_tiles,
        } = vision
        else {
            return Err(Error::Model(
                "Llama-3.2-Vision takes tiled images (MllamaImageProcessor), not plain pixels or \
                 precomputed vision states"
                    .into(),
            ));
        };
        let v = &self.cfg.vision;
        let (_, tiles, _, _, _) = pixel_values.dims5()?;
        if tiles > v.max_num_tiles {
            return Err(Error::Model(format!(
                "{tiles} tiles per image, the vision encoder takes at most {}",
                v.max_num_tiles
            )));
        }
        let ids = aspect_ratio_ids.to_dtype(DType::U32)?;
        if let Some(bad) = ids
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i as usize > v.max_aspect_ratio_id())
        {
            return Err(Error::Model(format!(
                "aspect-ratio id {bad} is past the model's {} supported aspect ratios",
                v.max_aspect_ratio_id()
            )));
        }
        let mask_rows = aspect_ratio_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let tile_mask: Vec<Vec<bool>> = mask_rows
            .iter()
            .zip(num_tiles)
            .map(|(m, &k)| (0..tiles).map(|t| t < k && m[t] != 0).collect())
            .collect();
        Ok(Tiles {
            pixels: pixel_values.clone(),
            ids,
            tile_mask,
        })
    }

    /// Run `embeds` (positions `offset..`) through the text model; `cross` as for
    /// [`MllamaTextModel::forward_embeds`].
    fn run_text(
        &self,
        embeds: &Tensor,
        valid: &[Vec<bool>],
        cross: Option<&CrossInputs>,
        cache: Option<&mut KvCache>,
        rows: LogitRows<'_>,
    ) -> Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        // HF Mllama's position ids are the cache positions, padding or not; a batch of stacked
        // caches counts each row's own tokens ([`KvCache::positions`]), as the row had alone.
        let positions = match &cache {
            Some(c) => c.positions(b, s)?,
            None => (0..b).flat_map(|_| 0..s as u32).collect(),
        };
        let positions = Tensor::from_vec(positions, (b, s), &self.device)?;
        let padded = valid.iter().any(|r| r.iter().any(|v| !v));
        let mask = if s > 1 || padded {
            Some(attention_mask(valid, s, offset, &self.device)?)
        } else {
            None
        };
        Ok(self
            .text
            .forward_embeds(embeds, &positions, mask.as_ref(), cross, cache, rows)?)
    }
}

/// Tiled pictures ready for the vision encoder.
struct Tiles {
    /// `[n, tiles, 3, h, w]`.
    pixels: Tensor,
    /// `[n]` u32 aspect-ratio ids.
    ids: Tensor,
    /// `[n][tiles]`: real tiles.
    tile_mask: Vec<Vec<bool>>,
}

fn id_rows(input_ids: &Tensor) -> Result<Vec<Vec<u32>>> {
    Ok(input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?)
}

impl VisionLanguageModel for MllamaModel {
    fn image_features(&self, vision: &VisionInput) -> Result<Tensor> {
        let tiles = self.tiles(vision)?;
        let n = tiles.tile_mask.len();
        let features = self
            .vision
            .forward(&tiles.pixels, &tiles.ids, &tiles.tile_mask)?;
        let (_, t, np, _) = features.dims4()?;
        let projected = self.projector.forward(&features)?;
        let h = self.cfg.text.hidden_size;
        Ok(projected
            .reshape((n, t * np, h))?
            .to_dtype(self.text.embedding_dtype())?)
    }

    /// The image is one `<|image|>` token; its features reach the text through cross-attention.
    fn set_recompute(&mut self, recompute: Option<crate::model::recompute::Recompute>) {
        self.vision.set_recompute(recompute.clone());
        self.text.set_recompute(recompute);
    }

    fn num_image_tokens(&self) -> usize {
        1
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
        logit_rows: LogitRows<'_>,
    ) -> Result<Tensor> {
        let rows = id_rows(input_ids)?;
        let (b, s) = input_ids.dims2()?;
        let embeds = self.embeds(&rows, inject)?;
        let valid = valid_rows(attention_mask, b, s)?;
        let cross = match vision {
            Some(v) => Some(self.cross_inputs(&rows, v)?),
            None => {
                reject_image_tokens(&rows, self.cfg.image_token_id)?;
                None
            }
        };
        self.run_text(&embeds, &valid, cross.as_ref(), None, logit_rows)
    }

    fn hidden_size(&self) -> usize {
        self.cfg.text.hidden_size
    }

    fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(self.text.embed(&t)?)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.text.num_self_layers(), self.text.num_cross_layers())
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
        let rows = id_rows(input_ids)?;
        let (b, s) = input_ids.dims2()?;
        let embeds = self.embeds(&rows, None)?;
        let cross = match vision {
            Some(v) => {
                let c = self.cross_inputs(&rows, v)?;
                let keys = c.bias.dim(3)?;
                cache.set_cross_rows(
                    c.bias.narrow(2, s - 1, 1)?.reshape((b, 1, 1, keys))?,
                    c.row_mask.narrow(1, s - 1, 1)?,
                );
                Some(c)
            }
            None => {
                reject_image_tokens(&rows, self.cfg.image_token_id)?;
                None
            }
        };
        let valid = cache.key_valid(b, s)?;
        self.run_text(
            &embeds,
            &valid,
            cross.as_ref(),
            Some(cache),
            LogitRows::Last,
        )
    }

    fn step_rows(
        &self,
        tokens: &Tensor,
        cache: &mut KvCache,
        logit_rows: LogitRows<'_>,
    ) -> Result<Tensor> {
        let rows = id_rows(tokens)?;
        let (b, s) = tokens.dims2()?;
        let embeds = self.embeds(&rows, None)?;
        // New tokens reuse the prompt's last cross-attention row; the image keys are cached.
        let cross = match cache.cross_rows() {
            Some((bias, row)) => {
                let keys = bias.dim(3)?;
                Some(CrossInputs {
                    states: None,
                    bias: bias.broadcast_as((b, 1, s, keys))?.contiguous()?,
                    row_mask: row.broadcast_as((b, s, 1))?.contiguous()?,
                })
            }
            None => None,
        };
        let valid = cache.key_valid(b, s)?;
        self.run_text(&embeds, &valid, cross.as_ref(), Some(cache), logit_rows)
    }
}

/// Without an image, a prompt must not hold the image token (its features would be missing).
fn reject_image_tokens(rows: &[Vec<u32>], image_id: u32) -> Result<()> {
    let n = rows.iter().flatten().filter(|&&t| t == image_id).count();
    if n > 0 {
        return Err(Error::Model(format!(
            "the prompt holds {n} image token(s) but no image was given"
        )));
    }
    Ok(())
}
