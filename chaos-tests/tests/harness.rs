//! Self-tests of the harness against the real programs (Debian's
//! `prometheus`). Nothing is skipped: a missing program fails the test with
//! the package to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos_tests::encode::{post_remote_write_with, v1_series, write_request_body};
use chaos_tests::load::{Load, LoadSpec, Outcome, RetryPolicy};
use chaos_tests::process::Proc;
use chaos_tests::prometheus::Prometheus;
use chaos_tests::proxy::{FaultProxy, ProxyMode};
use chaos_tests::verify::verify;
use chaos_tests::AckLog;
use prom_remote_write::v1::WriteRequest;

fn base_spec(workers: u32, series: u32) -> LoadSpec {
    LoadSpec {
        workers,
        series_per_worker: series,
        request_timeout: Duration::from_secs(5),
        ..LoadSpec::default()
    }
}

/// 1. Straight into a real Prometheus: everything acknowledged is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_into_prometheus_is_lossless() {
    let prom = Prometheus::start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("ack.jsonl");
    let spec = LoadSpec {
        samples_per_series: 3,
        interval: Duration::from_millis(10),
        duration: Some(Duration::from_secs(3)),
        ack_log: Some(log_path.clone()),
        ..base_spec(4, 50)
    };
    let ack = Load::run(spec, &prom.write_url()).await.unwrap();
    let summary = ack.summary();
    println!("{summary}");
    let c = &summary.counts;
    assert!(c.acked_requests >= 40, "too few requests: {summary}");
    assert_eq!(
        c.acked_requests,
        c.requests,
        "{summary}\n{:?}",
        ack.attempts.first()
    );
    assert_eq!((c.refused, c.failed), (0, 0), "{summary}");
    assert_eq!(c.acked_samples, c.acked_requests * 50 * 3);
    assert!(summary.latency.p50_us > 0 && summary.latency.max_us >= summary.latency.p99_us);

    let verdict = verify(&prom, &ack).await.unwrap();
    println!("{verdict}");
    verdict.assert_lossless();
    assert_eq!(verdict.acknowledged, c.acked_samples);
    assert_eq!(verdict.delivered, verdict.acknowledged);
    assert_eq!((verdict.extra, verdict.unexpected), (0, 0));

    // The streamed JSON-lines log says the same as the in-memory one.
    let streamed = AckLog::read_jsonl(&log_path).unwrap();
    assert_eq!(streamed.batches, ack.batches);
    assert_eq!(streamed.spec.run_id, ack.spec.run_id);
    assert_eq!(streamed.elapsed_ms, ack.elapsed_ms);
    // And so does one written afterwards.
    let written = dir.path().join("again.jsonl");
    ack.write_jsonl(&written).unwrap();
    assert_eq!(AckLog::read_jsonl(&written).unwrap().batches, ack.batches);

    // Raw samples of one series come back in order, one per timestamp sent.
    let (start, end) = ack.time_range().unwrap();
    let sel = format!(
        "walrelay_load_samples{{run=\"{}\",worker=\"0\",series=\"0\"}}",
        ack.spec.run_id
    );
    let raw = prom.raw_samples(&sel, start, end).await.unwrap();
    assert_eq!(raw.len(), 1, "{:?}", raw.keys());
    let (key, samples) = raw.iter().next().unwrap();
    assert!(
        key.contains("series=\"0\"") && key.contains("__name__="),
        "{key}"
    );
    let acked0 = ack.acked_samples_of(0);
    let want: Vec<(i64, f64)> = acked0
        .iter()
        .filter(|(s, _, _)| *s == 0)
        .map(|&(_, ts, v)| (ts, v))
        .collect();
    assert_eq!(samples, &want);
}

