//! Hugging Face's `MllamaImageProcessor` (Llama-3.2-Vision, transformers 4.57), one picture at a
//! time, bit for bit.
//!
//! HF's pipeline, and where each step lives here:
//! 1. pick the tile grid: `get_optimal_tiled_canvas` ([`canvas::optimal_tiled_canvas`]);
//! 2. resize to `get_image_size_fit_to_canvas` ([`canvas::image_size_fit_to_canvas`]) through
//!    PIL on the uint8 image (`image_transforms.resize` turns a uint8 array into a PIL image, so
//!    this is Pillow's fixed-point resize, [`super::resample`]), aspect ratio kept;
//! 3. pad to the canvas at the bottom and right with zeros — on the uint8 image, *before*
//!    rescale and normalise, so padding pixels come out as `(0 - mean) / std`, not 0;
//! 4. rescale (`uint8 as f64 * factor`, then `f32`) and normalise (`(x - mean) / std` in `f32`);
//! 5. `split_to_tiles`: row-major tiles of `tile` x `tile`, CHW each;
//! 6. `pack_images`: tiles past the grid up to `max_image_tiles` are exact zeros;
//! 7. the aspect-ratio id (index of the grid in the supported list + 1) and mask.
//!
//! Steps 3-6 happen in one pass here: every output value is a function of one uint8 (0 for
//! padding) and the channel, so a 256-entry table per channel gives numpy's exact values.

mod canvas;
mod config;

use std::path::PathBuf;

use image::{RgbImage, RgbaImage};

use super::resample::pil_resize;
use super::{expand_to_square, pad_background, AspectMode};
use crate::error::{Error, Result};

pub use canvas::{
    aspect_ratio_id, aspect_ratio_mask, image_size_fit_to_canvas, optimal_tiled_canvas,
    supported_aspect_ratios,
};
pub use config::{MllamaProcessorConfig, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD};

/// One preprocessed picture: HF's `pixel_values[0, 0]`, `aspect_ratio_ids[0, 0]`,
/// `aspect_ratio_mask[0, 0]` and `num_tiles[0][0]` for a batch of one.
#[derive(Clone, Debug, PartialEq)]
pub struct TiledImage {
    /// `max_tiles x 3 x tile_height x tile_width`, CHW per tile, tiles in row-major grid order,
    /// then zero tiles up to `max_tiles`.
    pub data: Vec<f32>,
    /// Real tiles: `aspect_ratio.0 * aspect_ratio.1`.
    pub num_tiles: usize,
    /// The grid as HF orders it: `(rows, cols)` = `(num_tiles_height, num_tiles_width)`.
    pub aspect_ratio: (usize, usize),
    /// 1-based index of `aspect_ratio` in `supported_aspect_ratios(max_tiles)`.
    pub aspect_ratio_id: u32,
    /// `max_tiles` entries, `true` for the real tiles.
    pub aspect_ratio_mask: Vec<bool>,
    pub tile_height: usize,
    pub tile_width: usize,
    pub max_tiles: usize,
}

/// `MllamaImageProcessor.preprocess` for one RGB picture, with the crate's aspect modes.
///
/// What [`AspectMode`] means here (the modes are the recipe's `model.image_aspect`):
/// - `Resize`: HF's processor as is — the tile grid that best fits the picture, aspect kept,
///   padded with black (before normalisation) to the grid.
/// - `Pad`: LLaVA's expand-to-square first (the picture centred on a square of the mean colour,
///   `int(mean * 255)`), then HF's processor; a square picture always gets a square grid.
/// - `Squash`: the reference recipe's geometry — every picture resized straight to one tile
///   (`size.height` x `size.width`, aspect not kept, with the config's filter, bilinear for the
///   released checkpoints, as the reference's `torchvision.transforms.Resize((560, 560))` on a
///   PIL image is), then HF's processor, for which a one-tile picture is the 1x1 grid (scale 1
///   is the smallest upscale, and the 1x1 canvas the smallest with it) and the resize a copy.
///   So the result is always 1 tile, aspect ratio (1, 1), id 1, whatever `max_tiles` is.
#[derive(Clone, Debug)]
pub struct MllamaImageProcessor {
    cfg: MllamaProcessorConfig,
    aspect: AspectMode,
    max_tiles: usize,
    /// Output value of each uint8 per channel: rescaled, normalised, as numpy computes it.
    /// Boxed: 3 KB inline would make every [`super::ImageProcessor`] that large.
    lut: Box<[[f32; 256]; 3]>,
}

impl MllamaImageProcessor {
    /// `max_tiles` overrides the config's `max_image_tiles` (recipe `model.max_image_tiles`;
    /// the reference recipe uses 1), as HF's `preprocess(max_image_tiles=...)` does: pictures are
    /// then packed to that many tiles, and aspect-ratio ids index that count's grid list (see
    /// [`aspect_ratio_id`] for why that matters with more than one tile). A bad override is an
    /// [`Error::Model`] (the caller knows which setting it came from); a bad config an
    /// [`Error::Config`] naming the file and key.
    pub fn new(
        cfg: MllamaProcessorConfig,
        aspect: AspectMode,
        max_tiles: Option<usize>,
    ) -> Result<Self> {
        cfg.validate()?;
        let max_tiles = match max_tiles {
            None => cfg.max_image_tiles,
            Some(0) => {
                return Err(Error::Model(
                    "max_image_tiles = 0: a picture needs at least one tile".into(),
                ))
            }
            Some(n) => {
                config::check_canvas(n, cfg.tile_size)
                    .map_err(|reason| Error::Model(format!("max_image_tiles = {n}: {reason}")))?;
                n
            }
        };
        let lut = Box::new(value_table(&cfg));
        Ok(MllamaImageProcessor {
            cfg,
            aspect,
            max_tiles,
            lut,
        })
    }

