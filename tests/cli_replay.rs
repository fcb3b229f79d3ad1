//! `walrelay wal replay` from real logs into a real Prometheus (queried for
//! every sample afterwards), into a real Prometheus serving TLS that
//! requires a client certificate, interrupted by SIGKILL and resumed, into a
//! second relay that demands a bearer token, and into one that serves TLS
//! with client certificates and basic auth and is sent remote-write 2.0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_common;
mod tls_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::encode::Symbols;
use chaos_tests::prometheus::{Prometheus, PrometheusOpts, WebTls};
use chaos_tests::relay::Relay;
use cli_common::*;
use serde_json::Value;
use tls_common::*;

/// Every sample of `metric` in Prometheus equals what was written.
async fn assert_all_in_prometheus(prom: &Prometheus, w: &Written, metric: &str) {
    let got = prom
        .api()
        .raw_series(metric, w.min_ts - 1, w.max_ts + 1, 3_600_000)
        .await
        .unwrap();
    let mut want: std::collections::BTreeMap<String, Vec<(i64, f64)>> = Default::default();
    for s in &w.samples {
        want.entry(s.instance.clone())
            .or_default()
            .push((s.ts, s.value));
    }
    assert_eq!(got.len(), want.len(), "every series arrived");
    for (labels, samples) in got {
        let inst = labels.get("instance").unwrap();
        assert_eq!(labels.get("__name__").map(String::as_str), Some(metric));
        let expected = want.get(inst).unwrap();
        assert_eq!(
            samples.len(),
            expected.len(),
            "series {inst}: every sample arrived"
        );
        assert_eq!(&samples, expected, "series {inst}: values and timestamps");
    }
}

/// The same query as a user would type it: `metric[1h]`.
async fn count_over_hour(prom: &Prometheus, metric: &str) -> usize {
    let data = prom.query(&format!("{metric}[1h]"), None).await.unwrap();
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["values"].as_array().unwrap().len())
        .sum()
}

