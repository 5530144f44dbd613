//! Crash-safe outputs: atomic file writes, safetensors with header metadata, and
//! `checkpoint-{step}` directories that appear whole or not at all.
//!
//! Everything here is written to a temporary sibling first, fsynced, then renamed into place, so a
//! crash or a failed write never leaves a half-written file or checkpoint under its final name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, View};

use crate::error::{Error, Result};

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

/// One tensor's bytes, already on the host, in safetensors' little-endian layout.
struct HostTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for HostTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn le_bytes<T: candle_core::WithDType, const N: usize>(
    flat: &Tensor,
    to_bytes: fn(T) -> [u8; N],
) -> candle_core::Result<Vec<u8>> {
    Ok(flat
        .to_vec1::<T>()?
        .into_iter()
        .flat_map(to_bytes)
        .collect())
}

/// Copy `t` to the host as raw little-endian bytes. Errors (unsupported dtype, device failure)
/// are returned instead of panicking as candle's own `View` impl would.
fn to_host(path: &Path, name: &str, t: &Tensor) -> Result<HostTensor> {
    let err = |e: candle_core::Error| {
        Error::Weights(format!(
            "cannot save tensor `{name}` to {}: {e}",
            path.display()
        ))
    };
    let flat = t
        .reshape(t.elem_count())
        .and_then(|f| f.to_device(&Device::Cpu))
        .map_err(err)?;
    let data = match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>(),
        DType::U32 => le_bytes(&flat, u32::to_le_bytes),
        DType::I16 => le_bytes(&flat, i16::to_le_bytes),
        DType::I32 => le_bytes(&flat, i32::to_le_bytes),
        DType::I64 => le_bytes(&flat, i64::to_le_bytes),
        DType::F16 => le_bytes(&flat, half::f16::to_le_bytes),
        DType::BF16 => le_bytes(&flat, half::bf16::to_le_bytes),
        DType::F32 => le_bytes(&flat, f32::to_le_bytes),
        DType::F64 => le_bytes(&flat, f64::to_le_bytes),
        other => {
            return Err(Error::Weights(format!(
                "cannot save tensor `{name}` to {}: dtype {other:?} is not supported",
                path.display()
            )))
        }
    }
    .map_err(err)?;
    Ok(HostTensor {
        dtype: t.dtype().into(),
        shape: t.dims().to_vec(),
        data,
    })
}

/// safetensors with header metadata (always includes `{"format": "pt"}`, which PEFT and
/// transformers require), written atomically.
///
/// `extra_metadata` is added to the header; a `format` key in it is overridden with `pt`.
/// Tensors may live on any device and have dtype u8, u32, i16, i32, i64, f16, bf16, f32 or f64;
/// they are copied to the host before anything is written.
pub fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    extra_metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if name == "__metadata__" {
            return Err(Error::Weights(format!(
                "cannot save to {}: `__metadata__` is reserved by safetensors and cannot name a tensor",
                path.display()
            )));
        }
        host.push((name.clone(), to_host(path, name, t)?));
    }
    let mut metadata = extra_metadata.clone();
    metadata.insert("format".to_string(), "pt".to_string());
    write_atomic_with(path, |tmp| {
        safetensors::tensor::serialize_to_file(host, Some(metadata), tmp)
            .map_err(|e| Error::Weights(format!("cannot write {}: {e}", path.display())))
    })
}

/// Load every tensor of a safetensors file onto `device`. Errors name the file.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::Weights(format!("cannot load safetensors {}: {e}", path.display())))
}

