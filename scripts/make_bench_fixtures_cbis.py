#!/usr/bin/env python3
"""Tiny synthetic CBIS-DDSM copy + the expected prepared items.

Writes tests/fixtures/bench/cbis/{source/,expected_*.jsonl}. The CSVs have the released files'
columns and a handful of rows, including tricky ones (CBIS: BENIGN_WITHOUT_CALLBACK, a
non-whitelisted shape, an unknown pathology, values with `_`, a missing value, a trailing newline in
the cropped path, a row without a crop in dicom_info.csv, crops no row uses, a pandas NA cell).

The expected items come from a straightforward Python implementation of the protocol (METHOD.md and
the module docs of src/bench/cbis.rs) with Python's own `random`, the
stand-in for the reference's item lists. Image paths in expected_*.jsonl are relative to source/.

Requires Pillow (scripts/requirements-fixtures.txt). Run from the repository root:
    python3 scripts/make_bench_fixtures_cbis.py
"""
import csv
import os
import random
import shutil

from PIL import Image

from bench_fixture_util import ROOT, grey, write_csv, write_jsonl


# ----------------------------------------------------------------------------------------------- CBIS
MASS_HDR = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
            "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
            "image file path", "cropped image file path", "ROI mask file path"]
CALC_HDR = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
            "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
            "image file path", "cropped image file path", "ROI mask file path"]
WL = {
    "mass shape": ["architectural distortion", "asymmetric breast tissue", "focal asymmetric density",
                   "irregular", "lobulated", "lymph node", "oval", "round"],
    "mass margins": ["circumscribed", "ill defined", "microlobulated", "obscured", "spiculated"],
    "calc type": ["amorphous", "coarse", "eggshell", "fine linear branching", "lucent center",
                  "pleomorphic", "punctate", "round and regular", "vascular"],
    "calc distribution": ["clustered", "diffusely scattered", "linear", "regional", "segmental"],
}

# (patient, abnormality type, value1, value2, pathology, crop kind): "info" = a `cropped images` row in
# dicom_info.csv, "noinfo" = none (the reference drops the row).
MASS_TRAIN = [
    ("P_00001", "mass", "IRREGULAR", "SPICULATED", "MALIGNANT", "info"),
    ("P_00004", "mass", "ARCHITECTURAL_DISTORTION", "ILL_DEFINED", "BENIGN", "info"),
    ("P_00009", "mass", "IRREGULAR-ARCHITECTURAL_DISTORTION", "SPICULATED", "MALIGNANT", "info"),
    ("P_00015", "mass", "LOBULATED", "ILL_DEFINED", "BENIGN_WITHOUT_CALLBACK", "info"),
    ("P_00018", "mass", "ROUND", "CIRCUMSCRIBED", "BENIGN", "info"),
    ("P_00021", "mass", "OVAL", "OBSCURED", "UNKNOWN", "info"),
    ("P_00023", "mass", "LYMPH_NODE", "CIRCUMSCRIBED", "BENIGN_WITHOUT_CALLBACK", "info"),
    ("P_00026", "mass", "ASYMMETRIC_BREAST_TISSUE", "", "BENIGN", "info"),
    ("P_00027", "mass", "FOCAL_ASYMMETRIC_DENSITY", "MICROLOBULATED", "MALIGNANT", "info"),
    ("P_00027", "mass", "OVAL", "ILL_DEFINED-SPICULATED", "MALIGNANT", "info"),
    ("P_00034", "mass", "IRREGULAR", "MICROLOBULATED", "MALIGNANT", "info"),
    ("P_00039", "mass", "ROUND", "OBSCURED", "BENIGN", "info"),
    ("P_00050", "mass", "OVAL", "OBSCURED", "BENIGN", "noinfo"),
]
CALC_TRAIN = [
    ("P_00005", "calcification", "AMORPHOUS", "CLUSTERED", "MALIGNANT", "info"),
    ("P_00007", "calcification", "FINE_LINEAR_BRANCHING", "LINEAR", "MALIGNANT", "info"),
    ("P_00008", "calcification", "LUCENT_CENTER", "", "BENIGN_WITHOUT_CALLBACK", "info"),
    ("P_00011", "calcification", "ROUND_AND_REGULAR", "DIFFUSELY_SCATTERED", "BENIGN", "info"),
    ("P_00012", "calcification", "PLEOMORPHIC", "SEGMENTAL", "MALIGNANT", "info"),
    ("P_00001", "calcification", "PUNCTATE", "REGIONAL", "BENIGN", "info"),
    ("P_00044", "calcification", "VASCULAR", "CLUSTERED", "BENIGN_WITHOUT_CALLBACK", "info"),
    ("P_00045", "calcification", "PUNCTATE-PLEOMORPHIC", "CLUSTERED", "MALIGNANT", "info"),
    ("P_00046", "calcification", "EGGSHELL", "REGIONAL", "BENIGN", "info"),
    ("P_00047", "calcification", "COARSE", "SEGMENTAL", "BENIGN", "info"),
    ("P_00048", "calcification", "AMORPHOUS", "LINEAR", "MALIGNANT", "info"),
]
MASS_TEST = [
    ("P_00016", "mass", "IRREGULAR", "SPICULATED", "MALIGNANT", "info"),
    ("P_00017", "mass", "OVAL", "CIRCUMSCRIBED", "BENIGN_WITHOUT_CALLBACK", "info"),
    ("P_00032", "mass", "LOBULATED-IRREGULAR", "OBSCURED", "BENIGN", "info"),
    ("P_00037", "mass", "ARCHITECTURAL_DISTORTION", "ILL_DEFINED", "MALIGNANT", "info"),
]
CALC_TEST = [
    ("P_00038", "calcification", "PLEOMORPHIC", "CLUSTERED", "MALIGNANT", "info"),
    ("P_00040", "calcification", "LUCENT_CENTER", "SEGMENTAL", "BENIGN_WITHOUT_CALLBACK", "info"),
    ("P_00041", "calcification", "FINE_LINEAR_BRANCHING", "N/A", "MALIGNANT", "info"),
    ("P_00042", "calcification", "ROUND_AND_REGULAR", "REGIONAL", "UNSURE", "info"),
]
# Crops in dicom_info.csv that no CSV row uses: training patients still enter the val split.
EXTRA_CROPS = ["Calc-Training_P_00099_LEFT_CC_1", "Mass-Training_P_00098_RIGHT_MLO_1"]
INFO_HDR = ["file_path", "image_path", "PatientID", "SeriesDescription", "SeriesInstanceUID",
            "StudyInstanceUID"]
