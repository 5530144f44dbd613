//! Synthetic image–description pairs for tests and demos.
//!
//! Each image shows one filled shape on a plain background, and its description lists the
//! picture's attributes comma-separated in the style of WBCAtt ("small cell size, round cell
//! shape, ..., Neutrophil"):
//!
//! ```text
//! big size, triangular shape, purple colour, striped texture, dark background, Alphacyte
//! ```
//!
//! Attributes are drawn independently and uniformly per image: size {small, big}, shape
//! {circle, square, triangle} (written `round`, `square`, `triangular`), colour {red, green,
//! blue, purple}, texture {plain, striped} and background {light, dark}. The last field is a
//! made-up class name that is a function of (shape, colour) only, see [`class_label`], so a model
//! has to look at two attributes at once to predict it.
//!
//! Everything is deterministic for a seed: sample `i` is generated from its own ChaCha8 stream
//! (seed, stream `i`), so the first `n` samples of a larger set equal a set of `n` samples with the
//! same seed and image size, and the output files are byte-identical across runs.

use std::fs;
use std::path::{Path, PathBuf};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{Error, Result};

/// The smallest image side [`write_synthetic_pairs`] accepts; below it the shapes are a few pixels.
pub const MIN_IMAGE_SIZE: u32 = 16;
/// Largest image side accepted (a 4096² RGB image is 48 MiB in memory, one per worker thread).
pub const MAX_IMAGE_SIZE: u32 = 4096;
/// Most pairs one call writes (the names and descriptions are held in memory).
pub const MAX_COUNT: usize = 1_000_000;

/// The class names [`class_label`] can return.
pub const CLASS_NAMES: [&str; 5] = [
    "Alphacyte",
    "Betacyte",
    "Gammacyte",
    "Deltacyte",
    "Epsilocyte",
];

const SIZES: [&str; 2] = ["small", "big"];
/// Shape nouns and the adjective the description uses for each.
const SHAPES: [(&str, &str); 3] = [
    ("circle", "round"),
    ("square", "square"),
    ("triangle", "triangular"),
];
const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [205, 40, 40]),
    ("green", [40, 165, 60]),
    ("blue", [40, 70, 210]),
    ("purple", [140, 50, 175]),
];
const TEXTURES: [&str; 2] = ["plain", "striped"];
const BACKGROUNDS: [(&str, [u8; 3]); 2] = [("light", [225, 222, 212]), ("dark", [35, 36, 48])];

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSpec {
    /// Number of image–description pairs.
    pub count: usize,
    /// Side of the square images in pixels ([`MIN_IMAGE_SIZE`]..=[`MAX_IMAGE_SIZE`]), e.g. 224
    /// or 48.
    pub image_size: u32,
    pub seed: u64,
}

impl Default for SynthSpec {
    /// 200 images of 224 px, seed 0 (the `synth-pairs` defaults).
    fn default() -> Self {
        SynthSpec {
            count: 200,
            image_size: 224,
            seed: 0,
        }
    }
}

/// One written pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SynthSample {
    /// Image path relative to the output directory, always with `/`: `images/00012.png`.
    #[serde(rename = "image")]
    pub file: String,
    /// `"{size} size, {shape} shape, {colour} colour, {texture} texture, {background}
    /// background, {label}"`.
    pub text: String,
}

/// The class of a shape–colour combination: `CLASS_NAMES[(shape + colour) % 5]` with shapes
/// indexed circle 0, square 1, triangle 2 and colours red 0, green 1, blue 2, purple 3. `shape`
/// may be the noun (`circle`, `triangle`) or the adjective used in descriptions (`round`,
/// `triangular`). `None` for an unknown shape or colour.
pub fn class_label(shape: &str, colour: &str) -> Option<&'static str> {
    let s = SHAPES
        .iter()
        .position(|(noun, adj)| shape == *noun || shape == *adj)?;
    let c = COLOURS.iter().position(|(name, _)| colour == *name)?;
    Some(CLASS_NAMES[(s + c) % CLASS_NAMES.len()])
}

/// The attributes of one image, as indices into the tables above.
#[derive(Debug, Clone, Copy)]
struct Attributes {
    size: usize,
    shape: usize,
    colour: usize,
    texture: usize,
    background: usize,
}

