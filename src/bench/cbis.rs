//! CBIS-DDSM: ROI crops of mammograms with mass / calcification attributes (METHOD.md, "Image-description
//! pairs and MCQ sets per benchmark", CBIS-DDSM paragraph, reproduced exactly).
//!
//! **Source directory.** `mass_case_description_train_set.csv`, `calc_case_description_train_set.csv`,
//! `mass_case_description_test_set.csv`, `calc_case_description_test_set.csv` and, optionally,
//! `dicom_info.csv`. Required columns: `patient_id`, `abnormality type`, `pathology`,
//! `cropped image file path`, plus `mass shape`, `mass margins` (mass files) or `calc type`,
//! `calc distribution` (calc files). Header names are matched after trimming.
//!
//! **Values.** Lower-cased, `_` -> space, trimmed; an empty value is "missing". Pathology
//! `benign without callback` -> `benign`; pathologies other than benign/malignant and abnormality
//! types other than calcification/mass are *unknown*: the row is left out and listed in
//! `summary.skipped` (`file:line`). A lesion value outside the key's whitelist (e.g. the combined
//! `irregular-architectural distortion`) still goes into the training description, but its question
//! is not asked; that is also listed in `summary.skipped`.
//!
//! **Image of a row.** `cropped image file path` (trimmed: the released CSVs carry a trailing newline
//! inside the quotes) resolved against the source directory:
//! 1. if that file exists and is not DICOM (`.dcm`), it is used;
//! 2. else, when `dicom_info.csv` exists: the crop's SeriesInstanceUID is the name of the directory
//!    holding the file in that path (`<case>/<study uid>/<series uid>/000000.dcm`); the first row of
//!    `dicom_info.csv` (file order) with that `SeriesInstanceUID` and, when the column exists,
//!    `SeriesDescription` = `cropped images` gives `image_path`, resolved against the source directory,
//!    or, if no file is there, against the source directory with the path's first component dropped
//!    (the Kaggle release writes `CBIS-DDSM/jpeg/...`);
//! 3. else, if the DICOM file itself exists, it is used: decoded here to check it (an unreadable file
//!    is an error naming it) and read with [`load_dicom_gray8`] wherever the image is loaded;
//! 4. else the image is missing. All missing images are reported in one error.
//!
//! **Split.** Rows of the two Test CSVs = test. The sorted unique `patient_id`s of the two training
//! CSVs (all rows, including ones later left out) are shuffled with `PyRandom::new(0)`
//! (`random.Random(0).shuffle`); the first `int(0.1 * n)` patients are val, the rest train.
//!
//! **Outputs.** Train description: mass `"{shape} mass shape, {margins} mass margins, mass, {pathology}"`,
//! calcification `"{type} calc type, {distribution} calc distribution, calcification, {pathology}"`,
//! missing values skipped. Train patients -> `train.jsonl`, val patients -> `val.jsonl` and
//! `mcq_val.jsonl`, test rows -> `mcq_test.jsonl`. Rows are walked mass before calc, in file order:
//! val = mass train, calc train (val patients only); test = mass test, calc test.
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

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::bench::letterbox::{letterbox, letterbox_file};
use crate::bench::prepare::{
    display_path, field, write_outputs, CsvTable, PairRecord, PrepareOptions, PrepareSummary,
    Skipped,
};
use crate::bench::pyrandom::PyRandom;
use crate::data::dicom::load_dicom_gray8;
use crate::error::{Error, Result};
use crate::eval::mcq::McqItem;

pub const MASS_TRAIN: &str = "mass_case_description_train_set.csv";
pub const CALC_TRAIN: &str = "calc_case_description_train_set.csv";
pub const MASS_TEST: &str = "mass_case_description_test_set.csv";
pub const CALC_TEST: &str = "calc_case_description_test_set.csv";
pub const DICOM_INFO: &str = "dicom_info.csv";

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

