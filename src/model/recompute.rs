//! Activation checkpointing: a layer run through [`Recompute::layer`] keeps only its input for
//! the backward pass. Its forward runs outside the autograd graph (its intermediate activations
//! are freed at once); the graph holds one op whose backward runs the layer again on the saved
//! input, differentiates that, and hands back the input's gradient — and, to the side store this
//! object holds, the gradients of the trainable parameters inside the layer, which the trainer
//! merges into the backward pass's store ([`Recompute::merge_into`]).
//!
//! The recomputation sees what the first run saw: the same inputs and constants (masks, RoPE
//! tables), and the same LoRA dropout masks (the dropout generator is set back to where it stood
//! before the layer's forward, then restored), so training with checkpointing gives the
//! gradients of training without, at the cost of one more forward per layer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::model::lora::LoraRuntime;
use crate::model::precomputed::{with_backward, with_backward2};

/// A layer's forward: the hidden state (and, for cross-attention, the states attended to).
pub type LayerFn = dyn Fn(&Tensor, Option<&Tensor>) -> candle_core::Result<Tensor> + Send + Sync;

/// Shared by a model's checkpointed stacks and the trainer.
#[derive(Clone)]
pub struct Recompute {
    inner: Arc<Inner>,
}

struct Inner {
    /// The model's trainable tensors: what the recomputed backward collects gradients for.
    trainable: Vec<Var>,
    /// The LoRA dropout generator, replayed in the recomputation.
    dropout: Option<Arc<LoraRuntime>>,
    /// Parameter gradients of recomputed layers, by tensor id, awaiting the merge.
    grads: Mutex<HashMap<candle_core::TensorId, (Tensor, Tensor)>>,
}

impl std::fmt::Debug for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Recompute({} trainable tensors)",
            self.inner.trainable.len()
        )
    }
}

impl Recompute {
    pub fn new(trainable: Vec<Var>, dropout: Option<Arc<LoraRuntime>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                trainable,
                dropout,
                grads: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// `f(x, cross)` with only `x` (and `cross`) kept for the backward pass.
    pub fn layer(
        &self,
        x: &Tensor,
        cross: Option<&Tensor>,
        f: Arc<LayerFn>,
    ) -> candle_core::Result<Tensor> {
        let rng = self.inner.dropout.as_ref().map(|rt| rt.rng_state());
        let output = f(&x.detach(), cross.map(Tensor::detach).as_ref())?;
        let inputs_track = x.track_op() || cross.is_some_and(Tensor::track_op);
        if !inputs_track && !output.track_op() {
            // Nothing before the layer trains and nothing inside it (a frozen tower): no
            // gradient passes here, so there is nothing to keep or recompute.
            return Ok(output);
        }
        // The graph must reach this op even when nothing before the layer trains, or the
        // parameters inside it would get no gradient.
        let x = if inputs_track {
            x.clone()
        } else {
            Var::from_tensor(x)?.as_tensor().clone()
        };
        let replay = Replay {
            f,
            rng,
            ctx: self.inner.clone(),
        };
        match cross {
            None => with_backward(&x, &output, "checkpointed-layer", move |x, grad| {
                Ok(replay.backward(x, None, grad)?.0)
            }),
            Some(c) => with_backward2(
                &x,
                c,
                &output,
                "checkpointed-cross-layer",
                move |x, c, grad| replay.backward(x, Some(c), grad),
            ),
        }
    }

    /// Adds the parameter gradients the recomputed layers produced into `store` (the backward
    /// pass that ran them) and forgets them.
    pub fn merge_into(&self, store: &mut GradStore) -> candle_core::Result<()> {
        let grads = std::mem::take(&mut *self.inner.grads.lock().expect("poisoned"));
        for (_, (param, g)) in grads {
            let sum = match store.remove(&param) {
                Some(outer) => (outer + g)?,
                None => g,
            };
            store.insert(&param, sum);
        }
        Ok(())
    }

    /// Drops gradients not merged (a backward pass that failed half-way).
    pub fn clear(&self) {
        self.inner.grads.lock().expect("poisoned").clear();
    }
}

/// What the backward pass of a checkpointed layer needs to run it again.
struct Replay {
    f: Arc<LayerFn>,
    /// The dropout generator's state before the layer's forward.
    rng: Option<([u8; 32], u64, u128)>,
    ctx: Arc<Inner>,
}

impl Replay {
    /// The recomputed layer's gradients: the inputs' (returned) and the parameters' (stored).
    fn backward(
        &self,
        x: &Tensor,
        cross: Option<&Tensor>,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let cv = cross.map(|c| Var::from_tensor(&c.detach())).transpose()?;
        let replay = match (&self.ctx.dropout, self.rng) {
            (Some(rt), Some(state)) => {
                let now = rt.rng_state();
                rt.set_rng_state(state.0, state.1, state.2);
                Some((rt, now))
            }
            _ => None,
        };
        let y = (self.f)(xv.as_tensor(), cv.as_ref().map(Var::as_tensor));
        if let Some((rt, now)) = replay {
            rt.set_rng_state(now.0, now.1, now.2);
        }
        // d/dy of sum(y · g) is g exactly: the recomputed graph gets the outer gradient.
        let surrogate = (y?.to_dtype(DType::F32)? * grad_out.to_dtype(DType::F32)?)?.sum_all()?;
        let grads = surrogate.backward()?;
        let mut side = self.ctx.grads.lock().expect("poisoned");
        for p in &self.ctx.trainable {
            if let Some(g) = grads.get(p.as_tensor()) {
                match side.get_mut(&p.id()) {
                    Some((_, sum)) => *sum = (&*sum + g)?,
                    None => {
                        side.insert(p.id(), (p.as_tensor().clone(), g.clone()));
                    }
                }
            }
        }
        let gx = grads.get(xv.as_tensor()).cloned();
        let gc = cv.and_then(|c| grads.get(c.as_tensor()).cloned());
        Ok((gx, gc))
    }
}
