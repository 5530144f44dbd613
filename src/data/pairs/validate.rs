//! Image checks: each referenced file is opened and its header read, in parallel.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use image::ImageReader;

/// Checks that each file exists and starts like an image we can decode, in parallel.
pub(super) fn check_images(paths: &[PathBuf]) -> Vec<std::result::Result<(), String>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16)
        .min(paths.len() / 64 + 1);
    if threads <= 1 {
        return paths.iter().map(|p| check_image(p)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|c| {
                (
                    c.len(),
                    s.spawn(move || c.iter().map(|p| check_image(p)).collect()),
                )
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(len, h)| {
                h.join()
                    .unwrap_or_else(|_| vec![Err("the image check panicked".to_string()); len])
            })
            .collect()
    })
}

/// Opens `path`, guesses its format from the content and reads the dimensions from its header.
fn check_image(path: &Path) -> std::result::Result<(), String> {
    let shown = path.display();
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => format!("image {shown} does not exist"),
            _ => format!("cannot read image {shown}: {e}"),
        })?;
    if reader.format().is_none() {
        return Err(format!(
            "cannot decode image {shown}: not a PNG, JPEG, BMP, TIFF or WebP file"
        ));
    }
    match reader.into_dimensions() {
        Err(e) => Err(format!("cannot decode image {shown}: {e}")),
        Ok((0, _)) | Ok((_, 0)) => Err(format!("image {shown} has zero width or height")),
        Ok((w, h)) => crate::data::image::check_pixel_count(w, h)
            .map_err(|reason| format!("cannot decode image {shown}: {reason}")),
    }
}
