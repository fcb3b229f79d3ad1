//! Sharded delivery: N requests in flight to one replica, each series in
//! log order.
//!
//! A replica far away answers one request per round trip; with one request
//! in flight its throughput is one `--max-samples-per-send` per round trip
//! (20,000 samples per 100 ms is 200,000 samples/s). So the live stream of a
//! replica may be delivered by N shards. Every series goes through exactly
//! one shard, always the same ([`prom_remote_write::shard`]), and each shard
//! has one request in flight and sends in log order: per series, samples
//! still arrive in order, which is what a replica without an out-of-order
//! window requires, while N requests are in flight.
//!
//! One reader, the dispatcher, reads the log from the lowest shard's
//! position and cuts each record into N parts ([`super::cut`]), one per
//! shard, which go into each shard's queue (bounded in bytes: a slow shard
//! holds the dispatcher back instead of filling memory). Each shard is a
//! [`Shipper`] of its own over its queue: it batches its parts as an
//! unsharded shipper batches records, with the same limits, rate limiter
//! (shared), status policy and translation, and checkpoints its own
//! position and request in flight ([`crate::checkpoint`]) before it sends.
//! A shard that has nothing in a record moves past it without a request.
//!
//! After a crash, each shard first re-sends exactly its request that was in
//! flight: the same records cut with the same N (stored), so the same
//! series. The dispatcher then starts at the lowest shard position and
//! gives each shard only what lies at or past its own.
//!
//! ## Changing N: the barrier
//!
//! Two requests for one series must never be in flight at once, and a
//! series changes shard when N changes. So N changes only at a barrier: the
//! dispatcher stops at a position P no lower than any shard's, every shard
//! delivers everything it was given (all below P) and stops, and then one
//! atomic checkpoint write ([`crate::checkpoint::Checkpoints::reshard`])
//! removes the old shards and starts N' shards at P. A crash before that
//! write resumes the old N from its shards' positions; after it, the new N
//! at P. A live-first split ([`super::backfill`]) takes the same barrier,
//! its gap starting at P.
//!
//! N = 1 is the unsharded shipper, unchanged: one reader that sends what
//! it reads, its checkpoint the replica's `delivered` and `inflight`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use wal_format::Record;

use super::adapt::{self, Window};
use super::{cut, Shipper};
use crate::checkpoint::Cursor;
use crate::types::Shards;
use crate::wal::{Gap, ReadItem, WalError, WalReader};

/// What the live stream does once a run of its shards (or of its single
/// stream) ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Drained or shut down.
    Stop,
    /// Every shard has delivered everything below `at` and stopped: start
    /// `to` shards there (with `split`, a live-first backfill of that gap
    /// first, the shards at its end).
    Reshard {
        at: u64,
        to: u32,
        split: Option<std::ops::Range<u64>>,
    },
}

/// Bytes a shard's queue may hold: enough for a request being sent and
/// the next one gathered, at most 64 MiB for all shards of a replica.
fn queue_budget(of: u32, max_bytes: usize) -> usize {
    ((64usize << 20) / of.max(1) as usize).clamp(256 << 10, max_bytes.max(256 << 10))
}

/// A shard's batch limits: the replica's samples, and its bytes shared so
/// that the batches of all shards together hold at most twice the
/// replica's (or 2 MiB a shard): N shards must not multiply what a replica
/// holds in memory by N. A request of 20,000 samples of a typical series
/// is under 2 MiB decoded, so the sample limit still decides.
pub(crate) fn batch_limits(limits: super::BatchLimits, of: u32) -> super::BatchLimits {
    let shared = limits.max_bytes.saturating_mul(2) / of.max(1) as usize;
    super::BatchLimits {
        max_samples: limits.max_samples,
        max_bytes: shared.clamp(limits.max_bytes.min(2 << 20), limits.max_bytes),
    }
}

