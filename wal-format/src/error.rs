//! Error types of the codec, one enum per concern.
//!
//! Every variant says when it happens and whether the caller can recover.
//! Each enum has `as_error_code()`: a stable snake_case string meant for
//! metric labels and structured logs; those strings never change meaning once
//! released (a new reason gets a new code).

use thiserror::Error;

/// Why bytes that should hold a frame (or its records) cannot be trusted.
///
/// A `CorruptReason` is never produced for a buffer that merely ends early:
/// that is [`crate::Decoded::Incomplete`]. None of these is recoverable for
/// the frame in question; the log reader skips the frame (see
/// [`crate::find_next_frame`]) and reports the lost sequence range.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CorruptReason {
    /// The first four bytes are not `b"WRFR"`: this offset is not the start of
    /// a frame (garbage, zeroed blocks, or a misaligned offset).
    #[error("bad frame magic {found:02x?} (expected \"WRFR\")")]
    BadMagic {
        /// The four bytes found where the magic should be.
        found: [u8; 4],
    },
    /// The frame header checksum does not match. Either the header is damaged,
    /// or it is an intact frame salted for a different segment (a stale frame
    /// left in a reused or copied file).
    #[error("frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); damaged header or frame from another segment")]
    BadHeaderChecksum {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over salt + header bytes 8..40.
        computed: u32,
    },
    /// The body checksum does not match: the payload bytes were damaged after
    /// being written (the header itself verified).
    #[error("frame body checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadBodyChecksum {
        /// CRC stored in the header.
        stored: u32,
        /// CRC computed over the stored body.
        computed: u32,
    },
    /// A field reserved in format v1 is not zero. The header checksum was
    /// valid, so this is a writer from a newer format or a writer bug.
    #[error("reserved field `{field}` is not zero (value {value:#x}); written by an incompatible writer")]
    ReservedNotZero {
        /// Which reserved field (e.g. `frame.reserved29`, `record.reserved`).
        field: &'static str,
        /// The non-zero value found.
        value: u64,
    },
    /// The compression byte is not one this build knows (0 = none,
    /// 1 = zstd, 2 and 3 = a zstd chain's first and later frames).
    #[error("unknown frame compression {0} (this build knows 0 = none, 1 = zstd, 2 = zstd chain start, 3 = zstd chain continued)")]
    BadCompression(u8),
    /// The header declares zero records; every frame holds at least one.
    #[error("frame declares zero records")]
    ZeroRecordCount,
    /// A length field exceeds its format limit. Checked before any read or
    /// allocation, so a damaged length never becomes an allocation size.
    #[error("{field} {len} exceeds the limit {limit}")]
    LengthOverLimit {
        /// Which length (`body_len`, `raw_len`, `payload_len`).
        field: &'static str,
        /// The declared length.
        len: u64,
        /// The format limit it exceeds.
        limit: u64,
    },
    /// `first_seq + record_count` does not fit in a u64.
    #[error("sequence range overflows: first_seq {first_seq} + record_count {record_count}")]
    SeqOverflow {
        /// Declared first sequence number.
        first_seq: u64,
        /// Declared record count.
        record_count: u32,
    },
    /// `raw_len` is too small to hold `record_count` record entry headers.
    #[error("raw_len {raw_len} cannot hold {record_count} record entries of at least 36 bytes")]
    RecordCountExceedsBody {
        /// Declared record count.
        record_count: u32,
        /// Declared raw (decompressed) body length.
        raw_len: u32,
    },
    /// The decompressed body length differs from the declared `raw_len` (for
    /// an uncompressed frame: `body_len != raw_len`).
    #[error("raw body length {actual} differs from the declared raw_len {expected}")]
    RawLengthMismatch {
        /// Declared `raw_len`.
        expected: u32,
        /// Length actually found (or declared by the zstd frame).
        actual: u64,
    },
    /// The body slice handed to [`crate::decode_records`] is not `body_len`
    /// bytes long: a caller bug rather than damage on disk.
    #[error("body slice is {actual} bytes but the header declares body_len {expected}")]
    BodyLengthMismatch {
        /// Declared `body_len`.
        expected: u32,
        /// Length of the slice passed in.
        actual: usize,
    },
    /// The zstd body is not a valid zstd frame, or decompressing it failed
    /// (including: it would produce more than `raw_len` bytes).
    #[error("zstd decompression failed: {0}")]
    Decompress(String),
    /// The frame continues a zstd chain (compression 3) whose frames before
    /// it were not decoded by this reader, right before it: one of them is
    /// damaged, or the reader did not start at the chain's first frame. Its
    /// bytes verified, but they cannot be decompressed without the chain's
    /// earlier output.
    #[error(
        "frame continues a zstd chain whose earlier frames were not decoded (damaged, or not read)"
    )]
    ChainBroken,
    /// The zstd body holds bytes after its single zstd frame.
    #[error("zstd body holds {trailing} bytes after its zstd frame")]
    ZstdTrailingBytes {
        /// Bytes after the end of the first zstd frame.
        trailing: usize,
    },
    /// A record entry (its 36-byte header or its payload) runs past the end
    /// of the raw body.
    #[error("record entry {index} at raw offset {offset} needs {needed} bytes but only {remaining} remain")]
    EntryOverrun {
        /// Index of the entry within the frame (0-based).
        index: u32,
        /// Offset of the entry in the raw body.
        offset: usize,
        /// Bytes the entry needs from `offset`.
        needed: u64,
        /// Bytes left in the raw body from `offset`.
        remaining: usize,
    },
    /// A record's `kind` byte is not a known payload kind.
    #[error("unknown record payload kind {0} (known: 1 = remote-write 1.0, 2 = remote-write 2.0)")]
    UnknownKind(u8),
    /// A record's `encoding` byte is not a known payload encoding.
    #[error("unknown record payload encoding {0} (known: 0 = identity, 1 = snappy)")]
    UnknownEncoding(u8),
    /// Bytes are left in the raw body after `record_count` entries.
    #[error("{count} bytes left in the raw body after the last declared record")]
    TrailingBytes {
        /// Number of leftover bytes.
        count: usize,
    },
    /// The raw body ends exactly at an entry boundary but before
    /// `record_count` entries were read.
    #[error("frame declares {expected} records but its body holds {found}")]
    RecordCountMismatch {
        /// Declared record count.
        expected: u32,
        /// Entries actually present.
        found: u32,
    },
}

