//! Hugging Face's `CLIPImageProcessor` (the slow, PIL-based one), reproduced bit for bit.
//!
//! Vision towers are sensitive to preprocessing: a resize that differs from Pillow's by one grey
//! level on many pixels shifts the image features measurably, and evaluation numbers with them.
//! So the resize is a transcription of Pillow's `Resample.c` (fixed-point, two passes, with the
//! same rounding) rather than a call to some other library's bicubic, and every later step
//! follows the numpy code of transformers 4.57 including its dtypes.
//!
//! Pipeline, in HF's order: (LLaVA `pad`: expand to a square) → resize → center crop → rescale →
//! normalize → CHW `f32`.
//!
//! Layout: `dispatch` holds [`ImageProcessor`], the one type the rest of the crate uses (each
//! model family picks its processor); this file holds the CLIP processor itself (padding,
//! resize, crop, rescale, normalise); `config` reads and validates `preprocessor_config.json`; `filters` and `resample` port
//! Pillow's filters and its fixed-point resize.

mod config;
mod dispatch;
mod filters;
pub mod mllama;
mod resample;

use std::path::PathBuf;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use resample::pil_resize;

pub use config::{ClipProcessorConfig, ResizeTarget, SizeDict, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
pub use dispatch::{ImageProcessor, ProcessedImage};
pub use filters::Resample;
pub use mllama::{flatten_alpha_on_white, MllamaImageProcessor, MllamaProcessorConfig, TiledImage};

/// How a non-square image reaches the processor (recipe `model.image_aspect`, CLI
/// `--image-aspect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AspectMode {
    /// Plain HF processing: shortest-edge resize then center crop (cuts the long side).
    #[default]
    Resize,
    /// LLaVA's `image_aspect_ratio: pad` (`expand2square`): centre the image on a square canvas
    /// of the mean colour first, so nothing is cropped away.
    Pad,
    /// The reference recipe's geometry: resize straight to the processor's output size
    /// (`image.resize((w, h))` with the processor's filter), aspect ratio not kept, nothing
    /// cropped or padded; the processor's own resize and crop are then identities.
    Squash,
}

impl AspectMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AspectMode::Resize => "resize",
            AspectMode::Pad => "pad",
            AspectMode::Squash => "squash",
        }
    }
}

impl std::fmt::Display for AspectMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Preprocessed image: CHW, 3 channels, `f32`, ready to become a `[3, height, width]` tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// `CLIPImageProcessor.preprocess` for one image, optionally with LLaVA's padding.
#[derive(Clone, Debug)]
pub struct ClipImageProcessor {
    cfg: ClipProcessorConfig,
    aspect: AspectMode,
    output: (usize, usize),
    filter: Resample,
    stats: Option<([f32; 3], [f32; 3])>,
}

impl ClipImageProcessor {
    /// Validates `cfg` up front and fails when the output size would depend on the input image
    /// (no crop, shortest-edge resize, no padding): vision towers need one fixed size.
    pub fn new(cfg: ClipProcessorConfig, aspect: AspectMode) -> Result<Self> {
        cfg.validate()?;
        let output = fixed_output_size(&cfg, aspect)?;
        let filter = cfg.resample_filter()?;
        let stats = if cfg.do_normalize {
            Some(cfg.stats()?)
        } else {
            None
        };
        Ok(ClipImageProcessor {
            cfg,
            aspect,
            output,
            filter,
            stats,
        })
    }

    pub fn config(&self) -> &ClipProcessorConfig {
        &self.cfg
    }

    pub fn aspect(&self) -> AspectMode {
        self.aspect
    }

    /// `(height, width)` of every [`PixelValues`] this processor produces.
    pub fn output_size(&self) -> (usize, usize) {
        self.output
    }

