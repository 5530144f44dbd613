//! Momentum proxy instruction (METHOD.md): N learnable vectors take the place of the instruction
//! in the user turn of every training sample. In the warm-up stage only they train; in the main
//! stage they are reset to their exponential moving average before every optimizer step and the
//! average is updated after it, so they drift by only (1-m) of each step and act as a nearly fixed
//! "instruction" while the model adapts. They are never used at inference.
//!
//! Model-agnostic: the vectors are rows handed to a model's embedding-injection hook.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::train::checkpoint::{load_float_safetensors, save_safetensors};

/// Tensor names in `proxy.safetensors`.
pub const PROXY_KEY: &str = "proxy";
pub const PROXY_EMA_KEY: &str = "proxy_ema";
/// The reference initialisation bound, 1/√768 (its linear layer's fan-in).
pub const REFERENCE_BOUND: f64 = 0.036_084_391_824_351_615;

/// The N proxy vectors `P` (trainable) and, in momentum mode, their moving average `E`.
#[derive(Debug)]
pub struct ProxyInstruction {
    var: Var,
    ema: Option<Tensor>,
    momentum: Option<f64>,
}

impl ProxyInstruction {
    /// `U(-bound, bound)` from a seeded generator.
    pub fn uniform(
        tokens: usize,
        hidden: usize,
        bound: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if tokens == 0 {
            return Err(Error::Model(
                "the proxy instruction needs at least one token".into(),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..tokens * hidden)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        Self::from_tensor(Tensor::from_vec(v, (tokens, hidden), device)?)
    }

    /// Start from given rows `[N, hidden]` (e.g. the embeddings of an instruction text).
    pub fn from_tensor(rows: Tensor) -> Result<Self> {
        let rows = rows.to_dtype(DType::F32)?.detach();
        rows.dims2()?;
        Ok(Self {
            var: Var::from_tensor(&rows)?,
            ema: None,
            momentum: None,
        })
    }

    /// Rows for `init_text`: the text's token embeddings, cycled or cut to `tokens` rows.
    pub fn from_text_embeddings(embeddings: &Tensor, tokens: usize) -> Result<Self> {
        let n = embeddings.dim(0)?;
        if n == 0 {
            return Err(Error::Model("proxy init_text tokenizes to nothing".into()));
        }
        let idx: Vec<u32> = (0..tokens).map(|i| (i % n) as u32).collect();
        let idx = Tensor::from_vec(idx, tokens, embeddings.device())?;
        Self::from_tensor(embeddings.index_select(&idx, 0)?)
    }

    pub fn var(&self) -> &Var {
        &self.var
    }

    pub fn tokens(&self) -> usize {
        self.var.dim(0).unwrap_or(0)
    }

    pub fn hidden(&self) -> usize {
        self.var.dim(1).unwrap_or(0)
    }

    pub fn ema(&self) -> Option<&Tensor> {
        self.ema.as_ref()
    }

    /// Switch on momentum mode: the average starts as a copy of the current vectors.
    pub fn enable_momentum(&mut self, m: f64) -> Result<()> {
        if !(0.0..1.0).contains(&m) {
            return Err(Error::Model(format!(
                "proxy momentum {m} must be in [0, 1)"
            )));
        }
        if self.ema.is_none() {
            self.ema = Some(self.var.as_tensor().detach().copy()?);
        }
        self.momentum = Some(m);
        Ok(())
    }

    /// Before a step: P ← E (no-op without momentum).
    pub fn before_step(&self) -> Result<()> {
        if let (Some(ema), Some(_)) = (&self.ema, self.momentum) {
            self.var.set(ema)?;
        }
        Ok(())
    }

    /// After a step: E ← m·E + (1-m)·P (no-op without momentum).
    pub fn after_step(&mut self) -> Result<()> {
        if let (Some(ema), Some(m)) = (&self.ema, self.momentum) {
            let p = self.var.as_tensor().detach();
            self.ema = Some(((ema * m)? + (p * (1.0 - m))?)?);
        }
        Ok(())
    }

    /// `[b·N, hidden]`: the vectors once per sample, differentiable with respect to P.
    pub fn rows_for_batch(&self, batch: usize) -> Result<Tensor> {
        let n = self.tokens();
        let idx: Vec<u32> = (0..batch).flat_map(|_| 0..n as u32).collect();
        let idx = Tensor::from_vec(idx, batch * n, self.var.device())?;
        Ok(self.var.as_tensor().index_select(&idx, 0)?)
    }

    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut map = HashMap::new();
        map.insert(PROXY_KEY.to_string(), self.var.as_tensor().detach());
        if let Some(e) = &self.ema {
            map.insert(PROXY_EMA_KEY.to_string(), e.clone());
        }
        Ok(map)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_safetensors(path, &self.tensors()?, &HashMap::new())
    }

    /// Load `proxy` (and `proxy_ema` if present) from a file written by [`ProxyInstruction::save`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let map = load_float_safetensors(path, device)?;
        let p = map.get(PROXY_KEY).ok_or_else(|| {
            Error::Weights(format!("{} has no `{PROXY_KEY}` tensor", path.display()))
        })?;
        let mut out = Self::from_tensor(p.clone())?;
        if let Some(e) = map.get(PROXY_EMA_KEY) {
            if e.dims() != p.dims() {
                return Err(Error::Weights(format!(
                    "{}: `{PROXY_EMA_KEY}` has shape {:?}, `{PROXY_KEY}` {:?}",
                    path.display(),
                    e.dims(),
                    p.dims()
                )));
            }
            out.ema = Some(e.to_dtype(DType::F32)?);
        }
        Ok(out)
    }

