//! Llama / Mistral decoder (HF `LlamaModel` + `lm_head`), trainable: full-sequence forward with
//! padding masks for training and scoring, and a KV-cached path for generation.

use candle_core::{DType, Device, Module, Tensor};

use std::sync::Arc;

use crate::error::Result;
use crate::model::cache::{KvCache, LayerCache};
use crate::model::config::{RopeKind, TextConfig};
use crate::model::layers::{attention, silu_mul, Embedding, Linear, RmsNorm, Rope};
use crate::model::recompute::Recompute;
use crate::model::weights::Weights;
use crate::model::LogitRows;

/// Self-attention with RoPE and grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::new(&w.pp("q_proj"), h, cfg.num_attention_heads * d, bias)?,
            k_proj: Linear::new(&w.pp("k_proj"), h, cfg.num_key_value_heads * d, bias)?,
            v_proj: Linear::new(&w.pp("v_proj"), h, cfg.num_key_value_heads * d, bias)?,
            o_proj: Linear::new(&w.pp("o_proj"), cfg.num_attention_heads * d, h, bias)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rope.apply(&split(self.q_proj.forward(x)?, self.heads)?, positions)?;
        let mut k = rope.apply(&split(self.k_proj.forward(x)?, self.kv_heads)?, positions)?;
        let mut v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        if let Some(cache) = cache {
            (k, v) = cache.append(k, v)?;
        }
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = attention(&q, &k, &v, mask, scale)?;
        let out = out.transpose(1, 2)?.reshape((b, s, ()))?;
        self.o_proj.forward(&out)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn new(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::new(&w.pp("gate_proj"), h, i, bias)?,
            up_proj: Linear::new(&w.pp("up_proj"), h, i, bias)?,
            down_proj: Linear::new(&w.pp("down_proj"), i, h, bias)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let act = silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&act)
    }
}

/// Pre-norm decoder block.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    pub fn new(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::new(&w.pp("input_layernorm"), h, eps)?,
            self_attn: Attention::new(&w.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::new(&w.pp("post_attention_layernorm"), h, eps)?,
            mlp: Mlp::new(&w.pp("mlp"), cfg)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rope,
            positions,
            mask,
            cache,
        )?;
        let x = (x + h)?;
        &x + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
    }
}

/// Decoder stack + LM head. `w_model` points at `model.language_model`, `w_head` at `lm_head`.
#[derive(Debug, Clone)]
pub struct LlamaForCausalLm {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    cfg: TextConfig,
    /// Activation checkpointing of the decoder layers in training forwards (no cache).
    recompute: Option<Recompute>,
}

impl LlamaForCausalLm {
    pub fn new(w_model: &Weights, w_head: &Weights, cfg: &TextConfig) -> Result<Self> {
        let embed_tokens =
            Embedding::new(&w_model.pp("embed_tokens"), cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&w_model.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&w_model.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !w_head.contains("weight") {
            Linear::from_weights(embed_tokens.weight.clone(), None)
        } else {
            Linear::new(w_head, cfg.hidden_size, cfg.vocab_size, false)?
        };
        let device = embed_tokens.weight.device().clone();
        let rope = Rope::new(
            &inv_freq(cfg),
            cfg.max_position_embeddings,
            DType::F32,
            &device,
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            recompute: None,
        })
    }

    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub fn set_recompute(&mut self, recompute: Option<Recompute>) {
        self.recompute = recompute;
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    pub fn embedding_dtype(&self) -> DType {
        self.embed_tokens.weight.dtype()
    }

    /// Run the decoder on input embeddings `[b, s, h]`; returns f32 logits at `rows`
    /// (`[b, s, vocab]` for all of them). `positions`: `[b, s]` u32. `mask`: additive
    /// `[b, 1, s, s_kv]` (see [`attention_mask`]).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        rows: LogitRows<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if let (Some(rc), true) = (&self.recompute, cache.is_none()) {
                let (l, rope, pos, m) = (
                    layer.clone(),
                    self.rope.clone(),
                    positions.clone(),
                    mask.cloned(),
                );
                x = rc.layer(
                    &x,
                    None,
                    Arc::new(move |x, _| l.forward(x, &rope, &pos, m.as_ref(), None)),
                )?;
                continue;
            }
            let layer_cache = cache.as_deref_mut().map(|c| c.self_layer(i));
            x = layer.forward(&x, &self.rope, positions, mask, layer_cache)?;
        }
        if let Some(c) = cache {
            c.advance(b, s);
        }
        let x = self.norm.forward(&rows.select(&x)?)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }
}

/// HF `ROPE_INIT_FUNCTIONS`: default, linear and llama3 inverse frequencies.
pub fn inv_freq(cfg: &TextConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.rope {
        RopeKind::Default => base,
        RopeKind::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Additive attention mask `[b, 1, s_q, offset + s_q]` (0 = attend, f32::MIN = blocked): causal, and
/// blocking key positions whose `key_valid` entry is false. f32::MIN rather than -inf keeps rows of
/// padding queries finite (uniform) instead of NaN, as HF does.
pub fn attention_mask(
    key_valid: &[Vec<bool>],
    s_q: usize,
    offset: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let b = key_valid.len();
    let s_kv = offset + s_q;
    let mut data = Vec::with_capacity(b * s_q * s_kv);
    for row in key_valid {
        if row.len() != s_kv {
            candle_core::bail!(
                "attention mask row has {} entries, expected {s_kv}",
                row.len()
            );
        }
        for i in 0..s_q {
            for (j, &valid) in row.iter().enumerate() {
                data.push(if valid && j <= offset + i {
                    0f32
                } else {
                    f32::MIN
                });
            }
        }
    }
    Tensor::from_vec(data, (b, 1, s_q, s_kv), device)
}

/// Position ids from a padding mask: `cumsum(mask) - 1`, padding positions set to 1 (HF generate's
/// rule). Equals `0..s` for unpadded or right-padded rows.
pub fn position_ids(
    valid: &[Vec<bool>],
    offset: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let b = valid.len();
    let s = valid.first().map_or(0, |r| r.len());
    let mut data = Vec::with_capacity(b * s);
    for row in valid {
        let mut seen = 0u32;
        for &v in row {
            if v {
                data.push(offset as u32 + seen);
                seen += 1;
            } else {
                data.push(1);
            }
        }
    }
    Tensor::from_vec(data, (b, s), device)
}