    pub fn config(&self) -> &MllamaProcessorConfig {
        &self.cfg
    }

    pub fn aspect(&self) -> AspectMode {
        self.aspect
    }

    /// Tiles every picture is packed to (the override, else `max_image_tiles`).
    pub fn max_tiles(&self) -> usize {
        self.max_tiles
    }

    /// Side of one square tile in pixels.
    pub fn tile_size(&self) -> usize {
        self.cfg.tile_size
    }

    /// Runs the whole pipeline on one picture. Fails only on an empty (0-pixel) image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<TiledImage> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::Image {
                path: PathBuf::from("<image given to the processor>"),
                reason: format!("image is empty ({}x{})", img.width(), img.height()),
            });
        }
        let tile = self.cfg.tile_size;
        let prepared;
        let img = match self.aspect {
            AspectMode::Resize => img,
            AspectMode::Pad => {
                let mean = self.cfg.image_mean;
                prepared = expand_to_square(img, pad_background(&mean));
                &prepared
            }
            AspectMode::Squash => {
                prepared = pil_resize(img, tile, tile, self.cfg.resample);
                &prepared
            }
        };
        let (h, w) = (img.height() as usize, img.width() as usize);
        let (canvas_h, canvas_w) = optimal_tiled_canvas(h, w, self.max_tiles, tile);
        let grid = (canvas_h / tile, canvas_w / tile);
        let (new_h, new_w) = image_size_fit_to_canvas(h, w, canvas_h, canvas_w, tile);
        let resized = pil_resize(img, new_w, new_h, self.cfg.resample);
        let aspect_ratio_id = aspect_ratio_id(grid, self.max_tiles).ok_or_else(|| {
            // Unreachable: the grid comes from the same list.
            Error::Model(format!(
                "tile grid {grid:?} is not among the supported aspect ratios"
            ))
        })?;
        Ok(TiledImage {
            data: self.tiles(&resized, grid),
            num_tiles: grid.0 * grid.1,
            aspect_ratio: grid,
            aspect_ratio_id: aspect_ratio_id as u32,
            aspect_ratio_mask: aspect_ratio_mask(grid, self.max_tiles),
            tile_height: tile,
            tile_width: tile,
            max_tiles: self.max_tiles,
        })
    }

    /// Pad (zeros at the bottom and right), rescale, normalise, `split_to_tiles` and
    /// `pack_images` at once: tile `r * cols + c` holds canvas rows `r * tile..` and columns
    /// `c * tile..`; tiles from `rows * cols` on stay 0.0.
    fn tiles(&self, img: &RgbImage, (rows, cols): (usize, usize)) -> Vec<f32> {
        let tile = self.cfg.tile_size;
        let plane = tile * tile;
        let mut data = vec![0f32; self.max_tiles * 3 * plane];
        let (img_w, img_h) = (img.width() as usize, img.height() as usize);
        let raw = img.as_raw();
        for r in 0..rows {
            for c in 0..cols {
                let base = (r * cols + c) * 3 * plane;
                for y in 0..tile {
                    let cy = r * tile + y;
                    for x in 0..tile {
                        let cx = c * tile + x;
                        let px = if cy < img_h && cx < img_w {
                            let at = (cy * img_w + cx) * 3;
                            [raw[at], raw[at + 1], raw[at + 2]]
                        } else {
                            [0; 3]
                        };
                        for (ch, &v) in px.iter().enumerate() {
                            data[base + ch * plane + y * tile + x] = self.lut[ch][usize::from(v)];
                        }
                    }
                }
            }
        }
        data
    }
}

/// numpy's value for each uint8 and channel: `rescale` computes `(v as f64 * factor) as f32`,
/// `normalize` then `(x - f32(mean)) / f32(std)` in `f32`; without rescale the uint8 becomes an
/// `f32` as it is.
fn value_table(cfg: &MllamaProcessorConfig) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (ch, row) in lut.iter_mut().enumerate() {
        let mean = cfg.image_mean[ch] as f32;
        let std = cfg.image_std[ch] as f32;
        for (v, out) in row.iter_mut().enumerate() {
            let mut x = if cfg.do_rescale {
                (v as f64 * cfg.rescale_factor) as f32
            } else {
                v as f32
            };
            if cfg.do_normalize {
                x = (x - mean) / std;
            }
            *out = x;
        }
    }
    lut
}

/// HF's `convert_to_rgb` for Mllama (`do_convert_rgb`), which differs from CLIP's: a picture
/// with transparency is alpha-composited onto opaque white (`Image.alpha_composite` on a white
/// RGBA background), where PIL's plain `convert("RGB")` — and [`crate::data::image::load_rgb`] —
/// drop the alpha channel. Pillow's integer arithmetic (`AlphaComposite.c`, 7 fractional bits,
/// rounded divisions by 255) is reproduced exactly; fully opaque pixels keep their colour.
pub fn flatten_alpha_on_white(img: &RgbaImage) -> RgbImage {
    const PRECISION_BITS: u32 = 7;
    let shift_div255 = |a: u32| ((a >> 8) + a) >> 8;
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0.map(u32::from);
        if a == 0 {
            return image::Rgb([255; 3]);
        }
        // Background: opaque white (dst->a = 255).
        let blend = 255 * (255 - a);
        let outa255 = a * 255 + blend;
        let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
        let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
        let mix = |s: u32| {
            let tmp = s * coef1 + 255 * coef2;
            (shift_div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
        };
        image::Rgb([mix(r), mix(g), mix(b)])
    })
}

#[cfg(test)]
mod tests;
