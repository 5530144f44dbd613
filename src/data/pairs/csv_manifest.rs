//! CSV manifests: a header row with `image` and `text` (or `description`) columns.

use super::{check_fields, RawRow};
use crate::data::csv_line::position_line;

pub(super) fn parse_csv(file: &str, bytes: &[u8]) -> Vec<(String, RawRow)> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let header_loc = format!("{file}:1");
    let names: Vec<String> = match rdr.byte_headers() {
        Ok(h) => h
            .iter()
            .map(|f| {
                String::from_utf8_lossy(f)
                    .trim_start_matches('\u{feff}')
                    .trim()
                    .to_string()
            })
            .collect(),
        Err(e) => return vec![(header_loc, Err(vec![format!("cannot parse CSV: {e}")]))],
    };
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

    let mut rows = Vec::new();
    let mut rec = csv::ByteRecord::new();
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {
                let line = position_line(bytes, rec.position());
                let loc = format!("{file}:{line}");
                let field = |i: usize, name: &str| -> std::result::Result<String, String> {
                    match rec.get(i) {
                        None => Err(format!(
                            "the row has {} fields but `{name}` is column {} of the header",
                            rec.len(),
                            i + 1
                        )),
                        Some(raw) => std::str::from_utf8(raw)
                            .map(|s| s.trim().to_string())
                            .map_err(|_| format!("`{name}` is not valid UTF-8")),
                    }
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
                rows.push((loc, row));
            }
            Err(e) => {
                // Reading from memory, so this is a malformed record rather than I/O; the parser
                // cannot resynchronise reliably, so stop here (the problem is still reported).
                let line = position_line(bytes, e.position());
                rows.push((
                    format!("{file}:{line}"),
                    Err(vec![format!("cannot parse CSV: {e}")]),
                ));
                break;
            }
        }
    }
    rows
}
