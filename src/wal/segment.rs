//! One segment file: created with its header, and read frame by frame.
//!
//! The on-disk layout is specified in `wal-format/SPEC.md`; this module only
//! walks it. [`SegmentCursor`] reads frames sequentially up to a byte limit
//! (the durable length of the segment, so a reader never looks at bytes the
//! writer has not yet made durable) and answers, for each position, one of:
//! a frame with its records, damage (with the exact byte offset, after which it
//! has already re-synchronised on the next intact frame, if any), or the end.
//! Damage is never fatal and never loops: every answer advances the offset.
//!
//! Zero bytes from where a frame would begin up to the limit are the end,
//! not damage: the writer reserves zeros ahead of its appends (`writer.rs`),
//! and a crash leaves the ones not yet written over after the last frame
//! (recovery then cuts them off). No frame begins with a zero byte (its
//! magic is `WRFR`), so this never hides a frame; bytes of a torn frame
//! before the zeros are still reported as damage.
//!
//! Frames of a zstd chain (SPEC, "Chains") decode only in order from the
//! chain's first frame: the cursor decodes every frame with one
//! [`ChainDecoder`], goes back to a chain's first frame when a skip stops
//! inside it, and reports a frame whose chain it cannot decode (damage
//! before it in the chain) as damage that runs to the chain's end.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wal_format::{
    decode_frame, decode_frame_header, find_next_frame, segment_file_name, ChainDecoder,
    Compression, CorruptReason, Decoded, FrameHeader, HeaderStatus, Record, SegmentHeader,
    FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};

use super::env::{ReadableFile, Storage};
use super::WalError;

/// How far a resynchronising scan reads at once.
const RESYNC_CHUNK: usize = 4 << 20;

/// What a cursor found at its position.
#[derive(Debug)]
pub enum Scan {
    /// An intact frame at `offset`, with its decoded records.
    Frame {
        offset: u64,
        header: FrameHeader,
        records: Vec<Record>,
    },
    /// Bytes `offset..resume` could not be read as frames. `resume` is where
    /// the next intact frame starts, or the scan limit if there is none.
    Damage {
        offset: u64,
        resume: u64,
        reason: String,
        error_code: &'static str,
        /// True when the damage runs to the limit and is an incomplete frame
        /// (the signature of a torn write rather than of corruption).
        incomplete_tail: bool,
    },
    /// The limit was reached.
    End,
}

/// Sequential reader of one segment's frames.
pub struct SegmentCursor {
    file: Arc<dyn ReadableFile>,
    path: PathBuf,
    salt: u64,
    offset: u64,
    /// One past the last record of the last intact frame passed (skipped or
    /// read), or the segment's first sequence number before any: where the
    /// records of damage found at `offset` would begin.
    passed_seq: u64,
    limit: u64,
    buf: Vec<u8>,
    /// Decodes frames in order, zstd chains included.
    chain: ChainDecoder,
    /// Where the chain of the frame at `offset` began, and `passed_seq`
    /// there: a reader that skips to a frame inside a chain must decode it
    /// from there ([`Self::skip_to`]). None when no chain is under way.
    chain_from: Option<(u64, u64)>,
}

