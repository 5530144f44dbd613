//! Fused RMSNorm and LayerNorm over the last dimension, with hand-written backward passes.
//!
//! The composed versions (`layers::{RmsNorm, LayerNorm}`) keep five to seven activation-sized
//! intermediates alive per norm until the backward pass; these keep only their input (held by the
//! graph anyway) and recompute the per-row statistics in the backward. Numerics follow HF: the
//! statistics in f32 (f64 for f64 inputs), Llama's normalised value rounded to the model dtype
//! before the scale.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::host::{rows_per_task, tensor_from, with_host, Real};

fn row_count(layout: &Layout, d: usize, what: &str) -> candle_core::Result<usize> {
    let dims = layout.dims();
    if dims.last() != Some(&d) {
        candle_core::bail!("{what}: input {dims:?} does not end in the weight's size {d}");
    }
    Ok(layout.shape().elem_count() / d.max(1))
}

// --------------------------------------------------------------------------------------------
// RMSNorm

/// `y = round(x / sqrt(mean(x²) + eps)) * w`, `round` to x's dtype (HF `LlamaRMSNorm`).
pub struct RmsNormOp {
    pub eps: f64,
}

fn rms_fwd<T: Real>(x: &[T], w: &[T], d: usize, eps: f64, dtype: DType) -> Vec<T> {
    let eps = T::from_f64(eps).unwrap();
    let inv_d = T::from_usize(d).unwrap().recip();
    let w: Vec<T> = w.iter().map(|&v| v.round_to(dtype)).collect();
    let mut y = vec![T::zero(); x.len()];
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let ms = xr.iter().map(|&v| v * v).sum::<T>() * inv_d;
                let r = (ms + eps).sqrt().recip();
                for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(&w) {
                    *o = ((xv * r).round_to(dtype) * wv).round_to(dtype);
                }
            }
        });
    y
}

/// `(dx, dw)` of RMSNorm for upstream `g`.
fn rms_bwd<T: Real>(x: &[T], w: &[T], g: &[T], d: usize, eps: f64) -> (Vec<T>, Vec<T>) {
    let eps = T::from_f64(eps).unwrap();
    let inv_d = T::from_usize(d).unwrap().recip();
    let mut dx = vec![T::zero(); x.len()];
    let chunk = rows_per_task(d) * d;
    let dw_parts: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .map(|(dxc, (xc, gc))| {
            let mut dw = vec![T::zero(); d];
            for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                let ms = xr.iter().map(|&v| v * v).sum::<T>() * inv_d;
                let r = (ms + eps).sqrt().recip();
                // dn = g w; dx = r (dn - n mean(dn n)), n = x r.
                let mut dot = T::zero();
                for j in 0..d {
                    let n = xr[j] * r;
                    dot = dot + gr[j] * w[j] * n;
                    dw[j] = dw[j] + gr[j] * n;
                }
                let mean = dot * inv_d;
                for j in 0..d {
                    dxr[j] = r * (gr[j] * w[j] - xr[j] * r * mean);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![T::zero(); d];
    for part in dw_parts {
        for (a, b) in dw.iter_mut().zip(part) {
            *a = *a + b;
        }
    }
    (dx, dw)
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = wl.shape().elem_count();
        row_count(xl, d, "rms_norm")?;
        let dtype = xs.dtype();
        let out = if dtype == DType::F64 {
            let y = rms_fwd(
                &f64::slice(xs, xl)?,
                &f64::slice(ws, wl)?,
                d,
                self.eps,
                dtype,
            );
            f64::into_storage(y, dtype)?
        } else {
            let y = rms_fwd(
                &f32::slice(xs, xl)?,
                &f32::slice(ws, wl)?,
                d,
                self.eps,
                dtype,
            );
            f32::into_storage(y, dtype)?
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let (dx, dw) = if x.dtype() == DType::F64 {
            let (dx, dw) = with_host::<f64, _>(x, |x| {
                with_host(w, |w| with_host(g, |g| Ok(rms_bwd(x, w, g, d, self.eps))))
            })?;
            (
                tensor_from(dx, x.dtype(), x.dims())?,
                tensor_from(dw, w.dtype(), w.dims())?,
            )
        } else {
            let (dx, dw) = with_host::<f32, _>(x, |x| {
                with_host(w, |w| with_host(g, |g| Ok(rms_bwd(x, w, g, d, self.eps))))
            })?;
            (
                tensor_from(dx, x.dtype(), x.dims())?,
                tensor_from(dw, w.dtype(), w.dims())?,
            )
        };
        Ok((Some(dx), w.track_op().then_some(dw)))
    }
}

// --------------------------------------------------------------------------------------------
// LayerNorm

/// `y = (x - mean) / sqrt(var + eps) * w + b`, computed in f32 (f64 for f64), output in x's dtype.
pub struct LayerNormOp {
    pub eps: f64,
}

fn row_stats<T: Real>(xr: &[T], inv_d: T, eps: T) -> (T, T) {
    let mean = xr.iter().copied().sum::<T>() * inv_d;
    let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() * inv_d;
    (mean, (var + eps).sqrt().recip())
}

fn ln_fwd<T: Real>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64, dtype: DType) -> Vec<T> {
    let eps = T::from_f64(eps).unwrap();
    let inv_d = T::from_usize(d).unwrap().recip();
    let mut y = vec![T::zero(); x.len()];
    let chunk = rows_per_task(d) * d;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let (mean, rstd) = row_stats(xr, inv_d, eps);
                for j in 0..d {
                    yr[j] = ((xr[j] - mean) * rstd * w[j] + b[j]).round_to(dtype);
                }
            }
        });
    y
}

