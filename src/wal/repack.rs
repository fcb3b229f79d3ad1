//! Repacking a sealed segment: the same records in fewer, larger frames.
//!
//! The writer frames what one group commit brings, and must: the frame is
//! synced before the senders hear back. Under a light load that is one
//! request per frame, compressed on its own, so the label sets that every
//! request of a sender repeats are stored again in every frame. Once a
//! segment is sealed it never changes, and nothing forces that framing any
//! more: [`Wal::repack`] rewrites it as the same records (sequence numbers,
//! metadata and messages) in frames of up to
//! `max_frame_bytes` raw bytes at a higher zstd level, where one request's
//! labels are found again in the last one's. A record the writer stored as
//! its sender's snappy body (`encoding = 1`, what ingest stores for a 1.0
//! request) is stored decoded in the copy (`encoding = 0`): snappy hides
//! the repeats from zstd, and the copy is written once and read by a
//! replica that is behind, so it is worth the space. The message is the
//! same; only how its bytes are held changes. Measured (2026-12-04, bytes
//! per sample of one sealed segment, as written and repacked): a real
//! Prometheus scraping node exporter and itself every 5 s (a 5-minute
//! segment, 58,986 samples), 15.8 as written, 4.8 at level 3, 4.4 at
//! level 6 (the default), 4.3 at level 9; the benchmark's load (4 senders ×
//! 500 series, whose sample values are hard to compress; a 128 MiB segment),
//! 6.1 as written, 5.1 at level 3, 4.2 at level 6, 3.9 at level 9.
//!
//! The result is an ordinary segment: the format is the writer's (see
//! `wal-format/SPEC.md`, "Writing", rule 7), the frames only larger, and
//! every reader, `wal verify` and `wal dump` included, reads it as any
//! other. A frame stays bounded by `max_frame_bytes`, so damage to one still
//! costs a bounded number of records.
//!
//! ## How a segment is replaced
//!
//! 1. Its records are read in order and written to `<segment>.repack`. Any
//!    damage (a frame failing its checksum, a hole in the sequence numbers,
//!    a header that cannot be read) leaves the segment as it is: a repack
//!    never carries damage over, and never hides it.
//! 2. The new file is synced, then read back in full against the original,
//!    record by record (sequence number, metadata but the encoding, and the
//!    message decoded); any difference leaves the original in place.
//! 3. Under the log's deletion lock (so no deletion chooses, deletes and
//!    syncs around it) and the segment list's write lock (so no reader pairs
//!    the new file with the old length), if the segment is still in the log
//!    with the length read, the new file is renamed over it and the list
//!    gets the new length and a new generation. Then the directory is
//!    synced.
//!
//! A crash before the rename leaves the original untouched and a
//! `.repack` file that the next [`super::open`] removes. After it, the new
//! file is complete and synced (step 2), so whichever of the two names a
//! power loss keeps, it names a whole segment holding the same records.
//!
//! A reader with the old file open keeps reading it (a file renamed over
//! stays whole while it is open), and opens the new file at its next step,
//! seeing the new generation; it then skips frames by their headers to its
//! position. Positions are sequence numbers, never byte offsets, so no
//! cursor or checkpoint changes.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use wal_format::{
    encode_frame, record_entry_len, Compression, PayloadEncoding, Record, RecordRef, SegmentHeader,
};

use super::env::Storage;
use super::message;
use super::segment::{Scan, SegmentCursor};
use super::{Wal, WalError};

/// Appended to a segment's file name for the copy being written.
pub const REPACK_SUFFIX: &str = ".repack";

/// How segments are repacked.
#[derive(Debug, Clone, Copy)]
pub struct RepackOptions {
    /// zstd level of the new frames.
    pub zstd_level: i32,
    /// Most raw bytes in one new frame (the log's own limit).
    pub max_frame_bytes: usize,
}

