//! `preprocessor_config.json` as transformers' `MllamaImageProcessor` reads it.
//!
//! The file is read key by key from a JSON object (not through serde's derive) so that every
//! error names the file and the key: serde's "invalid type: string, expected f64 at line 3"
//! names neither. Keys the processor does not use (`processor_class`, `_processor_class`, ...)
//! are ignored, as HF's `from_dict` does.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::data::image::MAX_IMAGE_PIXELS;
use crate::data::processor::Resample;
use crate::error::{Error, Result};

/// `IMAGENET_STANDARD_MEAN` / `_STD` of transformers: `MllamaImageProcessor()`'s defaults.
/// The released Llama-3.2-Vision checkpoints set the OpenAI CLIP statistics in their file.
pub const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
pub const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
const PROCESSOR_CONFIG: &str = "processor_config.json";
/// The class names a config may declare; `MllamaImageProcessor` is the only one transformers
/// 4.57 has (no fast variant).
const PROCESSOR_TYPE: &str = "MllamaImageProcessor";

/// The settings of `MllamaImageProcessor`. Fields are checked by [`Self::validate`] (called on
/// every file read and by the processor's constructor), so a value built in code is held to the
/// same rules as one read from disk.
///
/// `do_resize` and `do_pad` have no field: HF refuses `false` for both ("doesn't support
/// `do_resize=False` mode"), so reading a file with either `false` is an error naming the key.
#[derive(Clone, Debug, PartialEq)]
pub struct MllamaProcessorConfig {
    /// HF composites non-RGB PIL images onto white when set (see
    /// [`super::flatten_alpha_on_white`]); kept for completeness, the processor takes RGB.
    pub do_convert_rgb: bool,
    /// `size.height` (= `size.width`, which HF requires): the side of one square tile.
    pub tile_size: usize,
    /// PIL filter of the resize (HF default bilinear, code 2).
    pub resample: Resample,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Most tiles per picture; also what every picture is padded to (`pack_images`).
    pub max_image_tiles: usize,
    /// The file this was read from, named in later errors; `None` for [`Self::default`].
    pub source: Option<PathBuf>,
}

impl Default for MllamaProcessorConfig {
    /// `MllamaImageProcessor()` with no arguments: 224 px tiles, bilinear, rescale 1/255,
    /// ImageNet-standard mean/std 0.5, at most 4 tiles. These are the class defaults, not the
    /// released 11B/90B checkpoints' values (560 px tiles, OpenAI CLIP mean/std, 4 tiles), which
    /// those checkpoints' `preprocessor_config.json` sets; a model directory without that file
    /// gets these defaults (see [`MllamaProcessorConfig::from_model_dir`]), so a family should
    /// compare `tile_size` with `vision_config.image_size` of `config.json`.
    fn default() -> Self {
        MllamaProcessorConfig {
            do_convert_rgb: true,
            tile_size: 224,
            resample: Resample::Bilinear,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: IMAGENET_STANDARD_MEAN,
            image_std: IMAGENET_STANDARD_STD,
            max_image_tiles: 4,
            source: None,
        }
    }
}

