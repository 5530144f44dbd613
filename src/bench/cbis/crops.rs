//! Where CBIS-DDSM's cropped-ROI images are, and which training patients are val.
//!
//! A row of a case-description CSV names its crop by `cropped image file path`, whose first
//! component is the *case key* (`Mass-Training_P_00001_LEFT_CC_1`: set, patient, side, view,
//! abnormality id). Two source layouts:
//!
//! * **With `dicom_info.csv`** (the Kaggle release, the reference's setting): the rows with
//!   `SeriesDescription` = `cropped images` map their `PatientID` (which is the case key) to
//!   `image_path` (a JPEG, `CBIS-DDSM/jpeg/<series uid>/1-N.jpg`). The path is resolved against the
//!   source directory with `CBIS-DDSM/` removed, as the reference does, or as written. A case key
//!   with two such rows is an error (the reference refuses it too). A CSV row whose case key has no
//!   entry is left out and reported (the reference drops it silently).
//! * **Without it** (the TCIA DICOM tree, or crops already converted in place): the crop is the file
//!   at `cropped image file path` under the source directory; a `.dcm` file is decoded with
//!   [`crate::data::dicom::load_dicom_gray8`].
//!
//! **Val patients** (the reference's rule): the case keys of the training sets (not starting with
//! `Mass-Test` / `Calc-Test`) give patients `P_` + the key's third `_`-separated field; the sorted
//! unique list is shuffled with `random.Random(0)` and its first `int(0.1 * n)` patients are val.
//! With `dicom_info.csv` the keys are those of its crop rows, so a crop no CSV row uses still counts;
//! without it, the keys of the training CSV rows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::bench::prepare::{field, CsvTable};
use crate::bench::pyrandom::PyRandom;
use crate::error::{Error, Result};

pub const DICOM_INFO: &str = "dicom_info.csv";
/// The description `dicom_info.csv` gives the ROI crops (others: full mammograms, ROI masks).
pub const CROPPED: &str = "cropped images";
/// Case-key prefixes of the official test sets.
const TEST_PREFIXES: [&str; 2] = ["Mass-Test", "Calc-Test"];

/// The case key of a `cropped image file path`: its first path component.
pub fn case_key(cropped_path: &str) -> &str {
    cropped_path
        .trim()
        .split(['/', '\\'])
        .find(|c| !c.is_empty())
        .unwrap_or("")
}

/// The patient of a case key: `P_` + its third `_`-separated field (`Calc-Test_P_00038_LEFT_CC_1`
/// -> `P_00038`), `None` when it has fewer fields.
pub fn key_patient(key: &str) -> Option<String> {
    key.split('_').nth(2).map(|id| format!("P_{id}"))
}

/// The crop index of `dicom_info.csv`: case key -> image path (resolved) and the line it came from.
pub struct DicomInfo {
    pub path: PathBuf,
    pub crops: BTreeMap<String, (PathBuf, u64)>,
}

impl DicomInfo {
    /// Read the `cropped images` rows of `path`; image paths resolve against `source`.
    pub fn read(path: &Path, source: &Path) -> Result<DicomInfo> {
        let t = CsvTable::read(path)?;
        let (pid, desc, image) = (
            t.col("PatientID")?,
            t.col("SeriesDescription")?,
            t.col("image_path")?,
        );
        let mut crops: BTreeMap<String, (PathBuf, u64)> = BTreeMap::new();
        for (line, rec) in &t.rows {
            if field(rec, desc).trim() != CROPPED {
                continue;
            }
            let key = field(rec, pid).trim().to_string();
            if let Some((_, first)) = crops.get(&key) {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    key: "PatientID".into(),
                    reason: format!(
                        "two `{CROPPED}` rows for {key:?} (lines {first} and {line}): which crop \
                         belongs to the case is ambiguous"
                    ),
                });
            }
            let raw = field(rec, image).trim();
            let stripped = source.join(raw.replace("CBIS-DDSM/", ""));
            let resolved = if stripped.is_file() {
                stripped
            } else if source.join(raw).is_file() {
                source.join(raw)
            } else {
                stripped
            };
            crops.insert(key, (resolved, *line));
        }
        Ok(DicomInfo {
            path: path.to_path_buf(),
            crops,
        })
    }

    /// The case keys of the training sets.
    pub fn training_keys(&self) -> impl Iterator<Item = &str> {
        self.crops
            .keys()
            .map(String::as_str)
            .filter(|k| !is_test_key(k))
    }
}

pub fn is_test_key(key: &str) -> bool {
    TEST_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The val patients from the training case keys (module docs). `origin` names where the keys come
/// from, for the error on a key without a patient field.
pub fn val_patients<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    origin: &Path,
) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut ids = BTreeSet::new();
    for key in keys {
        let p = key_patient(key).ok_or_else(|| Error::Config {
            path: origin.to_path_buf(),
            key: key.to_string(),
            reason: "case key has no patient field (expected e.g. Mass-Training_P_00001_LEFT_CC_1)"
                .into(),
        })?;
        ids.insert(p);
    }
    let mut ids: Vec<String> = ids.into_iter().collect();
    PyRandom::new(0).shuffle(&mut ids);
    let n_val = (ids.len() as f64 * 0.1) as usize;
    let train = ids.split_off(n_val);
    Ok((ids.into_iter().collect(), train.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_keys_and_patients() {
        let p = "Mass-Training_P_00001_LEFT_CC_1/1.3.6/1.3.6.1/000000.dcm\n";
        assert_eq!(case_key(p), "Mass-Training_P_00001_LEFT_CC_1");
        assert_eq!(
            key_patient("Calc-Test_P_00038_LEFT_CC_1").as_deref(),
            Some("P_00038")
        );
        assert_eq!(key_patient("Calc-Test"), None);
        assert!(is_test_key("Calc-Test_P_00038_LEFT_CC_1"));
        assert!(!is_test_key("Calc-Training_P_00038_LEFT_CC_1"));
    }

    #[test]
    fn val_patients_take_ten_percent() {
        let keys: Vec<String> = (0..25)
            .map(|i| format!("Mass-Training_P_{i:05}_LEFT_CC_1"))
            .collect();
        let (val, train) = val_patients(keys.iter().map(String::as_str), Path::new("x")).unwrap();
        assert_eq!((val.len(), train.len()), (2, 23));
        assert!(val.is_disjoint(&train));
        let (val, _) = val_patients(keys[..9].iter().map(String::as_str), Path::new("x")).unwrap();
        assert!(val.is_empty());
    }
}
