//! Differentiable building blocks. Every op here has a backward pass in candle 0.11: on the CPU the
//! norms, attention, SwiGLU, RoPE and frozen-weight products run as the fused kernels of
//! [`crate::model::kernels`] (hand-written backward passes, checked against the composed ops); on
//! other devices they are composed from elementary ops, avoiding the fused candle kernels that
//! silently cut gradients (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rotary_emb::*`; see
//! ../shared/design/CANDLE.md). Norms compute in f32 like HF does.

use candle_core::{DType, Module, Tensor, D};

use crate::model::kernels::{
    self, AttentionOp, FrozenLinearOp, LayerNormOp, RmsNormOp, RopeOp, SiluMulOp,
};

use crate::error::Result;
use crate::model::lora::LoraAdapter;
use crate::model::precomputed::with_backward;
use crate::model::weights::Weights;

/// `y = x W^T + b (+ LoRA)`, weight `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Loads `weight`/`bias` under `w`; if the store has a LoRA factory targeting this module
    /// (named by `w`'s path, the HF module name), attaches an adapter.
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        let lora = match w.store().lora() {
            Some(f) => f.adapter_for(w.path(), in_dim, out_dim, weight.device())?,
            None => None,
        };
        Ok(Self { weight, bias, lora })
    }

    /// A plain linear layer from tensors (no LoRA).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// `x W^T` where W does not need a gradient but x does: the product is computed on a detached
    /// x and re-attached by an op whose hand-written backward yields only `dx = g W`
    /// ([`frozen_product`]). Plain matmul backward would also materialise a weight-sized
    /// gradient for every frozen weight (../shared/design/CANDLE.md, "Memory: frozen weights").
    ///
    /// On the CPU a frozen weight goes through [`FrozenLinearOp`] instead: the same backward, no
    /// copy in the forward, and a bf16 weight widened block by block inside the product.
    fn base_product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.weight.track_op() && kernels::fused_for(&[x, &self.weight]) {
            let x = x.contiguous()?;
            return if x.track_op() {
                x.apply_op1(FrozenLinearOp {
                    weight: self.weight.clone(),
                })
            } else {
                x.apply_op1_no_bwd(&FrozenLinearOp {
                    weight: self.weight.clone(),
                })
            };
        }
        let w_t = self.weight.t()?;
        if self.weight.is_variable() || !x.track_op() {
            return matmul(x, &w_t);
        }
        frozen_product(x, &self.weight)
    }
}

/// `x Wᵀ` for a frozen `W` in elementary ops: the product runs outside the graph and one op
/// hands it back whose backward returns only the input's gradient — no gradient is made for the
/// frozen weight, and the graph keeps the product once.
pub(crate) fn frozen_product(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let y0 = matmul(&x.detach(), &weight.t()?)?;
    let weight = weight.clone();
    with_backward(x, &y0, "frozen-weight-linear", move |_, grad| {
        Ok(Some(matmul(grad, &weight.to_dtype(grad.dtype())?)?))
    })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Mixed dtypes happen when some weights are trainable (f32) and the base is bf16.
        let x = if x.dtype() != self.weight.dtype() {
            x.to_dtype(self.weight.dtype())?
        } else {
            x.clone()
        };
        // Every leading dimension folds into the rows of one product.
        let flat = match x.dims() {
            [_, _, _, ..] => x.flatten_to(x.rank() - 2)?,
            _ => x.clone(),
        };
        let mut y = self.base_product(&flat)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = &self.lora {
            let delta = lora
                .delta(&flat, y.dtype())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            y = (y + delta)?;
        }
        match x.dims() {
            [lead @ .., _] if lead.len() >= 2 => {
                let mut dims = lead.to_vec();
                dims.push(y.dim(1)?);
                y.reshape(dims)
            }
            _ => Ok(y),
        }
    }
}

/// Matmul (with broadcasting) that also works for bf16 on CPU, where candle has no bf16 gemm:
/// there the product is computed in f32 and cast back (storage stays bf16).
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dtype() == DType::BF16 && a.device().is_cpu() {
        let out = a
            .to_dtype(DType::F32)?
            .broadcast_matmul(&b.to_dtype(DType::F32)?)?;
        return out.to_dtype(DType::BF16);
    }
    a.broadcast_matmul(b)
}

/// LayerNorm over the last dim, from elementary ops (candle's fused one has no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// From tensors (weight and bias `[dim]`).
    pub fn from_weights(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[dim])?,
            bias: w.get("bias", &[dim])?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if kernels::fused_for(&[x, &self.weight, &self.bias]) {
            return x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                LayerNormOp { eps: self.eps },
            );
        }
        self.forward_composed(x)
    }
}

