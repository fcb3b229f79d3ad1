//! Remote-write 2.0 end to end, against real programs: a 2.0 sender (built
//! here with `prom_remote_write::v2`) through walrelay into Prometheus 2.42
//! as a 1.0 replica (the 2.0 records translated), and through a chain of two
//! relays where the first ships 2.0 as it is to the second
//! (`protocol = "2.0"`). Prometheus runs with native histograms and exemplar
//! storage so that every float sample, the histograms and the exemplars can
//! be queried back. Each test starts its own processes on free ports in temp
//! dirs; they are killed by pid when the test ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chaos_tests::encode::Symbols;
use chaos_tests::prometheus::{Prometheus, PrometheusOpts};
use chaos_tests::relay::{replica_status, Relay};
use chaos_tests::scenario::wait_caught_up;
use prom_remote_write::v2;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

/// Requests sent; each has two float series, one native histogram series
/// and one exemplar.
const REQUESTS: i64 = 4;

fn ts_of(base: i64, k: i64) -> i64 {
    base + k * 1000
}

fn float_a(k: i64) -> f64 {
    k as f64 + 0.5
}

fn float_b(k: i64) -> f64 {
    k as f64 * 10.0
}

fn hist_count(k: i64) -> u64 {
    2 * k as u64 + 2
}

fn hist_sum(k: i64) -> f64 {
    10.0 * k as f64 + 1.25
}

/// The `k`-th 2.0 request: series `v2_float{series="a"}` with an exemplar
/// and a created timestamp, `v2_float{series="b"}` whose metadata conflicts
/// with a's (1.0 keeps one metadata per family: one is dropped), and the
/// integer native histogram `v2_hist`.
fn request(base: i64, k: i64) -> v2::Request {
    let ts = ts_of(base, k);
    let mut s = Symbols::new();
    let a = v2::TimeSeries {
        labels_refs: s.labels(&[("__name__", "v2_float"), ("job", "v2"), ("series", "a")]),
        samples: vec![v2::Sample {
            value: float_a(k),
            timestamp: ts,
        }],
        exemplars: vec![v2::Exemplar {
            labels_refs: s.labels(&[("trace_id", &format!("trace-{k}"))]),
            value: float_a(k),
            timestamp: ts,
        }],
        metadata: Some(v2::Metadata {
            r#type: v2::MetricType::Gauge as i32,
            help_ref: s.r("a float"),
            unit_ref: 0,
        }),
        created_timestamp: base - 5000,
        ..Default::default()
    };
    let b = v2::TimeSeries {
        labels_refs: s.labels(&[("__name__", "v2_float"), ("job", "v2"), ("series", "b")]),
        samples: vec![v2::Sample {
            value: float_b(k),
            timestamp: ts,
        }],
        metadata: Some(v2::Metadata {
            r#type: v2::MetricType::Gauge as i32,
            help_ref: s.r("another help"),
            unit_ref: 0,
        }),
        ..Default::default()
    };
    // Two buckets of k+1 observations each (integer histogram, deltas).
    let h = v2::TimeSeries {
        labels_refs: s.labels(&[("__name__", "v2_hist"), ("job", "v2")]),
        histograms: vec![v2::Histogram {
            count: Some(v2::histogram::Count::CountInt(hist_count(k))),
            sum: hist_sum(k),
            schema: 0,
            zero_threshold: 1e-128,
            zero_count: Some(v2::histogram::ZeroCount::ZeroCountInt(0)),
            positive_spans: vec![v2::BucketSpan {
                offset: 0,
                length: 2,
            }],
            positive_deltas: vec![k + 1, 0],
            timestamp: ts,
            ..Default::default()
        }],
        ..Default::default()
    };
    v2::Request {
        symbols: s.0,
        timeseries: vec![a, b, h],
    }
}

fn client() -> reqwest::Client {
    chaos_tests::client(Duration::from_secs(30)).unwrap()
}

