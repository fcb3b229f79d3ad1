//! Sending one request to a replica, with remote-write retry semantics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoffBuilder;
use bytes::Bytes;
use prom_remote_write::content::{
    HEADER_EXEMPLARS_WRITTEN, HEADER_HISTOGRAMS_WRITTEN, HEADER_SAMPLES_WRITTEN,
};
use prom_remote_write::Protocol;

use super::policy::Answer;
use crate::auth::{ReplicaAuth, ReplicaAuthConfig};
use crate::tls::ClientTlsOptions;
use crate::types::{redact_url, StatusPolicy};

/// Float samples, histograms and exemplars of a 2.0 request, as sent or as
/// the replica says it wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrittenCounts {
    pub samples: u64,
    pub histograms: u64,
    pub exemplars: u64,
}

impl WrittenCounts {
    /// True when any count of `self` (written) is below `sent`'s.
    pub fn short_of(&self, sent: &WrittenCounts) -> bool {
        self.samples < sent.samples
            || self.histograms < sent.histograms
            || self.exemplars < sent.exemplars
    }
}

/// What a [`Sender`] reports while it sends: the shipper's implementation
/// ([`super::ReplicaState`]) keeps the replica's status and metrics, `wal
/// replay`'s its progress line and counts. Called from the sending task.
pub trait SendObserver: Send + Sync {
    /// Names the target in logs.
    fn name(&self) -> &str;
    /// An attempt ended after `took` with `status`, a label of
    /// `walrelay_replica_requests_total` ("2xx", "4xx", "413", "5xx",
    /// "429", "blocked", "timeout", "connection"); `retried`: it is tried
    /// again.
    fn attempt(&self, _status: &'static str, _took: Duration, _retried: bool) {}
    /// The request is being retried (or waited for) because of `reason`.
    fn retrying(&self, reason: String);
    /// The target refused the request for a reason that is not about the
    /// data (`reason`: "HTTP 401: body"); it stays blocked until an
    /// attempt gets through.
    fn blocked(&self, reason: String);
    /// The target stored the request.
    fn stored(&self);
    /// The target answered, whatever it said about the data: the path
    /// works again.
    fn answered(&self) {}
    /// `attempts` in a row got the same 5xx answer (0 when the last one did
    /// not).
    fn stuck(&self, _attempts: u64) {}
    /// A 2xx to a 2.0 request whose written counts are below what was sent.
    fn partial_write(&self, sent: &WrittenCounts, written: &WrittenCounts);
    /// A 2xx to a 2.0 request without usable written counts (`why`).
    fn unconfirmed_write(&self, why: &str);
}

/// One request's body and what the sender needs to know about it.
#[derive(Debug, Clone)]
pub struct Body {
    /// Snappy-compressed protobuf.
    pub bytes: Bytes,
    /// Which message `bytes` is: decides `Content-Type` and
    /// `X-Prometheus-Remote-Write-Version`.
    pub protocol: Protocol,
    /// Samples and histograms in it (for logs).
    pub samples: u64,
    /// 2.0: what it carries, compared with the replica's written counts.
    pub sent: Option<WrittenCounts>,
}

impl Body {
    /// A 1.0 request.
    pub fn v1(bytes: Bytes, samples: u64) -> Self {
        Body {
            bytes,
            protocol: Protocol::V1,
            samples,
            sent: None,
        }
    }
}

/// How one request ended, after retries. Every answer that is not one of
/// these (see [`super::policy`]) is retried for as long as it takes.
#[derive(Debug)]
pub enum Outcome {
    /// The replica answered 2xx. `slow`: only after the send timeout (see
    /// [`PATIENCE`]), so later requests should be smaller.
    Delivered { slow: bool },
    /// The replica refused the data (400, 409, 422, or a status the
    /// operator listed for it): a retry would get the same answer.
    /// `ambiguous` is true when an earlier attempt of this very request may
    /// have been stored (it timed out, or its connection broke after the
    /// request went out): Prometheus then refuses the re-send as out of
    /// order although it holds the data.
    Refused {
        status: u16,
        body: String,
        ambiguous: bool,
    },
    /// 413: the request is too large for the replica. The caller sends
    /// smaller ones; a single record refused so is rejected.
    TooLarge { body: String },
    /// Attempts kept timing out: the request is too slow for the replica as
    /// it is now. The caller splits it (only returned when it can).
    TooSlow,
    /// The replica refused the request for a reason that is not about the
    /// data ([`super::policy::Answer::Blocked`]) for
    /// [`SenderOptions::max_blocked_attempts`] attempts in a row. Only for a
    /// sender that was given that limit (`wal replay`, run by hand, stops
    /// and says why); a shipper retries for ever. Nothing was stored.
    Blocked { reason: String },
}

impl Outcome {
    /// A stable label for `walrelay_replica_requests_total`.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "2xx",
            Outcome::Refused { .. } => "4xx",
            Outcome::TooLarge { .. } => "413",
            Outcome::TooSlow => "timeout",
            Outcome::Blocked { .. } => "blocked",
        }
    }
}

