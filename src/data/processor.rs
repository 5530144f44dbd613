//! Hugging Face's `CLIPImageProcessor` (the slow, PIL-based one), reproduced bit for bit.
//!
//! Vision towers are sensitive to preprocessing: a resize that differs from Pillow's by one grey
//! level on many pixels shifts the image features measurably, and evaluation numbers with them.
//! So the resize below is a transcription of Pillow's `Resample.c` (fixed-point, two passes, with
//! the same rounding) rather than a call to some other library's bicubic, and every later step
//! follows the numpy code of transformers 4.57 including its dtypes.
//!
//! Pipeline, in HF's order: (LLaVA `pad`: expand to a square) → resize → center crop → rescale →
//! normalize → CHW `f32`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde::Deserialize;

use crate::error::{Error, Result};

/// `OPENAI_CLIP_MEAN` in transformers, the default when a config has no `image_mean`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// `OPENAI_CLIP_STD` in transformers, the default when a config has no `image_std`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
const PROCESSOR_CONFIG: &str = "processor_config.json";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// A size entry of `preprocessor_config.json`: `{"shortest_edge": n}` or `{"height", "width"}`.
/// Other keys (`longest_edge`, ...) are ignored; a dict with neither form is rejected when used.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SizeDict {
    pub shortest_edge: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
}

impl SizeDict {
    pub fn shortest_edge(n: usize) -> Self {
        SizeDict {
            shortest_edge: Some(n),
            ..SizeDict::default()
        }
    }

    pub fn exact(height: usize, width: usize) -> Self {
        SizeDict {
            shortest_edge: None,
            height: Some(height),
            width: Some(width),
        }
    }
}

/// What the resize step aims for, resolved from [`SizeDict`] with HF's precedence
/// (`shortest_edge` wins over `height`/`width`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Scale so the short side becomes `n`, keeping the aspect ratio (long side truncated).
    ShortestEdge(usize),
    /// Stretch to exactly this size.
    Exact { height: usize, width: usize },
}

/// Pillow's resampling filters, with their `Image.Resampling` integer codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
    /// Magic Kernel Sharp 2013 (Pillow 13).
    Mks2013,
    /// Magic Kernel Sharp 2021 (Pillow 13).
    Mks2021,
}

impl Resample {
    /// Maps the integer stored in `resample` (PIL's enum value) to a filter.
    pub fn from_pil_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Resample::Nearest),
            1 => Some(Resample::Lanczos),
            2 => Some(Resample::Bilinear),
            3 => Some(Resample::Bicubic),
            4 => Some(Resample::Box),
            5 => Some(Resample::Hamming),
            6 => Some(Resample::Mks2013),
            7 => Some(Resample::Mks2021),
            _ => None,
        }
    }
}

/// The fields of `preprocessor_config.json` that `CLIPImageProcessor` uses. Missing or `null`
/// fields take HF's defaults; unknown keys are ignored. Deserialising never fails on a value
/// that is merely unusable (an unknown `resample`, say): [`ClipProcessorConfig::validate`]
/// reports those with the file and key, which serde could not do.
#[derive(Deserialize, Clone, Debug)]
#[serde(from = "RawConfig")]
pub struct ClipProcessorConfig {
    pub do_resize: bool,
    pub size: SizeDict,
    /// PIL resampling code; 3 (bicubic) by default.
    pub resample: i64,
    pub do_center_crop: bool,
    pub crop_size: SizeDict,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// Per-channel mean; a single number in the file is broadcast to three channels.
    pub image_mean: Vec<f64>,
    pub image_std: Vec<f64>,
    /// Kept for completeness: our inputs are always RGB already.
    pub do_convert_rgb: Option<bool>,
    /// The file this was read from, so later validation errors can name it.
    pub source: Option<PathBuf>,
}

/// The on-disk shape, every field optional so that absent and `null` both mean "HF default".
#[derive(Deserialize, Default)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<RawSize>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<RawSize>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<RawStats>,
    image_std: Option<RawStats>,
    do_convert_rgb: Option<bool>,
}

/// Old configs store sizes as a bare integer; HF reads it as `shortest_edge` for `size` and as
/// a square for `crop_size` (`get_size_dict`'s `default_to_square`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(usize),
    Dict(SizeDict),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawStats {
    One(f64),
    Many(Vec<f64>),
}

