//! `deploy/` and `docs/` against the real relay and the real programs:
//!
//! * every flag of `walrelay serve --help` (with its environment variable,
//!   TOML key and default) is in `docs/configuration.md`;
//! * every `walrelay_*` metric the Grafana dashboard and the alert rules use
//!   exists in the `/metrics` of a freshly started relay (so no panel reads
//!   "No data" on a healthy relay), and in that of a running relay that
//!   shipped to a real Prometheus (and met the events the rare-event
//!   counters count);
//! * `deploy/local/run.sh` brings the local pipeline up: both replicas'
//!   series reach VictoriaMetrics, and SIGTERM stops every process it started;
//!   `--demo-outage` prints equal, non-empty counts for both replicas after
//!   replica b's outage;
//! * `deploy/validate.py` passes: kustomize builds, Kubernetes and operator
//!   schemas, promtool config/rules/unit tests, yamllint, the generated
//!   PrometheusRule, runbook links.
//!
//! Nothing is skipped: a missing program fails the test that needs it, with
//! what to install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use chaos_tests::encode::{encode_labels, post_remote_write, put_timeseries, snappy_compress};
use chaos_tests::now_ms;
use chaos_tests::process::Proc;
use chaos_tests::prometheus::{PromApi, Prometheus, PrometheusOpts};
use chaos_tests::proxy::{FaultProxy, ProxyMode};
use chaos_tests::relay::{metric_sum, Relay};

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

// ---------------------------------------------------------------------------
// 1. docs/configuration.md documents every flag of `walrelay serve --help`.

/// One option of `--help`: `--flag`, its environment variable, its default
/// and its possible values.
#[derive(Debug, Default)]
struct HelpFlag {
    flag: String,
    env: Option<String>,
    default: Option<String>,
    values: Vec<String>,
}

fn serve_help() -> Vec<HelpFlag> {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "walrelay serve --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let flag_re = regex::Regex::new(r"^\s+(?:-\w, )?(--[a-z0-9-]+)").unwrap();
    let env_re = regex::Regex::new(r"\[env: ([A-Z0-9_]+)=").unwrap();
    let default_re = regex::Regex::new(r"\[default: ([^\]]+)\]").unwrap();
    let value_re = regex::Regex::new(r"^\s+- ([a-z0-9-]+):").unwrap();
    let mut flags: Vec<HelpFlag> = Vec::new();
    for line in text.lines() {
        if let Some(c) = flag_re.captures(line) {
            flags.push(HelpFlag {
                flag: c[1].to_string(),
                ..HelpFlag::default()
            });
            continue;
        }
        let Some(cur) = flags.last_mut() else {
            continue;
        };
        if let Some(c) = env_re.captures(line) {
            cur.env = Some(c[1].to_string());
        }
        if let Some(c) = default_re.captures(line) {
            cur.default = Some(c[1].to_string());
        }
        if let Some(c) = value_re.captures(line) {
            cur.values.push(c[1].to_string());
        }
    }
    flags.retain(|f| f.flag != "--help");
    assert!(
        flags.len() >= 20,
        "parsed too few flags from --help: {flags:?}\n{text}"
    );
    flags
}

