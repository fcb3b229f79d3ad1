//! Per-replica rate limits: token buckets the shipper consults before each
//! request.
//!
//! Each limit (samples per second, bytes per second) is a bucket that refills
//! at its rate and holds at most one second's worth (the burst). A request of
//! `n` waits until the bucket holds `n`, then takes it. A request larger than
//! the burst can never find that many tokens; it waits for a full bucket and
//! then takes all of it and more, leaving the bucket in debt, so the next
//! request waits for the debt to be repaid: the average stays at the rate and
//! nothing deadlocks. The shipper also caps its batches at one second's worth
//! (see [`RateLimits::cap`]), so that case is rare and pacing stays smooth.
//!
//! Waits are computed from `tokio::time::Instant`, so tests run them under
//! paused time.

use std::time::Duration;

use tokio::time::Instant;

use super::BatchLimits;

/// A replica's configured limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateLimits {
    pub max_samples_per_second: u64,
    pub max_bytes_per_second: u64,
}

impl RateLimits {
    /// True when neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.max_samples_per_second == 0 && self.max_bytes_per_second == 0
    }

    /// Caps batch limits at one second's worth of each limit, so that one
    /// request never takes more than the bucket can hold and requests are
    /// spread over the second instead of arriving as one burst and a pause.
    pub fn cap(&self, limits: BatchLimits) -> BatchLimits {
        let cap = |limit: u64, rate: u64| if rate == 0 { limit } else { limit.min(rate) };
        BatchLimits {
            max_samples: cap(limits.max_samples, self.max_samples_per_second).max(1),
            max_bytes: cap(limits.max_bytes as u64, self.max_bytes_per_second).max(1) as usize,
        }
    }
}

/// One token bucket. See the module documentation.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second, > 0.
    rate: f64,
    /// Most tokens held: one second's worth.
    burst: f64,
    /// Tokens at `at`; negative while in debt after an oversized request.
    tokens: f64,
    /// When `tokens` was computed. Can lie in the future: a request that
    /// waits is charged at the moment it will go.
    at: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `per_second` tokens per second; `None`
    /// for 0 (unlimited).
    pub fn new(per_second: u64, now: Instant) -> Option<Self> {
        (per_second > 0).then(|| {
            let rate = per_second as f64;
            Self {
                rate,
                burst: rate,
                tokens: rate,
                at: now,
            }
        })
    }

    /// Tokens held at `now` (before any charge at `now`).
    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.burst)
    }

    /// How long from `now` a request of `n` tokens must wait.
    pub fn wait_for(&self, n: u64, now: Instant) -> Duration {
        // Never more than the bucket can hold, or an oversized request
        // would wait forever.
        let needed = (n as f64).min(self.burst);
        // A bucket charged for a request still waiting holds nothing
        // before that request goes.
        let start = now.max(self.at);
        let missing = needed - self.tokens_at(start);
        let wait = if missing > 0.0 {
            Duration::from_secs_f64(missing / self.rate)
        } else {
            Duration::ZERO
        };
        start.saturating_duration_since(now) + wait
    }

    /// Takes `n` tokens at `at` (when the request goes), possibly into debt.
    pub fn take(&mut self, n: u64, at: Instant) {
        self.tokens = self.tokens_at(at) - n as f64;
        self.at = self.at.max(at);
    }
}

