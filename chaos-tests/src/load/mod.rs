//! The remote-write load generator and its acknowledgement log.
//!
//! Each worker owns disjoint series (`walrelay_load_samples{run, worker,
//! series, ...}`), keeps exactly one request in flight, and writes strictly
//! increasing timestamps per series. Sample values encode (worker, series,
//! k) — see [`encode_value`] — so a delivered value can be checked. Every
//! request ends up in the [`AckLog`] as a [`Batch`]: acknowledged (2xx) or
//! not, with its attempts counted, so [`crate::verify`] can compare what was
//! acknowledged with what a replica holds.
//!
//! A [`Load`] spawns one worker per worker index, all sharing the spec, the
//! URLs and the live [`Progress`]:
//!
//! * `generator`: what a request holds — the series, their timestamps and
//!   checkable values — and the [`Batch`] that records it.
//! * `worker`: the loop that sends one request at a time, asking
//!   * `routing` which URL the next attempt goes to, and
//!   * `retry` whether to try again and how long to wait first.
//! * `acklog`: every batch and failed attempt, kept, streamed as JSON lines,
//!   and summed up.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::http::now_ms;

mod acklog;
mod generator;
mod retry;
mod routing;
mod worker;

pub use acklog::{AckLog, Attempt, Counts, Latency, Outcome, Summary};
pub use generator::{decode_value, encode_value, Batch};
pub use retry::RetryPolicy;
pub use routing::Routing;

use acklog::{write_lines, Line};
use generator::Generator;
use worker::{worker, WorkerResult};

/// The metric name every load series has (unless [`LoadSpec::metric`] says otherwise).
pub const DEFAULT_METRIC: &str = "walrelay_load_samples";

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
        Generator::new(self, worker).encode(k0, ts0).to_vec()
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
