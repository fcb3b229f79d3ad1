//! Frames: the unit of checksumming and compression.
//!
//! A frame is a 40-byte header followed by `body_len` stored body bytes. The
//! header checksum is salted with the segment's `first_seq` and covers the
//! body checksum, so one verified header vouches for the lengths, and the
//! body checksum for the payload. See SPEC.md for the byte layout.

use bytes::Bytes;

use crate::error::{CorruptReason, EncodeError, HeaderStatus};
use crate::le::{put, u16_at, u32_at, u64_at};
use crate::record::{encode_entry, record_entry_len, split_entries, Record, RecordRef};
use crate::record::{MAX_RECORD_PAYLOAD, RECORD_ENTRY_HEADER_LEN};

/// The first four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"WRFR";
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 40;
/// Largest raw (decompressed) body of one frame: 128 MiB.
pub const MAX_FRAME_RAW: usize = 128 << 20;
/// Largest stored body of one frame: [`MAX_FRAME_RAW`] plus 1 MiB, room for
/// zstd's worst-case expansion (a writer never stores an expanded body, but
/// the limit is what a reader enforces).
pub const MAX_FRAME_BODY: usize = MAX_FRAME_RAW + (1 << 20);

/// How a frame's body is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Compression {
    /// The body is the raw record entries.
    None = 0,
    /// The body is one zstd frame that decompresses to the raw entries.
    Zstd = 1,
    /// The body begins a zstd stream and ends at a flush: it decompresses
    /// to the raw entries on its own, and the next frames of its chain
    /// continue the stream (see [`crate::chain`]).
    ZstdChainStart = 2,
    /// The body continues the zstd stream of the frame right before it in
    /// the segment, up to a flush: only a decoder that decoded that frame
    /// can decompress it.
    ZstdChained = 3,
}

impl Compression {
    /// The compression stored as `v`, or `None` for an unknown value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Zstd),
            2 => Some(Self::ZstdChainStart),
            3 => Some(Self::ZstdChained),
            _ => None,
        }
    }

    /// True for the frames of a zstd chain (2 and 3).
    pub fn is_chained(self) -> bool {
        matches!(self, Self::ZstdChainStart | Self::ZstdChained)
    }
}

/// A verified frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Sequence number of the frame's first record.
    pub first_seq: u64,
    /// Number of records in the frame (at least 1).
    pub record_count: u32,
    /// Stored body length in bytes.
    pub body_len: u32,
    /// Body length after decompression (equal to `body_len` when the body
    /// is not compressed).
    pub raw_len: u32,
    /// How the body is stored.
    pub compression: Compression,
    /// CRC-32 (IEEE) of the stored body.
    pub body_crc: u32,
}

impl FrameHeader {
    /// Bytes the whole frame occupies: header plus stored body.
    pub fn total_len(&self) -> usize {
        FRAME_HEADER_LEN + self.body_len as usize
    }

    /// Sequence number just past the frame's last record.
    pub fn end_seq(&self) -> u64 {
        // Decoded headers never overflow (checked); saturate for hand-built ones.
        self.first_seq.saturating_add(u64::from(self.record_count))
    }

    /// The 40 header bytes as stored in a segment whose `first_seq` is
    /// `salt`. [`encode_frame`] is the normal way to write frames; this is for
    /// tools and tests that build frames (or damaged frames) by hand.
    pub fn encode(&self, salt: u64) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        put(&mut h, 0, &FRAME_MAGIC);
        put(&mut h, 8, &self.first_seq.to_le_bytes());
        put(&mut h, 16, &self.record_count.to_le_bytes());
        put(&mut h, 20, &self.body_len.to_le_bytes());
        put(&mut h, 24, &self.raw_len.to_le_bytes());
        h[28] = self.compression as u8;
        // 29, 30..32 and 36..40 stay zero (reserved).
        put(&mut h, 32, &self.body_crc.to_le_bytes());
        let crc = header_crc(salt, &h);
        put(&mut h, 4, &crc.to_le_bytes());
        h
    }
}

