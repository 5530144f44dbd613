#!/usr/bin/env python3
"""Item lists produced by the reference code itself, on our synthetic benchmark fixtures.

The reference is github.com/myeongkyunkang/InstFree (commit REF_COMMIT below). Its code is not part
of lvlm-ift: pass a checkout of it with --instfree. This script

1. copies each fixture source (tests/fixtures/bench/{wbcatt,skincon,cbis}) into a scratch directory
   laid out as the reference expects (`./datasets/concept/<name>/...`);
2. runs the reference's own `tools/preprocess_att_dataset.py` (`main_wbcatt`, `main_skincon`,
   `main_cbis`) there, which writes its image/description CSVs;
3. runs the reference's own `tools/eval.py` `main()` on the val and test question files, seeded as
   its `__main__` does (random.seed(1), np.random.seed(1)), with `run_llama` replaced by a function
   that records the question it is asked (no model needed); placeholder images are written where
   the reference would have resized copies (it runs with `convert_image = False`);
4. writes what the reference produced, as data, to tests/fixtures/bench/<name>/reference/:
   `mcq_val.jsonl`, `mcq_test.jsonl` (per question: image, key, prompt, options parsed from the
   prompt, gt, answer = index of gt in the options or null) and `pairs_train.jsonl`,
   `pairs_val.jsonl` (image, text; the reference's x3 training repeat undone).

SKINCON: the reference's eval draws distractors from a list hard-coded in `eval_utils.py`, which is
its preprocessing's printout of the sorted distinct descriptions on the released data. On the
fixture the same list is computed from the preprocessing's outputs and put in its place.

Needs pandas, numpy and Pillow (scripts/requirements-fixtures.txt). torch is
not needed: a stub module stands in for the imports. Run from the repository root:
    python3 scripts/make_reference_items.py --instfree /path/to/InstFree
"""
import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
import types

import numpy as np
import pandas as pd
from PIL import Image

REF_COMMIT = "223828bc25f4f64ea63a3ad770cdc77bf0716ed2"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bench")
BENCHMARKS = ["wbcatt", "skincon", "cbis"]


def stub_torch():
    """eval.py / eval_utils.py import torch at module level; nothing used here needs it."""
    torch = types.ModuleType("torch")
    backends = types.ModuleType("torch.backends")
    cudnn = types.ModuleType("torch.backends.cudnn")
    torch.backends = backends
    backends.cudnn = cudnn
    sys.modules.update({"torch": torch, "torch.backends": backends, "torch.backends.cudnn": cudnn})


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def stage_sources(scratch):
    """Copy the fixtures where the reference's preprocessing looks for them."""
    concept = os.path.join(scratch, "datasets", "concept")
    w = os.path.join(concept, "wbcatt")
    shutil.copytree(os.path.join(ROOT, "wbcatt"), w, ignore=shutil.ignore_patterns("expected_*", "reference"))
    s = os.path.join(concept, "skincon")
    os.makedirs(s)
    shutil.copy(os.path.join(ROOT, "skincon", "annotations_fitzpatrick17k.csv"),
                os.path.join(s, "fitzpatrick17k_anno.csv"))
    shutil.copytree(os.path.join(ROOT, "skincon", "images"), os.path.join(s, "fitzpatrick17k"))
    c = os.path.join(concept, "cbis")
    shutil.copytree(os.path.join(ROOT, "cbis", "source"), c)
    # skincon and cbis write to os.path.join(dir, os.path.join(dir, name)): a doubled relative path.
    for d in ("skincon", "cbis"):
        os.makedirs(os.path.join(concept, d, "datasets", "concept", d), exist_ok=True)
    return concept


def out_dir(concept, name):
    """Where the reference's preprocessing wrote its CSVs for `name`."""
    d = os.path.join(concept, name)
    return d if name == "wbcatt" else os.path.join(d, "datasets", "concept", name)


