//! Whether a worker tries a request again, and how long it waits first.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::acklog::Outcome;

/// The longest `Retry-After` a worker honours: a relay asking for more is
/// asked again sooner rather than stalling the load.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

/// What a worker does after a request that was not acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryPolicy {
    /// Move on to the next request.
    Never,
    /// Like Prometheus: retry (same payload) on connection errors, timeouts,
    /// 5xx and 429; move on after any other 4xx.
    Retryable,
    /// Retry (same payload) until acknowledged or stopped.
    UntilAcked,
}

impl FromStr for RetryPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "never" => Ok(RetryPolicy::Never),
            "retryable" => Ok(RetryPolicy::Retryable),
            "until-acked" => Ok(RetryPolicy::UntilAcked),
            _ => bail!("retry policy must be never, retryable or until-acked, not {s:?}"),
        }
    }
}

impl fmt::Display for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RetryPolicy::Never => "never",
            RetryPolicy::Retryable => "retryable",
            RetryPolicy::UntilAcked => "until-acked",
        })
    }
}

/// The retries of one request: the policy, and a backoff that starts at
/// `backoff` and doubles up to `backoff_max` with every retry.
pub(super) struct Retry {
    policy: RetryPolicy,
    backoff: Duration,
    backoff_max: Duration,
}

impl Retry {
    pub(super) fn new(policy: RetryPolicy, backoff_min: Duration, backoff_max: Duration) -> Self {
        Retry {
            policy,
            backoff: backoff_min,
            backoff_max,
        }
    }

    /// After an attempt that came to `outcome`: `None` to move on, or how
    /// long to wait before trying the same payload again. A `Retry-After`
    /// answer is honoured (up to [`RETRY_AFTER_MAX`]) instead of the
    /// backoff, which still doubles.
    pub(super) fn after(&mut self, outcome: &Outcome) -> Option<Duration> {
        let (retry, wait) = match outcome {
            Outcome::Acked { .. } => (false, None),
            Outcome::Refused {
                status,
                retry_after,
                ..
            } => {
                let retry = match self.policy {
                    RetryPolicy::Never => false,
                    RetryPolicy::Retryable => *status >= 500 || *status == 429,
                    RetryPolicy::UntilAcked => true,
                };
                let wait = retry_after.map(|s| Duration::from_secs(s as u64).min(RETRY_AFTER_MAX));
                (retry, wait)
            }
            Outcome::Failed { .. } => (self.policy != RetryPolicy::Never, None),
        };
        if !retry {
            return None;
        }
        let wait = wait.unwrap_or(self.backoff);
        self.backoff = (self.backoff * 2).min(self.backoff_max);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: u16, retry_after: Option<u32>) -> Outcome {
        Outcome::Refused {
            status,
            body: String::new(),
            retry_after,
        }
    }

    fn failed() -> Outcome {
        Outcome::Failed {
            error: "connection refused".into(),
        }
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn backoff_doubles_from_min_up_to_max() {
        let mut retry = Retry::new(RetryPolicy::Retryable, ms(20), ms(100));
        let waits: Vec<_> = (0..5).map(|_| retry.after(&failed())).collect();
        assert_eq!(waits, [ms(20), ms(40), ms(80), ms(100), ms(100)].map(Some));
    }

    #[test]
    fn retry_after_is_honoured_up_to_ten_seconds_and_the_backoff_still_doubles() {
        let mut retry = Retry::new(RetryPolicy::Retryable, ms(20), ms(1000));
        assert_eq!(retry.after(&refused(429, Some(3))), Some(ms(3000)));
        assert_eq!(retry.after(&refused(503, Some(60))), Some(ms(10_000)));
        assert_eq!(retry.after(&refused(503, None)), Some(ms(80)));
    }

    #[test]
    fn each_policy_retries_what_it_says() {
        let cases = [
            (RetryPolicy::Never, [false, false, false, false]),
            (RetryPolicy::Retryable, [false, true, true, false]),
            (RetryPolicy::UntilAcked, [false, true, true, true]),
        ];
        for (policy, expected) in cases {
            let outcomes = [
                Outcome::Acked { status: 204 },
                failed(),
                refused(500, None),
                refused(400, None),
            ];
            let got = outcomes.map(|o| Retry::new(policy, ms(1), ms(1)).after(&o).is_some());
            assert_eq!(got, expected, "{policy}");
        }
    }
}
