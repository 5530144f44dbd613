//! `checkpoint-{step}` directories written whole, pruned to the last K, and found again to
//! resume from.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{fsync_dir, fsync_tree};
use crate::error::{Error, Result};

/// The step of a `checkpoint-{step}` directory name, in canonical form only (no sign, no leading
/// zeros), so that a step always maps back to exactly one name.
pub(super) fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (step.to_string() == digits).then_some(step)
}

/// The step of a `checkpoint-{step}` directory, from its name; `None` for any other name.
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_checkpoint_name)
}

/// Removes a directory on drop unless disarmed: cleans up after errors and panics alike.
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Checkpoints `root/checkpoint-{step}` written atomically as a whole directory and pruned to the
/// last K.
#[derive(Debug, Clone)]
pub struct CheckpointManager {
    root: PathBuf,
    keep_last: Option<usize>,
}

impl CheckpointManager {
    /// `keep_last`: how many checkpoints to keep on disk (`None` = all). The checkpoint just saved
    /// is always kept, so `Some(0)` behaves like `Some(1)`.
    pub fn new(root: &Path, keep_last: Option<usize>) -> Self {
        Self {
            root: root.to_path_buf(),
            keep_last,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/checkpoint-{step}`, whether or not it exists.
    pub fn path_for(&self, step: u64) -> PathBuf {
        self.root.join(format!("checkpoint-{step}"))
    }

    /// Calls `fill(tmp_dir)` to write the files into `root/.tmp-checkpoint-{step}-{pid}`, fsyncs
    /// them, renames the directory to `root/checkpoint-{step}` and prunes the oldest checkpoints
    /// beyond `keep_last`, never the one just written.
    ///
    /// An existing `checkpoint-{step}` is renamed away first, replaced, then removed (restored if
    /// the replacement fails). On any error — or a panic in `fill` — the temp directory is
    /// removed and nothing half-written remains. Pruning failures are logged, not returned: the
    /// new checkpoint is complete by then. Returns the checkpoint's path.
    pub fn save(&self, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let root = &self.root;
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let pid = std::process::id();
        let tmp = root.join(format!(".tmp-checkpoint-{step}-{pid}"));
        if fs::symlink_metadata(&tmp).is_ok() {
            // Left by an earlier save in this process whose cleanup failed.
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut guard = DirGuard(Some(tmp.clone()));

        fill(&tmp)?;
        fsync_tree(&tmp)?;

        let dest = self.path_for(step);
        let old = if fs::symlink_metadata(&dest).is_ok() {
            let old = root.join(format!(".old-checkpoint-{step}-{pid}"));
            if fs::symlink_metadata(&old).is_ok() {
                fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            }
            fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
            Some(old)
        } else {
            None
        };
        if let Err(e) = fs::rename(&tmp, &dest) {
            if let Some(old) = &old {
                let _ = fs::rename(old, &dest);
            }
            return Err(Error::io(&dest, e));
        }
        guard.disarm();
        fsync_dir(root);
        if let Some(old) = old {
            if let Err(e) = fs::remove_dir_all(&old) {
                tracing::warn!("cannot remove replaced checkpoint {}: {e}", old.display());
            }
        }
        if let Err(e) = self.prune(step) {
            tracing::warn!("cannot prune old checkpoints in {}: {e}", root.display());
        }
        Ok(dest)
    }

    /// Remove the oldest checkpoints so at most `keep_last` remain, keeping `just_written`.
    /// Each is renamed to a hidden name before removal so a partly removed directory is never
    /// mistaken for a checkpoint.
    fn prune(&self, just_written: u64) -> Result<()> {
        let Some(keep) = self.keep_last else {
            return Ok(());
        };
        let keep_others = keep.max(1) - 1;
        let others: Vec<_> = self
            .list()?
            .into_iter()
            .filter(|(s, _)| *s != just_written)
            .collect();
        let excess = others.len().saturating_sub(keep_others);
        let pid = std::process::id();
        for (step, path) in &others[..excess] {
            let doomed = self.root.join(format!(".deleting-checkpoint-{step}-{pid}"));
            fs::rename(path, &doomed).map_err(|e| Error::io(path, e))?;
            fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
            tracing::debug!("pruned checkpoint {}", path.display());
        }
        Ok(())
    }

    /// Clears what a killed run can leave in `root`: `.tmp-checkpoint-*` (a save in progress)
    /// and `.deleting-checkpoint-*` (a prune in progress) are removed; `.old-checkpoint-{step}-*`
    /// (a checkpoint being replaced) is removed when `checkpoint-{step}` exists and renamed back
    /// when it does not, since it is then the only copy. Call it only while holding the output
    /// directory's lock: another live run's temp directories look the same. Returns what it
    /// removed or restored.
    pub fn clean_stale(&self) -> Result<Vec<PathBuf>> {
        let root = &self.root;
        let entries = match fs::read_dir(root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(root, e)),
        };
        let mut touched = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".tmp-checkpoint-") || name.starts_with(".deleting-checkpoint-") {
                fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                touched.push(path);
            } else if let Some(rest) = name.strip_prefix(".old-checkpoint-") {
                let Some(step) = rest.split('-').next().and_then(|s| s.parse::<u64>().ok()) else {
                    continue;
                };
                let dest = self.path_for(step);
                if fs::symlink_metadata(&dest).is_ok() {
                    fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                } else {
                    fs::rename(&path, &dest).map_err(|e| Error::io(&path, e))?;
                }
                touched.push(path);
            }
        }
        Ok(touched)
    }

    /// `(step, path)` of every `checkpoint-{step}` directory, sorted by step (numerically). Temp
    /// directories and unrelated entries are ignored; a missing `root` has no checkpoints.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let root = &self.root;
        let entries = match fs::read_dir(root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(root, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            let name = entry.file_name();
            let Some(step) = name.to_str().and_then(parse_checkpoint_name) else {
                continue;
            };
            let path = entry.path();
            if path.is_dir() {
                found.push((step, path));
            }
        }
        found.sort_by_key(|(step, _)| *step);
        Ok(found)
    }

    /// The checkpoint with the highest step, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.list()?.pop().map(|(_, path)| path))
    }
}

/// `--resume latest|DIR`: `latest` = newest `checkpoint-{step}` under `root` (an error naming
/// `root` if there is none); otherwise `DIR` must be an existing directory — taken as given, or,
/// when relative and absent, relative to `root` (so `--resume checkpoint-100` works).
pub fn resolve_resume(root: &Path, spec: &str) -> Result<PathBuf> {
    if spec == "latest" {
        return CheckpointManager::new(root, None).latest()?.ok_or_else(|| {
            Error::io(
                root,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "--resume latest: no checkpoint-<step> directory to resume from",
                ),
            )
        });
    }
    let given = PathBuf::from(spec);
    if given.is_dir() {
        return Ok(given);
    }
    if given.is_relative() && !spec.is_empty() {
        let under_root = root.join(&given);
        if under_root.is_dir() {
            return Ok(under_root);
        }
    }
    let reason = if given.exists() {
        "--resume: not a checkpoint directory"
    } else {
        "--resume: checkpoint directory does not exist"
    };
    Err(Error::io(
        given,
        io::Error::new(io::ErrorKind::NotFound, reason),
    ))
}
