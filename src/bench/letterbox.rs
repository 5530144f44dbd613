//! Letterboxing: scale an image so its longer side is `size`, keep the aspect ratio, centre it on a
//! black `size`×`size` canvas. Used for CBIS-DDSM ROI crops (METHOD.md: "letterboxed to 560x560,
//! aspect kept, black padding") and for the optional image cache of every benchmark's `prepare`.
//!
//! Resampling is bilinear (`FilterType::Triangle`). The scaled side lengths are
//! `round(w * size / max(w, h))` (at least 1); the image is placed at offset
//! `((size - w') / 2, (size - h') / 2)` (integer division). Grey images stay grey (8-bit luma), all
//! others become 8-bit RGB.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GenericImage, ImageBuffer, Luma, Rgb};

use crate::data::dicom::load_dicom_gray8;
use crate::data::image::load_dynamic;
use crate::error::{Error, Result};

/// Scaled size `(w', h')` of a `w`×`h` image letterboxed into `size`×`size`.
pub fn fitted_size(w: u32, h: u32, size: u32) -> (u32, u32) {
    let long = w.max(h).max(1) as f64;
    let scale = size as f64 / long;
    let fw = ((w as f64 * scale).round() as u32).clamp(1, size);
    let fh = ((h as f64 * scale).round() as u32).clamp(1, size);
    (fw, fh)
}

/// Letterbox `img` to `size`×`size` (see the module docs).
pub fn letterbox(img: &DynamicImage, size: u32) -> DynamicImage {
    let (fw, fh) = fitted_size(img.width(), img.height(), size);
    let (x, y) = ((size - fw) / 2, (size - fh) / 2);
    let grey = !img.color().has_color();
    if grey {
        let scaled = image::imageops::resize(&img.to_luma8(), fw, fh, FilterType::Triangle);
        let mut canvas: ImageBuffer<Luma<u8>, Vec<u8>> = ImageBuffer::new(size, size);
        canvas
            .copy_from(&scaled, x, y)
            .expect("scaled image fits the canvas");
        DynamicImage::ImageLuma8(canvas)
    } else {
        let scaled = image::imageops::resize(&img.to_rgb8(), fw, fh, FilterType::Triangle);
        let mut canvas: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::new(size, size);
        canvas
            .copy_from(&scaled, x, y)
            .expect("scaled image fits the canvas");
        DynamicImage::ImageRgb8(canvas)
    }
}

/// Read `src`, letterbox it to `size`×`size`, write it to `dst` (format from `dst`'s extension,
/// parent directories created). The source format is guessed from the content; a `.dcm` source is
/// decoded to 8-bit grey with [`load_dicom_gray8`]'s windowing. Sources over
/// [`crate::data::image::MAX_IMAGE_PIXELS`] are refused before decoding. Returns `dst`.
pub fn letterbox_file(src: &Path, dst: &Path, size: u32) -> Result<PathBuf> {
    let is_dicom = src
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm"));
    let img = if is_dicom {
        DynamicImage::ImageLuma8(load_dicom_gray8(src)?)
    } else {
        load_dynamic(src)?
    };
    let out = letterbox(&img, size);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    out.save(dst).map_err(|e| Error::Image {
        path: dst.to_path_buf(),
        reason: format!("cannot write: {e}"),
    })?;
    Ok(dst.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_aspect_and_pads_black() {
        let img = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(40, 20, Luma([200u8])));
        let out = letterbox(&img, 10);
        assert_eq!((out.width(), out.height()), (10, 10));
        assert_eq!(fitted_size(40, 20, 10), (10, 5));
        let g = out.to_luma8();
        // Rows 0..2 and 8..10 are padding (offset (10 - 5) / 2 = 2), rows 2..7 are image.
        assert_eq!(g.get_pixel(5, 0)[0], 0);
        assert_eq!(g.get_pixel(5, 9)[0], 0);
        assert_eq!(g.get_pixel(5, 4)[0], 200);
        assert!(matches!(out, DynamicImage::ImageLuma8(_)));
    }

    #[test]
    fn colour_stays_rgb_and_tall_images_centre_horizontally() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(3, 9, Rgb([10u8, 20, 30])));
        let out = letterbox(&img, 6);
        assert_eq!(fitted_size(3, 9, 6), (2, 6));
        let c = out.to_rgb8();
        assert_eq!(c.get_pixel(0, 3).0, [0, 0, 0]);
        assert_eq!(c.get_pixel(2, 3).0, [10, 20, 30]);
        assert_eq!(c.get_pixel(5, 3).0, [0, 0, 0]);
    }
}
