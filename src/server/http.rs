//! The listeners: accepting connections within their caps, TLS, the
//! protocol of each connection (HTTP/1.1, or HTTP/2 where TLS ALPN chose
//! it), their deadlines, and a graceful shutdown. What each request gets is
//! [`super::routes`]'.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::routes::{route, Endpoints};
use super::App;
use crate::config::ServeConfig;
use crate::connections::{Activity, ConnectionLimit};
use crate::tls::ServerTls;

/// The bounds of one listener's connections.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListenerLimits {
    /// `listener` label of the connection metrics.
    pub(super) label: &'static str,
    pub(super) max_connections: usize,
    /// 0: none.
    pub(super) max_connections_per_ip: usize,
    /// hyper's header read timeout for HTTP/1 (the whole head, and a new
    /// or idle keep-alive connection's first bytes), the TLS handshake's,
    /// and the idle deadline of an HTTP/2 connection.
    pub(super) header_read_timeout: Duration,
    /// Longest a graceful shutdown waits for open requests.
    pub(super) grace: Duration,
}

/// Connections the admin address holds at once: probes and scrapes need a
/// few; the cap keeps a flood of it from taking the descriptors the main
/// address needs, and the main address' cap from starving it.
pub(super) const ADMIN_MAX_CONNECTIONS: usize = 64;

/// HTTP/2 streams one connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 64;

/// Descriptors the relay needs besides its listeners' connections
/// (segments, checkpoints, replica connections, the runtime): what the
/// open-files warning at startup leaves aside.
const OWN_FILES: u64 = 128;

/// Warns when the listeners' connection caps and the relay's own files may
/// not fit in the soft limit of open files: accepts would then fail with
/// EMFILE before the caps apply.
pub(super) fn warn_if_files_short(config: &ServeConfig) {
    let admin = if config.admin_listen.is_some() {
        ADMIN_MAX_CONNECTIONS
    } else {
        0
    };
    let needed = (config.max_connections + admin) as u64 + OWN_FILES;
    if let Some(limit) = crate::connections::open_files_limit() {
        if limit < needed {
            tracing::warn!(
                open_files_limit = limit,
                needed,
                max_connections = config.max_connections,
                "the open-files limit (ulimit -n) is below --max-connections plus what the \
                 relay needs for itself: raise it or lower --max-connections"
            );
        }
    }
}

pub(super) async fn serve_http(
    listener: TcpListener,
    endpoints: Endpoints,
    tls: Option<Arc<ServerTls>>,
    app: Arc<App>,
    shutdown: CancellationToken,
    limits: ListenerLimits,
) {
    let connections = ConnectionLimit::new(
        limits.label,
        limits.max_connections,
        limits.max_connections_per_ip,
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // A peer that stops answering pings is dropped; one that answers but
    // sends no request is closed by the idle deadline in `serve_connection`.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Beyond a cap: closed at once (dropped), before any TLS work.
        let Ok(admitted) = connections.admit(peer.ip()) else {
            continue;
        };
        let conn = Conn {
            app: Arc::clone(&app),
            endpoints,
            builder: builder.clone(),
            shutdown: shutdown.clone(),
            idle: limits.header_read_timeout,
        };
        // Taken per connection: a replaced certificate is seen by the next
        // connection (the files are checked at most once a second).
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _admitted = admitted;
            let Some(acceptor) = acceptor else {
                // Plain connections speak HTTP/1 only (see `Conn`).
                conn.serve(stream, false).await;
                return;
            };
            // The handshake timeout also bounds a client that connects and
            // sends nothing.
            let timeout = limits.header_read_timeout;
            let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // Debug only: scanners and clients without a
                    // certificate would flood the log; the counter shows it.
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    metrics::counter!("walrelay_tls_handshake_failures_total").increment(1);
                    return;
                }
                Err(_) => {
                    metrics::counter!("walrelay_tls_handshake_failures_total").increment(1);
                    return;
                }
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            conn.serve(stream, h2).await;
        });
    }
    drop(listener);
    if endpoints == Endpoints::All {
        tracing::info!("shutting down: no new connections; finishing open requests");
    }
    if tokio::time::timeout(limits.grace, connections.all_closed())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within the shutdown timeout");
    }
}

/// What one connection is served with.
///
/// HTTP/2 is served only where TLS ALPN chose it: remote-write senders
/// (Prometheus, vmagent, the OpenTelemetry Collector) speak HTTP/1.1 on
/// plain connections, and telling the two apart on a plain connection
/// meant reading its first bytes with no deadline of hyper's. A plain
/// connection that sends the HTTP/2 preface is refused by the HTTP/1
/// parser and closed.
struct Conn {
    app: Arc<App>,
    endpoints: Endpoints,
    builder: auto::Builder<TokioExecutor>,
    shutdown: CancellationToken,
    /// How long an HTTP/2 connection may go without a request in
    /// progress (the first one included) before it is closed.
    idle: Duration,
}

impl Conn {
    async fn serve<I>(self, io: I, h2: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            app,
            endpoints,
            builder,
            shutdown,
            idle,
        } = self;
        let activity = Activity::new();
        let svc = {
            let activity = Arc::clone(&activity);
            service_fn(move |req| {
                let app = Arc::clone(&app);
                let active = activity.begin();
                async move {
                    let _active = active;
                    Ok::<_, Infallible>(route(&app, endpoints, req).await)
                }
            })
        };
        // The protocol is decided here, so hyper does not sniff it (its
        // header read timeout then runs from the connection's start).
        let builder = if h2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        };
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        // hyper closes an idle HTTP/1 connection itself, at its header
        // read timeout.
        let idle_h2 = async {
            if h2 {
                activity.idle_for(idle).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let bound = tokio::select! {
            _ = conn.as_mut() => return,
            () = shutdown.cancelled() => None,
            () = idle_h2 => {
                metrics::counter!("walrelay_http2_idle_closed_total").increment(1);
                Some(idle)
            }
        };
        // GOAWAY for HTTP/2; an HTTP/1 connection finishes the request in
        // progress, if any, and closes. At shutdown, the listener's grace
        // bounds the wait; an idle connection gets one more deadline to
        // finish before it is dropped.
        conn.as_mut().graceful_shutdown();
        match bound {
            Some(b) => {
                let _ = tokio::time::timeout(b, conn).await;
            }
            None => {
                let _ = conn.await;
            }
        }
    }
}
