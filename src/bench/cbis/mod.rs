//! CBIS-DDSM: ROI crops of mammograms with mass / calcification attributes (METHOD.md, "Image-description
//! pairs and MCQ sets per benchmark", CBIS-DDSM paragraph, and the reference's
//! `preprocess_att_dataset.py` / `eval.py`, reproduced exactly).
//!
//! **Source directory.** `mass_case_description_train_set.csv`, `calc_case_description_train_set.csv`,
//! `mass_case_description_test_set.csv`, `calc_case_description_test_set.csv` and (optionally)
//! `dicom_info.csv`, in `SOURCE/csv/` (the Kaggle layout) or in `SOURCE/`. Required columns:
//! `patient_id`, `abnormality type`, `pathology`, `cropped image file path`, plus `mass shape`,
//! `mass margins` (mass files) or `calc type`, `calc distribution` (calc files). Header names are
//! matched after trimming. How crops are found, and the val split: [`crops`].
//!
//! **Values.** Lower-cased, `_` -> space, trimmed; a cell pandas reads as NaN (empty, `N/A`, ...:
//! [`is_pandas_na`]) is "missing". Pathology `benign without callback` -> `benign`. Pathologies
//! other than benign/malignant and abnormality types other than calcification/mass are *unknown*:
//! the row is left out and listed in `summary.skipped` (`file:line`); the reference would keep it
//! with a truth outside the options, scored wrong (never happens on the released files). A lesion
//! value outside the key's whitelist (e.g. `irregular-architectural distortion`) still goes into the
//! training description, but its question is not asked; that is also listed in `summary.skipped`.
//!
//! **Rows.** A row's case key must carry its file's prefix (`Mass-Training`, `Calc-Test`, ...) and a
//! training row's `patient_id` must be one of the patients the keys give (errors otherwise, as in
//! the reference). Rows are walked mass before calc, in file order: train/val = mass train, calc
//! train; test = mass test, calc test.
//!
//! **Outputs.** Train description: mass `"{shape} mass shape, {margins} mass margins, mass, {pathology}"`,
//! calcification `"{type} calc type, {distribution} calc distribution, calcification, {pathology}"`,
//! missing values skipped. Train patients -> `train.jsonl` (once: the reference's x3 repeat is the
//! training config's `repeat`), val patients -> `val.jsonl` and `mcq_val.jsonl`, test rows ->
//! `mcq_test.jsonl`.
//!
//! **Questions per ROI**, in this order: `mass shape`, `mass margins` (mass) or `calc type`,
//! `calc distribution` (calc), each only when the value is in the whitelist; then `abnormality type`
//! (options `[calcification, mass]`) and `pathology` (`[benign, malignant]`), fixed order. Lesion
//! keys: `options = [truth] + rng.sample(whitelist without truth, 4)`, then `rng.shuffle(options)`,
//! with an eval generator `PyRandom::new(1)` seeded afresh for each file (val, then test), as the
//! reference's eval script runs once per file, consumed item by item in file order.
//! Item id: `{csv stem}-{row}-{key with _ for spaces}`, row = 1-based data row of the CSV.
//!
//! **Images.** With `opts.image_cache = Some(n)` each used ROI is letterboxed to n×n
//! ([`crate::bench::letterbox`], METHOD uses 560) and written to `OUT/images/{csv stem}-{row}.png`;
//! outputs point there (relative to OUT). Without it, outputs hold the absolute source path.

pub mod crops;

use std::path::{Path, PathBuf};

use crate::bench::letterbox::letterbox_file;
use crate::bench::prepare::{
    display_path, field, is_pandas_na, write_outputs, CsvTable, PairRecord, PrepareOptions,
    PrepareSummary, Skipped,
};
use crate::bench::pyrandom::PyRandom;
use crate::data::dicom::load_dicom_gray8;
use crate::error::{Error, Result};
use crate::eval::mcq::McqItem;
use crops::DicomInfo;

pub const MASS_TRAIN: &str = "mass_case_description_train_set.csv";
pub const CALC_TRAIN: &str = "calc_case_description_train_set.csv";
pub const MASS_TEST: &str = "mass_case_description_test_set.csv";
pub const CALC_TEST: &str = "calc_case_description_test_set.csv";
pub const DICOM_INFO: &str = crops::DICOM_INFO;
/// Where the Kaggle release keeps the label files (`SOURCE/csv/`); otherwise they are in SOURCE.
pub const CSV_DIR: &str = "csv";

