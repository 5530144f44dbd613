//! Criterion micro-benchmarks of the hot kernels at the shapes of the benchmark model
//! (scripts/bench_train.sh: batch 4 × 307 tokens, hidden 768, 12 heads / 4 KV heads of 64,
//! intermediate 2048), each fused kernel side by side with the composed candle ops it replaces,
//! forward + backward.
//!
//! `RAYON_NUM_THREADS=2 cargo bench --bench kernels` (never while a build runs).

use candle_core::{DType, Device, Module, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use lvlm_ift::model::kernels::{FrozenLinearOp, RopeOp};
use lvlm_ift::model::layers::{
    self, attention, attention_composed, rope_composed, silu_mul, RmsNorm,
};

const B: usize = 4;
const S: usize = 307;
const H: usize = 768;
const HEADS: usize = 12;
const KV: usize = 4;
const D: usize = 64;
const I: usize = 2048;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize]) -> Var {
    Var::from_tensor(&randn(shape)).unwrap()
}

/// Forward, then backward of `sum(y)`.
fn step(y: Tensor) {
    let g = y.sum_all().unwrap().backward().unwrap();
    std::hint::black_box(g);
}

fn causal_mask() -> Tensor {
    let mut m = vec![0f32; B * S * S];
    for b in 0..B {
        for i in 0..S {
            for j in i + 1..S {
                m[(b * S + i) * S + j] = f32::MIN;
            }
        }
    }
    Tensor::from_vec(m, (B, 1, S, S), &Device::Cpu).unwrap()
}

fn bench_attention(c: &mut Criterion) {
    let (q, k, v) = (
        var(&[B, HEADS, S, D]),
        var(&[B, KV, S, D]),
        var(&[B, KV, S, D]),
    );
    let mask = causal_mask();
    let scale = (D as f64).powf(-0.5);
    let mut g = c.benchmark_group("attention fwd+bwd");
    g.sample_size(10);
    g.bench_function("fused", |bch| {
        bch.iter(|| step(attention(&q, &k, &v, Some(&mask), scale).unwrap()))
    });
    g.bench_function("composed", |bch| {
        bch.iter(|| step(attention_composed(&q, &k, &v, Some(&mask), scale).unwrap()))
    });
    g.finish();
}

fn bench_norm_mlp_rope(c: &mut Criterion) {
    let x = var(&[B, S, H]);
    let norm = RmsNorm::from_weight(randn(&[H]), 1e-6);
    let mut g = c.benchmark_group("rms_norm fwd+bwd");
    g.bench_function("fused", |bch| bch.iter(|| step(norm.forward(&x).unwrap())));
    g.bench_function("composed", |bch| {
        bch.iter(|| step(norm.forward_composed(&x).unwrap()))
    });
    g.finish();

    let (gate, up) = (var(&[B, S, I]), var(&[B, S, I]));
    let mut g = c.benchmark_group("silu_mul fwd+bwd");
    g.bench_function("fused", |bch| {
        bch.iter(|| step(silu_mul(&gate, &up).unwrap()))
    });
    g.bench_function("composed", |bch| {
        bch.iter(|| step((gate.silu().unwrap() * up.as_tensor()).unwrap()))
    });
    g.finish();

    let q = var(&[B, HEADS, S, D]);
    let (cos, sin) = (randn(&[B, S, D]), randn(&[B, S, D]));
    let mut g = c.benchmark_group("rope fwd+bwd");
    g.bench_function("fused", |bch| {
        bch.iter(|| {
            step(
                q.apply_op1(RopeOp {
                    cos: cos.clone(),
                    sin: sin.clone(),
                })
                .unwrap(),
            )
        })
    });
    let (c4, s4) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
    g.bench_function("composed", |bch| {
        bch.iter(|| step(rope_composed(&q, &c4, &s4).unwrap()))
    });
    g.finish();
}

fn bench_frozen_linear(c: &mut Criterion) {
    let x = randn(&[B * S, H]);
    let mut g = c.benchmark_group("frozen linear 768->2048 forward");
    g.sample_size(20);
    for dtype in [DType::F32, DType::BF16] {
        let w = randn(&[I, H]).to_dtype(dtype).unwrap();
        let xd = x.to_dtype(dtype).unwrap();
        g.bench_function(format!("fused {dtype:?}"), |bch| {
            bch.iter(|| {
                let op = FrozenLinearOp { weight: w.clone() };
                std::hint::black_box(xd.apply_op1_no_bwd(&op).unwrap())
            })
        });
        // The previous path: candle's matmul (for bf16 both operands widened to f32 per product).
        g.bench_function(format!("candle matmul {dtype:?}"), |bch| {
            bch.iter(|| std::hint::black_box(layers::matmul(&xd, &w.t().unwrap()).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(
    kernels,
    bench_attention,
    bench_norm_mlp_rope,
    bench_frozen_linear
);
criterion_main!(kernels);
