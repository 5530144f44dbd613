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
