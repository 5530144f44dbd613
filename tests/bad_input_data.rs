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