impl LayerNorm {
    /// The elementary-op version (other devices; the reference the fused kernel is checked against).
    pub fn forward_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = upcast(x)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = normed
            .broadcast_mul(&upcast(&self.weight)?)?
            .broadcast_add(&upcast(&self.bias)?)?;
        y.to_dtype(dtype)
    }
}

/// Llama RMSNorm: normalise in f32, cast back, then scale (the order HF uses).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// From a weight tensor `[dim]`.
    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get("weight", &[dim])?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if kernels::fused_for(&[x, &self.weight]) {
            return x
                .contiguous()?
                .apply_op2(&self.weight.contiguous()?, RmsNormOp { eps: self.eps });
        }
        self.forward_composed(x)
    }
}

impl RmsNorm {
    /// The elementary-op version (other devices; the reference the fused kernel is checked against).
    pub fn forward_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = upcast(x)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

fn upcast(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F64 {
        Ok(x.clone())
    } else {
        x.to_dtype(DType::F32)
    }
}

/// Token embedding table; `index_select` has a backward (scatter-add into the table).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: Tensor,
    /// Rows `start..start + n` that train apart from the (frozen) table: `(start, [n, dim])`.
    trained_rows: Option<(usize, Tensor)>,
}

impl Embedding {
    pub fn new(w: &Weights, vocab: usize, dim: usize) -> Result<Self> {
        let (weight, rows) = w.store().get_with_rows(&w.name("weight"), &[vocab, dim])?;
        Ok(Self {
            weight,
            trained_rows: rows.map(|(start, var)| (start, var.as_tensor().clone())),
        })
    }

    /// `ids` of any shape → `[..., dim]`. Ids in the trained rows read them (the gradient
    /// reaches only those rows); the others read the table.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let mut rows = self.weight.index_select(&flat, 0)?;
        if let Some((start, trained)) = &self.trained_rows {
            let n = trained.dim(0)? as u32;
            let start = *start as u32;
            let ids_host = flat.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let inside: Vec<bool> = ids_host
                .iter()
                .map(|&i| i >= start && i < start + n)
                .collect();
            if inside.iter().any(|&b| b) {
                let local: Vec<u32> = ids_host
                    .iter()
                    .zip(&inside)
                    .map(|(&i, &b)| if b { i - start } else { 0 })
                    .collect();
                let local = Tensor::from_vec(local, flat.dims(), flat.device())?;
                let picked = trained.index_select(&local, 0)?.to_dtype(rows.dtype())?;
                let m: Vec<f32> = inside.iter().map(|&b| f32::from(u8::from(b))).collect();
                let m = Tensor::from_vec(m, (inside.len(), 1), flat.device())?
                    .to_dtype(rows.dtype())?;
                let keep = (m.ones_like()? - &m)?;
                rows = (rows.broadcast_mul(&keep)? + picked.broadcast_mul(&m)?)?;
            }
        }
        dims.push(self.weight.dim(1)?);
        rows.reshape(dims)
    }
}

/// CLIP's activation: `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}

/// Softmax over the last dim with a backward pass, computed in f32.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax(&upcast(x)?, D::Minus1)?.to_dtype(dtype)
}

/// Scaled dot-product attention on `q: [b, h, s, d]`, `k, v: [b, h_kv, s_kv, d]` (grouped-query
/// heads: `h` a multiple of `h_kv`, each KV head serving `h / h_kv` query heads) with an optional
/// additive mask broadcastable to `[b, h, s_q, s_kv]`; softmax in f32 as HF's eager path does.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let mut operands = vec![q, k, v];
    operands.extend(mask);
    if kernels::fused_for(&operands) {
        let op = AttentionOp {
            scale,
            mask: mask.map(|m| m.to_dtype(DType::F32)).transpose()?,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    attention_composed(q, k, v, mask, scale)
}

/// [`attention`] from elementary ops (other devices, and the fused kernel's reference).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    let k = repeat_kv(k, n_rep)?.contiguous()?;
    let v = repeat_kv(v, n_rep)?.contiguous()?;
    let scores = (matmul(q, &k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => {
            let s = upcast(&scores)?;
            add_constant(&s, &m.to_dtype(s.dtype())?)?
        }
        None => scores,
    };
    let probs = softmax_last(&scores)?.to_dtype(v.dtype())?;
    matmul(&probs, &v)
}

/// `x + c`, `c` broadcast to `x`'s shape and taking no gradient (a mask, an attention bias).
/// candle's backward pass would also make `c`'s gradient, summed to its shape, and hold it to
/// the pass's end: one `[b, 1, s, s_kv]` f32 tensor per layer for nothing.
pub fn add_constant(x: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
    let full = x.shape().broadcast_shape_binary_op(c.shape(), "add")? == *x.shape();
    if !x.track_op() || !full {
        // Nothing to keep out of the graph, or `x` itself is broadcast (its gradient is summed).
        return x.broadcast_add(c);
    }
    let y = x.detach().broadcast_add(c)?;
    with_backward(x, &y, "constant-addition", |_, grad| Ok(Some(grad.clone())))
}

/// SwiGLU's `silu(gate) * up`, fused on the CPU.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if kernels::fused_for(&[gate, up]) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMulOp);
    }
    gate.silu()? * up
}

