//! The remote-write load generator and its acknowledgement log.
//!
//! Each worker owns disjoint series (`walrelay_load_samples{run, worker,
//! series, ...}`), keeps exactly one request in flight, and writes strictly
//! increasing timestamps per series. Sample values encode (worker, series,
//! k) — see [`encode_value`] — so a delivered value can be checked. Every
//! request ends up in the [`AckLog`] as a [`Batch`]: acknowledged (2xx) or
//! not, with its attempts counted, so [`crate::verify`] can compare what was
//! acknowledged with what a replica holds.

use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::encode::{encode_labels, put_timeseries, snappy_compress};
use crate::http::now_ms;

/// The metric name every load series has (unless [`LoadSpec::metric`] says otherwise).
pub const DEFAULT_METRIC: &str = "walrelay_load_samples";

/// What a worker does after a request that was not acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryPolicy {
    /// Move on to the next request.
    Never,
    /// Like Prometheus: retry (same payload) on connection errors, timeouts,
    /// 5xx and 429; move on after any other 4xx.
    Retryable,
    /// Retry (same payload) until acknowledged or stopped.
    UntilAcked,
}

impl FromStr for RetryPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "never" => Ok(RetryPolicy::Never),
            "retryable" => Ok(RetryPolicy::Retryable),
            "until-acked" => Ok(RetryPolicy::UntilAcked),
            _ => bail!("retry policy must be never, retryable or until-acked, not {s:?}"),
        }
    }
}

impl fmt::Display for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RetryPolicy::Never => "never",
            RetryPolicy::Retryable => "retryable",
            RetryPolicy::UntilAcked => "until-acked",
        })
    }
}

/// Which relay each request of a worker goes to, when a load is given
/// several URLs ([`Load::start_routed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// Worker `i` (counted from `first_worker`) always sends to URL
    /// `i % n`, retries included: a sender pinned to one relay pod, waiting
    /// for it while it restarts.
    Pinned,
    /// Every attempt goes to the next URL, so consecutive requests of a
    /// series land on different relays and a retry fails over to another
    /// one: a round-robin Service in front of several relays.
    RoundRobin,
}

impl FromStr for Routing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pinned" => Ok(Routing::Pinned),
            "round-robin" => Ok(Routing::RoundRobin),
            _ => bail!("routing must be pinned or round-robin, not {s:?}"),
        }
    }
}

/// What to send. See the field docs for defaults.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Concurrent workers, each with one request in flight (default 4).
    pub workers: u32,
    /// Index of the first worker (default 0): several generators can share
    /// a run with disjoint worker ranges.
    pub first_worker: u32,
    /// Series per worker, all in every request (default 100).
    pub series_per_worker: u32,
    /// Samples per series per request (default 1).
    pub samples_per_series: u32,
    /// Time between the starts of a worker's requests; zero sends the next
    /// request as soon as the previous one is acknowledged (default zero).
    #[serde(with = "dur_ms")]
    pub interval: Duration,
    /// Stop starting requests (and retries) after this long.
    #[serde(with = "opt_dur_ms")]
    pub duration: Option<Duration>,
    /// Stop after this many requests per worker.
    pub requests_per_worker: Option<u64>,
    /// The `run` label; random by default.
    pub run_id: String,
    /// The metric name (default [`DEFAULT_METRIC`]).
    pub metric: String,
    /// `None` (default): the first sample of a request is stamped
    /// `max(now, previous + step_ms)`, so data is always fresh.
    /// `Some(start)`: sample k of a series is stamped `start + k * step_ms`.
    pub start_ms: Option<i64>,
    /// Milliseconds between a series' consecutive samples (default 1).
    pub step_ms: i64,
    /// Default [`RetryPolicy::Retryable`].
    pub retry: RetryPolicy,
    /// Per-attempt timeout (default 10 s).
    #[serde(with = "dur_ms")]
    pub request_timeout: Duration,
    /// First retry delay, doubled up to `backoff_max` (default 20 ms).
    #[serde(with = "dur_ms")]
    pub backoff_min: Duration,
    /// Default 1 s. A `Retry-After` answer is honoured up to 10 s.
    #[serde(with = "dur_ms")]
    pub backoff_max: Duration,
    /// Seeds the start jitter of the workers (default 0).
    pub seed: u64,
    /// Stream the log to this JSON-lines file while running.
    #[serde(skip)]
    pub ack_log: Option<PathBuf>,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            workers: 4,
            first_worker: 0,
            series_per_worker: 100,
            samples_per_series: 1,
            interval: Duration::ZERO,
            duration: None,
            requests_per_worker: None,
            run_id: random_run_id(),
            metric: DEFAULT_METRIC.to_string(),
            start_ms: None,
            step_ms: 1,
            retry: RetryPolicy::Retryable,
            request_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            seed: 0,
            ack_log: None,
        }
    }
}

