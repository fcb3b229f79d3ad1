//! Repacking sealed segments (`src/wal/repack.rs`, `src/repacker.rs`)
//! against real parts: a real Prometheus replica is down while the relay
//! buffers, the relay rewrites the sealed segments in the background and is
//! SIGKILLed between rounds of load (a repack may be under way), a copy cut
//! short by a crash is planted; then the replica comes back and must hold
//! every acknowledged sample, and `walrelay wal verify` must find the log
//! whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos_tests::scenario::{self, scaled};
use chaos_tests::{verify, AckLog, Load, LoadSpec, Prometheus, PrometheusOpts, Relay, RetryPolicy};

/// Segments repacked by this life of the relay.
async fn repacked(relay: &Relay) -> f64 {
    relay
        .metric_sum("walrelay_wal_repacks_total", &[("outcome", "repacked")])
        .await
        .unwrap_or(0.0)
}

async fn wait_repacked(relay: &Relay, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while repacked(relay).await < at_least {
        if Instant::now() >= deadline {
            let text = relay.metrics_text().await.unwrap_or_default();
            let repacks: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with("walrelay_wal_repack") || l.starts_with("walrelay_wal_segments")
                })
                .collect();
            panic!("no segment repacked: {repacks:#?}\n{}", relay.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_repacked_during_an_outage_lose_nothing_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let wal = data.join("wal");
    let mut b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    // Frames stored uncompressed: the load generator's requests repeat
    // each other nearly byte for byte, so zstd chains already make them
    // about as small as a repack would, and a repack would find nothing
    // worth rewriting. Repacks of chains are the unit tests' (`wal::tests`).
    let args = [
        "--compression",
        "none",
        "--segment-bytes",
        "64KiB",
        "--segment-max-age",
        "1s",
        "--retry-min-backoff",
        "50ms",
        "--retry-max-backoff",
        "1s",
    ];
    let mut relay = Relay::start(&data, &[("b", &b.write_url())], &args)
        .await
        .unwrap();
    b.kill().unwrap();

    let run_id = LoadSpec::new_run_id();
    let mut ack: Option<AckLog> = None;
    let mut saved = 0.0;
    for round in 0..3u32 {
        let spec = LoadSpec {
            workers: 2,
            first_worker: 2 * round,
            series_per_worker: 40,
            samples_per_series: 2,
            requests_per_worker: Some(scaled(150, 1500)),
            retry: RetryPolicy::Never,
            run_id: run_id.clone(),
            seed: scenario::seed() + u64::from(round),
            ..LoadSpec::default()
        };
        let got = Load::run(spec, &relay.write_url()).await.unwrap();
        assert_eq!(got.counts().acked_requests, 2 * scaled(150, 1500));
        match &mut ack {
            Some(a) => a.merge(got).unwrap(),
            None => ack = Some(got),
        }
        wait_repacked(&relay, 1.0).await;
        saved += relay
            .metric_sum("walrelay_wal_repack_saved_bytes_total", &[])
            .await
            .unwrap();
        relay.sigkill().unwrap();
        if round == 1 {
            // A crash in the middle of a copy leaves it beside its segment.
            let some_segment = std::fs::read_dir(&wal)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .find(|n| n.ends_with(".wal"))
                .unwrap();
            std::fs::write(wal.join(format!("{some_segment}.repack")), b"WRSG half").unwrap();
        }
        relay.restart().await.unwrap();
    }
    let ack = ack.unwrap();
    assert!(saved > 0.0, "repacking saved nothing");
    // The planted copy is gone, and no copy is left once the relay stopped
    // (a repack under way abandons its copy).
    relay.stop(Duration::from_secs(20)).await.unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".repack"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Every segment, repacked or not, reads whole.
    relay.verify_log().unwrap();
    relay.restart().await.unwrap();

    // The replica comes back and must get everything, from the repacked
    // segments and the others.
    b.start_again().await.unwrap();
    scenario::wait_caught_up(&relay, Duration::from_secs(180))
        .await
        .unwrap();
    let verdict = verify(&b, &ack).await.unwrap();
    verdict.assert_lossless();
    relay.stop(Duration::from_secs(20)).await.unwrap();
}