    /// Restore values (checkpoint resume) keeping the variable identity the optimizer holds.
    pub fn restore_from(&mut self, other: &ProxyInstruction) -> Result<()> {
        if other.var.dims() != self.var.dims() {
            return Err(Error::Weights(format!(
                "proxy shape {:?} does not match {:?}",
                other.var.dims(),
                self.var.dims()
            )));
        }
        self.var.set(other.var.as_tensor())?;
        if other.ema.is_some() {
            self.ema = other.ema.clone();
        }
        Ok(())
    }

    /// Replace the vectors and their average by what `take` makes of them, keeping the variable
    /// identity (data-parallel ranks take rank 0's).
    pub fn sync_from(&mut self, take: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        self.var.set(&take(self.var.as_tensor())?)?;
        if let Some(e) = &self.ema {
            self.ema = Some(take(e)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn uniform_init_is_bounded_and_seeded() {
        let a = ProxyInstruction::uniform(8, 16, REFERENCE_BOUND, 1, &Device::Cpu).unwrap();
        let b = ProxyInstruction::uniform(8, 16, REFERENCE_BOUND, 1, &Device::Cpu).unwrap();
        let v = vals(a.var().as_tensor());
        assert!(v.iter().all(|x| x.abs() <= REFERENCE_BOUND as f32));
        assert_eq!(v, vals(b.var().as_tensor()));
        assert!((REFERENCE_BOUND - 1.0 / 768f64.sqrt()).abs() < 1e-15);
    }

    #[test]
    fn ema_arithmetic_and_reset_semantics() {
        let mut p =
            ProxyInstruction::from_tensor(Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap())
                .unwrap();
        p.enable_momentum(0.9).unwrap();
        // An "optimizer step" moves P by +10.
        p.before_step().unwrap();
        p.var()
            .set(&Tensor::new(&[[11.0f32, 12.0]], &Device::Cpu).unwrap())
            .unwrap();
        p.after_step().unwrap();
        // E = 0.9*[1,2] + 0.1*[11,12] = [2, 3]; P keeps the optimizer's value until the next reset.
        let e = vals(p.ema().unwrap());
        assert!(
            (e[0] - 2.0).abs() < 1e-6 && (e[1] - 3.0).abs() < 1e-6,
            "{e:?}"
        );
        assert_eq!(vals(p.var().as_tensor()), vec![11.0, 12.0]);
        p.before_step().unwrap();
        assert_eq!(vals(p.var().as_tensor()), e);
        // Without momentum both hooks are no-ops.
        let q =
            ProxyInstruction::from_tensor(Tensor::new(&[[5.0f32]], &Device::Cpu).unwrap()).unwrap();
        q.before_step().unwrap();
        assert_eq!(vals(q.var().as_tensor()), vec![5.0]);
        assert!(p.enable_momentum(1.0).is_err());
    }

    #[test]
    fn batch_rows_and_save_load() {
        let mut p = ProxyInstruction::uniform(3, 4, 0.5, 2, &Device::Cpu).unwrap();
        p.enable_momentum(0.999).unwrap();
        let rows = p.rows_for_batch(2).unwrap();
        assert_eq!(rows.dims(), &[6, 4]);
        assert_eq!(
            vals(&rows.narrow(0, 3, 3).unwrap()),
            vals(p.var().as_tensor())
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("proxy.safetensors");
        p.save(&f).unwrap();
        let q = ProxyInstruction::load(&f, &Device::Cpu).unwrap();
        assert_eq!(vals(q.var().as_tensor()), vals(p.var().as_tensor()));
        assert_eq!(vals(q.ema().unwrap()), vals(p.ema().unwrap()));
        let e =
            ProxyInstruction::load(&dir.path().join("none.safetensors"), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("none.safetensors"), "{e}");
    }
}
