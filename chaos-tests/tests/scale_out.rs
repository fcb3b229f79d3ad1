//! Three relays in front of the same replicas (issue #10), on one machine:
//! three real walrelay processes, two real Prometheus 2.42 servers `a` and
//! `b` (every relay ships to both), and three load generators with disjoint
//! workers.
//!
//! * **Pinned** (`pinned_senders_lose_nothing_through_a_relay_kill_and_a_replica_outage`):
//!   each sender's workers always write to one relay, as a sender pinned to
//!   a relay pod by its per-pod DNS name would. Mid-run one relay is
//!   SIGKILLed and restarted on the same port and volume (its senders retry
//!   it; they do not fail over), and replica `b` is SIGKILLed and restarted.
//!   Verdict: every acknowledged sample is in both replicas, and neither
//!   refused a single sample as out of order.
//! * **Round-robin** (`round_robin_senders_are_refused_by_prometheus_but_not_by_victoria_metrics`):
//!   the negative control. Every attempt of every sender goes to the next
//!   relay (a round-robin Service), so consecutive samples of one series are
//!   shipped by different relays, each in its own order. Prometheus refuses
//!   what arrives older than what it holds, and the relay, which had
//!   acknowledged it, can only count it as rejected: the test asserts that
//!   this happens, and prints how much. The same run ships to a real
//!   VictoriaMetrics single-node as a third replica, which accepts samples
//!   out of order: there nothing acknowledged is lost, although one relay is
//!   SIGKILLed mid-run and the senders fail over to the others.
//!
//! `CHAOS_SEED` fixes the fault moments, `CHAOS_SOAK=1` makes the runs
//! longer (more relay kills, longer outages). Build the relay first:
//! `cargo build --bins`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos_tests::relay::metric_sum;
use chaos_tests::scenario::{self, Report};
use chaos_tests::{
    verify, verify_api, AckLog, Load, LoadHandle, LoadSpec, Prometheus, Relay, RetryPolicy,
    Routing, VictoriaMetrics,
};
use rand::Rng;
use serde_json::Value;

const RELAYS: usize = 3;
const SENDERS: u32 = 3;
const WORKERS_PER_SENDER: u32 = 4;

/// Starts `RELAYS` relays named `relay-0..`, each shipping to `replicas`.
async fn start_relays(dirs: &[tempfile::TempDir], replicas: &[(&str, &str)]) -> Vec<Relay> {
    let mut relays = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let name = format!("relay-{i}");
        let relay = Relay::start(
            dir.path(),
            replicas,
            &[
                "--instance-name",
                &name,
                "--segment-bytes",
                "256KiB",
                "--retry-max-backoff",
                "1s",
                "--send-timeout",
                "5s",
            ],
        )
        .await
        .unwrap();
        // Each relay says which one it is, in its status and its metrics.
        assert_eq!(relay.status().await.unwrap()["instance"], name.as_str());
        let info = relay
            .metric_sum("walrelay_instance_info", &[("instance_name", &name)])
            .await
            .unwrap();
        assert_eq!(info, 1.0, "walrelay_instance_info of {name}");
        relays.push(relay);
    }
    relays
}

fn data_dirs() -> Vec<tempfile::TempDir> {
    (0..RELAYS)
        .map(|_| {
            tempfile::Builder::new()
                .prefix("chaos-scale-out-")
                .tempdir()
                .unwrap()
        })
        .collect()
}

/// The load of sender `i` of a run: workers `4i..4i+4`, 25 series each.
fn sender_spec(i: u32, run_id: &str, interval: Duration) -> LoadSpec {
    LoadSpec {
        workers: WORKERS_PER_SENDER,
        first_worker: i * WORKERS_PER_SENDER,
        series_per_worker: 25,
        interval,
        run_id: run_id.to_string(),
        retry: RetryPolicy::UntilAcked,
        request_timeout: Duration::from_secs(3),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        seed: scenario::seed() ^ u64::from(i),
        ..LoadSpec::default()
    }
}

/// Starts the senders. Pinned: sender i writes to relay i only. Round-robin:
/// every sender rotates over all relays (each starting at another one).
fn start_senders(relays: &[Relay], routing: Routing, interval: Duration) -> Vec<LoadHandle> {
    let run_id = LoadSpec::new_run_id();
    (0..SENDERS)
        .map(|i| {
            let urls: Vec<String> = match routing {
                Routing::Pinned => vec![relays[i as usize % RELAYS].write_url()],
                Routing::RoundRobin => (0..RELAYS)
                    .map(|k| relays[(i as usize + k) % RELAYS].write_url())
                    .collect(),
            };
            Load::start_routed(sender_spec(i, &run_id, interval), &urls, routing).unwrap()
        })
        .collect()
}

