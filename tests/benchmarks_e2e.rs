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
        for scoring in ["generate", "likelihood"] {
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
