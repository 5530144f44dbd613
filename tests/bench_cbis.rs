//! CBIS-DDSM `prepare` against item lists computed by a plain Python implementation with Python's
//! `random` (`scripts/make_bench_fixtures_cbis.py`).

mod common;

use std::path::{Path, PathBuf};

use common::bench::{bench_fixture as fixture, compare_prepared, copy_dir, read_jsonl};
use common::dicom::{write_dcm, Pixels};
use lvlm_ift::bench::cbis;
use lvlm_ift::bench::prepare::{
    CsvTable, PrepareOptions, MCQ_TEST, SUMMARY, TRAIN_PAIRS, VAL_PAIRS,
};
use serde_json::Value;

#[test]
fn cbis_matches_python_items() {
    let base = fixture("cbis");
    let src = base.join("source");
    let out = tempfile::tempdir().unwrap();
    let summary = cbis::prepare(&src, out.path(), &PrepareOptions::default()).unwrap();
    compare_prepared(out.path(), &base, &src);
    // Split sizes: 2 of the 23 training patients of dicom_info.csv's crops are val (P_00048, and
    // P_00098, whose crop no row uses); the val patient's one ROI gives 4 items.
    assert_eq!(summary.pairs["train"], 21);
    assert_eq!(summary.pairs["val"], 1);
    assert_eq!(summary.items["val"], 4);
    assert_eq!(summary.items["test"], 26);
    assert!(out.path().join(SUMMARY).is_file());

    // Lesion keys have 5 options, fixed keys 2, and only whitelisted values are asked.
    let test = read_jsonl(&out.path().join(MCQ_TEST));
    for it in &test {
        let key = it["key"].as_str().unwrap();
        let opts: Vec<&str> = it["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        match cbis::whitelist(key) {
            Some(list) => {
                assert_eq!(opts.len(), 5, "{it}");
                assert!(opts.iter().all(|o| list.contains(o)), "{it}");
            }
            None => assert_eq!(opts.len(), 2, "{it}"),
        }
    }
    // `LOBULATED-IRREGULAR` (mass test row 3) is not asked; `fine linear branching` with an `N/A`
    // distribution (calc test row 3, NaN for pandas) gets no distribution question; pathology
    // `UNSURE` (calc test row 4) is left out.
    let ids: Vec<&str> = test.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert!(!ids.contains(&"mass_case_description_test_set-3-mass_shape"));
    assert!(ids.contains(&"mass_case_description_test_set-3-mass_margins"));
    assert!(ids.contains(&"calc_case_description_test_set-3-calc_type"));
    assert!(!ids.contains(&"calc_case_description_test_set-3-calc_distribution"));
    assert!(!ids
        .iter()
        .any(|i| i.starts_with("calc_case_description_test_set-4-")));
    let reasons: Vec<String> = summary
        .skipped
        .iter()
        .map(|s| format!("{} {}", s.source, s.reason))
        .collect();
    for needle in [
        "unknown pathology \"UNKNOWN\"",
        "unknown pathology \"UNSURE\"",
        "\"irregular-architectural distortion\" not in the whitelist",
        "\"lobulated-irregular\" not in the whitelist",
        "mass_case_description_train_set.csv:38 no `cropped images` row with PatientID \
         \"Mass-Training_P_00050_LEFT_CC_13\"",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "{needle}: {reasons:?}"
        );
    }
    // BENIGN_WITHOUT_CALLBACK -> benign, `_` -> space; every crop is dicom_info.csv's JPEG.
    let train = read_jsonl(&out.path().join(TRAIN_PAIRS));
    let texts: Vec<&str> = train.iter().map(|p| p["text"].as_str().unwrap()).collect();
    assert!(texts.contains(&"lobulated mass shape, ill defined mass margins, mass, benign"));
    assert!(texts.contains(&"lucent center calc type, calcification, benign"));
    assert!(train
        .iter()
        .all(|p| p["image"].as_str().unwrap().ends_with(".jpg")));
}

#[test]
fn cbis_image_cache_letterboxes() {
    let src = fixture("cbis").join("source");
    let out = tempfile::tempdir().unwrap();
    let opts = PrepareOptions {
        image_cache: Some(56),
    };
    cbis::prepare(&src, out.path(), &opts).unwrap();
    let test = read_jsonl(&out.path().join(MCQ_TEST));
    let first = test[0]["image"].as_str().unwrap();
    assert_eq!(first, "images/mass_case_description_test_set-1.png");
    let img = image::open(out.path().join(first)).unwrap();
    assert_eq!((img.width(), img.height()), (56, 56));
    // Letterboxed: the 6x9 crop leaves black padding left and right.
    assert_eq!(img.to_luma8().get_pixel(0, 0)[0], 0);
    assert_ne!(img.to_luma8().get_pixel(28, 28)[0], 0);
    let n = std::fs::read_dir(out.path().join("images"))
        .unwrap()
        .count();
    assert_eq!(n, 21 + 1 + 7);
}

#[test]
fn cbis_missing_images_are_one_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("cbis").join("source"), &src);
    let mut removed = Vec::new();
    for expected in ["expected_mcq_test.jsonl", "expected_train.jsonl"] {
        let rel = read_jsonl(&fixture("cbis").join(expected))[0]["image"]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::remove_file(src.join(&rel)).unwrap();
        removed.push(rel);
    }
    let err = cbis::prepare(&src, &tmp.path().join("out"), &PrepareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 ROI image(s) not found"), "{err}");
    for rel in removed {
        assert!(err.contains(&rel), "{err}");
    }
}