/// What a part costs its queue: its bytes and its record's bookkeeping,
/// so that empty parts are bounded too.
fn cost(item: &ReadItem, budget: usize) -> u32 {
    let bytes = match item {
        ReadItem::Record(r) => r.payload.len() + 128,
        ReadItem::Gap(_) => 128,
    };
    u32::try_from(bytes.min(budget)).unwrap_or(u32::MAX)
}

/// The dispatcher's end of a shard's queue.
pub(crate) struct PartsTx {
    tx: mpsc::UnboundedSender<(ReadItem, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    size: usize,
}

impl PartsTx {
    /// Queues `item`, waiting for room; false when the shard is gone.
    async fn send(&self, item: ReadItem) -> bool {
        let n = cost(&item, self.size);
        let Ok(permit) = Arc::clone(&self.budget).acquire_many_owned(n).await else {
            return false;
        };
        self.tx.send((item, permit)).is_ok()
    }
}

/// A shard's queue of parts: what its shipper reads instead of the log.
pub(crate) struct Parts {
    rx: mpsc::UnboundedReceiver<(ReadItem, OwnedSemaphorePermit)>,
    /// Taken by [`Parts::wait_for_more`], returned by the next read.
    peeked: Option<ReadItem>,
    budget: Arc<Semaphore>,
}

impl Drop for Parts {
    fn drop(&mut self) {
        // A dispatcher waiting for room in a queue whose shard is gone
        // must not wait for ever.
        self.budget.close();
    }
}

/// A queue for a shard of `of` of a replica whose requests hold at most
/// `max_bytes`.
pub(crate) fn queue(of: u32, max_bytes: usize) -> (PartsTx, Parts) {
    let size = queue_budget(of, max_bytes);
    let budget = Arc::new(Semaphore::new(size));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        PartsTx {
            tx,
            budget: Arc::clone(&budget),
            size,
        },
        Parts {
            rx,
            peeked: None,
            budget,
        },
    )
}

/// Where a stream's shipper reads: the log, or (a shard) its queue.
pub(crate) enum Source<'a> {
    Log(&'a mut WalReader),
    Parts(&'a mut Parts),
}

impl Source<'_> {
    /// The next item if one is there now.
    pub(crate) fn try_next(&mut self) -> Result<Option<ReadItem>, WalError> {
        match self {
            Source::Log(r) => r.try_next(),
            Source::Parts(p) => Ok(p
                .peeked
                .take()
                .or_else(|| p.rx.try_recv().ok().map(|(i, _)| i))),
        }
    }

    /// The next item, waiting for it; `None` when a shard's queue is closed
    /// and empty (the log never ends).
    pub(crate) async fn next(&mut self) -> Result<Option<ReadItem>, WalError> {
        match self {
            Source::Log(r) => r.next().await.map(Some),
            Source::Parts(p) => match p.peeked.take() {
                Some(item) => Ok(Some(item)),
                None => Ok(p.rx.recv().await.map(|(i, _)| i)),
            },
        }
    }

    /// Waits until an item is there (or the queue is closed).
    pub(crate) async fn wait_for_more(&mut self) {
        match self {
            Source::Log(r) => r.wait_for_more().await,
            Source::Parts(p) => {
                if p.peeked.is_none() {
                    p.peeked = p.rx.recv().await.map(|(i, _)| i);
                }
            }
        }
    }
}

/// The live stream's shard count, as its settings and its replica's
/// recent work say ([`adapt`]).
pub(crate) struct Sizing {
    pub(crate) shards: Shards,
    pub(crate) interval: Duration,
    since: Instant,
    work: (u64, Duration),
    head: u64,
    read_records: u64,
    read_samples: u64,
}

impl Sizing {
    pub(crate) fn new(shards: Shards, interval: Duration) -> Self {
        Sizing {
            shards,
            interval,
            since: Instant::now(),
            work: (0, Duration::ZERO),
            head: 0,
            read_records: 0,
            read_samples: 0,
        }
    }