/// Identical 5xx answers in a row after which the stuck request is logged
/// as a warning (once; `stuck_attempts` in the status counts them all).
const STUCK_WARN_ATTEMPTS: u64 = 10;

/// Consecutive timeouts after which a splittable request is given back.
const TIMEOUTS_BEFORE_SPLIT: u32 = 1;

/// An attempt not answered within the send timeout is slow, but it is only
/// given up after this many times the send timeout. A request given up may
/// still be stored by the replica, and then nothing but a re-send of exactly
/// it can tell: its parts, refused as out of order, must go record by
/// record (see [`super::policy`]). Waiting for the answer of a slow replica
/// keeps that rare; the caller makes the next requests smaller instead.
pub const PATIENCE: u32 = 4;

/// Settings of a replica's HTTP client.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    pub timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Used for `https://` URLs.
    pub tls: ClientTlsOptions,
    /// Which answers refuse the data.
    pub policy: StatusPolicy,
    /// Give up with [`Outcome::Blocked`] after this many blocked attempts
    /// in a row; `None` (shippers): retry for ever.
    pub max_blocked_attempts: Option<u64>,
    /// Sent with every request (operator-supplied). They cannot override
    /// the remote-write headers (content type, encoding, version).
    pub headers: Vec<(String, String)>,
    /// Credentials from files, re-read when they change; they win over an
    /// `Authorization` among the headers.
    pub auth: Option<ReplicaAuthConfig>,
}

/// A replica's HTTP client.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    url: reqwest::Url,
    options: SenderOptions,
    /// [`SenderOptions::headers`], checked.
    extra_headers: reqwest::header::HeaderMap,
    /// Credentials from files, re-read when they change; set last, so they
    /// win over an `Authorization` among the extra headers.
    auth: Option<Arc<ReplicaAuth>>,
}

/// One attempt's result.
enum Attempt {
    Done(Outcome),
    /// 2xx, with the written counts of a 2.0 response (`Ok(None)` when the
    /// replica sent none; always `Ok(None)` for 1.0).
    Delivered(Result<Option<WrittenCounts>, String>),
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        status: &'static str,
        /// The request may have reached the replica and been stored.
        ambiguous: bool,
        /// The answer is a fault of configuration or of the path
        /// ([`Answer::Blocked`]): the replica is blocked until it passes.
        blocked: bool,
    },
}

/// How often a replica that stays blocked is logged again.
const BLOCKED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Longest wait before retrying a request that could not connect at all.
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Longest response body kept for logs and status.
const MAX_ERROR_BODY: usize = 512;

/// Why a target's client cannot be built. Nothing in it is secret: the URL
/// is redacted, header values are not shown.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("credentials: {0}")]
    Credentials(#[from] crate::auth::AuthError),
    #[error("header name {name:?}: {reason}")]
    HeaderName { name: String, reason: String },
    #[error("value of header {name:?}: {reason}")]
    HeaderValue { name: String, reason: String },
    #[error("header {0:?} is set by the remote-write protocol")]
    ReservedHeader(String),
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
}

