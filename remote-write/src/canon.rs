//! prost's encoding of messages read where they lie, for the shippers'
//! re-encoding (2.0 to 1.0 translation, merging 2.0 requests) without
//! decoding whole requests into owned structs.
//!
//! The bytes written are those `prost::Message::encode` writes for the
//! message prost would decode from the same input: fields in tag order, a
//! singular field only when it differs from its default (`-0.0` is `0.0`),
//! a oneof whenever set, repeated scalars packed, every varint minimal.
//! Inputs must have passed [`crate::pb::check`]. A nested message is
//! written after a one-byte length placeholder, moved up when its length
//! needs more bytes: the message is not encoded twice to learn its length.

use crate::pb::{self, last, Fields, Value, WT_I64, WT_LEN, WT_VARINT};

/// Appends a minimal varint.
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
pub(crate) fn put_key(out: &mut Vec<u8>, tag: u32, wt: u8) {
    put_varint(out, (u64::from(tag) << 3) | u64::from(wt));
}

/// A length-delimited field whose content `body` appends.
pub(crate) fn nested<E>(
    out: &mut Vec<u8>,
    tag: u32,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    put_key(out, tag, WT_LEN);
    let at = out.len();
    out.push(0);
    body(out)?;
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
    } else {
        let mut prefix = Vec::with_capacity(10);
        put_varint(&mut prefix, len as u64);
        out.splice(at..at + 1, prefix);
    }
    Ok(())
}

/// A string or bytes field, written only when not empty (singular).
pub(crate) fn put_str(out: &mut Vec<u8>, tag: u32, s: &[u8]) {
    if !s.is_empty() {
        put_key(out, tag, WT_LEN);
        put_varint(out, s.len() as u64);
        out.extend_from_slice(s);
    }
}

/// A singular varint field (its value as prost writes it: `int32` and enums
/// sign-extended, `sint32` zigzagged by the caller).
pub(crate) fn put_uint(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_key(out, tag, WT_VARINT);
        put_varint(out, v);
    }
}

