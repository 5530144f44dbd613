//! Image loading + `CLIPImageProcessor` against transformers' own `pixel_values`, dumped by
//! `scripts/make_fixtures.py` (transformers 4.57.1, Pillow 13.0.0) for the tiny-llava fixture.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lvlm_ift::data::image::load_rgb;
use lvlm_ift::data::processor::{AspectMode, ClipImageProcessor, ClipProcessorConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `(case name in the safetensors file, image file, aspect mode)`.
const CASES: &[(&str, &str, AspectMode)] = &[
    ("photo", "photo_67x45.png", AspectMode::Resize),
    ("small", "small_20x26.png", AspectMode::Resize),
    ("rgba", "rgba_40x40.png", AspectMode::Resize),
    ("gray8", "gray8_33x50.png", AspectMode::Resize),
    ("photo_pad", "photo_67x45.png", AspectMode::Pad),
];

fn processor(dir: &Path, aspect: AspectMode) -> ClipImageProcessor {
    let cfg = ClipProcessorConfig::from_model_dir(dir).expect("preprocessor config");
    ClipImageProcessor::new(cfg, aspect).expect("processor")
}

#[test]
fn pixel_values_match_transformers() {
    let root = fixtures();
    let expected =
        candle_core::safetensors::load(root.join("parity/tiny-llava.safetensors"), &Device::Cpu)
            .expect("parity tensors");
    let model_dir = root.join("tiny-llava");

    for &(name, file, aspect) in CASES {
        let want = expected
            .get(&format!("pixel_values.{name}"))
            .unwrap_or_else(|| panic!("missing pixel_values.{name}"));
        assert_eq!(want.dims(), &[1, 3, 30, 30], "{name}");
        let want: Vec<f32> = want
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("expected values");

        let img = load_rgb(&root.join("images").join(file)).expect("image");
        let p = processor(&model_dir, aspect);
        let got = p.preprocess(&img).expect("preprocess");
        assert_eq!((got.height, got.width), (30, 30), "{name}");
        assert_eq!(p.output_size(), (30, 30));

        let diffs: Vec<f32> = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let max = diffs.iter().copied().fold(0f32, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        let exact = diffs.iter().filter(|d| **d == 0.0).count();
        println!(
            "{name:>10}: max-abs {max:.3e}, mean-abs {mean:.3e}, bit-exact {exact}/{}",
            diffs.len()
        );
        // The acceptance bound is 0.02 / 0.002; we reproduce Pillow's fixed-point resampling
        // exactly, so anything above f32 rounding is a regression.
        assert!(max < 1e-6, "{name}: max-abs {max}");
        assert!(mean < 1e-7, "{name}: mean-abs {mean}");
    }
}
