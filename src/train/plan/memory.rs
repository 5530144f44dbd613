//! The `--dry-run` memory estimate of a training step on one device (one rank): weights, the
//! trainable tensors with their gradients and AdamW moments, and the activations the backward
//! pass needs — with and without activation checkpointing.
//!
//! Activations are counted per layer from what the layer's ops keep for the backward pass: candle
//! keeps every op's inputs, so a layer keeps each intermediate tensor it makes. The fused CPU
//! kernels ([`crate::model::kernels`]) keep only their inputs; the composed ops other devices
//! run keep every step (the attention's scores, masked scores, exponentials and probabilities:
//! four to five `heads × s × s_kv` tensors per layer). The counts below are of the tensors our
//! layers make; `tests/memory_estimate.rs` checks the whole against the peak heap of real CPU
//! steps, both op paths, with and without checkpointing.
//!
//! With checkpointing a layer keeps its input only, and one layer's activations exist at a
//! time again while it is recomputed in the backward pass.

use std::collections::BTreeSet;

use crate::config::InstructionMode;
use crate::data::collate::IGNORE_INDEX;
use crate::error::Result;
use crate::model::activation_profile::{ActivationProfile, LayerKind, LayerStack, StackTokens};
use crate::train::plan::TrainPlan;

/// The largest micro-batch of a run: its samples, padded length and loss tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub samples: usize,
    pub seq_len: usize,
    pub label_tokens: usize,
}

/// Which implementation of the layers' ops runs (what they keep differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpPath {
    /// The fused CPU kernels.
    Fused,
    /// Elementary candle ops (CUDA, or `LVLM_IFT_FUSED=0`).
    Composed,
}

/// Bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub frozen_weights: f64,
    /// The trainable tensors themselves (`model.trainable_dtype`).
    pub trainable: f64,
    pub gradients: f64,
    /// AdamW's two moments.
    pub moments: f64,
    /// What one micro-batch's forward keeps for its backward, and the backward's working set.
    pub activations_full: f64,
    pub activations_checkpointed: f64,
    /// Whether the plan checkpoints (which activation figure its total uses).
    pub checkpointing: bool,
}

impl MemoryEstimate {
    /// Everything but the activations.
    pub fn fixed(&self) -> f64 {
        self.frozen_weights + self.trainable + self.gradients + self.moments
    }

    pub fn total(&self, checkpointing: bool) -> f64 {
        self.fixed()
            + if checkpointing {
                self.activations_checkpointed
            } else {
                self.activations_full
            }
    }
}

const F32: f64 = 4.0;

/// Sample length the estimate assumes when the plan cannot tokenize (no `tokenizer.json`) and
/// `data.max_len` is unset.
pub const ASSUMED_SEQ_LEN: usize = 512;

impl TrainPlan {
    /// The op path this plan's device runs.
    pub fn op_path(&self) -> OpPath {
        if self.cfg.model.device == "cpu" && crate::model::kernels::fused_enabled() {
            OpPath::Fused
        } else {
            OpPath::Composed
        }
    }

    /// The longest micro-batch this plan can make: `train.batch_size` samples of the longest
    /// sample (tokenized when the plan has the tokenizer; else `data.max_len` or the model's
    /// positions) and as many loss tokens as its longest answers give.
    pub fn worst_batch(&self) -> Result<BatchShape> {
        let b = self.cfg.train.batch_size.min(self.pairs.len()).max(1);
        let Some(maker) = &self.batches else {
            // No tokenizer to measure the samples: `data.max_len`, else an assumed length.
            let s = self
                .cfg
                .data
                .max_len
                .unwrap_or(ASSUMED_SEQ_LEN)
                .min(self.layout.max_positions);
            return Ok(BatchShape {
                samples: b,
                seq_len: s,
                label_tokens: b * s / 2,
            });
        };
        let enc = maker.encoder();
        let mut lengths = Vec::with_capacity(self.pairs.len());
        for i in 0..self.pairs.len() {
            let e = enc.encode(&maker.description(i, 0))?;
            let labels = e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
            lengths.push((e.input_ids.len(), labels));
        }
        let seq_len = lengths.iter().map(|l| l.0).max().unwrap_or(1);
        let mut labels: Vec<usize> = lengths.iter().map(|l| l.1).collect();
        labels.sort_unstable_by(|a, b| b.cmp(a));
        Ok(BatchShape {
            samples: b,
            seq_len,
            label_tokens: labels.iter().take(b).sum(),
        })
    }

