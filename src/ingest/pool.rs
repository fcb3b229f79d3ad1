//! Where ingest decompresses and validates a request: off the runtime's
//! worker threads when the request is large.
//!
//! Decompressing and validating a maximal request is seconds of CPU with
//! no await point. Run on a worker thread, it keeps every task queued
//! behind it on that thread waiting, and with one such request per worker
//! (two on a 2-core machine) nothing else runs: `/-/healthy` times out and
//! the kubelet restarts a relay that was only busy. Large requests therefore
//! run on tokio's blocking threads, at most one per core at a time (more
//! would only share the same cores and hold more decoded bytes at once);
//! the workers stay free for I/O, health, metrics and small requests.
//! Requests below [`INLINE_BELOW`] decoded bytes run where they are: they
//! take half a millisecond or less in the usual shapes, and the hand-off
//! costs them more than it spares (see [`INLINE_BELOW`]).

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Decoded size below which a request is validated on the worker thread.
///
/// Measured (release build, 2 vCPU, 2026-12-03): a hand-off to a blocking
/// thread and back costs 3 to 10 µs; decompression and validation run at
/// ~480 MB/s for plain 1.0 requests (8-label series) and at 20-25 MB/s for
/// the densest shapes decoded into structs. At 256 KiB a request thus
/// takes ~0.55 ms inline, and at most ~12 ms in the densest shape: a
/// worker busy that long still answers `/-/healthy` well within any probe's
/// timeout, and the other worker steals what is queued behind it.
///
/// The hand-off costs more than its own 3-10 µs under load: with 16
/// senders, tokio's blocking pool (its lock, and its threads parking and
/// waking per request) was ~11 % of the relay's CPU. Moved from 64 KiB
/// (which sent the benchmark's 500- and 1000-series requests, 75 and 150
/// KB decoded, to the pool) on three alternated A/B pairs of the
/// benchmark's sweep (2026-12-04, `benches/e2e/results/issue19-inline/`):
/// 16 × 500 0.87x the CPU per sample and 1.12x the samples/s; 4 × 500
/// 0.89x the CPU, ack p50 0.57-0.62 ms against 0.66-0.75; 8 × 1000 within
/// noise (0.96x the CPU).
pub const INLINE_BELOW: usize = 256 << 10;

/// A bound on the CPU-heavy work running at once.
#[derive(Debug)]
pub struct DecodePool {
    slots: Arc<Semaphore>,
    inline_below: usize,
}

/// The work panicked (a bug: the decoders are fuzzed not to).
#[derive(Debug, thiserror::Error)]
#[error("decoding the request failed unexpectedly: {0}")]
pub struct Panicked(String);

impl DecodePool {
    /// At most `threads` large requests at once; requests under
    /// `inline_below` decoded bytes run inline.
    pub fn new(threads: usize, inline_below: usize) -> Self {
        DecodePool {
            slots: Arc::new(Semaphore::new(threads.max(1))),
            inline_below,
        }
    }

    /// One slot per core the process may use.
    pub fn per_core() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self::new(cores, INLINE_BELOW)
    }

    /// Runs `work` (for a request of `size` decoded bytes) inline or on a
    /// blocking thread, waiting for a slot.
    ///
    /// # Errors
    /// [`Panicked`] when the work panicked on a blocking thread.
    pub async fn run<T, F>(&self, size: usize, work: F) -> Result<T, Panicked>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if size < self.inline_below {
            // As a blocking thread's panic is: an answer, not a torn
            // connection.
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|_| Panicked("the work panicked".into()));
        }
        // The semaphore is never closed.
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|e| Panicked(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            // The slot is held by the thread doing the work, not by the
            // caller: a caller that goes away does not free it early.
            let _slot = slot;
            work()
        })
        .await
        .map_err(|e| Panicked(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn small_work_runs_inline_and_large_work_on_another_thread() {
        let pool = DecodePool::new(2, 1000);
        let here = std::thread::current().id();
        let small = pool.run(999, || std::thread::current().id()).await.unwrap();
        let large = pool
            .run(1000, || std::thread::current().id())
            .await
            .unwrap();
        assert_eq!(small, here);
        assert_ne!(large, here);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_than_the_slots_run_at_once() {
        let pool = Arc::new(DecodePool::new(2, 0));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (pool, running, most) =
                    (Arc::clone(&pool), Arc::clone(&running), Arc::clone(&most));
                tokio::spawn(async move {
                    pool.run(1, move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                    .unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?}");
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_an_error_not_a_crash() {
        let pool = DecodePool::new(1, 0);
        let r: Result<(), _> = pool.run(1, || panic!("boom")).await;
        assert!(r.is_err());
        assert_eq!(pool.run(1, || 7).await.unwrap(), 7, "the slot came back");
        // Inline too: the request is answered, its connection not torn.
        let pool = DecodePool::new(1, 1000);
        let here = std::thread::current().id();
        let r = pool
            .run(1, move || {
                assert_eq!(std::thread::current().id(), here);
                panic!("boom")
            })
            .await;
        assert!(matches!(r, Err(Panicked(_))));
    }
}
