//! The tokenizer's special token strings (`bos_token`, `eos_token`, ...), as `transformers`
//! reads them from `tokenizer_config.json` and `special_tokens_map.json`.

use std::path::Path;

use serde_json::Value as Json;

use super::files::read_json_opt;
use crate::error::{Error, Result};

/// The tokenizer's special token strings, as `transformers` exposes them to chat templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// Read `bos_token`, `eos_token`, `unk_token`, `pad_token` from `tokenizer_config.json`,
    /// then let `special_tokens_map.json` override them (the precedence `transformers` uses).
    /// Values may be strings, `{"content": "..."}` objects or `null`. Missing files are fine
    /// (all tokens stay `None`); unreadable or malformed ones are errors naming the file.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let mut special = SpecialTokens::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if let Some(json) = read_json_opt(&path)? {
                special.merge_from(&json, &path)?;
            }
        }
        Ok(special)
    }

    fn merge_from(&mut self, json: &Json, path: &Path) -> Result<()> {
        let Some(obj) = json.as_object() else {
            return Err(Error::Config {
                path: path.to_path_buf(),
                key: "<root>".into(),
                reason: "expected a JSON object".into(),
            });
        };
        for (key, slot) in [
            ("bos_token", &mut self.bos),
            ("eos_token", &mut self.eos),
            ("unk_token", &mut self.unk),
            ("pad_token", &mut self.pad),
        ] {
            if let Some(value) = obj.get(key) {
                *slot = token_string(value, path, key)?;
            }
        }
        Ok(())
    }
}

/// A special-token value: a string, an `AddedToken`-style `{"content": ...}` object, or null.
pub(super) fn token_string(value: &Json, path: &Path, key: &str) -> Result<Option<String>> {
    match value {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(map) => match map.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::Config {
                path: path.to_path_buf(),
                key: key.into(),
                reason: "token object has no string \"content\"".into(),
            }),
        },
        other => Err(Error::Config {
            path: path.to_path_buf(),
            key: key.into(),
            reason: format!("expected a string or {{\"content\": ...}}, found {other}"),
        }),
    }
}
