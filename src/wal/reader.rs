//! Readers: iterate the log in order from any sequence number, up to the
//! durable end, and wait for more.
//!
//! A reader never hands out a record that failed its checksum. Where the log
//! is damaged, or records were deleted under it (retention), it says so with a
//! [`ReadItem::Gap`] naming the lost sequence range and the place on disk, and
//! carries on with the next intact record. Each reader sees each gap once, so
//! every shipper can account its own losses exactly.
//!
//! A reader is about the records at and after its position, and nothing
//! before it:
//!
//! - It yields every intact record from its position on, in order, and never
//!   one below its position.
//! - Every gap starts at the reader's position and never ends before it
//!   (`from <= to`), so the records and gaps a reader yields cover the log
//!   from its position on exactly once. A shipper checkpoints a gap's end:
//!   a gap ending behind its start would move a cursor backwards.
//! - Damage whose records all lie before the position is not the reader's
//!   gap. A reader opened inside a segment skips the frames before its
//!   position by their headers, so a damaged frame header there stops it and
//!   it resynchronises on a frame that may start below its position; that
//!   damage is counted as a damaged place of the log (once, however many
//!   readers find it) but yields no gap. A damaged segment header likewise
//!   concerns only a reader that starts the segment.
//! - Damage whose records reach the position is a gap from the position to
//!   the next intact record; damage at the position that cost no record is
//!   an empty gap there, so that it is seen.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use wal_format::Record;

use super::segment::{Scan, SegmentCursor};
use super::{Shared, WalError};

/// What a reader yields.
#[derive(Debug, Clone)]
pub enum ReadItem {
    /// The next record in log order.
    Record(Record),
    /// Records `from..to` cannot be read: damaged, or deleted by retention.
    Gap(Gap),
}

/// Records that a reader had to skip, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    /// The file and byte offset of the damage, when the cause is damage.
    pub file: Option<PathBuf>,
    pub offset: Option<u64>,
    pub reason: String,
    /// Stable label: `retention`, or the decoder's error code.
    pub error_code: &'static str,
}

/// Damage seen but not yet turned into a gap (its end is the next record).
struct PendingDamage {
    file: PathBuf,
    offset: u64,
    /// The first record the damaged bytes can have held (the end of the
    /// intact frame before them): below the reader's position, the damage
    /// began behind the reader.
    from_seq: u64,
    reason: String,
    error_code: &'static str,
}

/// See the module documentation.
pub struct WalReader {
    shared: Arc<Shared>,
    next_seq: u64,
    /// The segment being read: its first sequence, the generation of its
    /// file ([`super::SegmentMeta::generation`]) and the cursor.
    cursor: Option<(u64, u32, SegmentCursor)>,
    pending: VecDeque<Record>,
    damage: Option<PendingDamage>,
}

impl WalReader {
    pub(super) fn new(shared: Arc<Shared>, seq: u64) -> Self {
        Self {
            shared,
            next_seq: seq,
            cursor: None,
            pending: VecDeque::new(),
            damage: None,
        }
    }

    /// The sequence number of the next record this reader will yield.
    pub fn next_seq(&self) -> u64 {
        self.pending.front().map_or(self.next_seq, |r| r.seq)
    }

    /// Repositions the reader.
    pub fn seek(&mut self, seq: u64) {
        self.next_seq = seq;
        self.pending.clear();
        self.cursor = None;
        self.damage = None;
    }

