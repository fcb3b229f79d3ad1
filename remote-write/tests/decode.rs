#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use prom_remote_write::decode::{
    self, decompress_snappy, validate, validate_v1, DecodeError, Limits, Summary,
};
use prom_remote_write::encode::{encode_v1, encode_v2, snappy_compress};
use prom_remote_write::{v1, v2, Protocol};

fn check_v1(r: &v1::WriteRequest) -> Result<Summary, DecodeError> {
    validate(Protocol::V1, &encode_v1(r), &Limits::default())
}

fn check_v2(r: &v2::Request) -> Result<Summary, DecodeError> {
    validate(Protocol::V2, &encode_v2(r), &Limits::default())
}

// ---- snappy ----

#[test]
fn snappy_header_declaring_4gib_is_too_large() {
    // varint 2^32, then junk that is never read.
    let body = [0x80, 0x80, 0x80, 0x80, 0x10, 0x00, 0x01, 0x02];
    let err = decompress_snappy(&body, 32 << 20).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            declared: 1 << 32,
            limit: 32 << 20
        }
    );
    assert!(err.is_too_large());
    assert_eq!(err.as_error_code(), "too_large");
    assert_eq!(
        err.to_string(),
        "decoded body of 4294967296 bytes exceeds the limit of 33554432 bytes"
    );
}

#[test]
fn snappy_header_just_over_limit_and_huge_varints_are_too_large() {
    // 4 GiB - 1: a valid snappy length, over the limit.
    let err = decompress_snappy(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x00], 1024).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            declared: u32::MAX as u64,
            limit: 1024
        }
    );
    // 2^40: a 6-byte varint snap refuses to read.
    let err = decompress_snappy(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x20], 1024).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            declared: 1 << 40,
            limit: 1024
        }
    );
    // limit + 1 of a real body.
    let body = snappy_compress(&[7u8; 1025]);
    assert!(decompress_snappy(&body, 1024).unwrap_err().is_too_large());
    assert_eq!(decompress_snappy(&body, 1025).unwrap(), vec![7u8; 1025]);
}

#[test]
fn invalid_snappy_is_refused() {
    for body in [
        &b""[..],
        &[0x0a, 0xff, 0xff, 0xff][..], // declares 10 bytes, invalid tag stream
        b"this is definitely not snappy at all, it is plain text",
        &[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ][..], // bad varint
    ] {
        let err = decompress_snappy(body, 1 << 20).unwrap_err();
        assert!(matches!(err, DecodeError::Snappy(_)), "{body:?}: {err:?}");
        assert!(!err.is_too_large());
        assert_eq!(err.as_error_code(), "snappy");
        assert!(err.to_string().starts_with("invalid snappy block: "));
    }
    // A valid block cut short.
    let body = snappy_compress(&encode_v1(&req(vec![series(&[("__name__", "up")])])));
    assert!(matches!(
        decompress_snappy(&body[..body.len() - 1], 1 << 20),
        Err(DecodeError::Snappy(_))
    ));
}

#[test]
fn snappy_with_its_first_byte_overwritten_is_invalid_snappy_not_too_large() {
    // The compliance suite overwrites the first byte of a valid body and
    // expects 400. That byte holds the low bits of the declared length, so
    // the declared length stays far below the limit (413 would be wrong)
    // and no longer matches the data: a snappy error, whatever the size.
    for n_series in [1usize, 3, 40, 2000] {
        let r = req((0..n_series)
            .map(|i| series(&[("__name__", "up"), ("i", &i.to_string())]))
            .collect());
        let good = snappy_compress(&encode_v1(&r));
        assert!(decompress_snappy(&good, 32 << 20).is_ok());
        for byte in [0xffu8, 0x00, b'X', 0x80, 0x7f] {
            if byte == good[0] {
                continue;
            }
            let mut body = good.clone();
            body[0] = byte;
            let err = decompress_snappy(&body, 32 << 20).unwrap_err();
            assert!(
                matches!(err, DecodeError::Snappy(_)),
                "{n_series} series, first byte {byte:#x}: {err:?}"
            );
        }
    }
}

// ---- protobuf ----

