//! Finding a checkpoint: a local directory, or a Hub repo id resolved through `hf-hub`'s cache.
//!
//! A Hub snapshot is itself a directory of (symlinked) files, so after resolution everything
//! downstream works on a plain directory.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Files a llava-hf model directory may hold besides weights. Only `config.json` is required.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Resolve `--model`: an existing directory is used as is; anything else of the form `org/name` is a
/// Hub repo id. Honours `HF_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE=1` (cache only, never network).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Hub(format!(
            "--model {spec} is a file; pass the checkpoint directory that holds config.json"
        )));
    }
    let looks_like_repo =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if !looks_like_repo {
        return Err(Error::Hub(format!(
            "--model {spec}: no such directory, and not a Hub repo id of the form org/name"
        )));
    }
    if offline() {
        from_cache(spec)
    } else {
        download(spec)
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// Offline: every file must already be in the local Hub cache.
fn from_cache(repo_id: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(repo_id.to_string());
    let config = repo.get("config.json").ok_or_else(|| {
        Error::Hub(format!(
            "HF_HUB_OFFLINE is set and {repo_id} is not in the Hub cache at {} (config.json missing); \
             download it once online, or pass a local directory",
            cache.path().display()
        ))
    })?;
    let dir = parent(&config)?;
    for file in weight_file_names(&dir)? {
        if repo.get(&file).is_none() {
            return Err(Error::Hub(format!(
                "HF_HUB_OFFLINE is set and {repo_id}/{file} is not in the Hub cache"
            )));
        }
    }
    Ok(dir)
}

fn download(repo_id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let config = repo
        .get("config.json")
        .map_err(|e| Error::Hub(format!("cannot fetch {repo_id}/config.json: {e} (offline? set HF_HUB_OFFLINE=1 to use the cache only)")))?;
    for file in MODEL_FILES.iter().skip(1) {
        // Optional files: absent ones are simply not part of this checkpoint.
        let _ = repo.get(file);
    }
    if let Ok(index) = repo.get("model.safetensors.index.json") {
        for shard in shard_names(&index)? {
            repo.get(&shard)
                .map_err(|e| Error::Hub(format!("cannot fetch {repo_id}/{shard}: {e}")))?;
        }
    } else {
        repo.get("model.safetensors").map_err(|e| {
            Error::Hub(format!(
                "cannot fetch {repo_id}/model.safetensors (nor an index of shards): {e}"
            ))
        })?;
    }
    parent(&config)
}

fn parent(file: &Path) -> Result<PathBuf> {
    file.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Hub(format!("{} has no parent directory", file.display())))
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| Error::json(index, e))?;
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Names (relative to `dir`) of the safetensors files that hold the weights.
fn weight_file_names(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_names(&index);
    }
    if dir.join("model.safetensors").is_file() {
        return Ok(vec!["model.safetensors".into()]);
    }
    let has_pickle = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth")
        });
    if has_pickle {
        return Err(Error::Weights(format!(
            "{} holds only PyTorch pickle weights (.bin/.pt); lvlm-ift refuses them because unpickling \
             can run arbitrary code. Convert once with transformers: \
             `AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`",
            dir.display()
        )));
    }
    Err(Error::Weights(format!(
        "{} has no model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

/// Full paths of the weight files of a model directory, checking that every shard exists.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = weight_file_names(dir)?
        .into_iter()
        .map(|f| dir.join(f))
        .collect();
    for f in &files {
        if !f.is_file() {
            return Err(Error::Weights(format!(
                "shard {} listed in model.safetensors.index.json does not exist",
                f.display()
            )));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_pickle_and_names_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        let e = weight_files(dir.path()).unwrap_err().to_string();
        assert!(e.contains("pickle"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }

    #[test]
    fn missing_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let e = weight_files(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
    }

    #[test]
    fn offline_and_not_cached_is_a_clear_error() {
        let home = tempfile::tempdir().unwrap();
        // Env vars are process-global: this is the only test that sets them.
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let e = resolve_model("nobody/no-such-model")
            .unwrap_err()
            .to_string();
        std::env::remove_var("HF_HUB_OFFLINE");
        std::env::remove_var("HF_HOME");
        assert!(
            e.contains("HF_HUB_OFFLINE") && e.contains("not in the Hub cache"),
            "{e}"
        );
    }

    #[test]
    fn nonsense_spec_is_rejected() {
        let e = resolve_model("./no/such/dir").unwrap_err().to_string();
        assert!(e.contains("no such directory"), "{e}");
    }
}
