//! Deleting segments: normally only what every replica has, and under an
//! explicit limit (disk budget with `drop-oldest`, or `--retention` age) the
//! oldest segments whatever replicas still need them, with the loss counted
//! per replica and the exact lost range logged.
//!
//! With no replica configured nothing counts as delivered: a relay started
//! without replicas (a durable buffer replayed later, or one whose replicas
//! a reload adds) keeps everything it acknowledged, and only a limit (or an
//! operator) deletes it.
//!
//! # Dropping under a limit
//!
//! Each drop deletes one exact segment ([`Wal::drop_segment`]): deletions
//! are serialised by the log's deletion lock, and a segment that another
//! deletion took first (every replica passed it meanwhile) is simply looked
//! for again, so the tombstone left for the replicas always names the
//! segment that was deleted.
//!
//! The tombstone carries the samples of each record, so every replica
//! accounts exactly what it lost. Those counts are never read from the
//! segment while dropping: the disk budget drops on the commit thread, and
//! decoding a 128 MiB segment there would stall every ingest request. With
//! a dropping limit configured the log keeps each record's sample count as
//! it is appended ([`Wal::track_samples`]; 4 bytes a record), and for the
//! segments written before a restart housekeeping reads them in the
//! background, oldest first, starting at once after startup
//! ([`Retention::count_ahead`]). Should the budget need to drop a segment
//! whose counts are not read yet (only possible in the first moments after
//! a restart, with the budget already full), the batch is refused with the
//! budget's retryable 429 and housekeeping is woken to count that segment
//! now; the sender's retry then finds it droppable. Ingest never waits for
//! a decode, and every loss is still accounted exactly, records and
//! samples. The retention age drops from housekeeping, off the ingest path,
//! and counts a segment itself when it must.
//!
//! Tombstones are written to a file in the log's directory before their
//! segment is deleted (one small fsync per dropped segment; see
//! [`crate::wal::tombstone`]) and loaded at startup, so a replica that was
//! behind across a restart still accounts the loss as dropped, with its
//! reason and samples. They are pruned once every replica has passed them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::ship::ReplicaState;
use crate::wal::{DropReason, Dropped, SegmentMeta, Wal};

/// How long one housekeeping pass spends counting the samples of segments
/// written before a restart, before it lets the rest of housekeeping run
/// (the next pass goes on).
const COUNT_SLICE: Duration = Duration::from_millis(500);

/// See the module documentation.
pub struct Retention {
    wal: Wal,
    replicas: RwLock<Vec<Arc<ReplicaState>>>,
    max_age: Option<Duration>,
    /// The disk budget drops segments (`drop-oldest`): their samples are
    /// counted ahead of need.
    budget_drops: bool,
    /// Woken when a drop found the oldest segment's samples not counted.
    count_wanted: tokio::sync::Notify,
    /// The last segment (first record + 1) a drop found not counted, so
    /// that the batches refused meanwhile log it once.
    not_counted_logged: AtomicU64,
}

impl Retention {
    /// Retention of `wal`, dropping segments older than `max_age` if set.
    /// Call before anything is appended: with a limit, the log starts
    /// noting the samples of each record.
    pub fn new(wal: Wal, max_age: Option<Duration>) -> Self {
        if max_age.is_some() {
            wal.track_samples();
        }
        Self {
            wal,
            replicas: RwLock::new(Vec::new()),
            max_age,
            budget_drops: false,
            count_wanted: tokio::sync::Notify::new(),
            not_counted_logged: AtomicU64::new(0),
        }
    }

    /// The disk budget drops the oldest segments (`--full-policy
    /// drop-oldest` with a budget). Before anything is appended.
    pub fn with_budget_drops(mut self, drops: bool) -> Self {
        if drops {
            self.wal.track_samples();
        }
        self.budget_drops = drops;
        self
    }

    /// Sets the replicas whose positions hold segments back.
    pub fn set_replicas(&self, replicas: Vec<Arc<ReplicaState>>) {
        *self.replicas.write().unwrap_or_else(|p| p.into_inner()) = replicas;
    }

