//! One shipper per replica, each with its own cursor, retries and pace.
//!
//! A shipper reads the log from its checkpoint and sends records to its
//! replica in log order, one request at a time, consecutive records coalesced
//! into one remote-write request (see [`payload`]: 1.0 messages are
//! concatenated; for a replica set to protocol 2.0, 2.0 records are merged
//! into one 2.0 request, and a batch is cut where the records' kind changes,
//! so that no request mixes 1.0 and 2.0). One request in flight per replica is what keeps Prometheus from
//! refusing samples as out of order: two requests carrying the same series
//! could overtake each other.
//!
//! The in-flight request's exact range is checkpointed before it is sent
//! (see [`crate::checkpoint`]); after a restart that range is re-sent on its
//! own first, and a 4xx for it then means the replica already had it.
//! While records keep coming, a delivery's completion is checkpointed
//! together with the next request's range (one flush per request, see
//! [`Checkpoints::complete_and_begin`]); when the shipper goes idle or
//! stops, on its own.
//!
//! Outcomes ([`policy`] has the whole table and the reasons): 2xx
//! advances; only an answer about the data (400, 409, 422) skips a record,
//! and only a single record: a refused request of several records is
//! re-sent record by record so that only the records the replica refuses
//! are counted as rejected and skipped. 413 splits the request, down to one
//! record. Everything else (401, 403, 404 and the other 4xx, 5xx, 429,
//! connection errors, timeouts) is retried with backoff for as long as it
//! takes, and the cursor does not move: an answer that is not about the
//! data shows the replica as `blocked`.
//!
//! A refusal means "the replica already had it" in one case only: the
//! exact range that was in flight when the relay stopped, re-sent on its
//! own ([`Resend::Exact`]). Parts of a request an earlier attempt of which
//! may have been stored (the halves of one that timed out) go one by one.
//! Positions only move forward: a gap or a checkpoint behind the stream's
//! position is ignored and logged.
//!
//! A replica may have rate limits (samples and decoded bytes per second,
//! [`rate`]): each request waits for them before its range is checkpointed
//! as in flight, and batches are capped at one second's worth. The wait is
//! this shipper's alone; ingest and the other replicas' shippers never wait
//! for it.
//!
//! A replica set to live-first catch-up ([`backfill`]) may run two shippers:
//! the live stream, which owns the replica's cursor, and a backfill of the
//! gap it left at a split, spawned by the live one. They share the replica's
//! state, HTTP client and rate limiter; each keeps its own checkpoint
//! ([`Stream`]) and its own single request in flight.

pub mod backfill;
pub mod payload;
pub mod policy;
pub mod rate;
mod send;
mod state;

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wal_format::Record;

use crate::checkpoint::{Checkpoints, Stream};
use crate::config::{CatchUp, ReplicaProtocol, StartAt};
use crate::wal::{ReadItem, Wal, WalReader};

pub use policy::StatusPolicy;
pub use rate::RateLimits;
pub use send::{parse_written, Body, Outcome, Sender, SenderOptions};
pub(crate) use state::now_ms;
pub use state::{BackfillStatus, ReplicaState, ReplicaStatus, TranslationDropped, WrittenCounts};

/// Limits of one coalesced request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_samples: u64,
    pub max_bytes: usize,
}

/// The running size of a batch being gathered, and the rule for what may
/// join it.
#[derive(Debug, Clone, Copy)]
struct BatchFill {
    samples: u64,
    bytes: usize,
    kind: wal_format::PayloadKind,
}

impl BatchFill {
    fn new(first: &Record) -> Self {
        BatchFill {
            samples: u64::from(first.meta.samples),
            bytes: first.payload.len(),
            kind: first.meta.kind,
        }
    }

    /// Whether more records may still be looked for.
    fn has_room(&self, limits: BatchLimits) -> bool {
        self.samples < limits.max_samples && self.bytes < limits.max_bytes
    }

    /// Takes `r` into the batch if it fits the limits and may share a
    /// request with the batch's records ([`payload::same_request`]).
    fn take(&mut self, r: &Record, limits: BatchLimits, protocol: ReplicaProtocol) -> bool {
        let samples = self.samples + u64::from(r.meta.samples);
        let bytes = self.bytes + r.payload.len();
        if samples > limits.max_samples
            || bytes > limits.max_bytes
            || !payload::same_request(protocol, self.kind, r.meta.kind)
        {
            return false;
        }
        self.samples = samples;
        self.bytes = bytes;
        true
    }
}

