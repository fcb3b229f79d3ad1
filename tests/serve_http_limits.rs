//! What an unauthenticated client can take of a running relay: bcrypt work
//! (bounded, and paid once per legitimate sender), connections (capped in
//! all and per address, the admin address apart), HTTP/2 connections that
//! send no request (closed), and which methods the read-only endpoints
//! answer. Against the real `walrelay serve` process (`$WALRELAY_BIN`, else
//! the newest build), over raw sockets where a client library would hide
//! what the server does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use chaos_tests::encode::{v1_series, write_request_body};
use chaos_tests::relay::{walrelay_bin, Relay};
use prom_remote_write::v1::WriteRequest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for the relay to close a connection it must
/// close: far beyond every deadline the tests set, for a busy machine.
const CLOSE_WITHIN: Duration = Duration::from_secs(30);

fn s(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn start(dir: &Path, args: &[&str]) -> Relay {
    Relay::start_with_admin(walrelay_bin().unwrap(), dir.join("data"), &[], args)
        .await
        .unwrap()
}

/// A users file with `alice` (password `right`, bcrypt at `cost`) and a
/// bearer token file (`tok`); the flags that name them.
fn credentials(dir: &Path, cost: u32) -> Vec<String> {
    let users = dir.join("users");
    let hash = bcrypt::hash("right", cost).unwrap();
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "tok\n").unwrap();
    vec![
        "--basic-auth-users-file".into(),
        users.display().to_string(),
        "--bearer-token-file".into(),
        token.display().to_string(),
    ]
}

fn basic(user: &str, password: &str) -> String {
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {pair}")
}

