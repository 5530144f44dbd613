#!/usr/bin/env python3
"""Synthetic WBCAtt and SKINCON source fixtures plus the items the reference protocol makes from them.

Generated with CPython 3.11 (standard library only). Run from the repository root:

    python3 scripts/make_bench_fixtures_wbcatt_skincon.py

It writes, under `tests/fixtures/bench/wbcatt/` and `tests/fixtures/bench/skincon/`:

* small copies of the released source files (same columns as the real ones, a few dozen rows) and
  8x8 PNG images at the paths the CSVs name;
* `expected_train.jsonl`, `expected_val.jsonl` (image-description pairs) and `expected_mcq_val.jsonl`,
  `expected_mcq_test.jsonl` (items), computed by a straightforward Python implementation of the protocol
  in METHOD.md ("Image-description pairs and MCQ sets per benchmark") with Python's `random` exactly as
  the reference uses it. They stand in for the reference's item lists; `tests/bench_wbcatt_skincon.rs`
  checks the Rust `prepare` against them item for item. Image paths are stored relative to the source
  directory; `expected_skipped.json` lists the rows the protocol must report as skipped.

Tricky rows on purpose: WBCAtt `nil` values (granules of lymphocytes), `yes`/`no` attributes, one MCQ
row whose asked attribute holds a value outside the key's fixed list (must be reported, not mapped);
SKINCON rows flagged "Do not consider this image" and more than 21 distinct combinations, so that
`random.sample` takes its set-based branch.
"""

import csv
import json
import os
import random
import struct
import zlib

ROOT = os.path.join("tests", "fixtures", "bench")

# --------------------------------------------------------------------------------------------- PNG


def png_bytes(rgb, size=8):
    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def write_png(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(rgb))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ------------------------------------------------------------------------------------------ WBCAtt

WBC_COLUMNS = ["img_name", "label", "cell_size", "cell_shape", "nucleus_shape", "nuclear_cytoplasmic_ratio",
               "chromatin_density", "cytoplasm_vacuole", "cytoplasm_texture", "cytoplasm_colour", "granule_type",
               "granule_colour", "granularity", "path"]
WBC_ORDER = ["cell_size", "cell_shape", "nucleus_shape", "nuclear_cytoplasmic_ratio", "chromatin_density",
             "cytoplasm_vacuole", "cytoplasm_texture", "cytoplasm_colour", "granularity", "granule_type",
             "granule_colour", "label"]
WBC_OPTIONS = {
    "label": ["Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"],
    "cell_size": ["big", "small"],
    "cell_shape": ["irregular", "round"],
    "nucleus_shape": ["irregular", "segmented-bilobed", "segmented-multilobed", "unsegmented-band",
                      "unsegmented-indented", "unsegmented-round"],
    "nuclear_cytoplasmic_ratio": ["high", "low"],
    "chromatin_density": ["densely", "loosely"],
    "cytoplasm_vacuole": ["yes", "no"],
    "cytoplasm_texture": ["clear", "frosted"],
    "cytoplasm_colour": ["blue", "light blue", "purple blue"],
    "granule_type": ["coarse", "round", "small"],
    "granule_colour": ["pink", "purple", "red"],
    "granularity": ["yes", "no"],
}


def wbc_row(gen, split, i):
    label = gen.choice(WBC_OPTIONS["label"])
    row = {k: gen.choice(WBC_OPTIONS[k]) for k in WBC_ORDER if k != "label"}
    row["label"] = label
    if label in ("Lymphocyte", "Monocyte") or gen.random() < 0.15:
        # Agranular cells: the released file marks their granule attributes `nil`.
        row["granule_type"] = "nil"
        row["granule_colour"] = "nil"
        row["granularity"] = "no"
    if gen.random() < 0.1:
        row["cytoplasm_vacuole"] = "nil"
    name = f"{split[:2].upper()}_{label[:3].upper()}_{i:03d}.png"
    row["img_name"] = name
    row["path"] = f"PBC_dataset_normal_DIB/{label.lower()}/{name}"
    return row