#[test]
fn truncated_protobuf_is_refused() {
    let enc = encode_v1(&req(vec![series(&[("__name__", "up"), ("job", "x")])]));
    for cut in [1, 2, enc.len() / 2, enc.len() - 1] {
        let err = validate(Protocol::V1, &enc[..cut], &Limits::default()).unwrap_err();
        assert!(
            matches!(err, DecodeError::Protobuf(_)),
            "cut {cut}: {err:?}"
        );
        assert_eq!(err.as_error_code(), "protobuf");
        assert!(!err.is_too_large());
    }
    let enc = encode_v2(&{
        let mut b = V2Builder::new();
        b.series(&[("__name__", "up")]);
        b.req
    });
    let err = validate(Protocol::V2, &enc[..enc.len() - 1], &Limits::default()).unwrap_err();
    assert!(
        matches!(err, DecodeError::Protobuf(ref m) if m.contains("io.prometheus.write.v2.Request"))
    );
}

#[test]
fn wrong_wire_types_are_refused() {
    // WriteRequest.timeseries (1) as a varint.
    let err = validate(Protocol::V1, &[0x08, 0x01], &Limits::default()).unwrap_err();
    assert!(
        matches!(err, DecodeError::Protobuf(ref m) if m.contains("prometheus.WriteRequest")),
        "{err:?}"
    );
    // TimeSeries.samples (2) as fixed64 inside a series.
    let err = validate(
        Protocol::V1,
        &[0x0a, 0x09, 0x11, 0, 0, 0, 0, 0, 0, 0, 0],
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
    // Request.symbols (4) as a varint.
    let err = validate(Protocol::V2, &[0x20, 0x01], &Limits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
    // Invalid wire type 6 / 7.
    for b in [[0x0e, 0x00], [0x0f, 0x00]] {
        assert!(matches!(
            validate(Protocol::V1, &b, &Limits::default()),
            Err(DecodeError::Protobuf(_))
        ));
    }
}

#[test]
fn huge_and_deep_fields_are_refused() {
    // A series declaring a 4 GiB length in a 6-byte body.
    let err = validate(
        Protocol::V1,
        &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
    // A label declaring more bytes than its series holds.
    let err = validate(Protocol::V1, &[0x0a, 0x02, 0x0a, 0x7f], &Limits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
    // 10,000 nested groups at the top level.
    let mut deep = vec![0x4bu8; 10_000];
    deep.extend(vec![0x4cu8; 10_000]);
    let err = validate(Protocol::V1, &deep, &Limits::default()).unwrap_err();
    assert!(
        matches!(err, DecodeError::Protobuf(ref m) if m.contains("recursion")),
        "{err:?}"
    );
    // Nested groups hidden inside a label (only prost looks in there).
    let mut lbl = vec![];
    lbl.extend(vec![0x4bu8; 500]);
    lbl.extend(vec![0x4cu8; 500]);
    let mut series_body = vec![0x0a];
    put_len(&mut series_body, lbl.len());
    series_body.extend(&lbl);
    let mut body = vec![0x0a];
    put_len(&mut body, series_body.len());
    body.extend(&series_body);
    let err = validate(Protocol::V1, &body, &Limits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
    // Invalid UTF-8 in a label value.
    let bad = [0x0a, 0x08, 0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, 0xff];
    let err = validate(Protocol::V1, &bad, &Limits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[test]
fn decoded_body_over_limit_is_too_large() {
    let enc = encode_v1(&req(vec![series(&[("__name__", "up")])]));
    let limits = Limits {
        max_decoded_bytes: enc.len() - 1,
        ..Limits::default()
    };
    let err = validate(Protocol::V1, &enc, &limits).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            declared: enc.len() as u64,
            limit: enc.len() - 1
        }
    );
}

#[test]
fn protobuf_bomb_of_empty_elements_expands_too_much() {
    // 2 MiB of empty series: ~100 MiB once decoded by prost.
    let body = [0x0a, 0x00].repeat(1 << 20);
    let err = validate(Protocol::V1, &body, &Limits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::ExpandsTooMuch { .. }), "{err:?}");
    assert!(err.is_too_large());
    assert_eq!(err.as_error_code(), "expands_too_much");
    // One series carrying a million empty histograms.
    let inner = [0x22, 0x00].repeat(1 << 20);
    let mut body = vec![0x0a];
    put_len(&mut body, inner.len());
    body.extend(&inner);
    assert!(matches!(
        validate(Protocol::V1, &body, &Limits::default()),
        Err(DecodeError::ExpandsTooMuch { .. })
    ));
    // 2.0: a million empty series.
    let body = [0x2a, 0x00].repeat(1 << 20);
    assert!(matches!(
        validate(Protocol::V2, &body, &Limits::default()),
        Err(DecodeError::ExpandsTooMuch { .. })
    ));
}

#[test]
fn realistic_requests_do_not_expand_too_much() {
    // Many series, each with only a one-letter __name__ and no samples: the
    // densest legitimate shape.
    let ts: Vec<_> = (0..100_000)
        .map(|_| v1::TimeSeries {
            labels: vec![label("__name__", "a")],
            ..Default::default()
        })
        .collect();
    let s = check_v1(&req(ts)).unwrap();
    assert_eq!(s.series, 100_000);
    assert!(!s.has_timestamps());
    // One series with 200,000 empty native histograms (schema and timestamp
    // only): the densest legitimate histogram shape.
    let mut one = series(&[("__name__", "h")]);
    one.samples.clear();
    one.histograms = (0..200_000)
        .map(|i| v1::Histogram {
            schema: 8,
            timestamp: 1_700_000_000_000 + i,
            ..Default::default()
        })
        .collect();
    let s = check_v1(&req(vec![one])).unwrap();
    assert_eq!(s.histograms, 200_000);
}

#[test]
fn v2_body_declared_as_v1_decodes_as_empty() {
    // Fields 1-3 are reserved in 2.0 precisely so that this is deterministic.
    let mut b = V2Builder::new();
    b.series(&[("__name__", "up")]);
    let s = validate(Protocol::V1, &encode_v2(&b.req), &Limits::default()).unwrap();
    assert_eq!(s, Summary::default());
}

// ---- limits ----

#[test]
fn series_limit() {
    let r = req(vec![
        series(&[("__name__", "a")]),
        series(&[("__name__", "b")]),
        series(&[("__name__", "c")]),
    ]);
    let limits = Limits {
        max_series: 2,
        ..Limits::default()
    };
    let err = validate(Protocol::V1, &encode_v1(&r), &limits).unwrap_err();
    assert_eq!(err, DecodeError::TooManySeries { count: 3, limit: 2 });
    assert!(err.is_too_large());
    assert_eq!(validate_v1(&r, &limits).unwrap_err(), err);
    let limits = Limits {
        max_series: 3,
        ..Limits::default()
    };
    assert_eq!(
        validate(Protocol::V1, &encode_v1(&r), &limits)
            .unwrap()
            .series,
        3
    );

    let mut b = V2Builder::new();
    b.series(&[("__name__", "a")]);
    b.series(&[("__name__", "b")]);
    let limits = Limits {
        max_series: 1,
        ..Limits::default()
    };
    assert_eq!(
        validate(Protocol::V2, &encode_v2(&b.req), &limits).unwrap_err(),
        DecodeError::TooManySeries { count: 2, limit: 1 }
    );
}

#[test]
fn label_limits() {
    let r = req(vec![series(&[
        ("__name__", "up"),
        ("job", "node"),
        ("instance", "host:19100"),
    ])]);
    let enc = encode_v1(&r);
    let lim = |f: fn(&mut Limits)| {
        let mut l = Limits::default();
        f(&mut l);
        l
    };
    assert_eq!(
        validate(Protocol::V1, &enc, &lim(|l| l.max_labels_per_series = 2)).unwrap_err(),
        DecodeError::TooManyLabels {
            series: 0,
            count: 3,
            limit: 2
        }
    );
    assert!(validate(Protocol::V1, &enc, &lim(|l| l.max_labels_per_series = 3)).is_ok());
    assert_eq!(
        validate(Protocol::V1, &enc, &lim(|l| l.max_label_name_len = 7)).unwrap_err(),
        DecodeError::LabelNameTooLong {
            series: 0,
            len: 8,
            limit: 7
        }
    );
    assert!(validate(Protocol::V1, &enc, &lim(|l| l.max_label_name_len = 8)).is_ok());
    let err = validate(Protocol::V1, &enc, &lim(|l| l.max_label_value_len = 9)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::LabelValueTooLong {
            series: 0,
            name: "instance".into(),
            len: 10,
            limit: 9
        }
    );
    assert_eq!(
        err.to_string(),
        "series 0: value of label \"instance\" is 10 bytes, over the limit of 9"
    );
    assert!(!err.is_too_large());
    assert!(validate(Protocol::V1, &enc, &lim(|l| l.max_label_value_len = 10)).is_ok());
}

#[test]
fn default_limits() {
    let l = Limits::default();
    assert_eq!(l.max_decoded_bytes, 32 << 20);
    assert_eq!(l.max_decoded_bytes, decode::DEFAULT_MAX_DECODED_BYTES);
    assert_eq!(
        (
            l.max_series,
            l.max_labels_per_series,
            l.max_label_name_len,
            l.max_label_value_len
        ),
        (0, 0, 0, 0)
    );
}

// ---- v1 label rules ----

#[test]
fn v1_valid_request_summary() {
    let mut a = series(&[("job", "x"), ("__name__", "up")]);
    a.samples = vec![
        v1::Sample {
            value: 1.0,
            timestamp: 50,
        },
        v1::Sample {
            value: f64::NAN,
            timestamp: -7,
        },
    ];
    a.exemplars = vec![v1::Exemplar {
        labels: vec![label("trace_id", "abc")],
        value: 1.0,
        timestamp: -1000, // exemplar timestamps are not in the range
    }];
    let mut b = series(&[("__name__", "h")]);
    b.samples.clear();
    b.histograms = vec![int_hist(5, 1, &[4], 3.0)];
    b.histograms[0].timestamp = 9000;
    let s = check_v1(&req(vec![a, b])).unwrap();
    assert_eq!(
        s,
        Summary {
            samples: 2,
            histograms: 1,
            exemplars: 1,
            series: 2,
            min_ts: -7,
            max_ts: 9000
        }
    );
    assert!(s.has_timestamps());
}

#[test]
fn empty_request_is_valid() {
    let s = check_v1(&v1::WriteRequest::default()).unwrap();
    assert_eq!(s, Summary::default());
    assert_eq!((s.min_ts, s.max_ts), (i64::MAX, i64::MIN));
    assert!(!s.has_timestamps());
    assert_eq!(
        check_v2(&v2::Request::default()).unwrap(),
        Summary::default()
    );
    assert_eq!(
        validate(Protocol::V1, &[], &Limits::default()).unwrap(),
        Summary::default()
    );
}

#[test]
fn v1_series_without_labels() {
    let r = req(vec![series(&[("__name__", "a")]), series(&[])]);
    let err = check_v1(&r).unwrap_err();
    assert_eq!(err, DecodeError::NoLabels { series: 1 });
    assert_eq!(err.to_string(), "series 1: no labels");
    assert_eq!(err.as_error_code(), "no_labels");
}

#[test]
fn v1_missing_or_empty_metric_name() {
    let r = req(vec![
        series(&[("__name__", "a")]),
        series(&[("__name__", "b")]),
        series(&[("__name__", "c")]),
        series(&[("job", "x")]),
    ]);
    let err = check_v1(&r).unwrap_err();
    assert_eq!(err, DecodeError::MissingMetricName { series: 3 });
    assert_eq!(err.to_string(), "series 3: missing __name__ label");
    assert_eq!(
        check_v1(&req(vec![series(&[("__name__", ""), ("job", "x")])])).unwrap_err(),
        DecodeError::MissingMetricName { series: 0 }
    );
}

#[test]
fn v1_duplicate_label_names_even_unsorted() {
    let r = req(vec![series(&[
        ("job", "a"),
        ("__name__", "up"),
        ("zone", "z"),
        ("job", "b"),
    ])]);
    let err = check_v1(&r).unwrap_err();
    assert_eq!(
        err,
        DecodeError::DuplicateLabelName {
            series: 0,
            name: "job".into()
        }
    );
    assert_eq!(err.to_string(), "series 0: duplicate label name \"job\"");
    // __name__ twice.
    let r = req(vec![series(&[("__name__", "a"), ("__name__", "b")])]);
    assert!(matches!(
        check_v1(&r),
        Err(DecodeError::DuplicateLabelName { .. })
    ));
}

#[test]
fn v1_empty_label_name() {
    let r = req(vec![series(&[("__name__", "up"), ("", "x")])]);
    let err = check_v1(&r).unwrap_err();
    assert_eq!(err, DecodeError::EmptyLabelName { series: 0 });
    assert_eq!(err.to_string(), "series 0: empty label name");
}

#[test]
fn empty_label_values_are_allowed() {
    assert!(check_v1(&req(vec![series(&[("__name__", "up"), ("job", "")])])).is_ok());
}

// ---- v2 rules ----

#[test]
fn v2_valid_request_summary() {
    let mut b = V2Builder::new();
    let i = b.series(&[("__name__", "up"), ("job", "x")]);
    let tr = b.refs(&[("trace_id", "t1")]);
    let help = b.sym("help text");
    let unit = b.sym("seconds");
    let ts = &mut b.req.timeseries[i];
    ts.exemplars.push(v2::Exemplar {
        labels_refs: tr,
        value: 2.0,
        timestamp: 999,
    });
    ts.metadata = Some(v2::Metadata {
        r#type: v2::MetricType::Gauge as i32,
        help_ref: help,
        unit_ref: unit,
    });
    ts.created_timestamp = 5;
    let s = check_v2(&b.req).unwrap();
    assert_eq!(
        s,
        Summary {
            samples: 1,
            histograms: 0,
            exemplars: 1,
            series: 1,
            min_ts: 1000,
            max_ts: 1000
        }
    );
}

#[test]
fn v2_first_symbol_must_be_empty() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "up")]);
    b.req.symbols[0] = "oops".into();
    let err = check_v2(&b.req).unwrap_err();
    assert_eq!(err, DecodeError::FirstSymbolNotEmpty);
    assert_eq!(err.to_string(), "symbols[0] must be the empty string");
    // Symbols without any series: still checked.
    let r = v2::Request {
        symbols: vec!["x".into()],
        timeseries: vec![],
    };
    assert_eq!(check_v2(&r).unwrap_err(), DecodeError::FirstSymbolNotEmpty);
}

