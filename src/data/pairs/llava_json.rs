//! LLaVA JSON manifests: an array of conversation items; the first `gpt` turn is the text.

use serde_json::{Map, Value};

use super::{kind, string_field, RawRow};

pub(super) fn parse_llava(file: &str, bytes: &[u8]) -> Vec<(String, RawRow)> {
    let items = match serde_json::from_slice::<Value>(bytes) {
        Err(e) => {
            return vec![(
                format!("{file}:{}", e.line()),
                Err(vec![format!("malformed JSON: {e}")]),
            )]
        }
        Ok(Value::Array(items)) => items,
        Ok(other) => {
            return vec![(
                file.to_string(),
                Err(vec![format!(
                    "a LLaVA JSON manifest must be an array of conversation items, found {}",
                    kind(&other)
                )]),
            )]
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let id = match item.get("id") {
                Some(Value::String(s)) => format!(" (id {s})"),
                Some(v @ Value::Number(_)) => format!(" (id {v})"),
                _ => String::new(),
            };
            let loc = format!("{file}: item {i}{id}");
            let row = match item {
                Value::Object(obj) => llava_fields(obj),
                other => Err(vec![format!(
                    "expected a JSON object, found {}",
                    kind(other)
                )]),
            };
            (loc, row)
        })
        .collect()
}

/// `image` and the first `gpt` turn (placeholders removed, trimmed) of a LLaVA item.
fn llava_fields(obj: &Map<String, Value>) -> RawRow {
    let mut reasons = Vec::new();
    let image = string_field(obj, "image", &mut reasons);
    let text = match obj.get("conversations") {
        None => {
            reasons.push("missing field `conversations`".into());
            None
        }
        Some(Value::Array(turns)) => {
            let gpt = turns
                .iter()
                .find(|t| t.get("from").and_then(Value::as_str) == Some("gpt"));
            match gpt.map(|t| t.get("value")) {
                None => {
                    reasons.push("`conversations` has no turn from `gpt`".into());
                    None
                }
                Some(Some(Value::String(v))) => Some(v.replace("<image>", "").trim().to_string()),
                Some(Some(other)) => {
                    reasons.push(format!(
                        "the first `gpt` turn's `value` must be a string, found {}",
                        kind(other)
                    ));
                    None
                }
                Some(None) => {
                    reasons.push("the first `gpt` turn has no `value`".into());
                    None
                }
            }
        }
        Some(other) => {
            reasons.push(format!(
                "`conversations` must be an array, found {}",
                kind(other)
            ));
            None
        }
    };
    match (image, text) {
        (Some(image), Some(text)) if reasons.is_empty() => {
            if image.trim().is_empty() {
                reasons.push("empty `image`".into());
            }
            if text.is_empty() {
                reasons.push("empty description (the first `gpt` turn's `value`)".into());
            }
            if reasons.is_empty() {
                Ok((image.trim().to_string(), text))
            } else {
                Err(reasons)
            }
        }
        _ => Err(reasons),
    }
}
