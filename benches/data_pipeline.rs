//! Does the step wait for data? Trains the tiny checkpoint for one epoch on 224 px synthetic pairs
//! (decoded, resized and normalised on the prefetching workers) and reports the share of step
//! time spent blocked on the loader.
//!
//! `cargo bench --bench data_pipeline`

use std::path::PathBuf;

use lvlm_ift::config::TrainConfig;
use lvlm_ift::data::synthetic::{write_synthetic_pairs, SynthSpec};
use lvlm_ift::train::metrics::MetricsLog;
use lvlm_ift::train::recipe::{run_recipe, Resume};

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("synth");
    let spec = SynthSpec {
        count: 200,
        image_size: 224,
        seed: 0,
    };
    write_synthetic_pairs(&data, &spec).expect("synthetic pairs");
    let out = tmp.path().join("run");
    let ov = vec![
        format!(
            "model.path={}",
            repo.join("tests/fixtures/tiny-llava").display()
        ),
        format!(
            "data.train=[{{ manifest = \"{}\" }}]",
            data.join("pairs.jsonl").display()
        ),
        format!("train.output_dir={}", out.display()),
        "data.instruction_mode=proxy".to_string(),
        "train.epochs=1".to_string(),
        "train.grad_accum=1".to_string(),
    ];
    let cfg =
        TrainConfig::load(&repo.join("tests/fixtures/recipes/lora.toml"), &ov).expect("recipe");
    run_recipe(&cfg, Resume::No, true).expect("training");
    let m = MetricsLog::read_all(&out.join("metrics.jsonl")).expect("metrics");
    let total = m.last().map(|s| s.elapsed_sec).unwrap_or(0.0);
    let wait: f64 = m.iter().map(|s| s.data_wait_sec).sum();
    // The first batch cannot be prefetched; report it apart.
    let first = m.first().map(|s| s.data_wait_sec).unwrap_or(0.0);
    println!(
        "{} steps of batch {} on 224 px images: {:.3} s total, data wait {:.4} s ({:.2}% of step time; {:.2}% excluding the first batch's {:.4} s)",
        m.len(),
        cfg.train.batch_size,
        total,
        wait,
        100.0 * wait / total,
        100.0 * (wait - first) / total,
        first
    );
}
