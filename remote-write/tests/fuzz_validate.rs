//! A bounded, seeded mutation run of `decode::validate` for CI (no nightly
//! or libfuzzer needed): valid 1.0 and 2.0 bodies of every shape the rules
//! look at (labels, exemplars, native histograms, metadata, 2.0 symbol
//! references) are mutated byte by byte and validated. No input may panic,
//! and every answer must equal the reference validation that decodes into
//! owned structs (`validate_owned`) and, for 1.0, the path without the fast
//! path. The unmutated seeds must validate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{int_hist, label, req, series, v2_series_from, V2Builder};
use prom_remote_write::decode::{validate, validate_owned, validate_without_fast_path, Limits};
use prom_remote_write::encode::{encode_v1, encode_v2};
use prom_remote_write::{v1, Protocol};
use proptest::prelude::Rng as _;
use proptest::test_runner::{RngAlgorithm, TestRng};

/// Mutated inputs per protocol: about 20-40 s each in a debug build on the CI
/// machine (2 shared cores). A count, not a clock, so every run validates
/// the same inputs.
const CASES: usize = 1_000_000;

/// proptest's seeded generator, driving the mutations.
struct Rng(TestRng);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Rng(TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// 1.0 series of every shape the rules read.
fn v1_series() -> Vec<v1::TimeSeries> {
    let mut with_exemplar = series(&[("__name__", "a"), ("job", "x")]);
    with_exemplar.exemplars.push(v1::Exemplar {
        labels: vec![label("trace_id", "abc")],
        value: 2.0,
        timestamp: 1500,
    });
    let mut with_histogram = series(&[("__name__", "h"), ("le", "z")]);
    with_histogram.samples.clear();
    with_histogram
        .histograms
        .push(int_hist(6, 1, &[2, -1, 1], 3.5));
    let mut float_histogram = series(&[("__name__", "f")]);
    float_histogram.histograms.push(v1::Histogram {
        count: Some(v1::histogram::Count::CountFloat(4.0)),
        positive_spans: vec![v1::BucketSpan {
            offset: 1,
            length: 2,
        }],
        positive_counts: vec![1.0, 3.0],
        timestamp: 900,
        ..Default::default()
    });
    vec![
        series(&[("__name__", "up"), ("instance", "a:9100"), ("job", "node")]),
        series(&[("job", "unsorted"), ("__name__", "up")]),
        with_exemplar,
        with_histogram,
        float_histogram,
    ]
}

fn v1_seeds() -> Vec<Vec<u8>> {
    let all = v1_series();
    let mut with_metadata = req(all[..1].to_vec());
    with_metadata.metadata.push(v1::MetricMetadata {
        r#type: 1,
        metric_family_name: "up".into(),
        help: "help".into(),
        unit: "s".into(),
    });
    vec![
        encode_v1(&req(all[..1].to_vec())),
        encode_v1(&req(all.clone())),
        encode_v1(&with_metadata),
    ]
}

fn v2_seeds() -> Vec<Vec<u8>> {
    let mut plain = V2Builder::new();
    plain.series(&[("__name__", "up"), ("job", "node")]);
    plain.series(&[("job", "unsorted"), ("__name__", "up")]);
    let mut rich = V2Builder::new();
    for (i, ts) in v1_series().iter().enumerate() {
        let metadata = (i % 2 == 0).then_some((2, "help text", "seconds"));
        let s = v2_series_from(ts, &mut |s| rich.sym(s), metadata, 100);
        rich.req.timeseries.push(s);
    }
    vec![encode_v2(&plain.req), encode_v2(&rich.req)]
}

/// Flips, overwrites, inserts, deletes, truncates, or plants a varint or a
/// piece of another seed.
fn mutate(rng: &mut Rng, buf: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(3) {
        let pos = rng.below(buf.len() + 1);
        match rng.below(7) {
            0 if pos < buf.len() => buf[pos] ^= 1 << rng.below(8),
            1 if pos < buf.len() => buf[pos] = rng.next() as u8,
            2 => buf.insert(pos, rng.next() as u8),
            3 if pos < buf.len() => {
                buf.remove(pos);
            }
            4 => buf.truncate(pos),
            5 if pos < buf.len() => {
                // An extreme or off-by-one length, reference or count.
                let v = [0u64, 1, 2, 127, 128, u32::MAX as u64, u64::MAX][rng.below(7)];
                let mut bytes = Vec::new();
                prost::encoding::encode_varint(v, &mut bytes);
                let end = (pos + 1).min(buf.len());
                buf.splice(pos..end, bytes);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                let to = (from + rng.below(24)).min(other.len());
                buf.splice(pos..pos, other[from..to].iter().copied());
            }
        }
    }
}

/// Tight limits on some inputs so that the limit checks are reached too.
fn limits(rng: &mut Rng) -> Limits {
    if rng.below(4) > 0 {
        return Limits::default();
    }
    Limits {
        max_series: 1 + rng.below(4),
        max_labels_per_series: 1 + rng.below(3),
        max_label_name_len: 1 + rng.below(8),
        max_label_value_len: 1 + rng.below(8),
        max_translated_bytes: rng.below(64),
        ..Limits::default()
    }
}

fn run(protocol: Protocol, seeds: &[Vec<u8>], seed: u64) {
    for s in seeds {
        validate(protocol, s, &Limits::default())
            .unwrap_or_else(|e| panic!("a valid {protocol:?} seed is refused: {e}"));
    }
    let mut rng = Rng::new(seed);
    let (mut valid, mut codes) = (0, std::collections::BTreeSet::new());
    for _ in 0..CASES {
        let mut buf = seeds[rng.below(seeds.len())].clone();
        mutate(&mut rng, &mut buf, seeds);
        let limits = limits(&mut rng);
        let answer = validate(protocol, &buf, &limits);
        assert_eq!(
            answer,
            validate_owned(protocol, &buf, &limits),
            "{protocol:?} {limits:?} {buf:02x?}"
        );
        if protocol == Protocol::V1 {
            assert_eq!(answer, validate_without_fast_path(protocol, &buf, &limits));
        }
        match answer {
            Ok(_) => valid += 1,
            Err(e) => {
                codes.insert(e.as_error_code());
            }
        }
    }
    // Guard against mutations that only ever reach the first check.
    eprintln!("{protocol:?}: {valid} valid; refusals reached: {codes:?}");
    assert!(valid > CASES / 50, "only {valid} mutated inputs were valid");
    assert!(codes.len() >= 8, "few refusals reached: {codes:?}");
}

#[test]
fn mutated_1_0_bodies_never_panic_and_get_the_reference_answer() {
    run(Protocol::V1, &v1_seeds(), 0x5eed_0001);
}

#[test]
fn mutated_2_0_bodies_never_panic_and_get_the_reference_answer() {
    run(Protocol::V2, &v2_seeds(), 0x5eed_0002);
}
