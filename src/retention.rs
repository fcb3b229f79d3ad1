//! Deleting segments: normally only what every replica has, and under an
//! explicit limit (disk budget with `drop-oldest`, or `--retention` age) the
//! oldest segments whatever replicas still need them, with the loss counted
//! per replica and the exact lost range logged.
//!
//! With no replica configured nothing counts as delivered: a relay started
//! without replicas (a durable buffer replayed later, or one whose replicas
//! a reload adds) keeps everything it acknowledged, and only a limit (or an
//! operator) deletes it.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::ship::ReplicaState;
use crate::wal::segment::{Scan, SegmentCursor};
use crate::wal::{SegmentMeta, Wal};

/// See the module documentation.
pub struct Retention {
    wal: Wal,
    replicas: RwLock<Vec<Arc<ReplicaState>>>,
    max_age: Option<Duration>,
}

impl Retention {
    pub fn new(wal: Wal, max_age: Option<Duration>) -> Self {
        Self {
            wal,
            replicas: RwLock::new(Vec::new()),
            max_age,
        }
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
        self.wal.prune_tombstones(below);
    }

    /// Deletes the oldest sealed segment even if replicas still need it, and
    /// accounts the loss per replica. Returns false when nothing could go.
    pub fn drop_oldest(&self, reason: &'static str) -> bool {
        let Some(victim) = self.wal.segments().into_iter().next() else {
            return false;
        };
        let segs = self.wal.segments();
        let Some(next_first) = segs.get(1).map(|s| s.first_seq) else {
            return false;
        };
        if !victim.sealed {
            return false;
        }
        self.account_loss(&victim, next_first, reason);
        match self.wal.delete_oldest() {
            Ok(Some(_)) => {
                metrics::counter!("walrelay_wal_segments_deleted_total", "reason" => reason)
                    .increment(1);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "cannot delete the oldest segment");
                false
            }
        }
    }

    /// Deletes segments whose last write is older than the retention age.
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
            if !(oldest.sealed && old && self.drop_oldest("retention_age")) {
                return;
            }
        }
    }

    /// Leaves a tombstone with the samples of every record of `victim`, so
    /// each replica's reader accounts exactly what it loses (a reader already
    /// inside the segment keeps reading it through its open file and loses
    /// nothing), and logs which replicas will lose which range.
    fn account_loss(&self, victim: &SegmentMeta, next_first: u64, reason: &'static str) {
        let samples = self.samples_of(victim, next_first);
        self.wal.add_tombstone(victim.first_seq, samples, reason);
        for r in self.replicas() {
            let needed = r.low_water();
            if needed < next_first {
                tracing::error!(
                    replica = %r.name,
                    from_seq = needed.max(victim.first_seq),
                    to_seq = next_first,
                    reason,
                    segment = %victim.path.display(),
                    "deleting records the replica has not received"
                );
            }
        }
    }

    /// The samples of each record of `victim` (0 for records it cannot read).
    fn samples_of(&self, victim: &SegmentMeta, end: u64) -> Vec<u32> {
        let mut out = vec![0u32; end.saturating_sub(victim.first_seq) as usize];
        let storage = self.wal.storage();
        let Ok(mut c) =
            SegmentCursor::open(storage.as_ref(), &victim.path, victim.first_seq, victim.len)
        else {
            return out;
        };
        loop {
            match c.read_next() {
                Ok(Scan::Frame { records, .. }) => {
                    for r in records {
                        if let Some(slot) = r
                            .seq
                            .checked_sub(victim.first_seq)
                            .and_then(|i| out.get_mut(i as usize))
                        {
                            *slot = r.meta.samples;
                        }
                    }
                }
                Ok(Scan::Damage { .. }) => {}
                Ok(Scan::End) | Err(_) => return out,
            }
        }
    }
}
