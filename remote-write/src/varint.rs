//! Protobuf's base-128 varints, written by the encoders (`canon`) and by the
//! snappy writer (`sink`, whose length headers are the same varints), and
//! read by the snappy header check (`decode`). It imports nothing of the
//! crate; `pb` keeps its own reader, which reports prost's errors.

/// `v` as a minimal varint: its bytes and their number.
pub(crate) fn encode(mut v: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        bytes[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    (bytes, n + 1)
}

/// The number of bytes of `v` as a minimal varint.
pub(crate) fn len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// The varint at the start of `b` (at most 10 bytes, little-endian groups
/// of 7 bits); `None` when it does not end within them or overflows.
pub(crate) fn read(b: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}
