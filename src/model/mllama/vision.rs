//! The tiled vision encoder of Llama-3.2-Vision (HF `MllamaVisionModel`): patch conv per tile,
//! gated aspect-ratio (tile) embeddings before and after the local layers, a class token, gated
//! positional + tile-position embeddings, local layers, gated global layers over all tiles, and
//! the outputs of chosen local layers concatenated to the final features.
//!
//! HF semantics kept on purpose: the patch sequence of each tile is zero-padded to a multiple of
//! 8, and the attention bias blocks only pairs whose query *and* key are padding (a padded patch
//! or a padding tile), so real patches also attend to padding, as in `transformers`.

use candle_core::{DType, Device, Module, Tensor, D};

use super::config::MllamaVisionConfig;
use std::sync::Arc;

use crate::error::Result;
use crate::model::layers::{attention, LayerNorm, Linear};
use crate::model::recompute::Recompute;
use crate::model::weights::Weights;

/// Self-attention of a vision layer (no bias, no RoPE, all heads attend).
#[derive(Debug, Clone)]
struct VisionAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn new(w: &Weights, cfg: &MllamaVisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(&w.pp("q_proj"), h, h, false)?,
            k_proj: Linear::new(&w.pp("k_proj"), h, h, false)?,
            v_proj: Linear::new(&w.pp("v_proj"), h, h, false)?,
            o_proj: Linear::new(&w.pp("o_proj"), h, h, false)?,
            heads: cfg.attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = attention(&q, &k, &v, Some(mask), scale)?;
        self.o_proj
            .forward(&out.transpose(1, 2)?.reshape((b, s, ()))?)
    }
}

/// Pre-norm encoder layer; the global layers scale both branches by `tanh(gate)`.
#[derive(Debug, Clone)]
struct VisionLayer {
    input_layernorm: LayerNorm,
    self_attn: VisionAttention,
    post_attention_layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// `(tanh(gate_attn), tanh(gate_ffn))` of a global layer.
    gates: Option<(Tensor, Tensor)>,
}

