//! What each request gets: ingest, metrics, health, readiness, status and
//! the reload endpoint, by path, on the listener that serves them
//! ([`Endpoints`]).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use super::reload::{reload_now, RELOAD_ENDPOINT_INTERVAL};
use super::{lag_bytes, App};
use crate::ingest::{text, HttpResponse};

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoints {
    /// Everything: the main listener.
    All,
    /// Metrics, health, readiness and status only: `--admin-listen`, plain
    /// HTTP without credentials for probes and scrapers that hold no client
    /// certificate.
    Admin,
}

/// The endpoints that only read, answered for GET and HEAD only.
const READ_ONLY: &[&str] = &["/metrics", "/-/healthy", "/-/ready", "/api/v1/status"];

/// 405 with `Allow` for another method on a read-only endpoint, as ingest
/// answers a method other than POST.
fn read_only_method(req: &Request<Incoming>) -> Option<HttpResponse> {
    if !READ_ONLY.contains(&req.uri().path())
        || matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD)
    {
        return None;
    }
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} not allowed; use GET", req.method()),
    );
    r.headers_mut()
        .insert("Allow", HeaderValue::from_static("GET, HEAD"));
    Some(r)
}

pub(super) async fn route(app: &App, endpoints: Endpoints, req: Request<Incoming>) -> HttpResponse {
    if let Some(refused) = read_only_method(&req) {
        return refused;
    }
    match req.uri().path() {
        "/api/v1/write" | "/" if endpoints == Endpoints::Admin => text(
            StatusCode::NOT_FOUND,
            "the admin address serves GET /metrics, /-/healthy, /-/ready and /api/v1/status only",
        ),
        "/api/v1/write" => app.ingest.handle(req).await,
        "/metrics" => {
            let mut text = app.metrics.render();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            let states = app.fleet.states();
            text.push_str(&crate::metrics::render_replica_counters(
                states
                    .iter()
                    .map(|s| (s.name.as_str(), s.rate_limited_seconds())),
            ));
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/-/healthy" => {
            if app.ingest.committer.writer_failed() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "log writer failed (fsync); restart to recover",
                )
            } else if app.checkpoints.failed() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "checkpoint store failed (fsync); restart to recover",
                )
            } else {
                text(StatusCode::OK, "walrelay is healthy")
            }
        }
        "/-/ready" => {
            if app.ready.load(Ordering::Relaxed) && !app.ingest.committer.writer_failed() {
                text(StatusCode::OK, "walrelay is ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "walrelay is not ready")
            }
        }
        "/api/v1/status" => status(app),
        "/-/reload" => reload_endpoint(app, endpoints, &req).await,
        "/" => text(
            StatusCode::OK,
            "walrelay: POST /api/v1/write, /-/reload; GET /metrics, /-/healthy, /-/ready, /api/v1/status",
        ),
        other => text(StatusCode::NOT_FOUND, format!("no such endpoint: {other}")),
    }
}

/// `POST /-/reload`, as Prometheus' with `--web.enable-lifecycle`: off
/// unless `--enable-reload-endpoint` (403), never on the admin address,
/// which has no credentials (404); the credentials ingest asks for (401;
/// client certificates were checked at the handshake); one reload at a time
/// and one a second (429 with `Retry-After`). Then 200 with the changes, or
/// 500 with a summary of why it was refused (the running configuration is
/// kept; the reason is in the log).
async fn reload_endpoint(app: &App, endpoints: Endpoints, req: &Request<Incoming>) -> HttpResponse {
    if endpoints == Endpoints::Admin {
        return text(
            StatusCode::NOT_FOUND,
            "the admin address does not serve /-/reload: it asks for no credentials",
        );
    }
    if !app.reload.endpoint_enabled {
        return text(
            StatusCode::FORBIDDEN,
            "POST /-/reload is off: start the relay with --enable-reload-endpoint, or reload with SIGHUP",
        );
    }
    if req.method() != hyper::Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST /-/reload");
        r.headers_mut()
            .insert("Allow", HeaderValue::from_static("POST"));
        return r;
    }
    if let Err(denied) = app.ingest.auth.check(req.headers()).await {
        return app.ingest.unauthorized(denied);
    }
    let too_soon = |why: &str| {
        let mut r = text(StatusCode::TOO_MANY_REQUESTS, why);
        r.headers_mut()
            .insert("Retry-After", HeaderValue::from_static("1"));
        r
    };
    let Ok(mut last) = app.reload.gate.try_lock() else {
        return too_soon("a reload is under way; retry later");
    };
    if last.is_some_and(|t| t.elapsed() < RELOAD_ENDPOINT_INTERVAL) {
        return too_soon("at most one reload a second; retry later");
    }
    let result = reload_now(app).await;
    *last = Some(Instant::now());
    match result {
        Ok(changes) => {
            let mut r = Response::new(Full::new(Bytes::from(
                serde_json::json!({ "status": "success", "replicas": changes }).to_string(),
            )));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "reload refused, running configuration kept: {}; the reason is in the relay's log",
                e.summary()
            ),
        ),
    }
}

#[derive(serde::Serialize)]
struct WalStatus {
    dir: PathBuf,
    first_seq: u64,
    head_seq: u64,
    segments: usize,
    bytes: u64,
    max_disk_bytes: u64,
    writer_failed: bool,
}

fn status(app: &App) -> HttpResponse {
    let extent = app.wal.extent();
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "instance": app.instance,
        "wal": WalStatus {
            dir: app.wal.dir().to_path_buf(),
            first_seq: extent.first_seq,
            head_seq: extent.end_seq,
            segments: extent.segments,
            bytes: extent.bytes,
            max_disk_bytes: app.max_disk_bytes,
            writer_failed: app.ingest.committer.writer_failed(),
        },
        "recovery": app.recovery,
        "replicas": app.fleet.states().iter()
            .map(|r| r.status(extent.end_seq, lag_bytes(&app.wal, r.low_water())))
            .collect::<Vec<_>>(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