async fn stop_senders(senders: Vec<LoadHandle>) -> (AckLog, Vec<AckLog>) {
    let mut logs = Vec::new();
    for s in senders {
        logs.push(s.stop().await.unwrap());
    }
    let mut merged = logs[0].clone();
    for l in &logs[1..] {
        merged.merge(l.clone()).unwrap();
    }
    (merged, logs)
}

/// A relay's counters for one replica, from its status.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ReplicaCounters {
    rejected_records: u64,
    rejected_samples: u64,
    assumed_delivered_records: u64,
}

impl ReplicaCounters {
    fn of(status: &Value, replica: &str) -> Self {
        let s = scenario::replica_status(status, replica);
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        ReplicaCounters {
            rejected_records: n("rejected_records"),
            rejected_samples: n("rejected_samples"),
            assumed_delivered_records: n("assumed_delivered_records"),
        }
    }

    fn add(&mut self, o: ReplicaCounters) {
        self.rejected_records += o.rejected_records;
        self.rejected_samples += o.rejected_samples;
        self.assumed_delivered_records += o.assumed_delivered_records;
    }
}

/// Counters over every relay process of a run: the final statuses plus
/// those read just before each SIGKILL (a restart resets them).
#[derive(Default)]
struct Counters {
    by_replica: std::collections::BTreeMap<String, ReplicaCounters>,
}

impl Counters {
    fn add_status(&mut self, status: &Value, replicas: &[&str]) {
        for r in replicas {
            self.by_replica
                .entry(r.to_string())
                .or_default()
                .add(ReplicaCounters::of(status, r));
        }
    }

    fn get(&self, replica: &str) -> ReplicaCounters {
        self.by_replica.get(replica).copied().unwrap_or_default()
    }
}

