//! NCCL between the GPUs of a data-parallel run (`--features nccl`): rank 0 makes NCCL's unique
//! id and hands it out over the rendezvous, every rank joins the communicator on its own GPU's
//! stream, and sums run as NCCL all-reduces on that stream (ordered with the rank's other work
//! there, so no extra synchronisation).

use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{rendezvous, Collective, World};
use crate::error::{Error, Result};

/// How long ranks wait for each other at start (model loading on rank 0 can be slow).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

/// This rank's membership of the NCCL communicator.
pub struct NcclGroup {
    comm: Comm,
    rank: usize,
    world_size: usize,
    device: Device,
}

impl NcclGroup {
    /// Join the run described by `world` on `device` (this rank's GPU).
    pub fn connect(world: &World, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Distributed(
                "NCCL needs the rank's device to be a GPU (model.device = \"cuda\")".into(),
            ));
        };
        let nccl = |what: &str| {
            let what = what.to_string();
            move |e| Error::Distributed(format!("NCCL {what}: {e:?}"))
        };
        let mine = if world.rank == 0 {
            let id = Id::new().map_err(nccl("unique id"))?;
            Some(id.internal().iter().map(|c| *c as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        let bytes = rendezvous::share_from_rank0(world, mine.as_deref(), RENDEZVOUS_TIMEOUT)?;
        let internal: [std::ffi::c_char; 128] = bytes
            .iter()
            .map(|b| *b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|v: Vec<_>| {
                Error::Distributed(format!("rank 0 sent a {}-byte NCCL id, not 128", v.len()))
            })?;
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            world.rank,
            world.world_size,
            Id::uninit(internal),
        )
        .map_err(nccl("init"))?;
        Ok(Self {
            comm,
            rank: world.rank,
            world_size: world.world_size,
            device: device.clone(),
        })
    }

    fn run(&self, t: &Tensor, op: Op) -> Result<Tensor> {
        if !t.device().same_device(&self.device) {
            return Err(Error::Distributed(format!(
                "a {op:?} of a tensor on {:?}, not this rank's GPU",
                t.device()
            )));
        }
        Ok(t.contiguous()?.apply_op1_no_bwd(&NcclOp {
            comm: &self.comm,
            op,
        })?)
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Op::Sum)
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Op::BroadcastRoot)
    }
    fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, DType::F32, &self.device)?;
        // Reading the sum back waits for the all-reduce, hence for every rank.
        self.all_reduce_sum(&one)?.to_vec1::<f32>()?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Sum,
    BroadcastRoot,
}

/// One collective as a candle op on the tensor's CUDA storage.
struct NcclOp<'a> {
    comm: &'a Comm,
    op: Op,
}

impl NcclOp<'_> {
    fn collective<T>(
        &self,
        src: &candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
        start: usize,
        end: usize,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>>
    where
        T: candle_core::cuda_backend::cudarc::nccl::safe::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        let src = src.slice(start..end);
        let mut dst = dev.alloc_zeros::<T>(end - start)?;
        let status = match self.op {
            Op::Sum => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Op::BroadcastRoot => self.comm.broadcast(Some(&src), &mut dst, 0),
        };
        status.map_err(|e| candle_core::Error::Msg(format!("NCCL {:?}: {e:?}", self.op)))?;
        Ok(dst)
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("an NCCL collective needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL needs a contiguous tensor".into()))?;
        let dev = s.device().clone();
        let slice = match &s.slice {
            CudaStorageSlice::F32(src) => {
                CudaStorageSlice::F32(self.collective(src, start, end, &dev)?)
            }
            CudaStorageSlice::F64(src) => {
                CudaStorageSlice::F64(self.collective(src, start, end, &dev)?)
            }
            CudaStorageSlice::BF16(src) => {
                CudaStorageSlice::BF16(self.collective(src, start, end, &dev)?)
            }
            CudaStorageSlice::F16(src) => {
                CudaStorageSlice::F16(self.collective(src, start, end, &dev)?)
            }
            _ => candle_core::bail!(
                "NCCL collectives here take f32, f64, bf16 or f16, not {:?}",
                s.dtype()
            ),
        };
        Ok((CudaStorage { slice, device: dev }, l.shape().clone()))
    }
}
