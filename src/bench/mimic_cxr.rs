//! MIMIC-CXR-JPG: chest X-ray studies with CheXpert labels. The reference has no pipeline for it;
//! lvlm-ift defines this one (METHOD.md, MIMIC-CXR paragraph).
//!
//! **Source directory.** `mimic-cxr-2.0.0-chexpert.csv` (`subject_id`, `study_id` and the 14
//! CheXpert columns, values `1.0` / `0.0` / `-1.0` / empty), `mimic-cxr-2.0.0-split.csv`
//! (`dicom_id`, `study_id`, `subject_id`, `split` in `train` / `validate` / `test`),
//! `mimic-cxr-2.0.0-metadata.csv` (`dicom_id`, `study_id`, ..., `ViewPosition`) and the images at
//! `files/p{first 2 digits of subject}/p{subject}/s{study}/{dicom_id}.jpg`.
//!
//! **One unit per study** (a row of the CheXpert file, walked in file order):
//! - split: the `split` of the study's first row in the split file (`validate` -> val); a study that is
//!   not in the split file, or has another split value, is left out (listed in `summary.skipped`);
//! - image: among the study's rows of the metadata file, in file order, the first with `ViewPosition`
//!   `PA`, else the first `AP`; studies without a frontal image are left out (reason listed);
//! - labels: empty or `0` = negative, `1` = positive, `-1` = uncertain; any other value leaves the
//!   study out (reason listed, never mapped);
//! - description: the lower-cased names of the positive findings in CheXpert column order
//!   ([`FINDINGS`]; `No Finding` is not itself a finding), joined with ", "; `"no finding"` when
//!   there is none;
//! - uncertain labels follow [`Uncertain`] (default [`Uncertain::ExcludeFromQuestions`]: the study keeps
//!   its pair, described by its positives only, but gets no `findings` question; it is listed in
//!   `summary.skipped` with reason "uncertain ...: pair kept, no question" — or, with yes/no
//!   questions on, "uncertain ...: pair kept, no findings question, no yes/no question for those").
//!
//! **Outputs.** train studies -> `train.jsonl`; validate studies -> `val.jsonl` and `mcq_val.jsonl`;
//! test studies -> `mcq_test.jsonl`.
//!
//! **Questions.** One per val/test study, key `findings`: `options = [truth] +
//! rng.sample(pool without truth, min(4, len))`, then `rng.shuffle(options)`, with one eval generator
//! `PyRandom::new(1)` seeded afresh for each file (val, test), consumed in CheXpert file order. The
//! pool is the sorted list of the distinct descriptions of all usable studies of all splits (those with
//! a split and a frontal image, including ones without a question). Item id `mimic-cxr-s{study}`.
//!
//! **Yes/no questions** (optional, [`MimicOptions::yes_no`], off by default). Every usable val/test
//! study also gets, right after its `findings` item (if it has one), one item per finding in
//! [`FINDINGS`] order: key `presence of {finding lower-cased}` (asked "What is the presence of
//! pleural effusion?"), options `["yes", "no"]` in that order (no shuffle, no random draw, so the
//! `findings` items are the same with or without them), answer `yes` for a positive label, `no` for
//! a negative one (empty or `0`). An uncertain label is `no` under [`Uncertain::Negative`], `yes` under
//! [`Uncertain::Positive`], and under [`Uncertain::ExcludeFromQuestions`] gets no yes/no item for
//! *that finding only*: the study's other findings are still asked (unlike the `findings` question,
//! which is dropped for the whole study). Item id `mimic-cxr-s{study}-{finding lower-cased, spaces
//! -> _}`, e.g. `mimic-cxr-s53186264-pleural_effusion`; same image as the study's `findings` item.
//!
//! **Images.** With `opts.image_cache = Some(n)`, letterboxed n×n copies go to
//! `OUT/images/{dicom_id}.png` (paths relative to OUT); else outputs hold absolute source paths.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::bench::letterbox::letterbox_file;
use crate::bench::prepare::{
    display_path, field, write_outputs, CsvTable, PairRecord, PrepareOptions, PrepareSummary,
    Skipped,
};
use crate::bench::pyrandom::PyRandom;
use crate::error::{Error, Result};
use crate::eval::mcq::McqItem;

