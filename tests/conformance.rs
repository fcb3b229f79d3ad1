//! Remote-write conformance (issue 11): the cases of Prometheus' receiver
//! compliance suite (prometheus/compliance, remotewrite/receiver), written
//! anew, sent to the real `walrelay serve` with a real Prometheus 2.42
//! replica (`--enable-feature=native-histograms,exemplar-storage`) behind it.
//!
//! Each test is a table of named cases sharing one Prometheus and one relay
//! (every case has its own metric names). Every case is run, then each is
//! reported by name (`case NAME: ok` or what differed) and the test fails
//! listing the failed ones. For accepted cases the exact status and written
//! counts are checked, then, once the relay reports the replica caught up,
//! the replica is queried for the data with its exact values as Prometheus
//! renders them. For refused cases the exact status, and that nothing was
//! stored in the log nor reached the replica. docs/conformance.md explains
//! every case.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chaos_tests::encode::{v1_series, Symbols};
use chaos_tests::prometheus::{Prometheus, PrometheusOpts};
use chaos_tests::relay::Relay;
use chaos_tests::{FaultProxy, ProxyMode};
use prom_remote_write::encode::{encode_v1, encode_v2, snappy_compress};
use prom_remote_write::{v1, v2};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

/// The stale marker Prometheus writes when a series disappears.
const STALE_NAN: u64 = 0x7ff0_0000_0000_0002;

const V1: &str = "application/x-protobuf;proto=prometheus.WriteRequest";
const V2: &str = "application/x-protobuf;proto=io.prometheus.write.v2.Request";

// ---------------------------------------------------------------------------
// Building requests
// ---------------------------------------------------------------------------

fn v1_request(timeseries: Vec<v1::TimeSeries>) -> v1::WriteRequest {
    v1::WriteRequest {
        timeseries,
        metadata: vec![],
    }
}

/// An integer native histogram of 2.0.
#[allow(clippy::too_many_arguments)]
fn int_hist(
    schema: i32,
    count: u64,
    sum: f64,
    zero: (f64, u64),
    positive: (i32, &[i64]),
    negative: (i32, &[i64]),
    custom_values: &[f64],
    ts: i64,
) -> v2::Histogram {
    let spans = |(offset, deltas): (i32, &[i64])| {
        if deltas.is_empty() {
            vec![]
        } else {
            vec![v2::BucketSpan {
                offset,
                length: deltas.len() as u32,
            }]
        }
    };
    v2::Histogram {
        count: Some(v2::histogram::Count::CountInt(count)),
        sum,
        schema,
        zero_threshold: zero.0,
        zero_count: Some(v2::histogram::ZeroCount::ZeroCountInt(zero.1)),
        positive_spans: spans(positive),
        positive_deltas: positive.1.to_vec(),
        negative_spans: spans(negative),
        negative_deltas: negative.1.to_vec(),
        custom_values: custom_values.to_vec(),
        timestamp: ts,
        ..Default::default()
    }
}

/// A request as it goes on the wire.
#[derive(Clone)]
struct Post {
    content_type: Option<&'static str>,
    encoding: Option<&'static str>,
    version: Option<&'static str>,
    body: Vec<u8>,
}

impl Post {
    fn v1(req: &v1::WriteRequest) -> Post {
        Post {
            content_type: Some(V1),
            encoding: Some("snappy"),
            version: Some("0.1.0"),
            body: snappy_compress(&encode_v1(req)),
        }
    }

    fn v2(req: &v2::Request) -> Post {
        Post {
            content_type: Some(V2),
            encoding: Some("snappy"),
            version: Some("2.0.0"),
            body: snappy_compress(&encode_v2(req)),
        }
    }

    fn content_type(mut self, ct: &'static str) -> Post {
        self.content_type = Some(ct);
        self
    }

    fn encoding(mut self, enc: &'static str) -> Post {
        self.encoding = Some(enc);
        self
    }

    /// The body with its first byte overwritten by `b`.
    fn first_byte(mut self, b: u8) -> Post {
        self.body[0] = b;
        self
    }
}

/// What walrelay answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Samples, histograms, exemplars written, as the headers say.
    written: [Option<String>; 3],
    body: String,
}

fn client() -> reqwest::Client {
    chaos_tests::client(Duration::from_secs(30)).unwrap()
}

