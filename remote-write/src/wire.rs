//! A non-allocating walk over the protobuf wire format of a request, done
//! before prost decodes it.
//!
//! prost materialises every repeated element as a Rust struct, and a tiny
//! wire element can become a large struct: an empty `TimeSeries` is 2 bytes
//! on the wire and about 100 bytes in memory, an empty native histogram 2
//! bytes and about 200. A 32 MiB body made of such elements would make the
//! relay allocate gigabytes before any validation rule could refuse it. This
//! walk counts the elements (series, labels, samples, exemplars, histograms,
//! spans, bucket counts, symbols, metadata) without allocating, so the
//! series limit and an estimate of the decoded size can be enforced first.
//!
//! The walk is lenient about anything prost would refuse for semantic
//! reasons (a known field with the wrong wire type is simply skipped here);
//! it fails only on what is not protobuf at all (truncation, bad varint,
//! invalid wire type or tag, unbalanced groups), which prost would refuse
//! too.

use std::mem::size_of;

use crate::content::Protocol;
use crate::limits::{Limits, Summary};
use crate::pb::{read_varint, utf8, VarintError};
use crate::{v1, v2};

/// Counts gathered by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Shape {
    /// Number of top-level series.
    pub series: u64,
    /// Estimated bytes of the Rust structs prost will allocate for the
    /// repeated elements (string contents excluded: they are bounded by the
    /// wire bytes).
    pub struct_bytes: u64,
}

const WT_VARINT: u8 = 0;
const WT_I64: u8 = 1;
const WT_LEN: u8 = 2;
const WT_SGROUP: u8 = 3;
const WT_EGROUP: u8 = 4;
const WT_I32: u8 = 5;

/// Same nesting limit as prost's default recursion limit.
const MAX_GROUP_DEPTH: usize = 100;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline(always)]
    fn varint(&mut self) -> Result<u64, String> {
        read_varint(self.buf, &mut self.pos).map_err(|e| match e {
            VarintError::Truncated => format!("truncated varint at byte {}", self.pos),
            VarintError::Invalid => format!("invalid varint ending at byte {}", self.pos),
        })
    }

    #[inline]
    fn key(&mut self) -> Result<(u32, u8), String> {
        let at = self.pos;
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(format!("invalid key {key} at byte {at}"));
        }
        let wire_type = (key & 7) as u8;
        let field = (key >> 3) as u32;
        if field == 0 {
            return Err(format!("invalid field number 0 at byte {at}"));
        }
        if wire_type > WT_I32 {
            return Err(format!("invalid wire type {wire_type} at byte {at}"));
        }
        Ok((field, wire_type))
    }

    fn advance(&mut self, n: u64) -> Result<(), String> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(format!(
                "field at byte {} declares {n} bytes, only {remaining} remain",
                self.pos
            ));
        }
        self.pos += n as usize;
        Ok(())
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.varint()?;
        let start = self.pos;
        self.advance(len)?;
        Ok(&self.buf[start..self.pos])
    }

    /// Skips the value of a field whose key was just read.
    fn skip(&mut self, field: u32, wire_type: u8) -> Result<(), String> {
        match wire_type {
            WT_VARINT => self.varint().map(|_| ()),
            WT_I64 => self.advance(8),
            WT_I32 => self.advance(4),
            WT_LEN => self.bytes().map(|_| ()),
            WT_SGROUP => self.skip_group(field),
            _ => Err(format!("unexpected end-group for field {field}")),
        }
    }

    /// Skips a (deprecated) group iteratively, with prost's depth limit.
    fn skip_group(&mut self, field: u32) -> Result<(), String> {
        let mut stack = vec![field];
        while let Some(&open) = stack.last() {
            if self.is_empty() {
                return Err(format!("unterminated group for field {open}"));
            }
            let (f, wt) = self.key()?;
            match wt {
                WT_SGROUP => {
                    if stack.len() >= MAX_GROUP_DEPTH {
                        return Err("recursion limit reached".to_string());
                    }
                    stack.push(f);
                }
                WT_EGROUP => {
                    if f != open {
                        return Err(format!("unexpected end group for field {f}"));
                    }
                    stack.pop();
                }
                _ => self.skip(f, wt)?,
            }
        }
        Ok(())
    }
}

