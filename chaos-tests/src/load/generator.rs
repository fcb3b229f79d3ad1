//! What a request holds: the series of one worker, their timestamps, and
//! sample values that say which (worker, series, k) they are.

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::LoadSpec;
use crate::encode::{encode_labels, put_timeseries, snappy_compress};
use crate::http::now_ms;

/// Low bits of a value: a check derived from (worker, series), never zero.
const CHECK_BITS: u32 = 20;

fn check_of(worker: u32, series: u32) -> u64 {
    let h = (worker as u64)
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add((series as u64).wrapping_mul(0x85EB_CA6B));
    (h % ((1 << CHECK_BITS) - 1)) + 1
}

/// The value of sample `k` (0-based) of a series: `k * 2^20 + check(worker,
/// series)`, exact in an f64 for k < 2^33.
pub fn encode_value(worker: u32, series: u32, k: u64) -> f64 {
    (k * (1 << CHECK_BITS) + check_of(worker, series)) as f64
}

/// Inverse of [`encode_value`]: `Some(k)` if `value` is a sample of that
/// series.
pub fn decode_value(worker: u32, series: u32, value: f64) -> Option<u64> {
    if !(value.is_finite() && value >= 1.0 && value.fract() == 0.0 && value < 2f64.powi(53)) {
        return None;
    }
    let v = value as u64;
    (v & ((1 << CHECK_BITS) - 1) == check_of(worker, series)).then_some(v >> CHECK_BITS)
}

/// One request a worker built: all its series, `n` samples each. Sample j
/// of series s has timestamp `ts0 + j * step_ms` and value
/// `encode_value(worker, s, k0 + j)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub worker: u32,
    /// Request number within the worker, from 0.
    pub seq: u64,
    pub k0: u64,
    pub ts0: i64,
    pub n: u32,
    pub series: u32,
    /// Whether an attempt got a 2xx.
    pub acked: bool,
    pub attempts: u32,
    /// Attempts answered with a non-2xx status.
    pub refused: u32,
    /// Attempts that got no answer (connection error, timeout).
    pub failed: u32,
    /// Wall clock at the first attempt.
    pub sent_ms: i64,
    /// Duration of the acknowledged attempt.
    pub latency_us: Option<u64>,
    /// Status of the last answered attempt.
    pub last_status: Option<u16>,
}

impl Batch {
    pub fn samples(&self) -> u64 {
        self.series as u64 * self.n as u64
    }

    /// Timestamp of the batch's last sample.
    pub fn last_ts(&self, step_ms: i64) -> i64 {
        self.ts0 + (self.n as i64 - 1) * step_ms
    }

    /// Every sample as (series, ts, value).
    pub fn iter_samples(&self, step_ms: i64) -> impl Iterator<Item = (u32, i64, f64)> + '_ {
        (0..self.series).flat_map(move |s| {
            (0..self.n).map(move |j| {
                (
                    s,
                    self.ts0 + j as i64 * step_ms,
                    encode_value(self.worker, s, self.k0 + j as u64),
                )
            })
        })
    }
}

/// Makes one worker's requests, one after the other: request `seq` holds
/// samples `seq * n ..` of every series of the worker, stamped after the
/// previous request's last sample.
pub(super) struct Generator {
    worker: u32,
    /// Each series' labels, encoded once.
    labels: Vec<Vec<u8>>,
    /// Seeded per worker, so a seed gives the same load.
    rng: StdRng,
    n: u32,
    step: i64,
    start_ms: Option<i64>,
    /// Timestamp of the previous request's last sample.
    last_ts: i64,
    /// The uncompressed request, reused.
    raw: Vec<u8>,
    /// One series' samples, reused.
    samples: Vec<(f64, i64)>,
}

impl Generator {
    pub(super) fn new(spec: &LoadSpec, worker: u32) -> Self {
        Generator {
            worker,
            labels: encoded_labels(spec, worker),
            rng: StdRng::seed_from_u64(spec.seed ^ (u64::from(worker) << 32)),
            n: spec.samples_per_series,
            step: spec.step_ms,
            start_ms: spec.start_ms,
            last_ts: i64::MIN,
            raw: Vec::new(),
            samples: Vec::with_capacity(spec.samples_per_series as usize),
        }
    }

    /// A random part of `interval`: how long after the load's start this
    /// worker's first request goes out, so paced workers do not send in
    /// lockstep.
    pub(super) fn start_offset(&mut self, interval: Duration) -> Duration {
        interval.mul_f64(self.rng.random::<f64>())
    }

