//! The background thread that repacks sealed segments ([`Wal::repack`]).
//!
//! Which: sealed, readable segments that some replica still needs (a
//! segment every replica has passed is deleted by retention anyway), or
//! every sealed segment when no replica is configured (nothing is delivered
//! then, and the log is kept). With a dropping limit, only segments whose
//! samples are counted: a drop must be able to account them without
//! reading the segment, and counting reads it.
//!
//! In which order: newest first. Replicas catch up from the oldest end,
//! so the newest segments are the ones that stay longest on disk.
//!
//! At what cost: one segment at a time, on one thread with the lowest CPU
//! priority (nice 19), so that ingest and delivery always come first; on a
//! busy machine repacking simply falls behind. A copy is only started when
//! the filesystem has room for it beyond the space the commit path keeps
//! free, and it is at most about as large as its segment. A segment is looked at
//! once per generation: one that is already dense, not worth it or damaged
//! is left alone until the relay restarts; one whose repack failed (an I/O
//! error) is tried again a few seconds later.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::retention::Retention;
use crate::wal::repack::{RepackOptions, Repacked};
use crate::wal::{SegmentMeta, Wal};

/// The values of `walrelay_wal_repacks_total`'s `outcome` label.
pub const OUTCOMES: [&str; 7] = [
    "repacked",
    "already_dense",
    "not_worth",
    "damaged",
    "gone",
    "stopped",
    "error",
];

/// How long the thread sleeps when nothing is left to repack.
const IDLE: Duration = Duration::from_secs(5);

/// A running repacker; stops (and waits for its thread) on [`Self::stop`].
pub struct Repacker {
    stop: Arc<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The stop flag and a way to wake the idle thread.
#[derive(Default)]
struct Stop {
    raised: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Stop {
    /// Sleeps up to `d`, or until the flag is raised; true when raised.
    fn sleep(&self, d: Duration) -> bool {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .wake
            .wait_timeout_while(guard, d, |()| !self.raised.load(Ordering::Relaxed));
        self.raised.load(Ordering::Relaxed)
    }
}

impl Repacker {
    /// Starts the thread.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(
        wal: Wal,
        retention: Arc<Retention>,
        options: RepackOptions,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(Stop::default());
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("wal-repack".into())
            .spawn(move || run(&wal, &retention, options, &flag))?;
        Ok(Repacker {
            stop,
            thread: Some(thread),
        })
    }

    /// Raises the stop flag (a repack under way abandons its copy at its
    /// next frame) and waits for the thread.
    pub fn stop(mut self) {
        self.stop.raised.store(true, Ordering::Relaxed);
        self.stop.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(wal: &Wal, retention: &Retention, options: RepackOptions, stop: &Stop) {
    // Linux: a thread's nice value is its own.
    if let Err(e) = rustix::process::setpriority_process(None, 19) {
        tracing::debug!(error = %e, "cannot lower the repack thread's priority");
    }
    let mut looked_at: HashSet<(u64, u32)> = HashSet::new();
    while !stop.raised.load(Ordering::Relaxed) {
        let segments = wal.segments();
        let present: HashSet<u64> = segments.iter().map(|s| s.first_seq).collect();
        looked_at.retain(|(first, _)| present.contains(first));
        let Some(seg) = next_candidate(wal, retention, &segments, &looked_at) else {
            if stop.sleep(IDLE) {
                return;
            }
            continue;
        };
        if !room_for_a_copy(wal, &seg) {
            // The copy would take space ingest may need; a replica catching
            // up or a drop frees some, and repacking waits for that.
            if stop.sleep(IDLE) {
                return;
            }
            continue;
        }
        let outcome = wal.repack(seg.first_seq, options, &stop.raised);
        let failed = outcome.is_err();
        if !failed {
            looked_at.insert((seg.first_seq, seg.generation));
        }
        account(&seg, outcome);
        // An error (an I/O error, a full disk) is tried again, not at once.
        if failed && stop.sleep(IDLE) {
            return;
        }
    }
}

/// Whether the log's filesystem has room for a copy of `seg` (never larger
/// than the segment) besides the space the commit path keeps free. True when
/// the filesystem cannot tell.
fn room_for_a_copy(wal: &Wal, seg: &SegmentMeta) -> bool {
    crate::free_space::disk_space_left(wal.dir()).is_none_or(|left| left >= seg.len)
}

/// The newest segment worth a look, if any (see the module documentation).
fn next_candidate(
    wal: &Wal,
    retention: &Retention,
    segments: &[SegmentMeta],
    looked_at: &HashSet<(u64, u32)>,
) -> Option<SegmentMeta> {
    let needed_from = retention.min_delivered();
    let uncounted: HashSet<u64> = if wal.tracks_samples() {
        wal.uncounted_segments()
            .iter()
            .map(|s| s.first_seq)
            .collect()
    } else {
        HashSet::new()
    };
    segments
        .windows(2)
        .rev()
        .map(|w| (&w[0], w[1].first_seq))
        .filter(|(s, _)| s.sealed && s.unreadable.is_none())
        .filter(|(s, _)| !looked_at.contains(&(s.first_seq, s.generation)))
        .filter(|(s, _)| !uncounted.contains(&s.first_seq))
        .find(|(_, end)| needed_from.is_none_or(|low| low < *end))
        .map(|(s, _)| s.clone())
}

fn account(seg: &SegmentMeta, outcome: Result<Repacked, crate::wal::WalError>) {
    let label = match &outcome {
        Ok(Repacked::Done {
            before,
            after,
            records,
        }) => {
            tracing::debug!(segment = %seg.path.display(), before, after, records, "segment repacked");
            metrics::counter!("walrelay_wal_repack_saved_bytes_total")
                .increment(before.saturating_sub(*after));
            "repacked"
        }
        Ok(Repacked::AlreadyDense) => "already_dense",
        Ok(Repacked::NotWorth { .. }) => "not_worth",
        Ok(Repacked::Damaged { reason }) => {
            tracing::debug!(segment = %seg.path.display(), reason = %reason,
                "damaged segment not repacked");
            "damaged"
        }
        Ok(Repacked::Gone) => "gone",
        Ok(Repacked::Stopped) => "stopped",
        Err(e) => {
            tracing::warn!(segment = %seg.path.display(), error = %e,
                "cannot repack a segment; it stays as it is (every record is still in it)");
            "error"
        }
    };
    metrics::counter!("walrelay_wal_repacks_total", "outcome" => label).increment(1);
}
