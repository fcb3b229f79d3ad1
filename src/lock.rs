//! The data directory lock: one relay per volume.
//!
//! Two relays appending to one log would interleave frames and corrupt it, so
//! `serve` takes an exclusive advisory lock (flock) on `DATA_DIR/LOCK` for its
//! whole life and writes its pid into the file for the error message of the
//! next one. The kernel drops the lock when the process dies, even by SIGKILL,
//! so a stale lock never blocks a restart.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A held lock; released when dropped (or when the process exits).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    pub path: PathBuf,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process holds it: a relay is running on this data dir.
    #[error("data dir {dir} is in use by another walrelay (pid {holder}); refusing to start a second one on the same volume")]
    Held { dir: PathBuf, holder: String },
    #[error("cannot lock data dir {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Takes the lock of `dir` (creating the directory if needed).
///
/// # Errors
/// [`LockError::Held`] when another process holds it; I/O errors.
pub fn lock_data_dir(dir: &Path) -> Result<DirLock, LockError> {
    let io = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join("LOCK");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    "unknown".into()
                } else {
                    holder.into()
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(io)?;
    Ok(DirLock { _file: file, path })
}

/// True when a live process holds the lock of `dir` (for the CLI's commands
/// that must not run beside a relay).
///
/// # Errors
/// I/O errors opening the lock file.
pub fn is_locked(dir: &Path) -> Result<Option<String>, std::io::Error> {
    let path = dir.join("LOCK");
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Ok(Some(holder.trim().to_owned()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts just like another process would.
        let err = lock_data_dir(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&std::process::id().to_string()),
            "{err}"
        );
        assert!(is_locked(dir.path()).unwrap().is_some());
        drop(held);
        assert!(is_locked(dir.path()).unwrap().is_none());
        lock_data_dir(dir.path()).unwrap();
    }
}