#[test]
fn v2_odd_labels_refs() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "up")]);
    b.req.timeseries[0].labels_refs.push(1);
    let err = check_v2(&b.req).unwrap_err();
    assert_eq!(
        err,
        DecodeError::OddLabelRefs {
            series: 0,
            field: "labels_refs",
            len: 3
        }
    );
    assert_eq!(err.to_string(), "series 0: labels_refs has odd length 3");
}

#[test]
fn v2_label_ref_out_of_range() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "up")]);
    b.series(&[("__name__", "up"), ("job", "x")]);
    b.req.timeseries[1].labels_refs[3] = 42;
    let err = check_v2(&b.req).unwrap_err();
    assert_eq!(
        err,
        DecodeError::SymbolRefOutOfRange {
            series: 1,
            field: "labels_refs",
            reference: 42,
            symbols: 5
        }
    );
    assert_eq!(
        err.to_string(),
        "series 1: labels_refs reference 42 out of range (5 symbols)"
    );
    // No symbols at all.
    let r = v2::Request {
        symbols: vec![],
        timeseries: vec![v2::TimeSeries {
            labels_refs: vec![0, 0],
            ..Default::default()
        }],
    };
    assert!(matches!(
        check_v2(&r),
        Err(DecodeError::SymbolRefOutOfRange {
            reference: 0,
            symbols: 0,
            ..
        })
    ));
}

