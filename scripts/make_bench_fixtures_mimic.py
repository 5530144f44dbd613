#!/usr/bin/env python3
"""Tiny synthetic MIMIC-CXR-JPG copy + the expected prepared items.

Writes tests/fixtures/bench/mimic-cxr/{source/,expected_*.jsonl}; expected_mcq_{val,test}_yes_no.jsonl
are the MCQ items with the optional per-finding yes/no questions on (default uncertain policy: an
uncertain finding gets no yes/no question, the study's other findings do). The CSVs have the released files'
columns and a handful of rows, including tricky ones (MIMIC: an uncertain label, a no-finding
study, a lateral-only study, an AP-only study, a study missing from the split file).

The expected items come from a straightforward Python implementation of the protocol (METHOD.md and
the module docs of src/bench/mimic_cxr.rs) with Python's own `random`, the
stand-in for the reference's item lists. Image paths in expected_*.jsonl are relative to source/.

Requires Pillow (scripts/requirements-fixtures.txt). Run from the repository root:
    python3 scripts/make_bench_fixtures_mimic.py
"""
import csv
import os
import random
import shutil

from PIL import Image

from bench_fixture_util import ROOT, grey, write_csv, write_jsonl


# ------------------------------------------------------------------------------------------- MIMIC
CHEX = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
        "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
        "Pneumothorax", "Support Devices"]
FINDINGS = [c for c in CHEX if c != "No Finding"]

# (subject, study, split or None, [(dicom, view)], {column: value})
STUDIES = [
    ("10000032", "50414267", "train", [("d01", "PA"), ("d02", "LATERAL")], {"Cardiomegaly": "1.0", "Edema": "0.0"}),
    ("10000032", "53189527", "train", [("d03", "LATERAL"), ("d04", "AP")], {"No Finding": "1.0"}),
    ("10000764", "57375967", "train", [("d05", "AP"), ("d06", "PA")], {"Pleural Effusion": "1.0", "Atelectasis": "1.0"}),
    ("10000898", "50771383", "train", [("d07", "PA")], {"Lung Opacity": "1.0", "Pneumonia": "-1.0"}),
    ("10000935", "51178377", "train", [("d08", "LATERAL")], {"Edema": "1.0"}),
    ("10000980", "54577367", "train", [("d09", "PA")], {"Support Devices": "1.0", "Edema": "1.0"}),
    ("10001038", "58224503", None, [("d10", "PA")], {"Fracture": "1.0"}),
    ("11001176", "53186264", "validate", [("d11", "PA"), ("d12", "LL")], {"Cardiomegaly": "1.0"}),
    ("11001217", "52067803", "validate", [("d13", "AP")], {}),
    ("11001401", "51065211", "validate", [("d14", "PA")], {"Consolidation": "1.0", "Pneumonia": "-1.0"}),
    ("11001884", "56307174", "validate", [("d15", "PA")], {"Pleural Effusion": "1.0", "Atelectasis": "1.0"}),
    ("12002428", "55283000", "test", [("d16", "PA")], {"Enlarged Cardiomediastinum": "1.0", "Lung Lesion": "1.0"}),
    ("12002428", "59258269", "test", [("d17", "LATERAL")], {"Pneumothorax": "1.0"}),
    ("12003026", "50133627", "test", [("d18", "AP")], {"No Finding": "1.0"}),
    ("12004457", "58355597", "test", [("d19", "PA"), ("d20", "PA")], {"Pleural Other": "1.0", "Fracture": "0.0"}),
    ("12005166", "53350395", "test", [("d21", "AP")], {"Pneumothorax": "1.0", "Support Devices": "1.0"}),
]


