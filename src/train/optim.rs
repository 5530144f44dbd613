//! AdamW with PyTorch semantics, param groups and resumable state; gradients detached from the
//! graph, with accumulation and global-norm clipping.
//!
//! The update is `torch.optim.AdamW`'s single-tensor path (`foreach=False`), op for op, per param
//! with `t` = that param's own step count:
//!
//! ```text
//! p *= 1 - lr*wd
//! m  = lerp(m, g, 1 - b1)                (= b1*m + (1-b1)*g)
//! v  = b2*v + ((1-b2)*g)*g
//! step_size = lr / (1 - b1^t)
//! denom = sqrt(v) / sqrt(1 - b2^t) + eps
//! p += (-step_size * m) / denom
//! ```
//!
//! Moments and the update math are f32 (f64 when the param is f64) whatever the param dtype;
//! a param that is not f32/f64 is converted, updated and written back in its own dtype. The update
//! builds no graph: it works on detached tensors and writes the result with `Var::set`.

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// AdamW hyper-parameters shared by all groups (torch defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamWConfig {
    /// torch's checks: `0 <= beta < 1`, `eps >= 0`.
    pub fn validate(&self) -> Result<()> {
        for (key, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad_cfg(key, format!("must be in [0, 1), got {b}")));
            }
        }
        if !self.eps.is_finite() || self.eps < 0.0 {
            return Err(bad_cfg(
                "eps",
                format!("must be finite and >= 0, got {}", self.eps),
            ));
        }
        Ok(())
    }
}

/// A set of params sharing weight decay and an lr multiplier.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    pub name: String,
    /// Decoupled weight decay: `p *= 1 - lr * weight_decay` before the Adam update.
    pub weight_decay: f64,
    /// Multiplies the scheduled lr passed to [`AdamW::step`] (1 by default).
    pub lr_scale: f64,
}

impl ParamGroup {
    /// A group with `lr_scale` 1.
    pub fn new(name: impl Into<String>, weight_decay: f64) -> Self {
        Self {
            name: name.into(),
            weight_decay,
            lr_scale: 1.0,
        }
    }
}

impl Default for ParamGroup {
    fn default() -> Self {
        Self::new("default", 0.0)
    }
}

fn bad_cfg(key: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        path: "optimizer".into(),
        key: key.into(),
        reason: reason.into(),
    }
}

fn state_err(reason: impl Into<String>) -> Error {
    Error::Model(format!("optimizer state: {}", reason.into()))
}

/// The dtype the update math and moments use for a param of dtype `dtype`.
fn math_dtype(dtype: DType) -> Option<DType> {
    match dtype {
        DType::F64 => Some(DType::F64),
        d if d.is_float() => Some(DType::F32),
        _ => None,
    }
}

/// Key of the global optimizer step count in [`AdamW::state_tensors`].
pub const NUM_STEPS_KEY: &str = "num_steps";

#[derive(Debug, Clone)]
struct ParamState {
    name: String,
    var: Var,
    group: usize,
    /// Dtype of the moments and the update math.
    dtype: DType,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW with PyTorch semantics; see the module docs.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<ParamGroup>,
    params: Vec<ParamState>,
    index: HashMap<String, usize>,
    num_steps: u64,
}