def run_eval(ev, data_dir, filename, dataset, result_dir):
    """The reference's eval.main on one question file; returns the recorded questions + gts."""
    asked = []

    def record(text, image, model, processor, max_new_tokens):
        asked.append(text)
        return "The correct answer is A."

    ev.run_llama = record
    table = pd.read_csv(os.path.join(data_dir, filename))
    for rel in table["image"]:
        p = os.path.join(data_dir, rel)
        if not os.path.exists(p):
            os.makedirs(os.path.dirname(p), exist_ok=True)
            Image.new("RGB", (4, 4)).save(p)
    random.seed(1)
    np.random.seed(1)
    args = argparse.Namespace(data_dir=data_dir, filename=filename, dataset=dataset, model="llama",
                              max_new_tokens=50, model_id="reference", result_dir=result_dir)
    ev.main(None, None, args)
    [csv_name] = [f for f in os.listdir(result_dir) if f.startswith(os.path.splitext(filename)[0])]
    result = pd.read_csv(os.path.join(result_dir, csv_name))
    os.remove(os.path.join(result_dir, csv_name))
    assert len(result) == len(asked)
    items = []
    for (_, row), prompt in zip(result.iterrows(), asked):
        lines = prompt.split("\n")
        key = re.fullmatch(r"What is the (.*)\?", lines[0]).group(1)
        options = [re.fullmatch(r"[A-Z]\. (.*)", l).group(1) for l in lines[1:-1]]
        gt = str(row["gt"])
        items.append(dict(image=row["image"], key=key, prompt=prompt, options=options, gt=gt,
                          answer=options.index(gt) if gt in options else None))
    return items


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instfree", required=True, help=f"checkout of myeongkyunkang/InstFree at {REF_COMMIT}")
    a = ap.parse_args()
    tools = os.path.join(a.instfree, "tools")
    stub_torch()
    sys.path.insert(0, tools)
    pre = load(os.path.join(tools, "preprocess_att_dataset.py"), "ref_preprocess")
    ev = load(os.path.join(tools, "eval.py"), "ref_eval")
    with tempfile.TemporaryDirectory() as scratch:
        concept = stage_sources(scratch)
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            for name in BENCHMARKS:
                getattr(pre, f"main_{name}")()
        finally:
            os.chdir(cwd)
        results = os.path.join(scratch, "results")
        os.makedirs(results)
        for name in BENCHMARKS:
            d = out_dir(concept, name)
            train = pd.read_csv(os.path.join(d, "image_text.csv"))
            val = pd.read_csv(os.path.join(d, "image_text_val.csv"))
            if name == "skincon":
                test = pd.read_csv(os.path.join(d, "image_text_test.csv"))
                pool = sorted(set(pd.concat([train, val, test])["text"]))
                ev.skin_option_dict = {"dermatologic feature": pool}
            # The data dir eval.py reads images from: skincon/cbis image paths are relative to the
            # dataset dir, as in the reference's README commands.
            data_dir = os.path.join(concept, name)
            for split in ("val", "test"):
                if d != data_dir:
                    shutil.copy(os.path.join(d, f"image_text_{split}_att1.csv"), data_dir)
                items = run_eval(ev, data_dir, f"image_text_{split}_att1.csv", name, results)
                dest = os.path.join(ROOT, name, "reference")
                os.makedirs(dest, exist_ok=True)
                write_jsonl(os.path.join(dest, f"mcq_{split}.jsonl"), items)
            repeat = 1 if name == "wbcatt" else 3
            n = len(train) // repeat
            first = train.iloc[:n].reset_index(drop=True)
            assert all(first.equals(train.iloc[k * n:(k + 1) * n].reset_index(drop=True)) for k in range(repeat))
            write_jsonl(os.path.join(dest, "pairs_train.jsonl"),
                        [dict(image=i, text=t) for i, t in zip(train["image"][:n], train["text"][:n])])
            write_jsonl(os.path.join(dest, "pairs_val.jsonl"),
                        [dict(image=i, text=t) for i, t in zip(val["image"], val["text"])])
            print(f"{name}: {n} train, {len(val)} val pairs; reference items written to {dest}")


if __name__ == "__main__":
    main()