/// What [`Wal::repack`] did with a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repacked {
    /// Replaced by a copy of `after` bytes (it had `before`).
    Done {
        before: u64,
        after: u64,
        records: u64,
    },
    /// Its frames are already large (a repacked segment, or one written
    /// under heavy load): left as it is.
    AlreadyDense,
    /// The copy would not save enough to be worth a rewrite (at least
    /// [`MIN_SAVING`] of the segment): left as it is.
    NotWorth { before: u64, after: u64 },
    /// Damaged, or its header unreadable: left as it is (readers report the
    /// damage as they find it).
    Damaged { reason: String },
    /// Not in the log any more, or not sealed: nothing done.
    Gone,
    /// The stop flag was raised: the copy was abandoned.
    Stopped,
}

/// A copy must save at least this fraction of its segment (1/8).
pub const MIN_SAVING: f64 = 0.125;

/// Why a segment's records could not be read in full.
enum Unread {
    Damage(String),
    Stopped,
    Io(WalError),
}

impl From<WalError> for Unread {
    fn from(e: WalError) -> Self {
        Unread::Io(e)
    }
}

/// The records of one segment file, in order, refusing anything short of
/// an intact, gapless run.
struct Records<'a> {
    cursor: SegmentCursor,
    pending: VecDeque<Record>,
    next_seq: Option<u64>,
    stop: &'a AtomicBool,
}

impl<'a> Records<'a> {
    fn new(cursor: SegmentCursor, stop: &'a AtomicBool) -> Self {
        Records {
            cursor,
            pending: VecDeque::new(),
            next_seq: None,
            stop,
        }
    }

    fn next(&mut self) -> Result<Option<Record>, Unread> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                if let Some(n) = self.next_seq.filter(|&n| n != r.seq) {
                    return Err(Unread::Damage(format!(
                        "record {} where record {n} was due",
                        r.seq
                    )));
                }
                self.next_seq = Some(r.seq + 1);
                return Ok(Some(r));
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(Unread::Stopped);
            }
            match self.cursor.read_next()? {
                Scan::Frame { records, .. } => self.pending.extend(records),
                Scan::Damage { offset, reason, .. } => {
                    return Err(Unread::Damage(format!("at byte {offset}: {reason}")))
                }
                Scan::End => return Ok(None),
            }
        }
    }
}

impl Wal {
    /// Rewrites the sealed segment `first_seq` as the same records in
    /// larger frames, and replaces it if that saves enough (see the module
    /// documentation). Blocking, and as long as reading, compressing and
    /// checking the whole segment: call it off the runtime's threads.
    ///
    /// # Errors
    /// I/O errors reading the segment or writing, syncing or renaming the
    /// copy. The original is untouched unless the error is the final
    /// directory sync (the copy is then in place, whole and synced, and
    /// either name a crash leaves holds every record).
    pub fn repack(
        &self,
        first_seq: u64,
        options: RepackOptions,
        stop: &AtomicBool,
    ) -> Result<Repacked, WalError> {
        match self.repack_segment(first_seq, options, stop) {
            // Deleted while it was being copied.
            Err(WalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(Repacked::Gone)
            }
            other => other,
        }
    }

