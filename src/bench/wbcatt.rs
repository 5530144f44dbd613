//! WBCAtt (white blood cell attributes): image–description pairs and MCQ sets.
//!
//! Source: the released `pbc_attr_v1_{train,val,test}.csv` (columns [`COLUMNS`]; `path` is the image
//! path relative to the source directory). The protocol is `METHOD.md`, "Image-description pairs and
//! MCQ sets per benchmark", WBCAtt paragraph:
//!
//! * `train.jsonl` = the train file's rows, `val.jsonl` = the val file's rows, each as
//!   `{"image", "text"}` with the text built by [`description`].
//! * `mcq_val.jsonl` / `mcq_test.jsonl`: one question per row. ONE generator, `PyRandom::new(0)`,
//!   walks the val file and then the test file row by row. For each row the keys of
//!   [`ATTRIBUTE_ORDER`] whose value is not `nil` are listed in that order, the list is shuffled
//!   (`random.shuffle`) and its first key is asked.
//! * Options: the fixed list of the key ([`options_for`]), in its fixed order, never shuffled; the
//!   answer is the index of the row's value in it.
//!
//! Reading of "the attribute keys (in the order above)": the order above is the description order,
//! which ends with `label`, so `label` is one of the shuffled keys and can be asked (its fixed option
//! list, `[Basophil, Eosinophil, Lymphocyte, Monocyte, Neutrophil]`, only makes sense that way).
//!
//! A row whose asked value is not in the key's list is never mapped to an option: the item is left
//! out and reported in `summary.skipped` as `file:line` (the generator has still consumed that row's
//! shuffle, so later rows get the reference's keys). Values are compared exactly (no trimming or case
//! folding), as the reference's list lookup does. Missing columns are an error naming the column;
//! images referenced by any of the three files but absent are listed together in one error.
//!
//! Training descriptions (train and val files) never carry a value the key cannot take (outside
//! its option list, or an empty cell): the reference writes it verbatim (an empty one as a
//! dangling piece); here the attribute is left out of that row's description, like `nil`, and
//! listed in `summary.skipped` as `file:line` with the key and value. The row keeps its other
//! attributes (a row left with nothing to describe is dropped and listed). A `path` that is
//! absolute or climbs out of the source directory is an error naming `file:line`.

use std::collections::HashSet;
use std::path::Path;

use super::letterbox::letterbox_file;
use super::prepare::{
    display_path, write_outputs, CsvTable, PairRecord, PrepareOptions, PrepareSummary, Skipped,
};
use super::pyrandom::PyRandom;
use crate::data::paths::escapes_root;
use crate::error::{Error, Result};
use crate::eval::mcq::McqItem;

pub const BENCHMARK: &str = "wbcatt";

/// `(split, file name)` of the released files.
pub const SPLIT_FILES: [(&str, &str); 3] = [
    ("train", "pbc_attr_v1_train.csv"),
    ("val", "pbc_attr_v1_val.csv"),
    ("test", "pbc_attr_v1_test.csv"),
];

/// Columns every file must have.
pub const COLUMNS: [&str; 14] = [
    "img_name",
    "label",
    "cell_size",
    "cell_shape",
    "nucleus_shape",
    "nuclear_cytoplasmic_ratio",
    "chromatin_density",
    "cytoplasm_vacuole",
    "cytoplasm_texture",
    "cytoplasm_colour",
    "granule_type",
    "granule_colour",
    "granularity",
    "path",
];

/// Attribute order of the description, and of the key list shuffled for a question.
pub const ATTRIBUTE_ORDER: [&str; 12] = [
    "cell_size",
    "cell_shape",
    "nucleus_shape",
    "nuclear_cytoplasmic_ratio",
    "chromatin_density",
    "cytoplasm_vacuole",
    "cytoplasm_texture",
    "cytoplasm_colour",
    "granularity",
    "granule_type",
    "granule_colour",
    "label",
];

/// Seed of the generator that picks the asked attribute (the reference's prepare seed).
pub const SEED: u64 = 0;

