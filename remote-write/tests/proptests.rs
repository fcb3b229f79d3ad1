#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::collection::vec;
use proptest::prelude::*;

use prom_remote_write::decode::{decode_v1, decode_v2, decompress_snappy, validate, Limits};
use prom_remote_write::encode::{concat_v1, encode_v1, encode_v2, snappy_compress};
use prom_remote_write::translate::{count_v1, count_v2, v2_to_v1};
use prom_remote_write::{v1, v2, Protocol};

mod common;

const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

/// Any f64, with the special values well represented.
fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::from_bits(STALE_NAN)),
        Just(f64::NAN),
        Just(-f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(f64::MIN_POSITIVE / 4.0), // subnormal
        any::<u64>().prop_map(f64::from_bits),
        -1e9..1e9f64,
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,12}"
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,16}", "\\PC{0,8}"]
}

/// Distinct label names (never `__name__`) with any values, plus a non-empty
/// `__name__`.
fn labels() -> impl Strategy<Value = Vec<(String, String)>> {
    (
        "[a-z_:][a-z0-9_:]{0,20}",
        proptest::collection::btree_map(
            name().prop_filter("not __name__", |n| n != "__name__"),
            value(),
            0..6,
        ),
    )
        .prop_map(|(metric, rest)| {
            let mut v = vec![("__name__".to_string(), metric)];
            v.extend(rest);
            v
        })
}

fn deltas(counts: &[u64]) -> Vec<i64> {
    let mut prev = 0i64;
    counts
        .iter()
        .map(|&c| {
            let d = c as i64 - prev;
            prev = c as i64;
            d
        })
        .collect()
}

fn spans(n: usize) -> Vec<v1::BucketSpan> {
    // Split n buckets over up to two spans.
    match n {
        0 => vec![],
        1 => vec![v1::BucketSpan {
            offset: -2,
            length: 1,
        }],
        _ => vec![
            v1::BucketSpan {
                offset: -1,
                length: 1,
            },
            v1::BucketSpan {
                offset: 2,
                length: n as u32 - 1,
            },
        ],
    }
}

/// A valid integer histogram (count = zero + buckets, spans match).
fn histogram_v1() -> impl Strategy<Value = v1::Histogram> {
    (
        0u64..1000,
        vec(0u64..1000, 0..6),
        vec(0u64..1000, 0..6),
        any_f64(),
        -4i32..=8,
        any::<i64>(),
        0i32..4,
    )
        .prop_map(|(zero, pos, neg, sum, schema, ts, hint)| {
            let buckets: u64 = zero + pos.iter().sum::<u64>() + neg.iter().sum::<u64>();
            v1::Histogram {
                count: Some(v1::histogram::Count::CountInt(buckets)),
                sum,
                schema,
                zero_threshold: 1e-128,
                zero_count: Some(v1::histogram::ZeroCount::ZeroCountInt(zero)),
                negative_spans: spans(neg.len()),
                negative_deltas: deltas(&neg),
                negative_counts: vec![],
                positive_spans: spans(pos.len()),
                positive_deltas: deltas(&pos),
                positive_counts: vec![],
                reset_hint: hint,
                timestamp: ts,
                custom_values: vec![],
            }
        })
}

fn non_negative_f64() -> impl Strategy<Value = f64> {
    any_f64().prop_map(|x| if x < 0.0 { -x } else { x })
}

/// A valid float histogram, custom buckets (schema -53) included.
fn float_histogram_v1() -> impl Strategy<Value = v1::Histogram> {
    (
        any_f64(),
        non_negative_f64(),
        vec(non_negative_f64(), 0..5),
        vec(non_negative_f64(), 0..5),
        any_f64(),
        any_f64(),
        prop_oneof![Just(-53i32), -4i32..=8],
        vec(any_f64(), 0..4),
        any::<i64>(),
    )
        .prop_map(
            |(count, zero, pos, neg, sum, zt, schema, custom, ts)| v1::Histogram {
                count: Some(v1::histogram::Count::CountFloat(count)),
                sum,
                schema,
                zero_threshold: zt,
                zero_count: Some(v1::histogram::ZeroCount::ZeroCountFloat(zero)),
                negative_spans: spans(neg.len()),
                negative_deltas: vec![],
                negative_counts: neg,
                positive_spans: spans(pos.len()),
                positive_deltas: vec![],
                positive_counts: pos,
                reset_hint: 0,
                timestamp: ts,
                custom_values: custom,
            },
        )
}