impl LoadSpec {
    /// A `run` label value unique enough for one machine.
    pub fn new_run_id() -> String {
        random_run_id()
    }

    /// The worker indexes of this spec.
    pub fn worker_ids(&self) -> std::ops::Range<u32> {
        self.first_worker..self.first_worker + self.workers
    }

    /// The labels of one series, sorted by name.
    pub fn series_labels(&self, worker: u32, series: u32) -> Vec<(String, String)> {
        let mut l = vec![
            ("__name__".to_string(), self.metric.clone()),
            ("cluster".to_string(), "chaos".to_string()),
            ("env".to_string(), "test".to_string()),
            (
                "instance".to_string(),
                format!("load-{worker}.walrelay.invalid:9100"),
            ),
            ("job".to_string(), "walrelay-load".to_string()),
            ("run".to_string(), self.run_id.clone()),
            ("series".to_string(), series.to_string()),
            ("worker".to_string(), worker.to_string()),
        ];
        l.sort();
        l
    }

    /// PromQL selector for all series of the run, or of one worker.
    pub fn selector(&self, worker: Option<u32>) -> String {
        match worker {
            Some(w) => format!("{}{{run=\"{}\",worker=\"{w}\"}}", self.metric, self.run_id),
            None => format!("{}{{run=\"{}\"}}", self.metric, self.run_id),
        }
    }

    /// The uncompressed WriteRequest a worker sends for samples `k0..` of
    /// its series, the first stamped `ts0` (the body is this,
    /// snappy-compressed). Scenarios size things with it, e.g. a proxy's
    /// body limit against the relay's coalesced requests.
    pub fn raw_request(&self, worker: u32, k0: u64, ts0: i64) -> Vec<u8> {
        let mut raw = Vec::new();
        let mut samples = Vec::new();
        let labels = encoded_labels(self, worker);
        let n = self.samples_per_series;
        put_batch(
            &mut raw,
            &mut samples,
            &labels,
            worker,
            k0,
            ts0,
            n,
            self.step_ms,
        );
        raw
    }

    fn validate(&self) -> Result<()> {
        if self.workers == 0 || self.series_per_worker == 0 || self.samples_per_series == 0 {
            bail!("workers, series_per_worker and samples_per_series must be > 0");
        }
        if self.step_ms <= 0 {
            bail!("step_ms must be > 0");
        }
        if self.run_id.is_empty() || self.run_id.contains(['"', '\\']) {
            bail!("run_id must be non-empty without quotes or backslashes");
        }
        Ok(())
    }
}

fn random_run_id() -> String {
    let r: u32 = rand::rng().random();
    format!("r{:08x}", r)
}

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

/// What happened to one attempt that was not acknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub worker: u32,
    pub seq: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub at_ms: i64,
    pub latency_us: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    Acked {
        status: u16,
    },
    Refused {
        status: u16,
        body: String,
        retry_after: Option<u32>,
    },
    Failed {
        error: String,
    },
}

/// One line of a JSON-lines ack log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Start {
        spec: LoadSpec,
        url: String,
        started_ms: i64,
    },
    Batch(Batch),
    Attempt(Attempt),
    End {
        elapsed_ms: u64,
    },
}

/// Everything a load run sent and what came of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AckLog {
    pub spec: LoadSpec,
    pub url: String,
    pub started_ms: i64,
    pub elapsed_ms: u64,
    /// Every request, acknowledged or not, by worker then seq.
    pub batches: Vec<Batch>,
    /// Attempts that were not acknowledged (the first 10 000).
    pub attempts: Vec<Attempt>,
}

/// Request and attempt counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub acked_requests: u64,
    pub attempts: u64,
    pub refused: u64,
    pub failed: u64,
    pub acked_samples: u64,
    pub sent_samples: u64,
}