    /// `(height, width)` after the resize step for an input of `height` x `width` (after
    /// padding, in `Pad` mode); the input size itself when resizing is off.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match (self.cfg.do_resize, self.cfg.resize_target()) {
            (true, Ok(target)) => resize_output_size(height, width, target),
            _ => (height, width),
        }
    }

    /// Runs the whole pipeline on one RGB image. Fails only on an empty (0-pixel) image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<PixelValues> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::Image {
                path: PathBuf::from("<image given to the processor>"),
                reason: format!("image is empty ({}x{})", img.width(), img.height()),
            });
        }
        let padded;
        let mut img = img;
        match self.aspect {
            AspectMode::Pad => {
                padded = expand_to_square(img, pad_background(&self.cfg.image_mean));
                img = &padded;
            }
            AspectMode::Squash => {
                let (h, w) = self.output;
                padded = pil_resize(img, w, h, self.filter);
                img = &padded;
            }
            AspectMode::Resize => {}
        }
        let resized;
        if self.cfg.do_resize {
            let (h, w) = self.resized_size(img.height() as usize, img.width() as usize);
            resized = pil_resize(img, w, h, self.filter);
            img = &resized;
        }
        let cropped;
        if self.cfg.do_center_crop {
            let (h, w) = self.cfg.crop_target()?;
            cropped = center_crop(img, h, w);
            img = &cropped;
        }
        Ok(self.to_pixel_values(img))
    }

    /// Rescale and normalise with numpy's dtypes: `(uint8 as float64 * factor) as float32`,
    /// then `(x - mean) / std` in float32; the layout changes from HWC to CHW.
    fn to_pixel_values(&self, img: &RgbImage) -> PixelValues {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (x, y, px) in img.enumerate_pixels() {
            for (c, &v) in px.0.iter().enumerate() {
                let mut value = if self.cfg.do_rescale {
                    (f64::from(v) * self.cfg.rescale_factor) as f32
                } else {
                    f32::from(v)
                };
                if let Some((mean, std)) = &self.stats {
                    value = (value - mean[c]) / std[c];
                }
                data[(c * h + y as usize) * w + x as usize] = value;
            }
        }
        PixelValues {
            data,
            height: h,
            width: w,
        }
    }
}

/// The size every output has, or an error naming the config when it would vary per image.
fn fixed_output_size(cfg: &ClipProcessorConfig, aspect: AspectMode) -> Result<(usize, usize)> {
    if cfg.do_center_crop {
        return cfg.crop_target();
    }
    if cfg.do_resize {
        match (cfg.resize_target()?, aspect) {
            (ResizeTarget::Exact { height, width }, _) => return Ok((height, width)),
            // A square input keeps its shape under a shortest-edge resize.
            (ResizeTarget::ShortestEdge(n), AspectMode::Pad | AspectMode::Squash) => {
                return Ok((n, n))
            }
            (ResizeTarget::ShortestEdge(_), AspectMode::Resize) => {}
        }
    }
    Err(cfg.config_error(
        "do_center_crop",
        "output size would depend on each image; enable the center crop or give `size` \
         as height and width",
    ))
}

