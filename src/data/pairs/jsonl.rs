//! JSONL manifests: one `{"image": ..., "text": ...}` object per line.

use serde_json::{Map, Value};

use super::{check_fields, kind, string_field, RawRow};

pub(super) fn parse_jsonl(file: &str, bytes: &[u8]) -> Vec<(String, RawRow)> {
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let loc = format!("{file}:{}", i + 1);
        let line = match std::str::from_utf8(line) {
            Ok(s) => s,
            Err(_) => {
                rows.push((loc, Err(vec!["the line is not valid UTF-8".into()])));
                continue;
            }
        };
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let row = match serde_json::from_str::<Value>(line) {
            Err(e) => Err(vec![format!("malformed JSON: {e}")]),
            Ok(Value::Object(obj)) => object_fields(&obj),
            Ok(other) => Err(vec![format!(
                "expected a JSON object, found {}",
                kind(&other)
            )]),
        };
        rows.push((loc, row));
    }
    rows
}

/// `image` and `text` (or `description`) of a JSONL object.
fn object_fields(obj: &Map<String, Value>) -> RawRow {
    let mut reasons = Vec::new();
    let image = string_field(obj, "image", &mut reasons);
    let text_name = if obj.contains_key("text") || !obj.contains_key("description") {
        "text"
    } else {
        "description"
    };
    let text = if obj.contains_key(text_name) {
        string_field(obj, text_name, &mut reasons)
    } else {
        reasons.push("missing field `text` (or `description`)".into());
        None
    };
    match (image, text) {
        (Some(image), Some(text)) if reasons.is_empty() => {
            let text = text.trim().to_string();
            check_fields(&image, &text, text_name, &mut reasons);
            if reasons.is_empty() {
                Ok((image.trim().to_string(), text))
            } else {
                Err(reasons)
            }
        }
        _ => Err(reasons),
    }
}
