//! Translation of 2.0 requests into 1.0 requests, for replicas that only
//! speak 1.0 (Prometheus 2.42 among them), and counting helpers.
//!
//! Every float sample, histogram and exemplar is carried over with its
//! value bit for bit (NaN payloads such as the stale marker included).
//! What 1.0 cannot carry is counted in [`Dropped`]:
//!
//! * `created_timestamp` has no 1.0 field;
//! * 1.0 metadata is per metric family, not per series: the 2.0 metadata of
//!   the series are turned into one [`v1::MetricMetadata`] per family (the
//!   family name being the series' `__name__` value), in first-seen order;
//!   identical repeats are merged silently, and a series whose metadata
//!   differs from what its family already has is counted as dropped.
//!   Metadata with no content (unspecified type, no help, no unit) is not
//!   metadata and is skipped without counting.

use std::collections::HashMap;

use crate::canon::{self, nested, nested_made_of, put_double, put_str, put_uint, Enc};
use crate::error::DecodeError;
use crate::limits::Summary;
use crate::pb::{self, Fields};
use crate::rules::{check_first_symbol, resolve_pairs, symbol};
use crate::sink::Sink;
use crate::stream::{self, refs};
use crate::symbols::Symbols;
use crate::{v1, v2, METRIC_NAME_LABEL};

/// What [`v2_to_v1`] could not carry over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Dropped {
    /// Series whose non-zero `created_timestamp` was dropped.
    pub created_timestamps: u64,
    /// Series metadata that conflicted with the metadata already taken for
    /// the same metric family.
    pub metadata: u64,
}

/// An encoded 2.0 request that prost would decode, read where it lies: what
/// [`v2_to_v1_bytes`] and [`crate::encode::merge_v2_bytes`] take, instead of
/// a decoded [`v2::Request`] (whose structs can take 27 times the bytes).
#[derive(Debug)]
pub struct CheckedV2<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) symbols: Symbols<'a>,
}

impl<'a> CheckedV2<'a> {
    /// Checks `buf` as `v2::Request::decode` would, and indexes its
    /// symbol table (at most 1/16 byte per byte of `buf`).
    ///
    /// # Errors
    /// [`DecodeError::Protobuf`], worded as for [`crate::decode::decode_v2`],
    /// when prost would not decode it; [`DecodeError::TooLarge`] for 4 GiB
    /// or more.
    pub fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() > u32::MAX as usize {
            return Err(DecodeError::TooLarge {
                declared: buf.len() as u64,
                limit: u32::MAX as usize,
            });
        }
        let symbols = stream::check_v2(buf)?;
        Ok(CheckedV2 { buf, symbols })
    }

    /// The encoded request.
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// What it carries, as [`count_v2`] counts it.
    pub fn summary(&self) -> Summary {
        stream::summarize_v2(self.buf)
    }

    /// Its series, in order.
    pub(crate) fn series(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        Fields::new(self.buf)
            .filter(|&(tag, _)| tag == 5)
            .map(|(_, v)| v.bytes())
    }

    /// Symbol `r` for series `series`'s `field`.
    pub(crate) fn symbol(
        &self,
        series: usize,
        field: &'static str,
        r: u32,
    ) -> Result<&'a [u8], DecodeError> {
        self.symbols.get(r).ok_or(DecodeError::SymbolRefOutOfRange {
            series,
            field,
            reference: r,
            symbols: self.symbols.len(),
        })
    }
}

/// The hash of the 2.0 series `s` (its bytes) of `req`: its labels
/// resolved through `req`'s symbols, which [`CheckedV2::new`] checked (a
/// reference out of range counts as the empty string; the merge refuses
/// such a series anyway).
pub(crate) fn v2_series_hash(req: &CheckedV2<'_>, s: &[u8]) -> u64 {
    crate::shard::series_hash(pairs(req, s))
}

/// The (name, value) strings of a `labels_refs` field whose references are
/// in range.
fn pairs<'r, 'a: 'r>(
    req: &'r CheckedV2<'a>,
    msg: &'a [u8],
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'r {
    let mut strings = refs(msg).map(|r| req.symbols.get(r).unwrap_or_default());
    std::iter::from_fn(move || Some((strings.next()?, strings.next()?)))
}