/// See the module documentation.
pub struct Shipper {
    state: Arc<ReplicaState>,
    wal: Wal,
    checkpoints: Checkpoints,
    sender: Sender,
    /// What the replica is sent; decides batching and the request format.
    protocol: ReplicaProtocol,
    limits: BatchLimits,
    start_at: StartAt,
    /// An item read past the end of the current batch, kept for the next.
    held: Option<ReadItem>,
    /// The batch limits in force: the configured ones, halved each time a
    /// request is too slow for the replica to answer within the timeout, and
    /// grown back as requests succeed.
    current: BatchLimits,
    /// Everything below this was delivered, but the checkpoint store does
    /// not have it yet: it is written with the next request's in-flight
    /// range (one flush for both), or on its own when the shipper goes idle
    /// or stops.
    unflushed: Option<u64>,
    /// Buffers for request bodies, kept between requests.
    builder: payload::BodyBuilder,
    /// The replica's rate limits, consulted before each request; shared by
    /// its live and backfill streams, so that together they keep to them.
    limiter: Arc<Mutex<rate::Limiter>>,
    /// Which of the replica's streams this is.
    stream: Stream,
    /// The replica's catch-up mode (only the live stream splits).
    catch_up: CatchUp,
    /// The backfill this live stream spawned, awaited when it stops.
    backfill: Option<JoinHandle<()>>,
    /// The tokens `run` was given, handed on to a spawned backfill.
    shutdown: CancellationToken,
    drain: CancellationToken,
}

/// How long a batch under half the limits waits for more records.
const LINGER: Duration = Duration::from_millis(5);

/// Smallest adaptive limits: a record is always sent, whatever its size.
const MIN_BATCH: BatchLimits = BatchLimits {
    max_samples: 100,
    max_bytes: 16 << 10,
};

impl Shipper {
    pub fn new(
        state: Arc<ReplicaState>,
        wal: Wal,
        checkpoints: Checkpoints,
        sender: Sender,
        protocol: ReplicaProtocol,
        limits: BatchLimits,
        start_at: StartAt,
    ) -> Self {
        let rate = state.rate_limits();
        // One request never carries more than a second's worth of a rate
        // limit: requests then go at an even pace instead of one burst and
        // a long pause, and rarely exceed the bucket.
        let limits = rate.cap(limits);
        Self {
            state,
            wal,
            checkpoints,
            sender,
            protocol,
            limits,
            start_at,
            held: None,
            current: limits,
            unflushed: None,
            builder: payload::BodyBuilder::default(),
            limiter: Arc::new(Mutex::new(rate::Limiter::new(rate))),
            stream: Stream::Live,
            catch_up: CatchUp::InOrder,
            backfill: None,
            shutdown: CancellationToken::new(),
            drain: CancellationToken::new(),
        }
    }

    /// Sets the replica's catch-up mode (in order unless set).
    pub fn with_catch_up(mut self, catch_up: CatchUp) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// A shipper for the backfill of everything below `to` from the
    /// replica's stored backfill position, sharing this one's state, client
    /// and rate limiter.
    fn backfill_shipper(&self, to: u64) -> Shipper {
        Shipper {
            state: Arc::clone(&self.state),
            wal: self.wal.clone(),
            checkpoints: self.checkpoints.clone(),
            sender: self.sender.clone(),
            protocol: self.protocol,
            limits: self.limits,
            start_at: self.start_at,
            held: None,
            current: self.limits,
            unflushed: None,
            builder: payload::BodyBuilder::default(),
            limiter: Arc::clone(&self.limiter),
            stream: Stream::Backfill { to },
            catch_up: self.catch_up,
            backfill: None,
            shutdown: self.shutdown.clone(),
            drain: self.drain.clone(),
        }
    }

    /// Starts the backfill of the replica's backfill range (in the state).
    fn start_backfill(&mut self) {
        let Some(range) = self.state.backfill() else {
            return;
        };
        if self.catch_up == CatchUp::InOrder {
            tracing::warn!(replica = %self.state.name, from = range.start, to = range.end,
                "replica is set to in-order but has a live-first backfill pending: \
                 finishing it (a replica that refuses older samples rejects them, counted)");
        }
        tracing::info!(replica = %self.state.name, from = range.start, to = range.end,
            remaining_records = range.end - range.start, "backfill started");
        self.backfill = Some(spawn_backfill(self.backfill_shipper(range.end)));
    }

    /// Where this stream is: everything below is delivered (for the
    /// backfill, of its range).
    fn position(&self) -> u64 {
        match self.stream {
            Stream::Live => self.state.delivered(),
            Stream::Backfill { to } => self.state.backfill().map_or(to, |b| b.start),
        }
    }

    fn set_position(&self, seq: u64) {
        match self.stream {
            Stream::Live => self.state.set_delivered(seq),
            Stream::Backfill { .. } => self.state.set_backfill_from(seq),
        }
    }