def mimic_fixture():
    base = os.path.join(ROOT, "mimic-cxr")
    src = os.path.join(base, "source")
    shutil.rmtree(src, ignore_errors=True)  # reference/ (make_reference_items.py) stays
    chex, split, meta = [], [], []
    for n, (subj, study, sp, views, labels) in enumerate(STUDIES):
        chex.append([subj, study] + [labels.get(c, "") for c in CHEX])
        for dicom, view in views:
            if sp is not None:
                split.append([dicom, study, subj, sp])
            meta.append([dicom, subj, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, 213014.531,
                         "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            p = os.path.join(src, "files", f"p{subj[:2]}", f"p{subj}", f"s{study}", f"{dicom}.jpg")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            Image.new("L", (10 + n % 4, 8 + n % 3), 30 + 10 * n).save(p, quality=85)
    write_csv(os.path.join(src, "mimic-cxr-2.0.0-chexpert.csv"), ["subject_id", "study_id"] + CHEX, chex)
    write_csv(os.path.join(src, "mimic-cxr-2.0.0-split.csv"), ["dicom_id", "study_id", "subject_id", "split"], split)
    write_csv(os.path.join(src, "mimic-cxr-2.0.0-metadata.csv"),
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta)
    return base, src


def mimic_expected(base, src):
    def read(name):
        with open(os.path.join(src, name), newline="") as f:
            return list(csv.DictReader(f))

    split = {}
    for r in read("mimic-cxr-2.0.0-split.csv"):
        split.setdefault(r["study_id"], r["split"])
    views = {}
    for r in read("mimic-cxr-2.0.0-metadata.csv"):
        views.setdefault(r["study_id"], []).append((r["dicom_id"], r["ViewPosition"].upper()))
    studies = []
    for r in read("mimic-cxr-2.0.0-chexpert.csv"):
        sp = {"train": "train", "validate": "val", "test": "test"}.get(split.get(r["study_id"]))
        if sp is None:
            continue
        v = views.get(r["study_id"], [])
        frontal = [d for d, x in v if x == "PA"] or [d for d, x in v if x == "AP"]
        if not frontal:
            continue
        pos = [c.lower() for c in FINDINGS if r[c] and float(r[c]) == 1.0]
        unc = any(r[c] and float(r[c]) == -1.0 for c in CHEX)
        subj, study = r["subject_id"], r["study_id"]
        studies.append(dict(split=sp, study=study, desc=", ".join(pos) or "no finding", asked=sp != "train" and not unc,
                            image=f"files/p{subj[:2]}/p{subj}/s{study}/{frontal[0]}.jpg",
                            labels={c: float(r[c]) if r[c] else 0.0 for c in FINDINGS}))
    pool = sorted({s["desc"] for s in studies})
    rng = random.Random(1)
    out = {"train": [], "val": [], "mcq_val": [], "mcq_test": []}
    for s in studies:
        if s["split"] in ("train", "val"):
            out[s["split"]].append(dict(image=s["image"], text=s["desc"]))
    for sp in ("val", "test"):
        out["mcq_" + sp] = mimic_mcq(studies, pool, sp, yes_no=False)
        out[f"mcq_{sp}_yes_no"] = mimic_mcq(studies, pool, sp, yes_no=True)
    for k, rows in out.items():
        write_jsonl(os.path.join(base, f"expected_{k}.jsonl"), rows)
    print("mimic-cxr: " + ", ".join(f"{k} {len(v)}" for k, v in out.items()) + f", pool {len(pool)}")


def mimic_mcq(studies, pool, sp, yes_no):
    """The MCQ items of one split: each study's findings item (if asked), then, with yes_no, one
    yes/no item per finding whose label is not uncertain (the yes/no items draw nothing from rng)."""
    rng = random.Random(1)  # a fresh generator per file, as the reference's eval.py
    rows = []
    for s in studies:
        if s["split"] != sp:
            continue
        if s["asked"]:
            others = [p for p in pool if p != s["desc"]]
            opts = [s["desc"]] + rng.sample(others, min(4, len(others)))
            rng.shuffle(opts)
            rows.append(dict(id=f"mimic-cxr-s{s['study']}", image=s["image"], key="findings",
                             options=opts, answer=opts.index(s["desc"])))
        if not yes_no:
            continue
        for c in FINDINGS:
            v = s["labels"][c]
            if v == -1.0:
                continue
            name = c.lower()
            rows.append(dict(id=f"mimic-cxr-s{s['study']}-{name.replace(' ', '_')}", image=s["image"],
                             key=f"presence of {name}", options=["yes", "no"], answer=0 if v == 1.0 else 1))
    return rows


if __name__ == "__main__":
    mimic_expected(*mimic_fixture())
