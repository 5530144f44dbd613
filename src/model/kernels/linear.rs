//! `y = x Wᵀ` for a frozen weight `W: [out, in]`, forward and input-gradient backward in one op.
//!
//! Replaces the detach → matmul → re-attach-by-copy pattern (the copy was an output-sized memcpy
//! per frozen product) and candle's bf16 CPU matmul, which widens *both* operands to f32 — a
//! weight-sized allocation per product per step. Here a bf16 (or f16) weight is widened a block
//! of rows at a time into a reused scratch buffer (≤ 2 MiB), so no weight-sized copy is ever made
//! and the widening stays in cache next to the product that reads it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::gemm::{matmul_into, View};
use super::host::{tensor_from, with_host, Real};

/// Weight rows widened per block: a block is at most this many values.
const BLOCK_VALUES: usize = 512 * 1024;

pub struct FrozenLinearOp {
    /// `[out, in]`, any float dtype; never receives a gradient.
    pub weight: Tensor,
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// `y[n, out] = x[n, in] · Wᵀ`.
fn forward<T: Real>(x: &[T], n: usize, w: &Tensor) -> candle_core::Result<Vec<T>> {
    let (out, inp) = w.dims2()?;
    let mut y = vec![T::zero(); n * out];
    if w.dtype() == DType::F32 || w.dtype() == DType::F64 {
        with_host::<T, _>(w, |wv| {
            matmul_into(
                &mut y,
                out,
                View::rows(x, n, inp),
                View::rows(wv, out, inp).t(),
                false,
                threads(),
            );
            Ok(())
        })?;
        return Ok(y);
    }
    // Narrow weight: widen `rows` rows at a time and write the matching columns of y.
    let rows = (BLOCK_VALUES / inp.max(1)).clamp(1, out);
    let mut start = 0;
    while start < out {
        let len = rows.min(out - start);
        let block = w.narrow(0, start, len)?;
        with_host::<T, _>(&block, |wb| {
            matmul_into(
                &mut y[start..],
                out,
                View::rows(x, n, inp),
                View::rows(wb, len, inp).t(),
                false,
                threads(),
            );
            Ok(())
        })?;
        start += len;
    }
    Ok(y)
}

/// `dx[n, in] = g[n, out] · W`.
fn backward<T: Real>(g: &[T], n: usize, w: &Tensor) -> candle_core::Result<Vec<T>> {
    let (out, inp) = w.dims2()?;
    let mut dx = vec![T::zero(); n * inp];
    if w.dtype() == DType::F32 || w.dtype() == DType::F64 {
        with_host::<T, _>(w, |wv| {
            matmul_into(
                &mut dx,
                inp,
                View::rows(g, n, out),
                View::rows(wv, out, inp),
                false,
                threads(),
            );
            Ok(())
        })?;
        return Ok(dx);
    }
    let rows = (BLOCK_VALUES / inp.max(1)).clamp(1, out);
    let mut start = 0;
    while start < out {
        let len = rows.min(out - start);
        let block = w.narrow(0, start, len)?;
        let g_cols = View {
            data: &g[start..],
            rows: n,
            cols: len,
            rs: out,
            cs: 1,
        };
        with_host::<T, _>(&block, |wb| {
            matmul_into(
                &mut dx,
                inp,
                g_cols,
                View::rows(wb, len, inp),
                start > 0,
                threads(),
            );
            Ok(())
        })?;
        start += len;
    }
    Ok(dx)
}

impl FrozenLinearOp {
    fn check(&self, x: &[usize]) -> candle_core::Result<usize> {
        let (_, inp) = self.weight.dims2()?;
        match x {
            [n, i] if *i == inp => Ok(*n),
            _ => candle_core::bail!(
                "frozen linear: input {x:?} does not fit weight {:?}",
                self.weight.dims()
            ),
        }
    }
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-weight-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.check(xl.dims())?;
        let out = self.weight.dim(0)?;
        let dtype = xs.dtype();
        let storage = if dtype == DType::F64 {
            f64::into_storage(forward(&f64::slice(xs, xl)?, n, &self.weight)?, dtype)?
        } else {
            f32::into_storage(forward(&f32::slice(xs, xl)?, n, &self.weight)?, dtype)?
        };
        Ok((storage, Shape::from((n, out))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = self.check(x.dims())?;
        let dx = if x.dtype() == DType::F64 {
            let v = with_host::<f64, _>(g, |g| backward(g, n, &self.weight))?;
            tensor_from(v, x.dtype(), x.dims())?
        } else {
            let v = with_host::<f32, _>(g, |g| backward(g, n, &self.weight))?;
            tensor_from(v, x.dtype(), x.dims())?
        };
        Ok(Some(dx))
    }
}
