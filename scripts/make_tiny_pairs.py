"""Tiny synthetic image-description pair set for smoke runs and tests.

Writes tests/fixtures/pairs/: 12 small PNG images of coloured shapes and pairs.jsonl / pairs.csv
whose descriptions list the image's attributes comma-separated, like WBCAtt-style descriptions
("small size, round shape, red colour, circle"). Deterministic (seed 0).
Run from the repo root: python scripts/make_tiny_pairs.py   (Pillow, any recent version)
"""
import csv
import json
import os
import random

from PIL import Image, ImageDraw

OUT = os.path.join("tests", "fixtures", "pairs")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220)}
SHAPES = ["circle", "square"]
SIZES = {"small": 10, "big": 18}


def main():
    rng = random.Random(0)
    os.makedirs(os.path.join(OUT, "images"), exist_ok=True)
    rows = []
    i = 0
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            for size, r in SIZES.items():
                img = Image.new("RGB", (40, 36), (235, 230, 225))
                d = ImageDraw.Draw(img)
                cx, cy = 20 + rng.randint(-3, 3), 18 + rng.randint(-3, 3)
                box = (cx - r, cy - r, cx + r, cy + r)
                (d.ellipse if shape == "circle" else d.rectangle)(box, fill=rgb)
                name = f"images/{i:02d}_{size}_{colour}_{shape}.png"
                img.save(os.path.join(OUT, name))
                text = f"{size} size, {'round' if shape == 'circle' else 'angular'} shape, {colour} colour, {shape}"
                rows.append({"image": name, "text": text})
                i += 1
    with open(os.path.join(OUT, "pairs.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(OUT, "pairs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "text"])
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
