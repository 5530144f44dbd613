//! Fused scaled-dot-product attention with an additive mask and grouped-query heads, forward and
//! backward, on the CPU.
//!
//! The composed attention keeps the scores, the masked scores, the softmax's exponentials, its
//! sums and the probabilities — five `[b, h, s, s_kv]` tensors per layer — until the backward pass,
//! plus `repeat_kv`'s copies of K and V. This op keeps nothing but its inputs: the backward
//! recomputes each head's probabilities (one extra `q kᵀ` per head, a few percent of a layer's
//! work) as flash attention does. Heads sharing a KV head (GQA) read it in place.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul_into, View};
use super::host::{tensor_from, with_host, Real};

/// `softmax(q kᵀ · scale + mask) v` for `q: [b, h, s, d]`, `k, v: [b, h_kv, s_kv, d]`
/// (`h % h_kv == 0`), mask additive and broadcastable to `[b, h, s, s_kv]` (f32 values, e.g.
/// f32::MIN for blocked keys: a row with every key blocked attends uniformly, as in HF).
pub struct AttentionOp {
    pub scale: f64,
    pub mask: Option<Tensor>,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    h_kv: usize,
    s: usize,
    s_kv: usize,
    d: usize,
}

/// How the mask's `[mb, mh, s, s_kv]` broadcasts over `[b, h]`.
#[derive(Clone, Copy)]
struct MaskDims {
    per_batch: bool,
    per_head: bool,
    heads: usize,
}

impl AttentionOp {
    fn dims(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        let (&[b, h, s, d], &[kb, h_kv, s_kv, kd]) = (q, k) else {
            candle_core::bail!("attention: q {q:?} and k {k:?} must be [b, heads, seq, head_dim]")
        };
        if kb != b || kd != d || v != k || h_kv == 0 || h % h_kv != 0 {
            candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?} do not fit together");
        }
        Ok(Dims {
            b,
            h,
            h_kv,
            s,
            s_kv,
            d,
        })
    }

    fn mask_dims(&self, dims: Dims) -> candle_core::Result<Option<MaskDims>> {
        let Some(m) = &self.mask else {
            return Ok(None);
        };
        let &[mb, mh, ms, mk] = m.dims() else {
            candle_core::bail!("attention: mask {:?} must have rank 4", m.dims())
        };
        let fits = (mb == 1 || mb == dims.b)
            && (mh == 1 || mh == dims.h)
            && ms == dims.s
            && mk == dims.s_kv;
        if !fits {
            candle_core::bail!(
                "attention: mask {:?} does not broadcast to [{}, {}, {}, {}]",
                m.dims(),
                dims.b,
                dims.h,
                dims.s,
                dims.s_kv
            );
        }
        Ok(Some(MaskDims {
            per_batch: mb == dims.b && dims.b > 1,
            per_head: mh == dims.h && dims.h > 1,
            heads: mh,
        }))
    }

    /// Runs `f` with the mask's values as `T` (an empty slice when there is no mask).
    fn with_mask<T: Real, R>(
        &self,
        f: impl FnOnce(&[T]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match &self.mask {
            Some(m) => with_host(m, f),
            None => f(&[]),
        }
    }
}

/// Probabilities of head (bi, hi) into `p: [s, s_kv]`.
#[allow(clippy::too_many_arguments)]
fn head_probs<T: Real>(
    p: &mut [T],
    q: &[T],
    k: &[T],
    mask: &[T],
    md: Option<MaskDims>,
    dims: Dims,
    bi: usize,
    hi: usize,
    scale: T,
) {
    let Dims { s, s_kv, d, .. } = dims;
    let underflow = T::from_f64(-88.0).unwrap();
    matmul_into(
        p,
        s_kv,
        View::rows(q, s, d),
        View::rows(k, s_kv, d).t(),
        false,
        1,
    );
    let m = md.map(|md| {
        let mb = if md.per_batch { bi } else { 0 };
        let mh = if md.per_head { hi } else { 0 };
        let start = (mb * md.heads + mh) * s * s_kv;
        &mask[start..start + s * s_kv]
    });
    for (i, row) in p.chunks_mut(s_kv).enumerate() {
        match m {
            Some(m) => {
                for (x, &mv) in row.iter_mut().zip(&m[i * s_kv..(i + 1) * s_kv]) {
                    *x = *x * scale + mv;
                }
            }
            None => row.iter_mut().for_each(|x| *x = *x * scale),
        }
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for x in row.iter_mut() {
            // Masked keys sit at f32::MIN: their exp underflows to 0, which libm reaches only
            // through its slow error-reporting path; exp(-88) is already below f32's normal range.
            let z = *x - max;
            *x = if z < underflow { T::zero() } else { z.exp() };
            sum = sum + *x;
        }
        let inv = sum.recip();
        row.iter_mut().for_each(|x| *x = *x * inv);
    }
}