/// A replica's buckets, one per configured limit.
#[derive(Debug, Clone)]
pub struct Limiter {
    samples: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl Limiter {
    pub fn new(limits: RateLimits) -> Self {
        let now = Instant::now();
        Self {
            samples: TokenBucket::new(limits.max_samples_per_second, now),
            bytes: TokenBucket::new(limits.max_bytes_per_second, now),
        }
    }

    /// How long a request of `samples` and `bytes` must wait from `now`,
    /// and charges both buckets for it at the moment it will go. Both are
    /// charged at the same moment so that neither bucket refills for time
    /// the request spent waiting on the other.
    pub fn reserve(&mut self, samples: u64, bytes: u64, now: Instant) -> Duration {
        let wait = [(&self.samples, samples), (&self.bytes, bytes)]
            .into_iter()
            .filter_map(|(b, n)| b.as_ref().map(|b| b.wait_for(n, now)))
            .max()
            .unwrap_or(Duration::ZERO);
        let at = now + wait;
        for (b, n) in [(&mut self.samples, samples), (&mut self.bytes, bytes)] {
            if let Some(b) = b {
                b.take(n, at);
            }
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn limiter(samples: u64, bytes: u64) -> Limiter {
        Limiter::new(RateLimits {
            max_samples_per_second: samples,
            max_bytes_per_second: bytes,
        })
    }

    /// Sends `requests` through the limiter, sleeping as told, and returns
    /// the paused clock's elapsed time.
    async fn run(l: &mut Limiter, requests: &[(u64, u64)]) -> Duration {
        let started = Instant::now();
        for &(s, b) in requests {
            let wait = l.reserve(s, b, Instant::now());
            tokio::time::sleep(wait).await;
        }
        started.elapsed()
    }

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_millis(5)
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let mut l = limiter(0, 0);
        let took = run(&mut l, &[(1_000_000, 1 << 30); 10]).await;
        assert_eq!(took, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_lets_one_seconds_worth_through_at_once_then_paces() {
        let mut l = limiter(1000, 0);
        // The first second's worth goes at once (the burst) ...
        assert_eq!(run(&mut l, &[(250, 0); 4]).await, Duration::ZERO);
        // ... then each 250 waits a quarter of a second.
        let took = run(&mut l, &[(250, 0); 8]).await;
        assert!(close(took, Duration::from_secs(2)), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_refills_with_time_but_never_above_the_burst() {
        let mut l = limiter(1000, 0);
        run(&mut l, &[(1000, 0)]).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Ten idle seconds still allow only one second's worth at once.
        assert_eq!(run(&mut l, &[(1000, 0)]).await, Duration::ZERO);
        let took = run(&mut l, &[(500, 0)]).await;
        assert!(close(took, Duration::from_millis(500)), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_burst_goes_and_the_next_waits_for_the_debt() {
        let mut l = limiter(100, 0);
        // Five seconds' worth: goes at once from a full bucket (no deadlock)
        // and leaves four seconds of debt.
        assert_eq!(run(&mut l, &[(500, 0)]).await, Duration::ZERO);
        let took = run(&mut l, &[(100, 0)]).await;
        assert!(close(took, Duration::from_secs(5)), "{took:?}");
        // From an empty bucket an oversized request waits for a full one.
        let mut l = limiter(100, 0);
        run(&mut l, &[(100, 0)]).await;
        let took = run(&mut l, &[(300, 0)]).await;
        assert!(close(took, Duration::from_secs(1)), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_stricter_limit_sets_the_pace_and_both_are_charged() {
        // 10 kB/s binds before 1M samples/s.
        let mut l = limiter(1_000_000, 10_000);
        let took = run(&mut l, &[(10, 5_000); 6]).await;
        // 30 kB: the first 10 kB at once, then 20 kB at 10 kB/s.
        assert!(close(took, Duration::from_secs(2)), "{took:?}");
        let mut l = limiter(100, 1 << 30);
        let took = run(&mut l, &[(50, 1); 6]).await;
        assert!(close(took, Duration::from_secs(2)), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn over_a_long_run_the_rate_is_the_limit() {
        let mut l = limiter(1000, 0);
        // Uneven requests, none above the burst: 100 s of tokens plus the
        // initial burst.
        let sizes: Vec<(u64, u64)> = (0..1010u64).map(|i| (1 + (i * 37) % 199, 0)).collect();
        let total: u64 = sizes.iter().map(|s| s.0).sum();
        let took = run(&mut l, &sizes).await.as_secs_f64();
        let rate = (total - 1000) as f64 / took;
        assert!((rate - 1000.0).abs() < 10.0, "rate {rate} over {took} s");
    }

    #[test]
    fn batches_are_capped_at_one_seconds_worth() {
        let batch = BatchLimits {
            max_samples: 20_000,
            max_bytes: 8 << 20,
        };
        let capped = RateLimits {
            max_samples_per_second: 500,
            max_bytes_per_second: 0,
        }
        .cap(batch);
        assert_eq!(capped.max_samples, 500);
        assert_eq!(capped.max_bytes, 8 << 20);
        let capped = RateLimits {
            max_samples_per_second: 0,
            max_bytes_per_second: 1 << 20,
        }
        .cap(batch);
        assert_eq!((capped.max_samples, capped.max_bytes), (20_000, 1 << 20));
        assert_eq!(RateLimits::default().cap(batch).max_samples, 20_000);
    }
}
