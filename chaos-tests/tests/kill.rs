//! walrelay SIGKILLed at random moments under load: while serving, within
//! milliseconds of becoming ready, and before it is ready (during recovery
//! and the re-send of the request that was in flight), with one replica away
//! for part of the run so that kills also land while a large backlog is being
//! replayed. A retrying sender keeps writing throughout. Every sample the
//! relay acknowledged must reach both replicas.
//!
//! `CHAOS_SEED` fixes the kill moments, `CHAOS_SOAK=1` makes the run longer
//! (300 kills instead of 30). Build the relay first: `cargo build --bins`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos_tests::scenario::{self, Report};
use chaos_tests::{Prometheus, Relay};
use rand::Rng;

/// When a kill landed.
#[derive(Default, Debug)]
struct Kills {
    /// Before `/-/ready` answered: recovery, checkpoint load, in-flight re-send.
    before_ready: u32,
    /// Within 100 ms after the relay became ready.
    just_after_ready: u32,
    /// While serving for a while.
    serving: u32,
    /// While replica b was down.
    replica_down: u32,
}

impl Kills {
    fn total(&self) -> u32 {
        self.before_ready + self.just_after_ready + self.serving
    }

    /// Counts a kill of a relay that became ready at `ready_at` (None: it
    /// was not ready yet).
    fn add(&mut self, ready_at: Option<Instant>, replica_down: bool) {
        match ready_at {
            None => self.before_ready += 1,
            Some(t) if t.elapsed() < Duration::from_millis(100) => self.just_after_ready += 1,
            Some(_) => self.serving += 1,
        }
        self.replica_down += u32::from(replica_down);
    }
}

/// Counts of the relay's notable log events over all its runs.
fn log_events(log: &str) -> String {
    [
        (
            "in-flight re-sends",
            "re-sending the request that was in flight",
        ),
        (
            "re-sends refused as already delivered",
            "re-sent request refused",
        ),
        ("torn tails truncated", "torn tail truncated"),
        ("empty segments removed", "removed an empty segment"),
        ("corruption reports", "corruption found in the log"),
        ("records skipped", "records skipped: cannot be read"),
        ("records rejected", "replica rejected the record"),
    ]
    .iter()
    .map(|(name, pat)| format!("{name} {}", log.matches(pat).count()))
    .collect::<Vec<_>>()
    .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_under_load() {
    let target_kills: u32 = scenario::scaled(30, 300);
    let mut rng = scenario::rng("kill");
    let mut report = Report::new("sigkill_random_under_load", "");

    let a = Prometheus::start_server().await.unwrap();
    let mut b = Prometheus::start_server().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let (a_url, b_url) = (a.write_url(), b.write_url());
    let mut relay = Relay::start(
        data.path(),
        &[("a", &a_url), ("b", &b_url)],
        &[
            "--segment-bytes",
            "64KiB",
            "--retry-max-backoff",
            "1s",
            "--send-timeout",
            "5s",
            "--max-samples-per-send",
            "2000",
        ],
    )
    .await
    .unwrap();

    // A real sender: retries every request until it is acknowledged.
    let load = scenario::retrying_load(&relay, 25).unwrap();
    load.wait_acked_requests(20, Duration::from_secs(20))
        .await
        .unwrap();

    let mut kills = Kills::default();
    // Time from spawn to ready of the last full start, to aim kills before it.
    let mut startup = Duration::from_millis(30);
    let mut ready_at = Instant::now();
    let b_down_from = target_kills / 3;
    let b_up_at = 2 * target_kills / 3;
    let mut b_down_for = Duration::ZERO;
    let mut b_down_since = None;
    let mut acked_before_kill = Vec::new();

    while kills.total() < target_kills {
        let i = kills.total();
        if i >= b_down_from && b_down_since.is_none() && b_down_for.is_zero() {
            b.kill().unwrap();
            b_down_since = Some(Instant::now());
        }
        if i >= b_up_at {
            if let Some(since) = b_down_since.take() {
                b.start_again().await.unwrap();
                b_down_for = since.elapsed();
            }
        }
        let b_down = b_down_since.is_some();
        match rng.random_range(0..4u32) {
            // Serving for a while.
            0 | 1 => {
                let d = rng.random_range(200..2500u64);
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            // Within milliseconds of becoming ready.
            2 => {
                let d = rng.random_range(0..30u64);
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            // Before ready: kill, start, kill again during startup.
            _ => {
                relay.sigkill().unwrap();
                kills.add(Some(ready_at), b_down);
                let d = Duration::from_micros(rng.random_range(0..startup.as_micros() as u64 + 1));
                match tokio::time::timeout(d, relay.restart()).await {
                    Err(_elapsed) => {
                        // Spawned, not ready yet.
                        relay.sigkill().unwrap();
                        kills.add(None, b_down);
                    }
                    Ok(r) => {
                        r.unwrap();
                        ready_at = Instant::now();
                        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30u64))).await;
                        relay.sigkill().unwrap();
                        kills.add(Some(ready_at), b_down);
                    }
                }
                let t0 = Instant::now();
                relay.restart().await.unwrap();
                startup = t0.elapsed();
                ready_at = Instant::now();
                acked_before_kill.push(load.progress().acked_requests);
                continue;
            }
        }
        relay.sigkill().unwrap();
        kills.add(Some(ready_at), b_down);
        acked_before_kill.push(load.progress().acked_requests);
        let t0 = Instant::now();
        relay.restart().await.unwrap();
        startup = t0.elapsed();
        ready_at = Instant::now();
    }
    if let Some(since) = b_down_since.take() {
        b.start_again().await.unwrap();
        b_down_for = since.elapsed();
    }

    // The sender kept getting acknowledgements between kills.
    let end = scenario::end_run(&relay, load, 20, &a, &b).await.unwrap();
    let (ack, va, log) = (&end.ack, &end.a, &end.log);
    let progressed = acked_before_kill.windows(2).filter(|w| w[1] > w[0]).count();
    let panics = log.matches("panicked at").count();
    let starts = log.matches("walrelay serving").count();

    report.set_injected(format!(
        "{} SIGKILLs of walrelay ({} before ready, {} within 100ms of ready, {} while serving; \
             {} while replica b was SIGKILLed for {:.1}s)",
        kills.total(),
        kills.before_ready,
        kills.just_after_ready,
        kills.serving,
        kills.replica_down,
        b_down_for.as_secs_f64()
    ));
    report
        .run_end(&end)
        .note(format!(
            "sender: {}; relay started {starts} times; relay counters are of the last process only",
            ack.summary()
        ))
        .note(format!("relay log over all runs: {}", log_events(log)))
        .note(
            "extra = samples of requests the sender never saw acknowledged (relay killed after \
             the commit, before the answer) that are stored anyway: allowed by at-least-once",
        );
    report.emit();
    report.assert_lossless();

    assert!(
        kills.total() >= 20,
        "only {} kills: {kills:?}",
        kills.total()
    );
    assert!(
        kills.before_ready >= 1 && kills.just_after_ready >= 1 && kills.serving >= 1,
        "kill moments not spread: {kills:?}"
    );
    assert!(
        kills.replica_down >= 3,
        "too few kills during the outage: {kills:?}"
    );
    assert_eq!(panics, 0, "walrelay panicked:\n{}", relay.log_tail(80));
    assert_eq!(
        log.matches("corruption found in the log").count(),
        0,
        "SIGKILL can tear the tail of the log, not damage its middle"
    );
    assert!(
        progressed * 2 >= acked_before_kill.len(),
        "the sender was acknowledged between only {progressed} of {} kills",
        acked_before_kill.len()
    );
    assert_eq!(va.acknowledged, ack.acked_samples());
}