#[test]
fn v2_exemplar_refs() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "up")]);
    b.req.timeseries[0].exemplars.push(v2::Exemplar {
        labels_refs: vec![1],
        value: 1.0,
        timestamp: 1,
    });
    assert_eq!(
        check_v2(&b.req).unwrap_err(),
        DecodeError::OddLabelRefs {
            series: 0,
            field: "exemplar labels_refs",
            len: 1
        }
    );
    b.req.timeseries[0].exemplars[0].labels_refs = vec![1, 99];
    assert!(matches!(
        check_v2(&b.req),
        Err(DecodeError::SymbolRefOutOfRange {
            field: "exemplar labels_refs",
            reference: 99,
            ..
        })
    ));
    // Empty exemplar labels are fine.
    b.req.timeseries[0].exemplars[0].labels_refs.clear();
    assert!(check_v2(&b.req).is_ok());
}

#[test]
fn v2_metadata_refs() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "up")]);
    b.req.timeseries[0].metadata = Some(v2::Metadata {
        r#type: v2::MetricType::Counter as i32,
        help_ref: 7,
        unit_ref: 0,
    });
    assert!(matches!(
        check_v2(&b.req),
        Err(DecodeError::SymbolRefOutOfRange {
            field: "help_ref",
            reference: 7,
            ..
        })
    ));
    b.req.timeseries[0].metadata = Some(v2::Metadata {
        r#type: v2::MetricType::Counter as i32,
        help_ref: 0,
        unit_ref: 8,
    });
    let err = check_v2(&b.req).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::SymbolRefOutOfRange {
            field: "unit_ref",
            reference: 8,
            ..
        }
    ));
    assert_eq!(err.as_error_code(), "symbol_ref_out_of_range");
}