    /// A request was too slow: halve the batch limits (never above the
    /// configured ones, which may be below the minimum).
    fn shrink(&mut self) {
        self.current = BatchLimits {
            max_samples: (self.current.max_samples / 2)
                .max(MIN_BATCH.max_samples)
                .min(self.limits.max_samples),
            max_bytes: (self.current.max_bytes / 2)
                .max(MIN_BATCH.max_bytes)
                .min(self.limits.max_bytes),
        };
    }

    /// A request succeeded: grow the limits back towards the configured ones.
    fn grow(&mut self) {
        self.current = BatchLimits {
            max_samples: (self.current.max_samples + self.current.max_samples / 4 + 1)
                .min(self.limits.max_samples),
            max_bytes: (self.current.max_bytes + self.current.max_bytes / 4 + 1)
                .min(self.limits.max_bytes),
        };
    }

    /// Ships until `shutdown` is cancelled. Checkpoints are consistent at
    /// every await point, so cancelling at any moment loses nothing.
    ///
    /// `drain` stops it between requests instead: the request being sent is
    /// answered and checkpointed first, so a shipper replaced by a reload
    /// sends nothing twice. A backfill this shipper spawned gets both.
    pub async fn run(mut self, shutdown: CancellationToken, drain: CancellationToken) {
        self.shutdown = shutdown.clone();
        self.drain = drain.clone();
        tokio::select! {
            () = self.ship(&drain) => {}
            () = shutdown.cancelled() => {}
        }
        // Stopped while a delivery was not checkpointed yet: write it, so
        // that a clean restart does not re-send it.
        if let Some(delivered) = self.unflushed {
            let cp = self.checkpoints.clone();
            let name = self.state.name.clone();
            let stream = self.stream;
            if let Err(e) = blocking(move || cp.complete_on(&name, stream, delivered)).await {
                tracing::warn!(replica = %self.state.name, error = %e,
                    "cannot checkpoint the last delivery; it will be re-sent at the next start");
            }
        }
        if let Some(backfill) = self.backfill.take() {
            let _ = backfill.await;
        }
        if self.stream == Stream::Live {
            self.state.set_phase("stopped");
        }
    }