    /// Request `seq` (not yet attempted) and its snappy-compressed body.
    pub(super) fn next(&mut self, seq: u64) -> Result<(Batch, Bytes)> {
        let (n, step) = (self.n, self.step);
        let k0 = seq * n as u64;
        let ts0 = match self.start_ms {
            Some(start) => start + k0 as i64 * step,
            None => now_ms().max(self.last_ts.saturating_add(step)),
        };
        self.last_ts = ts0 + (n as i64 - 1) * step;
        let body = Bytes::from(snappy_compress(self.encode(k0, ts0))?);
        let batch = Batch {
            worker: self.worker,
            seq,
            k0,
            ts0,
            n,
            series: self.labels.len() as u32,
            acked: false,
            attempts: 0,
            refused: 0,
            failed: 0,
            sent_ms: now_ms(),
            latency_us: None,
            last_status: None,
        };
        Ok((batch, body))
    }

    /// The uncompressed WriteRequest holding samples `k0..k0 + n` of every
    /// series, the first stamped `ts0`.
    pub(super) fn encode(&mut self, k0: u64, ts0: i64) -> &[u8] {
        self.raw.clear();
        for (s, l) in self.labels.iter().enumerate() {
            self.samples.clear();
            for j in 0..self.n {
                self.samples.push((
                    encode_value(self.worker, s as u32, k0 + j as u64),
                    ts0 + j as i64 * self.step,
                ));
            }
            put_timeseries(&mut self.raw, l, &self.samples);
        }
        &self.raw
    }
}

fn encoded_labels(spec: &LoadSpec, w: u32) -> Vec<Vec<u8>> {
    (0..spec.series_per_worker)
        .map(|s| {
            let l = spec.series_labels(w, s);
            let refs: Vec<(&str, &str)> = l.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            encode_labels(&refs)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::DEFAULT_METRIC;
    use super::*;
    use prost::Message;

    #[test]
    fn batches_decode_as_described() {
        let spec = LoadSpec {
            series_per_worker: 3,
            samples_per_series: 2,
            step_ms: 5,
            run_id: "rtest".into(),
            ..LoadSpec::default()
        };
        let mut generator = Generator::new(&spec, 7);
        let raw = generator.encode(10, 1_700_000_000_000);
        let req = prom_remote_write::v1::WriteRequest::decode(raw).unwrap();
        let batch = Batch {
            worker: 7,
            seq: 5,
            k0: 10,
            ts0: 1_700_000_000_000,
            n: 2,
            series: 3,
            acked: true,
            attempts: 1,
            refused: 0,
            failed: 0,
            sent_ms: 0,
            latency_us: None,
            last_status: None,
        };
        let mut from_req = Vec::new();
        for ts in &req.timeseries {
            let names: Vec<&str> = ts.labels.iter().map(|l| l.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "labels sorted");
            let get = |n: &str| {
                ts.labels
                    .iter()
                    .find(|l| l.name == n)
                    .unwrap()
                    .value
                    .clone()
            };
            assert_eq!(get("__name__"), DEFAULT_METRIC);
            assert_eq!(get("run"), "rtest");
            assert_eq!(get("worker"), "7");
            let s: u32 = get("series").parse().unwrap();
            for smp in &ts.samples {
                from_req.push((s, smp.timestamp, smp.value));
                assert_eq!(decode_value(7, s, smp.value).map(|k| k >= 10), Some(true));
            }
        }
        let expected: Vec<(u32, i64, f64)> = batch.iter_samples(5).collect();
        assert_eq!(from_req, expected);
    }

    #[test]
    fn each_request_carries_on_where_the_previous_one_ended() {
        let spec = LoadSpec {
            series_per_worker: 2,
            samples_per_series: 3,
            step_ms: 5,
            start_ms: Some(1_000),
            ..LoadSpec::default()
        };
        let mut generator = Generator::new(&spec, 1);
        let (first, _) = generator.next(0).unwrap();
        let (second, body) = generator.next(1).unwrap();
        assert_eq!((first.k0, first.ts0), (0, 1_000));
        assert_eq!((second.seq, second.k0, second.ts0), (1, 3, 1_015));
        assert_eq!(second.series, 2);
        assert!(!second.acked && second.attempts == 0);
        let raw = spec.raw_request(1, 3, 1_015);
        assert_eq!(crate::encode::snappy_decompress(&body).unwrap(), raw);

        let live = LoadSpec {
            start_ms: None,
            ..spec
        };
        let mut generator = Generator::new(&live, 1);
        let (a, _) = generator.next(0).unwrap();
        let (b, _) = generator.next(1).unwrap();
        assert!(b.ts0 > a.last_ts(5), "{b:?} after {a:?}");
    }

    #[test]
    fn values_round_trip() {
        for (w, s, k) in [
            (0, 0, 0),
            (3, 999, 12345),
            (u32::MAX, u32::MAX, (1 << 33) - 1),
        ] {
            let v = encode_value(w, s, k);
            assert_eq!(decode_value(w, s, v), Some(k));
            assert!(v != 0.0);
        }
        let v = encode_value(1, 2, 3);
        assert_eq!(decode_value(1, 3, v), None);
        assert_eq!(decode_value(2, 2, v), None);
    }
}