impl AdamW {
    /// params: (unique name, Var, group index). Moments are f32 (or f64 if the var is f64)
    /// whatever the param dtype, zero-initialised on the param's device.
    ///
    /// Errors on invalid hyper-parameters, a negative or non-finite group `weight_decay` /
    /// `lr_scale`, a duplicate name, the same Var under two names, a group index out of range or
    /// a non-float param.
    pub fn new(
        cfg: AdamWConfig,
        groups: Vec<ParamGroup>,
        params: Vec<(String, Var, usize)>,
    ) -> Result<Self> {
        cfg.validate()?;
        for g in &groups {
            if !g.weight_decay.is_finite() || g.weight_decay < 0.0 {
                return Err(bad_cfg(
                    "weight_decay",
                    format!(
                        "group `{}`: must be finite and >= 0, got {}",
                        g.name, g.weight_decay
                    ),
                ));
            }
            if !g.lr_scale.is_finite() || g.lr_scale < 0.0 {
                return Err(bad_cfg(
                    "lr_scale",
                    format!(
                        "group `{}`: must be finite and >= 0, got {}",
                        g.name, g.lr_scale
                    ),
                ));
            }
        }
        let mut index = HashMap::with_capacity(params.len());
        let mut ids = HashSet::with_capacity(params.len());
        let mut states = Vec::with_capacity(params.len());
        for (name, var, group) in params {
            if group >= groups.len() {
                return Err(Error::Model(format!(
                    "optimizer: param `{name}` is in group {group}, but there are {} groups",
                    groups.len()
                )));
            }
            if index.contains_key(&name) {
                return Err(Error::Model(format!(
                    "optimizer: param name `{name}` given twice"
                )));
            }
            if !ids.insert(var.as_tensor().id()) {
                return Err(Error::Model(format!(
                    "optimizer: param `{name}` is a Var already given under another name"
                )));
            }
            let Some(dtype) = math_dtype(var.dtype()) else {
                return Err(Error::Model(format!(
                    "optimizer: param `{name}` has non-float dtype {:?}",
                    var.dtype()
                )));
            };
            let exp_avg = Tensor::zeros(var.shape(), dtype, var.device())?;
            let exp_avg_sq = exp_avg.zeros_like()?;
            index.insert(name.clone(), states.len());
            states.push(ParamState {
                name,
                var,
                group,
                dtype,
                exp_avg,
                exp_avg_sq,
                step: 0,
            });
        }
        Ok(Self {
            cfg,
            groups,
            params: states,
            index,
            num_steps: 0,
        })
    }

    /// One step at learning rate `lr` (times the group's `lr_scale`). A param with no gradient is
    /// skipped entirely (no weight decay, its step count does not advance), like
    /// `torch.optim.AdamW`.
    ///
    /// Errors, before anything is updated, on a negative or non-finite `lr`, a gradient for a name
    /// the optimizer does not hold, or a gradient whose shape differs from its param's.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::Model(format!(
                "optimizer: learning rate must be finite and >= 0, got {lr}"
            )));
        }
        for (name, g) in grads.iter() {
            let Some(&i) = self.index.get(name) else {
                return Err(Error::Model(format!(
                    "optimizer: gradient for unknown param `{name}`"
                )));
            };
            let p = &self.params[i];
            if g.dims() != p.var.dims() {
                return Err(Error::Model(format!(
                    "optimizer: gradient of `{name}` has shape {:?}, the param {:?}",
                    g.dims(),
                    p.var.dims()
                )));
            }
        }
        let cfg = self.cfg;
        for p in self.params.iter_mut() {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let group = &self.groups[p.group];
            let t = p.step + 1;
            if p.var.elem_count() > 0 {
                let (x, m, v) =
                    adamw_update(&cfg, p, g, lr * group.lr_scale, group.weight_decay, t)?;
                p.var.set(&x)?;
                p.exp_avg = m;
                p.exp_avg_sq = v;
            }
            p.step = t;
        }
        self.num_steps += 1;
        Ok(())
    }

    /// (name, Var) of every param, in the order given to [`AdamW::new`].
    pub fn params(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect()
    }

    /// Optimizer steps taken (calls of [`AdamW::step`] that succeeded), restored by
    /// [`AdamW::load_state_tensors`].
    pub fn num_steps(&self) -> u64 {
        self.num_steps
    }

    /// Steps taken by one param (the `t` of its bias correction); `None` for an unknown name.
    pub fn param_step(&self, name: &str) -> Option<u64> {
        self.index.get(name).map(|&i| self.params[i].step)
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Everything needed to resume: for every param `exp_avg.{name}`, `exp_avg_sq.{name}`
    /// (param shape, f32 or f64, on the param's device) and `step.{name}` (scalar i64), plus
    /// [`NUM_STEPS_KEY`] (scalar i64). The tensors are snapshots: later steps do not change them.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(3 * self.params.len() + 1);
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
            out.insert(
                format!("step.{}", p.name),
                Tensor::new(count_to_i64(p.step)?, p.var.device())?,
            );
        }
        out.insert(
            NUM_STEPS_KEY.to_string(),
            Tensor::new(count_to_i64(self.num_steps)?, &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] returned (possibly through a safetensors file).
    /// Moments are converted to the moment dtype and moved to the param's device; step counts may
    /// be any integer-valued scalar (one element) tensor.
    ///
    /// All-or-nothing: errors name the missing key, the unexpected key, the param whose moment
    /// shape does not match, or the bad step value, and leave the optimizer unchanged.
    pub fn load_state_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            state
                .get(key)
                .ok_or_else(|| state_err(format!("missing key `{key}`")))
        };
        let mut expected: HashSet<String> = HashSet::with_capacity(3 * self.params.len() + 1);
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut moment = |prefix: &str| -> Result<Tensor> {
                let key = format!("{prefix}.{}", p.name);
                let t = get(&key)?;
                if t.dims() != p.var.dims() {
                    return Err(state_err(format!(
                        "`{key}` has shape {:?}, but param `{}` has shape {:?}",
                        t.dims(),
                        p.name,
                        p.var.dims()
                    )));
                }
                if !t.dtype().is_float() {
                    return Err(state_err(format!(
                        "`{key}` has non-float dtype {:?}",
                        t.dtype()
                    )));
                }
                expected.insert(key);
                // A fresh copy: the caller's tensors and ours never share storage.
                Ok(t.to_device(p.var.device())?
                    .to_dtype(p.dtype)?
                    .contiguous()?
                    .copy()?)
            };
            let m = moment("exp_avg")?;
            let v = moment("exp_avg_sq")?;
            let key = format!("step.{}", p.name);
            let step = scalar_count(&key, get(&key)?)?;
            expected.insert(key);
            loaded.push((m, v, step));
        }
        let num_steps = scalar_count(NUM_STEPS_KEY, get(NUM_STEPS_KEY)?)?;
        expected.insert(NUM_STEPS_KEY.to_string());
        if let Some(extra) = state.keys().filter(|k| !expected.contains(*k)).min() {
            return Err(state_err(format!(
                "unexpected key `{extra}` (no such param in this optimizer)"
            )));
        }
        for (p, (m, v, step)) in self.params.iter_mut().zip(loaded) {
            p.exp_avg = m;
            p.exp_avg_sq = v;
            p.step = step;
        }
        self.num_steps = num_steps;
        Ok(())
    }
}