/// Whitelists of the lesion keys (METHOD.md order).
pub const MASS_SHAPES: [&str; 8] = [
    "architectural distortion",
    "asymmetric breast tissue",
    "focal asymmetric density",
    "irregular",
    "lobulated",
    "lymph node",
    "oval",
    "round",
];
pub const MASS_MARGINS: [&str; 5] = [
    "circumscribed",
    "ill defined",
    "microlobulated",
    "obscured",
    "spiculated",
];
pub const CALC_TYPES: [&str; 9] = [
    "amorphous",
    "coarse",
    "eggshell",
    "fine linear branching",
    "lucent center",
    "pleomorphic",
    "punctate",
    "round and regular",
    "vascular",
];
pub const CALC_DISTRIBUTIONS: [&str; 5] = [
    "clustered",
    "diffusely scattered",
    "linear",
    "regional",
    "segmental",
];
pub const ABNORMALITY_TYPES: [&str; 2] = ["calcification", "mass"];
pub const PATHOLOGIES: [&str; 2] = ["benign", "malignant"];

/// Number of distractors drawn for a lesion key.
pub const DISTRACTORS: usize = 4;

/// The whitelist of a lesion key, `None` for other keys.
pub fn whitelist(key: &str) -> Option<&'static [&'static str]> {
    match key {
        "mass shape" => Some(&MASS_SHAPES),
        "mass margins" => Some(&MASS_MARGINS),
        "calc type" => Some(&CALC_TYPES),
        "calc distribution" => Some(&CALC_DISTRIBUTIONS),
        _ => None,
    }
}

/// Lower-case, `_` -> space, trim.
pub fn normalize(value: &str) -> String {
    value.to_lowercase().replace('_', " ").trim().to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mass,
    Calc,
}

impl Kind {
    fn lesion_keys(self) -> [&'static str; 2] {
        match self {
            Kind::Mass => ["mass shape", "mass margins"],
            Kind::Calc => ["calc type", "calc distribution"],
        }
    }
}

/// The four case-description files: name, kind, case-key prefix, whether it is a test set.
const FILES: [(&str, Kind, &str, bool); 4] = [
    (MASS_TRAIN, Kind::Mass, "Mass-Training", false),
    (CALC_TRAIN, Kind::Calc, "Calc-Training", false),
    (MASS_TEST, Kind::Mass, "Mass-Test", true),
    (CALC_TEST, Kind::Calc, "Calc-Test", true),
];

