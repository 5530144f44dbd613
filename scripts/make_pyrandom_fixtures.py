#!/usr/bin/env python3
"""Expected outputs of CPython's `random.Random` for the Rust port in `src/bench/pyrandom.rs`.

Generated with CPython 3.11.7 (`random` module from the standard library, no third-party packages).
The sampling algorithms used here (`_randbelow_with_getrandbits`, `shuffle`, `sample`) are those of
CPython 3.11; MT19937 seeding and `getrandbits` / `random` are unchanged since 3.2.

Run from the repository root:

    python3 scripts/make_pyrandom_fixtures.py

It writes `tests/fixtures/pyrandom/expected.json`, read by `cargo test --lib bench::pyrandom`.
Floats are stored as `repr` strings (shortest round-trip decimal) so they parse back bit-exactly.
"""

import json
import os
import random
import sys

SEEDS = [0, 1, 42, 2**32 + 5]
BELOW_NS = [1, 2, 5, 7, 100, 1000, 2**31, 2**40]
BITS_KS = [1, 5, 31, 32, 33, 53, 63, 64]
# A stand-in for the 808 SKINCON combination strings: only the indices matter to the generator.
STRINGS_808 = [f"combo-{i:03d}" for i in range(808)]


def per_seed(seed):
    out = {"seed": seed}

    r = random.Random(seed)
    out["getrandbits32"] = [r.getrandbits(32) for _ in range(20)]

    r = random.Random(seed)
    out["random"] = [repr(r.random()) for _ in range(10)]

    r = random.Random(seed)
    out["getrandbits_k"] = [[k, [r.getrandbits(k) for _ in range(3)]] for k in BITS_KS]

    r = random.Random(seed)
    out["randbelow"] = [[n, [r._randbelow(n) for _ in range(10)]] for n in BELOW_NS]

    r = random.Random(seed)
    out["randrange"] = [[n, [r.randrange(0, n) for _ in range(10)]] for n in BELOW_NS]

    r = random.Random(seed)
    out["randrange_offset"] = [r.randrange(-50, 50) for _ in range(10)]
    out["randint"] = [r.randint(1, 6) for _ in range(10)]
    out["choice"] = [r.choice(STRINGS_808) for _ in range(5)]

    shuffles = {}
    for n in (10, 48):
        r = random.Random(seed)
        x = list(range(n))
        seq = []
        for _ in range(3):
            r.shuffle(x)
            seq.append(list(x))
        shuffles[str(n)] = seq
    out["shuffle"] = shuffles

    samples = {}
    r = random.Random(seed)
    samples["range100_k5"] = r.sample(range(100), 5)  # n=100 > setsize 21: set branch
    r = random.Random(seed)
    samples["range30_k25"] = r.sample(range(30), 25)  # setsize 21+256: pool branch
    r = random.Random(seed)
    samples["range20_k5"] = r.sample(range(20), 5)  # n=20 <= 21: pool branch, k <= 5
    r = random.Random(seed)
    samples["strings808_k4"] = r.sample(STRINGS_808, 4)  # set branch
    r = random.Random(seed)
    samples["strings808_k300"] = r.sample(STRINGS_808, 300)  # 21+4**7 > 808: pool branch
    r = random.Random(seed)
    samples["range2000_k300"] = r.sample(range(2000), 300)  # 21+4**5 < 2000: set branch, reselections
    r = random.Random(seed)
    samples["range10_k0"] = r.sample(range(10), 0)
    r = random.Random(seed)
    samples["range7_k7"] = r.sample(range(7), 7)
    out["sample"] = samples

    # One generator consumed by a mix of calls, as the benchmark preparation does.
    r = random.Random(seed)
    mixed = []
    keys = list(range(12))
    r.shuffle(keys)
    mixed.append(list(keys))
    mixed.append(r.sample(range(8), 4))
    mixed.append(r.randrange(0, 10))
    distractors = r.sample(STRINGS_808, 4)
    opts = [STRINGS_808[0]] + distractors
    r.shuffle(opts)
    mixed.append(opts)
    mixed.append(r.getrandbits(40))
    mixed.append(repr(r.random()))
    mixed.append(r.randint(-3, 3))
    mixed.append(r.choice(STRINGS_808))
    mixed.append(r.sample(range(2000), 300)[-5:])
    big = list(range(48))
    r.shuffle(big)
    mixed.append(big)
    mixed.append(r.getrandbits(32))
    out["mixed"] = mixed
    return out


def main():
    assert sys.version_info[:2] == (3, 11), "fixtures are pinned to CPython 3.11 algorithms"
    data = {
        "python": sys.version.split()[0],
        "strings808": "combo-{i:03d} for i in range(808)",
        "seeds": [per_seed(s) for s in SEEDS],
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "fixtures", "pyrandom", "expected.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