    fn repack_segment(
        &self,
        first_seq: u64,
        options: RepackOptions,
        stop: &AtomicBool,
    ) -> Result<Repacked, WalError> {
        let storage = self.shared.storage.as_ref();
        let Some((meta, cursor)) = self.shared.open_segment(first_seq)? else {
            return Ok(Repacked::Gone);
        };
        if !meta.sealed {
            return Ok(Repacked::Gone);
        }
        if let Some(reason) = meta.unreadable {
            return Ok(Repacked::Damaged { reason });
        }
        let mut records = Records::new(cursor, stop);
        let first = match records.next() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Repacked::AlreadyDense),
            Err(unread) => return unread_outcome(unread),
        };
        if already_dense(&records, &first, meta.len, options.max_frame_bytes) {
            return Ok(Repacked::AlreadyDense);
        }
        let temp = temp_path(&meta.path);
        match storage.remove(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(WalError::io("remove old repack copy", &temp, e)),
        }
        let written = match write_copy(storage, &temp, first_seq, first, records, options) {
            Ok(written) => written,
            Err(unread) => {
                let _ = storage.remove(&temp);
                return unread_outcome(unread);
            }
        };
        let saving = meta.len.saturating_sub(written.len) as f64 / meta.len.max(1) as f64;
        if saving < MIN_SAVING {
            let _ = storage.remove(&temp);
            return Ok(Repacked::NotWorth {
                before: meta.len,
                after: written.len,
            });
        }
        if let Err(unread) = same_records(
            storage,
            &meta.path,
            &temp,
            first_seq,
            meta.len,
            written.len,
            stop,
        ) {
            let _ = storage.remove(&temp);
            return match unread {
                Unread::Damage(why) => Err(WalError::io(
                    "check repack copy",
                    &temp,
                    std::io::Error::other(format!("the copy differs from its segment: {why}")),
                )),
                other => unread_outcome(other),
            };
        }
        // Step 3: swap, unless a deletion took the segment meanwhile.
        let _deleting = self.shared.deleting();
        {
            let mut segs = self.shared.segments_mut();
            let current = segs.get_mut(&first_seq);
            let Some(current) = current.filter(|s| s.sealed && s.len == meta.len) else {
                drop(segs);
                let _ = storage.remove(&temp);
                return Ok(Repacked::Gone);
            };
            if let Err(e) = storage.rename(&temp, &meta.path) {
                drop(segs);
                let _ = storage.remove(&temp);
                return Err(WalError::io("rename repack copy", &meta.path, e));
            }
            current.len = written.len;
            current.generation = current.generation.wrapping_add(1);
        }
        storage
            .sync_dir(&self.shared.dir)
            .map_err(|e| WalError::io("sync directory", &self.shared.dir, e))?;
        Ok(Repacked::Done {
            before: meta.len,
            after: written.len,
            records: written.records,
        })
    }
}

/// Removes the copies that unfinished repacks left in `dir` (a crash before
/// the rename: each original is whole), found among `names` (the
/// directory's listing). Returns their paths.
///
/// # Errors
/// I/O errors removing a file or syncing the directory.
pub fn remove_leftovers(
    storage: &dyn Storage,
    dir: &Path,
    names: &[String],
) -> Result<Vec<PathBuf>, WalError> {
    let mut removed = Vec::new();
    for name in names {
        let Some(segment) = name.strip_suffix(REPACK_SUFFIX) else {
            continue;
        };
        if wal_format::parse_segment_file_name(segment).is_none() {
            continue;
        }
        let path = dir.join(name);
        storage
            .remove(&path)
            .map_err(|e| WalError::io("remove unfinished repack copy", &path, e))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        storage
            .sync_dir(dir)
            .map_err(|e| WalError::io("sync directory", dir, e))?;
    }
    Ok(removed)
}

fn temp_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_os_string();
    name.push(REPACK_SUFFIX);
    PathBuf::from(name)
}

fn unread_outcome(unread: Unread) -> Result<Repacked, WalError> {
    match unread {
        Unread::Damage(reason) => Ok(Repacked::Damaged { reason }),
        Unread::Stopped => Ok(Repacked::Stopped),
        Unread::Io(e) => Err(e),
    }
}

/// True when the segment's first frame already holds at least half a full
/// frame of raw bytes, or holds the whole segment: a repacked segment (or
/// one written under heavy load), not worth reading further. A segment
/// whose first frame holds a snappy record is never dense: the copy stores
/// it decoded.
fn already_dense(records: &Records<'_>, first: &Record, len: u64, max_frame_bytes: usize) -> bool {
    let first_frame = || std::iter::once(first).chain(records.pending.iter());
    if first_frame().any(|r| r.meta.encoding == PayloadEncoding::Snappy) {
        return false;
    }
    let in_first_frame: usize = first_frame()
        .map(|r| record_entry_len(r.payload.len()))
        .sum();
    let whole_segment = records.cursor.offset() >= len;
    whole_segment || in_first_frame.saturating_mul(2) >= max_frame_bytes
}