impl Attributes {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        Attributes {
            size: rng.random_range(0..SIZES.len()),
            shape: rng.random_range(0..SHAPES.len()),
            colour: rng.random_range(0..COLOURS.len()),
            texture: rng.random_range(0..TEXTURES.len()),
            background: rng.random_range(0..BACKGROUNDS.len()),
        }
    }

    fn description(&self) -> String {
        let shape = SHAPES[self.shape].1;
        let colour = COLOURS[self.colour].0;
        let label = class_label(shape, colour).expect("table entries have a class");
        format!(
            "{} size, {shape} shape, {colour} colour, {} texture, {} background, {label}",
            SIZES[self.size], TEXTURES[self.texture], BACKGROUNDS[self.background].0,
        )
    }
}

/// Generates sample `index` of `spec` in memory: its description and its image, exactly as
/// [`write_synthetic_pairs`] writes them. `spec.count` is not used.
pub fn generate_sample(spec: &SynthSpec, index: usize) -> (String, RgbImage) {
    let (attrs, img, _) = sample(spec, index);
    (attrs.description(), img)
}

/// Sample `index`: its attributes, its image and the (jittered) centre of its shape in pixels.
fn sample(spec: &SynthSpec, index: usize) -> (Attributes, RgbImage, (f32, f32)) {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    rng.set_stream(index as u64);
    let attrs = Attributes::draw(&mut rng);
    let s = spec.image_size as f32;
    let jitter = 0.06 * s;
    let cx = s / 2.0 + rng.random_range(-jitter..=jitter);
    let cy = s / 2.0 + rng.random_range(-jitter..=jitter);
    let img = render(&attrs, spec.image_size, (cx, cy), &mut rng);
    (attrs, img, (cx, cy))
}

/// Draws the picture: background, the shape centred on `(cx, cy)`, stripes, noise.
fn render(a: &Attributes, side: u32, (cx, cy): (f32, f32), rng: &mut ChaCha8Rng) -> RgbImage {
    let s = side as f32;
    let half = if a.size == 0 { 0.18 * s } else { 0.36 * s };
    let period = (side / 12).max(4);
    let fill = COLOURS[a.colour].1;
    let stripe = fill.map(|v| (v as u32 * 2 / 5) as u8);
    let background = BACKGROUNDS[a.background].1;
    let striped = a.texture == 1;

    let inside = |x: f32, y: f32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match a.shape {
            0 => dx * dx + dy * dy <= half * half,
            1 => dx.abs() <= 0.85 * half && dy.abs() <= 0.85 * half,
            // Apex up at (cx, cy - half), base from (cx -/+ half, cy + half): the half-width at
            // height dy is (dy + half) / 2.
            _ => dy.abs() <= half && dx.abs() <= (dy + half) / 2.0,
        }
    };

    let mut img = RgbImage::new(side, side);
    for (x, y, px) in img.enumerate_pixels_mut() {
        // Pixel centres, so shapes are symmetric about the jittered centre.
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        let base = if !inside(fx, fy) {
            background
        } else if striped && ((x + y) / period).is_multiple_of(2) {
            stripe
        } else {
            fill
        };
        // Mild noise: an independent offset in -6..=6 per channel from one 32-bit draw.
        let bits: u32 = rng.random();
        let mut out = [0u8; 3];
        for (ch, v) in out.iter_mut().enumerate() {
            let n = ((bits >> (8 * ch)) & 0xff) as i32 % 13 - 6;
            *v = (base[ch] as i32 + n).clamp(0, 255) as u8;
        }
        *px = Rgb(out);
    }
    img
}