/// The `__metadata__` header of a safetensors file (empty when it has none). Errors name the file.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::Weights(format!(
            "cannot read safetensors header of {}: {e}",
            path.display()
        ))
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// The step of a `checkpoint-{step}` directory name, in canonical form only (no sign, no leading
/// zeros), so that a step always maps back to exactly one name.
fn parse_checkpoint_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("checkpoint-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (step.to_string() == digits).then_some(step)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(names(dir.path()), vec!["a.json"]);
    }

    #[test]
    fn write_atomic_error_names_path_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("a.json");
        let err = write_atomic(&missing, b"x").unwrap_err();
        assert!(format!("{err}").contains("no-such-dir"), "{err}");
        // The target is an existing directory: the rename fails, the temp file is removed.
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("keep"), b"k").unwrap();
        assert!(write_atomic(&sub, b"x").is_err());
        assert_eq!(names(dir.path()), vec!["sub"]);
        assert!(write_atomic(Path::new("/"), b"x").is_err());
    }

    fn write_file(dir: &Path, name: &str, content: &str) -> Result<()> {
        fs::write(dir.join(name), content).map_err(|e| Error::io(dir.join(name), e))
    }

    #[test]
    fn failing_fill_leaves_no_checkpoint_and_no_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::new(dir.path(), Some(2));
        let err = mgr
            .save(7, |tmp| {
                write_file(tmp, "half.bin", "partial")?;
                Err(Error::Model("boom".into()))
            })
            .unwrap_err();
        assert!(matches!(err, Error::Model(_)));
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        assert!(mgr.list().unwrap().is_empty());

        // A panic inside fill cleans up too.
        let mgr2 = mgr.clone();
        let r = std::panic::catch_unwind(move || {
            let _ = mgr2.save(8, |tmp| {
                write_file(tmp, "x", "y").unwrap();
                panic!("fill panicked")
            });
        });
        assert!(r.is_err());
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn save_writes_whole_dir_and_replaces_same_step() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::new(&dir.path().join("run"), None);
        let p = mgr
            .save(3, |tmp| {
                fs::create_dir(tmp.join("nested")).unwrap();
                write_file(&tmp.join("nested"), "b.txt", "b")?;
                write_file(tmp, "a.txt", "first")
            })
            .unwrap();
        assert_eq!(p, dir.path().join("run").join("checkpoint-3"));
        assert_eq!(fs::read_to_string(p.join("nested/b.txt")).unwrap(), "b");
        let p2 = mgr
            .save(3, |tmp| write_file(tmp, "a.txt", "second"))
            .unwrap();
        assert_eq!(p, p2);
        assert_eq!(fs::read_to_string(p.join("a.txt")).unwrap(), "second");
        assert!(!p.join("nested").exists());
        assert_eq!(names(&dir.path().join("run")), vec!["checkpoint-3"]);
    }

    #[test]
    fn keep_last_prunes_numerically_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Unrelated entries and temp dirs are ignored by list and never pruned.
        fs::create_dir(root.join(".tmp-checkpoint-1-999")).unwrap();
        fs::create_dir(root.join("checkpoint-abc")).unwrap();
        fs::create_dir(root.join("checkpoint-007")).unwrap();
        fs::write(root.join("checkpoint-9"), b"a file, not a dir").unwrap();
        fs::write(root.join("metrics.jsonl"), b"").unwrap();

        let mgr = CheckpointManager::new(root, Some(2));
        for step in [5u64, 10, 100] {
            mgr.save(step, |tmp| write_file(tmp, "step", &step.to_string()))
                .unwrap();
        }
        let steps: Vec<u64> = mgr.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10, 100]);
        assert_eq!(mgr.latest().unwrap(), Some(root.join("checkpoint-100")));
        assert_eq!(
            names(root),
            vec![
                ".tmp-checkpoint-1-999",
                "checkpoint-007",
                "checkpoint-10",
                "checkpoint-100",
                "checkpoint-9",
                "checkpoint-abc",
                "metrics.jsonl"
            ]
        );

        // Saving an older step keeps it (just written) and drops the oldest others.
        mgr.save(50, |tmp| write_file(tmp, "step", "50")).unwrap();
        let steps: Vec<u64> = mgr.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![50, 100]);
        // Some(0) still keeps the one just written.
        let mgr0 = CheckpointManager::new(root, Some(0));
        mgr0.save(200, |tmp| write_file(tmp, "step", "200"))
            .unwrap();
        let steps: Vec<u64> = mgr0.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![200]);
    }

    #[test]
    fn keep_all_when_none() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = CheckpointManager::new(dir.path(), None);
        for step in [100u64, 5, 10] {
            mgr.save(step, |_| Ok(())).unwrap();
        }
        let steps: Vec<u64> = mgr.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![5, 10, 100]);
    }

    #[test]
    fn latest_and_resolve_resume() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let mgr = CheckpointManager::new(&root, None);
        assert_eq!(mgr.latest().unwrap(), None); // root does not exist yet
        let err = resolve_resume(&root, "latest").unwrap_err();
        assert!(
            format!("{err}").contains(&root.display().to_string()),
            "{err}"
        );

        for step in [5u64, 100, 10] {
            mgr.save(step, |_| Ok(())).unwrap();
        }
        assert_eq!(mgr.latest().unwrap(), Some(root.join("checkpoint-100")));
        assert_eq!(
            resolve_resume(&root, "latest").unwrap(),
            root.join("checkpoint-100")
        );
        let c10 = root.join("checkpoint-10");
        assert_eq!(resolve_resume(&root, c10.to_str().unwrap()).unwrap(), c10);
        assert_eq!(resolve_resume(&root, "checkpoint-10").unwrap(), c10);

        let missing = root.join("checkpoint-11");
        let err = resolve_resume(&root, missing.to_str().unwrap()).unwrap_err();
        assert!(format!("{err}").contains("checkpoint-11"), "{err}");
        assert!(resolve_resume(&root, "").is_err());
    }

    #[test]
    fn safetensors_round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("adapter_model.safetensors");
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let mut tensors = HashMap::new();
        tensors.insert("a".to_string(), a.clone());
        // Non-contiguous input is saved in logical order.
        tensors.insert("a_t".to_string(), a.t().unwrap());
        tensors.insert("h".to_string(), a.to_dtype(DType::F16).unwrap());
        tensors.insert("b".to_string(), a.to_dtype(DType::BF16).unwrap());
        tensors.insert("d".to_string(), a.to_dtype(DType::F64).unwrap());
        tensors.insert("u".to_string(), a.to_dtype(DType::U32).unwrap());
        tensors.insert("i".to_string(), a.to_dtype(DType::I64).unwrap());
        tensors.insert("c".to_string(), a.to_dtype(DType::U8).unwrap());
        tensors.insert("s".to_string(), Tensor::new(3.5f32, &dev).unwrap());
        tensors.insert(
            "e".to_string(),
            Tensor::zeros((0, 4), DType::F32, &dev).unwrap(),
        );
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), "42".to_string());
        meta.insert("format".to_string(), "not-pt".to_string());
        save_safetensors(&p, &tensors, &meta).unwrap();
        assert_eq!(names(dir.path()), vec!["adapter_model.safetensors"]);

        // Header read back with the safetensors crate itself.
        let bytes = fs::read(&p).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let m = header.metadata().as_ref().unwrap();
        assert_eq!(m.get("format").map(String::as_str), Some("pt"));
        assert_eq!(m.get("step").map(String::as_str), Some("42"));
        assert_eq!(read_safetensors_metadata(&p).unwrap(), m.clone());

        let loaded = load_safetensors(&p, &dev).unwrap();
        assert_eq!(loaded.len(), tensors.len());
        for (name, t) in &tensors {
            let l = &loaded[name];
            assert_eq!(l.dtype(), t.dtype(), "{name}");
            assert_eq!(l.dims(), t.dims(), "{name}");
            let want: Vec<f64> = t
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f64> = l
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn safetensors_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.safetensors");
        fs::write(&p, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage").unwrap();
        let err = load_safetensors(&p, &Device::Cpu).unwrap_err();
        assert!(format!("{err}").contains("broken.safetensors"), "{err}");
        let err =
            load_safetensors(&dir.path().join("missing.safetensors"), &Device::Cpu).unwrap_err();
        assert!(format!("{err}").contains("missing.safetensors"), "{err}");

        let mut bad = HashMap::new();
        bad.insert(
            "__metadata__".to_string(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let out = dir.path().join("out.safetensors");
        assert!(save_safetensors(&out, &bad, &HashMap::new()).is_err());
        assert!(!out.exists());
    }

    #[test]
    fn checkpoint_names_are_canonical() {
        assert_eq!(parse_checkpoint_name("checkpoint-0"), Some(0));
        assert_eq!(parse_checkpoint_name("checkpoint-100"), Some(100));
        assert_eq!(parse_checkpoint_name("checkpoint-007"), None);
        assert_eq!(parse_checkpoint_name("checkpoint-"), None);
        assert_eq!(parse_checkpoint_name("checkpoint-+5"), None);
        assert_eq!(parse_checkpoint_name("checkpoint-5.tmp"), None);
        assert_eq!(parse_checkpoint_name(".tmp-checkpoint-5-1"), None);
        assert_eq!(
            parse_checkpoint_name("checkpoint-99999999999999999999999"),
            None
        );
    }
}