fn count_to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| state_err(format!("step count {n} does not fit in i64")))
}

/// A non-negative integer from a one-element tensor of any dtype.
fn scalar_count(key: &str, t: &Tensor) -> Result<u64> {
    if t.elem_count() != 1 {
        return Err(state_err(format!(
            "`{key}` must hold one value, has shape {:?}",
            t.dims()
        )));
    }
    let t = t.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
    let bad = |v: String| state_err(format!("`{key}` must be a non-negative integer, got {v}"));
    match t.dtype() {
        DType::I64 => {
            let v = t.to_vec1::<i64>()?[0];
            u64::try_from(v).map_err(|_| bad(v.to_string()))
        }
        DType::U32 => Ok(u64::from(t.to_vec1::<u32>()?[0])),
        DType::U8 => Ok(u64::from(t.to_vec1::<u8>()?[0])),
        d if d.is_float() => {
            let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
            // Exactly representable integers only (f32 holds counts up to 2^24 exactly).
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 9.0e15 {
                Ok(v as u64)
            } else {
                Err(bad(v.to_string()))
            }
        }
        d => Err(state_err(format!("`{key}` has unsupported dtype {d:?}"))),
    }
}

/// torch's single-tensor AdamW for one param; returns (new param in the param dtype, m, v).
fn adamw_update(
    cfg: &AdamWConfig,
    p: &ParamState,
    g: &Tensor,
    lr: f64,
    weight_decay: f64,
    t: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dt = p.dtype;
    let dev = p.var.device();
    let g = g.detach().to_dtype(dt)?;
    let mut x = p.var.as_tensor().detach().to_dtype(dt)?;
    if weight_decay != 0.0 {
        // torch: param.mul_(1 - lr * weight_decay) (a no-op multiply by 1 when wd is 0).
        x = x.affine(1.0 - lr * weight_decay, 0.0)?;
    }
    // exp_avg.lerp_(grad, 1 - beta1), with torch's two-sided lerp formula.
    let w = 1.0 - cfg.beta1;
    let diff = (&g - &p.exp_avg)?;
    let m = if w.abs() < 0.5 {
        (&p.exp_avg + diff.affine(w, 0.0)?)?
    } else {
        (&g - diff.affine(1.0 - w, 0.0)?)?
    };
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v = (p.exp_avg_sq.affine(cfg.beta2, 0.0)? + (g.affine(1.0 - cfg.beta2, 0.0)? * &g)?)?;
    // Python floats: beta ** step (pow), bias_correction2 ** 0.5.
    let tf = t as f64;
    let bias_correction1 = 1.0 - cfg.beta1.powf(tf);
    let bias_correction2 = 1.0 - cfg.beta2.powf(tf);
    let step_size = lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    // (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): a true division, as torch does.
    let bc2 = Tensor::new(bias_correction2_sqrt, dev)?.to_dtype(dt)?;
    let denom = (v.sqrt()?.broadcast_div(&bc2)? + cfg.eps)?;
    // param.addcdiv_(exp_avg, denom, value=-step_size): p + (value * m) / denom.
    let x = (x + (m.affine(-step_size, 0.0)? / &denom)?)?;
    let x = x.to_dtype(p.var.dtype())?;
    Ok((x, m, v))
}

