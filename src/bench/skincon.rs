//! SKINCON (Fitzpatrick17k part): image–description pairs and MCQ sets.
//!
//! Source: the annotation CSV [`ANNOTATIONS`] (a leading unnamed index column, header empty or
//! `Unnamed: 0`; `ImageID`; the binary concept columns; `Do not consider this image`) and the images
//! under `images/`, named by `ImageID` (the release's names), or the same file as
//! [`REFERENCE_ANNOTATIONS`] with the images under `fitzpatrick17k/` (the names the reference's
//! preprocessing reads); see [`Layout::detect`]. The summary's `layout` says which was found. The protocol is `METHOD.md`, "Image-description pairs and MCQ
//! sets per benchmark", SKINCON paragraph:
//!
//! * Rows flagged `Do not consider this image` (value 1) are dropped and reported in
//!   `summary.skipped`.
//! * Description = the lower-cased names of the concepts equal to 1, in CSV column order, joined with
//!   `", "`. Concept columns are every column except the index column, `ImageID` and the flag. The
//!   leading index column is read as an index, not a concept (METHOD.md). The reference read it as
//!   a concept named `unnamed: 0` (pandas' name for the empty header), so the image with index 1
//!   carries that artefact and its released pool has 808 strings, one of them with it; on the
//!   released data dropping it moves that string in the sorted pool, which changes the distractor
//!   draws that land after it. [`SkinconOptions::index_as_concept`] (`--skincon-index-as-concept`)
//!   reads it the reference's way and reproduces its items exactly.
//! * Split: the sorted list of usable image ids is shuffled with `PyRandom::new(0)`; the first
//!   `int(0.1 * n)` ids are val, the next `int(0.1 * n)` test, the rest train (Python's float
//!   product truncated, as `int(0.1 * n)` does). The reference repeats train x3: that is a
//!   training-config concern (epochs / repeats), `train.jsonl` holds each pair once.
//! * Questions (val and test): key `dermatologic feature`; truth = the image's combination string;
//!   options = truth + `rng.sample(pool_without_truth, 4)`, then the 5 shuffled with `rng.shuffle`.
//!   an eval generator `PyRandom::new(1)`, seeded afresh for each file (val, test) as the reference's
//!   eval script runs once per file, is consumed item by item in file order: the val items
//!   first, then the test items, each in split order.
//! * Pool = the sorted distinct combination strings over all usable images of all splits.
//!
//! Images referenced by usable rows but absent are listed together in one error; missing columns
//! are an error naming the column.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::letterbox::letterbox_file;
use super::prepare::{
    display_path, write_outputs, CsvTable, PairRecord, PrepareOptions, PrepareSummary, Skipped,
};
use super::pyrandom::PyRandom;
use crate::error::{Error, Result};
use crate::eval::mcq::McqItem;

pub const BENCHMARK: &str = "skincon";
/// The annotation file and image directory of the SKINCON release.
pub const ANNOTATIONS: &str = "annotations_fitzpatrick17k.csv";
pub const IMAGE_DIR: &str = "images";
/// The names the reference's preprocessing expects instead.
pub const REFERENCE_ANNOTATIONS: &str = "fitzpatrick17k_anno.csv";
pub const REFERENCE_IMAGE_DIR: &str = "fitzpatrick17k";

/// Where in `--source` the annotation file and the images are: the release's names or the ones
/// the reference's preprocessing reads (same file, renamed; the images in another directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// [`ANNOTATIONS`] and [`IMAGE_DIR`]`/`.
    Release,
    /// [`REFERENCE_ANNOTATIONS`] and [`REFERENCE_IMAGE_DIR`]`/`.
    Reference,
}

