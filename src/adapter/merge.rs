//! Merging an adapter (and fully trained weights) into a copy of the base checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::with_temp_dir;
use crate::error::{Error, Result};
use crate::model::checkpoint::weight_files;
use crate::model::family::family_of;
use crate::model::lora::LoraSpec;
use crate::train::checkpoint::{load_safetensors, save_safetensors};

/// Why `out` cannot receive a merged checkpoint, if it cannot: merge writes a new directory and
/// never replaces what is there — `out` must not exist, or be an empty directory.
pub fn merge_output_problem(out: &Path) -> Option<String> {
    let meta = std::fs::metadata(out).ok()?;
    if !meta.is_dir() {
        return Some(format!(
            "{} exists and is not a directory; merge writes a checkpoint directory and never \
             replaces a file",
            out.display()
        ));
    }
    match std::fs::read_dir(out).map(|mut entries| entries.next().is_none()) {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{} is a directory that is not empty; merge never overwrites one: remove it or \
             choose another output directory",
            out.display()
        )),
        Err(e) => Some(format!("cannot read {}: {e}", out.display())),
    }
}

/// Write a merged checkpoint: the base's files with `W' = W + scale·B@A` for every adapted module
/// (and `replaced` weights, by canonical name, e.g. fully trained groups), same key names, same
/// shard layout, same dtype; config, tokenizer and processor files copied.
///
/// `out` must not exist or be an empty directory ([`merge_output_problem`]); it is built in a
/// temp dir and renamed into place only when every adapter module was found with its shape, so a
/// failure leaves nothing behind and touches no existing file.
pub fn merge_into_copy(
    base: &Path,
    out: &Path,
    spec: Option<&LoraSpec>,
    lora: &HashMap<String, (Tensor, Tensor)>,
    replaced: &HashMap<String, Tensor>,
) -> Result<MergeReport> {
    if let Some(problem) = merge_output_problem(out) {
        return Err(Error::Config {
            path: out.to_path_buf(),
            key: "out".into(),
            reason: problem,
        });
    }
    let files = weight_files(base)?;
    let key_map = family_of(base)?.key_map();
    let scale = spec.map(|s| s.scale()).unwrap_or(0.0);
    let mut report = MergeReport::default();
    let mut seen_modules = BTreeMap::new();
    let mut seen_replaced = std::collections::BTreeSet::new();
    with_temp_dir(out, |tmp| {
        for entry in std::fs::read_dir(base).map_err(|e| Error::io(base, e))? {
            let entry = entry.map_err(|e| Error::io(base, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let is_weights = name.ends_with(".safetensors");
            if entry.path().is_file() && !is_weights && !name.starts_with('.') {
                std::fs::copy(entry.path(), tmp.join(&name))
                    .map_err(|e| Error::io(entry.path(), e))?;
            }
        }
        for file in &files {
            let tensors = load_safetensors(file, &Device::Cpu)?;
            let mut out_tensors = HashMap::new();
            for (key, t) in tensors {
                let canonical = key_map(&key);
                let module = canonical.as_deref().and_then(|c| c.strip_suffix(".weight"));
                let dtype = t.dtype();
                // A fully trained weight replaces the base one; an adapter on the same module
                // (adapters written before fully trained groups were excluded from LoRA) is
                // folded into the replacement, as `score --adapter --full-weights` applies it.
                let mut new = t;
                if let Some(r) = canonical.as_ref().and_then(|c| replaced.get(c)) {
                    seen_replaced.insert(canonical.clone().unwrap_or_default());
                    report.replaced += 1;
                    new = r.to_dtype(dtype)?.to_device(&Device::Cpu)?;
                }
                if let Some((a, b)) = module.and_then(|m| lora.get(m)) {
                    let m = module.unwrap_or_default();
                    seen_modules.insert(m.to_string(), ());
                    report.merged += 1;
                    let delta =
                        (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
                    if delta.dims() != new.dims() {
                        return Err(Error::Weights(format!(
                            "the adapter was trained for a model where `{m}` is {:?}; base {} \
                             has {:?}",
                            delta.dims(),
                            base.display(),
                            new.dims()
                        )));
                    }
                    new = (new.to_dtype(DType::F32)? + delta.to_device(&Device::Cpu)?)?
                        .to_dtype(dtype)?;
                }
                out_tensors.insert(key, new);
            }
            let fname = file.file_name().map(PathBuf::from).unwrap_or_default();
            save_safetensors(&tmp.join(fname), &out_tensors, &HashMap::new())?;
        }
        // Checked before the rename: a failed merge leaves nothing at `out`.
        report.unmatched = lora
            .keys()
            .filter(|m| !seen_modules.contains_key(*m))
            .cloned()
            .collect();
        report.unmatched.sort();
        if !report.unmatched.is_empty() {
            return Err(Error::Weights(format!(
                "adapter modules not found in the base checkpoint {}: {}",
                base.display(),
                report.unmatched.join(", ")
            )));
        }
        let mut stray: Vec<&String> = replaced
            .keys()
            .filter(|k| !seen_replaced.contains(*k))
            .collect();
        if !stray.is_empty() {
            stray.sort();
            return Err(Error::Weights(format!(
                "{} of {} full weight(s) match no weight of the base checkpoint {}: {}",
                stray.len(),
                replaced.len(),
                base.display(),
                stray
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    })?;
    Ok(report)
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct MergeReport {
    /// Weights that received a LoRA delta.
    pub merged: usize,
    /// Weights replaced by fully trained ones.
    pub replaced: usize,
    pub unmatched: Vec<String>,
}
