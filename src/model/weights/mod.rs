//! Weight loading: every key layout seen in the wild mapped onto one canonical naming, shape
//! checks with useful errors, and optional wrapping of weights as trainable `Var`s.
//!
//! Canonical names are the in-memory module names of transformers >= 4.52 (what PEFT adapters
//! name); each family's [`KeyMap`] maps its checkpoints' key layouts onto them
//! (`model::family::ModelFamily::key_map`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::lora::LoraFactory;

mod rows;
pub use rows::{parse_row_param, row_param_name};

/// Maps a key as stored in a checkpoint to its canonical name; `None` = no known layout.
pub type KeyMap = fn(&str) -> Option<String>;

/// Keys used as stored (tests, programmatic checkpoints).
pub fn identity_keys(key: &str) -> Option<String> {
    Some(key.to_string())
}

/// Decides which canonical names become trainable `Var`s.
pub type TrainableFilter = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// The weights of one checkpoint, loaded lazily (memory-mapped) and handed out by canonical name.
pub struct WeightStore {
    files: MmapedSafetensors,
    /// canonical name -> key in the files
    keys: BTreeMap<String, String>,
    /// key in the files -> the file holding it (for error messages)
    key_files: BTreeMap<String, PathBuf>,
    dir: PathBuf,
    device: Device,
    dtype: DType,
    used: Mutex<BTreeSet<String>>,
    trainable: Option<TrainableFilter>,
    vars: Mutex<Vec<(String, Var)>>,
    /// Weights handed out as plain (frozen) tensors; kept so tests and memory accounting can
    /// check that no gradient is ever computed for them.
    frozen: Mutex<Vec<(String, Tensor)>>,
    lora: Option<LoraFactory>,
    /// Weights to use instead of the files' (e.g. groups fully trained by an earlier stage).
    overrides: std::collections::HashMap<String, Tensor>,
    /// Row slices `(weight, start, end)` that train while the rest of the weight stays frozen.
    trainable_rows: Vec<(String, usize, usize)>,
    /// What trainable weights are held in.
    trainable_dtype: DType,
}