    /// The next record or gap, or None when the reader has caught up with
    /// the durable end.
    ///
    /// # Errors
    /// I/O errors reading a segment (the reader can be retried).
    pub fn try_next(&mut self) -> Result<Option<ReadItem>, WalError> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Ok(Some(ReadItem::Record(r)));
            }
            let durable_end = self.shared.durable.borrow().end_seq;
            if self.next_seq >= durable_end {
                return Ok(None);
            }
            if self.take_from_tail_cache(durable_end) {
                continue;
            }
            if let Some(item) = self.step(durable_end)? {
                return Ok(Some(item));
            }
        }
    }

    /// Like [`Self::try_next`], but waits for the writer when caught up.
    ///
    /// # Errors
    /// I/O errors reading a segment.
    pub async fn next(&mut self) -> Result<ReadItem, WalError> {
        let mut rx = self.shared.durable.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(item) = self.try_next()? {
                return Ok(item);
            }
            if rx.changed().await.is_err() {
                // The writer is gone for good; nothing more will come.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until records past this reader's position are durable.
    pub async fn wait_for_more(&self) {
        let mut rx = self.shared.durable.subscribe();
        let next = self.next_seq();
        let _ = rx.wait_for(|d| d.end_seq > next).await;
    }

    /// Takes the records from `next_seq` on from the writer's in-memory
    /// tail cache, when they are there, their segment is still in the log
    /// and no damage is waiting to be reported. True if it took any.
    fn take_from_tail_cache(&mut self, durable_end: u64) -> bool {
        if self.damage.is_some() {
            return false;
        }
        let oldest = self.shared.segments().keys().next().copied();
        if oldest.is_none_or(|o| self.next_seq < o) {
            return false;
        }
        let next = self
            .shared
            .tail()
            .read(self.next_seq, durable_end, &mut self.pending);
        if next == self.next_seq {
            return false;
        }
        self.next_seq = next;
        // The segment cursor is behind now: reopen it where needed.
        self.cursor = None;
        true
    }

    /// Advances by one frame, segment or gap. Returns an item to yield, or
    /// None when records were queued (or nothing was found yet).
    fn step(&mut self, durable_end: u64) -> Result<Option<ReadItem>, WalError> {
        // Which segment holds next_seq, and what follows it?
        let (seg, successor) = {
            let segs = self.shared.segments();
            let seg = segs
                .range(..=self.next_seq)
                .next_back()
                .map(|(_, s)| s.clone());
            let successor = segs
                .range(self.next_seq + 1..)
                .next()
                .map(|(k, s)| (*k, s.path.clone()));
            let oldest = segs.keys().next().copied().unwrap_or(durable_end);
            drop(segs);
            match seg {
                Some(s) => (s, successor),
                None => {
                    // Before the oldest segment: deleted by retention.
                    return Ok(Some(self.gap_to(oldest.min(durable_end))));
                }
            }
        };
        // A cursor on a file that a repack has since replaced would still
        // read correct records (the old file stays whole while open), but it
        // would keep the old file's disk space in use: open the new one.
        let reuse = matches!(&self.cursor,
            Some((first, generation, _)) if *first == seg.first_seq && *generation == seg.generation);
        if let (false, Some(reason)) = (reuse, &seg.unreadable) {
            // The header is damaged, but frames carry their own checksums,
            // salted with the first sequence number the file name gives:
            // whatever frames are intact are still read. It holds no record,
            // so it concerns only a reader that starts the segment; recovery
            // has counted it already.
            if self.damage.is_none() && self.next_seq <= seg.first_seq {
                self.damage = Some(PendingDamage {
                    file: seg.path.clone(),
                    offset: 0,
                    from_seq: seg.first_seq,
                    reason: reason.clone(),
                    error_code: "bad_segment_header",
                });
            }
        }
        let seg = if reuse {
            seg
        } else {
            // The file and its length as of one moment (see
            // `Shared::open_segment`).
            let Some((now, mut c)) = self.shared.open_segment(seg.first_seq)? else {
                // Deleted since: the next step finds the gap.
                return Ok(None);
            };
            c.skip_to(self.next_seq)?;
            self.cursor = Some((now.first_seq, now.generation, c));
            now
        };
        let Some((_, _, cursor)) = self.cursor.as_mut() else {
            return Ok(None);
        };
        cursor.set_limit(seg.len);
        match cursor.read_next()? {
            Scan::Frame {
                header, records, ..
            } => {
                let gap = self.gap_before(header.first_seq);
                let end = header.end_seq().min(durable_end);
                self.pending.extend(
                    records
                        .into_iter()
                        .filter(|r| r.seq >= self.next_seq && r.seq < end),
                );
                self.next_seq = self.next_seq.max(end);
                Ok(gap)
            }
            Scan::Damage {
                offset,
                reason,
                error_code,
                ..
            } => {
                // Remember the first damage; its gap ends at the next record.
                if self.damage.is_none() {
                    self.damage = Some(PendingDamage {
                        file: cursor.path().to_path_buf(),
                        offset,
                        from_seq: cursor.passed_seq(),
                        reason,
                        error_code,
                    });
                }
                Ok(None)
            }
            Scan::End => {
                // The writer publishes a segment's durable length before the
                // durable end, so reaching the end of the active segment below
                // the durable end means damage consumed the rest of it.
                let (to, resumes_at) = if seg.sealed {
                    self.cursor = None;
                    match successor {
                        Some((first, path)) => (first.min(durable_end), (path, 0)),
                        None => (durable_end, (seg.path.clone(), seg.len)),
                    }
                } else {
                    (durable_end, (seg.path.clone(), seg.len))
                };
                if to > self.next_seq && self.damage.is_none() {
                    // Records missing with no damage seen: retention deletes
                    // whole segments from the oldest end only (that gap is
                    // found above), so this is a segment file that was
                    // deleted or lost between two others, or records lost
                    // at the end of the log that a replica had already
                    // passed (the writer then numbers on from there).
                    // Reported where the log resumes.
                    self.damage = Some(PendingDamage {
                        file: resumes_at.0,
                        offset: resumes_at.1,
                        from_seq: self.next_seq,
                        reason: format!(
                            "records {}..{to} are missing: no segment holds them \
                             (a deleted or lost segment file, or a lost end of the log)",
                            self.next_seq
                        ),
                        error_code: "missing_records",
                    });
                }
                // `to` is past the position (the successor starts after it,
                // and the durable end is past it), so pending damage, even
                // damage that began behind the position, cost records
                // `next_seq..to`: the segment ended before any intact frame.
                if to > self.next_seq || self.damage.is_some() {
                    return Ok(Some(self.gap_to(to)));
                }
                self.next_seq = self.next_seq.max(to);
                Ok(None)
            }
        }
    }

    /// What to yield before an intact frame whose first record is `first`:
    /// the gap that pending damage (or a jump in sequence numbers) left
    /// from the position on, or nothing.
    fn gap_before(&mut self, first: u64) -> Option<ReadItem> {
        match &self.damage {
            // The damaged records were `from_seq..first`, all below the
            // position: the reader was opened past them.
            Some(d) if d.from_seq < self.next_seq && first <= self.next_seq => {
                let d = self.damage.take()?;
                if self.count_damage(&d) {
                    tracing::error!(file = %d.file.display(), offset = d.offset, reason = %d.reason,
                        from = d.from_seq, to = first, position = self.next_seq,
                        "corruption found in the log, before this reader's position; \
                         no record from its position on is lost");
                }
                None
            }
            // Damage right before this frame becomes a gap now, even an
            // empty one (damage between frames that cost no record).
            Some(_) => Some(self.gap_to(first)),
            None if first > self.next_seq => Some(self.gap_to(first)),
            None => None,
        }
    }

    /// Counts a damaged place the first time any reader (or recovery) finds
    /// it; true then, so that the finder logs it.
    fn count_damage(&self, d: &PendingDamage) -> bool {
        let first = self.shared.note_damage(&d.file, d.offset);
        if first {
            metrics::counter!("walrelay_wal_corruptions_total").increment(1);
        }
        first
    }

    /// A gap from the current position to `to`, attributed to pending damage
    /// if there is some, else to retention. Never backwards: a `to` below
    /// the position gives an empty gap at the position.
    fn gap_to(&mut self, to: u64) -> ReadItem {
        let from = self.next_seq;
        if to < from {
            // The reader only asks for this when damage at its position is
            // followed by a frame numbered below that position: bytes that
            // pass both checksums yet were not written in this order (a
            // frame image inside a payload, found by a resynchronisation).
            // That comes from what is on disk, so it is logged and survived,
            // not asserted: a gap ending behind its start would move a
            // cursor backwards.
            tracing::error!(
                from,
                to,
                "a frame after damage is numbered below the reader's \
                position; reported as an empty gap at the position"
            );
        }
        let to = to.max(from);
        self.next_seq = to;
        match self.damage.take() {
            Some(d) => {
                if self.count_damage(&d) {
                    tracing::error!(file = %d.file.display(), offset = d.offset, reason = %d.reason,
                        from, to, "corruption found in the log; the damaged records are skipped");
                }
                ReadItem::Gap(Gap {
                    from,
                    to,
                    file: Some(d.file),
                    offset: Some(d.offset),
                    reason: d.reason,
                    error_code: d.error_code,
                })
            }
            None => ReadItem::Gap(Gap {
                from,
                to,
                file: None,
                offset: None,
                reason: "records no longer on disk (deleted by retention or missing segment)"
                    .into(),
                error_code: "retention",
            }),
        }
    }
}