/// Reads and checks a segment header.
///
/// # Errors
/// [`WalError::BadSegmentHeader`] when the header is short, has the wrong
/// magic, a bad checksum or an unknown version; [`WalError::Io`] on I/O errors.
pub fn read_header(file: &dyn ReadableFile, path: &Path) -> Result<SegmentHeader, WalError> {
    let mut buf = [0u8; SEGMENT_HEADER_LEN];
    let n = file
        .read_full_at(&mut buf, 0)
        .map_err(|e| WalError::io("read segment header", path, e))?;
    SegmentHeader::decode(&buf[..n]).map_err(|e| WalError::BadSegmentHeader {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl SegmentCursor {
    /// Opens a cursor at the first frame of the segment at `path`, whose
    /// header says it starts at `salt` (its first sequence number).
    ///
    /// # Errors
    /// I/O errors opening the file.
    pub fn open(
        storage: &dyn Storage,
        path: &Path,
        salt: u64,
        limit: u64,
    ) -> Result<Self, WalError> {
        let file = storage
            .open_read(path)
            .map_err(|e| WalError::io("open segment", path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            salt,
            offset: SEGMENT_HEADER_LEN as u64,
            passed_seq: salt,
            limit,
            buf: Vec::new(),
            chain: ChainDecoder::new(),
            chain_from: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// One past the last record of the last intact frame this cursor has
    /// passed, or the segment's first sequence number before any. Damage
    /// found next can only have held records from here on: a reader opened
    /// further along tells by it whether damage lies behind its position.
    pub fn passed_seq(&self) -> u64 {
        self.passed_seq
    }

    /// Raises (never lowers) the byte limit, as the writer makes more of the
    /// active segment durable.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = self.limit.max(limit);
    }

    /// Skips whole frames that end at or before `seq`, reading only their
    /// headers. Stops at the first frame that holds `seq` or later, or at
    /// anything that is not a clean header (the next [`Self::read_next`] then
    /// deals with it). Such damage may lie wholly before `seq`: its records
    /// begin at [`Self::passed_seq`] and end where the next intact frame
    /// begins, and only the reader can tell whether that reaches `seq`.
    ///
    /// A frame that continues a zstd chain cannot be decoded without the
    /// frames before it in its chain: when it stops at one, the cursor goes
    /// back to the chain's first frame, and [`Self::read_next`] returns the
    /// chain's frames from there, records below `seq` included.
    ///
    /// # Errors
    /// I/O errors.
    pub fn skip_to(&mut self, seq: u64) -> Result<(), WalError> {
        let mut skipped = false;
        let stop = loop {
            match self.header_at(self.offset)? {
                Some(h) if h.end_seq() <= seq => {
                    self.pass_chain(self.offset, h.compression);
                    self.offset += h.total_len() as u64;
                    self.passed_seq = h.end_seq();
                    skipped = true;
                }
                stop => break stop,
            }
        };
        if !skipped {
            return Ok(());
        }
        self.chain.break_chain();
        let inside_a_chain = stop.is_some_and(|h| h.compression == Compression::ZstdChained);
        match self.chain_from {
            Some((offset, passed_seq)) if inside_a_chain => {
                self.offset = offset;
                self.passed_seq = passed_seq;
            }
            _ => self.chain_from = None,
        }
        Ok(())
    }

    /// Keeps [`Self::chain_from`] as the cursor passes the frame at
    /// `offset`, before `passed_seq` moves past it.
    fn pass_chain(&mut self, offset: u64, compression: Compression) {
        match compression {
            Compression::ZstdChainStart => self.chain_from = Some((offset, self.passed_seq)),
            Compression::ZstdChained => {}
            Compression::None | Compression::Zstd => self.chain_from = None,
        }
    }

    /// The clean header of a whole frame at `offset` within the limit, if
    /// there is one.
    fn header_at(&mut self, offset: u64) -> Result<Option<FrameHeader>, WalError> {
        if offset + FRAME_HEADER_LEN as u64 > self.limit {
            return Ok(None);
        }
        Ok(self
            .frame_header_at(offset)?
            .ok()
            .filter(|h| offset + h.total_len() as u64 <= self.limit))
    }

    /// The frame header at `offset` as the file holds it, decoded.
    fn frame_header_at(
        &mut self,
        offset: u64,
    ) -> Result<Result<FrameHeader, HeaderStatus>, WalError> {
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        let n = self
            .file
            .read_full_at(&mut hdr, offset)
            .map_err(|e| WalError::io("read frame header", &self.path, e))?;
        Ok(decode_frame_header(self.salt, &hdr[..n]))
    }

    /// Where the chain that the frame at `offset` belongs to ends: the first
    /// offset from `offset` on that is not a clean header of a frame
    /// continuing a chain.
    fn chain_end(&mut self, mut offset: u64) -> Result<u64, WalError> {
        while let Some(h) = self.header_at(offset)? {
            if h.compression != Compression::ZstdChained {
                break;
            }
            offset += h.total_len() as u64;
        }
        Ok(offset)
    }

    /// Reads the next frame, or reports damage and re-synchronises.
    ///
    /// # Errors
    /// I/O errors only; damage is a [`Scan::Damage`], not an error.
    pub fn read_next(&mut self) -> Result<Scan, WalError> {
        if self.offset >= self.limit {
            return Ok(Scan::End);
        }
        let offset = self.offset;
        let avail = (self.limit - offset) as usize;
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        let want = avail.min(FRAME_HEADER_LEN);
        let n = self
            .file
            .read_full_at(&mut hdr[..want], offset)
            .map_err(|e| WalError::io("read frame header", &self.path, e))?;
        let header = match decode_frame_header(self.salt, &hdr[..n]) {
            Ok(h) => h,
            Err(_) if self.zeros_from(offset)? == offset => {
                self.offset = self.limit;
                return Ok(Scan::End);
            }
            Err(HeaderStatus::Incomplete) => {
                return self.damage(offset, "incomplete frame header".into(), "incomplete", true)
            }
            Err(HeaderStatus::Corrupt(reason)) => return self.corrupt(offset, &reason),
        };
        let total = header.total_len();
        if total > avail {
            // The header is intact but the frame runs past the limit: a torn
            // write, unless an intact frame follows somewhere.
            return self.damage(
                offset,
                format!("frame of {total} bytes runs past the end ({avail} bytes left)"),
                "incomplete",
                true,
            );
        }
        self.buf.resize(total, 0);
        let n = self
            .file
            .read_full_at(&mut self.buf, offset)
            .map_err(|e| WalError::io("read frame", &self.path, e))?;
        if n < total {
            return self.damage(
                offset,
                "file shorter than expected".into(),
                "incomplete",
                true,
            );
        }
        match decode_frame(self.salt, &self.buf) {
            Decoded::Frame { header, body } => match self.chain.decode(&header, body) {
                Ok(records) => {
                    self.pass_chain(offset, header.compression);
                    self.offset = offset + total as u64;
                    self.passed_seq = header.end_seq();
                    Ok(Scan::Frame {
                        offset,
                        header,
                        records,
                    })
                }
                // The frame's checksums hold but its content does not parse:
                // only this frame is lost, and the next one starts right
                // after; unless it is a chain's, whose later frames cannot
                // be decoded without it: they are lost with it.
                Err(reason) => {
                    self.offset = offset + total as u64;
                    if header.compression.is_chained() {
                        self.offset = self.chain_end(self.offset)?;
                        self.chain_from = None;
                    }
                    Ok(Scan::Damage {
                        offset,
                        resume: self.offset,
                        reason: reason.to_string(),
                        error_code: reason.as_error_code(),
                        incomplete_tail: false,
                    })
                }
            },
            Decoded::Incomplete { .. } => {
                self.damage(offset, "incomplete frame".into(), "incomplete", true)
            }
            Decoded::Corrupt { reason } => self.corrupt(offset, &reason),
        }
    }

    fn corrupt(&mut self, offset: u64, reason: &CorruptReason) -> Result<Scan, WalError> {
        self.damage(offset, reason.to_string(), reason.as_error_code(), false)
    }

    /// Searches for the next intact frame after `offset` and reports the
    /// bytes in between as damage.
    fn damage(
        &mut self,
        offset: u64,
        reason: String,
        error_code: &'static str,
        incomplete: bool,
    ) -> Result<Scan, WalError> {
        let resume = self.resync(offset + 1)?;
        // A chain that continues after the damage lost its stream with it.
        self.chain.break_chain();
        let resume = self.chain_end(resume)?;
        self.chain_from = None;
        self.offset = resume;
        let tail = resume >= self.limit;
        let incomplete = incomplete || (tail && self.runs_into_zeros(offset)?);
        Ok(Scan::Damage {
            offset,
            resume,
            reason,
            error_code,
            incomplete_tail: incomplete && tail,
        })
    }

    /// True when the frame at `offset`, the last thing before the limit,
    /// was cut short by zeros: the file holds only zeros from a sector
    /// (512 bytes) before its declared end, or from inside its header when
    /// the header does not decode. That is a write into the writer's
    /// reserved zeros that a crash tore, not corruption. (A frame whose last
    /// bytes happen to be zeros ends inside a sector that is not all zeros.)
    fn runs_into_zeros(&mut self, offset: u64) -> Result<bool, WalError> {
        let zeros = self.zeros_from(offset)?;
        if zeros >= self.limit {
            return Ok(false);
        }
        Ok(match self.frame_header_at(offset)? {
            Ok(h) => offset + h.total_len() as u64 > zeros.div_ceil(512) * 512,
            Err(_) => zeros < offset + FRAME_HEADER_LEN as u64,
        })
    }

    /// Where the run of zero bytes that ends at the limit begins, searching
    /// back no further than `from` (the limit when the last byte is not
    /// zero; `from` when every byte from there on is zero, the zeros a
    /// writer reserved and did not write over).
    fn zeros_from(&mut self, from: u64) -> Result<u64, WalError> {
        let mut end = self.limit;
        let mut chunk = vec![0u8; 64 << 10];
        while end > from {
            let start = end.saturating_sub(chunk.len() as u64).max(from);
            let len = (end - start) as usize;
            let n = self
                .file
                .read_full_at(&mut chunk[..len], start)
                .map_err(|e| WalError::io("read segment", &self.path, e))?;
            if let Some(i) = chunk[..n].iter().rposition(|&b| b != 0) {
                return Ok(start + i as u64 + 1);
            }
            end = start;
        }
        Ok(from)
    }

    /// The offset of the first fully intact frame (both checksums) at or after
    /// `from`, or the limit. Reads in chunks that overlap by one frame header,
    /// so a header straddling two chunks is still found.
    fn resync(&mut self, from: u64) -> Result<u64, WalError> {
        let mut start = from;
        let mut chunk = Vec::new();
        while start + FRAME_HEADER_LEN as u64 <= self.limit {
            let len = ((self.limit - start) as usize).min(RESYNC_CHUNK);
            chunk.resize(len, 0);
            let n = self
                .file
                .read_full_at(&mut chunk, start)
                .map_err(|e| WalError::io("read segment", &self.path, e))?;
            chunk.truncate(n);
            let mut from_in_chunk = 0;
            while let Some(pos) = find_next_frame(self.salt, &chunk, from_in_chunk) {
                let candidate = start + pos as u64;
                if self.frame_is_intact(candidate)? {
                    return Ok(candidate);
                }
                from_in_chunk = pos + 1;
            }
            if n < len || start + (n as u64) >= self.limit {
                break;
            }
            start += (n - FRAME_HEADER_LEN) as u64 + 1;
        }
        Ok(self.limit)
    }

    fn frame_is_intact(&mut self, offset: u64) -> Result<bool, WalError> {
        let Some(header) = self.header_at(offset)? else {
            return Ok(false);
        };
        let total = header.total_len();
        let mut buf = vec![0u8; total];
        let n = self
            .file
            .read_full_at(&mut buf, offset)
            .map_err(|e| WalError::io("read frame", &self.path, e))?;
        Ok(n == total && matches!(decode_frame(self.salt, &buf), Decoded::Frame { .. }))
    }
}

/// The active segment as recovery leaves it: its metadata and its length.
pub(super) struct Active {
    pub first_seq: u64,
    pub path: PathBuf,
    pub len: u64,
    /// Its format version. The writer appends only to a segment of the
    /// version it writes (SPEC, "Version policy"), and seals an older one.
    pub version: u32,
    /// Damage was found inside it: seal it and append to a new segment, so
    /// the damaged file is never written again.
    pub seal: bool,
}

/// Creates a new segment file starting at `first_seq` and makes it and its
/// directory entry durable.
///
/// # Errors
/// [`WalError::NoSpace`] and other I/O errors; [`WalError::SyncFailed`] when
/// an fsync fails.
pub(super) fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    first_seq: u64,
) -> Result<(Box<dyn super::env::WritableFile>, PathBuf, u64), WalError> {
    let path = dir.join(segment_file_name(first_seq));
    let mut file = storage
        .create_new(&path)
        .map_err(|e| WalError::write(&path, e))?;
    let mut buf = Vec::with_capacity(wal_format::SEGMENT_HEADER_LEN);
    SegmentHeader::new(first_seq).encode(&mut buf);
    if let Err(e) = file.append(&buf) {
        // Leave no half-made segment behind: the next attempt recreates it.
        drop(file);
        let _ = storage.remove(&path);
        return Err(WalError::write(&path, e));
    }
    file.sync_data().map_err(|e| WalError::SyncFailed {
        path: path.clone(),
        source: e,
    })?;
    storage.sync_dir(dir).map_err(|e| WalError::SyncFailed {
        path: dir.to_path_buf(),
        source: e,
    })?;
    Ok((file, path, buf.len() as u64))
}