#[test]
fn v2_resolved_labels_follow_v1_rules() {
    let mut b = V2Builder::new();
    b.series(&[("job", "x")]);
    assert_eq!(
        check_v2(&b.req).unwrap_err(),
        DecodeError::MissingMetricName { series: 0 }
    );

    let mut b = V2Builder::new();
    b.series(&[("__name__", "up"), ("a", "1"), ("a", "2")]);
    assert_eq!(
        check_v2(&b.req).unwrap_err(),
        DecodeError::DuplicateLabelName {
            series: 0,
            name: "a".into()
        }
    );

    let mut b = V2Builder::new();
    b.series(&[("__name__", "up"), ("", "2")]);
    assert_eq!(
        check_v2(&b.req).unwrap_err(),
        DecodeError::EmptyLabelName { series: 0 }
    );

    let mut b = V2Builder::new();
    b.series(&[]);
    assert_eq!(
        check_v2(&b.req).unwrap_err(),
        DecodeError::NoLabels { series: 0 }
    );

    let mut b = V2Builder::new();
    b.series(&[("__name__", "up"), ("job", "xxxxx")]);
    let limits = Limits {
        max_label_value_len: 4,
        ..Limits::default()
    };
    assert!(matches!(
        validate(Protocol::V2, &encode_v2(&b.req), &limits),
        Err(DecodeError::LabelValueTooLong { .. })
    ));
}

