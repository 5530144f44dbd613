//! What every benchmark's `prepare` shares: options, the output layout, the summary, writers.
//!
//! Output layout of `lvlm-ift prepare --benchmark B --source SRC --out OUT`:
//! `OUT/train.jsonl`, `OUT/val.jsonl` (image–description pairs, `{"image", "text"}`, image paths
//! relative to OUT or absolute), `OUT/mcq_val.jsonl`, `OUT/mcq_test.jsonl` ([`McqItem`] per line,
//! same path rule), optional `OUT/images/` (letterboxed cache), `OUT/summary.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::csv_strict::read_strict;
use crate::error::{Error, Result};
use crate::eval::mcq::McqItem;
use crate::train::checkpoint::write_atomic;

pub const TRAIN_PAIRS: &str = "train.jsonl";
pub const VAL_PAIRS: &str = "val.jsonl";
pub const MCQ_VAL: &str = "mcq_val.jsonl";
pub const MCQ_TEST: &str = "mcq_test.jsonl";
pub const SUMMARY: &str = "summary.json";

#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Write letterboxed `size`×`size` copies of the images under `OUT/images/` and point the
    /// outputs at them.
    pub image_cache: Option<u32>,
}

/// One training pair as written to `train.jsonl` / `val.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairRecord {
    pub image: String,
    pub text: String,
}

/// A source row that was not used, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    /// `file:line` (or an id).
    pub source: String,
    pub reason: String,
}

/// `summary.json`: counts per split and per question key, option-count histogram, skipped rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PrepareSummary {
    pub benchmark: String,
    /// Which of a benchmark's accepted source layouts was read (SKINCON: release or reference
    /// names); absent for benchmarks with one layout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    pub pairs: BTreeMap<String, usize>,
    pub items: BTreeMap<String, usize>,
    pub items_per_key: BTreeMap<String, BTreeMap<String, usize>>,
    pub option_counts: BTreeMap<String, BTreeMap<usize, usize>>,
    pub skipped: Vec<Skipped>,
}

impl PrepareSummary {
    pub fn new(benchmark: &str) -> Self {
        Self {
            benchmark: benchmark.to_string(),
            ..Self::default()
        }
    }

    pub fn count_items(&mut self, split: &str, items: &[McqItem]) {
        self.items.insert(split.to_string(), items.len());
        let per_key = self.items_per_key.entry(split.to_string()).or_default();
        let hist = self.option_counts.entry(split.to_string()).or_default();
        for it in items {
            *per_key.entry(it.key.clone()).or_default() += 1;
            *hist.entry(it.options.len()).or_default() += 1;
        }
    }
}

/// Write JSON lines atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut out = String::new();
    for r in rows {
        out.push_str(&serde_json::to_string(r).map_err(|e| Error::json(path, e))?);
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

/// Write the whole prepared set.
pub fn write_outputs(
    out: &Path,
    train: &[PairRecord],
    val: &[PairRecord],
    mcq_val: &[McqItem],
    mcq_test: &[McqItem],
    summary: &mut PrepareSummary,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    summary.pairs.insert("train".into(), train.len());
    summary.pairs.insert("val".into(), val.len());
    summary.count_items("val", mcq_val);
    summary.count_items("test", mcq_test);
    write_jsonl(&out.join(TRAIN_PAIRS), train)?;
    write_jsonl(&out.join(VAL_PAIRS), val)?;
    write_jsonl(&out.join(MCQ_VAL), mcq_val)?;
    write_jsonl(&out.join(MCQ_TEST), mcq_test)?;
    let json =
        serde_json::to_string_pretty(summary).map_err(|e| Error::json(out.join(SUMMARY), e))?;
    write_atomic(&out.join(SUMMARY), json.as_bytes())
}

/// A released label file read whole: trimmed header names (a UTF-8 BOM dropped) and
/// `(line, record)` per data row, every row with the header's number of fields. Read with
/// [`crate::data::csv_strict`]: ragged rows, duplicate column names and broken quoting (a quoted
/// field never closed, text after a closing quote) are errors. Errors name the file and the line
/// ([`crate::data::csv_line`]: right for CRLF files and quoted newlines too).
#[derive(Debug, Clone)]
pub struct CsvTable {
    pub path: PathBuf,
    pub headers: Vec<String>,
    pub rows: Vec<(u64, csv::StringRecord)>,
}

impl CsvTable {
    /// Read `path` whole; a malformed or ragged row is an error naming the file and line (the
    /// first such row).
    pub fn read(path: &Path) -> Result<CsvTable> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let csv_err = |line: u64, reason: String| Error::Config {
            path: path.to_path_buf(),
            key: "csv".into(),
            reason: format!("line {line}: {reason}"),
        };
        let table = read_strict(&data).map_err(|f| csv_err(f.line, f.reason))?;
        let mut rows = Vec::with_capacity(table.rows.len());
        for row in table.rows {
            let rec = row.record.map_err(|reason| csv_err(row.line, reason))?;
            let rec = csv::StringRecord::from_byte_record(rec)
                .map_err(|_| csv_err(row.line, "not valid UTF-8".into()))?;
            rows.push((row.line, rec));
        }
        Ok(CsvTable {
            path: path.to_path_buf(),
            headers: table.headers,
            rows,
        })
    }

    /// Index of a column, or the missing-column error.
    pub fn col(&self, name: &str) -> Result<usize> {
        self.headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| missing_column(&self.path, name, &self.headers))
    }

    /// The file's name, for `file:line` locations.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Cell `i` of a record ("" past its end; [`CsvTable`] rows are rectangular, so only for columns
