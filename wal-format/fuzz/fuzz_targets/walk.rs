//! The body of the `decode_frame` fuzz target, apart from libfuzzer so that
//! `tests/decode_never_panics.rs` runs the very same walk, with seeded
//! mutations, under `cargo test`.

use wal_format::{
    decode_frame, decode_frame_header, decode_records, find_next_frame, Decoded, SegmentHeader,
    FRAME_HEADER_LEN,
};

/// The fuzz target's input: the first 8 bytes are the salt, the rest is
/// [`walk_frames`]. Returns the number of intact frames.
pub fn walk(data: &[u8]) -> usize {
    let Some((salt, buf)) = data.split_first_chunk::<8>() else {
        return 0;
    };
    walk_frames(u64::from_le_bytes(*salt), buf, &mut |_| {})
}

/// Walks `buf` like a recovering reader would: decode, decode records,
/// resynchronise after corruption, stop at an incomplete frame. Any panic
/// is a bug. Each refusal's error code goes to `refused`; returns the
/// number of frames whose checksums held.
pub fn walk_frames(salt: u64, buf: &[u8], refused: &mut dyn FnMut(&'static str)) -> usize {
    let _ = SegmentHeader::decode(buf);
    if let Ok(h) = decode_frame_header(salt, buf) {
        // Records of an unverified body: exercises the entry and zstd checks
        // without having to forge a body checksum.
        let end = h.total_len().min(buf.len());
        if let Err(e) = decode_records(&h, &buf[FRAME_HEADER_LEN..end]) {
            refused(e.as_error_code());
        }
    }
    let (mut at, mut frames) = (0, 0);
    while at < buf.len() {
        match decode_frame(salt, &buf[at..]) {
            Decoded::Frame { header, body } => {
                if let Err(e) = decode_records(&header, body) {
                    refused(e.as_error_code());
                }
                frames += 1;
                at += header.total_len();
            }
            Decoded::Corrupt { reason } => {
                assert!(!reason.to_string().is_empty());
                refused(reason.as_error_code());
                match find_next_frame(salt, buf, at + 1) {
                    Some(next) => at = next,
                    None => break,
                }
            }
            Decoded::Incomplete { needed } => {
                assert!(needed > buf.len() - at);
                break;
            }
        }
    }
    frames
}
