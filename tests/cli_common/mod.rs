//! Shared by the `cli_*` tests: write a real log with `walrelay serve`, run
//! the operator commands as a user would, and read their output.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use chaos_tests::encode::{post_remote_write, write_request_body};
use chaos_tests::relay::Relay;
use prom_remote_write::v1;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

/// One sample written into the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub metric: String,
    pub instance: String,
    pub ts: i64,
    pub value: f64,
}

/// What a test wrote through the relay.
pub struct Written {
    pub requests: usize,
    pub samples: Vec<Sample>,
    pub min_ts: i64,
    pub max_ts: i64,
}

impl Written {
    pub fn total_samples(&self) -> usize {
        self.samples.len()
    }
}

/// The shape of the traffic a test writes.
#[derive(Clone)]
pub struct Traffic {
    pub metric: String,
    pub requests: usize,
    pub series: usize,
    pub samples_per_series: usize,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Request `i` of `t`, and the samples in it. Timestamps lie in the last
/// ten minutes (Prometheus refuses samples far behind its head) and rise
/// within every series from one request to the next.
pub fn request(t: &Traffic, base_ts: i64, i: usize) -> (v1::WriteRequest, Vec<Sample>) {
    let mut samples = Vec::new();
    let timeseries = (0..t.series)
        .map(|s| {
            let instance = format!("host-{s:03}");
            let points: Vec<v1::Sample> = (0..t.samples_per_series)
                .map(|j| {
                    let ts = base_ts + ((i * t.samples_per_series + j) as i64) * 100;
                    // Values that do not compress to nothing.
                    let value = ((i * 7919 + s * 104_729 + j * 31) % 1_000_003) as f64 / 7.0;
                    samples.push(Sample {
                        metric: t.metric.clone(),
                        instance: instance.clone(),
                        ts,
                        value,
                    });
                    v1::Sample {
                        value,
                        timestamp: ts,
                    }
                })
                .collect();
            v1::TimeSeries {
                labels: vec![
                    v1::Label {
                        name: "__name__".into(),
                        value: t.metric.clone(),
                    },
                    v1::Label {
                        name: "instance".into(),
                        value: instance,
                    },
                    v1::Label {
                        name: "job".into(),
                        value: "walrelay-cli-test".into(),
                    },
                ],
                samples: points,
                ..Default::default()
            }
        })
        .collect();
    (
        v1::WriteRequest {
            timeseries,
            metadata: vec![],
        },
        samples,
    )
}

/// Starts `walrelay serve` on `dir` (with `replicas` and `extra` flags),
/// POSTs the traffic, and stops it with SIGTERM. Without replicas the
/// relay deletes nothing it acknowledged, so the log holds all of it
/// however long the relay ran (no timing involved).
pub async fn write_log(
    dir: &Path,
    t: &Traffic,
    replicas: &[(&str, &str)],
    extra: &[&str],
) -> Written {
    let mut relay = Relay::start_with_bin(BIN, dir, replicas, extra)
        .await
        .expect("walrelay serve starts");
    let written = post_traffic(&relay, t).await;
    let status = relay.stop(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "walrelay serve exits cleanly: {status}");
    written
}

/// POSTs the traffic to a running relay.
pub async fn post_traffic(relay: &Relay, t: &Traffic) -> Written {
    let base_ts = now_ms() - 10 * 60 * 1000;
    let mut samples = Vec::new();
    for i in 0..t.requests {
        let (req, s) = request(t, base_ts, i);
        let (status, body) = post_remote_write(&relay.write_url(), write_request_body(&req))
            .await
            .unwrap();
        assert_eq!(status, 204, "ingest answers 204: {body}");
        samples.extend(s);
    }
    let min_ts = samples.iter().map(|s| s.ts).min().unwrap_or(0);
    let max_ts = samples.iter().map(|s| s.ts).max().unwrap_or(0);
    Written {
        requests: t.requests,
        samples,
        min_ts,
        max_ts,
    }
}

/// Runs `walrelay ARGS...` and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("WALRELAY_DATA_DIR")
        .output()
        .expect("run walrelay")
}

/// `cli` with the data dir as `--data-dir`.
pub fn cli_dir(sub: &[&str], dir: &Path, more: &[&str]) -> Output {
    let d = dir.to_str().unwrap();
    let mut args: Vec<&str> = sub.to_vec();
    args.extend(["--data-dir", d]);
    args.extend(more);
    cli(&args)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing the output when it differs.
pub fn expect_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\n--- stdout\n{}\n--- stderr\n{}",
        stdout(o),
        stderr(o)
    );
    assert!(
        !stderr(o).contains("panicked"),
        "{what}: panicked\n{}",
        stderr(o)
    );
}

/// The stdout of a `--json` command, parsed.
pub fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n--- stdout\n{}\n--- stderr\n{}",
            stdout(o),
            stderr(o)
        )
    })
}

/// The segment files of the data dir's log, oldest first.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "wal")
                && p.file_name().unwrap().to_string_lossy().len() == 24
        })
        .collect();
    v.sort();
    v
}

/// The first sequence number in a segment's file name.
pub fn first_seq(p: &Path) -> u64 {
    p.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}
