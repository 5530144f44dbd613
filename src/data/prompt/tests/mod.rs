//! Tests of prompt rendering and tokenization, with shared fixtures.

use std::path::{Path, PathBuf};

use super::{ChatTemplate, TextProcessor};

mod template;
mod tokenize;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn types_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<ChatTemplate>();
    assert_send_sync::<TextProcessor>();
}
