//! DICOM decoding to 8-bit grey: rescale, VOI window, min-max, signedness, MONOCHROME1, errors.

mod common;

use common::dicom::{write_dcm, Pixels};
use dicom_dictionary_std::tags;
use image::GrayImage;
use lvlm_ift::data::dicom::load_dicom_gray8;
use lvlm_ift::error::Error;

fn pixels(img: &GrayImage) -> Vec<u8> {
    img.as_raw().clone()
}

#[test]
fn window_uses_first_value_after_rescale() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("win.dcm");
    // Rescaled (2x - 100): -100, 100, 200, 300, 400, 1900. Window c=300 w=401 -> (99.5, 499.5].
    write_dcm(
        &p,
        (3, 2),
        Pixels::U16(vec![0, 100, 150, 200, 250, 1000]),
        "MONOCHROME2",
        &[
            (tags::RESCALE_SLOPE, "2"),
            (tags::RESCALE_INTERCEPT, "-100"),
            (tags::WINDOW_CENTER, "300\\50"),
            (tags::WINDOW_WIDTH, "401\\10"),
        ],
    );
    let img = load_dicom_gray8(&p).unwrap();
    assert_eq!(img.dimensions(), (3, 2));
    // 100 -> 0.31875 -> 0; 200 -> 64.07 -> 64; 300 -> 127.82 -> 128; 400 -> 191.57 -> 192.
    assert_eq!(pixels(&img), vec![0, 0, 64, 128, 192, 255]);
    assert_eq!(img.get_pixel(2, 1)[0], 255);
}

#[test]
fn no_window_is_min_max() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mm.dcm");
    write_dcm(
        &p,
        (2, 2),
        Pixels::U16(vec![10, 20, 30, 110]),
        "MONOCHROME2",
        &[],
    );
    let img = load_dicom_gray8(&p).unwrap();
    // (v - 10) / 100 * 255: 0, 25.5 -> 26, 51, 255.
    assert_eq!(pixels(&img), vec![0, 26, 51, 255]);
}

#[test]
fn signed_pixels_are_read_signed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("signed.dcm");
    write_dcm(&p, (3, 1), Pixels::I16(vec![-5, 0, 5]), "MONOCHROME2", &[]);
    assert_eq!(pixels(&load_dicom_gray8(&p).unwrap()), vec![0, 128, 255]);
}

#[test]
fn monochrome1_is_inverted() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m1.dcm");
    write_dcm(
        &p,
        (2, 2),
        Pixels::U16(vec![10, 20, 30, 110]),
        "MONOCHROME1",
        &[],
    );
    assert_eq!(
        pixels(&load_dicom_gray8(&p).unwrap()),
        vec![255, 229, 204, 0]
    );
    let q = dir.path().join("m1w.dcm");
    write_dcm(
        &q,
        (3, 2),
        Pixels::U16(vec![0, 100, 150, 200, 250, 1000]),
        "MONOCHROME1",
        &[
            (tags::RESCALE_SLOPE, "2"),
            (tags::RESCALE_INTERCEPT, "-100"),
            (tags::WINDOW_CENTER, "300"),
            (tags::WINDOW_WIDTH, "401"),
        ],
    );
    assert_eq!(
        pixels(&load_dicom_gray8(&q).unwrap()),
        vec![255, 255, 191, 127, 63, 0]
    );
}

#[test]
fn corrupt_file_is_image_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.dcm");
    std::fs::write(&p, b"DICM not really").unwrap();
    let err = load_dicom_gray8(&p).unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err:?}");
    assert!(err.to_string().contains("broken.dcm"), "{err}");
    let missing = dir.path().join("absent.dcm");
    let err = load_dicom_gray8(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.dcm"), "{err}");
}
