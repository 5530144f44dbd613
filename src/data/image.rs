//! Decoding image files into 8-bit RGB, the only pixel format the processors accept.
//!
//! The reference pipelines (LLaVA and friends) open images with PIL and call `convert("RGB")`,
//! so the conversions here follow PIL's semantics wherever they are well defined: gray is
//! replicated into the three channels and alpha is dropped without compositing. The one
//! deliberate difference is 16-bit data, see [`load_rgb`].

use std::io::{BufRead, Cursor, Seek};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageReader, Pixel, Rgb, RgbImage};

use crate::error::{Error, Result};

/// The most pixels (width x height) an image may have to be decoded: 178,956,970, the
/// threshold at which PIL raises `DecompressionBombError` (twice `Image.MAX_IMAGE_PIXELS` =
/// 89,478,485; between the two PIL only warns). A file's header is read first and a larger image
/// is refused before any pixel buffer is allocated: a small PNG can declare 20000x20000 pixels
/// and would decode to gigabytes. Every decode path of the crate ([`load_rgb`], [`decode_rgb`],
/// [`load_dynamic`], the pair manifest checks, DICOM) applies it.
pub const MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// `Err(reason)` when a `width`x`height` image has more than [`MAX_IMAGE_PIXELS`] pixels.
pub fn check_pixel_count(width: u32, height: u32) -> std::result::Result<(), String> {
    let n = u64::from(width) * u64::from(height);
    if n > MAX_IMAGE_PIXELS {
        Err(format!(
            "{width}x{height} = {n} pixels is over the limit of {MAX_IMAGE_PIXELS} pixels \
             (PIL's decompression-bomb limit, 2 x Image.MAX_IMAGE_PIXELS); not decoding it"
        ))
    } else {
        Ok(())
    }
}

/// Decodes `reader` (format already set or guessed) after checking the dimensions its header
/// declares against [`MAX_IMAGE_PIXELS`]; `name` is the file named in errors. Otherwise the same
/// as `ImageReader::decode` (including the `image` crate's default allocation limit).
fn decode_checked<R: BufRead + Seek>(reader: ImageReader<R>, name: &Path) -> Result<DynamicImage> {
    let decoder = reader.into_decoder().map_err(|e| image_error(name, e))?;
    let (width, height) = decoder.dimensions();
    check_pixel_count(width, height).map_err(|reason| Error::Image {
        path: name.to_path_buf(),
        reason,
    })?;
    let mut limits = image::Limits::default();
    limits
        .reserve(decoder.total_bytes())
        .map_err(|e| image_error(name, e))?;
    DynamicImage::from_decoder(decoder).map_err(|e| image_error(name, e))
}

/// Decodes the (non-DICOM) image file at `path` in its own pixel format, the format guessed
/// from the content, refusing images over [`MAX_IMAGE_PIXELS`]. A missing or unreadable file is
/// an [`Error::Io`], undecodable content an [`Error::Image`], both naming `path`.
pub fn load_dynamic(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::io(path, e))?;
    decode_checked(reader, path)
}

/// Decodes the image file at `path` (PNG, JPEG, BMP, TIFF or WebP) into RGB8.
///
/// The format is guessed from the file's content, not its extension, because medical data
/// sets routinely ship PNGs named `.jpg` and the like.
///
/// Conversion of the decoded pixel format to RGB8:
/// - gray (8-bit) is replicated into R, G and B; alpha channels are dropped, not composited
///   onto a background (PIL's `convert("RGB")`);
/// - 16-bit channels become 8-bit by rounding `v / 257`, which maps 0..=65535 onto 0..=255
///   linearly. PIL instead *clips* 16-bit gray (`I;16`) to 0..=255 on `convert("RGB")`, which
///   turns almost every pixel of a real 16-bit medical image (CT, X-ray) white, so we scale
///   on purpose and accept not matching PIL for such files;
/// - float channels are clamped to 0..=1, scaled by 255 and rounded.
///
/// A `.dcm` file is decoded with [`crate::data::dicom::load_dicom_gray8`] (windowed 8-bit grey)
/// and replicated into R, G and B.
///
/// A missing or unreadable file gives [`Error::Io`]; content that cannot be decoded, or an image
/// over [`MAX_IMAGE_PIXELS`] (refused from its header, before decoding), gives [`Error::Image`];
/// both name `path`.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("dcm"))
    {
        let gray = crate::data::dicom::load_dicom_gray8(path)?;
        return Ok(to_rgb8(DynamicImage::ImageLuma8(gray)));
    }
    Ok(to_rgb8(load_dynamic(path)?))
}

/// Same as [`load_rgb`], for an image already in memory (an archive member, a download).
/// `name` stands in for the path in error messages.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(name, e))?;
    Ok(to_rgb8(decode_checked(reader, Path::new(name))?))
}

/// Any decoding failure, including a truncated file, means the content is bad rather than the
/// file being unreadable, so it is reported as an image error.
fn image_error(path: impl Into<PathBuf>, err: image::ImageError) -> Error {
    Error::Image {
        path: path.into(),
        reason: err.to_string(),
    }
}

