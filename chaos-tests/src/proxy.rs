//! A TCP fault-injection proxy in front of one upstream address.
//!
//! The mode applies to connections accepted while it is set. Changing the
//! mode closes every connection accepted under the previous mode (so a
//! client's kept-alive connection cannot bypass a new fault); the client sees
//! a closed connection and reconnects into the new mode.

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

    /// The key used in [`ProxyStats`]: pass, delay, reset, stall, http, drop_random.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyMode::Pass => "pass",
            ProxyMode::Delay(_) => "delay",
            ProxyMode::Reset => "reset",
            ProxyMode::Stall => "stall",
            ProxyMode::Http(..) => "http",
            ProxyMode::DropRandom(_) => "drop_random",
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

    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }
}

struct State {
    upstream: SocketAddr,
    mode: watch::Sender<(u64, ProxyMode)>,
    stats: Mutex<ProxyStats>,
    rng: Mutex<rand::rngs::StdRng>,
}

impl State {
    fn stats(&self) -> std::sync::MutexGuard<'_, ProxyStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
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
        let (tx, _) = watch::channel((0u64, ProxyMode::Pass));
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

    /// Switches the mode; connections accepted under the old mode are closed.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.state.mode.send_modify(|(gen, m)| {
            *gen += 1;
            *m = mode;
        });
    }

    pub fn mode(&self) -> ProxyMode {
        self.state.mode.borrow().1.clone()
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
        self.state.mode.send_modify(|(gen, _)| *gen = u64::MAX);
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let (gen, mode) = state.mode.borrow().clone();
        let mut rx = state.mode.subscribe();
        let state = state.clone();
        *state.stats().connections.entry(mode.kind()).or_default() += 1;
        tokio::spawn(async move {
            let kind = mode.kind();
            tokio::select! {
                _ = serve(client, mode, kind, &state) => {}
                _ = rx.wait_for(|(g, _)| *g != gen) => {
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

async fn serve(client: TcpStream, mode: ProxyMode, kind: &'static str, state: &State) {
    match mode {
        ProxyMode::Reset => {
            state.stats().resets += 1;
            reset(client);
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
        }
        ProxyMode::Http(status, retry_after, body) => {
            let _ = answer_http(client, status, retry_after, &body, kind, state).await;
        }
        ProxyMode::Pass => {
            let _ = forward(client, Duration::ZERO, 0.0, kind, state).await;
        }
        ProxyMode::Delay(d) => {
            let _ = forward(client, d, 0.0, kind, state).await;
        }
        ProxyMode::DropRandom(p) => {
            let _ = forward(client, Duration::ZERO, p, kind, state).await;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
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
        *state.stats().requests.entry(kind).or_default() += 1;
        buf.drain(..req.len);
        let mut resp = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            reason(status),
            body.len()
        );
        if let Some(s) = retry_after {
            resp.push_str(&format!("Retry-After: {s}\r\n"));
        }
        if req.close {
            resp.push_str("Connection: close\r\n");
        }
        resp.push_str("\r\n");
        resp.push_str(body);
        client.write_all(resp.as_bytes()).await?;
        if req.close {
            client.shutdown().await?;
            return Ok(());
        }
    }
}

async fn forward(
    client: TcpStream,
    delay: Duration,
    drop_p: f64,
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
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        forward_requests(&mut cr, &mut uw, delay, drop_p, kind, state).await?;
        uw.shutdown().await
    };
    let down = async {
        copy_chunks(&mut ur, &mut cw, delay).await?;
        cw.shutdown().await
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

async fn copy_chunks<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    delay: Duration,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        write_delayed(w, &buf[..n], delay).await?;
    }
}

/// Forwards client bytes request by request (to count them); anything that
/// does not parse as HTTP/1 is forwarded as it is.
async fn forward_requests<W: AsyncWrite + Unpin>(
    r: &mut tokio::net::tcp::OwnedReadHalf,
    w: &mut W,
    delay: Duration,
    drop_p: f64,
    kind: &'static str,
    state: &State,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        match read_request(r, &mut buf).await {
            Ok(Some(req)) => {
                let drop_it = drop_p > 0.0 && {
                    let mut rng = state.rng.lock().unwrap_or_else(|e| e.into_inner());
                    rng.random::<f64>() < drop_p
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
                write_delayed(w, &buf[..req.len], delay).await?;
                buf.drain(..req.len);
                *state.stats().requests.entry(kind).or_default() += 1;
            }
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                write_delayed(w, &buf, delay).await?;
                return copy_chunks(r, w, delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

struct Request {
    /// Bytes of the whole request (head and body) at the start of the buffer.
    len: usize,
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
        return Ok(Some(Request { len, close }));
    }
    // Chunked body: size line, data, CRLF; a zero size ends it, then
    // trailers up to an empty line.
    let mut pos = head_end;
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
                    return Ok(Some(Request { len: pos, close }));
                }
            }
        }
        while buf.len() < pos + size + 2 {
            if read_more(r, buf).await? == 0 {
                return Err(eof());
            }
        }
        pos += size + 2;
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