/// The load generator as a separate process records an ack log that a test
/// can verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_cli_records_a_verifiable_ack_log() {
    let prom = Prometheus::start_server().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("ack.jsonl");
    // Fixed timestamps: sample k of a series at start + 10k ms.
    let start_ms = chaos_tests::now_ms() - 60_000;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walrelay-load"));
    cmd.args(["--url", &prom.write_url()])
        .args(["--workers", "2", "--series-per-worker", "20"])
        .args(["--samples-per-series", "2", "--interval", "20ms"])
        .args(["--duration", "2s", "--seed", "7", "--run-id", "cli-test"])
        .args(["--start-ms", &start_ms.to_string(), "--step-ms", "10"])
        .arg("--ack-log")
        .arg(&log_path);
    let proc = Proc::spawn("walrelay-load", cmd).unwrap();
    let status = proc.wait_exit_async(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{}", proc.log_tail(20));
    let out = proc.log();
    assert!(
        out.contains("run cli-test:") && out.contains("acknowledged samples/s"),
        "{out}"
    );
    let ack = AckLog::read_jsonl(&log_path).unwrap();
    assert_eq!(ack.spec.run_id, "cli-test");
    let b = &ack.batches[ack.batches.len() - 1];
    assert_eq!(b.ts0, start_ms + 10 * b.k0 as i64);
    assert!(ack.acked_samples() > 0);
    verify(&prom, &ack).await.unwrap().assert_lossless();
}

/// 2. Negative controls: the oracle can fail, and counts exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_loss_and_wrong_values() {
    let mut prom = Prometheus::start_server().await.unwrap();
    let spec = LoadSpec {
        samples_per_series: 2,
        requests_per_worker: Some(20),
        ..base_spec(2, 10)
    };
    let ack = Load::run(spec, &prom.write_url()).await.unwrap();
    assert_eq!(ack.counts().acked_requests, 40);
    let v = verify(&prom, &ack).await.unwrap();
    v.assert_lossless();

    // Claim one more acknowledged request that was never sent: exactly its
    // samples are lost.
    let mut forged = ack.clone();
    let mut extra = forged.batches.last().unwrap().clone();
    extra.seq += 1;
    extra.k0 += 2;
    extra.ts0 = extra.last_ts(ack.spec.step_ms) + 1;
    forged.batches.push(extra.clone());
    let v = verify(&prom, &forged).await.unwrap();
    assert_eq!(v.lost, extra.samples(), "{}", v.details());
    assert!(!v.is_lossless());
    assert!(v.lost_examples[0].contains(&format!("worker {}", extra.worker)));

    // Claim other values for one acknowledged request: wrong values.
    let mut forged = ack.clone();
    forged.batches[3].k0 += 1000;
    let v = verify(&prom, &forged).await.unwrap();
    assert_eq!(
        v.wrong_value,
        forged.batches[3].samples(),
        "{}",
        v.details()
    );
    assert_eq!(v.lost, 0);

    // An unacknowledged request that was stored anyway is extra, not loss.
    let mut forged = ack.clone();
    forged.batches[5].acked = false;
    let v = verify(&prom, &forged).await.unwrap();
    assert!(v.is_lossless(), "{}", v.details());
    assert_eq!(v.extra, forged.batches[5].samples());

    // A fresh, empty Prometheus holds nothing: everything is lost, and
    // assert_lossless panics listing the first missing samples.
    prom.restart_empty().await.unwrap();
    let v = verify(&prom, &ack).await.unwrap();
    println!("{}", v.details());
    assert_eq!(v.lost, ack.acked_samples());
    assert!(v.lost > 0 && v.delivered == 0);
    let panic = std::panic::catch_unwind(|| v.assert_lossless()).unwrap_err();
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("NOT LOSSLESS") && msg.contains("first lost samples"),
        "{msg}"
    );

    // And restart() keeps the data: write again, restart, still there.
    let again = Load::run(
        LoadSpec {
            requests_per_worker: Some(5),
            ..base_spec(1, 5)
        },
        &prom.write_url(),
    )
    .await
    .unwrap();
    prom.restart().await.unwrap();
    verify(&prom, &again).await.unwrap().assert_lossless();
}