/// Gradients by param name, detached from the graph, in f32 (f64 for f64 params) whatever the
/// param dtype; supports accumulation across micro-batches.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    grads: BTreeMap<String, Tensor>,
}

impl Gradients {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the grads of `params` out of a backward pass (params without a grad are absent).
    /// Errors on a duplicate name.
    pub fn from_store(params: &[(String, Var)], store: &GradStore) -> Result<Self> {
        let mut out = Self::new();
        for (name, var) in params {
            if out.grads.contains_key(name) {
                return Err(Error::Model(format!(
                    "gradients: param name `{name}` given twice"
                )));
            }
            if let Some(g) = store.get(var.as_tensor()) {
                out.insert(name.clone(), g)?;
            }
        }
        Ok(out)
    }

    /// Sets (replaces) the gradient of `name`: detached, converted to f32 (f64 stays f64).
    /// Errors on a non-float tensor.
    pub fn insert(&mut self, name: impl Into<String>, grad: &Tensor) -> Result<()> {
        let name = name.into();
        let Some(dt) = math_dtype(grad.dtype()) else {
            return Err(Error::Model(format!(
                "gradients: `{name}` has non-float dtype {:?}",
                grad.dtype()
            )));
        };
        self.grads.insert(name, grad.detach().to_dtype(dt)?);
        Ok(())
    }

