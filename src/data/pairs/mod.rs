//! Image–description pair manifests: the training data of instruction-free tuning.
//!
//! Three manifest formats are read (FORMATS.md, "Training data"), chosen by extension:
//! - **CSV** (`.csv`): a header row with an `image` column and a `text` column (or, failing
//!   that, a `description` column); other columns are ignored. Quoted fields may hold commas,
//!   quotes and newlines. A row's line is the line its record starts on (the header is line 1).
//!   The file is read strictly ([`crate::data::csv_strict`]): a row with more or fewer fields than
//!   the header, two header columns of the same name, a quoted field that is never closed (named
//!   by the line its quote opens on) or text after a closing quote is an error.
//! - **JSONL** (`.jsonl`, `.ndjson`): one object `{"image": ..., "text": ...}` per line
//!   (`description` is accepted instead of `text`; `text` wins when both are present). Blank
//!   lines are skipped; lines are numbered from 1.
//! - **LLaVA JSON** (`.json`): an array of `{id, image, conversations: [{from: "human", value},
//!   {from: "gpt", value}, ...]}`. The description is the first `gpt` turn's value with every
//!   `<image>` placeholder removed. Items are located as `item N` (0-based array index, which
//!   is what `jq '.[N]'` takes), followed by the item's `id` when it has one.
//!
//! Texts are trimmed. Relative image paths are resolved against the source's image root (the
//! manifest's directory unless given); a relative path whose `..` components climb above the
//! root (`../x.png`, `a/../../x.png`, checked lexically, so also for files that do not exist) is
//! an error naming the row. Absolute paths are explicit and are kept as written.
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
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

mod csv_manifest;
mod jsonl;
mod llava_json;
#[cfg(test)]
mod tests;
mod validate;

use csv_manifest::parse_csv;
use jsonl::parse_jsonl;
use llava_json::parse_llava;
use validate::check_images;

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
    /// Directory relative image paths are joined to; `None` means the manifest's directory. A
    /// relative path must stay inside it (`..` may not climb above it, checked lexically);
    /// absolute paths are allowed and used as written.
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

/// Most training samples the sources may expand to, repeats included (a sample costs its image
/// path and description in memory; real medical sets hold up to a few million).
pub const MAX_EXPANDED_PAIRS: usize = 10_000_000;

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
            // Checked before the repeats are materialised: a repeat factor must not turn a
            // manifest into more samples than memory holds.
            let total = pairs
                .len()
                .checked_mul(src.repeat)
                .and_then(|n| n.checked_add(out.len()))
                .filter(|&n| n <= MAX_EXPANDED_PAIRS);
            if total.is_none() {
                return Err(Error::Config {
                    path: src.manifest.clone(),
                    key: "repeat".into(),
                    reason: format!(
                        "{} pairs x repeat {} (after {} pairs of earlier sources) exceed the limit \
                         of {MAX_EXPANDED_PAIRS} training samples",
                        pairs.len(),
                        src.repeat,
                        out.len()
                    ),
                });
            }
            out.reserve(pairs.len() * src.repeat);
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
            outcome: row.and_then(|(image, text)| {
                resolve(&root, &image)
                    .map(|image| (image, text))
                    .map_err(|reason| vec![reason])
            }),
        })
        .collect())
}

/// `root/image` for a relative path; `image` itself for an absolute one (an absolute path is an
/// explicit choice of the manifest's author, so it is allowed anywhere). A relative path that
/// lexically climbs out of `root` ([`crate::data::paths::escapes_root`]) is refused with the
/// reason.
fn resolve(root: &Path, image: &str) -> std::result::Result<PathBuf, String> {
    let p = Path::new(image);
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else if crate::data::paths::escapes_root(p) {
        Err(format!(
            "image path `{image}` leaves the image root {} (its `..` climbs above it); use a \
             path inside the root, or an absolute path",
            if root.as_os_str().is_empty() {
                Path::new(".")
            } else {
                root
            }
            .display()
        ))
    } else {
        Ok(root.join(p))
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
