//! Collectives without a network: one rank alone ([`Solo`]), and ranks as threads of one
//! process ([`ThreadGroup`]), which is how the data-parallel path is tested on a CPU.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Tensor};

use super::Collective;
use crate::error::{Error, Result};

/// The only rank: sums and broadcasts are the tensor itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// One rank of a group of threads. Each call deposits the rank's values and waits until every
/// rank has; sums are taken in rank order in f64 and rounded once, so they do not depend on
/// which thread arrived first (NCCL's f32 sum of two ranks rounds the same way). A rank dropped
/// (its thread failed) makes every later call of the others an error instead of a hang.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world_size: usize,
    state: Mutex<Exchange>,
    turn: Condvar,
}

#[derive(Default)]
struct Exchange {
    deposits: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// Calls completed; a waiting rank wakes when it moves on.
    generation: u64,
    /// Every rank's deposit of the last completed call, in rank order.
    result: Arc<Vec<Vec<f64>>>,
    left: Option<usize>,
}

impl ThreadGroup {
    /// The `world_size` ranks of a new group, rank 0 first; move each into its thread.
    pub fn new(world_size: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world_size,
            state: Mutex::new(Exchange {
                deposits: vec![None; world_size],
                ..Exchange::default()
            }),
            turn: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Deposit `mine`; every rank's deposit once all have made this call.
    fn exchange(&self, mine: Vec<f64>) -> Result<Arc<Vec<Vec<f64>>>> {
        let left = |r: usize| {
            Error::Distributed(format!(
                "rank {r} left the group (it failed); rank {} stops",
                self.rank
            ))
        };
        let mut st = self.shared.state.lock().expect("poisoned");
        if let Some(r) = st.left {
            return Err(left(r));
        }
        st.deposits[self.rank] = Some(mine);
        st.arrived += 1;
        if st.arrived == self.shared.world_size {
            let all: Vec<Vec<f64>> = st
                .deposits
                .iter_mut()
                .map(|d| d.take().expect("every rank deposited"))
                .collect();
            st.result = Arc::new(all);
            st.arrived = 0;
            st.generation += 1;
            self.shared.turn.notify_all();
            return Ok(st.result.clone());
        }
        let generation = st.generation;
        while st.generation == generation {
            if let Some(r) = st.left {
                return Err(left(r));
            }
            st = self.shared.turn.wait(st).expect("poisoned");
        }
        Ok(st.result.clone())
    }

    fn values(t: &Tensor) -> Result<Vec<f64>> {
        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    fn tensor_like(t: &Tensor, values: Vec<f64>) -> Result<Tensor> {
        Ok(Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }

    fn check_lengths(&self, all: &[Vec<f64>]) -> Result<()> {
        let n = all[self.rank].len();
        if let Some((r, v)) = all.iter().enumerate().find(|(_, v)| v.len() != n) {
            return Err(Error::Distributed(format!(
                "rank {r} sent {} values where rank {} sent {n}: the ranks are out of step",
                v.len(),
                self.rank
            )));
        }
        Ok(())
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world_size
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.exchange(Self::values(t)?)?;
        self.check_lengths(&all)?;
        let mut sum = vec![0.0f64; all[0].len()];
        for v in all.iter() {
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
        }
        Self::tensor_like(t, sum)
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.exchange(Self::values(t)?)?;
        self.check_lengths(&all)?;
        Self::tensor_like(t, all[0].clone())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(Vec::new()).map(|_| ())
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            // A rank that finished normally has made all its calls; one that failed has not,
            // and the others must not wait for it.
            st.left.get_or_insert(self.rank);
            self.shared.turn.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn threads_sum_broadcast_and_fail_when_a_rank_leaves() {
        let ranks = ThreadGroup::new(3);
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let r = g.rank() as f32;
                    let t = Tensor::new(&[r, 10.0 * r], &Device::Cpu).unwrap();
                    let sum = g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                    let root = g.broadcast(&t).unwrap().to_vec1::<f32>().unwrap();
                    g.barrier().unwrap();
                    (sum, root)
                })
            })
            .collect();
        for h in handles {
            let (sum, root) = h.join().unwrap();
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(root, vec![0.0, 0.0]);
        }
        let mut ranks = ThreadGroup::new(2);
        let survivor = ranks.pop().unwrap();
        drop(ranks);
        let e = survivor.barrier().unwrap_err().to_string();
        assert!(e.contains("rank 0 left"), "{e}");
    }
}