/// Translates an encoded 2.0 request into the encoded 1.0 `WriteRequest`
/// that [`v2_to_v1`] and prost's encoding would give, appended to `out`,
/// without decoding either into owned structs: the memory it needs beyond
/// `out` is the metadata of the request (one entry per metric family that
/// has some), whatever the number of series.
///
/// # Errors
/// As [`v2_to_v1`]; `out` is then as it was.
pub fn v2_to_v1_bytes(req: &CheckedV2<'_>, out: &mut Vec<u8>) -> Result<Dropped, DecodeError> {
    let start = out.len();
    let result = translate_into(req, None, &mut Enc::buf(out));
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// [`v2_to_v1_bytes`] into a sink, as the request is made: the same bytes,
/// and beyond the metadata, at most [`Sink::nested_buffer_limit`] bytes
/// buffered: a 1.0 series larger than that is measured, then written in
/// parts (see `canon::Enc`).
///
/// # Errors
/// As [`v2_to_v1`]; `sink` may then have received part of the request.
pub fn v2_to_v1_into(req: &CheckedV2<'_>, sink: &mut dyn Sink) -> Result<Dropped, DecodeError> {
    let mut pending = Vec::new();
    let mut out = Enc::sink(sink, &mut pending);
    let result = translate_into(req, None, &mut out);
    out.flush();
    result
}

/// [`v2_to_v1_into`] of only the series of `shard` of `shards`
/// ([`crate::shard`]): their 1.0 series in order, then the metadata they
/// carry; what is dropped is counted for them alone. With one shard it is
/// [`v2_to_v1_into`]'s request.
///
/// # Errors
/// As [`v2_to_v1`]; the labels and exemplars of every series are checked,
/// whatever its shard, so a damaged record fails in every shard.
pub fn v2_to_v1_shard_into(
    req: &CheckedV2<'_>,
    shard: u32,
    shards: u32,
    sink: &mut dyn Sink,
) -> Result<Dropped, DecodeError> {
    let mut pending = Vec::new();
    let mut out = Enc::sink(sink, &mut pending);
    let keep = (shards > 1).then_some((shard, shards));
    let result = translate_into(req, keep, &mut out);
    out.flush();
    result
}

/// 1.0 metadata: (type, family, help, unit).
type Metadata<'a> = (u64, &'a [u8], &'a [u8], &'a [u8]);