# pandas' default na_values (read_csv): such cells are NaN in the reference.
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
             "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def cbis_fixture():
    """The Kaggle layout: source/csv/*.csv (case descriptions + dicom_info.csv), source/jpeg/<uid>/."""
    base = os.path.join(ROOT, "cbis")
    src = os.path.join(base, "source")
    shutil.rmtree(src, ignore_errors=True)  # reference/ (make_reference_items.py) stays
    info_rows = []
    files = [("mass_case_description_train_set.csv", MASS_HDR, MASS_TRAIN, "Mass-Training"),
             ("calc_case_description_train_set.csv", CALC_HDR, CALC_TRAIN, "Calc-Training"),
             ("mass_case_description_test_set.csv", MASS_HDR, MASS_TEST, "Mass-Test"),
             ("calc_case_description_test_set.csv", CALC_HDR, CALC_TEST, "Calc-Test")]
    k = 0

    def add_info(case, k, study, series):
        info_rows.append([f"CBIS-DDSM/dicom/{series}m.dcm", f"CBIS-DDSM/jpeg/{series}/2-{k}.jpg", case,
                          "ROI mask images", series, study])
        info_rows.append([f"CBIS-DDSM/dicom/{series}c.dcm", f"CBIS-DDSM/jpeg/{series}/1-{k}.jpg", case,
                          "cropped images", series, study])
        grey(os.path.join(src, "jpeg", series, f"1-{k}.jpg"), 6 + (k % 5) * 3, 5 + (k % 3) * 4, 40 + k * 4, quality=90)

    for name, hdr, rows, prefix in files:
        out = []
        for i, (pid, abn, v1, v2, path, kind) in enumerate(rows, start=1):
            k += 1
            case = f"{prefix}_{pid}_LEFT_CC_{i}"
            study, series = f"1.3.6.1.4.1.9590.100.1.2.{k}1", f"1.3.6.1.4.1.9590.100.1.2.{k}2"
            full = f"{prefix}_{pid}_LEFT_CC/{study}/{series}0/000000.dcm"
            # The released CSVs carry a newline inside the quotes of the cropped path.
            crop = f"{case}/{study}/{series}/000000.dcm\n"
            if kind == "info":
                add_info(case, k, study, series)
            info_rows.append([f"CBIS-DDSM/dicom/{series}f.dcm", f"CBIS-DDSM/jpeg/{series}0/1-{k}.jpg",
                              f"{prefix}_{pid}_LEFT_CC", "full mammogram images", series + "0", study])
            out.append([pid, 2, "LEFT", "CC", i, abn, v1, v2, 4, path, 3, full, crop,
                        crop.replace("000000", "000001")])
        write_csv(os.path.join(src, "csv", name), hdr, out)
    for case in EXTRA_CROPS:
        k += 1
        add_info(case, k, f"1.3.6.1.4.1.9590.100.1.2.{k}1", f"1.3.6.1.4.1.9590.100.1.2.{k}2")
    write_csv(os.path.join(src, "csv", "dicom_info.csv"), INFO_HDR, info_rows)
    return base, src