impl VisionLayer {
    fn new(w: &Weights, cfg: &MllamaVisionConfig, gated: bool) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.norm_eps);
        let gates = if gated {
            Some((w.get("gate_attn", &[1])?, w.get("gate_ffn", &[1])?))
        } else {
            None
        };
        Ok(Self {
            input_layernorm: LayerNorm::new(&w.pp("input_layernorm"), h, eps)?,
            self_attn: VisionAttention::new(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: LayerNorm::new(&w.pp("post_attention_layernorm"), h, eps)?,
            fc1: Linear::new(&w.pp("mlp.fc1"), h, i, true)?,
            fc2: Linear::new(&w.pp("mlp.fc2"), i, h, true)?,
            gates,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let gate = |t: Tensor, g: Option<&Tensor>| match g {
            Some(g) => t.broadcast_mul(&g.tanh()?.to_dtype(t.dtype())?),
            None => Ok(t),
        };
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, mask)?;
        let x = (x + gate(attn, self.gates.as_ref().map(|g| &g.0))?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let mlp = self.fc2.forward(&self.fc1.forward(&h)?.gelu_erf()?)?;
        &x + gate(mlp, self.gates.as_ref().map(|g| &g.1))?
    }
}

/// `MllamaPrecomputedAspectRatioEmbedding`: one `[max_tiles, hidden]` row per aspect-ratio id,
/// added to every patch of each tile, scaled by `tanh(gate)`.
#[derive(Debug, Clone)]
struct TileEmbedding {
    embedding: Tensor,
    gate: Tensor,
}

impl TileEmbedding {
    fn new(w: &Weights, cfg: &MllamaVisionConfig) -> Result<Self> {
        let rows = cfg.max_aspect_ratio_id() + 1;
        Ok(Self {
            embedding: w.get(
                "embedding.weight",
                &[rows, cfg.max_num_tiles * cfg.hidden_size],
            )?,
            gate: w.get("gate", &[1])?,
        })
    }

    /// `x: [n, tiles, patches, h]` (tiles ≤ max_num_tiles: the first rows of each id's table),
    /// `ids: [n]`.
    fn forward(&self, x: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (n, tiles, _, h) = x.dims4()?;
        let e = self
            .embedding
            .index_select(ids, 0)?
            .reshape((n, (), 1, h))?
            .narrow(1, 0, tiles)?;
        let e = e.broadcast_mul(&self.gate.tanh()?)?.to_dtype(x.dtype())?;
        x.broadcast_add(&e)
    }
}

/// `MllamaPrecomputedPositionEmbedding`: `(1 - tanh g) * positions + tanh g * tile_positions[id]`.
#[derive(Debug, Clone)]
struct PositionEmbedding {
    embedding: Tensor,
    tile_embedding: Tensor,
    gate: Tensor,
}

impl PositionEmbedding {
    fn new(w: &Weights, cfg: &MllamaVisionConfig) -> Result<Self> {
        let (np, h) = (cfg.num_patches(), cfg.hidden_size);
        let rows = cfg.max_aspect_ratio_id() + 1;
        Ok(Self {
            embedding: w.get("embedding", &[np, h])?,
            tile_embedding: w.get("tile_embedding.weight", &[rows, cfg.max_num_tiles * np * h])?,
            gate: w.get("gate", &[1])?,
        })
    }

    /// `x: [n, tiles, num_patches, h]`, `ids: [n]`.
    fn forward(&self, x: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (n, tiles, np, h) = x.dims4()?;
        let g = self.gate.tanh()?;
        let one_minus = (g.ones_like()? - &g)?;
        let pos = self
            .embedding
            .broadcast_mul(&one_minus)?
            .reshape((1, 1, np, h))?
            .to_dtype(x.dtype())?;
        let x = x.broadcast_add(&pos)?;
        let tile = self
            .tile_embedding
            .index_select(ids, 0)?
            .reshape((n, (), np, h))?
            .narrow(1, 0, tiles)?
            .broadcast_mul(&g)?
            .to_dtype(x.dtype())?;
        x + tile
    }
}

/// `MllamaVisionModel`.
#[derive(Debug, Clone)]
pub struct MllamaVisionModel {
    patch_weight: Tensor,
    class_embedding: Tensor,
    gated_positional_embedding: PositionEmbedding,
    pre_tile_positional_embedding: TileEmbedding,
    post_tile_positional_embedding: TileEmbedding,
    layernorm_pre: LayerNorm,
    layernorm_post: LayerNorm,
    transformer: Vec<VisionLayer>,
    global_transformer: Vec<VisionLayer>,
    cfg: MllamaVisionConfig,
    /// Activation checkpointing of the local and global encoder layers.
    recompute: Option<Recompute>,
}

/// `nn.LayerNorm`'s default eps: `layernorm_pre`/`layernorm_post` do not take `norm_eps`.
const TORCH_LAYER_NORM_EPS: f64 = 1e-5;

impl MllamaVisionModel {
    /// `w` points at `model.vision_model`.
    pub fn new(w: &Weights, cfg: &MllamaVisionConfig) -> Result<Self> {
        let (h, p) = (cfg.hidden_size, cfg.patch_size);
        let layers = |prefix: &str, n: usize, gated: bool| {
            (0..n)
                .map(|i| VisionLayer::new(&w.pp(format!("{prefix}.layers.{i}")), cfg, gated))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            patch_weight: w
                .pp("patch_embedding")
                .get("weight", &[h, cfg.num_channels, p, p])?,
            class_embedding: w.get("class_embedding", &[h])?,
            gated_positional_embedding: PositionEmbedding::new(
                &w.pp("gated_positional_embedding"),
                cfg,
            )?,
            pre_tile_positional_embedding: TileEmbedding::new(
                &w.pp("pre_tile_positional_embedding"),
                cfg,
            )?,
            post_tile_positional_embedding: TileEmbedding::new(
                &w.pp("post_tile_positional_embedding"),
                cfg,
            )?,
            layernorm_pre: LayerNorm::new(&w.pp("layernorm_pre"), h, TORCH_LAYER_NORM_EPS)?,
            layernorm_post: LayerNorm::new(&w.pp("layernorm_post"), h, TORCH_LAYER_NORM_EPS)?,
            transformer: layers("transformer", cfg.num_hidden_layers, false)?,
            global_transformer: layers("global_transformer", cfg.num_global_layers, true)?,
            cfg: cfg.clone(),
            recompute: None,
        })
    }

    /// Recompute each encoder layer in the backward pass instead of keeping its activations.
    pub fn set_recompute(&mut self, recompute: Option<Recompute>) {
        self.recompute = recompute;
    }

    fn run_layer(
        &self,
        layer: &VisionLayer,
        x: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match &self.recompute {
            Some(rc) => {
                let (l, m) = (layer.clone(), mask.clone());
                rc.layer(x, None, Arc::new(move |x, _| l.forward(x, &m)))
            }
            None => layer.forward(x, mask),
        }
    }

    /// `pixels: [n, tiles, 3, H, W]`, `ids: [n]` (u32 aspect-ratio ids), `tile_mask: [n, tiles]`
    /// (1 = real tile) → `[n, tiles, num_patches, vision_output_dim]`.
    pub fn forward(
        &self,
        pixels: &Tensor,
        ids: &Tensor,
        tile_mask: &[Vec<bool>],
    ) -> candle_core::Result<Tensor> {
        let (n, tiles, c, hh, ww) = pixels.dims5()?;
        let h = self.cfg.hidden_size;
        let dtype = self.patch_weight.dtype();
        // candle's CPU conv has no bf16 kernel: convolve in f32 there.
        let compute = if dtype == DType::BF16 && pixels.device().is_cpu() {
            DType::F32
        } else {
            dtype
        };
        let patches = pixels
            .reshape((n * tiles, c, hh, ww))?
            .to_dtype(compute)?
            .conv2d(
                &self.patch_weight.to_dtype(compute)?,
                0,
                self.cfg.patch_size,
                1,
                1,
            )?
            .to_dtype(dtype)?;
        let x = patches.flatten_from(2)?.transpose(1, 2)?; // [n*tiles, P, h]
        let p = x.dim(1)?;
        let x = self
            .pre_tile_positional_embedding
            .forward(&x.reshape((n, tiles, p, h))?, ids)?;
        let cls = self
            .class_embedding
            .to_dtype(x.dtype())?
            .reshape((1, 1, h))?
            .broadcast_as((n * tiles, 1, h))?;
        let x = Tensor::cat(&[&cls, &x.reshape((n * tiles, p, h))?], 1)?;
        let np = p + 1;
        let x = self
            .gated_positional_embedding
            .forward(&x.reshape((n, tiles, np, h))?, ids)?;
        let x = self.layernorm_pre.forward(&x)?;
        let pad = (8 - np % 8) % 8;
        let len = np + pad;
        let x = if pad > 0 {
            x.pad_with_zeros(2, 0, pad)?
        } else {
            x
        };
        let mask = padding_bias(tile_mask, tiles, np, len, pixels.device())?;
        let mut x = x.reshape((n, tiles * len, h))?;
        let mut kept = Vec::with_capacity(self.cfg.intermediate_layers_indices.len());
        for (i, layer) in self.transformer.iter().enumerate() {
            x = self.run_layer(layer, &x, &mask)?;
            if self.cfg.intermediate_layers_indices.contains(&i) {
                kept.push((i, x.clone()));
            }
        }
        let x = self.layernorm_post.forward(&x)?;
        let x = self
            .post_tile_positional_embedding
            .forward(&x.reshape((n, tiles, len, h))?, ids)?;
        let mut x = x.reshape((n, tiles * len, h))?;
        for layer in &self.global_transformer {
            x = self.run_layer(layer, &x, &mask)?;
        }
        let x = x.reshape((n, tiles, len, h))?.narrow(2, 0, np)?;
        // In the configured order (HF stacks them on a new last dim, then flattens it).
        let intermediate = self
            .cfg
            .intermediate_layers_indices
            .iter()
            .map(|i| {
                kept.iter()
                    .find(|(j, _)| j == i)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| candle_core::Error::Msg(format!("layer {i} output missing")))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let k = intermediate.len();
        let stacked = Tensor::stack(&intermediate, D::Minus1)? // [n, tiles*len, h, k]
            .reshape((n, tiles, len, h * k))?
            .narrow(2, 0, np)?;
        Tensor::cat(&[&x, &stacked], D::Minus1)?.contiguous()
    }
}

/// HF's `_prepare_aspect_ratio_attention_mask`: a position is padding when its tile is a padding
/// tile or it is one of the zero patches appended to reach `len`; the bias is the dtype minimum
/// where query and key are both padding, else 0 (`m mᵀ · min`). When no patch was appended, HF's
/// `[-0:]` slice marks every position as padding; that is reproduced.
fn padding_bias(
    tile_mask: &[Vec<bool>],
    tiles: usize,
    np: usize,
    len: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = tile_mask.len();
    let total = tiles * len;
    let mut data = Vec::with_capacity(n * total * total);
    for tiles_valid in tile_mask {
        let padded: Vec<bool> = (0..total)
            .map(|pos| {
                let (t, j) = (pos / len, pos % len);
                let real_tile = tiles_valid.get(t).copied().unwrap_or(false);
                !real_tile || len == np || j >= np
            })
            .collect();
        for &qi in &padded {
            for &kj in &padded {
                data.push(if qi && kj { f32::MIN } else { 0.0 });
            }
        }
    }
    Tensor::from_vec(data, (n, 1, total, total), device)
}
