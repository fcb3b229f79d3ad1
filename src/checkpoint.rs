//! Per-replica checkpoints, in sled, behind one small module.
//!
//! For each replica two facts are kept:
//!
//! - `delivered`: every record below this sequence number has been delivered
//!   to the replica (or was rejected by it, or lost to damage or retention and
//!   counted). The shipper resumes here.
//! - `inflight`: the exact sequence range of the request being sent, written
//!   (and flushed) *before* the request leaves. After a crash the shipper
//!   re-sends exactly that range, on its own, before anything else: merged
//!   with newer records, a re-send of samples the replica already holds would
//!   be refused whole as out of order and the newer records with it.
//!
//! A replica set to live-first catch-up may also have a backfill (see
//! [`crate::ship::backfill`]): a second stream delivering the gap left when
//! its live stream jumped to the head. It has the same two facts of its own:
//!
//! - `backfill`: the range still missing, `[from, to)`. `from` advances as
//!   the backfill delivers; `to` is fixed at the split. The key is removed,
//!   with `backfill_inflight`, when `from` reaches `to`.
//! - `backfill_inflight`: the backfill's request being sent, re-sent alone
//!   after a crash exactly like `inflight`.
//!
//! The split itself (live `delivered` moved to the head, the gap recorded as
//! the backfill) is one atomic batch, so a crash leaves either the old
//! cursor or both streams, never a range that neither stream owns.
//!
//! Keys are `replica/<name>/delivered`, `replica/<name>/inflight`,
//! `replica/<name>/backfill` and `replica/<name>/backfill_inflight`, values
//! little-endian u64s (one, or two for a range). Every change is flushed
//! (fsync'd) before the call returns.
//!
//! A full disk must not stop the store for good. sled 0.34 keeps the first
//! I/O error it meets and fails every later call with it for as long as the
//! database is open; after one ENOSPC the shippers could never checkpoint
//! again, so no segment could ever be deleted and a disk that filled once
//! would stay full until a restart. So when a call fails for lack of space,
//! the handle is closed and the next call reopens it (sled's recovery reads
//! what is on disk, as after a restart); the failed call itself returns the
//! error and its caller retries.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The sled database could not be opened, read or flushed. Not
    /// recoverable in place: the relay stops shipping to be safe.
    #[error("checkpoint store {path}: {source}")]
    Store { path: String, source: sled::Error },
    /// A checkpoint operation panicked in its worker thread; retried.
    #[error("checkpoint operation failed: {0}")]
    Panicked(String),
    /// fsync of the store's data file failed: its dirty pages may be gone,
    /// so the store refuses every later call until a restart (the same rule
    /// as the log writer). Not recoverable in place.
    #[error(
        "checkpoint store {path}: fsync failed ({cause}); the store has stopped, restart the relay"
    )]
    SyncFailed { path: String, cause: String },
    /// A stored value has the wrong size: the store is damaged.
    #[error("checkpoint store: value of {key} has {len} bytes, expected {expected}")]
    BadValue {
        key: String,
        len: usize,
        expected: usize,
    },
}

/// One replica's persisted position.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Cursor {
    pub delivered: Option<u64>,
    pub inflight: Option<Range<u64>>,
    /// The gap a live-first split left, while it is being backfilled.
    pub backfill: Option<Backfill>,
}

/// A backfill's persisted position: `[from, to)` is still missing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Backfill {
    pub from: u64,
    pub to: u64,
    pub inflight: Option<Range<u64>>,
}

/// Which of a replica's streams a checkpoint call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The replica's cursor (`delivered`, `inflight`): the only stream of an
    /// in-order replica, the live stream of a live-first one.
    Live,
    /// The backfill of the gap below `to` (`backfill`, `backfill_inflight`).
    Backfill { to: u64 },
}

/// The checkpoint store.
#[derive(Clone)]
pub struct Checkpoints {
    /// None after an out-of-space error closed it: reopened on the next call.
    db: Arc<Mutex<Option<sled::Db>>>,
    /// sled's data file, opened once: sled's own `flush` only issues
    /// `sync_file_range`, which makes neither the file size nor the disk
    /// cache durable, so every flush is followed by an fdatasync of this
    /// handle. It is opened before any write so that Linux reports a
    /// writeback error to it even if sled's own flusher met it first.
    data_file: Arc<Option<Box<dyn SyncTarget>>>,
    /// Set when an fdatasync failed: the store stops for good.
    failed: Arc<std::sync::atomic::AtomicBool>,
    dir: PathBuf,
    path: String,
}

/// What makes the bytes sled has written durable: an fdatasync of sled's
/// data file. A trait so that tests can fail or hold a sync on demand.
trait SyncTarget: Send + Sync {
    fn sync(&self) -> std::io::Result<()>;
}

