//! The single writer of the log.
//!
//! [`WalWriter::append`] encodes a batch into frames and writes them to the
//! active segment, rolling to a new segment first when the batch would take
//! the active one past its size. An append is all or nothing: if a write
//! fails part-way (typically ENOSPC), the file is cut back to where the
//! append began, so no partial frame is ever followed by good ones.
//! [`WalWriter::sync`] makes everything appended durable with one fdatasync
//! (group commit: the caller appends many requests, then syncs once) and only
//! then publishes the new durable end to readers.
//!
//! The active segment is extended with zeros ahead of the appends (up to
//! [`RESERVE_BYTES`] at a time, never past the segment's size), and frames
//! are written over them. Why: an fdatasync after an append that made the
//! file longer must also make the new size (and, on ext4 or XFS, the newly
//! allocated blocks) durable; in ext4 with a journal that is a journal
//! commit, in ext4 without one a second write (the inode). An fdatasync of
//! blocks the file already had writes the data alone. Only the group commit
//! whose frames run past the reservation pays for the next one. Readers never
//! see the zeros (they read up to the durable length); after a crash
//! recovery finds them after the last frame and cuts them off (see
//! `segment.rs`), and a segment is cut back to its last frame when it is
//! sealed and when the writer closes. The zeros are written right after the
//! append that runs past them, so that no byte is written twice. A
//! reservation that fails (a full disk) is cut off again, and appends extend
//! the file as they would without one.
//!
//! A failed fsync stops the writer for good. After a failed fsync Linux may
//! have dropped the dirty pages and cleared the error, so a retry that
//! "succeeds" proves nothing (the PostgreSQL fsyncgate lesson). The relay then
//! refuses writes until it is restarted and recovery re-reads the disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wal_format::{encode_frame, ChainEncoder, Compression, RecordRef, FORMAT_VERSION};

use super::chain_level::ChainLevel;
use super::env::WritableFile;
use super::segment::{create_segment, Active};
use super::{Durable, SegmentMeta, Shared, WalError, WalOptions};

/// Frame and record header bytes per record, an upper bound used to decide
/// on rolling before a batch is encoded.
const RECORD_OVERHEAD: u64 = (wal_format::FRAME_HEADER_LEN + 64) as u64;

/// How far past the end of an append the active segment is extended with
/// zeros when an append runs past the zeros already there, at most: a
/// segment holding less reserves as much as it holds, and no more than a
/// second of appends at the current rate ([`AppendRate`]), and at least
/// [`MIN_RESERVE_BYTES`], so that one filling slowly (a sender at a low
/// rate, sealed by age) carries few zeros (a real Prometheus at 1 KB a
/// second: 16 KiB, where it was as much as the segment held, up to 256
/// KiB, the size of its frames of the last five minutes). The group commit
/// that does it writes this much more and pays a size change; the ones after
/// it, until their frames reach the end of it, do not: with group commits
/// of 10 KB (4 senders of 500 series), one in 25. Measured on a journaled
/// ext4 volume under that load, the mean fdatasync went from 0.26-0.34 ms
/// to 0.16 ms (`benches/README.md`).
pub const RESERVE_BYTES: u64 = 256 << 10;

/// The least reserved at once (see [`RESERVE_BYTES`]).
pub const MIN_RESERVE_BYTES: u64 = 16 << 10;

/// Bytes appended in about the last second, which a reservation need not
/// exceed (see [`RESERVE_BYTES`]): a reservation that lasts a second costs
/// one size change a second, and at a high rate the cap is reached within
/// milliseconds of a rise. (A count of appends instead would make the
/// benchmark's small compressed group commits, 1.7 KB at 4 × 500, pay a
/// size change every few milliseconds.)
#[derive(Debug)]
pub(super) struct AppendRate {
    window_start: Instant,
    bytes: u64,
    /// Bytes per second over the last window that ended.
    last: u64,
}

