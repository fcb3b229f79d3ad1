//! Live reconfiguration of the real `walrelay serve` process (configured by
//! a TOML file, no `--replica` flags, so the file's replicas are the ones in
//! force), against real Prometheus 2.42 replicas and the load generator:
//!
//! - `POST /-/reload` is enabled (`--enable-reload-endpoint`) and asks for
//!   the ingest credentials (basic auth here, which the load generator
//!   sends from its URL);
//! - under load, `POST /-/reload` changes replica a (its headers and rate
//!   limit) and adds replica b: a loses nothing and is sent nothing twice
//!   (Prometheus would refuse a re-sent sample with 400, and the relay counts
//!   every 4xx), b receives everything written after it was added;
//! - a file that does not parse is refused, by SIGHUP and by the endpoint:
//!   the running replicas stay, `walrelay_config_last_reload_successful`
//!   is 0 until a reload succeeds;
//! - SIGHUP with b removed stops b's shipper; a keeps shipping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use chaos_tests::load::{Load, LoadSpec};
use chaos_tests::prometheus::{Prometheus, PrometheusOpts};
use chaos_tests::proxy::{FaultProxy, ProxyMode};
use chaos_tests::relay::Relay;
use chaos_tests::scenario::{wait_caught_up, wait_status};
use chaos_tests::verify::verify;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

fn write_config(path: &Path, replicas: &[(&str, &str, &str)]) {
    let mut text = String::from("retry_max_backoff = \"1s\"\n");
    for (name, url, extra) in replicas {
        text.push_str(&format!(
            "[[replica]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn names(status: &Value) -> Vec<String> {
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn reload_succeeded(r: &Relay) -> f64 {
    r.metric_sum("walrelay_config_last_reload_successful", &[])
        .await
        .unwrap()
}

/// Waits until `walrelay_config_last_reload_successful` is `want`.
async fn until_reload_succeeded_is(r: &Relay, want: f64, what: &str) {
    r.wait_metric(
        "walrelay_config_last_reload_successful",
        &[],
        want,
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
}

fn sighup(r: &Relay) {
    let pid = r.pid().unwrap().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_added_changed_and_removed_without_a_restart_and_nothing_is_lost_or_resent() {
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    // a answers slowly (through a delaying proxy): at the reload a request
    // to a is almost always in flight, so a shipper replaced without
    // draining would leave it to be re-sent.
    let slow_a = FaultProxy::start(a.addr()).await.unwrap();
    slow_a.set_mode(ProxyMode::Delay(Duration::from_millis(150)));
    let a_url = slow_a.write_url();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walrelay.toml");
    write_config(&config, &[("a", &a_url, "")]);
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("sender:{}\n", bcrypt::hash("pw", 4).unwrap()),
    )
    .unwrap();
    let r = Relay::start_with_bin(
        BIN,
        &dir.path().join("data"),
        &[],
        &[
            "--config",
            config.to_str().unwrap(),
            "--basic-auth-users-file",
            users.to_str().unwrap(),
            "--enable-reload-endpoint",
        ],
    )
    .await
    .expect("walrelay starts");
    assert_eq!(names(&r.status().await.unwrap()), ["a"]);
    assert_eq!(reload_succeeded(&r).await, 1.0);
    let http = reqwest::Client::new();
    let reload_url = format!("{}/-/reload", r.url());
    let reload = || http.post(&reload_url).basic_auth("sender", Some("pw"));
    // reqwest sends a URL's user and password as basic auth.
    let write_url = format!("http://sender:pw@{}/api/v1/write", r.addr());
    let resp = http.post(&reload_url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "a reload without credentials");

    // Under load: a changes (a header and a rate limit far above the load),
    // b is added.
    let spec = |secs| LoadSpec {
        workers: 2,
        series_per_worker: 20,
        duration: Some(Duration::from_secs(secs)),
        interval: Duration::from_millis(20),
        ..LoadSpec::default()
    };
    let during = Load::start(spec(8), &write_url).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    write_config(
        &config,
        &[
            (
                "a",
                &a_url,
                "max_samples_per_second = 1000000\n[replica.headers]\nX-Reloaded = \"yes\"",
            ),
            ("b", &b.write_url(), ""),
        ],
    );
    let resp = reload().send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let changes: Value = resp.json().await.unwrap();
    assert_eq!(changes["replicas"]["changed"], serde_json::json!(["a"]));
    assert_eq!(changes["replicas"]["added"], serde_json::json!(["b"]));
    let status = r.status().await.unwrap();
    assert_eq!(names(&status), ["a", "b"]);
    assert_eq!(
        status["replicas"][0]["rate_limits"]["max_samples_per_second"],
        1_000_000
    );
    let during = during.join().await.unwrap();
    // Written entirely after b was added.
    let after = Load::run(spec(2), &write_url).await.unwrap();
    wait_caught_up(&r, Duration::from_secs(60)).await.unwrap();
    for (replica, load) in [(&a, &during), (&a, &after), (&b, &after)] {
        let v = verify(replica, load).await.unwrap();
        eprintln!("{v}");
        v.assert_lossless();
    }
    let refused = r
        .metric_sum(
            "walrelay_replica_requests_total",
            &[("replica", "a"), ("status", "4xx")],
        )
        .await
        .unwrap();
    assert_eq!(
        refused,
        0.0,
        "a was sent something twice: {}",
        r.log_tail(30)
    );
    // The replaced shipper drained: it finished its request instead of
    // leaving an in-flight range for the new one to re-send.
    let log = std::fs::read_to_string(r.log_path()).unwrap();
    assert!(
        !log.contains("re-sending the request that was in flight"),
        "a's in-flight request was re-sent after the reload:\n{}",
        r.log_tail(30)
    );

    // A file that does not parse: refused by SIGHUP and by the endpoint.
    std::fs::write(&config, "[[replica]\nname = ").unwrap();
    sighup(&r);
    until_reload_succeeded_is(&r, 0.0, "SIGHUP with a bad file").await;
    let resp = reload().send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    let reason = resp.text().await.unwrap();
    assert!(
        reason.contains("walrelay.toml"),
        "the reason names the file: {reason}"
    );
    assert_eq!(
        names(&r.status().await.unwrap()),
        ["a", "b"],
        "running replicas kept"
    );
    assert!(
        r.log_tail(50).contains("reload refused"),
        "{}",
        r.log_tail(20)
    );
    let resp = http.get(&reload_url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);

    // b removed by SIGHUP: its shipper stops; a keeps shipping.
    write_config(&config, &[("a", &a_url, "")]);
    sighup(&r);
    wait_status(&r, Duration::from_secs(30), "b removed", |s| {
        names(s) == ["a"]
    })
    .await;
    // The gauge is set after the change is applied, so the status can
    // show b gone a moment before the gauge says the reload succeeded.
    until_reload_succeeded_is(&r, 1.0, "SIGHUP with a good file").await;
    let last = Load::run(spec(2), &write_url).await.unwrap();
    wait_caught_up(&r, Duration::from_secs(60)).await.unwrap();
    verify(&a, &last).await.unwrap().assert_lossless();
}
