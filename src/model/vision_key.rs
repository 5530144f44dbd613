//! The model key of the frozen-vision feature cache ([`crate::data::feature_cache`]): one hex
//! SHA-256 naming the whole map from an image file to the states the family's cached vision
//! group makes of it. Two runs share cache entries only when everything that map depends on is
//! equal, compared by content, not by path: a fine-tuned or merged tower, another dtype or
//! processor setting, or another lvlm-ift version each get a folder of their own.

use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use crate::data::feature_cache::hex;
use crate::data::processor::ImageProcessor;
use crate::error::{Error, Result};
use crate::model::family::ModelLayout;
use crate::model::weights::WeightStore;

/// A built model's key, and what the trainer needs to know to decide whether the cache may
/// serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionKey {
    pub key: String,
    /// The group whose output is cached (the family's name for it).
    pub group: &'static str,
    /// LoRA adapters inside the group (their dropout makes the group's output random while
    /// training).
    pub adapters: usize,
    /// Parameters of the group that are trainable variables.
    pub trainable: usize,
}

/// The key of the model built from `store` (after loading: every weight it uses has been handed
/// out), or `None` when its family has no cacheable vision group. It covers lvlm-ift's version,
/// the family, the checkpoint's `config.json` bytes, the image processor's settings, the weight
/// dtype, and every tensor the group runs with — frozen weights, trainable ones, and LoRA
/// adapters on its modules with their hyper-parameters — by name, dtype, shape and bytes.
pub fn vision_cache_key(
    layout: &ModelLayout,
    store: &WeightStore,
    processor: &ImageProcessor,
) -> Result<Option<VisionKey>> {
    let Some(group_name) = layout.family.cached_vision_group() else {
        return Ok(None);
    };
    let group = layout.group(group_name)?;
    let mut h = Sha256::new();
    let mut field = |name: &str, bytes: &[u8]| {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field("lvlm-ift", env!("CARGO_PKG_VERSION").as_bytes());
    field("family", layout.family.name().as_bytes());
    let config = layout.dir.join("config.json");
    field(
        "config.json",
        &std::fs::read(&config).map_err(|e| Error::io(&config, e))?,
    );
    field("processor", format!("{processor:?}").as_bytes());
    field("dtype", format!("{:?}", store.dtype()).as_bytes());

    let mut tensors: Vec<(String, Tensor)> = store
        .frozen_tensors()
        .into_iter()
        .filter(|(n, _)| group.contains(n))
        .collect();
    let vars: Vec<(String, Tensor)> = store
        .trainable_vars()
        .into_iter()
        .filter(|(n, _)| group.contains(n))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let trainable = vars.iter().map(|(_, t)| t.elem_count()).sum();
    tensors.extend(vars);
    let mut adapters = 0;
    if let Some(lora) = store.lora() {
        let spec = &lora.spec;
        for e in lora.entries() {
            if e.runs && group.contains(&format!("{}.weight", e.module)) {
                adapters += 1;
                tensors.push((format!("{}.lora_A", e.module), e.a.clone()));
                tensors.push((format!("{}.lora_B", e.module), e.b.clone()));
            }
        }
        if adapters > 0 {
            field(
                "lora",
                format!(
                    "r={} scale={} dropout={}",
                    spec.r,
                    spec.scale(),
                    spec.dropout
                )
                .as_bytes(),
            );
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.dedup_by(|a, b| a.0 == b.0);
    for (name, t) in &tensors {
        field(name, format!("{:?} {:?}", t.dtype(), t.dims()).as_bytes());
        field("data", &tensor_bytes(t)?);
    }
    Ok(Some(VisionKey {
        key: hex(&h.finalize()),
        group: group_name,
        adapters,
        trainable,
    }))
}

/// A float tensor's values as little-endian bytes.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(Error::Model(format!(
                "vision cache key: a {other:?} weight cannot be hashed"
            )))
        }
    })
}
