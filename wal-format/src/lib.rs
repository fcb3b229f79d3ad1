//! walrelay's on-disk log format, as a pure codec.
//!
//! This crate encodes into `&mut Vec<u8>` and decodes from `&[u8]`; it never
//! touches files. Writing, fsync, rolling segments and recovery live in the
//! relay (`src/wal/`). The normative description, with byte diagrams, crash
//! points, recovery rules and hex test vectors, is `SPEC.md` next to this
//! crate's `Cargo.toml`; a test reads those vectors so the two cannot drift.
//!
//! In short (all integers little-endian):
//!
//! - The log is a directory of **segment files** named
//!   `{first_seq:020}.wal` ([`segment_file_name`]), each starting with a
//!   32-byte [`SegmentHeader`] (magic `WALRELAY`, [`FORMAT_VERSION`],
//!   `first_seq`, CRC-32).
//! - After the header come **frames**: a 40-byte header (magic `WRFR`,
//!   sequence range, lengths, compression, body CRC) whose own CRC-32 is
//!   salted with the segment's `first_seq`, then the stored body — raw
//!   record entries, or one zstd frame of them ([`Compression`]).
//! - The raw body is `record_count` **record entries**: 36 bytes of
//!   [`RecordMeta`] and payload length, then the remote-write payload.
//!
//! Decoding answers one of three ([`Decoded`]): a verified frame, incomplete
//! (a torn tail when at the end of the log), or corrupt with a
//! [`CorruptReason`]; after damage [`find_next_frame`] resynchronises on the
//! next valid header. Every length is checked against its limit and against
//! the bytes present before it is used, so no input makes the decoder panic
//! or allocate more than the format limits.
//!
//! CRC-32 throughout is the IEEE polynomial as computed by `crc32fast`
//! (the zlib/PNG CRC), not CRC-32C.

#![forbid(unsafe_code)]

mod chain;
mod error;
mod frame;
mod le;
mod record;
mod segment;

pub use chain::{ChainDecoder, ChainEncoder, CHAIN_WINDOW_LOG};
pub use error::{CorruptReason, EncodeError, HeaderStatus, SegmentHeaderError};
pub use frame::{
    decode_frame, decode_frame_header, decode_records, encode_frame, find_next_frame, Compression,
    Decoded, FrameHeader, FrameSummary, FRAME_HEADER_LEN, FRAME_MAGIC, MAX_FRAME_BODY,
    MAX_FRAME_RAW,
};
pub use record::{
    record_entry_len, PayloadEncoding, PayloadKind, Record, RecordMeta, RecordRef,
    MAX_RECORD_PAYLOAD, RECORD_ENTRY_HEADER_LEN,
};
pub use segment::{
    parse_segment_file_name, segment_file_name, SegmentHeader, FORMAT_VERSION, READ_VERSIONS,
    SEGMENT_HEADER_LEN, SEGMENT_MAGIC,
};
