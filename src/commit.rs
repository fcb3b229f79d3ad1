//! Group commit: many concurrent requests, one fsync.
//!
//! One OS thread owns the [`WalWriter`]. Request handlers send it their record
//! and wait on a oneshot. The thread takes the first waiting append, then every
//! other append already queued (up to a batch limit), writes them all, syncs
//! once, and answers every request in the batch. Appends that arrive during an
//! fsync form the next batch, so under load each fsync covers many requests and
//! at low load a request waits for exactly one fsync: there is no timer and no
//! artificial delay.
//!
//! The disk budget is checked here, where the log's size is known exactly:
//! with [`FullPolicy::Block`] a batch that would pass it is refused (429 for
//! the senders, who retry); with [`FullPolicy::DropOldest`] the oldest
//! segments are dropped first (see [`crate::retention`]: a drop never reads
//! the segment it deletes, and costs one small fsync for its tombstone; a
//! segment whose samples are not counted yet, right after a restart, is not
//! dropped and the batch gets the retryable 429 meanwhile). With no replica
//! configured nothing counts as delivered, so only a drop frees space.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use wal_format::{RecordMeta, RecordRef};

use crate::free_space::FreeSpace;
use crate::retention::Retention;
use crate::types::FullPolicy;
use crate::wal::{DropReason, Wal, WalError, WalWriter};

/// Most bytes written in one group commit before syncing.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// Why an append was not committed. Every case means: not stored, not
/// acknowledged; the sender may retry.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The disk budget is reached (policy `block`). Retry later: space returns
    /// as replicas catch up.
    #[error("disk budget of {budget} bytes reached; retry later")]
    BudgetFull { budget: u64 },
    /// The disk itself is full. Retry later.
    #[error("disk full: {0}")]
    NoSpace(String),
    /// The writer stopped after a fatal error (failed fsync). Not recoverable
    /// without a restart.
    #[error("log writer failed: {0}")]
    WriterFailed(String),
    /// Another I/O error; retry later.
    #[error("log write failed: {0}")]
    Io(String),
    /// The relay is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl CommitError {
    pub fn as_error_code(&self) -> &'static str {
        match self {
            CommitError::BudgetFull { .. } => "budget_full",
            CommitError::NoSpace(_) => "no_space",
            CommitError::WriterFailed(_) => "writer_failed",
            CommitError::Io(_) => "io",
            CommitError::ShuttingDown => "shutting_down",
        }
    }
}

impl From<WalError> for CommitError {
    fn from(e: WalError) -> Self {
        match e {
            WalError::NoSpace { .. } => CommitError::NoSpace(e.to_string()),
            WalError::SyncFailed { .. } | WalError::WriterFailed { .. } => {
                CommitError::WriterFailed(e.to_string())
            }
            other => CommitError::Io(other.to_string()),
        }
    }
}

enum Msg {
    Append(Append),
    /// Commit what is queued, then stop.
    Stop,
}

struct Append {
    meta: RecordMeta,
    payload: Bytes,
    /// `payload` is a request body as it came: the readers' tail cache
    /// holds a copy of its exact size (the body may be a slice of a
    /// connection's read buffer, which the cache would otherwise keep
    /// whole).
    received: bool,
    /// Dropped before the answer (see [`Committer::append_holding`]).
    held: Held,
    reply: oneshot::Sender<Result<u64, CommitError>>,
}

/// What must live as long as a record waits for its commit.
pub type Held = Box<dyn Send>;

/// The handle request handlers use.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::UnboundedSender<Msg>,
    failed: Arc<AtomicBool>,
}

/// Budget settings of the commit thread.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// 0 = no budget.
    pub max_disk_bytes: u64,
    pub policy: FullPolicy,
}

