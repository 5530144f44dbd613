//! Crash-safe outputs: atomic file writes, safetensors with header metadata, and
//! `checkpoint-{step}` directories that appear whole or not at all.
//!
//! Everything here is written to a temporary sibling first, fsynced, then renamed into place, so a
//! crash or a failed write never leaves a half-written file or checkpoint under its final name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

mod manager;
mod safetensors_io;
#[cfg(test)]
mod tests;

pub use manager::{checkpoint_step, resolve_resume, CheckpointManager};
pub use safetensors_io::{
    load_float_safetensors, load_safetensors, read_safetensors_metadata, save_safetensors,
};

/// Distinguishes temp files made by concurrent `write_atomic` calls within one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A hidden temp path next to `path`, unique per process and call.
fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(parent_dir(path).join(format!(
        ".{}.tmp-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// fsync a regular file by path.
fn fsync_file(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    let f = File::open(path)?;
    // Windows needs write access to flush a file's buffers.
    #[cfg(not(unix))]
    let f = fs::OpenOptions::new().write(true).open(path)?;
    f.sync_all()
}

/// fsync a directory so renames inside it are durable. Best effort: some filesystems refuse.
fn fsync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// fsync every regular file under `dir` (symlinks are not followed), then the directories.
fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            fsync_tree(&path)?;
        } else if kind.is_file() {
            fsync_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    fsync_dir(dir);
    Ok(())
}

/// Run `write(tmp)` to create a temp sibling of `path`, fsync it and rename it onto `path`.
/// The temp file is removed on any error.
fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path)?;
    let result = write(&tmp)
        .and_then(|()| fsync_file(&tmp).map_err(|e| Error::io(&tmp, e)))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(parent_dir(path));
    Ok(())
}

/// Write bytes to `path` atomically: temp file in the same directory, fsync, rename.
///
/// The parent directory must exist. Readers see either the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}