    /// The estimate for micro-batches of shape `batch`.
    pub fn memory_estimate(&self, batch: BatchShape) -> Result<MemoryEstimate> {
        let profile = self
            .layout
            .family
            .activation_profile(&self.layout, self.cfg.model.max_image_tiles)?;
        let trainable: usize = self.trainable_counts().values().sum();
        let in_full: usize = self
            .trainable_counts()
            .iter()
            .filter(|(role, _)| role.as_str() != "lora" && role.as_str() != super::PROXY_PARAM)
            .map(|(_, n)| n)
            .sum();
        let frozen = self.layout.total_params().saturating_sub(in_full);
        let e = self.cfg.model.dtype.bytes() as f64;
        // Trainable weights and moments in `model.trainable_dtype`; gradients are gathered in
        // f32 either way.
        let t = self.cfg.model.trainable_dtype.bytes() as f64;
        let acts = Activations::new(self, &profile, batch, e);
        Ok(MemoryEstimate {
            frozen_weights: frozen as f64 * e,
            trainable: trainable as f64 * t,
            gradients: trainable as f64 * F32,
            moments: trainable as f64 * 2.0 * t,
            activations_full: acts.full(),
            activations_checkpointed: acts.checkpointed(),
            checkpointing: self.activation_checkpointing(),
        })
    }
}

/// What one stack's layers hold for a micro-batch.
struct StackBytes {
    layers: usize,
    /// What one layer keeps for the backward pass.
    per_layer: f64,
    /// One layer's input (all a checkpointed layer keeps).
    input: f64,
    /// What a layer's backward pass makes beyond its kept activations at its peak.
    backward_extra: f64,
}

/// One micro-batch's activations, stack by stack.
struct Activations {
    /// Each stack that keeps any.
    stacks: Vec<StackBytes>,
    /// Embeddings, masks, projector, head and loss: kept either way.
    outside: f64,
    /// The cross-entropy's working set, in its forward and again in its backward (the
    /// vocabulary-wide tensors at the loss rows): the peak when it exceeds a layer's.
    loss_working_set: f64,
}