impl Committer {
    /// Starts the commit thread. It runs until every [`Committer`] clone is
    /// dropped, then returns the writer (synced) through the join handle.
    pub fn start(
        writer: WalWriter,
        wal: Wal,
        retention: Arc<Retention>,
        budget: Budget,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<WalWriter>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(writer.failed().is_some()));
        let thread_failed = Arc::clone(&failed);
        let handle = std::thread::Builder::new()
            .name("wal-commit".into())
            .spawn(move || commit_loop(writer, wal, retention, budget, rx, thread_failed))?;
        // Appends racing with a stop are answered by the receiver's drop.
        Ok((Self { tx, failed }, handle))
    }

    /// Appends one record and waits until it is durable. Returns its sequence
    /// number.
    ///
    /// # Errors
    /// See [`CommitError`]; in every case nothing was acknowledged.
    pub async fn append(&self, meta: RecordMeta, payload: Bytes) -> Result<u64, CommitError> {
        self.append_holding(meta, payload, false, Box::new(()))
            .await
    }

    /// [`Self::append`] of a record that comes with `held`: what must live
    /// as long as the record is the request's (ingest's memory
    /// reservation). The commit thread drops it once the record is stored
    /// or refused, before it answers. A caller that goes away meanwhile
    /// (its client gone) does not drop it early: the memory of a record
    /// waiting in the queue stays counted without a task of its own for
    /// every request.
    ///
    /// `received`: `payload` is a request body as its sender sent it (a 1.0
    /// body, snappy-compressed, with the encoding `Snappy`): the log and
    /// the readers' in-memory tail cache hold it as it is, and a shipper
    /// puts it into a 1.0 request without compressing it again.
    ///
    /// # Errors
    /// As [`Self::append`].
    pub async fn append_holding(
        &self,
        meta: RecordMeta,
        payload: Bytes,
        received: bool,
        held: Held,
    ) -> Result<u64, CommitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Append(Append {
                meta,
                payload,
                received,
                held,
                reply,
            }))
            .map_err(|_| CommitError::ShuttingDown)?;
        rx.await.unwrap_or(Err(CommitError::ShuttingDown))
    }

    /// Asks the commit thread to commit what is queued and stop; appends
    /// sent after this are answered [`CommitError::ShuttingDown`].
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }

    /// True once the writer has stopped for good.
    pub fn writer_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

fn commit_loop(
    mut writer: WalWriter,
    wal: Wal,
    retention: Arc<Retention>,
    budget: Budget,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    failed: Arc<AtomicBool>,
) -> WalWriter {
    let mut batch: Vec<Append> = Vec::new();
    let mut stopping = false;
    let mut space = FreeSpace::new(wal.dir());
    let mut level = writer.zstd_level();
    metrics::gauge!("walrelay_wal_zstd_level").set(f64::from(level));
    while !stopping {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut bytes = 0;
        match first {
            Msg::Append(a) => {
                bytes += a.payload.len();
                batch.push(a);
            }
            Msg::Stop => stopping = true,
        }
        while bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(Msg::Append(a)) => {
                    bytes += a.payload.len();
                    batch.push(a);
                }
                Ok(Msg::Stop) => stopping = true,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let result = commit_batch(
            &mut writer,
            &mut space,
            &wal,
            &retention,
            budget,
            &batch,
            bytes,
        );
        if writer.zstd_level() != level {
            level = writer.zstd_level();
            metrics::gauge!("walrelay_wal_zstd_level").set(f64::from(level));
        }
        if writer.failed().is_some() {
            failed.store(true, Ordering::Relaxed);
            metrics::gauge!("walrelay_wal_writer_failed").set(1.0);
        }
        if let Err(e) = &result {
            metrics::counter!("walrelay_wal_append_errors_total", "reason" => e.as_error_code())
                .increment(1);
        }
        for (i, a) in batch.drain(..).enumerate() {
            // Before the answer (see `Committer::append_holding`).
            drop(a.held);
            let _ = a
                .reply
                .send(result.clone().map(|first_seq| first_seq + i as u64));
        }
    }
    writer.close();
    writer
}

