//! Image–description pair manifests: the training data of instruction-free tuning.
//!
//! Three manifest formats are read (FORMATS.md, "Training data"), chosen by extension:
//! - **CSV** (`.csv`): a header row with an `image` column and a `text` column (or, failing
//!   that, a `description` column); other columns are ignored. Quoted fields may hold commas,
//!   quotes and newlines. A row's line is the line its record starts on (the header is line 1).
//! - **JSONL** (`.jsonl`, `.ndjson`): one object `{"image": ..., "text": ...}` per line
//!   (`description` is accepted instead of `text`; `text` wins when both are present). Blank
//!   lines are skipped; lines are numbered from 1.
//! - **LLaVA JSON** (`.json`): an array of `{id, image, conversations: [{from: "human", value},
//!   {from: "gpt", value}, ...]}`. The description is the first `gpt` turn's value with every
//!   `<image>` placeholder removed. Items are located as `item N` (0-based array index, which
//!   is what `jq '.[N]'` takes), followed by the item's `id` when it has one.
//!
//! Texts are trimmed. Relative image paths are resolved against the source's image root (the
//! manifest's directory unless given); absolute ones are kept.
//!
//! Validation is all-or-nothing and exhaustive: every row is parsed and every referenced image is
//! opened before anything is returned, and all problems found are reported together in a single
//! error so a data set can be fixed in one round. An image is checked by reading its header
//! (format guessed from the content, then `into_dimensions`): that catches missing, unreadable,
//! non-image and unsupported files, but not pixel data truncated after a valid header, which
//! surfaces when the image is decoded for training ([`super::image::load_rgb`]). Checking only
//! headers keeps a pass over hundreds of thousands of images short; they are checked in
//! parallel, each distinct file once.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use image::ImageReader;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// How many problems one error lists before summarising the rest as "... and N more".
const MAX_LISTED: usize = 20;

/// One training pair. `source` locates the row for messages: `file:line` for CSV and JSONL,
/// `file: item N` (plus ` (id X)` when the item has an id) for LLaVA JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub image: PathBuf,
    pub text: String,
    pub source: String,
}

/// The layout of a pair manifest, chosen from its file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    Csv,
    Jsonl,
    LlavaJson,
}

impl ManifestFormat {
    /// `.csv` → CSV, `.jsonl`/`.ndjson` → JSONL, `.json` → LLaVA JSON (case-insensitive).
    /// Anything else is an [`Error::Config`] naming the file.
    pub fn from_path(p: &Path) -> Result<Self> {
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("csv") => Ok(ManifestFormat::Csv),
            Some("jsonl") | Some("ndjson") => Ok(ManifestFormat::Jsonl),
            Some("json") => Ok(ManifestFormat::LlavaJson),
            _ => Err(Error::Config {
                path: p.to_path_buf(),
                key: "manifest".into(),
                reason: format!(
                    "cannot tell the pair manifest format of {}: expected a .csv, .jsonl or \
                     .json (LLaVA conversations) file",
                    p.display()
                ),
            }),
        }
    }
}

/// One manifest to read, with where its relative image paths start and how often to repeat it.
#[derive(Debug, Clone)]
pub struct PairSource {
    pub manifest: PathBuf,
    /// Directory relative image paths are joined to; `None` means the manifest's directory.
    pub image_root: Option<PathBuf>,
    /// How many times the manifest's rows are emitted (>= 1).
    pub repeat: usize,
}

impl PairSource {
    /// A manifest read once, with images relative to its own directory.
    pub fn new(manifest: impl Into<PathBuf>) -> Self {
        PairSource {
            manifest: manifest.into(),
            image_root: None,
            repeat: 1,
        }
    }

    /// The directory relative image paths are resolved against.
    pub fn resolved_image_root(&self) -> PathBuf {
        match &self.image_root {
            Some(root) => root.clone(),
            None => self
                .manifest
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        }
    }
}