impl RawStats {
    /// numpy broadcasting: one value applies to every channel.
    fn into_channels(self) -> Vec<f64> {
        match self {
            RawStats::One(v) => vec![v; 3],
            RawStats::Many(v) if v.len() == 1 => vec![v[0]; 3],
            RawStats::Many(v) => v,
        }
    }
}

impl From<RawConfig> for ClipProcessorConfig {
    fn from(raw: RawConfig) -> Self {
        let size = match raw.size {
            None => SizeDict::shortest_edge(224),
            Some(RawSize::Int(n)) => SizeDict::shortest_edge(n),
            Some(RawSize::Dict(d)) => d,
        };
        let crop_size = match raw.crop_size {
            None => SizeDict::exact(224, 224),
            Some(RawSize::Int(n)) => SizeDict::exact(n, n),
            Some(RawSize::Dict(d)) => d,
        };
        ClipProcessorConfig {
            do_resize: raw.do_resize.unwrap_or(true),
            size,
            resample: raw.resample.unwrap_or(3),
            do_center_crop: raw.do_center_crop.unwrap_or(true),
            crop_size,
            do_rescale: raw.do_rescale.unwrap_or(true),
            rescale_factor: raw.rescale_factor.unwrap_or(1.0 / 255.0),
            do_normalize: raw.do_normalize.unwrap_or(true),
            image_mean: raw
                .image_mean
                .map_or(OPENAI_CLIP_MEAN.to_vec(), RawStats::into_channels),
            image_std: raw
                .image_std
                .map_or(OPENAI_CLIP_STD.to_vec(), RawStats::into_channels),
            do_convert_rgb: raw.do_convert_rgb,
            source: None,
        }
    }
}

impl Default for ClipProcessorConfig {
    /// `CLIPImageProcessor()` with no arguments: 224 shortest edge, 224x224 crop, OpenAI stats.
    fn default() -> Self {
        RawConfig::default().into()
    }
}

