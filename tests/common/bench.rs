//! Helpers shared by the benchmark `prepare` tests: fixture sources, JSONL reading, item comparison.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// `tests/fixtures/bench/{name}`.
pub fn bench_fixture(name: &str) -> PathBuf {
    super::fixtures().join("bench").join(name)
}

/// Every non-empty line of a JSONL file, parsed.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Compare a prepared file with the expected one: every field of the expected rows, with the
/// expected image path (relative to the source dir) mapped through `image`.
pub fn compare(actual: &Path, expected: &Path, image: &dyn Fn(&str) -> String) {
    let (a, e) = (read_jsonl(actual), read_jsonl(expected));
    assert_eq!(a.len(), e.len(), "{}: row count", actual.display());
    for (i, (a, e)) in a.iter().zip(&e).enumerate() {
        for (k, ev) in e.as_object().unwrap() {
            let av = &a[k];
            if k == "image" {
                assert_eq!(
                    av.as_str().unwrap(),
                    image(ev.as_str().unwrap()),
                    "{} row {i}",
                    actual.display()
                );
            } else {
                assert_eq!(av, ev, "{} row {i} field {k}", actual.display());
            }
        }
    }
}

/// Compare the four prepared files in `out` with `base/expected_{train,val,mcq_val,mcq_test}.jsonl`,
/// whose image paths are relative to `src` (outputs written without an image cache).
pub fn compare_prepared(out: &Path, base: &Path, src: &Path) {
    let img = abs_image(src);
    for (file, exp) in [
        ("train.jsonl", "expected_train.jsonl"),
        ("val.jsonl", "expected_val.jsonl"),
        ("mcq_val.jsonl", "expected_mcq_val.jsonl"),
        ("mcq_test.jsonl", "expected_mcq_test.jsonl"),
    ] {
        compare(&out.join(file), &base.join(exp), &img);
    }
}

/// Map an image path relative to `src` to the absolute path `prepare` writes without a cache.
pub fn abs_image(src: &Path) -> impl Fn(&str) -> String {
    let abs = std::path::absolute(src).unwrap();
    move |rel: &str| abs.join(rel).to_string_lossy().into_owned()
}

/// Recursive copy, for tests that damage a copy of a fixture source.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), &dst).unwrap();
        }
    }
}
