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
use crate::rules::{
    check_first_symbol, check_histogram, check_labels, check_refs, check_translated, resolve_pairs,
    symbol,
};
use crate::{v1, v2, varint, wire};

pub use crate::error::DecodeError;
pub use crate::limits::{
    Limits, Summary, DEFAULT_MAX_DECODED_BYTES, MAX_EXPANSION, MIN_EXPANSION_ALLOWANCE,
};

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
            if let Some(declared) = varint::read(body) {
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
            check_histogram(i, j, h)?;
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
            check_histogram(i, j, h)?;
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