impl Activations {
    fn new(plan: &TrainPlan, profile: &ActivationProfile, batch: BatchShape, e: f64) -> Self {
        let path = plan.op_path();
        let trained: BTreeSet<&str> = plan
            .layout
            .params
            .keys()
            .filter(|n| plan.trains_in_full(n))
            .map(String::as_str)
            .chain(plan.lora_modules.keys().map(String::as_str))
            .collect();
        let trains_under = |prefix: &str| trained.iter().any(|n| n.starts_with(prefix));
        let vision_trains = trains_under(&profile.vision_prefix);
        let lora = plan.lora.as_ref().filter(|l| l.trains);
        let b = batch.samples as f64;
        let t = plan.cfg.model.trainable_dtype.bytes() as f64;
        let mut stacks = Vec::new();
        for st in &profile.stacks {
            let layers = st.layer_prefixes.len();
            let in_stack = |name: &str| st.layer_prefixes.iter().any(|p| name.starts_with(p));
            let on_vision = st
                .layer_prefixes
                .first()
                .is_some_and(|p| p.starts_with(&profile.vision_prefix));
            if layers == 0 || (on_vision && !vision_trains) {
                // Nothing needs a gradient through a frozen tower: it keeps nothing.
                continue;
            }
            // Layers trained in full hold their weights in `model.trainable_dtype`, and their
            // products (hence their activations) come out in it.
            let in_full = plan
                .layout
                .params
                .keys()
                .any(|n| in_stack(n) && plan.trains_in_full(n));
            let e = if in_full { t } else { e };
            let (tokens, seq) = match st.tokens {
                StackTokens::Text => (b * batch.seq_len as f64, batch.seq_len as f64),
                StackTokens::PerImage(n) => (b * n as f64, n as f64),
            };
            let mut layer = layer_bytes(st, path, e, tokens, b, seq);
            if in_full || path == OpPath::Composed {
                // A linear is a product and a bias addition (on the CPU the frozen ones fuse
                // both).
                layer += tokens * bias_outputs(st) * e;
            }
            if let Some(l) = lora {
                // Per adapted module: its input in f32 (dropout: the mask and the masked
                // input too), x·Aᵀ, ·Bᵀ, the scaling and the sum with the base product.
                let dropout = if l.spec.dropout > 0.0 { 2.0 } else { 0.0 };
                let per_layer: f64 = plan
                    .lora_modules
                    .iter()
                    .filter(|(m, lm)| lm.runs && in_stack(m))
                    .map(|(_, lm)| {
                        let r = l.spec.r as f64;
                        (lm.in_dim as f64 * (1.0 + dropout) + r + 3.0 * lm.out_dim as f64) * t
                    })
                    .sum::<f64>()
                    / layers as f64;
                layer += tokens * per_layer;
            }
            stacks.push(StackBytes {
                layers,
                per_layer: layer,
                input: tokens * st.hidden as f64 * e,
                backward_extra: backward_extra(st, path, b, seq),
            });
        }
        let text_tokens = b * batch.seq_len as f64;
        let (p_in, p_out, p_pos) = profile.projector;
        let projector = if vision_trains || trains_under("model.multi_modal_projector") {
            b * p_pos as f64 * (p_in + 2 * p_out) as f64 * e
        } else {
            b * p_pos as f64 * p_out as f64 * e
        };
        // Token embeddings: the table's rows; trained rows read apart and blended in (the
        // trained rows' pick, two masked products, their sum); each splice (image features,
        // proxy vectors) a concatenation and a gather.
        let splices = usize::from(profile.image_splice)
            + usize::from(plan.stage.instruction_mode == InstructionMode::Proxy);
        let blended = if plan.trained_row_slices().is_empty() {
            0.0
        } else {
            4.0
        };
        let embeddings =
            (1.0 + blended + 2.0 * splices as f64) * text_tokens * profile.text_hidden as f64 * e;
        let (embed_per_pos, positions) = profile.vision_embedding;
        let vision_embedding = if vision_trains {
            let bias = profile.vision_bias_positions as f64;
            b * (positions * embed_per_pos) as f64 * e + b * bias * bias * F32
        } else {
            0.0
        };
        let causal_mask = text_tokens * batch.seq_len as f64 * F32;
        let cross_bias = text_tokens * profile.cross_bias_tokens as f64 * F32;
        // The final norm and the selected rows, the head's logits and their f32 copy (which
        // alone the cross-entropy keeps).
        let labels = batch.label_tokens as f64;
        let vocab = profile.vocab as f64;
        let wide = e < F32;
        let head = labels
            * (2.0 * profile.text_hidden as f64 * e
                + vocab * e
                + if wide { vocab * F32 } else { 0.0 });
        // Forward: the shifted logits and their exponentials; backward: the probabilities and
        // the scaled gradient (then its cast to the head's dtype).
        let loss_working_set = labels * vocab * (2.0 * F32 + if wide { e } else { 0.0 });
        let outside = embeddings + vision_embedding + causal_mask + cross_bias + projector + head;
        Self {
            stacks,
            outside,
            loss_working_set,
        }
    }

    /// Every layer keeps its activations; the backward adds about one layer's worth of
    /// gradients at a time (or the loss's working set, where larger).
    fn full(&self) -> f64 {
        let kept: f64 = self
            .stacks
            .iter()
            .map(|st| st.layers as f64 * st.per_layer)
            .sum();
        let backward = self.largest(|st| st.per_layer + st.backward_extra);
        kept + self.outside + backward.max(self.loss_working_set)
    }

    /// Each layer keeps its input; one layer's activations exist again during its
    /// recomputation, with its gradients.
    fn checkpointed(&self) -> f64 {
        let inputs: f64 = self
            .stacks
            .iter()
            .map(|st| st.layers as f64 * st.input)
            .sum();
        let backward = self.largest(|st| 2.0 * st.per_layer + st.backward_extra);
        inputs + self.outside + backward.max(self.loss_working_set)
    }

