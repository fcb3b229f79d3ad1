//! Opening a log: what recovery does at each crash point.
//!
//! The crash points are those of `wal-format/SPEC.md`, "Crash points and
//! recovery", with the same numbers (one list: the SPEC says what happens,
//! this says where):
//!
//! 1. *Crash before a new segment's directory entry is durable*: the file is
//!    gone after power loss; nothing to do. Nothing in it was acknowledged
//!    (the writer syncs the directory before it syncs a record into the new
//!    segment).
//! 2. *Crash between creating a segment and syncing its header*: the last
//!    file is no longer than a header, or its header is unreadable and no
//!    frame in it is intact. The first is removed, the second moved aside as
//!    `*.wal.damaged`; the segment is created anew and this is reported
//!    ([`recover_last`]).
//! 3. *Crash in the middle of writing a frame* (the usual torn tail): the last
//!    segment ends in an incomplete or checksum-failing frame with no intact
//!    frame after it. The file is cut back to the end of the last intact frame
//!    and the cut is reported ([`scan_tail`] with [`TornTail::Cut`]; a
//!    read-only open reports what it would cut, [`TornTail::Report`]). Those
//!    records were never acknowledged, since acknowledgement waits for the
//!    fsync that would have completed them.
//! 4. *Crash between a group commit's writes and its fdatasync*: case 3 when
//!    the damage is at the end, case 6 when an intact frame follows it.
//! 5. *Crash after the fdatasync, before the 2xx*: nothing to do; the
//!    records are delivered (at least once).
//! 6. *Corruption before the end of the last segment, or anywhere in a sealed
//!    segment* (bit rot, a bad sector, a stray write): reported with file and
//!    byte offset. Recovery does not touch it, and seals a damaged last
//!    segment so that nothing is appended after the damage; readers skip it
//!    up to the next intact frame and account the lost sequence numbers as a
//!    gap (`reader.rs`).
//! 7. *A segment with an unreadable header but intact frames*: reported as
//!    damage at offset 0. The segment is not skipped: readers still read its
//!    intact frames, salted with the sequence number of its file name. A last
//!    segment like this is kept sealed and the writer continues in a new
//!    segment after its last intact frame.
//! 8. *Sequence discontinuity*: found and counted by readers (`reader.rs`),
//!    not here.
//! 9. *Crash during retention*: retention deletes again what every replica
//!    has passed (`retention.rs`); nothing to do here.
//! 10. *fdatasync fails*: the writer stops for good (`writer.rs`) and the
//!     relay refuses writes until it is restarted; this recovery runs at the
//!     restart and applies 3, 4 and 6 to what reached the disk.
//! 11. *Crash during a repack*: the copy a repack left beside its segment
//!     (`*.wal.repack`) is removed ([`super::repack::remove_leftovers`]);
//!     the segment itself is whole, original or copy.
//!
//! Only the last segment is scanned in full at open, so recovery time does not
//! grow with the size of the log; sealed segments are checked as they are read
//! (and in full by `walrelay wal verify`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wal_format::parse_segment_file_name;

use super::env::Storage;
use super::segment::{read_header, Active, Scan, SegmentCursor};
use super::writer::WalWriter;
use super::{SegmentMeta, Shared, Wal, WalError, WalOptions};

