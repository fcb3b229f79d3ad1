//! Validation of an incoming request body before the relay stores it.
//!
//! The relay acknowledges a request once it is durable in its log, long
//! before any replica sees it. A request that a replica would refuse must
//! therefore be refused *here*, with the same 4xx the replica would give:
//! once acknowledged, a bad request would be re-sent to every replica,
//! refused by each, and (being "already delivered" in the shipper's eyes,
//! see the design brief) silently dropped, while the sender believes it
//! was stored. Worse, a shipper coalescing records could merge the bad one
//! with good ones and lose the whole merged request.
//!
//! The checks, in order:
//!
//! 1. [`decompress_snappy`]: the snappy block header declares the decoded
//!    length; it is compared with [`Limits::max_decoded_bytes`] *before*
//!    anything is allocated, so a 20-byte body declaring 4 GiB costs nothing
//!    ([`DecodeError::TooLarge`], HTTP 413).
//! 2. [`validate`] first walks the protobuf wire format without allocating:
//!    it counts the series ([`Limits::max_series`], [`DecodeError::TooManySeries`])
//!    and estimates the memory prost would need, refusing bodies that would
//!    expand more than [`MAX_EXPANSION`] times ([`DecodeError::ExpandsTooMuch`]).
//!    The relay no longer decodes with prost, but keeps the check so that
//!    every body gets the answer it always got.
//! 3. The declared message must be one prost would decode
//!    ([`DecodeError::Protobuf`]: truncation, wrong wire types, invalid
//!    UTF-8 in strings..., worded as prost words them). It is not decoded:
//!    `crate::pb` walks it as prost would, and the rules below are applied to
//!    the bytes (`crate::stream`), reading each field where it lies (the last
//!    occurrence of a singular field wins, repeated scalars come packed or
//!    not, as prost reads them).
//! 4. For 2.0: `symbols[0]` is `""` when there are symbols, every
//!    `labels_refs` has an even length, and every reference (labels,
//!    exemplar labels, `help_ref`, `unit_ref`) is within `symbols`.
//! 5. Every series (the 2.0 ones after resolving their labels) has at least
//!    one label, no empty label name, no label name twice, and a non-empty
//!    `__name__`; plus the optional per-label limits. Prometheus refuses the
//!    whole request with 400 for any of these.
//! 6. Native histograms, as Prometheus validates them before appending:
//!    spans must describe exactly as many buckets as are given, spans after
//!    the first must not have negative offsets, no bucket count may be
//!    negative, and for integer histograms the count must equal the zero
//!    count plus the absolute bucket counts decoded from the deltas (at
//!    least that when the sum is NaN: NaN observations are counted but in
//!    no bucket). Prometheus' compliance suite sends count 99 with buckets
//!    adding up to 23 and expects a 400. Float histograms are not checked
//!    for the count, as Prometheus does not either (rounding).
//!
//! Not checked, because replicas accept or repair them: label order, label
//! name character set, sample order, exemplar label content, histogram
//! schema numbers, custom-bucket bounds.
//!
//! Series indices in error messages are 0-based positions in the request.
//!
//! # Memory
//!
//! Validation allocates nothing per series, label, sample, exemplar,
//! histogram, bucket or metadata entry. Measured (`benches/hotpath.rs`,
//! peak heap bytes during validation / decoded bytes, 8 MiB bodies): 0 for
//! 2.0 tiny series, 1.0 series with exemplars, histograms of 1000 buckets
//! (1.0 and 2.0) and metadata-only bodies (at most 32 bytes: the index of a
//! 2.0 symbol table of 3 symbols), where decoding into owned structs took 9
//! to 47 bytes per byte. The 2.0 symbol index is at most 1/16 byte per byte
//! (0.094 with its growth, for a body of empty symbols). Only a series
//! whose label names are not sorted needs memory that grows with it: 4
//! bytes per label (1.0: at most 0.8 byte per byte, 0.5 measured) or per
//! distinct 2.0 name reference (0.93 measured for a body that is one such
//! series). The constant is thus below 1 byte per decoded byte for any body,
//! and about 0 for the shapes senders send, on top of the decoded body
//! itself. `tests/streaming.rs` proves the answers equal to those of the
//! owned-struct validation (`validate_owned`, feature `reference`).

use prost::Message;

use crate::content::Protocol;
use crate::{v1, v2, wire, METRIC_NAME_LABEL};

/// Default [`Limits::max_decoded_bytes`]: 32 MiB.
pub const DEFAULT_MAX_DECODED_BYTES: usize = 32 << 20;