/// Writes `spec.count` synthetic pairs under `out`:
/// - `out/images/NNNNN.png` (zero-padded to 5 digits, more when `count` needs them);
/// - `out/pairs.jsonl`: one `{"image": "images/NNNNN.png", "text": ...}` per line;
/// - `out/pairs.csv`: the same with the header `image,text`.
///
/// Directories are created as needed. Every file is written to a temporary file in its final
/// directory and renamed into place, so readers never see a partial file; images left over from an
/// earlier, larger set stay but are not listed. Output is byte-identical for the same spec.
/// Images are generated in parallel across the available cores.
///
/// Errors: [`Error::Config`] (key `image_size`) when `spec.image_size` is outside
/// [`MIN_IMAGE_SIZE`]..=[`MAX_IMAGE_SIZE`], (key `count`) when `spec.count` exceeds [`MAX_COUNT`],
/// both before anything is written; [`Error::Io`] naming the path that could not be created or written.
pub fn write_synthetic_pairs(out: &Path, spec: &SynthSpec) -> Result<Vec<SynthSample>> {
    if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&spec.image_size) {
        return Err(Error::Config {
            path: out.to_path_buf(),
            key: "image_size".into(),
            reason: format!(
                "synthetic images must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px wide, got {}",
                spec.image_size
            ),
        });
    }
    if spec.count > MAX_COUNT {
        return Err(Error::Config {
            path: out.to_path_buf(),
            key: "count".into(),
            reason: format!(
                "at most {MAX_COUNT} synthetic pairs per call, got {}",
                spec.count
            ),
        });
    }
    let images = out.join("images");
    fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;

    let names: Vec<String> = (0..spec.count).map(|i| image_name(i, spec.count)).collect();

    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(spec.count.max(1));
    let chunk = spec.count.div_ceil(workers).max(1);
    let texts: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..spec.count)
            .step_by(chunk)
            .map(|start| {
                let (names, images) = (&names, &images);
                scope.spawn(move || -> Result<Vec<String>> {
                    let end = (start + chunk).min(spec.count);
                    (start..end)
                        .map(|i| {
                            let (text, img) = generate_sample(spec, i);
                            write_atomic(&images.join(&names[i]), &encode_png(&img))?;
                            Ok(text)
                        })
                        .collect()
                })
            })
            .collect();
        let mut texts = Vec::with_capacity(spec.count);
        for h in handles {
            texts.extend(h.join().expect("synthetic image worker panicked")?);
        }
        Ok::<_, Error>(texts)
    })?;

    let samples: Vec<SynthSample> = names
        .iter()
        .zip(texts)
        .map(|(name, text)| SynthSample {
            file: format!("images/{name}"),
            text,
        })
        .collect();

    let jsonl_path = out.join("pairs.jsonl");
    let mut jsonl = String::new();
    for s in &samples {
        jsonl.push_str(&serde_json::to_string(s).map_err(|e| Error::json(&jsonl_path, e))?);
        jsonl.push('\n');
    }
    write_atomic(&jsonl_path, jsonl.as_bytes())?;

    let mut csv = String::from("image,text\n");
    for s in &samples {
        csv.push_str(&format!("{},{}\n", csv_field(&s.file), csv_field(&s.text)));
    }
    write_atomic(&out.join("pairs.csv"), csv.as_bytes())?;

    Ok(samples)
}

/// `NNNNN.png`: the index zero-padded to 5 digits, or to as many as the largest index has.
fn image_name(index: usize, count: usize) -> String {
    let width = count.saturating_sub(1).to_string().len().max(5);
    format!("{index:0width$}.png")
}

/// PNG bytes of `img`; fast compression since the noise makes the pixels incompressible anyway.
fn encode_png(img: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, FilterType::Sub)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encoding an in-memory RGB8 PNG cannot fail");
    bytes
}

