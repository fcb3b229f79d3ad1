//! The segmented write-ahead log on disk: one writer, many readers.
//!
//! The byte format lives in the `wal-format` crate (and its `SPEC.md`); this
//! module does the I/O around it:
//!
//! - [`open`] runs recovery ([`recovery`]): it lists the segments, checks their
//!   headers, scans the last one, cuts off a torn tail and reports damage, and
//!   returns a [`WalWriter`] positioned after the last intact record plus a
//!   [`Wal`] handle that readers and retention share.
//! - [`WalWriter`] appends batches as frames and makes them durable with
//!   [`WalWriter::sync`] (fdatasync; new segments and their directory entries
//!   are fsync'd when created). A failed fsync poisons the writer for good.
//! - [`WalReader`] reads from any sequence number up to the *durable* end and
//!   can wait for more, so many shippers trail one writer.
//! - [`Wal::delete_before`] removes whole segments from the old end.

pub mod env;
pub mod reader;
pub mod recovery;
pub mod segment;
#[cfg(test)]
pub mod sim;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use wal_format::Compression;

pub use env::{RealStorage, Storage};
pub use reader::{Gap, ReadItem, WalReader};
pub use recovery::{open, open_read_only, RecoveryReport};
pub use writer::WalWriter;

/// Errors of the log's I/O layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// An I/O operation failed. Recoverable by retrying later, unless it
    /// comes back as one of the more specific variants below.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The disk (or the quota) is full. Nothing of the failed append stays
    /// in the log; recoverable once space is freed.
    #[error("no space left writing {}: {source}", path.display())]
    NoSpace { path: PathBuf, source: io::Error },
    /// fsync (fdatasync) failed. Fatal for the writer: the kernel may have
    /// dropped the dirty pages, so retrying and succeeding would be a lie.
    /// Every later append is refused with [`WalError::WriterFailed`].
    #[error("fsync of {} failed: {source}; the log writer has stopped", path.display())]
    SyncFailed { path: PathBuf, source: io::Error },
    /// The writer refused an append because an earlier fatal error stopped it.
    /// Not recoverable without a restart (which re-reads what is on disk).
    #[error("the log writer has stopped after an earlier error: {cause}")]
    WriterFailed { cause: String },
    /// A segment's header is unreadable. The segment is skipped as damage.
    #[error("bad segment header in {}: {reason}", path.display())]
    BadSegmentHeader { path: PathBuf, reason: String },
    /// A batch could not be encoded (a record over the size limit).
    #[error("cannot encode records: {0}")]
    Encode(#[from] wal_format::EncodeError),
    /// The data directory holds something the log cannot work with.
    #[error("{}: {reason}", path.display())]
    BadDirectory { path: PathBuf, reason: String },
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        WalError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Classifies a write error: out of space is its own, retryable, case.
    pub(crate) fn write(path: &Path, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => WalError::NoSpace {
                path: path.to_path_buf(),
                source,
            },
            _ => WalError::io("write", path, source),
        }
    }

    /// A stable label for metrics.
    pub fn as_error_code(&self) -> &'static str {
        match self {
            WalError::Io { .. } => "io",
            WalError::NoSpace { .. } => "no_space",
            WalError::SyncFailed { .. } => "sync_failed",
            WalError::WriterFailed { .. } => "writer_failed",
            WalError::BadSegmentHeader { .. } => "bad_segment_header",
            WalError::Encode(_) => "encode",
            WalError::BadDirectory { .. } => "bad_directory",
        }
    }

    /// True when the writer can take appends again later (disk space freed,
    /// transient I/O error); false when it has stopped for good.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            WalError::SyncFailed { .. } | WalError::WriterFailed { .. }
        )
    }
}

/// Tunables of the log.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A segment is sealed and a new one started once it holds this many
    /// bytes (a single batch may overshoot).
    pub segment_bytes: u64,
    /// Compression of frame bodies.
    pub compression: Compression,
    /// zstd level when compressing.
    pub zstd_level: i32,
    /// A batch is split into frames of at most about this many raw bytes, so
    /// one damaged frame costs a bounded number of records.
    pub max_frame_bytes: usize,
    /// Sequence number of the first record of a brand-new log.
    pub initial_seq: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 128 << 20,
            compression: Compression::Zstd,
            zstd_level: 1,
            max_frame_bytes: 4 << 20,
            initial_seq: 0,
        }
    }
}

/// What the log knows of one segment.
#[derive(Debug, Clone)]
pub struct SegmentMeta {
    pub first_seq: u64,
    pub path: PathBuf,
    /// Bytes that are durable (for the active segment) or all bytes (sealed).
    pub len: u64,
    /// False only for the segment the writer appends to.
    pub sealed: bool,
    /// The header could not be read: the segment is skipped as damage.
    pub unreadable: Option<String>,
}

