//! Bad input never panics, hangs or passes silently (issue 9), data side: decompression bombs,
//! `prepare` sources with unknown values or escaping paths, SKINCON's two layouts, integer dtypes
//! in float weights. (CSV manifests and path escapes in pair manifests are unit-tested in
//! `src/data/pairs/tests.rs`, the strict CSV reader in `src/data/csv_strict.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::bench::{abs_image, bench_fixture, compare, copy_dir, read_jsonl};
use common::dicom::{write_dcm, Pixels};
use common::fixtures;
use lvlm_ift::bench::prepare::PrepareOptions;
use lvlm_ift::bench::{letterbox, skincon, wbcatt};
use lvlm_ift::data::image::{decode_rgb, load_rgb, MAX_IMAGE_PIXELS};
use lvlm_ift::data::pairs::{load_pairs, PairSource};
use lvlm_ift::error::Error;

// ---------------------------------------------------------------------------------------------
// Decompression bombs

/// CRC-32 (IEEE) of PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A grey PNG of a few hundred bytes whose header declares `w`x`h`: a real 8x8 PNG from the `image`
/// encoder with the IHDR dimensions (and CRC) rewritten. Decoding it as declared would allocate
/// `w * h` bytes before finding the data short.
fn bomb_png(path: &Path, w: u32, h: u32) {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(image::GrayImage::new(8, 8))
        .write_to(&mut bytes, image::ImageFormat::Png)
        .unwrap();
    let mut b = bytes.into_inner();
    assert_eq!(&b[12..16], b"IHDR");
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(path, b).unwrap();
}

fn image_reason(err: Error) -> (PathBuf, String) {
    match err {
        Error::Image { path, reason } => (path, reason),
        other => panic!("expected Error::Image, got {other:?}"),
    }
}

const BOMB_REASON: &str = "20000x20000 = 400000000 pixels is over the limit of 178956970 pixels \
                           (PIL's decompression-bomb limit, 2 x Image.MAX_IMAGE_PIXELS)";

#[test]
fn images_over_pils_bomb_limit_are_refused_before_decoding() {
    assert_eq!(MAX_IMAGE_PIXELS, 2 * 89_478_485);
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.png");
    bomb_png(&bomb, 20_000, 20_000);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 1000);

    let err = load_rgb(&bomb).unwrap_err();
    println!("{err}");
    let (path, reason) = image_reason(err);
    assert_eq!(path, bomb);
    assert!(reason.starts_with(BOMB_REASON), "{reason}");

    let err = decode_rgb(&std::fs::read(&bomb).unwrap(), "member/bomb.png").unwrap_err();
    let (path, reason) = image_reason(err);
    assert_eq!(path, Path::new("member/bomb.png"));
    assert!(reason.starts_with(BOMB_REASON), "{reason}");

    let err = letterbox::letterbox_file(&bomb, &dir.path().join("out.png"), 8).unwrap_err();
    let (path, reason) = image_reason(err);
    assert_eq!(path, bomb);
    assert!(reason.starts_with(BOMB_REASON), "{reason}");

    // At the limit is fine as far as the pixel check goes (the data is short, so it fails later,
    // with the decoder's own message).
    let edge = dir.path().join("edge.png");
    bomb_png(&edge, 178_956_970, 1);
    let (_, reason) = image_reason(load_rgb(&edge).unwrap_err());
    assert!(!reason.contains("limit of 178956970"), "{reason}");
    let over = dir.path().join("over.png");
    bomb_png(&over, 178_956_971, 1);
    let (_, reason) = image_reason(load_rgb(&over).unwrap_err());
    assert!(
        reason.starts_with("178956971x1 = 178956971 pixels is over the limit"),
        "{reason}"
    );
}

