//! CLIP ViT vision tower (HF `CLIPVisionModel`), as LLaVA uses it: only the hidden states of the
//! requested layers are needed, so the encoder stops after the deepest one and `post_layernorm`
//! (which only feeds the pooled output) is never loaded.

use candle_core::{DType, Module, Tensor};

use std::sync::Arc;

use crate::error::Result;
use crate::model::config::VisionConfig;
use crate::model::layers::{attention, quick_gelu, LayerNorm, Linear};
use crate::model::recompute::Recompute;
use crate::model::weights::Weights;

/// Patch (conv, no bias) + class token + learned absolute positions.
#[derive(Debug, Clone)]
pub struct ClipEmbeddings {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
}

impl ClipEmbeddings {
    pub fn new(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        Ok(Self {
            patch_weight: w
                .pp("patch_embedding")
                .get("weight", &[h, cfg.num_channels, p, p])?,
            class_embedding: w.get("class_embedding", &[h])?,
            position_embedding: w
                .pp("position_embedding")
                .get("weight", &[cfg.num_patches() + 1, h])?,
            patch_size: p,
        })
    }
}

impl Module for ClipEmbeddings {
    /// `[n, c, H, W]` → `[n, 1 + patches, hidden]`
    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = self.patch_weight.dtype();
        // candle's CPU conv has no bf16 kernel: convolve in f32 there.
        let compute = if dtype == DType::BF16 && pixels.device().is_cpu() {
            DType::F32
        } else {
            dtype
        };
        let patches = pixels.to_dtype(compute)?.conv2d(
            &self.patch_weight.to_dtype(compute)?,
            0,
            self.patch_size,
            1,
            1,
        )?;
        let patches = patches.to_dtype(dtype)?;
        let (n, h, _, _) = patches.dims4()?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [n, patches, h]
        let cls = self
            .class_embedding
            .to_dtype(patches.dtype())?
            .reshape((1, 1, h))?
            .broadcast_as((n, 1, h))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        let pos = self.position_embedding.to_dtype(x.dtype())?.unsqueeze(0)?;
        x.broadcast_add(&pos)
    }
}

#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    pub fn new(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(&w.pp("q_proj"), h, h, true)?,
            k_proj: Linear::new(&w.pp("k_proj"), h, h, true)?,
            v_proj: Linear::new(&w.pp("v_proj"), h, h, true)?,
            out_proj: Linear::new(&w.pp("out_proj"), h, h, true)?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }
}

impl Module for ClipAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
        let out = attention(&q, &k, &v, None, scale)?;
        let out = out.transpose(1, 2)?.reshape((b, s, ()))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
}

impl ClipMlp {
    pub fn new(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(&w.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: Linear::new(&w.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
        })
    }
}

impl Module for ClipMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&quick_gelu(&self.fc1.forward(x)?)?)
    }
}

/// Pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    pub fn new(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(&w.pp("layer_norm1"), h, eps)?,
            self_attn: ClipAttention::new(&w.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::new(&w.pp("layer_norm2"), h, eps)?,
            mlp: ClipMlp::new(&w.pp("mlp"), cfg)?,
        })
    }
}

impl Module for ClipEncoderLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        &x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?
    }
}

/// The vision tower truncated to the layers LLaVA reads.
#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    embeddings: ClipEmbeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    /// Activation checkpointing of the encoder layers.
    recompute: Option<Recompute>,
}

impl ClipVisionTower {
    /// `w` points at `...vision_model`; builds `num_layers` encoder layers (the deepest one read).
    pub fn new(w: &Weights, cfg: &VisionConfig, num_layers: usize) -> Result<Self> {
        let embeddings = ClipEmbeddings::new(&w.pp("embeddings"), cfg)?;
        let pre_layrnorm =
            LayerNorm::new(&w.pp("pre_layrnorm"), cfg.hidden_size, cfg.layer_norm_eps)?;
        let layers = (0..num_layers)
            .map(|i| ClipEncoderLayer::new(&w.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            pre_layrnorm,
            layers,
            recompute: None,
        })
    }

    /// Recompute each encoder layer in the backward pass instead of keeping its activations.
    pub fn set_recompute(&mut self, recompute: Option<Recompute>) {
        self.recompute = recompute;
    }

    /// Hidden states `[0 = after pre_layrnorm, i = after layer i]`, for the requested indices only,
    /// in the order requested.
    pub fn hidden_states(
        &self,
        pixels: &Tensor,
        wanted: &[usize],
    ) -> candle_core::Result<Vec<Tensor>> {
        let mut x = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixels)?)?;
        let mut states: Vec<Option<Tensor>> = vec![None; self.layers.len() + 1];
        let keep = |i: usize, x: &Tensor, states: &mut Vec<Option<Tensor>>| {
            if wanted.contains(&i) {
                states[i] = Some(x.clone());
            }
        };
        keep(0, &x, &mut states);
        for (i, layer) in self.layers.iter().enumerate() {
            x = match &self.recompute {
                Some(rc) => {
                    let l = layer.clone();
                    rc.layer(&x, None, Arc::new(move |x, _| l.forward(x)))?
                }
                None => layer.forward(&x)?,
            };
            keep(i + 1, &x, &mut states);
        }
        wanted
            .iter()
            .map(|&i| {
                states.get(i).cloned().flatten().ok_or_else(|| {
                    candle_core::Error::Msg(format!("vision hidden state {i} was not computed"))
                })
            })
            .collect()
    }
}