    fn largest(&self, bytes: impl Fn(&StackBytes) -> f64) -> f64 {
        self.stacks.iter().map(bytes).fold(0.0, f64::max)
    }
}

/// The composed attention's backward pass holds about three `[b, heads, s, s_kv]` f32 gradients
/// at once (the probabilities', the exponentials', the masked scores'); the fused kernel works
/// one head at a time.
fn backward_extra(st: &LayerStack, path: OpPath, samples: f64, seq: f64) -> f64 {
    if path == OpPath::Fused {
        return 0.0;
    }
    let keys = match st.kind {
        LayerKind::CrossAttention { image_tokens } => image_tokens as f64,
        _ => seq,
    };
    3.0 * samples * st.heads as f64 * seq * keys * F32
}

/// Per position, the bias additions of one layer's linears (in activation-dtype elements).
fn bias_outputs(st: &LayerStack) -> f64 {
    let (h, i) = (st.hidden as f64, st.intermediate as f64);
    match st.kind {
        LayerKind::Decoder | LayerKind::CrossAttention { .. } => 0.0,
        // q, k, v, out, fc1, fc2.
        LayerKind::ClipEncoder => 5.0 * h + i,
        // fc1, fc2.
        LayerKind::MllamaVision { .. } => h + i,
    }
}

/// Bytes one layer of `st` keeps for a micro-batch of `tokens` positions (`samples` sequences of
/// `seq`), activations of `e` bytes.
fn layer_bytes(st: &LayerStack, path: OpPath, e: f64, tokens: f64, samples: f64, seq: f64) -> f64 {
    let (h, i, kv) = (st.hidden as f64, st.intermediate as f64, st.kv_dim as f64);
    let heads = st.heads as f64;
    let wide = e < F32; // bf16/f16 activations: upcasts make f32 copies
                        // Per position, in activation-dtype elements (fused) — counted from the layers' ops.
    let (mut per_token, keys) = match st.kind {
        // norm, q (+ head-major copy, rotary), k, v, attention out (+ copy), o, residual, norm,
        // gate, up, SwiGLU, down, residual.
        LayerKind::Decoder => (11.0 * h + 5.0 * kv + 3.0 * i, seq),
        // norm, q/k/v (+ copies), attention out (+ copy), out proj, residual, norm, fc1,
        // quick-GELU (three ops), fc2, residual.
        LayerKind::ClipEncoder => (13.0 * h + 4.0 * i, seq),
        // as CLIP, GELU in one op; the global layers' two gate products.
        LayerKind::MllamaVision { gated } => {
            let gates = if gated { 2.0 * h } else { 0.0 };
            (13.0 * h + 2.0 * i + gates, seq)
        }
        // text side as a decoder layer without rotary but with gates and the row mask; the
        // image side's keys and values (with norm and copies) per image token.
        LayerKind::CrossAttention { image_tokens } => {
            let img = image_tokens as f64;
            (14.0 * h + 3.0 * i + 5.0 * kv * img / seq.max(1.0), img)
        }
    };
    let mut f32_per_token = 0.0;
    if path == OpPath::Composed {
        // The norms' squares and quotients in f32 (and their upcast input for narrow dtypes);
        // rotary's negated half, concatenation and products; SiLU apart from its product.
        let norms = if matches!(
            st.kind,
            LayerKind::Decoder | LayerKind::CrossAttention { .. }
        ) {
            2.0
        } else {
            4.0 // LayerNorm: mean-centred input, its square, the quotient, the shift
        };
        per_token += if wide { 2.0 * h } else { 0.0 };
        f32_per_token += 2.0 * norms * h + if wide { 2.0 * h } else { 0.0 };
        if st.kind == LayerKind::Decoder {
            per_token += 4.5 * (h + kv) + i;
        }
    }
    let mut bytes = tokens * (per_token * e + f32_per_token * F32);
    if path == OpPath::Composed {
        // scores and scaled scores in the activation dtype; the masked scores, the softmax's
        // shifted scores, exponentials and probabilities in f32 (plus the f32 upcast and the
        // cast back of the probabilities for narrow dtypes).
        let per_score = 2.0 * e + 4.0 * F32 + if wide { F32 + e } else { 0.0 };
        bytes += samples * heads * seq * keys * per_score;
    }
    bytes
}
