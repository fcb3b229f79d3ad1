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
//! - [`Wal::delete_before`] removes whole segments from the old end (those
//!   every replica has), [`Wal::drop_segment`] one exact segment under a
//!   limit, after making its [`tombstone`] durable. Deletions are serialised
//!   by one lock, so what a deletion accounted is what it deleted.
//! - When a dropping limit is configured ([`Wal::track_samples`]), the log
//!   keeps the sample count of each record of each segment in memory (4
//!   bytes a record): the writer notes them as it appends, and
//!   [`Wal::count_samples`] reads them from a segment written before a
//!   restart. A drop then never has to decode the segment it deletes.
//! - [`Wal::repack`] rewrites a sealed segment as the same records in fewer,
//!   larger frames at a higher zstd level ([`repack`]), for the replicas
//!   that are behind: the log of an outage takes a fraction of the disk.

pub mod chain_level;
pub mod env;
pub mod message;
pub mod reader;
pub mod recovery;
pub mod repack;
pub mod segment;
#[cfg(test)]
pub mod sim;
#[cfg(test)]
mod tests;
pub mod tombstone;
mod writer;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::watch;
use wal_format::Compression;

pub use env::{RealStorage, Storage};
pub use reader::{Gap, ReadItem, WalReader};
pub use recovery::{open, open_read_only, RecoveryReport};
pub use tombstone::{DropReason, Tombstone};
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
    /// A segment's header is unreadable. Reported as damage at offset 0;
    /// the segment is not skipped: its intact frames are still read, since
    /// they carry their own checksums salted with the sequence number the
    /// file name gives (SPEC crash point 7).
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
    /// zstd level when compressing: under load, and always for frames
    /// that are not chained.
    pub zstd_level: i32,
    /// The highest level a chain is compressed at while the load leaves
    /// room for it ([`chain_level`]); at or below `zstd_level`, one level.
    pub zstd_max_level: i32,
    /// A batch is split into frames of at most about this many raw bytes, so
    /// one damaged frame costs a bounded number of records.
    pub max_frame_bytes: usize,
    /// Sequence number of the first record of a brand-new log.
    pub initial_seq: u64,
    /// A segment holding records is sealed at the first append after it
    /// has been the active one this long (None: only by size). A sender
    /// at a low rate would otherwise keep one segment active for hours,
    /// and only a sealed segment can be repacked ([`repack`]).
    pub segment_max_age: Option<std::time::Duration>,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 128 << 20,
            compression: Compression::Zstd,
            zstd_level: 1,
            zstd_max_level: 6,
            max_frame_bytes: 4 << 20,
            initial_seq: 0,
            segment_max_age: None,
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
    /// Why the header could not be read, if it could not. Reported once as
    /// damage at offset 0; readers still read the segment's intact frames
    /// (salted with `first_seq` from the file name). Only
    /// [`Wal::count_samples`] counts such a segment as holding nothing.
    pub unreadable: Option<String>,
    /// How many times the file was replaced by a denser copy of itself
    /// since the log was opened ([`repack`]): a reader reading the
    /// segment through an older file opens it again.
    pub generation: u32,
}

/// Where the durable log ends: records `..end_seq` are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    pub end_seq: u64,
}

/// The samples of each record of one segment, from record `from` on. Only
/// `from` equal to the segment's first record means all of them are known
/// (a segment the writer continued after a restart knows only the records
/// it appended).
#[derive(Debug, Clone)]
struct SegmentSamples {
    from: u64,
    counts: Vec<u32>,
}

/// What [`Wal::drop_segment`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Dropped {
    /// The segment holding records `segment.first_seq..end` is deleted, and
    /// its tombstone (`samples` in all) was durable before.
    Deleted {
        segment: SegmentMeta,
        end: u64,
        samples: u64,
    },
    /// No such segment any more (another deletion took it first): nothing
    /// was done.
    Gone,
    /// It is the segment being written: nothing was done.
    Active,
    /// The samples of its records are not known yet ([`Wal::count_samples`]
    /// must read them first): nothing was done.
    NotCounted,
}