/// What [`encode_frame`] appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSummary {
    /// Sequence number of the frame's first record.
    pub first_seq: u64,
    /// Number of records in the frame.
    pub record_count: u32,
    /// Total bytes appended (header plus stored body).
    pub len: usize,
    /// Raw (uncompressed) body length.
    pub raw_len: usize,
}

/// The decoder's answer for the bytes at the start of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A frame whose header and body checksums verified. `body` is the stored
    /// (possibly compressed) body; pass it to [`decode_records`].
    Frame {
        /// The verified header.
        header: FrameHeader,
        /// The stored body bytes.
        body: &'a [u8],
    },
    /// The buffer ends before the frame does. `needed` is the total number
    /// of bytes, counted from the start of the buffer, that decoding needs
    /// (40 while the header is incomplete, then the frame's total length).
    /// At the end of the last segment this is a torn tail.
    Incomplete {
        /// Bytes needed from the start of the buffer (always > its length).
        needed: usize,
    },
    /// The bytes are not a valid frame.
    Corrupt {
        /// Why.
        reason: CorruptReason,
    },
}

/// The salted header checksum: CRC-32 over the salt (u64 LE) followed by
/// header bytes 8..40. Salting ties a frame to its segment.
fn header_crc(salt: u64, h: &[u8; FRAME_HEADER_LEN]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&salt.to_le_bytes());
    c.update(&h[8..]);
    c.finalize()
}

