//! DICOM decoding for single-channel (monochrome) images such as CBIS-DDSM's cropped-ROI `.dcm`
//! files.
//!
//! [`load_dicom_gray8`] decodes the first frame (uncompressed, JPEG or RLE transfer syntaxes) and
//! maps it to 8 bits:
//! 1. **Modality LUT**: `v = stored * RescaleSlope + RescaleIntercept` (defaults 1 and 0; first value
//!    when multi-valued). Stored values honour BitsStored and PixelRepresentation (signed/unsigned).
//! 2. **VOI**: with WindowCenter `c` and WindowWidth `w` (first value of each; `w >= 1`), the linear
//!    function of DICOM PS3.3 C.11.2.1.2.1 to `[0, 255]`: `v <= c - 0.5 - (w - 1) / 2` -> 0,
//!    `v > c - 0.5 + (w - 1) / 2` -> 255, else `((v - (c - 0.5)) / (w - 1) + 0.5) * 255`. Without a
//!    (usable) window: min–max of the rescaled frame, `(v - min) / (max - min) * 255` (a constant
//!    frame maps to 0). Results are rounded to the nearest integer.
//! 3. **MONOCHROME1** (higher values are darker) is inverted: `255 - y`.
//!
//! Only top-level attributes are read (functional groups of enhanced multi-frame objects are not).
//! Colour images (RGB, YBR, palette) are refused.

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{open_file, DefaultDicomObject, Tag};
use dicom_pixeldata::{
    ConvertOptions, ModalityLutOption, PhotometricInterpretation, PixelDecoder, Rescale,
    VoiLutOption,
};
use image::GrayImage;

use crate::error::{Error, Result};

/// Decodes the first frame of the DICOM file at `path` to 8-bit grey with the rules in the module
/// docs. A missing file is an [`Error::Io`]; anything else wrong is an [`Error::Image`] naming
/// `path`.
pub fn load_dicom_gray8(path: &Path) -> Result<GrayImage> {
    std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let err = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let obj = open_file(path).map_err(|e| err(format!("not a readable DICOM file: {e}")))?;
    let decoded = obj
        .decode_pixel_data_frame(0)
        .map_err(|e| err(format!("cannot decode DICOM pixel data: {e}")))?;
    let photometric = decoded.photometric_interpretation().clone();
    let invert = match photometric {
        PhotometricInterpretation::Monochrome1 => true,
        PhotometricInterpretation::Monochrome2 => false,
        ref other => {
            return Err(err(format!(
                "unsupported PhotometricInterpretation {other} (only MONOCHROME1/2 are read)"
            )))
        }
    };
    if decoded.samples_per_pixel() != 1 {
        return Err(err(format!(
            "SamplesPerPixel is {}, expected 1 for a monochrome image",
            decoded.samples_per_pixel()
        )));
    }
    let (width, height) = (decoded.columns(), decoded.rows());
    let slope = first_f64(&obj, tags::RESCALE_SLOPE).map_err(&err)?;
    let intercept = first_f64(&obj, tags::RESCALE_INTERCEPT).map_err(&err)?;
    let rescale = Rescale::new(slope.unwrap_or(1.0), intercept.unwrap_or(0.0));
    let options = ConvertOptions::new()
        .with_modality_lut(ModalityLutOption::Override(rescale))
        .with_voi_lut(VoiLutOption::Identity);
    let values: Vec<f64> = decoded
        .to_vec_frame_with_options(0, &options)
        .map_err(|e| err(format!("cannot convert DICOM pixel data: {e}")))?;
    let expected = width as usize * height as usize;
    if values.len() != expected {
        return Err(err(format!(
            "pixel data holds {} values for a {width}x{height} frame",
            values.len()
        )));
    }
    let center = first_f64(&obj, tags::WINDOW_CENTER).map_err(&err)?;
    let width_w = first_f64(&obj, tags::WINDOW_WIDTH).map_err(&err)?;
    let window = match (center, width_w) {
        (Some(c), Some(w)) if c.is_finite() && w.is_finite() && w >= 1.0 => Some((c, w)),
        _ => None,
    };
    let mapped: Vec<f64> = match window {
        Some((c, w)) => values.iter().map(|&v| window_linear(v, c, w)).collect(),
        None => min_max(&values),
    };
    let pixels: Vec<u8> = mapped
        .into_iter()
        .map(|y| {
            let y = y.round().clamp(0.0, 255.0) as u8;
            if invert {
                255 - y
            } else {
                y
            }
        })
        .collect();
    GrayImage::from_raw(width, height, pixels)
        .ok_or_else(|| err(format!("cannot build a {width}x{height} image")))
}