/// One usable ROI row.
struct Roi {
    stem: String,
    file: String,
    row: usize,
    at: String,
    patient: String,
    abnormality: String,
    /// `(key, value)` for the two lesion keys, `None` when missing.
    lesion: Vec<(&'static str, Option<String>)>,
    pathology: String,
    image: PathBuf,
}

impl Roi {
    fn description(&self) -> String {
        let mut parts: Vec<String> = self
            .lesion
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{v} {k}")))
            .collect();
        parts.push(self.abnormality.clone());
        parts.push(self.pathology.clone());
        parts.join(", ")
    }
}

fn is_dicom(p: &Path) -> bool {
    p.extension()
        .map(|e| e.eq_ignore_ascii_case("dcm"))
        .unwrap_or(false)
}

/// What reading the four files gathers besides the ROIs.
#[derive(Default)]
struct Gathered {
    skipped: Vec<Skipped>,
    missing: Vec<String>,
    /// Case keys of the training rows (for the val split without `dicom_info.csv`).
    training_keys: Vec<String>,
}

/// Read one case-description CSV into ROIs (module docs for the rules).
fn read_rois(
    source: &Path,
    labels: &Path,
    (name, kind, prefix, _): (&str, Kind, &str, bool),
    info: Option<&DicomInfo>,
    g: &mut Gathered,
) -> Result<Vec<Roi>> {
    let t = CsvTable::read(&labels.join(name))?;
    let patient = t.col("patient_id")?;
    let abn = t.col("abnormality type")?;
    let path_col = t.col("pathology")?;
    let crop = t.col("cropped image file path")?;
    let keys = kind.lesion_keys();
    let lesion_cols = [t.col(keys[0])?, t.col(keys[1])?];
    let stem = name.trim_end_matches(".csv").to_string();
    let file = t.file_name();
    let mut rois = Vec::new();
    for (i, (line, rec)) in t.rows.iter().enumerate() {
        let at = format!("{file}:{line}");
        let key = crops::case_key(field(rec, crop));
        let image = match info {
            Some(info) => match info.crops.get(key) {
                Some((p, _)) => p.clone(),
                None => {
                    g.skipped.push(Skipped {
                        source: at,
                        reason: format!(
                            "no `{}` row with PatientID {key:?} in {}",
                            crops::CROPPED,
                            info.path.display()
                        ),
                    });
                    continue;
                }
            },
            None => source.join(field(rec, crop).trim()),
        };
        if !key.starts_with(&format!("{prefix}_")) {
            return Err(Error::Config {
                path: t.path.clone(),
                key: "cropped image file path".into(),
                reason: format!("line {line}: case {key:?} does not start with `{prefix}_`"),
            });
        }
        if prefix.ends_with("Training") {
            g.training_keys.push(key.to_string());
        }
        let abnormality = normalize(field(rec, abn));
        if !ABNORMALITY_TYPES.contains(&abnormality.as_str()) {
            g.skipped.push(Skipped {
                source: at,
                reason: format!("unknown abnormality type {:?}", field(rec, abn)),
            });
            continue;
        }
        let mut pathology = normalize(field(rec, path_col));
        if pathology == "benign without callback" {
            pathology = "benign".into();
        }
        if !PATHOLOGIES.contains(&pathology.as_str()) {
            g.skipped.push(Skipped {
                source: at,
                reason: format!("unknown pathology {:?}", field(rec, path_col)),
            });
            continue;
        }
        if !image.is_file() {
            g.missing.push(format!("{at}: {}", image.display()));
        }
        let mut lesion = Vec::new();
        for (k, c) in keys.iter().zip(lesion_cols) {
            let raw = field(rec, c);
            let v = (!is_pandas_na(raw)).then(|| normalize(raw));
            if let Some(v) = &v {
                if !whitelist(k).unwrap().contains(&v.as_str()) {
                    g.skipped.push(Skipped {
                        source: at.clone(),
                        reason: format!(
                            "{k} {v:?} not in the whitelist: kept in the description, not asked"
                        ),
                    });
                }
            }
            lesion.push((*k, v));
        }
        rois.push(Roi {
            stem: stem.clone(),
            file: file.clone(),
            row: i + 1,
            at,
            patient: field(rec, patient).trim().to_string(),
            abnormality,
            lesion,
            pathology,
            image,
        });
    }
    Ok(rois)
}

fn roi_items(roi: &Roi, split: &str, image: &str, rng: &mut PyRandom) -> Vec<McqItem> {
    let mut items = Vec::new();
    let source = Some(format!(
        "cbis-ddsm {split} {} row {} patient {}",
        roi.file, roi.row, roi.patient
    ));
    let mut push = |key: &str, options: Vec<String>, truth: &str| {
        let answer = options
            .iter()
            .position(|o| o == truth)
            .expect("truth among options");
        items.push(McqItem {
            id: format!("{}-{}-{}", roi.stem, roi.row, key.replace(' ', "_")),
            image: image.to_string(),
            key: key.to_string(),
            options,
            answer,
            source: source.clone(),
        });
    };
    for (key, value) in &roi.lesion {
        let Some(v) = value else { continue };
        let list = whitelist(key).unwrap();
        if !list.contains(&v.as_str()) {
            continue;
        }
        let others: Vec<String> = list
            .iter()
            .filter(|o| *o != v)
            .map(|o| o.to_string())
            .collect();
        let mut options = vec![v.clone()];
        options.extend(
            rng.sample(&others, DISTRACTORS)
                .expect("whitelists have 5+ values"),
        );
        rng.shuffle(&mut options);
        push(key, options, v);
    }
    let fixed = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    push(
        "abnormality type",
        fixed(&ABNORMALITY_TYPES),
        &roi.abnormality,
    );
    push("pathology", fixed(&PATHOLOGIES), &roi.pathology);
    items
}

/// The directory holding the label files: `SOURCE/csv/` when it has them (Kaggle), else SOURCE.
pub fn label_dir(source: &Path) -> PathBuf {
    let kaggle = source.join(CSV_DIR);
    if kaggle.join(MASS_TRAIN).is_file() {
        kaggle
    } else {
        source.to_path_buf()
    }
}

/// Build the CBIS-DDSM pairs and MCQ sets from `source` into `out` (see the module docs).
pub fn prepare(source: &Path, out: &Path, opts: &PrepareOptions) -> Result<PrepareSummary> {
    let mut summary = PrepareSummary::new("cbis");
    let labels = label_dir(source);
    let info_path = labels.join(crops::DICOM_INFO);
    let info = if info_path.is_file() {
        Some(DicomInfo::read(&info_path, source)?)
    } else {
        None
    };
    let mut g = Gathered::default();
    let mut rois = Vec::new();
    for spec in FILES {
        rois.push(read_rois(source, &labels, spec, info.as_ref(), &mut g)?);
    }
    if !g.missing.is_empty() {
        return Err(Error::Config {
            path: source.to_path_buf(),
            key: "cropped image file path".into(),
            reason: format!(
                "{} ROI image(s) not found (resolution: dicom_info.csv `image_path` when that file \
                 exists, else `cropped image file path`, relative to the source dir):\n  {}",
                g.missing.len(),
                g.missing.join("\n  ")
            ),
        });
    }
    let (val_ids, train_ids) = match &info {
        Some(info) => crops::val_patients(info.training_keys(), &info.path)?,
        None => crops::val_patients(g.training_keys.iter().map(String::as_str), &labels)?,
    };
    let [mass_train, calc_train, mass_test, calc_test] = rois.try_into().ok().expect("four files");
    let abs_source = std::path::absolute(source).map_err(|e| Error::io(source, e))?;
    let image_of = |roi: &Roi| -> Result<String> {
        match opts.image_cache {
            Some(n) => {
                let dst = out
                    .join("images")
                    .join(format!("{}-{}.png", roi.stem, roi.row));
                letterbox_file(&roi.image, &dst, n)?;
                Ok(display_path(out, &dst))
            }
            None => {
                if is_dicom(&roi.image) {
                    // Decode now, so an unreadable crop fails here, named, not mid-training.
                    load_dicom_gray8(&roi.image).map_err(|e| match e {
                        Error::Image { path, reason } => Error::Image {
                            path,
                            reason: format!("{}: {reason}", roi.at),
                        },
                        e => e,
                    })?;
                }
                let rel = roi.image.strip_prefix(source).unwrap_or(&roi.image);
                Ok(abs_source.join(rel).to_string_lossy().into_owned())
            }
        }
    };
    let mut rng = PyRandom::new(1);
    let (mut train, mut val, mut mcq_val, mut mcq_test) = (vec![], vec![], vec![], vec![]);
    for roi in mass_train.iter().chain(&calc_train) {
        let image = image_of(roi)?;
        let pair = PairRecord {
            image: image.clone(),
            text: roi.description(),
        };
        if val_ids.contains(&roi.patient) {
            val.push(pair);
            mcq_val.extend(roi_items(roi, "val", &image, &mut rng));
        } else if train_ids.contains(&roi.patient) {
            train.push(pair);
        } else {
            return Err(Error::Config {
                path: labels.join(&roi.file),
                key: "patient_id".into(),
                reason: format!(
                    "{}: patient {:?} is not the patient of any training case key",
                    roi.at, roi.patient
                ),
            });
        }
    }
    // The reference's eval script runs once per file and seeds before each: test starts afresh.
    let mut rng = PyRandom::new(1);
    for roi in mass_test.iter().chain(&calc_test) {
        let image = image_of(roi)?;
        mcq_test.extend(roi_items(roi, "test", &image, &mut rng));
    }
    summary.skipped = g.skipped;
    write_outputs(out, &train, &val, &mcq_val, &mcq_test, &mut summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_values() {
        assert_eq!(normalize(" ILL_DEFINED "), "ill defined");
        assert_eq!(normalize("FINE_LINEAR_BRANCHING"), "fine linear branching");
    }

    #[test]
    fn whitelists_have_enough_values_for_four_distractors() {
        for key in [
            "mass shape",
            "mass margins",
            "calc type",
            "calc distribution",
        ] {
            assert!(whitelist(key).unwrap().len() > DISTRACTORS);
        }
        assert!(whitelist("pathology").is_none());
    }
}