/// `[b, kv_heads, s, d]` → `[b, kv_heads * n_rep, s, d]` (GQA), by concatenation so it has a backward.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4()?;
    Tensor::cat(&vec![x; n_rep], 2)?.reshape((b, h * n_rep, s, d))
}

/// Precomputed rotary tables (non-interleaved halves, HF `rotate_half` convention).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    /// `[max_pos, head_dim]`: the half-size frequency table repeated twice.
    cos: Tensor,
    sin: Tensor,
}

/// cos/sin tables for positions `0..n` (computed in f32 like HF: its inv_freq and positions are f32).
fn rope_tables(
    inv_freq: &[f64],
    n: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(n * half * 2);
    let mut sin = Vec::with_capacity(n * half * 2);
    for p in 0..n {
        let row: Vec<f32> = inv_freq.iter().map(|f| (p as f32) * (*f as f32)).collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos()));
            sin.extend(row.iter().map(|a| a.sin()));
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half * 2), device)?,
        Tensor::from_vec(sin, (n, half * 2), device)?,
    ))
}

impl Rope {
    /// `inv_freq` holds head_dim/2 inverse frequencies (already adjusted for the scaling rule);
    /// tables are precomputed for `max_pos` positions and extended on demand past them, as HF
    /// computes rotary embeddings for any position.
    pub fn new(
        inv_freq: &[f64],
        max_pos: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let (cos, sin) = rope_tables(inv_freq, max_pos, device)?;
        Ok(Self {
            inv_freq: inv_freq.to_vec(),
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Apply to `x: [b, h, s, d]` at `positions: [b, s]` (u32).
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _h, s, d) = x.dims4()?;
        let flat = positions.flatten_all()?;
        let needed = flat.max(0)?.to_scalar::<u32>()? as usize + 1;
        let extended;
        let (cos_table, sin_table) = if needed > self.max_positions() {
            extended = rope_tables(&self.inv_freq, needed, x.device())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            (&extended.0, &extended.1)
        } else {
            (&self.cos, &self.sin)
        };
        let cos = cos_table.index_select(&flat, 0)?.reshape((b, 1, s, d))?;
        let sin = sin_table.index_select(&flat, 0)?.reshape((b, 1, s, d))?;
        if kernels::fused_for(&[x]) {
            let op = RopeOp {
                cos: cos.reshape((b, s, d))?,
                sin: sin.reshape((b, s, d))?,
            };
            return x.contiguous()?.apply_op1(op);
        }
        rope_composed(x, &cos, &sin)
    }
}

/// `x cos + rotate_half(x) sin` from elementary ops, tables `[b, 1, s, d]` (cast to x's dtype).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(3)?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let x1 = x.narrow(3, 0, d / 2)?;
    let x2 = x.narrow(3, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Replace rows of `base: [n, h]` at `positions` (sorted or not) by the rows of `rows: [m, h]`,
/// m = positions.len(). Built from `cat` + `index_select`, so gradients flow to both inputs: this is
/// how image features (and later proxy vectors) enter the token stream.
pub fn scatter_rows(
    base: &Tensor,
    rows: &Tensor,
    positions: &[usize],
) -> candle_core::Result<Tensor> {
    let n = base.dim(0)?;
    let m = rows.dim(0)?;
    if positions.len() != m {
        candle_core::bail!("scatter_rows: {} positions for {m} rows", positions.len());
    }
    let mut index: Vec<u32> = (0..n as u32).collect();
    for (k, &p) in positions.iter().enumerate() {
        if p >= n {
            candle_core::bail!("scatter_rows: position {p} out of range {n}");
        }
        index[p] = (n + k) as u32;
    }
    let index = Tensor::from_vec(index, n, base.device())?;
    let rows = rows.to_dtype(base.dtype())?;
    Tensor::cat(&[base, &rows], 0)?.index_select(&index, 0)
}