#[test]
fn pair_manifests_refuse_bombs_when_checking_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bomb_png(&d.join("bomb.png"), 20_000, 20_000);
    let m = d.join("p.csv");
    std::fs::write(&m, "image,text\nbomb.png,a grey square\n").unwrap();
    let err = load_pairs(&PairSource::new(&m)).unwrap_err().to_string();
    println!("{err}");
    assert!(
        err.contains(&format!(
            "{}:2: cannot decode image {}: {BOMB_REASON}",
            m.display(),
            d.join("bomb.png").display()
        )),
        "{err}"
    );
}

#[test]
fn dicom_over_the_pixel_limit_is_refused_from_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bomb.dcm");
    write_dcm(
        &p,
        (60_000, 60_000),
        Pixels::U16(vec![0; 4]),
        "MONOCHROME2",
        &[],
    );
    let err = lvlm_ift::data::dicom::load_dicom_gray8(&p).unwrap_err();
    println!("{err}");
    let (path, reason) = image_reason(err);
    assert_eq!(path, p);
    assert!(
        reason.starts_with("60000x60000 = 3600000000 pixels is over the limit of 178956970"),
        "{reason}"
    );
}

// ---------------------------------------------------------------------------------------------
// prepare --benchmark wbcatt

/// A copy of the WBCAtt fixture in `TMP/src` with `edit` applied to the data lines of the train
/// file; returns `(TMP, TMP/src)`.
fn wbcatt_with_train(edit: impl Fn(usize, &str) -> String) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    copy_dir(&bench_fixture("wbcatt"), &src);
    let train = src.join("pbc_attr_v1_train.csv");
    let text = std::fs::read_to_string(&train).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for (i, l) in lines.iter_mut().enumerate().skip(1) {
        *l = edit(i + 1, l);
    }
    std::fs::write(&train, lines.join("\n") + "\n").unwrap();
    (dir, src)
}

/// Replace field `col` (0-based) of a CSV line without quotes.
fn set_field(line: &str, col: usize, value: &str) -> String {
    let mut f: Vec<&str> = line.split(',').collect();
    f[col] = value;
    f.join(",")
}

#[test]
fn wbcatt_unknown_and_empty_train_values_are_listed_and_left_out() {
    // Line 2: cytoplasm_texture (column 8) "medium", not in [clear, frosted];
    // line 3: an empty label (column 1); line 4: an empty last attribute (granularity, column 12).
    let (dir, src) = wbcatt_with_train(|line, l| match line {
        2 => set_field(l, 8, "medium"),
        3 => set_field(l, 1, ""),
        4 => set_field(l, 12, ""),
        _ => l.to_string(),
    });
    let out = dir.path().join("out");
    let summary = wbcatt::prepare(&src, &out, &PrepareOptions::default()).unwrap();
    let train = read_jsonl(&out.join("train.jsonl"));
    // No row is dropped: each is described by its other attributes.
    assert_eq!(train.len(), 10);
    for p in &train {
        let t = p["text"].as_str().unwrap();
        assert!(!t.contains("medium"), "{t}");
        assert!(
            !t.ends_with(", ") && !t.ends_with(',') && !t.contains(", ,") && !t.starts_with(','),
            "{t:?}"
        );
        assert!(t.split(", ").all(|piece| !piece.trim().is_empty()), "{t:?}");
    }
    let reasons: Vec<String> = summary
        .skipped
        .iter()
        .map(|s| format!("{}: {}", s.source, s.reason))
        .collect();
    println!("{reasons:#?}");
    for want in [
        "pbc_attr_v1_train.csv:2: unknown value \"medium\" for `cytoplasm_texture` (options: \
         clear, frosted); attribute left out of the training description",
        "pbc_attr_v1_train.csv:3: empty value for `label` (options: Basophil, Eosinophil, \
         Lymphocyte, Monocyte, Neutrophil); attribute left out of the training description",
        "pbc_attr_v1_train.csv:4: empty value for `granularity` (options: yes, no); attribute \
         left out of the training description",
    ] {
        assert!(
            reasons.iter().any(|r| r == want),
            "missing {want:?} in {reasons:#?}"
        );
    }
    // The fixture's own unknown test value is still reported for its question.
    assert!(reasons
        .iter()
        .any(|r| r.starts_with("pbc_attr_v1_test.csv:5: unknown value \"medium\"")));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(written["skipped"].as_array().unwrap().len(), 4);
}

