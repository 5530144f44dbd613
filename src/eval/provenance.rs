//! Provenance of an eval output directory: `run.json` ([`RunInfo`]) records what made its
//! `predictions.jsonl` (model, adapter and full weights with their content [`fingerprint`]s,
//! scoring, split, benchmark, dtype, image aspect), and `--resume` refuses to continue
//! predictions made another way ([`check_resume`]).

use std::path::{Path, PathBuf};

use super::run::EvalOptions;
use crate::error::{Error, Result};

/// `run.json` in an eval output directory: what produced its `predictions.jsonl`. `--resume`
/// continues only a run with the same record.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub benchmark: String,
    pub split: String,
    pub scoring: String,
    /// The model directory (canonical path; a Hub id as given when it is not a local path).
    pub model: String,
    pub adapter: Option<String>,
    /// [`fingerprint`] of `adapter_config.json` + `adapter_model.safetensors`.
    pub adapter_fingerprint: Option<String>,
    pub full_weights: Option<String>,
    pub full_weights_fingerprint: Option<String>,
    pub dtype: String,
    pub image_aspect: String,
    /// `--max-image-tiles` (tiling processors); absent in `run.json` files written before it.
    #[serde(default)]
    pub max_image_tiles: Option<usize>,
}

pub const RUN_INFO: &str = "run.json";

/// FNV-1a (64-bit) over the bytes of `files` in order, with each file's length mixed in: a
/// content fingerprint (not a cryptographic hash) telling two adapters or weight files apart.
pub fn fingerprint(files: &[PathBuf]) -> Result<String> {
    use std::io::Read;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let mut len = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(f, e))?;
            if n == 0 {
                break;
            }
            eat(&buf[..n]);
            len += n as u64;
        }
        eat(&len.to_le_bytes());
    }
    Ok(format!("fnv1a64:{h:016x}"))
}

fn canonical(p: &str) -> String {
    std::fs::canonicalize(p)
        .map(|c| c.display().to_string())
        .unwrap_or_else(|_| p.to_string())
}

impl RunInfo {
    /// The record of a run with `opts`, fingerprints computed from the files.
    pub fn of(opts: &EvalOptions) -> Result<Self> {
        let adapter_fingerprint = match &opts.adapter {
            Some(a) => {
                let dir = Path::new(a);
                Some(fingerprint(&[
                    dir.join(crate::adapter::ADAPTER_CONFIG),
                    dir.join(crate::adapter::ADAPTER_WEIGHTS),
                ])?)
            }
            None => None,
        };
        let full_weights_fingerprint = match &opts.full_weights {
            Some(f) => Some(fingerprint(&[PathBuf::from(f)])?),
            None => None,
        };
        Ok(Self {
            benchmark: opts.benchmark.clone(),
            split: opts.split.clone(),
            scoring: opts.scoring.name().to_string(),
            model: canonical(&opts.model),
            adapter: opts.adapter.as_deref().map(canonical),
            adapter_fingerprint,
            full_weights: opts.full_weights.as_deref().map(canonical),
            full_weights_fingerprint,
            dtype: opts.dtype.clone(),
            image_aspect: opts.image_aspect.clone(),
            max_image_tiles: opts.max_image_tiles,
        })
    }

    /// What differs from `old`, one `field: old -> new` per line; adapters and full weights are
    /// compared by content (a copy at another path is the same).
    pub fn differences(&self, old: &RunInfo) -> Vec<String> {
        fn show(v: &Option<String>) -> String {
            v.clone().unwrap_or_else(|| "none".into())
        }
        let mut out = Vec::new();
        let mut cmp = |name: &str, o: String, n: String| {
            if o != n {
                out.push(format!("{name}: `{o}` before, `{n}` now"));
            }
        };
        cmp("benchmark", old.benchmark.clone(), self.benchmark.clone());
        cmp("split", old.split.clone(), self.split.clone());
        cmp("scoring", old.scoring.clone(), self.scoring.clone());
        cmp("model", old.model.clone(), self.model.clone());
        if old.adapter_fingerprint != self.adapter_fingerprint {
            cmp(
                "adapter",
                format!(
                    "{} ({})",
                    show(&old.adapter),
                    show(&old.adapter_fingerprint)
                ),
                format!(
                    "{} ({})",
                    show(&self.adapter),
                    show(&self.adapter_fingerprint)
                ),
            );
        }
        if old.full_weights_fingerprint != self.full_weights_fingerprint {
            cmp(
                "full_weights",
                format!(
                    "{} ({})",
                    show(&old.full_weights),
                    show(&old.full_weights_fingerprint)
                ),
                format!(
                    "{} ({})",
                    show(&self.full_weights),
                    show(&self.full_weights_fingerprint)
                ),
            );
        }
        cmp("dtype", old.dtype.clone(), self.dtype.clone());
        cmp(
            "image_aspect",
            old.image_aspect.clone(),
            self.image_aspect.clone(),
        );
        let tiles =
            |n: Option<usize>| n.map_or_else(|| "processor default".into(), |n| n.to_string());
        cmp(
            "max_image_tiles",
            tiles(old.max_image_tiles),
            tiles(self.max_image_tiles),
        );
        out
    }
}

/// With `--resume` and predictions already in `out_dir`: refuse unless `run.json` says they
/// were made the same way as `now`.
pub(crate) fn check_resume(out_dir: &Path, n_kept: usize, now: &RunInfo) -> Result<()> {
    let path = out_dir.join(RUN_INFO);
    let redo = "rerun without --resume to replace them, or evaluate into another --out";
    let old: RunInfo = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::json(&path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Config {
                path,
                key: "--resume".into(),
                reason: format!(
                    "file missing: nothing records what made the {n_kept} prediction(s) in \
                     predictions.jsonl, so they cannot be resumed safely; {redo}"
                ),
            })
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let diff = now.differences(&old);
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::Config {
        path,
        key: "--resume".into(),
        reason: format!(
            "the {n_kept} prediction(s) in predictions.jsonl were made by another run ({}); {redo}",
            diff.join("; ")
        ),
    })
}