/// Where the durable log ends: records `..end_seq` are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    pub end_seq: u64,
}

/// What a segment deleted under a limit held: the samples of each record,
/// so that every reader that finds the records gone can account exactly the
/// samples it lost.
#[derive(Debug, Clone)]
struct Tombstone {
    samples: Vec<u32>,
    reason: &'static str,
}

/// State shared by the writer, readers and retention.
struct Shared {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    segments: RwLock<BTreeMap<u64, SegmentMeta>>,
    durable: watch::Sender<Durable>,
    tombstones: std::sync::Mutex<BTreeMap<u64, Tombstone>>,
    /// Damaged places already reported (file, offset): each is counted once
    /// however many readers cross it.
    damage_seen: std::sync::Mutex<std::collections::HashSet<(PathBuf, u64)>>,
    /// The newest durable records, as the writer appended them (see
    /// [`TailCache`]).
    tail: std::sync::Mutex<TailCache>,
}

/// How many payload bytes of the newest records stay in memory for readers.
pub const TAIL_CACHE_BYTES: usize = 16 << 20;

/// The newest durable records, kept in memory by the writer so that readers
/// trailing it closely (shippers of replicas that keep up) take them from
/// here instead of reading, checking and decompressing the frames the
/// writer has just written. The payloads are the very buffers ingest
/// appended (reference-counted), so keeping them costs no copy; the cache
/// is bounded by [`TAIL_CACHE_BYTES`] of payload. A reader takes records
/// from here only while their segment is still in the log (a deleted
/// segment is a gap, whatever memory still holds).
#[derive(Default)]
struct TailCache {
    records: std::collections::VecDeque<wal_format::Record>,
    bytes: usize,
}

impl TailCache {
    fn push(&mut self, records: Vec<wal_format::Record>) {
        let (Some(first), Some(back)) = (records.first(), self.records.back()) else {
            self.records.extend(records);
            self.bytes = self.records.iter().map(|r| r.payload.len()).sum();
            self.trim();
            return;
        };
        if first.seq != back.seq + 1 {
            self.records.clear();
            self.bytes = 0;
        }
        for r in records {
            self.bytes += r.payload.len();
            self.records.push_back(r);
        }
        self.trim();
    }

    fn trim(&mut self) {
        while self.bytes > TAIL_CACHE_BYTES && self.records.len() > 1 {
            if let Some(r) = self.records.pop_front() {
                self.bytes -= r.payload.len();
            }
        }
    }

    /// Appends the cached records `from..to` to `out` (only if `from` is
    /// cached); returns the position after the last one appended.
    fn read(
        &self,
        from: u64,
        to: u64,
        out: &mut std::collections::VecDeque<wal_format::Record>,
    ) -> u64 {
        let Some(front) = self.records.front() else {
            return from;
        };
        if from < front.seq {
            return from;
        }
        let start = (from - front.seq) as usize;
        let mut next = from;
        for r in self.records.iter().skip(start) {
            if r.seq != next || r.seq >= to {
                break;
            }
            out.push_back(r.clone());
            next += 1;
        }
        next
    }
}