/// State shared by the writer, readers and retention.
struct Shared {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    segments: RwLock<BTreeMap<u64, SegmentMeta>>,
    durable: watch::Sender<Durable>,
    /// Held by every deletion of segments, from choosing what to delete to
    /// the directory sync: what one deletion accounted is what it deleted.
    deleting: Mutex<()>,
    /// Tombstones by first record, for the readers.
    tombstones: Mutex<BTreeMap<u64, Tombstone>>,
    /// Their file; locked before `tombstones` when both are.
    tombstone_file: Mutex<tombstone::TombstoneFile>,
    /// Whether the writer notes the samples of each record it appends.
    track_samples: AtomicBool,
    /// Samples of each record, by segment; locked after `segments`.
    samples: Mutex<BTreeMap<u64, SegmentSamples>>,
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
/// writer has just written. The payloads are the buffers the writer was
/// given to stage (reference-counted, see
/// [`WalWriter::stage_for_readers`]): the record as ingest appended it,
/// for a 1.0 request the snappy body its sender sent (encoding `Snappy`),
/// which a shipper puts into its request without compressing it again. The cache is bounded by [`TAIL_CACHE_BYTES`] of
/// payload as held. A reader takes records
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
    fn tombstones(&self) -> MutexGuard<'_, BTreeMap<u64, Tombstone>> {
        self.tombstones.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn tombstone_file(&self) -> MutexGuard<'_, tombstone::TombstoneFile> {
        self.tombstone_file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
    fn deleting(&self) -> MutexGuard<'_, ()> {
        self.deleting.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn samples(&self) -> MutexGuard<'_, BTreeMap<u64, SegmentSamples>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the samples of records `first..` just appended to `segment`
    /// (when tracking them).
    fn note_samples(&self, segment: u64, first: u64, samples: impl Iterator<Item = u32>) {
        if !self.track_samples.load(Ordering::Relaxed) {
            return;
        }
        let mut all = self.samples();
        let s = all.entry(segment).or_insert_with(|| SegmentSamples {
            from: first,
            counts: Vec::new(),
        });
        if s.from + s.counts.len() as u64 != first {
            // Not a continuation (cannot happen: a segment's records are
            // contiguous); what is known is what follows.
            *s = SegmentSamples {
                from: first,
                counts: Vec::new(),
            };
        }
        s.counts.extend(samples);
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
            deleting: Mutex::new(()),
            tombstones: Mutex::new(BTreeMap::new()),
            tombstone_file: Mutex::new(tombstone::TombstoneFile::new(dir)),
            track_samples: AtomicBool::new(false),
            samples: Mutex::new(BTreeMap::new()),
            damage_seen: std::sync::Mutex::new(std::collections::HashSet::new()),
            tail: std::sync::Mutex::new(TailCache::default()),
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, TailCache> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a cursor at the start of the segment `first_seq`, and returns
    /// it with what the log knows of the segment, both as of one moment:
    /// the segment list is held while the file is opened, so a repack
    /// (which replaces the file and its length under the write lock) never
    /// pairs a new file with an old length. None when no such segment.
    ///
    /// # Errors
    /// I/O errors opening the file.
    fn open_segment(
        &self,
        first_seq: u64,
    ) -> Result<Option<(SegmentMeta, segment::SegmentCursor)>, WalError> {
        let segs = self.segments();
        let Some(meta) = segs.get(&first_seq).cloned() else {
            return Ok(None);
        };
        let cursor =
            segment::SegmentCursor::open(self.storage.as_ref(), &meta.path, first_seq, meta.len)?;
        drop(segs);
        Ok(Some((meta, cursor)))
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
        let _deleting = self.shared.deleting();
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

    /// Deletes exactly the segment whose first record is `first_seq`,
    /// whatever readers still need it (a limit: the disk budget's
    /// `drop-oldest`, or the retention age), after making its tombstone
    /// durable: the samples of each of its records and `reason`, so that
    /// every reader that finds them gone accounts exactly what it lost.
    /// Does nothing unless the segment is still there, sealed, and its
    /// samples are known (see [`Dropped`]); never reads the segment.
    ///
    /// # Errors
    /// I/O errors writing the tombstone (nothing is deleted then), removing
    /// the file or syncing the directory.
    pub fn drop_segment(&self, first_seq: u64, reason: DropReason) -> Result<Dropped, WalError> {
        let _deleting = self.shared.deleting();
        let (segment, end) = {
            let segs = self.shared.segments();
            let Some(segment) = segs.get(&first_seq) else {
                return Ok(Dropped::Gone);
            };
            match segs.range(first_seq + 1..).next() {
                Some((&end, _)) if segment.sealed => (segment.clone(), end),
                _ => return Ok(Dropped::Active),
            }
        };
        let samples = match self.shared.samples().get(&first_seq) {
            Some(s) if s.from == first_seq => {
                let n = (end - first_seq) as usize;
                s.counts[..s.counts.len().min(n)].to_vec()
            }
            _ => return Ok(Dropped::NotCounted),
        };
        let stone = Tombstone {
            end,
            samples,
            reason,
        };
        {
            let mut file = self.shared.tombstone_file();
            file.add(self.shared.storage.as_ref(), first_seq, &stone, || {
                let mut all = self.shared.tombstones().clone();
                all.insert(first_seq, stone.clone());
                all
            })?;
            let samples = stone.total_samples();
            self.shared.tombstones().insert(first_seq, stone);
            self.remove_segments(std::slice::from_ref(&segment))?;
            Ok(Dropped::Deleted {
                segment,
                end,
                samples,
            })
        }
    }

    /// Makes the writer note the samples of every record it appends from
    /// now on (call before the first append), so that [`Self::drop_segment`]
    /// knows them. Costs 4 bytes of memory a record kept in the log.
    pub fn track_samples(&self) {
        self.shared.track_samples.store(true, Ordering::Relaxed);
    }

    /// Whether [`Self::track_samples`] was called.
    pub fn tracks_samples(&self) -> bool {
        self.shared.track_samples.load(Ordering::Relaxed)
    }

    /// Sealed segments whose samples are not all known, oldest first.
    pub fn uncounted_segments(&self) -> Vec<SegmentMeta> {
        let segs = self.shared.segments();
        let samples = self.shared.samples();
        segs.values()
            .filter(|s| s.sealed)
            .filter(|s| {
                samples
                    .get(&s.first_seq)
                    .is_none_or(|c| c.from != s.first_seq)
            })
            .cloned()
            .collect()
    }

    /// Reads the samples of every record of the sealed segment `seg`
    /// (one written before a restart) and keeps them for
    /// [`Self::drop_segment`]. Records that cannot be read (damage, an
    /// unreadable header, an I/O error part-way) count as holding none, and
    /// that is logged: a segment that can never be read must still be
    /// droppable. Returns false when the segment is no longer in the log or
    /// is the active one.
    ///
    /// # Errors
    /// None so far; reserved for I/O errors that should stop the caller.
    pub fn count_samples(&self, seg: &SegmentMeta) -> Result<bool, WalError> {
        if !seg.sealed {
            return Ok(false);
        }
        let first = seg.first_seq;
        let mut counts: Vec<u32> = Vec::new();
        let mut unread = seg.unreadable.clone();
        if unread.is_none() {
            let storage = self.shared.storage.as_ref();
            // Not through `Shared::open_segment`: a segment whose samples
            // are being counted is not repacked (see `crate::repacker`).
            match segment::SegmentCursor::open(storage, &seg.path, first, seg.len) {
                Err(WalError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Ok(false);
                }
                Err(e) => unread = Some(e.to_string()),
                Ok(mut c) => loop {
                    match c.read_next() {
                        Ok(segment::Scan::Frame { records, .. }) => {
                            for r in records {
                                let i = r.seq.saturating_sub(first) as usize;
                                if counts.len() <= i {
                                    counts.resize(i + 1, 0);
                                }
                                counts[i] = r.meta.samples;
                            }
                        }
                        Ok(segment::Scan::Damage { .. }) => {}
                        Ok(segment::Scan::End) => break,
                        Err(e) => {
                            unread = Some(e.to_string());
                            break;
                        }
                    }
                },
            }
        }
        if let Some(why) = unread {
            tracing::error!(segment = %seg.path.display(), error = %why,
                "cannot read all samples of a segment: if a limit deletes it, the records \
                 not read are accounted with no samples");
        }
        let segs = self.shared.segments();
        if !segs.get(&first).is_some_and(|s| s.sealed) {
            return Ok(false);
        }
        self.shared.samples().insert(
            first,
            SegmentSamples {
                from: first,
                counts,
            },
        );
        Ok(true)
    }

    /// Loads the tombstones left by earlier runs (see [`tombstone`]): their
    /// count, and why reading stopped early if it did (damage or an append
    /// cut by a crash; the next write rewrites the file without it).
    ///
    /// # Errors
    /// I/O errors reading the file, or a header that is not a tombstone
    /// file's: no tombstone is loaded then, and the next write replaces the
    /// file.
    pub fn load_tombstones(&self) -> Result<(usize, Option<String>), WalError> {
        let mut file = self.shared.tombstone_file();
        let Some(decoded) = file.load(self.shared.storage.as_ref())? else {
            return Ok((0, None));
        };
        let n = decoded.stones.len();
        self.shared.tombstones().extend(decoded.stones);
        Ok((n, decoded.stopped))
    }

    /// The samples of records `from..to` that were deleted under a limit,
    /// and the limit's reason (None when no tombstone covers the range).
    pub fn dropped_in(&self, from: u64, to: u64) -> (u64, Option<&'static str>) {
        let t = self.shared.tombstones();
        let mut samples = 0u64;
        let mut reason = None;
        for (&first, stone) in t.range(..to) {
            if stone.end <= from {
                continue;
            }
            samples += stone.samples_in(first, from, to);
            reason = Some(stone.reason.as_str());
        }
        (samples, reason)
    }

    /// The tombstones kept, by first record.
    pub fn tombstones(&self) -> BTreeMap<u64, Tombstone> {
        self.shared.tombstones().clone()
    }

    /// Forgets the tombstones of records below `below` (that no reader can
    /// still need), on disk too.
    ///
    /// # Errors
    /// I/O errors rewriting the file (the pruned tombstones are then still
    /// on disk, which is harmless).
    pub fn prune_tombstones(&self, below: u64) -> Result<(), WalError> {
        let mut file = self.shared.tombstone_file();
        let kept = {
            let mut t = self.shared.tombstones();
            let before = t.len();
            t.retain(|_, stone| stone.end > below);
            if t.len() == before {
                return Ok(());
            }
            t.clone()
        };
        file.rewrite(self.shared.storage.as_ref(), &kept)
    }

    /// Removes `victims` (with the deletion lock held).
    fn remove_segments(&self, victims: &[SegmentMeta]) -> Result<(), WalError> {
        if victims.is_empty() {
            return Ok(());
        }
        for seg in victims {
            // Out of the list first, so no new reader opens it.
            self.shared.segments_mut().remove(&seg.first_seq);
            self.shared.samples().remove(&seg.first_seq);
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

/// Statements of `wal-format/SPEC.md` about what the relay writes, checked
/// on a log written by the relay's own writer.
#[cfg(test)]
mod spec_statements {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;
    use std::sync::Arc;

    use wal_format::{
        decode_frame_header, segment_file_name, Compression, PayloadEncoding, PayloadKind,
        RecordMeta, RecordRef, SEGMENT_HEADER_LEN,
    };

    use super::sim::SimStorage;
    use super::*;

    #[test]
    fn the_default_log_compresses_its_frames_as_zstd_chains_as_the_spec_says() {
        let options = WalOptions::default();
        assert_eq!(options.compression, Compression::Zstd);
        assert_eq!(options.zstd_level, 1);
        let storage = Arc::new(SimStorage::new());
        let dir = PathBuf::from("/sim/spec");
        let (mut writer, _wal, _) = open(storage.clone(), &dir, options).unwrap();
        // Decoded protobuf repeats its label names and values: it compresses.
        let payload = b"\n\x1d\n\x08__name__\x12\x02up\x12\x0d\x09\0\0\0\0\0\0\xf0?".repeat(64);
        let meta = RecordMeta {
            receive_time_ms: 1,
            min_sample_ts: 0,
            max_sample_ts: 0,
            samples: 64,
            kind: PayloadKind::RemoteWriteV1,
            encoding: PayloadEncoding::Identity,
        };
        for _ in 0..2 {
            writer
                .append(&[RecordRef {
                    meta: meta.clone(),
                    payload: &payload,
                }])
                .unwrap();
            writer.sync().unwrap();
        }

        let path = dir.join(segment_file_name(0));
        let file = storage.open_read(&path).unwrap();
        let mut bytes = vec![0; file.len().unwrap() as usize];
        assert_eq!(file.read_at(&mut bytes, 0).unwrap(), bytes.len());
        let segment = wal_format::SegmentHeader::decode(&bytes).unwrap();
        assert_eq!(segment.version, wal_format::FORMAT_VERSION);
        assert_eq!(segment.version, 2);
        let first = decode_frame_header(0, &bytes[SEGMENT_HEADER_LEN..]).unwrap();
        assert_eq!(first.compression, Compression::ZstdChainStart);
        assert!(first.body_len < first.raw_len);
        let second =
            decode_frame_header(0, &bytes[SEGMENT_HEADER_LEN + first.total_len()..]).unwrap();
        assert_eq!(second.compression, Compression::ZstdChained);
        assert!(
            second.body_len * 3 < first.body_len,
            "the second frame finds the first's bytes: {} against {}",
            second.body_len,
            first.body_len
        );
    }
}
