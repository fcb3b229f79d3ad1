//! The memory budget of ingest (`--max-inflight-decoded-bytes`).
//!
//! A write request holds its body and, once decompressed, its decoded form;
//! validation works on the decoded bytes. `--max-concurrent-requests` counts
//! requests, not bytes, so on its own it lets a few large requests hold
//! gigabytes. Every request therefore reserves what it will hold (its body
//! and the decoded size its snappy header declares) from one budget shared by
//! all requests, before it reads its body past that header, and keeps the
//! reservation until its answer. Memory held by requests in flight is then at
//! most the budget, whatever the concurrency (validation's working memory
//! comes on top, a small constant times the decoded bytes: see
//! `docs/configuration.md`, "Memory").
//!
//! The budget is a FIFO semaphore of KiB: a request that does not fit waits
//! in line for at most [`MemoryBudget::wait`], so a large request is not
//! passed over for ever by small ones, then is refused (503 with
//! `Retry-After`); a request larger than the whole budget could never fit
//! and is refused at once (413).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request got no reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The request alone needs more than the whole budget: it can never be
    /// served. Not recoverable by retrying (HTTP 413).
    #[error(
        "the request needs {needed} bytes of memory (body and decoded size), over \
         --max-inflight-decoded-bytes of {limit} bytes"
    )]
    OverBudget { needed: u64, limit: u64 },
    /// Requests in flight hold the budget and none finished in time.
    /// Recoverable: retry later (HTTP 503 with `Retry-After`).
    #[error(
        "the memory for requests in flight (--max-inflight-decoded-bytes, {limit} bytes) \
         stayed in use for {waited:?}; this request needs {needed} bytes; retry later"
    )]
    Busy {
        needed: u64,
        limit: u64,
        waited: Duration,
    },
}

/// The shared budget. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    /// The budget in bytes, as configured.
    limit: u64,
    /// The budget in permits (KiB, rounded down).
    total_kib: u64,
    wait: Duration,
}

/// Bytes per permit: a permit count is a `u32` per acquisition, so bytes
/// would cap one request at 4 GiB; KiB cap it at 4 TiB.
const UNIT: u64 = 1024;

impl MemoryBudget {
    /// A budget of `limit` bytes; a request waits at most `wait` for room.
    pub fn new(limit: u64, wait: Duration) -> Self {
        let total_kib = (limit / UNIT).min(Semaphore::MAX_PERMITS as u64);
        metrics::gauge!("walrelay_ingest_inflight_bytes_limit").set(limit as f64);
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            limit,
            total_kib,
            wait,
        }
    }

    /// The longest a request waits for room.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Reserves `bytes` (rounded up to a KiB), waiting in line for at most
    /// [`Self::wait`].
    ///
    /// # Errors
    /// [`Refused::OverBudget`] at once when `bytes` is more than the whole
    /// budget; [`Refused::Busy`] when the wait ran out.
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, Refused> {
        let kib = bytes.div_ceil(UNIT);
        let over = || Refused::OverBudget {
            needed: bytes,
            limit: self.limit,
        };
        if kib > self.total_kib {
            return Err(over());
        }
        let n = u32::try_from(kib).map_err(|_| over())?;
        let permit = if n == 0 {
            None
        } else {
            let acquire = Arc::clone(&self.permits).acquire_many_owned(n);
            match tokio::time::timeout(self.wait, acquire).await {
                Ok(Ok(p)) => Some(p),
                // The semaphore is never closed; a closed one is as good as
                // full.
                Ok(Err(_)) | Err(_) => {
                    return Err(Refused::Busy {
                        needed: bytes,
                        limit: self.limit,
                        waited: self.wait,
                    })
                }
            }
        };
        Ok(Reservation::new(permit))
    }

    /// Bytes reserved now.
    #[cfg(test)]
    fn reserved(&self) -> u64 {
        (self.total_kib - self.permits.available_permits() as u64) * UNIT
    }
}