impl Sender {
    /// The client of target `name` (it labels the credentials' metric) at
    /// `url`.
    ///
    /// # Errors
    /// The URL does not parse, a TLS or credentials file is missing or bad,
    /// a header is not valid HTTP or is one the remote-write protocol sets
    /// itself, or the client cannot be built.
    pub fn new(name: &str, url: &str, options: SenderOptions) -> Result<Self, SenderError> {
        let url = reqwest::Url::parse(url).map_err(|e| SenderError::Url {
            url: redact_url(url),
            reason: e.to_string(),
        })?;
        // Our own rustls configuration, also for http:// URLs (where it is
        // unused): reqwest has no crypto provider of its own in this build.
        let tls = crate::tls::client_config(&options.tls)?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(options.timeout * PATIENCE)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(redirect_policy())
            .user_agent(concat!("walrelay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SenderError::Client)?;
        let extra_headers = header_map(&options.headers)?;
        let auth = options
            .auth
            .as_ref()
            .map(|a| ReplicaAuth::new(name, a))
            .transpose()?;
        Ok(Self {
            client,
            url,
            options,
            extra_headers,
            auth,
        })
    }

    /// Sends `body` (a snappy-compressed remote-write 1.0 or 2.0 request,
    /// with that protocol's headers) until the replica stores it, refuses
    /// its data, or finds it too large ([`super::policy`]). A 2xx to a 2.0
    /// request is checked against the `X-Prometheus-Remote-Write-*-Written`
    /// counts; a partial write is counted and logged, not retried (the
    /// replica decided to drop the rest, and would again). Every other
    /// answer is retried, with no give-up: exponential backoff and jitter,
    /// or the replica's `Retry-After` when it sends one (capped at the
    /// maximum backoff). An answer about configuration or the path (401,
    /// 404, ...) marks the replica blocked until an attempt gets through.
    ///
    /// With `splittable`, repeated timeouts give up with
    /// [`Outcome::TooSlow`] so the caller can send smaller requests.
    pub async fn send_with_retries(
        &self,
        state: &dyn SendObserver,
        body: Body,
        splittable: bool,
    ) -> Outcome {
        let samples = body.samples;
        let mut backoff = ExponentialBackoffBuilder::new()
            .with_initial_interval(self.options.min_backoff)
            .with_max_interval(self.options.max_backoff)
            .with_multiplier(2.0)
            .with_randomization_factor(0.3)
            .with_max_elapsed_time(None)
            .build();
        let mut ambiguous = false;
        let mut timeouts = 0u32;
        // The last 5xx answer ("HTTP 500: body") and how many attempts in a
        // row got exactly it: a record the replica refuses this way is
        // retried for ever, so it must show (status, metrics, an alert).
        let mut same_5xx: Option<(String, u64)> = None;
        // Since when, and how often, this request has been blocked; when it
        // was last logged.
        let mut blocked: Option<(Instant, u64, Instant)> = None;
        let outcome = loop {
            let started = Instant::now();
            let attempt = {
                let pending = self.attempt(&body);
                tokio::pin!(pending);
                tokio::select! {
                    a = &mut pending => a,
                    () = tokio::time::sleep(self.options.timeout) => {
                        // Slow, not given up: an answer may still come.
                        state.retrying(format!(
                            "timeout: no answer within {:?}; waiting for it up to {:?}",
                            self.options.timeout,
                            self.options.timeout * PATIENCE
                        ));
                        pending.await
                    }
                }
            };
            let took = started.elapsed();
            match attempt {
                Attempt::Done(mut outcome) => {
                    if let Outcome::Refused { ambiguous: a, .. } = &mut outcome {
                        *a = ambiguous;
                    }
                    state.attempt(outcome.label(), took, false);
                    if matches!(outcome, Outcome::Delivered { .. }) {
                        state.stored();
                    } else {
                        // Answered: whatever it says, the path works again.
                        state.answered();
                    }
                    break outcome;
                }
                Attempt::Delivered(written) => {
                    if let Some(sent) = &body.sent {
                        check_written(state, sent, written);
                    }
                    state.attempt("2xx", took, false);
                    state.stored();
                    break Outcome::Delivered {
                        slow: took > self.options.timeout,
                    };
                }
                Attempt::Retry {
                    reason,
                    retry_after,
                    status,
                    ambiguous: maybe_stored,
                    blocked: is_blocked,
                } => {
                    ambiguous |= maybe_stored;
                    if status == "timeout" {
                        timeouts += 1;
                        if splittable && timeouts >= TIMEOUTS_BEFORE_SPLIT {
                            state.attempt(status, took, false);
                            state.retrying(format!("{reason}; splitting the request"));
                            break Outcome::TooSlow;
                        }
                    } else {
                        timeouts = 0;
                    }
                    same_5xx = match same_5xx.take() {
                        Some((last, n)) if status == "5xx" && last == reason => Some((last, n + 1)),
                        _ if status == "5xx" => Some((reason.clone(), 1)),
                        _ => None,
                    };
                    let stuck = same_5xx.as_ref().map_or(0, |(_, n)| *n);
                    state.stuck(stuck);
                    if stuck == STUCK_WARN_ATTEMPTS {
                        tracing::warn!(replica = %state.name(), attempts = stuck, %reason,
                            "the replica keeps refusing the same request with the same 5xx answer; \
                             it is retried for ever (see stuck_attempts and in_flight in the status)");
                    }
                    state.attempt(status, took, true);
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
                    tracing::debug!(replica = %state.name(), %reason, wait_ms = wait.as_millis() as u64, samples,
                        "send failed; retrying");
                    if is_blocked {
                        let b = log_blocked(state, &reason, blocked);
                        blocked = Some(b);
                        if self
                            .options
                            .max_blocked_attempts
                            .is_some_and(|max| b.1 >= max)
                        {
                            state.retrying(reason.clone());
                            break Outcome::Blocked { reason };
                        }
                        state.blocked(reason);
                    } else {
                        if let Some((since, attempts, _)) = blocked.take() {
                            log_unblocked(state, since, attempts, Some(&reason));
                        }
                        state.retrying(reason);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        };
        if let Some((since, attempts, _)) = blocked {
            log_unblocked(state, since, attempts, None);
        }
        state.stuck(0);
        outcome
    }

    async fn attempt(&self, body: &Body) -> Attempt {
        // 1.0 keeps the bare media type most 1.0 senders (Prometheus
        // included) send; 2.0 must name its message.
        let content_type = match body.protocol {
            Protocol::V1 => prom_remote_write::content::MEDIA_TYPE_PROTOBUF,
            Protocol::V2 => prom_remote_write::content::CONTENT_TYPE_V2,
        };
        let mut headers = self.extra_headers.clone();
        if let Some(auth) = &self.auth {
            // A credentials file that holds nothing now sends nothing: not
            // an `Authorization` among the extra headers either.
            match auth.header() {
                Some(value) => headers.insert(reqwest::header::AUTHORIZATION, value),
                None => headers.remove(reqwest::header::AUTHORIZATION),
            };
        }
        let resp = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .header("Content-Type", content_type)
            .header(
                "Content-Encoding",
                prom_remote_write::content::CONTENT_ENCODING_SNAPPY,
            )
            .header(
                prom_remote_write::content::HEADER_VERSION,
                body.protocol.version_header(),
            )
            .body(body.bytes.clone())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                // The URL may hold a password; status and logs name the
                // replica's redacted URL instead.
                let e = e.without_url();
                if let Some(tls) = tls_refusal(&e) {
                    // A certificate either side refuses is configuration,
                    // like a 401: the request was never read.
                    return Attempt::Retry {
                        reason: format!("TLS certificate refused: {tls}"),
                        retry_after: None,
                        status: "blocked",
                        ambiguous: false,
                        blocked: true,
                    };
                }
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
                    blocked: false,
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
            let written = match body.protocol {
                Protocol::V1 => Ok(None),
                Protocol::V2 => parse_written(resp.headers()),
            };
            // Drain the body so the connection is reused.
            let _ = resp.bytes().await;
            return Attempt::Delivered(written);
        }
        let text = match resp.bytes().await {
            Ok(b) => String::from_utf8_lossy(&b[..b.len().min(MAX_ERROR_BODY)])
                .trim()
                .to_owned(),
            // reqwest names the URL in its errors, password and query included.
            Err(e) => format!("(body unreadable: {})", e.without_url()),
        };
        let code = status.as_u16();
        let reason = format!("HTTP {code}: {text}");
        match Answer::of(code, &self.options.policy) {
            // is_success() is 2xx: answered above.
            Answer::Stored => Attempt::Delivered(Ok(None)),
            Answer::DataRefused => Attempt::Done(Outcome::Refused {
                status: code,
                body: text,
                ambiguous: false,
            }),
            Answer::TooLarge => Attempt::Done(Outcome::TooLarge { body: text }),
            Answer::Overloaded => Attempt::Retry {
                reason,
                retry_after,
                status: if code == 429 { "429" } else { "5xx" },
                ambiguous: false,
                blocked: false,
            },
            Answer::Blocked => Attempt::Retry {
                reason,
                retry_after,
                status: "blocked",
                ambiguous: false,
                blocked: true,
            },
        }
    }
}

/// The operator's extra headers, checked: valid HTTP, and none that the
/// remote-write protocol sets itself.
fn header_map(headers: &[(String, String)]) -> Result<reqwest::header::HeaderMap, SenderError> {
    use reqwest::header::{HeaderName, HeaderValue};
    let mut map = reqwest::header::HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| SenderError::HeaderName {
            name: k.clone(),
            reason: e.to_string(),
        })?;
        if [
            "content-type",
            "content-encoding",
            "x-prometheus-remote-write-version",
        ]
        .contains(&name.as_str())
        {
            return Err(SenderError::ReservedHeader(k.clone()));
        }
        let value = HeaderValue::from_str(v).map_err(|e| SenderError::HeaderValue {
            name: k.clone(),
            reason: e.to_string(),
        })?;
        map.append(name, value);
    }
    Ok(map)
}

/// Redirects: 307 and 308 keep the method and the body, so they are
/// followed (a few times). 301, 302 and 303 would turn the POST into a GET
/// without a body, whose 2xx would pass for a delivery: they are not
/// followed, and the replica shows as blocked with the redirect as the
/// reason.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let keeps_body = matches!(attempt.status().as_u16(), 307 | 308);
        if keeps_body && attempt.previous().len() < 5 {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Logs a blocked attempt: loudly the first time and then once a
/// [`BLOCKED_LOG_EVERY`], quietly in between. Returns the updated
/// (since, attempts, last logged).
fn log_blocked(
    state: &dyn SendObserver,
    reason: &str,
    blocked: Option<(Instant, u64, Instant)>,
) -> (Instant, u64, Instant) {
    let now = Instant::now();
    let (since, attempts, logged) = match blocked {
        Some((since, n, logged)) => (since, n + 1, logged),
        None => {
            tracing::error!(replica = %state.name(), %reason,
                "replica refuses requests for a reason that is not about the data \
                 (credentials, route, proxy): nothing is skipped, the request is retried \
                 until the replica takes it (state \"blocked\")");
            return (now, 1, now);
        }
    };
    if now.duration_since(logged) >= BLOCKED_LOG_EVERY {
        tracing::error!(replica = %state.name(), %reason, attempts,
            blocked_for_s = since.elapsed().as_secs(), "replica still blocked; retrying");
        return (since, attempts, now);
    }
    tracing::debug!(replica = %state.name(), %reason, attempts, "replica blocked; retrying");
    (since, attempts, logged)
}

fn log_unblocked(state: &dyn SendObserver, since: Instant, attempts: u64, now: Option<&str>) {
    tracing::warn!(replica = %state.name(), attempts, blocked_for_s = since.elapsed().as_secs_f64(),
        now = now.unwrap_or("delivering"), "replica no longer blocked");
}

/// Compares a 2.0 response's written counts with what was sent, and counts
/// a partial or unconfirmed write.
fn check_written(
    state: &dyn SendObserver,
    sent: &WrittenCounts,
    written: Result<Option<WrittenCounts>, String>,
) {
    if *sent == WrittenCounts::default() {
        // Nothing to confirm (a request of series without samples).
        return;
    }
    match written {
        Ok(Some(w)) if w.short_of(sent) => state.partial_write(sent, &w),
        Ok(Some(_)) => {}
        Ok(None) => state.unconfirmed_write("no X-Prometheus-Remote-Write-*-Written headers"),
        Err(why) => state.unconfirmed_write(&why),
    }
}

/// The written counts of a 2xx answer to a 2.0 request. `Ok(None)` when
/// none of the three headers is there (a 1.0-only receiver); when some are,
/// a missing one means 0 written, as the 2.0 specification has receivers
/// send all three.
///
/// # Errors
/// A header whose value is not a count.
pub fn parse_written(
    headers: &reqwest::header::HeaderMap,
) -> Result<Option<WrittenCounts>, String> {
    let mut any = false;
    let mut get = |name: &str| -> Result<u64, String> {
        let Some(v) = headers.get(name) else {
            return Ok(0);
        };
        any = true;
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("header {name}: {v:?} is not a count"))
    };
    let w = WrittenCounts {
        samples: get(HEADER_SAMPLES_WRITTEN)?,
        histograms: get(HEADER_HISTOGRAMS_WRITTEN)?,
        exemplars: get(HEADER_EXEMPLARS_WRITTEN)?,
    };
    Ok(any.then_some(w))
}

/// Retry-After as seconds (the HTTP-date form is rare from remote-write
/// receivers and is treated as absent).
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The TLS error in `e`'s causes when it is a refused certificate: ours of
/// the replica's (a CA that did not sign it, an expired one, another name),
/// or the replica's of ours (an alert about our client certificate, or
/// none presented). Those are settings, not a path that may come back by
/// itself; any other TLS failure is a connection error.
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    use rustls::AlertDescription as A;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        // An I/O error hides its inner error (which may be another I/O
        // error) from `source()`.
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            cur = Some(inner);
            continue;
        }
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return match t {
                rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::AlertReceived(
                    A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::CertificateRequired,
                ) => Some(t.clone()),
                _ => None,
            };
        }
        cur = c.source();
    }
    None
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn written_counts_are_read_from_the_three_headers() {
        let h = headers(&[
            ("X-Prometheus-Remote-Write-Samples-Written", "12"),
            ("x-prometheus-remote-write-histograms-written", " 3 "),
            ("X-Prometheus-Remote-Write-Exemplars-Written", "1"),
        ]);
        assert_eq!(
            parse_written(&h).unwrap(),
            Some(WrittenCounts {
                samples: 12,
                histograms: 3,
                exemplars: 1
            })
        );
    }

    #[test]
    fn no_written_header_means_unconfirmed_and_a_missing_one_means_zero() {
        assert_eq!(parse_written(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            parse_written(&headers(&[(
                "X-Prometheus-Remote-Write-Samples-Written",
                "5"
            )]))
            .unwrap(),
            Some(WrittenCounts {
                samples: 5,
                histograms: 0,
                exemplars: 0
            })
        );
    }

    #[test]
    fn a_written_header_that_is_not_a_count_is_an_error_naming_it() {
        for bad in ["-1", "many", "1.5", ""] {
            let e = parse_written(&headers(&[(
                "X-Prometheus-Remote-Write-Histograms-Written",
                bad,
            )]))
            .unwrap_err();
            assert!(e.contains("Histograms-Written"), "{e}");
        }
    }

    /// Counts what a sender reports about written counts.
    #[derive(Default)]
    struct Writes {
        partial: std::sync::atomic::AtomicU64,
        unconfirmed: std::sync::atomic::AtomicU64,
    }

    impl SendObserver for Writes {
        fn name(&self) -> &str {
            "t"
        }
        fn retrying(&self, _: String) {}
        fn blocked(&self, _: String) {}
        fn stored(&self) {}
        fn partial_write(&self, _: &WrittenCounts, _: &WrittenCounts) {
            self.partial
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fn unconfirmed_write(&self, _: &str) {
            self.unconfirmed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl Writes {
        fn counts(&self) -> (u64, u64) {
            use std::sync::atomic::Ordering::Relaxed;
            (self.partial.load(Relaxed), self.unconfirmed.load(Relaxed))
        }
    }

    #[test]
    fn partial_and_unconfirmed_writes_are_reported_and_full_ones_are_not() {
        let writes = Writes::default();
        let sent = WrittenCounts {
            samples: 3,
            histograms: 1,
            exemplars: 1,
        };
        check_written(&writes, &sent, Ok(Some(sent)));
        check_written(&writes, &WrittenCounts::default(), Ok(None));
        assert_eq!(writes.counts(), (0, 0));
        check_written(
            &writes,
            &sent,
            Ok(Some(WrittenCounts {
                histograms: 0,
                ..sent
            })),
        );
        check_written(&writes, &sent, Ok(None));
        check_written(&writes, &sent, Err("header: bad".into()));
        assert_eq!(writes.counts(), (1, 2));
    }

    #[test]
    fn a_write_is_partial_when_any_count_is_below_what_was_sent() {
        let sent = WrittenCounts {
            samples: 10,
            histograms: 2,
            exemplars: 1,
        };
        assert!(!sent.short_of(&sent));
        let more = WrittenCounts {
            samples: 11,
            ..sent
        };
        assert!(!more.short_of(&sent));
        for w in [
            WrittenCounts { samples: 9, ..sent },
            WrittenCounts {
                histograms: 1,
                ..sent
            },
            WrittenCounts {
                exemplars: 0,
                ..sent
            },
        ] {
            assert!(w.short_of(&sent), "{w:?}");
        }
    }
}