/// A decoded body may need at most this many times its size in Rust structs
/// (string contents not counted), or [`MIN_EXPANSION_ALLOWANCE`] if larger.
///
/// Typical requests need 3 to 6 times. The densest legitimate shapes stay
/// under about 22: series with only a one-letter `__name__` (8.5), and
/// series carrying many empty native histograms that have nothing but a
/// schema and a timestamp (232 bytes of struct for 11 on the wire). Bombs
/// made of empty elements need more: empty series 48 times (60 in 2.0),
/// empty metadata 40, empty histograms over 100. With the default 32 MiB
/// body limit, the structures of an accepted body thus stay under 1 GiB;
/// lower [`Limits::max_decoded_bytes`] for a tighter bound.
pub const MAX_EXPANSION: u64 = 32;

/// Small bodies may always expand to this many bytes.
pub const MIN_EXPANSION_ALLOWANCE: u64 = 1 << 20;

/// Limits applied by [`validate`].
///
/// All the count and length limits default to 0, meaning unlimited: the
/// relay must not be stricter than the replicas behind it, and Prometheus'
/// own limits (`label_limit`, `label_name_length_limit`,
/// `label_value_length_limit`) default to unlimited too. Set them to match
/// the replicas' if those are configured stricter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Largest accepted decoded (decompressed) body, in bytes. Default 32 MiB.
    pub max_decoded_bytes: usize,
    /// Largest number of series in one request; 0 = unlimited (default).
    pub max_series: usize,
    /// Largest number of labels of one series; 0 = unlimited (default).
    pub max_labels_per_series: usize,
    /// Longest label name, in bytes; 0 = unlimited (default).
    pub max_label_name_len: usize,
    /// Longest label value, in bytes; 0 = unlimited (default).
    pub max_label_value_len: usize,
    /// Most bytes of label names and values a 2.0 request may expand to
    /// when translated to 1.0 (each series and exemplar spells out the
    /// strings its references name); 0 = unlimited (default). A 2.0 request
    /// is small however often it references one long symbol, its 1.0
    /// translation is not: the relay keeps such a record from ever reaching
    /// a 1.0 replica's shipper (see [`DecodeError::TranslationTooLarge`]).
    pub max_translated_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_decoded_bytes: DEFAULT_MAX_DECODED_BYTES,
            max_series: 0,
            max_labels_per_series: 0,
            max_label_name_len: 0,
            max_label_value_len: 0,
            max_translated_bytes: 0,
        }
    }
}

/// What a valid request contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Summary {
    /// Float samples.
    pub samples: u64,
    /// Native histogram samples.
    pub histograms: u64,
    /// Exemplars.
    pub exemplars: u64,
    /// Series (top-level `timeseries` entries).
    pub series: u64,
    /// Smallest timestamp of a float sample or histogram; `i64::MAX` if none.
    pub min_ts: i64,
    /// Largest timestamp of a float sample or histogram; `i64::MIN` if none.
    pub max_ts: i64,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            samples: 0,
            histograms: 0,
            exemplars: 0,
            series: 0,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
        }
    }
}

impl Summary {
    /// Takes a sample or histogram timestamp into account.
    pub fn observe_ts(&mut self, ts: i64) {
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
    }

    /// True when at least one float sample or histogram was seen.
    pub fn has_timestamps(&self) -> bool {
        self.min_ts <= self.max_ts
    }

    /// Adds `other` into `self` (counts summed, time range widened).
    pub fn merge(&mut self, other: &Summary) {
        self.samples += other.samples;
        self.histograms += other.histograms;
        self.exemplars += other.exemplars;
        self.series += other.series;
        self.min_ts = self.min_ts.min(other.min_ts);
        self.max_ts = self.max_ts.max(other.max_ts);
    }
}