/// Memory held for one request; given back on drop.
/// `walrelay_ingest_inflight_bytes` follows it.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    fn new(permit: Option<OwnedSemaphorePermit>) -> Self {
        let r = Reservation { permit };
        crate::metrics::hot()
            .ingest_inflight_bytes
            .increment(r.bytes() as f64);
        r
    }

    /// Bytes held (a multiple of a KiB).
    pub fn bytes(&self) -> u64 {
        self.permit
            .as_ref()
            .map_or(0, |p| p.num_permits() as u64 * UNIT)
    }

    /// Gives back what is held beyond `bytes` (rounded up to a KiB): for a
    /// body of unknown length, reserved at the largest allowed and then
    /// found shorter.
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = usize::try_from(bytes.div_ceil(UNIT)).unwrap_or(usize::MAX);
        let Some(p) = self.permit.as_mut() else {
            return;
        };
        let excess = p.num_permits().saturating_sub(keep);
        if excess > 0 {
            if let Some(given_back) = p.split(excess) {
                crate::metrics::hot()
                    .ingest_inflight_bytes
                    .decrement((excess as u64 * UNIT) as f64);
                drop(given_back);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        crate::metrics::hot()
            .ingest_inflight_bytes
            .decrement(self.bytes() as f64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const WAIT: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn reservations_are_given_back_when_dropped() {
        let b = MemoryBudget::new(10 << 10, WAIT);
        let r1 = b.reserve(4 << 10).await.unwrap();
        let r2 = b.reserve(1).await.unwrap();
        assert_eq!(
            (r1.bytes(), r2.bytes()),
            (4 << 10, 1 << 10),
            "rounded up to a KiB"
        );
        assert_eq!(b.reserved(), 5 << 10);
        drop(r1);
        drop(r2);
        assert_eq!(b.reserved(), 0);
        let r0 = b.reserve(0).await.unwrap();
        assert_eq!(r0.bytes(), 0, "an empty body reserves nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_whole_budget_is_refused_at_once() {
        let b = MemoryBudget::new(10 << 10, WAIT);
        let t = tokio::time::Instant::now();
        let e = b.reserve((10 << 10) + 1).await.unwrap_err();
        assert_eq!(
            e,
            Refused::OverBudget {
                needed: (10 << 10) + 1,
                limit: 10 << 10
            }
        );
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "no wait for what can never fit"
        );
        assert!(
            e.to_string().contains("--max-inflight-decoded-bytes"),
            "{e}"
        );
        assert!(matches!(
            b.reserve(u64::MAX).await,
            Err(Refused::OverBudget { .. })
        ));
        assert!(b.reserve(10 << 10).await.is_ok(), "the whole budget fits");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_does_not_fit_waits_then_is_refused_as_busy() {
        let b = MemoryBudget::new(10 << 10, WAIT);
        let _held = b.reserve(8 << 10).await.unwrap();
        let t = tokio::time::Instant::now();
        let e = b.reserve(4 << 10).await.unwrap_err();
        assert!(matches!(e, Refused::Busy { .. }), "{e:?}");
        assert_eq!(t.elapsed(), WAIT);
        assert_eq!(b.reserved(), 8 << 10, "a refused request holds nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_gets_in_when_room_is_given_back() {
        let b = Arc::new(MemoryBudget::new(10 << 10, WAIT));
        let held = b.reserve(8 << 10).await.unwrap();
        let waiter = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.reserve(4 << 10).await.map(|r| r.bytes()) }
        });
        tokio::time::sleep(WAIT / 2).await;
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(4 << 10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_request_in_line_is_not_passed_by_smaller_ones() {
        let b = Arc::new(MemoryBudget::new(10 << 10, WAIT));
        let held = b.reserve(6 << 10).await.unwrap();
        let reserve = |bytes: u64| {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.reserve(bytes).await.map(|r| r.bytes()) })
        };
        let large = reserve(8 << 10);
        tokio::task::yield_now().await;
        // 4 KiB are free, enough for the small one, but the large one is
        // first in line.
        let small = reserve(2 << 10);
        tokio::time::sleep(WAIT / 2).await;
        assert!(!small.is_finished(), "the small request waits its turn");
        drop(held);
        assert_eq!(large.await.unwrap(), Ok(8 << 10));
        assert_eq!(small.await.unwrap(), Ok(2 << 10));
    }

    #[tokio::test(start_paused = true)]
    async fn shrinking_gives_back_the_excess() {
        let b = MemoryBudget::new(10 << 10, WAIT);
        let mut r = b.reserve(8 << 10).await.unwrap();
        r.shrink_to(3000);
        assert_eq!(r.bytes(), 3 << 10);
        assert_eq!(b.reserved(), 3 << 10);
        r.shrink_to(1 << 20);
        assert_eq!(r.bytes(), 3 << 10, "never grows");
        drop(r);
        assert_eq!(b.reserved(), 0);
    }
}