impl MllamaProcessorConfig {
    /// Reads `preprocessor_config.json` of a model directory, or failing that the
    /// `image_processor` object of `processor_config.json` (newer transformers save processors
    /// that way). With neither file, the class defaults of [`Self::default`] — where HF's
    /// `AutoImageProcessor` would refuse the directory; `MllamaImageProcessor()` is what a
    /// directory without settings means to us, and the family checks the tile size against the
    /// model.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join(PREPROCESSOR_CONFIG);
        match std::fs::read_to_string(&pre) {
            Ok(text) => return Self::from_json_text(&text, &pre),
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(Error::io(&pre, e)),
            Err(_) => {}
        }
        let combined = dir.join(PROCESSOR_CONFIG);
        let text = match std::fs::read_to_string(&combined) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(&combined, e)),
        };
        let doc: Value = serde_json::from_str(&text).map_err(|e| Error::json(&combined, e))?;
        match doc.get("image_processor") {
            Some(inner) => Self::from_value(inner, &combined),
            None => Err(Error::Config {
                path: combined.clone(),
                key: "image_processor".into(),
                reason: format!(
                    "missing, and {PREPROCESSOR_CONFIG} does not exist either: one of them must \
                     hold the Mllama image processor settings"
                ),
            }),
        }
    }

    /// Parses a `preprocessor_config.json` document; `path` is recorded and named in errors.
    pub fn from_json_text(text: &str, path: &Path) -> Result<Self> {
        let doc: Value = serde_json::from_str(text).map_err(|e| Error::json(path, e))?;
        Self::from_value(&doc, path)
    }

    /// Reads the settings from a JSON object. Absent keys take `MllamaImageProcessor()`'s
    /// defaults. `null` means the default for `size`, `image_mean`, `image_std` and `resample`
    /// (HF substitutes its default for `None` there) and is refused for the switches and numbers,
    /// where HF would carry `None` on as "false" or fail later.
    fn from_value(doc: &Value, path: &Path) -> Result<Self> {
        let err = |key: &str, reason: String| Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            reason,
        };
        let Some(obj) = doc.as_object() else {
            return Err(err("(top level)", "must be a JSON object".into()));
        };
        let keys = Keys { obj, path };
        if let Some(t) = obj.get("image_processor_type") {
            if t.as_str() != Some(PROCESSOR_TYPE) {
                return Err(err(
                    "image_processor_type",
                    format!("{t} is not {PROCESSOR_TYPE}: this file is for another processor"),
                ));
            }
        }
        for key in ["do_resize", "do_pad"] {
            if !keys.bool(key, true)? {
                return Err(err(
                    key,
                    format!(
                        "false is not supported: MllamaImageProcessor always resizes and pads \
                         (HF refuses `{key}=False` too)"
                    ),
                ));
            }
        }
        let defaults = Self::default();
        let cfg = MllamaProcessorConfig {
            do_convert_rgb: keys.bool("do_convert_rgb", defaults.do_convert_rgb)?,
            tile_size: keys.size(defaults.tile_size)?,
            resample: keys.resample(defaults.resample)?,
            do_rescale: keys.bool("do_rescale", defaults.do_rescale)?,
            rescale_factor: keys.number("rescale_factor", defaults.rescale_factor)?,
            do_normalize: keys.bool("do_normalize", defaults.do_normalize)?,
            image_mean: keys.stats("image_mean", defaults.image_mean)?,
            image_std: keys.stats("image_std", defaults.image_std)?,
            max_image_tiles: keys.count("max_image_tiles", defaults.max_image_tiles)?,
            source: Some(path.to_path_buf()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the ranges HF leaves to fail (or to produce NaNs) later: a positive tile size,
    /// 1 or more tiles with the whole canvas of tiles within [`MAX_IMAGE_PIXELS`] (the decoder's
    /// own limit, so a typo cannot make the processor allocate gigabytes), a finite rescale
    /// factor, finite means and finite non-zero stds.
    pub fn validate(&self) -> Result<()> {
        if self.tile_size == 0 {
            return Err(self.config_error("size", "height and width must be positive"));
        }
        if self.max_image_tiles == 0 {
            return Err(self.config_error("max_image_tiles", "must be a positive integer"));
        }
        check_canvas(self.max_image_tiles, self.tile_size)
            .map_err(|reason| self.config_error("max_image_tiles", &reason))?;
        if self.do_rescale && !self.rescale_factor.is_finite() {
            return Err(self.config_error("rescale_factor", "must be a finite number"));
        }
        if self.do_normalize {
            if self.image_mean.iter().any(|m| !m.is_finite()) {
                return Err(self.config_error("image_mean", "must be finite"));
            }
            if self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0) {
                return Err(self.config_error("image_std", "must be finite and non-zero"));
            }
        }
        Ok(())
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

/// `Err(reason)` when `max_tiles` tiles of `tile` px would exceed [`MAX_IMAGE_PIXELS`].
pub(super) fn check_canvas(max_tiles: usize, tile: usize) -> std::result::Result<(), String> {
    let pixels = (max_tiles as u128) * (tile as u128) * (tile as u128);
    if pixels > u128::from(MAX_IMAGE_PIXELS) {
        return Err(format!(
            "{max_tiles} tiles of {tile}x{tile} px = {pixels} pixels is over the limit of \
             {MAX_IMAGE_PIXELS} pixels per picture"
        ));
    }
    Ok(())
}

/// Typed access to the keys of one config object; every error names the file and key.
struct Keys<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Keys<'_> {
    fn err(&self, key: &str, reason: String) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason,
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("must be true or false, not {v}"))),
        }
    }

    fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("must be a number, not {v}"))),
        }
    }

    /// A JSON integer >= 0 (the range is checked by `validate`).
    fn integer(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(key, format!("must be a positive integer, not {v}")))
    }

    fn count(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(v) => self.integer(key, v),
        }
    }

    /// `size`: `{"height": n, "width": n}`, both positive and equal (HF's `_validate_size`);
    /// other keys of the dict are ignored as HF ignores them.
    fn size(&self, default: usize) -> Result<usize> {
        let v = match self.obj.get("size") {
            None | Some(Value::Null) => return Ok(default),
            Some(v) => v,
        };
        let Some(dict) = v.as_object() else {
            return Err(self.err(
                "size",
                format!("must be {{\"height\": n, \"width\": n}}, not {v}"),
            ));
        };
        let side = |name: &str| match dict.get(name) {
            Some(n) => self.integer(&format!("size.{name}"), n),
            None => Err(self.err(
                "size",
                format!("needs `height` and `width` (HF's MllamaImageProcessor), got {v}"),
            )),
        };
        let (height, width) = (side("height")?, side("width")?);
        if height != width {
            return Err(self.err(
                "size",
                format!("tiles are square: height {height} and width {width} must be equal"),
            ));
        }
        if height == 0 {
            return Err(self.err("size", "height and width must be positive".into()));
        }
        Ok(height)
    }

    fn resample(&self, default: Resample) -> Result<Resample> {
        let v = match self.obj.get("resample") {
            None | Some(Value::Null) => return Ok(default),
            Some(v) => v,
        };
        v.as_i64().and_then(Resample::from_pil_code).ok_or_else(|| {
            self.err(
                "resample",
                format!(
                    "unsupported PIL filter code {v} (expected 0 nearest, 1 lanczos, \
                         2 bilinear, 3 bicubic, 4 box, 5 hamming, 6 mks2013 or 7 mks2021)"
                ),
            )
        })
    }

    /// A number (applied to every channel, as HF's `normalize` does with a float) or a list of
    /// exactly three numbers (HF's `normalize` refuses a list of any other length).
    fn stats(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
        let v = match self.obj.get(key) {
            None | Some(Value::Null) => return Ok(default),
            Some(v) => v,
        };
        if let Some(x) = v.as_f64() {
            return Ok([x; 3]);
        }
        let values: Option<Vec<f64>> = v
            .as_array()
            .map(|items| items.iter().map(Value::as_f64).collect())
            .unwrap_or(None);
        values
            .and_then(|vals| <[f64; 3]>::try_from(vals).ok())
            .ok_or_else(|| {
                self.err(
                    key,
                    format!("must be a number or a list of 3 numbers (R, G, B), not {v}"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MllamaProcessorConfig> {
        MllamaProcessorConfig::from_json_text(text, Path::new("pre.json"))
    }

    fn key_of(err: &Error) -> String {
        match err {
            Error::Config { key, path, .. } => {
                assert_eq!(path, Path::new("pre.json"), "{err}");
                key.clone()
            }
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn released_checkpoint_file_and_defaults() {
        // Llama-3.2-11B-Vision-Instruct's preprocessor_config.json.
        let cfg = parse(
            r#"{"do_convert_rgb": true, "do_normalize": true, "do_pad": true,
                "do_rescale": true, "do_resize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "MllamaImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": 4,
                "processor_class": "MllamaProcessor", "resample": 2,
                "rescale_factor": 0.00392156862745098, "size": {"height": 560, "width": 560}}"#,
        )
        .unwrap();
        assert_eq!(cfg.tile_size, 560);
        assert_eq!(cfg.max_image_tiles, 4);
        assert_eq!(cfg.resample, Resample::Bilinear);
        assert_eq!(cfg.image_std[2], 0.27577711);
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);

        let empty = parse("{}").unwrap();
        let want = MllamaProcessorConfig {
            source: Some("pre.json".into()),
            ..MllamaProcessorConfig::default()
        };
        assert_eq!(empty, want);
        let nulls = parse(r#"{"size": null, "image_mean": null, "resample": null}"#).unwrap();
        assert_eq!(nulls, want);
        assert_eq!(
            parse(r#"{"image_std": 0.25}"#).unwrap().image_std,
            [0.25; 3]
        );
    }

    #[test]
    fn bad_values_name_file_and_key() {
        let cases: &[(&str, &str)] = &[
            (r#"{"max_image_tiles": 0}"#, "max_image_tiles"),
            (r#"{"max_image_tiles": -1}"#, "max_image_tiles"),
            (r#"{"max_image_tiles": 2.5}"#, "max_image_tiles"),
            (r#"{"max_image_tiles": "4"}"#, "max_image_tiles"),
            (r#"{"max_image_tiles": 100000000}"#, "max_image_tiles"),
            (r#"{"size": {"height": 0, "width": 0}}"#, "size"),
            (r#"{"size": {"height": -5, "width": -5}}"#, "size.height"),
            (r#"{"size": {"height": 28, "width": 30}}"#, "size"),
            (r#"{"size": {"shortest_edge": 28}}"#, "size"),
            (r#"{"size": 28}"#, "size"),
            (r#"{"image_mean": "0.5"}"#, "image_mean"),
            (r#"{"image_mean": [0.5]}"#, "image_mean"),
            (r#"{"image_mean": [0.5, 0.5, "x"]}"#, "image_mean"),
            (r#"{"image_std": {"r": 1}}"#, "image_std"),
            (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
            (r#"{"resample": 9}"#, "resample"),
            (r#"{"resample": "bilinear"}"#, "resample"),
            (r#"{"rescale_factor": "1/255"}"#, "rescale_factor"),
            (r#"{"do_rescale": 1}"#, "do_rescale"),
            (r#"{"do_normalize": null}"#, "do_normalize"),
            (r#"{"do_pad": false}"#, "do_pad"),
            (r#"{"do_resize": false}"#, "do_resize"),
            (
                r#"{"image_processor_type": "CLIPImageProcessor"}"#,
                "image_processor_type",
            ),
            ("[1, 2]", "(top level)"),
        ];
        for (text, key) in cases {
            let err = parse(text).expect_err(text);
            assert_eq!(key_of(&err), *key, "{text}: {err}");
            assert!(err.to_string().contains("pre.json"), "{err}");
        }
        assert!(matches!(parse("{oops"), Err(Error::Json { .. })));
    }

    #[test]
    fn model_dir_files() {
        let dir = tempfile::tempdir().unwrap();
        // Neither file: the class defaults.
        let cfg = MllamaProcessorConfig::from_model_dir(dir.path()).unwrap();
        assert_eq!(cfg, MllamaProcessorConfig::default());

        let combined = dir.path().join(PROCESSOR_CONFIG);
        std::fs::write(
            &combined,
            r#"{"image_processor": {"size": {"height": 28, "width": 28}, "max_image_tiles": 2}}"#,
        )
        .unwrap();
        let cfg = MllamaProcessorConfig::from_model_dir(dir.path()).unwrap();
        assert_eq!((cfg.tile_size, cfg.max_image_tiles), (28, 2));
        assert_eq!(cfg.source.as_deref(), Some(combined.as_path()));
        std::fs::write(&combined, r#"{"processor_class": "MllamaProcessor"}"#).unwrap();
        let err = MllamaProcessorConfig::from_model_dir(dir.path()).unwrap_err();
        assert!(matches!(&err, Error::Config { key, .. } if key == "image_processor"));

        let pre = dir.path().join(PREPROCESSOR_CONFIG);
        std::fs::write(&pre, r#"{"max_image_tiles": 0}"#).unwrap();
        let err = MllamaProcessorConfig::from_model_dir(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&pre.display().to_string()),
            "{err}"
        );
    }
}
