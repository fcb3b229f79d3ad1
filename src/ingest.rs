//! `POST /api/v1/write`: validate, append, wait for the group-commit fsync,
//! answer.
//!
//! The order of checks is the order a receiver must use so that nothing it
//! refuses is stored and every refusal is cheap: method (405), authentication
//! (401), concurrency (503), headers before the body is touched (415), declared
//! and actual body size (413), snappy with its declared decoded length checked
//! against the limit before allocating (413/400), protobuf that decodes as the
//! declared message and passes the label rules a replica would apply (400).
//! Only then is the decoded message appended to the log; the 204 goes out after
//! the fsync that covers it. A store that cannot take it answers 429 (disk
//! budget) or 503 (disk full, writer failed, shutting down) with Retry-After.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use prom_remote_write::content::{
    check_content_encoding, parse_content_type, HEADER_EXEMPLARS_WRITTEN,
    HEADER_HISTOGRAMS_WRITTEN, HEADER_SAMPLES_WRITTEN,
};
use prom_remote_write::{decode, Limits, Protocol};
use tokio::sync::Semaphore;
use wal_format::{PayloadEncoding, PayloadKind, RecordMeta};

use crate::auth::{Authenticator, Denied};
use crate::commit::{CommitError, Committer};

/// Settings and shared handles of the ingest path.
pub struct Ingest {
    pub committer: Committer,
    pub auth: Authenticator,
    pub max_body_bytes: usize,
    pub limits: Limits,
    pub permits: Arc<Semaphore>,
    /// How long a client may take to send its body (then 408).
    pub body_read_timeout: Duration,
}

pub type HttpResponse = Response<Full<Bytes>>;

/// A plain-text response with a reason.
pub fn text(status: StatusCode, msg: impl Into<String>) -> HttpResponse {
    let mut body = msg.into();
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn retry_later(status: StatusCode, secs: u32, msg: impl Into<String>) -> HttpResponse {
    let mut r = text(status, msg);
    r.headers_mut()
        .insert("Retry-After", HeaderValue::from(secs));
    r
}

fn now_ms() -> i64 {
    crate::ship::now_ms()
}

impl Ingest {
    /// Handles one write request; never fails (every error is a response).
    pub async fn handle(&self, req: Request<Incoming>) -> HttpResponse {
        let started = Instant::now();
        let (resp, samples) = self.handle_inner(req).await;
        let status = resp.status().as_u16().to_string();
        metrics::counter!("walrelay_ingest_requests_total", "status" => status).increment(1);
        metrics::histogram!("walrelay_ingest_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if resp.status().is_success() {
            metrics::counter!("walrelay_ingest_samples_total").increment(samples);
        }
        resp
    }

    async fn handle_inner(&self, req: Request<Incoming>) -> (HttpResponse, u64) {
        if req.method() != hyper::Method::POST {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {} not allowed; use POST", req.method()),
            );
            r.headers_mut()
                .insert("Allow", HeaderValue::from_static("POST"));
            return (r, 0);
        }
        if let Err(denied) = self.auth.check(req.headers()).await {
            return (self.unauthorized(denied), 0);
        }
        let Ok(_slot) = self.permits.try_acquire().map(InFlight::new) else {
            return (
                retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    1,
                    "too many concurrent requests; retry later",
                ),
                0,
            );
        };
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let protocol = match parse_content_type(header(CONTENT_TYPE)) {
            Ok(p) => p,
            Err(e) => return (text(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()), 0),
        };
        if let Err(e) = check_content_encoding(header(CONTENT_ENCODING)) {
            return (text(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string()), 0);
        }
        if let Some(len) = header(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok()) {
            if len > self.max_body_bytes as u64 {
                // Answered with the body unread, the connection is closed
                // while the client may still be sending; the unread bytes
                // make the kernel reset it, the 413 is lost, and the sender
                // sees a network error, which remote-write senders retry
                // for ever. So a body up to twice the limit is read and
                // discarded first (a client waiting for 100-continue sends
                // none).
                let waits_for_continue = req
                    .headers()
                    .get(hyper::header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                if len <= 2 * self.max_body_bytes as u64 && !waits_for_continue {
                    discard_body(req.into_body()).await;
                }
                return (self.body_too_large(), 0);
            }
        }
        let body = match self.read_body(req.into_body()).await {
            Ok(b) => b,
            Err(r) => return (r, 0),
        };
        metrics::counter!("walrelay_ingest_bytes_total").increment(body.len() as u64);
        let decoded = match decode::decompress_snappy(&body, self.limits.max_decoded_bytes) {
            Ok(d) => d,
            Err(e) => return (decode_error(&e), 0),
        };
        let summary = match decode::validate(protocol, &decoded, &self.limits) {
            Ok(s) => s,
            Err(e) => return (decode_error(&e), 0),
        };
        let meta = RecordMeta {
            receive_time_ms: now_ms(),
            min_sample_ts: summary.min_ts,
            max_sample_ts: summary.max_ts,
            samples: u32::try_from(summary.samples + summary.histograms).unwrap_or(u32::MAX),
            kind: match protocol {
                Protocol::V1 => PayloadKind::RemoteWriteV1,
                Protocol::V2 => PayloadKind::RemoteWriteV2,
            },
            encoding: PayloadEncoding::Identity,
        };
        let samples = summary.samples + summary.histograms;
        match self.committer.append(meta, Bytes::from(decoded)).await {
            Ok(_seq) => {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                if protocol == Protocol::V2 {
                    let h = r.headers_mut();
                    h.insert(HEADER_SAMPLES_WRITTEN, HeaderValue::from(summary.samples));
                    h.insert(
                        HEADER_HISTOGRAMS_WRITTEN,
                        HeaderValue::from(summary.histograms),
                    );
                    h.insert(
                        HEADER_EXEMPLARS_WRITTEN,
                        HeaderValue::from(summary.exemplars),
                    );
                }
                (r, samples)
            }
            Err(e) => (commit_error(&e), 0),
        }
    }

    fn unauthorized(&self, denied: Denied) -> HttpResponse {
        let what = match denied {
            Denied::Missing => "missing",
            Denied::Wrong => "wrong",
        };
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            format!("{what} credentials: {} required", self.auth.describe()),
        );
        for c in self.auth.challenges() {
            r.headers_mut().append("WWW-Authenticate", c);
        }
        r
    }

    fn body_too_large(&self) -> HttpResponse {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over the limit of {} bytes",
                self.max_body_bytes
            ),
        )
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, HttpResponse> {
        let limited = Limited::new(body, self.max_body_bytes);
        match tokio::time::timeout(self.body_read_timeout, limited.collect()).await {
            Err(_) => Err(text(
                StatusCode::REQUEST_TIMEOUT,
                "timed out reading the request body",
            )),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(self.body_too_large())
            }
            Ok(Err(e)) => Err(text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )),
        }
    }
}

