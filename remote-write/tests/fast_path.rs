//! `validate` takes an allocation-free path for plain 1.0 requests (labels
//! and float samples only). Whatever the input, its answer must be the one
//! of the full path (prost decode, then the rules).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::collection::vec;
use proptest::prelude::*;

use prom_remote_write::decode::{validate, validate_without_fast_path, Limits};
use prom_remote_write::encode::encode_v1;
use prom_remote_write::{v1, Protocol};

/// Label sets that are sometimes wrong: duplicate or empty names, a missing
/// or empty `__name__`, unsorted.
fn labels() -> impl Strategy<Value = Vec<v1::Label>> {
    vec(
        (
            prop_oneof![
                Just("__name__".to_string()),
                Just(String::new()),
                "[a-c]{1,2}"
            ],
            prop_oneof![Just(String::new()), "[a-z]{0,3}", "\\PC{0,3}"],
        ),
        0..6,
    )
    .prop_map(|l| {
        l.into_iter()
            .map(|(name, value)| v1::Label { name, value })
            .collect()
    })
}

/// Valid label sets: a non-empty `__name__` and distinct other names.
fn valid_labels() -> impl Strategy<Value = Vec<v1::Label>> {
    (
        "[a-z]{1,4}",
        proptest::collection::btree_map("[a-z_]{1,3}", "\\PC{0,3}", 0..5),
    )
        .prop_map(|(metric, rest)| {
            let mut l: Vec<v1::Label> = rest
                .into_iter()
                .filter(|(n, _)| n != "__name__")
                .map(|(name, value)| v1::Label { name, value })
                .collect();
            l.push(v1::Label {
                name: "__name__".into(),
                value: metric,
            });
            l
        })
}

fn request() -> impl Strategy<Value = v1::WriteRequest> {
    vec(
        (
            prop_oneof![labels(), valid_labels(), valid_labels()],
            vec((any::<f64>(), any::<i64>()), 0..4),
        ),
        0..6,
    )
    .prop_map(|series| v1::WriteRequest {
        timeseries: series
            .into_iter()
            .map(|(labels, samples)| v1::TimeSeries {
                labels,
                samples: samples
                    .into_iter()
                    .map(|(value, timestamp)| v1::Sample { value, timestamp })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        metadata: vec![],
    })
}

fn same(buf: &[u8], limits: &Limits) {
    let fast = validate(Protocol::V1, buf, limits).map_err(|e| e.to_string());
    let full = validate_without_fast_path(Protocol::V1, buf, limits).map_err(|e| e.to_string());
    assert_eq!(fast, full, "body {buf:02x?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn agrees_with_the_full_path(req in request()) {
        same(&encode_v1(&req), &Limits::default());
    }

    #[test]
    fn agrees_on_damaged_bodies(
        req in request(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut buf = encode_v1(&req);
        if buf.is_empty() {
            return Ok(());
        }
        for (i, b) in edits {
            let i = i.index(buf.len());
            buf[i] = b;
        }
        if truncate {
            buf.truncate(cut.index(buf.len()));
        }
        same(&buf, &Limits::default());
    }

    #[test]
    fn agrees_under_limits(req in request(), max_series in 0usize..4, max_labels in 0usize..4) {
        let limits = Limits {
            max_series,
            max_labels_per_series: max_labels,
            max_label_name_len: 2,
            max_label_value_len: 2,
            ..Limits::default()
        };
        same(&encode_v1(&req), &limits);
    }
}

#[test]
fn repeated_singular_fields_take_the_last_value() {
    // Label { name = "x"; name = "__name__"; value = "m" }: prost keeps the
    // last name, so the series is valid.
    let label = [
        0x0a, 0x01, b'x', 0x0a, 0x08, b'_', b'_', b'n', b'a', b'm', b'e', b'_', b'_', 0x12, 0x01,
        b'm',
    ];
    // Sample { timestamp = 5; timestamp = 7; value = 1.0 }
    let mut sample = vec![0x10, 0x05, 0x10, 0x07, 0x09];
    sample.extend_from_slice(&1.0f64.to_le_bytes());
    let mut series = vec![0x0a, label.len() as u8];
    series.extend_from_slice(&label);
    series.push(0x12);
    series.push(sample.len() as u8);
    series.extend_from_slice(&sample);
    let mut body = vec![0x0a, series.len() as u8];
    body.extend_from_slice(&series);
    same(&body, &Limits::default());
    let s = validate(Protocol::V1, &body, &Limits::default()).unwrap();
    assert_eq!((s.series, s.samples, s.min_ts, s.max_ts), (1, 1, 7, 7));
}

#[test]
fn every_occurrence_of_a_string_must_be_utf8() {
    // Label { name = "\xff"; name = "__name__"; value = "m" }: prost checks
    // the replaced name too, and refuses the request.
    let label = [
        0x0a, 0x01, 0xff, 0x0a, 0x08, b'_', b'_', b'n', b'a', b'm', b'e', b'_', b'_', 0x12, 0x01,
        b'm',
    ];
    let mut series = vec![0x0a, label.len() as u8];
    series.extend_from_slice(&label);
    let mut body = vec![0x0a, series.len() as u8];
    body.extend_from_slice(&series);
    same(&body, &Limits::default());
    assert!(validate(Protocol::V1, &body, &Limits::default()).is_err());
}
