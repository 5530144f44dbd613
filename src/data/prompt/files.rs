//! Reading optional files of a model directory (a missing file is `Ok(None)`, not an error).

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{Error, Result};

/// Read and parse a JSON file; `Ok(None)` when it does not exist.
pub(super) fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::json(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Read a text file; `Ok(None)` when it does not exist.
pub(super) fn read_text_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}