/// Why a request body was refused. Each message is short and suitable as
/// the body of the HTTP answer: 413 when [`DecodeError::is_too_large`], 400
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The decoded body is (or declares to be) larger than the limit.
    #[error("decoded body of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Decoded length declared by the snappy header, or actual length.
        declared: u64,
        /// [`Limits::max_decoded_bytes`].
        limit: usize,
    },
    /// The protobuf would expand into far more memory than its size
    /// justifies (a bomb of empty elements).
    #[error("request would take about {estimated} bytes in memory, more than the {limit} allowed for its size")]
    ExpandsTooMuch {
        /// Estimated bytes of decoded structures.
        estimated: u64,
        /// Allowed bytes for this body.
        limit: u64,
    },
    /// A 2.0 request whose 1.0 translation would spell out more label bytes
    /// than [`Limits::max_translated_bytes`]. Checked once the rest of the
    /// request is valid.
    #[error("its remote-write 1.0 translation would hold {bytes} bytes of label names and values, more than the {limit} allowed")]
    TranslationTooLarge {
        /// Label bytes of the translation.
        bytes: u64,
        /// [`Limits::max_translated_bytes`].
        limit: usize,
    },
    /// More series than [`Limits::max_series`].
    #[error("{count} series exceed the limit of {limit} per request")]
    TooManySeries {
        /// Series in the request.
        count: u64,
        /// [`Limits::max_series`].
        limit: usize,
    },
    /// The body is not a valid snappy block.
    #[error("invalid snappy block: {0}")]
    Snappy(String),
    /// The decoded body is not a valid protobuf message of the declared type.
    #[error("invalid protobuf: {0}")]
    Protobuf(String),
    /// 2.0: `symbols` is non-empty and does not start with `""`.
    #[error("symbols[0] must be the empty string")]
    FirstSymbolNotEmpty,
    /// 2.0: a `labels_refs` list has an odd length.
    #[error("series {series}: {field} has odd length {len}")]
    OddLabelRefs {
        /// Series index.
        series: usize,
        /// `labels_refs` or `exemplar labels_refs`.
        field: &'static str,
        /// Length of the list.
        len: usize,
    },
    /// 2.0: a reference points outside `symbols`.
    #[error("series {series}: {field} reference {reference} out of range ({symbols} symbols)")]
    SymbolRefOutOfRange {
        /// Series index.
        series: usize,
        /// `labels_refs`, `exemplar labels_refs`, `help_ref` or `unit_ref`.
        field: &'static str,
        /// The reference.
        reference: u32,
        /// Number of symbols in the request.
        symbols: usize,
    },
    /// A series has no labels at all.
    #[error("series {series}: no labels")]
    NoLabels {
        /// Series index.
        series: usize,
    },
    /// A series has no `__name__` label, or an empty one.
    #[error("series {series}: missing __name__ label")]
    MissingMetricName {
        /// Series index.
        series: usize,
    },
    /// A label has an empty name.
    #[error("series {series}: empty label name")]
    EmptyLabelName {
        /// Series index.
        series: usize,
    },
    /// A label name appears twice in one series.
    #[error("series {series}: duplicate label name {name:?}")]
    DuplicateLabelName {
        /// Series index.
        series: usize,
        /// The repeated name.
        name: String,
    },
    /// A series has more labels than [`Limits::max_labels_per_series`].
    #[error("series {series}: {count} labels exceed the limit of {limit}")]
    TooManyLabels {
        /// Series index.
        series: usize,
        /// Labels of the series.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A label name is longer than [`Limits::max_label_name_len`].
    #[error("series {series}: label name of {len} bytes exceeds the limit of {limit}")]
    LabelNameTooLong {
        /// Series index.
        series: usize,
        /// Length of the name.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A label value is longer than [`Limits::max_label_value_len`].
    #[error("series {series}: value of label {name:?} is {len} bytes, over the limit of {limit}")]
    LabelValueTooLong {
        /// Series index.
        series: usize,
        /// The label's name.
        name: String,
        /// Length of the value.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Integer native histogram whose count differs from the zero count
    /// plus its bucket counts.
    #[error("series {series}: histogram {histogram}: count {count} does not match {buckets} in the zero bucket and buckets")]
    HistogramCountMismatch {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// The declared count.
        count: u64,
        /// Zero count plus bucket counts.
        buckets: u128,
    },
    /// Integer native histogram with a NaN sum whose count is smaller than
    /// the zero count plus its bucket counts.
    #[error("series {series}: histogram {histogram}: count {count} is smaller than {buckets} in the zero bucket and buckets")]
    HistogramCountNotBigEnough {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// The declared count.
        count: u64,
        /// Zero count plus bucket counts.
        buckets: u128,
    },
    /// A native histogram bucket count (decoded from deltas, or absolute for
    /// float histograms) is negative.
    #[error("series {series}: histogram {histogram}: negative count in {side} bucket {bucket}")]
    HistogramNegativeBucketCount {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// `positive` or `negative`.
        side: &'static str,
        /// Bucket index.
        bucket: usize,
    },
    /// A native histogram's spans describe a different number of buckets
    /// than given.
    #[error(
        "series {series}: histogram {histogram}: {side} spans need {spans} buckets, have {buckets}"
    )]
    HistogramSpansMismatch {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// `positive` or `negative`.
        side: &'static str,
        /// Buckets described by the spans.
        spans: u64,
        /// Buckets given.
        buckets: usize,
    },
    /// A native histogram span other than the first has a negative offset.
    #[error(
        "series {series}: histogram {histogram}: {side} span {span} has negative offset {offset}"
    )]
    HistogramNegativeSpanOffset {
        /// Series index.
        series: usize,
        /// Histogram index in the series.
        histogram: usize,
        /// `positive` or `negative`.
        side: &'static str,
        /// Span index.
        span: usize,
        /// The offset.
        offset: i32,
    },
}

