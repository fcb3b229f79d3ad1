//! Walking segment files in full, frame by frame, for the commands that must
//! see everything (`inspect`, `verify`, `repair`).
//!
//! The relay itself scans only the newest segment at start and checks sealed
//! ones as shippers read them; these commands read every byte of every
//! segment, through the same [`SegmentCursor`] the readers use, so they see
//! exactly what a reader would and report each damaged place by file and
//! byte offset.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use wal_format::{parse_segment_file_name, FrameHeader, Record};

use crate::wal::segment::{read_header, Scan, SegmentCursor};
use crate::wal::{RealStorage, Storage};

/// A segment file found in the log directory.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    /// From the file name; the salt of its frames' checksums.
    pub first_seq: u64,
    pub name: String,
    pub path: PathBuf,
    /// Its size on disk.
    pub len: u64,
}

/// The segment files of `wal_dir`, oldest first. Other files and
/// directories (such as `damaged/`) are ignored.
///
/// # Errors
/// The directory cannot be listed or a file cannot be examined.
pub fn list_segments(wal_dir: &Path) -> Result<Vec<SegmentFile>> {
    let mut out = Vec::new();
    let names = RealStorage
        .list(wal_dir)
        .with_context(|| format!("listing {}", wal_dir.display()))?;
    for name in names {
        let Some(first_seq) = parse_segment_file_name(&name) else {
            continue;
        };
        let path = wal_dir.join(&name);
        let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
        if !meta.is_file() {
            continue;
        }
        out.push(SegmentFile {
            first_seq,
            name,
            path,
            len: meta.len(),
        });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// What a scan found, in file order.
pub enum Event<'a> {
    /// An intact frame: `len` bytes at `offset`.
    Frame {
        offset: u64,
        len: u64,
        header: &'a FrameHeader,
        records: &'a [Record],
    },
    /// Bytes `offset..end` are not intact frames.
    Damage {
        offset: u64,
        end: u64,
        reason: String,
        code: &'static str,
        /// Runs to the end of the file and is an incomplete frame: the
        /// signature of a torn write.
        incomplete_tail: bool,
    },
}

/// Why the segment header cannot be trusted, if it cannot (unreadable, or
/// naming another first sequence number than the file name).
///
/// # Errors
/// I/O errors other than a bad header.
pub fn header_problem(seg: &SegmentFile) -> Result<Option<String>> {
    let file = RealStorage
        .open_read(&seg.path)
        .with_context(|| format!("opening {}", seg.path.display()))?;
    Ok(match read_header(file.as_ref(), &seg.path) {
        Ok(h) if h.first_seq == seg.first_seq => None,
        Ok(h) => Some(format!(
            "segment header says first sequence {} but the file name says {}",
            h.first_seq, seg.first_seq
        )),
        Err(crate::wal::WalError::BadSegmentHeader { reason, .. }) => {
            Some(format!("bad segment header: {reason}"))
        }
        Err(e) => return Err(e.into()),
    })
}

/// Reads every frame of `seg` up to `limit` bytes (its size, normally),
/// salted with the file name's sequence number as the readers do, and hands
/// each frame and each damaged range to `visit` in order.
///
/// # Errors
/// I/O errors, and whatever `visit` returns.
pub fn scan_segment(
    seg: &SegmentFile,
    limit: u64,
    mut visit: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<()> {
    let mut cursor = SegmentCursor::open(&RealStorage, &seg.path, seg.first_seq, limit)
        .with_context(|| format!("opening {}", seg.path.display()))?;
    loop {
        let before = cursor.offset();
        match cursor
            .read_next()
            .with_context(|| format!("reading {} at offset {before}", seg.path.display()))?
        {
            Scan::Frame {
                offset,
                header,
                records,
            } => visit(Event::Frame {
                offset,
                len: cursor.offset() - offset,
                header: &header,
                records: &records,
            })?,
            Scan::Damage {
                offset,
                resume,
                reason,
                error_code,
                incomplete_tail,
            } => visit(Event::Damage {
                offset,
                end: resume,
                reason,
                code: error_code,
                incomplete_tail,
            })?,
            Scan::End => return Ok(()),
        }
    }
}