impl CorruptReason {
    /// A stable snake_case code for metric labels (never localised, never
    /// reworded).
    pub fn as_error_code(&self) -> &'static str {
        match self {
            Self::BadMagic { .. } => "bad_magic",
            Self::BadHeaderChecksum { .. } => "bad_header_checksum",
            Self::BadBodyChecksum { .. } => "bad_body_checksum",
            Self::ReservedNotZero { .. } => "reserved_not_zero",
            Self::BadCompression(_) => "bad_compression",
            Self::ZeroRecordCount => "zero_record_count",
            Self::LengthOverLimit { .. } => "length_over_limit",
            Self::SeqOverflow { .. } => "seq_overflow",
            Self::RecordCountExceedsBody { .. } => "record_count_exceeds_body",
            Self::RawLengthMismatch { .. } => "raw_length_mismatch",
            Self::BodyLengthMismatch { .. } => "body_length_mismatch",
            Self::Decompress(_) => "decompress",
            Self::ZstdTrailingBytes { .. } => "zstd_trailing_bytes",
            Self::ChainBroken => "chain_broken",
            Self::EntryOverrun { .. } => "entry_overrun",
            Self::UnknownKind(_) => "unknown_kind",
            Self::UnknownEncoding(_) => "unknown_encoding",
            Self::TrailingBytes { .. } => "trailing_bytes",
            Self::RecordCountMismatch { .. } => "record_count_mismatch",
        }
    }
}

/// Result of [`crate::decode_frame_header`] when no header can be returned.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HeaderStatus {
    /// Fewer than 40 bytes are available. At the end of the active segment
    /// this is a torn tail (recoverable by truncation); elsewhere, read more.
    #[error("frame header incomplete (fewer than 40 bytes)")]
    Incomplete,
    /// The 40 bytes present are not a valid frame header.
    #[error("corrupt frame header: {0}")]
    Corrupt(CorruptReason),
}