fn series_v1() -> impl Strategy<Value = v1::TimeSeries> {
    (
        labels(),
        vec((any_f64(), any::<i64>()), 0..5),
        vec(
            (vec((name(), value()), 0..3), any_f64(), any::<i64>()),
            0..3,
        ),
        vec(prop_oneof![histogram_v1(), float_histogram_v1()], 0..3),
    )
        .prop_map(|(labels, samples, exemplars, histograms)| v1::TimeSeries {
            labels: labels
                .into_iter()
                .map(|(name, value)| v1::Label { name, value })
                .collect(),
            samples: samples
                .into_iter()
                .map(|(value, timestamp)| v1::Sample { value, timestamp })
                .collect(),
            exemplars: exemplars
                .into_iter()
                .map(|(l, value, timestamp)| v1::Exemplar {
                    labels: l
                        .into_iter()
                        .map(|(name, value)| v1::Label { name, value })
                        .collect(),
                    value,
                    timestamp,
                })
                .collect(),
            histograms,
        })
}

fn metadata_v1() -> impl Strategy<Value = v1::MetricMetadata> {
    (0i32..8, name(), value(), value()).prop_map(|(t, n, h, u)| v1::MetricMetadata {
        r#type: t,
        metric_family_name: n,
        help: h,
        unit: u,
    })
}

fn request_v1() -> impl Strategy<Value = v1::WriteRequest> {
    (vec(series_v1(), 0..8), vec(metadata_v1(), 0..3)).prop_map(|(timeseries, metadata)| {
        v1::WriteRequest {
            timeseries,
            metadata,
        }
    })
}

/// Builds a 2.0 request from 1.0 series, interning strings (in a shuffled
/// but deterministic order) and attaching metadata and created timestamps.
fn v2_from(
    series: &[v1::TimeSeries],
    created: &[i64],
    md: &[(i32, String, String)],
) -> v2::Request {
    let mut symbols = vec![String::new()];
    let mut sym = |s: &str| -> u32 {
        if let Some(i) = symbols.iter().position(|x| x == s) {
            return i as u32;
        }
        symbols.push(s.to_string());
        (symbols.len() - 1) as u32
    };
    let timeseries = series
        .iter()
        .enumerate()
        .map(|(i, ts)| {
            let md = md.get(i).map(|(t, h, u)| (*t, h.as_str(), u.as_str()));
            common::v2_series_from(ts, &mut sym, md, created.get(i).copied().unwrap_or(0))
        })
        .collect();
    v2::Request {
        symbols,
        timeseries,
    }
}

/// The bits a singular proto3 `double` field has after a trip through the
/// wire: proto3 does not encode a field equal to its default, and `-0.0 ==
/// 0.0`, so -0.0 arrives as +0.0 (Prometheus' gogo encoding does the same).
/// Every other value, NaN payloads included, is carried exactly.
fn wire_bits(x: f64) -> u64 {
    if x == 0.0 {
        0
    } else {
        x.to_bits()
    }
}