// ---- native histograms ----

fn with_hist(h: v1::Histogram) -> Result<Summary, DecodeError> {
    let mut s = series(&[("__name__", "h")]);
    s.samples.clear();
    s.histograms = vec![h];
    check_v1(&req(vec![s]))
}

#[test]
fn histogram_count_mismatch_like_the_compliance_suite() {
    // Buckets 2, 3, 5, 13 (deltas 2, 1, 2, 8) = 23; count says 99.
    let err = with_hist(int_hist(99, 0, &[2, 1, 2, 8], 10.0)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::HistogramCountMismatch {
            series: 0,
            histogram: 0,
            count: 99,
            buckets: 23
        }
    );
    assert!(!err.is_too_large());
    assert_eq!(err.as_error_code(), "histogram_count_mismatch");
    assert_eq!(
        err.to_string(),
        "series 0: histogram 0: count 99 does not match 23 in the zero bucket and buckets"
    );
    assert!(with_hist(int_hist(23, 0, &[2, 1, 2, 8], 10.0)).is_ok());
    // Count too small is refused as well.
    assert!(matches!(
        with_hist(int_hist(22, 0, &[2, 1, 2, 8], 10.0)),
        Err(DecodeError::HistogramCountMismatch { .. })
    ));
}

#[test]
fn histogram_count_includes_zero_bucket_and_negative_buckets() {
    let mut h = int_hist(1 + 2 + 3 + 4, 1, &[2], 1.0);
    h.negative_spans = vec![v1::BucketSpan {
        offset: -2,
        length: 2,
    }];
    h.negative_deltas = vec![3, 1];
    assert!(with_hist(h.clone()).is_ok());
    h.count = Some(v1::histogram::Count::CountInt(9));
    assert!(matches!(
        with_hist(h),
        Err(DecodeError::HistogramCountMismatch {
            count: 9,
            buckets: 10,
            ..
        })
    ));
    // No count at all: an integer histogram with count 0.
    let mut h = int_hist(0, 0, &[], 0.0);
    h.count = None;
    assert!(with_hist(h.clone()).is_ok());
    h.zero_count = Some(v1::histogram::ZeroCount::ZeroCountInt(1));
    assert!(matches!(
        with_hist(h),
        Err(DecodeError::HistogramCountMismatch {
            count: 0,
            buckets: 1,
            ..
        })
    ));
}