impl DecodeError {
    /// A stable, machine-friendly name of the cause (for metric labels and
    /// logs).
    pub fn as_error_code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::ExpandsTooMuch { .. } => "expands_too_much",
            DecodeError::TooManySeries { .. } => "too_many_series",
            DecodeError::TranslationTooLarge { .. } => "translation_too_large",
            DecodeError::Snappy(_) => "snappy",
            DecodeError::Protobuf(_) => "protobuf",
            DecodeError::FirstSymbolNotEmpty => "first_symbol_not_empty",
            DecodeError::OddLabelRefs { .. } => "odd_labels_refs",
            DecodeError::SymbolRefOutOfRange { .. } => "symbol_ref_out_of_range",
            DecodeError::NoLabels { .. } => "no_labels",
            DecodeError::MissingMetricName { .. } => "missing_metric_name",
            DecodeError::EmptyLabelName { .. } => "empty_label_name",
            DecodeError::DuplicateLabelName { .. } => "duplicate_label_name",
            DecodeError::TooManyLabels { .. } => "too_many_labels",
            DecodeError::LabelNameTooLong { .. } => "label_name_too_long",
            DecodeError::LabelValueTooLong { .. } => "label_value_too_long",
            DecodeError::HistogramCountMismatch { .. } => "histogram_count_mismatch",
            DecodeError::HistogramCountNotBigEnough { .. } => "histogram_count_not_big_enough",
            DecodeError::HistogramNegativeBucketCount { .. } => "histogram_negative_bucket_count",
            DecodeError::HistogramSpansMismatch { .. } => "histogram_spans_mismatch",
            DecodeError::HistogramNegativeSpanOffset { .. } => "histogram_negative_span_offset",
        }
    }

    /// True for the causes answered with 413 (the request as a whole is too
    /// big); all others are 400.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            DecodeError::TooLarge { .. }
                | DecodeError::ExpandsTooMuch { .. }
                | DecodeError::TooManySeries { .. }
                | DecodeError::TranslationTooLarge { .. }
        )
    }
}

/// Decompresses a snappy block, refusing before any allocation a body whose
/// header declares more than `max_decoded` bytes.
pub fn decompress_snappy(body: &[u8], max_decoded: usize) -> Result<Vec<u8>, DecodeError> {
    let too_large = |declared: u64| DecodeError::TooLarge {
        declared,
        limit: max_decoded,
    };
    let declared = match snap::raw::decompress_len(body) {
        Ok(n) => n as u64,
        Err(snap::Error::TooBig { given, .. }) => return Err(too_large(given)),
        Err(e) => {
            // snap refuses headers longer than 5 bytes before reading their
            // value; report a huge declared length as such.
            if let Some(declared) = read_uvarint(body) {
                if declared > max_decoded as u64 {
                    return Err(too_large(declared));
                }
            }
            return Err(DecodeError::Snappy(e.to_string()));
        }
    };
    if declared > max_decoded as u64 {
        return Err(too_large(declared));
    }
    if body.is_empty() {
        return Err(DecodeError::Snappy("empty body".to_string()));
    }
    let mut out = vec![0u8; declared as usize];
    let n = snap::raw::Decoder::new()
        .decompress(body, &mut out)
        .map_err(|e| DecodeError::Snappy(e.to_string()))?;
    out.truncate(n);
    Ok(out)
}

