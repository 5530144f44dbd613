//! WBCAtt and SKINCON `prepare` against the items a Python implementation of the reference protocol
//! makes from the same synthetic sources (`scripts/make_bench_fixtures_wbcatt_skincon.py`).

mod common;

use std::path::Path;

use common::bench::{bench_fixture as fixture, copy_dir, read_jsonl as jsonl};

use lvlm_ift::bench::prepare::PrepareOptions;
use lvlm_ift::bench::{skincon, wbcatt};
use serde_json::Value;

/// Compare produced records with expected ones, the expected image paths being relative to `src`.
fn assert_same(got: &[Value], want: &[Value], src: &Path, fields: &[&str], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let img = src.join(w["image"].as_str().unwrap());
        assert_eq!(
            g["image"].as_str().unwrap(),
            img.to_string_lossy(),
            "{what}[{i}] image"
        );
        for f in fields {
            assert_eq!(g[f], w[f], "{what}[{i}] {f}");
        }
    }
}

#[test]
fn wbcatt_matches_the_reference_protocol_item_for_item() {
    let src = fixture("wbcatt").canonicalize().unwrap();
    let out = tempfile::tempdir().unwrap();
    let summary = wbcatt::prepare(&src, out.path(), &PrepareOptions::default()).unwrap();
    let o = out.path();
    assert_same(
        &jsonl(&o.join("train.jsonl")),
        &jsonl(&src.join("expected_train.jsonl")),
        &src,
        &["text"],
        "train",
    );
    assert_same(
        &jsonl(&o.join("val.jsonl")),
        &jsonl(&src.join("expected_val.jsonl")),
        &src,
        &["text"],
        "val",
    );
    for split in ["val", "test"] {
        let got = jsonl(&o.join(format!("mcq_{split}.jsonl")));
        let want = jsonl(&src.join(format!("expected_mcq_{split}.jsonl")));
        assert_same(
            &got,
            &want,
            &src,
            &["id", "key", "options", "answer"],
            split,
        );
        // Options are the key's fixed list, in its fixed order.
        for g in &got {
            let key = g["key"].as_str().unwrap();
            let fixed: Vec<Value> = wbcatt::options_for(key)
                .unwrap()
                .iter()
                .map(|s| Value::from(*s))
                .collect();
            assert_eq!(g["options"].as_array().unwrap(), &fixed, "{key}");
        }
    }
    assert_eq!(summary.pairs["train"], 10);
    assert_eq!(summary.pairs["val"], 12);
    assert_eq!(summary.items["val"], 12);
    assert_eq!(summary.items["test"], 13);
    // The unknown value is reported with file:line, not mapped.
    let want_skipped: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected_skipped.json")).unwrap())
            .unwrap();
    assert_eq!(summary.skipped.len(), want_skipped.len());
    for (s, w) in summary.skipped.iter().zip(&want_skipped) {
        assert_eq!(s.source, w["source"].as_str().unwrap());
        assert!(
            s.reason.contains(w["value"].as_str().unwrap()),
            "{}",
            s.reason
        );
        assert!(
            s.reason.contains(w["key"].as_str().unwrap()),
            "{}",
            s.reason
        );
    }
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["skipped"].as_array().unwrap().len(), 1);
}

#[test]
fn wbcatt_reports_missing_columns_and_images() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("wbcatt"), dir.path());
    let val = dir.path().join("pbc_attr_v1_val.csv");
    let text = std::fs::read_to_string(&val).unwrap();
    std::fs::write(&val, text.replacen("granularity", "granularityX", 1)).unwrap();
    let err = wbcatt::prepare(
        dir.path(),
        &dir.path().join("out"),
        &PrepareOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("granularity") && err.contains("pbc_attr_v1_val.csv"),
        "{err}"
    );
    std::fs::write(&val, text).unwrap();

    // Two absent images: both named in one error.
    let rows = std::fs::read_to_string(dir.path().join("pbc_attr_v1_test.csv")).unwrap();
    let paths: Vec<&str> = rows
        .lines()
        .skip(1)
        .take(2)
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    for p in &paths {
        std::fs::remove_file(dir.path().join(p)).unwrap();
    }
    let err = wbcatt::prepare(
        dir.path(),
        &dir.path().join("out"),
        &PrepareOptions::default(),
    )
    .unwrap_err()
    .to_string();
    for p in &paths {
        assert!(err.contains(p), "{err}");
    }
    assert!(err.contains("pbc_attr_v1_test.csv:2") && err.contains("pbc_attr_v1_test.csv:3"));
}