/// Appends and syncs one batch; returns the first sequence number.
fn commit_batch(
    writer: &mut WalWriter,
    space: &mut FreeSpace,
    wal: &Wal,
    retention: &Retention,
    budget: Budget,
    batch: &[Append],
    bytes: usize,
) -> Result<u64, CommitError> {
    if budget.max_disk_bytes > 0 {
        let mut have = wal.extent().bytes;
        if have + bytes as u64 > budget.max_disk_bytes {
            // Space may be free once delivered segments are gone.
            retention.collect_delivered();
            have = wal.extent().bytes;
        }
        if have + bytes as u64 > budget.max_disk_bytes && budget.policy == FullPolicy::DropOldest {
            while wal.extent().bytes + bytes as u64 > budget.max_disk_bytes {
                if !retention.drop_oldest(DropReason::DiskBudget) {
                    break;
                }
            }
            have = wal.extent().bytes;
        }
        if have + bytes as u64 > budget.max_disk_bytes {
            free_fully_delivered(writer, retention);
            return Err(CommitError::BudgetFull {
                budget: budget.max_disk_bytes,
            });
        }
    }
    if space.left().is_some_and(|left| bytes as u64 > left) {
        // Refused like a full disk, before the disk is really full.
        retention.collect_delivered();
        free_fully_delivered(writer, retention);
        if let Some(left) = space.fresh().filter(|&left| bytes as u64 > left) {
            return Err(CommitError::NoSpace(format!(
                "{left} bytes left on the log's filesystem (beyond the space kept free for \
                 the checkpoint store), {bytes} needed"
            )));
        }
    }
    let refs: Vec<RecordRef<'_>> = batch
        .iter()
        .map(|a| RecordRef {
            meta: a.meta.clone(),
            payload: &a.payload,
        })
        .collect();
    let t = Instant::now();
    let range = match writer.append(&refs) {
        Ok(r) => r,
        Err(e @ WalError::NoSpace { .. }) => {
            // Free what replicas no longer need, so the sender's retry can
            // succeed; the batch itself is refused either way.
            retention.collect_delivered();
            free_fully_delivered(writer, retention);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    // What the frames took at most: the payloads, uncompressed, and a
    // frame header and an entry's fixed part for each record. (The zeros
    // reserved ahead, at most 256 KiB, are within SPACE_NEAR_FULL.)
    space.wrote(
        bytes + batch.len() * (wal_format::FRAME_HEADER_LEN + wal_format::RECORD_ENTRY_HEADER_LEN),
    );
    writer.stage_for_readers(
        range.start,
        batch.iter().map(|a| {
            let payload = if a.received {
                Bytes::copy_from_slice(&a.payload)
            } else {
                a.payload.clone()
            };
            (a.meta.clone(), payload)
        }),
    );
    let hot = crate::metrics::hot();
    hot.wal_append_duration.record(t.elapsed().as_secs_f64());
    let t = Instant::now();
    writer.sync()?;
    hot.wal_fsync_duration.record(t.elapsed().as_secs_f64());
    hot.wal_group_commit_requests.record(batch.len() as f64);
    hot.wal_appended_bytes.increment(bytes as u64);
    Ok(range.start)
}

/// When every replica has everything, the only thing left on disk may be the
/// active segment, which retention never deletes: seal it so it can go.
/// Not when no replica is configured: then nobody has anything.
fn free_fully_delivered(writer: &mut WalWriter, retention: &Retention) {
    if retention
        .min_delivered()
        .is_none_or(|needed| needed < writer.durable_seq())
    {
        return;
    }
    match writer.seal_active() {
        Ok(true) => {
            retention.collect_delivered();
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot seal the active segment to free space"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::Path;

    use wal_format::{PayloadEncoding, PayloadKind};

    use super::*;
    use crate::wal::sim::SimStorage;
    use crate::wal::{ReadItem, WalOptions};

    fn meta() -> RecordMeta {
        RecordMeta {
            receive_time_ms: 1,
            min_sample_ts: 1,
            max_sample_ts: 1,
            samples: 1,
            kind: PayloadKind::RemoteWriteV1,
            encoding: PayloadEncoding::Identity,
        }
    }

    fn start(storage: &SimStorage, budget: Budget) -> (Committer, Wal) {
        let storage: Arc<dyn crate::wal::Storage> = Arc::new(storage.clone());
        let (writer, wal, _) =
            crate::wal::open(storage, Path::new("/sim/wal"), WalOptions::default()).unwrap();
        let retention = Arc::new(Retention::new(wal.clone(), None));
        let (committer, _thread) =
            Committer::start(writer, wal.clone(), retention, budget).unwrap();
        (committer, wal)
    }

    const NO_BUDGET: Budget = Budget {
        max_disk_bytes: 0,
        policy: FullPolicy::Block,
    };

    #[tokio::test]
    async fn concurrent_appends_each_get_their_own_number_and_are_durable_when_answered() {
        let storage = SimStorage::new();
        let (committer, wal) = start(&storage, NO_BUDGET);
        let appends = (0..64u8).map(|i| {
            let c = committer.clone();
            tokio::spawn(async move { c.append(meta(), Bytes::from(vec![i; 100])).await })
        });
        let mut seqs = Vec::new();
        for a in appends {
            seqs.push(a.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (0..64).collect::<Vec<u64>>());
        // Answered means synced: a crash that keeps nothing unsynced loses
        // none of them.
        storage.crash(|_| 0);
        let storage: Arc<dyn crate::wal::Storage> = Arc::new(storage);
        let (_, reopened, _) =
            crate::wal::open(storage, Path::new("/sim/wal"), WalOptions::default()).unwrap();
        let mut reader = reopened.reader(0);
        let mut read = 0;
        while let Some(item) = reader.try_next().unwrap() {
            assert!(matches!(item, ReadItem::Record(_)), "no gap");
            read += 1;
        }
        assert_eq!(read, 64);
        drop(wal);
    }

    /// Notes the name of the thread that drops it.
    struct Guard(Arc<std::sync::Mutex<Option<String>>>);

    impl Drop for Guard {
        fn drop(&mut self) {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            *self.0.lock().unwrap() = Some(name);
        }
    }

    /// Dropped by the commit thread?
    struct DroppedBy(Arc<std::sync::Mutex<Option<String>>>);

    impl DroppedBy {
        fn commit_thread(&self) -> bool {
            self.0.lock().unwrap().as_deref() == Some("wal-commit")
        }
    }

    fn guard() -> (Held, DroppedBy) {
        let by = Arc::new(std::sync::Mutex::new(None));
        (Box::new(Guard(Arc::clone(&by))), DroppedBy(by))
    }

    #[tokio::test]
    async fn what_an_append_holds_is_dropped_before_its_answer_and_not_with_a_caller_gone() {
        let storage = SimStorage::new();
        let (committer, wal) = start(&storage, NO_BUDGET);
        // Stored: released before the answer (ingest's 204 finds the
        // request's memory given back).
        let (held, dropped) = guard();
        committer
            .append_holding(meta(), Bytes::from_static(b"a"), false, held)
            .await
            .unwrap();
        assert!(dropped.commit_thread());
        // Refused: likewise.
        storage.fail_next_sync();
        let (held, dropped) = guard();
        let refused = committer
            .append_holding(meta(), Bytes::from_static(b"b"), true, held)
            .await;
        assert!(refused.is_err());
        assert!(dropped.commit_thread());
        drop((committer, wal));

        // A caller that goes away once its record is queued: the record is
        // still stored, and what it held goes with it, not with the caller
        // (which would drop it on this thread).
        let storage = SimStorage::new();
        let (committer, wal) = start(&storage, NO_BUDGET);
        let (held, dropped) = guard();
        {
            let append = committer.append_holding(meta(), Bytes::from_static(b"c"), false, held);
            let mut append = std::pin::pin!(append);
            // The first poll queues the record; the caller then goes.
            let _ = futures_util::FutureExt::now_or_never(append.as_mut());
        }
        // The commit thread answers in order: the next append's answer
        // means the queued one was stored before it.
        assert_eq!(
            committer
                .append(meta(), Bytes::from_static(b"d"))
                .await
                .unwrap(),
            1
        );
        assert!(dropped.commit_thread());
        let mut reader = wal.reader(0);
        let mut read = 0;
        while let Some(item) = reader.try_next().unwrap() {
            assert!(matches!(item, ReadItem::Record(_)));
            read += 1;
        }
        assert_eq!(read, 2, "the record of the caller that went away is stored");
    }

    #[tokio::test]
    async fn a_failed_fsync_refuses_its_batch_and_every_append_after_it() {
        let storage = SimStorage::new();
        let (committer, wal) = start(&storage, NO_BUDGET);
        committer
            .append(meta(), Bytes::from_static(b"a"))
            .await
            .unwrap();
        storage.fail_next_sync();
        let e = committer
            .append(meta(), Bytes::from_static(b"b"))
            .await
            .unwrap_err();
        assert!(matches!(e, CommitError::WriterFailed(_)), "{e:?}");
        assert!(committer.writer_failed());
        // Never retried as if it had succeeded: the record stays invisible,
        // and so does every later one.
        let e = committer
            .append(meta(), Bytes::from_static(b"c"))
            .await
            .unwrap_err();
        assert!(matches!(e, CommitError::WriterFailed(_)), "{e:?}");
        assert_eq!(wal.durable_end(), 1);
    }

    #[tokio::test]
    async fn under_the_block_policy_an_append_past_the_budget_is_refused_and_not_stored() {
        let storage = SimStorage::new();
        let budget = Budget {
            max_disk_bytes: 64 << 10,
            policy: FullPolicy::Block,
        };
        let (committer, wal) = start(&storage, budget);
        // Incompressible, so that each record costs its size on disk.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = move || {
            (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
        };
        let mut stored = 0u64;
        let refused = loop {
            match committer.append(meta(), Bytes::from(noise())).await {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 64, "the budget never applied");
        };
        assert!(
            matches!(refused, CommitError::BudgetFull { budget: b } if b == 64 << 10),
            "{refused:?}"
        );
        assert_eq!(refused.as_error_code(), "budget_full");
        assert!(stored > 0);
        assert_eq!(wal.durable_end(), stored);
        assert!(wal.extent().bytes <= 64 << 10);
    }
}
