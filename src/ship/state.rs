//! A replica's live state, shared by its shipper, retention, metrics and the
//! status endpoint.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::rate::RateLimits;
use super::send::{SendObserver, WrittenCounts};
use crate::types::now_ms;

/// See the module documentation.
pub struct ReplicaState {
    pub name: String,
    pub url: String,
    /// `"1.0"` or `"2.0"`: what the replica is sent.
    protocol: &'static str,
    /// `"in-order"` or `"live-first"`.
    catch_up: &'static str,
    /// The live stream's cursor (the only one of an in-order replica).
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
    translation_dropped_created_timestamps: AtomicU64,
    translation_dropped_metadata: AtomicU64,
    partial_writes: AtomicU64,
    unconfirmed_writes: AtomicU64,
    /// See [`ReplicaStatus::stuck_attempts`].
    stuck_attempts: AtomicU64,
    /// Time spent in requests the replica stored, in nanoseconds: what the
    /// shard count is sized by ([`super::adapt`]).
    stored_busy_ns: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    phase: &'static str,
    last_error: Option<String>,
    last_error_ms: Option<i64>,
    last_success_ms: Option<i64>,
    /// `[from, to)` still to be backfilled, while a backfill runs.
    backfill: Option<std::ops::Range<u64>>,
    /// Records of the request being sent, `[from, to)`.
    in_flight: Option<(u64, u64)>,
    /// Since when (unix ms) the request in flight has been refused for a
    /// reason that is not about its data, while it is.
    blocked_since_ms: Option<i64>,
    /// Each shard of the live stream, when it has more than one.
    shards: Vec<ShardSlot>,
    /// For each of the replica's streams holding a delivery that the
    /// checkpoint store does not have yet (see
    /// [`ReplicaStatus::checkpoint_pending`]): the position the store still
    /// has for it, which a restart would re-send from.
    held: Vec<u64>,
}

/// One shard's part of the live stream's state.
#[derive(Debug, Clone, Copy, Default)]
struct ShardSlot {
    delivered: u64,
    in_flight: Option<(u64, u64)>,
    /// As [`ReplicaState::pending_since_ms`], for this shard.
    pending_since_ms: i64,
}

/// A snapshot for the status endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub url: String,
    /// `"1.0"` or `"2.0"`.
    pub protocol: &'static str,
    /// `"in-order"` or `"live-first"`.
    pub catch_up: &'static str,
    /// The live stream's position: everything below it is delivered except
    /// the backfill's range.
    pub cursor: u64,
    /// The range still missing while a live-first backfill runs.
    pub backfill: Option<BackfillStatus>,
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
    /// What translating 2.0 records to 1.0 for this replica could not carry.
    pub dropped_by_translation: TranslationDropped,
    /// 2.0 requests answered 2xx whose `X-Prometheus-Remote-Write-*-Written`
    /// counts were below what was sent.
    pub partial_writes: u64,
    /// 2.0 requests answered 2xx without usable written counts: the replica
    /// may not speak 2.0 at all (a 1.0 receiver that ignores the content
    /// type reads a 2.0 body as an empty request).
    pub unconfirmed_writes: u64,
    /// Consecutive attempts of the request in flight that the replica
    /// answered with the same 5xx status and body. A replica that is up but
    /// refuses one record this way (Prometheus 2.42 answers 500 to a series
    /// with no labels) would otherwise stall its stream for ever in
    /// silence: the shipper retries every 5xx. 0 when the last attempt
    /// succeeded or failed otherwise (timeout, connection, 429, another
    /// answer). See `in_flight` for the records concerned.
    pub stuck_attempts: u64,
    /// Sequence numbers `[from, to)` of the request being sent, if any
    /// (with shards, the lowest shard's).
    pub in_flight: Option<InFlightRange>,
    /// How many shards deliver the live stream, each with one request in
    /// flight and the series that hash to it ([`crate::ship::shards`]).
    pub shards: u32,
    /// Each shard's cursor and request in flight, with more than one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shard_cursors: Vec<ShardStatus>,
    /// While `state` is `"blocked"`: since when (unix ms) the replica has
    /// refused the request in flight with an answer that is not about its
    /// data (401, 403, 404, ...; the answer is in `last_error`). Nothing is
    /// skipped meanwhile: the request is retried until it passes.
    pub blocked_since_unix_ms: Option<i64>,
    /// A delivery is not in the checkpoint store yet: it is written with
    /// the stream's next request, or after 100 ms without one. A crash
    /// meanwhile re-sends that request (the replica gets it twice); a
    /// clean stop writes it first. `cursor` counts it as delivered.
    pub checkpoint_pending: bool,
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<i64>,
    pub last_success_unix_ms: Option<i64>,
}