/// A write request with no body, closing the connection after the answer.
fn empty_write(authorization: &str) -> String {
    format!(
        "POST /api/v1/write HTTP/1.1\r\nHost: relay\r\nAuthorization: {authorization}\r\n\
         Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// An HTTP/1 answer read to its end: the status and the head.
struct Answer {
    status: u16,
    head: String,
}

async fn read_answer(mut stream: TcpStream) -> Answer {
    let mut raw = Vec::new();
    tokio::time::timeout(CLOSE_WITHIN, stream.read_to_end(&mut raw))
        .await
        .expect("no complete answer")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    Answer {
        status,
        head: head.to_ascii_lowercase(),
    }
}

async fn exchange(addr: &str, request: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

async fn metric(r: &Relay, name: &str, labels: &[(&str, &str)]) -> f64 {
    r.metric_sum(name, labels).await.unwrap()
}

async fn password_checks(r: &Relay) -> f64 {
    metric(r, "walrelay_auth_password_checks_total", &[]).await
}

/// Waits until metric `name` with `labels` is `want`.
async fn wait_metric(r: &Relay, name: &str, labels: &[(&str, &str)], want: f64) {
    r.wait_metric(name, labels, want, CLOSE_WITHIN)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Hole 3: bcrypt as a CPU lever.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_gets_503_once_every_password_check_slot_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    // Cost 12: a check takes a fifth of a second or more, far longer than
    // the burst below takes to arrive.
    let mut args = credentials(dir.path(), 12);
    args.extend(["--max-concurrent-password-checks".into(), "1".into()]);
    let r = start(dir.path(), &s(&args)).await;
    let before = password_checks(&r).await;

    // Every request is on the wire before any answer is read.
    const N: usize = 12;
    let mut streams = Vec::new();
    for _ in 0..N {
        streams.push(TcpStream::connect(r.addr()).await.unwrap());
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let request = empty_write(&basic("alice", &format!("guess-{i}")));
        stream.write_all(request.as_bytes()).await.unwrap();
    }
    // The gauge of checks running, sampled while the flood is answered.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, url) = (Arc::clone(&done), format!("{}/metrics", r.admin_url()));
        tokio::spawn(async move {
            let http = chaos_tests::client(Duration::from_secs(10)).unwrap();
            let mut most = 0.0f64;
            while !done.load(Ordering::Relaxed) {
                if let Ok(resp) = http.get(&url).send().await {
                    let text = resp.text().await.unwrap_or_default();
                    let running = chaos_tests::relay::metric_sum(
                        &text,
                        "walrelay_auth_password_checks_in_flight",
                        &[],
                    );
                    most = most.max(running);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let readers: Vec<_> = streams
        .into_iter()
        .map(read_answer)
        .map(tokio::spawn)
        .collect();
    let mut answers = Vec::new();
    for reader in readers {
        answers.push(reader.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    let most_running = sampler.await.unwrap();

    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 401).collect();
    let busy: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(refused.len() + busy.len(), N, "answers: {statuses:?}");
    assert!(
        !busy.is_empty(),
        "{N} wrong passwords at once with one check slot, yet every one was checked: {statuses:?}"
    );
    assert!(
        busy.iter().all(|a| a.head.contains("retry-after:")),
        "a 503 without Retry-After"
    );
    let checks = password_checks(&r).await - before;
    assert_eq!(
        checks,
        refused.len() as f64,
        "each 401 costs one bcrypt check and each 503 none"
    );
    assert!(
        most_running <= 1.0,
        "{most_running} checks ran at once with --max-concurrent-password-checks 1"
    );
    assert_eq!(
        metric(
            &r,
            "walrelay_ingest_overloaded_total",
            &[("reason", "password_checks")]
        )
        .await,
        busy.len() as f64
    );
}

fn write_body(name: &str) -> Vec<u8> {
    let now = chaos_tests::now_ms();
    write_request_body(&WriteRequest {
        timeseries: vec![v1_series(&[("__name__", name)], &[(1.0, now)])],
        ..Default::default()
    })
}

/// Holes 3 (the cache) and 6 (timing of unknown users), counted in bcrypt
/// checks rather than measured in milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_pays_bcrypt_once_while_wrong_passwords_and_unknown_users_pay_it_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), &s(&credentials(dir.path(), 8))).await;
    let http = chaos_tests::client(Duration::from_secs(30)).unwrap();
    let post = |user: &'static str, password: &'static str, i: usize| {
        http.post(r.write_url())
            .basic_auth(user, Some(password))
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .body(write_body(&format!("cached_{i}")))
            .send()
    };
    let accepted = || {
        metric(
            &r,
            "walrelay_auth_password_checks_total",
            &[("result", "accepted")],
        )
    };
    let refused = || {
        metric(
            &r,
            "walrelay_auth_password_checks_total",
            &[("result", "refused")],
        )
    };

    for i in 0..5 {
        assert_eq!(post("alice", "right", i).await.unwrap().status(), 204);
    }
    assert_eq!(
        accepted().await,
        1.0,
        "a known sender paid bcrypt more than once"
    );

    assert_eq!(post("alice", "wrong", 0).await.unwrap().status(), 401);
    assert_eq!(refused().await, 1.0, "a wrong password of a known user");
    assert_eq!(post("mallory", "wrong", 0).await.unwrap().status(), 401);
    assert_eq!(
        refused().await,
        2.0,
        "an unknown user was refused without a bcrypt check: its refusal is faster \
         than a known user's, which tells which names exist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_takes_its_concurrency_slot_before_its_password_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = credentials(dir.path(), 8);
    args.extend(["--max-concurrent-requests".into(), "1".into()]);
    let r = start(dir.path(), &s(&args)).await;

    // One write holds the only slot: its head is sent, its body is not.
    let mut held = TcpStream::connect(r.addr()).await.unwrap();
    let head = "POST /api/v1/write HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer tok\r\n\
                Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n\
                Content-Length: 100\r\n\r\n";
    held.write_all(head.as_bytes()).await.unwrap();
    // The held request takes the slot.
    wait_metric(&r, "walrelay_ingest_requests_in_flight", &[], 1.0).await;

    let before = password_checks(&r).await;
    let a = exchange(&r.addr(), &empty_write(&basic("alice", "guess"))).await;
    assert_eq!(
        a.status, 503,
        "with every slot taken, a password was checked first (and answered {})",
        a.status
    );
    assert_eq!(
        password_checks(&r).await,
        before,
        "bcrypt ran without a slot"
    );
    drop(held);
}

// ---------------------------------------------------------------------------
// Hole 5: connections.

/// Opens `n` connections one after the other, each sending half a request
/// head, and counts those the relay closes (end of stream or reset).
struct HalfSent {
    closed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HalfSent {
    async fn open(target: &str, from: Option<[u8; 4]>, n: usize) -> HalfSent {
        let closed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        let target: SocketAddr = target.parse().unwrap();
        for _ in 0..n {
            let socket = TcpSocket::new_v4().unwrap();
            if let Some(ip) = from {
                socket.bind(SocketAddr::from((ip, 0))).unwrap();
            }
            let mut stream = socket.connect(target).await.unwrap();
            // The write may fail on a connection the relay already closed.
            let _ = stream
                .write_all(b"POST /api/v1/write HTTP/1.1\r\nHost: relay\r\n")
                .await;
            let closed = Arc::clone(&closed);
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closed.fetch_add(1, Ordering::SeqCst);
            }));
        }
        HalfSent { closed, tasks }
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits until `n` are closed; panics naming how many were.
    async fn wait_closed(&self, n: usize, what: &str) {
        let start = Instant::now();
        while self.closed() < n {
            assert!(
                start.elapsed() < CLOSE_WITHIN,
                "{what}: {} of {n} connections closed by the relay within {CLOSE_WITHIN:?}",
                self.closed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for HalfSent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn open_fds(r: &Relay) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", r.pid().unwrap()))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_once_and_the_admin_address_still_answers()
{
    let dir = tempfile::tempdir().unwrap();
    // A header timeout far beyond the wait: only the cap can close them.
    let r = start(
        dir.path(),
        &["--max-connections", "8", "--header-read-timeout", "300s"],
    )
    .await;
    let fds_before = open_fds(&r);

    let conns = HalfSent::open(&r.addr(), None, 40).await;
    conns.wait_closed(32, "beyond --max-connections 8").await;
    let fds = open_fds(&r);
    assert!(
        fds <= fds_before + 8 + 8,
        "the relay holds {fds} descriptors, {fds_before} before 40 half-sent requests \
         with --max-connections 8"
    );
    assert_eq!(
        metric(
            &r,
            "walrelay_http_connections_refused_total",
            &[("listener", "main"), ("reason", "max_connections")]
        )
        .await,
        32.0
    );
    assert_eq!(
        metric(&r, "walrelay_http_connections", &[("listener", "main")]).await,
        8.0
    );
    // Probes on the admin address are not held back by the main one's cap.
    let health = exchange(
        r.admin_url().trim_start_matches("http://"),
        "GET /-/healthy HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(health.status, 200);
    assert_eq!(conns.closed(), 32, "a connection within the cap was closed");

    // The listener kept accepting: once the held ones go, others get in.
    drop(conns);
    wait_metric(
        &r,
        "walrelay_http_connections",
        &[("listener", "main")],
        0.0,
    )
    .await;
    let a = exchange(
        &r.addr(),
        "GET /-/healthy HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_max_connections_per_ip() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(
        dir.path(),
        &[
            "--max-connections-per-ip",
            "3",
            "--header-read-timeout",
            "300s",
        ],
    )
    .await;
    let from_one = HalfSent::open(&r.addr(), Some([127, 0, 0, 1]), 6).await;
    from_one.wait_closed(3, "beyond 3 from 127.0.0.1").await;

    // Another address is served while the first holds its share.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
    let mut other = socket.connect(r.addr().parse().unwrap()).await.unwrap();
    other
        .write_all(b"GET /-/healthy HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(other).await.status, 200);
    assert_eq!(from_one.closed(), 3);
    assert_eq!(
        metric(
            &r,
            "walrelay_http_connections_refused_total",
            &[("listener", "main"), ("reason", "max_connections_per_ip")]
        )
        .await,
        3.0
    );
}

// ---------------------------------------------------------------------------
// Hole 4: HTTP/2 connections that send no request.

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const HEADERS: u8 = 0x1;
const ACK: u8 = 0x1;

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The preface and an empty SETTINGS frame: what a client sends first.
fn h2_start() -> Vec<u8> {
    let mut v = H2_PREFACE.to_vec();
    v.extend(h2_frame(SETTINGS, 0, 0, &[]));
    v
}

/// `GET /-/healthy` on stream 1, HPACK without Huffman or indexing of new
/// entries: `:method GET`, `:scheme https` (static table), `:path` and
/// `:authority` as literals with an indexed name.
fn h2_get_healthy() -> Vec<u8> {
    let mut block = vec![0x82, 0x87];
    for (index, value) in [(0x04u8, "/-/healthy"), (0x01, "localhost")] {
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    h2_frame(HEADERS, 0x4 | 0x1, 1, &block)
}

/// Reads frames as a live client would (acknowledging SETTINGS, answering
/// PINGs, so keep-alive alone never closes the connection) until the server
/// closes it. The frames' (type, stream) in order, or None if the
/// connection is still open after [`CLOSE_WITHIN`].
async fn h2_until_closed<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Option<Vec<(u8, u32)>> {
    let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 16384];
    loop {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(frames),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            frames.push((kind, stream));
            let reply = match kind {
                SETTINGS if flags & ACK == 0 => Some(h2_frame(SETTINGS, ACK, 0, &[])),
                PING if flags & ACK == 0 => Some(h2_frame(PING, ACK, 0, &payload)),
                _ => None,
            };
            if let Some(reply) = reply {
                if s.write_all(&reply).await.is_err() {
                    return Some(frames);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_connection_that_sends_only_the_http2_preface_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), &["--header-read-timeout", "2s"]).await;
    let mut stream = TcpStream::connect(r.addr()).await.unwrap();
    stream.write_all(&h2_start()).await.unwrap();
    assert!(
        h2_until_closed(&mut stream).await.is_some(),
        "an HTTP/2 connection without a request is still open after {CLOSE_WITHIN:?} \
         (--header-read-timeout 2s)"
    );
}

/// A TLS client offering only `h2`, trusting `ca`.
fn h2_tls_connector(ca: &rcgen::Certificate) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_over_tls_is_closed_when_it_sends_no_request_or_none_after_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
    let args = [
        "--tls-cert-file".to_owned(),
        cert.display().to_string(),
        "--tls-key-file".to_owned(),
        key_file.display().to_string(),
        "--header-read-timeout".to_owned(),
        "2s".to_owned(),
    ];
    let r = start(dir.path(), &s(&args)).await;
    let connector = h2_tls_connector(&key.cert);
    let connect = || async {
        let tcp = TcpStream::connect(r.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls
    };

    let mut silent = connect().await;
    silent.write_all(&h2_start()).await.unwrap();
    let mut served = connect().await;
    served.write_all(&h2_start()).await.unwrap();
    served.write_all(&h2_get_healthy()).await.unwrap();

    let (silent, served) = tokio::join!(h2_until_closed(&mut silent), h2_until_closed(&mut served));
    assert!(
        silent.is_some(),
        "an HTTP/2 connection that sent only the preface is still open after {CLOSE_WITHIN:?}"
    );
    let served = served.unwrap_or_else(|| {
        panic!("an HTTP/2 connection idle after its request is still open after {CLOSE_WITHIN:?}")
    });
    assert!(
        served.contains(&(HEADERS, 1)),
        "the request was not answered: {served:?}"
    );
    assert!(
        served.contains(&(GOAWAY, 0)),
        "closed without GOAWAY: {served:?}"
    );
}

// ---------------------------------------------------------------------------
// Hole 8: methods of the read-only endpoints.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_endpoints_answer_405_with_allow_to_other_methods_on_both_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), &[]).await;
    let admin = r.admin_url().trim_start_matches("http://").to_owned();
    for addr in [r.addr(), admin] {
        for path in ["/metrics", "/-/healthy", "/-/ready", "/api/v1/status"] {
            for method in ["POST", "PUT", "DELETE"] {
                let a = exchange(
                    &addr,
                    &format!(
                        "{method} {path} HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\
                         Connection: close\r\n\r\n"
                    ),
                )
                .await;
                assert_eq!(a.status, 405, "{method} {path} on {addr}");
                assert!(a.head.contains("allow: get"), "{method} {path}: {}", a.head);
            }
            let a = exchange(
                &addr,
                &format!("HEAD {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert_eq!(a.status, 200, "HEAD {path} on {addr}");
        }
    }
}