/// 3. FaultProxy in front of Prometheus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_modes() {
    let prom = Prometheus::start_server().await.unwrap();
    let proxy = FaultProxy::start_seeded(prom.addr(), 42).await.unwrap();
    let url = proxy.write_url();
    chaos_tests::ports::wait_for_tcp(proxy.addr(), Duration::from_secs(1))
        .await
        .unwrap();
    let once = |n: u64| LoadSpec {
        requests_per_worker: Some(n),
        retry: RetryPolicy::Never,
        ..base_spec(2, 5)
    };

    // Http(500): every request refused by the proxy, none forwarded.
    proxy.set_mode(ProxyMode::http(500));
    let ack = Load::run(once(5), &url).await.unwrap();
    let c = ack.counts();
    assert_eq!(
        (c.requests, c.acked_requests, c.refused),
        (10, 0, 10),
        "{c:?}"
    );
    assert!(ack.attempts.iter().all(|a| matches!(
        &a.outcome,
        Outcome::Refused { status: 500, body, .. } if body.contains("injected")
    )));
    assert_eq!(proxy.stats().requests("http"), 10);
    assert_eq!(verify(&prom, &ack).await.unwrap().extra, 0);

    // 429 with Retry-After is reported as such.
    proxy.set_mode(ProxyMode::too_many_requests(3));
    let ack = Load::run(once(1), &url).await.unwrap();
    assert!(ack.attempts.iter().all(|a| matches!(
        a.outcome,
        Outcome::Refused {
            status: 429,
            retry_after: Some(3),
            ..
        }
    )));

    // Pass: everything goes through and arrives.
    proxy.set_mode(ProxyMode::Pass);
    let ack = Load::run(once(5), &url).await.unwrap();
    assert_eq!(ack.counts().acked_requests, 10, "{}", ack.summary());
    assert_eq!(proxy.stats().requests("pass"), 10);
    verify(&prom, &ack).await.unwrap().assert_lossless();

    // Reset: connection errors, nothing acknowledged.
    proxy.set_mode(ProxyMode::Reset);
    let ack = Load::run(once(3), &url).await.unwrap();
    let c = ack.counts();
    assert_eq!((c.acked_requests, c.failed), (0, 6), "{c:?}");
    assert!(ack
        .attempts
        .iter()
        .all(|a| matches!(a.outcome, Outcome::Failed { .. })));
    assert!(proxy.stats().resets >= 6);

    // Delay: each chunk waits, so every acknowledgement is slower.
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(150)));
    let ack = Load::run(once(2), &url).await.unwrap();
    assert_eq!(ack.counts().acked_requests, 4);
    assert!(ack.latency().p50_us >= 300_000, "{:?}", ack.latency());

    // Stall: no answer, the attempt times out.
    proxy.set_mode(ProxyMode::Stall);
    let t0 = Instant::now();
    let ack = Load::run(
        LoadSpec {
            request_timeout: Duration::from_millis(400),
            ..once(1)
        },
        &url,
    )
    .await
    .unwrap();
    assert_eq!(ack.counts().failed, 2, "{}", ack.summary());
    assert!(t0.elapsed() >= Duration::from_millis(400));

    // DropRandom: some connections reset; retrying senders still deliver
    // everything they were told was acknowledged.
    proxy.set_mode(ProxyMode::DropRandom(0.3));
    let ack = Load::run(
        LoadSpec {
            requests_per_worker: Some(20),
            retry: RetryPolicy::UntilAcked,
            ..base_spec(2, 5)
        },
        &url,
    )
    .await
    .unwrap();
    let c = ack.counts();
    assert_eq!(c.acked_requests, 40, "{c:?}");
    assert!(c.failed > 0, "{c:?}");
    assert!(proxy.stats().resets > 6, "{:?}", proxy.stats());
    verify(&prom, &ack).await.unwrap().assert_lossless();
}

