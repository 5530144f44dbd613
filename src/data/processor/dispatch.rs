//! The image processor a model family picks (see `model::family`), behind one type, so batches,
//! sessions and the evaluator never name a family's processor.

use image::RgbImage;

use super::{ClipImageProcessor, PixelValues};
use crate::error::Result;

/// One family's image processor, configured from the model directory.
#[derive(Clone, Debug)]
pub enum ImageProcessor {
    /// HF `CLIPImageProcessor` (LLaVA): one fixed-size image per picture.
    Clip(ClipImageProcessor),
}

/// What the processor makes of one picture, on the host.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessedImage {
    /// `[3, height, width]` pixel values (CLIP).
    Pixels(PixelValues),
}

impl ImageProcessor {
    pub fn preprocess(&self, img: &RgbImage) -> Result<ProcessedImage> {
        match self {
            ImageProcessor::Clip(p) => Ok(ProcessedImage::Pixels(p.preprocess(img)?)),
        }
    }

    /// One line for plans and reports: what every picture becomes.
    pub fn describe(&self) -> String {
        match self {
            ImageProcessor::Clip(p) => {
                let (h, w) = p.output_size();
                format!("CLIP processor, {h}x{w} px, aspect {}", p.aspect())
            }
        }
    }
}