def norm(v):
    return v.lower().replace("_", " ").strip()


def cbis_expected(base, src):
    """The protocol of src/bench/cbis (the reference's rules) in plain Python."""
    def read(name):
        with open(os.path.join(src, "csv", name), newline="") as f:
            return list(csv.DictReader(f))

    crops = {}
    for r in read("dicom_info.csv"):
        if r["SeriesDescription"] == "cropped images":
            assert r["PatientID"] not in crops
            crops[r["PatientID"]] = r["image_path"].replace("CBIS-DDSM/", "")

    skipped = []

    def rois(name, keys):
        out = []
        for row, r in enumerate(read(name), start=1):
            key = r["cropped image file path"].strip().split("/")[0]
            if key not in crops:
                skipped.append((name, row, "no crop"))
                continue
            abn = norm(r["abnormality type"])
            path = norm(r["pathology"])
            if path == "benign without callback":
                path = "benign"
            if abn not in ("calcification", "mass") or path not in ("benign", "malignant"):
                skipped.append((name, row, "unknown"))
                continue
            lesion = [(k, None if r[k] in PANDAS_NA else norm(r[k])) for k in keys]
            out.append(dict(stem=name[:-4], row=row, patient=r["patient_id"].strip(), abn=abn, path=path,
                            lesion=lesion, image=crops[key]))
        return out

    mk, ck = ["mass shape", "mass margins"], ["calc type", "calc distribution"]
    train_rois = rois("mass_case_description_train_set.csv", mk) + rois("calc_case_description_train_set.csv", ck)
    test_rois = rois("mass_case_description_test_set.csv", mk) + rois("calc_case_description_test_set.csv", ck)
    patients = sorted({"P_" + k.split("_")[2] for k in crops
                       if not (k.startswith("Mass-Test") or k.startswith("Calc-Test"))})
    random.Random(0).shuffle(patients)
    val_ids = set(patients[: int(len(patients) * 0.1)])

    rng = random.Random(1)

    def items(roi):
        res = []
        for k, v in roi["lesion"]:
            if v is not None and v in WL[k]:
                opts = [v] + rng.sample([o for o in WL[k] if o != v], 4)
                rng.shuffle(opts)
                res.append((k, opts, v))
        res.append(("abnormality type", ["calcification", "mass"], roi["abn"]))
        res.append(("pathology", ["benign", "malignant"], roi["path"]))
        return [dict(id=f"{roi['stem']}-{roi['row']}-{k.replace(' ', '_')}", image=roi["image"], key=k,
                     options=o, answer=o.index(t)) for k, o, t in res]

    def desc(roi):
        parts = [f"{v} {k}" for k, v in roi["lesion"] if v is not None]
        return ", ".join(parts + [roi["abn"], roi["path"]])

    train, val, mcq_val, mcq_test = [], [], [], []
    for roi in train_rois:
        pair = dict(image=roi["image"], text=desc(roi))
        if roi["patient"] in val_ids:
            val.append(pair)
            mcq_val += items(roi)
        else:
            train.append(pair)
    rng = random.Random(1)  # the reference's eval.py seeds once per file
    for roi in test_rois:
        mcq_test += items(roi)
    write_jsonl(os.path.join(base, "expected_train.jsonl"), train)
    write_jsonl(os.path.join(base, "expected_val.jsonl"), val)
    write_jsonl(os.path.join(base, "expected_mcq_val.jsonl"), mcq_val)
    write_jsonl(os.path.join(base, "expected_mcq_test.jsonl"), mcq_test)
    print(f"cbis: {len(train)} train, {len(val)} val pairs, {len(mcq_val)} val, {len(mcq_test)} test items, "
          f"val patients {sorted(val_ids)} of {len(patients)}, skipped {skipped}")


if __name__ == "__main__":
    cbis_expected(*cbis_fixture())