fn f64_bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_hist_bits(a: &v1::Histogram, b: &v1::Histogram) {
    // The protobuf encoding is the exact bit pattern of every field.
    assert_eq!(
        prost::Message::encode_to_vec(a),
        prost::Message::encode_to_vec(b)
    );
    assert_eq!(a.sum.to_bits(), b.sum.to_bits());
    assert_eq!(a.zero_threshold.to_bits(), b.zero_threshold.to_bits());
    assert_eq!(f64_bits(&a.positive_counts), f64_bits(&b.positive_counts));
    assert_eq!(f64_bits(&a.negative_counts), f64_bits(&b.negative_counts));
    assert_eq!(f64_bits(&a.custom_values), f64_bits(&b.custom_values));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_v1_round_trips_and_validates(req in request_v1()) {
        let enc = encode_v1(&req);
        let body = snappy_compress(&enc);
        let decoded = decompress_snappy(&body, Limits::default().max_decoded_bytes).unwrap();
        prop_assert_eq!(&decoded, &enc);
        let summary = validate(Protocol::V1, &decoded, &Limits::default()).unwrap();
        prop_assert_eq!(summary, count_v1(&req));
        prop_assert_eq!(summary.series, req.timeseries.len() as u64);
        let back = decode_v1(&decoded).unwrap();
        // Bit-exact (NaN != NaN under PartialEq, so compare encodings).
        prop_assert_eq!(encode_v1(&back), enc);
        for (a, b) in req.timeseries.iter().zip(&back.timeseries) {
            prop_assert_eq!(
                a.samples.iter().map(|s| (wire_bits(s.value), s.timestamp)).collect::<Vec<_>>(),
                b.samples.iter().map(|s| (s.value.to_bits(), s.timestamp)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn concat_of_n_requests_is_the_merged_request(reqs in vec(request_v1(), 0..6)) {
        let encoded: Vec<Vec<u8>> = reqs.iter().map(encode_v1).collect();
        let parts: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        concat_v1(&parts, &mut out);
        let mut merged = v1::WriteRequest::default();
        for r in &reqs {
            merged.timeseries.extend(r.timeseries.iter().cloned());
            merged.metadata.extend(r.metadata.iter().cloned());
        }
        prop_assert_eq!(out.len(), encoded.iter().map(Vec::len).sum::<usize>());
        let decoded = decode_v1(&out).unwrap();
        prop_assert_eq!(encode_v1(&decoded), encode_v1(&merged));
        prop_assert_eq!(decoded.timeseries.len(), merged.timeseries.len());
        // And the merged body is as valid as its parts.
        let s = validate(Protocol::V1, &out, &Limits::default()).unwrap();
        prop_assert_eq!(s, count_v1(&merged));
    }

    #[test]
    fn v2_to_v1_preserves_every_value_bit_for_bit(
        series in vec(series_v1(), 0..8),
        created in vec(prop_oneof![Just(0i64), any::<i64>()], 0..8),
        md in vec((0i32..8, value(), value()), 0..8),
    ) {
        let req = v2_from(&series, &created, &md);
        // The relay sees it through the wire: valid, and re-encodes identically.
        let enc = encode_v2(&req);
        let summary = validate(Protocol::V2, &enc, &Limits::default()).unwrap();
        prop_assert_eq!(summary, count_v2(&req));
        prop_assert_eq!(encode_v2(&decode_v2(&enc).unwrap()), enc);

        // The translation itself is exact, -0.0 included.
        let (out, dropped) = v2_to_v1(&req).unwrap();
        prop_assert_eq!(out.timeseries.len(), series.len());
        prop_assert_eq!(
            dropped.created_timestamps,
            created.iter().take(series.len()).filter(|&&c| c != 0).count() as u64
        );
        for (orig, got) in series.iter().zip(&out.timeseries) {
            prop_assert_eq!(&orig.labels, &got.labels);
            prop_assert_eq!(
                orig.samples.iter().map(|s| (s.value.to_bits(), s.timestamp)).collect::<Vec<_>>(),
                got.samples.iter().map(|s| (s.value.to_bits(), s.timestamp)).collect::<Vec<_>>()
            );
            prop_assert_eq!(orig.exemplars.len(), got.exemplars.len());
            for (a, b) in orig.exemplars.iter().zip(&got.exemplars) {
                prop_assert_eq!(&a.labels, &b.labels);
                prop_assert_eq!(a.value.to_bits(), b.value.to_bits());
                prop_assert_eq!(a.timestamp, b.timestamp);
            }
            prop_assert_eq!(orig.histograms.len(), got.histograms.len());
            for (a, b) in orig.histograms.iter().zip(&got.histograms) {
                assert_hist_bits(a, b);
            }
        }
        // The translation is a valid 1.0 request with the same content.
        let s1 = validate(Protocol::V1, &encode_v1(&out), &Limits::default()).unwrap();
        prop_assert_eq!(s1, summary);
        // One metadata entry per family at most.
        let mut fams: Vec<_> = out.metadata.iter().map(|m| m.metric_family_name.clone()).collect();
        let n = fams.len();
        fams.sort();
        fams.dedup();
        prop_assert_eq!(fams.len(), n);
        prop_assert!(n as u64 + dropped.metadata <= series.len().min(md.len()) as u64);
    }

    #[test]
    fn validate_never_panics_on_garbage(bytes in vec(any::<u8>(), 0..512), v2 in any::<bool>()) {
        let p = if v2 { Protocol::V2 } else { Protocol::V1 };
        let _ = validate(p, &bytes, &Limits::default());
        let _ = decompress_snappy(&bytes, 1 << 16);
    }

    #[test]
    fn corrupted_valid_bodies_never_panic(req in request_v1(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut enc = encode_v1(&req);
        if !enc.is_empty() {
            let i = pos.index(enc.len());
            enc[i] = byte;
        }
        let _ = validate(Protocol::V1, &enc, &Limits::default());
        let _ = validate(Protocol::V2, &enc, &Limits::default());
    }
}