    /// Counts records read, for the samples per record.
    pub(crate) fn read(&mut self, records: u64, samples: u64) {
        self.read_records += records;
        self.read_samples += samples;
    }

    /// Starts a window now.
    pub(crate) fn reset(&mut self, live: &Shipper) {
        self.since = Instant::now();
        self.work = live.state.delivery_work();
        self.head = live.wal.durable_end();
    }

    /// The shard count wanted with `current` shards: a fixed count at once,
    /// an adaptive one once per interval (else `current`).
    pub(crate) fn wanted(&mut self, live: &Shipper, current: u32) -> u32 {
        if let Shards::Fixed(n) = self.shards {
            return n;
        }
        if self.shards.clamp(current) != current {
            // Outside the bounds (they changed since): at once.
            return self.shards.clamp(current);
        }
        let elapsed = self.since.elapsed();
        if elapsed < self.interval {
            return current;
        }
        let (samples, busy) = live.state.delivery_work();
        let head = live.wal.durable_end();
        let window = Window {
            interval: elapsed,
            samples_out: samples.saturating_sub(self.work.0),
            busy: busy.saturating_sub(self.work.1),
            records_in: head.saturating_sub(self.head),
            samples_per_record: if self.read_records == 0 {
                0.0
            } else {
                self.read_samples as f64 / self.read_records as f64
            },
            backlog_records: head.saturating_sub(live.state.delivered()),
        };
        self.reset(live);
        let want = adapt::desired(self.shards, current, &window);
        metrics::gauge!("walrelay_replica_shards_desired", "replica" => live.state.name.clone())
            .set(f64::from(want));
        want
    }
}

/// Runs the live stream with the `cursor.shards` shards it has until a
/// barrier (a reshard or a live-first split) or a drain; see the module
/// documentation.
pub(crate) async fn run(live: &mut Shipper, cursor: &Cursor, drain: &CancellationToken) -> Next {
    let of = cursor.shard_count();
    live.state.set_shards(of, cursor.delivered.unwrap_or(0));
    let mut queues = Vec::with_capacity(of as usize);
    let mut ready = Vec::with_capacity(of as usize);
    for index in 0..of {
        let (tx, parts) = queue(of, live.limits.max_bytes);
        let (ready_tx, ready_rx) = oneshot::channel();
        let shard = live.shard_shipper(index, of, parts, ready_tx);
        live.shard_tasks.push(super::spawn_stream(shard));
        queues.push(tx);
        ready.push(ready_rx);
    }
    // Each shard re-sends its request in flight first, then says where it
    // reads on.
    let mut starts = Vec::with_capacity(ready.len());
    for r in ready {
        match r.await {
            Ok(start) => starts.push(start),
            // Stopped before it could start (a drain or a shutdown).
            Err(_) => return finish(live, queues, Next::Stop).await,
        }
    }
    let next = dispatch(live, of, &queues, &starts, drain).await;
    finish(live, queues, next).await
}

/// Closes the shards' queues and waits until each has delivered what it
/// was given and stopped.
async fn finish(live: &mut Shipper, queues: Vec<PartsTx>, next: Next) -> Next {
    drop(queues);
    for task in live.shard_tasks.drain(..) {
        let _ = task.await;
    }
    next
}