#[test]
fn skincon_matches_the_reference_protocol_item_for_item() {
    let src = fixture("skincon").canonicalize().unwrap();
    let out = tempfile::tempdir().unwrap();
    let summary = skincon::prepare(&src, out.path(), &PrepareOptions::default()).unwrap();
    let o = out.path();
    assert_same(
        &jsonl(&o.join("train.jsonl")),
        &jsonl(&src.join("expected_train.jsonl")),
        &src,
        &["text"],
        "train",
    );
    assert_same(
        &jsonl(&o.join("val.jsonl")),
        &jsonl(&src.join("expected_val.jsonl")),
        &src,
        &["text"],
        "val",
    );
    for split in ["val", "test"] {
        assert_same(
            &jsonl(&o.join(format!("mcq_{split}.jsonl"))),
            &jsonl(&src.join(format!("expected_mcq_{split}.jsonl"))),
            &src,
            &["id", "key", "options", "answer"],
            split,
        );
    }
    // 42 rows, 2 flagged: 40 usable -> int(0.1 * 40) = 4 val, 4 test, 32 train.
    assert_eq!(summary.pairs["train"], 32);
    assert_eq!(summary.pairs["val"], 4);
    assert_eq!(summary.items["val"], 4);
    assert_eq!(summary.items["test"], 4);
    assert_eq!(summary.option_counts["test"][&5], 4);
    let flagged: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected_skipped.json")).unwrap())
            .unwrap();
    let sources: Vec<&str> = summary.skipped.iter().map(|s| s.source.as_str()).collect();
    let want: Vec<&str> = flagged
        .iter()
        .map(|f| f["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, want);

    // Pool: sorted distinct combinations of all usable rows, no index-column artefact.
    let ann = skincon::read_annotations(&src.join(skincon::ANNOTATIONS)).unwrap();
    assert_eq!(ann.concepts.len(), 48);
    let pool = skincon::pool(ann.rows.iter().map(|a| a.combination.as_str()));
    let want_pool: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected_pool.json")).unwrap())
            .unwrap();
    assert_eq!(pool, want_pool);
    assert!(pool.len() > 21, "exercise sample's set-based branch");
    assert!(pool.iter().all(|c| !c.contains("unnamed")));
}

#[test]
fn skincon_reports_missing_columns_and_images() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("skincon"), dir.path());
    let ann = dir.path().join(skincon::ANNOTATIONS);
    let text = std::fs::read_to_string(&ann).unwrap();
    std::fs::write(&ann, text.replacen("ImageID", "ImageId", 1)).unwrap();
    let err = skincon::prepare(
        dir.path(),
        &dir.path().join("out"),
        &PrepareOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ImageID"), "{err}");
    std::fs::write(&ann, text).unwrap();

    let parsed = skincon::read_annotations(&ann).unwrap();
    let gone: Vec<&str> = parsed.rows[..2]
        .iter()
        .map(|a| a.image_id.as_str())
        .collect();
    for id in &gone {
        std::fs::remove_file(dir.path().join("images").join(id)).unwrap();
    }
    let err = skincon::prepare(
        dir.path(),
        &dir.path().join("out"),
        &PrepareOptions::default(),
    )
    .unwrap_err()
    .to_string();
    for id in &gone {
        assert!(err.contains(id), "{err}");
    }
}

#[test]
fn image_cache_writes_letterboxed_copies() {
    let src = fixture("skincon").canonicalize().unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = PrepareOptions {
        image_cache: Some(16),
    };
    skincon::prepare(&src, out.path(), &opts).unwrap();
    let items = jsonl(&out.path().join("mcq_test.jsonl"));
    let rel = items[0]["image"].as_str().unwrap();
    assert!(rel.starts_with("images/"), "{rel}");
    let img = image::open(out.path().join(rel)).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
}