/// Damage found at open.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    pub file: PathBuf,
    pub offset: u64,
    pub reason: String,
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Truncation {
    pub file: PathBuf,
    /// The new length of the file (where the torn frame began).
    pub offset: u64,
    pub bytes_removed: u64,
    pub reason: String,
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecoveryReport {
    pub segments: usize,
    pub first_seq: u64,
    pub next_seq: u64,
    pub truncated: Option<Truncation>,
    pub damage: Vec<Damage>,
    /// Files named like segments that were removed as empty leftovers of a
    /// crash during segment creation, and the copies of repacks a crash
    /// cut short (`*.wal.repack`, see [`super::repack`]).
    pub removed: Vec<PathBuf>,
}

/// Opens (creating if needed) the log in `dir` and recovers it.
///
/// # Errors
/// I/O errors listing or repairing the directory, and fatal inconsistencies
/// (a segment file whose header names another sequence than its file name).
pub fn open(
    storage: Arc<dyn Storage>,
    dir: &Path,
    options: WalOptions,
) -> Result<(WalWriter, Wal, RecoveryReport), WalError> {
    storage
        .create_dir_all(dir)
        .map_err(|e| WalError::io("create directory", dir, e))?;
    let listed = storage
        .list(dir)
        .map_err(|e| WalError::io("list directory", dir, e))?;
    let mut report = RecoveryReport {
        removed: super::repack::remove_leftovers(storage.as_ref(), dir, &listed)?,
        ..RecoveryReport::default()
    };
    let mut names: Vec<(u64, String)> = listed
        .into_iter()
        .filter_map(|n| parse_segment_file_name(&n).map(|s| (s, n)))
        .collect();
    names.sort();

    let mut segments = BTreeMap::new();
    let last = names.pop();
    for (first_seq, name) in &names {
        let meta = sealed_segment(storage.as_ref(), dir, *first_seq, name, &mut report)?;
        segments.insert(*first_seq, meta);
    }
    let (active, next_seq) = match last {
        Some((first_seq, name)) => recover_last(
            storage.as_ref(),
            dir,
            first_seq,
            &name,
            &mut report,
            &mut segments,
        )?,
        None => (None, options.initial_seq),
    };
    let shared = Arc::new(Shared::new(dir, Arc::clone(&storage), segments, next_seq));
    // Damage reported here is counted by the caller; readers crossing it
    // later must not count it again.
    for d in &report.damage {
        shared.note_damage(&d.file, d.offset);
    }
    let writer = WalWriter::open(Arc::clone(&shared), active, next_seq, options)?;
    let wal = Wal { shared };
    let extent = wal.extent();
    report.segments = extent.segments;
    report.first_seq = extent.first_seq;
    report.next_seq = next_seq;
    Ok((writer, wal, report))
}

/// Opens the log in `dir` without changing anything on disk (for the
/// operator commands that inspect a stopped relay's volume or a copy of it).
/// A torn tail is reported in [`RecoveryReport::truncated`] as what recovery
/// *would* cut; readers stop before it.
///
/// # Errors
/// The directory does not exist or cannot be listed; I/O errors.
pub fn open_read_only(
    storage: Arc<dyn Storage>,
    dir: &Path,
) -> Result<(Wal, RecoveryReport), WalError> {
    let mut names: Vec<(u64, String)> = storage
        .list(dir)
        .map_err(|e| WalError::io("list directory", dir, e))?
        .into_iter()
        .filter_map(|n| parse_segment_file_name(&n).map(|s| (s, n)))
        .collect();
    names.sort();
    let mut report = RecoveryReport::default();
    let mut segments = BTreeMap::new();
    let mut next_seq = 0;
    let count = names.len();
    for (i, (first_seq, name)) in names.iter().enumerate() {
        let mut meta = sealed_segment(storage.as_ref(), dir, *first_seq, name, &mut report)?;
        next_seq = *first_seq;
        if i + 1 == count && meta.unreadable.is_none() {
            let (end, good_end) = scan_tail(
                storage.as_ref(),
                &meta.path,
                meta.first_seq,
                meta.len,
                TornTail::Report,
                &mut report,
            )?;
            next_seq = end;
            meta.len = good_end;
        }
        segments.insert(*first_seq, meta);
    }
    let shared = Arc::new(Shared::new(dir, storage, segments, next_seq));
    let wal = Wal { shared };
    let extent = wal.extent();
    report.segments = extent.segments;
    report.first_seq = extent.first_seq;
    report.next_seq = next_seq;
    Ok((wal, report))
}

/// What [`scan_tail`] does with a torn tail (crash point 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TornTail {
    /// Report it in [`RecoveryReport::truncated`] as what recovery would cut
    /// and leave the file alone (read-only opens, and a newest segment with
    /// an unreadable header, which is never appended to).
    Report,
    /// Cut the file back to the end of the last intact frame, sync it, and
    /// report the cut (the writer is about to append there).
    Cut,
}