/// A singular `double` field.
pub(crate) fn put_double(out: &mut Vec<u8>, tag: u32, v: f64) {
    if v != 0.0 {
        put_key(out, tag, WT_I64);
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
}

/// A packed repeated varint field of the values `values()` yields (called
/// twice: once for the length).
pub(crate) fn put_packed<I: Iterator<Item = u64>>(
    out: &mut Vec<u8>,
    tag: u32,
    values: impl Fn() -> I,
) {
    let len: usize = values().map(varint_len).sum();
    if len == 0 {
        return;
    }
    put_key(out, tag, WT_LEN);
    put_varint(out, len as u64);
    values().for_each(|v| put_varint(out, v));
}

fn put_packed_doubles(out: &mut Vec<u8>, tag: u32, msg: &[u8], from: u32) {
    let n = pb::count_doubles(Fields::new(msg), from);
    if n == 0 {
        return;
    }
    put_key(out, tag, WT_LEN);
    put_varint(out, 8 * n as u64);
    for v in pb::repeated_doubles(Fields::new(msg), from) {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
}

/// `int32` (and enums) as prost decodes them from a varint and encodes them.
pub(crate) fn int32(v: u64) -> u64 {
    v as i32 as i64 as u64
}

/// A `Sample` (1.0 and 2.0: `double value = 1; int64 timestamp = 2`).
pub(crate) fn sample(out: &mut Vec<u8>, tag: u32, msg: &[u8]) {
    let _ = nested::<()>(out, tag, |out| {
        put_double(out, 1, f64::from_bits(last(msg, 1)));
        put_uint(out, 2, last(msg, 2));
        Ok(())
    });
}

/// A oneof of a varint (`int_tag`) and a double (`int_tag + 1`): the
/// variant and value of its last occurrence.
fn oneof(msg: &[u8], int_tag: u32) -> Option<(u32, u64)> {
    Fields::new(msg)
        .filter(|&(t, _)| t == int_tag || t == int_tag + 1)
        .last()
        .map(|(t, v)| (t, v.u64()))
}

fn put_oneof(out: &mut Vec<u8>, int_tag: u32, v: Option<(u32, u64)>) {
    match v {
        Some((t, v)) if t == int_tag => {
            put_key(out, t, WT_VARINT);
            put_varint(out, v);
        }
        Some((t, bits)) => {
            put_key(out, t, WT_I64);
            out.extend_from_slice(&bits.to_le_bytes());
        }
        None => {}
    }
}

/// A native histogram (1.0 and 2.0 have the same fields and numbers).
pub(crate) fn histogram(out: &mut Vec<u8>, tag: u32, msg: &[u8]) {
    let _ = nested::<()>(out, tag, |out| {
        put_oneof(out, 1, oneof(msg, 1));
        put_double(out, 3, f64::from_bits(last(msg, 3)));
        put_uint(out, 4, zigzag32(pb::zigzag32(last(msg, 4))));
        put_double(out, 5, f64::from_bits(last(msg, 5)));
        put_oneof(out, 6, oneof(msg, 6));
        for (spans, deltas, counts) in [(8, 9, 10), (11, 12, 13)] {
            for (t, v) in Fields::new(msg) {
                if t == spans {
                    span(out, spans, v);
                }
            }
            // sint64 decodes and encodes back to the same varint value.
            put_packed(out, deltas, || {
                pb::repeated_varints(Fields::new(msg), deltas)
            });
            put_packed_doubles(out, counts, msg, counts);
        }
        put_uint(out, 14, int32(last(msg, 14)));
        put_uint(out, 15, last(msg, 15));
        put_packed_doubles(out, 16, msg, 16);
        Ok(())
    });
}

fn zigzag32(v: i32) -> u64 {
    ((v << 1) ^ (v >> 31)) as u32 as u64
}

fn span(out: &mut Vec<u8>, tag: u32, v: Value<'_>) {
    let (offset, length) = crate::stream::span(v);
    let _ = nested::<()>(out, tag, |out| {
        put_uint(out, 1, zigzag32(offset));
        put_uint(out, 2, u64::from(length));
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn varints_and_nested_lengths_are_minimal() {
        for v in [0u64, 1, 127, 128, 300, 16383, 16384, u64::MAX] {
            let mut a = vec![];
            put_varint(&mut a, v);
            let mut b = vec![];
            prost::encoding::encode_varint(v, &mut b);
            assert_eq!(a, b);
            assert_eq!(varint_len(v), b.len());
        }
        for n in [0usize, 127, 128, 20000] {
            let mut out = vec![7];
            nested::<()>(&mut out, 1, |o| {
                o.extend(std::iter::repeat_n(b'x', n));
                Ok(())
            })
            .unwrap();
            let mut want = vec![7];
            prost::encoding::bytes::encode(1, &vec![b'x'; n], &mut want);
            assert_eq!(out, want);
        }
    }

    #[test]
    fn a_histogram_is_written_as_prost_writes_it() {
        let h = crate::v1::Histogram {
            count: Some(crate::v1::histogram::Count::CountInt(0)),
            sum: -0.0,
            schema: -4,
            zero_threshold: 1e-128,
            zero_count: Some(crate::v1::histogram::ZeroCount::ZeroCountFloat(0.0)),
            negative_spans: vec![crate::v1::BucketSpan {
                offset: -3,
                length: 2,
            }],
            negative_deltas: vec![1, -1],
            positive_counts: vec![-0.0, 2.5],
            reset_hint: -1,
            timestamp: -5,
            custom_values: vec![1.0],
            ..Default::default()
        };
        let enc = h.encode_to_vec();
        let mut out = vec![];
        histogram(&mut out, 4, &enc);
        let mut want = vec![];
        prost::encoding::message::encode(4, &h, &mut want);
        assert_eq!(out, want);
    }
}
