//! safetensors files with header metadata, written atomically and read back.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, View};

use super::write_atomic_with;
use crate::error::{Error, Result};

/// One tensor's bytes, already on the host, in safetensors' little-endian layout.
struct HostTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for HostTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn le_bytes<T: candle_core::WithDType, const N: usize>(
    flat: &Tensor,
    to_bytes: fn(T) -> [u8; N],
) -> candle_core::Result<Vec<u8>> {
    Ok(flat
        .to_vec1::<T>()?
        .into_iter()
        .flat_map(to_bytes)
        .collect())
}

/// Copy `t` to the host as raw little-endian bytes. Errors (unsupported dtype, device failure)
/// are returned instead of panicking as candle's own `View` impl would.
fn to_host(path: &Path, name: &str, t: &Tensor) -> Result<HostTensor> {
    let err = |e: candle_core::Error| {
        Error::Weights(format!(
            "cannot save tensor `{name}` to {}: {e}",
            path.display()
        ))
    };
    let flat = t
        .reshape(t.elem_count())
        .and_then(|f| f.to_device(&Device::Cpu))
        .map_err(err)?;
    let data = match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>(),
        DType::U32 => le_bytes(&flat, u32::to_le_bytes),
        DType::I16 => le_bytes(&flat, i16::to_le_bytes),
        DType::I32 => le_bytes(&flat, i32::to_le_bytes),
        DType::I64 => le_bytes(&flat, i64::to_le_bytes),
        DType::F16 => le_bytes(&flat, half::f16::to_le_bytes),
        DType::BF16 => le_bytes(&flat, half::bf16::to_le_bytes),
        DType::F32 => le_bytes(&flat, f32::to_le_bytes),
        DType::F64 => le_bytes(&flat, f64::to_le_bytes),
        other => {
            return Err(Error::Weights(format!(
                "cannot save tensor `{name}` to {}: dtype {other:?} is not supported",
                path.display()
            )))
        }
    }
    .map_err(err)?;
    Ok(HostTensor {
        dtype: t.dtype().into(),
        shape: t.dims().to_vec(),
        data,
    })
}

/// safetensors with header metadata (always includes `{"format": "pt"}`, which PEFT and
/// transformers require), written atomically.
///
/// `extra_metadata` is added to the header; a `format` key in it is overridden with `pt`.
/// Tensors may live on any device and have dtype u8, u32, i16, i32, i64, f16, bf16, f32 or f64;
/// they are copied to the host before anything is written.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    extra_metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if name == "__metadata__" {
            return Err(Error::Weights(format!(
                "cannot save to {}: `__metadata__` is reserved by safetensors and cannot name a tensor",
                path.display()
            )));
        }
        host.push((name.clone(), to_host(path, name, t)?));
    }
    let mut metadata = extra_metadata.clone();
    metadata.insert("format".to_string(), "pt".to_string());
    write_atomic_with(path, |tmp| {
        safetensors::tensor::serialize_to_file(host, Some(metadata), tmp)
            .map_err(|e| Error::Weights(format!("cannot write {}: {e}", path.display())))
    })
}

/// Load every tensor of a safetensors file onto `device`. Errors name the file.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::Weights(format!("cannot load safetensors {}: {e}", path.display())))
}

/// [`load_safetensors`] for files that hold only weights (adapters, fully trained weights,
/// trainable tensors, proxy vectors): a tensor stored with an integer dtype is an error naming
/// it and the file, never cast to a float silently.
pub fn load_float_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let tensors = load_safetensors(path, device)?;
    let mut ints: Vec<String> = tensors
        .iter()
        .filter(|(_, t)| !Tensor::dtype(t).is_float())
        .map(|(n, t)| format!("`{n}` ({:?})", Tensor::dtype(t)))
        .collect();
    if !ints.is_empty() {
        ints.sort();
        return Err(Error::Weights(format!(
            "{} holds weights stored with an integer dtype, which are not cast to a float: {}",
            path.display(),
            ints.join(", ")
        )));
    }
    Ok(tensors)
}

/// The `__metadata__` header of a safetensors file (empty when it has none). Errors name the file.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::Weights(format!(
            "cannot read safetensors header of {}: {e}",
            path.display()
        ))
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}
