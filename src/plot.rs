//! Shared plotting support: the font embedded in the binary, so loss curves and confusion
//! matrices render the same on machines without system fonts.

use std::sync::OnceLock;

/// DejaVu Sans (license in `assets/DejaVuSans.LICENSE`): plotters' ab_glyph text needs a
/// registered font.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The family name the embedded font is registered under.
pub const FONT_FAMILY: &str = "sans-serif";

/// Register the embedded font with plotters (once per process); false if it cannot be parsed.
pub fn register_font() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, plotters::style::FontStyle::Normal, FONT)
            .is_ok()
    })
}

/// Encode an RGB8 raster (`w`×`h`) as PNG and write it atomically to `out`.
pub fn write_png(out: &std::path::Path, pixels: &[u8], w: u32, h: u32) -> crate::Result<()> {
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        pixels,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| crate::Error::Image {
        path: out.to_path_buf(),
        reason: format!("cannot encode the plot: {e}"),
    })?;
    crate::train::checkpoint::write_atomic(out, &png)
}