impl SyncTarget for std::fs::File {
    fn sync(&self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// Opens sled's data file (`<store>/db`) for fdatasync.
fn open_data_file(path: &Path) -> std::io::Result<Box<dyn SyncTarget>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path.join("db"))?;
    Ok(Box::new(file))
}

fn key(replica: &str, field: &str) -> String {
    format!("replica/{replica}/{field}")
}

fn range_value(r: &Range<u64>) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&r.start.to_le_bytes());
    v.extend_from_slice(&r.end.to_le_bytes());
    v
}

/// The `inflight` key of `stream`.
fn inflight_key(replica: &str, stream: Stream) -> String {
    match stream {
        Stream::Live => key(replica, "inflight"),
        Stream::Backfill { .. } => key(replica, "backfill_inflight"),
    }
}

/// Adds to `batch` that `stream` has everything below `delivered`.
fn put_delivered(batch: &mut sled::Batch, replica: &str, stream: Stream, delivered: u64) {
    match stream {
        Stream::Live => batch.insert(
            key(replica, "delivered").as_bytes(),
            &delivered.to_le_bytes()[..],
        ),
        // Done: the gap is closed, so the backfill is forgotten.
        Stream::Backfill { to } if delivered >= to => {
            batch.remove(key(replica, "backfill").as_bytes());
            batch.remove(key(replica, "backfill_inflight").as_bytes());
        }
        Stream::Backfill { to } => batch.insert(
            key(replica, "backfill").as_bytes(),
            range_value(&(delivered..to)),
        ),
    }
}