/// Reads the log from the lowest of `starts` and hands each shard its
/// parts, until a barrier is wanted and reached, or a drain.
async fn dispatch(
    live: &mut Shipper,
    of: u32,
    queues: &[PartsTx],
    starts: &[u64],
    drain: &CancellationToken,
) -> Next {
    let from = starts.iter().copied().min().unwrap_or(0);
    // A barrier below a shard's position would send it again what it
    // delivered: none before every shard's position.
    let lowest_barrier = starts.iter().copied().max().unwrap_or(0);
    let mut reader = live.wal.reader(from);
    let mut sizing = live
        .sizing
        .take()
        .unwrap_or_else(|| Sizing::new(Shards::Fixed(of), Duration::from_secs(10)));
    sizing.reset(live);
    let tick = sizing.interval.min(Duration::from_secs(1));
    let next = 'read: loop {
        let at = reader.next_seq();
        let want = sizing.wanted(live, of);
        if want != of && at >= lowest_barrier {
            tracing::info!(replica = %live.state.name, from = of, to = want, at,
                "changing the number of shards: every shard delivers what it was given first");
            break Next::Reshard {
                at,
                to: want,
                split: None,
            };
        }
        let item = tokio::select! {
            item = reader.next() => item,
            () = drain.cancelled() => break Next::Stop,
            () = tokio::time::sleep(tick) => continue,
        };
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                live.state.set_error(format!("reading the log: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                reader.seek(at);
                continue;
            }
        };
        match item {
            ReadItem::Gap(g) => {
                live.count_gap(&g, from);
                for (queue, &start) in queues.iter().zip(starts) {
                    if g.to > start {
                        let part = Gap {
                            from: g.from.max(start),
                            ..g.clone()
                        };
                        if !send(queue, ReadItem::Gap(part), drain).await {
                            break 'read Next::Stop;
                        }
                    }
                }
            }
            ReadItem::Record(r) => {
                if let Some(gap) = split_gap(live, &r, lowest_barrier) {
                    tracing::info!(replica = %live.state.name, from = gap.start, to = gap.end,
                        records = gap.end - gap.start,
                        "lag above live_first_after: the shards deliver what they were given, \
                         then go on from the head while the gap is backfilled");
                    break Next::Reshard {
                        at: r.seq,
                        to: want,
                        split: Some(gap),
                    };
                }
                sizing.read(1, u64::from(r.meta.samples));
                for ((queue, &start), part) in queues.iter().zip(starts).zip(cut::cut(&r, of)) {
                    if part.seq >= start && !send(queue, ReadItem::Record(part), drain).await {
                        break 'read Next::Stop;
                    }
                }
            }
        }
    };
    live.sizing = Some(sizing);
    next
}

/// Queues `item` for a shard unless a drain comes first.
async fn send(queue: &PartsTx, item: ReadItem, drain: &CancellationToken) -> bool {
    tokio::select! {
        sent = queue.send(item) => sent,
        () = drain.cancelled() => false,
    }
}

/// The gap to leave to a backfill before dispatching `r`, for a live-first
/// replica lagging too far (the unsharded stream's rule,
/// [`Shipper::split_gap`], for this one record); only where a barrier may
/// be.
fn split_gap(live: &Shipper, r: &Record, lowest_barrier: u64) -> Option<std::ops::Range<u64>> {
    if r.seq < lowest_barrier {
        return None;
    }
    live.split_gap(std::slice::from_ref(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shards_batches_share_twice_the_replica_s_bytes_down_to_2_mib_each() {
        let replica = super::super::BatchLimits {
            max_samples: 20_000,
            max_bytes: 8 << 20,
        };
        let bytes = |of| batch_limits(replica, of).max_bytes;
        assert_eq!(bytes(1), 8 << 20);
        assert_eq!(bytes(2), 8 << 20);
        assert_eq!(bytes(4), 4 << 20);
        assert_eq!(bytes(16), 2 << 20);
        assert_eq!(bytes(256), 2 << 20);
        assert_eq!(batch_limits(replica, 16).max_samples, 20_000);
        let small = super::super::BatchLimits {
            max_samples: 100,
            max_bytes: 1 << 20,
        };
        assert_eq!(batch_limits(small, 8).max_bytes, 1 << 20);
    }

    #[test]
    fn a_shard_queue_holds_a_request_or_two_and_all_shards_at_most_64_mib() {
        assert_eq!(queue_budget(1, 8 << 20), 8 << 20);
        assert_eq!(queue_budget(16, 8 << 20), 4 << 20);
        assert_eq!(queue_budget(256, 8 << 20), 256 << 10);
        assert_eq!(queue_budget(2, 1 << 10), 256 << 10);
    }
}
