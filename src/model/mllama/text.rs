//! The text side of Llama-3.2-Vision (HF `MllamaTextModel` + `lm_head`): Llama 3.1 decoder
//! layers with gated cross-attention layers at `cross_attention_layers`.
//!
//! A cross-attention layer attends from the text to the projected image features (no RoPE; RMS
//! norms on queries and keys), and scales its attention and MLP branches by `tanh` gates. HF's
//! mask semantics are kept: a text row that may see no image token (text before the image)
//! gets a zero bias — so it attends uniformly — and its MLP branch is zeroed
//! (`full_text_row_masked_out_mask`); the attention branch is not.

use candle_core::{DType, Device, Module, Tensor};

use super::config::MllamaConfig;
use std::sync::Arc;

use crate::error::Result;
use crate::model::cache::{KvCache, LayerCache};
use crate::model::config::TextConfig;
use crate::model::layers::{attention, Embedding, Linear, RmsNorm, Rope};
use crate::model::llama::{inv_freq, DecoderLayer, Mlp};
use crate::model::recompute::Recompute;
use crate::model::weights::Weights;
use crate::model::LogitRows;

/// What the cross-attention layers need for one forward pass.
#[derive(Debug, Clone)]
pub struct CrossInputs {
    /// Projected image features `[b, image_tokens, hidden]`; `None` when the keys/values are
    /// already cached (generation steps after the prefill).
    pub states: Option<Tensor>,
    /// Additive bias `[b, 1, s, image_tokens]`.
    pub bias: Tensor,
    /// `[b, s, 1]`: 0 for text rows that may see no image (their MLP branch is dropped).
    pub row_mask: Tensor,
}

#[derive(Debug, Clone)]
struct CrossAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl CrossAttention {
    fn new(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: Linear::new(&w.pp("q_proj"), h, nh * d, false)?,
            k_proj: Linear::new(&w.pp("k_proj"), h, kv * d, false)?,
            v_proj: Linear::new(&w.pp("v_proj"), h, kv * d, false)?,
            o_proj: Linear::new(&w.pp("o_proj"), nh * d, h, false)?,
            q_norm: RmsNorm::new(&w.pp("q_norm"), d, cfg.rms_norm_eps)?,
            k_norm: RmsNorm::new(&w.pp("k_norm"), d, cfg.rms_norm_eps)?,
            heads: nh,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// Keys (normed) and values `[b, kv_heads, n, d]` of the image features.
    fn image_kv(&self, states: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, n, _) = states.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.kv_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = self.k_norm.forward(&split(self.k_proj.forward(states)?)?)?;
        let v = split(self.v_proj.forward(states)?)?;
        Ok((k, v))
    }