/// Scans the newest segment, `len` bytes of `path`, frame by frame: returns
/// the sequence number after its last intact record and the end of its last
/// intact frame. Damage with an intact frame after it is crash point 6 and
/// goes to `report.damage`; damage that nothing intact follows is the torn
/// tail of crash point 3, reported or cut as `torn` says.
fn scan_tail(
    storage: &dyn Storage,
    path: &Path,
    first_seq: u64,
    len: u64,
    torn: TornTail,
    report: &mut RecoveryReport,
) -> Result<(u64, u64), WalError> {
    let mut cursor = SegmentCursor::open(storage, path, first_seq, len)?;
    let mut next_seq = first_seq;
    let mut good_end = cursor.offset();
    loop {
        match cursor.read_next()? {
            Scan::Frame { header, .. } => {
                next_seq = next_seq.max(header.end_seq());
                good_end = cursor.offset();
            }
            Scan::Damage {
                offset,
                reason,
                incomplete_tail,
                resume,
                ..
            } => {
                if resume >= len {
                    // Crash point 3: nothing intact follows.
                    if torn == TornTail::Cut {
                        cut(storage, path, good_end)?;
                    }
                    let kind = if incomplete_tail {
                        "torn write"
                    } else {
                        "corrupt tail"
                    };
                    report.truncated = Some(Truncation {
                        file: path.to_path_buf(),
                        offset: good_end,
                        bytes_removed: len - good_end,
                        reason: format!("{kind} at offset {offset}: {reason}"),
                    });
                    return Ok((next_seq, good_end));
                }
                // Crash point 6: corruption with intact frames after it.
                report.damage.push(Damage {
                    file: path.to_path_buf(),
                    offset,
                    reason,
                });
            }
            Scan::End => {
                // Zeros the writer reserved after its last frame (or
                // nothing): not damage, but cut like a torn tail, so that
                // the writer appends right after the last frame again.
                if good_end < len && torn == TornTail::Cut {
                    cut(storage, path, good_end)?;
                    tracing::debug!(path = %path.display(), bytes = len - good_end,
                        "cut the zeros reserved after the newest segment's last frame");
                }
                return Ok((next_seq, good_end));
            }
        }
    }
}

/// Cuts `path` back to `len` bytes and makes the cut durable before
/// anything is appended after it.
fn cut(storage: &dyn Storage, path: &Path, len: u64) -> Result<(), WalError> {
    let mut w = storage
        .open_append(path)
        .map_err(|e| WalError::io("open segment", path, e))?;
    w.set_len(len)
        .map_err(|e| WalError::io("truncate torn tail", path, e))?;
    w.sync_data().map_err(|e| WalError::SyncFailed {
        path: path.to_path_buf(),
        source: e,
    })
}

fn sealed_segment(
    storage: &dyn Storage,
    dir: &Path,
    first_seq: u64,
    name: &str,
    report: &mut RecoveryReport,
) -> Result<SegmentMeta, WalError> {
    let path = dir.join(name);
    let file = storage
        .open_read(&path)
        .map_err(|e| WalError::io("open segment", &path, e))?;
    let len = file
        .len()
        .map_err(|e| WalError::io("stat segment", &path, e))?;
    let unreadable = match read_header(file.as_ref(), &path) {
        Ok(h) if h.first_seq == first_seq => None,
        Ok(h) => Some(format!(
            "header says first sequence {} but the file name says {first_seq}",
            h.first_seq
        )),
        Err(e) => Some(e.to_string()),
    };
    if let Some(reason) = &unreadable {
        report.damage.push(Damage {
            file: path.clone(),
            offset: 0,
            reason: reason.clone(),
        });
    }
    Ok(SegmentMeta {
        first_seq,
        path,
        len,
        sealed: true,
        unreadable,
        generation: 0,
    })
}

