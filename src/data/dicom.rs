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
/// docs. A missing file is an [`Error::Io`]; anything else wrong, including Rows x Columns over
/// [`crate::data::image::MAX_IMAGE_PIXELS`] (checked before the pixel data is decoded), is an
/// [`Error::Image`] naming `path`.
pub fn load_dicom_gray8(path: &Path) -> Result<GrayImage> {
    std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let err = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let obj = open_file(path).map_err(|e| err(format!("not a readable DICOM file: {e}")))?;
    // The decoder allocates from Rows x Columns: refuse a bomb before decoding.
    let dim = |tag: Tag| {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<u32>().ok())
    };
    if let (Some(rows), Some(cols)) = (dim(tags::ROWS), dim(tags::COLUMNS)) {
        crate::data::image::check_pixel_count(cols, rows).map_err(&err)?;
    }
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

    #[test]
    fn voi_linear_function_edges() {
        // Width 1: a step at c - 0.5.
        assert_eq!(window_linear(9.5, 10.0, 1.0), 0.0);
        assert_eq!(window_linear(9.6, 10.0, 1.0), 255.0);
        assert_eq!(min_max(&[3.0, 3.0]), vec![0.0, 0.0]);
    }
}