#[test]
fn histogram_with_nan_sum_may_count_more_than_its_buckets() {
    assert!(with_hist(int_hist(30, 0, &[2, 1], f64::NAN)).is_ok());
    assert!(with_hist(int_hist(5, 0, &[2, 1], f64::NAN)).is_ok());
    let err = with_hist(int_hist(4, 0, &[2, 1], f64::NAN)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::HistogramCountNotBigEnough {
            series: 0,
            histogram: 0,
            count: 4,
            buckets: 5
        }
    );
    assert_eq!(err.as_error_code(), "histogram_count_not_big_enough");
}

#[test]
fn histogram_negative_bucket_from_deltas() {
    // Buckets 2, -1.
    let err = with_hist(int_hist(1, 0, &[2, -3], 1.0)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::HistogramNegativeBucketCount {
            series: 0,
            histogram: 0,
            side: "positive",
            bucket: 1
        }
    );
    assert_eq!(
        err.to_string(),
        "series 0: histogram 0: negative count in positive bucket 1"
    );
    // Extreme deltas do not overflow.
    assert!(matches!(
        with_hist(int_hist(0, 0, &[i64::MIN], 1.0)),
        Err(DecodeError::HistogramNegativeBucketCount { bucket: 0, .. })
    ));
    let huge = with_hist(int_hist(u64::MAX, 0, &[i64::MAX, 0, 0], 1.0)).unwrap_err();
    assert!(matches!(huge, DecodeError::HistogramCountMismatch { .. }));
}