/// Number of varints in a packed run (bytes without the continuation bit).
fn packed_varints(b: &[u8]) -> u64 {
    b.iter().filter(|&&x| x < 0x80).count() as u64
}

fn sz<T>() -> u64 {
    size_of::<T>() as u64
}

/// Walks `buf` as the message of `protocol` and returns its shape.
pub(crate) fn scan(protocol: Protocol, buf: &[u8]) -> Result<Shape, String> {
    let mut shape = Shape::default();
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        let (field, wt) = r.key()?;
        match (protocol, field, wt) {
            (Protocol::V1, 1, WT_LEN) => {
                shape.series += 1;
                add(&mut shape, sz::<v1::TimeSeries>());
                scan_v1_series(r.bytes()?, &mut shape)?;
            }
            (Protocol::V1, 3, WT_LEN) => {
                add(&mut shape, sz::<v1::MetricMetadata>());
                r.bytes()?;
            }
            (Protocol::V2, 4, WT_LEN) => {
                add(&mut shape, sz::<String>());
                r.bytes()?;
            }
            (Protocol::V2, 5, WT_LEN) => {
                shape.series += 1;
                add(&mut shape, sz::<v2::TimeSeries>());
                scan_v2_series(r.bytes()?, &mut shape)?;
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(shape)
}

fn add(shape: &mut Shape, n: u64) {
    shape.struct_bytes = shape.struct_bytes.saturating_add(n);
}

fn scan_v1_series(buf: &[u8], shape: &mut Shape) -> Result<(), String> {
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, WT_LEN) => {
                add(shape, sz::<v1::Label>());
                r.bytes()?;
            }
            (2, WT_LEN) => {
                add(shape, sz::<v1::Sample>());
                r.bytes()?;
            }
            (3, WT_LEN) => {
                add(shape, sz::<v1::Exemplar>());
                let mut e = Reader::new(r.bytes()?);
                while !e.is_empty() {
                    let (f, w) = e.key()?;
                    if (f, w) == (1, WT_LEN) {
                        add(shape, sz::<v1::Label>());
                    }
                    e.skip(f, w)?;
                }
            }
            (4, WT_LEN) => {
                add(shape, sz::<v1::Histogram>());
                scan_histogram(r.bytes()?, shape)?;
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(())
}

fn scan_v2_series(buf: &[u8], shape: &mut Shape) -> Result<(), String> {
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, WT_LEN) => add(shape, 4 * packed_varints(r.bytes()?)),
            (1, WT_VARINT) => {
                add(shape, 4);
                r.varint()?;
            }
            (2, WT_LEN) => {
                add(shape, sz::<v2::Sample>());
                r.bytes()?;
            }
            (3, WT_LEN) => {
                add(shape, sz::<v2::Histogram>());
                scan_histogram(r.bytes()?, shape)?;
            }
            (4, WT_LEN) => {
                add(shape, sz::<v2::Exemplar>());
                let mut e = Reader::new(r.bytes()?);
                while !e.is_empty() {
                    let (f, w) = e.key()?;
                    match (f, w) {
                        (1, WT_LEN) => add(shape, 4 * packed_varints(e.bytes()?)),
                        (1, WT_VARINT) => {
                            add(shape, 4);
                            e.varint()?;
                        }
                        _ => e.skip(f, w)?,
                    }
                }
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(())
}

/// Histogram fields that allocate: spans (8, 11), deltas (9, 12), float
/// counts (10, 13) and custom values (16). Same numbers in 1.0 and 2.0.
fn scan_histogram(buf: &[u8], shape: &mut Shape) -> Result<(), String> {
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (8 | 11, WT_LEN) => {
                add(shape, sz::<v1::BucketSpan>());
                r.bytes()?;
            }
            (9 | 12, WT_LEN) => add(shape, 8 * packed_varints(r.bytes()?)),
            (10 | 13 | 16, WT_LEN) => add(shape, r.bytes()?.len() as u64),
            (9 | 12, WT_VARINT) | (10 | 13 | 16, WT_I64) => {
                add(shape, 8);
                r.skip(field, wt)?;
            }
            _ => r.skip(field, wt)?,
        }
    }
    Ok(())
}