impl Shared {
    fn segments(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, SegmentMeta>> {
        self.segments.read().unwrap_or_else(|p| p.into_inner())
    }
    fn segments_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, SegmentMeta>> {
        self.segments.write().unwrap_or_else(|p| p.into_inner())
    }
    fn tombstones(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Tombstone>> {
        self.tombstones.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn new(
        dir: &Path,
        storage: Arc<dyn Storage>,
        segments: BTreeMap<u64, SegmentMeta>,
        end_seq: u64,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            storage,
            segments: RwLock::new(segments),
            durable: watch::Sender::new(Durable { end_seq }),
            tombstones: std::sync::Mutex::new(BTreeMap::new()),
            damage_seen: std::sync::Mutex::new(std::collections::HashSet::new()),
            tail: std::sync::Mutex::new(TailCache::default()),
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, TailCache> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a damaged place; true the first time it is seen.
    fn note_damage(&self, file: &Path, offset: u64) -> bool {
        self.damage_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((file.to_path_buf(), offset))
    }
}

/// A cheap, clonable handle on an open log: readers, statistics, retention.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
}

/// A summary of the log's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WalExtent {
    /// Sequence number of the oldest record still on disk.
    pub first_seq: u64,
    /// One past the newest durable record.
    pub end_seq: u64,
    pub segments: usize,
    pub bytes: u64,
}

impl Wal {
    /// The data directory of the log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The storage the log lives on.
    pub fn storage(&self) -> Arc<dyn Storage> {
        Arc::clone(&self.shared.storage)
    }

    /// One past the newest durable record.
    pub fn durable_end(&self) -> u64 {
        self.shared.durable.borrow().end_seq
    }

    /// A receiver that changes whenever more records become durable.
    pub fn subscribe(&self) -> watch::Receiver<Durable> {
        self.shared.durable.subscribe()
    }

    /// The oldest retained sequence number, the durable end, and the size.
    pub fn extent(&self) -> WalExtent {
        let segs = self.shared.segments();
        WalExtent {
            first_seq: segs.keys().next().copied().unwrap_or(0),
            end_seq: self.durable_end(),
            segments: segs.len(),
            bytes: segs.values().map(|s| s.len).sum(),
        }
    }

    /// A snapshot of the segment list, oldest first.
    pub fn segments(&self) -> Vec<SegmentMeta> {
        self.shared.segments().values().cloned().collect()
    }

    /// Opens a reader positioned at `seq` (clamped to the oldest retained
    /// record; a position past the durable end waits for it).
    pub fn reader(&self, seq: u64) -> WalReader {
        WalReader::new(Arc::clone(&self.shared), seq)
    }

    /// Deletes every sealed segment all of whose records are below `seq`.
    /// The active segment is never deleted. Returns the deleted segments.
    /// Readers positioned further along are unaffected; a reader still inside
    /// a deleted segment reports the records it can no longer read as a gap.
    ///
    /// # Errors
    /// I/O errors removing files or syncing the directory.
    pub fn delete_before(&self, seq: u64) -> Result<Vec<SegmentMeta>, WalError> {
        let victims: Vec<SegmentMeta> = {
            let segs = self.shared.segments();
            let firsts: Vec<u64> = segs.keys().copied().collect();
            firsts
                .windows(2)
                .filter(|w| w[1] <= seq)
                .filter_map(|w| segs.get(&w[0]).cloned())
                .filter(|s| s.sealed)
                .collect()
        };
        self.remove_segments(&victims)?;
        Ok(victims)
    }

    /// Records that records `first..first + samples.len()` (with these
    /// sample counts) are being deleted under a limit, before deleting them.
    pub fn add_tombstone(&self, first: u64, samples: Vec<u32>, reason: &'static str) {
        self.shared
            .tombstones()
            .insert(first, Tombstone { samples, reason });
    }

    /// The samples of records `from..to` that were deleted under a limit,
    /// and the limit's reason (None when no tombstone covers the range).
    pub fn dropped_in(&self, from: u64, to: u64) -> (u64, Option<&'static str>) {
        let t = self.shared.tombstones();
        let mut samples = 0u64;
        let mut reason = None;
        for (&first, stone) in t.range(..to) {
            let end = first + stone.samples.len() as u64;
            if end <= from {
                continue;
            }
            let lo = from.max(first) - first;
            let hi = to.min(end) - first;
            samples += stone.samples[lo as usize..hi as usize]
                .iter()
                .map(|&n| u64::from(n))
                .sum::<u64>();
            reason = Some(stone.reason);
        }
        (samples, reason)
    }

    /// Forgets tombstones no reader can still need.
    pub fn prune_tombstones(&self, below: u64) {
        self.shared
            .tombstones()
            .retain(|&first, stone| first + stone.samples.len() as u64 > below);
    }

    /// Deletes the oldest sealed segment, whatever readers still need it
    /// (the disk budget's `drop-oldest` policy). Returns it, or None when
    /// only the active segment is left.
    ///
    /// # Errors
    /// I/O errors removing the file or syncing the directory.
    pub fn delete_oldest(&self) -> Result<Option<(SegmentMeta, u64)>, WalError> {
        let victim = {
            let segs = self.shared.segments();
            let mut it = segs.values();
            match (it.next(), it.next()) {
                (Some(first), Some(second)) if first.sealed => {
                    Some((first.clone(), second.first_seq))
                }
                _ => None,
            }
        };
        if let Some((seg, _)) = &victim {
            self.remove_segments(std::slice::from_ref(seg))?;
        }
        Ok(victim)
    }

    fn remove_segments(&self, victims: &[SegmentMeta]) -> Result<(), WalError> {
        if victims.is_empty() {
            return Ok(());
        }
        for seg in victims {
            // Out of the list first, so no new reader opens it.
            self.shared.segments_mut().remove(&seg.first_seq);
            match self.shared.storage.remove(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(WalError::io("remove segment", &seg.path, e)),
            }
        }
        self.shared
            .storage
            .sync_dir(&self.shared.dir)
            .map_err(|e| WalError::io("sync directory", &self.shared.dir, e))
    }
}
