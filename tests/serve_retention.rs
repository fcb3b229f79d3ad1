//! What the real `walrelay serve` may delete or renumber, and what it must
//! keep:
//!
//! - with no replica configured, nothing acknowledged is deleted (nobody has
//!   delivered it; only `--retention` or `drop-oldest` could).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_common;

use std::time::{Duration, Instant};

use chaos_tests::relay::Relay;
use cli_common::*;

/// Waits until `walrelay_housekeeping_runs_total` has grown by `ticks`:
/// retention has run that many times since the call.
async fn housekeeping_ran(r: &Relay, ticks: f64) {
    let runs = || async {
        r.metric_sum("walrelay_housekeeping_runs_total", &[])
            .await
            .unwrap()
    };
    let from = runs().await;
    let started = Instant::now();
    while runs().await < from + ticks {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "housekeeping did not run {ticks} times: {}",
            r.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_replicas_keeps_every_acknowledged_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with_bin(
        BIN,
        tmp.path(),
        &[],
        &["--segment-bytes", "64KiB", "--compression", "none"],
    )
    .await
    .unwrap();
    let t = Traffic {
        metric: "kept_total".into(),
        requests: 60,
        series: 20,
        samples_per_series: 10,
    };
    let w = post_traffic(&relay, &t).await;
    housekeeping_ran(&relay, 3.0).await;
    let status = relay.status().await.unwrap();
    assert_eq!(status["wal"]["first_seq"], 0, "{status:#}");
    assert_eq!(status["wal"]["head_seq"], 60, "{status:#}");
    let on_disk = status["wal"]["segments"].as_u64().unwrap();
    assert!(on_disk >= 4, "several segments written: {status:#}");
    assert_eq!(
        relay
            .metric_sum("walrelay_wal_segments_deleted_total", &[])
            .await
            .unwrap(),
        0.0
    );
    relay.stop(Duration::from_secs(30)).await.unwrap();

    assert_eq!(segments(tmp.path()).len() as u64, on_disk);
    let o = cli_dir(&["wal", "verify"], tmp.path(), &["--json"]);
    expect_code(&o, 0, "verify");
    let v = json(&o);
    assert_eq!(v["records"], w.requests as u64, "{v:#}");
    assert_eq!(v["samples"], w.total_samples() as u64, "{v:#}");
}
