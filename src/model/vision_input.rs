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
    /// The vision tower's output for each picture, `[n, tokens, dim]`
    /// ([`crate::model::VisionLanguageModel::vision_states`], e.g. from the frozen-vision
    /// feature cache): the tower does not run again.
    States(Tensor),
}

impl VisionInput {
    /// Pixel values `[n, 3, H, W]` (e.g. computed by HF's processor, in tests).
    pub fn pixels(t: &Tensor) -> Self {
        VisionInput::Pixels(t.clone())
    }

    /// Stack the pictures of a batch (one per sample, all the same kind and size). A batch
    /// mixing pixel images and tiled ones (two processors fed one batch) is an error.
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
                    let ProcessedImage::Pixels(p) = img else {
                        return Err(mixed_batch());
                    };
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
            ProcessedImage::Tiles(t0) => {
                let n = images.len();
                let shape = (t0.max_tiles, t0.tile_height, t0.tile_width);
                let mut data = Vec::with_capacity(n * t0.data.len());
                let mut ids = Vec::with_capacity(n);
                let mut mask = Vec::with_capacity(n * t0.max_tiles);
                let mut num_tiles = Vec::with_capacity(n);
                for img in images {
                    let ProcessedImage::Tiles(t) = img else {
                        return Err(mixed_batch());
                    };
                    if (t.max_tiles, t.tile_height, t.tile_width) != shape {
                        return Err(Error::Model(format!(
                            "pictures of one batch differ in tiling: {} tiles of {}x{} and {} \
                             tiles of {}x{}",
                            t0.max_tiles,
                            t0.tile_height,
                            t0.tile_width,
                            t.max_tiles,
                            t.tile_height,
                            t.tile_width
                        )));
                    }
                    data.extend_from_slice(&t.data);
                    ids.push(t.aspect_ratio_id);
                    mask.extend(t.aspect_ratio_mask.iter().map(|&m| u32::from(m)));
                    num_tiles.push(t.num_tiles);
                }
                let (tiles, h, w) = shape;
                Ok(VisionInput::Tiles {
                    pixel_values: Tensor::from_vec(data, (n, tiles, 3, h, w), device)?,
                    aspect_ratio_ids: Tensor::from_vec(ids, n, device)?,
                    aspect_ratio_mask: Tensor::from_vec(mask, (n, tiles), device)?,
                    num_tiles,
                })
            }
        }
    }

    /// How many pictures the input holds.
    pub fn num_images(&self) -> Result<usize> {
        match self {
            VisionInput::Pixels(t) => Ok(t.dim(0)?),
            VisionInput::Tiles { pixel_values, .. } => Ok(pixel_values.dim(0)?),
            VisionInput::States(t) => Ok(t.dim(0)?),
        }
    }
}

fn mixed_batch() -> Error {
    Error::Model(
        "a batch mixes plain pixel images (CLIP) with tiled ones (Mllama); one model's \
         processor must make all of them"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::processor::{
        AspectMode, MllamaImageProcessor, MllamaProcessorConfig, PixelValues,
    };

    fn tiled(w: u32, h: u32) -> ProcessedImage {
        let cfg = MllamaProcessorConfig {
            tile_size: 4,
            max_image_tiles: 2,
            ..MllamaProcessorConfig::default()
        };
        let p = MllamaImageProcessor::new(cfg, AspectMode::Resize, None).unwrap();
        ProcessedImage::Tiles(p.preprocess(&image::RgbImage::new(w, h)).unwrap())
    }

    #[test]
    fn tiles_stack_with_ids_masks_and_counts() {
        let batch = [tiled(8, 4), tiled(4, 4)];
        let VisionInput::Tiles {
            pixel_values,
            aspect_ratio_ids,
            aspect_ratio_mask,
            num_tiles,
        } = VisionInput::from_processed(&batch, &Device::Cpu).unwrap()
        else {
            panic!("tiles in, tiles out");
        };
        assert_eq!(pixel_values.dims(), &[2, 2, 3, 4, 4]);
        assert_eq!(aspect_ratio_ids.to_vec1::<u32>().unwrap(), vec![2, 1]);
        assert_eq!(
            aspect_ratio_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1], vec![1, 0]]
        );
        assert_eq!(num_tiles, vec![2, 1]);
    }

    #[test]
    fn a_mixed_batch_is_an_error() {
        let pixels = ProcessedImage::Pixels(PixelValues {
            data: vec![0.0; 3 * 4 * 4],
            height: 4,
            width: 4,
        });
        for batch in [[pixels.clone(), tiled(4, 4)], [tiled(4, 4), pixels]] {
            let err = VisionInput::from_processed(&batch, &Device::Cpu).unwrap_err();
            assert!(err.to_string().contains("mixes"), "{err}");
        }
    }
}