impl AppendRate {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            bytes: 0,
            last: 0,
        }
    }

    /// Notes `n` bytes appended at `now`; returns the bytes appended per
    /// second over the last window, or in this one so far, whichever is
    /// more.
    pub(super) fn note(&mut self, n: u64, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Duration::from_secs(1) {
            // Per second over the window that ended: little after a quiet
            // spell.
            self.last = (self.bytes as f64 / elapsed.as_secs_f64()) as u64;
            self.window_start = now;
            self.bytes = 0;
        }
        self.bytes = self.bytes.saturating_add(n);
        self.last.max(self.bytes)
    }
}

/// Encodes `records` (sequence numbers from `first`) into `out` as frames of
/// at most about `max_frame_bytes` raw bytes each, salted for the segment
/// starting at `salt`: the next frames of `chain` when given (zstd), else
/// frames compressed alone (or not at all).
fn encode_frames(
    options: &WalOptions,
    mut chain: Option<&mut ChainEncoder>,
    salt: u64,
    first: u64,
    records: &[RecordRef<'_>],
    out: &mut Vec<u8>,
) -> Result<(), WalError> {
    out.clear();
    let mut start = 0;
    while start < records.len() {
        let mut end = start + 1;
        let mut raw = records[start].payload.len();
        while end < records.len() && raw + records[end].payload.len() <= options.max_frame_bytes {
            raw += records[end].payload.len();
            end += 1;
        }
        let seq = first + start as u64;
        match chain.as_deref_mut() {
            Some(chain) => chain.encode_frame(salt, seq, &records[start..end], out)?,
            None => encode_frame(
                salt,
                seq,
                &records[start..end],
                options.compression,
                options.zstd_level,
                out,
            )?,
        };
        start = end;
    }
    Ok(())
}

/// See the module documentation.
pub struct WalWriter {
    shared: Arc<Shared>,
    options: WalOptions,
    /// The segment being appended to; None until the first append of a brand
    /// new log (or after recovery removed an empty leftover).
    active: Option<ActiveFile>,
    next_seq: u64,
    durable_seq: u64,
    failed: Option<String>,
    buf: Vec<u8>,
    /// Records appended since the last sync, for the tail cache.
    staged: Vec<wal_format::Record>,
    /// With zstd, frames are chained (`wal_format::chain`): a light load's
    /// one-request frames are 3-4 times smaller than compressed alone. A
    /// chain restarts at every new segment, after a failed append, at a
    /// restart (a new writer), and after `max_frame_bytes` raw bytes, which
    /// bounds what damage to one frame costs, as the frame limit does for
    /// a frame.
    chain: ChainEncoder,
    /// The chains' level, from the time spent compressing them.
    level: ChainLevel,
    /// For sizing reservations.
    rate: AppendRate,
}

struct ActiveFile {
    file: Box<dyn WritableFile>,
    path: PathBuf,
    first_seq: u64,
    /// Bytes written (durable or not): where the next frame goes.
    len: u64,
    /// The file's length: `len` plus the zeros reserved after it.
    reserved: u64,
    /// True once something was appended since the last sync.
    dirty: bool,
    /// Bytes of the segment header: a segment holding only this is empty.
    header_len: u64,
    /// Roll before the next append (recovery found damage in this segment).
    seal: bool,
    /// When this writer began appending to it (its age, for
    /// [`WalOptions::segment_max_age`]; a restart starts the count anew).
    since: Instant,
}

impl WalWriter {
    pub(super) fn open(
        shared: Arc<Shared>,
        active: Option<Active>,
        next_seq: u64,
        options: WalOptions,
    ) -> Result<Self, WalError> {
        let active = match active {
            Some(a) => {
                let file = shared
                    .storage
                    .open_append(&a.path)
                    .map_err(|e| WalError::io("open segment", &a.path, e))?;
                shared.segments_mut().insert(
                    a.first_seq,
                    SegmentMeta {
                        first_seq: a.first_seq,
                        path: a.path.clone(),
                        len: a.len,
                        sealed: false,
                        unreadable: None,
                        generation: 0,
                    },
                );
                Some(ActiveFile {
                    file,
                    path: a.path,
                    first_seq: a.first_seq,
                    len: a.len,
                    reserved: a.len,
                    dirty: false,
                    header_len: wal_format::SEGMENT_HEADER_LEN as u64,
                    // A segment of an older format version is appended to
                    // no more (SPEC, "Version policy").
                    seal: a.seal || a.version != FORMAT_VERSION,
                    since: Instant::now(),
                })
            }
            None => None,
        };
        Ok(Self {
            shared,
            active,
            next_seq,
            durable_seq: next_seq,
            failed: None,
            buf: Vec::new(),
            staged: Vec::new(),
            chain: ChainEncoder::new(options.zstd_level, options.max_frame_bytes),
            level: ChainLevel::new(options.zstd_level, options.zstd_max_level),
            rate: AppendRate::new(Instant::now()),
            options,
        })
    }

    /// The zstd level of the chain being written (see [`ChainLevel`]); 0
    /// when frames are not compressed.
    pub fn zstd_level(&self) -> i32 {
        match self.options.compression {
            Compression::Zstd => self.chain.level(),
            _ => 0,
        }
    }

    /// Compresses at `level` from the next append on, whatever the load.
    #[cfg(test)]
    pub(super) fn pin_zstd_level(&mut self, level: i32) {
        self.level = ChainLevel::new(level, level);
        self.chain.set_level(level);
    }

    /// The sequence number the next appended record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// One past the last durable record.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Why the writer stopped, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Appends `records` (not yet durable: call [`Self::sync`]) and returns the
    /// sequence numbers they got.
    ///
    /// # Errors
    /// [`WalError::WriterFailed`] after a fatal error; [`WalError::NoSpace`]
    /// when the disk is full (nothing of this batch stays in the log);
    /// [`WalError::Encode`] for a record over the size limit;
    /// [`WalError::SyncFailed`] if rolling to a new segment failed to fsync.
    pub fn append(&mut self, records: &[RecordRef<'_>]) -> Result<std::ops::Range<u64>, WalError> {
        if let Some(cause) = &self.failed {
            return Err(WalError::WriterFailed {
                cause: cause.clone(),
            });
        }
        if records.is_empty() {
            return Ok(self.next_seq..self.next_seq);
        }
        let first = self.next_seq;
        // Decide on a roll before encoding, from an upper bound of the batch's
        // size, because a frame's checksum is salted with the first sequence
        // number of the segment it lands in.
        let estimate: u64 = records
            .iter()
            .map(|r| r.payload.len() as u64 + RECORD_OVERHEAD)
            .sum();
        let needs_roll = match &self.active {
            None => true,
            Some(a) => {
                let holds_records = a.len > a.header_len;
                a.seal
                    || (holds_records && a.len + estimate > self.options.segment_bytes)
                    || (holds_records
                        && self
                            .options
                            .segment_max_age
                            .is_some_and(|age| a.since.elapsed() >= age))
            }
        };
        if needs_roll {
            self.roll(first).map_err(|e| self.fail_if_fatal(e))?;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(WalError::WriterFailed {
                cause: "no active segment".into(),
            });
        };
        let chained = self.options.compression == Compression::Zstd;
        let started = Instant::now();
        if let Err(e) = encode_frames(
            &self.options,
            chained.then_some(&mut self.chain),
            active.first_seq,
            first,
            records,
            &mut self.buf,
        ) {
            // Frames of this batch encoded before the one that failed are
            // in the chain's stream, and will not be on the disk.
            self.chain.restart();
            return Err(e);
        }
        let now = Instant::now();
        if chained {
            let level = self.level.record(now.duration_since(started), now);
            self.chain.set_level(level);
        }
        let end = active.len + self.buf.len() as u64;
        if let Err(e) = active.file.append(&self.buf) {
            // The chain's stream holds frames that are not on the disk.
            self.chain.restart();
            let err = WalError::write(&active.path, e);
            // All or nothing: cut back whatever part of the batch landed
            // (and the reservation with it).
            if let Err(e) = active.file.set_len(active.len) {
                let fatal = WalError::io("truncate after failed write", &active.path, e);
                self.failed = Some(fatal.to_string());
                return Err(fatal);
            }
            active.reserved = active.len;
            return Err(err);
        }
        active.len = end;
        let per_second = self.rate.note(self.buf.len() as u64, now);
        if end > active.reserved {
            // This append made the file longer (its sync pays for that):
            // reserve zeros after it, so that the next ones do not.
            active.reserved = end;
            active.reserve(self.options.segment_bytes, per_second);
        }
        active.dirty = true;
        self.shared.note_samples(
            active.first_seq,
            first,
            records.iter().map(|r| r.meta.samples),
        );
        self.next_seq = first + records.len() as u64;
        Ok(first..self.next_seq)
    }

    /// Hands the writer the shared buffers of the records the last
    /// [`Self::append`] wrote (`first` is its first sequence number), so
    /// that the next [`Self::sync`] puts them in the readers' in-memory
    /// tail cache. Optional: records not staged are read from disk.
    pub fn stage_for_readers(
        &mut self,
        first: u64,
        records: impl IntoIterator<Item = (wal_format::RecordMeta, bytes::Bytes)>,
    ) {
        self.staged
            .extend(records.into_iter().enumerate().map(|(i, (meta, payload))| {
                wal_format::Record {
                    seq: first + i as u64,
                    meta,
                    payload,
                }
            }));
    }

    /// Seals the active segment (making it durable) and starts a new one
    /// whose first record will be `first_seq`.
    fn roll(&mut self, first_seq: u64) -> Result<(), WalError> {
        if let Some(mut old) = self.active.take() {
            old.trim();
            if old.dirty {
                old.file.sync_data().map_err(|e| WalError::SyncFailed {
                    path: old.path.clone(),
                    source: e,
                })?;
            }
            if let Some(meta) = self.shared.segments_mut().get_mut(&old.first_seq) {
                meta.sealed = true;
                meta.len = old.len;
            }
            // Nothing appended before this roll can be lost any more, but
            // readers learn of it only at the next sync, which is when the
            // appender learns it too.
        }
        // Frames are salted for their segment, and a chain never crosses
        // one: its first frame starts a new chain.
        self.chain.restart();
        let (file, path, len) =
            create_segment(self.shared.storage.as_ref(), &self.shared.dir, first_seq)?;
        self.shared.segments_mut().insert(
            first_seq,
            SegmentMeta {
                first_seq,
                path: path.clone(),
                len,
                sealed: false,
                unreadable: None,
                generation: 0,
            },
        );
        self.active = Some(ActiveFile {
            file,
            path,
            first_seq,
            len,
            reserved: len,
            dirty: false,
            header_len: len,
            seal: false,
            since: Instant::now(),
        });
        Ok(())
    }

    /// Seals the active segment if it holds any record, so that retention can
    /// delete it once every replica has passed it (the active segment itself
    /// is never deleted). Used when the disk or the budget is full and every
    /// replica already has everything: without it a log that fits in one
    /// segment could never free space. Returns whether it rolled.
    ///
    /// # Errors
    /// As for a roll: [`WalError::NoSpace`] creating the new segment (the
    /// next append retries), [`WalError::SyncFailed`] (fatal).
    pub fn seal_active(&mut self) -> Result<bool, WalError> {
        if let Some(cause) = &self.failed {
            return Err(WalError::WriterFailed {
                cause: cause.clone(),
            });
        }
        match &self.active {
            Some(a) if a.len > a.header_len => {}
            _ => return Ok(false),
        }
        let next = self.next_seq;
        self.roll(next).map_err(|e| self.fail_if_fatal(e))?;
        Ok(true)
    }

    /// Numbers the next record `seq` if that is further than [`Self::next_seq`]
    /// (a replica is already past the end of the log). The records in
    /// between do not exist: readers report them as missing. The next
    /// append starts a new segment, so no segment has a hole inside it.
    /// Only before anything is appended after opening.
    pub fn skip_to(&mut self, seq: u64) {
        if seq <= self.next_seq || self.next_seq != self.durable_seq {
            return;
        }
        if let Some(a) = self.active.as_mut() {
            a.seal = true;
        }
        self.next_seq = seq;
        self.durable_seq = seq;
        self.shared.durable.send_replace(Durable { end_seq: seq });
    }

    /// Makes everything appended so far durable, publishes it to readers and
    /// returns the new durable end.
    ///
    /// # Errors
    /// [`WalError::SyncFailed`] (and from then on the writer refuses every
    /// append with [`WalError::WriterFailed`]).
    pub fn sync(&mut self) -> Result<u64, WalError> {
        if let Some(cause) = &self.failed {
            return Err(WalError::WriterFailed {
                cause: cause.clone(),
            });
        }
        if let Some(active) = self.active.as_mut() {
            if active.dirty {
                if let Err(e) = active.file.sync_data() {
                    self.staged.clear();
                    let err = WalError::SyncFailed {
                        path: active.path.clone(),
                        source: e,
                    };
                    self.failed = Some(err.to_string());
                    return Err(err);
                }
                active.dirty = false;
            }
            if let Some(meta) = self.shared.segments_mut().get_mut(&active.first_seq) {
                meta.len = active.len;
            }
        }
        self.durable_seq = self.next_seq;
        // Staged records are durable now; they go to the tail cache before
        // the new end is published, so readers woken by it find them there.
        let staged = std::mem::take(&mut self.staged);
        if staged.last().is_some_and(|r| r.seq < self.durable_seq) {
            self.shared.tail().push(staged);
        }
        // Lengths first, then the durable end: a reader that sees the new end
        // is sure to see the bytes behind it.
        self.shared.durable.send_replace(Durable {
            end_seq: self.durable_seq,
        });
        Ok(self.durable_seq)
    }

    /// Cuts the zeros reserved after the active segment's last frame and
    /// makes the cut durable, so that a relay stopped cleanly leaves every
    /// segment ending with its last frame. Only when everything appended is
    /// durable and the writer has not failed (a sync now must not stand in
    /// for one that failed or never ran); otherwise the next recovery cuts
    /// them. Errors are logged: the zeros are harmless.
    pub fn close(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.dirty || !active.trim() {
            return;
        }
        if let Err(e) = active.file.sync_data() {
            self.failed = Some(
                WalError::SyncFailed {
                    path: active.path.clone(),
                    source: e,
                }
                .to_string(),
            );
            tracing::warn!(path = %active.path.display(), cause = ?self.failed,
                "fsync after cutting the reserved zeros of the active segment failed");
        }
        active.dirty = false;
    }

    fn fail_if_fatal(&mut self, e: WalError) -> WalError {
        if matches!(e, WalError::SyncFailed { .. }) {
            self.failed = Some(e.to_string());
        }
        e
    }
}

impl ActiveFile {
    /// Extends the file with zeros past the last frame (as far as
    /// [`RESERVE_BYTES`] says, with `per_second` bytes appended a second), never
    /// past `segment_bytes`. Best effort: a failure (a full disk) is cut
    /// off again and the next append extends the file, as it did before
    /// reservations.
    fn reserve(&mut self, segment_bytes: u64, per_second: u64) {
        let ahead = RESERVE_BYTES
            .min(self.len)
            .min(per_second)
            .max(MIN_RESERVE_BYTES);
        let upto = (self.len + ahead).min(segment_bytes);
        if upto <= self.reserved {
            return;
        }
        match self.file.reserve(upto) {
            Ok(()) => self.reserved = upto,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e,
                    "could not reserve zeros after the active segment");
                // Part of the zeros may be there: cut whatever was.
                self.reserved = upto;
                self.trim();
            }
        }
    }

    /// Cuts the reserved zeros after the last frame (to be made durable by
    /// the caller's next sync) and says whether it cut any. A failure
    /// leaves them, which readers treat as the end of the segment.
    fn trim(&mut self) -> bool {
        if self.reserved == self.len {
            return false;
        }
        match self.file.set_len(self.len) {
            Ok(()) => {
                self.reserved = self.len;
                self.dirty = true;
                true
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "could not cut the reserved zeros after the segment's last frame");
                false
            }
        }
    }
}
