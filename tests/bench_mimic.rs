//! MIMIC-CXR `prepare` against item lists computed by a plain Python implementation with Python's
//! `random` (`scripts/make_bench_fixtures_mimic.py`), with and without the per-finding yes/no
//! questions; the `--mimic-*` flags of the CLI.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::bench::{
    abs_image, bench_fixture as fixture, compare, compare_prepared, copy_dir, read_jsonl,
};
use lvlm_ift::bench::mimic_cxr;
use lvlm_ift::bench::prepare::{
    PrepareOptions, PrepareSummary, MCQ_TEST, MCQ_VAL, TRAIN_PAIRS, VAL_PAIRS,
};

#[test]
fn mimic_matches_python_items() {
    let base = fixture("mimic-cxr");
    let src = base.join("source");
    let out = tempfile::tempdir().unwrap();
    let summary = mimic_cxr::prepare(&src, out.path(), &PrepareOptions::default()).unwrap();
    compare_prepared(out.path(), &base, &src);
    assert_eq!(summary.pairs["train"], 5);
    assert_eq!(summary.pairs["val"], 4);
    assert_eq!(summary.items["val"], 3);
    assert_eq!(summary.items["test"], 4);
    assert_eq!(summary.option_counts["test"][&5], 4);
    let reasons: Vec<&str> = summary.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("s51178377: no frontal")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("s59258269: no frontal")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("s58224503 is not in")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("s51065211: uncertain Pneumonia")),
        "{reasons:?}"
    );
    // No-finding study, AP-only, PA preferred over an earlier AP.
    let val = read_jsonl(&out.path().join(VAL_PAIRS));
    assert!(val.iter().any(|p| p["text"] == "no finding"));
    let train = read_jsonl(&out.path().join(TRAIN_PAIRS));
    assert!(train
        .iter()
        .any(|p| p["image"].as_str().unwrap().ends_with("s57375967/d06.jpg")));
}

#[test]
fn mimic_uncertain_as_negative_asks_every_study() {
    let src = fixture("mimic-cxr").join("source");
    let out = tempfile::tempdir().unwrap();
    let opts = PrepareOptions {
        image_cache: Some(16),
    };
    let m = mimic_cxr::MimicOptions {
        uncertain: mimic_cxr::Uncertain::Negative,
        ..Default::default()
    };
    let summary = mimic_cxr::prepare_with(&src, out.path(), &opts, &m).unwrap();
    assert_eq!(summary.items["val"], 4);
    let val = read_jsonl(&out.path().join(MCQ_VAL));
    let img = val[0]["image"].as_str().unwrap();
    assert!(img.starts_with("images/"), "{img}");
    let im = image::open(out.path().join(img)).unwrap();
    assert_eq!((im.width(), im.height()), (16, 16));
}

#[test]
fn mimic_missing_image_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("mimic-cxr").join("source"), &src);
    std::fs::remove_file(src.join("files/p12/p12003026/s50133627/d18.jpg")).unwrap();
    let err = mimic_cxr::prepare(&src, &tmp.path().join("out"), &PrepareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 study image(s) not found") && err.contains("d18.jpg"),
        "{err}"
    );
}

fn yes_no_run(uncertain: mimic_cxr::Uncertain) -> (tempfile::TempDir, PrepareSummary) {
    let src = fixture("mimic-cxr").join("source");
    let out = tempfile::tempdir().unwrap();
    let m = mimic_cxr::MimicOptions {
        uncertain,
        yes_no: true,
    };
    let summary =
        mimic_cxr::prepare_with(&src, out.path(), &PrepareOptions::default(), &m).unwrap();
    (out, summary)
}

/// The item of `file` with id `id`.
fn item(file: &Path, id: &str) -> Option<serde_json::Value> {
    read_jsonl(file).into_iter().find(|it| it["id"] == id)
}

#[test]
fn mimic_yes_no_matches_python_items() {
    let base = fixture("mimic-cxr");
    let src = base.join("source");
    let (out, summary) = yes_no_run(mimic_cxr::Uncertain::default());
    let img = abs_image(&src);
    for (file, exp) in [
        (TRAIN_PAIRS, "expected_train.jsonl"),
        (VAL_PAIRS, "expected_val.jsonl"),
        (MCQ_VAL, "expected_mcq_val_yes_no.jsonl"),
        (MCQ_TEST, "expected_mcq_test_yes_no.jsonl"),
    ] {
        compare(&out.path().join(file), &base.join(exp), &img);
    }
    // 4 usable val studies (one with an uncertain Pneumonia), 4 usable test studies.
    assert_eq!(summary.items["val"], 3 + 13 * 4 - 1);
    assert_eq!(summary.items["test"], 4 + 13 * 4);
    assert_eq!(summary.items_per_key["val"]["findings"], 3);
    assert_eq!(summary.items_per_key["val"]["presence of pneumonia"], 3);
    assert_eq!(
        summary.items_per_key["val"]["presence of pleural effusion"],
        4
    );
    assert_eq!(summary.items_per_key["test"]["presence of fracture"], 4);
    assert_eq!(summary.option_counts["test"][&2], 52);
    // The findings items are the same as without yes/no questions (no extra random draws).
    let plain = tempfile::tempdir().unwrap();
    mimic_cxr::prepare(&src, plain.path(), &PrepareOptions::default()).unwrap();
    for file in [MCQ_VAL, MCQ_TEST] {
        let findings: Vec<_> = read_jsonl(&out.path().join(file))
            .into_iter()
            .filter(|it| it["key"] == "findings")
            .collect();
        assert_eq!(findings, read_jsonl(&plain.path().join(file)), "{file}");
    }
    let reasons: Vec<&str> = summary.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("s51065211: uncertain Pneumonia")
                && r.contains("no yes/no question for those")),
        "{reasons:?}"
    );
}

