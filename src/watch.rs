//! Values loaded from files that operators replace while the relay runs:
//! TLS certificates and keys, bearer tokens, passwords, the users file.
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, and
//! cert-manager rotates certificates the same way, so a file is re-read when
//! its modification time, size or inode changes. The check is a `stat` of
//! each file at most once per interval, done by whoever asks for the value
//! (no background task). A new file that does not load is logged (its path
//! and the error, never its content) and the previous value is kept: a
//! half-written certificate must not take the relay down. (Credentials
//! files load to "no credential" instead, so that emptying one revokes
//! what it held: see [`crate::auth`].)

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

type Loader<T> = Box<dyn Fn(&[PathBuf]) -> Result<T, String> + Send + Sync>;

/// A value built from one or more files, rebuilt when any of them changes.
pub struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    load: Loader<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    value: Arc<T>,
    stamps: Vec<Option<Stamp>>,
    checked: Instant,
}

impl<T> Reloading<T> {
    /// Loads the value once; `what` names it in logs ("TLS certificate").
    ///
    /// # Errors
    /// The first load fails: the error of `load`.
    pub fn new<E: std::fmt::Display>(
        what: &'static str,
        paths: Vec<PathBuf>,
        interval: Duration,
        load: impl Fn(&[PathBuf]) -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let value = Arc::new(load(&paths)?);
        Ok(Self {
            what,
            paths,
            interval,
            load: Box::new(move |p| load(p).map_err(|e| e.to_string())),
            state: Mutex::new(State {
                value,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The current value, re-read first when the interval has passed and a
    /// file changed.
    pub fn get(&self) -> Arc<T> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() < self.interval {
            return Arc::clone(&st.value);
        }
        st.checked = Instant::now();
        let stamps: Vec<Option<Stamp>> = self.paths.iter().map(|p| stamp(p)).collect();
        if stamps == st.stamps {
            return Arc::clone(&st.value);
        }
        // Remember the new stamps even when loading fails, so a bad file is
        // reported once, not every interval; fixing it changes them again.
        st.stamps = stamps;
        match (self.load)(&self.paths) {
            Ok(v) => {
                tracing::info!(what = self.what, files = ?self.paths, "reloaded after a file changed");
                st.value = Arc::new(v);
            }
            Err(e) => {
                tracing::error!(what = self.what, files = ?self.paths, error = %e,
                    "a changed file does not load; keeping the previous version");
                metrics::counter!("walrelay_reload_failures_total", "what" => self.what)
                    .increment(1);
            }
        }
        Arc::clone(&st.value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn read(paths: &[PathBuf]) -> Result<String, String> {
        let s = std::fs::read_to_string(&paths[0]).map_err(|e| e.to_string())?;
        if s.contains("bad") {
            return Err("bad content".into());
        }
        Ok(s)
    }

    #[test]
    fn a_changed_file_is_reread_and_a_bad_one_keeps_the_old_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "one").unwrap();
        let r = Reloading::new("test", vec![p.clone()], Duration::ZERO, read).unwrap();
        assert_eq!(*r.get(), "one");
        std::fs::write(&p, "second").unwrap();
        assert_eq!(*r.get(), "second");
        std::fs::write(&p, "bad and longer").unwrap();
        assert_eq!(*r.get(), "second");
        std::fs::write(&p, "third").unwrap();
        assert_eq!(*r.get(), "third");
    }

    #[test]
    fn within_the_interval_the_file_is_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "one").unwrap();
        let r = Reloading::new("test", vec![p.clone()], Duration::from_secs(3600), read).unwrap();
        std::fs::write(&p, "second").unwrap();
        assert_eq!(*r.get(), "one");
    }
}