#[test]
fn configuration_md_documents_every_serve_flag() {
    let doc = read("docs/configuration.md");
    // The rows of the settings table, by their first cell's flag.
    let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `--")).collect();
    let row_flag = |row: &str| -> String {
        row.trim_start_matches("| `")
            .split(['`', ' '])
            .next()
            .unwrap()
            .to_string()
    };
    let help = serve_help();
    let mut problems = Vec::new();
    for f in &help {
        let Some(row) = rows.iter().find(|r| row_flag(r) == f.flag) else {
            problems.push(format!("{}: no row in the settings table", f.flag));
            continue;
        };
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 5 {
            problems.push(format!(
                "{}: the row has {} cells, not 5",
                f.flag,
                cells.len()
            ));
            continue;
        }
        match &f.env {
            Some(env) if cells[1].contains(&format!("`{env}`")) => {}
            Some(env) => problems.push(format!("{}: environment variable {env} missing", f.flag)),
            None => problems.push(format!("{}: --help shows no environment variable", f.flag)),
        }
        let key = f.flag.trim_start_matches("--").replace('-', "_");
        if f.flag != "--config" && !cells[2].contains(&key) {
            problems.push(format!("{}: TOML key {key} missing", f.flag));
        }
        if let Some(default) = &f.default {
            if !cells[3].contains(default.as_str()) {
                problems.push(format!(
                    "{}: default {default:?} missing (row says {:?})",
                    f.flag, cells[3]
                ));
            }
        }
        for v in &f.values {
            if !row.contains(&format!("`{v}`")) {
                problems.push(format!("{}: value `{v}` not described", f.flag));
            }
        }
    }
    // And no row for a flag the relay does not have.
    for row in &rows {
        let flag = row_flag(row);
        if !help.iter().any(|f| f.flag == flag) {
            problems.push(format!(
                "{flag}: documented but not a flag of walrelay serve"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of date with `walrelay serve --help`:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// 2. Every metric the dashboard and the alerts use exists.

/// Metric names (`walrelay_*`) in a text, histogram suffixes stripped.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"walrelay_[a-zA-Z0-9_:]+").unwrap();
    re.find_iter(text)
        .map(|m| base_name(m.as_str()).to_string())
        .collect()
}

fn base_name(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(b) = name.strip_suffix(suffix) {
            return b;
        }
    }
    name
}

/// Metric names with at least one sample in a Prometheus exposition.
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| base_name(n).to_string())
        .collect()
}

/// One series with one sample: labels, value, timestamp (ms).
type Series<'a> = (Vec<(&'a str, &'a str)>, f64, i64);

