//! The frozen-vision feature cache end to end on the tiny LLaVA: a stage with a frozen vision
//! tower trains to the same weights with the cache as without, fills one entry per distinct image,
//! serves a second run from it (and really reads it), is off where the tower trains, and serves
//! `eval` with unchanged answers.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lvlm_ift::config::TrainConfig;
use lvlm_ift::data::feature_cache::{content_key, CacheLocation};
use lvlm_ift::eval::mcq::McqItem;
use lvlm_ift::eval::run::{predict_batch, Scoring};
use lvlm_ift::session::{Session, SessionOptions};
use lvlm_ift::train::checkpoint::load_safetensors;
use lvlm_ift::train::plan::{TrainPlan, VisionCacheUse};
use lvlm_ift::train::recipe::{run_recipe, Resume};

/// The LoRA fixture recipe with its adapters on the language model only (the vision tower stays
/// frozen; the projector trains in full), 2 epochs, written to `out`.
fn recipe(out: &Path, extra: &[String]) -> TrainConfig {
    let mut ov = common::fixture_overrides(out);
    ov.push(r"lora.target_modules='.*language_model.*\.(q|k|v|o)_proj'".into());
    ov.extend(extra.iter().cloned());
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    TrainConfig::load(&repo.join("tests/fixtures/recipes/lora.toml"), &ov).unwrap()
}

fn final_weights(out: &Path) -> Vec<(String, Tensor)> {
    let mut w: Vec<_> = load_safetensors(
        &out.join("checkpoints/checkpoint-6/trainable.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            common::diff(ta, tb).0
        })
        .fold(0.0, f32::max)
}

/// Entry files of the single model folder under `root`.
fn entries(root: &Path) -> Vec<PathBuf> {
    let models: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(models.len(), 1, "one model's folder: {models:?}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&models[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn training_with_the_cache_equals_training_without_and_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain");
    let cached = tmp.path().join("cached");
    let off = ["vision_cache.enabled=false".to_string()];
    run_recipe(&recipe(&plain, &off), Resume::No, true).unwrap();
    assert!(!plain.join("vision-cache").exists());
    let cfg = recipe(&cached, &[]);
    let spec = &cfg.stage_specs()[0];
    let plan = TrainPlan::build(&cfg, spec, None).unwrap();
    assert!(
        matches!(plan.vision_cache(), VisionCacheUse::On { ref dir, .. } if *dir == cached.join("vision-cache")),
        "{:?}",
        plan.vision_cache()
    );
    assert!(plan.describe().unwrap().contains("vision cache     on:"));
    run_recipe(&cfg, Resume::No, true).unwrap();

    let (a, b) = (final_weights(&plain), final_weights(&cached));
    let d = max_diff(&a, &b);
    println!("with vs without the vision cache after 6 steps: max abs diff {d:e}");
    assert!(d <= 1e-6, "{d}");

    // One entry per distinct image of the pair set.
    let images = common::fixtures().join("pairs/images");
    let distinct: HashSet<String> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| content_key(&e.unwrap().path()).unwrap())
        .collect();
    let root = cached.join("vision-cache");
    let files = entries(&root);
    assert_eq!(files.len(), distinct.len(), "{files:?}");

    // A second run pointed at that cache stores nothing new and trains to the same weights.
    let again = tmp.path().join("again");
    let shared = [format!("vision_cache.dir={}", root.display())];
    run_recipe(&recipe(&again, &shared), Resume::No, true).unwrap();
    assert_eq!(entries(&root), files);
    assert!(!again.join("vision-cache").exists());
    assert!(max_diff(&b, &final_weights(&again)) <= 1e-6);

    // It really reads the entries: altered states change what trains.
    for f in &files {
        let t = candle_core::safetensors::load(f, &Device::Cpu).unwrap();
        let states = (&t["states"] * 0.5).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("states".to_string(), states)]),
            f,
        )
        .unwrap();
    }
    let altered = tmp.path().join("altered");
    run_recipe(&recipe(&altered, &shared), Resume::No, true).unwrap();
    assert!(max_diff(&b, &final_weights(&altered)) > 1e-4);
}