/// A held concurrency slot. `walrelay_ingest_requests_in_flight` counts
/// them, so an operator (and a test) can see how close the relay is to
/// `--max-concurrent-requests`; the slot and the count go together on drop,
/// whichever way the request ends.
struct InFlight<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl<'a> InFlight<'a> {
    fn new(permit: tokio::sync::SemaphorePermit<'a>) -> Self {
        metrics::gauge!("walrelay_ingest_requests_in_flight").increment(1.0);
        Self { _permit: permit }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        metrics::gauge!("walrelay_ingest_requests_in_flight").decrement(1.0);
    }
}

/// How long [`discard_body`] reads at most.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a body to its end (for at most [`DISCARD_TIMEOUT`]), keeping none
/// of it.
async fn discard_body(mut body: Incoming) {
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

fn decode_error(e: &prom_remote_write::DecodeError) -> HttpResponse {
    metrics::counter!("walrelay_ingest_refused_total", "reason" => e.as_error_code()).increment(1);
    let status = if e.is_too_large() {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    text(status, e.to_string())
}

fn commit_error(e: &CommitError) -> HttpResponse {
    match e {
        CommitError::BudgetFull { .. } => {
            retry_later(StatusCode::TOO_MANY_REQUESTS, 5, e.to_string())
        }
        CommitError::NoSpace(_) | CommitError::Io(_) => {
            retry_later(StatusCode::SERVICE_UNAVAILABLE, 5, e.to_string())
        }
        CommitError::WriterFailed(_) => {
            retry_later(StatusCode::SERVICE_UNAVAILABLE, 30, e.to_string())
        }
        CommitError::ShuttingDown => retry_later(StatusCode::SERVICE_UNAVAILABLE, 5, e.to_string()),
    }
}
