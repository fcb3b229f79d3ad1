//! Ingest edge cases of the real `walrelay serve` process: every bad input
//! gets its status and stores nothing; the data dir lock; SIGTERM; the disk
//! budget answering 429 with Retry-After and recovering by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos_tests::encode::v1_series;
use chaos_tests::prometheus::{Prometheus, PrometheusOpts};
use chaos_tests::relay::Relay;
use prom_remote_write::encode::snappy_compress;
use prom_remote_write::v1::{Label, Sample, TimeSeries, WriteRequest};
use prost::Message;

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

fn request(name: &str, samples: usize) -> WriteRequest {
    let now = chaos_tests::now_ms();
    WriteRequest {
        timeseries: vec![v1_series(
            &[("__name__", name), ("job", "ingest-test")],
            &(0..samples)
                .map(|i| (i as f64, now - (samples - i) as i64))
                .collect::<Vec<_>>(),
        )],
        ..Default::default()
    }
}

fn body(req: &WriteRequest) -> Vec<u8> {
    snappy_compress(&req.encode_to_vec())
}

async fn post(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, String, Option<String>) {
    chaos_tests::install_tls_provider();
    let client = reqwest::Client::new();
    let mut rb = client.post(url).body(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("Retry-After")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, resp.text().await.unwrap(), retry_after)
}

const V1: &[(&str, &str)] = &[
    ("Content-Type", "application/x-protobuf"),
    ("Content-Encoding", "snappy"),
];