/// the header has).
pub fn field(rec: &csv::StringRecord, i: usize) -> &str {
    rec.get(i).unwrap_or("")
}

/// The strings pandas' `read_csv` reads as NaN by default (`na_values`), compared with the raw
/// cell. The reference scripts read the released CSVs with pandas, so a cell such as `N/A` is a
/// missing value there, and must be one here too.
pub fn is_pandas_na(raw: &str) -> bool {
    const NA: [&str; 19] = [
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
    ];
    NA.contains(&raw)
}

/// A required column is missing: name it, the file, and the columns found.
pub fn missing_column(file: &Path, column: &str, found: &[String]) -> Error {
    Error::Config {
        path: file.to_path_buf(),
        key: column.to_string(),
        reason: format!("missing column (found: {})", found.join(", ")),
    }
}

/// Path of `image` relative to `out` when it lies inside it, else absolute.
pub fn display_path(out: &Path, image: &Path) -> String {
    image
        .strip_prefix(out)
        .map(PathBuf::from)
        .unwrap_or_else(|_| image.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_table_lines_and_ragged_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "\u{feff} a ,b\r\n1,\"x\n\"\r\n2,y\r\n").unwrap();
        let t = CsvTable::read(&p).unwrap();
        assert_eq!(t.headers, ["a", "b"]);
        let lines: Vec<u64> = t.rows.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [2, 4]);
        assert_eq!(field(&t.rows[1].1, 1), "y");
        assert!(t
            .col("c")
            .unwrap_err()
            .to_string()
            .contains("missing column"));

        std::fs::write(&p, "a,b\r\n1,2\r\n3\r\n").unwrap();
        let err = CsvTable::read(&p).unwrap_err().to_string();
        assert!(err.contains("t.csv"), "{err}");
        assert!(
            err.contains("line 3: the row has 1 field(s), the header 2"),
            "{err}"
        );
    }

    #[test]
    fn csv_table_refuses_duplicate_columns_and_unterminated_quotes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "a,b,a\r\n1,2,3\r\n").unwrap();
        let err = CsvTable::read(&p).unwrap_err().to_string();
        assert!(err.contains("t.csv"), "{err}");
        assert!(
            err.contains("line 1: duplicate column `a` (columns 1 and 3 of the header)"),
            "{err}"
        );

        std::fs::write(&p, "a,b\r\n1,\"open\r\n2,y\r\n").unwrap();
        let err = CsvTable::read(&p).unwrap_err().to_string();
        assert!(err.contains("t.csv"), "{err}");
        assert!(
            err.contains("line 2: unterminated quoted field: the quote opened on line 2"),
            "{err}"
        );
    }

    #[test]
    fn pandas_na_strings() {
        for na in ["", "N/A", "NA", "nan", "NULL", "None"] {
            assert!(is_pandas_na(na), "{na:?}");
        }
        for v in ["n", " NA", "OVAL", "0"] {
            assert!(!is_pandas_na(v), "{v:?}");
        }
    }
}
