//! `walrelay serve` against real Prometheus 2.42 replicas (Debian package):
//! the delivery contract, a replica's crash, a real Prometheus as the
//! sender, and bad input. The relay SIGKILLed under load is an injected
//! fault: chaos-tests/tests/kill.rs (with these replicas) and, for the log
//! alone, tests/wal_sigkill.rs. Each test starts its own processes on free ports in
//! temp dirs and kills them by pid when it ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chaos_tests::load::{Load, LoadSpec};
use chaos_tests::prometheus::{Prometheus, PrometheusOpts};
use chaos_tests::relay::Relay;
use chaos_tests::scenario::wait_caught_up;
use chaos_tests::verify::verify;

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

async fn relay(dir: &std::path::Path, replicas: &[(&str, &str)], extra: &[&str]) -> Relay {
    Relay::start_with_bin(BIN, dir, replicas, extra)
        .await
        .expect("walrelay starts")
}

fn spec(workers: u32, series: u32, secs: u64) -> LoadSpec {
    LoadSpec {
        workers,
        series_per_worker: series,
        duration: Some(Duration::from_secs(secs)),
        interval: Duration::from_millis(20),
        ..LoadSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_replicas_hold_every_acknowledged_sample() {
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = relay(
        dir.path(),
        &[("a", &a.write_url()), ("b", &b.write_url())],
        &[],
    )
    .await;
    let ack = Load::run(spec(4, 50, 5), &r.write_url()).await.unwrap();
    assert!(ack.acked_samples() > 1000, "load ran: {:?}", ack.summary());
    wait_caught_up(&r, Duration::from_secs(60)).await.unwrap();
    for p in [&a, &b] {
        let v = verify(p, &ack).await.unwrap();
        eprintln!("{v}");
        v.assert_lossless();
        assert_eq!(v.delivered, v.acknowledged);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_gets_everything_after_its_restart() {
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let mut b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so the outage spans several of them.
    let r = relay(
        dir.path(),
        &[("a", &a.write_url()), ("b", &b.write_url())],
        &["--segment-bytes", "64KiB", "--retry-max-backoff", "1s"],
    )
    .await;
    let load = Load::start(spec(4, 50, 12), &r.write_url()).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.kill().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Replica a is unaffected while b is down: its lag stays small.
    let status = r.status().await.unwrap();
    let lag = |name: &str| {
        status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap()["lag_records"]
            .as_u64()
            .unwrap()
    };
    assert!(lag("b") > 20, "b falls behind while down: {status:#}");
    assert!(lag("a") < lag("b"), "a keeps up: {status:#}");
    b.restart().await.unwrap();
    let ack = load.join().await.unwrap();
    wait_caught_up(&r, Duration::from_secs(90)).await.unwrap();
    for p in [&a, &b] {
        let v = verify(p, &ack).await.unwrap();
        eprintln!("{v}");
        v.assert_lossless();
    }
}

/// Under a light load the writer climbs to a higher zstd level (a new
/// chain in the middle of a segment); what it wrote at both levels reads
/// back from disk, and the replica holds every acknowledged sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_load_is_compressed_at_a_higher_level_and_every_sample_arrives() {
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = relay(dir.path(), &[("a", &a.write_url())], &[]).await;
    assert_eq!(
        r.metric_sum("walrelay_wal_zstd_level", &[]).await.unwrap(),
        1.0
    );
    // Two small requests a second: far under the compression budget.
    let light = LoadSpec {
        duration: None,
        interval: Duration::from_millis(500),
        ..spec(1, 50, 0)
    };
    let load = Load::start(light, &r.write_url()).unwrap();
    // The level is decided 10 s after the first frame, and then at every
    // frame 10 s after the last decision: wait for it, not for a moment.
    r.wait_metric_until(
        "walrelay_wal_zstd_level",
        &[],
        "above 1",
        |level| level > 1.0,
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    // More requests at the new level, in the same segment.
    let acked = load.progress().acked_requests;
    load.wait_acked_requests(acked + 4, Duration::from_secs(60))
        .await
        .unwrap();
    let ack = load.stop().await.unwrap();
    wait_caught_up(&r, Duration::from_secs(60)).await.unwrap();
    let v = verify(&a, &ack).await.unwrap();
    eprintln!("{v}");
    v.assert_lossless();
    assert_eq!(v.delivered, v.acknowledged);
    r.stop(Duration::from_secs(10)).await.unwrap();
    r.verify_log().unwrap();
}