#[test]
fn mimic_yes_no_skips_only_the_uncertain_finding() {
    let (out, _) = yes_no_run(mimic_cxr::Uncertain::ExcludeFromQuestions);
    let val = out.path().join(MCQ_VAL);
    // s51065211: Consolidation 1.0, Pneumonia -1.0.
    assert!(
        item(&val, "mimic-cxr-s51065211").is_none(),
        "no findings item"
    );
    assert!(item(&val, "mimic-cxr-s51065211-pneumonia").is_none());
    let it = item(&val, "mimic-cxr-s51065211-consolidation").unwrap();
    assert_eq!(it["key"], "presence of consolidation");
    assert_eq!(it["options"], serde_json::json!(["yes", "no"]));
    assert_eq!(it["answer"], 0);
    assert!(it["image"].as_str().unwrap().ends_with("s51065211/d14.jpg"));
    assert!(it["source"]
        .as_str()
        .unwrap()
        .contains("study s51065211 dicom d14 finding Consolidation"));
    let no = item(&val, "mimic-cxr-s51065211-pleural_effusion").unwrap();
    assert_eq!(no["answer"], 1);
    let ids: Vec<String> = read_jsonl(&val)
        .iter()
        .filter_map(|it| it["id"].as_str())
        .filter(|id| id.starts_with("mimic-cxr-s51065211-"))
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 12, "{ids:?}");
    // The items read back as valid MCQ items and ask a natural question.
    let items = lvlm_ift::eval::mcq::read_items(&val).unwrap();
    let q = lvlm_ift::eval::mcq::question_prompt(&items[1].key, &items[1].options);
    assert!(
        q.starts_with("What is the presence of atelectasis?\nA. yes\nB. no\n"),
        "{q}"
    );
}

#[test]
fn mimic_yes_no_uncertain_positive_is_yes() {
    let (out, summary) = yes_no_run(mimic_cxr::Uncertain::Positive);
    let val = out.path().join(MCQ_VAL);
    let it = item(&val, "mimic-cxr-s51065211-pneumonia").unwrap();
    assert_eq!(it["answer"], 0, "{it}");
    assert!(item(&val, "mimic-cxr-s51065211").is_some());
    assert_eq!(summary.items["val"], 4 + 13 * 4);
    let (out, _) = yes_no_run(mimic_cxr::Uncertain::Negative);
    let it = item(&out.path().join(MCQ_VAL), "mimic-cxr-s51065211-pneumonia").unwrap();
    assert_eq!(it["answer"], 1, "{it}");
}

fn lvlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(args)
        .output()
        .expect("run lvlm-ift")
}

#[test]
fn mimic_flags_with_another_benchmark_are_an_error() {
    let src = fixture("mimic-cxr").join("source");
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (src.to_str().unwrap(), tmp.path().join("out"));
    let out = out.to_str().unwrap();
    for (flags, named) in [
        (&["--mimic-yes-no"][..], "--mimic-yes-no"),
        (&["--mimic-uncertain", "positive"][..], "--mimic-uncertain"),
    ] {
        let mut args = vec![
            "prepare",
            "--benchmark",
            "wbcatt",
            "--source",
            src,
            "--out",
            out,
        ];
        args.extend(flags);
        let res = lvlm(&args);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{args:?}: {err}");
        assert!(
            err.contains(named) && err.contains("only to --benchmark mimic-cxr"),
            "{err}"
        );
        assert!(!tmp.path().join("out").exists(), "nothing written");
    }
    // With mimic-cxr they work, and the summary counts the yes/no keys.
    let res = lvlm(&[
        "prepare",
        "--benchmark",
        "mimic-cxr",
        "--source",
        src,
        "--out",
        out,
        "--mimic-yes-no",
        "--mimic-uncertain",
        "negative",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("mcq val: 56 item(s)"), "{err}");
    assert!(err.contains("presence of pneumonia: 4"), "{err}");
}
