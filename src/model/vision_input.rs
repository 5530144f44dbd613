//! Typed vision inputs: what a family's vision encoder takes, as tensors on the model's device.
//! Built from the data stage's processed pictures; a family refuses a kind it cannot take.

use candle_core::{Device, Tensor};

use crate::data::processor::ProcessedImage;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub enum VisionInput {
    /// `[n, 3, H, W]` pixel values, one fixed-size image per picture (CLIP / LLaVA).
    Pixels(Tensor),
    /// Tiled pictures (Mllama): `pixel_values [n, max_tiles, 3, h, w]` (padding tiles zero),
    /// `aspect_ratio_ids [n]` (u32; 0 = padding), `aspect_ratio_mask [n, max_tiles]` (u32,
    /// 1 = real tile) and the real tile count of each picture.
    Tiles {
        pixel_values: Tensor,
        aspect_ratio_ids: Tensor,
        aspect_ratio_mask: Tensor,
        num_tiles: Vec<usize>,
    },
}

impl VisionInput {
    /// Pixel values `[n, 3, H, W]` (e.g. computed by HF's processor, in tests).
    pub fn pixels(t: &Tensor) -> Self {
        VisionInput::Pixels(t.clone())
    }

    /// Stack the pictures of a batch (one per sample, all the same kind and size).
    pub fn from_processed(images: &[ProcessedImage], device: &Device) -> Result<Self> {
        let Some(first) = images.first() else {
            return Err(Error::Model(
                "a batch without pictures has no vision input".into(),
            ));
        };
        match first {
            ProcessedImage::Pixels(p0) => {
                let mut data = Vec::with_capacity(images.len() * p0.data.len());
                for img in images {
                    let ProcessedImage::Pixels(p) = img;
                    if (p.height, p.width) != (p0.height, p0.width) {
                        return Err(Error::Model(format!(
                            "pictures of one batch differ in size: {}x{} and {}x{}",
                            p0.height, p0.width, p.height, p.width
                        )));
                    }
                    data.extend_from_slice(&p.data);
                }
                let t = Tensor::from_vec(data, (images.len(), 3, p0.height, p0.width), device)?;
                Ok(VisionInput::Pixels(t))
            }
        }
    }

    /// How many pictures the input holds.
    pub fn num_images(&self) -> Result<usize> {
        match self {
            VisionInput::Pixels(t) => Ok(t.dim(0)?),
            VisionInput::Tiles { pixel_values, .. } => Ok(pixel_values.dim(0)?),
        }
    }
}
