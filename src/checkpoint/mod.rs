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
//! A replica delivered by N > 1 shards (see [`crate::ship::shards`]) has,
//! instead of one cursor, one per shard, each about the series of its shard
//! only:
//!
//! - `shards`: N. Absent for one shard (an upgrade from a relay without
//!   shards is then a no-op).
//! - `shard/<i>/delivered` and `shard/<i>/inflight` for i in 0..N: shard
//!   i's position and its request being sent, with the meaning above
//!   restricted to the series that hash to shard i of N. After a crash each
//!   shard re-sends exactly its in-flight range cut to its series, which is
//!   the same request because N is stored beside it.
//! - `delivered` stays as the position all shards shared when N was last
//!   changed (a reshard waits for a common position, a barrier): it is
//!   what an older relay would resume from, re-sending but never skipping.
//!   [`Checkpoints::cursor`] reports the lowest shard position as the
//!   replica's `delivered`.
//!
//! A reshard writes the new N and every new shard's position (the barrier)
//! in one atomic batch, and removes the old shards' keys: a crash leaves
//! either the old N with the old positions or the new N at the barrier.
//!
//! Keys are `replica/<name>/delivered`, `replica/<name>/inflight`,
//! `replica/<name>/backfill`, `replica/<name>/backfill_inflight`,
//! `replica/<name>/shards` and `replica/<name>/shard/<i>/{delivered,inflight}`,
//! values little-endian u64s (one, or two for a range). Every change is
//! flushed and synced before the call returns (see below).
//!
//! ## When a change is reported durable
//!
//! sled's own `flush` only issues `sync_file_range`, which makes neither the
//! file size nor the disk cache durable, so every change is followed by an
//! fdatasync of sled's data file through a handle of our own. The rule:
//!
//! **A position is reported durable (the call returns Ok) only if a sync
//! that began after it was written succeeded, and no sync error was
//! consumed elsewhere in between. After a failed sync, nothing is reported
//! durable until the whole stored state has been rewritten and synced.**
//!
//! Why: Linux reports a writeback error once per open file description, and
//! may have marked the pages whose writeback failed clean; a later fdatasync
//! then succeeds although those pages never reached the disk. So a retried
//! sync proves nothing about what an earlier failed one covered, and a sync
//! error is evidence for every write made before it was seen, not only for
//! the caller that happened to issue the sync. (Retrying the same change
//! does not write it again either: sled skips a write whose value equals
//! the current one.) How the rule is kept:
//!
//! - Our handle is opened before sled opens the file and is used only to
//!   sync, so sled's own handle consuming an error does not hide it from
//!   ours, and only our syncs consume errors on ours.
//! - Each write is applied to sled under the database lock and numbered
//!   (its *generation*), then flushed to sled's file. Flushes are
//!   serialised; each notes the last generation applied when it starts,
//!   and on success every generation up to that one is in the file (is
//!   *written*). A caller whose generation is already written returns
//!   without flushing again: the shippers share flushes. A failed flush
//!   loses every generation applied so far: their callers get an error and
//!   retry, and the next write writes the whole store again (below).
//! - Syncs are serialised; each notes the last generation written when it
//!   starts, and on success every generation up to that one is durable. A
//!   caller whose generation is already covered by such a sync returns
//!   without syncing again: the shippers share syncs (group commit).
//! - A sync that fails for lack of space marks every generation applied
//!   until the failure is seen as lost (read under the database lock, so a
//!   write or flush that raced with the failing sync, whose writeback error
//!   it may have consumed, is included). Callers holding a lost generation get
//!   [`CheckpointError::NotDurable`] and retry. Under the same lock a flag
//!   is set: the next write first writes every key of the store again with
//!   its current value, so the sync that covers that write covers the whole
//!   state. The keys are written again one by one (a compare-and-swap of each
//!   value with itself, since a batch or an insert of an unchanged value
//!   writes nothing); the values do not change, so which of these writes a
//!   crash keeps does not matter, and the caller's change follows as its own
//!   atomic batch.
//! - Any other sync error (EIO) stops the store for good, as for the log
//!   writer: every later call fails with [`CheckpointError::SyncFailed`] and
//!   the gauge `walrelay_checkpoint_store_failed` is 1 until a restart.
//!
//! What this cannot control is how sled treats its own pages that never
//! reached the disk: after a power loss its recovery stops at the first
//! torn message of its log and comes back with the state from before it
//! (older positions, shipped again, never skipped; each change is one
//! batch, so never a mix of old and new), or it reports the store damaged.
//!
//! A full disk must not stop the store for good. sled 0.34 keeps the first
//! I/O error it meets and fails every later call with it for as long as the
//! database is open; after one ENOSPC the shippers could never checkpoint
//! again, so no segment could ever be deleted and a disk that filled once
//! would stay full until a restart. So when a call fails for lack of space,
//! the handle is closed and the next call reopens it (sled's recovery reads
//! what is on disk, as after a restart); the failed call itself returns the
//! error and its caller retries.

