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

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

mod gradients;
#[cfg(test)]
mod tests;

pub use gradients::Gradients;

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
pub(crate) fn math_dtype(dtype: DType) -> Option<DType> {
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

impl AdamW {
    /// Keep each parameter's moments and update math in the parameter's own dtype (bf16 for
    /// bf16 parameters), as torch's AdamW does on bf16 parameters, instead of f32. Call before
    /// the first step.
    pub fn with_moments_in_param_dtype(mut self) -> Result<Self> {
        if self.num_steps > 0 {
            return Err(state_err(
                "moments can change dtype only before the first step",
            ));
        }
        for p in &mut self.params {
            let dtype = p.var.dtype();
            if dtype.is_float() && dtype != p.dtype {
                p.dtype = dtype;
                p.exp_avg = Tensor::zeros(p.var.shape(), dtype, p.var.device())?;
                p.exp_avg_sq = p.exp_avg.zeros_like()?;
            }
        }
        Ok(self)
    }
}

/// [`adamw_update`] for a parameter whose moments are kept in its own narrow dtype (bf16/f16),
/// op by op as torch's single-tensor AdamW runs on such tensors: every op computes in f32 and
/// rounds its result once to the narrow dtype (`mul_`, `lerp_`, `mul_` then `addcmul_`, `sqrt`,
/// the division, `add_`, `addcdiv_`).
fn adamw_update_narrow(
    cfg: &AdamWConfig,
    p: &ParamState,
    g: &Tensor,
    lr: f64,
    weight_decay: f64,
    t: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let narrow = p.dtype;
    let round = |x: Tensor| -> Result<Tensor> { Ok(x.to_dtype(narrow)?.to_dtype(DType::F32)?) };
    let wide = |x: &Tensor| -> Result<Tensor> { Ok(x.detach().to_dtype(DType::F32)?) };
    let g = round(wide(g)?)?;
    let mut x = wide(p.var.as_tensor())?;
    if weight_decay != 0.0 {
        x = round(x.affine(1.0 - lr * weight_decay, 0.0)?)?;
    }
    let m0 = wide(&p.exp_avg)?;
    let w = 1.0 - cfg.beta1;
    let diff = (&g - &m0)?;
    let m = round(if w.abs() < 0.5 {
        (&m0 + diff.affine(w, 0.0)?)?
    } else {
        (&g - diff.affine(1.0 - w, 0.0)?)?
    })?;
    let v = round(wide(&p.exp_avg_sq)?.affine(cfg.beta2, 0.0)?)?;
    let v = round((v + (g.affine(1.0 - cfg.beta2, 0.0)? * &g)?)?)?;
    let tf = t as f64;
    let step_size = lr / (1.0 - cfg.beta1.powf(tf));
    let bias_correction2_sqrt = (1.0 - cfg.beta2.powf(tf)).powf(0.5);
    let denom = round(v.sqrt()?)?;
    // A true division, as torch does (not a multiplication by the reciprocal).
    let bc2 = Tensor::new(bias_correction2_sqrt as f32, p.var.device())?;
    let denom = round(denom.broadcast_div(&bc2)?)?;
    let denom = round((denom + cfg.eps)?)?;
    let x = (x + (m.affine(-step_size, 0.0)? / &denom)?)?;
    Ok((
        x.to_dtype(p.var.dtype())?,
        m.to_dtype(narrow)?,
        v.to_dtype(narrow)?,
    ))
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
    if matches!(dt, DType::BF16 | DType::F16) {
        return adamw_update_narrow(cfg, p, g, lr, weight_decay, t);
    }
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