fn attn_fwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &[T],
    md: Option<MaskDims>,
    dims: Dims,
    scale: f64,
) -> Vec<T> {
    let Dims {
        h,
        h_kv,
        s,
        s_kv,
        d,
        ..
    } = dims;
    let scale = T::from_f64(scale).unwrap();
    let rep = h / h_kv;
    let mut out = vec![T::zero(); q.len()];
    out.par_chunks_mut(s * d).enumerate().for_each_init(
        || vec![T::zero(); s * s_kv],
        |p, (bh, o)| {
            let (bi, hi) = (bh / h, bh % h);
            let kv = (bi * h_kv + hi / rep) * s_kv * d;
            let qh = &q[bh * s * d..(bh + 1) * s * d];
            head_probs(p, qh, &k[kv..kv + s_kv * d], mask, md, dims, bi, hi, scale);
            matmul_into(
                o,
                d,
                View::rows(p, s, s_kv),
                View::rows(&v[kv..kv + s_kv * d], s_kv, d),
                false,
                1,
            );
        },
    );
    out
}

/// `(dq, dk, dv)` for upstream `g: [b, h, s, d]`.
#[allow(clippy::too_many_arguments)]
fn attn_bwd<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    g: &[T],
    mask: &[T],
    md: Option<MaskDims>,
    dims: Dims,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        h,
        h_kv,
        s,
        s_kv,
        d,
        ..
    } = dims;
    let scale_t = T::from_f64(scale).unwrap();
    let rep = h / h_kv;
    let mut dq = vec![T::zero(); q.len()];
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    dq.par_chunks_mut(rep * s * d)
        .zip(dk.par_chunks_mut(s_kv * d).zip(dv.par_chunks_mut(s_kv * d)))
        .enumerate()
        .for_each_init(
            || (vec![T::zero(); s * s_kv], vec![T::zero(); s * s_kv]),
            |(p, dp), (bg, (dq_g, (dk_g, dv_g)))| {
                let bi = bg / h_kv;
                let kv = bg * s_kv * d;
                let (kh, vh) = (&k[kv..kv + s_kv * d], &v[kv..kv + s_kv * d]);
                for r in 0..rep {
                    let hi = (bg % h_kv) * rep + r;
                    let bh = bi * h + hi;
                    let qh = &q[bh * s * d..(bh + 1) * s * d];
                    let gh = &g[bh * s * d..(bh + 1) * s * d];
                    head_probs(p, qh, kh, mask, md, dims, bi, hi, scale_t);
                    // dV += Pᵀ dO
                    matmul_into(
                        dv_g,
                        d,
                        View::rows(p, s, s_kv).t(),
                        View::rows(gh, s, d),
                        r > 0,
                        1,
                    );
                    // dP = dO Vᵀ; dS = P ∘ (dP − rowsum(dP ∘ P)) · scale
                    matmul_into(
                        dp,
                        s_kv,
                        View::rows(gh, s, d),
                        View::rows(vh, s_kv, d).t(),
                        false,
                        1,
                    );
                    for (prow, dprow) in p.chunks(s_kv).zip(dp.chunks_mut(s_kv)) {
                        let dot = prow
                            .iter()
                            .zip(dprow.iter())
                            .map(|(&a, &b)| a * b)
                            .sum::<T>();
                        for (x, &pv) in dprow.iter_mut().zip(prow) {
                            *x = pv * (*x - dot) * scale_t;
                        }
                    }
                    // dQ = dS K; dK += dSᵀ Q
                    matmul_into(
                        &mut dq_g[r * s * d..(r + 1) * s * d],
                        d,
                        View::rows(dp, s, s_kv),
                        View::rows(kh, s_kv, d),
                        false,
                        1,
                    );
                    matmul_into(
                        dk_g,
                        d,
                        View::rows(dp, s, s_kv).t(),
                        View::rows(qh, s, d),
                        r > 0,
                        1,
                    );
                }
            },
        );
    (dq, dk, dv)
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Self::dims(ql.dims(), kl.dims(), vl.dims())?;
        let md = self.mask_dims(dims)?;
        let dtype = qs.dtype();
        let out = if dtype == DType::F64 {
            let (q, k, v) = (
                f64::slice(qs, ql)?,
                f64::slice(ks, kl)?,
                f64::slice(vs, vl)?,
            );
            let y = self.with_mask(|m| Ok(attn_fwd(&q, &k, &v, m, md, dims, self.scale)))?;
            f64::into_storage(y, dtype)?
        } else {
            let (q, k, v) = (
                f32::slice(qs, ql)?,
                f32::slice(ks, kl)?,
                f32::slice(vs, vl)?,
            );
            let y = self.with_mask(|m| Ok(attn_fwd(&q, &k, &v, m, md, dims, self.scale)))?;
            f32::into_storage(y, dtype)?
        };
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Self::dims(q.dims(), k.dims(), v.dims())?;
        let md = self.mask_dims(dims)?;
        macro_rules! run {
            ($t:ty) => {{
                let (dq, dk, dv) = with_host::<$t, _>(q, |qv| {
                    with_host(k, |kv| {
                        with_host(v, |vv| {
                            with_host(g, |gv| {
                                self.with_mask(|m| {
                                    Ok(attn_bwd(qv, kv, vv, gv, m, md, dims, self.scale))
                                })
                            })
                        })
                    })
                })?;
                (
                    tensor_from(dq, q.dtype(), q.dims())?,
                    tensor_from(dk, k.dtype(), k.dims())?,
                    tensor_from(dv, v.dtype(), v.dims())?,
                )
            }};
        }
        let (dq, dk, dv) = if q.dtype() == DType::F64 {
            run!(f64)
        } else {
            run!(f32)
        };
        Ok((
            q.track_op().then_some(dq),
            k.track_op().then_some(dk),
            v.track_op().then_some(dv),
        ))
    }
}
