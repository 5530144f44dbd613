//! Benchmark protocols: image-description pairs and MCQ sets per benchmark.
//!
//! The reference draws every random choice of its benchmark protocols (which attribute is asked per
//! WBCAtt image, distractors, option shuffles, splits) with Python's `random` module: seed 0 in
//! prepare, seed 1 in eval, one generator consumed in file order (see `METHOD.md`, "Image-description
//! pairs and MCQ sets per benchmark"). Reproducing the reference's exact items therefore needs that
//! generator bit for bit; [`pyrandom::PyRandom`] is a port of CPython 3.11's `random.Random`
//! (MT19937 with Python's integer seeding, `getrandbits`, `random`, `randrange`, `shuffle`, `sample`),
//! tested against sequences recorded from CPython (`scripts/make_pyrandom_fixtures.py`).

pub mod cbis;
pub mod letterbox;
pub mod mimic_cxr;
pub mod prepare;
pub mod pyrandom;
pub mod skincon;
pub mod wbcatt;