/// `(dx, dw, db)` of LayerNorm for upstream `g`.
fn ln_bwd<T: Real>(x: &[T], w: &[T], g: &[T], d: usize, eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let eps = T::from_f64(eps).unwrap();
    let inv_d = T::from_usize(d).unwrap().recip();
    let mut dx = vec![T::zero(); x.len()];
    let chunk = rows_per_task(d) * d;
    let parts: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .map(|(dxc, (xc, gc))| {
            let mut dw = vec![T::zero(); d];
            let mut db = vec![T::zero(); d];
            for ((dxr, xr), gr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                let (mean, rstd) = row_stats(xr, inv_d, eps);
                // n = (x - mean) rstd; dn = g w; dx = rstd (dn - mean(dn) - n mean(dn n)).
                let (mut sum_dn, mut sum_dn_n) = (T::zero(), T::zero());
                for j in 0..d {
                    let n = (xr[j] - mean) * rstd;
                    let dn = gr[j] * w[j];
                    sum_dn = sum_dn + dn;
                    sum_dn_n = sum_dn_n + dn * n;
                    dw[j] = dw[j] + gr[j] * n;
                    db[j] = db[j] + gr[j];
                }
                let (m1, m2) = (sum_dn * inv_d, sum_dn_n * inv_d);
                for j in 0..d {
                    let n = (xr[j] - mean) * rstd;
                    dxr[j] = rstd * (gr[j] * w[j] - m1 - n * m2);
                }
            }
            (dw, db)
        })
        .collect();
    let mut dw = vec![T::zero(); d];
    let mut db = vec![T::zero(); d];
    for (pw, pb) in parts {
        for j in 0..d {
            dw[j] = dw[j] + pw[j];
            db[j] = db[j] + pb[j];
        }
    }
    (dx, dw, db)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = wl.shape().elem_count();
        row_count(xl, d, "layer_norm")?;
        if bl.shape().elem_count() != d {
            candle_core::bail!(
                "layer_norm: bias has {} values, weight {d}",
                bl.shape().elem_count()
            );
        }
        let dtype = xs.dtype();
        let out = if dtype == DType::F64 {
            let (x, w, b) = (
                f64::slice(xs, xl)?,
                f64::slice(ws, wl)?,
                f64::slice(bs, bl)?,
            );
            f64::into_storage(ln_fwd(&x, &w, &b, d, self.eps, dtype), dtype)?
        } else {
            let (x, w, b) = (
                f32::slice(xs, xl)?,
                f32::slice(ws, wl)?,
                f32::slice(bs, bl)?,
            );
            f32::into_storage(ln_fwd(&x, &w, &b, d, self.eps, dtype), dtype)?
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dw, db) = with_host::<$t, _>(x, |x| {
                    with_host(w, |w| with_host(g, |g| Ok(ln_bwd(x, w, g, d, self.eps))))
                })?;
                (
                    tensor_from(dx, x.dtype(), x.dims())?,
                    tensor_from(dw, w.dtype(), w.dims())?,
                    tensor_from(db, b.dtype(), b.dims())?,
                )
            }};
        }
        let (dx, dw, db) = if x.dtype() == DType::F64 {
            run!(f64)
        } else {
            run!(f32)
        };
        Ok((
            Some(dx),
            w.track_op().then_some(dw),
            b.track_op().then_some(db),
        ))
    }
}