/// The first value of a numeric (DS/FD/...) attribute, `None` when absent or empty.
fn first_f64(obj: &DefaultDicomObject, tag: Tag) -> Result<Option<f64>, String> {
    let Some(elem) = obj.element_opt(tag).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if elem.to_str().is_ok_and(|s| s.trim().is_empty()) {
        return Ok(None);
    }
    let vals = elem
        .to_multi_float64()
        .map_err(|e| format!("attribute {tag}: cannot read a number: {e}"))?;
    Ok(vals.first().copied())
}

/// DICOM PS3.3 C.11.2.1.2.1 linear VOI function onto `[0, 255]` (unrounded).
fn window_linear(v: f64, c: f64, w: f64) -> f64 {
    let lo = c - 0.5 - (w - 1.0) / 2.0;
    let hi = c - 0.5 + (w - 1.0) / 2.0;
    if v <= lo {
        0.0
    } else if v > hi {
        255.0
    } else {
        ((v - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    }
}

/// Min–max normalisation onto `[0, 255]` (unrounded); a constant frame maps to 0.
fn min_max(values: &[f64]) -> Vec<f64> {
    let (lo, hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if hi <= lo {
        return vec![0.0; values.len()];
    }
    values
        .iter()
        .map(|&v| (v - lo) / (hi - lo) * 255.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::uids;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    enum Pixels {
        U16(Vec<u16>),
        I16(Vec<i16>),
    }

    /// Writes a 16-bit single-frame DICOM (explicit VR little endian) with the given attributes.
    fn write_dcm(
        path: &Path,
        (cols, rows): (u16, u16),
        pixels: Pixels,
        photometric: &str,
        extra: &[(Tag, &str)],
    ) {
        let mut obj = InMemDicomObject::new_empty();
        let us = |t: Tag, v: u16| DataElement::new(t, VR::US, PrimitiveValue::from(v));
        obj.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::SECONDARY_CAPTURE_IMAGE_STORAGE),
        ));
        obj.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.2.1125.1"),
        ));
        obj.put(us(tags::ROWS, rows));
        obj.put(us(tags::COLUMNS, cols));
        obj.put(us(tags::SAMPLES_PER_PIXEL, 1));
        obj.put(us(tags::BITS_ALLOCATED, 16));
        obj.put(us(tags::BITS_STORED, 16));
        obj.put(us(tags::HIGH_BIT, 15));
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from(photometric),
        ));
        let (repr, value) = match pixels {
            Pixels::U16(v) => (0, PrimitiveValue::U16(v.into())),
            Pixels::I16(v) => (1, PrimitiveValue::I16(v.into())),
        };
        obj.put(us(tags::PIXEL_REPRESENTATION, repr));
        for (tag, v) in extra {
            obj.put(DataElement::new(*tag, VR::DS, PrimitiveValue::from(*v)));
        }
        obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, value));
        let file = obj
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
            .unwrap();
        file.write_to_file(path).unwrap();
    }

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

    #[test]
    fn voi_linear_function_edges() {
        // Width 1: a step at c - 0.5.
        assert_eq!(window_linear(9.5, 10.0, 1.0), 0.0);
        assert_eq!(window_linear(9.6, 10.0, 1.0), 255.0);
        assert_eq!(min_max(&[3.0, 3.0]), vec![0.0, 0.0]);
    }
}
