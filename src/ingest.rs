//! `POST /api/v1/write`: validate, append, wait for the group-commit fsync,
//! answer.
//!
//! The order of checks is the order a receiver must use so that nothing it
//! refuses is stored and every refusal is cheap: method (405), concurrency
//! (503), authentication (401; 503 when every slot for a bcrypt check is
//! taken), headers before the body is touched (415), declared
//! body size (413); then the memory the request will hold (its body and the
//! decoded size its snappy header declares) is reserved from the shared
//! budget before the rest of the body is read (503 after a short wait, see
//! [`budget`]); actual body size (413), snappy with its declared decoded
//! length checked against the limit before allocating (413/400), protobuf
//! that decodes as the declared message and passes the label rules a replica
//! would apply (400), large requests on a bounded blocking pool (see
//! [`pool`]). Only then is the decoded message appended to the log; the 204
//! goes out after the fsync that covers it. A store that cannot take it
//! answers 429 (disk budget) or 503 (disk full, writer failed, shutting
//! down) with Retry-After.

pub mod budget;
pub mod pool;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use prom_remote_write::content::{
    check_content_encoding, parse_content_type, HEADER_EXEMPLARS_WRITTEN,
    HEADER_HISTOGRAMS_WRITTEN, HEADER_SAMPLES_WRITTEN,
};
use prom_remote_write::{decode, DecodeError, Limits, Protocol, Summary};
use tokio::sync::Semaphore;
use tokio::time::Instant as Deadline;
use wal_format::{PayloadEncoding, PayloadKind, RecordMeta};

use crate::auth::{Authenticator, Denied};
use crate::commit::{CommitError, Committer};
use crate::types::now_ms;
use budget::{MemoryBudget, Refused, Reservation};
use pool::DecodePool;

/// Settings and shared handles of the ingest path.
pub struct Ingest {
    pub committer: Committer,
    pub auth: Authenticator,
    pub max_body_bytes: usize,
    pub limits: Limits,
    pub permits: Arc<Semaphore>,
    /// Memory of the requests in flight (`--max-inflight-decoded-bytes`).
    pub budget: MemoryBudget,
    /// Where large requests are decompressed and validated.
    pub pool: DecodePool,
    /// How long a client may take to send its body (then 408).
    pub body_read_timeout: Duration,
}