/// Latency of acknowledged requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// The one-line report of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub counts: Counts,
    pub latency: Latency,
    pub elapsed_ms: u64,
    pub acked_samples_per_sec: f64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        write!(
            f,
            "{:.0} acknowledged samples/s ({} samples) in {:.1}s; requests {} (acked {}), \
             attempts {}, refused {}, failed {}; ack latency p50 {} p99 {} max {}",
            self.acked_samples_per_sec,
            c.acked_samples,
            self.elapsed_ms as f64 / 1000.0,
            c.requests,
            c.acked_requests,
            c.attempts,
            c.refused,
            c.failed,
            fmt_us(self.latency.p50_us),
            fmt_us(self.latency.p99_us),
            fmt_us(self.latency.max_us),
        )
    }
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.2}ms", us as f64 / 1000.0)
    }
}

impl AckLog {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for b in &self.batches {
            c.requests += 1;
            c.attempts += b.attempts as u64;
            c.refused += b.refused as u64;
            c.failed += b.failed as u64;
            c.sent_samples += b.samples();
            if b.acked {
                c.acked_requests += 1;
                c.acked_samples += b.samples();
            }
        }
        c
    }

    pub fn acked_samples(&self) -> u64 {
        self.counts().acked_samples
    }

    pub fn latency(&self) -> Latency {
        let mut l: Vec<u64> = self.batches.iter().filter_map(|b| b.latency_us).collect();
        if l.is_empty() {
            return Latency::default();
        }
        l.sort_unstable();
        let pct = |p: f64| l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1];
        Latency {
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: l[l.len() - 1],
        }
    }

    pub fn summary(&self) -> Summary {
        let counts = self.counts();
        let secs = (self.elapsed_ms as f64 / 1000.0).max(1e-3);
        Summary {
            acked_samples_per_sec: counts.acked_samples as f64 / secs,
            counts,
            latency: self.latency(),
            elapsed_ms: self.elapsed_ms,
        }
    }

    /// The workers that sent anything, in order.
    pub fn workers(&self) -> Vec<u32> {
        let mut w: Vec<u32> = self.batches.iter().map(|b| b.worker).collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    pub fn batches_of(&self, worker: u32) -> impl Iterator<Item = &Batch> + '_ {
        self.batches.iter().filter(move |b| b.worker == worker)
    }

    /// The acknowledged samples of one worker as (series, ts, value).
    pub fn acked_samples_of(&self, worker: u32) -> Vec<(u32, i64, f64)> {
        let step = self.spec.step_ms;
        self.batches_of(worker)
            .filter(|b| b.acked)
            .flat_map(|b| b.iter_samples(step))
            .collect()
    }

    /// Smallest and largest timestamp of anything sent, if anything was.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        let step = self.spec.step_ms;
        let min = self.batches.iter().map(|b| b.ts0).min()?;
        let max = self.batches.iter().map(|b| b.last_ts(step)).max()?;
        Some((min, max))
    }

    /// Adds another generator's log of the same run (disjoint workers).
    pub fn merge(&mut self, other: AckLog) -> Result<()> {
        if other.spec.run_id != self.spec.run_id || other.spec.metric != self.spec.metric {
            bail!("cannot merge logs of different runs");
        }
        if other.spec.step_ms != self.spec.step_ms {
            bail!("cannot merge logs with different step_ms");
        }
        let end = (self.started_ms + self.elapsed_ms as i64)
            .max(other.started_ms + other.elapsed_ms as i64);
        self.started_ms = self.started_ms.min(other.started_ms);
        self.elapsed_ms = (end - self.started_ms).max(0) as u64;
        self.batches.extend(other.batches);
        self.batches.sort_by_key(|b| (b.worker, b.seq));
        self.attempts.extend(other.attempts);
        Ok(())
    }

    /// Writes the whole log as JSON lines (the format streamed by a run
    /// with [`LoadSpec::ack_log`]).
    pub fn write_jsonl(&self, path: &Path) -> Result<()> {
        let f =
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut w = BufWriter::new(f);
        write_line(
            &mut w,
            &Line::Start {
                spec: self.spec.clone(),
                url: self.url.clone(),
                started_ms: self.started_ms,
            },
        )?;
        for b in &self.batches {
            write_line(&mut w, &Line::Batch(b.clone()))?;
        }
        for a in &self.attempts {
            write_line(&mut w, &Line::Attempt(a.clone()))?;
        }
        write_line(
            &mut w,
            &Line::End {
                elapsed_ms: self.elapsed_ms,
            },
        )?;
        w.flush()?;
        Ok(())
    }

    /// Reads a JSON-lines log. A log cut short (the generator was killed)
    /// is fine: a torn last line is ignored and the elapsed time is taken
    /// from the last batch.
    pub fn read_jsonl(path: &Path) -> Result<AckLog> {
        let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut log: Option<AckLog> = None;
        let mut ended = false;
        let lines: Vec<String> = BufReader::new(f).lines().collect::<std::io::Result<_>>()?;
        let n = lines.len();
        for (i, line) in lines.into_iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed: Line = match serde_json::from_str(&line) {
                Ok(l) => l,
                Err(_) if i + 1 == n => break,
                Err(e) => bail!("{}:{}: {e}", path.display(), i + 1),
            };
            match parsed {
                Line::Start {
                    spec,
                    url,
                    started_ms,
                } => {
                    log = Some(AckLog {
                        spec,
                        url,
                        started_ms,
                        elapsed_ms: 0,
                        batches: Vec::new(),
                        attempts: Vec::new(),
                    })
                }
                other => {
                    let Some(l) = log.as_mut() else {
                        bail!("{}: first line is not a start line", path.display());
                    };
                    match other {
                        Line::Batch(b) => l.batches.push(b),
                        Line::Attempt(a) => l.attempts.push(a),
                        Line::End { elapsed_ms } => {
                            l.elapsed_ms = elapsed_ms;
                            ended = true;
                        }
                        Line::Start { .. } => {}
                    }
                }
            }
        }
        let mut log = log.ok_or_else(|| anyhow!("{}: empty ack log", path.display()))?;
        log.batches.sort_by_key(|b| (b.worker, b.seq));
        if !ended {
            let last = log
                .batches
                .iter()
                .map(|b| b.sent_ms + (b.latency_us.unwrap_or(0) / 1000) as i64)
                .max()
                .unwrap_or(log.started_ms);
            log.elapsed_ms = (last - log.started_ms).max(0) as u64;
        }
        Ok(log)
    }
}

