//! The frozen-vision feature cache: a picture's vision states, computed once and kept on disk.
//!
//! When a stage leaves the vision tower frozen (and preprocessing has no randomness, as here),
//! the tower maps each image file to the same states in every epoch, stage and evaluation — the
//! largest repeated work of such a run. The cache keeps those states as one safetensors file per
//! image under `<root>/<model key>/<content key>.safetensors`:
//! * the *model key* (computed by the model stage, see
//!   [`crate::model::vision_key::vision_cache_key`]) names the function from file to states: the
//!   program version, the checkpoint's configuration, the image processor, the dtype and every
//!   tensor the tower runs with; anything else gets a different folder;
//! * the *content key* is the SHA-256 of the image file's bytes, so a renamed or copied file
//!   hits and an edited one misses.
//!
//! The cache is bounded by `max_bytes` over the whole root (every model's folder): once full it
//! stores nothing more and keeps what it has. Training reads the pictures in a fresh permutation
//! every epoch; under such cyclic access evicting the least recently used entry would evict
//! exactly the entries needed soonest, while keeping the first ones serves a fixed share of every
//! epoch. Entries are written to a temp file and renamed, so a reader never sees half an entry;
//! two runs filling one cache at once write identical bytes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The tensor name inside each entry.
const STATES: &str = "states";
const EXT: &str = "safetensors";

/// Where a cache lives and how large it may grow.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheLocation {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// `gib` GiB in bytes (the cache bound as recipes and flags give it).
pub fn gib_to_bytes(gib: f64) -> u64 {
    (gib * (1u64 << 30) as f64) as u64
}

/// What a cache did so far (for the stage's log and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Pictures whose states came from the cache.
    pub hits: u64,
    /// Pictures whose states were not cached (the tower ran).
    pub misses: u64,
    /// Entries written.
    pub stored: u64,
    /// Entries not written because the cache was full.
    pub refused: u64,
    /// Bytes the cache root holds now (every model's entries).
    pub bytes: u64,
}

/// One model's entries in a bounded cache root.
#[derive(Debug)]
pub struct FeatureCache {
    root: PathBuf,
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    stored: AtomicU64,
    refused: AtomicU64,
    full_noted: AtomicBool,
}

/// SHA-256 (hex) of a file's bytes: the content key of an image.
pub fn content_key(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes` (content keys; also the checkpoint's RNG seed).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Bytes held by the entries under `dir` (recursively; temp files of interrupted writes too).
fn bytes_under(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
        if meta.is_dir() {
            total += bytes_under(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

impl FeatureCache {
    /// The entries of `model_key` under `root` (created if missing), at most `max_bytes` in the
    /// whole root.
    pub fn open(root: &Path, model_key: &str, max_bytes: u64) -> Result<Self> {
        if model_key.is_empty() || !model_key.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Error::Model(format!(
                "vision cache: model key `{model_key}` is not a plain hex name"
            )));
        }
        let dir = root.join(model_key);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let used = bytes_under(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            dir,
            max_bytes,
            used: AtomicU64::new(used),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            full_noted: AtomicBool::new(false),
        })
    }

    /// This model's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn entry(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{EXT}"))
    }

    /// The cached states of the image with content key `key`, on the CPU; `None` (a miss) when
    /// not cached. A damaged entry is an error naming its file.
    pub fn get(&self, key: &str) -> Result<Option<Tensor>> {
        let path = self.entry(key);
        if !path.is_file() {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            Error::Model(format!(
                "vision cache entry {} is damaged ({e}); delete it (or the folder {}) and run \
                 again",
                path.display(),
                self.dir.display()
            ))
        })?;
        let states = tensors.remove(STATES).ok_or_else(|| {
            Error::Model(format!(
                "vision cache entry {} holds no `{STATES}` tensor; delete it and run again",
                path.display()
            ))
        })?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(states))
    }

    /// Keep `states` (one picture's) for the image with content key `key`. Returns false when
    /// the cache is full (nothing is written then).
    pub fn put(&self, key: &str, states: &Tensor) -> Result<bool> {
        let path = self.entry(key);
        if path.is_file() {
            return Ok(true);
        }
        let states = states.to_device(&Device::Cpu)?.contiguous()?;
        let bytes = safetensors::tensor::serialize([(STATES, &states)], None)
            .map_err(|e| Error::Model(format!("vision cache: serializing an entry: {e}")))?;
        let size = bytes.len() as u64;
        if self.used.load(Ordering::Relaxed) + size > self.max_bytes {
            self.refused.fetch_add(1, Ordering::Relaxed);
            if !self.full_noted.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "vision cache {} is full ({} of {} MiB): new pictures are not cached",
                    self.root.display(),
                    self.used.load(Ordering::Relaxed) >> 20,
                    self.max_bytes >> 20
                );
            }
            return Ok(false);
        }
        let tmp = self.dir.join(format!(
            ".{key}.{}.{:?}.tmp",
            std::process::id(),
            std::thread::current().id()
        ));
        let written = write_synced(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.used.fetch_add(size, Ordering::Relaxed);
        self.stored.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            bytes: self.used.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_the_bound_holds() {
        let d = tempfile::tempdir().unwrap();
        let states = Tensor::arange(0f32, 12., &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let one = safetensors::tensor::serialize([(STATES, &states)], None)
            .unwrap()
            .len() as u64;
        // Room for two entries, not three.
        let cache = FeatureCache::open(d.path(), "abc123", 3 * one - 1).unwrap();
        assert!(cache.get("k1").unwrap().is_none());
        assert!(cache.put("k1", &states).unwrap());
        let back = cache.get("k1").unwrap().unwrap();
        assert_eq!(
            back.to_vec2::<f32>().unwrap(),
            states.to_vec2::<f32>().unwrap()
        );
        assert!(cache.put("k2", &(&states * 2.0).unwrap()).unwrap());
        assert!(!cache.put("k3", &states).unwrap(), "past the bound");
        assert!(cache.get("k3").unwrap().is_none());
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.stored, s.refused), (1, 2, 2, 1));
        assert_eq!(s.bytes, 2 * one);
        // No temp file is left behind; a reopened cache counts what is on disk.
        let names: Vec<String> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let again = FeatureCache::open(d.path(), "abc123", 1 << 20).unwrap();
        assert_eq!(again.stats().bytes, s.bytes);

        // A damaged entry is an error naming its file.
        std::fs::write(cache.dir().join("bad.safetensors"), b"not safetensors").unwrap();
        let err = cache.get("bad").unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("delete"),
            "{err}"
        );
        assert!(FeatureCache::open(d.path(), "../x", 1).is_err());
    }

    #[test]
    fn content_keys_follow_the_bytes_not_the_name() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        std::fs::write(&a, b"pixels").unwrap();
        std::fs::write(&b, b"pixels").unwrap();
        std::fs::write(&c, b"pixelz").unwrap();
        assert_eq!(content_key(&a).unwrap(), content_key(&b).unwrap());
        assert_ne!(content_key(&a).unwrap(), content_key(&c).unwrap());
        assert_eq!(content_key(&a).unwrap().len(), 64);
        let err = content_key(&d.path().join("missing.png")).unwrap_err();
        assert!(err.to_string().contains("missing.png"), "{err}");
    }
}