/// The fixed option list of a key, in its fixed order (`METHOD.md`).
pub fn options_for(key: &str) -> Option<&'static [&'static str]> {
    Some(match key {
        "label" => &[
            "Basophil",
            "Eosinophil",
            "Lymphocyte",
            "Monocyte",
            "Neutrophil",
        ],
        "cell_size" => &["big", "small"],
        "cell_shape" => &["irregular", "round"],
        "nucleus_shape" => &[
            "irregular",
            "segmented-bilobed",
            "segmented-multilobed",
            "unsegmented-band",
            "unsegmented-indented",
            "unsegmented-round",
        ],
        "nuclear_cytoplasmic_ratio" => &["high", "low"],
        "chromatin_density" => &["densely", "loosely"],
        "cytoplasm_vacuole" => &["yes", "no"],
        "cytoplasm_texture" => &["clear", "frosted"],
        "cytoplasm_colour" => &["blue", "light blue", "purple blue"],
        "granule_type" => &["coarse", "round", "small"],
        "granule_colour" => &["pink", "purple", "red"],
        "granularity" => &["yes", "no"],
        _ => return None,
    })
}

/// One data row of a split file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based line in the file (the header is line 1).
    pub line: u64,
    pub img_name: String,
    /// Image path relative to the source directory.
    pub path: String,
    /// Values in [`ATTRIBUTE_ORDER`].
    pub values: [String; 12],
}

impl Row {
    pub fn value(&self, key: &str) -> Option<&str> {
        ATTRIBUTE_ORDER
            .iter()
            .position(|k| *k == key)
            .map(|i| self.values[i].as_str())
    }
}

/// Whether `value` is one `key` can take: `nil` (not annotated) or one of [`options_for`]`(key)`,
/// compared exactly. An empty cell is not.
pub fn is_known_value(key: &str, value: &str) -> bool {
    value == "nil" || options_for(key).is_some_and(|o| o.contains(&value))
}

/// The `(key, value)` pairs of a row whose value is not known ([`is_known_value`]), in
/// [`ATTRIBUTE_ORDER`]; [`description`] leaves them out.
pub fn unknown_values(values: &[String; 12]) -> Vec<(&'static str, &str)> {
    ATTRIBUTE_ORDER
        .iter()
        .zip(values)
        .filter(|(k, v)| !is_known_value(k, v))
        .map(|(k, v)| (*k, v.as_str()))
        .collect()
}

/// The training text of a row: attributes in [`ATTRIBUTE_ORDER`]; `nil` or `no` dropped; `yes` ->
/// the key alone; `label` -> its value alone; otherwise `"{value} {key}"`; keys with underscores as
/// spaces; joined with `", "`. A value the key cannot take ([`unknown_values`]: a value outside
/// its option list, or an empty cell) is left out like `nil`, so no piece is ever empty or made
/// of an unknown value; `prepare` lists each such value in `summary.skipped`.
pub fn description(values: &[String; 12]) -> String {
    let mut parts = Vec::new();
    for (key, v) in ATTRIBUTE_ORDER.iter().zip(values) {
        if v == "nil" || v == "no" || !is_known_value(key, v) {
            continue;
        }
        let name = key.replace('_', " ");
        if v == "yes" {
            parts.push(name);
        } else if *key == "label" {
            parts.push(v.clone());
        } else {
            parts.push(format!("{v} {name}"));
        }
    }
    parts.join(", ")
}

/// The key asked for a row: the non-`nil` keys of [`ATTRIBUTE_ORDER`], shuffled with `rng`, first one.
/// `None` (consuming nothing, like shuffling an empty list) when every value is `nil`.
pub fn pick_key(values: &[String; 12], rng: &mut PyRandom) -> Option<&'static str> {
    let mut keys: Vec<&'static str> = ATTRIBUTE_ORDER
        .iter()
        .zip(values)
        .filter(|(_, v)| *v != "nil")
        .map(|(k, _)| *k)
        .collect();
    rng.shuffle(&mut keys);
    keys.first().copied()
}

/// Read one split file, checking its columns.
pub fn read_rows(file: &Path) -> Result<Vec<Row>> {
    let table = CsvTable::read(file)?;
    let col = |name: &str| table.col(name);
    for c in COLUMNS {
        col(c)?;
    }
    let name_i = col("img_name")?;
    let path_i = col("path")?;
    let attr_i: Vec<usize> = ATTRIBUTE_ORDER
        .iter()
        .map(|k| col(k))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (line, rec) in &table.rows {
        let line = *line;
        let get = |i: usize| rec.get(i).unwrap_or("").to_string();
        let values: [String; 12] = std::array::from_fn(|j| get(attr_i[j]));
        rows.push(Row {
            line,
            img_name: get(name_i),
            path: get(path_i),
            values,
        });
    }
    Ok(rows)
}

