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
//! [`Checkpoints::complete_and_begin`]); on its own when the shipper has
//! been idle for [`IDLE_CHECKPOINT`] (a crash before re-sends that one
//! delivered request, as a crash during its send would) or stops.
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
//! A replica far away gets more than one request in flight through delivery
//! shards ([`shards`]): each series always through the same shard, each
//! shard a shipper of its own over the records cut to its series
//! ([`cut`]), with its own checkpoint ([`Stream::Shard`]), their number
//! fixed or sized by the round trip and the backlog ([`adapt`]). With one
//! shard, the shipper reads the log itself, as described above.
//!
//! A replica set to live-first catch-up ([`backfill`]) may run two shippers:
//! the live stream, which owns the replica's cursor, and a backfill of the
//! gap it left at a split, spawned by the live one. They share the replica's
//! state, HTTP client and rate limiter; each keeps its own checkpoint
//! ([`Stream`]) and its own single request in flight.

pub mod adapt;
pub mod backfill;
pub mod cut;
pub(crate) mod delivery;
pub mod payload;
pub mod policy;
pub mod rate;
mod send;
pub mod shards;
mod state;

use std::ops::{ControlFlow, Range};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wal_format::Record;

use crate::checkpoint::{CheckpointError, Checkpoints, Cursor, Stream};
use crate::types::{now_ms, CatchUp, ReplicaProtocol, Shards, StartAt};
use crate::wal::{Gap, ReadItem, Wal, WalReader};
use delivery::{BatchFill, Done, Ledger, Link, RangeRead, Request, Resend};
use shards::{Next, Parts, Sizing, Source};

pub use delivery::BatchLimits;
pub use rate::RateLimits;
pub use send::{
    parse_written, Body, Outcome, SendObserver, Sender, SenderError, SenderOptions, WrittenCounts,
};
pub use state::{BackfillStatus, ReplicaState, ReplicaStatus, ShardStatus, TranslationDropped};

/// See the module documentation.
pub struct Shipper {
    state: Arc<ReplicaState>,
    wal: Wal,
    checkpoints: Checkpoints,
    /// The replica's client, protocol (it decides batching and the request
    /// format) and body buffers; its sender reports to `state`.
    link: Link,
    limits: BatchLimits,
    /// How long a batch that is not full waits for more records.
    linger: Duration,
    start_at: StartAt,
    /// An item read past the end of the current batch, kept for the next.
    held: Option<ReadItem>,
    /// The batch limits in force: the configured ones, halved each time a
    /// request is too slow for the replica to answer within the timeout, and
    /// grown back as requests succeed.
    current: BatchLimits,
    /// Everything below this was delivered, but the checkpoint store does
    /// not have it yet: it is written with the next request's in-flight
    /// range (one flush for both), or on its own when the shipper has been
    /// idle for [`IDLE_CHECKPOINT`] or stops. Set through
    /// [`Shipper::set_unflushed`], which the status counts.
    unflushed: Option<Unflushed>,
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
    /// The live stream's shard count and what sizes it ([`shards`]).
    sizing: Option<Sizing>,
    /// The live stream's shards while they run, awaited when it stops.
    shard_tasks: Vec<JoinHandle<()>>,
    /// A shard's queue of parts, which it reads instead of the log.
    parts: Option<Parts>,
    /// A shard tells its dispatcher here where it reads on, once its
    /// request in flight is re-sent.
    ready: Option<oneshot::Sender<u64>>,
}

/// How long a batch that is not full waits for more records, unless
/// set (`--batch-linger`). Every request costs a checkpoint write (a sled
/// flush and an fdatasync), an HTTP exchange and a body of its own; a sender
/// whose requests come one at a time (a Prometheus queue shard, ~200 a
/// second of 500 samples each) made a caught-up replica's shipper send
/// nearly one request per group commit at 5 ms. vmagent waits up to 1 s
/// (`-remoteWrite.flushInterval`), Prometheus up to 5 s
/// (`batch_send_deadline`).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(100);

