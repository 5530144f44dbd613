//! One run per output directory: `train` holds an exclusive lock on `output_dir/.lock` for as
//! long as it runs, so a second `train` into the same directory fails at once with a message
//! naming the running one instead of interleaving checkpoints and outputs with it.
//!
//! The lock is the operating system's (`flock` on Unix, `LockFileEx` on Windows, via
//! `File::try_lock`): it is released when the process ends, however it ends, so a run killed
//! with `kill -9` never leaves a stale lock behind. The file's content (pid, start time,
//! command line) is only there to say who holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const LOCK_FILE: &str = ".lock";

/// Held for the life of a run; dropping it releases the lock.
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Locks `dir/.lock` (creating `dir`), or fails naming the run that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Model(format!(
                    "{} is in use by another run ({}); wait for it to finish or choose another \
                     train.output_dir",
                    dir.display(),
                    if holder.is_empty() {
                        "no details recorded"
                    } else {
                        holder
                    }
                )));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let args: Vec<String> = std::env::args().collect();
        let who = format!(
            "pid {}, started {}, command: {}",
            std::process::id(),
            crate::civil_time::utc_timestamp(started),
            args.join(" ")
        );
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|()| file.write_all(who.as_bytes()))
            .and_then(|()| file.flush())
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_the_first_release_frees_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = OutputLock::acquire(&dir).unwrap();
        let err = OutputLock::acquire(&dir).unwrap_err().to_string();
        assert!(err.contains("in use by another run"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        OutputLock::acquire(&dir).unwrap();
    }
}