/// A CSV field, quoted (quotes doubled) when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes `bytes` to a hidden temporary file next to `path`, then renames it over `path`. The
/// temporary file is removed if anything fails.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::pairs::{load_pairs, PairSource};

    fn spec(count: usize, image_size: u32, seed: u64) -> SynthSpec {
        SynthSpec {
            count,
            image_size,
            seed,
        }
    }

    fn write(spec: &SynthSpec) -> (tempfile::TempDir, Vec<SynthSample>) {
        let dir = tempfile::tempdir().unwrap();
        let samples = write_synthetic_pairs(dir.path(), spec).unwrap();
        (dir, samples)
    }

    fn read(dir: &tempfile::TempDir, rel: &str) -> Vec<u8> {
        fs::read(dir.path().join(rel)).unwrap()
    }

    #[test]
    fn same_seed_gives_identical_bytes() {
        let s = spec(12, 48, 7);
        let (a, sa) = write(&s);
        let (b, sb) = write(&s);
        assert_eq!(sa, sb);
        for f in [
            "pairs.jsonl",
            "pairs.csv",
            "images/00000.png",
            "images/00011.png",
        ] {
            assert_eq!(read(&a, f), read(&b, f), "{f} differs");
        }
    }

    #[test]
    fn different_seeds_differ() {
        let (a, sa) = write(&spec(12, 48, 1));
        let (b, sb) = write(&spec(12, 48, 2));
        assert_ne!(sa, sb);
        assert_ne!(read(&a, "pairs.jsonl"), read(&b, "pairs.jsonl"));
        assert_ne!(read(&a, "images/00000.png"), read(&b, "images/00000.png"));
    }

    #[test]
    fn a_smaller_set_is_a_prefix_of_a_larger_one() {
        let (a, sa) = write(&spec(5, 32, 3));
        let (b, sb) = write(&spec(20, 32, 3));
        assert_eq!(sa[..], sb[..5]);
        assert_eq!(read(&a, "images/00004.png"), read(&b, "images/00004.png"));
    }

    #[test]
    fn counts_names_and_manifests() {
        let (dir, samples) = write(&spec(23, 32, 0));
        assert_eq!(samples.len(), 23);
        assert_eq!(samples[0].file, "images/00000.png");
        assert_eq!(samples[22].file, "images/00022.png");
        let pngs = fs::read_dir(dir.path().join("images")).unwrap().count();
        assert_eq!(pngs, 23);
        // No temporary files left behind.
        for entry in fs::read_dir(dir.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.starts_with('.'), "leftover {name}");
        }

        let jsonl = String::from_utf8(read(&dir, "pairs.jsonl")).unwrap();
        let lines: Vec<&str> = jsonl.lines().collect();
        assert_eq!(lines.len(), 23);
        for (line, s) in lines.iter().zip(&samples) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["image"], s.file.as_str());
            assert_eq!(v["text"], s.text.as_str());
        }
        let csv = String::from_utf8(read(&dir, "pairs.csv")).unwrap();
        assert!(csv.starts_with("image,text\n"));
        assert_eq!(csv.lines().count(), 24);
        assert_eq!(
            csv.lines().nth(1).unwrap(),
            format!("images/00000.png,\"{}\"", samples[0].text)
        );

        // Both manifests load with the crate's own reader, to the same pairs.
        for manifest in ["pairs.jsonl", "pairs.csv"] {
            let pairs = load_pairs(&PairSource::new(dir.path().join(manifest))).unwrap();
            assert_eq!(pairs.len(), 23);
            for (p, s) in pairs.iter().zip(&samples) {
                assert_eq!(p.image, dir.path().join(&s.file));
                assert_eq!(p.text, s.text);
            }
        }
    }

    #[test]
    fn image_names_widen_for_large_counts() {
        assert_eq!(image_name(0, 1), "00000.png");
        assert_eq!(image_name(12, 100_000), "00012.png");
        assert_eq!(image_name(12, 100_001), "000012.png");
        assert_eq!(image_name(1_234_567, 2_000_000), "1234567.png");
    }

    #[test]
    fn descriptions_have_six_fields_and_a_consistent_label() {
        let (_dir, samples) = write(&spec(200, 16, 5));
        let mut labels = std::collections::BTreeSet::new();
        let mut seen = std::collections::BTreeSet::new();
        for s in &samples {
            let f: Vec<&str> = s.text.split(", ").collect();
            assert_eq!(f.len(), 6, "{}", s.text);
            assert_eq!(s.text.matches(',').count(), 5);
            let word = |field: &str, suffix: &str| -> String {
                field
                    .strip_suffix(suffix)
                    .unwrap_or_else(|| panic!("{field:?} lacks {suffix:?} in {}", s.text))
                    .to_string()
            };
            let size = word(f[0], " size");
            let shape = word(f[1], " shape");
            let colour = word(f[2], " colour");
            let texture = word(f[3], " texture");
            let background = word(f[4], " background");
            assert!(SIZES.contains(&size.as_str()));
            assert!(["round", "square", "triangular"].contains(&shape.as_str()));
            assert!(COLOURS.iter().any(|(c, _)| *c == colour));
            assert!(TEXTURES.contains(&texture.as_str()));
            assert!(BACKGROUNDS.iter().any(|(b, _)| *b == background));
            assert_eq!(Some(f[5]), class_label(&shape, &colour), "{}", s.text);
            labels.insert(f[5].to_string());
            seen.insert((size, shape, colour, texture, background));
        }
        // 200 draws cover every class and most of the 96 attribute combinations.
        assert_eq!(labels.len(), CLASS_NAMES.len());
        assert!(seen.len() > 60, "only {} combinations", seen.len());
    }

    #[test]
    fn class_label_is_a_function_of_shape_and_colour() {
        assert_eq!(class_label("circle", "red"), Some("Alphacyte"));
        assert_eq!(class_label("round", "red"), Some("Alphacyte"));
        assert_eq!(class_label("triangle", "blue"), Some("Epsilocyte"));
        assert_eq!(class_label("triangular", "purple"), Some("Alphacyte"));
        assert_eq!(class_label("square", "green"), Some("Gammacyte"));
        assert_eq!(class_label("hexagon", "red"), None);
        assert_eq!(class_label("circle", "teal"), None);
    }

    #[test]
    fn images_decode_at_the_right_size_and_show_the_description() {
        for side in [16u32, 48, 224] {
            let sp = spec(16, side, 11);
            let (dir, samples) = write(&sp);
            for (i, s) in samples.iter().enumerate() {
                let img = crate::data::image::load_rgb(&dir.path().join(&s.file)).unwrap();
                assert_eq!(img.dimensions(), (side, side), "{}", s.file);
                let (attrs, generated, (cx, cy)) = sample(&sp, i);
                assert_eq!(img, generated, "{}", s.file);
                assert_eq!(attrs.description(), s.text);

                let near = |px: &Rgb<u8>, want: [u8; 3]| {
                    px.0.iter()
                        .zip(want)
                        .all(|(&a, b)| (a as i32 - b as i32).abs() <= 6)
                };
                // The corner is always background, the shape's centre the colour (or its stripe).
                let bg = if s.text.contains("light background") {
                    BACKGROUNDS[0].1
                } else {
                    BACKGROUNDS[1].1
                };
                assert!(near(img.get_pixel(0, 0), bg), "{}: corner", s.text);
                let (_, fill) = *COLOURS
                    .iter()
                    .find(|(c, _)| s.text.contains(&format!(" {c} colour")))
                    .unwrap();
                let centre = img.get_pixel(cx as u32, cy as u32);
                let stripe = fill.map(|v| (v as u32 * 2 / 5) as u8);
                assert!(
                    near(centre, fill) || (s.text.contains("striped") && near(centre, stripe)),
                    "{}: centre {centre:?}",
                    s.text
                );
            }
        }
    }

    #[test]
    fn striped_and_plain_differ_in_variety_not_only_noise() {
        // A plain shape's interior stays within the noise band; a striped one holds two tones.
        let s = spec(64, 64, 9);
        let mut checked = [false; 2];
        for i in 0..s.count {
            let (attrs, img, (cx, cy)) = sample(&s, i);
            let text = attrs.description();
            if !text.starts_with("big") {
                continue;
            }
            let striped = text.contains("striped texture");
            let (x, y) = (cx as u32, cy as u32);
            let values: Vec<i32> = (x - 4..x + 4)
                .map(|x| img.get_pixel(x, y).0.iter().map(|&v| v as i32).sum())
                .collect();
            let spread = values.iter().max().unwrap() - values.iter().min().unwrap();
            assert_eq!(spread > 60, striped, "{text}: spread {spread}");
            checked[striped as usize] = true;
        }
        assert_eq!(checked, [true, true]);
    }

    #[test]
    fn rejects_tiny_images_and_unwritable_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_synthetic_pairs(dir.path(), &spec(1, 8, 0)).unwrap_err();
        assert!(matches!(err, Error::Config { ref key, .. } if key == "image_size"));
        let err = write_synthetic_pairs(dir.path(), &spec(1, 100_000, 0)).unwrap_err();
        assert!(matches!(err, Error::Config { ref key, .. } if key == "image_size"));
        let err = write_synthetic_pairs(dir.path(), &spec(usize::MAX, 16, 0)).unwrap_err();
        assert!(matches!(err, Error::Config { ref key, .. } if key == "count"));
        assert!(!dir.path().join("images").exists());

        let file = dir.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        let err = write_synthetic_pairs(&file, &spec(1, 16, 0)).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn zero_count_writes_empty_manifests() {
        let (dir, samples) = write(&spec(0, 16, 0));
        assert!(samples.is_empty());
        assert_eq!(read(&dir, "pairs.jsonl"), b"");
        assert_eq!(read(&dir, "pairs.csv"), b"image,text\n");
    }
}