/// Reads a manifest, resolves image paths (relative to the image root; absolute paths are kept),
/// validates every row and every image, and returns all pairs: the rows in file order, the whole
/// list repeated `repeat` times.
///
/// Errors:
/// - the manifest cannot be read: [`Error::Io`] naming it;
/// - its extension is not one of the formats, or `repeat` is 0: [`Error::Config`];
/// - any row or image has a problem: one [`Error::Config`] (key `pairs`) whose reason lists every
///   problem as `file:line: reason` (at most 20, then `... and N more`). Nothing is skipped.
pub fn load_pairs(src: &PairSource) -> Result<Vec<Pair>> {
    load_pair_sources(std::slice::from_ref(src))
}

/// Several sources concatenated in order, each repeated its own `repeat` times (e.g. a training
/// set plus another set repeated x3). All sources are validated before anything is returned, and
/// row problems of every source are reported together in one error.
pub fn load_pair_sources(srcs: &[PairSource]) -> Result<Vec<Pair>> {
    let mut parsed = Vec::with_capacity(srcs.len());
    for src in srcs {
        if src.repeat == 0 {
            return Err(Error::Config {
                path: src.manifest.clone(),
                key: "repeat".into(),
                reason: "the repeat factor of a pair source must be at least 1".into(),
            });
        }
        parsed.push(parse_source(src)?);
    }

    // Every distinct image is checked once, whatever the number of rows naming it.
    let mut unique: Vec<PathBuf> = parsed
        .iter()
        .flat_map(|entries| entries.iter())
        .filter_map(|e| e.outcome.as_ref().ok().map(|(image, _)| image.clone()))
        .collect();
    unique.sort();
    unique.dedup();
    let checks = check_images(&unique);
    let verdicts: HashMap<&Path, &std::result::Result<(), String>> = unique
        .iter()
        .map(PathBuf::as_path)
        .zip(checks.iter())
        .collect();

    let mut problems: Vec<String> = Vec::new();
    let mut failing: Vec<&Path> = Vec::new();
    let mut out = Vec::new();
    for (src, entries) in srcs.iter().zip(&parsed) {
        let before = problems.len();
        let mut pairs = Vec::with_capacity(entries.len());
        for entry in entries {
            match &entry.outcome {
                Err(reasons) => {
                    problems.extend(reasons.iter().map(|r| format!("{}: {r}", entry.location)))
                }
                Ok((image, text)) => match verdicts[image.as_path()] {
                    Err(reason) => problems.push(format!("{}: {reason}", entry.location)),
                    Ok(()) => pairs.push(Pair {
                        image: image.clone(),
                        text: text.clone(),
                        source: entry.location.clone(),
                    }),
                },
            }
        }
        if problems.len() > before {
            failing.push(&src.manifest);
        } else if problems.is_empty() {
            for _ in 0..src.repeat {
                out.extend(pairs.iter().cloned());
            }
        }
    }

    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems_error(&failing, &problems))
    }
}

/// One row of a manifest: where it is, and either the resolved image path and trimmed text or the
/// reasons it is unusable. A manifest-wide problem (no header column, a file that is not JSON, no
/// rows at all) is an entry of its own.
struct Entry {
    location: String,
    outcome: std::result::Result<(PathBuf, String), Vec<String>>,
}

impl Entry {
    fn problem(location: String, reason: String) -> Self {
        Entry {
            location,
            outcome: Err(vec![reason]),
        }
    }
}

/// Raw fields of a row before resolution: image path as written and trimmed text.
type RawRow = std::result::Result<(String, String), Vec<String>>;

fn parse_source(src: &PairSource) -> Result<Vec<Entry>> {
    let format = ManifestFormat::from_path(&src.manifest)?;
    let bytes = std::fs::read(&src.manifest).map_err(|e| Error::io(&src.manifest, e))?;
    let file = src.manifest.display().to_string();
    let raw = match format {
        ManifestFormat::Csv => parse_csv(&file, &bytes),
        ManifestFormat::Jsonl => parse_jsonl(&file, &bytes),
        ManifestFormat::LlavaJson => parse_llava(&file, &bytes),
    };
    if raw.is_empty() {
        return Ok(vec![Entry::problem(
            file,
            "the manifest holds no image-description pairs".into(),
        )]);
    }
    let root = src.resolved_image_root();
    Ok(raw
        .into_iter()
        .map(|(location, row)| Entry {
            location,
            outcome: row.map(|(image, text)| (resolve(&root, &image), text)),
        })
        .collect())
}

