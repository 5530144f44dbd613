//! Each fused kernel against the composed ops it replaces: values (f32 within 1e-5, bf16 within
//! stated tolerances), gradients (f32, relative 1e-4), and its own backward against central
//! finite differences in f64 (`gradcheck::check`, 1e-6 + 1e-5·|g|). The model-level checks in
//! `model::gradcheck` run through these kernels too, since they are on the CPU.

use candle_core::{DType, Device, Module, Tensor, Var};
use rand::SeedableRng;

use super::*;
use crate::model::gradcheck::{check, input, randn};
use crate::model::layers::{
    attention, attention_composed, rope_composed, silu_mul, LayerNorm, Linear, RmsNorm,
};

const DEV: Device = Device::Cpu;

fn rand_t(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    randn(shape, 1.0, &mut rng)
}

/// Largest |a - b| / (1 + |b|) over all elements.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// Gradients of `sum(f(vars) * r)` w.r.t. each var.
fn grads_of(vars: &[Var], out: &Tensor, seed: u64) -> Vec<Tensor> {
    let r = rand_t(out.dims(), seed).to_dtype(out.dtype()).unwrap();
    let g = (out * r).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|v| g.get(v.as_tensor()).expect("no gradient").clone())
        .collect()
}

/// Fused and composed agree on values and gradients in f32.
fn agree_f32(vars: &[Var], fused: impl Fn() -> Tensor, composed: impl Fn() -> Tensor, what: &str) {
    let (a, b) = (fused(), composed());
    let v = max_rel(&a, &b);
    assert!(v < 1e-5, "{what}: values differ by {v}");
    let ga = grads_of(vars, &a, 3);
    let gb = grads_of(vars, &b, 3);
    for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
        let e = max_rel(x, y);
        assert!(e < 1e-4, "{what}: gradient {i} differs by {e}");
    }
}

fn vars_f32(shapes: &[&[usize]], seed: u64) -> Vec<Var> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Var::from_tensor(&rand_t(s, seed + i as u64).to_dtype(DType::F32).unwrap()).unwrap()
        })
        .collect()
}

// --------------------------------------------------------------------------------------------

#[test]
fn rms_norm_matches_composed_and_finite_differences() {
    let v = vars_f32(&[&[3, 5, 16], &[16]], 1);
    let norm = || RmsNorm::from_weight(v[1].as_tensor().clone(), 1e-6);
    agree_f32(
        &v,
        || norm().forward(v[0].as_tensor()).unwrap(),
        || norm().forward_composed(v[0].as_tensor()).unwrap(),
        "rms_norm",
    );
    let (x, w) = (input(&[2, 3, 8], 1), input(&[8], 2));
    check(&[x.clone(), w.clone()], || {
        x.as_tensor()
            .apply_op2(w.as_tensor(), RmsNormOp { eps: 1e-6 })
            .unwrap()
    });
}

#[test]
fn layer_norm_matches_composed_and_finite_differences() {
    let v = vars_f32(&[&[4, 7, 12], &[12], &[12]], 2);
    let norm = || LayerNorm::from_weights(v[1].as_tensor().clone(), v[2].as_tensor().clone(), 1e-5);
    agree_f32(
        &v,
        || norm().forward(v[0].as_tensor()).unwrap(),
        || norm().forward_composed(v[0].as_tensor()).unwrap(),
        "layer_norm",
    );
    let (x, w, b) = (input(&[3, 10], 3), input(&[10], 4), input(&[10], 5));
    check(&[x.clone(), w.clone(), b.clone()], || {
        x.as_tensor()
            .apply_op3(w.as_tensor(), b.as_tensor(), LayerNormOp { eps: 1e-5 })
            .unwrap()
    });
}

#[test]
fn silu_mul_matches_composed_and_finite_differences() {
    let v = vars_f32(&[&[2, 9, 20], &[2, 9, 20]], 3);
    agree_f32(
        &v,
        || silu_mul(v[0].as_tensor(), v[1].as_tensor()).unwrap(),
        || (v[0].as_tensor().silu().unwrap() * v[1].as_tensor()).unwrap(),
        "silu_mul",
    );
    let (g, u) = (input(&[4, 6], 6), input(&[4, 6], 7));
    check(&[g.clone(), u.clone()], || {
        g.as_tensor().apply_op2(u.as_tensor(), SiluMulOp).unwrap()
    });
}

fn rope_tables(b: usize, s: usize, d: usize) -> (Tensor, Tensor) {
    let angles = (rand_t(&[b, s, d / 2], 9) * 3.0).unwrap();
    let angles = Tensor::cat(&[&angles, &angles], 2).unwrap();
    (angles.cos().unwrap(), angles.sin().unwrap())
}