/// transformers' `get_resize_output_image_size(default_to_square=False)` for an int size, or the
/// exact size. Returns `(height, width)`. The long side is `int(s * long / short)`: Python true
/// division (correctly rounded, like `f64` division here) then truncation.
pub fn resize_output_size(height: usize, width: usize, target: ResizeTarget) -> (usize, usize) {
    match target {
        ResizeTarget::Exact { height, width } => (height, width),
        ResizeTarget::ShortestEdge(s) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            let new_long = ((s * long) as f64 / short as f64) as usize;
            if width <= height {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// LLaVA's background colour: `tuple(int(x * 255) for x in image_mean)`, truncating.
fn pad_background(mean: &[f64]) -> [u8; 3] {
    let channel = |c: usize| {
        let v = mean.get(c).or(mean.first()).copied().unwrap_or(0.0);
        // `as` truncates toward zero like Python's int() and saturates out-of-range values.
        (v * 255.0) as u8
    };
    [channel(0), channel(1), channel(2)]
}

/// LLaVA's `expand2square`: paste onto a `max(w, h)` square at `(0, (w - h) / 2)` when wider,
/// `((h - w) / 2, 0)` when taller; square images are returned unchanged.
fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut canvas = RgbImage::from_pixel(side, side, Rgb(background));
    let (left, top) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    image::imageops::replace(&mut canvas, img, i64::from(left), i64::from(top));
    canvas
}

/// transformers' numpy `center_crop`: `top = (h - crop_h) // 2`, `left = (w - crop_w) // 2`;
/// along an axis shorter than the crop, the image is centred on zeros with the odd pixel of
/// padding going first (`ceil`), exactly as HF's pad-then-crop does.
fn center_crop(img: &RgbImage, crop_h: usize, crop_w: usize) -> RgbImage {
    let (src_y, dst_y, len_y) = crop_axis(img.height() as usize, crop_h);
    let (src_x, dst_x, len_x) = crop_axis(img.width() as usize, crop_w);
    let mut out = RgbImage::new(crop_w as u32, crop_h as u32);
    for dy in 0..len_y {
        for dx in 0..len_x {
            let px = *img.get_pixel((src_x + dx) as u32, (src_y + dy) as u32);
            out.put_pixel((dst_x + dx) as u32, (dst_y + dy) as u32, px);
        }
    }
    out
}

/// For one axis: where the kept span starts in the source, where it lands in the output, and
/// its length.
fn crop_axis(orig: usize, crop: usize) -> (usize, usize, usize) {
    if orig >= crop {
        ((orig - crop) / 2, 0, crop)
    } else {
        (0, (crop - orig).div_ceil(2), orig)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Smooth ramps in R and G, a hash in B; also used by `resample`'s tests.
    pub(super) fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x * 37 + y * 91) % 256) as u8,
            ])
        })
    }

    fn processor(json: &str, aspect: AspectMode) -> ClipImageProcessor {
        let cfg = ClipProcessorConfig::from_json_text(json, Path::new("test.json")).unwrap();
        ClipImageProcessor::new(cfg, aspect).unwrap()
    }

    #[test]
    fn shortest_edge_output_size_truncates_long_side() {
        assert_eq!(
            resize_output_size(45, 67, ResizeTarget::ShortestEdge(30)),
            (30, 44)
        );
        assert_eq!(
            resize_output_size(67, 45, ResizeTarget::ShortestEdge(30)),
            (44, 30)
        );
        assert_eq!(
            resize_output_size(5, 5, ResizeTarget::ShortestEdge(30)),
            (30, 30)
        );
        let p = processor(
            r#"{"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}"#,
            AspectMode::Resize,
        );
        assert_eq!(p.resized_size(45, 67), (30, 44));
        assert_eq!(p.output_size(), (30, 30));
        let out = p.preprocess(&gradient(67, 45)).unwrap();
        assert_eq!(
            (out.height, out.width, out.data.len()),
            (30, 30, 3 * 30 * 30)
        );
    }

    #[test]
    fn center_crop_offsets_and_zero_padding() {
        let img = gradient(7, 4);
        let out = center_crop(&img, 2, 4);
        // top = (4 - 2) // 2 = 1, left = (7 - 4) // 2 = 1.
        assert_eq!(out.get_pixel(0, 0), img.get_pixel(1, 1));
        assert_eq!(out.get_pixel(3, 1), img.get_pixel(4, 2));
        // 3 rows into 6: padding ceil(3 / 2) = 2 rows on top, 1 below; width 7 cropped to 5.
        let img = gradient(7, 3);
        let out = center_crop(&img, 6, 5);
        assert_eq!(out.dimensions(), (5, 6));
        assert!((0..5).all(|x| out.get_pixel(x, 0).0 == [0; 3] && out.get_pixel(x, 5).0 == [0; 3]));
        assert_eq!(out.get_pixel(0, 2), img.get_pixel(1, 0));
        assert_eq!(out.get_pixel(4, 4), img.get_pixel(5, 2));
    }

    #[test]
    fn pad_mode_background_and_offsets() {
        let mean = [0.48145466, 0.4578275, 0.40821073];
        // int(0.48145466 * 255) = 122, int(0.4578275 * 255) = 116, int(0.40821073 * 255) = 104.
        assert_eq!(pad_background(&mean), [122, 116, 104]);

        let wide = RgbImage::from_pixel(5, 2, Rgb([1, 2, 3]));
        let sq = expand_to_square(&wide, [9, 9, 9]);
        assert_eq!(sq.dimensions(), (5, 5));
        // Pasted at (0, (5 - 2) // 2 = 1): rows 1 and 2 hold the image.
        let rows: Vec<bool> = (0..5).map(|y| sq.get_pixel(0, y).0 == [1, 2, 3]).collect();
        assert_eq!(rows, vec![false, true, true, false, false]);
        assert_eq!(sq.get_pixel(4, 0).0, [9, 9, 9]);

        let tall = RgbImage::from_pixel(1, 4, Rgb([1, 2, 3]));
        let sq = expand_to_square(&tall, [9, 9, 9]);
        // Pasted at ((4 - 1) // 2 = 1, 0).
        let cols: Vec<bool> = (0..4).map(|x| sq.get_pixel(x, 3).0 == [1, 2, 3]).collect();
        assert_eq!(cols, vec![false, true, false, false]);

        // Through the processor: a 4x2 image padded to 4x4, identity resize, no normalize.
        let p = processor(
            r#"{"size": {"height": 4, "width": 4}, "do_center_crop": false,
                "do_normalize": false, "do_rescale": false, "image_mean": [0.5, 0.5, 0.5]}"#,
            AspectMode::Pad,
        );
        let out = p
            .preprocess(&RgbImage::from_pixel(4, 2, Rgb([10, 20, 30])))
            .unwrap();
        assert_eq!((out.height, out.width), (4, 4));
        let red_col0: Vec<f32> = (0..4).map(|y| out.data[y * 4]).collect();
        assert_eq!(red_col0, vec![127.0, 10.0, 10.0, 127.0]);
        assert_eq!(out.data[16 + 5], 20.0); // green plane, row 1
        let err = p.preprocess(&RgbImage::new(0, 3)).unwrap_err();
        assert!(matches!(err, Error::Image { .. }));
    }

    #[test]
    fn squash_resizes_to_the_output_size_without_crop_or_padding() {
        let json = r#"{"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}"#;
        let squash = processor(json, AspectMode::Squash);
        let resize = processor(json, AspectMode::Resize);
        assert_eq!(squash.output_size(), (30, 30));
        let img = gradient(67, 45);
        // Squash = one resize straight to 30x30 (the whole image kept, stretched); the HF
        // shortest-edge resize and crop that follow are identities on a 30x30 image.
        let want = resize
            .preprocess(&pil_resize(&img, 30, 30, squash.filter))
            .unwrap();
        assert_eq!(squash.preprocess(&img).unwrap(), want);
        assert_ne!(resize.preprocess(&img).unwrap(), want);
        // Without a crop, a shortest-edge config still has one fixed (square) output size.
        let no_crop = processor(
            r#"{"size": {"shortest_edge": 12}, "do_center_crop": false}"#,
            AspectMode::Squash,
        );
        assert_eq!(no_crop.output_size(), (12, 12));
        let out = no_crop.preprocess(&gradient(40, 9)).unwrap();
        assert_eq!((out.height, out.width), (12, 12));
    }

    #[test]
    fn normalisation_follows_numpy_dtypes() {
        let p = processor(
            r#"{"size": {"height": 1, "width": 1}, "crop_size": 1}"#,
            AspectMode::Resize,
        );
        let out = p
            .preprocess(&RgbImage::from_pixel(1, 1, Rgb([0, 128, 255])))
            .unwrap();
        let expect = |v: u8, c: usize| {
            ((f64::from(v) * (1.0 / 255.0)) as f32 - OPENAI_CLIP_MEAN[c] as f32)
                / OPENAI_CLIP_STD[c] as f32
        };
        assert_eq!(out.data, vec![expect(0, 0), expect(128, 1), expect(255, 2)]);
    }

    #[test]
    fn image_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("corrupt.png");
        std::fs::write(&bad, [0x89, b'P', b'N', b'G', 0, 1, 2, 3]).unwrap();
        let err = crate::data::image::load_rgb(&bad).unwrap_err();
        assert!(err.to_string().contains("corrupt.png"), "{err}");
        let err = crate::data::image::load_rgb(&dir.path().join("missing.jpg")).unwrap_err();
        assert!(err.to_string().contains("missing.jpg"), "{err}");
    }
}