/// `root/image` for a relative path, `image` itself for an absolute one.
fn resolve(root: &Path, image: &str) -> PathBuf {
    let p = Path::new(image);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// Checks the fields common to all formats: a non-empty image path and a non-empty text.
fn check_fields(image: &str, text: &str, text_name: &str, reasons: &mut Vec<String>) {
    if image.trim().is_empty() {
        reasons.push("empty `image`".into());
    }
    if text.is_empty() {
        reasons.push(format!("empty `{text_name}`"));
    }
}

fn parse_csv(file: &str, bytes: &[u8]) -> Vec<(String, RawRow)> {
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
                let line = rec.position().map_or(0, |p| p.line());
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
                let line = e.position().map_or(0, |p| p.line());
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

fn parse_jsonl(file: &str, bytes: &[u8]) -> Vec<(String, RawRow)> {
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

/// The string at `key`, or `None` with a reason recorded.
fn string_field(obj: &Map<String, Value>, key: &str, reasons: &mut Vec<String>) -> Option<String> {
    match obj.get(key) {
        None => {
            reasons.push(format!("missing field `{key}`"));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            reasons.push(format!("`{key}` must be a string, found {}", kind(other)));
            None
        }
    }
}

fn parse_llava(file: &str, bytes: &[u8]) -> Vec<(String, RawRow)> {
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

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks that each file exists and starts like an image we can decode, in parallel.
fn check_images(paths: &[PathBuf]) -> Vec<std::result::Result<(), String>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16)
        .min(paths.len() / 64 + 1);
    if threads <= 1 {
        return paths.iter().map(|p| check_image(p)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|c| {
                (
                    c.len(),
                    s.spawn(move || c.iter().map(|p| check_image(p)).collect()),
                )
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(len, h)| {
                h.join()
                    .unwrap_or_else(|_| vec![Err("the image check panicked".to_string()); len])
            })
            .collect()
    })
}

/// Opens `path`, guesses its format from the content and reads the dimensions from its header.
fn check_image(path: &Path) -> std::result::Result<(), String> {
    let shown = path.display();
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => format!("image {shown} does not exist"),
            _ => format!("cannot read image {shown}: {e}"),
        })?;
    if reader.format().is_none() {
        return Err(format!(
            "cannot decode image {shown}: not a PNG, JPEG, BMP, TIFF or WebP file"
        ));
    }
    match reader.into_dimensions() {
        Err(e) => Err(format!("cannot decode image {shown}: {e}")),
        Ok((0, _)) | Ok((_, 0)) => Err(format!("image {shown} has zero width or height")),
        Ok(_) => Ok(()),
    }
}