/// A remote-write body of one series `{__name__="chaos_proxy_test", req=...}`
/// with `samples` samples from `t0` on.
fn proxy_test_body(req: &str, t0: i64, samples: usize) -> Vec<u8> {
    let s: Vec<(f64, i64)> = (0..samples)
        .map(|i| (i as f64 * 1.37 + t0 as f64, t0 + i as i64))
        .collect();
    write_request_body(&WriteRequest {
        timeseries: vec![v1_series(
            &[("__name__", "chaos_proxy_test"), ("req", req)],
            &s,
        )],
        ..Default::default()
    })
}

/// Samples of `chaos_proxy_test{req=...}` in Prometheus since `t0`.
async fn proxy_test_samples(prom: &Prometheus, req: &str, t0: i64) -> usize {
    let selector = format!("chaos_proxy_test{{req=\"{req}\"}}");
    prom.raw_samples(&selector, t0, t0 + 60_000)
        .await
        .unwrap()
        .values()
        .map(Vec::len)
        .sum()
}

/// Latency holds each request once before forwarding it, and the answer
/// comes back: every request takes at least that long and arrives. Refuse
/// closes the port (connections are refused, nothing is forwarded), and
/// the same port forwards again once the mode changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_latency_holds_each_request_and_refuse_closes_the_port_until_the_next_mode() {
    let prom = Prometheus::start_server().await.unwrap();
    let proxy = FaultProxy::start(prom.addr()).await.unwrap();
    let client = chaos_tests::client(Duration::from_secs(10)).unwrap();
    let url = proxy.write_url();
    let t0 = chaos_tests::now_ms() - 30_000;

    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(300)));
    for (i, req) in ["late-1", "late-2"].into_iter().enumerate() {
        let began = Instant::now();
        let body = proxy_test_body(req, t0 + i as i64 * 1000, 500);
        let answer = post_remote_write_with(&client, &url, body).await.unwrap();
        assert_eq!(answer.0, 204, "{answer:?}");
        assert!(began.elapsed() >= Duration::from_millis(300));
    }
    assert_eq!(proxy.stats().forwarded("latency"), 2, "{:?}", proxy.stats());
    assert_eq!(proxy_test_samples(&prom, "late-1", t0).await, 500);

    proxy.set_mode(ProxyMode::Refuse);
    // The listener closes as the proxy sees the change (a connection
    // caught in its backlog meanwhile is reset): wait for a refusal.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = tokio::net::TcpStream::connect(proxy.addr()).await;
        if matches!(&c, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused) {
            break;
        }
        assert!(Instant::now() < deadline, "not refused: {c:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let down = post_remote_write_with(&client, &url, proxy_test_body("down", t0 + 5000, 1)).await;
    assert!(down.is_err(), "{down:?}");

    proxy.set_mode(ProxyMode::Pass);
    chaos_tests::ports::wait_for_tcp(proxy.addr(), Duration::from_secs(10))
        .await
        .unwrap();
    let back = post_remote_write_with(&client, &url, proxy_test_body("back", t0 + 6000, 1))
        .await
        .unwrap();
    assert_eq!(back.0, 204, "{back:?}");
    assert_eq!(proxy.stats().forwarded("refuse"), 0, "{:?}", proxy.stats());
    assert_eq!(proxy_test_samples(&prom, "down", t0).await, 0);
    assert_eq!(proxy_test_samples(&prom, "back", t0).await, 1);
}