#[test]
fn wbcatt_description_never_has_empty_or_unknown_pieces() {
    let mut values: [String; 12] = std::array::from_fn(|_| "nil".to_string());
    values[0] = "big".into(); // cell_size
    values[7] = "".into(); // cytoplasm_colour
    values[11] = "".into(); // label
    assert_eq!(wbcatt::description(&values), "big cell size");
    values[11] = "Blast".into();
    assert_eq!(wbcatt::description(&values), "big cell size");
    assert_eq!(
        wbcatt::unknown_values(&values),
        vec![("cytoplasm_colour", ""), ("label", "Blast")]
    );
}

#[test]
fn wbcatt_paths_outside_the_source_are_errors_naming_file_and_line() {
    for (bad, what) in [
        ("../outside.png", "dot-dot"),
        ("PBC_dataset_normal_DIB/../../outside.png", "nested dot-dot"),
        ("/etc/hostname", "absolute"),
    ] {
        let (dir, src) = wbcatt_with_train(|line, l| {
            if line == 3 {
                set_field(l, 13, bad)
            } else {
                l.to_string()
            }
        });
        // The escaping file exists, so only the path check can refuse it.
        std::fs::copy(
            src.join("PBC_dataset_normal_DIB/basophil/TR_BAS_000.png"),
            dir.path().join("outside.png"),
        )
        .unwrap();
        let err = wbcatt::prepare(&src, &dir.path().join("out"), &PrepareOptions::default())
            .unwrap_err()
            .to_string();
        println!("{err}");
        assert!(
            err.contains(&format!(
                "1 image path(s) outside the source directory (absolute, or `..` climbing above \
                 it; `path` must be relative to the source directory and stay inside it): \
                 pbc_attr_v1_train.csv:3: {bad}"
            )),
            "{what}: {err}"
        );
        assert!(!dir.path().join("out/train.jsonl").exists(), "{what}");
    }
}

// ---------------------------------------------------------------------------------------------
// prepare --benchmark skincon: the release's and the reference's layouts

/// A copy of the SKINCON fixture in the reference's layout.
fn skincon_reference_layout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&bench_fixture("skincon"), dir.path());
    std::fs::rename(
        dir.path().join(skincon::ANNOTATIONS),
        dir.path().join(skincon::REFERENCE_ANNOTATIONS),
    )
    .unwrap();
    std::fs::rename(
        dir.path().join(skincon::IMAGE_DIR),
        dir.path().join(skincon::REFERENCE_IMAGE_DIR),
    )
    .unwrap();
    dir
}

#[test]
fn skincon_reads_the_reference_layout_and_says_so() {
    let dir = skincon_reference_layout();
    let src = dir.path().canonicalize().unwrap();
    let out = tempfile::tempdir().unwrap();
    let summary = skincon::prepare(&src, out.path(), &PrepareOptions::default()).unwrap();
    assert_eq!(
        summary.layout.as_deref(),
        Some("reference (fitzpatrick17k_anno.csv, fitzpatrick17k/)")
    );
    // The same pairs and items as from the release layout, the images in the other directory.
    let base = bench_fixture("skincon");
    let img = abs_image(&src);
    let img = |rel: &str| img(&rel.replacen("images/", "fitzpatrick17k/", 1));
    for (file, exp) in [
        ("train.jsonl", "expected_train.jsonl"),
        ("val.jsonl", "expected_val.jsonl"),
        ("mcq_val.jsonl", "expected_mcq_val.jsonl"),
        ("mcq_test.jsonl", "expected_mcq_test.jsonl"),
    ] {
        compare(&out.path().join(file), &base.join(exp), &img);
    }
    let items = read_jsonl(&out.path().join("mcq_val.jsonl"));
    assert!(items[0]["source"]
        .as_str()
        .unwrap()
        .contains("fitzpatrick17k_anno.csv:"));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        written["layout"],
        "reference (fitzpatrick17k_anno.csv, fitzpatrick17k/)"
    );

    // The release layout says so too.
    let out = tempfile::tempdir().unwrap();
    let summary = skincon::prepare(&base, out.path(), &PrepareOptions::default()).unwrap();
    assert_eq!(
        summary.layout.as_deref(),
        Some("release (annotations_fitzpatrick17k.csv, images/)")
    );
}

