//! A worker: one request in flight, its retries, and what came of each
//! attempt.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use tokio::sync::watch;

use super::acklog::{Attempt, Line, Outcome};
use super::generator::{Batch, Generator};
use super::retry::Retry;
use super::routing::Router;
use super::{ProgressCounters, Shared};
use crate::http::now_ms;

/// What one worker sent, for [`super::LoadHandle::join`].
#[derive(Default)]
pub(super) struct WorkerResult {
    pub(super) batches: Vec<Batch>,
    pub(super) attempts: Vec<Attempt>,
}

/// Sends worker `w`'s requests until its count or the load's deadline is
/// reached, or `stop` says so; every request ends up in the result, and
/// streamed to the ack log.
pub(super) async fn worker(
    shared: Arc<Shared>,
    w: u32,
    mut stop: watch::Receiver<bool>,
) -> Result<WorkerResult> {
    let spec = &shared.spec;
    let client = crate::http::client(spec.request_timeout)?;
    let mut generator = Generator::new(spec, w);
    let mut router = Router::new(&shared.urls, shared.routing, w - spec.first_worker);
    let mut result = WorkerResult::default();
    let mut next_start = Instant::now() + generator.start_offset(spec.interval);
    let stopping = |stop: &watch::Receiver<bool>| {
        *stop.borrow() || shared.deadline.is_some_and(|d| Instant::now() >= d)
    };
    for seq in 0u64.. {
        if spec.requests_per_worker.is_some_and(|max| seq >= max) || stopping(&stop) {
            break;
        }
        if !spec.interval.is_zero() {
            if !sleep_or_stop(&mut stop, next_start, shared.deadline).await {
                break;
            }
            next_start = (next_start + spec.interval).max(Instant::now());
        }
        let (mut batch, body) = generator.next(seq)?;
        shared.progress.requests.fetch_add(1, Ordering::Relaxed);
        let mut retry = Retry::new(spec.retry, spec.backoff_min, spec.backoff_max);
        loop {
            batch.attempts += 1;
            shared.progress.attempts.fetch_add(1, Ordering::Relaxed);
            let (at_ms, t0) = (now_ms(), Instant::now());
            let outcome = send(&client, router.next_url(), body.clone()).await;
            let latency_us = t0.elapsed().as_micros() as u64;
            tally(&mut batch, &shared.progress, &outcome, latency_us);
            let wait = retry.after(&outcome);
            result.log_attempt(
                &shared,
                Attempt {
                    worker: w,
                    seq,
                    attempt: batch.attempts,
                    at_ms,
                    latency_us,
                    outcome,
                },
            );
            let Some(wait) = wait.filter(|_| !stopping(&stop)) else {
                break;
            };
            if !sleep_or_stop(&mut stop, Instant::now() + wait, shared.deadline).await {
                break;
            }
        }
        result.log_batch(&shared, batch);
    }
    Ok(result)
}

impl WorkerResult {
    /// Logs an attempt that was not acknowledged, up to the worker's share
    /// of the log's cap on attempts (an acknowledged one is in its batch).
    fn log_attempt(&mut self, shared: &Shared, a: Attempt) {
        if !matches!(a.outcome, Outcome::Acked { .. })
            && self.attempts.len() < shared.attempts_cap_per_worker
        {
            shared.emit(Line::Attempt(a.clone()));
            self.attempts.push(a);
        }
    }

    /// Logs a request once its last attempt is over.
    fn log_batch(&mut self, shared: &Shared, batch: Batch) {
        shared.emit(Line::Batch(batch.clone()));
        self.batches.push(batch);
    }
}

/// Counts one attempt's outcome in its batch and in the live progress.
fn tally(batch: &mut Batch, progress: &ProgressCounters, outcome: &Outcome, latency_us: u64) {
    match outcome {
        Outcome::Acked { status } => {
            batch.acked = true;
            batch.latency_us = Some(latency_us);
            batch.last_status = Some(*status);
            progress.acked_requests.fetch_add(1, Ordering::Relaxed);
            progress
                .acked_samples
                .fetch_add(batch.samples(), Ordering::Relaxed);
        }
        Outcome::Refused { status, .. } => {
            batch.refused += 1;
            batch.last_status = Some(*status);
            progress.refused.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Failed { .. } => {
            batch.failed += 1;
            progress.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sleeps until `until`; false if stopped (or the deadline passed) first.
async fn sleep_or_stop(
    stop: &mut watch::Receiver<bool>,
    until: Instant,
    deadline: Option<Instant>,
) -> bool {
    let until = match deadline {
        Some(d) if d <= until => {
            tokio::select! {
                _ = tokio::time::sleep_until(d.into()) => return false,
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
        _ => until,
    };
    let slept = tokio::select! {
        _ = tokio::time::sleep_until(until.into()) => true,
        _ = stop.wait_for(|s| *s) => false,
    };
    slept && !*stop.borrow()
}

/// One attempt: posts `body` to `url` as a remote-write 1.0 request.
async fn send(client: &reqwest::Client, url: &str, body: Bytes) -> Outcome {
    let resp = client
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .header("User-Agent", "walrelay-load/0.1")
        .body(body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Failed {
                error: error_chain(&e),
            }
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            return Outcome::Failed {
                error: format!("reading the response: {}", error_chain(&e)),
            }
        }
    };
    if (200..300).contains(&status) {
        Outcome::Acked { status }
    } else {
        let mut body = String::from_utf8_lossy(&body).into_owned();
        if body.len() > 512 {
            let mut cut = 512;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        Outcome::Refused {
            status,
            body,
            retry_after,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