    async fn ship(&mut self, drain: &CancellationToken) {
        let start = loop {
            match self.startup().await {
                Ok(s) => break s,
                Err(e) => {
                    self.state.set_error(format!("checkpoint store: {e}"));
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        if self.stream == Stream::Live {
            self.start_backfill();
        }
        let mut reader = self.wal.reader(start);
        loop {
            if drain.is_cancelled() {
                return;
            }
            if let Stream::Backfill { to } = self.stream {
                if self.position() >= to {
                    self.finish_backfill(to).await;
                    return;
                }
            } else {
                self.state.set_phase("idle");
            }
            // Waiting for records is where a drain usually finds the
            // shipper; what was read and not sent is read again by the
            // next shipper, from the checkpoint.
            let next = tokio::select! {
                next = self.next_batch(&mut reader) => next,
                () = drain.cancelled() => return,
            };
            let batch = match next {
                Ok(b) => b,
                Err(e) => {
                    self.state.set_error(format!("reading the log: {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    reader.seek(self.position());
                    continue;
                }
            };
            match batch {
                Batch::Gap(g) => {
                    if self.account_gap(&g) {
                        self.checkpoint(g.to).await;
                    }
                }
                Batch::Records(records) => {
                    if let Some(gap) = self.split_gap(&records) {
                        self.split(gap, &mut reader).await;
                        continue;
                    }
                    self.deliver(records, Resend::No).await;
                }
                Batch::End => {
                    // Only a backfill ends: the log holds no more of its range.
                    if let Stream::Backfill { to } = self.stream {
                        let missing = to.saturating_sub(self.position());
                        if missing > 0 {
                            tracing::error!(replica = %self.state.name, from = self.position(), to,
                                "backfill range no longer in the log; counted as skipped");
                            self.state.add_skipped(missing, "not_in_log");
                        }
                        self.finish_backfill(to).await;
                    }
                    return;
                }
            }
        }
    }

    /// The gap to leave to a backfill before sending `records`, when this
    /// is a live-first replica's live stream and it lags too far.
    fn split_gap(&self, records: &[Record]) -> Option<Range<u64>> {
        let (first, last) = (records.first()?, records.last()?);
        let after = match (self.stream, self.catch_up) {
            (Stream::Live, CatchUp::LiveFirst { after }) => Some(after),
            _ => None,
        };
        backfill::split_gap(
            after,
            // Cleared once the backfill's checkpoint is removed.
            self.state.backfill().is_some(),
            now_ms(),
            first.meta.receive_time_ms,
            &(first.seq..last.seq + 1),
            self.wal.durable_end(),
        )
    }

    /// Leaves `gap` to a backfill and moves the live stream to its end.
    async fn split(&mut self, gap: Range<u64>, reader: &mut WalReader) {
        tracing::info!(replica = %self.state.name, from = gap.start, to = gap.end,
            records = gap.end - gap.start,
            "lag above live_first_after: delivering new records at once, backfilling the gap");
        // Before the cursor moves: retention must keep the gap's segments.
        self.state.set_backfill(gap.clone());
        loop {
            let cp = self.checkpoints.clone();
            let name = self.state.name.clone();
            let g = gap.clone();
            match blocking(move || cp.split(&name, g)).await {
                Ok(()) => break,
                Err(e) => {
                    self.state.set_error(format!("checkpoint store: {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        metrics::counter!("walrelay_replica_backfills_total", "replica" => self.state.name.clone())
            .increment(1);
        // What was read past the batch lies inside the gap: the backfill
        // sends it. The delivery not checkpointed yet is below the gap.
        self.held = None;
        self.unflushed = None;
        self.state.set_delivered(gap.end);
        reader.seek(gap.end);
        self.start_backfill();
    }

    /// The backfill reached its end: its checkpoint is removed.
    async fn finish_backfill(&mut self, to: u64) {
        self.checkpoint(to).await;
        self.state.clear_backfill();
        tracing::info!(replica = %self.state.name, to, "backfill complete: the gap is closed");
    }

    /// Loads (or initialises) the checkpoint and re-sends an interrupted
    /// request on its own. Returns where reading starts.
    async fn startup(&mut self) -> Result<u64, crate::checkpoint::CheckpointError> {
        let cp = self.checkpoints.clone();
        let name = self.state.name.clone();
        let cursor = blocking(move || cp.cursor(&name)).await?;
        let extent = self.wal.extent();
        if let Stream::Backfill { to } = self.stream {
            // Finished (and removed) already: nothing left to send.
            let (from, inflight) = cursor.backfill.map_or((to, None), |b| (b.from, b.inflight));
            self.set_position(from);
            return Ok(self.resend_inflight(from, inflight).await);
        }
        let delivered = match cursor.delivered {
            Some(d) => d,
            None => {
                let start = match self.start_at {
                    StartAt::Head => extent.end_seq,
                    StartAt::Oldest => extent.first_seq,
                };
                tracing::info!(replica = %self.state.name, start, "new replica: starting position set");
                let cp = self.checkpoints.clone();
                let name = self.state.name.clone();
                blocking(move || cp.set(&name, start)).await?;
                start
            }
        };
        self.state.set_delivered(delivered);
        Ok(self.resend_inflight(delivered, cursor.inflight).await)
    }

    /// Re-sends an interrupted request on its own; returns where reading
    /// starts. The range is read in full first (a read error is retried,
    /// never taken for the end of the range): its checkpoint moves past
    /// records only once each was delivered, refused, or accounted as a gap.
    async fn resend_inflight(&mut self, delivered: u64, inflight: Option<Range<u64>>) -> u64 {
        let Some(range) = inflight.filter(|r| r.start >= delivered && r.end > r.start) else {
            return delivered;
        };
        tracing::info!(replica = %self.state.name, from = range.start, to = range.end,
            stream = stream_name(self.stream),
            "re-sending the request that was in flight when the relay stopped");
        let (records, gaps) = self.read_range(range.clone()).await;
        for g in &gaps {
            self.account_gap(g);
        }
        if !records.is_empty() {
            // With records missing it is no longer the request that was in
            // flight, and a refusal of the rest proves nothing.
            let resend = if gaps.iter().any(|g| g.to > g.from) {
                Resend::MaybeStored
            } else {
                Resend::Exact
            };
            self.deliver(records, resend).await;
        }
        self.checkpoint(range.end.max(self.position())).await;
        range.end
    }

    /// Reads exactly what the log holds of `range`: its records, and the
    /// gaps (damage, retention) inside it. Read errors are retried until
    /// the range can be read: an error is not the end of the range.
    async fn read_range(&self, range: Range<u64>) -> (Vec<Record>, Vec<crate::wal::Gap>) {
        loop {
            match read_range(&self.wal, range.clone()) {
                Ok(read) => return read,
                Err(e) => {
                    self.state.set_error(format!(
                        "reading the request in flight ({}..{}) from the log: {e}",
                        range.start, range.end
                    ));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Counts the records of a gap the reader reported at this stream's
    /// position, by cause. False when the gap lies behind the position
    /// (nothing of it is this stream's to skip): then nothing is counted
    /// and the position must not move.
    fn account_gap(&self, g: &crate::wal::Gap) -> bool {
        let position = self.position();
        if g.to <= position || g.to < g.from {
            tracing::error!(replica = %self.state.name, from = g.from, to = g.to, position,
                reason = %g.reason, "the log reported a gap behind this replica's position; ignored");
            return false;
        }
        let from = g.from.max(position);
        let records = g.to - from;
        tracing::warn!(replica = %self.state.name, from, to = g.to,
            reason = %g.reason, file = ?g.file, offset = ?g.offset,
            "records skipped: cannot be read from the log");
        if g.error_code == "retention" {
            let (samples, reason) = self.wal.dropped_in(from, g.to);
            match reason {
                Some(reason) => self.state.add_dropped(records, samples, reason),
                None => self.state.add_skipped(records, g.error_code),
            }
        } else {
            self.state.add_skipped(records, g.error_code);
        }
        true
    }

    /// Waits for at least one record (or a gap), then takes what is already
    /// durable up to the batch limits.
    async fn next_batch(&mut self, reader: &mut WalReader) -> Result<Batch, crate::wal::WalError> {
        let first = match self.held.take() {
            Some(item) => item,
            None => match reader.try_next()? {
                Some(item) => item,
                // Its whole range was durable at the split: a backfill
                // never waits for more.
                None if self.stream != Stream::Live => return Ok(Batch::End),
                None => {
                    // Idle: checkpoint what was delivered before waiting.
                    self.flush_delivered().await;
                    self.state.set_caught_up();
                    reader.next().await?
                }
            },
        };
        let end = match self.stream {
            Stream::Live => u64::MAX,
            Stream::Backfill { to } => to,
        };
        let mut records = match first {
            ReadItem::Gap(mut g) => {
                return Ok(match backfill::bound(g.from, g.to, end) {
                    backfill::Bound::Past => Batch::End,
                    backfill::Bound::ClipTo(to) => {
                        g.to = to;
                        Batch::Gap(g)
                    }
                    backfill::Bound::Inside => Batch::Gap(g),
                })
            }
            ReadItem::Record(r) if r.seq >= end => return Ok(Batch::End),
            ReadItem::Record(r) => vec![r],
        };
        let mut fill = BatchFill::new(&records[0]);
        let limits = self.current;
        let mut lingered = false;
        loop {
            while fill.has_room(limits) {
                match reader.try_next()? {
                    Some(ReadItem::Record(r)) => {
                        if r.seq >= end || !fill.take(&r, limits, self.protocol) {
                            self.held = Some(ReadItem::Record(r));
                            break;
                        }
                        records.push(r);
                    }
                    Some(gap) => {
                        self.held = Some(gap);
                        break;
                    }
                    None => break,
                }
            }
            // A small batch waits a moment for the next group commit: fewer,
            // larger requests cost the replica and the relay less per sample.
            if lingered
                || self.held.is_some()
                || self.stream != Stream::Live
                || fill.samples >= limits.max_samples / 2
                || fill.bytes >= limits.max_bytes / 2
            {
                break;
            }
            lingered = true;
            let _ = tokio::time::timeout(LINGER, reader.wait_for_more()).await;
        }
        Ok(Batch::Records(records))
    }

    /// Delivers `records` (in log order) and checkpoints past them: each is
    /// delivered, or refused on its own by the replica and counted (see
    /// [`policy`]). `resend` says what an earlier attempt may have done with
    /// them.
    async fn deliver(&mut self, records: Vec<Record>, resend: Resend) {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return;
        };
        // Batches are cut where the kind changes, but an interrupted request
        // re-sent after a restart was batched under the settings of then:
        // with the replica switched to 2.0 since, it can mix kinds. Its
        // parts are re-sent in order; a part is not the request that was in
        // flight.
        if let Some(cut) = kind_cut(self.protocol, &records) {
            let mut head = records;
            let tail = head.split_off(cut);
            Box::pin(self.deliver(head, resend.part())).await;
            Box::pin(self.deliver(tail, resend.part())).await;
            return;
        }
        let range = first.seq..last.seq + 1;
        if self.stream == Stream::Live {
            // lag_seconds is the live stream's: how stale the newest data is.
            self.state.set_pending_since(first.meta.receive_time_ms);
        }
        let samples: u64 = records.iter().map(|r| u64::from(r.meta.samples)).sum();
        let outcome = match self.send_range(&records, range.clone()).await {
            Ok(outcome) => outcome,
            Err(e) if records.len() == 1 => {
                tracing::error!(replica = %self.state.name, seq = range.start, error = %e,
                    "a record in the log cannot be turned into a request (it passed its \
                     checksum but does not decode); skipping it");
                self.state.add_skipped(1, "undecodable");
                self.checkpoint(range.end).await;
                return;
            }
            Err(_) => {
                // Find the record that cannot be built; send the others.
                for r in records {
                    Box::pin(self.deliver(vec![r], resend.part())).await;
                }
                return;
            }
        };
        match outcome {
            Outcome::Delivered { slow } => {
                // Answered, but only after the send timeout: smaller
                // requests from now on, so that none has to be given up.
                if slow {
                    self.shrink();
                } else {
                    self.grow();
                }
                // Checkpointed with the next request's range, or when idle.
                self.unflushed = Some(range.end);
                self.set_position(range.end);
            }
            Outcome::Refused { status, body, .. } if resend == Resend::Exact => {
                // The request that was in flight when the relay stopped,
                // refused whole: its earlier attempt was stored, and the
                // replica refuses samples older than what it holds.
                tracing::info!(replica = %self.state.name, from = range.start, to = range.end, status,
                    body = %body, "re-sent request refused: the replica already had it");
                self.state
                    .add_assumed_delivered(records.len() as u64, samples);
                self.checkpoint(range.end).await;
            }
            Outcome::Refused {
                status,
                body,
                ambiguous,
            } if records.len() == 1 => {
                if ambiguous || resend == Resend::MaybeStored {
                    tracing::info!(replica = %self.state.name, seq = range.start, status, body = %body,
                        "record refused after an attempt that may have stored it: most likely \
                         the replica already had it");
                    self.state.add_assumed_delivered(1, samples);
                } else {
                    tracing::warn!(replica = %self.state.name, seq = range.start, status, body = %body,
                        "replica refused the record's data; skipping it");
                    self.state.add_rejected(1, samples);
                }
                self.checkpoint(range.end).await;
            }
            Outcome::Refused {
                status, ambiguous, ..
            } => {
                tracing::info!(replica = %self.state.name, from = range.start, to = range.end, status,
                    "replica refused a request of several records; re-sending them one by one");
                let each = if ambiguous {
                    Resend::MaybeStored
                } else {
                    resend.part()
                };
                for r in records {
                    Box::pin(self.deliver(vec![r], each)).await;
                }
            }
            Outcome::TooLarge { body } if records.len() == 1 => {
                tracing::warn!(replica = %self.state.name, seq = range.start, body = %body,
                    "replica refused a single record as too large (413); skipping it");
                self.state.add_rejected(1, samples);
                self.checkpoint(range.end).await;
            }
            Outcome::TooLarge { .. } => {
                tracing::info!(replica = %self.state.name, from = range.start, to = range.end,
                    "replica refused the request as too large (413); splitting it");
                self.shrink();
                self.split_and_deliver(records, "too_large", resend.part())
                    .await;
            }
            Outcome::Blocked { .. } => {
                // Shippers set no limit on blocked attempts, so this is not
                // returned to them; were it, the records are sent again.
                Box::pin(self.deliver(records, resend)).await;
            }
            Outcome::TooSlow => {
                // Smaller requests may get through where this one times out.
                // Its attempts may have been stored.
                tracing::info!(replica = %self.state.name, from = range.start, to = range.end,
                    "request timed out; splitting it and sending smaller requests");
                self.shrink();
                self.split_and_deliver(records, "timeout", Resend::MaybeStored)
                    .await;
            }
        }
    }

    /// Delivers the two halves of `records` in order.
    async fn split_and_deliver(
        &mut self,
        mut records: Vec<Record>,
        reason: &'static str,
        resend: Resend,
    ) {
        metrics::counter!("walrelay_replica_splits_total", "replica" => self.state.name.clone(), "reason" => reason)
            .increment(1);
        let second = records.split_off(records.len() / 2);
        Box::pin(self.deliver(records, resend)).await;
        Box::pin(self.deliver(second, resend)).await;
    }

    /// Checkpoints the range as in flight, then sends it until it is
    /// delivered, refused or given back (see [`Outcome`]).
    ///
    /// # Errors
    /// No request can be built from the records (a payload that passed its
    /// checksum but does not decode); nothing was sent.
    async fn send_range(
        &mut self,
        records: &[Record],
        range: Range<u64>,
    ) -> Result<Outcome, String> {
        let built = self
            .builder
            .build(records, self.protocol)
            .map_err(|e| e.to_string())?;
        let samples: u64 = records.iter().map(|r| u64::from(r.meta.samples)).sum();
        let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
        // Waited out before the in-flight range is checkpointed, so that
        // the range marked in flight is one that is really being sent.
        self.pace(samples, bytes as u64).await;
        let body = Body {
            bytes: built.body,
            protocol: built.protocol,
            samples,
            sent: built.sent.map(|s| WrittenCounts {
                samples: s.samples,
                histograms: s.histograms,
                exemplars: s.exemplars,
            }),
        };
        let cp = self.checkpoints.clone();
        let name = self.state.name.clone();
        let r = range.clone();
        let previous = self.unflushed;
        let stream = self.stream;
        while let Err(e) = blocking({
            let cp = cp.clone();
            let name = name.clone();
            let r = r.clone();
            move || match previous {
                Some(delivered) => cp.complete_and_begin_on(&name, stream, delivered, r),
                None => cp.begin_send_on(&name, stream, r),
            }
        })
        .await
        {
            self.state.set_error(format!("checkpoint store: {e}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.unflushed = None;
        self.state.set_phase("sending");
        let splittable = records.len() > 1;
        self.state.set_in_flight(Some((range.start, range.end)));
        let outcome = self
            .sender
            .send_with_retries(&self.state, body, splittable)
            .await;
        self.state.set_in_flight(None);
        if matches!(outcome, Outcome::Delivered { .. }) {
            self.state.add_sent(records.len() as u64, samples);
            // Counted once delivered: a request that is retried or split
            // would otherwise count its losses more than once.
            self.state
                .add_translation_dropped(built.dropped.created_timestamps, built.dropped.metadata);
        }
        Ok(outcome)
    }

    /// Waits until the replica's rate limits allow a request of `samples`
    /// and `bytes` (decoded), and counts the wait.
    async fn pace(&mut self, samples: u64, bytes: u64) {
        let started = tokio::time::Instant::now();
        let wait = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(samples, bytes, started);
        if wait.is_zero() {
            return;
        }
        self.state.set_phase("rate-limited");
        tokio::time::sleep(wait).await;
        self.state.add_rate_limited(started.elapsed());
    }

    /// Writes a delivery that was not checkpointed yet.
    async fn flush_delivered(&mut self) {
        if let Some(delivered) = self.unflushed {
            self.checkpoint(delivered).await;
        }
    }

    /// Checkpoints that this stream has everything below `delivered`.
    /// Never moves the position backwards: a cursor behind what was
    /// delivered would re-send, a cursor moved back past a checkpoint the
    /// store already holds could never be explained.
    async fn checkpoint(&mut self, delivered: u64) {
        let position = self.position();
        if delivered < position {
            tracing::error!(replica = %self.state.name, stream = stream_name(self.stream),
                delivered, position, "refusing to move a cursor backwards");
            return;
        }
        self.unflushed = None;
        loop {
            let cp = self.checkpoints.clone();
            let name = self.state.name.clone();
            let stream = self.stream;
            match blocking(move || cp.complete_on(&name, stream, delivered)).await {
                Ok(()) => break,
                Err(e) => {
                    self.state.set_error(format!("checkpoint store: {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.set_position(delivered);
    }
}

/// Spawns a backfill shipper. A plain function, not part of `run`, so that
/// the task's future type does not contain itself.
fn spawn_backfill(shipper: Shipper) -> JoinHandle<()> {
    let (shutdown, drain) = (shipper.shutdown.clone(), shipper.drain.clone());
    tokio::spawn(shipper.run(shutdown, drain))
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Live => "live",
        Stream::Backfill { .. } => "backfill",
    }
}

/// Where `records` must be split so that no request to a replica speaking
/// `protocol` mixes kinds ([`payload::same_request`]); `None` when they can
/// go together.
fn kind_cut(protocol: ReplicaProtocol, records: &[Record]) -> Option<usize> {
    let first = records.first()?.meta.kind;
    records
        .iter()
        .position(|r| !payload::same_request(protocol, first, r.meta.kind))
}

/// What an earlier attempt may have done with the records being delivered:
/// decides what a data refusal of them means ([`policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// Never sent: a refusal is about their data.
    No,
    /// Part of a request an earlier attempt of which may have been stored:
    /// a refusal of a single record means it most likely was; several are
    /// re-sent one by one.
    MaybeStored,
    /// Exactly the request that was in flight when the relay stopped: a
    /// refusal means it was stored.
    Exact,
}

impl Resend {
    /// What a part of these records is: a part of the request in flight
    /// is not that request.
    pub(crate) fn part(self) -> Resend {
        match self {
            Resend::Exact => Resend::MaybeStored,
            other => other,
        }
    }
}

/// Reads the records of `range` still in the log, and the gaps inside it.
///
/// # Errors
/// An I/O error reading the log (the caller retries).
fn read_range(
    wal: &Wal,
    range: Range<u64>,
) -> Result<(Vec<Record>, Vec<crate::wal::Gap>), crate::wal::WalError> {
    let mut reader = wal.reader(range.start);
    let (mut records, mut gaps) = (Vec::new(), Vec::new());
    while let Some(item) = reader.try_next()? {
        match item {
            ReadItem::Record(r) if r.seq < range.end => records.push(r),
            ReadItem::Gap(mut g) if g.from < range.end => {
                g.to = g.to.min(range.end);
                gaps.push(g);
            }
            _ => break,
        }
    }
    // The log ends inside the range: what is missing there was never
    // durable (or was cut as a torn tail).
    let read_to = records
        .last()
        .map(|r| r.seq + 1)
        .into_iter()
        .chain(gaps.iter().map(|g| g.to))
        .max()
        .unwrap_or(range.start);
    if read_to < range.end {
        gaps.push(crate::wal::Gap {
            from: read_to,
            to: range.end,
            file: None,
            offset: None,
            reason: "records past the end of the log".into(),
            error_code: "not_in_log",
        });
    }
    Ok((records, gaps))
}

enum Batch {
    Records(Vec<Record>),
    Gap(crate::wal::Gap),
    /// A backfill reached the end of its range.
    End,
}

/// Runs blocking checkpoint I/O off the async workers.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: Send + 'static + From<crate::checkpoint::CheckpointError>,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        // The closure panicked: treat it as a store failure and retry.
        Err(e) => Err(E::from(crate::checkpoint::CheckpointError::Panicked(
            e.to_string(),
        ))),
    }
}

#[cfg(test)]
mod delivery_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use bytes::Bytes;
    use wal_format::{PayloadEncoding, PayloadKind, RecordMeta};

    fn record(seq: u64, kind: PayloadKind, samples: u32) -> Record {
        Record {
            seq,
            meta: RecordMeta {
                receive_time_ms: 0,
                min_sample_ts: 0,
                max_sample_ts: 0,
                samples,
                kind,
                encoding: PayloadEncoding::Identity,
            },
            payload: Bytes::from(vec![0u8; 10]),
        }
    }

    /// The batches `next_batch` makes of `records` when all are durable:
    /// the same rule, without the log.
    fn batches(
        records: &[Record],
        limits: BatchLimits,
        protocol: ReplicaProtocol,
    ) -> Vec<Vec<u64>> {
        let mut out: Vec<Vec<u64>> = Vec::new();
        let mut fill: Option<BatchFill> = None;
        for r in records {
            let joined = fill
                .as_mut()
                .is_some_and(|f| f.has_room(limits) && f.take(r, limits, protocol));
            match out.last_mut() {
                Some(b) if joined => b.push(r.seq),
                _ => {
                    fill = Some(BatchFill::new(r));
                    out.push(vec![r.seq]);
                }
            }
        }
        out
    }

    const WIDE: BatchLimits = BatchLimits {
        max_samples: 1000,
        max_bytes: 1 << 20,
    };

    #[test]
    fn a_batch_to_a_2_0_replica_is_cut_where_the_kind_changes() {
        use PayloadKind::{RemoteWriteV1 as V1, RemoteWriteV2 as V2};
        let kinds = [V1, V1, V2, V2, V2, V1, V2];
        let records: Vec<Record> = kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| record(i as u64, k, 1))
            .collect();
        let got = batches(&records, WIDE, ReplicaProtocol::V2);
        assert_eq!(got, vec![vec![0, 1], vec![2, 3, 4], vec![5], vec![6]]);
        for b in &got {
            let k = records[b[0] as usize].meta.kind;
            assert!(
                b.iter().all(|&s| records[s as usize].meta.kind == k),
                "{got:?}"
            );
        }
    }

    #[test]
    fn a_batch_to_a_1_0_replica_mixes_kinds_since_all_become_1_0() {
        use PayloadKind::{RemoteWriteV1 as V1, RemoteWriteV2 as V2};
        let records: Vec<Record> = [V1, V2, V1, V2]
            .iter()
            .enumerate()
            .map(|(i, &k)| record(i as u64, k, 1))
            .collect();
        assert_eq!(
            batches(&records, WIDE, ReplicaProtocol::V1),
            vec![vec![0, 1, 2, 3]]
        );
    }

    #[test]
    fn a_mixed_resend_to_a_2_0_replica_is_cut_at_each_kind_change() {
        use PayloadKind::{RemoteWriteV1 as V1, RemoteWriteV2 as V2};
        let records: Vec<Record> = [V1, V1, V2, V1]
            .iter()
            .enumerate()
            .map(|(i, &k)| record(i as u64, k, 1))
            .collect();
        assert_eq!(kind_cut(ReplicaProtocol::V2, &records), Some(2));
        assert_eq!(kind_cut(ReplicaProtocol::V2, &records[2..]), Some(1));
        assert_eq!(kind_cut(ReplicaProtocol::V2, &records[3..]), None);
        assert_eq!(kind_cut(ReplicaProtocol::V1, &records), None);
        assert_eq!(kind_cut(ReplicaProtocol::V2, &[]), None);
    }

    #[test]
    fn the_kind_rule_comes_on_top_of_the_size_limits() {
        let small = BatchLimits {
            max_samples: 5,
            max_bytes: 1 << 20,
        };
        let records: Vec<Record> = (0..6)
            .map(|i| record(i, PayloadKind::RemoteWriteV2, 2))
            .collect();
        assert_eq!(
            batches(&records, small, ReplicaProtocol::V2),
            vec![vec![0, 1], vec![2, 3], vec![4, 5]]
        );
    }
}