/// Translates `req`, or with `keep` = (shard, shards) only its series of
/// that shard.
fn translate_into<'a>(
    req: &CheckedV2<'a>,
    keep: Option<(u32, u32)>,
    out: &mut Enc<'_>,
) -> Result<Dropped, DecodeError> {
    stream::check_first_symbol(&req.symbols)?;
    let mut dropped = Dropped::default();
    let mut families: HashMap<&'a [u8], usize> = HashMap::new();
    let mut metadata: Vec<Metadata<'a>> = Vec::new();
    for (i, s) in req.series().enumerate() {
        stream::check_refs(i, "labels_refs", s, &req.symbols)?;
        for (tag, e) in Fields::new(s) {
            if tag == 4 {
                stream::check_refs(i, "exemplar labels_refs", e.bytes(), &req.symbols)?;
            }
        }
        if let Some((shard, shards)) = keep {
            if crate::shard::shard_of(v2_series_hash(req, s), shards) != shard {
                continue;
            }
        }
        if pb::last(s, 6) != 0 {
            dropped.created_timestamps += 1;
        }
        if let Some((r#type, help, unit)) = series_metadata(s) {
            let help = req.symbol(i, "help_ref", help)?;
            let unit = req.symbol(i, "unit_ref", unit)?;
            let empty = canon::int32(r#type) == 0 && help.is_empty() && unit.is_empty();
            if !empty {
                let family = family(req, s);
                let md = (canon::int32(r#type), family, help, unit);
                match families.get(family) {
                    Some(&idx) => {
                        if metadata[idx] != md {
                            dropped.metadata += 1;
                        }
                    }
                    None => {
                        families.insert(family, metadata.len());
                        metadata.push(md);
                    }
                }
            }
        }
        let _ = nested_made_of::<()>(out, 1, s.len(), |out| {
            for (name, value) in pairs(req, s) {
                label(out, 1, name, value);
            }
            for (tag, v) in Fields::new(s) {
                if tag == 2 {
                    canon::sample(out, 2, v.bytes());
                }
            }
            for (tag, e) in Fields::new(s) {
                if tag == 4 {
                    exemplar(req, out, e.bytes());
                }
            }
            for (tag, h) in Fields::new(s) {
                if tag == 3 {
                    canon::histogram(out, 4, h.bytes());
                }
            }
            Ok(())
        });
    }
    for (r#type, family, help, unit) in metadata {
        let _ = nested::<()>(out, 3, |out| {
            put_uint(out, 1, r#type);
            put_str(out, 2, family);
            put_str(out, 4, help);
            put_str(out, 5, unit);
            Ok(())
        });
    }
    Ok(dropped)
}

/// The metadata of a 2.0 series, if it has some: (type, help_ref,
/// unit_ref), its occurrences merged.
pub(crate) fn series_metadata(s: &[u8]) -> Option<(u64, u32, u32)> {
    let mut md = None;
    for (tag, v) in Fields::new(s) {
        if tag == 5 {
            let m = md.get_or_insert((0, 0, 0));
            for (t, f) in Fields::new(v.bytes()) {
                match t {
                    1 => m.0 = f.u64(),
                    3 => m.1 = f.u64() as u32,
                    4 => m.2 = f.u64() as u32,
                    _ => {}
                }
            }
        }
    }
    md
}

/// [`pairs_family`] on the bytes of a series whose references are in range.
fn family<'a>(req: &CheckedV2<'a>, s: &[u8]) -> &'a [u8] {
    let mut refs = refs(s);
    while let (Some(name), Some(value)) = (refs.next(), refs.next()) {
        if req.symbols.get(name) == Some(METRIC_NAME_LABEL.as_bytes()) {
            return req.symbols.get(value).unwrap_or_default();
        }
    }
    &[]
}

fn label(out: &mut Enc<'_>, tag: u32, name: &[u8], value: &[u8]) {
    let _ = nested::<()>(out, tag, |out| {
        put_str(out, 1, name);
        put_str(out, 2, value);
        Ok(())
    });
}

/// A 2.0 exemplar as a 1.0 one (references in range).
fn exemplar<'a>(req: &CheckedV2<'a>, out: &mut Enc<'_>, e: &'a [u8]) {
    let _ = nested::<()>(out, 3, |out| {
        for (name, value) in pairs(req, e) {
            label(out, 1, name, value);
        }
        put_double(out, 2, f64::from_bits(pb::last(e, 2)));
        put_uint(out, 3, pb::last(e, 3));
        Ok(())
    });
}

/// Translates a 2.0 request into a 1.0 `WriteRequest`.
///
/// Fails only on what makes the symbol table unusable (`symbols[0]` not
/// empty, odd or out-of-range references); label rules are [`crate::decode`]'s
/// business.
pub fn v2_to_v1(req: &v2::Request) -> Result<(v1::WriteRequest, Dropped), DecodeError> {
    check_first_symbol(&req.symbols)?;
    let symbols = &req.symbols;
    let mut dropped = Dropped::default();
    let mut out = v1::WriteRequest {
        timeseries: Vec::with_capacity(req.timeseries.len()),
        metadata: Vec::new(),
    };
    let mut families: HashMap<&str, usize> = HashMap::new();
    let mut pairs: Vec<(&str, &str)> = Vec::new();

    for (i, ts) in req.timeseries.iter().enumerate() {
        pairs.clear();
        resolve_pairs(symbols, i, "labels_refs", &ts.labels_refs, &mut pairs)?;
        let labels = to_labels(&pairs);

        let mut exemplars = Vec::with_capacity(ts.exemplars.len());
        for e in &ts.exemplars {
            pairs.clear();
            resolve_pairs(
                symbols,
                i,
                "exemplar labels_refs",
                &e.labels_refs,
                &mut pairs,
            )?;
            exemplars.push(v1::Exemplar {
                labels: to_labels(&pairs),
                value: e.value,
                timestamp: e.timestamp,
            });
        }

        if ts.created_timestamp != 0 {
            dropped.created_timestamps += 1;
        }

        if let Some(m) = &ts.metadata {
            let help = symbol(symbols, i, "help_ref", m.help_ref)?;
            let unit = symbol(symbols, i, "unit_ref", m.unit_ref)?;
            let empty = m.r#type == v2::MetricType::Unspecified as i32
                && help.is_empty()
                && unit.is_empty();
            // Borrowed from the symbol table, so it can key `families`.
            let family = pairs_family(symbols, &ts.labels_refs);
            if !empty {
                let md = v1::MetricMetadata {
                    r#type: m.r#type,
                    metric_family_name: family.to_string(),
                    help: help.to_string(),
                    unit: unit.to_string(),
                };
                match families.get(family) {
                    Some(&idx) => {
                        if out.metadata[idx] != md {
                            dropped.metadata += 1;
                        }
                    }
                    None => {
                        families.insert(family, out.metadata.len());
                        out.metadata.push(md);
                    }
                }
            }
        }

        out.timeseries.push(v1::TimeSeries {
            labels,
            samples: ts
                .samples
                .iter()
                .map(|s| v1::Sample {
                    value: s.value,
                    timestamp: s.timestamp,
                })
                .collect(),
            exemplars,
            histograms: ts.histograms.iter().map(histogram_v2_to_v1).collect(),
        });
    }
    Ok((out, dropped))
}

/// The `__name__` value of already range-checked `labels_refs`, borrowed from
/// the symbol table ("" when absent).
fn pairs_family<'a>(symbols: &'a [String], refs: &[u32]) -> &'a str {
    refs.chunks_exact(2)
        .find(|p| symbols.get(p[0] as usize).map(String::as_str) == Some(METRIC_NAME_LABEL))
        .and_then(|p| symbols.get(p[1] as usize))
        .map(String::as_str)
        .unwrap_or("")
}