/// The common case of a 1.0 request, validated without decoding it into
/// owned structs: series made only of labels and float samples, every field
/// with its expected wire type and nothing else, label names in order.
/// Returns the summary when the request is valid, and `None` for anything
/// else (metadata, exemplars, histograms, unknown fields, labels out of
/// order, a protobuf or a rule error), in which case the caller runs the
/// full path ([`crate::decode::validate_without_fast_path`]), which alone
/// produces the exact error.
///
/// It accepts exactly what the full path accepts for such requests: the
/// same wire-level rules as prost (key, varint and length checks, UTF-8
/// strings, the last occurrence of a singular field wins) and the same
/// label rules as [`crate::decode::check_labels`], on the raw bytes
/// ([`FastLabels`]); `tests/fast_path.rs` compares the two paths. It
/// allocates nothing. The full path's expansion estimate (which bounded
/// what prost would have allocated) cannot refuse a request this accepts:
/// such a request needs at most about 10 times its size in prost structs (a
/// series is at least 17 bytes for 144 bytes of struct, a label 5 for 48, a
/// sample 2 for 16), well under [`crate::decode::MAX_EXPANSION`]. The
/// series limit is applied.
pub(crate) fn validate_v1_fast(buf: &[u8], limits: &Limits) -> Option<Summary> {
    let mut summary = Summary::default();
    let mut r = Fast { buf, pos: 0 };
    while r.more() {
        // Only one-byte keys: a key written in more bytes than it needs is
        // valid protobuf, but left to the full path.
        if r.byte()? != KEY_1_LEN {
            return None;
        }
        let mut s = Fast {
            buf: r.len_delimited()?,
            pos: 0,
        };
        let mut labels = FastLabels::default();
        let mut samples = 0u64;
        while s.more() {
            match s.byte()? {
                KEY_1_LEN => {
                    let (name, value) = fast_label(s.len_delimited()?)?;
                    labels.label(name, value, limits)?;
                }
                KEY_2_LEN => {
                    summary.observe_ts(fast_sample_ts(s.len_delimited()?)?);
                    samples += 1;
                }
                _ => return None,
            }
        }
        labels.finish(limits)?;
        summary.series += 1;
        summary.samples += samples;
    }
    if limits.max_series != 0 && summary.series > limits.max_series as u64 {
        return None;
    }
    Some(summary)
}

/// The rules of [`crate::decode::check_labels`] on raw label bytes, label
/// by label, in place: at least one label, none with an empty name, a
/// non-empty `__name__`, the optional limits, and every name and value valid
/// UTF-8 (as prost requires of strings). Names must be in strictly
/// increasing order (so none is given twice), checked against the previous
/// one: labels in another order (senders sort them, so this is rare) are
/// left to the full path, which sorts them without keeping a copy of each
/// label here. Names compare as bytes, which for UTF-8 is the order of
/// `str`. `None`: a rule does not hold, or the order.
#[derive(Default)]
struct FastLabels<'a> {
    count: usize,
    has_name: bool,
    previous: &'a [u8],
}

impl<'a> FastLabels<'a> {
    #[inline]
    fn label(&mut self, name: &'a [u8], value: &[u8], limits: &Limits) -> Option<()> {
        if name.is_empty()
            || (limits.max_label_name_len != 0 && name.len() > limits.max_label_name_len)
            || (limits.max_label_value_len != 0 && value.len() > limits.max_label_value_len)
            || !utf8(name)
            || !utf8(value)
            || (self.count > 0 && !after(name, self.previous))
        {
            return None;
        }
        if name == crate::METRIC_NAME_LABEL.as_bytes() && !value.is_empty() {
            self.has_name = true;
        }
        self.previous = name;
        self.count += 1;
        Some(())
    }

    #[inline]
    fn finish(&self, limits: &Limits) -> Option<()> {
        let too_many =
            limits.max_labels_per_series != 0 && self.count > limits.max_labels_per_series;
        (self.count > 0 && !too_many && self.has_name).then_some(())
    }
}

