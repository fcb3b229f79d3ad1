#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use prom_remote_write::decode::{validate_v1, DecodeError, Limits, Summary};
use prom_remote_write::translate::{count_v1, count_v2, histogram_v2_to_v1, v2_to_v1, Dropped};
use prom_remote_write::{v1, v2};

const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

fn full_v2_histogram() -> v2::Histogram {
    v2::Histogram {
        count: Some(v2::histogram::Count::CountInt(10)),
        sum: -3.25,
        schema: -4,
        zero_threshold: 0.001,
        zero_count: Some(v2::histogram::ZeroCount::ZeroCountInt(1)),
        negative_spans: vec![v2::BucketSpan {
            offset: -3,
            length: 1,
        }],
        negative_deltas: vec![2],
        negative_counts: vec![0.25],
        positive_spans: vec![
            v2::BucketSpan {
                offset: 1,
                length: 2,
            },
            v2::BucketSpan {
                offset: 4,
                length: 1,
            },
        ],
        positive_deltas: vec![3, -1, 0],
        positive_counts: vec![1.5, 2.5],
        reset_hint: v2::histogram::ResetHint::Gauge as i32,
        timestamp: 123_456,
        custom_values: vec![0.5, 1.0, f64::INFINITY],
    }
}

#[test]
fn labels_samples_exemplars_histograms() {
    let mut b = V2Builder::new();
    let i = b.series(&[("__name__", "http_requests_total"), ("job", "api")]);
    let tr = b.refs(&[("trace_id", "abc"), ("span_id", "def")]);
    let ts = &mut b.req.timeseries[i];
    ts.samples = vec![
        v2::Sample {
            value: 1.0,
            timestamp: 10,
        },
        v2::Sample {
            value: f64::from_bits(STALE_NAN),
            timestamp: 20,
        },
        v2::Sample {
            value: f64::INFINITY,
            timestamp: 30,
        },
        v2::Sample {
            value: f64::NEG_INFINITY,
            timestamp: 40,
        },
    ];
    ts.exemplars = vec![v2::Exemplar {
        labels_refs: tr,
        value: 0.75,
        timestamp: 15,
    }];
    ts.histograms = vec![full_v2_histogram()];

    let (out, dropped) = v2_to_v1(&b.req).unwrap();
    assert_eq!(dropped, Dropped::default());
    assert!(out.metadata.is_empty());
    assert_eq!(out.timeseries.len(), 1);
    let s = &out.timeseries[0];
    assert_eq!(
        s.labels,
        vec![
            label("__name__", "http_requests_total"),
            label("job", "api")
        ]
    );
    assert_eq!(s.metric_name(), Some("http_requests_total"));
    assert_eq!(s.samples.len(), 4);
    assert_eq!(s.samples[2].value, f64::INFINITY);
    assert_eq!(s.samples[3].value, f64::NEG_INFINITY);
    assert_eq!(s.samples[3].timestamp, 40);
    assert_eq!(
        s.samples[0],
        v1::Sample {
            value: 1.0,
            timestamp: 10
        }
    );
    assert_eq!(s.samples[1].value.to_bits(), STALE_NAN);
    assert_eq!(s.samples[1].timestamp, 20);
    assert_eq!(
        s.exemplars,
        vec![v1::Exemplar {
            labels: vec![label("trace_id", "abc"), label("span_id", "def")],
            value: 0.75,
            timestamp: 15
        }]
    );
    let expect = v1::Histogram {
        count: Some(v1::histogram::Count::CountInt(10)),
        sum: -3.25,
        schema: -4,
        zero_threshold: 0.001,
        zero_count: Some(v1::histogram::ZeroCount::ZeroCountInt(1)),
        negative_spans: vec![v1::BucketSpan {
            offset: -3,
            length: 1,
        }],
        negative_deltas: vec![2],
        negative_counts: vec![0.25],
        positive_spans: vec![
            v1::BucketSpan {
                offset: 1,
                length: 2,
            },
            v1::BucketSpan {
                offset: 4,
                length: 1,
            },
        ],
        positive_deltas: vec![3, -1, 0],
        positive_counts: vec![1.5, 2.5],
        reset_hint: v1::histogram::ResetHint::Gauge as i32,
        timestamp: 123_456,
        custom_values: vec![0.5, 1.0, f64::INFINITY],
    };
    assert_eq!(s.histograms, vec![expect]);
    // Same wire encoding for the histogram in both protocols.
    assert_eq!(
        prost::Message::encode_to_vec(&s.histograms[0]),
        prost::Message::encode_to_vec(&full_v2_histogram())
    );
}

#[test]
fn float_histogram_oneofs() {
    let h = v2::Histogram {
        count: Some(v2::histogram::Count::CountFloat(f64::NAN)),
        zero_count: Some(v2::histogram::ZeroCount::ZeroCountFloat(-0.0)),
        ..Default::default()
    };
    let out = histogram_v2_to_v1(&h);
    assert!(out.is_float());
    match (out.count, out.zero_count) {
        (
            Some(v1::histogram::Count::CountFloat(c)),
            Some(v1::histogram::ZeroCount::ZeroCountFloat(z)),
        ) => {
            assert_eq!(c.to_bits(), f64::NAN.to_bits());
            assert_eq!(z.to_bits(), (-0.0f64).to_bits());
        }
        other => panic!("{other:?}"),
    }
    let out = histogram_v2_to_v1(&v2::Histogram::default());
    assert_eq!(out, v1::Histogram::default());
}