#[test]
fn rope_matches_composed_and_finite_differences() {
    let (b, h, s, d) = (2, 3, 5, 8);
    let (cos, sin) = rope_tables(b, s, d);
    let v = vars_f32(&[&[b, h, s, d]], 4);
    let (c32, s32) = (
        cos.to_dtype(DType::F32).unwrap(),
        sin.to_dtype(DType::F32).unwrap(),
    );
    let op = || RopeOp {
        cos: c32.clone(),
        sin: s32.clone(),
    };
    agree_f32(
        &v,
        || v[0].as_tensor().apply_op1(op()).unwrap(),
        || {
            rope_composed(
                v[0].as_tensor(),
                &c32.unsqueeze(1).unwrap(),
                &s32.unsqueeze(1).unwrap(),
            )
            .unwrap()
        },
        "rope",
    );
    let x = input(&[b, h, s, d], 8);
    check(std::slice::from_ref(&x), || {
        x.as_tensor()
            .apply_op1(RopeOp {
                cos: cos.clone(),
                sin: sin.clone(),
            })
            .unwrap()
    });
}

/// Causal + padding mask `[b, 1, s, s_kv]` whose first query row of sample 1 sees no key at all
/// (f32::MIN everywhere: uniform attention, as in HF).
fn mask(b: usize, s: usize, s_kv: usize) -> Tensor {
    mask_with(b, s, s_kv, true)
}

