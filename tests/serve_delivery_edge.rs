//! The delivery edge with the real `walrelay serve` and a real Prometheus
//! 2.42 replica behind the suite's fault proxy: only an answer about the
//! data skips a record.
//!
//! - 401, 403 and 404 (a rotated credential, a route briefly missing) block
//!   the replica (status `blocked`, `walrelay_replica_blocked`), nothing is
//!   skipped, and every record arrives once the replica takes requests;
//! - the halves of a request that timed out are not the request that was in
//!   flight: a refusal of a half proves nothing, its records go one by one
//!   and every good one arrives;
//! - an operator's `--replica-drop-on-status` does skip on the statuses it
//!   lists, counted as rejected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos_tests::encode::{post_remote_write, v1_series, write_request_body};
use chaos_tests::prometheus::Prometheus;
use chaos_tests::proxy::{FaultProxy, ProxyMode};
use chaos_tests::relay::Relay;
use chaos_tests::scenario::{replica_status, wait_caught_up};
use serde_json::Value;

/// Posts one request with series `edge{i="<i>"}` holding value `i` at `ts`
/// (and `extra` series) to the relay; asserts it is acknowledged.
async fn post_record(relay: &Relay, i: u64, ts: i64, extra: &[(&str, i64)]) {
    let i_s = i.to_string();
    let mut timeseries = vec![v1_series(
        &[("__name__", "edge"), ("i", &i_s)],
        &[(i as f64, ts)],
    )];
    for &(name, t) in extra {
        timeseries.push(v1_series(&[("__name__", name)], &[(1.0, t)]));
    }
    let req = prom_remote_write::v1::WriteRequest {
        timeseries,
        ..Default::default()
    };
    let (status, body) = post_remote_write(&relay.write_url(), write_request_body(&req))
        .await
        .unwrap();
    assert_eq!(status, 204, "record {i}: {body}");
}

