//! `MllamaImageProcessor` against transformers' own outputs, dumped by
//! `scripts/make_mllama_processor_fixtures.py` (transformers 4.57.1, Pillow 13.0.0): pixel values
//! within 0.02 (max abs; the port reproduces Pillow's resize, so the printed differences are
//! expected to be f32 rounding at most), aspect-ratio ids, masks and tile counts exactly.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use lvlm_ift::data::image::{load_dynamic, load_rgb};
use lvlm_ift::data::processor::{
    flatten_alpha_on_white, AspectMode, MllamaImageProcessor, MllamaProcessorConfig, TiledImage,
};

const TOLERANCE: f32 = 0.02;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `gradient(w, h)` of the fixture script.
fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            ((x * 37 + y * 91) % 256) as u8,
        ])
    })
}

/// The picture as HF's processor sees it after its `convert_to_rgb`: RGBA composited onto
/// white, everything else as the crate's loader makes it.
fn picture(spec: &str) -> RgbImage {
    if let Some(size) = spec.strip_prefix("gradient:") {
        let (w, h) = size.split_once('x').expect("WxH");
        return gradient(w.parse().unwrap(), h.parse().unwrap());
    }
    let path = fixtures().join("images").join(spec);
    let img = load_dynamic(&path).expect("image");
    if img.color().has_alpha() {
        flatten_alpha_on_white(&img.to_rgba8())
    } else {
        load_rgb(&path).expect("image")
    }
}

