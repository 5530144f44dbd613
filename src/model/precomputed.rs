//! A result computed outside the autograd graph, handed to candle as a custom op's output: the
//! way to put an op with a hand-written backward pass into the graph on any device without a
//! kernel of its own. The op's forward moves the tensor's storage into the graph; its `bwd`
//! computes the gradient from the op's input (and whatever else it captured).
//!
//! Used by activation checkpointing ([`crate::model::recompute`]: the layer's output, its
//! backward a recomputation), the cross-entropy ([`crate::model::loss`]: the loss value, its
//! backward `softmax − one-hot`), and two composed layer ops ([`crate::model::layers`]): the
//! frozen linear (the product; its backward the input's gradient alone, none for the weight) and
//! the constant addition (masks, biases; no gradient for the constant).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

/// The output of one custom op application, taken once by its forward.
pub struct Precomputed {
    /// What the op's forward hands to candle; `None` once taken.
    output: Mutex<Option<Tensor>>,
    /// Names the op in candle's graph and in errors.
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

/// The gradient of a [`with_backward`] op's input: `(input, output's gradient) → input's`.
pub type BackwardFn =
    dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Option<Tensor>> + Send + Sync + 'static;

/// `output` (computed from `input` outside the graph) as a graph op on `input` whose backward
/// pass is `backward`. `what` names the op (in candle's graph and in errors).
pub fn with_backward(
    input: &Tensor,
    output: &Tensor,
    what: &'static str,
    backward: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Option<Tensor>> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    let op = HandWritten {
        output: Precomputed::new(output, what)?,
        backward: Box::new(backward),
    };
    input.apply_op1_arc(Arc::new(Box::new(op)))
}

struct HandWritten {
    output: Precomputed,
    backward: Box<BackwardFn>,
}

impl CustomOp1 for HandWritten {
    fn name(&self) -> &'static str {
        self.output.what
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        input: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        (self.backward)(input, grad)
    }
}

/// The gradients of a [`with_backward2`] op's two inputs from the output's gradient.
pub type Backward2Fn = dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync
    + 'static;

/// [`with_backward`] for an output computed from two inputs.
pub fn with_backward2(
    a: &Tensor,
    b: &Tensor,
    output: &Tensor,
    what: &'static str,
    backward: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> candle_core::Result<Tensor> {
    let op = HandWritten2 {
        output: Precomputed::new(output, what)?,
        backward: Box::new(backward),
    };
    a.apply_op2_arc(b, Arc::new(Box::new(op)))
}

struct HandWritten2 {
    output: Precomputed,
    backward: Box<Backward2Fn>,
}

impl CustomOp2 for HandWritten2 {
    fn name(&self) -> &'static str {
        self.output.what
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(a, b, grad)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::model::layers::{add_constant, frozen_product};

    /// A constant addition and a frozen linear give the input the gradient of the plain ops and
    /// make none for the constant or the frozen weight (candle's own ops make both and keep them
    /// in the store).
    #[test]
    fn hand_written_backwards_give_the_plain_ops_gradients_and_none_for_constants() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap()).unwrap();
        let mask = Tensor::randn(0f32, 1.0, (2, 1, 4), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let ours = frozen_product(&add_constant(x.as_tensor(), &mask).unwrap(), &w).unwrap();
        let plain = x
            .as_tensor()
            .broadcast_add(&mask)
            .unwrap()
            .broadcast_matmul(&w.t().unwrap())
            .unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&ours, &plain) < 1e-6);
        let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_plain = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(g_ours.get(&x).unwrap(), g_plain.get(&x).unwrap()) < 1e-5);
        // candle keeps gradients for the broadcast mask and the transposed weight to the end;
        // here the store holds the input's alone.
        assert_eq!(g_plain.get_ids().count(), 3);
        assert_eq!(g_ours.get_ids().count(), 1, "a constant got a gradient");
    }
}
