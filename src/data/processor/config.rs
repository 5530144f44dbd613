//! `preprocessor_config.json` as `CLIPImageProcessor` reads it: HF's defaults for missing or
//! `null` fields, the legacy integer size forms, and validation whose errors name the file and
//! key.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::filters::Resample;
use crate::error::{Error, Result};

/// `OPENAI_CLIP_MEAN` in transformers, the default when a config has no `image_mean`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// `OPENAI_CLIP_STD` in transformers, the default when a config has no `image_std`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
const PROCESSOR_CONFIG: &str = "processor_config.json";

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
                &pre,
                std::io::Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "not found, nor {PROCESSOR_CONFIG}, in model directory {}: one of them \
                         must hold the CLIP image processor settings; copy \
                         {PREPROCESSOR_CONFIG} from the original checkpoint",
                        dir.display()
                    ),
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
                reason: format!(
                    "missing, and {} does not exist either: one of them must hold the CLIP \
                     image processor settings; copy {PREPROCESSOR_CONFIG} from the original \
                     checkpoint",
                    path.with_file_name(PREPROCESSOR_CONFIG).display()
                ),
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
    pub(super) fn stats(&self) -> Result<([f32; 3], [f32; 3])> {
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

    pub(super) fn config_error(&self, key: &str, reason: &str) -> Error {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::processor::{AspectMode, ClipImageProcessor};

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
}
