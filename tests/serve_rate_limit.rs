//! Per-replica rate limits against real processes: two real Prometheus 2.42
//! replicas, the real walrelay binary (configured by a TOML file, the only
//! place the per-replica limits can be set) and the load generator.
//!
//! Replica b is killed under load so it builds a backlog, then comes back
//! with a low `max_samples_per_second`. Asserted:
//! (a) b's delivery rate, measured from the relay's status over several
//!     seconds, stays within the limit (with tolerance for the one-second
//!     burst: this is a limit, not a speed claim);
//! (b) meanwhile ingest keeps acknowledging and replica a stays
//!     caught up (its lag keeps returning to about zero);
//! (c) in the end b holds every acknowledged sample (the verify oracle).
//!
//! Nothing asserts how fast the relay itself is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos_tests::load::{Load, LoadSpec};
use chaos_tests::prometheus::{Prometheus, PrometheusOpts};
use chaos_tests::relay::{replica_status, Relay};
use chaos_tests::verify::verify;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

/// b's limit: half of the 1000 samples/s the load writes. So b, once back,
/// falls further behind until the load ends (its delivery is bounded by the
/// limit, not by what there is to send), and an unlimited b would deliver at
/// least the ingest rate, over the 1.5x tolerance.
const B_SAMPLES_PER_SECOND: f64 = 500.0;

fn field(status: &Value, name: &str, key: &str) -> u64 {
    replica_status(status, name)[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{name}.{key} in {status:#}"))
}

/// Polls the relay's status and the load while `for_how_long` passes, and
/// checks the fairness properties: ingest never goes 3 s without an
/// acknowledgement, and replica a's lag never stays above a few records
/// for long.
/// Returns whether b was seen in the "rate-limited" phase.
async fn watch_fairness(
    relay: &Relay,
    load: &chaos_tests::LoadHandle,
    for_how_long: Duration,
) -> bool {
    const CAUGHT_UP_RECORDS: u64 = 20;
    const MAX_BEHIND: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let mut a_caught_up_at = Instant::now();
    let mut acked = load.progress().acked_requests;
    let mut acked_at = Instant::now();
    let mut saw_rate_limited = false;
    while started.elapsed() < for_how_long {
        let status = relay.status().await.unwrap();
        let now = Instant::now();
        if field(&status, "a", "lag_records") <= CAUGHT_UP_RECORDS {
            a_caught_up_at = now;
        }
        assert!(
            now - a_caught_up_at < MAX_BEHIND,
            "replica a stayed behind for {:?} while b was catching up: {status:#}\n{}",
            now - a_caught_up_at,
            relay.log_tail(30)
        );
        saw_rate_limited |= replica_status(&status, "b")["state"] == "rate-limited";
        let p = load.progress();
        if p.acked_requests > acked {
            acked = p.acked_requests;
            acked_at = now;
        }
        // (Once the load has finished there is nothing to acknowledge.)
        assert!(
            load.is_finished() || now - acked_at < Duration::from_secs(3),
            "ingest acknowledged nothing for {:?}: {p:?}",
            now - acked_at
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    saw_rate_limited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_replica_catching_up_stays_within_its_limit_and_slows_nothing_else() {
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let mut b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walrelay.toml");
    std::fs::write(
        &config,
        format!(
            "retry_max_backoff = \"1s\"\n\
             [[replica]]\nname = \"a\"\nurl = \"{}\"\n\
             [[replica]]\nname = \"b\"\nurl = \"{}\"\nmax_samples_per_second = {}\n",
            a.write_url(),
            b.write_url(),
            B_SAMPLES_PER_SECOND as u64
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let r = Relay::start_with_bin(BIN, &data, &[], &["--config", config.to_str().unwrap()])
        .await
        .expect("walrelay starts");
    let status = r.status().await.unwrap();
    assert_eq!(
        replica_status(&status, "b")["rate_limits"]["max_samples_per_second"],
        B_SAMPLES_PER_SECOND as u64
    );
    assert_eq!(
        replica_status(&status, "a")["rate_limits"]["max_samples_per_second"],
        0
    );

    // 2 workers x 10 series x 50 requests/s: 1000 samples/s, in records
    // of 10 samples.
    let load = Load::start(
        LoadSpec {
            workers: 2,
            series_per_worker: 10,
            duration: Some(Duration::from_secs(15)),
            interval: Duration::from_millis(20),
            ..LoadSpec::default()
        },
        &r.write_url(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.kill().unwrap();
    // Down for 3 s: a backlog of about 3000 samples, six seconds' worth of
    // b's limit.
    watch_fairness(&r, &load, Duration::from_secs(3)).await;
    assert!(field(&r.status().await.unwrap(), "b", "lag_records") > 100);
    b.restart().await.unwrap();

    // Wait for b's first delivery, then let the shipper spend the bucket's
    // burst (one second's worth, built up while b was down) before the
    // measured window starts.
    let back = Instant::now();
    let sent_before = field(&r.status().await.unwrap(), "b", "sent_samples");
    while field(&r.status().await.unwrap(), "b", "sent_samples") == sent_before {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "b never got a request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut saw_rate_limited = watch_fairness(&r, &load, Duration::from_millis(1500)).await;

    // (a) and (b): several seconds of b's delivery, measured by the relay.
    let s0 = r.status().await.unwrap();
    let t0 = Instant::now();
    saw_rate_limited |= watch_fairness(&r, &load, Duration::from_secs(5)).await;
    let s1 = r.status().await.unwrap();
    let window = t0.elapsed().as_secs_f64();
    let delivered = field(&s1, "b", "sent_samples") - field(&s0, "b", "sent_samples");
    let rate = delivered as f64 / window;
    eprintln!(
        "b delivered {delivered} samples in {window:.1} s: {rate:.0}/s (limit {B_SAMPLES_PER_SECOND})"
    );
    assert!(
        rate <= 1.5 * B_SAMPLES_PER_SECOND,
        "b delivered {rate:.0} samples/s, over its limit of {B_SAMPLES_PER_SECOND}: {s1:#}"
    );
    // The limiter, not a lack of records, bounded b: it was still behind.
    assert!(field(&s1, "b", "lag_records") > 0, "{s1:#}");
    assert!(saw_rate_limited, "b never showed the rate-limited phase");
    let waited = |name: &'static str| {
        let r = &r;
        async move {
            r.metric_sum(
                "walrelay_replica_rate_limited_seconds_total",
                &[("replica", name)],
            )
            .await
            .unwrap()
        }
    };
    assert!(
        waited("b").await > 1.0,
        "{}",
        r.metrics_text().await.unwrap()
    );
    assert_eq!(waited("a").await, 0.0);

    // (c) Nothing lifted: b drains at its limit and ends up with everything.
    let ack = load.join().await.unwrap();
    assert!(ack.acked_samples() > 5000, "load ran: {:?}", ack.summary());
    let started = Instant::now();
    loop {
        let status = r.status().await.unwrap();
        if ["a", "b"]
            .iter()
            .all(|n| field(&status, n, "lag_records") == 0)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "replicas did not catch up: {status:#}\n{}",
            r.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for p in [&a, &b] {
        let v = verify(p, &ack).await.unwrap();
        eprintln!("{v}");
        v.assert_lossless();
    }
}