/// See [`ReplicaStatus::backfill`]: records `[from, to)` are not delivered
/// yet (apart from those of the backfill's request in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BackfillStatus {
    pub from: u64,
    pub to: u64,
    pub remaining_records: u64,
}

/// See [`ReplicaStatus::shard_cursors`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ShardStatus {
    pub shard: u32,
    /// Everything of this shard's series below it is delivered.
    pub cursor: u64,
    pub lag_records: u64,
    pub in_flight: Option<InFlightRange>,
}

/// See [`ReplicaStatus::in_flight`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct InFlightRange {
    /// First record of the request.
    pub from: u64,
    /// One past its last record.
    pub to: u64,
}

/// See [`ReplicaStatus::dropped_by_translation`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TranslationDropped {
    /// Series' created timestamps (1.0 has no field for them).
    pub created_timestamps: u64,
    /// Series metadata that 1.0's per-family metadata cannot hold.
    pub metadata: u64,
}

impl ReplicaState {
    pub fn new(name: &str, url: &str, delivered: u64) -> Self {
        crate::metrics::register_replica_at_zero(name);
        metrics::gauge!("walrelay_replica_cursor", "replica" => name.to_owned())
            .set(delivered as f64);
        Self {
            name: name.to_owned(),
            url: url.to_owned(),
            protocol: "1.0",
            catch_up: "in-order",
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
            translation_dropped_created_timestamps: AtomicU64::new(0),
            translation_dropped_metadata: AtomicU64::new(0),
            partial_writes: AtomicU64::new(0),
            unconfirmed_writes: AtomicU64::new(0),
            stuck_attempts: AtomicU64::new(0),
            stored_busy_ns: AtomicU64::new(0),
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

    /// The protocol the replica is sent (`"1.0"` unless set).
    pub fn with_protocol(mut self, protocol: &'static str) -> Self {
        self.protocol = protocol;
        self
    }

    /// The catch-up mode shown in the status (`"in-order"` unless set).
    pub fn with_catch_up(mut self, catch_up: &'static str) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// A backfill loaded from the checkpoint store (before the state is
    /// shared, so retention never sees the replica without it).
    pub fn with_backfill(self, range: Option<std::ops::Range<u64>>) -> Self {
        if let Some(r) = range {
            self.set_backfill(r);
        }
        self
    }

    /// The backfill's remaining range, if one runs.
    pub fn backfill(&self) -> Option<std::ops::Range<u64>> {
        self.inner().backfill.clone()
    }

    /// Starts tracking a backfill of `range`. Called before the live
    /// cursor jumps past it, so that [`Self::low_water`] never rises above
    /// records not delivered yet.
    pub(crate) fn set_backfill(&self, range: std::ops::Range<u64>) {
        let remaining = range.end.saturating_sub(range.start);
        self.inner().backfill = Some(range);
        metrics::gauge!("walrelay_replica_backfill_remaining_records", "replica" => self.name.clone())
            .set(remaining as f64);
    }

    /// The backfill delivered everything below `from`.
    pub(crate) fn set_backfill_from(&self, from: u64) {
        let remaining = {
            let mut i = self.inner();
            let Some(b) = i.backfill.as_mut() else { return };
            b.start = from.min(b.end);
            b.end - b.start
        };
        metrics::gauge!("walrelay_replica_backfill_remaining_records", "replica" => self.name.clone())
            .set(remaining as f64);
    }

    /// The backfill is done and its checkpoint removed.
    pub(crate) fn clear_backfill(&self) {
        self.inner().backfill = None;
        metrics::gauge!("walrelay_replica_backfill_remaining_records", "replica" => self.name.clone())
            .set(0.0);
    }

    /// The lowest position any of the replica's streams still needs: what
    /// holds segments back from deletion. A delivery not yet in the
    /// checkpoint store still needs its records: a restart re-sends them.
    pub fn low_water(&self) -> u64 {
        // The live cursor is read first: a split sets the backfill before it
        // moves the cursor, so a cursor seen past the gap comes with the
        // backfill that covers it; a stream holds its stored position
        // before it moves its own past a delivery.
        let delivered = self.delivered();
        let i = self.inner();
        let backfill = i.backfill.as_ref().map_or(u64::MAX, |b| b.start);
        let held = i.held.iter().copied().min().unwrap_or(u64::MAX);
        delivered.min(backfill).min(held)
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

    /// A stream of this replica delivered past what the checkpoint store
    /// has for it, `from`: segments from there on are kept until it is
    /// written ([`Self::release`]), since a crash meanwhile re-sends from
    /// there.
    pub(crate) fn hold(&self, from: u64) {
        self.inner().held.push(from);
    }

    /// The delivery held at `from` is in the checkpoint store now.
    pub(crate) fn release(&self, from: u64) {
        let mut i = self.inner();
        if let Some(k) = i.held.iter().position(|&h| h == from) {
            i.held.swap_remove(k);
        }
    }

    /// The live stream is now delivered by `of` shards, all at `at`.
    pub(crate) fn set_shards(&self, of: u32, at: u64) {
        let slot = ShardSlot {
            delivered: at,
            ..ShardSlot::default()
        };
        self.inner().shards = if of > 1 {
            vec![slot; of as usize]
        } else {
            Vec::new()
        };
        self.set_delivered(at);
        self.set_caught_up();
        metrics::gauge!("walrelay_replica_shards", "replica" => self.name.clone())
            .set(f64::from(of.max(1)));
        // Until the count is evaluated again, the one in force is wanted.
        metrics::gauge!("walrelay_replica_shards_desired", "replica" => self.name.clone())
            .set(f64::from(of.max(1)));
    }

    /// How many shards deliver the live stream.
    pub fn shards(&self) -> u32 {
        u32::try_from(self.inner().shards.len())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    /// Changes shard `index`'s slot, then the live stream's cursor (the
    /// lowest shard's) and its oldest pending record.
    fn with_shard(&self, index: u32, f: impl FnOnce(&mut ShardSlot)) {
        let (lowest, pending) = {
            let mut i = self.inner();
            let Some(slot) = i.shards.get_mut(index as usize) else {
                return;
            };
            f(slot);
            let lowest = i.shards.iter().map(|s| s.delivered).min().unwrap_or(0);
            let pending = i
                .shards
                .iter()
                .map(|s| s.pending_since_ms)
                .filter(|&p| p > 0)
                .min()
                .unwrap_or(0);
            (lowest, pending)
        };
        if lowest > self.delivered() {
            self.set_delivered(lowest);
        }
        self.pending_since_ms.store(pending, Ordering::Relaxed);
    }

    /// Samples delivered and the time spent in the requests the replica
    /// stored, since the relay started.
    pub(crate) fn delivery_work(&self) -> (u64, Duration) {
        (
            self.sent_samples.load(Ordering::Relaxed),
            Duration::from_nanos(self.stored_busy_ns.load(Ordering::Relaxed)),
        )
    }

    /// Shard `index`'s position.
    pub(crate) fn shard_delivered(&self, index: u32) -> u64 {
        self.inner()
            .shards
            .get(index as usize)
            .map_or_else(|| self.delivered(), |s| s.delivered)
    }

    pub(crate) fn set_shard_delivered(&self, index: u32, seq: u64) {
        self.with_shard(index, |s| s.delivered = seq);
    }

    pub(crate) fn set_shard_in_flight(&self, index: u32, range: Option<(u64, u64)>) {
        self.with_shard(index, |s| s.in_flight = range);
    }

    /// Receive time of shard `index`'s oldest record not delivered; 0 when
    /// it is caught up.
    pub(crate) fn set_shard_pending_since(&self, index: u32, receive_ms: i64) {
        self.with_shard(index, |s| s.pending_since_ms = receive_ms);
    }

    /// Sets what the shipper is doing; any phase but "blocked" (set by
    /// [`SendObserver::blocked`]) ends a blocked spell.
    pub(crate) fn set_phase(&self, phase: &'static str) {
        let mut i = self.inner();
        i.phase = phase;
        Self::leave_blocked(&mut i, &self.name);
    }

    fn leave_blocked(i: &mut Inner, name: &str) {
        if i.blocked_since_ms.take().is_some() {
            metrics::gauge!("walrelay_replica_blocked", "replica" => name.to_owned()).set(0.0);
        }
    }

    /// The records `[from, to)` of the request about to be sent, or `None`
    /// once it is done.
    pub(crate) fn set_in_flight(&self, range: Option<(u64, u64)>) {
        self.inner().in_flight = range;
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

    /// What a translation to 1.0 for this replica dropped.
    pub(crate) fn add_translation_dropped(&self, created_timestamps: u64, metadata: u64) {
        for (n, counter, what) in [
            (
                created_timestamps,
                &self.translation_dropped_created_timestamps,
                "created_timestamps",
            ),
            (metadata, &self.translation_dropped_metadata, "metadata"),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("walrelay_replica_dropped_by_translation_total", "replica" => self.name.clone(), "what" => what)
                    .increment(n);
            }
        }
    }

    /// A snapshot, given the log's durable end and a byte estimate of the lag.
    pub fn status(&self, durable_end: u64, lag_bytes: u64) -> ReplicaStatus {
        let i = self.inner();
        let delivered = self.delivered();
        let backfill = i.backfill.clone().map(|b| BackfillStatus {
            from: b.start,
            to: b.end,
            remaining_records: b.end.saturating_sub(b.start),
        });
        // What the replica does not have yet, on both streams: alerts on
        // lag keep firing until the gap is closed too.
        let lag_records =
            durable_end.saturating_sub(delivered) + backfill.map_or(0, |b| b.remaining_records);
        let pending = self.pending_since_ms.load(Ordering::Relaxed);
        let lag_seconds = if lag_records == 0 || pending == 0 {
            0.0
        } else {
            (now_ms() - pending).max(0) as f64 / 1000.0
        };
        ReplicaStatus {
            name: self.name.clone(),
            url: self.url.clone(),
            protocol: self.protocol,
            catch_up: self.catch_up,
            cursor: delivered,
            backfill,
            state: if lag_records == 0 && !matches!(i.phase, "error" | "blocked") {
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
            dropped_by_translation: TranslationDropped {
                created_timestamps: self
                    .translation_dropped_created_timestamps
                    .load(Ordering::Relaxed),
                metadata: self.translation_dropped_metadata.load(Ordering::Relaxed),
            },
            partial_writes: self.partial_writes.load(Ordering::Relaxed),
            unconfirmed_writes: self.unconfirmed_writes.load(Ordering::Relaxed),
            stuck_attempts: self.stuck_attempts.load(Ordering::Relaxed),
            in_flight: i
                .shards
                .iter()
                .filter_map(|s| s.in_flight)
                .min()
                .or(i.in_flight)
                .map(|(from, to)| InFlightRange { from, to }),
            shards: u32::try_from(i.shards.len()).unwrap_or(u32::MAX).max(1),
            shard_cursors: (0u32..)
                .zip(&i.shards)
                .map(|(shard, s)| ShardStatus {
                    shard,
                    cursor: s.delivered,
                    lag_records: durable_end.saturating_sub(s.delivered),
                    in_flight: s.in_flight.map(|(from, to)| InFlightRange { from, to }),
                })
                .collect(),
            blocked_since_unix_ms: i.blocked_since_ms,
            checkpoint_pending: !i.held.is_empty(),
            last_error: i.last_error.clone(),
            last_error_unix_ms: i.last_error_ms,
            last_success_unix_ms: i.last_success_ms,
        }
    }
}

/// The shipper's sender reports into the replica's state and metrics.
impl SendObserver for ReplicaState {
    fn name(&self) -> &str {
        &self.name
    }

    fn attempt(&self, status: &'static str, took: Duration, retried: bool) {
        if status == "2xx" {
            let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            self.stored_busy_ns.fetch_add(ns, Ordering::Relaxed);
        }
        metrics::histogram!("walrelay_replica_send_duration_seconds", "replica" => self.name.clone())
            .record(took.as_secs_f64());
        metrics::counter!("walrelay_replica_requests_total", "replica" => self.name.clone(), "status" => status)
            .increment(1);
        if retried {
            metrics::counter!("walrelay_replica_retries_total", "replica" => self.name.clone())
                .increment(1);
        }
    }

    fn retrying(&self, reason: String) {
        let mut i = self.inner();
        i.phase = "retrying";
        i.last_error = Some(reason);
        i.last_error_ms = Some(now_ms());
        Self::leave_blocked(&mut i, &self.name);
        metrics::gauge!("walrelay_replica_up", "replica" => self.name.clone()).set(0.0);
    }
    /// The replica answered the request in flight with a fault of
    /// configuration or of the path (`reason`: "HTTP 401: body"); it is
    /// retried until it passes, and shows as blocked until then.
    fn blocked(&self, reason: String) {
        let mut i = self.inner();
        let now = now_ms();
        i.phase = "blocked";
        i.last_error = Some(reason);
        i.last_error_ms = Some(now);
        if i.blocked_since_ms.is_none() {
            i.blocked_since_ms = Some(now);
            metrics::gauge!("walrelay_replica_blocked", "replica" => self.name.clone()).set(1.0);
        }
        metrics::gauge!("walrelay_replica_up", "replica" => self.name.clone()).set(0.0);
    }
    fn stored(&self) {
        let mut i = self.inner();
        let now = now_ms();
        i.last_success_ms = Some(now);
        i.phase = "ok";
        Self::leave_blocked(&mut i, &self.name);
        metrics::gauge!("walrelay_replica_up", "replica" => self.name.clone()).set(1.0);
        metrics::gauge!("walrelay_replica_last_success_timestamp_seconds", "replica" => self.name.clone())
            .set(now as f64 / 1000.0);
    }
    /// The replica answered the request in flight: it is not blocked any
    /// more, whatever the answer said about the data.
    fn answered(&self) {
        let mut i = self.inner();
        if i.phase == "blocked" {
            i.phase = "sending";
        }
        Self::leave_blocked(&mut i, &self.name);
    }
    /// Sets the count of consecutive identical 5xx answers to the request
    /// in flight (see [`ReplicaStatus::stuck_attempts`]).
    fn stuck(&self, n: u64) {
        if self.stuck_attempts.swap(n, Ordering::Relaxed) != n {
            metrics::gauge!("walrelay_replica_stuck_attempts", "replica" => self.name.clone())
                .set(n as f64);
        }
    }
    /// A 2xx to a 2.0 request whose written counts are below what was sent.
    fn partial_write(&self, sent: &WrittenCounts, written: &WrittenCounts) {
        self.partial_writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("walrelay_replica_partial_writes_total", "replica" => self.name.clone())
            .increment(1);
        tracing::warn!(replica = %self.name,
            samples_sent = sent.samples, samples_written = written.samples,
            histograms_sent = sent.histograms, histograms_written = written.histograms,
            exemplars_sent = sent.exemplars, exemplars_written = written.exemplars,
            "replica wrote only part of a 2.0 request (2xx, written counts below what was sent); \
             not retried: the replica chose to drop the rest");
    }
    /// A 2xx to a 2.0 request without usable written counts. Logged as a
    /// warning the first time, then at debug level (it repeats with every
    /// request of a misconfigured replica).
    fn unconfirmed_write(&self, why: &str) {
        let before = self.unconfirmed_writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("walrelay_replica_unconfirmed_writes_total", "replica" => self.name.clone())
            .increment(1);
        if before == 0 {
            tracing::warn!(replica = %self.name, reason = %why,
                "replica answered a 2.0 request with 2xx but without the written-count headers: \
                 it may be a 1.0 receiver that stored nothing; check its protocol setting");
        } else {
            tracing::debug!(replica = %self.name, reason = %why, "2.0 write not confirmed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_delivery_not_yet_checkpointed_holds_its_records_from_retention() {
        let state = ReplicaState::new("r", "http://x/", 10);
        assert_eq!(state.low_water(), 10);
        assert!(!state.status(40, 0).checkpoint_pending);
        // The live stream delivered 10..20 and a shard-like second stream
        // 10..30; neither is in the store yet.
        state.hold(10);
        state.hold(10);
        state.set_delivered(30);
        assert_eq!(state.low_water(), 10, "a restart re-sends from 10");
        assert!(state.status(40, 0).checkpoint_pending);
        state.release(10);
        assert_eq!(state.low_water(), 10, "one stream still holds 10");
        state.release(10);
        assert_eq!(state.low_water(), 30);
        assert!(!state.status(40, 0).checkpoint_pending);
        // With a backfill: the lowest of all.
        state.set_backfill(25..28);
        state.hold(27);
        assert_eq!(state.low_water(), 25);
        state.clear_backfill();
        assert_eq!(state.low_water(), 27);
        state.release(27);
        assert_eq!(state.low_water(), 30);
    }

    #[test]
    fn what_the_sender_reports_shows_in_the_replica_status() {
        let state = ReplicaState::new("r", "http://x/", 0);
        let sent = WrittenCounts {
            samples: 3,
            histograms: 1,
            exemplars: 1,
        };
        state.partial_write(
            &sent,
            &WrittenCounts {
                histograms: 0,
                ..sent
            },
        );
        state.unconfirmed_write("no headers");
        state.unconfirmed_write("no headers");
        state.blocked("HTTP 401: no".into());
        let s = state.status(1, 0);
        assert_eq!((s.partial_writes, s.unconfirmed_writes), (1, 2));
        assert_eq!(s.state, "blocked");
        assert_eq!(s.last_error.as_deref(), Some("HTTP 401: no"));
        assert!(s.blocked_since_unix_ms.is_some());
        state.answered();
        let s = state.status(1, 0);
        assert_eq!((s.state, s.blocked_since_unix_ms), ("sending", None));
        state.stored();
        assert_eq!(state.status(1, 0).state, "ok");
    }
}