/// A body read in full, with the memory reserved for it.
struct Received {
    body: Bytes,
    /// The decoded size the snappy header declares, when it is readable
    /// and within the limit (else decompression refuses the body).
    declared: Option<usize>,
    reservation: Reservation,
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

impl Ingest {
    /// Handles one write request; never fails (every error is a response).
    pub async fn handle(&self, req: Request<Incoming>) -> HttpResponse {
        let started = Instant::now();
        let (resp, samples) = self.handle_inner(req).await;
        let hot = crate::metrics::hot();
        if resp.status() == StatusCode::NO_CONTENT {
            hot.ingest_stored.increment(1);
        } else {
            let status = resp.status().as_u16().to_string();
            metrics::counter!("walrelay_ingest_requests_total", "status" => status).increment(1);
        }
        hot.ingest_duration.record(started.elapsed().as_secs_f64());
        if resp.status().is_success() {
            hot.ingest_samples.increment(samples);
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
        // The slot first: authentication may cost a bcrypt check, and that
        // work too must count against the requests handled at once.
        let Ok(_slot) = self.permits.try_acquire().map(InFlight::new) else {
            metrics::counter!("walrelay_ingest_overloaded_total", "reason" => "concurrency")
                .increment(1);
            return (
                retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    1,
                    "too many concurrent requests; retry later",
                ),
                0,
            );
        };
        if let Err(denied) = self.auth.check(req.headers()).await {
            return (self.unauthorized(denied), 0);
        }
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
        let content_length = header(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        let waits_for_continue = req
            .headers()
            .get(hyper::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if let Some(len) = content_length {
            if len > self.max_body_bytes as u64 {
                let r = self.body_too_large();
                let r = self
                    .refuse_unread(req.into_body(), content_length, waits_for_continue, r)
                    .await;
                return (r, 0);
            }
        }
        let received = match self.read_body(req.into_body(), content_length).await {
            Ok(b) => b,
            Err(r) => return (r, 0),
        };
        crate::metrics::hot()
            .ingest_bytes
            .increment(received.body.len() as u64);
        // Not a task of its own: the reservation goes with the work that
        // holds the memory (to the blocking pool and back, then to the
        // commit thread), so a client that goes away drops this handler
        // without releasing the memory of a decoding or an append still
        // under way. A spawn per request cost a task and the wake of an
        // idle worker to steal it (issue 19).
        self.store(received, protocol).await
    }

    /// The 401 for a request without the credentials ingest asks for, with
    /// one challenge per accepted scheme (also `POST /-/reload`'s).
    pub fn unauthorized(&self, denied: Denied) -> HttpResponse {
        let what = match denied {
            Denied::Missing => "missing",
            Denied::Wrong => "wrong",
            Denied::Busy => {
                metrics::counter!("walrelay_ingest_overloaded_total", "reason" => "password_checks")
                    .increment(1);
                return retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    1,
                    "too many password checks at once; retry later",
                );
            }
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

    /// Reads the body: first its snappy header (the declared decoded size),
    /// then, with the memory for the body and the decoded size reserved, the
    /// rest. A body of unknown length (chunked) reserves the largest body
    /// allowed, given back once its length is known.
    async fn read_body(
        &self,
        mut body: Incoming,
        content_length: Option<u64>,
    ) -> Result<Received, HttpResponse> {
        let deadline = Deadline::now() + self.body_read_timeout;
        let mut chunks = Vec::new();
        let mut len = 0usize;
        let mut ended = false;
        let declared = loop {
            if let Some(header) = snappy_header(&chunks) {
                break header;
            }
            match self.next_chunk(&mut body, deadline).await? {
                Some(c) if len + c.len() > self.max_body_bytes => return Err(self.body_too_large()),
                Some(c) => {
                    len += c.len();
                    chunks.push(c);
                }
                None => {
                    ended = true;
                    break snappy_header(&chunks).flatten();
                }
            }
        };
        // Over the limit (or unreadable): decompression refuses it before
        // allocating anything, so only the body is held.
        let declared = declared.filter(|&d| d <= self.limits.max_decoded_bytes);
        let body_bytes = content_length.unwrap_or(self.max_body_bytes as u64);
        let needed = body_bytes.saturating_add(declared.unwrap_or(0) as u64);
        let mut reservation = match self.budget.reserve(needed).await {
            Ok(r) => r,
            Err(refused) => {
                let r = budget_refusal(&refused);
                // The body was asked for (a client waiting for
                // 100-continue got it), so the client is sending.
                return Err(if ended {
                    r
                } else {
                    self.refuse_unread(body, content_length, false, r).await
                });
            }
        };
        let body = if ended && chunks.len() <= 1 {
            chunks.pop().unwrap_or_default()
        } else {
            // Allocated once at its final size; a chunked body's buffer is
            // only address space until written.
            let mut buf = Vec::with_capacity(body_bytes as usize);
            for c in chunks {
                buf.extend_from_slice(&c);
            }
            while !ended {
                match self.next_chunk(&mut body, deadline).await? {
                    Some(c) if len + c.len() > self.max_body_bytes => {
                        return Err(self.body_too_large())
                    }
                    Some(c) => {
                        len += c.len();
                        buf.extend_from_slice(&c);
                    }
                    None => ended = true,
                }
            }
            Bytes::from(buf)
        };
        if content_length.is_none() {
            reservation.shrink_to((len + declared.unwrap_or(0)) as u64);
        }
        Ok(Received {
            body,
            declared,
            reservation,
        })
    }

    /// Answers `r` to a request whose body is not read to its end.
    ///
    /// Answered with the body unread, the connection is closed while the
    /// client may still be sending; the unread bytes make the kernel reset
    /// it, the answer is lost, and the sender sees a network error (which
    /// remote-write senders retry for ever, even for a 413). So a body up
    /// to twice the limit is read and discarded first (a client waiting for
    /// 100-continue has sent none).
    async fn refuse_unread(
        &self,
        body: Incoming,
        content_length: Option<u64>,
        waits_for_continue: bool,
        r: HttpResponse,
    ) -> HttpResponse {
        let within = content_length.is_none_or(|n| n <= 2 * self.max_body_bytes as u64);
        if within && !waits_for_continue {
            discard_body(body).await;
        }
        r
    }

    /// The next piece of the body; `None` at its end.
    async fn next_chunk(
        &self,
        body: &mut Incoming,
        deadline: Deadline,
    ) -> Result<Option<Bytes>, HttpResponse> {
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Err(text(
                        StatusCode::REQUEST_TIMEOUT,
                        "timed out reading the request body",
                    ))
                }
                Ok(None) => return Ok(None),
                Ok(Some(Ok(frame))) => {
                    // Trailers carry nothing ingest uses.
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    return Err(text(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body: {e}"),
                    ))
                }
            }
        }
    }