/// Sends every request as remote-write 2.0 and checks walrelay's answer:
/// 204 with the written counts of a 2.0 receiver.
async fn send_all(url: &str, base: i64) {
    let http = client();
    for k in 0..REQUESTS {
        let body = prom_remote_write::encode::snappy_compress(
            &prom_remote_write::encode::encode_v2(&request(base, k)),
        );
        let resp = http
            .post(url)
            .header("Content-Type", prom_remote_write::content::CONTENT_TYPE_V2)
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "2.0.0")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let h = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let written = (
            h("X-Prometheus-Remote-Write-Samples-Written"),
            h("X-Prometheus-Remote-Write-Histograms-Written"),
            h("X-Prometheus-Remote-Write-Exemplars-Written"),
        );
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 204, "request {k}: {text}");
        assert_eq!(
            written,
            (Some("2".into()), Some("1".into()), Some("1".into())),
            "request {k}"
        );
    }
}

async fn relay(dir: &Path, replicas: &[(&str, &str)], extra: &[&str]) -> Relay {
    Relay::start_with_bin(BIN, dir, replicas, extra)
        .await
        .expect("walrelay starts")
}

/// A Prometheus 2.42 server that stores native histograms and exemplars.
async fn prometheus() -> Prometheus {
    Prometheus::start(
        PrometheusOpts::server()
            .native_histograms()
            .flag("--enable-feature=exemplar-storage"),
    )
    .await
    .unwrap()
}

