//! LoRA with PEFT semantics: which modules get an adapter (PEFT's target matching), how adapters
//! are initialised (A kaiming-uniform(a=√5), B zeros), scaled (alpha/r, or alpha/√r with rsLoRA)
//! and applied (`y = Wx + scale·B(A(dropout(x)))`), and the registry of created adapters that the
//! trainer, the exporter and the merger read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// PEFT `target_modules`: a list matches module names equal to an entry or ending in `.entry`; a
/// string is a regex full-matched against the whole module name; `"all-linear"` is every linear
/// layer except the output head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Suffixes(Vec<String>),
    Pattern(String),
}

impl TargetModules {
    /// Compile once; errors name the bad regex.
    pub fn matcher(&self) -> Result<TargetMatcher> {
        Ok(match self {
            TargetModules::Suffixes(v) => TargetMatcher::Suffixes(v.clone()),
            TargetModules::Pattern(p) if p == "all-linear" => TargetMatcher::AllLinear,
            TargetModules::Pattern(p) => {
                let re = regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| Error::Config {
                    path: "lora".into(),
                    key: "target_modules".into(),
                    reason: format!("invalid regex `{p}`: {e}"),
                })?;
                TargetMatcher::Regex(re)
            }
        })
    }
}

#[derive(Debug, Clone)]
pub enum TargetMatcher {
    Suffixes(Vec<String>),
    Regex(regex::Regex),
    AllLinear,
}

impl TargetMatcher {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetMatcher::Suffixes(v) => v
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetMatcher::Regex(re) => re.is_match(module),
            TargetMatcher::AllLinear => module != "lm_head",
        }
    }
}

/// The LoRA hyper-parameters (the subset of PEFT's `LoraConfig` we implement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    pub target_modules: TargetModules,
    /// PEFT `exclude_modules`: modules the targets match that get no adapter (same matching
    /// rules as `target_modules`). `train` adds the fully trained groups here, so a module is
    /// either fully trained or adapted, never both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<TargetModules>,
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_alpha() -> f64 {
    8.0
}

/// `target_modules` minus `exclude_modules`, compiled.
#[derive(Debug, Clone)]
pub struct ModuleMatcher {
    target: TargetMatcher,
    exclude: Option<TargetMatcher>,
}

impl ModuleMatcher {
    pub fn matches(&self, module: &str) -> bool {
        self.target.matches(module) && !self.exclude.as_ref().is_some_and(|e| e.matches(module))
    }
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Error::Config {
            path: "lora".into(),
            key: key.into(),
            reason,
        };
        if self.r == 0 {
            return Err(bad("r", "must be > 0".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad(
                "alpha",
                format!("must be a finite number > 0, got {}", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        self.matcher()?;
        Ok(())
    }

    /// The compiled target/exclude rules; errors name the bad regex.
    pub fn matcher(&self) -> Result<ModuleMatcher> {
        Ok(ModuleMatcher {
            target: self.target_modules.matcher()?,
            exclude: self
                .exclude_modules
                .as_ref()
                .map(TargetModules::matcher)
                .transpose()?,
        })
    }

    /// This spec with every module under one of `prefixes` (canonical names ending in `.`)
    /// excluded as well, as a regex PEFT reads the same way.
    pub fn excluding_prefixes(&self, prefixes: &[String]) -> LoraSpec {
        if prefixes.is_empty() {
            return self.clone();
        }
        let mut alternatives: Vec<String> = match &self.exclude_modules {
            None => Vec::new(),
            Some(TargetModules::Pattern(p)) => vec![format!("(?:{p})")],
            Some(TargetModules::Suffixes(v)) => v
                .iter()
                .map(|t| format!("(?:.*\\.)?{}", regex::escape(t)))
                .collect(),
        };
        alternatives.extend(prefixes.iter().map(|p| format!("{}.*", regex::escape(p))));
        LoraSpec {
            exclude_modules: Some(TargetModules::Pattern(alternatives.join("|"))),
            ..self.clone()
        }
    }
}

/// State shared by every adapter of a model: train/eval mode and the dropout RNG (seeded, and
/// saved in checkpoints so a resumed run draws the same masks).
#[derive(Debug)]
pub struct LoraRuntime {
    training: AtomicBool,
    rng: Mutex<ChaCha8Rng>,
}

impl LoraRuntime {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            training: AtomicBool::new(false),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        })
    }
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::SeqCst);
    }
    pub fn training(&self) -> bool {
        self.training.load(Ordering::SeqCst)
    }
    /// (seed, stream, word position) of the dropout RNG.
    pub fn rng_state(&self) -> ([u8; 32], u64, u128) {
        let rng = self.rng.lock().expect("poisoned");
        (rng.get_seed(), rng.get_stream(), rng.get_word_pos())
    }
    pub fn set_rng_state(&self, seed: [u8; 32], stream: u64, word_pos: u128) {
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(stream);
        rng.set_word_pos(word_pos);
        *self.rng.lock().expect("poisoned") = rng;
    }
    /// Restart the generator at `seed`, stream `stream` (a data-parallel rank's per-step draws).
    pub fn reseed(&self, seed: u64, stream: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        *self.rng.lock().expect("poisoned") = rng;
    }
    /// Inverted-dropout keep mask scaled by 1/(1-p), shape `dims`.
    fn dropout_mask(&self, dims: &[usize], p: f64, device: &Device) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let keep = 1.0 / (1.0 - p);
        let mut rng = self.rng.lock().expect("poisoned");
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, dims, device)?)
    }
}

