//! Data-parallel training: one process (rank) per GPU, each holding the whole model and training
//! on its own part of every global batch; the trainable gradients are summed across the ranks
//! every step, so every rank applies the same update and the weights stay identical.
//!
//! The trainer asks one thing of the ranks, a [`Collective`]: element-wise sums and rank 0's
//! tensor. [`Solo`] is the single process; [`ThreadGroup`] runs ranks as threads of one process
//! (the CPU check that several ranks give the update of one rank with their combined batch);
//! with `--features nccl`, [`nccl::NcclGroup`] sums over NCCL between GPUs. [`World`] reads
//! which rank this process is from the launcher's environment, [`rendezvous`] hands rank 0's
//! NCCL id to the others, [`shard`] cuts a rank's part out of a global batch.

mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
mod world;

use std::rc::Rc;

use candle_core::Tensor;

pub use local::{Solo, ThreadGroup};
pub use world::World;

use crate::error::{Error, Result};

/// What the training loop needs from its peers. Every rank makes the same calls in the same order
/// with tensors of the same shape and dtype; a rank that fails leaves the group, and the others'
/// next call fails instead of waiting forever where the transport can tell ([`ThreadGroup`]).
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum over the ranks of `t`, on every rank (same device and dtype as `t`).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank 0's `t`, on every rank.
    fn broadcast(&self, t: &Tensor) -> Result<Tensor>;
    /// Returns once every rank has called it (rank 0 has finished writing what the others read).
    fn barrier(&self) -> Result<()>;
}

/// Join the data-parallel run of `world` (more than one rank): the rank trains on
/// `cuda:LOCAL_RANK` (the recipe's `model.device` must be `cuda`) and sums over NCCL. Returns the
/// rank's device and its collective.
pub fn join(world: &World, device: &str) -> Result<(String, Rc<dyn Collective>)> {
    if device != "cuda" {
        return Err(Error::Distributed(format!(
            "model.device = {device:?}: with {} ranks each rank trains on its own GPU \
             (cuda:LOCAL_RANK); set model.device = \"cuda\"",
            world.world_size
        )));
    }
    let spec = format!("cuda:{}", world.local_rank);
    #[cfg(feature = "nccl")]
    {
        let dev = crate::model::parse_device(&spec)?;
        let group: Rc<dyn Collective> = Rc::new(nccl::NcclGroup::connect(world, &dev)?);
        Ok((spec, group))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = spec;
        Err(Error::Distributed(format!(
            "WORLD_SIZE={} asks for data-parallel training, but this binary was built without \
             NCCL: rebuild with `cargo build --release --features nccl`",
            world.world_size
        )))
    }
}

/// Rank `rank`'s part of one global batch of `world_size` ranks: contiguous, the sizes differing
/// by at most one (a short last batch of an epoch is split as evenly as it goes; with fewer
/// samples than ranks some ranks get none and contribute nothing but their turn in the sums).
pub fn shard(global: &[usize], rank: usize, world_size: usize) -> &[usize] {
    let (base, extra) = (global.len() / world_size, global.len() % world_size);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    &global[start..start + len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        let g: Vec<usize> = (10..20).collect();
        for world in 1..=12 {
            let parts: Vec<&[usize]> = (0..world).map(|r| shard(&g, r, world)).collect();
            assert_eq!(parts.concat(), g, "world {world}");
            let (min, max) = parts.iter().fold((usize::MAX, 0), |(a, b), p| {
                (a.min(p.len()), b.max(p.len()))
            });
            assert!(max - min <= 1, "world {world}: {parts:?}");
        }
        assert_eq!(shard(&g, 1, 2), &[15, 16, 17, 18, 19]);
    }
}