/// Kills while a replica catches up: b is SIGKILLed for a few seconds, and
/// while it replays its backlog in large coalesced requests the relay is
/// SIGKILLed again and again, so the request in flight to b (possibly
/// already stored by b) is re-sent on its own after each restart: a 400 for
/// it then means "already delivered", anything else must arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_a_replica_catches_up() {
    let rounds: u32 = scenario::scaled(4, 40);
    let mut rng = scenario::rng("kill-catch-up");
    let mut report = Report::new("sigkill_during_catch_up", "");
    let a = Prometheus::start_server().await.unwrap();
    let mut b = Prometheus::start_server().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let (a_url, b_url) = (a.write_url(), b.write_url());
    let mut relay = Relay::start(
        data.path(),
        &[("a", &a_url), ("b", &b_url)],
        &[
            "--segment-bytes",
            "64KiB",
            "--retry-max-backoff",
            "500ms",
            "--max-samples-per-send",
            "5000",
        ],
    )
    .await
    .unwrap();
    let load = scenario::retrying_load(&relay, 25).unwrap();
    load.wait_acked_requests(20, Duration::from_secs(20))
        .await
        .unwrap();

    let (mut kills, mut during_catch_up, mut max_backlog) = (0u32, 0u32, 0u64);
    for _ in 0..rounds {
        b.kill().unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(3000..5000))).await;
        let st = relay.status().await.unwrap();
        max_backlog = max_backlog.max(scenario::lag_records(&st, "b"));
        b.start_again().await.unwrap();
        // Kill the relay at random moments until b has caught up.
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..150))).await;
            let lag = relay
                .status()
                .await
                .map(|st| scenario::lag_records(&st, "b"))
                .unwrap_or(0);
            relay.sigkill().unwrap();
            kills += 1;
            if lag > 100 {
                during_catch_up += 1;
            }
            relay.restart().await.unwrap();
            if lag <= 100 {
                break;
            }
        }
    }
    let end = scenario::end_run(&relay, load, 20, &a, &b).await.unwrap();
    let (ack, log) = (&end.ack, &end.log);

    report.set_injected(format!(
        "replica b SIGKILLed {rounds} times for 3-5s (backlog up to {max_backlog} records); \
         {kills} SIGKILLs of walrelay while b caught up, {during_catch_up} with b more than \
         100 records behind; 5000 samples per request"
    ));
    report
        .run_end(&end)
        .note(format!("relay log over all runs: {}", log_events(log)))
        .note(format!("sender: {}", ack.summary()));
    report.emit();
    report.assert_lossless();
    assert_eq!(log.matches("panicked at").count(), 0, "walrelay panicked");
    assert!(
        during_catch_up >= rounds,
        "too few kills landed during a catch-up: {during_catch_up}"
    );
}