    /// Adds `other` into `self` (a name only in `other` is moved over). Errors, before changing
    /// anything, on a name whose shapes differ.
    pub fn accumulate(&mut self, other: Gradients) -> Result<()> {
        for (name, g) in &other.grads {
            if let Some(mine) = self.grads.get(name) {
                if mine.dims() != g.dims() {
                    return Err(Error::Model(format!(
                        "gradients: cannot accumulate `{name}`: shape {:?} into {:?}",
                        g.dims(),
                        mine.dims()
                    )));
                }
            }
        }
        for (name, g) in other.grads {
            match self.grads.get_mut(&name) {
                Some(mine) => *mine = (&*mine + g.to_dtype(mine.dtype())?)?,
                None => {
                    self.grads.insert(name, g);
                }
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor` (e.g. 1 / accumulation steps). Errors on a non-finite
    /// factor.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        if !factor.is_finite() {
            return Err(Error::Model(format!(
                "gradients: scale factor must be finite, got {factor}"
            )));
        }
        self.scale_unchecked(factor)
    }

    fn scale_unchecked(&mut self, factor: f64) -> Result<()> {
        if factor == 1.0 {
            return Ok(());
        }
        for g in self.grads.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.grads.get(name)
    }

    /// (name, gradient) in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.grads.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.grads.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// `torch.nn.utils.clip_grad_norm_` over all held gradients: total L2 norm `n`,
    /// `clip_coef = max_norm / (n + 1e-6)`, grads `*= min(clip_coef, 1)`. Returns the pre-clip
    /// total norm. As in torch, a non-finite norm is not an error: the grads then become
    /// NaN/zero, so check the returned norm before stepping. Errors on a negative or NaN
    /// `max_norm`.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        if max_norm.is_nan() || max_norm < 0.0 {
            return Err(Error::Model(format!(
                "gradients: max_norm must be >= 0, got {max_norm}"
            )));
        }
        let total = self.global_norm()?;
        let coef = max_norm / (total + 1e-6);
        // torch.clamp(coef, max=1) keeps NaN.
        let coef = if coef.is_nan() { coef } else { coef.min(1.0) };
        self.scale_unchecked(coef)?;
        Ok(total)
    }

    /// Total L2 norm of all held gradients (0 when empty): per-tensor sums of squares in the
    /// gradient dtype, combined in f64 (one device-to-host transfer).
    pub fn global_norm(&self) -> Result<f64> {
        if self.grads.is_empty() {
            return Ok(0.0);
        }
        let sums = self
            .grads
            .values()
            .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let sums = Tensor::stack(&sums, 0)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f64>()?;
        Ok(sums.iter().sum::<f64>().sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(vals: &[f64], dtype: DType) -> Var {
        Var::from_tensor(
            &Tensor::from_slice(vals, vals.len(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    fn grads(items: &[(&str, &[f64])]) -> Gradients {
        let mut g = Gradients::new();
        for (n, v) in items {
            g.insert(*n, &Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap())
                .unwrap();
        }
        g
    }

    fn model_msg(err: Error) -> String {
        match err {
            Error::Model(m) => m,
            other => panic!("expected Error::Model, got {other}"),
        }
    }

    /// torch's formula in plain f64.
    struct Reference {
        p: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
        t: i32,
    }

    impl Reference {
        fn step(&mut self, cfg: &AdamWConfig, g: &[f64], lr: f64, wd: f64) {
            self.t += 1;
            let bc1 = 1.0 - cfg.beta1.powf(self.t as f64);
            let bc2 = 1.0 - cfg.beta2.powf(self.t as f64);
            for (i, &g) in g.iter().enumerate() {
                self.p[i] *= 1.0 - lr * wd;
                self.m[i] = cfg.beta1 * self.m[i] + (1.0 - cfg.beta1) * g;
                self.v[i] = cfg.beta2 * self.v[i] + (1.0 - cfg.beta2) * g * g;
                let denom = self.v[i].sqrt() / bc2.sqrt() + cfg.eps;
                self.p[i] -= lr / bc1 * self.m[i] / denom;
            }
        }
    }

    #[test]
    fn f64_param_matches_the_torch_formula() {
        let cfg = AdamWConfig::default();
        let init = [0.5, -1.0, 2.0];
        let x = var(&init, DType::F64);
        let mut opt = AdamW::new(
            cfg,
            vec![ParamGroup::new("g", 0.1)],
            vec![("x".into(), x.clone(), 0)],
        )
        .unwrap();
        let mut r = Reference {
            p: init.to_vec(),
            m: vec![0.0; 3],
            v: vec![0.0; 3],
            t: 0,
        };
        let gs: [[f64; 3]; 3] = [[0.1, -0.2, 0.3], [1.0, 0.5, -0.25], [-0.3, 0.0, 2.0]];
        for (i, g) in gs.iter().enumerate() {
            let lr = 0.01 * (i + 1) as f64;
            opt.step(&grads(&[("x", g)]), lr).unwrap();
            r.step(&cfg, g, lr, 0.1);
        }
        let got = vals(x.as_tensor());
        for (a, b) in got.iter().zip(&r.p) {
            assert!((a - b).abs() < 1e-14, "{got:?} vs {:?}", r.p);
        }
        let st = opt.state_tensors().unwrap();
        assert_eq!(st["exp_avg.x"].dtype(), DType::F64);
        for (a, b) in vals(&st["exp_avg_sq.x"]).iter().zip(&r.v) {
            assert!((a - b).abs() < 1e-15);
        }
        assert_eq!(opt.num_steps(), 3);
        assert_eq!(opt.param_step("x"), Some(3));
    }

    #[test]
    fn param_without_grad_is_skipped_entirely() {
        let a = var(&[1.0, 2.0], DType::F32);
        let b = var(&[3.0, 4.0], DType::F32);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![ParamGroup::new("decay", 0.5)],
            vec![("a".into(), a.clone(), 0), ("b".into(), b.clone(), 0)],
        )
        .unwrap();
        opt.step(&grads(&[("a", &[1.0, 1.0])]), 0.1).unwrap();
        assert_eq!(
            vals(b.as_tensor()),
            vec![3.0, 4.0],
            "no weight decay either"
        );
        assert_ne!(vals(a.as_tensor()), vec![1.0, 2.0]);
        assert_eq!(opt.param_step("a"), Some(1));
        assert_eq!(opt.param_step("b"), Some(0));
        assert_eq!(opt.num_steps(), 1);
        // An empty gradient set still counts as an optimizer step and changes nothing.
        opt.step(&Gradients::new(), 0.1).unwrap();
        assert_eq!(opt.num_steps(), 2);
        assert_eq!(opt.param_step("a"), Some(1));
    }

    #[test]
    fn lr_scale_and_zero_lr() {
        let a = var(&[1.0], DType::F32);
        let b = var(&[1.0], DType::F32);
        let mut g0 = ParamGroup::new("full", 0.0);
        g0.lr_scale = 1.0;
        let mut g1 = ParamGroup::new("half", 0.0);
        g1.lr_scale = 0.5;
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![g0, g1],
            vec![("a".into(), a.clone(), 0), ("b".into(), b.clone(), 1)],
        )
        .unwrap();
        // lr 0: params stay, moments and step counts still advance (torch).
        opt.step(&grads(&[("a", &[1.0]), ("b", &[1.0])]), 0.0)
            .unwrap();
        assert_eq!(vals(a.as_tensor()), vec![1.0]);
        assert_eq!(opt.param_step("b"), Some(1));
        opt.step(&grads(&[("a", &[1.0]), ("b", &[1.0])]), 0.1)
            .unwrap();
        // Adam's first steps move by about lr (m / sqrt(v) = 1 for a constant grad).
        let da = 1.0 - vals(a.as_tensor())[0];
        let db = 1.0 - vals(b.as_tensor())[0];
        assert!((da - 0.1).abs() < 1e-6, "{da}");
        assert!((db - 0.05).abs() < 1e-6, "{db}");
    }

    #[test]
    fn half_precision_param_keeps_f32_moments() {
        let x = var(&[1.0, -1.0], DType::BF16);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![ParamGroup::default()],
            vec![("x".into(), x.clone(), 0)],
        )
        .unwrap();
        let mut g = Gradients::new();
        g.insert(
            "x",
            &Tensor::new(&[0.5f32, -0.5], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(g.get("x").unwrap().dtype(), DType::F32);
        opt.step(&g, 0.25).unwrap();
        assert_eq!(x.dtype(), DType::BF16);
        assert_eq!(vals(x.as_tensor()), vec![0.75, -0.75]);
        let st = opt.state_tensors().unwrap();
        assert_eq!(st["exp_avg.x"].dtype(), DType::F32);
        assert_eq!(st["exp_avg_sq.x"].dtype(), DType::F32);
        assert_eq!(st["step.x"].dtype(), DType::I64);
    }

    #[test]
    fn update_builds_no_graph() {
        let x = var(&[1.0, 2.0], DType::F32);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![ParamGroup::default()],
            vec![("x".into(), x.clone(), 0)],
        )
        .unwrap();
        for _ in 0..2 {
            let loss = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
            let store = loss.backward().unwrap();
            let g = Gradients::from_store(&opt.params(), &store).unwrap();
            assert_eq!(vals(g.get("x").unwrap()), vec![3.0, 3.0]);
            opt.step(&g, 0.1).unwrap();
        }
        // The moments do not depend on the var: a backward from them yields no grad for it.
        let st = opt.state_tensors().unwrap();
        let store = st["exp_avg.x"].sum_all().unwrap().backward().unwrap();
        assert!(store.get(x.as_tensor()).is_none());
        assert!(x.as_tensor().is_variable());
    }

    #[test]
    fn new_rejects_bad_input() {
        let x = var(&[1.0], DType::F32);
        let groups = || vec![ParamGroup::default()];
        let err = AdamW::new(
            AdamWConfig::default(),
            groups(),
            vec![("x".into(), x.clone(), 1)],
        )
        .unwrap_err();
        assert!(model_msg(err).contains("`x` is in group 1"));
        let y = var(&[1.0], DType::F32);
        let err = AdamW::new(
            AdamWConfig::default(),
            groups(),
            vec![("x".into(), x.clone(), 0), ("x".into(), y, 0)],
        )
        .unwrap_err();
        assert!(model_msg(err).contains("`x` given twice"));
        let err = AdamW::new(
            AdamWConfig::default(),
            groups(),
            vec![("x".into(), x.clone(), 0), ("x2".into(), x.clone(), 0)],
        )
        .unwrap_err();
        assert!(model_msg(err).contains("`x2`"));
        let ints = Var::from_tensor(&Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
        let err = AdamW::new(
            AdamWConfig::default(),
            groups(),
            vec![("ids".into(), ints, 0)],
        )
        .unwrap_err();
        assert!(model_msg(err).contains("`ids` has non-float dtype"));
        let cfg = AdamWConfig {
            beta2: 1.0,
            ..AdamWConfig::default()
        };
        let err = AdamW::new(cfg, groups(), vec![]).unwrap_err();
        assert!(matches!(err, Error::Config { key, .. } if key == "beta2"));
        let err = AdamW::new(
            AdamWConfig::default(),
            vec![ParamGroup::new("g", -0.1)],
            vec![],
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::Config { key, reason, .. } if key == "weight_decay" && reason.contains("`g`"))
        );
    }

    #[test]
    fn step_rejects_bad_input_without_updating() {
        let x = var(&[1.0, 2.0], DType::F32);
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![ParamGroup::default()],
            vec![("x".into(), x.clone(), 0)],
        )
        .unwrap();
        let err = opt
            .step(&grads(&[("x", &[1.0, 1.0]), ("nope", &[1.0])]), 0.1)
            .unwrap_err();
        assert!(model_msg(err).contains("unknown param `nope`"));
        let err = opt.step(&grads(&[("x", &[1.0])]), 0.1).unwrap_err();
        assert!(model_msg(err).contains("gradient of `x` has shape [1]"));
        for lr in [-0.1, f64::NAN, f64::INFINITY] {
            assert!(opt.step(&grads(&[("x", &[1.0, 1.0])]), lr).is_err());
        }
        assert_eq!(vals(x.as_tensor()), vec![1.0, 2.0]);
        assert_eq!(opt.num_steps(), 0);
        assert_eq!(opt.param_step("x"), Some(0));
    }

    fn two_param_opt() -> (AdamW, Var, Var) {
        let a = var(&[1.0, 2.0], DType::F32);
        let b = var(&[3.0], DType::F32);
        let opt = AdamW::new(
            AdamWConfig::default(),
            vec![ParamGroup::new("d", 0.01)],
            vec![("a".into(), a.clone(), 0), ("b".into(), b.clone(), 0)],
        )
        .unwrap();
        (opt, a, b)
    }

    #[test]
    fn state_round_trip_and_errors_name_the_key() {
        let (mut opt, _, _) = two_param_opt();
        opt.step(&grads(&[("a", &[0.5, -0.5]), ("b", &[2.0])]), 0.1)
            .unwrap();
        opt.step(&grads(&[("a", &[0.1, 0.2])]), 0.1).unwrap();
        let state = opt.state_tensors().unwrap();
        assert_eq!(state.len(), 7);

        let (mut fresh, _, _) = two_param_opt();
        fresh.load_state_tensors(&state).unwrap();
        assert_eq!(fresh.num_steps(), 2);
        assert_eq!(fresh.param_step("a"), Some(2));
        assert_eq!(fresh.param_step("b"), Some(1));
        let again = fresh.state_tensors().unwrap();
        for (k, v) in &state {
            assert_eq!(vals(v), vals(&again[k]), "{k}");
        }

        let err_of = |edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
            let mut s = state.clone();
            edit(&mut s);
            let (mut o, _, _) = two_param_opt();
            let msg = model_msg(o.load_state_tensors(&s).unwrap_err());
            // Nothing was loaded.
            assert_eq!(o.num_steps(), 0);
            assert_eq!(o.param_step("a"), Some(0));
            msg
        };
        assert!(err_of(&|s| {
            s.remove("exp_avg_sq.b");
        })
        .contains("missing key `exp_avg_sq.b`"));
        assert!(err_of(&|s| {
            s.remove(NUM_STEPS_KEY);
        })
        .contains("missing key `num_steps`"));
        assert!(err_of(&|s| {
            s.insert(
                "exp_avg.c".into(),
                Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
            );
        })
        .contains("unexpected key `exp_avg.c`"));
        let msg = err_of(&|s| {
            s.insert(
                "exp_avg.a".into(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            );
        });
        assert!(
            msg.contains("`exp_avg.a` has shape [3]") && msg.contains("param `a`"),
            "{msg}"
        );
        assert!(err_of(&|s| {
            s.insert("step.a".into(), Tensor::new(-1i64, &Device::Cpu).unwrap());
        })
        .contains("`step.a` must be a non-negative integer"));
        assert!(err_of(&|s| {
            s.insert("step.a".into(), Tensor::new(1.5f32, &Device::Cpu).unwrap());
        })
        .contains("`step.a` must be a non-negative integer"));
        assert!(err_of(&|s| {
            s.insert(
                "step.b".into(),
                Tensor::new(&[1i64, 2], &Device::Cpu).unwrap(),
            );
        })
        .contains("`step.b` must hold one value"));

        // Steps stored as f32 (torch's own dtype) or u32 load too.
        let mut s = state.clone();
        s.insert("step.a".into(), Tensor::new(2f32, &Device::Cpu).unwrap());
        s.insert("step.b".into(), Tensor::new(&[1u32], &Device::Cpu).unwrap());
        let (mut o, _, _) = two_param_opt();
        o.load_state_tensors(&s).unwrap();
        assert_eq!(o.param_step("a"), Some(2));
        assert_eq!(o.param_step("b"), Some(1));
    }

    #[test]
    fn gradients_from_store_accumulate_scale() {
        let a = var(&[1.0, 2.0], DType::F32);
        let b = var(&[3.0], DType::F32);
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let loss = (a.as_tensor() * 2.0).unwrap().sum_all().unwrap();
        let g1 = Gradients::from_store(&params, &loss.backward().unwrap()).unwrap();
        assert_eq!(g1.len(), 1, "b took no part: absent");
        assert!(g1.get("b").is_none());
        let loss = (a.as_tensor() * b.as_tensor().broadcast_as(2).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g2 = Gradients::from_store(&params, &loss.backward().unwrap()).unwrap();
        let mut acc = g1.clone();
        acc.accumulate(g2).unwrap();
        assert_eq!(vals(acc.get("a").unwrap()), vec![5.0, 5.0]);
        assert_eq!(vals(acc.get("b").unwrap()), vec![3.0]);
        acc.scale(0.5).unwrap();
        assert_eq!(vals(acc.get("a").unwrap()), vec![2.5, 2.5]);
        assert!(acc.scale(f64::NAN).is_err());
        let err = acc.accumulate(grads(&[("a", &[1.0])])).unwrap_err();
        assert!(model_msg(err).contains("cannot accumulate `a`"));
        assert_eq!(vals(acc.get("a").unwrap()), vec![2.5, 2.5]);
        let dup = vec![("a".to_string(), a.clone()), ("a".to_string(), b)];
        let store = loss.backward().unwrap();
        assert!(
            model_msg(Gradients::from_store(&dup, &store).unwrap_err()).contains("`a` given twice")
        );
        let ints = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        assert!(Gradients::new().insert("i", &ints).is_err());
    }

    #[test]
    fn clipping_follows_torch() {
        let mut g = grads(&[("a", &[3.0, 0.0]), ("b", &[4.0])]);
        assert_eq!(g.global_norm().unwrap(), 5.0);
        let n = g.clip_global_norm(1.0).unwrap();
        assert_eq!(n, 5.0);
        let coef = 1.0 / (5.0 + 1e-6);
        let a = vals(g.get("a").unwrap());
        assert!((a[0] - 3.0 * coef).abs() < 1e-7);
        assert!((g.global_norm().unwrap() - 5.0 * coef).abs() < 1e-6);
        // Below the threshold: untouched.
        let mut g = grads(&[("a", &[0.3]), ("b", &[0.4])]);
        assert!((g.clip_global_norm(1.0).unwrap() - 0.5).abs() < 1e-7);
        assert_eq!(vals(g.get("a").unwrap()), vec![0.3], "f64 grads stay f64");
        // Empty: norm 0, nothing to do.
        let mut e = Gradients::new();
        assert_eq!(e.clip_global_norm(1.0).unwrap(), 0.0);
        assert!(e.is_empty());
        assert!(g.clip_global_norm(-1.0).is_err());
        assert!(g.clip_global_norm(f64::NAN).is_err());
        // Non-finite norm: returned, not an error (torch's error_if_nonfinite=False).
        let mut g = grads(&[("a", &[f64::INFINITY, 1.0])]);
        assert!(g.clip_global_norm(1.0).unwrap().is_infinite());
    }

    #[test]
    fn zero_sized_param_is_fine() {
        let x =
            Var::from_tensor(&Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            AdamWConfig::default(),
            vec![ParamGroup::default()],
            vec![("x".into(), x, 0)],
        )
        .unwrap();
        let mut g = Gradients::new();
        g.insert(
            "x",
            &Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        opt.step(&g, 0.1).unwrap();
        assert_eq!(opt.param_step("x"), Some(1));
        assert_eq!(g.global_norm().unwrap(), 0.0);
    }
}