/// `blocked_row`: whether sample 1's first query row is blocked entirely. Finite differences
/// need it off: such a row's output no longer depends on q (f32::MIN swallows the scores in
/// rounding), while the analytic gradient — HF's too — is that of the shift-invariant softmax.
fn mask_with(b: usize, s: usize, s_kv: usize, blocked_row: bool) -> Tensor {
    let mut m = vec![0f32; b * s * s_kv];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..s_kv {
                let blocked = j > i + (s_kv - s) || (blocked_row && bi == 1 && i == 0);
                if blocked {
                    m[(bi * s + i) * s_kv + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, s_kv), &DEV).unwrap()
}

#[test]
fn attention_with_gqa_and_mask_matches_composed_and_finite_differences() {
    let (b, h, h_kv, s, s_kv, d) = (2, 4, 2, 5, 7, 4);
    let m = mask(b, s, s_kv);
    let v = vars_f32(
        &[&[b, h, s, d], &[b, h_kv, s_kv, d], &[b, h_kv, s_kv, d]],
        5,
    );
    let (q, k, vv) = (v[0].as_tensor(), v[1].as_tensor(), v[2].as_tensor());
    agree_f32(
        &v,
        || attention(q, k, vv, Some(&m), 0.5).unwrap(),
        || attention_composed(q, k, vv, Some(&m), 0.5).unwrap(),
        "attention (GQA, mask)",
    );
    // Without a mask and with a per-head mask [1, h, s, s_kv].
    agree_f32(
        &v,
        || attention(q, k, vv, None, 0.3).unwrap(),
        || attention_composed(q, k, vv, None, 0.3).unwrap(),
        "attention (no mask)",
    );
    let mh = rand_t(&[1, h, s, s_kv], 11).to_dtype(DType::F32).unwrap();
    agree_f32(
        &v,
        || attention(q, k, vv, Some(&mh), 0.3).unwrap(),
        || attention_composed(q, k, vv, Some(&mh), 0.3).unwrap(),
        "attention (per-head mask)",
    );
    let fd_mask = mask_with(b, s, s_kv, false);
    let (q, k, vv) = (
        input(&[b, h, s, d], 12),
        input(&[b, h_kv, s_kv, d], 13),
        input(&[b, h_kv, s_kv, d], 14),
    );
    check(&[q.clone(), k.clone(), vv.clone()], || {
        q.as_tensor()
            .apply_op3(
                k.as_tensor(),
                vv.as_tensor(),
                AttentionOp {
                    scale: 0.5,
                    mask: Some(fd_mask.clone()),
                },
            )
            .unwrap()
    });
}

#[test]
fn attention_rejects_shapes_that_do_not_fit() {
    let q = rand_t(&[1, 3, 4, 2], 1);
    let k = rand_t(&[1, 2, 4, 2], 2);
    let err = attention(&q, &k, &k, None, 1.0).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
    let k = rand_t(&[1, 3, 4, 2], 2);
    let bad_mask = Tensor::zeros((1, 1, 4, 5), DType::F32, &DEV).unwrap();
    let err = attention(&q, &k, &k, Some(&bad_mask), 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not broadcast"), "{err}");
}

#[test]
fn frozen_linear_matches_matmul_and_finite_differences() {
    let w = rand_t(&[6, 5], 20).to_dtype(DType::F32).unwrap();
    let lin = Linear::from_weights(w.clone(), None);
    let x = Var::from_tensor(&rand_t(&[2, 3, 5], 21).to_dtype(DType::F32).unwrap()).unwrap();
    agree_f32(
        std::slice::from_ref(&x),
        || lin.forward(x.as_tensor()).unwrap(),
        || x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap(),
        "frozen linear",
    );
    // f64 finite differences (input gradient only: the weight is frozen).
    let w64 = rand_t(&[6, 5], 22);
    let x64 = input(&[4, 5], 23);
    check(std::slice::from_ref(&x64), || {
        x64.as_tensor()
            .apply_op1(FrozenLinearOp {
                weight: w64.clone(),
            })
            .unwrap()
    });
}

#[test]
fn frozen_linear_widens_a_bf16_weight_block_by_block_like_an_f32_product() {
    // Enough output rows that the weight is widened in several blocks (512k values per block).
    let (n, inp, out) = (3, 1024, 1100);
    let w = rand_t(&[out, inp], 30).to_dtype(DType::BF16).unwrap();
    let x = rand_t(&[n, inp], 31).to_dtype(DType::BF16).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let y = xv
        .as_tensor()
        .apply_op1(FrozenLinearOp { weight: w.clone() })
        .unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let (w32, x32) = (
        w.to_dtype(DType::F32).unwrap(),
        x.to_dtype(DType::F32).unwrap(),
    );
    let reference = x32.matmul(&w32.t().unwrap()).unwrap();
    // One bf16 rounding of the output (relative 2^-8) on top of an exact f32 product.
    let e = max_rel(&y, &reference);
    assert!(e < 8e-3, "bf16 product differs by {e}");
    let g = rand_t(&[n, out], 32).to_dtype(DType::BF16).unwrap();
    let dx = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = dx.get(xv.as_tensor()).unwrap();
    let dx_ref = g.to_dtype(DType::F32).unwrap().matmul(&w32).unwrap();
    let e = max_rel(dx, &dx_ref);
    assert!(e < 8e-3, "bf16 input gradient differs by {e}");
}

#[test]
fn bf16_kernels_round_like_the_composed_ops() {
    // Same rounding order as HF in the model dtype: equal up to one bf16 ulp (2^-8 relative).
    let x = rand_t(&[3, 4, 16], 40).to_dtype(DType::BF16).unwrap();
    let w = rand_t(&[16], 41).to_dtype(DType::BF16).unwrap();
    let norm = RmsNorm::from_weight(w, 1e-6);
    let e = max_rel(
        &norm.forward(&x).unwrap(),
        &norm.forward_composed(&x).unwrap(),
    );
    assert!(e <= 8e-3, "rms_norm bf16: {e}");
    let g = rand_t(&[3, 4, 16], 42).to_dtype(DType::BF16).unwrap();
    let e = max_rel(
        &silu_mul(&x, &g).unwrap(),
        &(x.silu().unwrap() * &g).unwrap(),
    );
    assert!(e <= 8e-3, "silu_mul bf16: {e}");
    let (b, h, s, d) = (2, 2, 4, 8);
    let q = rand_t(&[b, h, s, d], 43).to_dtype(DType::BF16).unwrap();
    let (cos, sin) = rope_tables(b, s, d);
    let (cos, sin) = (
        cos.to_dtype(DType::F32).unwrap(),
        sin.to_dtype(DType::F32).unwrap(),
    );
    let fused = q
        .apply_op1(RopeOp {
            cos: cos.clone(),
            sin: sin.clone(),
        })
        .unwrap();
    let composed =
        rope_composed(&q, &cos.unsqueeze(1).unwrap(), &sin.unsqueeze(1).unwrap()).unwrap();
    let e = max_rel(&fused, &composed);
    assert!(e <= 8e-3, "rope bf16: {e}");
    // Attention: the fused kernel keeps the scores in f32 where the composed path rounds them to
    // bf16 first, so the two differ by a few bf16 ulps.
    let k = rand_t(&[b, h, s, d], 44).to_dtype(DType::BF16).unwrap();
    let v = rand_t(&[b, h, s, d], 45).to_dtype(DType::BF16).unwrap();
    let m = mask(b, s, s);
    let e = max_rel(
        &attention(&q, &k, &v, Some(&m), 0.35).unwrap(),
        &attention_composed(&q, &k, &v, Some(&m), 0.35).unwrap(),
    );
    assert!(e <= 3e-2, "attention bf16: {e}");
}
