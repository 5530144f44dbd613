//! CSV manifests: a header row with `image` and `text` (or `description`) columns.
//!
//! Read strictly ([`crate::data::csv_strict`]): a row with more or fewer fields than the header,
//! two header columns of the same name, and broken quoting (a quoted field never closed, text
//! after a closing quote) are errors naming the file and line, never silently read.

use super::{check_fields, RawRow};
use crate::data::csv_strict::read_strict;

pub(super) fn parse_csv(file: &str, bytes: &[u8]) -> Vec<(String, RawRow)> {
    let table = match read_strict(bytes) {
        Ok(t) => t,
        Err(fault) => return vec![(format!("{file}:{}", fault.line), Err(vec![fault.reason]))],
    };
    let names = &table.headers;
    let header_loc = format!("{file}:1");
    let col = |name: &str| names.iter().position(|n| n == name);
    let image_col = col("image");
    let text_col = col("text")
        .map(|i| (i, "text"))
        .or_else(|| col("description").map(|i| (i, "description")));
    let (image_col, (text_col, text_name)) = match (image_col, text_col) {
        (Some(i), Some(t)) => (i, t),
        (i, t) => {
            let mut reasons = Vec::new();
            let found = names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            if i.is_none() {
                reasons.push(format!(
                    "the header has no `image` column (columns: {found})"
                ));
            }
            if t.is_none() {
                reasons.push(format!(
                    "the header has no `text` or `description` column (columns: {found})"
                ));
            }
            return vec![(header_loc, Err(reasons))];
        }
    };

    table
        .rows
        .into_iter()
        .map(|row| {
            let loc = format!("{file}:{}", row.line);
            let rec = match row.record {
                Ok(rec) => rec,
                Err(reason) => return (loc, Err(vec![reason])),
            };
            // Strict rows have the header's number of fields, so both columns are present.
            let field = |i: usize, name: &str| -> std::result::Result<String, String> {
                std::str::from_utf8(rec.get(i).unwrap_or_default())
                    .map(|s| s.trim().to_string())
                    .map_err(|_| format!("`{name}` is not valid UTF-8"))
            };
            let image = field(image_col, "image");
            let text = field(text_col, text_name);
            let row = match (image, text) {
                (Ok(image), Ok(text)) => {
                    let mut reasons = Vec::new();
                    check_fields(&image, &text, text_name, &mut reasons);
                    if reasons.is_empty() {
                        Ok((image, text))
                    } else {
                        Err(reasons)
                    }
                }
                (image, text) => Err([image.err(), text.err()].into_iter().flatten().collect()),
            };
            (loc, row)
        })
        .collect()
}