pub const CHEXPERT: &str = "mimic-cxr-2.0.0-chexpert.csv";
pub const SPLIT: &str = "mimic-cxr-2.0.0-split.csv";
pub const METADATA: &str = "mimic-cxr-2.0.0-metadata.csv";

/// The 14 CheXpert columns in the released file's order.
pub const CHEXPERT_COLUMNS: [&str; 14] = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
];

/// The columns that are findings (all but `No Finding`), in column order.
pub const FINDINGS: [&str; 13] = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
];

pub const NO_FINDING: &str = "no finding";
pub const KEY: &str = "findings";
pub const DISTRACTORS: usize = 4;
/// Options of a yes/no item, in the order shown.
pub const YES_NO: [&str; 2] = ["yes", "no"];

/// The key of the yes/no item about `finding` (a [`FINDINGS`] name): `presence of {lower-cased}`.
pub fn yes_no_key(finding: &str) -> String {
    format!("presence of {}", finding.to_lowercase())
}

/// What an uncertain (`-1.0`) label means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Uncertain {
    /// Description from positives only; the study gets no `findings` question, and no yes/no
    /// question about the uncertain finding(s) (default).
    #[default]
    ExcludeFromQuestions,
    /// Uncertain = negative; the study is asked like any other.
    Negative,
    /// Uncertain = positive; the study is asked like any other.
    Positive,
}

/// MIMIC-specific settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct MimicOptions {
    pub uncertain: Uncertain,
    /// Also ask one yes/no question per finding of each val/test study (module docs).
    pub yes_no: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Label {
    Neg,
    Pos,
    Unc,
}

fn parse_label(s: &str) -> Option<Label> {
    let s = s.trim();
    if s.is_empty() {
        return Some(Label::Neg);
    }
    let v = s.parse::<f64>().ok()?;
    if v == 1.0 {
        Some(Label::Pos)
    } else if v == 0.0 {
        Some(Label::Neg)
    } else if v == -1.0 {
        Some(Label::Unc)
    } else {
        None
    }
}

struct Study {
    subject: String,
    study: String,
    split: &'static str,
    dicom: String,
    image: PathBuf,
    description: String,
    asked: bool,
    /// The [`FINDINGS`] labels, in that order.
    findings: Vec<Label>,
}

/// [`prepare_with`] with the default [`MimicOptions`].
pub fn prepare(source: &Path, out: &Path, opts: &PrepareOptions) -> Result<PrepareSummary> {
    prepare_with(source, out, opts, &MimicOptions::default())
}