/// Whether `name` sorts strictly after `previous` (as bytes). Sorted label
/// names nearly always differ in their first byte, which decides it
/// without the call to `memcmp` that comparing slices makes: that call,
/// for names of a few bytes, was 6.7 % of the relay's CPU under 64 senders
/// of 100 series (`benches/README.md`).
#[inline]
fn after(name: &[u8], previous: &[u8]) -> bool {
    match (name.first(), previous.first()) {
        (Some(a), Some(b)) if a != b => a > b,
        _ => name > previous,
    }
}

/// Field 1, length-delimited.
const KEY_1_LEN: u8 = (1 << 3) | WT_LEN;
/// Field 2, length-delimited.
const KEY_2_LEN: u8 = (2 << 3) | WT_LEN;
/// Field 1, 64-bit.
const KEY_1_I64: u8 = (1 << 3) | WT_I64;
/// Field 2, varint.
const KEY_2_VARINT: u8 = (2 << 3) | WT_VARINT;

/// A lean cursor for [`validate_v1_fast`]: every failure is `None`.
struct Fast<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fast<'a> {
    #[inline]
    fn more(&self) -> bool {
        self.pos < self.buf.len()
    }

    #[inline]
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// A varint with prost's rules (at most 10 bytes, the last at most 1).
    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        let b = self.byte()?;
        if b < 0x80 {
            return Some(u64::from(b));
        }
        self.varint_rest(b)
    }

    #[cold]
    #[inline(never)]
    fn varint_rest(&mut self, b: u8) -> Option<u64> {
        let mut value = u64::from(b & 0x7f);
        for i in 1..10 {
            let b = self.byte()?;
            if i == 9 && b > 1 {
                return None;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(value);
            }
        }
        None
    }

    #[inline(always)]
    fn len_delimited(&mut self) -> Option<&'a [u8]> {
        let len = self.varint()?;
        let end = self.pos.checked_add(usize::try_from(len).ok()?)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }
}

/// A `Label { string name = 1; string value = 2; }`.
#[inline]
fn fast_label(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut name, mut value): (&[u8], &[u8]) = (&[], &[]);
    let mut r = Fast { buf, pos: 0 };
    while r.more() {
        // prost checks every occurrence of a string, not only the last one
        // it keeps: an occurrence being replaced is checked here, the last
        // one with the rules.
        match r.byte()? {
            KEY_1_LEN => {
                if !utf8(name) {
                    return None;
                }
                name = r.len_delimited()?;
            }
            KEY_2_LEN => {
                if !utf8(value) {
                    return None;
                }
                value = r.len_delimited()?;
            }
            _ => return None,
        }
    }
    Some((name, value))
}

