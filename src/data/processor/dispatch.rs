//! The image processor a model family picks (see `model::family`), behind one type, so batches,
//! sessions and the evaluator never name a family's processor.

use image::RgbImage;

use super::{ClipImageProcessor, MllamaImageProcessor, PixelValues, TiledImage};
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
    use crate::data::processor::{AspectMode, MllamaProcessorConfig};

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
}