impl ClipProcessorConfig {
    /// Reads the image-processor config of a model directory: `preprocessor_config.json`, or
    /// failing that the `image_processor` object of `processor_config.json` (newer transformers
    /// save processors that way). The result is validated.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join(PREPROCESSOR_CONFIG);
        match std::fs::read_to_string(&pre) {
            Ok(text) => return Self::from_json_text(&text, &pre),
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(Error::io(&pre, e)),
            Err(_) => {}
        }
        let combined = dir.join(PROCESSOR_CONFIG);
        match std::fs::read_to_string(&combined) {
            Ok(text) => Self::from_processor_config_text(&text, &combined),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::io(
                dir,
                std::io::Error::new(
                    ErrorKind::NotFound,
                    format!("found neither {PREPROCESSOR_CONFIG} nor {PROCESSOR_CONFIG}"),
                ),
            )),
            Err(e) => Err(Error::io(&combined, e)),
        }
    }

    /// Parses a `preprocessor_config.json` document; `path` is recorded and used in errors.
    pub fn from_json_text(text: &str, path: &Path) -> Result<Self> {
        let mut cfg: Self = serde_json::from_str(text).map_err(|e| Error::json(path, e))?;
        cfg.source = Some(path.to_path_buf());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a `processor_config.json` document and takes its `image_processor` object.
    fn from_processor_config_text(text: &str, path: &Path) -> Result<Self> {
        let mut doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::json(path, e))?;
        let inner = doc
            .get_mut("image_processor")
            .map(serde_json::Value::take)
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                key: "image_processor".into(),
                reason: "missing".into(),
            })?;
        let mut cfg: Self = serde_json::from_value(inner).map_err(|e| Error::json(path, e))?;
        cfg.source = Some(path.to_path_buf());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value the enabled steps will use, so preprocessing cannot fail half way.
    pub fn validate(&self) -> Result<()> {
        self.resample_filter()?;
        if self.do_resize {
            self.resize_target()?;
        }
        if self.do_center_crop {
            self.crop_target()?;
        }
        if self.do_rescale && !self.rescale_factor.is_finite() {
            return Err(self.config_error("rescale_factor", "must be a finite number"));
        }
        if self.do_normalize {
            self.stats()?;
        }
        Ok(())
    }

    /// The resampling filter named by `resample`.
    pub fn resample_filter(&self) -> Result<Resample> {
        Resample::from_pil_code(self.resample).ok_or_else(|| {
            self.config_error(
                "resample",
                &format!(
                    "unsupported PIL filter code {} (expected 0 nearest, 1 lanczos, \
                     2 bilinear, 3 bicubic, 4 box, 5 hamming, 6 mks2013 or 7 mks2021)",
                    self.resample
                ),
            )
        })
    }

    /// The resize goal from `size`, with HF's precedence: `shortest_edge`, then height+width.
    pub fn resize_target(&self) -> Result<ResizeTarget> {
        let target = match self.size {
            SizeDict {
                shortest_edge: Some(n),
                ..
            } => ResizeTarget::ShortestEdge(n),
            SizeDict {
                height: Some(height),
                width: Some(width),
                ..
            } => ResizeTarget::Exact { height, width },
            _ => {
                return Err(
                    self.config_error("size", "needs `shortest_edge` or both `height` and `width`")
                )
            }
        };
        let positive = match target {
            ResizeTarget::ShortestEdge(n) => n > 0,
            ResizeTarget::Exact { height, width } => height > 0 && width > 0,
        };
        if !positive {
            return Err(self.config_error("size", "must be positive"));
        }
        Ok(target)
    }

    /// `(height, width)` of the center crop.
    pub fn crop_target(&self) -> Result<(usize, usize)> {
        match self.crop_size {
            SizeDict {
                height: Some(h),
                width: Some(w),
                ..
            } if h > 0 && w > 0 => Ok((h, w)),
            _ => Err(self.config_error(
                "crop_size",
                "needs positive `height` and `width` (or a single integer)",
            )),
        }
    }

    /// Mean and std as the `f32` arrays numpy builds from them (`np.array(mean, dtype=float32)`).
    fn stats(&self) -> Result<([f32; 3], [f32; 3])> {
        let mean = three_channels(&self.image_mean)
            .ok_or_else(|| self.config_error("image_mean", "needs 1 or 3 values"))?;
        let std = three_channels(&self.image_std)
            .ok_or_else(|| self.config_error("image_std", "needs 1 or 3 values"))?;
        if mean.iter().any(|m| !m.is_finite()) {
            return Err(self.config_error("image_mean", "must be finite"));
        }
        if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(self.config_error("image_std", "must be finite and non-zero"));
        }
        Ok((mean.map(|v| v as f32), std.map(|v| v as f32)))
    }

    fn config_error(&self, key: &str, reason: &str) -> Error {
        Error::Config {
            path: self
                .source
                .clone()
                .unwrap_or_else(|| PathBuf::from(PREPROCESSOR_CONFIG)),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

fn three_channels(v: &[f64]) -> Option<[f64; 3]> {
    <[f64; 3]>::try_from(v).ok()
}

// ---------------------------------------------------------------------------------------------
// Processor
// ---------------------------------------------------------------------------------------------

/// How a non-square image reaches the processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AspectMode {
    /// Plain HF processing: shortest-edge resize then center crop (cuts the long side).
    Resize,
    /// LLaVA's `image_aspect_ratio: pad` (`expand2square`): centre the image on a square canvas
    /// of the mean colour first, so nothing is cropped away.
    Pad,
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
        if self.aspect == AspectMode::Pad {
            padded = expand_to_square(img, pad_background(&self.cfg.image_mean));
            img = &padded;
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
            (ResizeTarget::ShortestEdge(n), AspectMode::Pad) => return Ok((n, n)),
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

// ---------------------------------------------------------------------------------------------
// Pillow's resize (libImaging/Resample.c and, for NEAREST, Geometry.c), 8 bits per channel
// ---------------------------------------------------------------------------------------------

/// Fixed-point precision of Pillow's 8-bit convolution: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// `Image.resize((out_w, out_h), resample=filter, reducing_gap=None)` on an RGB image.
fn pil_resize(img: &RgbImage, out_w: usize, out_h: usize, filter: Resample) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if (in_w, in_h) == (out_w, out_h) {
        // Pillow returns a copy without filtering.
        return img.clone();
    }
    let src = Plane {
        data: img.as_raw().clone(),
        width: in_w,
        height: in_h,
    };
    let out = match filter {
        Resample::Nearest => resize_nearest(&src, out_w, out_h),
        _ => resize_convolution(&src, out_w, out_h, filter),
    };
    // The buffer length is width * height * 3 by construction.
    RgbImage::from_raw(out.width as u32, out.height as u32, out.data)
        .unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

/// Interleaved RGB8 pixels with their size, the working format of the resize passes.
struct Plane {
    data: Vec<u8>,
    width: usize,
    height: usize,
}

/// Convolution kernel of one Pillow filter and its support at scale 1.
fn kernel(filter: Resample) -> (fn(f64) -> f64, f64) {
    match filter {
        Resample::Box | Resample::Nearest => (box_filter, 0.5),
        Resample::Bilinear => (bilinear_filter, 1.0),
        Resample::Hamming => (hamming_filter, 1.0),
        Resample::Bicubic => (bicubic_filter, 2.0),
        Resample::Lanczos => (lanczos_filter, 3.0),
        Resample::Mks2013 => (mks2013_filter, 2.5),
        Resample::Mks2021 => (mks2021_filter, 4.5),
    }
}

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Hamming-windowed sinc, as written in Pillow.
fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        1.0
    } else if x >= 1.0 {
        0.0
    } else {
        let x = x * std::f64::consts::PI;
        // Pillow writes the constants as C floats (`0.54f`, `0.46f`); their f32 rounding shows.
        x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
    }
}

/// Keys' cubic convolution with `a = -0.5`, as written in Pillow.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

/// Magic Kernel Sharp 2013, as written in Pillow 13 (`pow(x, 2)` is exact, hence `x * x`).
fn mks2013_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 0.5 {
        17.0 / 16.0 - 7.0 / 4.0 * (x * x)
    } else if x < 1.5 {
        (1.0 - x) * (7.0 / 4.0 - x)
    } else if x < 2.5 {
        -1.0 / 8.0 * ((x - 5.0 / 2.0) * (x - 5.0 / 2.0))
    } else {
        0.0
    }
}