fn write_line(w: &mut impl Write, line: &Line) -> Result<()> {
    serde_json::to_writer(&mut *w, line)?;
    w.write_all(b"\n")?;
    Ok(())
}

/// Live counters of a running load.
#[derive(Debug, Default)]
struct ProgressCounters {
    requests: AtomicU64,
    acked_requests: AtomicU64,
    acked_samples: AtomicU64,
    attempts: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot of a running load's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub requests: u64,
    pub acked_requests: u64,
    pub acked_samples: u64,
    pub attempts: u64,
    pub refused: u64,
    pub failed: u64,
}

impl ProgressCounters {
    fn snapshot(&self) -> Progress {
        Progress {
            requests: self.requests.load(Ordering::Relaxed),
            acked_requests: self.acked_requests.load(Ordering::Relaxed),
            acked_samples: self.acked_samples.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

struct Shared {
    spec: LoadSpec,
    /// The relays, in the order [`Routing`] counts them; one for [`Load::start`].
    urls: Vec<String>,
    routing: Routing,
    deadline: Option<Instant>,
    progress: ProgressCounters,
    lines: std::sync::Mutex<Option<mpsc::Sender<Line>>>,
    attempts_cap_per_worker: usize,
}

impl Shared {
    fn emit(&self, line: Line) {
        if let Some(tx) = lock(&self.lines).as_ref() {
            let _ = tx.send(line);
        }
    }
}

/// The load generator.
pub struct Load;

impl Load {
    /// Runs `spec` against `url` until its duration or request count is
    /// reached (at least one of them must be set).
    pub async fn run(spec: LoadSpec, url: &str) -> Result<AckLog> {
        if spec.duration.is_none() && spec.requests_per_worker.is_none() {
            bail!("Load::run needs a duration or requests_per_worker (or use Load::start)");
        }
        Self::start(spec, url)?.join().await
    }

    /// Starts `spec` against `url` in the background on the current tokio
    /// runtime; stop it with [`LoadHandle::stop`].
    pub fn start(spec: LoadSpec, url: &str) -> Result<LoadHandle> {
        Self::start_routed(spec, &[url.to_string()], Routing::Pinned)
    }

    /// [`Load::start`] over several relays: `routing` says which URL each
    /// attempt goes to. The ack log's `url` lists them all, space-separated.
    pub fn start_routed(spec: LoadSpec, urls: &[String], routing: Routing) -> Result<LoadHandle> {
        spec.validate()?;
        if urls.is_empty() {
            bail!("a load needs at least one URL");
        }
        let url = urls.join(" ");
        let url = url.as_str();
        let started_ms = now_ms();
        let started = Instant::now();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut writer = None;
        let lines = match &spec.ack_log {
            Some(path) => {
                let (tx, rx) = mpsc::channel::<Line>();
                let f = std::fs::File::create(path)
                    .with_context(|| format!("create ack log {}", path.display()))?;
                writer = Some(
                    std::thread::Builder::new()
                        .name("ack-log-writer".into())
                        .spawn(move || write_lines(f, rx))?,
                );
                tx.send(Line::Start {
                    spec: spec.clone(),
                    url: url.to_string(),
                    started_ms,
                })
                .map_err(|_| anyhow!("ack log writer died"))?;
                Some(tx)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            deadline: spec.duration.map(|d| started + d),
            attempts_cap_per_worker: (10_000 / spec.workers as usize).max(10),
            spec,
            urls: urls.to_vec(),
            routing,
            progress: ProgressCounters::default(),
            lines: std::sync::Mutex::new(lines),
        });
        let mut tasks = Vec::new();
        for w in shared.spec.worker_ids() {
            let shared = shared.clone();
            let stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move { worker(shared, w, stop).await }));
        }
        Ok(LoadHandle {
            shared,
            stop: stop_tx,
            tasks,
            started,
            started_ms,
            writer,
        })
    }
}

fn write_lines(f: std::fs::File, rx: mpsc::Receiver<Line>) -> Result<()> {
    let mut w = BufWriter::new(f);
    loop {
        let line = match rx.try_recv() {
            Ok(l) => l,
            Err(mpsc::TryRecvError::Empty) => {
                // Nothing queued: make what we have visible to readers.
                w.flush()?;
                match rx.recv() {
                    Ok(l) => l,
                    Err(_) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        write_line(&mut w, &line)?;
    }
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(())
}

/// A load running in the background.
pub struct LoadHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<WorkerResult>>>,
    started: Instant,
    started_ms: i64,
    writer: Option<std::thread::JoinHandle<Result<()>>>,
}

impl LoadHandle {
    pub fn progress(&self) -> Progress {
        self.shared.progress.snapshot()
    }

    pub fn run_id(&self) -> &str {
        &self.shared.spec.run_id
    }

    pub fn spec(&self) -> &LoadSpec {
        &self.shared.spec
    }

    /// True when every worker has finished (duration or count reached).
    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }

    /// Waits until at least `n` requests were acknowledged.
    pub async fn wait_acked_requests(&self, n: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.progress().acked_requests < n {
            if Instant::now() >= deadline {
                bail!(
                    "only {:?} after {timeout:?}, waiting for {n} acknowledged requests",
                    self.progress()
                );
            }
            if self.is_finished() {
                bail!(
                    "load finished with {:?} before {n} requests were acknowledged",
                    self.progress()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Asks the workers to stop: each finishes the attempt in flight (up to
    /// the request timeout), makes no further attempts, and the log is
    /// returned.
    pub async fn stop(self) -> Result<AckLog> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits for the workers to finish on their own (duration or count).
    pub async fn join(mut self) -> Result<AckLog> {
        let mut batches = Vec::new();
        let mut attempts = Vec::new();
        let mut first_err = None;
        for t in self.tasks.drain(..) {
            match t.await {
                Ok(Ok(r)) => {
                    batches.extend(r.batches);
                    attempts.extend(r.attempts);
                }
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(e) => first_err = first_err.or(Some(anyhow!("load worker panicked: {e}"))),
            }
        }
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        self.shared.emit(Line::End { elapsed_ms });
        // Dropping the sender ends the writer thread once it has written
        // everything.
        drop(lock(&self.shared.lines).take());
        if let Some(w) = self.writer.take() {
            match w.join() {
                Ok(r) => r.context("writing the ack log")?,
                Err(_) => bail!("ack log writer panicked"),
            }
        }
        finish(
            self.shared.spec.clone(),
            self.shared.urls.join(" "),
            self.started_ms,
            elapsed_ms,
            batches,
            attempts,
            first_err,
        )
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn finish(
    spec: LoadSpec,
    url: String,
    started_ms: i64,
    elapsed_ms: u64,
    mut batches: Vec<Batch>,
    attempts: Vec<Attempt>,
    err: Option<anyhow::Error>,
) -> Result<AckLog> {
    if let Some(e) = err {
        return Err(e);
    }
    batches.sort_by_key(|b| (b.worker, b.seq));
    Ok(AckLog {
        spec,
        url,
        started_ms,
        elapsed_ms,
        batches,
        attempts,
    })
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct WorkerResult {
    batches: Vec<Batch>,
    attempts: Vec<Attempt>,
}

enum Answer {
    Acked(u16),
    Refused {
        status: u16,
        body: String,
        retry_after: Option<u32>,
    },
    Failed(String),
}

async fn worker(
    shared: Arc<Shared>,
    w: u32,
    mut stop: watch::Receiver<bool>,
) -> Result<WorkerResult> {
    let spec = &shared.spec;
    let client = crate::http::client(spec.request_timeout)?;
    let labels = encoded_labels(spec, w);
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed ^ (u64::from(w) << 32));
    let mut result = WorkerResult {
        batches: Vec::new(),
        attempts: Vec::new(),
    };
    let n = spec.samples_per_series;
    let step = spec.step_ms;
    let mut last_ts = i64::MIN;
    let mut next_start = Instant::now();
    if !spec.interval.is_zero() {
        next_start += spec.interval.mul_f64(rng.random::<f64>());
    }
    let mut raw = Vec::new();
    let mut samples = Vec::with_capacity(n as usize);
    // Workers start on different relays so a round-robin load is spread
    // from the first request on.
    let mut next_url = (w - spec.first_worker) as usize % shared.urls.len();
    let stopping = |stop: &watch::Receiver<bool>| {
        *stop.borrow() || shared.deadline.is_some_and(|d| Instant::now() >= d)
    };
    for seq in 0u64.. {
        if spec.requests_per_worker.is_some_and(|max| seq >= max) || stopping(&stop) {
            break;
        }
        if !spec.interval.is_zero() {
            if !sleep_or_stop(&mut stop, next_start, shared.deadline).await {
                break;
            }
            next_start = (next_start + spec.interval).max(Instant::now());
        }
        let k0 = seq * n as u64;
        let ts0 = match spec.start_ms {
            Some(start) => start + k0 as i64 * step,
            None => now_ms().max(last_ts.saturating_add(step)),
        };
        last_ts = ts0 + (n as i64 - 1) * step;
        raw.clear();
        put_batch(&mut raw, &mut samples, &labels, w, k0, ts0, n, step);
        let body = bytes::Bytes::from(snappy_compress(&raw)?);
        let mut batch = Batch {
            worker: w,
            seq,
            k0,
            ts0,
            n,
            series: spec.series_per_worker,
            acked: false,
            attempts: 0,
            refused: 0,
            failed: 0,
            sent_ms: now_ms(),
            latency_us: None,
            last_status: None,
        };
        shared.progress.requests.fetch_add(1, Ordering::Relaxed);
        let mut backoff = spec.backoff_min;
        loop {
            batch.attempts += 1;
            shared.progress.attempts.fetch_add(1, Ordering::Relaxed);
            let at_ms = now_ms();
            let t0 = Instant::now();
            let url = &shared.urls[next_url];
            if shared.routing == Routing::RoundRobin {
                next_url = (next_url + 1) % shared.urls.len();
            }
            let answer = send(&client, url, body.clone()).await;
            let latency_us = t0.elapsed().as_micros() as u64;
            let (retry, wait) = match &answer {
                Answer::Acked(status) => {
                    batch.acked = true;
                    batch.latency_us = Some(latency_us);
                    batch.last_status = Some(*status);
                    shared
                        .progress
                        .acked_requests
                        .fetch_add(1, Ordering::Relaxed);
                    shared
                        .progress
                        .acked_samples
                        .fetch_add(batch.samples(), Ordering::Relaxed);
                    (false, None)
                }
                Answer::Refused {
                    status,
                    retry_after,
                    ..
                } => {
                    batch.refused += 1;
                    batch.last_status = Some(*status);
                    shared.progress.refused.fetch_add(1, Ordering::Relaxed);
                    let retryable = *status >= 500 || *status == 429;
                    let retry = match spec.retry {
                        RetryPolicy::Never => false,
                        RetryPolicy::Retryable => retryable,
                        RetryPolicy::UntilAcked => true,
                    };
                    (
                        retry,
                        retry_after
                            .map(|s| Duration::from_secs(s as u64).min(Duration::from_secs(10))),
                    )
                }
                Answer::Failed(_) => {
                    batch.failed += 1;
                    shared.progress.failed.fetch_add(1, Ordering::Relaxed);
                    (spec.retry != RetryPolicy::Never, None)
                }
            };
            if !matches!(answer, Answer::Acked(_)) {
                let outcome = match answer {
                    Answer::Acked(status) => Outcome::Acked { status },
                    Answer::Refused {
                        status,
                        body,
                        retry_after,
                    } => Outcome::Refused {
                        status,
                        body,
                        retry_after,
                    },
                    Answer::Failed(error) => Outcome::Failed { error },
                };
                if result.attempts.len() < shared.attempts_cap_per_worker {
                    let a = Attempt {
                        worker: w,
                        seq,
                        attempt: batch.attempts,
                        at_ms,
                        latency_us,
                        outcome,
                    };
                    shared.emit(Line::Attempt(a.clone()));
                    result.attempts.push(a);
                }
            }
            if !retry || stopping(&stop) {
                break;
            }
            let wait = wait.unwrap_or(backoff);
            backoff = (backoff * 2).min(spec.backoff_max);
            if !sleep_or_stop(&mut stop, Instant::now() + wait, shared.deadline).await {
                break;
            }
        }
        shared.emit(Line::Batch(batch.clone()));
        result.batches.push(batch);
    }
    Ok(result)
}

/// The uncompressed WriteRequest of one batch.
#[allow(clippy::too_many_arguments)]
fn put_batch(
    raw: &mut Vec<u8>,
    samples: &mut Vec<(f64, i64)>,
    labels: &[Vec<u8>],
    w: u32,
    k0: u64,
    ts0: i64,
    n: u32,
    step: i64,
) {
    for (s, l) in labels.iter().enumerate() {
        samples.clear();
        for j in 0..n {
            samples.push((
                encode_value(w, s as u32, k0 + j as u64),
                ts0 + j as i64 * step,
            ));
        }
        put_timeseries(raw, l, samples);
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

/// Sleeps until `until`; false if stopped (or the deadline passed) first.
async fn sleep_or_stop(
    stop: &mut watch::Receiver<bool>,
    until: Instant,
    deadline: Option<Instant>,
) -> bool {
    let until = match deadline {
        Some(d) if d <= until => {
            tokio::select! {
                _ = tokio::time::sleep_until(d.into()) => return false,
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
        _ => until,
    };
    let slept = tokio::select! {
        _ = tokio::time::sleep_until(until.into()) => true,
        _ = stop.wait_for(|s| *s) => false,
    };
    slept && !*stop.borrow()
}

async fn send(client: &reqwest::Client, url: &str, body: bytes::Bytes) -> Answer {
    let resp = client
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .header("User-Agent", "walrelay-load/0.1")
        .body(body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Answer::Failed(error_chain(&e)),
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return Answer::Failed(format!("reading the response: {}", error_chain(&e))),
    };
    if (200..300).contains(&status) {
        Answer::Acked(status)
    } else {
        let mut body = String::from_utf8_lossy(&body).into_owned();
        if body.len() > 512 {
            let mut cut = 512;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        Answer::Refused {
            status,
            body,
            retry_after,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

mod dur_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_dur_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
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
        let labels = encoded_labels(&spec, 7);
        let (mut raw, mut scratch) = (Vec::new(), Vec::new());
        put_batch(
            &mut raw,
            &mut scratch,
            &labels,
            7,
            10,
            1_700_000_000_000,
            2,
            5,
        );
        let req = prom_remote_write::v1::WriteRequest::decode(&raw[..]).unwrap();
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

    #[test]
    fn latency_percentiles() {
        let mut log = AckLog {
            spec: LoadSpec::default(),
            url: String::new(),
            started_ms: 0,
            elapsed_ms: 1000,
            batches: Vec::new(),
            attempts: Vec::new(),
        };
        for i in 1..=100u64 {
            log.batches.push(Batch {
                worker: 0,
                seq: i,
                k0: i,
                ts0: i as i64,
                n: 1,
                series: 2,
                acked: true,
                attempts: 1,
                refused: 0,
                failed: 0,
                sent_ms: 0,
                latency_us: Some(i * 10),
                last_status: Some(204),
            });
        }
        let l = log.latency();
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (500, 990, 1000));
        assert_eq!(log.acked_samples(), 200);
    }
}