/// Encodes one frame holding `records` (sequence numbers `first_seq`,
/// `first_seq + 1`, ...) for the segment whose first sequence is `salt`, and
/// appends it to `out`.
///
/// With [`Compression::Zstd`] the raw body is compressed at `zstd_level`; if
/// that does not make it smaller the frame is stored uncompressed (the
/// summary and header then say [`Compression::None`]'s lengths).
///
/// # Errors
/// [`EncodeError::Empty`], [`EncodeError::PayloadTooLarge`],
/// [`EncodeError::FrameTooLarge`] and [`EncodeError::SeqOverflow`] are
/// checked before anything is written; [`EncodeError::Compress`] if zstd
/// fails. On any error `out` is left as it was.
pub fn encode_frame(
    salt: u64,
    first_seq: u64,
    records: &[RecordRef<'_>],
    compression: Compression,
    zstd_level: i32,
    out: &mut Vec<u8>,
) -> Result<FrameSummary, EncodeError> {
    let raw_len = checked_raw_len(first_seq, records)?;
    let start = out.len();
    let body_start = start + FRAME_HEADER_LEN;
    out.resize(body_start, 0);
    let stored = match append_body(records, raw_len, compression, zstd_level, out) {
        Ok(stored) => stored,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    Ok(write_header(
        salt,
        first_seq,
        records.len(),
        raw_len,
        stored,
        start,
        out,
    ))
}

/// Writes the header of the frame whose body ends `out` and whose header
/// space begins at `start` (the body right after it).
pub(crate) fn write_header(
    salt: u64,
    first_seq: u64,
    record_count: usize,
    raw_len: usize,
    compression: Compression,
    start: usize,
    out: &mut [u8],
) -> FrameSummary {
    let body_start = start + FRAME_HEADER_LEN;
    let body = &out[body_start..];
    // The casts are lossless: the caller checked the record count and
    // raw_len against the limits, and a body is at most zstd's bound of
    // raw_len (never longer than it, outside a chain).
    let header = FrameHeader {
        first_seq,
        record_count: record_count as u32,
        body_len: body.len() as u32,
        raw_len: raw_len as u32,
        compression,
        body_crc: crc32fast::hash(body),
    };
    out[start..body_start].copy_from_slice(&header.encode(salt));
    FrameSummary {
        first_seq,
        record_count: header.record_count,
        len: out.len() - start,
        raw_len,
    }
}

/// Checks the batch against every limit and returns its raw body length.
pub(crate) fn checked_raw_len(
    first_seq: u64,
    records: &[RecordRef<'_>],
) -> Result<usize, EncodeError> {
    if records.is_empty() {
        return Err(EncodeError::Empty);
    }
    let mut raw_len = 0usize;
    for r in records {
        if r.payload.len() > MAX_RECORD_PAYLOAD {
            return Err(EncodeError::PayloadTooLarge {
                len: r.payload.len(),
            });
        }
        raw_len = raw_len.saturating_add(record_entry_len(r.payload.len()));
    }
    if raw_len > MAX_FRAME_RAW {
        return Err(EncodeError::FrameTooLarge { raw_len });
    }
    if first_seq.checked_add(records.len() as u64).is_none() {
        return Err(EncodeError::SeqOverflow {
            first_seq,
            record_count: records.len(),
        });
    }
    Ok(raw_len)
}

/// Appends the stored body and returns how it ended up stored.
fn append_body(
    records: &[RecordRef<'_>],
    raw_len: usize,
    compression: Compression,
    zstd_level: i32,
    out: &mut Vec<u8>,
) -> Result<Compression, EncodeError> {
    let encode_all = |buf: &mut Vec<u8>| {
        buf.reserve(raw_len);
        records.iter().for_each(|r| encode_entry(r, buf));
    };
    if compression == Compression::None {
        encode_all(out);
        return Ok(Compression::None);
    }
    let mut raw = Vec::new();
    encode_all(&mut raw);
    let packed = compress(&raw, zstd_level).map_err(EncodeError::Compress)?;
    // A compressed body that saves nothing would only cost readers time.
    if packed.len() < raw.len() {
        out.extend_from_slice(&packed);
        Ok(Compression::Zstd)
    } else {
        out.extend_from_slice(&raw);
        Ok(Compression::None)
    }
}

thread_local! {
    /// A zstd compression context per thread, kept for the next frame: the
    /// log has one writer thread, and a context created per frame (what
    /// `zstd::bulk::compress` does) cost a fifth as much as the compression
    /// of a group commit itself in a profile (issue 19).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// `zstd::bulk::compress(raw, level)`, byte for byte, with this thread's
/// context.
fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match &mut *slot {
            Some((l, c)) if *l == level => c,
            _ => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        compressor.compress(raw)
    })
}

/// Decodes the frame starting at `buf[0]` in the segment whose first
/// sequence is `salt`, verifying both checksums. Never panics, and never
/// allocates or reads according to an unverified length.
///
/// Checks, in order: 40 header bytes present (else `Incomplete`), magic,
/// header checksum, header fields (see [`decode_frame_header`]), body present
/// (else `Incomplete`), body checksum.
pub fn decode_frame(salt: u64, buf: &[u8]) -> Decoded<'_> {
    let header = match decode_frame_header(salt, buf) {
        Ok(header) => header,
        Err(HeaderStatus::Incomplete) => {
            return Decoded::Incomplete {
                needed: FRAME_HEADER_LEN,
            }
        }
        Err(HeaderStatus::Corrupt(reason)) => return Decoded::Corrupt { reason },
    };
    let Some(body) = buf.get(FRAME_HEADER_LEN..header.total_len()) else {
        return Decoded::Incomplete {
            needed: header.total_len(),
        };
    };
    let computed = crc32fast::hash(body);
    if computed != header.body_crc {
        let reason = CorruptReason::BadBodyChecksum {
            stored: header.body_crc,
            computed,
        };
        return Decoded::Corrupt { reason };
    }
    Decoded::Frame { header, body }
}

/// Decodes and checks only the frame header at `buf[0]` (the body is neither
/// needed nor verified): for indexing a segment by skipping from header to
/// header with [`FrameHeader::total_len`].
///
/// # Errors
/// [`HeaderStatus::Incomplete`] if `buf` is shorter than 40 bytes.
/// [`HeaderStatus::Corrupt`] for a bad magic, a bad header checksum (including
/// a frame salted for another segment), a non-zero reserved field, an unknown
/// compression, zero records, a length over its limit, a sequence range that
/// overflows, a `raw_len` too small for `record_count` entries, or an
/// uncompressed frame whose `body_len` differs from `raw_len`.
pub fn decode_frame_header(salt: u64, buf: &[u8]) -> Result<FrameHeader, HeaderStatus> {
    let h = buf
        .first_chunk::<FRAME_HEADER_LEN>()
        .ok_or(HeaderStatus::Incomplete)?;
    check_header_integrity(salt, h).map_err(HeaderStatus::Corrupt)?;
    parse_header(h).map_err(HeaderStatus::Corrupt)
}

/// Magic and salted checksum: whether these 40 bytes were written as a frame
/// header of this segment.
fn check_header_integrity(salt: u64, h: &[u8; FRAME_HEADER_LEN]) -> Result<(), CorruptReason> {
    if h[..4] != FRAME_MAGIC {
        let found = [h[0], h[1], h[2], h[3]];
        return Err(CorruptReason::BadMagic { found });
    }
    let (stored, computed) = (u32_at(h, 4), header_crc(salt, h));
    if stored != computed {
        return Err(CorruptReason::BadHeaderChecksum { stored, computed });
    }
    Ok(())
}

/// Field checks of a header whose checksum verified. A failure here means an
/// incompatible writer or a writer bug, not media damage.
fn parse_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, CorruptReason> {
    check_reserved(h)?;
    let compression = Compression::from_u8(h[28]).ok_or(CorruptReason::BadCompression(h[28]))?;
    let header = FrameHeader {
        first_seq: u64_at(h, 8),
        record_count: u32_at(h, 16),
        body_len: u32_at(h, 20),
        raw_len: u32_at(h, 24),
        compression,
        body_crc: u32_at(h, 32),
    };
    check_lengths(&header)?;
    Ok(header)
}

fn check_reserved(h: &[u8; FRAME_HEADER_LEN]) -> Result<(), CorruptReason> {
    let fields = [
        ("frame.reserved29", u64::from(h[29])),
        ("frame.reserved30", u64::from(u16_at(h, 30))),
        ("frame.reserved36", u64::from(u32_at(h, 36))),
    ];
    match fields.into_iter().find(|&(_, value)| value != 0) {
        Some((field, value)) => Err(CorruptReason::ReservedNotZero { field, value }),
        None => Ok(()),
    }
}

/// Every length is checked against its limit here, before anything reads or
/// allocates by it.
fn check_lengths(h: &FrameHeader) -> Result<(), CorruptReason> {
    if h.record_count == 0 {
        return Err(CorruptReason::ZeroRecordCount);
    }
    over_limit("body_len", h.body_len, MAX_FRAME_BODY)?;
    over_limit("raw_len", h.raw_len, MAX_FRAME_RAW)?;
    if h.first_seq.checked_add(u64::from(h.record_count)).is_none() {
        return Err(CorruptReason::SeqOverflow {
            first_seq: h.first_seq,
            record_count: h.record_count,
        });
    }
    let min_raw = u64::from(h.record_count) * RECORD_ENTRY_HEADER_LEN as u64;
    if u64::from(h.raw_len) < min_raw {
        return Err(CorruptReason::RecordCountExceedsBody {
            record_count: h.record_count,
            raw_len: h.raw_len,
        });
    }
    if h.compression == Compression::None && h.body_len != h.raw_len {
        return Err(CorruptReason::RawLengthMismatch {
            expected: h.raw_len,
            actual: u64::from(h.body_len),
        });
    }
    Ok(())
}

fn over_limit(field: &'static str, len: u32, limit: usize) -> Result<(), CorruptReason> {
    if len as usize > limit {
        return Err(CorruptReason::LengthOverLimit {
            field,
            len: u64::from(len),
            limit: limit as u64,
        });
    }
    Ok(())
}

/// Decompresses `body` (bounded by `header.raw_len`, never more) and splits
/// it into the frame's records, numbered from `header.first_seq`.
///
/// `body` must be the body [`decode_frame`] returned with `header`; its
/// checksum is not checked again here.
///
/// The frames of a zstd chain (compression 2 and 3) decode only in order,
/// each after the ones before it in its chain, by a [`crate::ChainDecoder`]
/// (which decodes every other frame as this does): here they are
/// [`CorruptReason::ChainBroken`].
///
/// # Errors
/// [`CorruptReason::BodyLengthMismatch`] if `body` is not `body_len` bytes;
/// `Decompress`, `ZstdTrailingBytes` or `RawLengthMismatch` for a zstd body
/// that is invalid or does not produce exactly `raw_len` bytes; `ChainBroken`
/// for a chain's later frame; and
/// `EntryOverrun`, `LengthOverLimit`, `UnknownKind`, `UnknownEncoding`,
/// `ReservedNotZero`, `TrailingBytes` or `RecordCountMismatch` when the raw
/// body is not exactly `record_count` well-formed entries.
pub fn decode_records(header: &FrameHeader, body: &[u8]) -> Result<Vec<Record>, CorruptReason> {
    check_body_len(header, body)?;
    let raw = match header.compression {
        Compression::None => Bytes::copy_from_slice(body),
        Compression::Zstd => Bytes::from(decompress(body, header.raw_len)?),
        Compression::ZstdChainStart | Compression::ZstdChained => {
            return Err(CorruptReason::ChainBroken)
        }
    };
    if raw.len() != header.raw_len as usize {
        return Err(CorruptReason::RawLengthMismatch {
            expected: header.raw_len,
            actual: raw.len() as u64,
        });
    }
    split_entries(&raw, header.first_seq, header.record_count)
}

/// `body` is the `body_len` bytes its header declares (a caller's slice,
/// not damage on disk, when it is not).
pub(crate) fn check_body_len(header: &FrameHeader, body: &[u8]) -> Result<(), CorruptReason> {
    if body.len() != header.body_len as usize {
        return Err(CorruptReason::BodyLengthMismatch {
            expected: header.body_len,
            actual: body.len(),
        });
    }
    Ok(())
}

/// Decompresses a body that must be exactly one zstd frame producing exactly
/// `raw_len` bytes. The output buffer is `raw_len` bytes (a verified,
/// limit-checked length) and zstd fails rather than grow it.
fn decompress(body: &[u8], raw_len: u32) -> Result<Vec<u8>, CorruptReason> {
    use zstd::zstd_safe;
    // The frame's own content size, when present, lets a mismatch be refused
    // before allocating anything.
    match zstd_safe::get_frame_content_size(body) {
        Err(_) => {
            return Err(CorruptReason::Decompress(
                "body does not start with a valid zstd frame header".into(),
            ))
        }
        Ok(Some(n)) if n != u64::from(raw_len) => {
            return Err(CorruptReason::RawLengthMismatch {
                expected: raw_len,
                actual: n,
            })
        }
        Ok(_) => {}
    }
    let frame_len = zstd_safe::find_frame_compressed_size(body)
        .map_err(|code| CorruptReason::Decompress(zstd_safe::get_error_name(code).into()))?;
    if frame_len != body.len() {
        let trailing = body.len().saturating_sub(frame_len);
        return Err(CorruptReason::ZstdTrailingBytes { trailing });
    }
    zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress(body, raw_len as usize))
        .map_err(|e| CorruptReason::Decompress(e.to_string()))
}

/// Finds where decoding can resume after damage: the smallest offset
/// `>= from` at which 40 bytes start with the frame magic and carry a valid
/// header checksum for this segment's `salt`.
///
/// Only the header checksum is checked (cheap); the caller decodes the frame
/// there with [`decode_frame`], which also verifies the body, and searches
/// again from the next offset if that fails. `None` if no such header starts
/// in `buf[from..]` (a header cut off by the end of `buf` is not found).
pub fn find_next_frame(salt: u64, buf: &[u8], from: usize) -> Option<usize> {
    let mut pos = from;
    loop {
        let at = pos + buf.get(pos..)?.windows(4).position(|w| w == FRAME_MAGIC)?;
        // If this magic has no room for a header, no later one has either.
        let h = buf.get(at..)?.first_chunk::<FRAME_HEADER_LEN>()?;
        if check_header_integrity(salt, h).is_ok() {
            return Some(at);
        }
        pos = at + 1;
    }
}

#[cfg(test)]
mod tests;