#[test]
fn the_cache_is_off_where_the_tower_is_not_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // The fixture recipe's own targets adapt CLIP's q/k/v projections too, with dropout.
    let mut ov = common::fixture_overrides(&out);
    ov.push("lora.dropout=0.1".into());
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cfg = TrainConfig::load(&repo.join("tests/fixtures/recipes/lora.toml"), &ov).unwrap();
    let plan = TrainPlan::build(&cfg, &cfg.stage_specs()[0], None).unwrap();
    let VisionCacheUse::Off(why) = plan.vision_cache() else {
        panic!("cache on with LoRA on the tower");
    };
    assert!(why.contains("vision_tower is not frozen (lora)"), "{why}");
    assert!(plan
        .describe()
        .unwrap()
        .contains("vision cache     off: vision_tower is not frozen (lora)"));

    let full = recipe(&out, &[r#"full.groups=["vision_tower"]"#.to_string()]);
    let plan = TrainPlan::build(&full, &full.stage_specs()[0], None).unwrap();
    assert!(
        matches!(plan.vision_cache(), VisionCacheUse::Off(ref w) if w.contains("full")),
        "{:?}",
        plan.vision_cache()
    );
    let bad = TrainConfig::load(
        &repo.join("tests/fixtures/recipes/lora.toml"),
        &[
            common::fixture_overrides(&out),
            vec!["vision_cache.max_gib=0".to_string()],
        ]
        .concat(),
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("vision_cache.max_gib"), "{bad}");
}

#[test]
fn eval_answers_the_same_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("tiny-llava");
    let img = |n: &str| {
        common::fixtures()
            .join("pairs/images")
            .join(n)
            .to_string_lossy()
            .into_owned()
    };
    let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let items: Vec<McqItem> = [
        (
            "a",
            "00_small_red_circle.png",
            "cell_size",
            o(&["big", "small"]),
        ),
        (
            "b",
            "00_small_red_circle.png",
            "shape",
            o(&["circle", "square"]),
        ),
        (
            "c",
            "01_big_red_circle.png",
            "cell_size",
            o(&["big", "small"]),
        ),
    ]
    .into_iter()
    .map(|(id, image, key, options)| McqItem {
        id: id.into(),
        image: img(image),
        key: key.into(),
        options,
        answer: 0,
        source: None,
    })
    .collect();
    let refs: Vec<&McqItem> = items.iter().collect();
    let plain = Session::load(&model.to_string_lossy(), SessionOptions::default()).unwrap();
    let root = tmp.path().join("cache");
    let with_cache = || {
        Session::load(
            &model.to_string_lossy(),
            SessionOptions {
                vision_cache: Some(CacheLocation {
                    dir: root.clone(),
                    max_bytes: 1 << 30,
                }),
                ..SessionOptions::default()
            },
        )
        .unwrap()
    };
    for scoring in [Scoring::Generate, Scoring::Likelihood] {
        let want = predict_batch(&plain, &refs, Path::new("/"), scoring).unwrap();
        // First pass fills the cache, the second is served from it.
        for pass in 0..2 {
            let s = with_cache();
            let got = predict_batch(&s, &refs, Path::new("/"), scoring).unwrap();
            let stats = s.vision_cache.as_ref().unwrap().stats();
            assert_eq!(entries(&root).len(), 2);
            if pass == 1 {
                assert_eq!((stats.hits, stats.stored), (2, 0), "{stats:?}");
            }
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.raw, w.raw);
                assert_eq!(g.predicted, w.predicted);
                match (&g.scores, &w.scores) {
                    (Some(x), Some(y)) => {
                        for (p, q) in x.iter().zip(y) {
                            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
                        }
                    }
                    (None, None) => {}
                    other => panic!("scores {other:?}"),
                }
            }
        }
    }
}
