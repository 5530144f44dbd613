//! Checking, from a base checkpoint's weight headers, that an adapter was made for it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};

use super::{Adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::error::{Error, Result};
use crate::model::checkpoint::weight_files;
use crate::model::family::family_of;
use crate::model::lora::TargetModules;
use crate::model::weights::WeightStore;

/// The modules of a base checkpoint an adapter can target, with their weight shapes
/// `[out, in]`: every 2-D `*.weight` by canonical module name, embeddings excluded (only linear
/// layers take LoRA here). Reads only the safetensors headers.
pub fn base_linear_modules(base: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let files = weight_files(base)?;
    let key_map = family_of(base)?.key_map();
    let store = WeightStore::open(base, &files, &Device::Cpu, DType::F32, key_map)?;
    let mut out = BTreeMap::new();
    for name in store.names() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if module.ends_with("embed_tokens") || module.ends_with("position_embedding") {
            continue;
        }
        if let Some(shape) = store.shape_of(&name).filter(|s| s.len() == 2) {
            out.insert(module.to_string(), shape);
        }
    }
    Ok(out)
}

/// `target_modules` as written in `adapter_config.json`.
fn show_targets(t: &TargetModules) -> String {
    serde_json::to_string(t).unwrap_or_else(|_| format!("{t:?}"))
}

/// A few module names of `modules` and the distinct last segments of all of them, for errors.
fn describe_modules(modules: &BTreeMap<String, Vec<usize>>) -> String {
    let examples: Vec<&str> = modules
        .keys()
        .filter(|m| m.contains(".layers.0."))
        .chain(modules.keys())
        .map(String::as_str)
        .take(3)
        .collect();
    let suffixes: std::collections::BTreeSet<&str> = modules
        .keys()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    format!(
        "{} (module names end in: {})",
        examples.join(", "),
        suffixes.into_iter().collect::<Vec<_>>().join(", ")
    )
}

/// Check, from the base's weight headers, that `adapter` was made for the checkpoint in `base`:
/// its `target_modules` match some module of the base, and every module it has weights for
/// exists in the base, has the shape the weights were trained for and is matched by
/// `target_modules`. Errors name the adapter, the base and the module or pattern at fault.
pub fn check_adapter_fits(adapter: &Adapter, base: &Path) -> Result<()> {
    let modules = base_linear_modules(base)?;
    let cfg_path = adapter.dir.join(ADAPTER_CONFIG);
    let weights_path = adapter.dir.join(ADAPTER_WEIGHTS);
    let targets = show_targets(&adapter.spec.target_modules);
    let matcher = adapter.spec.matcher()?;
    if !modules.keys().any(|m| matcher.matches(m)) {
        return Err(Error::Config {
            path: cfg_path,
            key: "target_modules".into(),
            reason: format!(
                "{targets} matches no module of base {}; its modules are e.g. {}",
                base.display(),
                describe_modules(&modules)
            ),
        });
    }
    let trained_for = match &adapter.base_model {
        Some(b) => format!(" (adapter_config.json names base_model_name_or_path `{b}`)"),
        None => String::new(),
    };
    let mut names: Vec<&String> = adapter.weights.keys().collect();
    names.sort();
    for m in names {
        let (a, b) = &adapter.weights[m];
        let r = adapter.spec.r;
        if a.dims().len() != 2 || b.dims().len() != 2 || a.dim(0)? != r || b.dim(1)? != r {
            return Err(Error::Weights(format!(
                "adapter {}: `{m}` has lora_A {:?} and lora_B {:?}, not a rank-{r} pair \
                 ([{r}, in] and [out, {r}]) as adapter_config.json's r = {r} says",
                adapter.dir.display(),
                a.dims(),
                b.dims()
            )));
        }
        let trained = [b.dim(0)?, a.dim(1)?];
        match modules.get(m) {
            None => {
                return Err(Error::Weights(format!(
                    "adapter {} has LoRA weights for `{m}`, which base {} does not have: it was \
                     trained for another model{trained_for}; base modules are e.g. {}",
                    adapter.dir.display(),
                    base.display(),
                    describe_modules(&modules)
                )))
            }
            Some(shape) if shape[..] != trained[..] => {
                return Err(Error::Weights(format!(
                    "adapter {} was trained for a model where `{m}` is {trained:?}; base {} has \
                     {shape:?}{trained_for}",
                    adapter.dir.display(),
                    base.display()
                )))
            }
            Some(_) => {}
        }
        if !matcher.matches(m) {
            return Err(Error::Config {
                path: cfg_path,
                key: "target_modules".into(),
                reason: format!(
                    "{targets} does not match `{m}`, which {} holds LoRA weights for",
                    weights_path.display()
                ),
            });
        }
    }
    Ok(())
}