/// One adapter pair on one linear layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    runtime: Arc<LoraRuntime>,
}

impl LoraAdapter {
    /// `scale · B(A(dropout(x)))` in the adapter's dtype, cast to `out_dtype`.
    pub fn delta(&self, x: &Tensor, out_dtype: DType) -> Result<Tensor> {
        let mut x = x.to_dtype(self.a.dtype())?;
        if self.dropout > 0.0 && self.runtime.training() {
            let mask = self
                .runtime
                .dropout_mask(x.dims(), self.dropout, x.device())?;
            x = x.mul(&mask.to_dtype(x.dtype())?)?;
        }
        let h = x.broadcast_matmul(&self.a.t()?)?;
        let y = (h.broadcast_matmul(&self.b.t()?)? * self.scale)?;
        Ok(y.to_dtype(out_dtype)?)
    }

    /// `scale · B @ A`, the weight delta a merge adds.
    pub fn merged_delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// A created adapter: module name and its A/B (as `Var`s when trainable).
#[derive(Debug, Clone)]
pub struct AdapterEntry {
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
    pub a_var: Option<Var>,
    pub b_var: Option<Var>,
    /// False for a layer the model keeps but never runs ([`LoraFactory::register_unrun`]).
    pub runs: bool,
}

/// Creates adapters for the modules `spec` targets while a model is built, either freshly
/// initialised (seeded, in construction order) or from loaded weights (PEFT adapter or checkpoint),
/// and remembers them.
pub struct LoraFactory {
    pub spec: LoraSpec,
    matcher: ModuleMatcher,
    trainable: bool,
    init_rng: Mutex<ChaCha8Rng>,
    /// module name -> (A, B) loaded from disk; when present, used instead of initialising.
    loaded: HashMap<String, (Tensor, Tensor)>,
    runtime: Arc<LoraRuntime>,
    created: Mutex<Vec<AdapterEntry>>,
    /// What the A and B matrices are held in (f32 unless the reference's bf16 numerics).
    dtype: DType,
}

impl LoraFactory {
    pub fn new(spec: LoraSpec, trainable: bool, seed: u64) -> Result<Self> {
        spec.validate()?;
        Ok(Self {
            matcher: spec.matcher()?,
            spec,
            trainable,
            init_rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            loaded: HashMap::new(),
            runtime: LoraRuntime::new(seed.wrapping_add(1)),
            created: Mutex::new(Vec::new()),
            dtype: DType::F32,
        })
    }

    /// Hold the adapters in `dtype` (initialised in f32, then rounded once).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Use these weights (module name -> (A, B)) instead of initialising.
    pub fn with_loaded(mut self, loaded: HashMap<String, (Tensor, Tensor)>) -> Self {
        self.loaded = loaded;
        self
    }

    pub fn runtime(&self) -> Arc<LoraRuntime> {
        self.runtime.clone()
    }

    pub fn entries(&self) -> Vec<AdapterEntry> {
        self.created.lock().expect("poisoned").clone()
    }

