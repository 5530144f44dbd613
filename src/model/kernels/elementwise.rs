//! Fused element-wise ops with hand-written backward passes: SwiGLU's `silu(gate) * up` and the
//! rotary embedding. Each replaces three to six candle ops (and as many saved intermediates) by
//! one pass; the backward reads only the op's inputs. Rounding follows HF's order in the model
//! dtype, so bf16 results equal the composed ops'.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::host::{rows_per_task, tensor_from, with_host, Real};

const CHUNK: usize = 16 * 1024;

fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).exp()).recip()
}

// --------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) * up` (Llama's MLP activation).
pub struct SiluMulOp;

fn silu_mul_fwd<T: Real>(gate: &[T], up: &[T], dtype: DType) -> Vec<T> {
    let mut y = vec![T::zero(); gate.len()];
    y.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(yc, (gc, uc))| {
            for ((o, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                *o = ((g * sigmoid(g)).round_to(dtype) * u).round_to(dtype);
            }
        });
    y
}

/// `(d gate, d up)` for upstream `dy`.
fn silu_mul_bwd<T: Real>(gate: &[T], up: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::zero(); gate.len()];
    let mut du = vec![T::zero(); gate.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            gate.par_chunks(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|((dgc, duc), ((gc, uc), dyc))| {
            for i in 0..gc.len() {
                let (g, u, d) = (gc[i], uc[i], dyc[i]);
                let s = sigmoid(g);
                let silu = g * s;
                duc[i] = d * silu;
                // silu'(g) = s (1 + g (1 - s))
                dgc[i] = d * u * s * (T::one() + g * (T::one() - s));
            }
        });
    (dg, du)
}

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!(
                "silu_mul: gate {:?} and up {:?} differ",
                gl.dims(),
                ul.dims()
            );
        }
        let dtype = gs.dtype();
        let out = if dtype == DType::F64 {
            f64::into_storage(
                silu_mul_fwd(&f64::slice(gs, gl)?, &f64::slice(us, ul)?, dtype),
                dtype,
            )?
        } else {
            f32::into_storage(
                silu_mul_fwd(&f32::slice(gs, gl)?, &f32::slice(us, ul)?, dtype),
                dtype,
            )?
        };
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        macro_rules! run {
            ($t:ty) => {{
                let (dg, du) = with_host::<$t, _>(gate, |g| {
                    with_host(up, |u| with_host(dy, |d| Ok(silu_mul_bwd(g, u, d))))
                })?;
                (
                    tensor_from(dg, gate.dtype(), gate.dims())?,
                    tensor_from(du, up.dtype(), up.dims())?,
                )
            }};
        }
        let (dg, du) = if gate.dtype() == DType::F64 {
            run!(f64)
        } else {
            run!(f32)
        };
        Ok((gate.track_op().then_some(dg), up.track_op().then_some(du)))
    }
}

// --------------------------------------------------------------------------------------------
// Rotary embedding

/// `x cos + rotate_half(x) sin` on `x: [b, h, s, d]` with per-position tables `cos, sin: [b, s, d]`
/// (HF's `rotate_half` convention: the two halves of the head dimension rotate together).
pub struct RopeOp {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// `inverse = false`: forward rotation; `true`: its transpose (the backward).
fn rope_apply<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    (b, h, s, d): (usize, usize, usize, usize),
    dtype: DType,
    inverse: bool,
) -> Vec<T> {
    let half = d / 2;
    let mut y = vec![T::zero(); x.len()];
    let rows = rows_per_task(d);
    y.par_chunks_mut(rows * d)
        .zip(x.par_chunks(rows * d))
        .enumerate()
        .for_each(|(task, (yc, xc))| {
            for (r, (yr, xr)) in yc.chunks_mut(d).zip(xc.chunks(d)).enumerate() {
                let row = task * rows + r; // (bi, hi, si) flattened
                let (bi, si) = (row / (h * s), row % s);
                let t = (bi * s + si) * d;
                let (c, sn) = (&cos[t..t + d], &sin[t..t + d]);
                for j in 0..half {
                    let (x1, x2) = (xr[j], xr[j + half]);
                    if inverse {
                        // dx1 = g1 c1 + g2 s2; dx2 = g2 c2 - g1 s1
                        yr[j] = x1 * c[j] + x2 * sn[j + half];
                        yr[j + half] = x2 * c[j + half] - x1 * sn[j];
                    } else {
                        let a1 = (x1 * c[j]).round_to(dtype);
                        let b1 = (-x2 * sn[j]).round_to(dtype);
                        let a2 = (x2 * c[j + half]).round_to(dtype);
                        let b2 = (x1 * sn[j + half]).round_to(dtype);
                        yr[j] = (a1 + b1).round_to(dtype);
                        yr[j + half] = (a2 + b2).round_to(dtype);
                    }
                }
            }
        });
    let _ = b;
    y
}

impl RopeOp {
    fn dims(&self, x: &[usize]) -> candle_core::Result<(usize, usize, usize, usize)> {
        let &[b, h, s, d] = x else {
            candle_core::bail!("rope: input {x:?} must be [b, heads, seq, head_dim]")
        };
        if self.cos.dims() != [b, s, d] || self.sin.dims() != [b, s, d] || d % 2 != 0 {
            candle_core::bail!(
                "rope: tables {:?}/{:?} do not fit input {x:?}",
                self.cos.dims(),
                self.sin.dims()
            );
        }
        Ok((b, h, s, d))
    }

    fn run<T: Real>(
        &self,
        x: &[T],
        dims: (usize, usize, usize, usize),
        dtype: DType,
        inverse: bool,
    ) -> candle_core::Result<Vec<T>> {
        let round = |t: &[T]| -> Vec<T> { t.iter().map(|v| v.round_to(dtype)).collect() };
        with_host::<T, _>(&self.cos, |c| {
            with_host::<T, _>(&self.sin, |s| {
                let (c, s) = if inverse {
                    (c.to_vec(), s.to_vec())
                } else {
                    (round(c), round(s))
                };
                Ok(rope_apply(x, &c, &s, dims, dtype, inverse))
            })
        })
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(xl.dims())?;
        let dtype = xs.dtype();
        let out = if dtype == DType::F64 {
            f64::into_storage(self.run(&f64::slice(xs, xl)?, dims, dtype, false)?, dtype)?
        } else {
            f32::into_storage(self.run(&f32::slice(xs, xl)?, dims, dtype, false)?, dtype)?
        };
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = self.dims(x.dims())?;
        let dx = if x.dtype() == DType::F64 {
            let v = with_host::<f64, _>(g, |g| self.run(g, dims, DType::F64, true))?;
            tensor_from(v, x.dtype(), x.dims())?
        } else {
            let v = with_host::<f32, _>(g, |g| self.run(g, dims, DType::F32, true))?;
            tensor_from(v, x.dtype(), x.dims())?
        };
        Ok(Some(dx))
    }
}