mod settings;

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
    /// An fsync of the store's data file failed for lack of space after
    /// this change was written, so it may not be on disk. Recoverable: the
    /// caller retries, which writes the change (and the whole store) again
    /// and syncs it.
    #[error("checkpoint store {path}: not durable, an fsync after this change failed ({cause})")]
    NotDurable { path: String, cause: String },
    /// sled's data file could not be opened for fsync: the store is not
    /// opened, rather than running without durability.
    #[error("checkpoint store {path}: cannot open its data file {file} for fsync: {source}")]
    DataFile {
        path: String,
        file: String,
        source: std::io::Error,
    },
    /// sled's settings file could not be checked or written whole (see
    /// [`settings`]).
    #[error("checkpoint store {path}: cannot make sled's settings file whole: {source}")]
    Settings {
        path: String,
        source: std::io::Error,
    },
    /// A damaged store could not be moved aside (see
    /// [`Checkpoints::open_or_set_aside`]).
    #[error(
        "checkpoint store {path} is damaged ({cause}) and cannot be moved aside to {to}: {source}"
    )]
    SetAside {
        path: String,
        to: String,
        cause: String,
        source: std::io::Error,
    },
    /// A stored shard count is beyond what the relay ever writes: the store
    /// is damaged.
    #[error(
        "checkpoint store: {key} holds {count} shards, more than {max} (damaged)",
        max = crate::types::MAX_SHARDS
    )]
    BadShardCount { key: String, count: u64 },
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
    /// Everything below is delivered: with shards, the lowest shard's
    /// position.
    pub delivered: Option<u64>,
    pub inflight: Option<Range<u64>>,
    /// The gap a live-first split left, while it is being backfilled.
    pub backfill: Option<Backfill>,
    /// Each shard's own cursor, when the replica has more than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardCursor>,
}

impl Cursor {
    /// How many shards deliver the replica's live stream.
    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX).max(1)
    }

    /// The highest position the cursor refers to: its position, the end
    /// of its request in flight, its backfill's end and request in flight,
    /// and each shard's position and request in flight (a sharded
    /// replica's `delivered` is its lowest shard's). New records must be
    /// numbered from here on: a stream past them would skip them.
    pub fn highest(&self) -> u64 {
        let backfill = self.backfill.as_ref();
        let shards = self
            .shards
            .iter()
            .flat_map(|s| [Some(s.delivered), s.inflight.as_ref().map(|i| i.end)]);
        [
            self.delivered,
            self.inflight.as_ref().map(|i| i.end),
            backfill.map(|b| b.to),
            backfill.and_then(|b| b.inflight.as_ref()).map(|i| i.end),
        ]
        .into_iter()
        .chain(shards)
        .flatten()
        .max()
        .unwrap_or(0)
    }
}

/// One shard's persisted position: as [`Cursor`]'s, for its series only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardCursor {
    pub delivered: u64,
    pub inflight: Option<Range<u64>>,
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
    /// Shard `index` of `of` of the live stream (`shard/<index>/...`).
    Shard { index: u32, of: u32 },
}

/// The checkpoint store.
#[derive(Clone)]
pub struct Checkpoints {
    store: Arc<Mutex<Store>>,
    /// Held for the whole of a sync: syncs are serialised (the module doc
    /// says why). Taken before `store` when both are needed.
    syncs: Arc<Mutex<Syncs>>,
    /// Held for the whole of a sled flush: flushes are serialised, and
    /// each covers every batch applied before it began. Taken before
    /// `store`.
    flushes: Arc<Mutex<()>>,
    /// sled's data file, opened once, before sled (the module doc says
    /// why); every write is followed by a sync of it.
    data_file: Arc<dyn SyncTarget>,
    /// Set when an fdatasync failed other than for lack of space: the
    /// store stops for good.
    failed: Arc<std::sync::atomic::AtomicBool>,
    dir: PathBuf,
    path: String,
}

/// The database and what has been written to it, under one lock.
struct Store {
    /// None after an out-of-space error closed it: reopened on the next call.
    db: Option<sled::Db>,
    /// The generation of the last batch applied to sled (in its memory,
    /// not necessarily in its file yet).
    applied: u64,
    /// Every generation up to this one is in sled's file: a flush that
    /// began after it was applied succeeded.
    written: u64,
    /// Every generation up to this one was applied before a flush failed
    /// or the database was closed: never reported durable; its caller
    /// retries.
    flush_lost: u64,
    /// A sync or a flush failed: the next write first writes every key
    /// again.
    rewrite: bool,
}

/// What the syncs so far have shown.
struct Syncs {
    /// Every generation up to this one is covered by a successful sync that
    /// began after it was written.
    synced: u64,
    /// Every generation up to this one was written before a failed sync
    /// was seen: it is never reported durable, whatever `synced` says.
    lost: u64,
    /// Why the last sync failed, for the callers whose generation it lost.
    cause: String,
}

/// Where [`Checkpoints::open_or_set_aside`] moved a damaged store, and why.
#[derive(Debug)]
pub struct SetAside {
    pub to: PathBuf,
    pub cause: String,
}

/// `<store><suffix>`: a directory beside the store.
fn sibling(store: &Path, suffix: &str) -> PathBuf {
    let mut name = store
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    store.with_file_name(name)
}

/// `<store>.damaged-<unix seconds>`, with `-<n>` added if that exists.
fn set_aside_path(store: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let first = format!(".damaged-{secs}");
    let mut to = sibling(store, &first);
    let mut n = 1;
    while to.exists() {
        to = sibling(store, &format!("{first}-{n}"));
        n += 1;
    }
    to
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

/// Opens (creating) sled's data file, `<store>/db`, for fdatasync.
fn open_data_file(path: &Path) -> std::io::Result<Box<dyn SyncTarget>> {
    std::fs::create_dir_all(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path.join("db"))?;
    Ok(Box::new(file))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes every key of `db` again with its current value. An insert or a
/// batch of an unchanged value is skipped by sled; a compare-and-swap of a
/// value with itself is written.
fn rewrite_all(db: &sled::Db) -> sled::Result<()> {
    for kv in db.iter() {
        let (k, v) = kv?;
        // Cannot conflict: writers hold the database lock.
        let _ = db.compare_and_swap(&k, Some(&v), Some(v.clone()))?;
    }
    Ok(())
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
        Stream::Shard { index, .. } => key(replica, &format!("shard/{index}/inflight")),
    }
}

fn shard_delivered_key(replica: &str, index: u32) -> String {
    key(replica, &format!("shard/{index}/delivered"))
}

/// What a write of a replica's position does with its backfill.
enum Backfills {
    Keep,
    Clear,
    /// A live-first split: this gap is the backfill now.
    Split(Range<u64>),
}

/// The fields of a replica's keys besides its shards'.
const FIELDS: [&str; 5] = [
    "delivered",
    "inflight",
    "backfill",
    "backfill_inflight",
    "shards",
];

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
        Stream::Shard { index, .. } => batch.insert(
            shard_delivered_key(replica, index).as_bytes(),
            &delivered.to_le_bytes()[..],
        ),
    }
}