    fn replicas(&self) -> Vec<Arc<ReplicaState>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The lowest position any replica still needs, on any of its streams;
    /// None when no replica is configured. No replica does not mean that
    /// every replica has everything: nobody has received anything, and a
    /// relay started without replicas (a durable buffer to replay later, or
    /// one whose replicas a reload adds) must keep what it acknowledged.
    pub fn min_delivered(&self) -> Option<u64> {
        self.replicas().iter().map(|r| r.low_water()).min()
    }

    /// Deletes the segments every replica has passed; nothing when no
    /// replica is configured (see [`Self::min_delivered`]). Returns how many.
    pub fn collect_delivered(&self) -> usize {
        let Some(below) = self.min_delivered() else {
            return 0;
        };
        match self.wal.delete_before(below) {
            Ok(deleted) => {
                for s in &deleted {
                    tracing::debug!(segment = %s.path.display(), "deleted delivered segment");
                }
                metrics::counter!("walrelay_wal_segments_deleted_total", "reason" => "delivered")
                    .increment(deleted.len() as u64);
                deleted.len()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete delivered segments");
                0
            }
        }
    }

    /// Forgets the tombstones of records every replica has passed (all of
    /// them when no replica is configured: a replica added later starts at
    /// a position the log still holds).
    pub fn prune_tombstones(&self) {
        let below = self
            .min_delivered()
            .unwrap_or_else(|| self.wal.durable_end());
        if let Err(e) = self.wal.prune_tombstones(below) {
            tracing::warn!(error = %e, "cannot rewrite the tombstone file; retrying later");
        }
    }

    /// Resolves when a drop wants the samples of a segment counted now.
    pub async fn count_wanted(&self) {
        self.count_wanted.notified().await;
    }

    /// Counts the samples of segments written before a restart, oldest
    /// first, for up to [`COUNT_SLICE`] (at least one segment), when the
    /// disk budget may drop them. Housekeeping calls it every pass.
    pub fn count_ahead(&self) {
        if !self.budget_drops {
            return;
        }
        let started = Instant::now();
        for seg in self.wal.uncounted_segments() {
            if let Err(e) = self.wal.count_samples(&seg) {
                tracing::warn!(segment = %seg.path.display(), error = %e,
                    "cannot count the samples of a segment; retrying later");
            }
            if started.elapsed() >= COUNT_SLICE {
                return;
            }
        }
    }

    /// Deletes the oldest sealed segment even if replicas still need it, and
    /// accounts the loss per replica. Never reads a segment (see the module
    /// documentation). Returns false when nothing could go.
    pub fn drop_oldest(&self, reason: DropReason) -> bool {
        loop {
            let Some(oldest) = self.wal.segments().into_iter().next() else {
                return false;
            };
            match self.drop_exact(&oldest, reason) {
                Some(Dropped::Deleted { .. }) => return true,
                // Taken by another deletion meanwhile: the next one is oldest.
                Some(Dropped::Gone) => continue,
                _ => return false,
            }
        }
    }

    /// Deletes segments whose last write is older than the retention age.
    /// Counts a segment's samples first when needed (housekeeping, off the
    /// ingest path).
    pub fn enforce_age(&self) {
        let Some(max_age) = self.max_age else {
            return;
        };
        let Some(cutoff) = SystemTime::now().checked_sub(max_age) else {
            return;
        };
        loop {
            let segs = self.wal.segments();
            let Some(oldest) = segs.first() else { return };
            let old = std::fs::metadata(&oldest.path)
                .and_then(|m| m.modified())
                .map(|t| t < cutoff)
                .unwrap_or(false);
            if !(oldest.sealed && old) {
                return;
            }
            let mut dropped = self.drop_exact(oldest, DropReason::RetentionAge);
            if matches!(dropped, Some(Dropped::NotCounted)) {
                if let Err(e) = self.wal.count_samples(oldest) {
                    tracing::warn!(segment = %oldest.path.display(), error = %e,
                        "cannot count the samples of a segment; retrying later");
                }
                dropped = self.drop_exact(oldest, DropReason::RetentionAge);
            }
            match dropped {
                Some(Dropped::Deleted { .. } | Dropped::Gone) => continue,
                _ => return,
            }
        }
    }