impl Layout {
    pub fn annotations(self) -> &'static str {
        match self {
            Layout::Release => ANNOTATIONS,
            Layout::Reference => REFERENCE_ANNOTATIONS,
        }
    }

    pub fn image_dir(self) -> &'static str {
        match self {
            Layout::Release => IMAGE_DIR,
            Layout::Reference => REFERENCE_IMAGE_DIR,
        }
    }

    /// How the summary names it, e.g. `release (annotations_fitzpatrick17k.csv, images/)`.
    pub fn describe(self) -> String {
        let name = match self {
            Layout::Release => "release",
            Layout::Reference => "reference",
        };
        format!("{name} ({}, {}/)", self.annotations(), self.image_dir())
    }

    /// The layout `source` holds: exactly one annotation file of the two layouts must be there,
    /// with its image directory. Both, neither, or the file without its directory is an
    /// [`Error::Config`] listing what was looked for.
    pub fn detect(source: &Path) -> Result<Layout> {
        let looked_for = format!(
            "looked for {} with {}/ (the SKINCON release) or {} with {}/ (the reference's \
             preprocessing)",
            Layout::Release.annotations(),
            Layout::Release.image_dir(),
            Layout::Reference.annotations(),
            Layout::Reference.image_dir()
        );
        let found: Vec<Layout> = [Layout::Release, Layout::Reference]
            .into_iter()
            .filter(|l| source.join(l.annotations()).is_file())
            .collect();
        let layout = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::Config {
                    path: source.to_path_buf(),
                    key: "skincon layout".into(),
                    reason: format!("no SKINCON annotation file found; {looked_for}"),
                })
            }
            _ => {
                return Err(Error::Config {
                    path: source.to_path_buf(),
                    key: "skincon layout".into(),
                    reason: format!(
                        "both {} and {} are present, so which annotations to read is ambiguous; \
                         keep one ({looked_for})",
                        Layout::Release.annotations(),
                        Layout::Reference.annotations()
                    ),
                })
            }
        };
        if !source.join(layout.image_dir()).is_dir() {
            return Err(Error::Config {
                path: source.to_path_buf(),
                key: "skincon layout".into(),
                reason: format!(
                    "{} is present but its image directory {}/ is not; {looked_for}",
                    layout.annotations(),
                    layout.image_dir()
                ),
            });
        }
        Ok(layout)
    }
}
pub const ID_COLUMN: &str = "ImageID";
pub const FLAG_COLUMN: &str = "Do not consider this image";
pub const KEY: &str = "dermatologic feature";
/// Seed of the split shuffle (prepare) and of the option draws (eval), as in the reference.
pub const SPLIT_SEED: u64 = 0;
pub const EVAL_SEED: u64 = 1;
/// Distractors per question.
pub const DISTRACTORS: usize = 4;

/// One usable (not flagged) annotation row.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    pub line: u64,
    pub image_id: String,
    /// The concept combination string (the description).
    pub combination: String,
}

/// The parsed annotation file: usable rows (file order), concept names, rows left out.
#[derive(Debug, Clone, Default)]
pub struct Annotations {
    pub concepts: Vec<String>,
    pub rows: Vec<Annotation>,
    pub skipped: Vec<Skipped>,
}

/// Whether a header names the leading index column pandas writes (`""` or `Unnamed: N`).
pub fn is_index_column(header: &str) -> bool {
    let h = header.trim();
    h.is_empty() || h.starts_with("Unnamed:")
}

/// A binary cell: `1`/`1.0` -> true, `0`/`0.0`/empty -> false, anything else `None`.
fn binary(v: &str) -> Option<bool> {
    let v = v.trim();
    if v.is_empty() {
        return Some(false);
    }
    let x = v.parse::<f64>().ok()?;
    if x == 1.0 {
        Some(true)
    } else if x == 0.0 {
        Some(false)
    } else {
        None
    }
}

/// SKINCON-specific settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct SkinconOptions {
    /// Read the leading index column as a concept named `unnamed: 0`, as the reference did: the
    /// image whose index is 1 gets `unnamed: 0` in its description and the pool carries that string
    /// (808 strings on the released data). Off by default (METHOD.md: an index, not a concept); on,
    /// it reproduces the reference's descriptions, pool and option draws exactly.
    pub index_as_concept: bool,
}

