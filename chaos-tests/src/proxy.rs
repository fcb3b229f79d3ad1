//! A TCP fault-injection proxy in front of one upstream address.
//!
//! The mode applies to connections accepted while it is set. Changing the
//! mode with [`FaultProxy::set_mode`] closes every connection accepted under
//! the previous mode at once (so a client's kept-alive connection cannot
//! bypass a new fault); the client sees a closed connection and reconnects
//! into the new mode. A request already forwarded is cut too: the upstream
//! may have stored it without its answer reaching the client, an ambiguous
//! failure of its own. [`FaultProxy::set_mode_between_requests`] avoids
//! that, the way an ingress reloading its configuration does: a request
//! already being forwarded completes, and the connection is closed when its
//! client sends the next request, which is not forwarded.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with connections.
#[derive(Clone, Debug, PartialEq)]
pub enum ProxyMode {
    /// Forward both ways.
    Pass,
    /// Forward, sleeping this long before forwarding each chunk (each way).
    Delay(Duration),
    /// Forward each request whole this long after it arrived, once per
    /// request whatever its size; answers pass at once: a replica whose
    /// answers come this much later, as one a round trip away (the TCP
    /// connect itself is not delayed).
    Latency(Duration),
    /// Close the listening socket: connections are refused, as by a host
    /// whose server is down; the same port listens again when the mode
    /// changes.
    Refuse,
    /// Accept, then reset the connection (SO_LINGER 0 and close).
    Reset,
    /// Accept, read and discard, never answer.
    Stall,
    /// Answer every HTTP request itself with this status, an optional
    /// `Retry-After` (seconds) and body; nothing is forwarded.
    Http(u16, Option<u32>, String),
    /// Forward, but reset the connection instead of forwarding a request
    /// with this probability (seeded), for each request (the first one of a
    /// connection included). With keep-alive clients, resetting only at
    /// accept time would spare every request after the first.
    DropRandom(f64),
    /// Like an ingress with a body size limit (nginx `client_max_body_size`):
    /// a request whose body is larger than `max_body` bytes is read whole
    /// and answered with `status` (413) by the proxy; smaller ones are
    /// forwarded unchanged. The connection stays open either way, so one
    /// kept-alive connection carries both.
    BodyLimit { max_body: usize, status: u16 },
}

impl ProxyMode {
    /// `Http(status, None, "injected <status>")`.
    pub fn http(status: u16) -> ProxyMode {
        ProxyMode::Http(status, None, format!("injected by chaos proxy: {status}\n"))
    }

    /// 429 with a Retry-After.
    pub fn too_many_requests(retry_after_secs: u32) -> ProxyMode {
        ProxyMode::Http(
            429,
            Some(retry_after_secs),
            "injected by chaos proxy: 429\n".into(),
        )
    }

    /// `BodyLimit` answering 413 Payload Too Large above `max_body` bytes.
    pub fn body_limit(max_body: usize) -> ProxyMode {
        ProxyMode::BodyLimit {
            max_body,
            status: 413,
        }
    }

    /// Whether connections in this mode forward requests to the upstream.
    fn forwards(&self) -> bool {
        match self {
            ProxyMode::Pass
            | ProxyMode::Delay(_)
            | ProxyMode::Latency(_)
            | ProxyMode::DropRandom(_)
            | ProxyMode::BodyLimit { .. } => true,
            ProxyMode::Reset | ProxyMode::Refuse | ProxyMode::Stall | ProxyMode::Http(..) => false,
        }
    }

    /// The key used in [`ProxyStats`]: pass, delay, latency, reset, refuse,
    /// stall, http, drop_random, body_limit.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyMode::Pass => "pass",
            ProxyMode::Delay(_) => "delay",
            ProxyMode::Latency(_) => "latency",
            ProxyMode::Refuse => "refuse",
            ProxyMode::Reset => "reset",
            ProxyMode::Stall => "stall",
            ProxyMode::Http(..) => "http",
            ProxyMode::DropRandom(_) => "drop_random",
            ProxyMode::BodyLimit { .. } => "body_limit",
        }
    }
}