    /// A request's work after its body is read: decoding and validation,
    /// the append, the answer.
    async fn store(&self, received: Received, protocol: Protocol) -> (HttpResponse, u64) {
        let limits = self.limits;
        let Received {
            body,
            declared,
            reservation,
        } = received;
        let size = declared.unwrap_or(body.len());
        // A 1.0 body is kept until the commit, which stores it as it is
        // (below); its reservation covers it until then.
        let wire = (protocol == Protocol::V1).then(|| body.clone());
        let checked = self
            .pool
            .run(size, move || (check(body, protocol, &limits), reservation))
            .await;
        let (decoded, summary, reservation) = match checked {
            Ok((Ok((decoded, summary)), reservation)) => (decoded, summary, reservation),
            Ok((Err(e), _)) => return (decode_error(&e), 0),
            Err(e) => {
                tracing::error!(error = %e, "a write request's validation failed unexpectedly");
                return (
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{e}; nothing was stored"),
                    ),
                    0,
                );
            }
        };
        // A 1.0 body is stored as its sender compressed it, unless snappy
        // made it larger: the commit then copies about a tenth of the
        // bytes, and zstd over them costs less than half as much per
        // sample (see wal-format/SPEC.md, "Record entries").
        let (payload, encoding, received) = match wire {
            Some(wire) if wire.len() <= decoded.len() => {
                drop(decoded);
                (wire, PayloadEncoding::Snappy, true)
            }
            _ => (Bytes::from(decoded), PayloadEncoding::Identity, false),
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
            encoding,
        };
        let samples = summary.samples + summary.histograms;
        let appended = self
            .committer
            .append_holding(meta, payload, received, Box::new(reservation))
            .await;
        match appended {
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
}

/// Decompresses `body` and validates the message; the decoded bytes and
/// what they hold.
fn check(
    body: Bytes,
    protocol: Protocol,
    limits: &Limits,
) -> Result<(Vec<u8>, Summary), DecodeError> {
    let decoded = decode::decompress_snappy(&body, limits.max_decoded_bytes)?;
    drop(body);
    let limits = Limits {
        max_translated_bytes: translation_limit(limits, decoded.len()),
        ..*limits
    };
    let summary = decode::validate(protocol, &decoded, &limits)?;
    Ok((decoded, summary))
}

/// The decoded size a snappy body declares, from its first pieces: `None`
/// while the header is incomplete, `Some(None)` when it is not a valid
/// header (decompression then refuses the body).
fn snappy_header(chunks: &[Bytes]) -> Option<Option<usize>> {
    // A header is a varint of at most 5 bytes (snappy's lengths are 32-bit).
    let mut head = [0u8; 5];
    let mut n = 0;
    for b in chunks.iter().flat_map(|c| c.iter()).take(head.len()) {
        head[n] = *b;
        n += 1;
    }
    let complete = head[..n].iter().any(|b| *b < 0x80);
    if !complete && n < head.len() {
        return None;
    }
    Some(snap::raw::decompress_len(&head[..n]).ok())
}

/// The answer to a request that got no memory reservation.
fn budget_refusal(refused: &Refused) -> HttpResponse {
    match refused {
        Refused::OverBudget { .. } => {
            metrics::counter!("walrelay_ingest_refused_total", "reason" => "over_memory_budget")
                .increment(1);
            text(StatusCode::PAYLOAD_TOO_LARGE, refused.to_string())
        }
        Refused::Busy { .. } => {
            metrics::counter!("walrelay_ingest_overloaded_total", "reason" => "memory")
                .increment(1);
            retry_later(StatusCode::SERVICE_UNAVAILABLE, 1, refused.to_string())
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
        crate::metrics::hot()
            .ingest_requests_in_flight
            .increment(1.0);
        Self { _permit: permit }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        crate::metrics::hot()
            .ingest_requests_in_flight
            .decrement(1.0);
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

/// How many times its own decoded size a 2.0 request's 1.0 translation
/// may spell out in label names and values. Translation expands a request
/// by the sharing of its symbols: about 3 times for tiny series, 6 to 9
/// for series with many shared labels (Kubernetes' targets). A bound
/// relative to the request keeps a batch of many small records within a
/// multiple of the batch's own bytes (`--max-bytes-per-send`), whatever a
/// sender puts in them.
const TRANSLATION_RATIO: usize = 16;

/// The label bytes a request of `decoded_len` bytes may translate to:
/// [`TRANSLATION_RATIO`] times its size, and never more than the relay's
/// absolute bound (`Limits::max_translated_bytes` as configured).
fn translation_limit(limits: &Limits, decoded_len: usize) -> usize {
    let relative = decoded_len.saturating_mul(TRANSLATION_RATIO).max(1);
    match limits.max_translated_bytes {
        0 => relative,
        absolute => absolute.min(relative),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_declared_size_is_read_however_the_body_arrives_in_pieces() {
        let body = snap::raw::Encoder::new()
            .compress_vec(&vec![1u8; 300_000])
            .unwrap();
        for cut in 0..=6 {
            let chunks = [
                Bytes::copy_from_slice(&body[..cut]),
                Bytes::copy_from_slice(&body[cut..]),
            ];
            assert_eq!(snappy_header(&chunks), Some(Some(300_000)), "cut at {cut}");
        }
        // Incomplete: wait for more.
        assert_eq!(snappy_header(&[Bytes::copy_from_slice(&body[..1])]), None);
        assert_eq!(snappy_header(&[]), None);
        // Five continuation bytes are no header: refused by decompression.
        assert_eq!(snappy_header(&[Bytes::from_static(&[0xff; 8])]), Some(None));
    }

    #[test]
    fn a_refused_request_is_told_whether_to_retry() {
        let retried = [
            (
                CommitError::BudgetFull { budget: 1 },
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                CommitError::NoSpace("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (CommitError::Io("x".into()), StatusCode::SERVICE_UNAVAILABLE),
            (
                CommitError::WriterFailed("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (CommitError::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
        ];
        for (e, status) in retried {
            let r = commit_error(&e);
            assert_eq!(r.status(), status, "{e:?}");
            // Senders retry 429 and 5xx; Retry-After says when.
            assert!(r.headers().contains_key("Retry-After"), "{e:?}");
        }
        let too_large = prom_remote_write::DecodeError::TooManySeries { count: 2, limit: 1 };
        assert_eq!(
            decode_error(&too_large).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let bad = prom_remote_write::DecodeError::FirstSymbolNotEmpty;
        assert_eq!(decode_error(&bad).status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_translation_may_take_16_times_its_request_within_the_absolute_bound() {
        let mut limits = Limits {
            max_translated_bytes: 0,
            ..Limits::default()
        };
        assert_eq!(translation_limit(&limits, 1000), 16_000);
        assert_eq!(translation_limit(&limits, 0), 1);
        limits.max_translated_bytes = 10_000;
        assert_eq!(translation_limit(&limits, 1000), 10_000);
        assert_eq!(translation_limit(&limits, 100), 1600);
    }
}
