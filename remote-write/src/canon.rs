//! prost's encoding of messages read where they lie, for the shippers'
//! re-encoding (2.0 to 1.0 translation, merging 2.0 requests) without
//! decoding whole requests into owned structs.
//!
//! The bytes written are those `prost::Message::encode` writes for the
//! message prost would decode from the same input: fields in tag order, a
//! singular field only when it differs from its default (`-0.0` is `0.0`),
//! a oneof whenever set, repeated scalars packed, every varint minimal.
//! Inputs must have passed [`crate::pb::check`]. The bytes go into a
//! buffer or into a [`Sink`] (see [`Enc`] for how a nested message learns
//! its length in each).

use crate::pb::{self, last, Fields, Value, WT_I64, WT_LEN, WT_VARINT};
use crate::sink::Sink;
use crate::varint;

/// Where an encoder writes.
///
/// A nested message is written after its length, which is not known before
/// its content is. In a buffer ([`Enc::buf`]) the content is written after
/// a one-byte placeholder, which is then patched, and moved up when the
/// length needs more bytes. A [`Sink`] cannot be patched ([`Enc::sink`]),
/// so bytes for it wait in a buffer of at most
/// [`Sink::nested_buffer_limit`] bytes, where a nested message is written
/// the placeholder way as long as it fits; one that does not fit even in
/// an empty buffer is measured (its content encoded into a counter), its
/// length written, then its content, its own nested messages again the
/// same way. Nothing larger than the limit is ever buffered, whatever the
/// size of a series, and a message is measured only when it is that large.
pub(crate) struct Enc<'a> {
    to: To<'a>,
}

enum To<'a> {
    /// Counting the bytes that would be written.
    Count(usize),
    /// Appending to `buf` as long as it stays within `cap` bytes; `over`
    /// once something did not fit (what was written is then to be thrown
    /// away).
    Buf {
        buf: &'a mut Vec<u8>,
        cap: usize,
        over: bool,
    },
    /// Handing bytes to `sink`, through `pending`.
    Sink {
        sink: &'a mut dyn Sink,
        pending: &'a mut Vec<u8>,
        limit: usize,
    },
}

impl<'a> Enc<'a> {
    /// Appends to `buf`.
    pub(crate) fn buf(buf: &'a mut Vec<u8>) -> Self {
        Enc {
            to: To::Buf {
                buf,
                cap: usize::MAX,
                over: false,
            },
        }
    }

    /// Writes into `sink`, bytes waiting in `pending` (see [`Enc`]); call
    /// [`Enc::flush`] at the end.
    pub(crate) fn sink(sink: &'a mut dyn Sink, pending: &'a mut Vec<u8>) -> Self {
        let limit = sink.nested_buffer_limit();
        Enc {
            to: To::Sink {
                sink,
                pending,
                limit,
            },
        }
    }

    /// Hands over what waits for a sink.
    pub(crate) fn flush(&mut self) {
        if let To::Sink { sink, pending, .. } = &mut self.to {
            if !pending.is_empty() {
                sink.put(pending);
                pending.clear();
            }
        }
    }

    /// Appends `bytes`.
    #[inline]
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        match &mut self.to {
            To::Count(n) => *n += bytes.len(),
            To::Buf { buf, cap, over } => {
                if buf.len() + bytes.len() <= *cap {
                    buf.extend_from_slice(bytes);
                } else {
                    *over = true;
                }
            }
            To::Sink {
                sink,
                pending,
                limit,
            } => {
                if pending.len() + bytes.len() > *limit {
                    if !pending.is_empty() {
                        sink.put(pending);
                        pending.clear();
                    }
                    if bytes.len() > *limit {
                        sink.put(bytes);
                        return;
                    }
                }
                pending.extend_from_slice(bytes);
            }
        }
    }

    /// In a counter, counts `len` bytes without their being written, and
    /// says so.
    #[inline]
    fn counted(&mut self, len: usize) -> bool {
        match &mut self.to {
            To::Count(n) => {
                *n += len;
                true
            }
            _ => false,
        }
    }
}