def wbc_description(row):
    parts = []
    for key in WBC_ORDER:
        v = row[key]
        if v in ("nil", "no"):
            continue
        name = key.replace("_", " ")
        if v == "yes":
            parts.append(name)
        elif key == "label":
            parts.append(v)
        else:
            parts.append(f"{v} {name}")
    return ", ".join(parts)


def make_wbcatt():
    d = os.path.join(ROOT, "wbcatt")
    gen = random.Random(20240601)
    splits = {s: [wbc_row(gen, s, i) for i in range(n)] for s, n in (("train", 10), ("val", 12), ("test", 14))}

    # The reference protocol: one generator seeded 0, val file then test file, row by row; the
    # attribute keys (in description order, label included) with a non-`nil` value are shuffled
    # and the first one is asked.
    rng = random.Random(0)
    asked = {}
    for split in ("val", "test"):
        for i, row in enumerate(splits[split]):
            keys = [k for k in WBC_ORDER if row[k] != "nil"]
            rng.shuffle(keys)
            asked[(split, i)] = keys[0]
    # One row whose asked attribute holds a value outside the key's list. Replacing a non-nil value
    # with another non-nil one leaves the key list (and so the generator's walk) unchanged.
    unknown_at = ("test", 3)
    k = asked[unknown_at]
    splits["test"][3][k] = "medium" if k != "label" else "Blast"

    items = {"val": [], "test": []}
    skipped = []
    for split in ("val", "test"):
        fname = f"pbc_attr_v1_{split}.csv"
        for i, row in enumerate(splits[split]):
            key = asked[(split, i)]
            opts = WBC_OPTIONS[key]
            if row[key] not in opts:
                skipped.append({"source": f"{fname}:{i + 2}", "key": key, "value": row[key]})
                continue
            items[split].append({"id": row["img_name"], "image": row["path"], "key": key, "options": opts,
                                 "answer": opts.index(row[key])})

    for split, rows in splits.items():
        with open(os.path.join(d, f"pbc_attr_v1_{split}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=WBC_COLUMNS, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow(r)
                shade = zlib.crc32(r["img_name"].encode()) % 200
                write_png(os.path.join(d, r["path"]), (shade, 64, 128))
    write_jsonl(os.path.join(d, "expected_train.jsonl"),
                [{"image": r["path"], "text": wbc_description(r)} for r in splits["train"]])
    write_jsonl(os.path.join(d, "expected_val.jsonl"),
                [{"image": r["path"], "text": wbc_description(r)} for r in splits["val"]])
    write_jsonl(os.path.join(d, "expected_mcq_val.jsonl"), items["val"])
    write_jsonl(os.path.join(d, "expected_mcq_test.jsonl"), items["test"])
    with open(os.path.join(d, "expected_skipped.json"), "w") as f:
        json.dump(skipped, f, indent=1)
    print("wbcatt:", {s: len(v) for s, v in splits.items()}, {s: len(v) for s, v in items.items()},
          "skipped", skipped)


# ----------------------------------------------------------------------------------------- SKINCON

SKINCON_CONCEPTS = [
    "Papule", "Plaque", "Pustule", "Bulla", "Patch", "Nodule", "Ulcer", "Crust", "Erosion", "Excoriation",
    "Atrophy", "Exudate", "Purpura/Petechiae", "Fissure", "Induration", "Xerosis", "Telangiectasia", "Scale",
    "Scar", "Friable", "Sclerosis", "Pedunculated", "Exophytic/Fungating", "Warty/Papillomatous",
    "Dome-shaped", "Flat topped", "Brown(Hyperpigmentation)", "Translucent", "White(Hypopigmentation)",
    "Purple", "Yellow", "Black", "Erythema", "Comedo", "Lichenification", "Blue", "Umbilicated",
    "Poikiloderma", "Salmon", "Wheal", "Acuminate", "Burrow", "Gray", "Pigmented", "Cyst", "Vesicle",
    "Macule", "Abscess",
]
assert len(SKINCON_CONCEPTS) == 48
FLAG = "Do not consider this image"
COMMON = ["Papule", "Plaque", "Erythema", "Scale", "Nodule", "Crust", "Ulcer", "Brown(Hyperpigmentation)",
          "Pustule", "Dome-shaped"]


def make_skincon():
    d = os.path.join(ROOT, "skincon")
    gen = random.Random(17)
    rows = []
    for i in range(42):
        image_id = "%032x.jpg" % gen.getrandbits(128)
        k = gen.choice([1, 1, 2, 2, 3])
        chosen = set(gen.sample(COMMON, k))
        if i % 9 == 4:
            chosen.add(gen.choice(SKINCON_CONCEPTS))
        flag = 1 if i in (5, 23) else 0
        rows.append({"ImageID": image_id, "concepts": chosen, "flag": flag})

    header = [""] + ["ImageID"] + SKINCON_CONCEPTS + [FLAG]
    with open(os.path.join(d, "annotations_fitzpatrick17k.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for i, r in enumerate(rows):
            w.writerow([i, r["ImageID"]] + [1 if c in r["concepts"] else 0 for c in SKINCON_CONCEPTS]
                       + [r["flag"]])
    for i, r in enumerate(rows):
        if not r["flag"]:
            write_png(os.path.join(d, "images", r["ImageID"]), (200, (i * 37) % 256, 90))

    # The protocol. Descriptions: concepts equal to 1, lower-cased, CSV column order (the leading
    # index column is an index, not a concept).
    usable = [r for r in rows if not r["flag"]]
    desc = {r["ImageID"]: ", ".join(c.lower() for c in SKINCON_CONCEPTS if c in r["concepts"]) for r in usable}
    ids = sorted(desc)
    random.Random(0).shuffle(ids)
    n = len(ids)
    n_val = int(0.1 * n)
    n_test = int(0.1 * n)
    val, test, train = ids[:n_val], ids[n_val:n_val + n_test], ids[n_val + n_test:]
    pool = sorted(set(desc.values()))
    items = {"val": [], "test": []}
    for split, split_ids in (("val", val), ("test", test)):
        rng = random.Random(1)  # the reference's eval.py seeds once per file
        for i in split_ids:
            truth = desc[i]
            others = [c for c in pool if c != truth]
            opts = [truth] + rng.sample(others, 4)
            rng.shuffle(opts)
            items[split].append({"id": i, "image": f"images/{i}", "key": "dermatologic feature", "options": opts,
                                 "answer": opts.index(truth)})
    write_jsonl(os.path.join(d, "expected_train.jsonl"), [{"image": f"images/{i}", "text": desc[i]} for i in train])
    write_jsonl(os.path.join(d, "expected_val.jsonl"), [{"image": f"images/{i}", "text": desc[i]} for i in val])
    write_jsonl(os.path.join(d, "expected_mcq_val.jsonl"), items["val"])
    write_jsonl(os.path.join(d, "expected_mcq_test.jsonl"), items["test"])
    with open(os.path.join(d, "expected_pool.json"), "w") as f:
        json.dump(pool, f, indent=1)
    with open(os.path.join(d, "expected_skipped.json"), "w") as f:
        json.dump([{"source": f"annotations_fitzpatrick17k.csv:{i + 2}", "id": r["ImageID"]}
                   for i, r in enumerate(rows) if r["flag"]], f, indent=1)
    print("skincon: rows", len(rows), "usable", n, "train/val/test", len(train), len(val), len(test),
          "pool", len(pool))


if __name__ == "__main__":
    os.makedirs(os.path.join(ROOT, "wbcatt"), exist_ok=True)
    os.makedirs(os.path.join(ROOT, "skincon"), exist_ok=True)
    make_wbcatt()
    make_skincon()
