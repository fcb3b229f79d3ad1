//! Sending one request to a replica, with remote-write retry semantics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use bytes::Bytes;

use super::state::ReplicaState;
use crate::auth::ReplicaAuth;
use crate::tls::ClientTlsOptions;

/// How one request ended, after retries.
#[derive(Debug)]
pub enum Outcome {
    /// The replica answered 2xx.
    Delivered,
    /// The replica answered a 4xx other than 429: it refuses the data, and a
    /// retry would get the same answer. `ambiguous` is true when an earlier
    /// attempt of this very request may have been stored (it timed out, or
    /// its connection broke after the request went out): Prometheus then
    /// refuses the re-send as out of order although it holds the data, so
    /// the refusal most likely means "already delivered".
    Rejected {
        status: u16,
        body: String,
        ambiguous: bool,
    },
    /// Attempts kept timing out: the request is too slow for the replica as
    /// it is now. The caller splits it (only returned when it can).
    TooSlow,
}

/// Consecutive timeouts after which a splittable request is given back.
const TIMEOUTS_BEFORE_SPLIT: u32 = 1;

/// Settings of a replica's HTTP client.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Used for `https://` URLs.
    pub tls: ClientTlsOptions,
}

/// A replica's HTTP client.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    url: reqwest::Url,
    options: SenderOptions,
    /// Sent with every request (operator-supplied, e.g. `walrelay wal replay
    /// --header`, and `Authorization` for a bearer token).
    extra_headers: reqwest::header::HeaderMap,
    /// Credentials from files, re-read when they change; set last, so they
    /// win over an `Authorization` among the extra headers.
    auth: Option<Arc<ReplicaAuth>>,
}

/// One attempt's result.
enum Attempt {
    Done(Outcome),
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        status: &'static str,
        /// The request may have reached the replica and been stored.
        ambiguous: bool,
    },
}

/// Longest wait before retrying a request that could not connect at all.
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Longest response body kept for logs and status.
const MAX_ERROR_BODY: usize = 512;