/// A remote-write 1.0 body: one sample per series.
fn body(series: &[Series<'_>]) -> Vec<u8> {
    let mut raw = Vec::new();
    for (labels, v, ts) in series {
        put_timeseries(&mut raw, &encode_labels(labels), &[(*v, *ts)]);
    }
    snappy_compress(&raw).unwrap()
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, relay: &Relay, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}\nstatus: {:#}\nlog:\n{}",
            relay.status().await.unwrap_or_default(),
            relay.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn replica_lag(relay: &Relay, name: &str) -> u64 {
    let s = relay.status().await.unwrap();
    s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap()["lag_records"]
        .as_u64()
        .unwrap()
}

async fn metric(relay: &Relay, name: &str, labels: &[(&str, &str)]) -> f64 {
    relay.metric_sum(name, labels).await.unwrap()
}

/// The files that query the relay's metrics: the dashboard, the alert rules
/// and the PrometheusRule generated from them.
const QUERYING_FILES: [&str; 3] = [
    "deploy/grafana/walrelay.json",
    "deploy/alerts/walrelay-rules.yml",
    "deploy/kubernetes/base/prometheusrule.yaml",
];

/// Series of `name` in an exposition (histograms by their `_count`), as
/// their label text (`replica="a"`; empty without labels).
fn series_of<'a>(exposition: &'a str, name: &str) -> Vec<&'a str> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (n, rest) = l.split_at(l.find(['{', ' '])?);
            let labels = rest
                .strip_prefix('{')
                .map_or("", |r| r.split('}').next().unwrap_or(""));
            (n == name || n == format!("{name}_count")).then_some(labels)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_alerts_is_exposed_by_a_fresh_relay() {
    let mut used = BTreeSet::new();
    for f in QUERYING_FILES {
        used.extend(metric_names(&read(f)));
    }
    assert!(
        used.len() >= 25,
        "few metrics found in {QUERYING_FILES:?}: {used:?}"
    );
    let (per_replica, global): (Vec<&String>, Vec<&String>) = used
        .iter()
        .partition(|n| n.starts_with("walrelay_replica_"));

    // A relay with one replica that is never reached (nothing is sent: the
    // log is empty) and a credentials file (its series exists only when one
    // is configured), and a relay without replicas. Neither has met any
    // event yet: every series must be there from the start.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "deploy-token\n").unwrap();
    let unreachable = "http://127.0.0.1:1/api/v1/write";
    let with_replica = Relay::start_with_bin(
        BIN,
        dir.path().join("a"),
        &[("a", unreachable)],
        &["--bearer-token-file", token.to_str().unwrap()],
    )
    .await
    .unwrap();
    let without = Relay::start_with_bin(BIN, dir.path().join("none"), &[], &[])
        .await
        .unwrap();
    let with_text = with_replica.metrics_text().await.unwrap();
    let without_text = without.metrics_text().await.unwrap();

    let mut missing = Vec::new();
    for name in &per_replica {
        if !series_of(&with_text, name)
            .iter()
            .any(|l| l.contains("replica=\"a\""))
        {
            missing.push(format!("{name}{{replica=\"a\"}}"));
        }
    }
    for name in &global {
        if series_of(&with_text, name).is_empty() {
            missing.push(format!("{name} (relay with a replica)"));
        }
        if *name != "walrelay_auth_credentials_file_ok" && series_of(&without_text, name).is_empty()
        {
            missing.push(format!("{name} (relay without replicas)"));
        }
    }
    assert!(
        missing.is_empty(),
        "metrics queried by {QUERYING_FILES:?} that a freshly started relay does not expose \
         (their panels read \"No data\" and their alerts have no series): {missing:?}\n\
         /metrics:\n{with_text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_alerts_is_exposed_by_a_shipping_relay() {
    let dashboard = read("deploy/grafana/walrelay.json");
    let rules = read("deploy/alerts/walrelay-rules.yml");
    let mut used = metric_names(&dashboard);
    used.extend(metric_names(&rules));
    assert!(
        used.len() >= 25,
        "few metrics found in the dashboard and rules: {used:?}"
    );

    // Replica a: a real Prometheus. Replica b: a real Prometheus behind a
    // proxy that refuses connections until phase 2 (retries, backlog).
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let b_prom = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let b = FaultProxy::start(b_prom.addr()).await.unwrap();
    b.set_mode(ProxyMode::Reset);
    let dir = tempfile::tempdir().unwrap();
    let (a_url, b_url) = (a.write_url(), b.write_url());
    let replicas = [("a", a_url.as_str()), ("b", b_url.as_str())];
    let mut relay = Relay::start_with_bin(
        BIN,
        dir.path(),
        &replicas,
        &[
            "--max-disk-bytes",
            "256KiB",
            "--segment-bytes",
            "4KiB",
            "--retry-max-backoff",
            "500ms",
        ],
    )
    .await
    .unwrap();

    // Phase 1: ingest (a bad request, data shipped to a, a sample a refuses
    // as out of order), then fill the disk budget (b holds the log): 429.
    let (status, _) = post_remote_write(&relay.write_url(), b"not snappy".to_vec())
        .await
        .unwrap();
    assert_eq!(status, 400, "bad input is refused");
    let ooo = vec![("__name__", "deploy_test_order"), ("job", "deploy")];
    let t = now_ms();
    let (status, text) = post_remote_write(&relay.write_url(), body(&[(ooo.clone(), 1.0, t)]))
        .await
        .unwrap();
    assert_eq!(status, 204, "{text}");
    wait_for(
        "replica a catches up",
        Duration::from_secs(30),
        &relay,
        || {
            let r = &relay;
            async move { replica_lag(r, "a").await == 0 }
        },
    )
    .await;
    let (status, text) =
        post_remote_write(&relay.write_url(), body(&[(ooo.clone(), 2.0, t - 60_000)]))
            .await
            .unwrap();
    assert_eq!(status, 204, "{text}");
    wait_for(
        "replica a rejects the out-of-order sample",
        Duration::from_secs(30),
        &relay,
        || {
            let r = &relay;
            async move {
                metric(
                    r,
                    "walrelay_replica_rejected_records_total",
                    &[("replica", "a")],
                )
                .await
                    > 0.0
            }
        },
    )
    .await;
    let mut refused = false;
    for i in 0..5000u32 {
        let names: Vec<String> = (0..100).map(|s| format!("s{s}")).collect();
        let req = i.to_string();
        let series: Vec<Series<'_>> = names
            .iter()
            .map(|s| {
                (
                    vec![
                        ("__name__", "deploy_test_fill"),
                        ("series", s.as_str()),
                        ("req", req.as_str()),
                    ],
                    f64::from(i) * 1.37,
                    now_ms(),
                )
            })
            .collect();
        let (status, text) = post_remote_write(&relay.write_url(), body(&series))
            .await
            .unwrap();
        if status == 429 {
            refused = true;
            break;
        }
        assert_eq!(status, 204, "request {i}: {text}");
    }
    assert!(refused, "the disk budget was never reached");
    wait_for("b's retries are counted", Duration::from_secs(30), &relay, || {
        let r = &relay;
        async move { metric(r, "walrelay_replica_retries_total", &[("replica", "b")]).await > 0.0 }
    })
    .await;
    assert!(
        metric(
            &relay,
            "walrelay_replica_sent_samples_total",
            &[("replica", "a")]
        )
        .await
            > 0.0
    );
    let mut exposed = exposed_names(&relay.metrics_text().await.unwrap());

    // Phase 2: damage the stopped relay's log (a checksum mismatch in a
    // sealed segment, a torn tail), age the two oldest segments past the
    // retention, restart, and let b back in: corruption found, torn tail
    // truncated, b's oldest records dropped by retention and the damaged
    // ones skipped.
    relay.stop(Duration::from_secs(30)).await.unwrap();
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    assert!(
        segments.len() >= 6,
        "expected several segments: {segments:?}"
    );
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    for s in &segments[..2] {
        std::fs::File::options()
            .write(true)
            .open(s)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    damage_middle(&segments[3]);
    let last = segments.last().unwrap();
    let mut tail = std::fs::read(last).unwrap();
    tail.extend_from_slice(&[0xA5; 100]);
    std::fs::write(last, tail).unwrap();

    let relay = Relay::start_with_bin(
        BIN,
        dir.path(),
        &replicas,
        &[
            "--retention",
            "1h",
            "--segment-bytes",
            "4KiB",
            "--retry-max-backoff",
            "500ms",
        ],
    )
    .await
    .unwrap();
    // b stays down until retention has dropped the two aged segments: its
    // shipper is then still re-sending the request that was in flight and
    // has read none of their other records, so they are lost to b (a
    // shipper that reads them first delivers them, and nothing is dropped).
    wait_for(
        "retention drops the two aged segments",
        Duration::from_secs(60),
        &relay,
        || {
            let r = &relay;
            async move {
                metric(
                    r,
                    "walrelay_wal_segments_deleted_total",
                    &[("reason", "retention_age")],
                )
                .await
                    >= 2.0
            }
        },
    )
    .await;
    b.set_mode(ProxyMode::Pass);
    wait_for(
        "replica b catches up",
        Duration::from_secs(90),
        &relay,
        || {
            let r = &relay;
            async move { replica_lag(r, "b").await == 0 }
        },
    )
    .await;
    let text = relay.metrics_text().await.unwrap();
    for (name, labels) in [
        ("walrelay_wal_truncations_total", vec![]),
        (
            "walrelay_replica_dropped_samples_total",
            vec![("replica", "b")],
        ),
        (
            "walrelay_replica_skipped_records_total",
            vec![("replica", "b")],
        ),
        (
            "walrelay_replica_sent_samples_total",
            vec![("replica", "b")],
        ),
    ] {
        assert!(
            metric_sum(&text, name, &labels) > 0.0,
            "{name}{labels:?} was not counted:\n{text}\n{}",
            relay.log_tail(40)
        );
    }
    exposed.extend(exposed_names(&text));
    drop(relay);

    // Phase 3: recovery scans the active segment, so damage in its middle
    // (intact frames after it) is counted as corruption at the next start.
    // Frames stored uncompressed: with zstd these few requests are one
    // chain, and damage inside a chain takes the rest of it along, which at
    // the end of the log is a torn tail (SPEC, crash point 3), not this.
    let dir3 = tempfile::tempdir().unwrap();
    let mut relay =
        Relay::start_with_bin(BIN, dir3.path(), &replicas[..1], &["--compression", "none"])
            .await
            .unwrap();
    for i in 0..40u32 {
        let v = f64::from(i);
        let series = [(
            vec![("__name__", "deploy_test_damage"), ("job", "deploy")],
            v,
            now_ms(),
        )];
        let (status, text) = post_remote_write(&relay.write_url(), body(&series))
            .await
            .unwrap();
        assert_eq!(status, 204, "{text}");
    }
    relay.stop(Duration::from_secs(30)).await.unwrap();
    let segment = std::fs::read_dir(dir3.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .unwrap();
    damage_middle(&segment);
    relay.restart().await.unwrap();
    let text = relay.metrics_text().await.unwrap();
    assert!(
        metric_sum(&text, "walrelay_wal_corruptions_total", &[]) > 0.0,
        "damage in the middle of the active segment was not counted:\n{text}\n{}",
        relay.log_tail(40)
    );
    exposed.extend(exposed_names(&text));
    drop(relay);

    // Phase 4: credentials files have a series each
    // (walrelay_auth_credentials_file_ok) only when they are configured.
    let dir4 = tempfile::tempdir().unwrap();
    let token = dir4.path().join("token");
    std::fs::write(&token, "deploy-token\n").unwrap();
    let relay = Relay::start_with_bin(
        BIN,
        dir4.path().join("data"),
        &[],
        &["--bearer-token-file", token.to_str().unwrap()],
    )
    .await
    .unwrap();
    exposed.extend(exposed_names(&relay.metrics_text().await.unwrap()));

    // Only an fsync failure sets walrelay_wal_writer_failed, which no
    // filesystem here produces: check that the relay declares it instead.
    let not_producible = ["walrelay_wal_writer_failed"];
    for name in not_producible {
        assert!(
            read("src/metrics.rs").contains(&format!("\"{name}\"")),
            "{name} is used by the dashboard or the alerts but the relay does not declare it"
        );
    }
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exposed.contains(*n) && !not_producible.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics used by deploy/grafana/walrelay.json or deploy/alerts/walrelay-rules.yml \
         that the relay does not expose: {missing:?}\nexposed: {exposed:?}"
    );
}

/// Flips bytes in the middle of a segment file (past its 32-byte header).
fn damage_middle(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xFF;
    }
    std::fs::write(path, bytes).unwrap();
}

// ---------------------------------------------------------------------------
// 3. The local pipeline: both replicas' series reach VictoriaMetrics.

/// The run.sh process, stopped with SIGTERM (its trap stops its children)
/// when the test ends, also on panic.
struct Pipeline(Option<Proc>);

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.sigterm();
            let _ = p.wait_exit(Duration::from_secs(30));
        }
    }
}

