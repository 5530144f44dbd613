//! Every benchmark end to end through the real binary: `prepare` on the synthetic copies of its
//! released files, then `eval` on the tiny checkpoint in both scoring modes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lvlm(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lvlm-ift {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn prepare_then_eval_every_benchmark_on_the_tiny_checkpoint() {
    let model = repo().join("tests/fixtures/tiny-llava");
    for (bench, source) in [
        ("wbcatt", "tests/fixtures/bench/wbcatt"),
        ("skincon", "tests/fixtures/bench/skincon"),
        ("cbis", "tests/fixtures/bench/cbis/source"),
        ("mimic-cxr", "tests/fixtures/bench/mimic-cxr/source"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        lvlm(&[
            "prepare",
            "--benchmark",
            bench,
            "--source",
            s(&repo().join(source)),
            "--out",
            s(&data),
        ]);
        for scoring in ["generate", "likelihood", "likelihood-text"] {
            let out = tmp.path().join(format!("eval-{scoring}"));
            lvlm(&[
                "eval",
                "--benchmark",
                bench,
                "--data",
                s(&data),
                "--model",
                s(&model),
                "--split",
                "test",
                "--scoring",
                scoring,
                "--limit",
                "3",
                "--out",
                s(&out),
                "--quiet",
            ]);
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                    .unwrap();
            assert_eq!(report["n_predictions"], 3, "{bench} {scoring}: {report}");
            let acc = report["overall"]["accuracy"]["accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc), "{bench} {scoring}");
            let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
            assert_eq!(preds.lines().count(), 3, "{bench} {scoring}");
        }
    }
}

/// The reference evaluates every epoch's checkpoint: `eval --checkpoints RUN_DIR` scores each
/// checkpoint (LoRA adapter + fully trained projector) and the final outputs in one command.
#[test]
fn eval_scores_every_training_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    lvlm(&[
        "train",
        "--config",
        s(&repo().join("tests/fixtures/recipes/lora.toml")),
        "--quiet",
        "--set",
        &format!("train.output_dir={}", run.display()),
        "--set",
        &format!(
            "model.path={}",
            repo().join("tests/fixtures/tiny-llava").display()
        ),
        "--set",
        &format!(
            "data.train=[{{ manifest = \"{}\" }}]",
            repo().join("tests/fixtures/pairs/pairs.jsonl").display()
        ),
    ]);
    let data = tmp.path().join("data");
    lvlm(&[
        "prepare",
        "--benchmark",
        "wbcatt",
        "--source",
        s(&repo().join("tests/fixtures/bench/wbcatt")),
        "--out",
        s(&data),
    ]);
    let out = tmp.path().join("evals");
    lvlm(&[
        "eval",
        "--benchmark",
        "wbcatt",
        "--data",
        s(&data),
        "--model",
        s(&repo().join("tests/fixtures/tiny-llava")),
        "--scoring",
        "likelihood",
        "--limit",
        "2",
        "--checkpoints",
        s(&run),
        "--out",
        s(&out),
        "--quiet",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints.json")).unwrap())
            .unwrap();
    let names: Vec<String> = summary["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["checkpoint"].as_str().unwrap().to_string())
        .collect();
    // Two epochs of 3 steps: a checkpoint at each epoch end, plus the run's final outputs.
    assert_eq!(
        names,
        vec!["", "checkpoints/checkpoint-3", "checkpoints/checkpoint-6"],
        "{summary}"
    );
    for c in summary["checkpoints"].as_array().unwrap() {
        assert!(
            c["adapter"].is_string() && c["full_weights"].is_string(),
            "{c}"
        );
    }
    // The last checkpoint and the final outputs hold the same weights: same scores.
    let preds = |dir: &Path| std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap();
    assert_eq!(preds(&out), preds(&out.join("checkpoints/checkpoint-6")));
}
