//! Small encoding helpers used by the shippers and the tests.

use std::collections::HashMap;

use prost::Message;

use crate::canon::{
    self, nested, nested_made_of, put_double, put_key, put_packed, put_uint, put_varint, Enc,
};
use crate::error::DecodeError;
use crate::limits::Summary;
use crate::pb::{self, Fields, WT_LEN};
use crate::rules::check_first_symbol;
use crate::sink::Sink;
use crate::stream::{self, refs};
use crate::translate::{series_metadata, CheckedV2};
use crate::{v1, v2};

/// Compresses `buf` as one snappy block (the remote-write body format).
///
/// # Panics
///
/// If `buf` is larger than the snappy block format allows (4 GiB - 1
/// bytes); use [`try_snappy_compress`] where that can happen.
pub fn snappy_compress(buf: &[u8]) -> Vec<u8> {
    match try_snappy_compress(buf) {
        Ok(v) => v,
        Err(e) => panic!("snappy_compress: {e}"),
    }
}

/// Compresses `buf` as one snappy block; fails only for inputs of 4 GiB or
/// more.
pub fn try_snappy_compress(buf: &[u8]) -> Result<Vec<u8>, snap::Error> {
    snap::raw::Encoder::new().compress_vec(buf)
}

/// Encodes a 1.0 request as protobuf (not compressed).
pub fn encode_v1(req: &v1::WriteRequest) -> Vec<u8> {
    req.encode_to_vec()
}

/// Encodes a 2.0 request as protobuf (not compressed).
pub fn encode_v2(req: &v2::Request) -> Vec<u8> {
    req.encode_to_vec()
}

/// Appends the encoded 1.0 `WriteRequest`s in `parts` to `out`.
///
/// A protobuf message is a sequence of fields, and a parser meeting a
/// repeated field several times appends every occurrence (protobuf merge
/// semantics). `WriteRequest` has only repeated fields (`timeseries` = 1,
/// `metadata` = 3), so the concatenation of encoded requests *is* the
/// encoding of one request whose `timeseries` and `metadata` are the
/// concatenation of the parts', in order. This lets a shipper coalesce
/// records from the log into one request without decoding them.
///
/// This does not hold for 2.0 `Request`s: each one's symbol references
/// index its own symbol table.
pub fn concat_v1(parts: &[&[u8]], out: &mut dyn Sink) {
    for p in parts {
        out.put(p);
    }
}

/// Merges 2.0 requests into one, in order, with one symbol table.
///
/// 2.0 requests cannot be concatenated like 1.0 ones (see [`concat_v1`]):
/// every `*_ref` indexes its own request's `symbols`. Here each part's
/// references are rewritten into a shared table that keeps each string once
/// (`""` first, as the specification requires), so series, samples,
/// histograms, exemplars, metadata and created timestamps come out exactly
/// as they went in, and strings repeated across parts (label names, common
/// values) are sent once.
///
/// # Errors
/// A part whose `symbols[0]` is not empty, or whose references point
/// outside its symbol table: the parts must have passed
/// [`crate::decode::validate`].
pub fn merge_v2(parts: Vec<v2::Request>) -> Result<v2::Request, DecodeError> {
    let mut out = v2::Request {
        symbols: vec![String::new()],
        timeseries: Vec::with_capacity(parts.iter().map(|p| p.timeseries.len()).sum()),
    };
    let mut index: HashMap<String, u32> = HashMap::from([(String::new(), 0)]);
    let mut series_base = 0;
    for part in parts {
        check_first_symbol(&part.symbols)?;
        // Old reference -> new reference, for every symbol of this part.
        let remap = Remap {
            new: part
                .symbols
                .into_iter()
                .map(|s| match index.get(&s) {
                    Some(&r) => r,
                    None => {
                        let r = out.symbols.len() as u32;
                        out.symbols.push(s.clone());
                        index.insert(s, r);
                        r
                    }
                })
                .collect(),
        };
        for (i, mut ts) in part.timeseries.into_iter().enumerate() {
            let series = series_base + i;
            let map = |field: &'static str, r: u32| remap.map(series, field, r);
            for r in &mut ts.labels_refs {
                *r = map("labels_refs", *r)?;
            }
            for e in &mut ts.exemplars {
                for r in &mut e.labels_refs {
                    *r = map("exemplar labels_refs", *r)?;
                }
            }
            if let Some(m) = &mut ts.metadata {
                m.help_ref = map("help_ref", m.help_ref)?;
                m.unit_ref = map("unit_ref", m.unit_ref)?;
            }
            out.timeseries.push(ts);
        }
        series_base = out.timeseries.len();
    }
    Ok(out)
}