impl WeightStore {
    /// Open the safetensors files of a model dir (single file or shards) without reading them.
    pub fn open(
        dir: &Path,
        files: &[PathBuf],
        device: &Device,
        dtype: DType,
        key_map: KeyMap,
    ) -> Result<Self> {
        let mut key_files = BTreeMap::new();
        for f in files {
            for key in header_keys(f)? {
                key_files.insert(key, f.clone());
            }
        }
        // SAFETY: the files are memory-mapped read-only; modifying them while we run is the same
        // hazard every safetensors loader (HF included) accepts.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            Error::Weights(format!("cannot open safetensors in {}: {e}", dir.display()))
        })?;
        let mut keys = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, _) in st.tensors() {
            match key_map(&key) {
                Some(c) => {
                    if let Some(prev) = keys.insert(c.clone(), key.clone()) {
                        return Err(Error::Weights(format!(
                            "keys `{prev}` and `{key}` in {} both map to `{c}`: mixed key layouts",
                            dir.display()
                        )));
                    }
                }
                None => unknown.push(key),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(Error::Weights(format!(
                "{} has {} key(s) of no known key layout, e.g. `{}`",
                dir.display(),
                unknown.len(),
                unknown
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("`, `")
            )));
        }
        Ok(Self {
            files: st,
            keys,
            key_files,
            dir: dir.to_path_buf(),
            device: device.clone(),
            dtype,
            used: Mutex::new(BTreeSet::new()),
            trainable: None,
            vars: Mutex::new(Vec::new()),
            frozen: Mutex::new(Vec::new()),
            lora: None,
            overrides: std::collections::HashMap::new(),
            trainable_rows: Vec::new(),
            trainable_dtype: DType::F32,
        })
    }

    /// Trainable weights are held in `dtype` (f32 by default; an f64 store keeps f64).
    pub fn with_trainable_dtype(mut self, dtype: DType) -> Self {
        self.trainable_dtype = dtype;
        self
    }

    /// Weights whose canonical name passes `filter` are returned as `Var`s (kept in f32).
    pub fn with_trainable(mut self, filter: TrainableFilter) -> Self {
        self.trainable = Some(filter);
        self
    }

    /// Give targeted linear layers LoRA adapters as the model is built.
    pub fn with_lora(mut self, factory: LoraFactory) -> Self {
        self.lora = Some(factory);
        self
    }

    /// Replace stored weights by these (canonical names; each must exist with the same shape).
    /// A trained row slice (`{weight}[{start}:{end}]`, as checkpoints hold it) replaces those
    /// rows of the stored weight.
    pub fn with_overrides(
        mut self,
        overrides: std::collections::HashMap<String, Tensor>,
    ) -> Result<Self> {
        let overrides = self.fold_row_overrides(overrides)?;
        for (name, t) in &overrides {
            let shape = self.shape_of(name).ok_or_else(|| {
                Error::Weights(format!(
                    "override `{name}` is not a weight of {}",
                    self.dir.display()
                ))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Weights(format!(
                    "override `{name}` has shape {:?}, the checkpoint {shape:?}",
                    t.dims()
                )));
            }
        }
        self.overrides = overrides;
        Ok(self)
    }

    /// The override weights this store was given (canonical name → tensor).
    pub fn overridden(&self) -> std::collections::HashMap<String, Tensor> {
        self.overrides.clone()
    }

    pub fn lora(&self) -> Option<&LoraFactory> {
        self.lora.as_ref()
    }

    /// Whether a weight of this canonical name will be (or was) handed out as trainable.
    pub fn is_trainable(&self, name: &str) -> bool {
        self.trainable.as_ref().is_some_and(|f| f(name))
    }

    /// Canonical names of every stored weight.
    pub fn names(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }

    /// Shape of a weight as stored, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let key = self.keys.get(name)?;
        self.files.get(key).ok().map(|v| v.shape().to_vec())
    }

    /// Load a weight by canonical name, checking its shape. Every weight handed out is a float
    /// parameter, so a tensor stored with a non-float dtype (`U32`, `I64`, `BOOL`, ...) is an
    /// error naming the tensor, its dtype and its file, never cast: its integers are not weights.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.keys.get(name).ok_or_else(|| {
            Error::Weights(format!(
                "missing weight `{name}` (expected shape {shape:?}) in {}",
                self.dir.display()
            ))
        })?;
        let view = self
            .files
            .get(key)
            .map_err(|e| Error::Weights(format!("`{key}`: {e}")))?;
        if view.shape() != shape {
            return Err(Error::Weights(format!(
                "weight `{key}` in {} has shape {:?}, expected {shape:?} for `{name}` (does config.json match the weights?)",
                self.dir.display(),
                view.shape()
            )));
        }
        let t = match self.overrides.get(name) {
            Some(t) => t.to_device(&self.device)?,
            None if !is_float_dtype(view.dtype()) => {
                let file = self
                    .key_files
                    .get(key.as_str())
                    .map_or_else(|| self.dir.clone(), PathBuf::clone);
                return Err(Error::Weights(format!(
                    "weight `{key}` in {} is stored as {:?}, not a float dtype; `{name}` is a \
                     float parameter and integer data is not cast to {:?} (was the file written \
                     with the wrong dtype?)",
                    file.display(),
                    view.dtype(),
                    self.dtype
                )));
            }
            None => self
                .files
                .load(key, &self.device)
                .map_err(|e| Error::Weights(format!("cannot load `{key}`: {e}")))?,
        };
        self.used.lock().expect("poisoned").insert(name.to_string());
        let trainable = self.trainable.as_ref().is_some_and(|f| f(name));
        if trainable {
            // Trainable parameters live in f32 whatever the base dtype (see CANDLE.md) unless
            // the reference's bf16 numerics are asked for; f64 stays f64 so gradient checks can
            // run in double precision.
            let dtype = if self.dtype == DType::F64 {
                DType::F64
            } else {
                self.trainable_dtype
            };
            let var = Var::from_tensor(&t.to_dtype(dtype)?)?;
            let out = var.as_tensor().clone();
            self.vars
                .lock()
                .expect("poisoned")
                .push((name.to_string(), var));
            Ok(out)
        } else {
            let t = t.to_dtype(self.dtype)?;
            self.frozen
                .lock()
                .expect("poisoned")
                .push((name.to_string(), t.clone()));
            Ok(t)
        }
    }

    /// The frozen (non-trainable) weights handed out so far, by canonical name.
    pub fn frozen_tensors(&self) -> Vec<(String, Tensor)> {
        self.frozen.lock().expect("poisoned").clone()
    }

    /// The trainable parameters handed out so far, by canonical name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.vars.lock().expect("poisoned").clone()
    }

    /// After building a model: every stored weight must have been used, except those `ignore`
    /// accepts (buffers, parts of the vision tower the model never runs).
    pub fn finish(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.lock().expect("poisoned");
        let unexpected: Vec<String> = self
            .keys
            .iter()
            .filter(|(c, _)| !used.contains(*c) && !ignore(c))
            .map(|(_, k)| {
                let shape = self
                    .files
                    .get(k)
                    .map(|v| v.shape().to_vec())
                    .unwrap_or_default();
                format!("`{k}` {shape:?}")
            })
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        Err(Error::Weights(format!(
            "{} unexpected weight(s) in {} that the model does not use (does config.json match the weights?): {}",
            unexpected.len(),
            self.dir.display(),
            unexpected.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
        )))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether a stored dtype holds floating-point values (every float format safetensors knows).
fn is_float_dtype(d: safetensors::Dtype) -> bool {
    use safetensors::Dtype::*;
    matches!(
        d,
        F4 | F6_E2M3
            | F6_E3M2
            | F8_E5M2
            | F8_E4M3
            | F8_E8M0
            | F8_E4M3FNUZ
            | F8_E5M2FNUZ
            | F16
            | BF16
            | F32
            | F64
    )
}

/// Read the safetensors header ourselves first, so a truncated or non-safetensors file gets an
/// error naming it rather than a bare deserialisation message. Returns the tensor names.
fn header_keys(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| {
        Error::Weights(format!(
            "{} is not a safetensors file (too short)",
            path.display()
        ))
    })?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if n == 0 || n > size.saturating_sub(8) {
        return Err(Error::Weights(format!(
            "{} is not a safetensors file (bad header length {n})",
            path.display()
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| {
            Error::Weights(format!(
                "{} is not a safetensors file (header is not a JSON object: {e})",
                path.display()
            ))
        })?;
    Ok(map
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

/// A prefix into a [`WeightStore`], in the style of candle's `VarBuilder`.
#[derive(Clone)]
pub struct Weights<'a> {
    store: &'a WeightStore,
    prefix: String,
}

impl<'a> Weights<'a> {
    pub fn root(store: &'a WeightStore) -> Self {
        Weights {
            store,
            prefix: String::new(),
        }
    }

    pub fn pp(&self, name: impl AsRef<str>) -> Weights<'a> {
        let name = name.as_ref();
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Weights {
            store: self.store,
            prefix,
        }
    }
    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }
    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.get(&self.name(leaf), shape)
    }
    pub fn contains(&self, leaf: &str) -> bool {
        self.store.contains(&self.name(leaf))
    }
    pub fn path(&self) -> &str {
        &self.prefix
    }
    pub fn store(&self) -> &'a WeightStore {
        self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let p = dir.join("model.safetensors");
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &p).unwrap();
        p
    }

    #[test]
    fn shape_missing_and_unexpected_errors_name_keys() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let f = write_st(
            dir.path(),
            &[
                (
                    "language_model.model.norm.weight",
                    Tensor::ones(4, DType::F32, &dev).unwrap(),
                ),
                (
                    "multi_modal_projector.linear_1.bias",
                    Tensor::ones(3, DType::F32, &dev).unwrap(),
                ),
            ],
        );
        let store = WeightStore::open(
            dir.path(),
            &[f],
            &dev,
            DType::F32,
            crate::model::llava::canonical_name,
        )
        .unwrap();
        let e = store
            .get("model.language_model.norm.weight", &[5])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("language_model.model.norm.weight")
                && e.contains("[4]")
                && e.contains("[5]"),
            "{e}"
        );
        let e = store
            .get("lm_head.weight", &[2, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing weight `lm_head.weight`"), "{e}");
        store.get("model.language_model.norm.weight", &[4]).unwrap();
        let e = store.finish(|_| false).unwrap_err().to_string();
        assert!(e.contains("multi_modal_projector.linear_1.bias"), "{e}");
        assert!(store.finish(|n| n.contains("projector")).is_ok());
    }

    #[test]
    fn trainable_weights_are_f32_vars() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let f = write_st(
            dir.path(),
            &[(
                "lm_head.weight",
                Tensor::ones((2, 2), DType::F32, &dev).unwrap(),
            )],
        );
        let store = WeightStore::open(dir.path(), &[f], &dev, DType::BF16, identity_keys)
            .unwrap()
            .with_trainable(Box::new(|n| n.starts_with("lm_head")));
        let t = store.get("lm_head.weight", &[2, 2]).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(store.trainable_vars().len(), 1);
    }

    #[test]
    fn garbage_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        std::fs::write(&p, b"not a safetensors file at all").unwrap();
        let e = WeightStore::open(
            dir.path(),
            std::slice::from_ref(&p),
            &Device::Cpu,
            DType::F32,
            identity_keys,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("model.safetensors"), "{e}");
    }
}