/// Connection and request counts per mode kind (see [`ProxyMode::kind`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted, by the mode they were accepted under.
    pub connections: BTreeMap<&'static str, u64>,
    /// Complete HTTP requests seen (forwarded or answered), by mode.
    pub requests: BTreeMap<&'static str, u64>,
    /// Of those, the ones the proxy answered itself (`Http`, and the
    /// refusals of `BodyLimit`), by mode.
    pub answered: BTreeMap<&'static str, u64>,
    /// Of those, the ones forwarded to the upstream, by mode.
    pub forwarded: BTreeMap<&'static str, u64>,
    /// Connections reset on purpose (Reset, and DropRandom's share).
    pub resets: u64,
    /// Connections closed because the upstream could not be reached.
    pub upstream_errors: u64,
    /// Connections closed because the mode changed.
    pub closed_by_mode_change: u64,
}

impl ProxyStats {
    pub fn connections(&self, kind: &str) -> u64 {
        self.connections.get(kind).copied().unwrap_or(0)
    }

    pub fn requests(&self, kind: &str) -> u64 {
        self.requests.get(kind).copied().unwrap_or(0)
    }

    pub fn answered(&self, kind: &str) -> u64 {
        self.answered.get(kind).copied().unwrap_or(0)
    }

    pub fn forwarded(&self, kind: &str) -> u64 {
        self.forwarded.get(kind).copied().unwrap_or(0)
    }

    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }
}

/// The current mode and how connections of older modes end.
#[derive(Clone, Debug)]
struct Switch {
    /// Incremented at every mode change; a connection keeps the generation
    /// it was accepted under.
    gen: u64,
    mode: ProxyMode,
    /// Connections of a generation below this are closed at once; those of
    /// a generation at or above it (but not `gen`) at their next request.
    cut_below: u64,
}

struct State {
    upstream: SocketAddr,
    mode: watch::Sender<Switch>,
    stats: Mutex<ProxyStats>,
    rng: Mutex<rand::rngs::StdRng>,
}

impl State {
    fn stats(&self) -> std::sync::MutexGuard<'_, ProxyStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the mode changed since generation `gen`.
    fn switched_since(&self, gen: u64) -> bool {
        self.mode.borrow().gen != gen
    }

    /// Counts one complete request, answered by the proxy or forwarded.
    fn count_request(&self, kind: &'static str, answered: bool) {
        let mut s = self.stats();
        *s.requests.entry(kind).or_default() += 1;
        let by = if answered {
            &mut s.answered
        } else {
            &mut s.forwarded
        };
        *by.entry(kind).or_default() += 1;
    }
}

