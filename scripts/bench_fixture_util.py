"""Helpers shared by the benchmark fixture scripts (make_bench_fixtures_*.py)."""
import csv
import json
import os

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bench")


def write_csv(path, header, rows):
    """A CSV as Python's csv module writes it (CRLF line ends, as the released files)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(r)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def grey(path, w, h, v, **save):
    """A w x h grey image of value v with an inverted diagonal (format from the extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("L", (w, h), v)
    for x in range(min(w, h)):
        img.putpixel((x, x), 255 - v)
    img.save(path, **save)