/// Read the annotation CSV (the index column read as an index).
pub fn read_annotations(file: &Path) -> Result<Annotations> {
    read_annotations_with(file, &SkinconOptions::default())
}

/// Read the annotation CSV with `skin`'s settings.
pub fn read_annotations_with(file: &Path, skin: &SkinconOptions) -> Result<Annotations> {
    let fname = file
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let table = CsvTable::read(file)?;
    let col = |name: &str| table.col(name);
    let headers = table.headers.clone();
    let id_i = col(ID_COLUMN)?;
    let flag_i = col(FLAG_COLUMN)?;
    let index_col = (!headers.is_empty() && is_index_column(&headers[0])).then_some(0);
    let concept_cols: Vec<usize> = (0..headers.len())
        .filter(|&i| i != id_i && i != flag_i && (Some(i) != index_col || skin.index_as_concept))
        .collect();
    // pandas names an empty header `Unnamed: {position}`.
    let concepts: Vec<String> = concept_cols
        .iter()
        .map(|&i| match headers[i].as_str() {
            "" => format!("Unnamed: {i}"),
            h => h.to_string(),
        })
        .collect();
    let lower: Vec<String> = concepts.iter().map(|c| c.to_lowercase()).collect();

    let mut out = Annotations {
        concepts,
        ..Default::default()
    };
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (line, rec) in &table.rows {
        let line = *line;
        let source = format!("{fname}:{line}");
        let image_id = rec.get(id_i).unwrap_or("").to_string();
        let flag = rec.get(flag_i).unwrap_or("");
        match binary(flag) {
            Some(false) => {}
            Some(true) => {
                out.skipped.push(Skipped {
                    source,
                    reason: format!("`{FLAG_COLUMN}` is set ({image_id})"),
                });
                continue;
            }
            None => {
                out.skipped.push(Skipped {
                    source,
                    reason: format!("`{FLAG_COLUMN}` is {flag:?}, not 0 or 1 ({image_id})"),
                });
                continue;
            }
        }
        if image_id.is_empty() {
            out.skipped.push(Skipped {
                source,
                reason: format!("empty `{ID_COLUMN}`"),
            });
            continue;
        }
        if let Some(first) = seen.get(&image_id) {
            out.skipped.push(Skipped {
                source,
                reason: format!("duplicate `{ID_COLUMN}` {image_id:?} (first on line {first})"),
            });
            continue;
        }
        let mut parts = Vec::new();
        let mut bad = None;
        for (j, &ci) in concept_cols.iter().enumerate() {
            let v = rec.get(ci).unwrap_or("");
            if Some(ci) == index_col {
                // The reference's `row == 1`: the index is a concept exactly when it equals 1.
                if v.trim().parse::<f64>().ok() == Some(1.0) {
                    parts.push(lower[j].as_str());
                }
                continue;
            }
            match binary(v) {
                Some(true) => parts.push(lower[j].as_str()),
                Some(false) => {}
                None => {
                    bad = Some(format!("`{}` is {v:?}, not 0 or 1", out.concepts[j]));
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            out.skipped.push(Skipped { source, reason });
            continue;
        }
        seen.insert(image_id.clone(), line);
        out.rows.push(Annotation {
            line,
            image_id,
            combination: parts.join(", "),
        });
    }
    Ok(out)
}

/// The image file of an id in the image directory `dir`: `dir/{id}`, or with `.jpg`/`.jpeg`/`.png`
/// appended when the id has no extension and only such a file exists.
pub fn image_path(dir: &Path, image_id: &str) -> Option<PathBuf> {
    let p = dir.join(image_id);
    if p.is_file() {
        return Some(p);
    }
    ["jpg", "jpeg", "png"]
        .iter()
        .map(|ext| dir.join(format!("{image_id}.{ext}")))
        .find(|p| p.is_file())
}

/// `(val, test, train)` ids: the sorted ids shuffled with `PyRandom::new(SPLIT_SEED)`, first
/// `int(0.1 * n)` val, next `int(0.1 * n)` test, rest train.
pub fn split_ids(ids: &[String]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut sorted = ids.to_vec();
    sorted.sort();
    PyRandom::new(SPLIT_SEED).shuffle(&mut sorted);
    let n = sorted.len();
    let tenth = (0.1 * n as f64) as usize;
    let train = sorted.split_off(2 * tenth);
    let test = sorted.split_off(tenth);
    (sorted, test, train)
}

/// The sorted distinct combination strings.
pub fn pool<'a>(combinations: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    combinations
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Options for one question: truth + `rng.sample(pool without truth, 4)`, shuffled with `rng`;
/// returns `(options, answer)`. `None` when the pool has fewer than 4 other strings.
pub fn question_options(
    truth: &str,
    pool: &[String],
    rng: &mut PyRandom,
) -> Option<(Vec<String>, usize)> {
    let others: Vec<String> = pool.iter().filter(|c| *c != truth).cloned().collect();
    let mut options = vec![truth.to_string()];
    options.extend(rng.sample(&others, DISTRACTORS)?);
    rng.shuffle(&mut options);
    let answer = options.iter().position(|o| o == truth)?;
    Some((options, answer))
}

/// Build the SKINCON pairs and MCQ sets from `source` into `out` (layout in [`super::prepare`]).
pub fn prepare(source: &Path, out: &Path, opts: &PrepareOptions) -> Result<PrepareSummary> {
    prepare_with(source, out, opts, &SkinconOptions::default())
}

/// [`prepare`] with SKINCON-specific settings.
pub fn prepare_with(
    source: &Path,
    out: &Path,
    opts: &PrepareOptions,
    skin: &SkinconOptions,
) -> Result<PrepareSummary> {
    let source = source.canonicalize().map_err(|e| Error::io(source, e))?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let out = out.canonicalize().map_err(|e| Error::io(out, e))?;
    let layout = Layout::detect(&source)?;
    tracing::info!(
        "skincon: {} layout found in {}",
        layout.describe(),
        source.display()
    );
    let annotations = layout.annotations();
    let image_dir = source.join(layout.image_dir());
    let ann = read_annotations_with(&source.join(annotations), skin)?;

    let mut missing = Vec::new();
    let mut by_id: HashMap<String, (PathBuf, &Annotation)> = HashMap::new();
    for a in &ann.rows {
        match image_path(&image_dir, &a.image_id) {
            Some(p) => {
                by_id.insert(a.image_id.clone(), (p, a));
            }
            None => missing.push(format!("{annotations}:{}: {}", a.line, a.image_id)),
        }
    }
    if !missing.is_empty() {
        return Err(Error::Config {
            path: image_dir.clone(),
            key: "images".into(),
            reason: format!(
                "{} referenced image(s) absent: {}",
                missing.len(),
                missing.join("; ")
            ),
        });
    }

    let ids: Vec<String> = ann.rows.iter().map(|a| a.image_id.clone()).collect();
    let (val_ids, test_ids, train_ids) = split_ids(&ids);
    let pool = pool(ann.rows.iter().map(|a| a.combination.as_str()));
    if pool.len() < DISTRACTORS + 1 {
        return Err(Error::Config {
            path: source.join(annotations),
            key: "concepts".into(),
            reason: format!(
                "{} distinct concept combinations; at least {} are needed for {DISTRACTORS} distractors",
                pool.len(),
                DISTRACTORS + 1
            ),
        });
    }

    let image_of = |split: &str, id: &str| -> Result<String> {
        let (src, a) = &by_id[id];
        let p = match opts.image_cache {
            Some(size) => {
                let stem = Path::new(id)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let name = format!("{BENCHMARK}/{split}/{:06}_{stem}.png", a.line);
                letterbox_file(src, &out.join("images").join(&name), size)?
            }
            None => src.clone(),
        };
        Ok(display_path(&out, &p))
    };

    let pairs = |split: &str, ids: &[String]| -> Result<Vec<PairRecord>> {
        ids.iter()
            .map(|id| {
                Ok(PairRecord {
                    image: image_of(split, id)?,
                    text: by_id[id.as_str()].1.combination.clone(),
                })
            })
            .collect()
    };
    let train = pairs("train", &train_ids)?;
    let val = pairs("val", &val_ids)?;
    let test_images: Vec<String> = test_ids
        .iter()
        .map(|id| image_of("test", id))
        .collect::<Result<_>>()?;
    let val_images: Vec<String> = val.iter().map(|p| p.image.clone()).collect();

    // The reference's eval script runs once per file, seeding before each: a fresh generator
    // for val and for test.
    let items = |split: &str, ids: &[String], images: &[String]| -> Vec<McqItem> {
        let mut rng = PyRandom::new(EVAL_SEED);
        ids.iter()
            .zip(images)
            .map(|(id, image)| {
                let a = by_id[id.as_str()].1;
                // The pool holds every combination and has at least 5 strings (checked above).
                let (options, answer) = question_options(&a.combination, &pool, &mut rng)
                    .expect("pool has at least 5 strings");
                McqItem {
                    id: id.clone(),
                    image: image.clone(),
                    key: KEY.to_string(),
                    options,
                    answer,
                    source: Some(format!("{BENCHMARK} {split} {annotations}:{}", a.line)),
                }
            })
            .collect()
    };
    let mcq_val = items("val", &val_ids, &val_images);
    let mcq_test = items("test", &test_ids, &test_images);

    let mut summary = PrepareSummary::new(BENCHMARK);
    summary.layout = Some(layout.describe());
    summary.skipped = ann.skipped.clone();
    write_outputs(&out, &train, &val, &mcq_val, &mcq_test, &mut summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_column_is_not_a_concept() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(ANNOTATIONS);
        std::fs::write(
            &f,
            "Unnamed: 0,ImageID,Papule,Plaque,Do not consider this image\n\
             0,a.jpg,1,0,0\n1,b.jpg,1,1,1\n2,c.jpg,0,1,0\n",
        )
        .unwrap();
        let ann = read_annotations(&f).unwrap();
        assert_eq!(ann.concepts, vec!["Papule", "Plaque"]);
        let combos: Vec<&str> = ann.rows.iter().map(|a| a.combination.as_str()).collect();
        assert_eq!(combos, vec!["papule", "plaque"]);
        assert_eq!(ann.skipped.len(), 1);
        assert_eq!(ann.skipped[0].source, format!("{ANNOTATIONS}:3"));
    }

    #[test]
    fn missing_flag_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(ANNOTATIONS);
        std::fs::write(&f, ",ImageID,Papule\n0,a.jpg,1\n").unwrap();
        let err = read_annotations(&f).unwrap_err().to_string();
        assert!(err.contains(FLAG_COLUMN), "{err}");
    }

    #[test]
    fn split_sizes_truncate_a_tenth() {
        let ids: Vec<String> = (0..38).map(|i| format!("{i:03}")).collect();
        let (v, t, tr) = split_ids(&ids);
        assert_eq!((v.len(), t.len(), tr.len()), (3, 3, 32));
        let mut all: Vec<String> = v.into_iter().chain(t).chain(tr).collect();
        all.sort();
        assert_eq!(all, ids);
    }

    #[test]
    fn options_hold_truth_once_and_four_distractors() {
        let pool: Vec<String> = (0..30).map(|i| format!("c{i:02}")).collect();
        let mut rng = PyRandom::new(1);
        let (opts, ans) = question_options("c07", &pool, &mut rng).unwrap();
        assert_eq!(opts.len(), 5);
        assert_eq!(opts[ans], "c07");
        assert_eq!(opts.iter().filter(|o| *o == "c07").count(), 1);
        assert!(question_options("c00", &pool[..4], &mut rng).is_none());
    }
}
