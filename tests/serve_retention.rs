//! What the real `walrelay serve` may delete or renumber, and what it must
//! keep:
//!
//! - with no replica configured, nothing acknowledged is deleted (nobody has
//!   delivered it; only `--retention` or `drop-oldest` could);
//! - what `drop-oldest` deleted is accounted to a replica that was behind
//!   as dropped (records and samples, reason `disk_budget`), also after a
//!   restart, from the tombstones the relay keeps on disk;
//! - a sequence number that a replica's checkpoint has passed is never
//!   given to a new record, even when that replica is not configured while
//!   the log lost its last records (a corrupt last frame cut at recovery).
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
        &["--segment-bytes", "16KiB", "--compression", "none"],
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

/// The replica's entry in the relay's status.
async fn replica(r: &Relay, name: &str) -> serde_json::Value {
    let status = r.status().await.unwrap();
    chaos_tests::relay::replica_status(&status, name).clone()
}

/// Waits until replica `name` has everything the relay holds.
async fn caught_up(r: &Relay, name: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let st = replica(r, name).await;
        if chaos_tests::scenario::settled(&st) {
            return st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name} did not catch up: {st:#}\n{}",
            r.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn traffic(metric: &str, requests: usize) -> Traffic {
    Traffic {
        metric: metric.into(),
        requests,
        series: 5,
        samples_per_series: 4,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_written_after_a_cut_tail_reach_a_replica_that_was_removed_and_added_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("relay");
    // The replica: another relay, which counts what it receives.
    let receiver = Relay::start_with_bin(BIN, tmp.path().join("receiver"), &[], &[])
        .await
        .unwrap();
    let b = [("b", receiver.write_url())];
    let b: Vec<(&str, &str)> = b.iter().map(|(n, u)| (*n, u.as_str())).collect();

    // b receives records 0..10.
    let mut relay = Relay::start_with_bin(BIN, &data, &b, &[]).await.unwrap();
    let first = post_traffic(&relay, &traffic("before_cut_total", 10)).await;
    let st = caught_up(&relay, "b").await;
    assert_eq!(st["cursor"], 10, "{st:#}");
    relay.stop(Duration::from_secs(30)).await.unwrap();

    // Bit rot in the last frame: recovery cuts it as a torn tail, so the
    // log now ends before b's position.
    let last = segments(&data).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x55;
    std::fs::write(&last, bytes).unwrap();

    // Without b, five more records.
    let mut relay = Relay::start_with_bin(BIN, &data, &[], &[]).await.unwrap();
    let status = relay.status().await.unwrap();
    assert!(
        !status["recovery"]["truncated"].is_null(),
        "the corrupt last frame was cut: {status:#}"
    );
    let after = post_traffic(&relay, &traffic("after_cut_total", 5)).await;
    relay.stop(Duration::from_secs(30)).await.unwrap();

    // b back: it gets all five, none is taken for one it already has.
    let relay = Relay::start_with_bin(BIN, &data, &b, &[]).await.unwrap();
    let st = caught_up(&relay, "b").await;
    assert_eq!(st["sent_records"], 5, "{st:#}\n{}", relay.log_tail(20));
    assert_eq!(st["skipped_records"], 0, "{st:#}");
    let received = receiver
        .metric_sum("walrelay_ingest_samples_total", &[])
        .await
        .unwrap();
    assert_eq!(
        received as usize,
        first.total_samples() + after.total_samples(),
        "the replica received every record written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_drop_oldest_deleted_is_accounted_as_dropped_to_a_replica_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("relay");
    let budget = [
        "--max-disk-bytes",
        "256KiB",
        "--full-policy",
        "drop-oldest",
        "--compression",
        "none",
        "--retry-max-backoff",
        "500ms",
    ];
    // Replica a is down (nobody listens there) while the budget drops.
    let dead = format!(
        "http://127.0.0.1:{}/api/v1/write",
        chaos_tests::ports::free_port()
    );
    let mut relay = Relay::start_with_bin(BIN, &data, &[("a", &dead)], &budget)
        .await
        .unwrap();
    let t = Traffic {
        metric: "dropped_total".into(),
        requests: 150,
        series: 20,
        samples_per_series: 10,
    };
    let w = post_traffic(&relay, &t).await;
    let deleted = relay
        .metric_sum(
            "walrelay_wal_segments_deleted_total",
            &[("reason", "disk_budget")],
        )
        .await
        .unwrap();
    assert!(deleted >= 1.0, "the budget dropped segments");
    // The request a's shipper keeps retrying is re-sent alone after the
    // restart, and its records may be in a dropped segment: they are
    // accounted as dropped like the others.
    relay.sigkill().unwrap();

    // Back with a up: it learns what was dropped before the restart.
    let receiver = Relay::start_with_bin(BIN, tmp.path().join("receiver"), &[], &[])
        .await
        .unwrap();
    let relay = Relay::start_with_bin(BIN, &data, &[("a", &receiver.write_url())], &budget)
        .await
        .unwrap();
    let a = caught_up(&relay, "a").await;
    let received = receiver
        .metric_sum("walrelay_ingest_samples_total", &[])
        .await
        .unwrap() as u64;
    let dropped_records = a["dropped_records"].as_u64().unwrap();
    let dropped_samples = a["dropped_samples"].as_u64().unwrap();
    assert_eq!(a["skipped_records"], 0, "{a:#}\n{}", relay.log_tail(20));
    assert!(dropped_records > 0, "{a:#}");
    assert_eq!(a["sent_samples"].as_u64().unwrap(), received, "{a:#}");
    // Every record was delivered or accounted as dropped, with its samples,
    // those of the re-sent in-flight request included.
    let records = dropped_records + a["sent_records"].as_u64().unwrap();
    let samples = dropped_samples + received;
    let total = (w.requests as u64, w.total_samples() as u64);
    assert_eq!(
        (records, samples),
        total,
        "records and samples delivered or dropped, against those written: {a:#}"
    );
    for (metric, value) in [
        ("walrelay_replica_dropped_records_total", dropped_records),
        ("walrelay_replica_dropped_samples_total", dropped_samples),
    ] {
        let got = relay
            .metric_sum(metric, &[("replica", "a"), ("reason", "disk_budget")])
            .await
            .unwrap();
        assert_eq!(got as u64, value, "{metric}");
    }
}
