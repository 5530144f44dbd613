//! A result computed outside the autograd graph, handed to candle as a custom op's output: the
//! way to put an op with a hand-written backward pass into the graph on any device without a
//! kernel of its own. The op's forward moves the tensor's storage into the graph; its `bwd`
//! computes the gradient from the op's input (and whatever else it captured).
//!
//! Used by activation checkpointing ([`crate::model::recompute`]: the layer's output, its
//! backward a recomputation) and the cross-entropy ([`crate::model::loss`]: the loss value, its
//! backward `softmax − one-hot`).

use std::sync::Mutex;

use candle_core::{CpuStorage, Shape, Storage, Tensor};

/// The output of one custom op application, taken once by its forward.
pub struct Precomputed {
    /// What the op's forward hands to candle; `None` once taken.
    output: Mutex<Option<Tensor>>,
    /// Names the op in errors.
    what: &'static str,
}

impl Precomputed {
    /// `output` detached, laid out so its storage holds its elements from offset 0 in order (a
    /// copy of that storage is what candle gets). The outputs this serves are fresh results of an
    /// op, whose storage holds nothing else; any other layout is copied.
    pub fn new(output: &Tensor, what: &'static str) -> candle_core::Result<Self> {
        let output = output.detach();
        let output = if output.is_contiguous() && output.layout().start_offset() == 0 {
            output
        } else {
            output.force_contiguous()?
        };
        Ok(Self {
            output: Mutex::new(Some(output)),
            what,
        })
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        self.output
            .lock()
            .expect("poisoned")
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.what)))
    }

    /// For `CustomOp*::cpu_fwd`.
    pub fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.clone(), layout.shape().clone())),
            _ => candle_core::bail!("{}: output on another device than its input", self.what),
        }
    }

    /// For `CustomOp*::cuda_fwd`.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: output on another device than its input", self.what),
        }
    }
}