/// How long an idle stream keeps a delivery's completion unwritten, in case
/// the next request comes and carries it (one checkpoint flush instead of
/// two). A sender whose requests come one at a time (a Prometheus queue
/// shard: ~200 a second, each its own group commit) leaves the shipper idle
/// between nearly every two of them; without the wait each delivery cost a
/// flush of its own. A crash within it re-sends the delivered request: its
/// range is stored as in flight, and the restart re-sends that exact range
/// on its own, as after any crash during a send.
const IDLE_CHECKPOINT: Duration = Duration::from_millis(100);

/// A delivery the checkpoint store does not have yet.
#[derive(Debug, Clone, Copy)]
struct Unflushed {
    /// Everything below it was delivered.
    delivered: u64,
    /// The position the store still has, held back from retention in the
    /// replica's state until the delivery is written.
    held_from: u64,
}

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
        let observer: Arc<dyn SendObserver> = state.clone();
        Self {
            state,
            wal,
            checkpoints,
            link: Link::new(sender, protocol, observer),
            limits,
            linger: DEFAULT_LINGER,
            start_at,
            held: None,
            current: limits,
            unflushed: None,
            limiter: Arc::new(Mutex::new(rate::Limiter::new(rate))),
            stream: Stream::Live,
            catch_up: CatchUp::InOrder,
            backfill: None,
            shutdown: CancellationToken::new(),
            drain: CancellationToken::new(),
            sizing: Some(Sizing::new(Shards::Fixed(1), Duration::from_secs(10))),
            shard_tasks: Vec::new(),
            parts: None,
            ready: None,
        }
    }

    /// Sets the replica's catch-up mode (in order unless set).
    pub fn with_catch_up(mut self, catch_up: CatchUp) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// Sets how long a batch that is not full waits for more records.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets how many shards deliver the live stream (one unless set), an
    /// adaptive count re-evaluated every `interval`.
    pub fn with_shards(mut self, shards: Shards, interval: Duration) -> Self {
        metrics::gauge!("walrelay_replica_shards_max", "replica" => self.state.name.clone())
            .set(f64::from(shards.bounds().1));
        self.sizing = Some(Sizing::new(shards, interval));
        self
    }

    /// A stream of this replica's sharing its state, client (a link of its
    /// own: its own body buffers) and rate limiter, for `stream`.
    fn sibling(&self, stream: Stream) -> Shipper {
        Shipper {
            state: Arc::clone(&self.state),
            wal: self.wal.clone(),
            checkpoints: self.checkpoints.clone(),
            link: Link::new(
                self.link.sender.clone(),
                self.link.protocol,
                Arc::clone(&self.link.observer),
            ),
            limits: self.limits,
            linger: self.linger,
            start_at: self.start_at,
            held: None,
            current: self.limits,
            unflushed: None,
            limiter: Arc::clone(&self.limiter),
            stream,
            catch_up: self.catch_up,
            backfill: None,
            shutdown: self.shutdown.clone(),
            drain: self.drain.clone(),
            sizing: None,
            shard_tasks: Vec::new(),
            parts: None,
            ready: None,
        }
    }

    /// Shard `index` of `of` of the live stream, reading `parts`.
    fn shard_shipper(
        &self,
        index: u32,
        of: u32,
        parts: Parts,
        ready: oneshot::Sender<u64>,
    ) -> Shipper {
        let mut shard = self.sibling(Stream::Shard { index, of });
        shard.parts = Some(parts);
        shard.ready = Some(ready);
        shard.limits = shards::batch_limits(self.limits, of);
        shard.current = shard.limits;
        shard
    }

    /// A shipper for the backfill of everything below `to` from the
    /// replica's stored backfill position.
    fn backfill_shipper(&self, to: u64) -> Shipper {
        self.sibling(Stream::Backfill { to })
    }

    /// Starts the backfill of the replica's backfill range (in the state).
    fn start_backfill(&mut self) {
        let Some(range) = self.state.backfill() else {
            return;
        };
        if self.backfill.as_ref().is_some_and(|b| !b.is_finished()) {
            return;
        }
        if self.catch_up == CatchUp::InOrder {
            tracing::warn!(replica = %self.state.name, from = range.start, to = range.end,
                "replica is set to in-order but has a live-first backfill pending: \
                 finishing it (a replica that refuses older samples rejects them, counted)");
        }
        tracing::info!(replica = %self.state.name, from = range.start, to = range.end,
            remaining_records = range.end - range.start, "backfill started");
        self.backfill = Some(spawn_stream(self.backfill_shipper(range.end)));
    }

    /// Where this stream is: everything below is delivered (for the
    /// backfill, of its range).
    fn position(&self) -> u64 {
        match self.stream {
            Stream::Live => self.state.delivered(),
            Stream::Backfill { to } => self.state.backfill().map_or(to, |b| b.start),
            Stream::Shard { index, .. } => self.state.shard_delivered(index),
        }
    }

    /// The records of this stream's request being sent, in the status.
    fn set_in_flight(&self, range: Option<(u64, u64)>) {
        match self.stream {
            Stream::Shard { index, .. } => self.state.set_shard_in_flight(index, range),
            _ => self.state.set_in_flight(range),
        }
    }

    /// Sets [`Shipper::unflushed`], counting the streams that hold a
    /// delivery unwritten for the status.
    ///
    /// Called before the position moves past the delivery: while it is
    /// unwritten, the store still has the position from before it (and the
    /// delivered request as in flight), which a restart re-sends from, so
    /// the replica's state holds that position back from retention.
    fn set_unflushed(&mut self, delivered: Option<u64>) {
        self.unflushed = match (self.unflushed, delivered) {
            (None, Some(delivered)) => {
                let held_from = self.position();
                self.state.hold(held_from);
                Some(Unflushed {
                    delivered,
                    held_from,
                })
            }
            (Some(u), Some(delivered)) => Some(Unflushed { delivered, ..u }),
            (Some(u), None) => {
                self.state.release(u.held_from);
                None
            }
            (None, None) => None,
        };
    }

    fn set_position(&self, seq: u64) {
        match self.stream {
            Stream::Live => self.state.set_delivered(seq),
            Stream::Backfill { .. } => self.state.set_backfill_from(seq),
            Stream::Shard { index, .. } => self.state.set_shard_delivered(index, seq),
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
        if let Some(Unflushed { delivered, .. }) = self.unflushed {
            let cp = self.checkpoints.clone();
            let name = self.state.name.clone();
            let stream = self.stream;
            if let Err(e) = blocking(move || cp.complete_on(&name, stream, delivered)).await {
                tracing::warn!(replica = %self.state.name, error = %e,
                    "cannot checkpoint the last delivery; it will be re-sent at the next start");
            }
            self.set_unflushed(None);
        }
        for shard in std::mem::take(&mut self.shard_tasks) {
            let _ = shard.await;
        }
        if let Some(backfill) = self.backfill.take() {
            let _ = backfill.await;
        }
        if self.stream == Stream::Live {
            self.state.set_phase("stopped");
        }
    }

    async fn ship(&mut self, drain: &CancellationToken) {
        if self.stream != Stream::Live {
            let cursor = self.load_cursor().await;
            let start = self.startup(&cursor).await;
            if let Some(ready) = self.ready.take() {
                // The dispatcher may be gone (a drain): nothing to tell.
                let _ = ready.send(start);
            }
            self.ship_from(start, drain).await;
            return;
        }
        loop {
            let cursor = self.load_cursor().await;
            self.start_backfill();
            let next = if cursor.shard_count() > 1 {
                shards::run(self, &cursor, drain).await
            } else {
                self.state.set_shards(1, cursor.delivered.unwrap_or(0));
                let start = self.startup(&cursor).await;
                if let Some(mut sizing) = self.sizing.take() {
                    // Measured from now: not the log's whole history.
                    sizing.reset(self);
                    self.sizing = Some(sizing);
                }
                self.ship_from(start, drain).await
            };
            match next {
                Next::Stop => return,
                Next::Reshard { at, to, split } => self.reshard(at, to, split).await,
            }
        }
    }

    /// The replica's stored cursor, a new replica's placed first; store
    /// errors are retried.
    async fn load_cursor(&mut self) -> Cursor {
        loop {
            match self.try_load_cursor().await {
                Ok(c) => return c,
                Err(e) => {
                    self.state.set_error(format!("checkpoint store: {e}"));
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    async fn try_load_cursor(&self) -> Result<Cursor, CheckpointError> {
        let cp = self.checkpoints.clone();
        let name = self.state.name.clone();
        let mut cursor = blocking(move || cp.cursor(&name)).await?;
        if self.stream == Stream::Live && cursor.delivered.is_none() {
            let (cp, wal) = (self.checkpoints.clone(), self.wal.clone());
            let (name, start_at) = (self.state.name.clone(), self.start_at);
            cursor.delivered =
                Some(blocking(move || place_new_replica(&cp, &wal, &name, start_at)).await?);
        }
        Ok(cursor)
    }

    /// Writes a barrier's change of the live stream: `to` shards from `at`,
    /// or from the end of `split`, whose gap a backfill delivers.
    async fn reshard(&mut self, at: u64, to: u32, split: Option<Range<u64>>) {
        if let Some(gap) = &split {
            // Before the cursor moves: retention must keep the gap's segments.
            self.state.set_backfill(gap.clone());
        }
        loop {
            let cp = self.checkpoints.clone();
            let name = self.state.name.clone();
            let gap = split.clone();
            match blocking(move || cp.reshard(&name, at, to, gap)).await {
                Ok(()) => break,
                Err(e) => {
                    self.state.set_error(format!("checkpoint store: {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let name = self.state.name.clone();
        match &split {
            Some(gap) => {
                metrics::counter!("walrelay_replica_backfills_total", "replica" => name)
                    .increment(1);
                self.state.set_shards(to, gap.end);
            }
            None => {
                metrics::counter!("walrelay_replica_reshards_total", "replica" => name)
                    .increment(1);
                self.state.set_shards(to, at);
                tracing::info!(replica = %self.state.name, shards = to, at, "shards changed");
            }
        }
    }

    /// Ships from `start` (a shard: from its queue) until drained, or (the
    /// live stream) until its shard count should change.
    async fn ship_from(&mut self, start: u64, drain: &CancellationToken) -> Next {
        let mut reader = self.wal.reader(start);
        let mut parts = self.parts.take();
        loop {
            if drain.is_cancelled() {
                return Next::Stop;
            }
            if let Stream::Backfill { to } = self.stream {
                if self.position() >= to {
                    self.finish_backfill(to).await;
                    return Next::Stop;
                }
            } else if self.stream == Stream::Live {
                self.state.set_phase("idle");
                if let Some(next) = self.want_shards().await {
                    return next;
                }
            }
            let mut source = match parts.as_mut() {
                Some(p) => Source::Parts(p),
                None => Source::Log(&mut reader),
            };
            // Waiting for records is where a drain usually finds the
            // shipper; what was read and not sent is read again by the
            // next shipper, from the checkpoint.
            let next = tokio::select! {
                next = self.next_batch(&mut source) => next,
                () = drain.cancelled() => return Next::Stop,
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
                    if let Some(sizing) = self.sizing.as_mut() {
                        // The samples per record the adaptive count needs
                        // (the dispatcher counts them with shards): without
                        // them one shard is always "enough".
                        let samples = records.iter().map(|r| u64::from(r.meta.samples)).sum();
                        sizing.read(records.len() as u64, samples);
                    }
                    if let Stream::Shard { .. } = self.stream {
                        self.deliver_parts(records).await;
                    } else {
                        delivery::deliver(self, records, Resend::No).await;
                    }
                }
                Batch::End => {
                    // A backfill ends when the log holds no more of its
                    // range; a shard when its queue is closed.
                    if let Stream::Backfill { to } = self.stream {
                        let missing = to.saturating_sub(self.position());
                        if missing > 0 {
                            tracing::error!(replica = %self.state.name, from = self.position(), to,
                                "backfill range no longer in the log; counted as skipped");
                            self.state.add_skipped(missing, "not_in_log");
                        }
                        self.finish_backfill(to).await;
                    }
                    return Next::Stop;
                }
            }
        }
    }

    /// The live stream's shard count should change now (it has one): its
    /// delivery is checkpointed first, so that the barrier is its position.
    async fn want_shards(&mut self) -> Option<Next> {
        let mut sizing = self.sizing.take()?;
        let want = sizing.wanted(self, 1);
        self.sizing = Some(sizing);
        if want <= 1 {
            return None;
        }
        self.flush_delivered().await;
        // What was read ahead is read again by the shards.
        self.held = None;
        tracing::info!(replica = %self.state.name, from = 1, to = want, at = self.position(),
            "changing the number of shards");
        Some(Next::Reshard {
            at: self.position(),
            to: want,
            split: None,
        })
    }

    /// A shard's batch of parts: the empty ones are only passed (nothing of
    /// the shard's series is in them), the others delivered.
    async fn deliver_parts(&mut self, parts: Vec<Record>) {
        let Some(end) = parts.last().map(|p| p.seq + 1) else {
            return;
        };
        let parts: Vec<Record> = parts.into_iter().filter(|p| !cut::is_empty(p)).collect();
        if parts.is_empty() {
            // Nothing of this shard: its position is written now, as a
            // delivery's would be with the next request, which may never
            // come (a shard with no series of its own). Left unwritten, a
            // restart would read from far behind, and find there segments
            // that retention deleted meanwhile.
            self.checkpoint(end.max(self.position())).await;
            return;
        }
        delivery::deliver(self, parts, Resend::No).await;
        if end > self.position() {
            self.set_unflushed(Some(end));
            self.set_position(end);
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
        self.set_unflushed(None);
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

    /// Takes this stream's position from `cursor` and re-sends its
    /// interrupted request on its own. Returns where reading starts.
    async fn startup(&mut self, cursor: &Cursor) -> u64 {
        let (from, inflight) = match self.stream {
            // Finished (and removed) already: nothing left to send.
            Stream::Backfill { to } => cursor
                .backfill
                .as_ref()
                .map_or((to, None), |b| (b.from, b.inflight.clone())),
            Stream::Live => (cursor.delivered.unwrap_or(0), cursor.inflight.clone()),
            Stream::Shard { index, .. } => match cursor.shards.get(index as usize) {
                Some(s) => (s.delivered, s.inflight.clone()),
                None => (cursor.delivered.unwrap_or(0), None),
            },
        };
        self.set_position(from);
        self.resend_inflight(from, inflight).await
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
        let read = self.read_range(range.clone()).await;
        for g in &read.gaps {
            self.account_gap(g);
        }
        let resend = read.resend();
        let records = match self.stream {
            // The same records cut with the same number of shards: the
            // request this shard had in flight.
            Stream::Shard { index, of } => cut::parts_of(read.records, index, of),
            _ => read.records,
        };
        delivery::deliver(self, records, resend).await;
        self.checkpoint(range.end.max(self.position())).await;
        range.end
    }

    /// Reads exactly what the log holds of `range`: its records, and the
    /// gaps (damage, retention) inside it. Read errors are retried until
    /// the range can be read: an error is not the end of the range.
    async fn read_range(&self, range: Range<u64>) -> RangeRead {
        loop {
            match delivery::read_range(&self.wal, range.clone()) {
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
    fn account_gap(&self, g: &Gap) -> bool {
        let position = self.position();
        if g.to <= position || g.to < g.from {
            tracing::error!(replica = %self.state.name, from = g.from, to = g.to, position,
                reason = %g.reason, "the log reported a gap behind this replica's position; ignored");
            return false;
        }
        if let Stream::Shard { .. } = self.stream {
            // Counted once, by the dispatcher that read it.
            return true;
        }
        self.count_gap(g, position);
        true
    }

    /// Counts the records of gap `g` from `position` on, by cause.
    fn count_gap(&self, g: &Gap, position: u64) {
        if g.to <= position {
            return;
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
    }

    /// Waits for at least one record (or a gap), then takes what is already
    /// durable up to the batch limits.
    async fn next_batch(&mut self, reader: &mut Source<'_>) -> Result<Batch, crate::wal::WalError> {
        let first = match self.held.take() {
            Some(item) => item,
            None => match reader.try_next()? {
                Some(item) => item,
                // Its whole range was durable at the split: a backfill
                // never waits for more.
                None if matches!(self.stream, Stream::Backfill { .. }) => return Ok(Batch::End),
                None => {
                    match self.stream {
                        Stream::Shard { index, .. } => self.state.set_shard_pending_since(index, 0),
                        _ => self.state.set_caught_up(),
                    }
                    // Idle: what was delivered rides on the next request if
                    // one comes soon, and is checkpointed on its own before
                    // a longer wait.
                    let soon = if self.unflushed.is_some() {
                        let _ = tokio::time::timeout(IDLE_CHECKPOINT, reader.wait_for_more()).await;
                        reader.try_next()?
                    } else {
                        None
                    };
                    match soon {
                        Some(item) => item,
                        None => {
                            self.flush_delivered().await;
                            match reader.next().await? {
                                Some(item) => item,
                                None => return Ok(Batch::End),
                            }
                        }
                    }
                }
            },
        };
        let end = match self.stream {
            Stream::Live | Stream::Shard { .. } => u64::MAX,
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
        let linger_until = tokio::time::Instant::now() + self.linger;
        let mut waited = false;
        loop {
            let taken = records.len();
            while fill.has_room(limits) {
                match reader.try_next()? {
                    Some(ReadItem::Record(r)) => {
                        if r.seq >= end || !fill.take(&r, limits, self.link.protocol) {
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
            // A batch that is not full waits for more group commits, up to
            // `linger` after its first record was read: fewer, larger
            // requests cost the replica and the relay less per sample (each
            // request is a checkpoint write and an HTTP exchange). It goes
            // as soon as a record does not fit (`held`). Waiting only while
            // under half the limits, as before, sent about 1.5 times as
            // many requests under load.
            if self.held.is_some()
                || matches!(self.stream, Stream::Backfill { .. })
                || !fill.has_room(limits)
                // A wait that brought nothing readable (a source that
                // does not wait, such as a shard's queue at a barrier)
                // would only spin.
                || waited && records.len() == taken
                || tokio::time::Instant::now() >= linger_until
            {
                break;
            }
            waited = true;
            if tokio::time::timeout_at(linger_until, reader.wait_for_more())
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(Batch::Records(records))
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
        if let Some(Unflushed { delivered, .. }) = self.unflushed {
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
        // Only once written: the status says nothing is pending when the
        // store has it (what a test waits for before a SIGKILL).
        self.set_unflushed(None);
        self.set_position(delivered);
    }
}

/// A shipper's deliveries: each request's range checkpointed before it is
/// sent (with the previous delivery, while requests keep coming), the
/// stream's position moved past what is done, the replica's status and
/// metrics counted.
impl Ledger for Shipper {
    fn name(&self) -> &str {
        &self.state.name
    }

    fn link(&mut self) -> &mut Link {
        &mut self.link
    }

    async fn begin(&mut self, request: &Request) -> ControlFlow<()> {
        match self.stream {
            // lag_seconds is the live stream's: how stale the newest data is.
            Stream::Live => self.state.set_pending_since(request.first_received_ms),
            Stream::Shard { index, .. } => self
                .state
                .set_shard_pending_since(index, request.first_received_ms),
            Stream::Backfill { .. } => {}
        }
        self.pace(request.samples, request.bytes).await;
        let cp = self.checkpoints.clone();
        let name = self.state.name.clone();
        let range = request.range.clone();
        let previous = self.unflushed.map(|u| u.delivered);
        let stream = self.stream;
        while let Err(e) = blocking({
            let (cp, name, range) = (cp.clone(), name.clone(), range.clone());
            move || match previous {
                Some(delivered) => cp.complete_and_begin_on(&name, stream, delivered, range),
                None => cp.begin_send_on(&name, stream, range),
            }
        })
        .await
        {
            self.state.set_error(format!("checkpoint store: {e}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.set_unflushed(None);
        self.state.set_phase("sending");
        self.set_in_flight(Some((range.start, range.end)));
        ControlFlow::Continue(())
    }

    fn end(&mut self) {
        self.set_in_flight(None);
    }

    async fn done(&mut self, request: &Request, how: Done) {
        let (records, samples, end) = (request.records, request.samples, request.range.end);
        match how {
            Done::Delivered { slow, dropped } => {
                self.state.add_sent(records, samples);
                // Counted once delivered: a request that is retried or split
                // would otherwise count its losses more than once.
                self.state
                    .add_translation_dropped(dropped.created_timestamps, dropped.metadata);
                // Answered, but only after the send timeout: smaller
                // requests from now on, so that none has to be given up.
                if slow {
                    self.shrink();
                } else {
                    self.grow();
                }
                // Checkpointed with the next request's range, or when idle.
                self.set_unflushed(Some(end));
                self.set_position(end);
                return;
            }
            Done::AlreadyDelivered => self.state.add_assumed_delivered(records, samples),
            Done::Rejected { .. } => self.state.add_rejected(records, samples),
            Done::Undecodable { .. } => self.state.add_skipped(records, "undecodable"),
        }
        self.checkpoint(end).await;
    }

    fn split(&mut self, reason: &'static str) {
        metrics::counter!("walrelay_replica_splits_total", "replica" => self.state.name.clone(), "reason" => reason)
            .increment(1);
        self.shrink();
    }

    fn blocked(&mut self, _reason: String) {
        // A shipper's sender has no limit of blocked attempts: it never
        // gives up, so this is not called; were it, the records are sent
        // again.
    }

    fn stopped(&self) -> bool {
        false
    }
}

/// Places a replica that has no stored position where `start_at` says in
/// the log as it is now, and stores that position before its shipper or
/// retention see the replica; returns it. Where every new replica's
/// position is decided: at startup (which passes `Oldest` when the
/// checkpoint store was lost), when a reload adds one, and by a shipper
/// that finds none.
///
/// # Errors
/// The checkpoint store cannot write it.
pub fn place_new_replica(
    checkpoints: &Checkpoints,
    wal: &Wal,
    name: &str,
    start_at: StartAt,
) -> Result<u64, CheckpointError> {
    let extent = wal.extent();
    let start = start_at.position(extent.first_seq, extent.end_seq);
    checkpoints.set(name, start)?;
    tracing::info!(replica = %name, start, ?start_at, "new replica: starting position set");
    Ok(start)
}

/// Spawns a backfill's or a shard's shipper. A plain function, not part of
/// `run`, so that the task's future type does not contain itself.
fn spawn_stream(shipper: Shipper) -> JoinHandle<()> {
    let (shutdown, drain) = (shipper.shutdown.clone(), shipper.drain.clone());
    tokio::spawn(shipper.run(shutdown, drain))
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Live => "live",
        Stream::Backfill { .. } => "backfill",
        Stream::Shard { .. } => "shard",
    }
}

enum Batch {
    Records(Vec<Record>),
    Gap(Gap),
    /// A backfill reached the end of its range.
    End,
}

/// Runs blocking checkpoint I/O off the async workers.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: Send + 'static + From<CheckpointError>,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        // The closure panicked: treat it as a store failure and retry.
        Err(e) => Err(E::from(CheckpointError::Panicked(e.to_string()))),
    }
}

/// A stored record for the shippers' tests: `payload` as the protobuf of
/// `kind`, stored decoded, with `samples` samples and no times.
#[cfg(test)]
pub(crate) fn test_record(
    seq: u64,
    kind: wal_format::PayloadKind,
    samples: u32,
    payload: Vec<u8>,
) -> Record {
    Record {
        seq,
        meta: wal_format::RecordMeta {
            receive_time_ms: 0,
            min_sample_ts: 0,
            max_sample_ts: 0,
            samples,
            kind,
            encoding: wal_format::PayloadEncoding::Identity,
        },
        payload: bytes::Bytes::from(payload),
    }
}

#[cfg(test)]
mod delivery_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use bytes::Bytes;
    use wal_format::{PayloadKind, RecordRef};

    fn record(seq: u64, kind: PayloadKind, samples: u32) -> Record {
        test_record(seq, kind, samples, vec![0u8; 10])
    }

    /// The batches a shipper's own [`Shipper::next_batch`] makes of
    /// `records`, written to a log (all durable) and read back, for a
    /// replica speaking `protocol` with batch limits `limits`.
    async fn batches(
        records: &[Record],
        limits: BatchLimits,
        protocol: ReplicaProtocol,
    ) -> Vec<Vec<u64>> {
        let storage: Arc<dyn crate::wal::Storage> = Arc::new(crate::wal::sim::SimStorage::new());
        let dir = std::path::Path::new("/sim/wal");
        let (mut w, wal, _) =
            crate::wal::open(storage, dir, crate::wal::WalOptions::default()).unwrap();
        let refs: Vec<RecordRef<'_>> = records.iter().map(Record::as_record_ref).collect();
        w.append(&refs).unwrap();
        w.sync().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints::open(&tmp.path().join("cp")).unwrap();
        let options = SenderOptions {
            timeout: Duration::from_secs(1),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            tls: Default::default(),
            policy: Default::default(),
            max_blocked_attempts: None,
            headers: Vec::new(),
            auth: None,
        };
        let sender = Sender::new("r", "http://127.0.0.1:9/api/v1/write", options).unwrap();
        let state = Arc::new(ReplicaState::new("r", "http://127.0.0.1:9/", 0));
        let mut shipper = Shipper::new(
            state,
            wal.clone(),
            checkpoints,
            sender,
            protocol,
            limits,
            StartAt::Oldest,
        );
        let mut reader = wal.reader(0);
        let mut out: Vec<Vec<u64>> = Vec::new();
        // Only as many batches as hold the records: past them, a live
        // stream waits for more.
        while out.iter().map(Vec::len).sum::<usize>() < records.len() {
            match shipper
                .next_batch(&mut Source::Log(&mut reader))
                .await
                .unwrap()
            {
                Batch::Records(batch) => out.push(batch.iter().map(|r| r.seq).collect()),
                Batch::Gap(g) => panic!("a gap in a whole log: {g:?}"),
                Batch::End => panic!("a live stream does not end"),
            }
        }
        out
    }

    const WIDE: BatchLimits = BatchLimits {
        max_samples: 1000,
        max_bytes: 1 << 20,
    };

    fn of_kinds(kinds: &[PayloadKind]) -> Vec<Record> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| record(i as u64, k, 1))
            .collect()
    }

    #[tokio::test]
    async fn a_batch_to_a_2_0_replica_is_cut_where_the_kind_changes() {
        use PayloadKind::{RemoteWriteV1 as V1, RemoteWriteV2 as V2};
        let records = of_kinds(&[V1, V1, V2, V2, V2, V1, V2]);
        let got = batches(&records, WIDE, ReplicaProtocol::V2).await;
        assert_eq!(got, vec![vec![0, 1], vec![2, 3, 4], vec![5], vec![6]]);
    }

    #[tokio::test]
    async fn a_batch_to_a_1_0_replica_mixes_kinds_since_all_become_1_0() {
        use PayloadKind::{RemoteWriteV1 as V1, RemoteWriteV2 as V2};
        let records = of_kinds(&[V1, V2, V1, V2]);
        assert_eq!(
            batches(&records, WIDE, ReplicaProtocol::V1).await,
            vec![vec![0, 1, 2, 3]]
        );
    }

    #[tokio::test]
    async fn the_kind_rule_comes_on_top_of_the_size_limits() {
        let small = BatchLimits {
            max_samples: 5,
            max_bytes: 1 << 20,
        };
        let records: Vec<Record> = (0..6)
            .map(|i| record(i, PayloadKind::RemoteWriteV2, 2))
            .collect();
        assert_eq!(
            batches(&records, small, ReplicaProtocol::V2).await,
            vec![vec![0, 1], vec![2, 3], vec![4, 5]]
        );
    }

    #[tokio::test]
    async fn a_batch_stops_at_the_byte_limit_but_always_takes_one_record() {
        let bytes = BatchLimits {
            max_samples: 1000,
            max_bytes: 25,
        };
        let mut records = of_kinds(&[PayloadKind::RemoteWriteV1; 5]);
        // Larger than the limit on its own: it still goes, alone.
        records[3].payload = Bytes::from(vec![0u8; 40]);
        assert_eq!(
            batches(&records, bytes, ReplicaProtocol::V1).await,
            vec![vec![0, 1], vec![2], vec![3], vec![4]]
        );
    }
}
