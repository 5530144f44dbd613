//! Host views of CPU tensors for the fused kernels: every kernel computes in `f32` (for f32, bf16
//! and f16 storage) or in `f64` (f64 storage: the finite-difference checks), reads its inputs
//! without a copy where the storage already has the compute type, and hands back storage of the
//! dtype its caller expects.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::{bf16, f16};

/// The float types the kernels compute in.
pub trait Real:
    num_traits::Float + num_traits::FromPrimitive + Send + Sync + std::iter::Sum + 'static
{
    /// `x` rounded through `dtype` (HF casts some intermediates to the model dtype; the fused
    /// kernels do the same so bf16 results match the composed ops).
    fn round_to(self, dtype: DType) -> Self;
    /// Contiguous slice of `storage` under `layout`, converted to `Self` where needed.
    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Cow<'a, [Self]>>;
    /// Storage of `dtype` holding `data`.
    fn into_storage(data: Vec<Self>, dtype: DType) -> candle_core::Result<CpuStorage>;
}

fn contiguous_range(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel: input is not contiguous".into()))
}

impl Real for f32 {
    #[inline(always)]
    fn round_to(self, dtype: DType) -> Self {
        match dtype {
            DType::BF16 => bf16::from_f32(self).to_f32(),
            DType::F16 => f16::from_f32(self).to_f32(),
            _ => self,
        }
    }

    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Cow<'a, [Self]>> {
        let (a, b) = contiguous_range(layout)?;
        Ok(match storage {
            CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
            CpuStorage::F64(v) => Cow::Owned(v[a..b].iter().map(|&x| x as f32).collect()),
            CpuStorage::BF16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
            CpuStorage::F16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn into_storage(data: Vec<Self>, dtype: DType) -> candle_core::Result<CpuStorage> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(data),
            DType::BF16 => CpuStorage::BF16(data.into_iter().map(bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(data.into_iter().map(f16::from_f32).collect()),
            DType::F64 => CpuStorage::F64(data.into_iter().map(f64::from).collect()),
            other => candle_core::bail!("fused kernel: unsupported output dtype {other:?}"),
        })
    }
}

impl Real for f64 {
    #[inline(always)]
    fn round_to(self, dtype: DType) -> Self {
        match dtype {
            DType::BF16 => bf16::from_f64(self).to_f64(),
            DType::F16 => f16::from_f64(self).to_f64(),
            DType::F32 => self as f32 as f64,
            _ => self,
        }
    }

    fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Cow<'a, [Self]>> {
        let (a, b) = contiguous_range(layout)?;
        Ok(match storage {
            CpuStorage::F64(v) => Cow::Borrowed(&v[a..b]),
            CpuStorage::F32(v) => Cow::Owned(v[a..b].iter().map(|&x| f64::from(x)).collect()),
            CpuStorage::BF16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f64()).collect()),
            CpuStorage::F16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f64()).collect()),
            other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn into_storage(data: Vec<Self>, dtype: DType) -> candle_core::Result<CpuStorage> {
        Ok(match dtype {
            DType::F64 => CpuStorage::F64(data),
            DType::F32 => CpuStorage::F32(data.into_iter().map(|x| x as f32).collect()),
            DType::BF16 => CpuStorage::BF16(data.into_iter().map(bf16::from_f64).collect()),
            DType::F16 => CpuStorage::F16(data.into_iter().map(f16::from_f64).collect()),
            other => candle_core::bail!("fused kernel: unsupported output dtype {other:?}"),
        })
    }
}

/// Runs `f` on the contiguous values of CPU tensor `t` as `T` (no copy when `t` is already
/// contiguous and of the compute type).
pub fn with_host<T: Real, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("fused kernel: tensor is not on the CPU")
    };
    let values = T::slice(cpu, layout)?;
    f(&values)
}

/// A CPU tensor of `dtype` and `shape` from computed values.
pub fn tensor_from<T: Real>(
    data: Vec<T>,
    dtype: DType,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    let storage = T::into_storage(data, dtype)?;
    Ok(Tensor::from_storage(
        Storage::Cpu(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// True when the fused CPU kernels apply: every tensor on the CPU.
pub fn all_cpu(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu())
}

/// Rows per parallel task so that a task holds at least ~32k elements (smaller tasks cost more
/// in scheduling than they save on two cores).
pub fn rows_per_task(row_len: usize) -> usize {
    (32 * 1024 / row_len.max(1)).max(1)
}