/// Build the MIMIC-CXR pairs and MCQ sets from `source` into `out` (see the module docs).
pub fn prepare_with(
    source: &Path,
    out: &Path,
    opts: &PrepareOptions,
    mimic: &MimicOptions,
) -> Result<PrepareSummary> {
    let mut summary = PrepareSummary::new("mimic-cxr");
    let chex = CsvTable::read(&source.join(CHEXPERT))?;
    let split_t = CsvTable::read(&source.join(SPLIT))?;
    let meta = CsvTable::read(&source.join(METADATA))?;

    let (s_study, s_split) = (split_t.col("study_id")?, split_t.col("split")?);
    split_t.col("dicom_id")?;
    let mut split_of: HashMap<String, String> = HashMap::new();
    for (_, rec) in &split_t.rows {
        split_of
            .entry(field(rec, s_study).trim().to_string())
            .or_insert_with(|| field(rec, s_split).trim().to_string());
    }
    let (m_dicom, m_study, m_view) = (
        meta.col("dicom_id")?,
        meta.col("study_id")?,
        meta.col("ViewPosition")?,
    );
    let mut views: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (_, rec) in &meta.rows {
        views
            .entry(field(rec, m_study).trim().to_string())
            .or_default()
            .push((
                field(rec, m_dicom).trim().to_string(),
                field(rec, m_view).trim().to_uppercase(),
            ));
    }

    let (c_subject, c_study) = (chex.col("subject_id")?, chex.col("study_id")?);
    let label_cols = CHEXPERT_COLUMNS
        .iter()
        .map(|c| chex.col(c))
        .collect::<Result<Vec<_>>>()?;
    let file = chex.file_name();
    let mut skipped = Vec::new();
    let mut missing = Vec::new();
    let mut studies = Vec::new();
    'rows: for (line, rec) in &chex.rows {
        let at = format!("{file}:{line}");
        let subject = field(rec, c_subject).trim().to_string();
        let study = field(rec, c_study).trim().to_string();
        let split = match split_of.get(&study).map(String::as_str) {
            Some("train") => "train",
            Some("validate") => "val",
            Some("test") => "test",
            Some(other) => {
                skipped.push(Skipped {
                    source: at,
                    reason: format!("study s{study}: unknown split {other:?}"),
                });
                continue;
            }
            None => {
                skipped.push(Skipped {
                    source: at,
                    reason: format!("study s{study} is not in {SPLIT}"),
                });
                continue;
            }
        };
        let study_views = views.get(&study).map(Vec::as_slice).unwrap_or(&[]);
        let frontal = study_views
            .iter()
            .find(|(_, v)| v == "PA")
            .or_else(|| study_views.iter().find(|(_, v)| v == "AP"));
        let Some((dicom, _)) = frontal else {
            let seen: Vec<&str> = study_views.iter().map(|(_, v)| v.as_str()).collect();
            skipped.push(Skipped {
                source: at,
                reason: format!(
                    "study s{study}: no frontal (PA/AP) image (views: [{}])",
                    seen.join(", ")
                ),
            });
            continue;
        };
        let mut labels = Vec::with_capacity(CHEXPERT_COLUMNS.len());
        for (name, &c) in CHEXPERT_COLUMNS.iter().zip(&label_cols) {
            match parse_label(field(rec, c)) {
                Some(l) => labels.push((*name, l)),
                None => {
                    skipped.push(Skipped {
                        source: at,
                        reason: format!(
                            "study s{study}: unknown value {:?} in column {name}",
                            field(rec, c)
                        ),
                    });
                    continue 'rows;
                }
            }
        }
        let uncertain: Vec<&str> = labels
            .iter()
            .filter(|(_, l)| *l == Label::Unc)
            .map(|(n, _)| *n)
            .collect();
        let positive = |l: Label| {
            l == Label::Pos || (l == Label::Unc && mimic.uncertain == Uncertain::Positive)
        };
        let found: Vec<String> = labels
            .iter()
            .filter(|(n, l)| FINDINGS.contains(n) && positive(*l))
            .map(|(n, _)| n.to_lowercase())
            .collect();
        let description = if found.is_empty() {
            NO_FINDING.to_string()
        } else {
            found.join(", ")
        };
        let excluded = mimic.uncertain == Uncertain::ExcludeFromQuestions && !uncertain.is_empty();
        let asked = split != "train" && !excluded;
        if split != "train" && !asked {
            let what = if mimic.yes_no {
                "no findings question, no yes/no question for those"
            } else {
                "no question"
            };
            skipped.push(Skipped {
                source: at.clone(),
                reason: format!(
                    "study s{study}: uncertain {}: pair kept, {what}",
                    uncertain.join(", ")
                ),
            });
        }
        let prefix: String = subject.chars().take(2).collect();
        let image = source
            .join("files")
            .join(format!("p{prefix}"))
            .join(format!("p{subject}"))
            .join(format!("s{study}"))
            .join(format!("{dicom}.jpg"));
        if !image.is_file() {
            missing.push(format!("{at}: {}", image.display()));
        }
        studies.push(Study {
            subject,
            study,
            split,
            dicom: dicom.clone(),
            image,
            description,
            asked,
            findings: labels
                .iter()
                .filter(|(n, _)| FINDINGS.contains(n))
                .map(|(_, l)| *l)
                .collect(),
        });
    }
    if !missing.is_empty() {
        return Err(Error::Config {
            path: source.to_path_buf(),
            key: "files/".into(),
            reason: format!(
                "{} study image(s) not found:\n  {}",
                missing.len(),
                missing.join("\n  ")
            ),
        });
    }

    let pool: Vec<String> = studies
        .iter()
        .map(|s| s.description.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let abs_source = std::path::absolute(source).map_err(|e| Error::io(source, e))?;
    let image_of = |s: &Study| -> Result<String> {
        match opts.image_cache {
            Some(n) => {
                let dst = out.join("images").join(format!("{}.png", s.dicom));
                letterbox_file(&s.image, &dst, n)?;
                Ok(display_path(out, &dst))
            }
            None => {
                let rel = s.image.strip_prefix(source).unwrap_or(&s.image);
                Ok(abs_source.join(rel).to_string_lossy().into_owned())
            }
        }
    };
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut images = HashMap::new();
    for s in &studies {
        let image = image_of(s)?;
        let pair = PairRecord {
            image: image.clone(),
            text: s.description.clone(),
        };
        match s.split {
            "train" => train.push(pair),
            "val" => val.push(pair),
            _ => {}
        }
        images.insert(s.study.clone(), image);
    }
    // A fresh generator per file (val, test), as the reference evaluates each file in its own run.
    let items = |split: &str| -> Vec<McqItem> {
        let mut rng = PyRandom::new(1);
        let mut out = Vec::new();
        for s in studies.iter().filter(|s| s.split == split) {
            let source = format!(
                "mimic-cxr {split} subject p{} study s{} dicom {}",
                s.subject, s.study, s.dicom
            );
            if s.asked {
                out.push(findings_item(
                    s,
                    &pool,
                    &mut rng,
                    &images[&s.study],
                    &source,
                ));
            }
            if mimic.yes_no {
                out.extend(yes_no_items(s, mimic.uncertain, &images[&s.study], &source));
            }
        }
        out
    };
    let mcq_val = items("val");
    let mcq_test = items("test");
    summary.skipped = skipped;
    write_outputs(out, &train, &val, &mcq_val, &mcq_test, &mut summary)?;
    Ok(summary)
}

