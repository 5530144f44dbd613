//! MIMIC-CXR `prepare` against item lists computed by a plain Python implementation with Python's
//! `random` (`scripts/make_bench_fixtures_mimic.py`).

mod common;

use common::bench::{abs_image, bench_fixture as fixture, compare, copy_dir, read_jsonl};
use lvlm_ift::bench::mimic_cxr;
use lvlm_ift::bench::prepare::{PrepareOptions, MCQ_TEST, MCQ_VAL, TRAIN_PAIRS, VAL_PAIRS};

#[test]
fn mimic_matches_python_items() {
    let base = fixture("mimic-cxr");
    let src = base.join("source");
    let out = tempfile::tempdir().unwrap();
    let summary = mimic_cxr::prepare(&src, out.path(), &PrepareOptions::default()).unwrap();
    let img = abs_image(&src);
    for (file, exp) in [
        (TRAIN_PAIRS, "expected_train.jsonl"),
        (VAL_PAIRS, "expected_val.jsonl"),
        (MCQ_VAL, "expected_mcq_val.jsonl"),
        (MCQ_TEST, "expected_mcq_test.jsonl"),
    ] {
        compare(&out.path().join(file), &base.join(exp), &img);
    }
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