/// Build the MCQ items of one file, consuming `rng` row by row. Rows that cannot be asked (unknown
/// value for the asked key, every value `nil`) are appended to `skipped` as `file:line`.
pub fn mcq_items(
    split: &str,
    file_name: &str,
    rows: &[Row],
    images: &[String],
    rng: &mut PyRandom,
    skipped: &mut Vec<Skipped>,
) -> Vec<McqItem> {
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for (row, image) in rows.iter().zip(images) {
        let source = format!("{file_name}:{}", row.line);
        let Some(key) = pick_key(&row.values, rng) else {
            skipped.push(Skipped {
                source,
                reason: "every attribute is `nil`: nothing to ask".into(),
            });
            continue;
        };
        let value = row.value(key).unwrap_or("");
        let options = options_for(key).unwrap_or(&[]);
        let Some(answer) = options.iter().position(|o| *o == value) else {
            skipped.push(Skipped {
                source,
                reason: format!(
                    "unknown value {value:?} for `{key}` (options: {}); item left out",
                    options.join(", ")
                ),
            });
            continue;
        };
        let id = if seen.insert(row.img_name.clone()) {
            row.img_name.clone()
        } else {
            format!("{}#{}", row.img_name, row.line)
        };
        items.push(McqItem {
            id,
            image: image.clone(),
            key: key.to_string(),
            options: options.iter().map(|s| s.to_string()).collect(),
            answer,
            source: Some(format!("{BENCHMARK} {split} {source}")),
        });
    }
    items
}

/// The training pairs of one file (train or val). A value the key cannot take
/// ([`unknown_values`]) is left out of the row's description and listed in `skipped` as
/// `file:line` (the row itself is kept, described by its other attributes); a row left with
/// nothing to describe is dropped and listed.
pub fn pairs(
    file_name: &str,
    rows: &[Row],
    images: &[String],
    skipped: &mut Vec<Skipped>,
) -> Vec<PairRecord> {
    let mut out = Vec::with_capacity(rows.len());
    for (row, image) in rows.iter().zip(images) {
        let source = format!("{file_name}:{}", row.line);
        for (key, value) in unknown_values(&row.values) {
            let what = if value.is_empty() {
                "empty value".to_string()
            } else {
                format!("unknown value {value:?}")
            };
            skipped.push(Skipped {
                source: source.clone(),
                reason: format!(
                    "{what} for `{key}` (options: {}); attribute left out of the training \
                     description",
                    options_for(key).unwrap_or(&[]).join(", ")
                ),
            });
        }
        let text = description(&row.values);
        if text.is_empty() {
            skipped.push(Skipped {
                source,
                reason: "no attribute to describe (all `nil`, `no` or unknown); pair left out"
                    .into(),
            });
            continue;
        }
        out.push(PairRecord {
            image: image.clone(),
            text,
        });
    }
    out
}