/// The study's `findings` item: truth + distractors from `pool`, shuffled with `rng`.
fn findings_item(
    s: &Study,
    pool: &[String],
    rng: &mut PyRandom,
    image: &str,
    source: &str,
) -> McqItem {
    let others: Vec<String> = pool
        .iter()
        .filter(|p| **p != s.description)
        .cloned()
        .collect();
    let k = DISTRACTORS.min(others.len());
    let mut options = vec![s.description.clone()];
    options.extend(rng.sample(&others, k).expect("k <= len"));
    rng.shuffle(&mut options);
    let answer = options.iter().position(|o| *o == s.description).unwrap();
    McqItem {
        id: format!("mimic-cxr-s{}", s.study),
        image: image.to_string(),
        key: KEY.to_string(),
        options,
        answer,
        source: Some(source.to_string()),
    }
}

/// The study's yes/no items, one per finding in [`FINDINGS`] order (module docs); an uncertain
/// label under [`Uncertain::ExcludeFromQuestions`] skips that finding only.
fn yes_no_items(s: &Study, uncertain: Uncertain, image: &str, source: &str) -> Vec<McqItem> {
    let mut out = Vec::new();
    for (finding, &label) in FINDINGS.iter().zip(&s.findings) {
        let yes = match (label, uncertain) {
            (Label::Pos, _) | (Label::Unc, Uncertain::Positive) => true,
            (Label::Neg, _) | (Label::Unc, Uncertain::Negative) => false,
            (Label::Unc, Uncertain::ExcludeFromQuestions) => continue,
        };
        let name = finding.to_lowercase();
        out.push(McqItem {
            id: format!("mimic-cxr-s{}-{}", s.study, name.replace(' ', "_")),
            image: image.to_string(),
            key: yes_no_key(finding),
            options: YES_NO.iter().map(|o| o.to_string()).collect(),
            answer: if yes { 0 } else { 1 },
            source: Some(format!("{source} finding {finding}")),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels() {
        assert_eq!(parse_label(""), Some(Label::Neg));
        assert_eq!(parse_label("0.0"), Some(Label::Neg));
        assert_eq!(parse_label("1.0"), Some(Label::Pos));
        assert_eq!(parse_label("-1.0"), Some(Label::Unc));
        assert_eq!(parse_label("2.0"), None);
        assert_eq!(parse_label("yes"), None);
    }

    #[test]
    fn findings_are_the_columns_without_no_finding() {
        let cols: Vec<&str> = CHEXPERT_COLUMNS
            .iter()
            .copied()
            .filter(|c| *c != "No Finding")
            .collect();
        assert_eq!(cols, FINDINGS);
    }
}