/// The timestamp of a `Sample { double value = 1; int64 timestamp = 2; }`.
#[inline]
fn fast_sample_ts(buf: &[u8]) -> Option<i64> {
    let mut ts = 0i64;
    let mut r = Fast { buf, pos: 0 };
    while r.more() {
        match r.byte()? {
            KEY_1_I64 => {
                r.pos = r.pos.checked_add(8).filter(|&e| e <= r.buf.len())?;
            }
            KEY_2_VARINT => ts = r.varint()? as i64,
            _ => return None,
        }
    }
    Some(ts)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn after_is_the_order_of_byte_slices() {
        let names: [&[u8]; 9] = [
            b"",
            b"a",
            b"ab",
            b"b",
            b"ba",
            b"__name__",
            b"job",
            b"\xff",
            b"a\0",
        ];
        for x in names {
            for y in names {
                assert_eq!(after(x, y), x > y, "{x:?} after {y:?}");
            }
        }
    }

    #[test]
    fn fast_path_takes_plain_requests_only() {
        let series = v1::TimeSeries {
            labels: vec![
                v1::Label {
                    name: "__name__".into(),
                    value: "up".into(),
                },
                v1::Label {
                    name: "job".into(),
                    value: "x".into(),
                },
            ],
            samples: vec![
                v1::Sample {
                    value: 1.0,
                    timestamp: 10,
                },
                v1::Sample {
                    value: 2.0,
                    timestamp: 20,
                },
            ],
            ..Default::default()
        };
        let limits = Limits::default();
        let mut req = v1::WriteRequest {
            timeseries: vec![series.clone(), series],
            metadata: vec![],
        };
        let s = validate_v1_fast(&req.encode_to_vec(), &limits).unwrap();
        assert_eq!((s.series, s.samples, s.min_ts, s.max_ts), (2, 4, 10, 20));
        // Anything else goes to the full path.
        req.metadata.push(v1::MetricMetadata::default());
        assert!(validate_v1_fast(&req.encode_to_vec(), &limits).is_none());
        req.metadata.clear();
        req.timeseries[1].exemplars.push(v1::Exemplar::default());
        assert!(validate_v1_fast(&req.encode_to_vec(), &limits).is_none());
        req.timeseries[1].exemplars.clear();
        req.timeseries[1].labels[1].name = "__name__".into();
        assert!(validate_v1_fast(&req.encode_to_vec(), &limits).is_none());
    }

    #[test]
    fn counts_series_of_both_protocols() {
        let req = v1::WriteRequest {
            timeseries: vec![v1::TimeSeries::default(); 3],
            metadata: vec![],
        };
        let shape = scan(Protocol::V1, &req.encode_to_vec()).unwrap();
        assert_eq!(shape.series, 3);
        assert!(shape.struct_bytes >= 3 * sz::<v1::TimeSeries>());

        let req = v2::Request {
            symbols: vec![String::new(), "a".into()],
            timeseries: vec![v2::TimeSeries::default(); 2],
        };
        let shape = scan(Protocol::V2, &req.encode_to_vec()).unwrap();
        assert_eq!(shape.series, 2);
        // Fields of the other protocol are skipped, not counted.
        assert_eq!(scan(Protocol::V1, &req.encode_to_vec()).unwrap().series, 0);
    }

    #[test]
    fn estimate_covers_nested_elements() {
        let h = v1::Histogram {
            positive_spans: vec![v1::BucketSpan {
                offset: 0,
                length: 3,
            }],
            positive_deltas: vec![1, 0, 0],
            ..Default::default()
        };
        let ts = v1::TimeSeries {
            labels: vec![v1::Label::default(); 4],
            samples: vec![v1::Sample::default(); 5],
            exemplars: vec![v1::Exemplar {
                labels: vec![v1::Label::default()],
                ..Default::default()
            }],
            histograms: vec![h],
        };
        let req = v1::WriteRequest {
            timeseries: vec![ts],
            metadata: vec![v1::MetricMetadata::default()],
        };
        let shape = scan(Protocol::V1, &req.encode_to_vec()).unwrap();
        let expect = sz::<v1::TimeSeries>()
            + 5 * sz::<v1::Label>()
            + 5 * sz::<v1::Sample>()
            + sz::<v1::Exemplar>()
            + sz::<v1::Histogram>()
            + sz::<v1::BucketSpan>()
            + 3 * 8
            + sz::<v1::MetricMetadata>();
        assert_eq!(shape.struct_bytes, expect);
    }

    #[test]
    fn refuses_what_is_not_protobuf() {
        // Truncated length-delimited field.
        assert!(scan(Protocol::V1, &[0x0a, 0x05, 0x00]).is_err());
        // Varint longer than 10 bytes.
        assert!(scan(
            Protocol::V1,
            &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        )
        .is_err());
        // Wire type 7.
        assert!(scan(Protocol::V1, &[0x0f]).is_err());
        // Field number 0.
        assert!(scan(Protocol::V1, &[0x00, 0x00]).is_err());
        // Stray end-group.
        assert!(scan(Protocol::V1, &[0x0c]).is_err());
        // Unterminated group.
        assert!(scan(Protocol::V1, &[0x0b]).is_err());
        // Huge declared length.
        assert!(scan(Protocol::V1, &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }

    #[test]
    fn groups_are_skipped_with_a_depth_limit() {
        // field 9 start-group, field 9 end-group: skipped.
        assert_eq!(scan(Protocol::V1, &[0x4b, 0x4c]).unwrap(), Shape::default());
        let mut deep = vec![0x4b; MAX_GROUP_DEPTH + 1];
        deep.extend(vec![0x4c; MAX_GROUP_DEPTH + 1]);
        assert_eq!(
            scan(Protocol::V1, &deep).unwrap_err(),
            "recursion limit reached"
        );
        // Mismatched end group.
        assert!(scan(Protocol::V1, &[0x4b, 0x54]).is_err());
    }
}