/// Waits until `pred` holds for replica `name` in the status; panics with
/// the status and the relay's log after 60 s.
async fn until_replica(
    relay: &Relay,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = relay.status().await.unwrap();
        let r = replica_status(&status, name).clone();
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 60 s; replica {name}: {r:#}\nwalrelay log:\n{}",
            relay.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The values of `edge{i=...}` in `prom`, by `i`.
async fn edge_values(prom: &Prometheus, start_ms: i64) -> Vec<u64> {
    let got = prom
        .raw_series("edge", start_ms - 60_000, start_ms + 600_000, 700_000)
        .await
        .unwrap();
    let mut out: Vec<u64> = got
        .keys()
        .filter_map(|labels| labels.get("i")?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_401_403_404_block_the_replica_and_every_record_arrives_afterwards() {
    let prom = Prometheus::start_server().await.unwrap();
    let proxy = FaultProxy::start(prom.addr()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        data.path(),
        &[("b", &proxy.write_url())],
        &["--retry-max-backoff", "500ms"],
    )
    .await
    .unwrap();
    let t0 = chaos_tests::now_ms();
    let mut next = 0u64;
    for status in [401u16, 403, 404] {
        proxy.set_mode(ProxyMode::http(status));
        for _ in 0..5 {
            post_record(&relay, next, t0 + next as i64, &[]).await;
            next += 1;
        }
        let want = format!("HTTP {status}: ");
        let r = until_replica(&relay, "b", &format!("b blocked by {status}"), |r| {
            r["state"] == "blocked"
                && r["last_error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with(&want))
        })
        .await;
        assert!(r["blocked_since_unix_ms"].as_i64().is_some(), "{r:#}");
        assert_eq!(
            relay
                .metric_sum("walrelay_replica_blocked", &[("replica", "b")])
                .await
                .unwrap(),
            1.0
        );
        assert_eq!(r["rejected_records"], 0, "{r:#}");
    }
    proxy.set_mode(ProxyMode::Pass);
    let status = wait_caught_up(&relay, Duration::from_secs(60))
        .await
        .unwrap();
    let b = replica_status(&status, "b");
    assert_eq!(
        (
            b["rejected_records"].as_u64(),
            b["skipped_records"].as_u64()
        ),
        (Some(0), Some(0)),
        "{b:#}"
    );
    assert_eq!(
        relay
            .metric_sum("walrelay_replica_blocked", &[("replica", "b")])
            .await
            .unwrap(),
        0.0
    );
    assert_eq!(edge_values(&prom, t0).await, (0..next).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_halves_of_a_timed_out_request_are_not_exact_resends() {
    // Replica b already holds `edge_bad` at t0: record 2 below carries an
    // older sample of it, so b refuses (400, out of order) any request that
    // holds record 2, and stores nothing of that request.
    let a = Prometheus::start_server().await.unwrap();
    let b = Prometheus::start_server().await.unwrap();
    let t0 = chaos_tests::now_ms();
    let seed = prom_remote_write::v1::WriteRequest {
        timeseries: vec![v1_series(&[("__name__", "edge_bad")], &[(1.0, t0)])],
        ..Default::default()
    };
    let (s, body) = post_remote_write(&b.write_url(), write_request_body(&seed))
        .await
        .unwrap();
    assert_eq!(s, 204, "{body}");

    // Ten records, delivered to a; b is added afterwards, from the oldest
    // record, so that its first request holds all ten.
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(data.path(), &[("a", &a.write_url())], &[])
        .await
        .unwrap();
    for i in 0..10u64 {
        let extra: &[(&str, i64)] = if i == 2 {
            &[("edge_bad", t0 - 5_000)]
        } else {
            &[]
        };
        post_record(&relay, i, t0 + i as i64, extra).await;
    }
    wait_caught_up(&relay, Duration::from_secs(60))
        .await
        .unwrap();
    relay.stop(Duration::from_secs(20)).await.unwrap();

    // b behind a proxy that swallows requests: the ten-record request times
    // out and is split; its first half (records 0..5) is caught by the
    // proxy as well, which then lets everything through and closes that
    // connection, so the half is retried and refused for record 2.
    let proxy = FaultProxy::start(b.addr()).await.unwrap();
    proxy.set_mode(ProxyMode::Stall);
    let b_url = proxy.write_url();
    let relay = Relay::start(
        data.path(),
        &[("a", &a.write_url()), ("b", &b_url)],
        &[
            "--new-replica-start",
            "oldest",
            "--send-timeout",
            "2s",
            "--retry-max-backoff",
            "500ms",
        ],
    )
    .await
    .unwrap();
    until_replica(&relay, "b", "b sends the first half after a timeout", |r| {
        r["in_flight"]["from"] == 0 && r["in_flight"]["to"] == 5
    })
    .await;
    proxy.set_mode(ProxyMode::Pass);
    let status = wait_caught_up(&relay, Duration::from_secs(60))
        .await
        .unwrap();
    // Every record but the refused one is in b.
    let want: Vec<u64> = (0..10).filter(|&i| i != 2).collect();
    let got = edge_values(&b, t0).await;
    assert!(
        want.iter().all(|i| got.contains(i)),
        "b holds records {got:?}, expected at least {want:?}; status: {:#}",
        replica_status(&status, "b")
    );
    let br = replica_status(&status, "b");
    assert_eq!(
        br["rejected_records"].as_u64().unwrap()
            + br["assumed_delivered_records"].as_u64().unwrap(),
        1,
        "only record 2 is skipped: {br:#}"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drop_status_skips_records_and_counts_them_as_rejected() {
    let prom = Prometheus::start_server().await.unwrap();
    let proxy = FaultProxy::start(prom.addr()).await.unwrap();
    proxy.set_mode(ProxyMode::http(404));
    let data = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        data.path(),
        &[("b", &proxy.write_url())],
        &["--replica-drop-on-status", "b=404,410"],
    )
    .await
    .unwrap();
    let t0 = chaos_tests::now_ms();
    for i in 0..3u64 {
        post_record(&relay, i, t0 + i as i64, &[]).await;
    }
    let r = until_replica(&relay, "b", "the three records are rejected", |r| {
        r["rejected_records"] == 3 && r["lag_records"] == 0
    })
    .await;
    assert_ne!(r["state"], "blocked", "{r:#}");
    proxy.set_mode(ProxyMode::Pass);
    post_record(&relay, 3, t0 + 3, &[]).await;
    wait_caught_up(&relay, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(edge_values(&prom, t0).await, vec![3]);
}