#[test]
fn cbis_duplicate_crop_in_dicom_info_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("cbis").join("source"), &src);
    let p = src.join("csv").join(cbis::DICOM_INFO);
    let text = std::fs::read_to_string(&p).unwrap();
    let dup = text
        .lines()
        .find(|l| l.contains(",cropped images,"))
        .unwrap()
        .to_string();
    std::fs::write(&p, format!("{text}{dup}\n")).unwrap();
    let err = format!(
        "{:#}",
        cbis::prepare(&src, &tmp.path().join("out"), &PrepareOptions::default()).unwrap_err()
    );
    assert!(err.contains("two `cropped images` rows"), "{err}");
    assert!(err.contains("dicom_info.csv"), "{err}");
    assert!(err.contains("Mass-Training_P_00001_LEFT_CC_1"), "{err}");
}

#[test]
fn cbis_row_patient_must_match_its_case() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("cbis").join("source"), &src);
    let p = src.join("csv").join(cbis::CALC_TRAIN);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("\nP_00005,", "\nP_07777,", 1);
    std::fs::write(&p, text).unwrap();
    let err = cbis::prepare(&src, &tmp.path().join("out"), &PrepareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("P_07777"), "{err}");
    assert!(
        err.contains("calc_case_description_train_set.csv:2:"),
        "{err}"
    );
}

/// A small 16-bit MONOCHROME2 DICOM holding a ramp (8x4, no window: min-max maps it to 0..255).
fn write_test_dicom(path: &Path) {
    let ramp: Vec<u16> = (0..32).map(|i| i * 1000).collect();
    write_dcm(path, (8, 4), Pixels::U16(ramp), "MONOCHROME2", &[]);
}

/// The TCIA layout: the case CSVs without `dicom_info.csv`, a DICOM crop at every row's
/// `cropped image file path`. Returns the source dir and those paths (relative to it).
fn cbis_dicom_tree(tmp: &Path) -> (PathBuf, Vec<String>) {
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut crops = Vec::new();
    for name in [
        cbis::MASS_TRAIN,
        cbis::CALC_TRAIN,
        cbis::MASS_TEST,
        cbis::CALC_TEST,
    ] {
        let from = fixture("cbis").join("source/csv").join(name);
        std::fs::copy(&from, src.join(name)).unwrap();
        let t = CsvTable::read(&from).unwrap();
        let col = t.col("cropped image file path").unwrap();
        for (_, rec) in &t.rows {
            let rel = rec.get(col).unwrap().trim().to_string();
            let path = src.join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            write_test_dicom(&path);
            crops.push(rel);
        }
    }
    (src, crops)
}

#[test]
fn cbis_dicom_crops_without_dicom_info() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, crops) = cbis_dicom_tree(tmp.path());
    // Without an image cache the .dcm paths themselves are the images, and they load as RGB.
    let out = tmp.path().join("out");
    let summary = cbis::prepare(&src, &out, &PrepareOptions::default()).unwrap();
    // Every training row with a known pathology is used (no dicom_info.csv to drop any): 12 + 11.
    assert_eq!(summary.pairs["train"] + summary.pairs["val"], 23);
    assert_eq!(summary.items["test"], 26);
    let pairs: Vec<Value> = [TRAIN_PAIRS, VAL_PAIRS]
        .iter()
        .flat_map(|f| read_jsonl(&out.join(f)))
        .collect();
    let img = pairs[0]["image"].as_str().unwrap();
    assert!(img.ends_with(&crops[0]), "{img}");
    let rgb = lvlm_ift::data::image::load_rgb(Path::new(img)).unwrap();
    assert_eq!(rgb.dimensions(), (8, 4));
    assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(rgb.get_pixel(7, 3).0, [255, 255, 255]);
    // With an image cache they are letterboxed like the JPEG crops.
    let cached = tmp.path().join("cached");
    let opts = PrepareOptions {
        image_cache: Some(16),
    };
    cbis::prepare(&src, &cached, &opts).unwrap();
    let n = std::fs::read_dir(cached.join("images")).unwrap().count();
    assert_eq!(n, 23 + 7);
}

#[test]
fn cbis_corrupt_dicom_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, crops) = cbis_dicom_tree(tmp.path());
    std::fs::write(src.join(&crops[1]), b"DICM").unwrap();
    let err = cbis::prepare(&src, &tmp.path().join("out"), &PrepareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot decode image"), "{err}");
    assert!(err.contains(&crops[1]), "{err}");
    assert!(err.contains(cbis::MASS_TRAIN), "{err}");
}

#[test]
fn cbis_missing_column_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&fixture("cbis").join("source"), &src);
    let p = src.join("csv").join(cbis::CALC_TEST);
    let csv = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("calc distribution", "calc_distrib", 1);
    std::fs::write(&p, csv).unwrap();
    let err = cbis::prepare(&src, &tmp.path().join("out"), &PrepareOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("calc distribution"), "{err}");
    assert!(err.contains(cbis::CALC_TEST), "{err}");
}