/// The bytes `body` writes.
fn measure<E>(body: &impl Fn(&mut Enc<'_>) -> Result<(), E>) -> Result<usize, E> {
    let mut counter = Enc { to: To::Count(0) };
    body(&mut counter)?;
    Ok(match counter.to {
        To::Count(n) => n,
        _ => 0,
    })
}

/// Appends a minimal varint.
#[inline]
pub(crate) fn put_varint(out: &mut Enc<'_>, mut v: u64) {
    match &mut out.to {
        To::Count(n) => *n += varint::len(v),
        To::Buf {
            buf,
            cap,
            over: false,
        } if buf.len() + 10 <= *cap => {
            while v >= 0x80 {
                buf.push((v as u8) | 0x80);
                v >>= 7;
            }
            buf.push(v as u8);
        }
        _ => {
            let (bytes, n) = varint::encode(v);
            out.put(&bytes[..n]);
        }
    }
}

fn key(tag: u32, wt: u8) -> u64 {
    (u64::from(tag) << 3) | u64::from(wt)
}

#[inline]
pub(crate) fn put_key(out: &mut Enc<'_>, tag: u32, wt: u8) {
    put_varint(out, key(tag, wt));
}

/// A length-delimited field whose content `body` writes (see [`Enc`] for
/// how its length is learnt: `body` may be called more than once).
pub(crate) fn nested<E>(
    out: &mut Enc<'_>,
    tag: u32,
    body: impl Fn(&mut Enc<'_>) -> Result<(), E>,
) -> Result<(), E> {
    nested_made_of(out, tag, 0, body)
}

/// [`nested`] for a message made from `source` bytes, a guess of its size:
/// for a sink, one larger than the sink's buffer is measured at once, not
/// first tried in the buffer (one pass over a large series instead of two).
/// The guess changes no byte written.
pub(crate) fn nested_made_of<E>(
    out: &mut Enc<'_>,
    tag: u32,
    source: usize,
    body: impl Fn(&mut Enc<'_>) -> Result<(), E>,
) -> Result<(), E> {
    match &mut out.to {
        To::Count(n) => {
            let len = measure(&body)?;
            *n += varint::len(key(tag, WT_LEN)) + varint::len(len as u64) + len;
            Ok(())
        }
        To::Buf { .. } => nested_in_buf(out, tag, &body),
        To::Sink {
            sink,
            pending,
            limit,
        } => {
            let tried = source <= *limit;
            nested_in_sink(&mut **sink, pending, *limit, tag, tried, &body)
        }
    }
}

/// [`nested`] in a buffer: the placeholder way.
fn nested_in_buf<E>(
    out: &mut Enc<'_>,
    tag: u32,
    body: &impl Fn(&mut Enc<'_>) -> Result<(), E>,
) -> Result<(), E> {
    put_key(out, tag, WT_LEN);
    let at = match &out.to {
        To::Buf { buf, .. } => buf.len(),
        _ => 0,
    };
    out.put(&[0]);
    body(out)?;
    if let To::Buf {
        buf, over: false, ..
    } = &mut out.to
    {
        let len = buf.len() - at - 1;
        if len < 0x80 {
            buf[at] = len as u8;
        } else {
            let (bytes, n) = varint::encode(len as u64);
            buf.splice(at..at + 1, bytes[..n].iter().copied());
        }
    }
    Ok(())
}

/// [`nested`] for a sink: in `pending` if it fits (flushed first if that
/// makes it fit), else, or when not `tried` there, measured and written in
/// parts.
fn nested_in_sink<E>(
    sink: &mut dyn Sink,
    pending: &mut Vec<u8>,
    limit: usize,
    tag: u32,
    tried: bool,
    body: &impl Fn(&mut Enc<'_>) -> Result<(), E>,
) -> Result<(), E> {
    if tried && fits_in_pending(sink, pending, limit, tag, body)? {
        return Ok(());
    }
    let len = measure(body)?;
    let mut parts = Enc {
        to: To::Sink {
            sink,
            pending,
            limit,
        },
    };
    put_key(&mut parts, tag, WT_LEN);
    put_varint(&mut parts, len as u64);
    body(&mut parts)
}

/// Writes the field in `pending` if it fits within `limit` bytes there, or
/// once what was pending is handed over; says whether it was written.
fn fits_in_pending<E>(
    sink: &mut dyn Sink,
    pending: &mut Vec<u8>,
    limit: usize,
    tag: u32,
    body: &impl Fn(&mut Enc<'_>) -> Result<(), E>,
) -> Result<bool, E> {
    loop {
        let start = pending.len();
        let mut tried = Enc {
            to: To::Buf {
                buf: &mut *pending,
                cap: limit,
                over: false,
            },
        };
        nested_in_buf(&mut tried, tag, body)?;
        if let To::Buf { over: false, .. } = tried.to {
            return Ok(true);
        }
        pending.truncate(start);
        if start == 0 {
            return Ok(false);
        }
        sink.put(pending);
        pending.clear();
    }
}

/// A string or bytes field, written only when not empty (singular).
pub(crate) fn put_str(out: &mut Enc<'_>, tag: u32, s: &[u8]) {
    if !s.is_empty() {
        put_key(out, tag, WT_LEN);
        put_varint(out, s.len() as u64);
        out.put(s);
    }
}

/// A singular varint field (its value as prost writes it: `int32` and enums
/// sign-extended, `sint32` zigzagged by the caller).
pub(crate) fn put_uint(out: &mut Enc<'_>, tag: u32, v: u64) {
    if v != 0 {
        put_key(out, tag, WT_VARINT);
        put_varint(out, v);
    }
}

/// A singular `double` field.
pub(crate) fn put_double(out: &mut Enc<'_>, tag: u32, v: f64) {
    if v != 0.0 {
        put_key(out, tag, WT_I64);
        out.put(&v.to_bits().to_le_bytes());
    }
}

/// A packed repeated varint field of the values `values()` yields (called
/// twice: once for the length).
pub(crate) fn put_packed<I: Iterator<Item = u64>>(
    out: &mut Enc<'_>,
    tag: u32,
    values: impl Fn() -> I,
) {
    let len: usize = values().map(varint::len).sum();
    if len == 0 {
        return;
    }
    put_key(out, tag, WT_LEN);
    put_varint(out, len as u64);
    if !out.counted(len) {
        values().for_each(|v| put_varint(out, v));
    }
}

fn put_packed_doubles(out: &mut Enc<'_>, tag: u32, msg: &[u8], from: u32) {
    let n = pb::count_doubles(Fields::new(msg), from);
    if n == 0 {
        return;
    }
    put_key(out, tag, WT_LEN);
    put_varint(out, 8 * n as u64);
    if out.counted(8 * n) {
        return;
    }
    for v in pb::repeated_doubles(Fields::new(msg), from) {
        out.put(&v.to_bits().to_le_bytes());
    }
}

/// `int32` (and enums) as prost decodes them from a varint and encodes them.
pub(crate) fn int32(v: u64) -> u64 {
    v as i32 as i64 as u64
}

/// A `Sample` (1.0 and 2.0: `double value = 1; int64 timestamp = 2`).
pub(crate) fn sample(out: &mut Enc<'_>, tag: u32, msg: &[u8]) {
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

fn put_oneof(out: &mut Enc<'_>, int_tag: u32, v: Option<(u32, u64)>) {
    match v {
        Some((t, v)) if t == int_tag => {
            put_key(out, t, WT_VARINT);
            put_varint(out, v);
        }
        Some((t, bits)) => {
            put_key(out, t, WT_I64);
            out.put(&bits.to_le_bytes());
        }
        None => {}
    }
}

/// A native histogram (1.0 and 2.0 have the same fields and numbers).
pub(crate) fn histogram(out: &mut Enc<'_>, tag: u32, msg: &[u8]) {
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

fn span(out: &mut Enc<'_>, tag: u32, v: Value<'_>) {
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
            put_varint(&mut Enc::buf(&mut a), v);
            let mut b = vec![];
            prost::encoding::encode_varint(v, &mut b);
            assert_eq!(a, b);
            assert_eq!(varint::len(v), b.len());
        }
        for n in [0usize, 127, 128, 20000] {
            let body = |o: &mut Enc<'_>| {
                o.put(&vec![b'x'; n]);
                Ok::<_, ()>(())
            };
            let mut want = vec![7];
            prost::encoding::bytes::encode(1, &vec![b'x'; n], &mut want);
            let mut out = vec![7];
            nested(&mut Enc::buf(&mut out), 1, body).unwrap();
            assert_eq!(out, want);
            // Into a sink, measured first (limit 0) or not.
            for limit in [0, 127, 128, usize::MAX] {
                let mut sink = vec![];
                let mut pending = Vec::with_capacity(limit.min(1 << 20));
                let mut enc = Enc::sink(&mut sink, &mut pending);
                if let To::Sink { limit: l, .. } = &mut enc.to {
                    *l = limit;
                }
                enc.put(&[7]);
                nested(&mut enc, 1, body).unwrap();
                enc.flush();
                assert_eq!(sink, want, "limit {limit}");
            }
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
        let mut want = vec![];
        prost::encoding::message::encode(4, &h, &mut want);
        let mut out = vec![];
        histogram(&mut Enc::buf(&mut out), 4, &enc);
        assert_eq!(out, want);
    }
}