fn replay(dir: &Path, more: &[&str]) -> std::process::Output {
    cli_dir(&["wal", "replay"], dir, more)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_a_real_prometheus_delivers_every_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let metric = "cli_replay_total";
    let t = Traffic {
        metric: metric.into(),
        requests: 40,
        series: 10,
        samples_per_series: 5,
    };
    let w = write_log(tmp.path(), &t, &[], &["--segment-bytes", "64KiB"]).await;
    let prom = Prometheus::start_server().await.unwrap();

    let o = replay(
        tmp.path(),
        &["--to", &prom.write_url(), "--dry-run", "--json"],
    );
    expect_code(&o, 0, "replay --dry-run");
    let v = json(&o);
    assert_eq!(v["this_run"]["records"], 40);
    assert_eq!(v["this_run"]["samples"], w.total_samples() as u64);
    assert_eq!(
        count_over_hour(&prom, metric).await,
        0,
        "a dry run sends nothing"
    );

    // Small requests, so coalescing and ordering are exercised.
    let o = replay(
        tmp.path(),
        &[
            "--to",
            &prom.write_url(),
            "--max-samples-per-send",
            "120",
            "--json",
        ],
    );
    expect_code(&o, 0, "replay");
    let v = json(&o);
    assert_eq!(v["complete"], true);
    assert_eq!(v["this_run"]["records"], 40);
    assert_eq!(v["this_run"]["samples"], w.total_samples() as u64);
    assert_eq!(v["this_run"]["rejected_records"], 0);
    assert!(v["this_run"]["requests"].as_u64().unwrap() >= 40 * 50 / 120);
    assert_eq!(count_over_hour(&prom, metric).await, w.total_samples());
    assert_all_in_prometheus(&prom, &w, metric).await;

    // Run again with the same arguments: already done, nothing sent.
    let o = replay(
        tmp.path(),
        &["--to", &prom.write_url(), "--max-samples-per-send", "120"],
    );
    expect_code(&o, 0, "replay of a finished replay");
    assert!(stdout(&o).contains("already completed"), "{}", stdout(&o));
    // With --restart it sends again: Prometheus refuses the old samples
    // (out of order), which the report counts as rejected, exit 1.
    let o = replay(
        tmp.path(),
        &[
            "--to",
            &prom.write_url(),
            "--from-seq",
            "38",
            "--restart",
            "--json",
        ],
    );
    expect_code(&o, 1, "replaying what the receiver already has");
    let v = json(&o);
    assert_eq!(v["this_run"]["rejected_records"], 2, "{v:#}");
    assert_eq!(v["rejections"][0]["status"], 400, "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_a_real_prometheus_over_mutual_tls_delivers_every_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let metric = "cli_replay_mtls_total";
    let t = Traffic {
        metric: metric.into(),
        requests: 20,
        series: 5,
        samples_per_series: 5,
    };
    let w = write_log(tmp.path(), &t, &[], &[]).await;
    // Prometheus serves HTTPS with its own CA and requires a client
    // certificate that CA signed.
    let certs = tempfile::tempdir().unwrap();
    let (p, _ca) = pki(certs.path(), "prometheus");
    let mut opts = PrometheusOpts::server();
    opts.web_tls = Some(Box::new(WebTls {
        cert_file: p.server_cert.clone(),
        key_file: p.server_key.clone(),
        ca_file: p.ca.clone(),
        client_ca_file: Some(p.ca.clone()),
        client_identity: Some((p.client_cert.clone(), p.client_key.clone())),
    }));
    let prom = Prometheus::start(opts).await.unwrap();
    assert!(prom.write_url().starts_with("https://"));

    let o = replay(
        tmp.path(),
        &[
            "--to",
            &prom.write_url(),
            "--tls-ca-file",
            p.ca.to_str().unwrap(),
            "--tls-cert-file",
            p.client_cert.to_str().unwrap(),
            "--tls-key-file",
            p.client_key.to_str().unwrap(),
            "--json",
        ],
    );
    expect_code(&o, 0, "replay over mutual TLS");
    let v = json(&o);
    assert_eq!(v["complete"], true);
    assert_eq!(v["this_run"]["samples"], w.total_samples() as u64);
    assert_eq!(v["this_run"]["rejected_records"], 0);
    assert_all_in_prometheus(&prom, &w, metric).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_resumes_where_it_stopped_and_delivers_everything() {
    let metric = "cli_resume_total";
    let (tmp, w, prom, state) = resumable(metric, 30, 4).await;
    let state_s = state.to_str().unwrap();

    // 20 samples per record, 60 samples/s: 30 records take ~10 s.
    let url = prom.write_url();
    let args = ["--to", &url, "--state-file", state_s];
    let child = spawn_replay(tmp.path(), &args, &["--max-samples-per-second", "60"]);
    let progress = kill_when(child, &state, |v| v["next_seq"].as_u64().unwrap() >= 6).await;
    let progress = progress["next_seq"].as_u64().unwrap();
    let v: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(v["done"], false);
    assert!(
        v["next_seq"].as_u64().unwrap() < 30,
        "stopped midway: {v:#}"
    );
    let partial = count_over_hour(&prom, metric).await;
    assert!(
        partial >= progress as usize * 20 && partial < w.total_samples(),
        "partly delivered: {partial}"
    );

    let o = replay(
        tmp.path(),
        &["--to", &prom.write_url(), "--state-file", state_s, "--json"],
    );
    expect_code(&o, 0, "the resumed replay");
    let v = json(&o);
    assert!(v["resumed_at"].as_u64().unwrap() >= progress, "{v:#}");
    assert_eq!(v["complete"], true);
    assert_eq!(v["total"]["rejected_records"], 0, "{v:#}");
    assert_eq!(
        v["total"]["records"].as_u64().unwrap()
            + v["total"]["already_delivered_records"].as_u64().unwrap(),
        30,
        "{v:#}"
    );
    assert_eq!(count_over_hour(&prom, metric).await, w.total_samples());
    assert_all_in_prometheus(&prom, &w, metric).await;
}

/// `--shards`: batches cut by series hash into concurrent requests keep
/// every series in order (Prometheus refuses nothing as out of order), and
/// a run killed with a sharded batch in flight resumes by re-sending that
/// batch cut with the shard count in the journal, even when the next run
/// asks for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_replay_keeps_each_series_in_order_and_resumes_a_killed_run() {
    let metric = "cli_sharded_total";
    let (tmp, w, prom, state) = resumable(metric, 60, 12).await;
    let state_s = state.to_str().unwrap();

    // 60 samples per record; 4 shards of at most 60 samples per request,
    // 480 samples/s: 60 records take ~7.5 s. Each request is held 300 ms
    // on its way, so that a batch stays in flight long enough to be seen
    // there (the pacing comes before a batch is journaled in flight: at
    // Prometheus's own speed the window is a few milliseconds, and a
    // loaded machine's polls missed every one of them once).
    let proxy = chaos_tests::FaultProxy::start(prom.addr()).await.unwrap();
    proxy.set_mode(chaos_tests::ProxyMode::Latency(Duration::from_millis(300)));
    let url = proxy.write_url();
    let args = ["--to", &url, "--state-file", state_s];
    let more = [
        "--shards",
        "4",
        "--max-samples-per-send",
        "60",
        "--max-samples-per-second",
        "480",
    ];
    let child = spawn_replay(tmp.path(), &args, &more);
    let v = kill_when(child, &state, |v| {
        v["next_seq"].as_u64().unwrap() >= 12 && !v["inflight"].is_null()
    })
    .await;
    assert_eq!(v["shards"], 4, "the journal holds the shard count: {v:#}");
    let partial = count_over_hour(&prom, metric).await;
    assert!(partial < w.total_samples(), "partly delivered: {partial}");

    // The same URL (the journal names it), without the delay.
    proxy.set_mode(chaos_tests::ProxyMode::Pass);
    let o = replay(
        tmp.path(),
        &[
            "--to",
            &url,
            "--state-file",
            state_s,
            "--shards",
            "3",
            "--max-samples-per-send",
            "60",
            "--json",
        ],
    );
    expect_code(&o, 0, "the resumed sharded replay");
    let v = json(&o);
    assert_eq!(v["complete"], true);
    assert_eq!(v["total"]["rejected_records"], 0, "{v:#}");
    assert_eq!(v["total"]["records"], 60, "{v:#}");
    // Parts of the batch in flight that had arrived are refused when
    // re-sent: counted as already delivered (how many depends on when the
    // kill landed), never as rejected.
    assert!(v["resumed_at"].as_u64().unwrap() >= 12, "{v:#}");
    assert_eq!(count_over_hour(&prom, metric).await, w.total_samples());
    assert_all_in_prometheus(&prom, &w, metric).await;
}

/// A log of `requests` records of `series` series of `metric` (5 samples
/// each), a Prometheus to replay it into, and where the replay's state
/// goes.
async fn resumable(
    metric: &str,
    requests: usize,
    series: usize,
) -> (tempfile::TempDir, Written, Prometheus, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let t = Traffic {
        metric: metric.into(),
        requests,
        series,
        samples_per_series: 5,
    };
    let w = write_log(tmp.path(), &t, &[], &[]).await;
    let prom = Prometheus::start_server().await.unwrap();
    let state = tmp.path().join("replay.state");
    (tmp, w, prom, state)
}

/// `walrelay wal replay` on `dir` with `args` and `more`, in the
/// background.
fn spawn_replay(dir: &Path, args: &[&str], more: &[&str]) -> KillOnDrop {
    KillOnDrop(
        Command::new(BIN)
            .args(["wal", "replay", "--data-dir"])
            .arg(dir)
            .args(args)
            .args(more)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// SIGKILLs the replay once its state file satisfies `pred` (std's
/// Child::kill signals the child's own pid); returns that state.
async fn kill_when(mut child: KillOnDrop, state: &Path, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        if let Ok(b) = std::fs::read(state) {
            if let Ok(v) = serde_json::from_slice::<Value>(&b) {
                if pred(&v) {
                    break v;
                }
            }
        }
        assert!(Instant::now() < deadline, "the replay makes progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.0.kill().unwrap();
    assert!(!child.0.wait().unwrap().success(), "killed");
    v
}

/// A child process that is SIGKILLed and reaped when the test ends, even
/// by a failed assertion.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_segment_range_sends_headers_and_the_bearer_token() {
    let src = tempfile::tempdir().unwrap();
    let t = Traffic {
        metric: "cli_token_total".into(),
        requests: 60,
        series: 20,
        samples_per_series: 10,
    };
    write_log(
        src.path(),
        &t,
        &[],
        &["--segment-bytes", "16KiB", "--compression", "none"],
    )
    .await;
    let segs = segments(src.path());
    assert!(segs.len() >= 3, "{segs:?}");
    // The second and third segments.
    let from = first_seq(&segs[1]);
    let to_excl = segs.get(3).map_or(60, |s| first_seq(s));
    let range = format!(
        "{}..{}",
        segs[1].file_name().unwrap().to_string_lossy(),
        first_seq(&segs[2])
    );

    // The receiver: another relay that wants a bearer token.
    let dst = tempfile::tempdir().unwrap();
    let token = dst.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let tok = token.to_str().unwrap();
    let mut receiver = Relay::start_with_bin(
        BIN,
        dst.path().join("data"),
        &[],
        &["--bearer-token-file", tok],
    )
    .await
    .unwrap();

    let o = replay(
        src.path(),
        &[
            "--to",
            &receiver.write_url(),
            "--segments",
            &range,
            "--state-file",
            src.path().join("a.state").to_str().unwrap(),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "without the token: rejected\n{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("HTTP 401"), "{}", stdout(&o));
    // A 401 is not about the data: the run stops, skipping nothing.
    assert!(
        stdout(&o).contains("rejected: 0 records") && stdout(&o).contains("nothing was skipped"),
        "{}",
        stdout(&o)
    );

    let o = replay(
        src.path(),
        &[
            "--to",
            &receiver.write_url(),
            "--segments",
            &range,
            "--bearer-token-file",
            tok,
            "--header",
            "X-Scope-OrgID=tenant-1",
            "--json",
        ],
    );
    expect_code(&o, 0, "replay with the token");
    let v = json(&o);
    assert_eq!(v["from_seq"], from);
    assert_eq!(v["end_seq"], to_excl);
    assert_eq!(v["this_run"]["records"], to_excl - from);
    receiver.stop(Duration::from_secs(30)).await.unwrap();

    let o = cli_dir(&["wal", "inspect"], &dst.path().join("data"), &["--json"]);
    expect_code(&o, 0, "inspect of the receiver's log");
    let got = json(&o)["totals"]["samples"].as_u64().unwrap();
    assert_eq!(got, (to_excl - from) * 200);
    let bad = replay(
        src.path(),
        &[
            "--to",
            "http://127.0.0.1:1/",
            "--header",
            "Content-Type=text/plain",
        ],
    );
    expect_code(&bad, 1, "a header the protocol owns");
}

/// Posts `req` to `url` as a remote-write 2.0 request; returns the status.
async fn post_v2(url: &str, req: &prom_remote_write::v2::Request) -> u16 {
    use prom_remote_write::encode::{encode_v2, snappy_compress};
    reqwest::Client::new()
        .post(url)
        .header("Content-Type", prom_remote_write::content::CONTENT_TYPE_V2)
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "2.0.0")
        .body(snappy_compress(&encode_v2(req)))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reaches_a_tls_receiver_with_a_client_certificate_and_basic_auth_and_sends_2_0_as_it_is(
) {
    chaos_tests::install_tls_provider();
    // A log of 2.0 records.
    let src = tempfile::tempdir().unwrap();
    let (requests, series) = (8u64, 5usize);
    let mut source = Relay::start_with_bin(BIN, src.path(), &[], &[])
        .await
        .unwrap();
    let ts = now_ms() - 60_000;
    for k in 0..requests {
        let mut s = Symbols::new();
        let timeseries = (0..series)
            .map(|i| {
                s.series(
                    &[("__name__", "replay_v2"), ("series", &i.to_string())],
                    &[(k as f64, ts + k as i64 * 1000)],
                )
            })
            .collect();
        assert_eq!(
            post_v2(&source.write_url(), &s.request(timeseries)).await,
            204
        );
    }
    source.stop(Duration::from_secs(30)).await.unwrap();

    // The receiver: a relay serving TLS with its own CA, asking for a
    // client certificate that CA signed, and for a user's password.
    let dst = tempfile::tempdir().unwrap();
    let (p, _ca) = pki(dst.path(), "receiver");
    let users = dst.path().join("users");
    std::fs::write(
        &users,
        format!("replayer:{}\n", bcrypt::hash("right-pw", 4).unwrap()),
    )
    .unwrap();
    let mut args = tls_args(&p);
    args.extend([
        "--tls-client-ca-file".into(),
        p.ca.display().to_string(),
        "--basic-auth-users-file".into(),
        users.display().to_string(),
    ]);
    let mut receiver = Relay::start_with_admin(BIN, dst.path().join("data"), &[], &strs(&args))
        .await
        .unwrap();
    let password = |name: &str, text: &str| {
        let path = dst.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (wrong, right) = (
        password("wrong", "wrong-pw\n"),
        password("right", "right-pw\n"),
    );
    let url = https_write_url(&receiver);
    let (ca, cert, key) = (
        p.ca.display().to_string(),
        p.client_cert.display().to_string(),
        p.client_key.display().to_string(),
    );
    let flags = |password_file: &str| -> Vec<String> {
        [
            "--to",
            url.as_str(),
            "--tls-ca-file",
            &ca,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--basic-auth-username",
            "replayer",
            "--basic-auth-password-file",
            password_file,
            "--protocol",
            "2.0",
            "--retry-max-backoff",
            "200ms",
        ]
        .map(str::to_owned)
        .to_vec()
    };

    // A receiver's certificate from another CA is a setting, like a wrong
    // password: the run stops, skipping nothing, and says why.
    let (other, _other_ca) = pki(dst.path(), "other");
    let mut wrong_ca = flags(&right);
    let at = wrong_ca.iter().position(|f| f == "--tls-ca-file").unwrap();
    wrong_ca[at + 1] = other.ca.display().to_string();
    let o = replay(src.path(), &strs(&wrong_ca));
    expect_code(&o, 1, "a replay trusting another CA");
    assert!(
        stdout(&o).contains("TLS") && stdout(&o).contains("nothing was skipped"),
        "{}",
        stdout(&o)
    );

    // A wrong password is not about the data: the run stops, skipping
    // nothing, and says why.
    let o = replay(src.path(), &strs(&flags(&wrong)));
    expect_code(&o, 1, "a replay with a wrong password");
    assert!(
        stdout(&o).contains("HTTP 401") && stdout(&o).contains("nothing was skipped"),
        "{}",
        stdout(&o)
    );

    let mut ok = flags(&right);
    ok.push("--json".into());
    let o = replay(src.path(), &strs(&ok));
    expect_code(&o, 0, "a replay over TLS with the right credentials");
    let v = json(&o);
    assert_eq!(v["total"]["records"], requests, "{v}");
    assert_eq!(v["total"]["rejected_records"], 0, "{v}");
    receiver.stop(Duration::from_secs(30)).await.unwrap();

    // The receiver stored 2.0 records, every sample of them.
    let o = cli_dir(&["wal", "dump"], &dst.path().join("data"), &["--json"]);
    expect_code(&o, 0, "dump of the receiver's log");
    let records: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!records.is_empty());
    assert!(
        records.iter().all(|r| r["kind"] == "v2"),
        "sent as 2.0: {records:?}"
    );
    let samples: u64 = records.iter().map(|r| r["samples"].as_u64().unwrap()).sum();
    assert_eq!(samples, requests * series as u64);
}