async fn post(http: &reqwest::Client, url: &str, p: &Post) -> Answer {
    let mut rb = http.post(url).body(p.body.clone());
    if let Some(ct) = p.content_type {
        rb = rb.header("Content-Type", ct);
    }
    if let Some(enc) = p.encoding {
        rb = rb.header("Content-Encoding", enc);
    }
    if let Some(v) = p.version {
        rb = rb.header("X-Prometheus-Remote-Write-Version", v);
    }
    let resp = rb.send().await.unwrap();
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let written = [
        h("X-Prometheus-Remote-Write-Samples-Written"),
        h("X-Prometheus-Remote-Write-Histograms-Written"),
        h("X-Prometheus-Remote-Write-Exemplars-Written"),
    ];
    let status = resp.status().as_u16();
    Answer {
        status,
        written,
        body: resp.text().await.unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------
// What the replica must hold
// ---------------------------------------------------------------------------

type Labels = BTreeMap<String, String>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A check of the replica after the relay reports it caught up.
enum Check {
    /// Every raw float sample of every series named `name`, with the
    /// series' exact label sets and the values as Prometheus renders them
    /// ("NaN", "+Inf", "1.5"), from `{__name__="name"}[1h]`. Prometheus
    /// hides stale markers from range selections, so a stale marker shows
    /// as a missing sample here; see [`Check::Empty`].
    Floats {
        name: String,
        series: Vec<(Labels, Vec<(i64, &'static str)>)>,
    },
    /// The instant query `promql` at `at` finds nothing.
    Empty { promql: String, at: i64 },
    /// The instant query of series `name` at `at` is this one native
    /// histogram (`count`, `sum`, `buckets` as the API renders them).
    Histogram { name: String, at: i64, want: Value },
    /// The replica's exemplars of `name`: (labels, value, timestamp ms).
    Exemplars {
        name: String,
        want: Vec<(Labels, &'static str, i64)>,
    },
    /// `/api/v1/metadata?metric=name` is this (Prometheus 2.42 keeps only
    /// scraped metadata: remote-written metadata is not stored).
    Metadata { name: String, want: Value },
}

/// `{__name__="..."}` with PromQL string escapes.
fn by_name(name: &str) -> String {
    format!("{{__name__={}}}", serde_json::to_string(name).unwrap())
}

async fn api(p: &Prometheus, path: &str, params: &[(&str, String)]) -> Value {
    let form: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect();
    // GET: /api/v1/metadata takes no POST.
    let resp: Value = client()
        .get(format!("{}{path}?{}", p.url(), form.join("&")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["status"], "success", "{path} {params:?}: {resp}");
    resp["data"].clone()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn secs(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

async fn run_check(p: &Prometheus, base: i64, check: &Check) -> Result<(), String> {
    // Every sample of every case lies in [base - 60 s, base + 60 s].
    let end = base + 60_000;
    match check {
        Check::Floats { name, series } => {
            let data = api(
                p,
                "/api/v1/query",
                &[
                    ("query", format!("{}[1h]", by_name(name))),
                    ("time", secs(end)),
                ],
            )
            .await;
            let mut got: Vec<(Labels, Vec<(i64, String)>)> = data["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let l: Labels = serde_json::from_value(s["metric"].clone()).unwrap();
                    let v = s["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|tv| {
                            (
                                (tv[0].as_f64().unwrap() * 1000.0).round() as i64,
                                tv[1].as_str().unwrap().to_owned(),
                            )
                        })
                        .collect();
                    (l, v)
                })
                .collect();
            got.sort();
            let mut want: Vec<(Labels, Vec<(i64, String)>)> = series
                .iter()
                .map(|(l, v)| {
                    (
                        l.clone(),
                        v.iter().map(|(t, s)| (*t, s.to_string())).collect(),
                    )
                })
                .collect();
            want.sort();
            if got != want {
                return Err(format!(
                    "floats of {name:?}:\n  got  {got:?}\n  want {want:?}"
                ));
            }
        }
        Check::Empty { promql, at } => {
            let data = api(
                p,
                "/api/v1/query",
                &[("query", promql.clone()), ("time", secs(*at))],
            )
            .await;
            if data["result"] != json!([]) {
                return Err(format!("{promql} at {at}: expected nothing, got {data}"));
            }
        }
        Check::Histogram { name, at, want } => {
            let data = api(
                p,
                "/api/v1/query",
                &[("query", by_name(name)), ("time", secs(*at))],
            )
            .await;
            let got = &data["result"][0]["histogram"];
            let ok = data["result"].as_array().map(Vec::len) == Some(1)
                && got[0].as_f64().map(|t| (t * 1000.0).round() as i64) == Some(*at)
                && &got[1] == want;
            if !ok {
                return Err(format!(
                    "histogram {name:?} at {at}:\n  got  {data}\n  want {want}"
                ));
            }
        }
        Check::Exemplars { name, want } => {
            let data = api(
                p,
                "/api/v1/query_exemplars",
                &[
                    ("query", by_name(name)),
                    ("start", secs(base - 120_000)),
                    ("end", secs(end)),
                ],
            )
            .await;
            let mut got: Vec<(Labels, String, i64)> = data
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["exemplars"].as_array().cloned().unwrap_or_default())
                .map(|e| {
                    (
                        serde_json::from_value(e["labels"].clone()).unwrap(),
                        e["value"].as_str().unwrap().to_owned(),
                        (e["timestamp"].as_f64().unwrap() * 1000.0).round() as i64,
                    )
                })
                .collect();
            got.sort();
            let mut want: Vec<(Labels, String, i64)> = want
                .iter()
                .map(|(l, v, t)| (l.clone(), v.to_string(), *t))
                .collect();
            want.sort();
            if got != want {
                return Err(format!(
                    "exemplars of {name:?}:\n  got  {got:?}\n  want {want:?}"
                ));
            }
        }
        Check::Metadata { name, want } => {
            let data = api(p, "/api/v1/metadata", &[("metric", name.clone())]).await;
            let got = data.get(name.as_str()).cloned().unwrap_or(json!(null));
            if &got != want {
                return Err(format!("metadata of {name:?}: got {data}, want {want}"));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running cases
// ---------------------------------------------------------------------------

/// An accepted request: 204, the written counts (None: 1.0, no headers),
/// and what the replica must then hold.
struct Accepted {
    name: &'static str,
    posts: Vec<Post>,
    /// Per post: samples, histograms, exemplars; `None` for 1.0.
    written: Option<[u64; 3]>,
    checks: Vec<Check>,
}

/// A refused request: its exact status and a word of the reason.
struct Refused {
    name: &'static str,
    post: Post,
    status: u16,
    reason: &'static str,
}

/// Rounded to the second so that timestamps print exactly as Prometheus'
/// decimal seconds; five minutes ago so that every case's samples (within
/// a minute of it) are in the past and within the head block.
fn base_time() -> i64 {
    let now = chaos_tests::now_ms();
    (now - 300_000) / 1000 * 1000
}

async fn prometheus() -> Prometheus {
    Prometheus::start(
        PrometheusOpts::server().flag("--enable-feature=native-histograms,exemplar-storage"),
    )
    .await
    .unwrap()
}

async fn relay_for(p_url: &str, dir: &std::path::Path) -> Relay {
    Relay::start_with_bin(BIN, dir, &[("prom", p_url)], &[])
        .await
        .expect("walrelay starts")
}

/// Waits until every replica of `relay` has everything.
async fn drained(relay: &Relay, timeout: Duration) {
    let started = Instant::now();
    loop {
        let status = relay.status().await.unwrap();
        let replicas = status["replicas"].as_array().unwrap();
        if replicas.iter().all(chaos_tests::scenario::settled) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "replicas did not catch up within {timeout:?}: {status:#}\n{}",
            relay.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints each case's result and fails listing the failed ones.
fn report(results: &[(&str, Result<(), String>)]) {
    let mut failed = Vec::new();
    for (name, r) in results {
        match r {
            Ok(()) => eprintln!("case {name}: ok"),
            Err(e) => {
                eprintln!("case {name}: FAILED: {e}");
                failed.push(*name);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed: {failed:?}",
        failed.len(),
        results.len()
    );
}

/// Sends every case, waits for the replica, runs every check.
async fn run_accepted(cases: Vec<Accepted>, base: i64) -> (Prometheus, Relay, tempfile::TempDir) {
    let p = prometheus().await;
    let dir = tempfile::tempdir().unwrap();
    let r = relay_for(&p.write_url(), dir.path()).await;
    let http = client();
    let mut results: Vec<(&str, Result<(), String>)> = Vec::new();
    for case in &cases {
        let mut res = Ok(());
        for (i, p) in case.posts.iter().enumerate() {
            let a = post(&http, &r.write_url(), p).await;
            let want_written = match case.written {
                Some(w) => w.map(|n| Some(n.to_string())),
                None => [None, None, None],
            };
            if a.status != 204 || a.written != want_written {
                res = Err(format!(
                    "post {i}: got {} with written {:?} ({:?}), want 204 with {want_written:?}",
                    a.status, a.written, a.body
                ));
                break;
            }
        }
        results.push((case.name, res));
    }
    drained(&r, Duration::from_secs(60)).await;
    for (case, (_, res)) in cases.iter().zip(results.iter_mut()) {
        if res.is_err() {
            continue;
        }
        for check in &case.checks {
            if let Err(e) = run_check(&p, base, check).await {
                *res = Err(e);
                break;
            }
        }
    }
    let status = r.status().await.unwrap();
    let prom = &status["replicas"][0];
    results.push((
        "no record refused by the replica",
        if prom["rejected_records"] == 0 && prom["assumed_delivered_records"] == 0 {
            Ok(())
        } else {
            Err(format!("{prom:#}\n{}", p.log_tail(20)))
        },
    ));
    report(&results);
    (p, r, dir)
}

fn floats(name: &str, series: Vec<(Labels, Vec<(i64, &'static str)>)>) -> Check {
    Check::Floats {
        name: name.to_string(),
        series,
    }
}

/// One series named `name` with only `__name__`, and its samples.
fn floats1(name: &str, values: Vec<(i64, &'static str)>) -> Check {
    floats(name, vec![(labels(&[("__name__", name)]), values)])
}

fn hist_check(name: &str, at: i64, want: Value) -> Check {
    Check::Histogram {
        name: name.to_string(),
        at,
        want,
    }
}

// ---------------------------------------------------------------------------
// 2.0 requests the suite sends and expects to be accepted
// ---------------------------------------------------------------------------

fn v2_single(name: &str, samples: &[(f64, i64)]) -> Post {
    let mut s = Symbols::new();
    let ts = s.series(&[("__name__", name)], samples);
    Post::v2(&s.request(vec![ts]))
}

fn v2_histogram(name: &str, h: v2::Histogram) -> Post {
    let mut s = Symbols::new();
    let mut ts = s.series(&[("__name__", name)], &[]);
    ts.histograms = vec![h];
    Post::v2(&s.request(vec![ts]))
}

fn accepted_v2_cases(b: i64) -> Vec<Accepted> {
    let mut cases = Vec::new();

    for (name, value, rendered) in [
        ("v2_nan", f64::NAN, "NaN"),
        ("v2_plus_inf", f64::INFINITY, "+Inf"),
        ("v2_minus_inf", f64::NEG_INFINITY, "-Inf"),
    ] {
        let metric = format!("c2_{name}");
        cases.push(Accepted {
            name,
            posts: vec![v2_single(&metric, &[(value, b)])],
            written: Some([1, 0, 0]),
            checks: vec![floats1(&metric, vec![(b, rendered)])],
        });
    }

    // The stale marker arrives as a stale marker: Prometheus hides it from
    // range selections (a plain NaN would show as "NaN", see v2_nan) and
    // it ends the series, so the instant query one second later finds
    // nothing, where without it the sample would be found for 5 minutes.
    cases.push(Accepted {
        name: "v2_stale_marker",
        posts: vec![v2_single(
            "c2_stale",
            &[(1.0, b), (f64::from_bits(STALE_NAN), b + 1000)],
        )],
        written: Some([2, 0, 0]),
        checks: vec![
            floats1("c2_stale", vec![(b, "1")]),
            Check::Empty {
                promql: "c2_stale".into(),
                at: b + 2000,
            },
            Check::Empty {
                promql: "c2_stale_control".into(),
                at: b + 2000,
            },
        ],
    });

    // Labels unsorted, as the suite sends them; then the same series with
    // sorted labels: one series must come out, with both samples.
    {
        let mut s = Symbols::new();
        let unsorted = s.series(
            &[
                ("zzz", "last"),
                ("__name__", "c2_unsorted"),
                ("aaa", "first"),
                ("mmm", "middle"),
            ],
            &[(1.0, b)],
        );
        let first = Post::v2(&s.request(vec![unsorted]));
        let mut s = Symbols::new();
        let sorted = s.series(
            &[
                ("__name__", "c2_unsorted"),
                ("aaa", "first"),
                ("mmm", "middle"),
                ("zzz", "last"),
            ],
            &[(2.0, b + 1000)],
        );
        let second = Post::v2(&s.request(vec![sorted]));
        cases.push(Accepted {
            name: "v2_unsorted_labels",
            posts: vec![first, second],
            written: Some([1, 0, 0]),
            checks: vec![
                floats(
                    "c2_unsorted",
                    vec![(
                        labels(&[
                            ("__name__", "c2_unsorted"),
                            ("aaa", "first"),
                            ("mmm", "middle"),
                            ("zzz", "last"),
                        ]),
                        vec![(b, "1"), (b + 1000, "2")],
                    )],
                ),
                // A matcher on the last label finds it too.
                Check::Empty {
                    promql: r#"c2_unsorted{zzz!="last"}"#.into(),
                    at: b + 1000,
                },
            ],
        });
    }

    // Names with dots, spaces, newlines in values, any UTF-8, label names
    // with dots.
    {
        let series: Vec<Vec<(&str, &str)>> = vec![
            vec![("__name__", "c2.name.with.dots")],
            vec![("__name__", "c2 name with spaces")],
            vec![("__name__", "c2_newline"), ("text", "line one\nline two")],
            vec![
                ("__name__", "c2_utf8_température_°C"),
                ("城市", "東京"),
                ("label.with.dots", "a value with \"quotes\" and \\"),
            ],
        ];
        let mut s = Symbols::new();
        let ts = series
            .iter()
            .enumerate()
            .map(|(i, l)| s.series(l, &[(i as f64 + 1.0, b)]))
            .collect();
        let checks = series
            .iter()
            .zip(["1", "2", "3", "4"])
            .map(|(l, v)| floats(l[0].1, vec![(labels(l), vec![(b, v)])]))
            .collect();
        cases.push(Accepted {
            name: "v2_names_dots_spaces_newlines_utf8",
            posts: vec![Post::v2(&s.request(ts))],
            written: Some([4, 0, 0]),
            checks,
        });
    }

    // Several series with identical labels, one per exemplar timestamp.
    {
        let l = [("__name__", "c2_identical"), ("job", "suite")];
        let mut s = Symbols::new();
        let mut ts = Vec::new();
        let mut want_exemplars = Vec::new();
        for k in 0..3i64 {
            let t = b + k * 1000;
            let mut one = s.series(&l, &[(k as f64, t)]);
            let trace = format!("trace-{k}");
            one.exemplars = vec![s.exemplar(&[("trace_id", &trace)], k as f64 + 0.5, t)];
            ts.push(one);
            want_exemplars.push((
                labels(&[("trace_id", &trace)]),
                ["0.5", "1.5", "2.5"][k as usize],
                t,
            ));
        }
        cases.push(Accepted {
            name: "v2_series_with_identical_labels",
            posts: vec![Post::v2(&s.request(ts))],
            written: Some([3, 0, 3]),
            checks: vec![
                floats(
                    "c2_identical",
                    vec![(labels(&l), vec![(b, "0"), (b + 1000, "1"), (b + 2000, "2")])],
                ),
                Check::Exemplars {
                    name: "c2_identical".into(),
                    want: want_exemplars,
                },
            ],
        });
    }

    // A created timestamp (1.0 cannot carry it: counted, see the test).
    {
        let mut s = Symbols::new();
        let mut ts = s.series(&[("__name__", "c2_created_total")], &[(7.0, b)]);
        ts.created_timestamp = b - 30_000;
        cases.push(Accepted {
            name: "v2_created_timestamp",
            posts: vec![Post::v2(&s.request(vec![ts]))],
            written: Some([1, 0, 0]),
            checks: vec![floats1("c2_created_total", vec![(b, "7")])],
        });
    }

    // Metadata of every type, with and without help and unit.
    {
        use v2::MetricType as T;
        let types = [
            (T::Counter, "counter", "a counter", "bytes"),
            (T::Gauge, "gauge", "a gauge", ""),
            (T::Histogram, "histogram", "", "seconds"),
            (T::Gaugehistogram, "gaugehistogram", "", ""),
            (T::Summary, "summary", "a summary", "seconds"),
            (T::Info, "info", "an info", ""),
            (T::Stateset, "stateset", "", ""),
            (T::Unspecified, "unspecified", "help of nothing", "things"),
        ];
        let mut s = Symbols::new();
        let mut ts = Vec::new();
        let mut checks = Vec::new();
        for (ty, word, help, unit) in types {
            let name = format!("c2_meta_{word}");
            let mut one = s.series(&[("__name__", &name)], &[(1.0, b)]);
            one.metadata = Some(v2::Metadata {
                r#type: ty as i32,
                help_ref: s.r(help),
                unit_ref: s.r(unit),
            });
            ts.push(one);
            checks.push(floats1(&name, vec![(b, "1")]));
            // Prometheus 2.42 does not store remote-written metadata.
            checks.push(Check::Metadata {
                name,
                want: json!(null),
            });
        }
        cases.push(Accepted {
            name: "v2_metadata_of_every_type",
            posts: vec![Post::v2(&s.request(ts))],
            written: Some([8, 0, 0]),
            checks,
        });
    }

    // A series with only metadata: accepted, counts 0, 0, 0.
    {
        let mut s = Symbols::new();
        let mut ts = s.series(&[("__name__", "c2_metadata_only")], &[]);
        ts.metadata = Some(v2::Metadata {
            r#type: v2::MetricType::Gauge as i32,
            help_ref: s.r("only metadata"),
            unit_ref: 0,
        });
        cases.push(Accepted {
            name: "v2_series_with_only_metadata",
            posts: vec![Post::v2(&s.request(vec![ts]))],
            written: Some([0, 0, 0]),
            checks: vec![Check::Empty {
                promql: format!("{}[1h]", by_name("c2_metadata_only")),
                at: b + 60_000,
            }],
        });
    }

    // An exemplar on a series without samples counts as 1 exemplar.
    // Prometheus 2.42 appends an exemplar only to a series it already
    // holds, and this one has none: it logs and drops it (its own answer
    // would be 204 as well).
    {
        let mut s = Symbols::new();
        let mut ts = s.series(&[("__name__", "c2_exemplar_only")], &[]);
        ts.exemplars = vec![s.exemplar(&[("trace_id", "lonely")], 3.0, b)];
        cases.push(Accepted {
            name: "v2_exemplar_on_a_series_without_samples",
            posts: vec![Post::v2(&s.request(vec![ts]))],
            written: Some([0, 0, 1]),
            checks: vec![Check::Exemplars {
                name: "c2_exemplar_only".into(),
                want: vec![],
            }],
        });
    }

    // Integer native histograms.
    cases.push(Accepted {
        name: "v2_histogram_positive_buckets_only",
        // Schema 0: buckets (0.5,1], (1,2], (2,4] with 1, 2, 3.
        posts: vec![v2_histogram(
            "c2_hist_positive",
            int_hist(0, 6, 12.5, (1e-128, 0), (0, &[1, 1, 1]), (0, &[]), &[], b),
        )],
        written: Some([0, 1, 0]),
        checks: vec![hist_check(
            "c2_hist_positive",
            b,
            json!({"count": "6", "sum": "12.5", "buckets": [
                [0, "0.5", "1", "1"], [0, "1", "2", "2"], [0, "2", "4", "3"]]}),
        )],
    });
    cases.push(Accepted {
        name: "v2_histogram_negative_buckets_only",
        // Schema 0, negative buckets [-1,-0.5), [-2,-1) with 2 and 3.
        posts: vec![v2_histogram(
            "c2_hist_negative",
            int_hist(0, 5, -7.0, (1e-128, 0), (0, &[]), (0, &[2, 1]), &[], b),
        )],
        written: Some([0, 1, 0]),
        checks: vec![hist_check(
            "c2_hist_negative",
            b,
            json!({"count": "5", "sum": "-7", "buckets": [
                [1, "-2", "-1", "3"], [1, "-1", "-0.5", "2"]]}),
        )],
    });
    cases.push(Accepted {
        name: "v2_histogram_zero_bucket_only",
        posts: vec![v2_histogram(
            "c2_hist_zero",
            int_hist(0, 4, 0.0, (0.001, 4), (0, &[]), (0, &[]), &[], b),
        )],
        written: Some([0, 1, 0]),
        checks: vec![hist_check(
            "c2_hist_zero",
            b,
            json!({"count": "4", "sum": "0", "buckets": [[3, "-0.001", "0.001", "4"]]}),
        )],
    });
    cases.push(Accepted {
        name: "v2_histogram_empty",
        posts: vec![v2_histogram(
            "c2_hist_empty",
            int_hist(0, 0, 0.0, (0.0, 0), (0, &[]), (0, &[]), &[], b),
        )],
        written: Some([0, 1, 0]),
        checks: vec![hist_check(
            "c2_hist_empty",
            b,
            json!({"count": "0", "sum": "0"}),
        )],
    });
    // Custom bounds 1, 5, 10: buckets (-Inf,1], (1,5], (5,10] with 1, 2,
    // 1. Accepted, as the suite expects and as Prometheus 2.42 does: 2.42
    // answers 204 too, but it predates custom buckets, does not know the
    // `custom_values` field and reads schema -53 as an exponential schema:
    // it keeps count, sum and the bucket counts, with made-up bounds
    // (0,1], (1,+Inf], (+Inf,+Inf]. Asserted as measured, so that a change
    // is noticed; docs/conformance.md explains why walrelay does not refuse it.
    cases.push(Accepted {
        name: "v2_histogram_custom_buckets_schema_-53",
        posts: vec![v2_histogram(
            "c2_hist_custom",
            int_hist(
                -53,
                4,
                12.0,
                (0.0, 0),
                (0, &[1, 1, -1]),
                (0, &[]),
                &[1.0, 5.0, 10.0],
                b,
            ),
        )],
        written: Some([0, 1, 0]),
        checks: vec![hist_check(
            "c2_hist_custom",
            b,
            json!({"count": "4", "sum": "12", "buckets": [
                [0, "0", "1", "1"], [0, "1", "+Inf", "2"], [0, "+Inf", "+Inf", "1"]]}),
        )],
    });

    // 50 series with metadata and exemplars in one request.
    {
        let mut s = Symbols::new();
        let mut ts = Vec::new();
        let mut series = Vec::new();
        let mut exemplars = Vec::new();
        for i in 0..50 {
            let idx = i.to_string();
            let l = [("__name__", "c2_fifty"), ("i", idx.as_str())];
            let mut one = s.series(&l, &[(i as f64, b)]);
            one.metadata = Some(v2::Metadata {
                r#type: v2::MetricType::Gauge as i32,
                help_ref: s.r("fifty series"),
                unit_ref: s.r("widgets"),
            });
            let trace = format!("t{i}");
            one.exemplars = vec![s.exemplar(&[("trace_id", &trace)], i as f64, b)];
            ts.push(one);
            let v: &'static str = Box::leak(i.to_string().into_boxed_str());
            series.push((labels(&l), vec![(b, v)]));
            exemplars.push((labels(&[("trace_id", &trace)]), v, b));
        }
        cases.push(Accepted {
            name: "v2_fifty_series_with_metadata_and_exemplars",
            posts: vec![Post::v2(&s.request(ts))],
            written: Some([50, 0, 50]),
            checks: vec![
                floats("c2_fifty", series),
                Check::Exemplars {
                    name: "c2_fifty".into(),
                    want: exemplars,
                },
            ],
        });
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_2_0_requests_get_exact_written_counts_and_reach_prometheus_exactly() {
    let base = base_time();
    let cases = accepted_v2_cases(base);
    let created = cases
        .iter()
        .filter(|c| c.name == "v2_created_timestamp")
        .count() as u64;
    let (_p, r, _dir) = run_accepted(cases, base).await;
    // What 1.0 cannot carry is counted for the 1.0 replica: the created
    // timestamp; the per-series metadata of c2_fifty is one family with
    // identical metadata (merged, nothing dropped).
    let status = r.status().await.unwrap();
    let prom = &status["replicas"][0];
    assert_eq!(
        prom["dropped_by_translation"]["created_timestamps"].as_u64(),
        Some(created),
        "{prom:#}"
    );
    assert_eq!(
        prom["dropped_by_translation"]["metadata"].as_u64(),
        Some(0),
        "{prom:#}"
    );
}

// ---------------------------------------------------------------------------
// 1.0 requests: accepted, no written-count headers
// ---------------------------------------------------------------------------

fn accepted_v1_cases(b: i64) -> Vec<Accepted> {
    let mut cases = Vec::new();
    let specials = v1_request(vec![
        v1_series(
            &[("__name__", "c1_special"), ("v", "nan")],
            &[(f64::NAN, b)],
        ),
        v1_series(
            &[("__name__", "c1_special"), ("v", "plus_inf")],
            &[(f64::INFINITY, b)],
        ),
        v1_series(
            &[("__name__", "c1_special"), ("v", "minus_inf")],
            &[(f64::NEG_INFINITY, b)],
        ),
        v1_series(
            &[("__name__", "c1_stale")],
            &[(1.0, b), (f64::from_bits(STALE_NAN), b + 1000)],
        ),
    ]);
    cases.push(Accepted {
        name: "v1_nan_stale_marker_and_infinities",
        posts: vec![Post::v1(&specials)],
        written: None,
        checks: vec![
            floats(
                "c1_special",
                vec![
                    (
                        labels(&[("__name__", "c1_special"), ("v", "nan")]),
                        vec![(b, "NaN")],
                    ),
                    (
                        labels(&[("__name__", "c1_special"), ("v", "plus_inf")]),
                        vec![(b, "+Inf")],
                    ),
                    (
                        labels(&[("__name__", "c1_special"), ("v", "minus_inf")]),
                        vec![(b, "-Inf")],
                    ),
                ],
            ),
            floats1("c1_stale", vec![(b, "1")]),
            Check::Empty {
                promql: "c1_stale".into(),
                at: b + 2000,
            },
        ],
    });
    cases.push(Accepted {
        name: "v1_names_dots_spaces_newlines_utf8",
        posts: vec![Post::v1(&v1_request(vec![
            v1_series(&[("__name__", "c1.name with.dots and spaces")], &[(1.0, b)]),
            v1_series(
                &[
                    ("__name__", "c1_utf8_température"),
                    ("label.with.dots", "line one\nline two"),
                    ("城市", "東京"),
                ],
                &[(2.0, b)],
            ),
        ]))],
        written: None,
        checks: vec![
            floats1("c1.name with.dots and spaces", vec![(b, "1")]),
            floats(
                "c1_utf8_température",
                vec![(
                    labels(&[
                        ("__name__", "c1_utf8_température"),
                        ("label.with.dots", "line one\nline two"),
                        ("城市", "東京"),
                    ]),
                    vec![(b, "2")],
                )],
            ),
        ],
    });
    // Unsorted labels in 1.0 (the 1.0 spec asks senders to sort them).
    cases.push(Accepted {
        name: "v1_unsorted_labels",
        posts: vec![
            Post::v1(&v1_request(vec![v1_series(
                &[("zzz", "z"), ("__name__", "c1_unsorted"), ("aaa", "a")],
                &[(1.0, b)],
            )])),
            Post::v1(&v1_request(vec![v1_series(
                &[("__name__", "c1_unsorted"), ("aaa", "a"), ("zzz", "z")],
                &[(2.0, b + 1000)],
            )])),
        ],
        written: None,
        checks: vec![floats(
            "c1_unsorted",
            vec![(
                labels(&[("__name__", "c1_unsorted"), ("aaa", "a"), ("zzz", "z")]),
                vec![(b, "1"), (b + 1000, "2")],
            )],
        )],
    });
    {
        let mut ts = v1_series(&[("__name__", "c1_hist")], &[]);
        ts.histograms = vec![prom_remote_write::translate::histogram_v2_to_v1(&int_hist(
            0,
            6,
            12.5,
            (1e-128, 0),
            (0, &[1, 1, 1]),
            (0, &[]),
            &[],
            b,
        ))];
        let mut ex = v1_series(&[("__name__", "c1_exemplar")], &[(5.0, b)]);
        ex.exemplars = vec![v1::Exemplar {
            labels: vec![v1::Label {
                name: "trace_id".into(),
                value: "abc".into(),
            }],
            value: 5.0,
            timestamp: b,
        }];
        let mut req = v1_request(vec![ts, ex]);
        req.metadata = vec![v1::MetricMetadata {
            r#type: v1::MetricType::Counter as i32,
            metric_family_name: "c1_exemplar".into(),
            help: "with an exemplar".into(),
            unit: "".into(),
        }];
        cases.push(Accepted {
            name: "v1_histogram_exemplar_and_metadata",
            posts: vec![Post::v1(&req)],
            written: None,
            checks: vec![
                hist_check(
                    "c1_hist",
                    b,
                    json!({"count": "6", "sum": "12.5", "buckets": [
                        [0, "0.5", "1", "1"], [0, "1", "2", "2"], [0, "2", "4", "3"]]}),
                ),
                floats1("c1_exemplar", vec![(b, "5")]),
                Check::Exemplars {
                    name: "c1_exemplar".into(),
                    want: vec![(labels(&[("trace_id", "abc")]), "5", b)],
                },
            ],
        });
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_1_0_requests_get_no_written_counts_and_reach_prometheus_exactly() {
    let base = base_time();
    run_accepted(accepted_v1_cases(base), base).await;
}

// ---------------------------------------------------------------------------
// Refused requests
// ---------------------------------------------------------------------------

fn refused_cases(b: i64) -> Vec<Refused> {
    let mut cases = Vec::new();
    let good_v2 = || v2_single("r2_never_stored", &[(1.0, b)]);
    let good_v1 = || {
        Post::v1(&v1_request(vec![v1_series(
            &[("__name__", "r1_never_stored")],
            &[(1.0, b)],
        )]))
    };

    // Headers are checked before the body, which is corrupt here too.
    for (name, ct) in [
        ("content_type_application_json", "application/json"),
        ("content_type_image_png", "image/png"),
    ] {
        cases.push(Refused {
            name,
            post: good_v2().content_type(ct).first_byte(0xff),
            status: 415,
            reason: "content type",
        });
    }
    for (name, good, enc) in [
        ("content_encoding_gzip_v2", good_v2(), "gzip"),
        ("content_encoding_deflate_v2", good_v2(), "deflate"),
        ("content_encoding_gzip_v1", good_v1(), "gzip"),
        ("content_encoding_deflate_v1", good_v1(), "deflate"),
    ] {
        cases.push(Refused {
            name,
            post: good.encoding(enc).first_byte(0xff),
            status: 415,
            reason: "content encoding",
        });
    }
    // Corrupt snappy: the first byte (the varint of the decoded length)
    // overwritten, with the correct headers of each protocol.
    for (i, byte) in [0xffu8, 0x00, b'X'].into_iter().enumerate() {
        cases.push(Refused {
            name: [
                "corrupt_snappy_v2_ff",
                "corrupt_snappy_v2_00",
                "corrupt_snappy_v2_X",
            ][i],
            post: good_v2().first_byte(byte),
            status: 400,
            reason: "snappy",
        });
        cases.push(Refused {
            name: [
                "corrupt_snappy_v1_ff",
                "corrupt_snappy_v1_00",
                "corrupt_snappy_v1_X",
            ][i],
            post: good_v1().first_byte(byte),
            status: 400,
            reason: "snappy",
        });
    }

    // 2.0 label rules.
    let v2_labels = |pairs: &[(&str, &str)]| {
        let mut s = Symbols::new();
        let ts = s.series(pairs, &[(1.0, b)]);
        Post::v2(&s.request(vec![ts]))
    };
    cases.push(Refused {
        name: "v2_missing_metric_name",
        post: v2_labels(&[("job", "r2_no_name")]),
        status: 400,
        reason: "__name__",
    });
    cases.push(Refused {
        name: "v2_empty_metric_name",
        post: v2_labels(&[("__name__", ""), ("job", "r2_empty_name")]),
        status: 400,
        reason: "__name__",
    });
    cases.push(Refused {
        name: "v2_no_labels",
        post: v2_labels(&[]),
        status: 400,
        reason: "no labels",
    });
    cases.push(Refused {
        name: "v2_duplicate_label_names",
        post: v2_labels(&[("__name__", "r2_dup"), ("a", "1"), ("a", "2")]),
        status: 400,
        reason: "duplicate label name",
    });
    cases.push(Refused {
        name: "v2_histogram_count_mismatch",
        // Count 99, buckets 2 + 3 + 5 + 13 = 23.
        post: v2_histogram(
            "r2_hist_mismatch",
            int_hist(
                0,
                99,
                10.0,
                (1e-128, 0),
                (0, &[2, 1, 2, 8]),
                (0, &[]),
                &[],
                b,
            ),
        ),
        status: 400,
        reason: "count 99 does not match 23",
    });
    {
        let mut s = Symbols::new();
        let mut ts = s.series(&[("__name__", "r2_ref_out_of_range")], &[(1.0, b)]);
        ts.labels_refs.extend([1, 99]);
        cases.push(Refused {
            name: "v2_label_ref_out_of_range",
            post: Post::v2(&s.request(vec![ts])),
            status: 400,
            reason: "out of range",
        });
    }
    {
        let mut s = Symbols::new();
        let mut ts = s.series(&[("__name__", "r2_odd_refs")], &[(1.0, b)]);
        ts.labels_refs.push(1);
        cases.push(Refused {
            name: "v2_odd_number_of_label_refs",
            post: Post::v2(&s.request(vec![ts])),
            status: 400,
            reason: "odd length",
        });
    }
    {
        let mut s = Symbols::new();
        let mut ts = s.series(&[("__name__", "r2_exemplar_ref")], &[(1.0, b)]);
        ts.exemplars = vec![v2::Exemplar {
            labels_refs: vec![1, 500],
            value: 1.0,
            timestamp: b,
        }];
        cases.push(Refused {
            name: "v2_exemplar_label_ref_out_of_range",
            post: Post::v2(&s.request(vec![ts])),
            status: 400,
            reason: "out of range",
        });
    }
    {
        let mut s = Symbols::new();
        let mut ts = s.series(&[("__name__", "r2_help_ref")], &[(1.0, b)]);
        ts.metadata = Some(v2::Metadata {
            r#type: v2::MetricType::Gauge as i32,
            help_ref: 1000,
            unit_ref: 0,
        });
        cases.push(Refused {
            name: "v2_metadata_help_ref_out_of_range",
            post: Post::v2(&s.request(vec![ts])),
            status: 400,
            reason: "out of range",
        });
    }
    {
        let mut s = Symbols::new();
        let ts = s.series(&[("__name__", "r2_first_symbol")], &[(1.0, b)]);
        let mut req = s.request(vec![ts]);
        req.symbols[0] = "not empty".into();
        cases.push(Refused {
            name: "v2_symbol_table_not_starting_with_empty_string",
            post: Post::v2(&req),
            status: 400,
            reason: "symbols[0]",
        });
    }
    {
        // One bad series among good ones: the whole request is refused.
        let mut s = Symbols::new();
        let good = s.series(&[("__name__", "r2_partial_good")], &[(1.0, b)]);
        let bad = s.series(&[("job", "r2_partial_bad")], &[(2.0, b)]);
        let good2 = s.series(&[("__name__", "r2_partial_good2")], &[(3.0, b)]);
        cases.push(Refused {
            name: "v2_one_bad_series_among_good_ones",
            post: Post::v2(&s.request(vec![good, bad, good2])),
            status: 400,
            reason: "series 1: missing __name__",
        });
    }

    // 1.0, same label rules.
    let v1_labels = |pairs: &[(&str, &str)]| {
        Post::v1(&v1_request(vec![
            v1_series(&[("__name__", "r1_partial_good")], &[(1.0, b)]),
            v1_series(pairs, &[(1.0, b)]),
        ]))
    };
    cases.push(Refused {
        name: "v1_missing_metric_name_among_good_series",
        post: v1_labels(&[("job", "r1_no_name")]),
        status: 400,
        reason: "series 1: missing __name__",
    });
    cases.push(Refused {
        name: "v1_empty_metric_name",
        post: v1_labels(&[("__name__", ""), ("job", "r1_empty_name")]),
        status: 400,
        reason: "__name__",
    });
    cases.push(Refused {
        // Prometheus 2.42 answers this one 500, which a shipper would
        // retry for ever.
        name: "v1_no_labels",
        post: v1_labels(&[]),
        status: 400,
        reason: "no labels",
    });
    cases.push(Refused {
        name: "v1_duplicate_label_names",
        post: v1_labels(&[("__name__", "r1_dup"), ("b", "1"), ("a", "x"), ("b", "2")]),
        status: 400,
        reason: "duplicate label name",
    });
    cases.push(Refused {
        name: "v1_empty_label_name",
        post: v1_labels(&[("__name__", "r1_empty_label_name"), ("", "x")]),
        status: 400,
        reason: "empty label name",
    });
    {
        let mut ts = v1_series(&[("__name__", "r1_hist_mismatch")], &[]);
        ts.histograms = vec![prom_remote_write::translate::histogram_v2_to_v1(&int_hist(
            0,
            99,
            10.0,
            (1e-128, 0),
            (0, &[2, 1, 2, 8]),
            (0, &[]),
            &[],
            b,
        ))];
        cases.push(Refused {
            name: "v1_histogram_count_mismatch",
            post: Post::v1(&v1_request(vec![ts])),
            status: 400,
            reason: "count 99 does not match 23",
        });
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_get_the_exact_status_and_nothing_is_stored() {
    let base = base_time();
    let p = prometheus().await;
    let dir = tempfile::tempdir().unwrap();
    let r = relay_for(&p.write_url(), dir.path()).await;
    let http = client();
    let head = |s: &Value| s["wal"]["head_seq"].as_u64().unwrap();
    let head_before = head(&r.status().await.unwrap());

    let cases = refused_cases(base);
    let mut results: Vec<(&str, Result<(), String>)> = Vec::new();
    for case in &cases {
        let a = post(&http, &r.write_url(), &case.post).await;
        let res = if a.status != case.status {
            Err(format!(
                "got {} ({:?}), want {}",
                a.status, a.body, case.status
            ))
        } else if a.written != [None, None, None] {
            Err(format!(
                "written-count headers on a refusal: {:?}",
                a.written
            ))
        } else if !a.body.contains(case.reason) {
            Err(format!(
                "reason {:?} does not mention {:?}",
                a.body, case.reason
            ))
        } else {
            Ok(())
        };
        results.push((case.name, res));
    }

    // Nothing refused was stored: the log did not grow. Then a good request
    // goes through, and once the replica has it, none of the refused
    // requests' series is there (good series of refused requests included).
    let head_after = head(&r.status().await.unwrap());
    results.push((
        "nothing refused was stored",
        if head_after == head_before {
            Ok(())
        } else {
            Err(format!("log head moved from {head_before} to {head_after}"))
        },
    ));
    let marker = post(
        &http,
        &r.write_url(),
        &v2_single("r_marker", &[(1.0, base)]),
    )
    .await;
    assert_eq!(marker.status, 204, "{marker:?}");
    drained(&r, Duration::from_secs(60)).await;
    let marker_found = run_check(&p, base, &floats1("r_marker", vec![(base, "1")])).await;
    results.push(("a good request after the refusals is stored", marker_found));
    let leaked = run_check(
        &p,
        base,
        &Check::Empty {
            promql: r#"{__name__=~"r[12]_.*"}[1h]"#.into(),
            at: base + 60_000,
        },
    )
    .await;
    let leaked_no_name = run_check(
        &p,
        base,
        &Check::Empty {
            promql: r#"{job=~"r[12]_.*"}[1h]"#.into(),
            at: base + 60_000,
        },
    )
    .await;
    results.push((
        "no series of a refused request reached the replica",
        leaked.and(leaked_no_name),
    ));
    let refused = r
        .metric_sum("walrelay_ingest_refused_total", &[])
        .await
        .unwrap();
    let answered_400 = cases.iter().filter(|c| c.status == 400).count() as f64;
    results.push((
        "each 400 is counted in walrelay_ingest_refused_total",
        if refused == answered_400 {
            Ok(())
        } else {
            Err(format!("{refused} counted, {answered_400} answered 400"))
        },
    ));
    report(&results);
}

// ---------------------------------------------------------------------------
// The second line of defence: a replica refusing the same record with 5xx
// ---------------------------------------------------------------------------

/// A record the replica keeps answering with the same 5xx (as Prometheus
/// 2.42 does for an empty label set) does not stall silently: the status
/// shows the replica stuck with the count of failed attempts of that
/// request and the replica's answer, and `walrelay_replica_stuck_attempts`
/// (which WalrelayReplicaStuck alerts on) counts them; both go back to 0
/// once the request is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_with_the_same_5xx_surfaces_in_status_and_metrics() {
    let base = base_time();
    let p = prometheus().await;
    let proxy = FaultProxy::start(p.addr()).await.unwrap();
    proxy.set_mode(ProxyMode::Http(
        500,
        None,
        "empty labelset: invalid sample\n".into(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let r = Relay::start_with_bin(
        BIN,
        dir.path(),
        &[("prom", &proxy.write_url())],
        &[
            "--retry-min-backoff",
            "50ms",
            "--retry-max-backoff",
            "100ms",
        ],
    )
    .await
    .expect("walrelay starts");
    let a = post(
        &client(),
        &r.write_url(),
        &v2_single("s_stuck", &[(1.0, base)]),
    )
    .await;
    assert_eq!(a.status, 204, "{a:?}");

    let started = Instant::now();
    loop {
        let status = r.status().await.unwrap();
        let prom = &status["replicas"][0];
        let attempts = prom["stuck_attempts"].as_u64().unwrap_or(0);
        if attempts >= 5 {
            assert_eq!(prom["state"], "retrying", "{prom:#}");
            let err = prom["last_error"].as_str().unwrap_or_default();
            assert!(
                err.contains("HTTP 500") && err.contains("empty labelset"),
                "{prom:#}"
            );
            assert_eq!(prom["cursor"].as_u64(), Some(0), "{prom:#}");
            // The records to skip by hand (`walrelay cursors set --seq 1`).
            assert_eq!(prom["in_flight"], json!({"from": 0, "to": 1}), "{prom:#}");
            let gauge = r
                .metric_sum("walrelay_replica_stuck_attempts", &[("replica", "prom")])
                .await
                .unwrap();
            assert!(gauge >= 5.0, "gauge {gauge}, status {prom:#}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no stuck attempts counted: {prom:#}\n{}",
            r.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    proxy.set_mode(ProxyMode::Pass);
    drained(&r, Duration::from_secs(60)).await;
    let status = r.status().await.unwrap();
    assert_eq!(status["replicas"][0]["stuck_attempts"], 0, "{status:#}");
    assert_eq!(
        status["replicas"][0]["in_flight"],
        json!(null),
        "{status:#}"
    );
    let gauge = r
        .metric_sum("walrelay_replica_stuck_attempts", &[("replica", "prom")])
        .await
        .unwrap();
    assert_eq!(gauge, 0.0);
    run_check(&p, base, &floats1("s_stuck", vec![(base, "1")]))
        .await
        .unwrap();
}
