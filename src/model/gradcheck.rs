//! Finite-difference gradient checks (f64) for every building block. They exist because candle
//! cuts gradients silently for ops without a backward (../shared/design/CANDLE.md): a block that
//! uses one would still run, and the loss would still fall, with some weights never trained.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::model::clip::{ClipEmbeddings, ClipEncoderLayer};
use crate::model::config::{RopeKind, TextConfig, TextFamily, VisionConfig};
use crate::model::layers::{attention, scatter_rows, LayerNorm, RmsNorm, Rope};
use crate::model::llama::{attention_mask, inv_freq, position_ids, Attention, Mlp};
use crate::model::llava::Projector;
use crate::model::weights::{identity_keys, WeightStore, Weights};

const DEV: Device = Device::Cpu;

pub(crate) fn randn(shape: &[usize], std: f64, rng: &mut rand::rngs::StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            // Box-Muller
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random::<f64>();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// A trainable f64 weight store from named shapes, random values.
pub(crate) fn store(shapes: &[(&str, Vec<usize>)], seed: u64) -> (tempfile::TempDir, WeightStore) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let map: HashMap<String, Tensor> = shapes
        .iter()
        .map(|(n, s)| (n.to_string(), randn(s, 0.5, &mut rng)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    let st = WeightStore::open(dir.path(), &[path], &DEV, DType::F64, identity_keys)
        .unwrap()
        .with_trainable(Box::new(|_| true));
    (dir, st)
}

/// Compare backprop gradients of `loss = sum(f() * R)` (R fixed random) with central differences
/// on up to 12 random elements of every var.
pub(crate) fn check(vars: &[Var], f: impl Fn() -> Tensor) {
    let out = f();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let r = randn(out.dims(), 1.0, &mut rng);
    let loss = |o: &Tensor| -> f64 {
        (o * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (vi, var) in vars.iter().enumerate() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("var {vi} {:?} received no gradient", var.dims()))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        for _ in 0..12.min(base.len()) {
            let i = rng.random_range(0..base.len());
            let bump = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.dims(), &DEV).unwrap())
                    .unwrap();
                loss(&f())
            };
            let num = (bump(eps) - bump(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &DEV).unwrap())
                .unwrap();
            let err = (num - g[i]).abs();
            assert!(
                err <= 1e-6 + 1e-5 * num.abs(),
                "var {vi} {:?} elem {i}: backprop {} vs finite difference {num}",
                var.dims(),
                g[i]
            );
        }
    }
}

pub(crate) fn input(shape: &[usize], seed: u64) -> Var {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Var::from_tensor(&randn(shape, 1.0, &mut rng)).unwrap()
}

fn text_cfg() -> TextConfig {
    TextConfig {
        family: TextFamily::Mistral,
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope: RopeKind::Default,
        max_position_embeddings: 16,
        attention_bias: false,
        mlp_bias: false,
        tie_word_embeddings: false,
    }
}

fn vision_cfg() -> VisionConfig {
    VisionConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_channels: 3,
        image_size: 6,
        patch_size: 3,
        layer_norm_eps: 1e-5,
    }
}

#[test]
fn layer_norm() {
    let (_d, st) = store(&[("n.weight", vec![8]), ("n.bias", vec![8])], 1);
    let ln = LayerNorm::new(&Weights::root(&st).pp("n"), 8, 1e-5).unwrap();
    let x = input(&[2, 3, 8], 2);
    let mut vars = st
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    vars.push(x.clone());
    check(&vars, || ln.forward(x.as_tensor()).unwrap());
}

#[test]
fn rms_norm() {
    let (_d, st) = store(&[("n.weight", vec![8])], 3);
    let n = RmsNorm::new(&Weights::root(&st).pp("n"), 8, 1e-6).unwrap();
    let x = input(&[2, 3, 8], 4);
    let mut vars = st
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    vars.push(x.clone());
    check(&vars, || n.forward(x.as_tensor()).unwrap());
}

#[test]
fn rope() {
    let rope = Rope::new(&inv_freq(&text_cfg()), 16, DType::F64, &DEV).unwrap();
    let x = input(&[2, 3, 5, 4], 5);
    let pos = position_ids(
        &[vec![true; 5], vec![true, true, true, false, false]],
        0,
        &DEV,
    )
    .unwrap();
    check(std::slice::from_ref(&x), || {
        rope.apply(x.as_tensor(), &pos).unwrap()
    });
}

#[test]
fn masked_attention() {
    let (q, k, v) = (
        input(&[1, 2, 4, 3], 6),
        input(&[1, 2, 4, 3], 7),
        input(&[1, 2, 4, 3], 8),
    );
    let mask = attention_mask(&[vec![true, true, true, false]], 4, 0, &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    check(&[q.clone(), k.clone(), v.clone()], || {
        attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            Some(&mask),
            0.5,
        )
        .unwrap()
    });
}