/// Build the WBCAtt pairs and MCQ sets from `source` into `out` (layout in [`super::prepare`]).
/// Image paths (`path`) must be relative and stay inside `source` (an absolute path or a `..`
/// climbing out is an error naming `file:line`).
pub fn prepare(source: &Path, out: &Path, opts: &PrepareOptions) -> Result<PrepareSummary> {
    let source = source.canonicalize().map_err(|e| Error::io(source, e))?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let out = out.canonicalize().map_err(|e| Error::io(out, e))?;

    let mut splits = Vec::new();
    let mut missing = Vec::new();
    let mut outside = Vec::new();
    for (split, file_name) in SPLIT_FILES {
        let rows = read_rows(&source.join(file_name))?;
        for r in &rows {
            let p = Path::new(&r.path);
            if p.is_absolute() || escapes_root(p) {
                outside.push(format!("{file_name}:{}: {}", r.line, r.path));
            } else if !source.join(p).is_file() {
                missing.push(format!("{file_name}:{}: {}", r.line, r.path));
            }
        }
        splits.push((split, file_name, rows));
    }
    if !outside.is_empty() {
        return Err(Error::Config {
            path: source.clone(),
            key: "path".into(),
            reason: format!(
                "{} image path(s) outside the source directory (absolute, or `..` climbing above \
                 it; `path` must be relative to the source directory and stay inside it): {}",
                outside.len(),
                outside.join("; ")
            ),
        });
    }
    if !missing.is_empty() {
        return Err(Error::Config {
            path: source.clone(),
            key: "images".into(),
            reason: format!(
                "{} referenced image(s) absent: {}",
                missing.len(),
                missing.join("; ")
            ),
        });
    }

    // Image paths as written: the source image, or its letterboxed copy.
    let mut images: Vec<Vec<String>> = Vec::new();
    for (split, _, rows) in &splits {
        let mut v = Vec::with_capacity(rows.len());
        for r in rows {
            let src = source.join(&r.path);
            let p = match opts.image_cache {
                Some(size) => {
                    let stem = Path::new(&r.path)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let name = format!("{BENCHMARK}/{split}/{:06}_{stem}.png", r.line);
                    letterbox_file(&src, &out.join("images").join(&name), size)?
                }
                None => src,
            };
            v.push(display_path(&out, &p));
        }
        images.push(v);
    }

    let mut summary = PrepareSummary::new(BENCHMARK);
    let train = pairs(splits[0].1, &splits[0].2, &images[0], &mut summary.skipped);
    let val = pairs(splits[1].1, &splits[1].2, &images[1], &mut summary.skipped);

    let mut rng = PyRandom::new(SEED);
    let mcq_val = mcq_items(
        "val",
        splits[1].1,
        &splits[1].2,
        &images[1],
        &mut rng,
        &mut summary.skipped,
    );
    let mcq_test = mcq_items(
        "test",
        splits[2].1,
        &splits[2].2,
        &images[2],
        &mut rng,
        &mut summary.skipped,
    );
    write_outputs(&out, &train, &val, &mcq_val, &mcq_test, &mut summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(pairs: &[(&str, &str)]) -> [String; 12] {
        std::array::from_fn(|i| {
            let k = ATTRIBUTE_ORDER[i];
            pairs
                .iter()
                .find(|(pk, _)| *pk == k)
                .map(|(_, v)| v.to_string())
                .unwrap_or_else(|| "nil".to_string())
        })
    }

    #[test]
    fn description_drops_nil_and_no_and_phrases_yes_and_label() {
        let v = vals(&[
            ("cell_size", "big"),
            ("cytoplasm_vacuole", "yes"),
            ("granularity", "no"),
            ("cytoplasm_colour", "light blue"),
            ("label", "Neutrophil"),
        ]);
        assert_eq!(
            description(&v),
            "big cell size, cytoplasm vacuole, light blue cytoplasm colour, Neutrophil"
        );
    }

    #[test]
    fn every_attribute_has_a_fixed_option_list() {
        for k in ATTRIBUTE_ORDER {
            assert!(options_for(k).is_some(), "{k}");
        }
        assert_eq!(
            options_for("label").unwrap(),
            &[
                "Basophil",
                "Eosinophil",
                "Lymphocyte",
                "Monocyte",
                "Neutrophil"
            ]
        );
        assert_eq!(options_for("cytoplasm_vacuole").unwrap(), &["yes", "no"]);
        assert!(options_for("path").is_none());
    }

    #[test]
    fn pick_key_skips_nil_and_matches_python_shuffle() {
        // Python: keys = ['cell_size', 'label']; random.Random(0).shuffle(keys) -> keys[0]
        // randbelow(2) with seed 0 decides; mirror it with a fresh generator.
        let v = vals(&[("cell_size", "big"), ("label", "Monocyte")]);
        let mut a = PyRandom::new(0);
        let mut b = PyRandom::new(0);
        let mut keys = vec!["cell_size", "label"];
        b.shuffle(&mut keys);
        assert_eq!(pick_key(&v, &mut a), Some(keys[0]));
        let all_nil = vals(&[]);
        assert_eq!(pick_key(&all_nil, &mut a), None);
    }

    #[test]
    fn unknown_value_is_reported_not_mapped() {
        let row = Row {
            line: 7,
            img_name: "x.png".into(),
            path: "x.png".into(),
            values: vals(&[("label", "Blast")]),
        };
        let mut skipped = Vec::new();
        let items = mcq_items(
            "test",
            "f.csv",
            &[row],
            &["x.png".to_string()],
            &mut PyRandom::new(0),
            &mut skipped,
        );
        assert!(items.is_empty());
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].source, "f.csv:7");
        assert!(skipped[0].reason.contains("Blast"), "{}", skipped[0].reason);
    }
}