#[test]
fn histogram_spans_must_match_buckets() {
    let mut h = int_hist(3, 0, &[1, 1], 1.0);
    h.positive_spans = vec![v1::BucketSpan {
        offset: 0,
        length: 3,
    }];
    let err = with_hist(h).unwrap_err();
    assert_eq!(
        err,
        DecodeError::HistogramSpansMismatch {
            series: 0,
            histogram: 0,
            side: "positive",
            spans: 3,
            buckets: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "series 0: histogram 0: positive spans need 3 buckets, have 2"
    );
    // Negative deltas without spans.
    let mut h = int_hist(3, 0, &[1], 1.0);
    h.negative_deltas = vec![2];
    assert!(matches!(
        with_hist(h),
        Err(DecodeError::HistogramSpansMismatch {
            side: "negative",
            spans: 0,
            buckets: 1,
            ..
        })
    ));
}

#[test]
fn histogram_span_offsets() {
    let mut h = int_hist(4, 0, &[1, 0, 0, 0], 1.0);
    // First span may start anywhere; later ones may not go backwards.
    h.positive_spans = vec![
        v1::BucketSpan {
            offset: -5,
            length: 2,
        },
        v1::BucketSpan {
            offset: 3,
            length: 2,
        },
    ];
    assert!(with_hist(h.clone()).is_ok());
    h.positive_spans[1].offset = -1;
    let err = with_hist(h).unwrap_err();
    assert_eq!(
        err,
        DecodeError::HistogramNegativeSpanOffset {
            series: 0,
            histogram: 0,
            side: "positive",
            span: 1,
            offset: -1
        }
    );
    assert_eq!(err.as_error_code(), "histogram_negative_span_offset");
}

#[test]
fn float_histograms() {
    let mut h = v1::Histogram {
        count: Some(v1::histogram::Count::CountFloat(1000.0)), // not checked
        sum: 2.5,
        schema: 0,
        zero_count: Some(v1::histogram::ZeroCount::ZeroCountFloat(0.5)),
        positive_spans: vec![v1::BucketSpan {
            offset: 0,
            length: 2,
        }],
        positive_counts: vec![1.5, 0.0],
        negative_spans: vec![v1::BucketSpan {
            offset: 1,
            length: 1,
        }],
        negative_counts: vec![2.0],
        timestamp: 1,
        ..Default::default()
    };
    assert!(h.is_float());
    assert!(with_hist(h.clone()).is_ok());
    h.positive_counts[1] = -0.5;
    assert_eq!(
        with_hist(h.clone()).unwrap_err(),
        DecodeError::HistogramNegativeBucketCount {
            series: 0,
            histogram: 0,
            side: "positive",
            bucket: 1
        }
    );
    h.positive_counts = vec![1.0];
    assert!(matches!(
        with_hist(h),
        Err(DecodeError::HistogramSpansMismatch {
            spans: 2,
            buckets: 1,
            ..
        })
    ));
}

#[test]
fn custom_bucket_histograms() {
    let mut h = int_hist(6, 0, &[1, 1, 1], 4.0);
    h.schema = -53;
    h.zero_count = None;
    h.zero_threshold = 0.0;
    h.custom_values = vec![0.1, 0.5, 1.0];
    assert!(with_hist(h.clone()).is_ok());
    h.count = Some(v1::histogram::Count::CountInt(7));
    assert!(matches!(
        with_hist(h),
        Err(DecodeError::HistogramCountMismatch { .. })
    ));
}

#[test]
fn v2_histograms_follow_the_same_rules() {
    let mut b = V2Builder::new();
    b.series(&[("__name__", "h")]);
    let ts = &mut b.req.timeseries[0];
    ts.samples.clear();
    ts.histograms.push(v2::Histogram {
        count: Some(v2::histogram::Count::CountInt(99)),
        sum: 1.0,
        positive_spans: vec![v2::BucketSpan {
            offset: 0,
            length: 2,
        }],
        positive_deltas: vec![10, 3],
        timestamp: 77,
        ..Default::default()
    });
    assert_eq!(
        check_v2(&b.req).unwrap_err(),
        DecodeError::HistogramCountMismatch {
            series: 0,
            histogram: 0,
            count: 99,
            buckets: 23
        }
    );
    b.req.timeseries[0].histograms[0].count = Some(v2::histogram::Count::CountInt(23));
    let s = check_v2(&b.req).unwrap();
    assert_eq!((s.histograms, s.min_ts, s.max_ts), (1, 77, 77));
}

#[test]
fn error_codes_are_distinct() {
    let errs = vec![
        DecodeError::TooLarge {
            declared: 1,
            limit: 0,
        },
        DecodeError::ExpandsTooMuch {
            estimated: 1,
            limit: 0,
        },
        DecodeError::TooManySeries { count: 1, limit: 0 },
        DecodeError::Snappy(String::new()),
        DecodeError::Protobuf(String::new()),
        DecodeError::FirstSymbolNotEmpty,
        DecodeError::OddLabelRefs {
            series: 0,
            field: "",
            len: 1,
        },
        DecodeError::SymbolRefOutOfRange {
            series: 0,
            field: "",
            reference: 0,
            symbols: 0,
        },
        DecodeError::NoLabels { series: 0 },
        DecodeError::MissingMetricName { series: 0 },
        DecodeError::EmptyLabelName { series: 0 },
        DecodeError::DuplicateLabelName {
            series: 0,
            name: String::new(),
        },
        DecodeError::TooManyLabels {
            series: 0,
            count: 0,
            limit: 0,
        },
        DecodeError::LabelNameTooLong {
            series: 0,
            len: 0,
            limit: 0,
        },
        DecodeError::LabelValueTooLong {
            series: 0,
            name: String::new(),
            len: 0,
            limit: 0,
        },
        DecodeError::HistogramCountMismatch {
            series: 0,
            histogram: 0,
            count: 0,
            buckets: 0,
        },
        DecodeError::HistogramCountNotBigEnough {
            series: 0,
            histogram: 0,
            count: 0,
            buckets: 0,
        },
        DecodeError::HistogramNegativeBucketCount {
            series: 0,
            histogram: 0,
            side: "",
            bucket: 0,
        },
        DecodeError::HistogramSpansMismatch {
            series: 0,
            histogram: 0,
            side: "",
            spans: 0,
            buckets: 0,
        },
        DecodeError::HistogramNegativeSpanOffset {
            series: 0,
            histogram: 0,
            side: "",
            span: 0,
            offset: 0,
        },
    ];
    let mut codes: Vec<_> = errs.iter().map(|e| e.as_error_code()).collect();
    let too_large: Vec<_> = errs
        .iter()
        .filter(|e| e.is_too_large())
        .map(|e| e.as_error_code())
        .collect();
    assert_eq!(
        too_large,
        ["too_large", "expands_too_much", "too_many_series"]
    );
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), errs.len());
    for e in &errs {
        assert!(!e.to_string().is_empty());
    }
}