/// A little-endian base-128 varint of at most 10 bytes.
fn read_uvarint(b: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Decodes a 1.0 `WriteRequest` (no validation).
pub fn decode_v1(decoded: &[u8]) -> Result<v1::WriteRequest, DecodeError> {
    v1::WriteRequest::decode(decoded)
        .map_err(|e| DecodeError::Protobuf(format!("prometheus.WriteRequest: {e}")))
}

/// Decodes a 2.0 `Request` (no validation).
pub fn decode_v2(decoded: &[u8]) -> Result<v2::Request, DecodeError> {
    v2::Request::decode(decoded)
        .map_err(|e| DecodeError::Protobuf(format!("io.prometheus.write.v2.Request: {e}")))
}

/// Validates a decoded (decompressed) body as the message of `protocol`
/// against every rule of this module and `limits`.
///
/// The body is read where it lies, never decoded into owned structs (see
/// "Memory" in the module docs: no memory that grows with the body for
/// requests with sorted labels, less than a byte per byte for any).
///
/// # Errors
/// The first rule the body breaks, as described in the module docs. A body
/// of 4 GiB or more is [`DecodeError::TooLarge`] whatever the limit (no
/// snappy block decodes to that much).
pub fn validate(
    protocol: Protocol,
    decoded: &[u8],
    limits: &Limits,
) -> Result<Summary, DecodeError> {
    check_size(decoded, limits)?;
    // The common case (1.0, labels and float samples only) in one pass: see
    // `wire::validate_v1_fast`.
    if protocol == Protocol::V1 {
        if let Some(summary) = wire::validate_v1_fast(decoded, limits) {
            return Ok(summary);
        }
    }
    validate_without_fast_path(protocol, decoded, limits)
}

/// [`validate`] without its one-pass fast path for plain 1.0 requests: the
/// path the fast path is tested against.
#[doc(hidden)]
pub fn validate_without_fast_path(
    protocol: Protocol,
    decoded: &[u8],
    limits: &Limits,
) -> Result<Summary, DecodeError> {
    check_size_and_shape(protocol, decoded, limits)?;
    crate::stream::validate(protocol, decoded, limits)
}

/// [`validate`] as it was done before [`crate::stream`]: prost decodes the
/// whole request into owned structs (about 27 bytes of memory per byte of
/// some bodies), then [`validate_v1`] / [`validate_v2`] apply the rules.
/// The reference the streaming validation is tested against; not for the
/// relay.
#[cfg(feature = "reference")]
#[doc(hidden)]
pub fn validate_owned(
    protocol: Protocol,
    decoded: &[u8],
    limits: &Limits,
) -> Result<Summary, DecodeError> {
    check_size_and_shape(protocol, decoded, limits)?;
    match protocol {
        Protocol::V1 => validate_v1(&decode_v1(decoded)?, limits),
        Protocol::V2 => validate_v2(&decode_v2(decoded)?, limits),
    }
}

fn check_size(decoded: &[u8], limits: &Limits) -> Result<(), DecodeError> {
    // Positions in the body are kept as `u32`.
    let limit = limits.max_decoded_bytes.min(u32::MAX as usize);
    if decoded.len() > limit {
        return Err(DecodeError::TooLarge {
            declared: decoded.len() as u64,
            limit,
        });
    }
    Ok(())
}

/// The checks made before the rules, which bounded what prost would have
/// allocated: the size, the structure of the message ([`wire::scan`]), the
/// series limit, and the expansion estimate ([`MAX_EXPANSION`]). The
/// streaming validation does not need the last one to bound its memory, but
/// keeps it so that it answers every body exactly as before.
fn check_size_and_shape(
    protocol: Protocol,
    decoded: &[u8],
    limits: &Limits,
) -> Result<(), DecodeError> {
    check_size(decoded, limits)?;
    let shape = wire::scan(protocol, decoded).map_err(|e| {
        DecodeError::Protobuf(match protocol {
            Protocol::V1 => format!("prometheus.WriteRequest: {e}"),
            Protocol::V2 => format!("io.prometheus.write.v2.Request: {e}"),
        })
    })?;
    if limits.max_series != 0 && shape.series > limits.max_series as u64 {
        return Err(DecodeError::TooManySeries {
            count: shape.series,
            limit: limits.max_series,
        });
    }
    let allowance = (decoded.len() as u64)
        .saturating_mul(MAX_EXPANSION)
        .max(MIN_EXPANSION_ALLOWANCE);
    if shape.struct_bytes > allowance {
        return Err(DecodeError::ExpandsTooMuch {
            estimated: shape.struct_bytes,
            limit: allowance,
        });
    }
    Ok(())
}

/// Applies the rules to an already decoded 1.0 request (the size limits on
/// the body excepted).
pub fn validate_v1(req: &v1::WriteRequest, limits: &Limits) -> Result<Summary, DecodeError> {
    if limits.max_series != 0 && req.timeseries.len() > limits.max_series {
        return Err(DecodeError::TooManySeries {
            count: req.timeseries.len() as u64,
            limit: limits.max_series,
        });
    }
    let mut summary = Summary::default();
    let mut labels: Vec<(&str, &str)> = Vec::new();
    for (i, ts) in req.timeseries.iter().enumerate() {
        labels.clear();
        labels.extend(
            ts.labels
                .iter()
                .map(|l| (l.name.as_str(), l.value.as_str())),
        );
        check_labels(i, &mut labels, limits)?;
        for (j, h) in ts.histograms.iter().enumerate() {
            check_histogram_v1(i, j, h)?;
            summary.observe_ts(h.timestamp);
        }
        for s in &ts.samples {
            summary.observe_ts(s.timestamp);
        }
        summary.series += 1;
        summary.samples += ts.samples.len() as u64;
        summary.histograms += ts.histograms.len() as u64;
        summary.exemplars += ts.exemplars.len() as u64;
    }
    Ok(summary)
}

/// Applies the rules to an already decoded 2.0 request (the size limits on
/// the body excepted).
pub fn validate_v2(req: &v2::Request, limits: &Limits) -> Result<Summary, DecodeError> {
    if limits.max_series != 0 && req.timeseries.len() > limits.max_series {
        return Err(DecodeError::TooManySeries {
            count: req.timeseries.len() as u64,
            limit: limits.max_series,
        });
    }
    check_first_symbol(&req.symbols)?;
    let mut summary = Summary::default();
    let mut labels: Vec<(&str, &str)> = Vec::new();
    let mut translated = 0u64;
    let len_of = |r: u32| req.symbols.get(r as usize).map_or(0, |s| s.len() as u64);
    for (i, ts) in req.timeseries.iter().enumerate() {
        labels.clear();
        resolve_pairs(&req.symbols, i, "labels_refs", &ts.labels_refs, &mut labels)?;
        translated = labels.iter().fold(translated, |t, (n, v)| {
            t.saturating_add((n.len() + v.len()) as u64)
        });
        check_labels(i, &mut labels, limits)?;
        for e in &ts.exemplars {
            check_refs(&req.symbols, i, "exemplar labels_refs", &e.labels_refs)?;
            translated = e
                .labels_refs
                .iter()
                .fold(translated, |t, &r| t.saturating_add(len_of(r)));
        }
        if let Some(m) = &ts.metadata {
            symbol(&req.symbols, i, "help_ref", m.help_ref)?;
            symbol(&req.symbols, i, "unit_ref", m.unit_ref)?;
        }
        for (j, h) in ts.histograms.iter().enumerate() {
            check_histogram_v2(i, j, h)?;
            summary.observe_ts(h.timestamp);
        }
        for s in &ts.samples {
            summary.observe_ts(s.timestamp);
        }
        summary.series += 1;
        summary.samples += ts.samples.len() as u64;
        summary.histograms += ts.histograms.len() as u64;
        summary.exemplars += ts.exemplars.len() as u64;
    }
    check_translated(translated, limits)?;
    Ok(summary)
}

/// [`Limits::max_translated_bytes`] against the label bytes a 2.0
/// request's 1.0 translation spells out.
pub(crate) fn check_translated(bytes: u64, limits: &Limits) -> Result<(), DecodeError> {
    let limit = limits.max_translated_bytes;
    if limit != 0 && bytes > limit as u64 {
        return Err(DecodeError::TranslationTooLarge { bytes, limit });
    }
    Ok(())
}

pub(crate) fn check_first_symbol(symbols: &[String]) -> Result<(), DecodeError> {
    match symbols.first() {
        Some(s) if !s.is_empty() => Err(DecodeError::FirstSymbolNotEmpty),
        _ => Ok(()),
    }
}

/// Looks a reference up in the symbol table.
pub(crate) fn symbol<'a>(
    symbols: &'a [String],
    series: usize,
    field: &'static str,
    reference: u32,
) -> Result<&'a str, DecodeError> {
    symbols
        .get(reference as usize)
        .map(String::as_str)
        .ok_or(DecodeError::SymbolRefOutOfRange {
            series,
            field,
            reference,
            symbols: symbols.len(),
        })
}

