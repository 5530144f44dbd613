//! Fused CPU kernels with hand-written backward passes, behind candle's custom-op interface.
//!
//! candle builds every layer from element-wise ops, each allocating its output and keeping it
//! for the backward pass; on the CPU that costs both time (allocation, page faults, one pass per
//! op) and memory (a training step's graph holds several copies of every activation). The ops
//! here compute a whole norm, attention, SwiGLU, rotary embedding or frozen-weight product in one
//! pass, keep only their inputs, and recompute what the backward needs. `model::layers` uses them
//! whenever every operand is on the CPU; on CUDA it keeps the composed ops. Each op is checked
//! against the composed version, values and finite-difference gradients (`tests/kernels.rs`).

pub mod attention;
pub mod elementwise;
pub mod gemm;
pub mod host;
pub mod linear;
pub mod norm;

pub use attention::AttentionOp;
pub use elementwise::{RopeOp, SiluMulOp};
pub use linear::FrozenLinearOp;
pub use norm::{LayerNormOp, RmsNormOp};

use candle_core::Tensor;

/// Whether the fused CPU kernels run for these operands: all on the CPU, and not switched off
/// with `LVLM_IFT_FUSED=0` (the composed ops then run everywhere, for comparisons).
pub fn fused_for(ts: &[&Tensor]) -> bool {
    enabled() && host::all_cpu(ts)
}

/// Whether the fused kernels are switched on for this process (`LVLM_IFT_FUSED`).
pub fn fused_enabled() -> bool {
    enabled()
}

fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("LVLM_IFT_FUSED").map_or(true, |v| v != "0"))
}

#[cfg(test)]
mod tests;