/// Pids of processes (other than this one) whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push((pid, cmdline));
            }
        }
    }
    found
}

fn distinct_free_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let p = chaos_tests::ports::free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

/// `deploy/local/run.sh ARGS` with its state in `state` and its six
/// programs on `ports` (node, sender, relay, a, b, VictoriaMetrics).
fn run_sh(state: &Path, ports: &[u16], args: &[&str]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("deploy/local/run.sh"))
        .arg("--state-dir")
        .arg(state.join("state"))
        .args(args)
        .current_dir(state)
        .env("WALRELAY_BIN", BIN);
    for (name, port) in ["NODE", "SENDER", "RELAY", "A", "B", "VM"]
        .iter()
        .zip(ports)
    {
        cmd.env(format!("WALRELAY_LOCAL_{name}_PORT"), port.to_string());
    }
    cmd
}

/// The tail of run.sh's output and of each program's log.
fn pipeline_logs(state: &Path, log: &Path) -> String {
    let mut s = chaos_tests::process::log_tail(log, 40);
    if let Ok(dir) = std::fs::read_dir(state.join("state/logs")) {
        for e in dir.flatten() {
            s += &format!(
                "\n--- {}\n{}",
                e.path().display(),
                chaos_tests::process::log_tail(&e.path(), 15)
            );
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_pipeline_brings_both_replicas_series_to_victoria_metrics() {
    let state = tempfile::Builder::new()
        .prefix("walrelay-local-test-")
        .tempdir()
        .unwrap();
    let ports = distinct_free_ports(6);
    let node_addr = format!("127.0.0.1:{}", ports[0]);
    let vm = format!("http://127.0.0.1:{}", ports[5]);
    let log = state.path().join("run.sh.log");
    let cmd = run_sh(state.path(), &ports, &["--run-for", "600"]);
    let mut pipeline = Pipeline(Some(Proc::spawn_logging_to("run.sh", cmd, &log).unwrap()));
    let logs = || pipeline_logs(state.path(), &log);

    let api = PromApi::new(&vm).unwrap();
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        let p = pipeline.0.as_ref().unwrap();
        if let Some(st) = p.try_exit().unwrap() {
            panic!(
                "run.sh exited ({st}) before both replicas arrived:\n{}",
                logs()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "both replicas' series did not reach VictoriaMetrics (seen {seen:?}):\n{}",
            logs()
        );
        if let Ok(data) = api.query("count by (prometheus_replica) (up)", None).await {
            seen = data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["metric"]["prometheus_replica"].as_str())
                .map(str::to_string)
                .collect();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        seen,
        BTreeSet::from(["a".to_string(), "b".to_string()]),
        "replicas in VictoriaMetrics"
    );
    // Samples scraped from the node exporter arrived through each replica.
    for r in ["a", "b"] {
        let q = format!("count(node_time_seconds{{prometheus_replica=\"{r}\"}})");
        let mut got = None;
        for _ in 0..30 {
            got = api.query_value(&q).await.ok().flatten();
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(
            got.unwrap_or(0.0) >= 1.0,
            "node exporter series via replica {r}:\n{}",
            logs()
        );
    }

    // SIGTERM: run.sh stops everything it started.
    let p = pipeline.0.take().unwrap();
    p.sigterm().unwrap();
    let status = p.wait_exit(Duration::from_secs(40)).unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "run.sh exits 143 on SIGTERM:\n{}",
        logs()
    );
    let state_str = state.path().to_string_lossy().to_string();
    let mut left = processes_with(&state_str);
    left.extend(processes_with(&node_addr));
    assert!(
        left.is_empty(),
        "processes left running after run.sh stopped: {left:?}"
    );
    assert!(
        chaos_tests::process::log_tail(&log, 5).contains("stopped; state kept in"),
        "{}",
        logs()
    );
}

/// The two counts of a `demo: WHEN: a=N b=M ...` line of run.sh.
fn demo_counts(output: &str, when: &str) -> Option<(u64, u64)> {
    let line = output
        .lines()
        .find(|l| l.starts_with(&format!("demo: {when}: a=")))?;
    let mut words = line.split_whitespace();
    let a = words.find_map(|w| w.strip_prefix("a="))?.parse().ok()?;
    let b = words.find_map(|w| w.strip_prefix("b="))?.parse().ok()?;
    Some((a, b))
}

#[test]
fn local_demo_outage_shows_replica_b_s_gap_filled_with_equal_counts() {
    let state = tempfile::Builder::new()
        .prefix("walrelay-local-demo-")
        .tempdir()
        .unwrap();
    let ports = distinct_free_ports(6);
    let log = state.path().join("run.sh.log");
    let mut cmd = run_sh(state.path(), &ports, &["--demo-outage", "--run-for", "1"]);
    cmd.env("WALRELAY_LOCAL_OUTAGE_SECONDS", "15");
    let pipeline = Pipeline(Some(Proc::spawn_logging_to("run.sh", cmd, &log).unwrap()));
    // Start-up, data flowing (at most 120 s), the outage, the catch-up (at
    // most 120 s): run.sh bounds each wait itself.
    let status = pipeline
        .0
        .as_ref()
        .unwrap()
        .wait_exit(Duration::from_secs(420));
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let logs = || pipeline_logs(state.path(), &log);
    let status =
        status.unwrap_or_else(|e| panic!("run.sh --demo-outage did not end: {e}\n{}", logs()));
    assert!(
        status.success(),
        "run.sh --demo-outage failed ({status}):\n{}",
        logs()
    );
    let before = demo_counts(&output, "before the outage");
    let after = demo_counts(&output, "after the outage");
    let (Some((a0, b0)), Some((a1, b1))) = (before, after) else {
        panic!("the demo printed no counts (before {before:?}, after {after:?}):\n{output}");
    };
    assert!(a0 > 0 && b0 > 0, "no samples before the outage:\n{output}");
    assert_eq!(a1, b1, "b's gap was not filled:\n{output}");
    assert!(
        a1 > a0,
        "the counts after the outage do not include it (before a={a0}, after a={a1}):\n{output}"
    );
    assert!(output.contains("equal, b's gap was filled"), "{output}");
}

// ---------------------------------------------------------------------------
// 4. The deployment files validate (deploy/validate.py).

#[test]
fn deployment_files_validate() {
    let out = Command::new("python3")
        .arg(repo().join("deploy/validate.py"))
        .current_dir(repo())
        .output()
        .expect("python3 runs deploy/validate.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy/validate.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