#[test]
fn llama_attention_block_with_gqa() {
    let cfg = text_cfg();
    let (_d, st) = store(
        &[
            ("a.q_proj.weight", vec![16, 8]),
            ("a.k_proj.weight", vec![8, 8]),
            ("a.v_proj.weight", vec![8, 8]),
            ("a.o_proj.weight", vec![8, 16]),
        ],
        9,
    );
    let attn = Attention::new(&Weights::root(&st).pp("a"), &cfg).unwrap();
    let rope = Rope::new(&inv_freq(&cfg), 16, DType::F64, &DEV).unwrap();
    let valid = vec![vec![true; 5]];
    let pos = position_ids(&valid, 0, &DEV).unwrap();
    let mask = attention_mask(&valid, 5, 0, &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let x = input(&[1, 5, 8], 10);
    let mut vars = st
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    vars.push(x.clone());
    check(&vars, || {
        attn.forward(x.as_tensor(), &rope, &pos, Some(&mask), None)
            .unwrap()
    });
}

#[test]
fn llama_mlp() {
    let cfg = text_cfg();
    let (_d, st) = store(
        &[
            ("m.gate_proj.weight", vec![12, 8]),
            ("m.up_proj.weight", vec![12, 8]),
            ("m.down_proj.weight", vec![8, 12]),
        ],
        11,
    );
    let mlp = Mlp::new(&Weights::root(&st).pp("m"), &cfg).unwrap();
    let x = input(&[2, 3, 8], 12);
    let mut vars = st
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    vars.push(x.clone());
    check(&vars, || mlp.forward(x.as_tensor()).unwrap());
}

#[test]
fn clip_vision_embeddings() {
    let cfg = vision_cfg();
    let (_d, st) = store(
        &[
            ("e.patch_embedding.weight", vec![8, 3, 3, 3]),
            ("e.class_embedding", vec![8]),
            ("e.position_embedding.weight", vec![5, 8]),
        ],
        13,
    );
    let emb = ClipEmbeddings::new(&Weights::root(&st).pp("e"), &cfg).unwrap();
    let px = input(&[2, 3, 6, 6], 14);
    let mut vars = st
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    vars.push(px.clone());
    check(&vars, || emb.forward(px.as_tensor()).unwrap());
}

#[test]
fn clip_encoder_layer() {
    let cfg = vision_cfg();
    let mut shapes = vec![];
    for n in ["layer_norm1", "layer_norm2"] {
        shapes.push((format!("l.{n}.weight"), vec![8]));
        shapes.push((format!("l.{n}.bias"), vec![8]));
    }
    for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        shapes.push((format!("l.self_attn.{p}.weight"), vec![8, 8]));
        shapes.push((format!("l.self_attn.{p}.bias"), vec![8]));
    }
    shapes.push(("l.mlp.fc1.weight".into(), vec![12, 8]));
    shapes.push(("l.mlp.fc1.bias".into(), vec![12]));
    shapes.push(("l.mlp.fc2.weight".into(), vec![8, 12]));
    shapes.push(("l.mlp.fc2.bias".into(), vec![8]));
    let shapes: Vec<(&str, Vec<usize>)> = shapes
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let (_d, st) = store(&shapes, 15);
    let layer = ClipEncoderLayer::new(&Weights::root(&st).pp("l"), &cfg).unwrap();
    let x = input(&[1, 5, 8], 16);
    let mut vars = st
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    assert_eq!(vars.len(), 16);
    vars.push(x.clone());
    check(&vars, || layer.forward(x.as_tensor()).unwrap());
}

#[test]
fn projector_with_erf_gelu() {
    let (_d, st) = store(
        &[
            ("p.linear_1.weight", vec![8, 6]),
            ("p.linear_1.bias", vec![8]),
            ("p.linear_2.weight", vec![8, 8]),
            ("p.linear_2.bias", vec![8]),
        ],
        17,
    );
    let proj = Projector::new(&Weights::root(&st).pp("p"), 6, 8, true).unwrap();
    let x = input(&[1, 4, 6], 18);
    let mut vars = st
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>();
    vars.push(x.clone());
    check(&vars, || proj.forward(x.as_tensor()).unwrap());
}

#[test]
fn image_feature_splice() {
    let base = input(&[6, 4], 19);
    let rows = input(&[2, 4], 20);
    check(&[base.clone(), rows.clone()], || {
        scatter_rows(base.as_tensor(), rows.as_tensor(), &[4, 1]).unwrap()
    });
    let out = scatter_rows(base.as_tensor(), rows.as_tensor(), &[4, 1]).unwrap();
    let r = rows.as_tensor().get(0).unwrap();
    assert_eq!(
        out.get(4).unwrap().to_vec1::<f64>().unwrap(),
        r.to_vec1::<f64>().unwrap()
    );
}
