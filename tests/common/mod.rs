//! Shared helpers for integration tests: fixture paths, expected tensors, comparisons.
#![allow(dead_code)]

pub mod bench;
pub mod dicom;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `--set` overrides that point a recipe at the tiny checkpoint, the tiny pair set and `out`
/// (absolute paths, so tests do not depend on the working directory).
pub fn fixture_overrides(out: &std::path::Path) -> Vec<String> {
    vec![
        format!("model.path={}", fixtures().join("tiny-llava").display()),
        format!(
            "data.train=[{{ manifest = \"{}\" }}]",
            fixtures().join("pairs/pairs.jsonl").display()
        ),
        format!("train.output_dir={}", out.display()),
    ]
}

/// An error and all its causes, `: `-joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cur = c.source();
    }
    msg
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny checkpoints `scripts/make_fixtures.py` builds.
pub const MODELS: &[&str] = &["tiny-llava", "tiny-llava-mistral"];

/// Expected tensors and metadata dumped from HF transformers for one model.
pub struct Expected {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Expected {
    pub fn load(model: &str) -> Self {
        let dir = fixtures().join("parity");
        let tensors =
            candle_core::safetensors::load(dir.join(format!("{model}.safetensors")), &Device::Cpu)
                .expect("parity tensors");
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{model}.json"))).expect("parity json"),
        )
        .expect("parity json parses");
        Self { tensors, meta }
    }

    pub fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no `{key}`"))
    }

    /// Integer tensor as flat u32 ids.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.tensor(key)
            .flatten_all()
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    }
}

/// (max abs diff, mean abs diff) of two tensors of equal shape.
/// Largest |a - b| relative to the largest |a| (at least 1e-6).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = a
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff(a, b).0 / scale.max(1e-6)
}

/// Overrides pointing a Llama-3.2-Vision recipe at the tiny Mllama and the fixture pairs, on the
/// CPU in f32, two steps a stage at lr 1e-2, written to `out`.
pub fn tiny_mllama_overrides(out: &std::path::Path) -> Vec<String> {
    vec![
        format!("model.path={}", fixtures().join("tiny-mllama").display()),
        "model.device=cpu".into(),
        "model.dtype=f32".into(),
        format!(
            "data.train=[{{ manifest = \"{}\" }}]",
            fixtures().join("pairs/pairs.jsonl").display()
        ),
        format!("train.output_dir={}", out.display()),
        "train.max_steps=2".into(),
        "optim.lr=1e-2".into(),
    ]
}

pub fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap();
    let max = d.max(0).unwrap().to_scalar::<f32>().unwrap();
    let mean = d.mean(0).unwrap().to_scalar::<f32>().unwrap();
    (max, mean)
}