/// Converts any decoded pixel format to RGB8 with the rules documented on [`load_rgb`].
pub fn to_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(buf) => map_pixels(&buf, |p| p.to_rgb().0),
        DynamicImage::ImageLuma8(buf) => map_pixels(&buf, |p| [p.0[0]; 3]),
        DynamicImage::ImageLumaA8(buf) => map_pixels(&buf, |p| [p.0[0]; 3]),
        DynamicImage::ImageRgb16(buf) => map_pixels(&buf, |p| p.0.map(u16_to_u8)),
        DynamicImage::ImageRgba16(buf) => {
            map_pixels(&buf, |p| [p.0[0], p.0[1], p.0[2]].map(u16_to_u8))
        }
        DynamicImage::ImageLuma16(buf) => map_pixels(&buf, |p| [u16_to_u8(p.0[0]); 3]),
        DynamicImage::ImageLumaA16(buf) => map_pixels(&buf, |p| [u16_to_u8(p.0[0]); 3]),
        DynamicImage::ImageRgb32F(buf) => map_pixels(&buf, |p| p.0.map(f32_to_u8)),
        DynamicImage::ImageRgba32F(buf) => {
            map_pixels(&buf, |p| [p.0[0], p.0[1], p.0[2]].map(f32_to_u8))
        }
        // `DynamicImage` is non-exhaustive; a future variant falls back to the crate's own
        // conversion rather than failing.
        other => other.to_rgb8(),
    }
}

/// Builds an RGB8 image of the same size by converting every pixel with `f`.
fn map_pixels<P, F>(src: &ImageBuffer<P, Vec<P::Subpixel>>, f: F) -> RgbImage
where
    P: Pixel,
    F: Fn(&P) -> [u8; 3],
{
    RgbImage::from_fn(src.width(), src.height(), |x, y| {
        Rgb(f(src.get_pixel(x, y)))
    })
}

/// `round(v / 257)` in integers: 257 is odd, so there are no ties to break.
fn u16_to_u8(v: u16) -> u8 {
    ((u32::from(v) + 128) / 257) as u8
}

/// Clamps to 0..=1 first so out-of-range HDR values saturate; NaN becomes 0.
fn f32_to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Luma, LumaA, Rgba};

    fn encode_png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn u16_scaling_rounds_to_nearest() {
        assert_eq!(u16_to_u8(0), 0);
        assert_eq!(u16_to_u8(65535), 255);
        assert_eq!(u16_to_u8(257 * 100), 100);
        assert_eq!(u16_to_u8(257 * 100 + 128), 100);
        assert_eq!(u16_to_u8(257 * 100 + 129), 101);
    }

    #[test]
    fn float_is_clamped_and_rounded() {
        assert_eq!(f32_to_u8(-0.5), 0);
        assert_eq!(f32_to_u8(2.0), 255);
        assert_eq!(f32_to_u8(0.5), 128);
        assert_eq!(f32_to_u8(f32::NAN), 0);
    }

    #[test]
    fn gray_is_replicated() {
        let gray = ImageBuffer::from_fn(3, 2, |x, y| Luma([(x * 10 + y) as u8]));
        let rgb = decode_rgb(&encode_png(&DynamicImage::ImageLuma8(gray)), "g.png").unwrap();
        assert_eq!(rgb.dimensions(), (3, 2));
        assert_eq!(rgb.get_pixel(2, 1).0, [21, 21, 21]);
    }

    #[test]
    fn alpha_is_dropped_without_compositing() {
        let rgba = ImageBuffer::from_pixel(2, 2, Rgba([10u8, 20, 30, 0]));
        let rgb = decode_rgb(&encode_png(&DynamicImage::ImageRgba8(rgba)), "a.png").unwrap();
        assert_eq!(rgb.get_pixel(1, 1).0, [10, 20, 30]);
        let la = ImageBuffer::from_pixel(2, 2, LumaA([77u8, 3]));
        let rgb = decode_rgb(&encode_png(&DynamicImage::ImageLumaA8(la)), "la.png").unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [77, 77, 77]);
    }

    #[test]
    fn sixteen_bit_gray_is_scaled_not_clipped() {
        let gray = ImageBuffer::from_fn(2, 1, |x, _| Luma([if x == 0 { 1000u16 } else { 65535 }]));
        let rgb = decode_rgb(&encode_png(&DynamicImage::ImageLuma16(gray)), "g16.png").unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [4, 4, 4]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 255]);
    }

    #[test]
    fn format_is_guessed_from_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("really_a_png.jpg");
        let img = ImageBuffer::from_pixel(4, 3, Rgb([1u8, 2, 3]));
        std::fs::write(&path, encode_png(&DynamicImage::ImageRgb8(img))).unwrap();
        let rgb = load_rgb(&path).unwrap();
        assert_eq!(rgb.dimensions(), (4, 3));
        assert_eq!(rgb.get_pixel(3, 2).0, [1, 2, 3]);
    }

    #[test]
    fn missing_file_is_io_error_naming_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.png");
        let err = load_rgb(&path).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.png"), "{err}");
    }

    #[test]
    fn garbage_is_image_error_naming_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.png");
        std::fs::write(&path, b"this is not an image at all").unwrap();
        let err = load_rgb(&path).unwrap_err();
        assert!(matches!(err, Error::Image { .. }), "{err:?}");
        assert!(err.to_string().contains("garbage.png"), "{err}");
    }

    #[test]
    fn truncated_png_is_image_error() {
        let img = ImageBuffer::from_pixel(16, 16, Rgb([9u8, 9, 9]));
        let bytes = encode_png(&DynamicImage::ImageRgb8(img));
        let err = decode_rgb(&bytes[..bytes.len() / 2], "cut.png").unwrap_err();
        assert!(matches!(err, Error::Image { .. }), "{err:?}");
        assert!(err.to_string().contains("cut.png"), "{err}");
    }
}
