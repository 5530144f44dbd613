//! Memory and time of backward through frozen linear layers: our `Linear` (detached product
//! re-attached by a custom op whose backward yields only dx) versus candle's plain matmul, which
//! also materialises a weight-sized gradient per frozen layer.
//!
//! `cargo bench --bench frozen_weights` (set RAYON_NUM_THREADS to pin threads).

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use lvlm_ift::model::layers::Linear;

const LAYERS: usize = 4;
const DIM: usize = 1024;
const TOKENS: usize = 256;

/// Elements held by every gradient in the store (activations' and weights').
fn grad_elems(grads: &candle_core::backprop::GradStore) -> usize {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    ids.iter()
        .filter_map(|id| grads.get_id(*id))
        .map(|g| g.elem_count())
        .sum()
}

fn run(label: &str, frozen_op: bool) {
    let dev = Device::Cpu;
    let weights: Vec<Tensor> = (0..LAYERS)
        .map(|_| {
            (Tensor::randn(0f32, 1.0, (DIM, DIM), &dev).unwrap() / (DIM as f64).sqrt()).unwrap()
        })
        .collect();
    let layers: Vec<Linear> = weights
        .iter()
        .map(|w| Linear::from_weights(w.clone(), None))
        .collect();
    let input = Var::from_tensor(&Tensor::randn(0f32, 1.0, (TOKENS, DIM), &dev).unwrap()).unwrap();
    let mut times = vec![];
    let mut weight_grad_elems = 0;
    let _ = &weights;
    for _ in 0..5 {
        let mut x = input.as_tensor().clone();
        for (l, w) in layers.iter().zip(&weights) {
            x = if frozen_op {
                l.forward(&x).unwrap()
            } else {
                x.matmul(&w.t().unwrap()).unwrap()
            };
        }
        let loss = x.sqr().unwrap().mean_all().unwrap();
        let t0 = Instant::now();
        let grads = loss.backward().unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        weight_grad_elems = grad_elems(&grads);
        assert!(grads.get(input.as_tensor()).is_some());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{label:>14}: backward median {:.1} ms, GradStore elements {weight_grad_elems} ({:.1} MB f32)",
        times[times.len() / 2],
        weight_grad_elems as f64 * 4.0 / 1e6
    );
    let _ = DType::F32;
}

fn main() {
    println!("{LAYERS} frozen layers of {DIM}x{DIM}, {TOKENS} tokens, CPU");
    run("plain matmul", false);
    run("frozen op", true);
}
