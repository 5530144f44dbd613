//! Gradients detached from the graph, with accumulation and global-norm clipping.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::math_dtype;
use crate::error::{Error, Result};

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

    /// Takes the gradient of `name` out (e.g. to clip the others without it).
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.grads.remove(name)
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