/// Scans the last segment in full, cuts a torn tail, and returns it as the
/// segment to append to, with the next sequence number.
fn recover_last(
    storage: &dyn Storage,
    dir: &Path,
    first_seq: u64,
    name: &str,
    report: &mut RecoveryReport,
    sealed: &mut BTreeMap<u64, SegmentMeta>,
) -> Result<(Option<Active>, u64), WalError> {
    let path = dir.join(name);
    let file = storage
        .open_read(&path)
        .map_err(|e| WalError::io("open segment", &path, e))?;
    let len = file
        .len()
        .map_err(|e| WalError::io("stat segment", &path, e))?;
    let header = read_header(file.as_ref(), &path);
    drop(file);
    let version = header.as_ref().map_or(0, |h| h.version);
    let reason = match header {
        Ok(h) if h.first_seq == first_seq => None,
        Ok(h) => Some(format!(
            "header says first sequence {} but the file name says {first_seq}",
            h.first_seq
        )),
        Err(WalError::BadSegmentHeader { reason, .. })
            if reason.contains("version") && len > wal_format::SEGMENT_HEADER_LEN as u64 =>
        {
            // Written by a newer walrelay: never append to or repair it.
            return Err(WalError::BadDirectory {
                path,
                reason: format!(
                    "{reason}; this log was written by a newer walrelay, run that version"
                ),
            });
        }
        Err(e) => Some(e.to_string()),
    };
    if let Some(reason) = reason {
        if len <= wal_format::SEGMENT_HEADER_LEN as u64 {
            // Crash point 2: created but the header never became durable.
            // Nothing after a header can have been acknowledged.
            storage
                .remove(&path)
                .map_err(|e| WalError::io("remove empty segment", &path, e))?;
            storage
                .sync_dir(dir)
                .map_err(|e| WalError::io("sync directory", dir, e))?;
            report.removed.push(path);
            return Ok((None, first_seq));
        }
        // Crash point 7 on the newest segment: keep it as a sealed, damaged
        // segment whose intact frames readers still read (salted with the
        // file name's sequence), and continue in a new segment after them.
        report.damage.push(Damage {
            file: path.clone(),
            offset: 0,
            reason: reason.clone(),
        });
        let meta = SegmentMeta {
            first_seq,
            path,
            len,
            sealed: true,
            unreadable: Some(reason),
            generation: 0,
        };
        let mut scratch = RecoveryReport::default();
        let (end, _) = scan_tail(
            storage,
            &meta.path,
            first_seq,
            len,
            TornTail::Report,
            &mut scratch,
        )?;
        report.damage.extend(scratch.damage);
        if end == first_seq {
            // Nothing intact in it, and the next segment would take its
            // name: move it aside (never delete what might be evidence).
            let aside = meta.path.with_extension("wal.damaged");
            storage
                .rename(&meta.path, &aside)
                .map_err(|e| WalError::io("move damaged segment aside", &meta.path, e))?;
            storage
                .sync_dir(dir)
                .map_err(|e| WalError::io("sync directory", dir, e))?;
            report.removed.push(aside);
            return Ok((None, end));
        }
        sealed.insert(first_seq, meta);
        return Ok((None, end));
    }

    let (next_seq, good_end) = scan_tail(storage, &path, first_seq, len, TornTail::Cut, report)?;
    let seal = report.damage.iter().any(|d| d.file == path);
    Ok((
        Some(Active {
            first_seq,
            path,
            len: good_end,
            version,
            seal,
        }),
        next_seq,
    ))
}