/// The proxy. Dropping it closes the listener and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free 127.0.0.1 port in front of `upstream`
    /// ("127.0.0.1:9090"), in `Pass` mode, seeded with 0.
    pub async fn start(upstream: impl ToSocketAddrs) -> Result<FaultProxy> {
        Self::start_seeded(upstream, 0).await
    }

    /// Like [`FaultProxy::start`] with the seed for `DropRandom`.
    pub async fn start_seeded(upstream: impl ToSocketAddrs, seed: u64) -> Result<FaultProxy> {
        let upstream = upstream
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow!("upstream address resolves to nothing"))?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the proxy")?;
        let addr = listener.local_addr()?;
        let (tx, _) = watch::channel(Switch {
            gen: 0,
            mode: ProxyMode::Pass,
            cut_below: 0,
        });
        let state = Arc::new(State {
            upstream,
            mode: tx,
            stats: Mutex::new(ProxyStats::default()),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(FaultProxy {
            addr,
            state,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/api/v1/write`
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    pub fn upstream(&self) -> SocketAddr {
        self.state.upstream
    }

    /// Switches the mode; connections accepted under the old mode are
    /// closed at once, requests in flight included.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.state.mode.send_modify(|s| {
            s.gen += 1;
            s.mode = mode;
            s.cut_below = s.gen;
        });
    }

    /// Switches the mode without cutting a request being forwarded: a
    /// connection accepted under the old mode is closed when its client
    /// sends the next request (not forwarded), or at once if the old mode
    /// never forwards. No request is forwarded or answered under the old
    /// mode once this returns, except those already being forwarded.
    pub fn set_mode_between_requests(&self, mode: ProxyMode) {
        self.state.mode.send_modify(|s| {
            s.gen += 1;
            s.mode = mode;
        });
    }

    pub fn mode(&self) -> ProxyMode {
        self.state.mode.borrow().mode.clone()
    }

    pub fn stats(&self) -> ProxyStats {
        self.state.stats().clone()
    }

    pub fn reset_stats(&self) {
        *self.state.stats() = ProxyStats::default();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Tell every connection task to end.
        self.state.mode.send_modify(|s| s.cut_below = u64::MAX);
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let addr = listener.local_addr().ok();
    let mut listener = Some(listener);
    let mut modes = state.mode.subscribe();
    loop {
        let refuse = modes.borrow_and_update().mode == ProxyMode::Refuse;
        let Some(l) = listener.as_ref().filter(|_| !refuse) else {
            // Refuse: no socket listens, so the kernel refuses. Another
            // mode: listen again on the same port (SO_REUSEADDR, set by
            // tokio, lets it be bound again at once).
            listener = None;
            if refuse {
                let _ = modes.changed().await;
            } else if let Some(addr) = addr {
                match TcpListener::bind(addr).await {
                    Ok(l) => listener = Some(l),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            continue;
        };
        let accepted = tokio::select! {
            a = l.accept() => a,
            _ = modes.changed() => continue,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let Switch { gen, mode, .. } = state.mode.borrow().clone();
        let mut rx = state.mode.subscribe();
        let state = state.clone();
        *state.stats().connections.entry(mode.kind()).or_default() += 1;
        // A forwarding connection watches for a change between requests
        // itself (see `forward_requests`).
        let forwards = mode.forwards();
        tokio::spawn(async move {
            let kind = mode.kind();
            tokio::select! {
                _ = serve(client, mode, kind, &state, gen) => {}
                _ = rx.wait_for(|s| s.cut_below > gen || (s.gen != gen && !forwards)) => {
                    state.stats().closed_by_mode_change += 1;
                }
            }
        });
    }
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(client: TcpStream, mode: ProxyMode, kind: &'static str, state: &State, gen: u64) {
    let how = Forwarding {
        gen,
        ..Forwarding::default()
    };
    let how = match mode {
        // Refuse accepts nothing; a connection accepted just before the
        // switch is closed like any of an old mode.
        ProxyMode::Reset | ProxyMode::Refuse => {
            state.stats().resets += 1;
            reset(client);
            return;
        }
        ProxyMode::Stall => {
            let mut client = client;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            // The client closed its side; keep ours open, never answering.
            std::future::pending::<()>().await;
            return;
        }
        ProxyMode::Http(status, retry_after, body) => {
            let _ = answer_http(client, status, retry_after, &body, kind, state).await;
            return;
        }
        ProxyMode::Pass => how,
        ProxyMode::Delay(delay) => Forwarding { delay, ..how },
        ProxyMode::Latency(latency) => Forwarding { latency, ..how },
        ProxyMode::DropRandom(drop_p) => Forwarding { drop_p, ..how },
        ProxyMode::BodyLimit { max_body, status } => Forwarding {
            body_limit: Some((max_body, status)),
            ..how
        },
    };
    let _ = forward(client, how, kind, state).await;
}

/// What [`forward`] does to the requests besides forwarding them.
#[derive(Clone, Copy, Debug, Default)]
struct Forwarding {
    /// The generation of the mode the connection was accepted under.
    gen: u64,
    /// Slept before each chunk is forwarded, each way.
    delay: Duration,
    /// Slept once before each request is forwarded.
    latency: Duration,
    /// Probability of resetting the connection instead of forwarding a
    /// request.
    drop_p: f64,
    /// `(max_body, status)`: a request with a larger body is answered with
    /// `status` by the proxy instead of being forwarded.
    body_limit: Option<(usize, u16)>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    }
}

async fn answer_http(
    mut client: TcpStream,
    status: u16,
    retry_after: Option<u32>,
    body: &str,
    kind: &'static str,
    state: &State,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut client, &mut buf).await? else {
            return Ok(());
        };
        state.count_request(kind, true);
        buf.drain(..req.len);
        client
            .write_all(response(status, retry_after, body, req.close).as_bytes())
            .await?;
        if req.close {
            client.shutdown().await?;
            return Ok(());
        }
    }
}

/// A whole HTTP/1.1 answer with a plain-text `body`.
fn response(status: u16, retry_after: Option<u32>, body: &str, close: bool) -> String {
    let mut resp = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    if let Some(s) = retry_after {
        resp.push_str(&format!("Retry-After: {s}\r\n"));
    }
    if close {
        resp.push_str("Connection: close\r\n");
    }
    resp.push_str("\r\n");
    resp.push_str(body);
    resp
}

async fn forward(
    client: TcpStream,
    how: Forwarding,
    kind: &'static str,
    state: &State,
) -> std::io::Result<()> {
    let upstream = match tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(state.upstream),
    )
    .await
    {
        Ok(Ok(u)) => u,
        _ => {
            state.stats().upstream_errors += 1;
            reset(client);
            return Ok(());
        }
    };
    let _ = upstream.set_nodelay(true);
    let (mut cr, cw) = client.into_split();
    // Both directions write to the client: the upstream's answers, and the
    // proxy's own (BodyLimit). HTTP/1 clients send a request only once the
    // previous answer is complete (reqwest never pipelines), so the two never
    // interleave within an answer.
    let cw = tokio::sync::Mutex::new(cw);
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        forward_requests(&mut cr, &mut uw, &cw, how, kind, state).await?;
        uw.shutdown().await
    };
    let down = async {
        copy_chunks(&mut ur, &cw, how.delay).await?;
        cw.lock().await.shutdown().await
    };
    tokio::try_join!(up, down)?;
    Ok(())
}

async fn write_delayed<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    delay: Duration,
) -> std::io::Result<()> {
    for chunk in data.chunks(64 * 1024) {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        w.write_all(chunk).await?;
    }
    Ok(())
}

/// Copies `r` to `w` until `r` ends, holding `w`'s lock one chunk at a time.
async fn copy_chunks<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &tokio::sync::Mutex<W>,
    delay: Duration,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        write_delayed(&mut *w.lock().await, &buf[..n], delay).await?;
    }
}

/// Forwards client bytes request by request (to count them, drop them or
/// answer them: see [`Forwarding`]); anything that does not parse as HTTP/1
/// is forwarded as it is.
async fn forward_requests<W: AsyncWrite + Unpin>(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut W,
    client: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    how: Forwarding,
    kind: &'static str,
    state: &State,
) -> std::io::Result<()> {
    let delay = how.delay;
    let mut buf = Vec::new();
    loop {
        match read_request(r, &mut buf).await {
            Ok(Some(req)) => {
                if state.switched_since(how.gen) {
                    // The mode changed between requests: this one is not
                    // forwarded, the connection ends, the client reconnects
                    // into the new mode.
                    state.stats().closed_by_mode_change += 1;
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "closed by a mode change",
                    ));
                }
                if let Some((max_body, status)) = how.body_limit {
                    if req.body_len > max_body {
                        // The body was read whole, so the next request on
                        // this connection starts right after it.
                        buf.drain(..req.len);
                        state.count_request(kind, true);
                        let body = format!(
                            "injected by chaos proxy: {status}: a body of {} bytes is over the \
                             limit of {max_body}\n",
                            req.body_len
                        );
                        let mut c = client.lock().await;
                        c.write_all(response(status, None, &body, req.close).as_bytes())
                            .await?;
                        if req.close {
                            return c.shutdown().await;
                        }
                        continue;
                    }
                }
                let drop_it = how.drop_p > 0.0 && {
                    let mut rng = state.rng.lock().unwrap_or_else(|e| e.into_inner());
                    rng.random::<f64>() < how.drop_p
                };
                if drop_it {
                    state.stats().resets += 1;
                    // Closing with SO_LINGER 0 sends a reset; the error
                    // makes `forward` drop both connections.
                    let _ = r.as_ref().set_zero_linger();
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "dropped by DropRandom",
                    ));
                }
                if !how.latency.is_zero() {
                    tokio::time::sleep(how.latency).await;
                }
                write_delayed(w, &buf[..req.len], delay).await?;
                buf.drain(..req.len);
                state.count_request(kind, false);
            }
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                write_delayed(w, &buf, delay).await?;
                return copy_chunks(r, &tokio::sync::Mutex::new(w), delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

struct Request {
    /// Bytes of the whole request (head and body) at the start of the buffer.
    len: usize,
    /// Bytes of the body (without the chunked framing).
    body_len: usize,
    close: bool,
}

const MAX_HEAD: usize = 64 * 1024;

/// Reads until `buf` starts with one complete HTTP/1 request. `Ok(None)` on
/// a clean end of stream between requests; `InvalidData` if it does not
/// parse (the bytes read stay in `buf`).
async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "request cut short");
    // Head.
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(invalid("request head too large"));
        }
        if read_more(r, buf).await? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(eof()) };
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    if request_line.split(' ').count() != 3 || !request_line.contains("HTTP/1.") {
        return Err(invalid("not an HTTP/1 request line"));
    }
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut close = request_line.ends_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value.parse().map_err(|_| invalid("bad content-length"))?
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    close = true;
                } else if v.contains("keep-alive") {
                    close = false;
                }
            }
            _ => {}
        }
    }
    if !chunked {
        let len = head_end + content_length;
        while buf.len() < len {
            if read_more(r, buf).await? == 0 {
                return Err(eof());
            }
        }
        return Ok(Some(Request {
            len,
            body_len: content_length,
            close,
        }));
    }
    // Chunked body: size line, data, CRLF; a zero size ends it, then
    // trailers up to an empty line.
    let mut pos = head_end;
    let mut body_len = 0;
    loop {
        let line_end = loop {
            if let Some(p) = find(&buf[pos..], b"\r\n") {
                break pos + p;
            }
            if read_more(r, buf).await? == 0 {
                return Err(eof());
            }
        };
        let size_str =
            std::str::from_utf8(&buf[pos..line_end]).map_err(|_| invalid("chunk size"))?;
        let size_str = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_str, 16).map_err(|_| invalid("chunk size"))?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers.
            loop {
                let line_end = loop {
                    if let Some(p) = find(&buf[pos..], b"\r\n") {
                        break pos + p;
                    }
                    if read_more(r, buf).await? == 0 {
                        return Err(eof());
                    }
                };
                let empty = line_end == pos;
                pos = line_end + 2;
                if empty {
                    return Ok(Some(Request {
                        len: pos,
                        body_len,
                        close,
                    }));
                }
            }
        }
        while buf.len() < pos + size + 2 {
            if read_more(r, buf).await? == 0 {
                return Err(eof());
            }
        }
        pos += size + 2;
        body_len += size;
    }
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut tmp = [0u8; 16 * 1024];
    let n = r.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