impl Sender {
    /// # Errors
    /// The URL does not parse, a TLS file is missing or bad, or the client
    /// cannot be built.
    pub fn new(url: &str, options: SenderOptions) -> Result<Self, String> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| format!("{}: {e}", crate::config::redact_url(url)))?;
        // Our own rustls configuration, also for http:// URLs (where it is
        // unused): reqwest has no crypto provider of its own in this build.
        let tls = crate::tls::client_config(&options.tls).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("walrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            url,
            options,
            extra_headers: reqwest::header::HeaderMap::new(),
            auth: None,
        })
    }

    /// Sends the credentials of `auth` with every request.
    pub fn with_auth(mut self, auth: Option<Arc<ReplicaAuth>>) -> Self {
        self.auth = auth;
        self
    }

    /// Adds headers sent with every request, and `Authorization: Bearer`
    /// when `bearer_token` is given. They cannot override the remote-write
    /// headers (content type, encoding, version).
    ///
    /// # Errors
    /// A header name or value is not valid HTTP, or names a header the
    /// remote-write protocol sets itself.
    pub fn with_headers(
        mut self,
        headers: &[(String, String)],
        bearer_token: Option<&str>,
    ) -> Result<Self, String> {
        use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION};
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("header name {k:?}: {e}"))?;
            if [
                "content-type",
                "content-encoding",
                "x-prometheus-remote-write-version",
            ]
            .contains(&name.as_str())
            {
                return Err(format!("header {k:?} is set by the remote-write protocol"));
            }
            let value =
                HeaderValue::from_str(v).map_err(|e| format!("value of header {k:?}: {e}"))?;
            self.extra_headers.append(name, value);
        }
        if let Some(token) = bearer_token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|e| format!("bearer token: {e}"))?;
            value.set_sensitive(true);
            self.extra_headers.insert(AUTHORIZATION, value);
        }
        Ok(self)
    }

    /// Sends `body` (a snappy-compressed remote-write 1.0 request) until the
    /// replica answers 2xx or a non-retryable 4xx. Retries wait with
    /// exponential backoff and jitter, or the replica's `Retry-After` when it
    /// sends one (capped at the maximum backoff).
    ///
    /// With `splittable`, repeated timeouts give up with
    /// [`Outcome::TooSlow`] so the caller can send smaller requests.
    pub async fn send_with_retries(
        &self,
        state: &ReplicaState,
        body: Bytes,
        samples: u64,
        splittable: bool,
    ) -> Outcome {
        let mut backoff = ExponentialBackoffBuilder::new()
            .with_initial_interval(self.options.min_backoff)
            .with_max_interval(self.options.max_backoff)
            .with_multiplier(2.0)
            .with_randomization_factor(0.3)
            .with_max_elapsed_time(None)
            .build();
        let mut ambiguous = false;
        let mut timeouts = 0u32;
        loop {
            let started = Instant::now();
            let attempt = self.attempt(body.clone()).await;
            metrics::histogram!("walrelay_replica_send_duration_seconds", "replica" => state.name.clone())
                .record(started.elapsed().as_secs_f64());
            match attempt {
                Attempt::Done(mut outcome) => {
                    if let Outcome::Rejected { ambiguous: a, .. } = &mut outcome {
                        *a = ambiguous;
                    }
                    let status = match &outcome {
                        Outcome::Delivered => "2xx",
                        Outcome::Rejected { .. } => "4xx",
                        Outcome::TooSlow => "timeout",
                    };
                    metrics::counter!("walrelay_replica_requests_total", "replica" => state.name.clone(), "status" => status)
                        .increment(1);
                    if matches!(outcome, Outcome::Delivered) {
                        state.set_ok();
                    }
                    return outcome;
                }
                Attempt::Retry {
                    reason,
                    retry_after,
                    status,
                    ambiguous: maybe_stored,
                } => {
                    ambiguous |= maybe_stored;
                    if status == "timeout" {
                        timeouts += 1;
                        if splittable && timeouts >= TIMEOUTS_BEFORE_SPLIT {
                            state.set_retrying(format!("{reason}; splitting the request"));
                            return Outcome::TooSlow;
                        }
                    } else {
                        timeouts = 0;
                    }
                    metrics::counter!("walrelay_replica_requests_total", "replica" => state.name.clone(), "status" => status)
                        .increment(1);
                    metrics::counter!("walrelay_replica_retries_total", "replica" => state.name.clone())
                        .increment(1);
                    let mut wait = backoff.next_backoff().unwrap_or(self.options.max_backoff);
                    if status == "connection" && !maybe_stored {
                        // No connection, so nothing reached the replica: it
                        // is down, not overloaded, and trying again costs it
                        // nothing. Retry soon, so that a replica that comes
                        // back is noticed within a second, not after a
                        // backoff grown through its whole outage.
                        wait = wait.min(CONNECT_RETRY_MAX);
                    }
                    // The replica's own Retry-After wins over the backoff,
                    // within the configured maximum.
                    let wait = retry_after.map_or(wait, |ra| ra.min(self.options.max_backoff));
                    tracing::debug!(replica = %state.name, %reason, wait_ms = wait.as_millis() as u64, samples,
                        "send failed; retrying");
                    state.set_retrying(reason);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn attempt(&self, body: Bytes) -> Attempt {
        let mut headers = self.extra_headers.clone();
        if let Some(value) = self.auth.as_ref().and_then(|a| a.header()) {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let resp = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                // The URL may hold a password; status and logs name the
                // replica's redacted URL instead.
                let e = e.without_url();
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                };
                // A refused connection never carried the request; a timeout
                // or a connection broken mid-request may have.
                return Attempt::Retry {
                    reason: format!("{kind} error: {}", error_chain(&e)),
                    retry_after: None,
                    status: kind,
                    ambiguous: !e.is_connect(),
                };
            }
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if status.is_success() {
            // Drain the body so the connection is reused.
            let _ = resp.bytes().await;
            return Attempt::Done(Outcome::Delivered);
        }
        let text = match resp.bytes().await {
            Ok(b) => String::from_utf8_lossy(&b[..b.len().min(MAX_ERROR_BODY)])
                .trim()
                .to_owned(),
            Err(e) => format!("(body unreadable: {e})"),
        };
        let code = status.as_u16();
        if code == 429 || status.is_server_error() {
            Attempt::Retry {
                reason: format!("HTTP {code}: {text}"),
                retry_after,
                status: if code == 429 { "429" } else { "5xx" },
                ambiguous: false,
            }
        } else {
            Attempt::Done(Outcome::Rejected {
                status: code,
                body: text,
                ambiguous: false,
            })
        }
    }
}

/// Retry-After as seconds (the HTTP-date form is rare from remote-write
/// receivers and is treated as absent).
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