    /// Drops exactly `victim`, logs which replicas lose which range, and
    /// counts it. None after an error (logged).
    fn drop_exact(&self, victim: &SegmentMeta, reason: DropReason) -> Option<Dropped> {
        let dropped = match self.wal.drop_segment(victim.first_seq, reason) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(segment = %victim.path.display(), error = %e,
                    reason = reason.as_str(), "cannot drop a segment");
                return None;
            }
        };
        match &dropped {
            Dropped::Deleted {
                segment,
                end,
                samples,
            } => {
                self.log_loss(segment, *end, *samples, reason);
                metrics::counter!("walrelay_wal_segments_deleted_total", "reason" => reason.as_str())
                    .increment(1);
            }
            Dropped::NotCounted => {
                let key = victim.first_seq + 1;
                if self.not_counted_logged.swap(key, Ordering::Relaxed) != key {
                    tracing::warn!(segment = %victim.path.display(), reason = reason.as_str(),
                        "the samples of the oldest segment are not counted yet (it was \
                         written before the restart); counting it now, the segment is \
                         dropped after that");
                }
                self.count_wanted.notify_one();
            }
            _ => {}
        }
        Some(dropped)
    }

    /// Logs which replicas lose which range of the deleted `segment`
    /// (records `segment.first_seq..end`). A reader already inside the
    /// segment keeps reading it through its open file and loses nothing;
    /// every other reader finds the tombstone.
    fn log_loss(&self, segment: &SegmentMeta, end: u64, samples: u64, reason: DropReason) {
        for r in self.replicas() {
            let needed = r.low_water();
            if needed < end {
                tracing::error!(
                    replica = %r.name,
                    from_seq = needed.max(segment.first_seq),
                    to_seq = end,
                    segment_samples = samples,
                    reason = reason.as_str(),
                    segment = %segment.path.display(),
                    "deleted records the replica has not received"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use wal_format::{PayloadEncoding, PayloadKind, RecordMeta, RecordRef};

    use super::*;
    use crate::wal::env::{ReadableFile, Storage, WritableFile};
    use crate::wal::sim::SimStorage;
    use crate::wal::{WalOptions, WalWriter};

    type Hook = Box<dyn FnOnce() + Send>;

    /// The simulated filesystem, counting the segment reads and running a
    /// hook at the first read of one file (another thread's deletion,
    /// landing exactly there).
    #[derive(Default)]
    struct Watched {
        inner: SimStorage,
        segment_reads: AtomicUsize,
        hook: Mutex<Option<(PathBuf, Hook)>>,
    }

    impl Storage for Watched {
        fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
            self.inner.create_new(path)
        }
        fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
            self.inner.open_append(path)
        }
        fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadableFile>> {
            if path.extension().is_some_and(|e| e == "wal") {
                self.segment_reads.fetch_add(1, Ordering::SeqCst);
            }
            let hook = {
                let mut h = self.hook.lock().unwrap();
                match h.take() {
                    Some((p, f)) if p == path => Some(f),
                    other => {
                        *h = other;
                        None
                    }
                }
            };
            if let Some(f) = hook {
                f();
            }
            self.inner.open_read(path)
        }
        fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
            self.inner.list(dir)
        }
        fn remove(&self, path: &Path) -> io::Result<()> {
            self.inner.remove(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.inner.rename(from, to)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.inner.sync_dir(dir)
        }
        fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
            self.inner.create_dir_all(dir)
        }
    }

    fn dir() -> PathBuf {
        PathBuf::from("/sim/wal")
    }

    fn open(storage: Arc<dyn Storage>) -> (WalWriter, Wal) {
        let options = WalOptions {
            segment_bytes: 4096,
            compression: wal_format::Compression::None,
            ..WalOptions::default()
        };
        let (w, wal, _) = crate::wal::open(storage, &dir(), options).unwrap();
        (w, wal)
    }

    fn meta(samples: u32) -> RecordMeta {
        RecordMeta {
            receive_time_ms: 1,
            min_sample_ts: 1,
            max_sample_ts: 1,
            samples,
            kind: PayloadKind::RemoteWriteV1,
            encoding: PayloadEncoding::Identity,
        }
    }

    /// The samples record `seq` is written with.
    fn samples_of(seq: u64) -> u32 {
        (seq % 7 + 1) as u32
    }

    /// Appends records until the log has `sealed` sealed segments.
    fn fill(w: &mut WalWriter, wal: &Wal, sealed: usize) {
        let payload = vec![3u8; 900];
        while wal.segments().iter().filter(|s| s.sealed).count() < sealed {
            let seq = w.next_seq();
            w.append(&[RecordRef {
                meta: meta(samples_of(seq)),
                payload: &payload,
            }])
            .unwrap();
            w.sync().unwrap();
        }
    }

    fn replica_at(position: u64) -> Vec<Arc<ReplicaState>> {
        vec![Arc::new(ReplicaState::new("r", "http://r", position))]
    }

    fn expected(from: u64, to: u64) -> u64 {
        (from..to).map(|s| u64::from(samples_of(s))).sum()
    }

    #[test]
    fn a_drop_racing_another_deletion_deletes_exactly_the_segment_it_accounted() {
        let storage = Arc::new(Watched::default());
        let (mut w, wal) = open(Arc::clone(&storage) as Arc<dyn Storage>);
        // Written before a restart, as it were: samples not noted.
        fill(&mut w, &wal, 4);
        let segs = wal.segments();
        let (a, b, c) = (segs[0].clone(), segs[1].first_seq, segs[2].first_seq);
        let retention = Retention::new(wal.clone(), None).with_budget_drops(true);
        // The replica has everything in a (not b): a concurrent pass that
        // deletes what was delivered takes a just as the drop looks at it.
        retention.set_replicas(replica_at(b));
        let concurrent = wal.clone();
        *storage.hook.lock().unwrap() = Some((
            a.path.clone(),
            Box::new(move || {
                concurrent.delete_before(b).unwrap();
            }),
        ));

        let dropped = retention.drop_oldest(DropReason::DiskBudget) || {
            retention.count_ahead();
            retention.drop_oldest(DropReason::DiskBudget)
        };

        assert!(dropped);
        assert!(storage.hook.lock().unwrap().is_none(), "the race happened");
        assert_eq!(
            wal.extent().first_seq,
            c,
            "a (delivered) and b (dropped) are gone"
        );
        assert_eq!(
            wal.dropped_in(b, c),
            (expected(b, c), Some("disk_budget")),
            "the deleted segment b has its tombstone"
        );
        assert_eq!(
            wal.dropped_in(a.first_seq, b),
            (0, None),
            "no tombstone for a segment that was not dropped"
        );
    }

    #[tokio::test]
    async fn a_drop_on_the_commit_path_reads_no_segment_and_accounts_every_sample() {
        use crate::commit::{Budget, Committer};
        use crate::types::FullPolicy;

        let storage = Arc::new(Watched::default());
        let (w, wal) = open(Arc::clone(&storage) as Arc<dyn Storage>);
        let retention = Arc::new(Retention::new(wal.clone(), None).with_budget_drops(true));
        retention.set_replicas(replica_at(0));
        let budget = Budget {
            max_disk_bytes: 16 << 10,
            policy: FullPolicy::DropOldest,
        };
        let (committer, thread) =
            Committer::start(w, wal.clone(), Arc::clone(&retention), budget).unwrap();
        for seq in 0..100u64 {
            let got = committer
                .append(meta(samples_of(seq)), bytes::Bytes::from(vec![5u8; 900]))
                .await
                .unwrap();
            assert_eq!(got, seq);
        }
        committer.stop();
        drop(committer);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();

        let first = wal.extent().first_seq;
        assert!(first > 0, "the budget dropped segments");
        assert_eq!(
            storage.segment_reads.load(Ordering::SeqCst),
            0,
            "no segment was read to drop it"
        );
        assert_eq!(
            wal.dropped_in(0, first),
            (expected(0, first), Some("disk_budget"))
        );
    }

    #[tokio::test]
    async fn a_budget_drop_before_a_segment_is_counted_refuses_the_batch_instead_of_decoding() {
        use crate::commit::{Budget, CommitError, Committer};
        use crate::types::FullPolicy;

        let storage = Arc::new(Watched::default());
        let (mut w, wal) = open(Arc::clone(&storage) as Arc<dyn Storage>);
        // Written before a restart: the samples are not known.
        fill(&mut w, &wal, 3);
        let end = wal.segments()[1].first_seq;
        let retention = Arc::new(Retention::new(wal.clone(), None).with_budget_drops(true));
        retention.set_replicas(replica_at(0));
        let budget = Budget {
            max_disk_bytes: wal.extent().bytes,
            policy: FullPolicy::DropOldest,
        };
        let (committer, thread) =
            Committer::start(w, wal.clone(), Arc::clone(&retention), budget).unwrap();
        let append = || committer.append(meta(1), bytes::Bytes::from(vec![5u8; 900]));

        let refused = append().await;
        assert!(
            matches!(refused, Err(CommitError::BudgetFull { .. })),
            "{refused:?}"
        );
        assert_eq!(storage.segment_reads.load(Ordering::SeqCst), 0);
        tokio::time::timeout(Duration::from_secs(30), retention.count_wanted())
            .await
            .expect("housekeeping is woken to count");
        // Housekeeping's pass.
        retention.count_ahead();
        assert!(storage.segment_reads.load(Ordering::SeqCst) > 0);
        append().await.unwrap();
        assert_eq!(
            wal.dropped_in(0, end),
            (expected(0, end), Some("disk_budget"))
        );

        committer.stop();
        drop(committer);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    #[test]
    fn tombstones_are_durable_before_a_crash_and_pruned_ones_stay_pruned() {
        let storage = Arc::new(SimStorage::new());
        let (mut w, wal) = open(Arc::clone(&storage) as Arc<dyn Storage>);
        let retention = Retention::new(wal.clone(), None).with_budget_drops(true);
        retention.set_replicas(replica_at(0));
        fill(&mut w, &wal, 3);
        assert!(retention.drop_oldest(DropReason::DiskBudget));
        assert!(retention.drop_oldest(DropReason::DiskBudget));
        let kept = wal.tombstones();
        assert_eq!(kept.len(), 2);
        let (second, end) = kept.iter().nth(1).map(|(f, s)| (*f, s.end)).unwrap();
        drop((w, wal));

        // Power loss: only what was synced is left.
        storage.crash(|_| 0);
        let (_w, wal) = open(Arc::clone(&storage) as Arc<dyn Storage>);
        assert_eq!(wal.load_tombstones().unwrap(), (2, None));
        assert_eq!(wal.tombstones(), kept);
        assert_eq!(wal.extent().first_seq, end, "both segments stay deleted");

        // The replica passes the first dropped segment: its tombstone goes,
        // on disk too.
        let retention = Retention::new(wal.clone(), None);
        retention.set_replicas(replica_at(second));
        retention.prune_tombstones();
        storage.crash(|_| 0);
        let (_w, wal) = open(Arc::clone(&storage) as Arc<dyn Storage>);
        assert_eq!(wal.load_tombstones().unwrap(), (1, None));
        assert_eq!(
            wal.dropped_in(0, end),
            (expected(second, end), Some("disk_budget"))
        );
    }
}