/// Why a segment header cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SegmentHeaderError {
    /// Fewer than 32 bytes: the file was created but the header never fully
    /// reached the disk (crash right after creation). Recoverable: for the
    /// last segment, recovery deletes or rewrites the file.
    #[error("segment header incomplete (fewer than 32 bytes)")]
    Incomplete,
    /// The file does not start with `b"WALRELAY"`: not a walrelay segment, or
    /// its first sector is destroyed. Not recoverable for this file.
    #[error("bad segment magic (expected \"WALRELAY\"); not a walrelay segment or its first sector is damaged")]
    BadMagic,
    /// The file was written by a format version this build does not read.
    /// Not recoverable by this build: upgrade walrelay (or, if the number is
    /// implausible, the header is damaged).
    #[error("unsupported segment format version {0} (this build reads versions 1 and 2); upgrade walrelay or restore the file")]
    UnsupportedVersion(u32),
    /// The header checksum does not match: the header is damaged. Not
    /// recoverable for this file (its salt, `first_seq`, is untrusted; the
    /// file name still tells which sequence it should start at).
    #[error("segment header checksum mismatch; the header is damaged")]
    BadChecksum,
    /// The flags word is not zero: written by a newer writer using a feature
    /// this build does not know. Not recoverable by this build.
    #[error("unsupported segment flags {0:#x} (format v1 defines none)")]
    UnsupportedFlags(u32),
    /// The reserved word at offset 24 is not zero (newer writer or writer bug).
    #[error("segment header reserved field is not zero ({0:#x})")]
    ReservedNotZero(u32),
}

impl SegmentHeaderError {
    /// A stable snake_case code for metric labels.
    pub fn as_error_code(&self) -> &'static str {
        match self {
            Self::Incomplete => "segment_header_incomplete",
            Self::BadMagic => "segment_bad_magic",
            Self::UnsupportedVersion(_) => "segment_unsupported_version",
            Self::BadChecksum => "segment_bad_checksum",
            Self::UnsupportedFlags(_) => "segment_unsupported_flags",
            Self::ReservedNotZero(_) => "segment_reserved_not_zero",
        }
    }
}

/// Why [`crate::encode_frame`] refused to encode. `out` is left unchanged.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// No records were given; a frame holds at least one. A caller bug.
    #[error("cannot encode a frame with no records")]
    Empty,
    /// One payload exceeds [`crate::MAX_RECORD_PAYLOAD`]. Not recoverable for
    /// that record: ingest must refuse such a request before logging it.
    #[error("record payload of {len} bytes exceeds the limit of {limit} bytes", limit = crate::MAX_RECORD_PAYLOAD)]
    PayloadTooLarge {
        /// The payload length.
        len: usize,
    },
    /// The records together exceed [`crate::MAX_FRAME_RAW`]. Recoverable:
    /// split the batch into several frames.
    #[error("frame raw body of {raw_len} bytes exceeds the limit of {limit} bytes", limit = crate::MAX_FRAME_RAW)]
    FrameTooLarge {
        /// The raw body length the records would need.
        raw_len: usize,
    },
    /// `first_seq + records.len()` does not fit in a u64. A caller bug.
    #[error("sequence range overflows: first_seq {first_seq} + {record_count} records")]
    SeqOverflow {
        /// Requested first sequence number.
        first_seq: u64,
        /// Number of records.
        record_count: usize,
    },
    /// The zstd compressor failed (e.g. allocation failure inside zstd).
    /// Recoverable: retry with [`crate::Compression::None`].
    #[error("zstd compression failed: {0}")]
    Compress(#[source] std::io::Error),
}

impl EncodeError {
    /// A stable snake_case code for metric labels.
    pub fn as_error_code(&self) -> &'static str {
        match self {
            Self::Empty => "empty_frame",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::FrameTooLarge { .. } => "frame_too_large",
            Self::SeqOverflow { .. } => "seq_overflow",
            Self::Compress(_) => "compress",
        }
    }
}