/// Queries `p` for every float sample, every histogram's count and sum,
/// and every exemplar that was sent.
async fn assert_prometheus_holds_everything(p: &Prometheus, base: i64) {
    let end = ts_of(base, REQUESTS);
    let floats = p
        .raw_series("v2_float", base - 1000, end, 60_000)
        .await
        .unwrap();
    let by_series: BTreeMap<String, Vec<(i64, f64)>> = floats
        .into_iter()
        .map(|(labels, samples)| {
            assert_eq!(
                labels.get("job").map(String::as_str),
                Some("v2"),
                "{labels:?}"
            );
            (labels["series"].clone(), samples)
        })
        .collect();
    let want_a: Vec<(i64, f64)> = (0..REQUESTS)
        .map(|k| (ts_of(base, k), float_a(k)))
        .collect();
    let want_b: Vec<(i64, f64)> = (0..REQUESTS)
        .map(|k| (ts_of(base, k), float_b(k)))
        .collect();
    assert_eq!(by_series.get("a"), Some(&want_a), "{by_series:?}");
    assert_eq!(by_series.get("b"), Some(&want_b), "{by_series:?}");

    for k in 0..REQUESTS {
        let t = Some(ts_of(base, k));
        let count = p.query("histogram_count(v2_hist)", t).await.unwrap();
        let sum = p.query("histogram_sum(v2_hist)", t).await.unwrap();
        let value = |data: &Value| -> f64 {
            data["result"][0]["value"][1]
                .as_str()
                .unwrap_or_else(|| panic!("histogram {k} missing: {data}"))
                .parse()
                .unwrap()
        };
        assert_eq!(value(&count), hist_count(k) as f64, "histogram {k}");
        assert_eq!(value(&sum), hist_sum(k), "histogram {k}");
    }

    let resp: Value = client()
        .get(format!(
            "{}/api/v1/query_exemplars?query=v2_float&start={}&end={}",
            p.url(),
            (base - 1000) / 1000,
            end / 1000 + 1
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["status"], "success", "{resp}");
    let mut traces: Vec<(String, String)> = resp["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["exemplars"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["labels"]["trace_id"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    traces.sort();
    let want: Vec<(String, String)> = (0..REQUESTS)
        .map(|k| (format!("trace-{k}"), float_a(k).to_string()))
        .collect();
    assert_eq!(traces, want, "{resp}");
}

/// Rounded to the second so that timestamps print exactly as Prometheus'
/// decimal seconds; a minute ago so that every instant query sees them.
fn base_time() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    (now - 60_000) / 1000 * 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_0_sender_reaches_a_1_0_prometheus_with_histograms_and_exemplars() {
    let p = prometheus().await;
    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), &[("prom", &p.write_url())], &[]).await;
    let base = base_time();
    send_all(&r.write_url(), base).await;
    wait_caught_up(&r, Duration::from_secs(60)).await.unwrap();
    assert_prometheus_holds_everything(&p, base).await;

    // What 1.0 cannot carry is counted for that replica: one created
    // timestamp (series a) and one conflicting metadata (series b) per
    // request, however the shipper coalesced them.
    let status = r.status().await.unwrap();
    let prom = replica_status(&status, "prom");
    assert_eq!(prom["protocol"], "1.0", "{prom:#}");
    assert_eq!(
        prom["dropped_by_translation"]["created_timestamps"].as_i64(),
        Some(REQUESTS),
        "{prom:#}"
    );
    assert_eq!(
        prom["dropped_by_translation"]["metadata"].as_i64(),
        Some(REQUESTS),
        "{prom:#}"
    );
    assert_eq!(prom["rejected_records"], 0, "{prom:#}");
    for what in ["created_timestamps", "metadata"] {
        let n = r
            .metric_sum(
                "walrelay_replica_dropped_by_translation_total",
                &[("replica", "prom"), ("what", what)],
            )
            .await
            .unwrap();
        assert_eq!(n, REQUESTS as f64, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_0_replica_gets_2_0_records_unchanged_through_a_second_relay() {
    let p = prometheus().await;
    let dir2 = tempfile::tempdir().unwrap();
    let mut r2 = relay(dir2.path(), &[("prom", &p.write_url())], &[]).await;

    // Relay #1 ships to relay #2 as a 2.0 replica: set in the TOML file.
    let dir1 = tempfile::tempdir().unwrap();
    let config = dir1.path().join("walrelay.toml");
    std::fs::write(
        &config,
        format!(
            "[[replica]]\nname = \"relay2\"\nurl = \"{}\"\nprotocol = \"2.0\"\n",
            r2.write_url()
        ),
    )
    .unwrap();
    let data1 = dir1.path().join("data");
    let r1 = relay(&data1, &[], &["--config", config.to_str().unwrap()]).await;

    // Relay #2 is paused while the sender writes, so that relay #1's
    // shipper, blocked on its first request, finds the other records
    // waiting and merges them into one 2.0 request.
    let base = base_time();
    r2.sigstop().unwrap();
    send_all(&r1.write_url(), base).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    r2.sigcont().unwrap();
    wait_caught_up(&r1, Duration::from_secs(60)).await.unwrap();
    wait_caught_up(&r2, Duration::from_secs(60)).await.unwrap();
    assert_prometheus_holds_everything(&p, base).await;

    // Relay #1: a 2.0 replica, nothing translated, every write confirmed
    // in full by relay #2's written-count headers.
    let status1 = r1.status().await.unwrap();
    let to2 = replica_status(&status1, "relay2");
    assert_eq!(to2["protocol"], "2.0", "{to2:#}");
    assert_eq!(to2["sent_records"].as_i64(), Some(REQUESTS), "{to2:#}");
    assert_eq!(to2["partial_writes"], 0, "{to2:#}");
    assert_eq!(to2["unconfirmed_writes"], 0, "{to2:#}");
    assert_eq!(
        to2["dropped_by_translation"]["created_timestamps"], 0,
        "{to2:#}"
    );
    let requests = r1
        .metric_sum(
            "walrelay_replica_requests_total",
            &[("replica", "relay2"), ("status", "2xx")],
        )
        .await
        .unwrap();
    assert!(
        requests < REQUESTS as f64,
        "{requests} requests for {REQUESTS} records: the records were not merged"
    );
    assert_eq!(
        r1.metric_sum(
            "walrelay_replica_partial_writes_total",
            &[("replica", "relay2")]
        )
        .await
        .unwrap(),
        0.0
    );
    // Relay #2 translated for its 1.0 Prometheus: the created timestamps
    // came through relay #1 (2.0 all the way to relay #2).
    let status2 = r2.status().await.unwrap();
    let prom = replica_status(&status2, "prom");
    assert_eq!(
        prom["dropped_by_translation"]["created_timestamps"].as_i64(),
        Some(REQUESTS),
        "{prom:#}"
    );

    // Relay #2's log holds 2.0 records only, holding every sample.
    r2.stop(Duration::from_secs(20)).await.unwrap();
    let out = std::process::Command::new(BIN)
        .args(["wal", "dump", "--records", "--json", "--data-dir"])
        .arg(dir2.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wal dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!records.is_empty());
    assert!(
        records.iter().all(|r| r["kind"] == "v2"),
        "relay #2 stored other than 2.0 records: {records:?}"
    );
    let samples: i64 = records.iter().map(|r| r["samples"].as_i64().unwrap()).sum();
    // Two float samples and one histogram per request.
    assert_eq!(samples, 3 * REQUESTS, "{records:?}");
}

/// Posts a 2.0 request; returns the status and the answer's text.
async fn post_v2(url: &str, req: &v2::Request) -> (u16, String) {
    let body =
        prom_remote_write::encode::snappy_compress(&prom_remote_write::encode::encode_v2(req));
    let resp = client()
        .post(url)
        .header("Content-Type", prom_remote_write::content::CONTENT_TYPE_V2)
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "2.0.0")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// `n` series sharing `shared` labels, each with one label of its own and
/// one sample.
fn shared_labels(n: usize, shared: &[(&str, &str)], ts: i64) -> v2::Request {
    let mut s = Symbols::new();
    let timeseries = (0..n)
        .map(|i| {
            let own = i.to_string();
            let mut labels = shared.to_vec();
            labels.push(("i", &own));
            labels.sort();
            v2::TimeSeries {
                labels_refs: s.labels(&labels),
                samples: vec![v2::Sample {
                    value: i as f64,
                    timestamp: ts,
                }],
                ..Default::default()
            }
        })
        .collect();
    v2::Request {
        symbols: s.0,
        timeseries,
    }
}

/// A small 2.0 request whose series all reference one long symbol would
/// become a huge request for a 1.0 replica: it is refused with 413 and not
/// stored, while a request sharing many ordinary labels (as a Kubernetes
/// target's series do) is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_0_request_that_would_expand_without_bound_for_1_0_is_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let r = relay(dir.path(), &[], &[]).await;
    let ts = base_time();
    let long = "x".repeat(64 << 10);
    let bomb = shared_labels(2_000, &[("__name__", "bomb"), ("long", &long)], ts);
    let (status, text) = post_v2(&r.write_url(), &bomb).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("1.0 translation"), "{text}");

    let k8s = [
        ("__name__", "container_cpu_usage_seconds_total"),
        ("container", "walrelay"),
        ("endpoint", "https-metrics"),
        ("image", "registry.example/walrelay:0.1.0"),
        ("instance", "10.0.0.17:10250"),
        ("job", "kubelet"),
        ("metrics_path", "/metrics/cadvisor"),
        ("namespace", "observability"),
        ("node", "worker-17.example.internal"),
        ("pod", "walrelay-0"),
        ("service", "kubelet"),
    ];
    let (status, text) = post_v2(&r.write_url(), &shared_labels(2_000, &k8s, ts)).await;
    assert_eq!(status, 204, "{text}");
    let status = r.status().await.unwrap();
    assert_eq!(
        status["wal"]["head_seq"], 1,
        "only the ordinary request is stored"
    );
}