#[test]
fn metadata_per_family_deduplicated() {
    let mut b = V2Builder::new();
    let help = b.sym("Requests.");
    let other_help = b.sym("Other help.");
    let unit = b.sym("requests");
    let md = |help_ref| v2::Metadata {
        r#type: v2::MetricType::Counter as i32,
        help_ref,
        unit_ref: unit,
    };
    for (labels, m) in [
        (
            &[("__name__", "req_total"), ("code", "200")][..],
            Some(md(help)),
        ),
        (
            &[("__name__", "req_total"), ("code", "500")][..],
            Some(md(help)),
        ), // same: merged
        (
            &[("__name__", "req_total"), ("code", "404")][..],
            Some(md(other_help)),
        ), // conflict: dropped
        (&[("__name__", "up")][..], None),
        (
            &[("__name__", "temp")][..],
            Some(v2::Metadata {
                r#type: v2::MetricType::Gauge as i32,
                help_ref: 0,
                unit_ref: 0,
            }),
        ),
        (&[("__name__", "empty")][..], Some(v2::Metadata::default())), // no content: skipped
    ] {
        let i = b.series(labels);
        b.req.timeseries[i].metadata = m;
    }
    let (out, dropped) = v2_to_v1(&b.req).unwrap();
    assert_eq!(
        dropped,
        Dropped {
            created_timestamps: 0,
            metadata: 1
        }
    );
    assert_eq!(
        out.metadata,
        vec![
            v1::MetricMetadata {
                r#type: v1::MetricType::Counter as i32,
                metric_family_name: "req_total".into(),
                help: "Requests.".into(),
                unit: "requests".into(),
            },
            v1::MetricMetadata {
                r#type: v1::MetricType::Gauge as i32,
                metric_family_name: "temp".into(),
                help: String::new(),
                unit: String::new(),
            },
        ]
    );
    assert_eq!(out.metadata[0].r#type(), v1::MetricType::Counter);
    assert_eq!(out.timeseries.len(), 6);
}

#[test]
fn metric_type_numbers_agree() {
    use v1::MetricType as M1;
    use v2::MetricType as M2;
    let pairs = [
        (M1::Unknown, M2::Unspecified),
        (M1::Counter, M2::Counter),
        (M1::Gauge, M2::Gauge),
        (M1::Histogram, M2::Histogram),
        (M1::Gaugehistogram, M2::Gaugehistogram),
        (M1::Summary, M2::Summary),
        (M1::Info, M2::Info),
        (M1::Stateset, M2::Stateset),
    ];
    for (i, (a, b)) in pairs.into_iter().enumerate() {
        assert_eq!(a as i32, i as i32);
        assert_eq!(b as i32, i as i32);
    }
    assert_eq!(
        v1::histogram::ResetHint::Gauge as i32,
        v2::histogram::ResetHint::Gauge as i32
    );
}

#[test]
fn created_timestamps_are_counted_as_dropped() {
    let mut b = V2Builder::new();
    for n in ["a", "b", "c"] {
        b.series(&[("__name__", n)]);
    }
    b.req.timeseries[0].created_timestamp = 1;
    b.req.timeseries[2].created_timestamp = -5;
    let (_, dropped) = v2_to_v1(&b.req).unwrap();
    assert_eq!(dropped.created_timestamps, 2);
}

#[test]
fn broken_symbol_tables_are_errors() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "a")]);
    let good = b.req.clone();

    b.req.symbols[0] = "x".into();
    assert_eq!(
        v2_to_v1(&b.req).unwrap_err(),
        DecodeError::FirstSymbolNotEmpty
    );

    let mut r = good.clone();
    r.timeseries[0].labels_refs.push(0);
    assert!(matches!(
        v2_to_v1(&r),
        Err(DecodeError::OddLabelRefs { .. })
    ));

    let mut r = good.clone();
    r.timeseries[0].labels_refs[1] = 100;
    assert!(matches!(
        v2_to_v1(&r),
        Err(DecodeError::SymbolRefOutOfRange { reference: 100, .. })
    ));

    let mut r = good.clone();
    r.timeseries[0].exemplars.push(v2::Exemplar {
        labels_refs: vec![0, 55],
        value: 0.0,
        timestamp: 0,
    });
    assert!(matches!(
        v2_to_v1(&r),
        Err(DecodeError::SymbolRefOutOfRange {
            field: "exemplar labels_refs",
            ..
        })
    ));

    let mut r = good;
    r.timeseries[0].metadata = Some(v2::Metadata {
        r#type: 1,
        help_ref: 0,
        unit_ref: 9,
    });
    assert!(matches!(
        v2_to_v1(&r),
        Err(DecodeError::SymbolRefOutOfRange {
            field: "unit_ref",
            ..
        })
    ));
}

#[test]
fn translated_request_validates_and_counts_alike() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "a"), ("x", "1")]);
    b.series(&[("__name__", "b")]);
    b.req.timeseries[1].histograms.push(v2::Histogram {
        count: Some(v2::histogram::Count::CountInt(3)),
        positive_spans: vec![v2::BucketSpan {
            offset: 0,
            length: 1,
        }],
        positive_deltas: vec![3],
        timestamp: 5,
        ..Default::default()
    });
    let (out, _) = v2_to_v1(&b.req).unwrap();
    let s = validate_v1(&out, &Limits::default()).unwrap();
    assert_eq!(s, count_v1(&out));
    assert_eq!(s, count_v2(&b.req));
    assert_eq!(
        s,
        Summary {
            samples: 2,
            histograms: 1,
            exemplars: 0,
            series: 2,
            min_ts: 5,
            max_ts: 1000
        }
    );
}