/// Checks a `labels_refs` list: even length, every reference in range.
pub(crate) fn check_refs(
    symbols: &[String],
    series: usize,
    field: &'static str,
    refs: &[u32],
) -> Result<(), DecodeError> {
    if !refs.len().is_multiple_of(2) {
        return Err(DecodeError::OddLabelRefs {
            series,
            field,
            len: refs.len(),
        });
    }
    for &r in refs {
        symbol(symbols, series, field, r)?;
    }
    Ok(())
}

/// Resolves a `labels_refs` list into name/value pairs appended to `out`.
pub(crate) fn resolve_pairs<'a>(
    symbols: &'a [String],
    series: usize,
    field: &'static str,
    refs: &[u32],
    out: &mut Vec<(&'a str, &'a str)>,
) -> Result<(), DecodeError> {
    check_refs(symbols, series, field, refs)?;
    for pair in refs.chunks_exact(2) {
        out.push((
            symbol(symbols, series, field, pair[0])?,
            symbol(symbols, series, field, pair[1])?,
        ));
    }
    Ok(())
}

/// The label rules; sorts `labels` by name when they are not sorted.
pub(crate) fn check_labels(
    series: usize,
    labels: &mut [(&str, &str)],
    limits: &Limits,
) -> Result<(), DecodeError> {
    let mut rules = LabelRules::new(series, limits);
    for &(name, value) in labels.iter() {
        rules.label(name.as_bytes(), value.as_bytes());
    }
    rules.check()?;
    let duplicate = match rules.duplicate_if_sorted() {
        Some(d) => d,
        None => {
            labels.sort_unstable_by(|a, b| a.0.cmp(b.0));
            labels
                .windows(2)
                .find(|w| w[0].0 == w[1].0)
                .map(|w| w[0].0.as_bytes())
        }
    };
    rules.finish(duplicate)
}

/// The label rules of one series, fed its labels in order; the checks and
/// their order are [`check_labels`']: the number of labels, then each label
/// (empty name, name and value lengths), then a name given twice (the
/// smallest such name, as found after sorting), then `__name__`. Names
/// compare as bytes, which for UTF-8 is the order of `str`. A label never
/// fails at once: the first failure is kept for [`LabelRules::check`],
/// since the number of labels, checked first, is known only at the end.
pub(crate) struct LabelRules<'a, 'l> {
    series: usize,
    limits: &'l Limits,
    count: usize,
    /// The first label that broke a rule.
    failed: Option<DecodeError>,
    has_name: bool,
    sorted: bool,
    previous: Option<&'a [u8]>,
    /// The first name equal to the one before it, while sorted.
    duplicate: Option<&'a [u8]>,
}