/// One usable ROI row.
struct Roi {
    stem: String,
    file: String,
    row: usize,
    patient: String,
    kind: Kind,
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

/// `dicom_info.csv`: SeriesInstanceUID -> image_path of the first "cropped images" row.
struct DicomInfo {
    by_series: HashMap<String, String>,
}

impl DicomInfo {
    fn read(path: &Path) -> Result<DicomInfo> {
        let t = CsvTable::read(path)?;
        let series = t.col("SeriesInstanceUID")?;
        let image = t.col("image_path")?;
        let desc = t.opt_col("SeriesDescription");
        let mut by_series = HashMap::new();
        for (_, rec) in &t.rows {
            if let Some(d) = desc {
                if field(rec, d).trim().to_lowercase() != "cropped images" {
                    continue;
                }
            }
            by_series
                .entry(field(rec, series).trim().to_string())
                .or_insert_with(|| field(rec, image).trim().to_string());
        }
        Ok(DicomInfo { by_series })
    }
}

/// [`letterbox_file`] for a DICOM crop (8-bit grey after [`load_dicom_gray8`]'s windowing).
fn letterbox_dicom(src: &Path, dst: &Path, size: u32) -> Result<()> {
    let img = image::DynamicImage::ImageLuma8(load_dicom_gray8(src)?);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    letterbox(&img, size).save(dst).map_err(|e| Error::Image {
        path: dst.to_path_buf(),
        reason: format!("cannot write: {e}"),
    })
}

fn is_dicom(p: &Path) -> bool {
    p.extension()
        .map(|e| e.eq_ignore_ascii_case("dcm"))
        .unwrap_or(false)
}

enum Resolved {
    Found(PathBuf),
    Dicom(PathBuf),
    Missing(PathBuf),
}

fn resolve_image(source: &Path, cropped: &str, info: Option<&DicomInfo>) -> Resolved {
    let rel = cropped.trim();
    let direct = source.join(rel);
    if direct.is_file() && !is_dicom(&direct) {
        return Resolved::Found(direct);
    }
    if let Some(info) = info {
        let comps: Vec<&str> = rel.split(['/', '\\']).filter(|c| !c.is_empty()).collect();
        if comps.len() >= 2 {
            if let Some(img) = info.by_series.get(comps[comps.len() - 2]) {
                let cand = source.join(img);
                if cand.is_file() {
                    return Resolved::Found(cand);
                }
                let parts: Vec<&str> = img.split(['/', '\\']).filter(|c| !c.is_empty()).collect();
                if parts.len() > 1 {
                    let cand = source.join(parts[1..].join("/"));
                    if cand.is_file() {
                        return Resolved::Found(cand);
                    }
                }
            }
        }
    }
    if direct.is_file() {
        Resolved::Dicom(direct)
    } else {
        Resolved::Missing(direct)
    }
}

/// Read one case-description CSV into ROIs; unknown values go to `skipped`.
fn read_rois(
    source: &Path,
    name: &str,
    kind: Kind,
    info: Option<&DicomInfo>,
    skipped: &mut Vec<Skipped>,
    missing: &mut Vec<String>,
) -> Result<(Vec<Roi>, Vec<String>)> {
    let t = CsvTable::read(&source.join(name))?;
    let patient = t.col("patient_id")?;
    let abn = t.col("abnormality type")?;
    let path_col = t.col("pathology")?;
    let crop = t.col("cropped image file path")?;
    let keys = kind.lesion_keys();
    let lesion_cols = [t.col(keys[0])?, t.col(keys[1])?];
    let stem = name.trim_end_matches(".csv").to_string();
    let file = t.file_name();
    let mut rois = Vec::new();
    let mut patients = Vec::new();
    for (i, (line, rec)) in t.rows.iter().enumerate() {
        let at = format!("{file}:{line}");
        let pid = field(rec, patient).trim().to_string();
        if !pid.is_empty() {
            patients.push(pid.clone());
        }
        let abnormality = normalize(field(rec, abn));
        if !ABNORMALITY_TYPES.contains(&abnormality.as_str()) {
            skipped.push(Skipped {
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
            skipped.push(Skipped {
                source: at,
                reason: format!("unknown pathology {:?}", field(rec, path_col)),
            });
            continue;
        }
        if pid.is_empty() {
            skipped.push(Skipped {
                source: at,
                reason: "empty patient_id".into(),
            });
            continue;
        }
        let image = match resolve_image(source, field(rec, crop), info) {
            Resolved::Found(p) => p,
            Resolved::Dicom(p) => match load_dicom_gray8(&p) {
                Ok(_) => p,
                Err(Error::Image { path, reason }) => {
                    return Err(Error::Image {
                        path,
                        reason: format!("{at}: {reason}"),
                    })
                }
                Err(e) => return Err(e),
            },
            Resolved::Missing(p) => {
                missing.push(format!("{at}: {}", p.display()));
                PathBuf::new()
            }
        };
        let mut lesion = Vec::new();
        for (k, c) in keys.iter().zip(lesion_cols) {
            let v = normalize(field(rec, c));
            if !v.is_empty() && !whitelist(k).unwrap().contains(&v.as_str()) {
                skipped.push(Skipped {
                    source: at.clone(),
                    reason: format!(
                        "{k} {v:?} not in the whitelist: kept in the description, not asked"
                    ),
                });
            }
            lesion.push((*k, (!v.is_empty()).then_some(v)));
        }
        rois.push(Roi {
            stem: stem.clone(),
            file: file.clone(),
            row: i + 1,
            patient: pid,
            kind,
            abnormality,
            lesion,
            pathology,
            image,
        });
    }
    Ok((rois, patients))
}

/// The val patients: sorted unique training patient ids, `PyRandom::new(0)` shuffle, first
/// `int(0.1 * n)`.
pub fn val_patients(train_patients: &[String]) -> BTreeSet<String> {
    let mut ids: Vec<String> = train_patients
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rng = PyRandom::new(0);
    rng.shuffle(&mut ids);
    let n_val = (0.1 * ids.len() as f64) as usize;
    ids.into_iter().take(n_val).collect()
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
    debug_assert!(roi.kind.lesion_keys().len() == 2);
    items
}

/// Build the CBIS-DDSM pairs and MCQ sets from `source` into `out` (see the module docs).
pub fn prepare(source: &Path, out: &Path, opts: &PrepareOptions) -> Result<PrepareSummary> {
    let mut summary = PrepareSummary::new("cbis");
    let info_path = source.join(DICOM_INFO);
    let info = if info_path.is_file() {
        Some(DicomInfo::read(&info_path)?)
    } else {
        None
    };
    let mut missing = Vec::new();
    let mut skipped = Vec::new();
    let mut train_rois = Vec::new();
    let mut train_patients = Vec::new();
    for (name, kind) in [(MASS_TRAIN, Kind::Mass), (CALC_TRAIN, Kind::Calc)] {
        let (r, p) = read_rois(
            source,
            name,
            kind,
            info.as_ref(),
            &mut skipped,
            &mut missing,
        )?;
        train_rois.extend(r);
        train_patients.extend(p);
    }
    let mut test_rois = Vec::new();
    for (name, kind) in [(MASS_TEST, Kind::Mass), (CALC_TEST, Kind::Calc)] {
        let (r, _) = read_rois(
            source,
            name,
            kind,
            info.as_ref(),
            &mut skipped,
            &mut missing,
        )?;
        test_rois.extend(r);
    }
    if !missing.is_empty() {
        return Err(Error::Config {
            path: source.to_path_buf(),
            key: "cropped image file path".into(),
            reason: format!(
                "{} ROI image(s) not found (resolution: path relative to the source dir, then \
                 dicom_info.csv by SeriesInstanceUID):\n  {}",
                missing.len(),
                missing.join("\n  ")
            ),
        });
    }
    let val_ids = val_patients(&train_patients);
    let abs_source = std::path::absolute(source).map_err(|e| Error::io(source, e))?;
    let image_of = |roi: &Roi| -> Result<String> {
        match opts.image_cache {
            Some(n) => {
                let dst = out
                    .join("images")
                    .join(format!("{}-{}.png", roi.stem, roi.row));
                if is_dicom(&roi.image) {
                    letterbox_dicom(&roi.image, &dst, n)?;
                } else {
                    letterbox_file(&roi.image, &dst, n)?;
                }
                Ok(display_path(out, &dst))
            }
            None => {
                let rel = roi.image.strip_prefix(source).unwrap_or(&roi.image);
                Ok(abs_source.join(rel).to_string_lossy().into_owned())
            }
        }
    };
    let mut rng = PyRandom::new(1);
    let (mut train, mut val, mut mcq_val, mut mcq_test) = (vec![], vec![], vec![], vec![]);
    for roi in &train_rois {
        let image = image_of(roi)?;
        let pair = PairRecord {
            image: image.clone(),
            text: roi.description(),
        };
        if val_ids.contains(&roi.patient) {
            val.push(pair);
            mcq_val.extend(roi_items(roi, "val", &image, &mut rng));
        } else {
            train.push(pair);
        }
    }
    // The reference's eval script runs once per file and seeds before each: test starts afresh.
    let mut rng = PyRandom::new(1);
    for roi in &test_rois {
        let image = image_of(roi)?;
        mcq_test.extend(roi_items(roi, "test", &image, &mut rng));
    }
    summary.skipped = skipped;
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

    #[test]
    fn val_patients_take_ten_percent() {
        let ids: Vec<String> = (0..25).map(|i| format!("P_{i:05}")).collect();
        let v = val_patients(&ids);
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|p| ids.contains(p)));
        assert_eq!(val_patients(&ids[..9]).len(), 0);
    }
}