/// The single error for all row problems, listing at most [`MAX_LISTED`].
fn problems_error(failing: &[&Path], problems: &[String]) -> Error {
    let n = problems.len();
    let mut reason = format!(
        "{n} problem{} in the image-description pairs",
        if n == 1 { "" } else { "s" }
    );
    if failing.len() > 1 {
        let files: Vec<String> = failing.iter().map(|p| p.display().to_string()).collect();
        reason.push_str(&format!(
            " of {} manifests ({})",
            failing.len(),
            files.join(", ")
        ));
    }
    reason.push(':');
    for p in problems.iter().take(MAX_LISTED) {
        reason.push_str("\n  ");
        reason.push_str(p);
    }
    if n > MAX_LISTED {
        reason.push_str(&format!("\n  ... and {} more", n - MAX_LISTED));
    }
    Error::Config {
        path: failing.first().map(|p| p.to_path_buf()).unwrap_or_default(),
        key: "pairs".into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn png(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        image::RgbImage::new(4, 4).save(&p).unwrap();
        p
    }

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, content).unwrap();
        p
    }

    fn config_reason(err: Error) -> (PathBuf, String) {
        match err {
            Error::Config { path, key, reason } => {
                assert_eq!(key, "pairs", "unexpected key in {reason}");
                (path, reason)
            }
            other => panic!("expected Error::Config, got {other:?}"),
        }
    }

    #[test]
    fn csv_happy_path_with_quoted_commas_and_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "a.png");
        png(d, "sub/b.png");
        let abs = png(d, "abs/c.png");
        let csv = format!(
            "id,image,text\n\
             1,a.png,  left lung opacity \n\
             2,sub/b.png,\"big, round cell, \"\"purple\"\"\"\n\
             3,{},\"two\nlines\"\n\
             4,a.png,last\n",
            abs.display()
        );
        let m = write(d, "pairs.csv", &csv);
        let pairs = load_pairs(&PairSource::new(&m)).unwrap();
        let f = m.display();
        assert_eq!(
            pairs,
            vec![
                Pair {
                    image: d.join("a.png"),
                    text: "left lung opacity".into(),
                    source: format!("{f}:2"),
                },
                Pair {
                    image: d.join("sub/b.png"),
                    text: "big, round cell, \"purple\"".into(),
                    source: format!("{f}:3"),
                },
                Pair {
                    image: abs.clone(),
                    text: "two\nlines".into(),
                    source: format!("{f}:4"),
                },
                Pair {
                    image: d.join("a.png"),
                    text: "last".into(),
                    source: format!("{f}:6"),
                },
            ]
        );
    }

    #[test]
    fn csv_description_column_and_explicit_image_root() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "images/x.png");
        fs::create_dir_all(d.join("manifests")).unwrap();
        let m = write(
            d,
            "manifests/m.csv",
            "description,image\nsmall cell,x.png\n",
        );
        let src = PairSource {
            manifest: m.clone(),
            image_root: Some(d.join("images")),
            repeat: 1,
        };
        let pairs = load_pairs(&src).unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].image, d.join("images/x.png"));
        assert_eq!(pairs[0].text, "small cell");
    }

    #[test]
    fn jsonl_happy_path_skips_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "a.png");
        png(d, "b.png");
        let m = write(
            d,
            "p.jsonl",
            "{\"image\": \"a.png\", \"text\": \" round nucleus \"}\n\
             \n   \n\
             {\"image\": \"b.png\", \"description\": \"coarse granules\", \"extra\": 1}\r\n",
        );
        let pairs = load_pairs(&PairSource::new(&m)).unwrap();
        let f = m.display();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].text, "round nucleus");
        assert_eq!(pairs[0].source, format!("{f}:1"));
        assert_eq!(pairs[1].image, d.join("b.png"));
        assert_eq!(pairs[1].text, "coarse granules");
        assert_eq!(pairs[1].source, format!("{f}:4"));
    }

    #[test]
    fn llava_json_takes_first_gpt_turn_without_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "img/a.png");
        let m = write(
            d,
            "llava.json",
            r#"[
              {"id": "pmc-1", "image": "img/a.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": "<image>\n  A chest X-ray with an opacity.  "},
                {"from": "human", "value": "More?"},
                {"from": "gpt", "value": "No."}
              ]}
            ]"#,
        );
        let pairs = load_pairs(&PairSource::new(&m)).unwrap();
        assert_eq!(
            pairs,
            vec![Pair {
                image: d.join("img/a.png"),
                text: "A chest X-ray with an opacity.".into(),
                source: format!("{}: item 0 (id pmc-1)", m.display()),
            }]
        );
    }

    #[test]
    fn repeat_emits_all_rows_in_order_repeatedly() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "a.png");
        png(d, "b.png");
        let m = write(d, "p.csv", "image,text\na.png,first\nb.png,second\n");
        let src = PairSource {
            repeat: 3,
            ..PairSource::new(&m)
        };
        let texts: Vec<String> = load_pairs(&src)
            .unwrap()
            .into_iter()
            .map(|p| p.text)
            .collect();
        assert_eq!(
            texts,
            ["first", "second", "first", "second", "first", "second"]
        );
    }

    #[test]
    fn sources_are_concatenated_each_with_its_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "a.png");
        png(d, "b.png");
        let train = write(d, "train.csv", "image,text\na.png,train row\n");
        let extra = write(
            d,
            "extra.jsonl",
            "{\"image\":\"b.png\",\"text\":\"extra row\"}\n",
        );
        let pairs = load_pair_sources(&[
            PairSource::new(&train),
            PairSource {
                repeat: 3,
                ..PairSource::new(&extra)
            },
        ])
        .unwrap();
        let texts: Vec<&str> = pairs.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["train row", "extra row", "extra row", "extra row"]);
    }

    #[test]
    fn every_problem_is_reported_with_its_line_in_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "ok.png");
        fs::write(d.join("corrupt.png"), b"this is not a png").unwrap();
        let m = write(
            d,
            "bad.jsonl",
            "{\"image\": \"ok.png\", \"text\": \"fine\"}\n\
             {\"image\": \"ok.png\", \"text\": \n\
             {\"image\": \"ok.png\", \"text\": \"   \"}\n\
             {\"image\": \"missing.png\", \"text\": \"no file\"}\n\
             {\"image\": \"corrupt.png\", \"text\": \"bad bytes\"}\n\
             {\"image\": \"ok.png\"}\n\
             [1, 2]\n\
             {\"image\": 7, \"text\": \"x\"}\n",
        );
        let (path, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        assert_eq!(path, m);
        let f = m.display();
        assert!(reason.starts_with("7 problems"), "{reason}");
        let expected = [
            format!("{f}:2: malformed JSON"),
            format!("{f}:3: empty `text`"),
            format!(
                "{f}:4: image {} does not exist",
                d.join("missing.png").display()
            ),
            format!(
                "{f}:5: cannot decode image {}",
                d.join("corrupt.png").display()
            ),
            format!("{f}:6: missing field `text` (or `description`)"),
            format!("{f}:7: expected a JSON object, found an array"),
            format!("{f}:8: `image` must be a string, found a number"),
        ];
        let lines: Vec<&str> = reason.lines().skip(1).map(str::trim).collect();
        assert_eq!(lines.len(), expected.len(), "{reason}");
        for (line, want) in lines.iter().zip(&expected) {
            assert!(line.starts_with(want.as_str()), "{line:?} vs {want:?}");
        }
        assert!(!reason.contains(&format!("{f}:1:")), "{reason}");
    }

    #[test]
    fn csv_problems_are_reported_by_record_start_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "ok.png");
        let m = write(
            d,
            "p.csv",
            "image,text\nok.png,\"multi\nline\"\nok.png,\nnope.png,gone\nok.png\n,no image\n",
        );
        let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        let f = m.display();
        assert!(reason.starts_with("4 problems"), "{reason}");
        assert!(reason.contains(&format!("{f}:4: empty `text`")), "{reason}");
        assert!(reason.contains(&format!("{f}:5: image ")), "{reason}");
        assert!(
            reason.contains(&format!(
                "{f}:6: the row has 1 fields but `text` is column 2 of the header"
            )),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("{f}:7: empty `image`")),
            "{reason}"
        );
    }

    #[test]
    fn csv_without_required_columns_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path(), "p.csv", "img_name,label\na.png,x\n");
        let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        let f = m.display();
        assert!(
            reason.contains(&format!("{f}:1: the header has no `image` column")),
            "{reason}"
        );
        assert!(
            reason.contains("no `text` or `description` column"),
            "{reason}"
        );
        assert!(reason.contains("`img_name`, `label`"), "{reason}");
    }

    #[test]
    fn llava_problems_name_items() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        png(d, "a.png");
        let m = write(
            d,
            "l.json",
            r#"[
              {"id": 5, "image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]},
              {"image": "a.png", "conversations": [{"from": "gpt", "value": " <image> "}]},
              "oops",
              {"id": "x", "conversations": []}
            ]"#,
        );
        let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        let f = m.display();
        for want in [
            format!("{f}: item 0 (id 5): `conversations` has no turn from `gpt`"),
            format!("{f}: item 1: empty description"),
            format!("{f}: item 2: expected a JSON object, found a string"),
            format!("{f}: item 3 (id x): missing field `image`"),
            format!("{f}: item 3 (id x): `conversations` has no turn from `gpt`"),
        ] {
            assert!(reason.contains(&want), "missing {want:?} in {reason}");
        }
    }

    #[test]
    fn malformed_llava_file_reports_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path(), "l.json", "[\n{\"image\": \"a.png\",\n}\n");
        let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        assert!(
            reason.contains(&format!("{}:3: malformed JSON", m.display())),
            "{reason}"
        );
    }

    #[test]
    fn long_problem_lists_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("image,text\n");
        for i in 0..25 {
            csv.push_str(&format!("missing{i}.png,text {i}\n"));
        }
        let m = write(dir.path(), "p.csv", &csv);
        let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        assert!(reason.starts_with("25 problems"), "{reason}");
        assert_eq!(reason.lines().count(), 1 + 20 + 1, "{reason}");
        assert!(reason.ends_with("... and 5 more"), "{reason}");
        assert!(reason.contains(&format!("{}:21:", m.display())), "{reason}");
        assert!(
            !reason.contains(&format!("{}:22:", m.display())),
            "{reason}"
        );
    }

    #[test]
    fn problems_of_all_sources_are_reported_together() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = write(d, "a.csv", "image,text\ngone.png,x\n");
        let b = write(d, "b.jsonl", "{\"image\": \"gone.png\"}\n");
        let (path, reason) = config_reason(
            load_pair_sources(&[PairSource::new(&a), PairSource::new(&b)]).unwrap_err(),
        );
        assert_eq!(path, a);
        assert!(reason.contains("of 2 manifests"), "{reason}");
        assert!(
            reason.contains(&format!("{}:2: image", a.display())),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("{}:1: missing field `text`", b.display())),
            "{reason}"
        );
    }

    #[test]
    fn empty_manifest_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path(), "p.jsonl", "\n\n");
        let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        assert!(
            reason.contains("holds no image-description pairs"),
            "{reason}"
        );
    }

    #[test]
    fn unknown_extension_names_the_file() {
        let p = Path::new("data/pairs.txt");
        let err = ManifestFormat::from_path(p).unwrap_err();
        assert!(err.to_string().contains("data/pairs.txt"), "{err}");
        assert!(matches!(
            load_pairs(&PairSource::new(p)),
            Err(Error::Config { .. })
        ));
        assert_eq!(
            ManifestFormat::from_path(Path::new("x/Y.CSV")).unwrap(),
            ManifestFormat::Csv
        );
        assert_eq!(
            ManifestFormat::from_path(Path::new("y.jsonl")).unwrap(),
            ManifestFormat::Jsonl
        );
        assert_eq!(
            ManifestFormat::from_path(Path::new("z.json")).unwrap(),
            ManifestFormat::LlavaJson
        );
        assert!(ManifestFormat::from_path(Path::new("noext")).is_err());
    }

    #[test]
    fn missing_manifest_is_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("absent.csv");
        match load_pairs(&PairSource::new(&m)) {
            Err(e @ Error::Io { .. }) => {
                assert!(e.to_string().contains(&m.display().to_string()), "{e}")
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
    }

    #[test]
    fn zero_repeat_is_rejected() {
        let src = PairSource {
            repeat: 0,
            ..PairSource::new("p.csv")
        };
        match load_pairs(&src) {
            Err(Error::Config { key, .. }) => assert_eq!(key, "repeat"),
            other => panic!("expected Error::Config, got {other:?}"),
        }
    }

    #[test]
    fn many_images_are_checked_in_parallel() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut csv = String::from("image,text\n");
        for i in 0..200 {
            png(d, &format!("i{i}.png"));
            csv.push_str(&format!("i{i}.png,t{i}\n"));
        }
        csv.push_str("missing.png,t\n");
        let m = write(d, "p.csv", &csv);
        let (_, reason) = config_reason(load_pairs(&PairSource::new(&m)).unwrap_err());
        assert!(reason.starts_with("1 problem "), "{reason}");
        assert!(
            reason.contains(&format!("{}:202: image", m.display())),
            "{reason}"
        );
    }
}