/// `r` as the copy stores it: decoded if it is stored snappy-encoded. A
/// snappy payload that does not decode is kept as it is (readers report it
/// where they meet it; a repack neither mends nor hides it).
fn decoded(r: Record) -> Record {
    if r.meta.encoding != PayloadEncoding::Snappy {
        return r;
    }
    match message::of(&r) {
        Ok(m) => Record {
            seq: r.seq,
            meta: wal_format::RecordMeta {
                encoding: PayloadEncoding::Identity,
                ..r.meta
            },
            payload: m.into_owned().into(),
        },
        Err(_) => r,
    }
}

/// True when `copy` holds what `original` holds: the same sequence number,
/// the same metadata but for the encoding, and the same message.
fn same_record(original: &Record, copy: &Record) -> bool {
    let meta = wal_format::RecordMeta {
        encoding: copy.meta.encoding,
        ..original.meta.clone()
    };
    if original.seq != copy.seq || meta != copy.meta {
        return false;
    }
    if original.meta.encoding == copy.meta.encoding {
        return original.payload == copy.payload;
    }
    matches!((message::of(original), message::of(copy)), (Ok(a), Ok(b)) if a == b)
}

/// What [`write_copy`] wrote.
struct Written {
    len: u64,
    records: u64,
}

/// Writes `first` and the rest of `records` to a new file at `temp` as a
/// segment starting at `first_seq`, in frames of up to the options' size,
/// and syncs it.
fn write_copy(
    storage: &dyn Storage,
    temp: &Path,
    first_seq: u64,
    first: Record,
    mut records: Records<'_>,
    options: RepackOptions,
) -> Result<Written, Unread> {
    let mut file = storage
        .create_new(temp)
        .map_err(|e| WalError::write(temp, e))?;
    let mut out = Vec::new();
    SegmentHeader::new(first_seq).encode(&mut out);
    let mut written = Written { len: 0, records: 0 };
    let first = decoded(first);
    let mut raw = record_entry_len(first.payload.len());
    let mut frame = vec![first];
    loop {
        let record = records.next()?.map(decoded);
        let full = record
            .as_ref()
            .is_none_or(|r| raw + record_entry_len(r.payload.len()) > options.max_frame_bytes);
        if full {
            let refs: Vec<RecordRef<'_>> = frame.iter().map(Record::as_record_ref).collect();
            encode_frame(
                first_seq,
                frame[0].seq,
                &refs,
                Compression::Zstd,
                options.zstd_level,
                &mut out,
            )
            .map_err(|e| Unread::Io(WalError::Encode(e)))?;
            written.records += frame.len() as u64;
            frame.clear();
            raw = 0;
            file.append(&out).map_err(|e| WalError::write(temp, e))?;
            written.len += out.len() as u64;
            out.clear();
        }
        let Some(record) = record else { break };
        raw += record_entry_len(record.payload.len());
        frame.push(record);
    }
    file.sync_data().map_err(|e| WalError::SyncFailed {
        path: temp.to_path_buf(),
        source: e,
    })?;
    Ok(written)
}

/// Reads the segment at `original` and its copy at `copy` side by side and
/// fails at the first record that differs.
fn same_records(
    storage: &dyn Storage,
    original: &Path,
    copy: &Path,
    first_seq: u64,
    original_len: u64,
    copy_len: u64,
    stop: &AtomicBool,
) -> Result<(), Unread> {
    let mut a = Records::new(
        SegmentCursor::open(storage, original, first_seq, original_len)?,
        stop,
    );
    let mut b = Records::new(
        SegmentCursor::open(storage, copy, first_seq, copy_len)?,
        stop,
    );
    loop {
        let (x, y) = (a.next()?, b.next()?);
        let same = match (&x, &y) {
            (Some(x), Some(y)) => same_record(x, y),
            (None, None) => return Ok(()),
            _ => false,
        };
        if !same {
            return Err(Unread::Damage(format!(
                "record {:?} of the segment, {:?} of the copy",
                x.map(|r| r.seq),
                y.map(|r| r.seq)
            )));
        }
    }
}