impl Checkpoints {
    /// Opens (creating) the store at `path`.
    ///
    /// # Errors
    /// [`CheckpointError::Store`] when sled cannot open it (held by another
    /// process, damaged, no permission).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        Self::open_with(path, open_data_file)
    }

    /// [`Self::open`] with the sync target opened by `open_target`.
    fn open_with(
        path: &Path,
        open_target: impl FnOnce(&Path) -> std::io::Result<Box<dyn SyncTarget>>,
    ) -> Result<Self, CheckpointError> {
        let p = path.display().to_string();
        let db = open_db(path).map_err(|source| CheckpointError::Store {
            path: p.clone(),
            source,
        })?;
        let data_file = open_target(path).ok();
        Ok(Self {
            db: Arc::new(Mutex::new(Some(db))),
            data_file: Arc::new(data_file),
            failed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            dir: path.to_path_buf(),
            path: p,
        })
    }

    fn err(&self, source: sled::Error) -> CheckpointError {
        CheckpointError::Store {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` on the open database (reopening it first if an earlier
    /// out-of-space error closed it); closes it when `f` runs out of space.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&sled::Db) -> sled::Result<T>,
    ) -> Result<T, CheckpointError> {
        if self.failed() {
            return Err(CheckpointError::SyncFailed {
                path: self.path.clone(),
                cause: "an earlier fsync failed".into(),
            });
        }
        let mut slot = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let db = match slot.take() {
            Some(db) => db,
            None => {
                let db = open_db(&self.dir).map_err(|e| self.err(e))?;
                tracing::info!(path = %self.path, "checkpoint store reopened after running out of space");
                db
            }
        };
        let result = f(&db);
        match &result {
            Err(sled::Error::Io(e)) if out_of_space(e) => {
                tracing::warn!(path = %self.path, error = %e,
                    "checkpoint store out of space; it will be reopened at the next attempt");
                drop(db);
            }
            _ => *slot = Some(db),
        }
        result.map_err(|e| self.err(e))
    }

    fn get_u64s<const N: usize>(&self, k: &str) -> Result<Option<[u64; N]>, CheckpointError> {
        let Some(v) = self.with_db(|db| db.get(k))? else {
            return Ok(None);
        };
        if v.len() != N * 8 {
            return Err(CheckpointError::BadValue {
                key: k.to_owned(),
                len: v.len(),
                expected: N * 8,
            });
        }
        let mut out = [0u64; N];
        for (i, chunk) in v.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            out[i] = u64::from_le_bytes(b);
        }
        Ok(Some(out))
    }

    /// The replica's persisted position.
    ///
    /// # Errors
    /// Store errors and damaged values.
    pub fn cursor(&self, replica: &str) -> Result<Cursor, CheckpointError> {
        let backfill = match self.get_u64s::<2>(&key(replica, "backfill"))? {
            Some([from, to]) => Some(Backfill {
                from,
                to,
                inflight: self
                    .get_u64s::<2>(&key(replica, "backfill_inflight"))?
                    .map(|[a, b]| a..b),
            }),
            None => None,
        };
        Ok(Cursor {
            delivered: self.get_u64s::<1>(&key(replica, "delivered"))?.map(|[d]| d),
            inflight: self
                .get_u64s::<2>(&key(replica, "inflight"))?
                .map(|[a, b]| a..b),
            backfill,
        })
    }

    /// The names of every replica with a stored position.
    ///
    /// # Errors
    /// Store errors.
    pub fn replicas(&self) -> Result<Vec<String>, CheckpointError> {
        let keys = self.with_db(|db| {
            db.scan_prefix("replica/")
                .keys()
                .collect::<sled::Result<Vec<_>>>()
        })?;
        let mut names = Vec::new();
        for k in keys {
            let k = String::from_utf8_lossy(&k).into_owned();
            if let Some(name) = k
                .strip_prefix("replica/")
                .and_then(|r| r.strip_suffix("/delivered"))
            {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    /// Records the range about to be sent, durably, before it is sent.
    ///
    /// # Errors
    /// Store errors.
    pub fn begin_send(&self, replica: &str, range: Range<u64>) -> Result<(), CheckpointError> {
        self.begin_send_on(replica, Stream::Live, range)
    }

    /// [`Self::begin_send`] for either stream.
    ///
    /// # Errors
    /// Store errors.
    pub fn begin_send_on(
        &self,
        replica: &str,
        stream: Stream,
        range: Range<u64>,
    ) -> Result<(), CheckpointError> {
        let v = range_value(&range);
        self.with_db(|db| {
            db.insert(inflight_key(replica, stream), v)?;
            db.flush()
        })?;
        self.sync()
    }

    /// Records that everything below `delivered` is done and clears the
    /// in-flight range, atomically and durably.
    ///
    /// # Errors
    /// Store errors.
    pub fn complete(&self, replica: &str, delivered: u64) -> Result<(), CheckpointError> {
        self.complete_on(replica, Stream::Live, delivered)
    }

    /// [`Self::complete`] for either stream. For a backfill, reaching its
    /// end removes it.
    ///
    /// # Errors
    /// Store errors.
    pub fn complete_on(
        &self,
        replica: &str,
        stream: Stream,
        delivered: u64,
    ) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        put_delivered(&mut batch, replica, stream, delivered);
        batch.remove(inflight_key(replica, stream).as_bytes());
        self.apply(batch)
    }

    /// [`Self::complete`] for the request just delivered and
    /// [`Self::begin_send`] for the next one, atomically and with one flush:
    /// the next range is durable before it is sent, as with `begin_send`,
    /// and the previous request's completion is durable at the latest then.
    /// Until then a restart finds the previous range still in flight and
    /// re-sends it alone, which is safe (the replica refuses or accepts
    /// again what it already has), so a busy shipper needs one flush per
    /// request instead of two.
    ///
    /// # Errors
    /// Store errors.
    pub fn complete_and_begin(
        &self,
        replica: &str,
        delivered: u64,
        next: Range<u64>,
    ) -> Result<(), CheckpointError> {
        self.complete_and_begin_on(replica, Stream::Live, delivered, next)
    }

    /// [`Self::complete_and_begin`] for either stream.
    ///
    /// # Errors
    /// Store errors.
    pub fn complete_and_begin_on(
        &self,
        replica: &str,
        stream: Stream,
        delivered: u64,
        next: Range<u64>,
    ) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        put_delivered(&mut batch, replica, stream, delivered);
        batch.insert(inflight_key(replica, stream).as_bytes(), range_value(&next));
        self.apply(batch)
    }

    /// A live-first split: the live stream continues at `gap.end` (the
    /// head) and `gap` becomes the backfill, atomically. Clears the live
    /// in-flight range: it lies inside `gap`, whose backfill starts at
    /// `gap.start` and re-sends it as part of its first requests.
    ///
    /// # Errors
    /// Store errors.
    pub fn split(&self, replica: &str, gap: Range<u64>) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            key(replica, "delivered").as_bytes(),
            &gap.end.to_le_bytes()[..],
        );
        batch.remove(key(replica, "inflight").as_bytes());
        batch.insert(key(replica, "backfill").as_bytes(), range_value(&gap));
        batch.remove(key(replica, "backfill_inflight").as_bytes());
        self.apply(batch)
    }

    /// Moves a replica's cursor (operator action or first start), clearing
    /// any in-flight range and any backfill: the operator says that
    /// everything below `delivered` counts as delivered and that the rest is
    /// sent in order from there.
    ///
    /// # Errors
    /// Store errors.
    pub fn set(&self, replica: &str, delivered: u64) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            key(replica, "delivered").as_bytes(),
            &delivered.to_le_bytes()[..],
        );
        for field in ["inflight", "backfill", "backfill_inflight"] {
            batch.remove(key(replica, field).as_bytes());
        }
        self.apply(batch)
    }

    /// Forgets a replica.
    ///
    /// # Errors
    /// Store errors.
    pub fn remove(&self, replica: &str) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        for field in ["delivered", "inflight", "backfill", "backfill_inflight"] {
            batch.remove(key(replica, field).as_bytes());
        }
        self.apply(batch)
    }

    /// Applies `batch` atomically and flushes it.
    fn apply(&self, batch: sled::Batch) -> Result<(), CheckpointError> {
        self.with_db(|db| {
            db.apply_batch(batch)?;
            db.flush()
        })?;
        self.sync()
    }

    /// True once an fsync of the store failed.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes what sled flushed durable. Out of space is retried by the
    /// caller (nothing is claimed durable); any other error stops the store.
    fn sync(&self) -> Result<(), CheckpointError> {
        let Some(file) = self.data_file.as_ref() else {
            return Ok(());
        };
        match file.sync() {
            Ok(()) => Ok(()),
            Err(e) if out_of_space(&e) => Err(self.err(sled::Error::Io(e))),
            Err(e) => {
                self.failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                metrics::gauge!("walrelay_checkpoint_store_failed").set(1.0);
                tracing::error!(path = %self.path, error = %e, "checkpoint store fsync failed; it has stopped");
                Err(CheckpointError::SyncFailed {
                    path: self.path.clone(),
                    cause: e.to_string(),
                })
            }
        }
    }
}

/// ENOSPC or EDQUOT. sled hands out copies of its stored error that keep
/// the kind but not the OS error code.
fn out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn open_db(path: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .mode(sled::Mode::LowSpace)
        .open()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn inflight_range_survives_reopen_until_completed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        {
            let cp = Checkpoints::open(&path).unwrap();
            cp.set("a", 10).unwrap();
            cp.begin_send("a", 10..25).unwrap();
        }
        let cp = Checkpoints::open(&path).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(10),
                inflight: Some(10..25),
                backfill: None,
            }
        );
        cp.complete_and_begin("a", 25, 25..30).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(25),
                inflight: Some(25..30),
                backfill: None,
            }
        );
        cp.complete("a", 30).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(30),
                inflight: None,
                backfill: None,
            }
        );
        assert_eq!(cp.replicas().unwrap(), vec!["a".to_string()]);
        assert_eq!(cp.cursor("b").unwrap(), Cursor::default());
    }

    #[test]
    fn a_split_moves_the_live_cursor_and_records_the_gap_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        {
            let cp = Checkpoints::open(&path).unwrap();
            cp.set("a", 10).unwrap();
            cp.begin_send("a", 10..20).unwrap();
            cp.split("a", 10..500).unwrap();
        }
        let cp = Checkpoints::open(&path).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(500),
                inflight: None,
                backfill: Some(Backfill {
                    from: 10,
                    to: 500,
                    inflight: None
                }),
            }
        );
    }

    #[test]
    fn each_stream_keeps_its_own_inflight_range_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let backfill = Stream::Backfill { to: 500 };
        {
            let cp = Checkpoints::open(&path).unwrap();
            cp.set("a", 10).unwrap();
            cp.split("a", 10..500).unwrap();
            cp.begin_send_on("a", Stream::Live, 500..520).unwrap();
            cp.begin_send_on("a", backfill, 10..40).unwrap();
            cp.complete_and_begin_on("a", backfill, 40, 40..90).unwrap();
        }
        let cp = Checkpoints::open(&path).unwrap();
        let c = cp.cursor("a").unwrap();
        assert_eq!(c.delivered, Some(500));
        assert_eq!(c.inflight, Some(500..520));
        assert_eq!(
            c.backfill,
            Some(Backfill {
                from: 40,
                to: 500,
                inflight: Some(40..90)
            })
        );
        // The live stream's progress leaves the backfill alone.
        cp.complete_on("a", Stream::Live, 520).unwrap();
        assert_eq!(cp.cursor("a").unwrap().backfill.unwrap().from, 40);
        assert_eq!(cp.replicas().unwrap(), vec!["a".to_string()]);
    }

    #[test]
    fn a_backfill_that_reaches_its_end_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        let backfill = Stream::Backfill { to: 500 };
        cp.set("a", 10).unwrap();
        cp.split("a", 10..500).unwrap();
        cp.complete_and_begin_on("a", backfill, 300, 300..500)
            .unwrap();
        cp.complete_on("a", backfill, 500).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(500),
                inflight: None,
                backfill: None,
            }
        );
    }

    #[test]
    fn setting_or_removing_a_cursor_forgets_its_backfill() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        cp.set("a", 10).unwrap();
        cp.split("a", 10..500).unwrap();
        cp.begin_send_on("a", Stream::Backfill { to: 500 }, 10..20)
            .unwrap();
        cp.set("a", 0).unwrap();
        assert_eq!(cp.cursor("a").unwrap().backfill, None);
        cp.split("a", 0..50).unwrap();
        cp.remove("a").unwrap();
        assert_eq!(cp.cursor("a").unwrap(), Cursor::default());
    }
}