impl Checkpoints {
    /// Opens (creating) the store at `path`.
    ///
    /// # Errors
    /// [`CheckpointError::DataFile`] when sled's data file cannot be opened
    /// for fsync, [`CheckpointError::Store`] when sled cannot open the store
    /// (held by another process, damaged, no permission).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        Self::open_with(path, open_data_file)
    }

    /// [`Self::open`] for the relay: a store that sled reports damaged when
    /// it opens it is moved aside, to `<store>.damaged-<unix seconds>`, and a
    /// new empty store is opened in its place. Returns where the damaged one
    /// went, and why.
    ///
    /// Why a relay does not simply refuse to start: then every sender is
    /// refused until somebody repairs the store by hand, while nothing the
    /// store held is needed to stay lossless. Positions only have to be
    /// conservative, and an empty store beside a log with records makes
    /// the relay start every replica at the oldest record (see
    /// `crate::server`): acknowledged records are sent again, never skipped.
    /// The damaged store is kept for a post-mortem.
    ///
    /// # Errors
    /// As [`Self::open`], for anything but damage;
    /// [`CheckpointError::SetAside`] when the damaged store cannot be moved.
    pub fn open_or_set_aside(path: &Path) -> Result<(Self, Option<SetAside>), CheckpointError> {
        let cause = match Self::open(path) {
            Err(
                e @ CheckpointError::Store {
                    source: sled::Error::Corruption { .. },
                    ..
                },
            ) => e.to_string(),
            other => return other.map(|cp| (cp, None)),
        };
        let to = set_aside_path(path);
        let moved = std::fs::rename(path, &to).and_then(|()| {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            std::fs::File::open(parent.unwrap_or(Path::new(".")))?.sync_all()
        });
        moved.map_err(|source| CheckpointError::SetAside {
            path: path.display().to_string(),
            to: to.display().to_string(),
            cause: cause.clone(),
            source,
        })?;
        let cp = Self::open(path)?;
        Ok((cp, Some(SetAside { to, cause })))
    }

    /// [`Self::open`] with the sync target opened by `open_target`.
    fn open_with(
        path: &Path,
        open_target: impl FnOnce(&Path) -> std::io::Result<Box<dyn SyncTarget>>,
    ) -> Result<Self, CheckpointError> {
        let p = path.display().to_string();
        settings::ensure(path, open_db).map_err(|source| CheckpointError::Settings {
            path: p.clone(),
            source,
        })?;
        // Before sled: its own first writes are then covered too.
        let data_file = open_target(path).map_err(|source| CheckpointError::DataFile {
            path: p.clone(),
            file: path.join("db").display().to_string(),
            source,
        })?;
        let db = open_db(path).map_err(|source| CheckpointError::Store {
            path: p.clone(),
            source,
        })?;
        Ok(Self {
            store: Arc::new(Mutex::new(Store {
                db: Some(db),
                applied: 0,
                written: 0,
                flush_lost: 0,
                rewrite: false,
            })),
            flushes: Arc::new(Mutex::new(())),
            syncs: Arc::new(Mutex::new(Syncs {
                synced: 0,
                lost: 0,
                cause: String::new(),
            })),
            data_file: Arc::from(data_file),
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
        self.with_store(|db, _| f(db))
    }

    fn stopped(&self) -> Result<(), CheckpointError> {
        if self.failed() {
            return Err(CheckpointError::SyncFailed {
                path: self.path.clone(),
                cause: "an earlier fsync failed".into(),
            });
        }
        Ok(())
    }

    /// [`Self::with_db`], with the rest of the state under the same lock.
    fn with_store<T>(
        &self,
        f: impl FnOnce(&sled::Db, &mut Store) -> sled::Result<T>,
    ) -> Result<T, CheckpointError> {
        self.stopped()?;
        let mut store = lock(&self.store);
        let db = match store.db.take() {
            Some(db) => db,
            None => {
                let db = open_db(&self.dir).map_err(|e| self.err(e))?;
                tracing::info!(path = %self.path, "checkpoint store reopened after running out of space");
                db
            }
        };
        let result = f(&db, &mut store);
        match &result {
            Err(sled::Error::Io(e)) if out_of_space(e) => {
                tracing::warn!(path = %self.path, error = %e,
                    "checkpoint store out of space; it will be reopened at the next attempt");
                // What was applied and not flushed closes with it.
                store.flush_lost = store.applied;
                drop(db);
            }
            _ => store.db = Some(db),
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
        let mut shards = Vec::new();
        let of = self
            .get_u64s::<1>(&key(replica, "shards"))?
            .map_or(1, |[n]| n);
        if of > u64::from(crate::types::MAX_SHARDS) {
            return Err(CheckpointError::BadShardCount {
                key: key(replica, "shards"),
                count: of,
            });
        }
        if of > 1 {
            for index in 0..u32::try_from(of).unwrap_or(u32::MAX) {
                let k = shard_delivered_key(replica, index);
                let delivered =
                    self.get_u64s::<1>(&k)?
                        .ok_or_else(|| CheckpointError::BadValue {
                            key: k,
                            len: 0,
                            expected: 8,
                        })?[0];
                let stream = Stream::Shard {
                    index,
                    of: of as u32,
                };
                let inflight = self
                    .get_u64s::<2>(&inflight_key(replica, stream))?
                    .map(|[a, b]| a..b);
                shards.push(ShardCursor {
                    delivered,
                    inflight,
                });
            }
        }
        let delivered = match shards.iter().map(|s| s.delivered).min() {
            Some(lowest) => Some(lowest),
            None => self.get_u64s::<1>(&key(replica, "delivered"))?.map(|[d]| d),
        };
        Ok(Cursor {
            delivered,
            inflight: self
                .get_u64s::<2>(&key(replica, "inflight"))?
                .map(|[a, b]| a..b),
            backfill,
            shards,
        })
    }

    /// The keys of every shard of `replica` (whatever their number).
    fn shard_keys(&self, replica: &str) -> Result<Vec<sled::IVec>, CheckpointError> {
        let prefix = key(replica, "shard/");
        self.with_db(|db| {
            db.scan_prefix(prefix.as_bytes())
                .keys()
                .collect::<sled::Result<Vec<_>>>()
        })
    }

    /// Removes every key of `replica` but `keep` from `batch`, its shards'
    /// included.
    fn clear(
        &self,
        batch: &mut sled::Batch,
        replica: &str,
        keep: &[&str],
    ) -> Result<(), CheckpointError> {
        for field in FIELDS.iter().filter(|f| !keep.contains(f)) {
            batch.remove(key(replica, field).as_bytes());
        }
        for k in self.shard_keys(replica)? {
            batch.remove(k);
        }
        Ok(())
    }

    /// Changes the number of shards of the replica's live stream to `to`
    /// at the barrier `at`: every shard of the old number has delivered
    /// everything below `at` and has nothing in flight. In one atomic batch:
    /// the old shards' keys go, `delivered` becomes `at`, and with `to > 1`
    /// each new shard starts at `at`. With `split`, a live-first split at
    /// the same time ([`Self::split`]): the shards start at its end and the
    /// gap becomes the backfill; without, a backfill running goes on.
    ///
    /// # Errors
    /// Store errors.
    pub fn reshard(
        &self,
        replica: &str,
        at: u64,
        to: u32,
        split: Option<Range<u64>>,
    ) -> Result<(), CheckpointError> {
        let backfill = match split {
            Some(gap) => Backfills::Split(gap),
            None => Backfills::Keep,
        };
        self.place(replica, at, to, backfill)
    }

    /// Writes, in one batch, that the replica's live stream has `to`
    /// shards all at `at`, nothing in flight, and its backfill as
    /// `backfill` says.
    fn place(
        &self,
        replica: &str,
        at: u64,
        to: u32,
        backfill: Backfills,
    ) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        let keep: &[&str] = match backfill {
            Backfills::Keep => &["backfill", "backfill_inflight"],
            Backfills::Clear | Backfills::Split(_) => &[],
        };
        self.clear(&mut batch, replica, keep)?;
        let start = match &backfill {
            Backfills::Split(gap) => {
                batch.insert(key(replica, "backfill").as_bytes(), range_value(gap));
                gap.end
            }
            Backfills::Keep | Backfills::Clear => at,
        };
        batch.insert(
            key(replica, "delivered").as_bytes(),
            &start.to_le_bytes()[..],
        );
        if to > 1 {
            batch.insert(
                key(replica, "shards").as_bytes(),
                &u64::from(to).to_le_bytes()[..],
            );
            for index in 0..to {
                batch.insert(
                    shard_delivered_key(replica, index).as_bytes(),
                    &start.to_le_bytes()[..],
                );
            }
        }
        self.apply(batch)
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
            // A shard's `replica/<name>/shard/<i>/delivered` is not a
            // replica: names never hold a '/'.
            if let Some(name) = k
                .strip_prefix("replica/")
                .and_then(|r| r.strip_suffix("/delivered"))
                .filter(|name| !name.contains('/'))
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
        let mut batch = sled::Batch::default();
        batch.insert(
            inflight_key(replica, stream).as_bytes(),
            range_value(&range),
        );
        self.apply(batch)
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
        self.place(replica, gap.start, 1, Backfills::Split(gap))
    }

    /// Moves a replica's cursor (operator action or first start), clearing
    /// any in-flight range and any backfill: the operator says that
    /// everything below `delivered` counts as delivered and that the rest is
    /// sent in order from there.
    ///
    /// # Errors
    /// Store errors.
    pub fn set(&self, replica: &str, delivered: u64) -> Result<(), CheckpointError> {
        // The whole replica moves: its shards too (it restarts with one,
        // and reshards as it is configured).
        self.place(replica, delivered, 1, Backfills::Clear)
    }

    /// Forgets a replica.
    ///
    /// # Errors
    /// Store errors.
    pub fn remove(&self, replica: &str) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        self.clear(&mut batch, replica, &[])?;
        self.apply(batch)
    }

    /// Applies `batch` atomically, flushes it and syncs it; after a failed
    /// sync or flush, writes the whole store again first.
    ///
    /// The batch is applied under the database lock and flushed outside
    /// it, so that the shippers' changes made while a flush runs share the
    /// next one: a sled flush hands its write to sled's thread pool and
    /// waits for it, which cost more CPU than anything else the store did
    /// (issue 19's profile), and the syncs were already shared.
    fn apply(&self, batch: sled::Batch) -> Result<(), CheckpointError> {
        let generation = self.with_store(|db, store| {
            if store.rewrite {
                rewrite_all(db)?;
                tracing::info!(path = %self.path, "checkpoint store written again in full after a failed fsync or flush");
                store.rewrite = false;
            }
            db.apply_batch(batch)?;
            store.applied += 1;
            Ok(store.applied)
        })?;
        self.flush_through(generation)?;
        self.sync(generation)
    }

    /// Puts every batch applied up to `generation` into sled's file, with
    /// one flush unless one that began after it was applied already did.
    /// A failed flush loses every batch applied so far (their callers get
    /// an error and retry, and the next write first writes every key
    /// again); for lack of space it also closes the database, reopened at
    /// the next call, as [`Self::with_store`] does.
    fn flush_through(&self, generation: u64) -> Result<(), CheckpointError> {
        let _turn = lock(&self.flushes);
        let (db, target) = {
            let store = lock(&self.store);
            if generation <= store.flush_lost {
                return Err(CheckpointError::NotDurable {
                    path: self.path.clone(),
                    cause: "a flush of the store failed after this change was applied".into(),
                });
            }
            if generation <= store.written {
                return Ok(());
            }
            match &store.db {
                Some(db) => (db.clone(), store.applied),
                // Closed after a failure, which lost this generation too.
                None => {
                    return Err(CheckpointError::NotDurable {
                        path: self.path.clone(),
                        cause: "the store was closed after this change was applied".into(),
                    })
                }
            }
        };
        let result = db.flush();
        let mut store = lock(&self.store);
        match result {
            Ok(_) => {
                store.written = store.written.max(target);
                Ok(())
            }
            Err(e) => {
                store.flush_lost = store.applied;
                store.rewrite = true;
                if matches!(&e, sled::Error::Io(io) if out_of_space(io)) {
                    tracing::warn!(path = %self.path, error = %e,
                        "checkpoint store out of space; it will be reopened at the next attempt");
                    store.db = None;
                    // Closed before the lock is released: the next call's
                    // reopen must not meet this handle's file lock.
                    drop(db);
                }
                Err(self.err(e))
            }
        }
    }

    /// True once an fsync of the store failed.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the write of `generation` durable, with a sync of its own
    /// unless one that began after it already succeeded. Out of space is
    /// retried by the caller (nothing written so far is claimed durable);
    /// any other error stops the store.
    fn sync(&self, generation: u64) -> Result<(), CheckpointError> {
        let mut syncs = lock(&self.syncs);
        self.stopped()?;
        // `lost` first: a later sync does not see the error of the pages
        // an earlier failed one lost.
        if generation <= syncs.lost {
            return Err(CheckpointError::NotDurable {
                path: self.path.clone(),
                cause: syncs.cause.clone(),
            });
        }
        if generation <= syncs.synced {
            return Ok(());
        }
        let start = lock(&self.store).written;
        let e = match self.data_file.sync() {
            Ok(()) => {
                syncs.synced = start;
                return Ok(());
            }
            Err(e) => e,
        };
        {
            // Every write until now may have lost pages to this error,
            // a flush running meanwhile included: every batch applied.
            let mut store = lock(&self.store);
            syncs.lost = store.applied;
            store.rewrite = true;
        }
        syncs.cause = e.to_string();
        if out_of_space(&e) {
            tracing::warn!(path = %self.path, error = %e,
                "checkpoint store fsync failed for lack of space; the store will be written again in full");
            return Err(CheckpointError::NotDurable {
                path: self.path.clone(),
                cause: syncs.cause.clone(),
            });
        }
        self.failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("walrelay_checkpoint_store_failed").set(1.0);
        tracing::error!(path = %self.path, error = %e, "checkpoint store fsync failed; it has stopped");
        Err(CheckpointError::SyncFailed {
            path: self.path.clone(),
            cause: syncs.cause.clone(),
        })
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
    use std::collections::{BTreeSet, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// One scripted sync: held until released if `hold`, then failing with
    /// `errno` or succeeding.
    struct Step {
        hold: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
        errno: Option<i32>,
    }

    /// A sync target that follows a script of steps, then succeeds; counts
    /// its syncs.
    #[derive(Clone, Default)]
    struct Script(Arc<ScriptInner>);

    #[derive(Default)]
    struct ScriptInner {
        steps: Mutex<VecDeque<Step>>,
        calls: AtomicUsize,
    }

    /// A sync held in the middle: it has started once `wait_started`
    /// returns and returns once released.
    struct Held {
        started: mpsc::Receiver<()>,
        release: mpsc::Sender<()>,
    }

    impl Held {
        fn wait_started(&self) {
            self.started.recv().unwrap();
        }

        fn release(&self) {
            self.release.send(()).unwrap();
        }
    }

    impl Script {
        fn fail(&self, errno: i32) {
            self.push(Step {
                hold: None,
                errno: Some(errno),
            });
        }

        /// The next unscripted sync is held, then fails with `errno` (or
        /// succeeds).
        fn hold(&self, errno: Option<i32>) -> Held {
            let (started_tx, started) = mpsc::channel();
            let (release, release_rx) = mpsc::channel();
            self.push(Step {
                hold: Some((started_tx, release_rx)),
                errno,
            });
            Held { started, release }
        }

        fn push(&self, step: Step) {
            self.0.steps.lock().unwrap().push_back(step);
        }

        fn calls(&self) -> usize {
            self.0.calls.load(Ordering::SeqCst)
        }
    }

    impl SyncTarget for Script {
        fn sync(&self) -> std::io::Result<()> {
            self.0.calls.fetch_add(1, Ordering::SeqCst);
            let step = self.0.steps.lock().unwrap().pop_front();
            let Some(step) = step else {
                return Ok(());
            };
            if let Some((started, release)) = step.hold {
                // Either can fail only when the test has already failed
                // and dropped its end: then carry on, do not hang.
                let _ = started.send(());
                let _ = release.recv();
            }
            match step.errno {
                Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }
    }

    fn open_scripted(path: &Path) -> (Checkpoints, Script) {
        let script = Script::default();
        let target = script.clone();
        let cp = Checkpoints::open_with(path, move |_| Ok(Box::new(target))).unwrap();
        (cp, script)
    }

    /// Polls `cond` until it holds; the deadline only keeps a broken test
    /// from hanging.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn watch(cp: &Checkpoints) -> sled::Subscriber {
        cp.with_db(|db| Ok(db.watch_prefix("replica/"))).unwrap()
    }

    /// The keys written (inserted or removed) since the last call: sled
    /// hands the events over before the write returns. Polled, because
    /// `next_timeout` sticks at the event of a skipped (unchanged) write.
    fn keys_written(sub: &mut sled::Subscriber) -> BTreeSet<String> {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        let mut keys = BTreeSet::new();
        while let Poll::Ready(Some(event)) = std::pin::Pin::new(&mut *sub).poll(&mut cx) {
            let (sled::Event::Insert { key, .. } | sled::Event::Remove { key }) = event;
            keys.insert(String::from_utf8_lossy(&key).into_owned());
        }
        keys
    }

    fn set_of(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn after_a_sync_fails_for_lack_of_space_the_next_write_rewrites_the_whole_store_before_its_sync(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let (cp, script) = open_scripted(&path);
        cp.set("a", 10).unwrap();
        cp.begin_send("a", 10..20).unwrap();
        cp.set("b", 5).unwrap();
        cp.split("b", 5..50).unwrap();
        let mut sub = watch(&cp);
        script.fail(libc::ENOSPC);
        assert!(cp.complete("a", 20).is_err());
        keys_written(&mut sub);
        std::thread::scope(|s| {
            // The retry's sync is held so that what was written before it
            // can be looked at. Held inside the scope: a failed assertion
            // drops it and so releases the sync instead of hanging.
            let held = script.hold(None);
            let retry = s.spawn(|| cp.complete("a", 20));
            held.wait_started();
            let written = keys_written(&mut sub);
            let every_key = set_of(&[
                "replica/a/delivered",
                "replica/b/delivered",
                "replica/b/backfill",
            ]);
            assert!(
                written.is_superset(&every_key),
                "before the first sync after the failure only {written:?} was written"
            );
            held.release();
            retry.join().unwrap().unwrap();
        });
        // Recovered: the next change is written alone and reported durable.
        cp.begin_send("a", 20..30).unwrap();
        assert_eq!(keys_written(&mut sub), set_of(&["replica/a/inflight"]));
        drop((sub, cp));
        let cp = Checkpoints::open(&path).unwrap();
        assert_eq!(cp.cursor("a").unwrap().inflight, Some(20..30));
        assert_eq!(cp.cursor("b").unwrap().backfill.unwrap().from, 5);
    }

    /// B writes and its sync is held; A writes meanwhile (that sync may
    /// consume the writeback error of A's pages too); then B's sync fails
    /// with `errno`. B's and A's results.
    fn write_during_a_failing_sync(
        cp: &Checkpoints,
        script: &Script,
        errno: i32,
    ) -> [Result<(), CheckpointError>; 2] {
        std::thread::scope(|s| {
            let held = script.hold(Some(errno));
            let b = s.spawn(|| cp.set("b", 2));
            held.wait_started();
            let a = s.spawn(|| cp.set("a", 2));
            wait_until("A's write is in the store", || {
                cp.cursor("a").unwrap().delivered == Some(2)
            });
            held.release();
            [b.join().unwrap(), a.join().unwrap()]
        })
    }

    #[test]
    fn a_write_made_while_another_callers_sync_fails_is_not_made_durable_by_its_own_later_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, script) = open_scripted(&dir.path().join("cp"));
        cp.set("a", 1).unwrap();
        cp.set("b", 1).unwrap();
        let [b, a] = write_during_a_failing_sync(&cp, &script, libc::ENOSPC);
        assert!(b.is_err());
        assert!(
            a.is_err(),
            "a write made during a failed sync was reported durable"
        );
        // A retries: durable once the whole store is rewritten and synced.
        let mut sub = watch(&cp);
        cp.set("a", 2).unwrap();
        assert!(keys_written(&mut sub).contains("replica/b/delivered"));
        cp.set("b", 2).unwrap();
    }

    #[test]
    fn a_sync_covers_every_write_made_before_it_started_and_none_made_after() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, script) = open_scripted(&dir.path().join("cp"));
        std::thread::scope(|s| {
            let held = script.hold(None);
            let c = s.spawn(|| cp.set("c", 1));
            held.wait_started();
            // A and B write while C's sync runs: it does not cover them.
            let a = s.spawn(|| cp.set("a", 1));
            let b = s.spawn(|| cp.set("b", 1));
            // In sled's file, not only in its memory: a sync covers what
            // was flushed when it began, and B's flush may still run when
            // A's sync begins (then B syncs on its own, one sync more).
            wait_until("A's and B's writes are in the store's file", || {
                let replicas = cp.replicas().unwrap().len();
                let store = lock(&cp.store);
                replicas == 3 && store.written == store.applied
            });
            held.release();
            for t in [c, a, b] {
                t.join().unwrap().unwrap();
            }
        });
        // One sync for C, one for A and B together.
        assert_eq!(script.calls(), 2);
    }

    #[test]
    fn an_io_error_from_a_sync_stops_the_store_for_good_even_for_a_write_that_raced_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, script) = open_scripted(&dir.path().join("cp"));
        for r in write_during_a_failing_sync(&cp, &script, libc::EIO) {
            assert!(
                matches!(r, Err(CheckpointError::SyncFailed { .. })),
                "{r:?}"
            );
        }
        assert!(cp.failed());
        // Syncs succeed again, but the store stays stopped.
        assert!(matches!(
            cp.set("a", 3),
            Err(CheckpointError::SyncFailed { .. })
        ));
        assert!(cp.cursor("a").is_err());
    }

    #[test]
    fn a_store_whose_data_file_cannot_be_opened_for_fsync_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let r = Checkpoints::open_with(&dir.path().join("cp"), |_| {
            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
        });
        let Err(e) = r else {
            panic!("opened although fsync of its data file is impossible");
        };
        assert!(e.to_string().contains("data file"), "{e}");
    }

    #[test]
    fn a_data_file_that_is_a_directory_fails_the_open_naming_the_data_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        std::fs::create_dir_all(path.join("db")).unwrap();
        let e = Checkpoints::open(&path).err().unwrap();
        assert!(e.to_string().contains("data file"), "{e}");
    }

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
                shards: Vec::new(),
            }
        );
        cp.complete_and_begin("a", 25, 25..30).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(25),
                inflight: Some(25..30),
                backfill: None,
                shards: Vec::new(),
            }
        );
        cp.complete("a", 30).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(30),
                inflight: None,
                backfill: None,
                shards: Vec::new(),
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
                shards: Vec::new(),
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
                shards: Vec::new(),
            }
        );
    }

    #[test]
    fn shards_keep_their_own_cursors_and_the_replica_reports_the_lowest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        {
            let cp = Checkpoints::open(&path).unwrap();
            cp.set("a", 10).unwrap();
            cp.begin_send("a", 10..20).unwrap();
            cp.reshard("a", 10, 3, None).unwrap();
            let s1 = Stream::Shard { index: 1, of: 3 };
            let s2 = Stream::Shard { index: 2, of: 3 };
            cp.begin_send_on("a", s1, 10..30).unwrap();
            cp.complete_and_begin_on("a", s2, 25, 25..40).unwrap();
            cp.complete_on("a", Stream::Shard { index: 0, of: 3 }, 50)
                .unwrap();
        }
        let cp = Checkpoints::open(&path).unwrap();
        let c = cp.cursor("a").unwrap();
        assert_eq!(c.shard_count(), 3);
        assert_eq!(c.delivered, Some(10), "the lowest shard's position");
        assert_eq!(c.inflight, None, "the unsharded range went at the reshard");
        assert_eq!(
            c.shards,
            vec![
                ShardCursor {
                    delivered: 50,
                    inflight: None
                },
                ShardCursor {
                    delivered: 10,
                    inflight: Some(10..30)
                },
                ShardCursor {
                    delivered: 25,
                    inflight: Some(25..40)
                },
            ]
        );
        assert_eq!(cp.replicas().unwrap(), vec!["a".to_string()]);
    }

    #[test]
    fn a_reshard_replaces_every_old_shard_at_the_barrier_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        cp.set("a", 0).unwrap();
        cp.reshard("a", 0, 4, None).unwrap();
        cp.begin_send_on("a", Stream::Shard { index: 3, of: 4 }, 5..9)
            .unwrap();
        let mut sub = watch(&cp);
        cp.reshard("a", 70, 2, None).unwrap();
        // The old shards' keys go with the write of the new count.
        let written = keys_written(&mut sub);
        assert!(
            written.contains("replica/a/shard/3/inflight"),
            "{written:?}"
        );
        assert!(written.contains("replica/a/shards"), "{written:?}");
        let c = cp.cursor("a").unwrap();
        assert_eq!(c.shard_count(), 2);
        assert!(c
            .shards
            .iter()
            .all(|s| s.delivered == 70 && s.inflight.is_none()));
        // Back to one shard: the unsharded keys, at the barrier.
        cp.reshard("a", 90, 1, None).unwrap();
        let c = cp.cursor("a").unwrap();
        assert_eq!((c.delivered, c.shard_count()), (Some(90), 1));
        assert!(cp.shard_keys("a").unwrap().is_empty());
    }

    #[test]
    fn a_split_at_a_barrier_starts_the_shards_at_the_head_and_backfills_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        cp.set("a", 0).unwrap();
        cp.reshard("a", 0, 3, None).unwrap();
        cp.reshard("a", 40, 3, Some(40..900)).unwrap();
        let c = cp.cursor("a").unwrap();
        assert_eq!(c.delivered, Some(900));
        assert!(c.shards.iter().all(|s| s.delivered == 900));
        assert_eq!(
            c.backfill,
            Some(Backfill {
                from: 40,
                to: 900,
                inflight: None
            })
        );
        // A later reshard keeps the backfill running.
        cp.reshard("a", 950, 2, None).unwrap();
        assert!(cp.cursor("a").unwrap().backfill.is_some());
    }

    #[test]
    fn moving_or_removing_a_sharded_replica_moves_or_removes_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        cp.set("a", 0).unwrap();
        cp.reshard("a", 0, 5, None).unwrap();
        cp.complete_on("a", Stream::Shard { index: 2, of: 5 }, 30)
            .unwrap();
        cp.set("a", 12).unwrap();
        let c = cp.cursor("a").unwrap();
        assert_eq!((c.delivered, c.shard_count()), (Some(12), 1));
        assert!(cp.shard_keys("a").unwrap().is_empty());
        cp.reshard("a", 12, 5, None).unwrap();
        cp.remove("a").unwrap();
        assert_eq!(cp.cursor("a").unwrap(), Cursor::default());
        assert!(cp.shard_keys("a").unwrap().is_empty());
        assert!(cp.replicas().unwrap().is_empty());
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

    #[test]
    fn a_sharded_replica_is_one_replica_whose_highest_position_is_its_highest_shards() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoints::open(&dir.path().join("cp")).unwrap();
        cp.set("a", 10).unwrap();
        cp.reshard("a", 10, 3, None).unwrap();
        cp.complete_on("a", Stream::Shard { index: 1, of: 3 }, 50)
            .unwrap();
        cp.begin_send_on("a", Stream::Shard { index: 2, of: 3 }, 40..70)
            .unwrap();
        assert_eq!(cp.replicas().unwrap(), vec!["a".to_string()]);
        let c = cp.cursor("a").unwrap();
        assert_eq!(c.delivered, Some(10), "the lowest shard's position");
        assert_eq!(c.highest(), 70, "shard 2's request in flight");
    }

    /// A store holding positions of replicas `r0`..`r4`, closed.
    fn store_with_positions(p: &Path) {
        let cp = Checkpoints::open(p).unwrap();
        for i in 0..50u64 {
            cp.set(&format!("r{}", i % 5), i).unwrap();
        }
    }

    #[test]
    fn a_torn_settings_file_is_written_again_whole_and_every_position_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cp");
        store_with_positions(&p);
        let conf = p.join("conf");
        let whole = std::fs::read(&conf).unwrap();
        // Killed between sled's two writes: the settings without their CRC.
        std::fs::write(&conf, &whole[..whole.len() - 4]).unwrap();
        match sled::Config::new().path(&p).open() {
            Err(sled::Error::Corruption { .. }) => {}
            other => panic!("sled should refuse a torn settings file: {other:?}"),
        }
        let cp = Checkpoints::open(&p).unwrap();
        assert_eq!(cp.cursor("r1").unwrap().delivered, Some(46));
        assert_eq!(cp.cursor("r4").unwrap().delivered, Some(49));
        drop(cp);
        assert_eq!(std::fs::read(&conf).unwrap(), whole);
        // Empty (power lost before writeback), then absent: the same.
        for torn in [Some(&[][..]), None] {
            match torn {
                Some(b) => std::fs::write(&conf, b).unwrap(),
                None => std::fs::remove_file(&conf).unwrap(),
            }
            let cp = Checkpoints::open(&p).unwrap();
            assert_eq!(cp.cursor("r1").unwrap().delivered, Some(46));
            drop(cp);
            assert_eq!(std::fs::read(&conf).unwrap(), whole);
        }
        let names: BTreeSet<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, BTreeSet::from(["cp".to_string()]), "no scratch left");
        assert!(!p.join("conf.tmp").exists());
    }

    #[test]
    fn a_store_sled_reports_damaged_is_moved_aside_and_an_empty_one_opened() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoints");
        store_with_positions(&p);
        // A snapshot that does not check out: sled refuses the store.
        std::fs::write(p.join("snap.000000000000FFFF"), [0xA5u8; 40]).unwrap();
        assert!(matches!(
            Checkpoints::open(&p),
            Err(CheckpointError::Store {
                source: sled::Error::Corruption { .. },
                ..
            })
        ));
        let (cp, aside) = Checkpoints::open_or_set_aside(&p).unwrap();
        let aside = aside.expect("set aside");
        assert!(aside.cause.contains("corrupt"), "{}", aside.cause);
        let name = aside.to.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("checkpoints.damaged-"), "{name}");
        assert!(
            aside.to.join("snap.000000000000FFFF").exists(),
            "kept whole"
        );
        assert!(cp.replicas().unwrap().is_empty(), "a new, empty store");
        cp.set("a", 7).unwrap();
        drop(cp);
        // A second damage the same second does not overwrite the first.
        std::fs::write(p.join("snap.000000000000FFFF"), [0xA5u8; 40]).unwrap();
        // sled's own threads may hold the dropped store's file lock a
        // moment longer: wait for it to be released, not for a time.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (_cp, again) = loop {
            match Checkpoints::open_or_set_aside(&p) {
                Err(CheckpointError::Store {
                    source: sled::Error::Io(e),
                    ..
                }) if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.unwrap(),
            }
        };
        let again = again.expect("set aside again");
        assert_ne!(again.to, aside.to);
        assert!(aside.to.exists() && again.to.exists());
        // An intact store is opened as it is.
        drop(_cp);
        let (cp, none) = Checkpoints::open_or_set_aside(&p).unwrap();
        assert!(none.is_none());
        assert!(cp.replicas().unwrap().is_empty());
    }

    #[test]
    fn concurrent_writers_sharing_flushes_each_find_their_last_change_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cp");
        let cp = Checkpoints::open(&p).unwrap();
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let cp = cp.clone();
                std::thread::spawn(move || {
                    let name = format!("r{t}");
                    cp.set(&name, 0).unwrap();
                    for i in 0..100u64 {
                        cp.complete_and_begin(&name, i * 10, i * 10..i * 10 + 10)
                            .unwrap();
                    }
                    cp.complete(&name, 1000 + t).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        {
            let store = lock(&cp.store);
            assert_eq!(store.applied, 8 * 102);
            assert_eq!(store.written, store.applied, "every change flushed");
            assert_eq!(store.flush_lost, 0);
        }
        drop(cp);
        let cp = Checkpoints::open(&p).unwrap();
        for t in 0..8u64 {
            let c = cp.cursor(&format!("r{t}")).unwrap();
            assert_eq!(c.delivered, Some(1000 + t));
            assert_eq!(c.inflight, None);
        }
    }
}
