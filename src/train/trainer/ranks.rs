//! What the loop does differently with several data-parallel ranks: the ranks start from rank 0's
//! trainable tensors, agree on each window's loss tokens (so each rank weights its micro-batches
//! by its share of the *global* window), and sum their gradients — with a presence flag per
//! tensor, so a tensor no rank reached stays without a gradient exactly as with one rank.
//! With one rank nothing here runs.

use candle_core::{DType, Tensor, Var};

use super::Trainer;
use crate::error::{Error, Result};
use crate::train::optim::Gradients;

impl Trainer {
    pub(super) fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    pub(super) fn is_rank0(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Sums of small per-rank figures (token counts, loss, fault flags), in f64.
    pub(super) fn sum_figures(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.world_size() == 1 {
            return Ok(values.to_vec());
        }
        let t = Tensor::new(values, &self.plan.device)?;
        Ok(self
            .collective
            .all_reduce_sum(&t)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f64>()?)
    }

    /// Every rank takes rank 0's trainable tensors (the proxy vectors included), so a rank that
    /// drew or loaded something different cannot drift apart unnoticed.
    pub(super) fn sync_params_from_rank0(&mut self) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        for p in &self.params {
            let t = self.collective.broadcast(p.var.as_tensor())?;
            p.var.set(&t)?;
        }
        let collective = self.collective.clone();
        if let Some(proxy) = &mut self.proxy {
            proxy.sync_from(|t| collective.broadcast(t))?;
        }
        Ok(())
    }

    /// Replaces each rank's gradients by their sum over the ranks. One flat buffer per dtype
    /// (one collective, not one per tensor), in the order of `named`.
    pub(super) fn sum_gradients(
        &self,
        grads: &mut Gradients,
        named: &[(String, Var)],
    ) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        for dtype in [DType::F32, DType::F64] {
            let members: Vec<&(String, Var)> = named
                .iter()
                .filter(|(_, v)| crate::train::optim::math_dtype(v.dtype()) == Some(dtype))
                .collect();
            if members.is_empty() {
                continue;
            }
            let mut flat = Vec::with_capacity(members.len() + 1);
            for (name, var) in &members {
                let g = match grads.get(name) {
                    Some(g) => g.flatten_all()?,
                    None => Tensor::zeros(var.elem_count(), dtype, var.device())?,
                };
                flat.push(g);
            }
            let present: Vec<f64> = members
                .iter()
                .map(|(name, _)| f64::from(u8::from(grads.get(name).is_some())))
                .collect();
            flat.push(Tensor::new(present.as_slice(), &self.plan.device)?.to_dtype(dtype)?);
            let summed = self.collective.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
            let counts_at: usize = members.iter().map(|(_, v)| v.elem_count()).sum();
            let reached = summed
                .narrow(0, counts_at, members.len())?
                .to_dtype(DType::F64)?
                .to_device(&candle_core::Device::Cpu)?
                .to_vec1::<f64>()?;
            let mut at = 0;
            for ((name, var), reached) in members.iter().zip(reached) {
                let n = var.elem_count();
                if reached > 0.0 {
                    grads.insert(name.clone(), &summed.narrow(0, at, n)?.reshape(var.dims())?)?;
                } else if grads.remove(name).is_some() {
                    return Err(Error::Distributed(format!(
                        "`{name}` has a gradient here but the ranks' sum says none did"
                    )));
                }
                at += n;
            }
        }
        Ok(())
    }
}
