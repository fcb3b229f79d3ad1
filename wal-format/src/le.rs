//! Little-endian field access for fixed-layout headers.
//!
//! Callers only pass offsets inside buffers whose length they have already
//! checked (the headers are fixed-size arrays), so the indexing here cannot be
//! reached by any input; it would only fire on a programming error.

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

pub(crate) fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(std::array::from_fn(|i| b[at + i]))
}

/// Writes `bytes` at `at` in a fixed-size header being assembled.
pub(crate) fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}