fn processor(
    config_dir: &str,
    aspect: AspectMode,
    max_tiles: Option<usize>,
) -> MllamaImageProcessor {
    let dir = fixtures().join("mllama-processor").join(config_dir);
    let cfg = MllamaProcessorConfig::from_model_dir(&dir).expect("preprocessor config");
    assert!(
        cfg.source.is_some(),
        "{} has no preprocessor_config.json",
        dir.display()
    );
    MllamaImageProcessor::new(cfg, aspect, max_tiles).expect("processor")
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

struct Expected {
    tensors: HashMap<String, Tensor>,
    cases: serde_json::Map<String, serde_json::Value>,
    stride: usize,
}

fn expected() -> Expected {
    let parity = fixtures().join("parity");
    let tensors =
        candle_core::safetensors::load(parity.join("mllama-processor.safetensors"), &Device::Cpu)
            .expect("parity tensors");
    let text = std::fs::read_to_string(parity.join("mllama-processor.json")).expect("json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    Expected {
        tensors,
        cases: doc["cases"].as_object().expect("cases").clone(),
        stride: doc["sample_stride"].as_u64().expect("stride") as usize,
    }
}

impl Expected {
    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("missing {key}"))
    }

    /// Runs the case's picture through the port, as the fixture script ran it through HF, and
    /// checks ids, mask and tile count exactly.
    fn run(&self, key: &str, config_dir: &str) -> TiledImage {
        let case = &self.cases[key];
        let aspect = match case["aspect"].as_str().unwrap() {
            "resize" => AspectMode::Resize,
            "pad" => AspectMode::Pad,
            "squash" => AspectMode::Squash,
            other => panic!("{key}: aspect {other}"),
        };
        let max_tiles = case["max_tiles"].as_u64().map(|n| n as usize);
        let p = processor(config_dir, aspect, max_tiles);
        let got = p
            .preprocess(&picture(case["image"].as_str().unwrap()))
            .expect("preprocess");
        assert_eq!(
            vec![i64::from(got.aspect_ratio_id)],
            i64s(self.get(&format!("{key}.aspect_ratio_ids"))),
            "{key}: aspect ratio id"
        );
        let mask: Vec<i64> = got
            .aspect_ratio_mask
            .iter()
            .map(|&m| i64::from(m))
            .collect();
        assert_eq!(
            mask,
            i64s(self.get(&format!("{key}.aspect_ratio_mask"))),
            "{key}: mask"
        );
        assert_eq!(
            vec![got.num_tiles as i64],
            i64s(self.get(&format!("{key}.num_tiles"))),
            "{key}: num_tiles"
        );
        assert_eq!(
            got.num_tiles,
            got.aspect_ratio.0 * got.aspect_ratio.1,
            "{key}"
        );
        assert_eq!(
            got.data.len(),
            got.max_tiles * 3 * got.tile_height * got.tile_width,
            "{key}"
        );
        got
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn tiles2_cases_match_transformers() {
    let want = expected();
    let keys: Vec<&String> = want
        .cases
        .keys()
        .filter(|k| k.starts_with("tiles2."))
        .collect();
    assert!(keys.len() >= 10, "{keys:?}");
    for key in keys {
        let got = want.run(key, "tiles2");
        let expected = want.get(&format!("{key}.pixel_values"));
        // The real tiles are stored; the packing tiles after them are zeros in HF.
        assert_eq!(expected.dims(), &[got.num_tiles, 3, 28, 28], "{key}");
        let real = got.num_tiles * 3 * 28 * 28;
        let max = max_abs(&got.data[..real], &f32s(expected));
        let exact = got.data[..real]
            .iter()
            .zip(f32s(expected))
            .filter(|(a, b)| **a == *b)
            .count();
        println!(
            "{key:>22}: grid {:?}, max-abs {max:.3e}, bit-exact {exact}/{real}",
            got.aspect_ratio
        );
        assert!(max <= TOLERANCE, "{key}: max-abs {max}");
        assert!(
            got.data[real..].iter().all(|&v| v == 0.0),
            "{key}: packing tiles"
        );
    }
}

#[test]
fn released_settings_match_transformers() {
    let want = expected();
    let keys: Vec<&String> = want
        .cases
        .keys()
        .filter(|k| k.starts_with("llama."))
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in keys {
        let got = want.run(key, "llama-3.2-vision");
        assert_eq!((got.tile_height, got.max_tiles), (560, 4), "{key}");
        let sample: Vec<f32> = got.data.iter().step_by(want.stride).copied().collect();
        let max = max_abs(&sample, &f32s(want.get(&format!("{key}.sample"))));
        let plane = 3 * 560 * 560;
        let sums: Vec<f64> = got
            .data
            .chunks(plane)
            .map(|t| t.iter().map(|&v| f64::from(v)).sum())
            .collect();
        let want_sums: Vec<f64> = want
            .get(&format!("{key}.tile_sums"))
            .to_vec1()
            .expect("tile sums");
        println!(
            "{key:>22}: grid {:?}, sampled max-abs {max:.3e}, tile sums {sums:?} vs {want_sums:?}",
            got.aspect_ratio
        );
        assert!(max <= TOLERANCE, "{key}: sampled max-abs {max}");
        for (s, w) in sums.iter().zip(&want_sums) {
            // Summation order differs from numpy's pairwise sum; the values do not.
            assert!(
                (s - w).abs() <= 1e-6 * w.abs().max(1.0) + 1e-3,
                "{key}: {s} vs {w}"
            );
        }
    }
}

#[test]
fn hf_saved_configs_read_back() {
    let tiles2 = processor("tiles2", AspectMode::Resize, None);
    assert_eq!((tiles2.tile_size(), tiles2.max_tiles()), (28, 2));
    let released = processor("llama-3.2-vision", AspectMode::Squash, Some(1));
    assert_eq!((released.tile_size(), released.max_tiles()), (560, 1));
    let cfg = released.config();
    assert_eq!(cfg.image_mean, [0.48145466, 0.4578275, 0.40821073]);
    assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
    // The recipe's geometry on the released settings: one 560 px tile per picture.
    let t = released.preprocess(&gradient(90, 31)).unwrap();
    assert_eq!(
        (t.num_tiles, t.aspect_ratio_id, t.data.len()),
        (1, 1, 3 * 560 * 560)
    );
}

#[test]
fn model_dir_without_settings_gets_class_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MllamaProcessorConfig::from_model_dir(dir.path()).unwrap();
    assert_eq!((cfg.tile_size, cfg.max_image_tiles), (224, 4));
    assert_eq!(cfg.image_mean, [0.5; 3]);
}