async fn head_seq(r: &Relay) -> u64 {
    r.status().await.unwrap()["wal"]["head_seq"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_status_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let data = dir.path().join("data");
    let r = Relay::start_with_bin(
        BIN,
        &data,
        &[],
        &[
            "--max-body-bytes",
            "64KiB",
            "--max-decoded-bytes",
            "256KiB",
            "--bearer-token-file",
            token.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let url = r.write_url();
    let auth = ("Authorization", "Bearer s3cret");
    let with_auth = |h: &[(&'static str, &'static str)]| {
        let mut v = h.to_vec();
        v.push(auth);
        v
    };
    let good = body(&request("ingest_ok", 3));

    // A good request is accepted and stored: the baseline.
    let (s, _, _) = post(&url, good.clone(), &with_auth(V1)).await;
    assert_eq!(s, 204);
    assert_eq!(head_seq(&r).await, 1);

    let mut no_name = request("x", 1);
    no_name.timeseries[0].labels.remove(0);
    let mut bomb = Vec::new();
    // A snappy block header declaring a 4 GiB decoded length.
    bomb.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x10]);
    bomb.extend_from_slice(&[0u8; 32]);
    let mut truncated = request("t", 50).encode_to_vec();
    truncated.truncate(truncated.len() / 2);
    // (what, body, headers, expected status, a word the reason must contain)
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("no token", good.clone(), V1.to_vec(), 401, "token"),
        (
            "wrong token",
            good.clone(),
            vec![V1[0], V1[1], ("Authorization", "Bearer nope")],
            401,
            "token",
        ),
        (
            "not snappy",
            b"definitely not snappy".to_vec(),
            with_auth(V1),
            400,
            "snappy",
        ),
        (
            "truncated protobuf",
            snappy_compress(&truncated),
            with_auth(V1),
            400,
            "",
        ),
        (
            "missing __name__",
            body(&no_name),
            with_auth(V1),
            400,
            "__name__",
        ),
        ("decompression bomb", bomb, with_auth(V1), 413, ""),
        (
            "body over the limit",
            vec![0u8; 100 << 10],
            with_auth(V1),
            413,
            "limit",
        ),
        (
            "json content type",
            good.clone(),
            with_auth(&[("Content-Type", "application/json"), V1[1]]),
            415,
            "",
        ),
        (
            "gzip encoding",
            good.clone(),
            with_auth(&[V1[0], ("Content-Encoding", "gzip")]),
            415,
            "",
        ),
    ];
    for (what, b, headers, want, needle) in cases {
        let (status, text, _) = post(&url, b, &headers).await;
        assert_eq!(status, want, "{what}: got {status} {text:?}");
        assert!(!text.trim().is_empty(), "{what}: a reason is given");
        assert!(
            text.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: reason {text:?} should mention {needle:?}"
        );
    }
    let resp = reqwest::Client::new()
        .get(&url)
        .header("Authorization", "Bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(head_seq(&r).await, 1, "nothing refused was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Relay::start_with_bin(BIN, dir.path(), &[], &[])
        .await
        .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another walrelay"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_exits_zero_and_a_restart_resumes() {
    let prom = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = Relay::start_with_bin(BIN, dir.path(), &[("a", &prom.write_url())], &[])
        .await
        .unwrap();
    for _ in 0..5 {
        let (s, _, _) = post(&r.write_url(), body(&request("sigterm_test", 10)), V1).await;
        assert_eq!(s, 204);
    }
    let started = Instant::now();
    let status = r.stop(Duration::from_secs(20)).await.unwrap();
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        r.log_tail(20)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stops well within a grace period"
    );
    r.restart().await.unwrap();
    assert_eq!(
        head_seq(&r).await,
        5,
        "everything acknowledged is still there"
    );
    let st = r.status().await.unwrap();
    assert_eq!(st["recovery"]["truncated"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_budget_answers_429_with_retry_after_and_recovers_when_the_replica_drains() {
    let mut prom = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start_with_bin(
        BIN,
        dir.path(),
        &[("a", &prom.write_url())],
        &[
            "--max-disk-bytes",
            "2MiB",
            "--compression",
            "none",
            "--retry-max-backoff",
            "500ms",
        ],
    )
    .await
    .unwrap();
    prom.stop().await.unwrap();
    // Distinct series so every request is ~20 KiB raw.
    let mut refused = None;
    let mut accepted = 0;
    for i in 0..400 {
        let (s, text, ra) = post(
            &r.write_url(),
            body(&request(&format!("budget_{i}"), 1000)),
            V1,
        )
        .await;
        match s {
            204 => accepted += 1,
            429 => {
                refused = Some((text, ra));
                break;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let (text, retry_after) = refused.expect("the budget is reached");
    assert!(accepted > 10);
    assert!(text.contains("budget"), "{text}");
    assert!(retry_after.is_some(), "429 carries Retry-After");
    prom.restart().await.unwrap();
    // Ingest resumes by itself once the replica has drained the backlog.
    let started = Instant::now();
    loop {
        let (s, _, _) = post(&r.write_url(), body(&request("budget_after", 1000)), V1).await;
        if s == 204 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "ingest did not resume"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Everything accepted before the refusal reached the replica. Ingest
    // resumes as soon as delivered segments free the budget, which can be
    // before the last of the backlog is delivered: wait for that first.
    let started = Instant::now();
    while r.status().await.unwrap()["replicas"][0]["lag_records"].as_u64() != Some(0) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the replica did not catch up: {}",
            r.status().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..accepted {
        let v = prom
            .query_value(&format!("count_over_time(budget_{i}[1h])"))
            .await
            .unwrap();
        assert_eq!(v, Some(1000.0), "series budget_{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sender_and_the_replica_hold_the_same_samples() {
    let replica = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start_with_bin(BIN, dir.path(), &[("a", &replica.write_url())], &[])
        .await
        .unwrap();
    let node_port = chaos_tests::ports::free_port();
    let node = chaos_tests::process::Proc::spawn("node-exporter", {
        let mut c = std::process::Command::new(chaos_tests::tools::NODE_EXPORTER.path().unwrap());
        c.arg(format!("--web.listen-address=127.0.0.1:{node_port}"));
        c
    })
    .unwrap();
    chaos_tests::ports::wait_for_tcp(format!("127.0.0.1:{node_port}"), Duration::from_secs(10))
        .await
        .unwrap();
    let sender = Prometheus::start(
        PrometheusOpts::server()
            .scrape_interval(Duration::from_secs(1))
            .scrape("node", &[&format!("127.0.0.1:{node_port}")])
            .scrape("walrelay", &[&r.addr()])
            .remote_write(r.write_url()),
    )
    .await
    .unwrap();
    let start = chaos_tests::now_ms();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let end = chaos_tests::now_ms() - 3000;
    // Wait until the replica holds data up to `end` for the scraped jobs.
    let waited = Instant::now();
    loop {
        let v = replica
            .query_value(&format!("timestamp(up{{job=\"node\"}}) * 1000 >= {end}"))
            .await
            .unwrap();
        if v.is_some() {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "replica never caught up"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for selector in ["{job=\"node\"}", "{job=\"walrelay\"}"] {
        let want = sender.raw_samples(selector, start, end).await.unwrap();
        let got = replica.raw_samples(selector, start, end).await.unwrap();
        assert!(want.len() > 10, "{selector}: the sender scraped series");
        let total: usize = want.values().map(Vec::len).sum();
        for (series, samples) in &want {
            let theirs = got
                .get(series)
                .unwrap_or_else(|| panic!("replica lacks {series}"));
            let same = samples.len() == theirs.len()
                && samples
                    .iter()
                    .zip(theirs)
                    .all(|(a, b)| a.0 == b.0 && (a.1 == b.1 || (a.1.is_nan() && b.1.is_nan())));
            assert!(same, "{series}: sender {samples:?} replica {theirs:?}");
        }
        eprintln!(
            "{selector}: {} series, {total} samples identical",
            want.len()
        );
    }
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_accepting_and_accounts_every_dropped_sample() {
    let mut prom = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start_with_bin(
        BIN,
        dir.path(),
        &[("a", &prom.write_url())],
        &[
            "--max-disk-bytes",
            "1MiB",
            "--full-policy",
            "drop-oldest",
            "--compression",
            "none",
            "--retry-max-backoff",
            "500ms",
        ],
    )
    .await
    .unwrap();
    prom.stop().await.unwrap();
    let total = 300;
    for i in 0..total {
        let (s, text, _) = post(
            &r.write_url(),
            body(&request(&format!("drop_{i}"), 500)),
            V1,
        )
        .await;
        assert_eq!(s, 204, "request {i}: {text}");
    }
    prom.restart().await.unwrap();
    let started = Instant::now();
    let status = loop {
        let st = r.status().await.unwrap();
        if st["replicas"][0]["lag_records"].as_u64() == Some(0) {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{st:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let dropped = status["replicas"][0]["dropped_samples"].as_u64().unwrap();
    assert!(dropped > 0, "the budget forced drops: {status:#}");
    let mut delivered = 0u64;
    for i in 0..total {
        if let Some(v) = prom
            .query_value(&format!("count_over_time(drop_{i}[1h])"))
            .await
            .unwrap()
        {
            delivered += v as u64;
        }
    }
    assert_eq!(
        delivered + dropped,
        (total * 500) as u64,
        "every acknowledged sample was delivered or counted as dropped"
    );
    let metrics = r.metrics_text().await.unwrap();
    assert!(
        metrics.contains("walrelay_replica_dropped_samples_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_label_limits_refuse_with_their_status_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start_with_bin(
        BIN,
        &dir.path().join("data"),
        &[],
        &[
            "--max-series-per-request",
            "2",
            "--max-labels-per-series",
            "3",
            "--max-label-name-length",
            "8",
            "--max-label-value-length",
            "12",
        ],
    )
    .await
    .unwrap();
    let url = r.write_url();
    let label = |name: &str, value: &str| Label {
        name: name.into(),
        value: value.into(),
    };
    let with_labels = |labels: Vec<Label>| WriteRequest {
        timeseries: vec![TimeSeries {
            labels,
            samples: vec![Sample {
                value: 1.0,
                timestamp: chaos_tests::now_ms(),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    // Within every limit: stored.
    let (s, text, _) = post(&url, body(&request("limits_ok", 1)), V1).await;
    assert_eq!(s, 204, "{text}");
    assert_eq!(head_seq(&r).await, 1);

    let mut three_series = request("limits_series", 1);
    three_series.timeseries = (0..3)
        .map(|i| {
            let mut ts = request("limits_series", 1).timeseries.remove(0);
            ts.labels.push(label("i", &i.to_string()));
            ts
        })
        .collect();
    let cases: Vec<(&str, WriteRequest, u16, &str, &str)> = vec![
        ("3 series", three_series, 413, "series", "too_many_series"),
        (
            "4 labels",
            with_labels(vec![
                label("__name__", "m"),
                label("a", "1"),
                label("b", "2"),
                label("c", "3"),
            ]),
            400,
            "labels",
            "too_many_labels",
        ),
        (
            "a 9-byte name",
            with_labels(vec![label("__name__", "m"), label("ninechars", "1")]),
            400,
            "name",
            "label_name_too_long",
        ),
        (
            "a 13-byte value",
            with_labels(vec![label("__name__", "thirteen_byte")]),
            400,
            "value",
            "label_value_too_long",
        ),
    ];
    for (what, req, want, word, reason) in cases {
        let (s, text, _) = post(&url, body(&req), V1).await;
        assert_eq!(s, want, "{what}: {text}");
        assert!(text.contains(word), "{what}: the reason says why: {text}");
        let refused = r
            .metric_sum("walrelay_ingest_refused_total", &[("reason", reason)])
            .await
            .unwrap();
        assert_eq!(refused, 1.0, "{what}: counted as {reason}");
    }
    assert_eq!(head_seq(&r).await, 1, "nothing refused was stored");
}