/// 4. BodyLimit, an ingress's body size limit: bodies over the limit are
/// answered 413 by the proxy, smaller ones forwarded, all on one kept-alive
/// connection; a chunked body over the limit is read whole too, so what
/// follows it on the connection is still read as the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_body_limit_refuses_large_bodies_and_forwards_small_ones_on_one_connection() {
    let prom = Prometheus::start_server().await.unwrap();
    let proxy = FaultProxy::start(prom.addr()).await.unwrap();
    let limit = 2_000;
    proxy.set_mode(ProxyMode::body_limit(limit));
    let client = chaos_tests::client(Duration::from_secs(10)).unwrap();
    let url = proxy.write_url();
    let t0 = chaos_tests::now_ms() - 30_000;
    let large = proxy_test_body("large", t0, 2_000);
    assert!(large.len() > limit, "{} bytes", large.len());

    let mut answers = Vec::new();
    for i in 0..5 {
        let body = if i % 2 == 0 {
            proxy_test_body("small", t0 + i, 1)
        } else {
            large.clone()
        };
        assert!(i % 2 == 1 || body.len() <= limit);
        answers.push(post_remote_write_with(&client, &url, body).await.unwrap());
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(statuses, [204, 413, 204, 413, 204], "{answers:?}");
    assert!(
        answers[1].1.contains(&format!(
            "{} bytes is over the limit of {limit}",
            large.len()
        )),
        "{answers:?}"
    );
    // How many connections the client used is its pool's business (a
    // connection returned to the pool a moment after the answer may miss
    // the next request); the raw connection below shows a 413 followed by
    // another request on one connection.
    let stats = proxy.stats();
    assert_eq!(
        (
            stats.answered("body_limit"),
            stats.forwarded("body_limit"),
            stats.requests("body_limit"),
        ),
        (2, 3, 5),
        "{stats:?}"
    );
    assert_eq!(proxy_test_samples(&prom, "small", t0).await, 3);
    assert_eq!(proxy_test_samples(&prom, "large", t0).await, 0);

    // A chunked body over the limit, then (pipelined on the same
    // connection) a request the upstream answers.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let mut req =
        b"POST /api/v1/write HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(format!("{:x}\r\n", 1_000).as_bytes());
        req.extend_from_slice(&[b'z'; 1_000]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(
        b"0\r\n\r\nGET /-/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    raw.write_all(&req).await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_string(&mut got))
        .await
        .unwrap()
        .unwrap();
    let refused = got
        .find("HTTP/1.1 413 Payload Too Large")
        .unwrap_or(usize::MAX);
    let ready = got.find("HTTP/1.1 200 OK").unwrap_or(usize::MAX);
    assert!(refused < ready && ready < usize::MAX, "{got}");
    assert!(
        got.contains("a body of 3000 bytes is over the limit"),
        "{got}"
    );
}

/// 5. A mode switched between requests lets a request already forwarded
/// finish with the upstream's answer, and no later request on that
/// connection is forwarded; a mode switched at once cuts it, although the
/// upstream stored it (the ambiguous failure scenarios must avoid when they
/// count refusals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_switching_between_requests_lets_a_forwarded_request_finish() {
    let prom = Prometheus::start_server().await.unwrap();
    let proxy = FaultProxy::start(prom.addr()).await.unwrap();
    let client = chaos_tests::client(Duration::from_secs(10)).unwrap();
    let url = proxy.write_url();
    let t0 = chaos_tests::now_ms() - 30_000;

    // Each switch lands while a request is held by a 1 s delay each way,
    // after it was forwarded (counted once forwarded). Each goes on a
    // client of its own, so on a new connection: a pooled one that a mode
    // change has just closed could fail it before it is forwarded.
    let in_flight = |req: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            let client = chaos_tests::client(Duration::from_secs(10)).unwrap();
            post_remote_write_with(&client, &url, proxy_test_body(req, t0, 1)).await
        })
    };
    let wait_forwarded = |n: u64| {
        let proxy = &proxy;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while proxy.stats().forwarded("delay") < n {
                assert!(Instant::now() < deadline, "{:?}", proxy.stats());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    proxy.set_mode(ProxyMode::Delay(Duration::from_secs(1)));
    let graceful = in_flight("graceful");
    wait_forwarded(1).await;
    proxy.set_mode_between_requests(ProxyMode::http(503));
    let answer = graceful.await.unwrap().unwrap();
    assert_eq!(answer.0, 204, "{answer:?}");
    // The kept-alive connection of the old mode is closed at the next
    // request, which is not forwarded; whatever the client makes of that,
    // from then on the new mode answers.
    let next = post_remote_write_with(&client, &url, proxy_test_body("after", t0 + 1, 1)).await;
    let next = match next {
        Ok(a) => a,
        Err(_) => post_remote_write_with(&client, &url, proxy_test_body("after", t0 + 1, 1))
            .await
            .unwrap(),
    };
    assert_eq!(next.0, 503, "{next:?}");
    assert_eq!(proxy.stats().forwarded("delay"), 1, "{:?}", proxy.stats());

    proxy.set_mode(ProxyMode::Delay(Duration::from_secs(1)));
    let cut = in_flight("cut");
    wait_forwarded(2).await;
    proxy.set_mode(ProxyMode::http(503));
    let answer = cut.await.unwrap();
    assert!(answer.is_err(), "the request was not cut: {answer:?}");

    assert_eq!(proxy_test_samples(&prom, "graceful", t0).await, 1);
    assert_eq!(proxy_test_samples(&prom, "after", t0).await, 0);
    // Stored, though its client saw the connection close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy_test_samples(&prom, "cut", t0).await == 0 {
        assert!(Instant::now() < deadline, "the cut request was not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A background load can be stopped while things are being killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_load_survives_a_prometheus_restart() {
    let mut prom = Prometheus::start_server().await.unwrap();
    let handle = Load::start(
        LoadSpec {
            interval: Duration::from_millis(20),
            retry: RetryPolicy::UntilAcked,
            request_timeout: Duration::from_secs(2),
            backoff_max: Duration::from_millis(200),
            ..base_spec(2, 10)
        },
        &prom.write_url(),
    )
    .unwrap();
    handle
        .wait_acked_requests(10, Duration::from_secs(10))
        .await
        .unwrap();
    prom.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    prom.start_again().await.unwrap();
    let before = handle.progress().acked_requests;
    handle
        .wait_acked_requests(before + 10, Duration::from_secs(10))
        .await
        .unwrap();
    let progress = handle.progress();
    let ack = handle.stop().await.unwrap();
    let c = ack.counts();
    println!("{progress:?} {}", ack.summary());
    assert!(c.failed > 0, "the outage was not seen: {c:?}");
    // Prometheus writes its WAL to the OS before answering, so SIGKILL
    // (unlike power loss) keeps everything it acknowledged.
    let v = verify(&prom, &ack).await.unwrap();
    println!("{v}");
    v.assert_lossless();
}

/// Processes are signalled, logged, and never outlive their Proc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proc_lifecycle() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "echo out-line; echo err-line >&2; exec sleep 1000"]);
    let p = Proc::spawn("sleeper", cmd).unwrap();
    let pid = p.pid();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log().contains("err-line") {
        assert!(Instant::now() < deadline, "{}", p.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(p.log_tail(2).contains("out-line"));
    p.sigstop().unwrap();
    let state = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
            .flatten()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while state() != Some('T') {
        assert!(Instant::now() < deadline, "not stopped: {:?}", state());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.sigcont().unwrap();
    assert!(p.is_running());
    drop(p);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process survived its Proc"
    );

    let p = Proc::spawn("exiter", std::process::Command::new("true")).unwrap();
    assert!(p.wait_exit(Duration::from_secs(5)).unwrap().success());
    assert!(p.sigterm().is_err(), "signalled a reaped pid");
}

/// Agent mode with remote_write and external labels, and a server with an
/// out-of-order window, configured as later suites need them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_agent_and_out_of_order_options() {
    use chaos_tests::encode::{post_remote_write, write_request_body};
    use chaos_tests::prometheus::PrometheusOpts;
    use prom_remote_write::v1;

    let server =
        Prometheus::start(PrometheusOpts::server().out_of_order_window(Duration::from_secs(600)))
            .await
            .unwrap();
    let agent = Prometheus::start(
        PrometheusOpts::agent()
            .external_label("prometheus_replica", "agent-a")
            .remote_write_with(
                server.write_url(),
                serde_json::json!({"queue_config": {"batch_send_deadline": "100ms"}}),
            ),
    )
    .await
    .unwrap();
    assert!(
        agent.query("up", None).await.is_err(),
        "agent mode answers queries"
    );

    let ack = Load::run(
        LoadSpec {
            requests_per_worker: Some(10),
            ..base_spec(2, 10)
        },
        &agent.write_url(),
    )
    .await
    .unwrap();
    assert_eq!(ack.counts().acked_requests, 20);
    // The agent forwards on its own schedule.
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = verify(&server, &ack).await.unwrap();
        if v.is_lossless() || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    v.assert_lossless();
    let replica = server
        .query(
            &format!(
                "count({})",
                ack.spec
                    .selector(None)
                    .replace('}', ",prometheus_replica=\"agent-a\"}")
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(replica["result"][0]["value"][1], "20", "{replica}");

    // Out of order within the window: accepted by this server.
    let sample = |ts: i64| v1::WriteRequest {
        timeseries: vec![v1::TimeSeries {
            labels: vec![v1::Label {
                name: "__name__".into(),
                value: "ooo_probe".into(),
            }],
            samples: vec![v1::Sample {
                value: 1.0,
                timestamp: ts,
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let now = chaos_tests::now_ms();
    let (st, body) = post_remote_write(&server.write_url(), write_request_body(&sample(now)))
        .await
        .unwrap();
    assert!((200..300).contains(&st), "{st} {body}");
    let (st, body) = post_remote_write(
        &server.write_url(),
        write_request_body(&sample(now - 300_000)),
    )
    .await
    .unwrap();
    assert!(
        (200..300).contains(&st),
        "out-of-order sample refused: {st} {body}"
    );
    let raw = server
        .raw_samples("ooo_probe", now - 400_000, now)
        .await
        .unwrap();
    assert_eq!(raw.values().next().map(|v| v.len()), Some(2), "{raw:?}");
}

/// The Relay wrapper's plumbing (flags, readiness, status, metrics, kill,
/// restart on the same port and data dir), against the real walrelay binary
/// (`cargo build --bin walrelay` first; `.ci/test.sh` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_wrapper_plumbing() {
    use chaos_tests::relay::Relay;

    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        data.path(),
        &[
            ("a", "http://127.0.0.1:1/api/v1/write"),
            ("b", "http://127.0.0.1:2/api/v1/write"),
        ],
        &["--segment-bytes", "64KiB"],
    )
    .await
    .unwrap();
    let status = relay.status().await.unwrap();
    let names: Vec<&str> = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(relay
        .metrics_text()
        .await
        .unwrap()
        .contains("walrelay_build_info"));
    let ack = Load::run(
        LoadSpec {
            requests_per_worker: Some(3),
            ..base_spec(1, 2)
        },
        &relay.write_url(),
    )
    .await
    .unwrap();
    assert_eq!(ack.counts().acked_requests, 3);

    let (url, pid) = (relay.url(), relay.pid().unwrap());
    relay.sigkill().unwrap();
    assert!(relay.status().await.is_err());
    relay.restart().await.unwrap();
    assert_eq!(relay.url(), url);
    assert_ne!(relay.pid().unwrap(), pid);
    let head = |s: serde_json::Value| s["wal"]["head_seq"].as_u64().unwrap();
    assert_eq!(head(relay.status().await.unwrap()), 3);
    assert_eq!(
        relay
            .metric_sum("walrelay_ingest_requests_total", &[])
            .await
            .unwrap(),
        0.0,
        "a fresh process after the kill"
    );
    relay.sigstop().unwrap();
    relay.sigcont().unwrap();
    relay.restart().await.unwrap(); // graceful stop, then start
    assert_eq!(head(relay.status().await.unwrap()), 3);
    assert!(relay.log_tail(50).contains("walrelay serving"));
}
