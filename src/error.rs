//! The library's error type. Every variant names the file, key or line at fault so a user can fix
//! their input without reading our source; `main` prints the whole chain through `anyhow`.

use std::path::PathBuf;

/// Errors returned by library code. CLI glue wraps them in `anyhow` with extra context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse JSON in {path}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot decode image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    /// A configuration file parsed but holds a value we cannot use.
    #[error("invalid configuration in {path}: key `{key}`: {reason}")]
    Config {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    /// Weight files: missing/unexpected keys, wrong shapes, unsupported formats.
    #[error("weights: {0}")]
    Weights(String),
    #[error("model: {0}")]
    Model(String),
    #[error("hub: {0}")]
    Hub(String),
    /// Data-parallel training: the launcher environment, the rendezvous, a collective.
    #[error("data parallel: {0}")]
    Distributed(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Error::Json {
            path: path.into(),
            source,
        }
    }
}