fn to_labels(pairs: &[(&str, &str)]) -> Vec<v1::Label> {
    pairs
        .iter()
        .map(|&(name, value)| v1::Label {
            name: name.to_string(),
            value: value.to_string(),
        })
        .collect()
}

/// Field-by-field copy of a 2.0 histogram into a 1.0 one (same numbers,
/// same meaning).
pub fn histogram_v2_to_v1(h: &v2::Histogram) -> v1::Histogram {
    use v1::histogram as h1;
    use v2::histogram as h2;
    v1::Histogram {
        count: h.count.map(|c| match c {
            h2::Count::CountInt(n) => h1::Count::CountInt(n),
            h2::Count::CountFloat(f) => h1::Count::CountFloat(f),
        }),
        sum: h.sum,
        schema: h.schema,
        zero_threshold: h.zero_threshold,
        zero_count: h.zero_count.map(|z| match z {
            h2::ZeroCount::ZeroCountInt(n) => h1::ZeroCount::ZeroCountInt(n),
            h2::ZeroCount::ZeroCountFloat(f) => h1::ZeroCount::ZeroCountFloat(f),
        }),
        negative_spans: h.negative_spans.iter().map(span_v2_to_v1).collect(),
        negative_deltas: h.negative_deltas.clone(),
        negative_counts: h.negative_counts.clone(),
        positive_spans: h.positive_spans.iter().map(span_v2_to_v1).collect(),
        positive_deltas: h.positive_deltas.clone(),
        positive_counts: h.positive_counts.clone(),
        reset_hint: h.reset_hint,
        timestamp: h.timestamp,
        custom_values: h.custom_values.clone(),
    }
}

fn span_v2_to_v1(s: &v2::BucketSpan) -> v1::BucketSpan {
    v1::BucketSpan {
        offset: s.offset,
        length: s.length,
    }
}

/// Counts what a 1.0 request carries (no validation).
pub fn count_v1(req: &v1::WriteRequest) -> Summary {
    let mut s = Summary::default();
    for ts in &req.timeseries {
        s.series += 1;
        s.samples += ts.samples.len() as u64;
        s.histograms += ts.histograms.len() as u64;
        s.exemplars += ts.exemplars.len() as u64;
        ts.samples.iter().for_each(|x| s.observe_ts(x.timestamp));
        ts.histograms.iter().for_each(|x| s.observe_ts(x.timestamp));
    }
    s
}

/// Counts what a 2.0 request carries (no validation).
pub fn count_v2(req: &v2::Request) -> Summary {
    let mut s = Summary::default();
    for ts in &req.timeseries {
        s.series += 1;
        s.samples += ts.samples.len() as u64;
        s.histograms += ts.histograms.len() as u64;
        s.exemplars += ts.exemplars.len() as u64;
        ts.samples.iter().for_each(|x| s.observe_ts(x.timestamp));
        ts.histograms.iter().for_each(|x| s.observe_ts(x.timestamp));
    }
    s
}