    fn forward(
        &self,
        x: &Tensor,
        cross: &CrossInputs,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q_norm.forward(&q)?;
        let (k, v) = match (cache, &cross.states) {
            (Some(c), states) => c.get_or_compute(|| match states {
                Some(st) => self.image_kv(st),
                None => candle_core::bail!("cross-attention keys are neither given nor cached"),
            })?,
            (None, Some(st)) => self.image_kv(st)?,
            (None, None) => candle_core::bail!("cross-attention needs the image features"),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = attention(&q, &k, &v, Some(&cross.bias), scale)?;
        self.o_proj
            .forward(&out.transpose(1, 2)?.reshape((b, s, ()))?)
    }
}

/// `MllamaCrossAttentionDecoderLayer`.
#[derive(Debug, Clone)]
struct CrossLayer {
    input_layernorm: RmsNorm,
    cross_attn: CrossAttention,
    attn_gate: Tensor,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    mlp_gate: Tensor,
}

impl CrossLayer {
    fn new(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::new(&w.pp("input_layernorm"), h, eps)?,
            cross_attn: CrossAttention::new(&w.pp("cross_attn"), cfg)?,
            attn_gate: w.get("cross_attn_attn_gate", &[1])?,
            post_attention_layernorm: RmsNorm::new(&w.pp("post_attention_layernorm"), h, eps)?,
            mlp: Mlp::new(&w.pp("mlp"), cfg)?,
            mlp_gate: w.get("cross_attn_mlp_gate", &[1])?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cross: &CrossInputs,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        // A layer trained in full holds f32 weights in a bf16 model: its branches compute in
        // f32 and join the residual stream in the stream's dtype.
        let attn = self
            .cross_attn
            .forward(&self.input_layernorm.forward(x)?, cross, cache)?
            .to_dtype(dtype)?;
        let x = (x + attn.broadcast_mul(&self.attn_gate.tanh()?.to_dtype(dtype)?)?)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
            .to_dtype(dtype)?
            .broadcast_mul(&cross.row_mask.to_dtype(dtype)?)?;
        &x + mlp.broadcast_mul(&self.mlp_gate.tanh()?.to_dtype(dtype)?)?
    }
}

#[derive(Debug, Clone)]
enum TextLayer {
    SelfAttention(DecoderLayer),
    CrossAttention(CrossLayer),
}

/// `MllamaTextModel` + `lm_head`. `w_model` points at `model.language_model`, `w_head` at
/// `lm_head`.
#[derive(Debug, Clone)]
pub struct MllamaTextModel {
    embed_tokens: Embedding,
    layers: Vec<TextLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    /// Activation checkpointing of every layer in training forwards (no cache).
    recompute: Option<Recompute>,
}

impl MllamaTextModel {
    pub fn new(w_model: &Weights, w_head: &Weights, cfg: &MllamaConfig) -> Result<Self> {
        let t = &cfg.text;
        let rows = t.vocab_size + MllamaConfig::EXTRA_EMBEDDINGS;
        let embed_tokens = Embedding::new(&w_model.pp("embed_tokens"), rows, t.hidden_size)?;
        let layers = (0..t.num_hidden_layers)
            .map(|i| {
                let w = w_model.pp(format!("layers.{i}"));
                Ok(if cfg.is_cross_layer(i) {
                    TextLayer::CrossAttention(CrossLayer::new(&w, t)?)
                } else {
                    TextLayer::SelfAttention(DecoderLayer::new(&w, t)?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&w_model.pp("norm"), t.hidden_size, t.rms_norm_eps)?;
        let lm_head = if t.tie_word_embeddings && !w_head.contains("weight") {
            // Tied to the first `vocab_size` rows (the head has no row for the extra tokens).
            Linear::from_weights(embed_tokens.weight.narrow(0, 0, t.vocab_size)?, None)
        } else {
            Linear::new(w_head, t.hidden_size, t.vocab_size, false)?
        };
        let device = embed_tokens.weight.device().clone();
        let rope = Rope::new(&inv_freq(t), t.max_position_embeddings, DType::F32, &device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            recompute: None,
        })
    }

    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub fn set_recompute(&mut self, recompute: Option<Recompute>) {
        self.recompute = recompute;
    }

    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    pub fn embedding_dtype(&self) -> DType {
        self.embed_tokens.weight.dtype()
    }

    pub fn num_self_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| matches!(l, TextLayer::SelfAttention(_)))
            .count()
    }

    pub fn num_cross_layers(&self) -> usize {
        self.layers.len() - self.num_self_layers()
    }

    /// Decoder on input embeddings `[b, s, h]` → f32 (f64 for an f64 model) logits at `rows`
    /// (`[b, s, vocab]` for all of them). `positions`:
    /// `[b, s]` u32; `mask`: additive `[b, 1, s, s_kv]`. Without `cross` (and nothing cached),
    /// the cross-attention layers are skipped, as HF does for text-only input.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cross: Option<&CrossInputs>,
        mut cache: Option<&mut KvCache>,
        rows: LogitRows<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let mut x = embeds.clone();
        let (mut self_i, mut cross_i) = (0, 0);
        for layer in &self.layers {
            if let (Some(rc), true) = (&self.recompute, cache.is_none()) {
                x = self.recomputed_layer(rc, layer, &x, positions, mask, cross)?;
                continue;
            }
            match layer {
                TextLayer::SelfAttention(l) => {
                    let c = cache.as_deref_mut().map(|c| c.self_layer(self_i));
                    x = l.forward(&x, &self.rope, positions, mask, c)?;
                    self_i += 1;
                }
                TextLayer::CrossAttention(l) => {
                    if let Some(cross) = cross {
                        let c = cache.as_deref_mut().map(|c| c.cross_layer(cross_i));
                        x = l.forward(&x, cross, c)?;
                    }
                    cross_i += 1;
                }
            }
        }
        if let Some(c) = cache {
            c.advance(b, s);
        }
        let x = self.norm.forward(&rows.select(&x)?)?;
        let logits = self.lm_head.forward(&x)?;
        // f32 logits, as HF upcasts them; a model held in f64 (gradient checks) stays f64.
        match logits.dtype() {
            DType::F64 => Ok(logits),
            _ => logits.to_dtype(DType::F32),
        }
    }
}

impl MllamaTextModel {
    /// One layer of a training forward through [`Recompute`]: the image states of a
    /// cross-attention layer are an input of the checkpoint (the vision side may train), its
    /// bias and row mask constants.
    fn recomputed_layer(
        &self,
        rc: &Recompute,
        layer: &TextLayer,
        x: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cross: Option<&CrossInputs>,
    ) -> candle_core::Result<Tensor> {
        match layer {
            TextLayer::SelfAttention(l) => {
                let (l, rope, pos, m) = (
                    l.clone(),
                    self.rope.clone(),
                    positions.clone(),
                    mask.cloned(),
                );
                rc.layer(
                    x,
                    None,
                    Arc::new(move |x, _| l.forward(x, &rope, &pos, m.as_ref(), None)),
                )
            }
            TextLayer::CrossAttention(l) => {
                let Some(cross) = cross else {
                    return Ok(x.clone());
                };
                let (l, bias, row_mask) = (l.clone(), cross.bias.clone(), cross.row_mask.clone());
                let f = move |x: &Tensor, states: Option<&Tensor>| {
                    let inputs = CrossInputs {
                        states: states.cloned(),
                        bias: bias.clone(),
                        row_mask: row_mask.clone(),
                    };
                    l.forward(x, &inputs, None)
                };
                rc.layer(x, cross.states.as_ref(), Arc::new(f))
            }
        }
    }
}

/// The cross-attention bias and row mask of a batch: row `i` of sample `b` sees the image when
/// `sees[b][i]`, and then every image token of a real tile (`tile_valid[b][t]`, `per_tile`
/// tokens each, tile-major); rows that see nothing get a zero bias and a zero row mask.
pub fn cross_mask(
    sees: &[Vec<bool>],
    tile_valid: &[Vec<bool>],
    per_tile: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let b = sees.len();
    let s = sees.first().map_or(0, Vec::len);
    let tiles = tile_valid.first().map_or(0, Vec::len);
    let keys = tiles * per_tile;
    let mut bias = Vec::with_capacity(b * s * keys);
    let mut rows = Vec::with_capacity(b * s);
    for (sample, valid) in sees.iter().zip(tile_valid) {
        let any_tile = valid.iter().any(|&v| v);
        for &see in sample {
            let row_ok = see && any_tile;
            rows.push(if row_ok { 1f32 } else { 0.0 });
            for &tile_ok in valid.iter().take(tiles) {
                let v = if row_ok && !tile_ok { f32::MIN } else { 0.0 };
                bias.extend(std::iter::repeat_n(v, per_tile));
            }
        }
    }
    Ok((
        Tensor::from_vec(bias, (b, 1, s, keys), device)?,
        Tensor::from_vec(rows, (b, s, 1), device)?,
    ))
}
