//! A replica's live state, shared by its shipper, retention, metrics and the
//! status endpoint.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::rate::RateLimits;

/// See the module documentation.
pub struct ReplicaState {
    pub name: String,
    pub url: String,
    delivered: AtomicU64,
    /// Receive time (unix ms) of the oldest record not yet delivered; 0 when
    /// caught up.
    pending_since_ms: AtomicI64,
    sent_records: AtomicU64,
    sent_samples: AtomicU64,
    rejected_records: AtomicU64,
    rejected_samples: AtomicU64,
    assumed_delivered_records: AtomicU64,
    skipped_records: AtomicU64,
    dropped_records: AtomicU64,
    dropped_samples: AtomicU64,
    /// The replica's configured rate limits (shown in the status).
    rate_limits: RateLimits,
    /// Time the shipper spent waiting for its rate limits, in nanoseconds.
    rate_limited_ns: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    phase: &'static str,
    last_error: Option<String>,
    last_error_ms: Option<i64>,
    last_success_ms: Option<i64>,
}

/// A snapshot for the status endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub url: String,
    pub cursor: u64,
    pub state: &'static str,
    pub lag_records: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub sent_records: u64,
    pub sent_samples: u64,
    pub rejected_records: u64,
    pub rejected_samples: u64,
    /// Records whose re-send (after a restart or an ambiguous attempt) was
    /// refused: most likely the replica already had them.
    pub assumed_delivered_records: u64,
    pub skipped_records: u64,
    pub dropped_records: u64,
    pub dropped_samples: u64,
    /// The configured limits (0: unlimited).
    pub rate_limits: RateLimits,
    /// Time spent waiting for the rate limits since the relay started.
    pub rate_limited_seconds: f64,
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<i64>,
    pub last_success_unix_ms: Option<i64>,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl ReplicaState {
    pub fn new(name: &str, url: &str, delivered: u64) -> Self {
        crate::metrics::register_replica_at_zero(name);
        metrics::gauge!("walrelay_replica_cursor", "replica" => name.to_owned())
            .set(delivered as f64);
        Self {
            name: name.to_owned(),
            url: url.to_owned(),
            delivered: AtomicU64::new(delivered),
            pending_since_ms: AtomicI64::new(0),
            sent_records: AtomicU64::new(0),
            sent_samples: AtomicU64::new(0),
            rejected_records: AtomicU64::new(0),
            rejected_samples: AtomicU64::new(0),
            assumed_delivered_records: AtomicU64::new(0),
            skipped_records: AtomicU64::new(0),
            dropped_records: AtomicU64::new(0),
            dropped_samples: AtomicU64::new(0),
            rate_limits: RateLimits::default(),
            rate_limited_ns: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                phase: "starting",
                ..Inner::default()
            }),
        }
    }

    /// Sets the replica's rate limits (before the state is shared).
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = limits;
        metrics::gauge!("walrelay_replica_rate_limit_samples_per_second", "replica" => self.name.clone())
            .set(limits.max_samples_per_second as f64);
        metrics::gauge!("walrelay_replica_rate_limit_bytes_per_second", "replica" => self.name.clone())
            .set(limits.max_bytes_per_second as f64);
        self
    }

    pub fn rate_limits(&self) -> RateLimits {
        self.rate_limits
    }

    /// Time spent waiting for the rate limits, for `/metrics`.
    pub fn rate_limited_seconds(&self) -> f64 {
        self.rate_limited_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub(crate) fn add_rate_limited(&self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.rate_limited_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything below this sequence number is done.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }

    pub(crate) fn set_delivered(&self, seq: u64) {
        self.delivered.store(seq, Ordering::Release);
        metrics::gauge!("walrelay_replica_cursor", "replica" => self.name.clone()).set(seq as f64);
    }

    pub(crate) fn set_pending_since(&self, receive_ms: i64) {
        self.pending_since_ms.store(receive_ms, Ordering::Relaxed);
    }

    pub(crate) fn set_caught_up(&self) {
        self.pending_since_ms.store(0, Ordering::Relaxed);
    }

    pub(crate) fn set_phase(&self, phase: &'static str) {
        self.inner().phase = phase;
    }

    pub(crate) fn set_ok(&self) {
        let mut i = self.inner();
        let now = now_ms();
        i.last_success_ms = Some(now);
        i.phase = "ok";
        metrics::gauge!("walrelay_replica_up", "replica" => self.name.clone()).set(1.0);
        metrics::gauge!("walrelay_replica_last_success_timestamp_seconds", "replica" => self.name.clone())
            .set(now as f64 / 1000.0);
    }

    pub(crate) fn set_retrying(&self, reason: String) {
        let mut i = self.inner();
        i.phase = "retrying";
        i.last_error = Some(reason);
        i.last_error_ms = Some(now_ms());
        metrics::gauge!("walrelay_replica_up", "replica" => self.name.clone()).set(0.0);
    }

    pub(crate) fn set_error(&self, reason: String) {
        tracing::error!(replica = %self.name, error = %reason, "shipper error");
        let mut i = self.inner();
        i.phase = "error";
        i.last_error = Some(reason);
        i.last_error_ms = Some(now_ms());
    }

    pub(crate) fn add_sent(&self, records: u64, samples: u64) {
        self.sent_records.fetch_add(records, Ordering::Relaxed);
        self.sent_samples.fetch_add(samples, Ordering::Relaxed);
        metrics::counter!("walrelay_replica_sent_records_total", "replica" => self.name.clone())
            .increment(records);
        metrics::counter!("walrelay_replica_sent_samples_total", "replica" => self.name.clone())
            .increment(samples);
    }

    pub(crate) fn add_rejected(&self, records: u64, samples: u64) {
        self.rejected_records.fetch_add(records, Ordering::Relaxed);
        self.rejected_samples.fetch_add(samples, Ordering::Relaxed);
        metrics::counter!("walrelay_replica_rejected_records_total", "replica" => self.name.clone())
            .increment(records);
        metrics::counter!("walrelay_replica_rejected_samples_total", "replica" => self.name.clone())
            .increment(samples);
    }

    /// Records whose re-send was refused, most likely as already held.
    pub(crate) fn add_assumed_delivered(&self, records: u64, samples: u64) {
        self.assumed_delivered_records
            .fetch_add(records, Ordering::Relaxed);
        metrics::counter!("walrelay_replica_assumed_delivered_records_total", "replica" => self.name.clone())
            .increment(records);
        metrics::counter!("walrelay_replica_assumed_delivered_samples_total", "replica" => self.name.clone())
            .increment(samples);
    }

    /// Records the reader skipped (damage, or deleted under it).
    pub(crate) fn add_skipped(&self, records: u64, reason: &'static str) {
        self.skipped_records.fetch_add(records, Ordering::Relaxed);
        metrics::counter!("walrelay_replica_skipped_records_total", "replica" => self.name.clone(), "reason" => reason)
            .increment(records);
    }

    /// Records and samples deleted under a limit before this replica got them.
    pub(crate) fn add_dropped(&self, records: u64, samples: u64, reason: &'static str) {
        self.dropped_records.fetch_add(records, Ordering::Relaxed);
        self.dropped_samples.fetch_add(samples, Ordering::Relaxed);
        tracing::error!(replica = %self.name, records, samples, reason,
            "records deleted before the replica received them");
        metrics::counter!("walrelay_replica_dropped_records_total", "replica" => self.name.clone(), "reason" => reason)
            .increment(records);
        metrics::counter!("walrelay_replica_dropped_samples_total", "replica" => self.name.clone(), "reason" => reason)
            .increment(samples);
    }

    /// A snapshot, given the log's durable end and a byte estimate of the lag.
    pub fn status(&self, durable_end: u64, lag_bytes: u64) -> ReplicaStatus {
        let i = self.inner();
        let delivered = self.delivered();
        let lag_records = durable_end.saturating_sub(delivered);
        let pending = self.pending_since_ms.load(Ordering::Relaxed);
        let lag_seconds = if lag_records == 0 || pending == 0 {
            0.0
        } else {
            (now_ms() - pending).max(0) as f64 / 1000.0
        };
        ReplicaStatus {
            name: self.name.clone(),
            url: self.url.clone(),
            cursor: delivered,
            state: if lag_records == 0 && i.phase != "error" {
                "caught_up"
            } else {
                i.phase
            },
            lag_records,
            lag_bytes: if lag_records == 0 { 0 } else { lag_bytes },
            lag_seconds,
            sent_records: self.sent_records.load(Ordering::Relaxed),
            sent_samples: self.sent_samples.load(Ordering::Relaxed),
            rejected_records: self.rejected_records.load(Ordering::Relaxed),
            rejected_samples: self.rejected_samples.load(Ordering::Relaxed),
            assumed_delivered_records: self.assumed_delivered_records.load(Ordering::Relaxed),
            skipped_records: self.skipped_records.load(Ordering::Relaxed),
            dropped_records: self.dropped_records.load(Ordering::Relaxed),
            dropped_samples: self.dropped_samples.load(Ordering::Relaxed),
            rate_limits: self.rate_limits,
            rate_limited_seconds: self.rate_limited_seconds(),
            last_error: i.last_error.clone(),
            last_error_unix_ms: i.last_error_ms,
            last_success_unix_ms: i.last_success_ms,
        }
    }
}
