//! The image processor a model family picks (see `model::family`), behind one type, so batches,
//! sessions and the evaluator never name a family's processor.

use std::path::Path;

use image::RgbImage;

use super::{
    flatten_alpha_on_white, ClipImageProcessor, MllamaImageProcessor, PixelValues, TiledImage,
};
use crate::data::image::{load_dynamic, load_rgb, to_rgb8};
use crate::error::Result;

/// One family's image processor, configured from the model directory.
#[derive(Clone, Debug)]
pub enum ImageProcessor {
    /// HF `CLIPImageProcessor` (LLaVA): one fixed-size image per picture.
    Clip(ClipImageProcessor),
    /// HF `MllamaImageProcessor` (Llama-3.2-Vision): a grid of square tiles per picture.
    Mllama(MllamaImageProcessor),
}

/// What the processor makes of one picture, on the host.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessedImage {
    /// `[3, height, width]` pixel values (CLIP).
    Pixels(PixelValues),
    /// `[max_tiles, 3, tile, tile]` pixel values with the tile grid (Mllama).
    Tiles(TiledImage),
}

impl ImageProcessor {
    /// Decode an image file into the RGB picture this processor's HF counterpart sees: for
    /// CLIP alpha is dropped (PIL's `convert("RGB")`); Mllama's `convert_to_rgb` composites
    /// transparent pixels on white. Everything else follows [`load_rgb`].
    pub fn load(&self, path: &Path) -> Result<RgbImage> {
        let dicom = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("dcm"));
        match self {
            ImageProcessor::Mllama(_) if !dicom => {
                let img = load_dynamic(path)?;
                Ok(if img.color().has_alpha() {
                    flatten_alpha_on_white(&img.to_rgba8())
                } else {
                    to_rgb8(img)
                })
            }
            _ => load_rgb(path),
        }
    }

    pub fn preprocess(&self, img: &RgbImage) -> Result<ProcessedImage> {
        match self {
            ImageProcessor::Clip(p) => Ok(ProcessedImage::Pixels(p.preprocess(img)?)),
            ImageProcessor::Mllama(p) => Ok(ProcessedImage::Tiles(p.preprocess(img)?)),
        }
    }

    /// One line for plans and reports: what every picture becomes.
    pub fn describe(&self) -> String {
        match self {
            ImageProcessor::Clip(p) => {
                let (h, w) = p.output_size();
                format!("CLIP processor, {h}x{w} px, aspect {}", p.aspect())
            }
            ImageProcessor::Mllama(p) => {
                let t = p.tile_size();
                let n = p.max_tiles();
                let tiles = if n == 1 { "tile" } else { "tiles" };
                format!(
                    "Mllama processor, up to {n} {tiles} of {t}x{t} px, aspect {}",
                    p.aspect()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::processor::{AspectMode, ClipProcessorConfig, MllamaProcessorConfig};

    #[test]
    fn mllama_variant_tiles_and_describes_itself() {
        let cfg = MllamaProcessorConfig {
            tile_size: 28,
            max_image_tiles: 2,
            ..MllamaProcessorConfig::default()
        };
        let p = ImageProcessor::Mllama(
            MllamaImageProcessor::new(cfg, AspectMode::Squash, Some(1)).unwrap(),
        );
        assert_eq!(
            p.describe(),
            "Mllama processor, up to 1 tile of 28x28 px, aspect squash"
        );
        let ProcessedImage::Tiles(t) = p.preprocess(&RgbImage::new(50, 20)).unwrap() else {
            panic!("Mllama makes tiles");
        };
        assert_eq!(
            (t.num_tiles, t.max_tiles, t.data.len()),
            (1, 1, 3 * 28 * 28)
        );
    }

    #[test]
    fn transparent_pixels_are_dropped_for_clip_and_white_for_mllama() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        image::RgbaImage::from_pixel(2, 2, image::Rgba([10, 20, 30, 0]))
            .save(&path)
            .unwrap();
        let clip = ImageProcessor::Clip(
            ClipImageProcessor::new(ClipProcessorConfig::default(), AspectMode::Resize).unwrap(),
        );
        let mllama = ImageProcessor::Mllama(
            MllamaImageProcessor::new(MllamaProcessorConfig::default(), AspectMode::Resize, None)
                .unwrap(),
        );
        assert_eq!(clip.load(&path).unwrap().get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(
            mllama.load(&path).unwrap().get_pixel(0, 0).0,
            [255, 255, 255]
        );
    }
}