    /// Modules with loaded weights that no layer of the model asked for.
    pub fn unused_loaded(&self) -> Vec<String> {
        let created = self.created.lock().expect("poisoned");
        let mut v: Vec<String> = self
            .loaded
            .keys()
            .filter(|m| !created.iter().any(|e| &e.module == *m))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Modules that got an adapter (their name matched `target_modules`) while loaded weights
    /// were given but held none for them: such an adapter would be a silent zero. Empty when
    /// nothing was loaded (fresh adapters). Layers that never run are not counted: an adapter
    /// written before they were recorded lacks them, and they change nothing.
    pub fn missing_loaded(&self) -> Vec<String> {
        if self.loaded.is_empty() {
            return Vec::new();
        }
        let created = self.created.lock().expect("poisoned");
        let mut v: Vec<String> = created
            .iter()
            .filter(|e| e.runs && !self.loaded.contains_key(&e.module))
            .map(|e| e.module.clone())
            .collect();
        v.sort();
        v
    }

    /// Called by every linear layer as it is built.
    pub fn adapter_for(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<Option<LoraAdapter>> {
        self.create(module, in_dim, out_dim, device, self.trainable, true)
    }

    /// Records an adapter for a linear layer the model keeps but never runs (CLIP layers past
    /// the deepest feature layer): PEFT adapts every module `target_modules` matches, so the
    /// adapter we write must hold it too, or PEFT warns about missing keys. It never gets a
    /// gradient, so it is frozen: initialised (or loaded) and written back unchanged.
    pub fn register_unrun(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<()> {
        self.create(module, in_dim, out_dim, device, false, false)
            .map(|_| ())
    }

    fn create(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
        trainable: bool,
        runs: bool,
    ) -> Result<Option<LoraAdapter>> {
        if !self.matcher.matches(module) {
            return Ok(None);
        }
        let r = self.spec.r;
        // Checked before anything is allocated from `r`: a rank above min(in, out) adds
        // nothing but memory.
        if r > in_dim.min(out_dim) {
            return Err(Error::Config {
                path: "lora".into(),
                key: "r".into(),
                reason: format!(
                    "r = {r} exceeds the rank of `{module}` ({out_dim}x{in_dim}); at most {}",
                    in_dim.min(out_dim)
                ),
            });
        }
        let (a, b) = match self.loaded.get(module) {
            Some((a, b)) => {
                if a.dims() != [r, in_dim] || b.dims() != [out_dim, r] {
                    return Err(Error::Weights(format!(
                        "LoRA weights for `{module}` have shapes A {:?} / B {:?}, expected [{r}, {in_dim}] / [{out_dim}, {r}]",
                        a.dims(),
                        b.dims()
                    )));
                }
                (
                    a.to_dtype(self.dtype)?.to_device(device)?,
                    b.to_dtype(self.dtype)?.to_device(device)?,
                )
            }
            None => {
                // kaiming_uniform_(a=√5) on [r, in]: bound = gain·√(3/fan_in), gain = √(2/(1+5)).
                let bound = (1.0 / in_dim as f64).sqrt();
                let mut rng = self.init_rng.lock().expect("poisoned");
                let v: Vec<f32> = (0..r * in_dim)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                (
                    Tensor::from_vec(v, (r, in_dim), device)?.to_dtype(self.dtype)?,
                    Tensor::zeros((out_dim, r), self.dtype, device)?,
                )
            }
        };
        let (a, b, a_var, b_var) = if trainable {
            let (av, bv) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            (
                av.as_tensor().clone(),
                bv.as_tensor().clone(),
                Some(av),
                Some(bv),
            )
        } else {
            (a, b, None, None)
        };
        self.created.lock().expect("poisoned").push(AdapterEntry {
            module: module.to_string(),
            a: a.clone(),
            b: b.clone(),
            a_var,
            b_var,
            runs,
        });
        Ok(Some(LoraAdapter {
            a,
            b,
            scale: self.spec.scale(),
            dropout: self.spec.dropout,
            runtime: self.runtime.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_target_matching() {
        let list = TargetModules::Suffixes(vec!["q_proj".into(), "v_proj".into()])
            .matcher()
            .unwrap();
        assert!(list.matches("model.language_model.layers.0.self_attn.q_proj"));
        assert!(list.matches("model.vision_tower.vision_model.encoder.layers.1.self_attn.v_proj"));
        assert!(list.matches("q_proj"));
        assert!(!list.matches("model.language_model.layers.0.self_attn.xq_proj"));
        assert!(!list.matches("model.language_model.layers.0.self_attn.o_proj"));
        let re = TargetModules::Pattern(
            r".*language_model.*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)".into(),
        )
        .matcher()
        .unwrap();
        assert!(re.matches("model.language_model.layers.12.mlp.up_proj"));
        assert!(!re.matches("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"));
        // Full match, not search.
        let re = TargetModules::Pattern("q_proj".into()).matcher().unwrap();
        assert!(!re.matches("model.language_model.layers.0.self_attn.q_proj"));
        let all = TargetModules::Pattern("all-linear".into())
            .matcher()
            .unwrap();
        assert!(all.matches("model.multi_modal_projector.linear_1") && !all.matches("lm_head"));
        assert!(TargetModules::Pattern("(".into()).matcher().is_err());
    }

    #[test]
    fn scale_and_init_follow_peft() {
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Suffixes(vec!["q".into()]),
            exclude_modules: None,
            use_rslora: false,
        };
        assert_eq!(spec.scale(), 2.0);
        assert_eq!(
            LoraSpec {
                use_rslora: true,
                ..spec.clone()
            }
            .scale(),
            4.0
        );
        let f = LoraFactory::new(spec, true, 0).unwrap();
        let ad = f.adapter_for("x.q", 16, 8, &Device::Cpu).unwrap().unwrap();
        let a = ad.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.25) && a.iter().any(|v| *v != 0.0));
        assert_eq!(
            ad.b.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(f.adapter_for("x.k", 16, 8, &Device::Cpu).unwrap().is_none());
        assert_eq!(f.entries().len(), 1);
    }
}