/// Magic Kernel Sharp 2021, as written in Pillow 13.
fn mks2021_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 0.5 {
        577.0 / 576.0 - 239.0 / 144.0 * (x * x)
    } else if x < 1.5 {
        35.0 / 36.0 * (x - 1.0) * (x - 239.0 / 140.0)
    } else if x < 2.5 {
        1.0 / 6.0 * (x - 2.0) * (65.0 / 24.0 - x)
    } else if x < 3.5 {
        1.0 / 36.0 * (x - 3.0) * (x - 15.0 / 4.0)
    } else if x < 4.5 {
        -1.0 / 288.0 * ((x - 9.0 / 2.0) * (x - 9.0 / 2.0))
    } else {
        0.0
    }
}

/// Per-output-pixel source window and weights for one axis (`precompute_coeffs`).
#[derive(Debug)]
struct Coeffs {
    /// Maximum window length; weights of output `i` live at `weights[i * ksize..]`.
    ksize: usize,
    /// `(first source index, window length)` per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<f64>,
}

/// Pillow's `precompute_coeffs` for the full-image box `(0, in_size)`. C's `(int)` casts are
/// truncations toward zero, which `as i64` reproduces (a negative start is then clamped to 0).
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    let (filter_fn, filter_support) = kernel(filter);
    // `(double)(in1 - in0) / outSize` with float box corners: exact for any real image size.
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter_support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0.0; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let (xmin, count) = (xmin as usize, xmax.max(0) as usize);
        let k = &mut weights[xx * ksize..xx * ksize + count.min(ksize)];
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate() {
            *w = filter_fn((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        if total != 0.0 {
            k.iter_mut().for_each(|w| *w /= total);
        }
        bounds.push((xmin, count.min(ksize)));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// `normalize_coeffs_8bpc`: weights to fixed point, rounding half away from zero.
fn normalize_coeffs_8bpc(weights: &[f64]) -> Vec<i64> {
    let one = f64::from(1u32 << PRECISION_BITS);
    weights
        .iter()
        .map(|&k| {
            if k < 0.0 {
                (-0.5 + k * one) as i64
            } else {
                (0.5 + k * one) as i64
            }
        })
        .collect()
}

/// Pillow's `clip8`: undo the fixed point and saturate to 0..=255.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Weighted sum of `taps` RGB pixels (`pixel(i)` gives the i-th) with fixed-point weights,
/// starting from half a unit so the final shift rounds.
fn convolve(kk: &[i64], taps: usize, pixel: impl Fn(usize) -> [u8; 3]) -> [u8; 3] {
    let mut ss = [1i64 << (PRECISION_BITS - 1); 3];
    for (i, &k) in kk.iter().take(taps).enumerate() {
        let p = pixel(i);
        for c in 0..3 {
            ss[c] += i64::from(p[c]) * k;
        }
    }
    ss.map(clip8)
}

/// `ImagingResampleInner` as of Pillow 13: two separable passes, each rounding to 8 bits, a pass
/// whose size does not change skipped. Normally horizontal first, over only the source rows the
/// vertical pass will read; but when the height shrinks by more than twice as many pixels as the
/// width (tall images), Pillow 13 runs the vertical pass first (python-pillow/Pillow#9549).
/// Pillow <= 12.1 always went horizontal first, so for such images its output differs from
/// Pillow 13's by a grey level or so; we follow 13.0, the version the parity fixtures record.
fn resize_convolution(src: &Plane, out_w: usize, out_h: usize, filter: Resample) -> Plane {
    let horiz = precompute_coeffs(src.width, out_w, filter);
    let mut vert = precompute_coeffs(src.height, out_h, filter);
    let need_horizontal = out_w != src.width;
    let need_vertical = out_h != src.height;

    if !horizontal_first(src.width, src.height, out_w, out_h) {
        // Only reached when the height shrinks, so the vertical pass is always needed.
        let tall = resample_vertical(src, &vert);
        return if need_horizontal {
            resample_horizontal(&tall, 0..tall.height, &horiz)
        } else {
            tall
        };
    }

    let first_row = vert.bounds.first().map_or(0, |b| b.0);
    let last_row = vert.bounds.last().map_or(0, |b| b.0 + b.1);
    let mut current: Option<Plane> = None;
    if need_horizontal {
        for b in &mut vert.bounds {
            b.0 -= first_row;
        }
        current = Some(resample_horizontal(src, first_row..last_row, &horiz));
    }
    if need_vertical {
        let input = current.as_ref().unwrap_or(src);
        current = Some(resample_vertical(input, &vert));
    }
    current.unwrap_or_else(|| Plane {
        data: src.data.clone(),
        width: src.width,
        height: src.height,
    })
}

/// Pillow 13's pass order test: `!((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2)`,
/// in signed arithmetic (an upscale makes a difference negative).
fn horizontal_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let shrink_h = in_h as i64 - out_h as i64;
    let shrink_w = in_w as i64 - out_w as i64;
    !(shrink_h > 0 && shrink_h > shrink_w * 2)
}

/// `ImagingResampleHorizontal_8bpc` over source rows `rows`.
fn resample_horizontal(src: &Plane, rows: std::ops::Range<usize>, c: &Coeffs) -> Plane {
    let kk = normalize_coeffs_8bpc(&c.weights);
    let out_w = c.bounds.len();
    let mut data = Vec::with_capacity(rows.len() * out_w * 3);
    for y in rows.clone() {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
            let k = &kk[xx * c.ksize..(xx + 1) * c.ksize];
            let p = convolve(k, taps, |i| {
                let o = (xmin + i) * 3;
                [row[o], row[o + 1], row[o + 2]]
            });
            data.extend_from_slice(&p);
        }
    }
    Plane {
        data,
        width: out_w,
        height: rows.len(),
    }
}

/// `ImagingResampleVertical_8bpc`.
fn resample_vertical(src: &Plane, c: &Coeffs) -> Plane {
    let kk = normalize_coeffs_8bpc(&c.weights);
    let out_h = c.bounds.len();
    let stride = src.width * 3;
    let mut data = Vec::with_capacity(out_h * stride);
    for (yy, &(ymin, taps)) in c.bounds.iter().enumerate() {
        let k = &kk[yy * c.ksize..(yy + 1) * c.ksize];
        for x in 0..src.width {
            let p = convolve(k, taps, |i| {
                let o = (ymin + i) * stride + x * 3;
                [src.data[o], src.data[o + 1], src.data[o + 2]]
            });
            data.extend_from_slice(&p);
        }
    }
    Plane {
        data,
        width: src.width,
        height: out_h,
    }
}

/// Source index per output index for NEAREST (`ImagingScaleAffine`): start at half a step and
/// accumulate the step in `f64` exactly as Pillow does (the accumulation error decides ties);
/// `None` where Pillow would fall outside the image and leave a zero.
fn nearest_table(in_size: usize, out_size: usize) -> Vec<Option<usize>> {
    let step = in_size as f32 as f64 / out_size as f64;
    let mut pos = step * 0.5;
    let mut table = Vec::with_capacity(out_size);
    for _ in 0..out_size {
        // Pillow's COORD: -1 for negatives, else truncation.
        let idx = if pos < 0.0 { None } else { Some(pos as usize) };
        table.push(idx.filter(|&i| i < in_size));
        pos += step;
    }
    table
}

/// `Image.resize` with `NEAREST`, which Pillow routes through an affine transform instead of the
/// convolution passes.
fn resize_nearest(src: &Plane, out_w: usize, out_h: usize) -> Plane {
    let xs = nearest_table(src.width, out_w);
    let ys = nearest_table(src.height, out_h);
    let mut data = vec![0u8; out_w * out_h * 3];
    for (y, sy) in ys.iter().enumerate() {
        let Some(sy) = sy else { continue };
        for (x, sx) in xs.iter().enumerate() {
            let Some(sx) = sx else { continue };
            let s = (sy * src.width + sx) * 3;
            let d = (y * out_w + x) * 3;
            data[d..d + 3].copy_from_slice(&src.data[s..s + 3]);
        }
    }
    Plane {
        data,
        width: out_w,
        height: out_h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_image(values: &[u8]) -> RgbImage {
        RgbImage::from_fn(values.len() as u32, 1, |x, _| {
            let v = values[x as usize];
            Rgb([v, v, v])
        })
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
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
    fn bicubic_coeffs_4_to_2_match_hand_computation() {
        let c = precompute_coeffs(4, 2, Resample::Bicubic);
        // scale 2, support 4: both outputs see all four inputs.
        assert_eq!(c.bounds, vec![(0, 4), (0, 4)]);
        // Unnormalised bicubic at (x + 0.5 - center) / 2 for center 1: -0.25, 0.25, 0.75, 1.25.
        let raw = [0.8671875, 0.8671875, 0.2265625, -0.0703125];
        let total: f64 = raw.iter().sum();
        for (x, r) in raw.iter().enumerate() {
            assert!((c.weights[x] - r / total).abs() < 1e-15);
            assert!((c.weights[c.ksize + 3 - x] - r / total).abs() < 1e-15);
        }
        // [10, 20, 30, 40]: 30 / 1.890625 = 15.87 -> 16 and 64.53125 / 1.890625 = 34.13 -> 34.
        let out = pil_resize(&row_image(&[10, 20, 30, 40]), 2, 1, Resample::Bicubic);
        assert_eq!(out.get_pixel(0, 0).0, [16; 3]);
        assert_eq!(out.get_pixel(1, 0).0, [34; 3]);
    }

    #[test]
    fn bilinear_coeffs_upscale_2_to_4() {
        let c = precompute_coeffs(2, 4, Resample::Bilinear);
        // Centers 0.25, 0.75, 1.25, 1.75; support 1.
        assert_eq!(c.bounds, vec![(0, 1), (0, 2), (0, 2), (1, 1)]);
        assert_eq!(&c.weights[c.ksize..c.ksize + 2], &[0.75, 0.25]);
        let out = pil_resize(&row_image(&[0, 100]), 4, 1, Resample::Bilinear);
        let values: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(values, vec![0, 25, 75, 100]);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        let one = f64::from(1u32 << PRECISION_BITS);
        assert_eq!(
            normalize_coeffs_8bpc(&[1.0, -0.25, 0.5 / one, -0.5 / one]),
            vec![1 << 22, -(1 << 20), 1, -1]
        );
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = gradient(7, 5);
        assert_eq!(pil_resize(&img, 7, 5, Resample::Bicubic), img);
        let c = precompute_coeffs(5, 5, Resample::Bicubic);
        for (i, &(xmin, taps)) in c.bounds.iter().enumerate() {
            let w = &c.weights[i * c.ksize..i * c.ksize + taps];
            assert!((w[i - xmin] - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, Rgb([200, 3, 128]));
        for filter in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Nearest,
        ] {
            for (w, h) in [(11, 9), (80, 61), (37, 50), (10, 23)] {
                let out = pil_resize(&img, w, h, filter);
                assert_eq!(out.dimensions(), (w as u32, h as u32));
                assert!(
                    out.pixels().all(|p| p.0 == [200, 3, 128]),
                    "{filter:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn hard_edges_clip_like_pillow() {
        // Bicubic overshoots at a hard edge; the result must clip, not wrap around. Expected
        // values are Pillow 13's `Image.resize(..., BICUBIC)` output for this row.
        let img = row_image(&[0, 0, 255, 255, 0, 0, 255, 255]);
        let cases: [(usize, &[u8]); 3] = [
            (3, &[82, 127, 173]),
            (5, &[0, 202, 128, 53, 255]),
            (13, &[0, 0, 5, 176, 255, 255, 128, 0, 0, 79, 250, 255, 255]),
        ];
        for (w, expected) in cases {
            let out = pil_resize(&img, w, 1, Resample::Bicubic);
            let values: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
            assert_eq!(values, expected, "width {w}");
        }
    }

    /// Deterministic test pattern: `(x*53 + y*97 + x*y*31) % 256` in every channel.
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = ((x * 53 + y * 97 + x * y * 31) % 256) as u8;
            Rgb([v, v, v])
        })
    }

    fn first_channel(img: &RgbImage) -> Vec<u8> {
        img.pixels().map(|p| p.0[0]).collect()
    }

    #[test]
    fn tall_images_resize_vertically_first_like_pillow_13() {
        assert!(!horizontal_first(4, 15, 3, 4));
        assert!(horizontal_first(15, 4, 4, 3));
        assert!(horizontal_first(4, 15, 8, 30));
        // Pillow 13.0 output; horizontal-first (Pillow <= 12.1) gives 129, 126 and 98 instead
        // of 130, 127 and 97.
        let out = pil_resize(&pattern(4, 15), 3, 4, Resample::Bicubic);
        assert_eq!(
            first_channel(&out),
            [99, 106, 111, 130, 127, 123, 108, 107, 105, 135, 117, 97]
        );
    }

    #[test]
    fn every_filter_matches_pillow_13() {
        // Pillow 13.0 `resize` of `pattern(9, 2)` to 4x1 (down) and 13x3 (up).
        let cases: [(Resample, [u8; 4], [u8; 39]); 4] = [
            (
                Resample::Hamming,
                [83, 119, 63, 113],
                [
                    0, 31, 56, 106, 146, 166, 212, 36, 22, 62, 112, 137, 168, 49, 89, 113, 58, 109,
                    135, 195, 32, 24, 76, 140, 120, 85, 97, 146, 170, 10, 72, 104, 177, 28, 26, 90,
                    168, 102, 1,
                ],
            ),
            (
                Resample::Mks2013,
                [73, 125, 82, 105],
                [
                    0, 5, 54, 112, 150, 202, 224, 56, 0, 56, 95, 153, 194, 45, 90, 111, 55, 88,
                    168, 203, 49, 1, 80, 145, 123, 88, 100, 174, 168, 0, 25, 133, 181, 41, 1, 104,
                    195, 92, 0,
                ],
            ),
            (
                Resample::Mks2021,
                [73, 125, 81, 105],
                [
                    0, 10, 58, 111, 143, 192, 216, 60, 2, 65, 94, 149, 189, 44, 90, 112, 59, 88,
                    161, 195, 53, 6, 84, 141, 120, 86, 97, 169, 166, 7, 32, 130, 173, 45, 10, 103,
                    188, 90, 0,
                ],
            ),
            (
                Resample::Lanczos,
                [71, 126, 83, 104],
                [
                    0, 5, 57, 114, 145, 200, 216, 65, 0, 65, 92, 153, 192, 43, 90, 111, 60, 81,
                    170, 195, 57, 1, 86, 144, 120, 86, 96, 175, 165, 6, 17, 139, 173, 48, 2, 106,
                    195, 86, 0,
                ],
            ),
        ];
        let img = pattern(9, 2);
        for (filter, down, up) in cases {
            assert_eq!(
                first_channel(&pil_resize(&img, 4, 1, filter)),
                down,
                "{filter:?}"
            );
            assert_eq!(
                first_channel(&pil_resize(&img, 13, 3, filter)),
                up,
                "{filter:?}"
            );
        }
    }

    #[test]
    fn nearest_picks_centre_samples() {
        let out = pil_resize(
            &row_image(&[0, 10, 20, 30, 40, 50]),
            3,
            1,
            Resample::Nearest,
        );
        let values: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(values, vec![10, 30, 50]);
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
    fn config_size_forms() {
        let cfg = ClipProcessorConfig::from_json_text(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                "resample": 3, "image_processor_type": "CLIPImageProcessor"}"#,
            Path::new("a.json"),
        )
        .unwrap();
        assert_eq!(
            cfg.resize_target().unwrap(),
            ResizeTarget::ShortestEdge(336)
        );
        assert_eq!(cfg.crop_target().unwrap(), (336, 336));
        assert_eq!(cfg.image_mean, OPENAI_CLIP_MEAN.to_vec());
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);

        let cfg = ClipProcessorConfig::from_json_text(
            r#"{"size": {"height": 384, "width": 320}, "crop_size": 300, "resample": 2,
                "image_mean": [0.5, 0.5, 0.5], "image_std": 0.5, "do_convert_rgb": null,
                "rescale_factor": 0.00392156862745098}"#,
            Path::new("b.json"),
        )
        .unwrap();
        assert_eq!(
            cfg.resize_target().unwrap(),
            ResizeTarget::Exact {
                height: 384,
                width: 320
            }
        );
        assert_eq!(cfg.crop_target().unwrap(), (300, 300));
        assert_eq!(cfg.resample_filter().unwrap(), Resample::Bilinear);
        assert_eq!(cfg.image_std, vec![0.5; 3]);
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);

        let cfg = ClipProcessorConfig::from_json_text(r#"{"size": 224}"#, Path::new("c.json"));
        assert_eq!(
            cfg.unwrap().resize_target().unwrap(),
            ResizeTarget::ShortestEdge(224)
        );
    }

    #[test]
    fn config_errors_name_file_and_key() {
        let err = ClipProcessorConfig::from_json_text(r#"{"resample": 9}"#, Path::new("x.json"))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.json") && msg.contains("resample"), "{msg}");

        let err = ClipProcessorConfig::from_json_text(
            r#"{"size": {"longest_edge": 5}}"#,
            Path::new("y.json"),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::Config { key, .. } if key == "size"),
            "{err}"
        );

        let err =
            ClipProcessorConfig::from_json_text("{not json", Path::new("z.json")).unwrap_err();
        assert!(matches!(err, Error::Json { .. }) && err.to_string().contains("z.json"));

        let cfg = ClipProcessorConfig::from_json_text(
            r#"{"do_center_crop": false}"#,
            Path::new("w.json"),
        )
        .unwrap();
        let err = ClipImageProcessor::new(cfg, AspectMode::Resize).unwrap_err();
        assert!(err.to_string().contains("w.json"), "{err}");
    }

    #[test]
    fn config_from_model_dir_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipProcessorConfig::from_model_dir(dir.path()).unwrap_err();
        // The file names live in the source error; `main` prints the whole chain.
        let source = std::error::Error::source(&err).map(ToString::to_string);
        let msg = format!("{err}: {}", source.unwrap_or_default());
        assert!(
            msg.contains(PREPROCESSOR_CONFIG) && msg.contains(PROCESSOR_CONFIG),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");

        let combined = dir.path().join(PROCESSOR_CONFIG);
        std::fs::write(
            &combined,
            r#"{"image_processor": {"crop_size": {"height": 30, "width": 30},
                "size": {"shortest_edge": 30}}, "processor_class": "LlavaProcessor"}"#,
        )
        .unwrap();
        let cfg = ClipProcessorConfig::from_model_dir(dir.path()).unwrap();
        assert_eq!(cfg.crop_target().unwrap(), (30, 30));
        assert_eq!(cfg.source.as_deref(), Some(combined.as_path()));

        std::fs::write(&combined, r#"{"processor_class": "X"}"#).unwrap();
        let err = ClipProcessorConfig::from_model_dir(dir.path()).unwrap_err();
        assert!(matches!(&err, Error::Config { key, .. } if key == "image_processor"));

        std::fs::write(dir.path().join(PREPROCESSOR_CONFIG), r#"{"size": 40}"#).unwrap();
        let cfg = ClipProcessorConfig::from_model_dir(dir.path()).unwrap();
        assert_eq!(cfg.resize_target().unwrap(), ResizeTarget::ShortestEdge(40));
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