/// Samples Prometheus refused for their timestamp (out of order, out of
/// bounds, too old), from its own `/metrics`. Prometheus stops at the first
/// such sample of a request and refuses the whole request with a 400, so
/// this counts refused requests more than refused samples.
async fn prometheus_refusals(p: &Prometheus) -> u64 {
    let text = reqwest::get(format!("{}/metrics", p.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    [
        "prometheus_tsdb_out_of_order_samples_total",
        "prometheus_tsdb_out_of_bound_samples_total",
        "prometheus_tsdb_too_old_samples_total",
    ]
    .iter()
    .map(|m| metric_sum(&text, m, &[]))
    .sum::<f64>() as u64
}

fn count_in_logs(relays: &[Relay], pattern: &str) -> usize {
    relays
        .iter()
        .map(|r| {
            std::fs::read_to_string(r.log_path())
                .unwrap_or_default()
                .matches(pattern)
                .count()
        })
        .sum()
}

async fn wait_all_caught_up(relays: &[Relay]) -> Vec<Value> {
    let mut out = Vec::new();
    for r in relays {
        out.push(
            scenario::wait_caught_up(r, Duration::from_secs(120))
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_senders_lose_nothing_through_a_relay_kill_and_a_replica_outage() {
    let rounds: u32 = scenario::scaled(1, 6);
    let mut rng = scenario::rng("scale-out-pinned");
    let mut report = Report::new("scale_out_pinned", "");
    let a = Prometheus::start_server().await.unwrap();
    let mut b = Prometheus::start_server().await.unwrap();
    let (a_url, b_url) = (a.write_url(), b.write_url());
    let dirs = data_dirs();
    let mut relays = start_relays(&dirs, &[("a", &a_url), ("b", &b_url)]).await;
    // As dense as the round-robin run, so the two differ only in routing.
    let senders = start_senders(&relays, Routing::Pinned, Duration::from_millis(5));
    for s in &senders {
        s.wait_acked_requests(20, Duration::from_secs(30))
            .await
            .unwrap();
    }

    let mut counters = Counters::default();
    let mut b_refusals_before_kills = 0;
    let (mut relay_down, mut b_down, mut restarts) = (Duration::ZERO, Duration::ZERO, Vec::new());
    for round in 0..rounds {
        // Replica b goes away; a moment later one relay is SIGKILLed while
        // b is still away, so the relay restarts with a backlog for b.
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2000))).await;
        b_refusals_before_kills += prometheus_refusals(&b).await;
        b.kill().unwrap();
        let b_since = Instant::now();
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        let victim = (round as usize + 1) % RELAYS;
        counters.add_status(&relays[victim].status().await.unwrap(), &["a", "b"]);
        relays[victim].sigkill().unwrap();
        let down_since = Instant::now();
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2500))).await;
        let t0 = Instant::now();
        relays[victim].restart().await.unwrap();
        restarts.push(t0.elapsed());
        relay_down += down_since.elapsed();
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        b.start_again().await.unwrap();
        b_down += b_since.elapsed();
    }
    // More load after the last fault, so every relay ships fresh data on
    // top of what it replayed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ack, logs) = stop_senders(senders).await;
    let statuses = wait_all_caught_up(&relays).await;
    for st in &statuses {
        counters.add_status(st, &["a", "b"]);
    }
    let va = verify(&a, &ack).await.unwrap();
    let vb = verify(&b, &ack).await.unwrap();
    let (ca, cb) = (counters.get("a"), counters.get("b"));
    let prom_a = prometheus_refusals(&a).await;
    let prom_b = prometheus_refusals(&b).await + b_refusals_before_kills;
    let rejected_in_logs = count_in_logs(&relays, "replica rejected the record");
    let resends_in_logs = count_in_logs(&relays, "re-sent request refused");
    // The senders of the killed relays kept retrying it: failed attempts,
    // and yet every request acknowledged in the end.
    let victims: Vec<usize> = (0..rounds as usize).map(|r| (r + 1) % RELAYS).collect();
    let failed_attempts: u64 = victims.iter().map(|&v| logs[v].counts().failed).sum();

    let restart_ms: Vec<u128> = restarts.iter().map(|d| d.as_millis()).collect();
    report.set_injected(format!(
        "3 relays, 3 senders pinned to one relay each ({} workers x 25 series every 5ms); \
         {rounds} relay SIGKILL(s), down {:.1}s in all, restarted in {restart_ms:?} ms, its \
         sender retrying it ({failed_attempts} failed attempts, no failover); replica b \
         SIGKILLed {rounds} time(s) for {:.1}s in all",
        SENDERS * WORKERS_PER_SENDER,
        relay_down.as_secs_f64(),
        b_down.as_secs_f64(),
    ));
    report
        .acknowledged(&ack)
        .replica("a", &va)
        .replica("b", &vb)
        .note(format!(
            "refused as out of order: relays' rejected samples a {} b {} ({rejected_in_logs} \
             rejections in the relay logs); Prometheus' out-of-order/out-of-bounds counters a \
             {prom_a} b {prom_b} (only re-sends of a request in flight at a kill, which the \
             replica already held, may count there: relays' assumed-delivered records a {} b \
             {}, {resends_in_logs} in the logs)",
            ca.rejected_samples,
            cb.rejected_samples,
            ca.assumed_delivered_records,
            cb.assumed_delivered_records,
        ))
        .note(format!(
            "senders: {}",
            logs.iter()
                .map(|l| l.summary().to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    report.emit();
    report.assert_lossless();

    assert_eq!(
        (ca.rejected_samples, cb.rejected_samples, rejected_in_logs),
        (0, 0, 0),
        "a replica refused acknowledged samples although every series went through one relay"
    );
    assert!(
        prom_a <= ca.assumed_delivered_records && prom_b <= cb.assumed_delivered_records,
        "Prometheus refused samples (a {prom_a}, b {prom_b}) beyond the re-sends of data it \
         already held (a {}, b {})",
        ca.assumed_delivered_records,
        cb.assumed_delivered_records
    );
    assert!(
        failed_attempts > 0,
        "the killed relay's sender never noticed the kill"
    );
    for l in &logs {
        let c = l.counts();
        assert!(
            c.requests - c.acked_requests <= u64::from(WORKERS_PER_SENDER),
            "a pinned sender gave up requests: {c:?}"
        );
    }
    for r in &relays {
        let log = std::fs::read_to_string(r.log_path()).unwrap_or_default();
        assert_eq!(log.matches("panicked at").count(), 0, "walrelay panicked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_senders_are_refused_by_prometheus_but_not_by_victoria_metrics() {
    let kills: u32 = scenario::scaled(1, 6);
    let mut rng = scenario::rng("scale-out-round-robin");
    let mut report = Report::new("scale_out_round_robin", "");
    let a = Prometheus::start_server().await.unwrap();
    let b = Prometheus::start_server().await.unwrap();
    let vm = VictoriaMetrics::start().await.unwrap();
    let (a_url, b_url, vm_url) = (a.write_url(), b.write_url(), vm.write_url());
    let dirs = data_dirs();
    let mut relays = start_relays(&dirs, &[("a", &a_url), ("b", &b_url), ("vm", &vm_url)]).await;
    // Dense on purpose: a request every 5 ms per worker, so a series'
    // consecutive samples reach different relays within milliseconds of
    // each other, closer than the relays' shipping delays.
    let senders = start_senders(&relays, Routing::RoundRobin, Duration::from_millis(5));
    for s in &senders {
        s.wait_acked_requests(20, Duration::from_secs(30))
            .await
            .unwrap();
    }

    let mut counters = Counters::default();
    let mut relay_down = Duration::ZERO;
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..3000))).await;
        let victim = (k as usize + 2) % RELAYS;
        counters.add_status(&relays[victim].status().await.unwrap(), &["a", "b", "vm"]);
        relays[victim].sigkill().unwrap();
        let since = Instant::now();
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2500))).await;
        relays[victim].restart().await.unwrap();
        relay_down += since.elapsed();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ack, logs) = stop_senders(senders).await;
    let statuses = wait_all_caught_up(&relays).await;
    for st in &statuses {
        counters.add_status(st, &["a", "b", "vm"]);
    }
    vm.force_flush().await.unwrap();
    let va = verify(&a, &ack).await.unwrap();
    let vb = verify(&b, &ack).await.unwrap();
    let vv = verify_api(&vm.api().unwrap(), &ack).await.unwrap();
    let (ca, cb, cv) = (counters.get("a"), counters.get("b"), counters.get("vm"));
    let (prom_a, prom_b) = (prometheus_refusals(&a).await, prometheus_refusals(&b).await);
    let failed: u64 = logs.iter().map(|l| l.counts().failed).sum();
    let share = |n: u64| 100.0 * n as f64 / ack.acked_samples().max(1) as f64;

    report.set_injected(format!(
        "negative control: 3 relays, 3 senders round-robin over all of them ({} workers x 25 \
         series every 5ms, every attempt to the next relay); {kills} relay SIGKILL(s), down \
         {:.1}s in all, the senders failing over ({failed} failed attempts); replicas a, b: \
         Prometheus 2.42, vm: VictoriaMetrics single-node",
        SENDERS * WORKERS_PER_SENDER,
        relay_down.as_secs_f64(),
    ));
    report
        .acknowledged(&ack)
        .replica("a", &va)
        .replica("b", &vb)
        .replica("vm", &vv)
        .note(format!(
            "refused as out of order by Prometheus, after the relays acknowledged them: a {} \
             samples in {} records ({:.1}% of acknowledged), b {} samples in {} records \
             ({:.1}%); Prometheus' own counters (one per refused request) a {prom_a} b \
             {prom_b}; VictoriaMetrics refused {} samples",
            ca.rejected_samples,
            ca.rejected_records,
            share(ca.rejected_samples),
            cb.rejected_samples,
            cb.rejected_records,
            share(cb.rejected_samples),
            cv.rejected_samples,
        ))
        .note(format!(
            "lost by the oracle: a {} ({:.1}%), b {} ({:.1}%), vm {}",
            va.lost,
            share(va.lost),
            vb.lost,
            share(vb.lost),
            vv.lost
        ))
        .note(format!(
            "senders: {}",
            logs.iter()
                .map(|l| l.summary().to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    report.emit();

    // What pinning avoids: acknowledged data refused by Prometheus, and lost.
    assert!(
        ca.rejected_samples > 0 && cb.rejected_samples > 0,
        "round-robin senders did not reproduce the refusals (a {ca:?}, b {cb:?}): make the \
         load denser"
    );
    assert!(
        va.lost > 0 && vb.lost > 0,
        "the refusals lost nothing? a: {va}, b: {vb}"
    );
    // A store that accepts out-of-order samples makes failing over safe.
    assert_eq!(cv.rejected_samples, 0, "VictoriaMetrics refused samples");
    if !vv.is_lossless() {
        panic!(
            "VictoriaMetrics lost acknowledged samples:\n{}\nvictoria-metrics log:\n{}",
            vv.details(),
            chaos_tests::process::log_tail(&vm.log_path(), 20)
        );
    }
    assert!(failed > 0, "the senders never met the killed relay");
    for r in &relays {
        let log = std::fs::read_to_string(r.log_path()).unwrap_or_default();
        assert_eq!(log.matches("panicked at").count(), 0, "walrelay panicked");
    }
}
