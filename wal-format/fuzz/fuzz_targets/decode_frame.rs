//! Coverage-guided fuzzing of the decoders:
//! `cargo +nightly fuzz run decode_frame` from `wal-format/`.
//!
//! The first 8 input bytes are the salt; the rest is walked like a
//! recovering reader would: decode, decode records, resynchronise after
//! corruption, stop at an incomplete frame. Any panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wal_format::{
    decode_frame, decode_frame_header, decode_records, find_next_frame, Decoded, SegmentHeader,
    FRAME_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((salt, buf)) = data.split_first_chunk::<8>() else {
        return;
    };
    let salt = u64::from_le_bytes(*salt);
    let _ = SegmentHeader::decode(buf);
    if let Ok(h) = decode_frame_header(salt, buf) {
        // Records of an unverified body: exercises the entry and zstd checks
        // without having to forge a body checksum.
        let end = h.total_len().min(buf.len());
        let _ = decode_records(&h, &buf[FRAME_HEADER_LEN..end]);
    }
    let mut at = 0;
    while at < buf.len() {
        match decode_frame(salt, &buf[at..]) {
            Decoded::Frame { header, body } => {
                let _ = decode_records(&header, body);
                at += header.total_len();
            }
            Decoded::Corrupt { .. } => match find_next_frame(salt, buf, at + 1) {
                Some(next) => at = next,
                None => break,
            },
            Decoded::Incomplete { needed } => {
                assert!(needed > buf.len() - at);
                break;
            }
        }
    }
});