impl<'a, 'l> LabelRules<'a, 'l> {
    pub(crate) fn new(series: usize, limits: &'l Limits) -> Self {
        LabelRules {
            series,
            limits,
            count: 0,
            failed: None,
            has_name: false,
            sorted: true,
            previous: None,
            duplicate: None,
        }
    }

    /// Labels seen.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// The next label; `name` and `value` are UTF-8.
    #[inline]
    pub(crate) fn label(&mut self, name: &'a [u8], value: &[u8]) {
        self.count += 1;
        if self.failed.is_some() {
            return;
        }
        let (series, limits) = (self.series, self.limits);
        if name.is_empty() {
            self.failed = Some(DecodeError::EmptyLabelName { series });
        } else if limits.max_label_name_len != 0 && name.len() > limits.max_label_name_len {
            self.failed = Some(DecodeError::LabelNameTooLong {
                series,
                len: name.len(),
                limit: limits.max_label_name_len,
            });
        } else if limits.max_label_value_len != 0 && value.len() > limits.max_label_value_len {
            self.failed = Some(DecodeError::LabelValueTooLong {
                series,
                name: String::from_utf8_lossy(name).into_owned(),
                len: value.len(),
                limit: limits.max_label_value_len,
            });
        }
        if name == METRIC_NAME_LABEL.as_bytes() && !value.is_empty() {
            self.has_name = true;
        }
        if let Some(previous) = self.previous {
            if name < previous {
                self.sorted = false;
            } else if name == previous && self.sorted && self.duplicate.is_none() {
                self.duplicate = Some(name);
            }
        }
        self.previous = Some(name);
    }

    /// The number of labels, then the first label that broke a rule.
    pub(crate) fn check(&mut self) -> Result<(), DecodeError> {
        let (series, limits, count) = (self.series, self.limits, self.count);
        if count == 0 {
            return Err(DecodeError::NoLabels { series });
        }
        if limits.max_labels_per_series != 0 && count > limits.max_labels_per_series {
            return Err(DecodeError::TooManyLabels {
                series,
                count,
                limit: limits.max_labels_per_series,
            });
        }
        self.failed.take().map_or(Ok(()), Err)
    }