#[test]
fn skincon_with_both_or_neither_layout_is_an_error_listing_what_was_looked_for() {
    let looked_for =
        "looked for annotations_fitzpatrick17k.csv with images/ (the SKINCON release) \
                      or fitzpatrick17k_anno.csv with fitzpatrick17k/ (the reference's \
                      preprocessing)";
    let dir = skincon_reference_layout();
    copy_dir(
        &bench_fixture("skincon").join(skincon::IMAGE_DIR),
        &dir.path().join(skincon::IMAGE_DIR),
    );
    std::fs::copy(
        bench_fixture("skincon").join(skincon::ANNOTATIONS),
        dir.path().join(skincon::ANNOTATIONS),
    )
    .unwrap();
    let prep = |d: &Path| {
        skincon::prepare(d, &d.join("out"), &PrepareOptions::default())
            .unwrap_err()
            .to_string()
    };
    let err = prep(dir.path());
    println!("{err}");
    assert!(
        err.contains(&format!(
            "both annotations_fitzpatrick17k.csv and fitzpatrick17k_anno.csv are present, so \
             which annotations to read is ambiguous; keep one ({looked_for})"
        )),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = prep(empty.path());
    println!("{err}");
    assert!(
        err.contains(&format!("no SKINCON annotation file found; {looked_for}")),
        "{err}"
    );

    // The reference's file without its image directory.
    std::fs::remove_file(dir.path().join(skincon::ANNOTATIONS)).unwrap();
    std::fs::remove_dir_all(dir.path().join(skincon::REFERENCE_IMAGE_DIR)).unwrap();
    let err = prep(dir.path());
    println!("{err}");
    assert!(
        err.contains(&format!(
            "fitzpatrick17k_anno.csv is present but its image directory fitzpatrick17k/ is not; \
             {looked_for}"
        )),
        "{err}"
    );
}

#[test]
fn skincon_cli_prints_the_layout_it_found() {
    let dir = skincon_reference_layout();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_lvlm-ift"))
        .args(["-v", "prepare", "--benchmark", "skincon", "--source"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("source layout: reference (fitzpatrick17k_anno.csv, fitzpatrick17k/)"),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("skincon: reference (fitzpatrick17k_anno.csv, fitzpatrick17k/) layout found"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Weights: an integer dtype for a float parameter

#[test]
fn integer_dtype_for_a_float_weight_is_an_error_naming_tensor_dtype_and_file() {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-llava"), dir.path());
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let target = "language_model.model.norm.weight";
    {
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let views: Vec<(String, TensorView)> = st
            .tensors()
            .into_iter()
            .map(|(name, v)| {
                if name == target {
                    assert_eq!(v.dtype(), Dtype::F32);
                    // The same bytes, declared as U32.
                    let v = TensorView::new(Dtype::U32, v.shape().to_vec(), v.data()).unwrap();
                    (name, v)
                } else {
                    (name, v)
                }
            })
            .collect();
        let meta = Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize_to_file(views, meta, &file).unwrap();
    }
    let err = lvlm_ift::model::llava::LlavaModel::load(dir.path(), Default::default())
        .err()
        .expect("a U32 weight must not load")
        .to_string();
    println!("{err}");
    assert!(
        err.contains(&format!(
            "weight `{target}` in {} is stored as U32, not a float dtype; \
             `model.language_model.norm.weight` is a float parameter",
            file.display()
        )),
        "{err}"
    );
}