/// [`merge_v2`] on encoded requests: appends to `out` the encoding of the
/// request `merge_v2` makes of the decoded `parts`, byte for byte, without
/// decoding them, and returns what it carries.
///
/// Memory beyond `out`: one hash map entry per distinct symbol of the parts
/// (a borrowed slice and its new reference, about 30 bytes) and 4 bytes per
/// symbol of the largest part, whatever the number of series.
///
/// # Errors
/// As [`merge_v2`]; `out` is then as it was.
pub fn merge_v2_bytes(parts: &[CheckedV2<'_>], out: &mut Vec<u8>) -> Result<Summary, DecodeError> {
    let start = out.len();
    let result = merge_into(parts, None, &mut Enc::buf(out));
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// [`merge_v2_bytes`] into a sink, as the request is made: the same bytes,
/// and beyond the symbol map, at most [`Sink::nested_buffer_limit`] bytes
/// buffered: a series larger than that is measured, then written in parts
/// (see `canon::Enc`).
///
/// # Errors
/// As [`merge_v2`]; `sink` may then have received part of the request.
pub fn merge_v2_into(parts: &[CheckedV2<'_>], sink: &mut dyn Sink) -> Result<Summary, DecodeError> {
    let mut pending = Vec::new();
    let mut out = Enc::sink(sink, &mut pending);
    let result = merge_into(parts, None, &mut out);
    out.flush();
    result
}

/// [`merge_v2_into`] cut to the series of `shard` of `shards`
/// ([`crate::shard`], their labels resolved through each part's symbols):
/// those series, in order, as the merge writes them, with a symbol table
/// of only the strings they refer to (`""` first, then in the order of the
/// parts' tables). Returns what the cut request carries. With one shard it
/// is [`merge_v2_into`]'s request.
///
/// # Errors
/// As [`merge_v2`], for any series of the parts (whether or not it is of
/// this shard: a damaged record fails alike in every shard).
pub fn shard_v2_into(
    parts: &[CheckedV2<'_>],
    shard: u32,
    shards: u32,
    sink: &mut dyn Sink,
) -> Result<Summary, DecodeError> {
    let mut pending = Vec::new();
    let mut out = Enc::sink(sink, &mut pending);
    let keep = (shards > 1).then_some((shard, shards));
    let result = merge_into(parts, keep, &mut out);
    out.flush();
    result
}

/// Which series of `part` are of `shard` of `shards`, and which of its
/// symbols they refer to (the empty string always).
fn shard_marks(part: &CheckedV2<'_>, shard: u32, shards: u32) -> (Vec<bool>, Vec<bool>) {
    let mut used = vec![false; part.symbols.len().max(1)];
    used[0] = true;
    let mut mark = |r: u32| {
        if let Some(u) = used.get_mut(r as usize) {
            *u = true;
        }
    };
    let mut kept = Vec::new();
    for s in part.series() {
        let ours =
            crate::shard::shard_of(crate::translate::v2_series_hash(part, s), shards) == shard;
        kept.push(ours);
        if !ours {
            continue;
        }
        refs(s).for_each(&mut mark);
        for (tag, e) in Fields::new(s) {
            if tag == 4 {
                refs(e.bytes()).for_each(&mut mark);
            }
        }
        if let Some((_, help, unit)) = series_metadata(s) {
            mark(help);
            mark(unit);
        }
    }
    (kept, used)
}

/// Old reference -> new reference for one part's symbols.
struct Remap {
    new: Vec<u32>,
}

impl Remap {
    /// Maps `r` as [`merge_v2`] does, `series` and `field` naming it in an
    /// error.
    fn map(&self, series: usize, field: &'static str, r: u32) -> Result<u32, DecodeError> {
        // An empty table is allowed when nothing refers to it but 0.
        if r == 0 && self.new.is_empty() {
            return Ok(0);
        }
        self.new
            .get(r as usize)
            .copied()
            .ok_or(DecodeError::SymbolRefOutOfRange {
                series,
                field,
                reference: r,
                symbols: self.new.len(),
            })
    }

    /// For references already checked.
    fn get(&self, r: u32) -> u32 {
        self.new.get(r as usize).copied().unwrap_or(0)
    }
}

/// Merges `parts`, or with `keep` = (shard, shards), only their series of
/// that shard and the symbols those refer to.
fn merge_into<'a>(
    parts: &[CheckedV2<'a>],
    keep: Option<(u32, u32)>,
    out: &mut Enc<'_>,
) -> Result<Summary, DecodeError> {
    // The symbols come first: "", then each new string in order of first
    // appearance, written as they are found.
    let mut index: HashMap<&'a [u8], u32> = HashMap::from([(&b""[..], 0)]);
    put_key(out, 4, WT_LEN);
    put_varint(out, 0);
    let mut remap = Remap { new: Vec::new() };
    let mut series_base = 0;
    // Per part, with `keep`: which series are of the shard.
    let mut kept_series: Vec<Vec<bool>> = Vec::new();
    for part in parts {
        stream::check_first_symbol(&part.symbols)?;
        remap.new.clear();
        let used = keep.map(|(shard, shards)| {
            let (kept, used) = shard_marks(part, shard, shards);
            kept_series.push(kept);
            used
        });
        for (i, (_, s)) in Fields::new(part.buf)
            .filter(|&(tag, _)| tag == 4)
            .enumerate()
        {
            if used
                .as_ref()
                .is_some_and(|u| !u.get(i).copied().unwrap_or(false))
            {
                // Referred to by no series of the shard: never mapped.
                remap.new.push(0);
                continue;
            }
            let s = s.bytes();
            let next = index.len() as u32;
            let r = *index.entry(s).or_insert_with(|| {
                put_key(out, 4, WT_LEN);
                put_varint(out, s.len() as u64);
                out.put(s);
                next
            });
            remap.new.push(r);
        }
        for (i, s) in part.series().enumerate() {
            let series = series_base + i;
            for r in refs(s) {
                remap.map(series, "labels_refs", r)?;
            }
            for (tag, e) in Fields::new(s) {
                if tag == 4 {
                    for r in refs(e.bytes()) {
                        remap.map(series, "exemplar labels_refs", r)?;
                    }
                }
            }
            if let Some((_, help, unit)) = series_metadata(s) {
                remap.map(series, "help_ref", help)?;
                remap.map(series, "unit_ref", unit)?;
            }
        }
        series_base += part.series().count();
    }
    let mut summary = Summary::default();
    for (p, part) in parts.iter().enumerate() {
        remap.new.clear();
        let symbols = Fields::new(part.buf).filter(|&(tag, _)| tag == 4);
        remap
            .new
            .extend(symbols.map(|(_, s)| index.get(s.bytes()).copied().unwrap_or(0)));
        match kept_series.get(p) {
            None => {
                for s in part.series() {
                    series_v2(out, s, &remap);
                }
                summary.merge(&part.summary());
            }
            Some(kept) => {
                let ours = || part.series().zip(kept).filter_map(|(s, &k)| k.then_some(s));
                for s in ours() {
                    series_v2(out, s, &remap);
                }
                summary.merge(&stream::summarize_v2_series(ours()));
            }
        }
    }
    Ok(summary)
}

/// A 2.0 series as prost encodes it, its references mapped.
fn series_v2(out: &mut Enc<'_>, s: &[u8], remap: &Remap) {
    let mapped = |msg| move || refs(msg).map(|r| u64::from(remap.get(r)));
    let _ = nested_made_of::<()>(out, 5, s.len(), |out| {
        put_packed(out, 1, mapped(s));
        for (tag, v) in Fields::new(s) {
            if tag == 2 {
                canon::sample(out, 2, v.bytes());
            }
        }
        for (tag, v) in Fields::new(s) {
            if tag == 3 {
                canon::histogram(out, 3, v.bytes());
            }
        }
        for (tag, e) in Fields::new(s) {
            if tag == 4 {
                let e = e.bytes();
                let _ = nested::<()>(out, 4, |out| {
                    put_packed(out, 1, mapped(e));
                    put_double(out, 2, f64::from_bits(pb::last(e, 2)));
                    put_uint(out, 3, pb::last(e, 3));
                    Ok(())
                });
            }
        }
        if let Some((r#type, help, unit)) = series_metadata(s) {
            let _ = nested::<()>(out, 5, |out| {
                put_uint(out, 1, canon::int32(r#type));
                put_uint(out, 3, u64::from(remap.get(help)));
                put_uint(out, 4, u64::from(remap.get(unit)));
                Ok(())
            });
        }
        put_uint(out, 6, pb::last(s, 6));
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::decode::{decode_v1, decompress_snappy};

    fn series(name: &str, ts: i64) -> v1::TimeSeries {
        v1::TimeSeries {
            labels: vec![v1::Label {
                name: "__name__".into(),
                value: name.into(),
            }],
            samples: vec![v1::Sample {
                value: 1.5,
                timestamp: ts,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn snappy_round_trip() {
        let data = b"hello hello hello hello remote write".repeat(100);
        let c = snappy_compress(&data);
        assert!(c.len() < data.len());
        assert_eq!(decompress_snappy(&c, data.len()).unwrap(), data);
        assert_eq!(snappy_compress(&[]), vec![0u8]);
        assert_eq!(decompress_snappy(&[0u8], 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn concat_merges_repeated_fields() {
        let a = v1::WriteRequest {
            timeseries: vec![series("a", 1), series("b", 2)],
            metadata: vec![v1::MetricMetadata {
                r#type: v1::MetricType::Counter as i32,
                metric_family_name: "a".into(),
                help: "A".into(),
                unit: String::new(),
            }],
        };
        let b = v1::WriteRequest {
            timeseries: vec![series("c", 3)],
            metadata: vec![],
        };
        let c = v1::WriteRequest::default();
        let d = v1::WriteRequest {
            timeseries: vec![series("d", 4)],
            metadata: vec![v1::MetricMetadata {
                r#type: v1::MetricType::Gauge as i32,
                metric_family_name: "d".into(),
                ..Default::default()
            }],
        };
        let (ea, eb, ec, ed) = (encode_v1(&a), encode_v1(&b), encode_v1(&c), encode_v1(&d));
        let mut out = vec![];
        concat_v1(&[&ea, &eb, &ec, &ed], &mut out);
        let merged = decode_v1(&out).unwrap();
        let mut expect = a.clone();
        expect.timeseries.extend(b.timeseries.clone());
        expect.timeseries.extend(d.timeseries.clone());
        expect.metadata.extend(d.metadata.clone());
        assert_eq!(merged, expect);
        // prost's own merge agrees.
        let mut m = a.clone();
        prost::Message::merge(&mut m, eb.as_slice()).unwrap();
        prost::Message::merge(&mut m, ed.as_slice()).unwrap();
        assert_eq!(m, expect);
        // Appending to a non-empty buffer keeps what was there.
        let mut out2 = ea.clone();
        concat_v1(&[&eb], &mut out2);
        assert_eq!(decode_v1(&out2).unwrap().timeseries.len(), 3);
    }

    fn v2_series(symbols: &mut Vec<String>, labels: &[(&str, &str)], ts: i64) -> v2::TimeSeries {
        let mut r = |s: &str| match symbols.iter().position(|x| x == s) {
            Some(i) => i as u32,
            None => {
                symbols.push(s.to_string());
                symbols.len() as u32 - 1
            }
        };
        let labels_refs = labels.iter().flat_map(|(k, v)| [r(k), r(v)]).collect();
        let help_ref = r("help of it");
        v2::TimeSeries {
            labels_refs,
            samples: vec![v2::Sample {
                value: ts as f64,
                timestamp: ts,
            }],
            exemplars: vec![v2::Exemplar {
                labels_refs: vec![r("trace_id"), r(&format!("t{ts}"))],
                value: 0.5,
                timestamp: ts,
            }],
            metadata: Some(v2::Metadata {
                r#type: v2::MetricType::Gauge as i32,
                help_ref,
                unit_ref: 0,
            }),
            created_timestamp: ts - 1,
            ..Default::default()
        }
    }

    #[test]
    fn merged_v2_requests_translate_like_the_parts_in_order() {
        let mut sa = vec![String::new()];
        let a = v2::Request {
            timeseries: vec![
                v2_series(&mut sa, &[("__name__", "m"), ("job", "a")], 10),
                v2_series(&mut sa, &[("__name__", "n"), ("job", "a")], 11),
            ],
            symbols: sa,
        };
        // Other order of first appearance, so the references differ.
        let mut sb = vec![String::new(), "zzz".into(), "job".into()];
        let b = v2::Request {
            timeseries: vec![v2_series(&mut sb, &[("__name__", "m"), ("job", "b")], 12)],
            symbols: sb,
        };
        let empty = v2::Request::default();
        let merged = merge_v2(vec![a.clone(), empty, b.clone()]).unwrap();
        assert_eq!(merged.symbols[0], "");
        let mut unique = merged.symbols.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), merged.symbols.len(), "each symbol once");
        let (got, dropped) = crate::translate::v2_to_v1(&merged).unwrap();
        let (mut want, _) = crate::translate::v2_to_v1(&a).unwrap();
        want.timeseries
            .extend(crate::translate::v2_to_v1(&b).unwrap().0.timeseries);
        assert_eq!(got.timeseries, want.timeseries);
        assert_eq!(dropped.created_timestamps, 3);
        assert!(merged.timeseries.iter().all(|t| t.created_timestamp != 0));
        // It passes the relay's own validation.
        let s = crate::decode::validate(
            crate::Protocol::V2,
            &encode_v2(&merged),
            &crate::Limits::default(),
        )
        .unwrap();
        assert_eq!((s.samples, s.exemplars, s.series), (3, 3, 3));
    }

    #[test]
    fn merging_refuses_a_reference_outside_the_symbol_table() {
        let bad = v2::Request {
            symbols: vec![String::new(), "__name__".into()],
            timeseries: vec![v2::TimeSeries {
                labels_refs: vec![1, 7],
                ..Default::default()
            }],
        };
        assert!(matches!(
            merge_v2(vec![bad]),
            Err(DecodeError::SymbolRefOutOfRange { reference: 7, .. })
        ));
    }
}