    /// When the labels were in order: `Some` of the name given twice, if
    /// any. `None` when they were not: the caller sorts them to find it.
    pub(crate) fn duplicate_if_sorted(&self) -> Option<Option<&'a [u8]>> {
        self.sorted.then_some(self.duplicate)
    }

    /// The last rules (after [`LabelRules::check`]), given the smallest name
    /// given twice.
    pub(crate) fn finish(&self, duplicate: Option<&[u8]>) -> Result<(), DecodeError> {
        if let Some(name) = duplicate {
            return Err(DecodeError::DuplicateLabelName {
                series: self.series,
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        if !self.has_name {
            return Err(DecodeError::MissingMetricName {
                series: self.series,
            });
        }
        Ok(())
    }
}

/// Span rules: offsets of spans after the first are not negative, and the
/// spans describe exactly `buckets` buckets.
fn check_spans(
    series: usize,
    histogram: usize,
    side: &'static str,
    spans: impl Iterator<Item = (i32, u32)>,
    buckets: usize,
) -> Result<(), DecodeError> {
    let mut need: u64 = 0;
    for (n, (offset, length)) in spans.enumerate() {
        if n > 0 && offset < 0 {
            return Err(DecodeError::HistogramNegativeSpanOffset {
                series,
                histogram,
                side,
                span: n,
                offset,
            });
        }
        need += u64::from(length);
    }
    if need != buckets as u64 {
        return Err(DecodeError::HistogramSpansMismatch {
            series,
            histogram,
            side,
            spans: need,
            buckets,
        });
    }
    Ok(())
}

/// Sum of the absolute bucket counts decoded from deltas; refuses a negative
/// bucket.
fn sum_deltas(
    series: usize,
    histogram: usize,
    side: &'static str,
    deltas: impl Iterator<Item = i64>,
) -> Result<u128, DecodeError> {
    let mut current: i128 = 0;
    let mut total: u128 = 0;
    for (bucket, d) in deltas.enumerate() {
        current += i128::from(d);
        if current < 0 {
            return Err(DecodeError::HistogramNegativeBucketCount {
                series,
                histogram,
                side,
                bucket,
            });
        }
        total += current as u128;
    }
    Ok(total)
}

fn check_float_counts(
    series: usize,
    histogram: usize,
    side: &'static str,
    mut counts: impl Iterator<Item = f64>,
) -> Result<(), DecodeError> {
    match counts.position(|c| c < 0.0) {
        Some(bucket) => Err(DecodeError::HistogramNegativeBucketCount {
            series,
            histogram,
            side,
            bucket,
        }),
        None => Ok(()),
    }
}

/// What the histogram rules read of a native histogram, 1.0 or 2.0, decoded
/// or on the wire. `positive` picks the side.
pub(crate) trait HistogramParts {
    /// `count` is `count_float`.
    fn is_float(&self) -> bool;
    /// `count_int`, or 0.
    fn count_int(&self) -> u64;
    /// `zero_count_int`, or 0.
    fn zero_int(&self) -> u64;
    fn sum(&self) -> f64;
    /// (offset, length) of each span.
    fn spans(&self, positive: bool) -> impl Iterator<Item = (i32, u32)>;
    fn deltas(&self, positive: bool) -> impl Iterator<Item = i64>;
    fn delta_count(&self, positive: bool) -> usize;
    fn counts(&self, positive: bool) -> impl Iterator<Item = f64>;
    fn count_count(&self, positive: bool) -> usize;
}

/// The native histogram rules (see the module docs).
pub(crate) fn check_histogram(
    series: usize,
    histogram: usize,
    h: &impl HistogramParts,
) -> Result<(), DecodeError> {
    const SIDES: [(&str, bool); 2] = [("negative", false), ("positive", true)];
    if h.is_float() {
        for (side, positive) in SIDES {
            let buckets = h.count_count(positive);
            check_spans(series, histogram, side, h.spans(positive), buckets)?;
        }
        for (side, positive) in SIDES {
            check_float_counts(series, histogram, side, h.counts(positive))?;
        }
        return Ok(());
    }
    for (side, positive) in SIDES {
        let buckets = h.delta_count(positive);
        check_spans(series, histogram, side, h.spans(positive), buckets)?;
    }
    let mut buckets = u128::from(h.zero_int());
    for (side, positive) in SIDES {
        buckets += sum_deltas(series, histogram, side, h.deltas(positive))?;
    }
    let count = h.count_int();
    if h.sum().is_nan() {
        if buckets > u128::from(count) {
            return Err(DecodeError::HistogramCountNotBigEnough {
                series,
                histogram,
                count,
                buckets,
            });
        }
    } else if buckets != u128::from(count) {
        return Err(DecodeError::HistogramCountMismatch {
            series,
            histogram,
            count,
            buckets,
        });
    }
    Ok(())
}

/// [`HistogramParts`] of the decoded histograms of both protocols, which
/// have the same fields.
macro_rules! decoded_histogram_parts {
    ($m:ident) => {
        impl HistogramParts for $m::Histogram {
            fn is_float(&self) -> bool {
                matches!(self.count, Some($m::histogram::Count::CountFloat(_)))
            }
            fn count_int(&self) -> u64 {
                match self.count {
                    Some($m::histogram::Count::CountInt(c)) => c,
                    _ => 0,
                }
            }
            fn zero_int(&self) -> u64 {
                match self.zero_count {
                    Some($m::histogram::ZeroCount::ZeroCountInt(z)) => z,
                    _ => 0,
                }
            }
            fn sum(&self) -> f64 {
                self.sum
            }
            fn spans(&self, positive: bool) -> impl Iterator<Item = (i32, u32)> {
                let spans = if positive {
                    &self.positive_spans
                } else {
                    &self.negative_spans
                };
                spans.iter().map(|s| (s.offset, s.length))
            }
            fn deltas(&self, positive: bool) -> impl Iterator<Item = i64> {
                self.delta_slice(positive).iter().copied()
            }
            fn delta_count(&self, positive: bool) -> usize {
                self.delta_slice(positive).len()
            }
            fn counts(&self, positive: bool) -> impl Iterator<Item = f64> {
                self.count_slice(positive).iter().copied()
            }
            fn count_count(&self, positive: bool) -> usize {
                self.count_slice(positive).len()
            }
        }

        impl $m::Histogram {
            fn delta_slice(&self, positive: bool) -> &[i64] {
                if positive {
                    &self.positive_deltas
                } else {
                    &self.negative_deltas
                }
            }
            fn count_slice(&self, positive: bool) -> &[f64] {
                if positive {
                    &self.positive_counts
                } else {
                    &self.negative_counts
                }
            }
        }
    };
}
decoded_histogram_parts!(v1);
decoded_histogram_parts!(v2);

/// Native histogram rules for a 1.0 histogram (see the module docs).
pub fn check_histogram_v1(
    series: usize,
    histogram: usize,
    h: &v1::Histogram,
) -> Result<(), DecodeError> {
    check_histogram(series, histogram, h)
}

/// Native histogram rules for a 2.0 histogram (see the module docs).
pub fn check_histogram_v2(
    series: usize,
    histogram: usize,
    h: &v2::Histogram,
) -> Result<(), DecodeError> {
    check_histogram(series, histogram, h)
}
