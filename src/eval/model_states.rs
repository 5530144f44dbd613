//! Finding the trained model states (checkpoints, stage outputs) under a run directory.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A trained model state found under a run directory: a checkpoint or a stage's final outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelState {
    pub dir: PathBuf,
    /// `adapter/` (PEFT) when LoRA was trained.
    pub adapter: Option<PathBuf>,
    /// `full_weights.safetensors` (stage outputs) or `trainable.safetensors` (checkpoints) when
    /// module groups were trained in full.
    pub full_weights: Option<PathBuf>,
}

/// Every directory under `root` (itself included) holding a trained state, in natural order
/// (`checkpoint-2` before `checkpoint-10`): one with `adapter/adapter_config.json`,
/// `full_weights.safetensors` or `trainable.safetensors`.
pub fn find_model_states(root: &Path) -> Result<Vec<ModelState>> {
    fn walk(dir: &Path, out: &mut Vec<ModelState>) -> Result<()> {
        let adapter = Some(dir.join("adapter")).filter(|a| a.join("adapter_config.json").is_file());
        let full_weights = [
            dir.join("full_weights.safetensors"),
            dir.join("trainable.safetensors"),
        ]
        .into_iter()
        .find(|f| f.is_file());
        if adapter.is_some() || full_weights.is_some() {
            out.push(ModelState {
                dir: dir.to_path_buf(),
                adapter,
                full_weights,
            });
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let ft = e.file_type().map_err(|err| Error::io(e.path(), err))?;
            if ft.is_dir() && e.file_name() != "adapter" {
                walk(&e.path(), out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, &mut out)?;
    out.sort_by_key(|s| natural_key(&s.dir.to_string_lossy()));
    Ok(out)
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Chunk {
    Num(u128, usize),
    Text(String),
}

/// Splits digits runs from text so that numbers compare by value.
fn natural_key(s: &str) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() != digits && !buf.is_empty() {
            out.push(chunk(&buf, digits));
            buf.clear();
        }
        digits = c.is_ascii_digit();
        buf.push(c);
    }
    if !buf.is_empty() {
        out.push(chunk(&buf, digits));
    }
    out
}

fn chunk(s: &str, digits: bool) -> Chunk {
    match (digits, s.parse::<u128>()) {
        (true, Ok(n)) => Chunk::Num(n, s.len()),
        _ => Chunk::Text(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_and_adapter_discovery() {
        let d = tempfile::tempdir().unwrap();
        for rel in [
            "main/checkpoint-10",
            "main/checkpoint-2",
            "warmup/checkpoint-1",
            "x",
        ] {
            std::fs::create_dir_all(d.path().join(rel)).unwrap();
        }
        for rel in ["main/checkpoint-10", "main/checkpoint-2"] {
            let a = d.path().join(rel).join("adapter");
            std::fs::create_dir_all(&a).unwrap();
            std::fs::write(a.join("adapter_config.json"), "{}").unwrap();
        }
        // A full-training-only checkpoint (no adapter) is found through its trainable tensors.
        std::fs::write(
            d.path().join("warmup/checkpoint-1/trainable.safetensors"),
            "x",
        )
        .unwrap();
        let found = find_model_states(d.path()).unwrap();
        assert!(found[0].adapter.is_some() && found[0].full_weights.is_none());
        assert!(found[2].adapter.is_none() && found[2].full_weights.is_some());
        let rel: Vec<String> = found
            .iter()
            .map(|s| s.dir.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            rel,
            vec![
                "main/checkpoint-2",
                "main/checkpoint-10",
                "warmup/checkpoint-1"
            ]
        );
    }
}
