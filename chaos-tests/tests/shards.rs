//! Sharded delivery (issue 18) end to end, against real Prometheus 2.42
//! replicas that refuse a whole request with 400 when one of its samples is
//! older than what they hold for its series.
//!
//! * A replica with a fixed count whose N changes between runs (4, 7, 3, 1,
//!   5, 2, 6, 3) and an adaptive one, the relay SIGKILLed again and again under a
//!   retrying load: while serving, before or right after readiness (the
//!   shards' in-flight re-sends), and inside the barrier of a change of N
//!   (begun in the log, not yet stored). The checkpoint store is read after
//!   every kill: no position moves backwards, a new N's shards start at or
//!   past every old shard's position. Every acknowledged sample reaches
//!   both replicas and nothing is refused as out of order.
//! * A replica with 4 shards away for a while, then back: its backlog is
//!   filled in order, nothing refused (the relay's counters and the
//!   replicas' own out-of-order counters).
//! * The negative control the issue asks for: the same records through N
//!   concurrent in-order streams, assigned by record (round-robin) they are
//!   refused as out of order; cut by series hash, exactly as the relay cuts
//!   them (`walrelay::ship::cut`), none is.
//! * A far replica (100 ms each way through the fault proxy) that one shard
//!   cannot keep up with: its adaptive count grows, and it catches up after
//!   outages while the relay is SIGKILLed; nothing is lost or refused.
//! * A sharded replica is one replica in the checkpoint store.
//!
//! The tests run one at a time. `CHAOS_SEED` fixes the random choices.
//! Build the relay first: `cargo build --bins`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chaos_tests::encode::{encode_labels, post_remote_write_with, put_timeseries, snappy_compress};
use chaos_tests::proxy::{FaultProxy, ProxyMode};
use chaos_tests::relay::metric_sum;
use chaos_tests::scenario::{self, lag_records, replica_status, wait_status, Report};
use chaos_tests::{now_ms, LoadHandle, LoadSpec, Prometheus, Relay};
use rand::Rng;
use serde_json::Value;
use wal_format::{PayloadEncoding, PayloadKind, Record, RecordMeta};
use walrelay::checkpoint::{Checkpoints, Cursor, Stream};

/// One scenario at a time: each starts two or three Prometheus servers and
/// a relay on a machine of two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the relay logs when a replica refuses a record's data and it is
/// skipped: an out-of-order refusal of a live request would show here.
const REJECTED: &str = "replica refused the record's data; skipping it";

/// Counts of the relay's log events about shards over all its runs.
fn log_events(log: &str) -> String {
    [
        ("reshards begun", "changing the number of shards"),
        ("reshards written", "shards changed"),
        (
            "in-flight re-sends",
            "re-sending the request that was in flight",
        ),
        (
            "re-sends refused as already delivered",
            "re-sent request refused",
        ),
        (
            "refusals after an ambiguous attempt",
            "record refused after an attempt that may have stored it",
        ),
        ("records rejected", REJECTED),
    ]
    .iter()
    .map(|(name, pat)| format!("{name} {}", log.matches(pat).count()))
    .collect::<Vec<_>>()
    .join(", ")
}

/// Lines of the relay's log with `pat` about replica `name`.
fn log_count(log: &str, pat: &str, name: &str) -> usize {
    let field = format!("replica={name}");
    log.lines()
        .filter(|l| l.contains(pat) && l.split_whitespace().any(|w| w == field))
        .count()
}

/// Reshards of replica `name` that a kill interrupted: begun ("changing
/// the number of shards") in a run of the relay (each run's log starts with
/// "log recovered") and not written ("shards changed") before it ended.
fn interrupted_reshards(log: &str, name: &str) -> usize {
    log.split("log recovered")
        .map(|run| {
            log_count(run, "changing the number of shards", name).saturating_sub(log_count(
                run,
                "shards changed",
                name,
            ))
        })
        .sum()
}

fn counter(status: &Value, name: &str, key: &str) -> u64 {
    replica_status(status, name)[key].as_u64().unwrap_or(0)
}

fn shards(status: &Value, name: &str) -> u64 {
    counter(status, name, "shards")
}

/// `prometheus_tsdb_out_of_order_samples_total` of a Prometheus since it
/// started: samples it refused as older than what it held.
async fn out_of_order_samples(p: &Prometheus) -> f64 {
    let text = p.metrics_text().await.unwrap();
    metric_sum(&text, "prometheus_tsdb_out_of_order_samples_total", &[])
}

/// The relay's arguments of these scenarios: small segments, quick
/// retries, then `extra`.
fn relay_args(extra: &[&str]) -> Vec<String> {
    [
        "--segment-bytes",
        "64KiB",
        "--retry-max-backoff",
        "500ms",
        "--send-timeout",
        "5s",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// [`relay_args`] with replica a's shards fixed at `a` and the others
/// adaptive between 2 and 6, re-evaluated every second.
fn kill_args(a: u32) -> Vec<String> {
    let a = format!("a={a}");
    relay_args(&[
        "--max-samples-per-send",
        "500",
        "--min-shards",
        "2",
        "--max-shards",
        "6",
        "--shard-update-interval",
        "1s",
        "--replica-shards",
        &a,
    ])
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A relay on `data` for replicas a and b (write URLs) with `args`, and a
/// retrying sender of 4 × `series` series that it has acknowledged 20
/// requests of.
async fn start(
    data: &std::path::Path,
    a: &str,
    b: &str,
    args: &[String],
    series: u32,
) -> (Relay, LoadHandle) {
    let relay = Relay::start(data, &[("a", a), ("b", b)], &strs(args))
        .await
        .unwrap();
    let load = scenario::retrying_load(&relay, series).unwrap();
    load.wait_acked_requests(20, Duration::from_secs(20))
        .await
        .unwrap();
    (relay, load)
}

/// When a kill landed.
#[derive(Default, Debug)]
struct Kills {
    /// Before `/-/ready` answered: checkpoint load, in-flight re-sends.
    before_ready: u32,
    /// Within 80 ms of readiness: the shards' in-flight re-sends, each a
    /// round trip or more (a is 40 ms away).
    just_after_ready: u32,
    /// While serving for a while.
    serving: u32,
    /// After a barrier of replica a began (its log said so) and before its
    /// new count was stored (the store said so after the kill).
    in_barrier: u32,
}

impl Kills {
    fn total(&self) -> u32 {
        self.before_ready + self.just_after_ready + self.serving + self.in_barrier
    }
}

/// A replica's stored positions: each shard's, or the replica's own.
fn positions(c: &Cursor) -> Vec<u64> {
    if c.shards.is_empty() {
        c.delivered.into_iter().collect()
    } else {
        c.shards.iter().map(|s| s.delivered).collect()
    }
}

/// The checkpoint store of a stopped relay, read after every kill and
/// checked against the last reading: no position moves backwards, and
/// after a change of N every new shard starts at or past every old shard's
/// position (the barrier).
struct Store {
    path: std::path::PathBuf,
    last: Vec<(&'static str, Cursor)>,
    reads: u32,
}

impl Store {
    fn new(data_dir: &std::path::Path) -> Store {
        Store {
            path: data_dir.join("checkpoints"),
            last: Vec::new(),
            reads: 0,
        }
    }

    /// Reads and checks replicas a and b; returns a's cursor.
    fn read(&mut self) -> Cursor {
        let cp = Checkpoints::open(&self.path).unwrap();
        let now: Vec<(&'static str, Cursor)> = ["a", "b"]
            .into_iter()
            .map(|name| (name, cp.cursor(name).unwrap()))
            .collect();
        drop(cp);
        for ((name, c), (_, p)) in now.iter().zip(&self.last) {
            let (now_at, prev_at) = (positions(c), positions(p));
            let lowest = |v: &[u64]| v.iter().copied().min().unwrap_or(0);
            assert!(
                lowest(&now_at) >= lowest(&prev_at),
                "replica {name}'s position moved backwards: {p:?} then {c:?}"
            );
            if c.shard_count() == p.shard_count() {
                assert!(
                    now_at.iter().zip(&prev_at).all(|(n, p)| n >= p),
                    "a shard of replica {name} moved backwards: {p:?} then {c:?}"
                );
            } else {
                let highest = prev_at.iter().copied().max().unwrap_or(0);
                assert!(
                    lowest(&now_at) >= highest,
                    "replica {name}'s new shards start below an old shard's position: \
                     {p:?} then {c:?}"
                );
            }
        }
        self.last = now;
        self.reads += 1;
        self.last[0].1.clone()
    }
}

/// SIGKILLs the relay and reads its store; returns a's stored cursor.
fn kill(relay: &mut Relay, store: &mut Store) -> Cursor {
    relay.sigkill().unwrap();
    store.read()
}

/// What the relay's log holds past byte `from`.
fn log_since(path: &std::path::Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let mut bytes = Vec::new();
        if f.seek(SeekFrom::Start(from)).is_ok() && f.read_to_end(&mut bytes).is_ok() {
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

/// Starts the (stopped) relay and SIGKILLs it as soon as its log shows a
/// barrier of replica a begun (or after 20 s without one). Returns whether
/// it had begun, and a's stored cursor after the kill.
async fn kill_in_barrier(relay: &mut Relay, store: &mut Store) -> (bool, Cursor) {
    let path = relay.log_path();
    let from = std::fs::metadata(&path).map_or(0, |m| m.len());
    let begun = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let log = log_since(&path, from);
            if log_count(&log, "changing the number of shards", "a") > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    };
    tokio::pin!(begun);
    let begun = tokio::select! {
        begun = &mut begun => begun,
        started = relay.restart() => {
            started.unwrap();
            begun.await
        }
    };
    (begun, kill(relay, store))
}

/// Kills the relay and starts it again, then kills it once more either
/// before it is ready (after a random part of the last `startup`) or
/// within 80 ms of readiness, and starts it again; returns the time the
/// last start took.
async fn kill_during_startup(
    relay: &mut Relay,
    store: &mut Store,
    rng: &mut impl Rng,
    startup: Duration,
    kills: &mut Kills,
) -> Duration {
    kill(relay, store);
    kills.serving += 1;
    if rng.random_bool(0.4) {
        let d = Duration::from_micros(rng.random_range(0..startup.as_micros() as u64 + 1));
        match tokio::time::timeout(d, relay.restart()).await {
            Err(_elapsed) => kills.before_ready += 1,
            Ok(r) => {
                r.unwrap();
                kills.just_after_ready += 1;
            }
        }
    } else {
        relay.restart().await.unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..80u64))).await;
        kills.just_after_ready += 1;
    }
    kill(relay, store);
    let t0 = Instant::now();
    relay.restart().await.unwrap();
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_replica_gets_every_acknowledged_sample_through_kills_and_reshards() {
    let _serial = SERIAL.lock().await;
    let mut rng = scenario::rng("shards-kill");
    let mut report = Report::new("sharded_kills_and_reshards", "");
    // Seven changes of N: whether a kill lands inside a barrier depends on
    // what the shards still hold when it begins (a barrier with nothing to
    // deliver is stored at once), and one CI run on a loaded machine saw
    // none land in four.
    let counts: [u32; 8] = [4, 7, 3, 1, 5, 2, 6, 3];
    let kills_per_count = scenario::scaled(4, 40);

    let a = Prometheus::start_server().await.unwrap();
    let b = Prometheus::start_server().await.unwrap();
    // a 20 ms away each way: a shard's re-send of its request in flight and
    // a barrier's drain take a round trip or more, so kills land in them.
    let proxy = FaultProxy::start_seeded(a.addr(), scenario::seed())
        .await
        .unwrap();
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(20)));
    let data = tempfile::tempdir().unwrap();
    let mut store = Store::new(data.path());
    // 120 series: every one of up to 7 shards gets some.
    let (a_url, b_url) = (proxy.write_url(), b.write_url());
    let (mut relay, load) = start(data.path(), &a_url, &b_url, &kill_args(counts[0]), 30).await;

    let mut kills = Kills::default();
    let mut startup = Duration::from_millis(50);
    let mut max_b = 0;
    let mut acked_before_kill = Vec::new();
    // a's stored shard positions at each kill inside a barrier.
    let mut in_barrier_at = Vec::new();
    for (phase, &n) in counts.iter().enumerate() {
        if phase > 0 {
            // The next starts have the new N: each reshards a once its
            // shards have re-sent their requests in flight, and is killed
            // as soon as that barrier has begun, until one stores it.
            relay.set_extra_args(&strs(&kill_args(n)));
            let mut stored = kill(&mut relay, &mut store);
            kills.serving += 1;
            for _ in 0..3 {
                let old = stored.shard_count();
                let (begun, after) = kill_in_barrier(&mut relay, &mut store).await;
                assert!(
                    [old, n].contains(&after.shard_count()),
                    "a's stored count went from {old} to {} on the way to {n}",
                    after.shard_count()
                );
                stored = after;
                if begun && stored.shard_count() == old {
                    kills.in_barrier += 1;
                    in_barrier_at.push(positions(&stored));
                } else {
                    kills.just_after_ready += 1;
                    break;
                }
            }
            relay.restart().await.unwrap();
        }
        // N is reached, through the kills.
        let st = wait_status(
            &relay,
            Duration::from_secs(60),
            &format!("replica a delivered by {n} shards"),
            |st| shards(st, "a") == u64::from(n),
        )
        .await;
        max_b = max_b.max(shards(&st, "b"));
        for _ in 0..kills_per_count {
            if rng.random_bool(0.5) {
                startup =
                    kill_during_startup(&mut relay, &mut store, &mut rng, startup, &mut kills)
                        .await;
            } else {
                let d = rng.random_range(200..1500u64);
                tokio::time::sleep(Duration::from_millis(d)).await;
                if let Ok(st) = relay.status().await {
                    max_b = max_b.max(shards(&st, "b"));
                }
                let stored = kill(&mut relay, &mut store);
                assert_eq!(stored.shard_count(), n, "a's stored count while serving");
                kills.serving += 1;
                let t0 = Instant::now();
                relay.restart().await.unwrap();
                startup = t0.elapsed();
            }
            acked_before_kill.push(load.progress().acked_requests);
        }
    }

    let end = scenario::end_run(&relay, load, 20, &a, &b).await.unwrap();
    let (ack, status, log) = (&end.ack, &end.status, end.log.as_str());
    let progressed = acked_before_kill.windows(2).filter(|w| w[1] > w[0]).count();
    max_b = max_b.max(shards(status, "b"));
    let spread: Vec<u64> = in_barrier_at
        .iter()
        .map(|p| p.iter().max().unwrap_or(&0) - p.iter().min().unwrap_or(&0))
        .collect();

    report.set_injected(format!(
        "{} SIGKILLs of walrelay ({} before ready, {} within 80ms of ready, {} while serving, \
         {} inside a barrier of a: begun in the log, not stored); replica a (20ms away each \
         way) with its fixed shard count changed between runs {counts:?}, b adaptive 2..6 (at \
         most {max_b} seen); 500 samples per request",
        kills.total(),
        kills.before_ready,
        kills.just_after_ready,
        kills.serving,
        kills.in_barrier,
    ));
    report
        .run_end(&end)
        .note(format!(
            "relay log over all runs: {}; \"shards changed\" for a {}, for b {}; begun and cut by a \
             kill for a {}, for b {}",
            log_events(log),
            log_count(log, "shards changed", "a"),
            log_count(log, "shards changed", "b"),
            interrupted_reshards(log, "a"),
            interrupted_reshards(log, "b"),
        ))
        .note(format!(
            "checkpoint store read after each of {} kills: no position backwards, new shards at \
             or past every old one; a's shard positions {spread:?} records apart at the kills \
             inside its barriers",
            store.reads
        ))
        .note(format!(
            "sender: {}; relay started {} times",
            ack.summary(),
            log.matches("walrelay serving").count()
        ));
    report.emit();
    report.assert_lossless();

    assert_eq!(log.matches("panicked at").count(), 0, "walrelay panicked");
    assert_eq!(
        log.matches(REJECTED).count(),
        0,
        "a replica refused a record of a sharded stream (out of order?):\n{}",
        relay.log_tail(60)
    );
    for name in ["a", "b"] {
        assert_eq!(counter(status, name, "rejected_records"), 0, "{name}");
    }
    let ra = replica_status(status, "a");
    let last = counts[counts.len() - 1];
    assert_eq!(ra["shards"], last, "a's final count: {ra:#}");
    assert_eq!(
        ra["shard_cursors"].as_array().map(Vec::len),
        Some(last as usize),
        "a's shard cursors: {ra:#}"
    );
    assert!(
        (2..=6).contains(&shards(status, "b")),
        "b adapts within 2..6: {status:#}"
    );
    assert!(
        kills.in_barrier >= 1,
        "no kill landed inside a barrier: {kills:?}"
    );
    assert!(
        kills.before_ready >= 1 && kills.just_after_ready >= 1,
        "too few kills at startup: {kills:?}"
    );
    assert!(
        progressed * 2 >= acked_before_kill.len(),
        "the sender was acknowledged between only {progressed} of {} kills",
        acked_before_kill.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_replica_fills_an_outage_in_order() {
    let _serial = SERIAL.lock().await;
    let outage = Duration::from_secs(scenario::scaled(8, 60));
    let mut report = Report::new("sharded_outage", "");
    let a = Prometheus::start_server().await.unwrap();
    let mut b = Prometheus::start_server().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let args = relay_args(&["--max-samples-per-send", "1000", "--replica-shards", "b=4"]);
    let (mut relay, load) = start(data.path(), &a.write_url(), &b.write_url(), &args, 25).await;
    wait_status(&relay, Duration::from_secs(20), "b with 4 shards", |st| {
        shards(st, "b") == 4
    })
    .await;

    b.kill().unwrap();
    let down = Instant::now();
    let mut max_lag = 0;
    while down.elapsed() < outage {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let st = relay.status().await.unwrap();
        max_lag = max_lag.max(lag_records(&st, "b"));
    }
    let st = relay.status().await.unwrap();
    let rb = replica_status(&st, "b");
    assert_eq!(
        rb["shard_cursors"].as_array().map(Vec::len),
        Some(4),
        "b's shards during the outage: {rb:#}"
    );
    b.start_again().await.unwrap();
    let back = Instant::now();
    // While b catches up: how many of its shards have a request in flight
    // at once.
    let mut max_in_flight = 0;
    wait_status(&relay, Duration::from_secs(90), "b caught up", |st| {
        let rb = replica_status(st, "b");
        let busy = rb["shard_cursors"].as_array().map_or(0, |c| {
            c.iter().filter(|s| !s["in_flight"].is_null()).count()
        });
        max_in_flight = max_in_flight.max(busy);
        lag_records(st, "b") < 50
    })
    .await;
    let catch_up = back.elapsed();
    let end = scenario::end_run(&relay, load, 0, &a, &b).await.unwrap();
    let (ack, status, log) = (&end.ack, &end.status, end.log.as_str());
    let (ooo_a, ooo_b) = (
        out_of_order_samples(&a).await,
        out_of_order_samples(&b).await,
    );
    let assumed_b = counter(status, "b", "assumed_delivered_records");

    report.set_injected(format!(
        "replica b (4 shards, 1000 samples per request) SIGKILLed for {:.1}s under load \
         (backlog up to {max_lag} records), then back with its data",
        outage.as_secs_f64()
    ));
    report
        .run_end(&end)
        .note(format!(
            "b caught up in {:.1}s with up to {max_in_flight} of its shards' requests in flight \
             at once (as sampled); samples refused as out of order by a {ooo_a}, by b since its \
             restart {ooo_b}; b's records assumed delivered {assumed_b}",
            catch_up.as_secs_f64()
        ))
        .note(format!("relay log: {}", log_events(log)))
        .note(format!("sender: {}", ack.summary()));
    report.emit();
    report.assert_lossless();
    relay.stop(Duration::from_secs(30)).await.unwrap();

    for name in ["a", "b"] {
        assert_eq!(counter(status, name, "rejected_records"), 0, "{name}");
    }
    assert_eq!(log.matches(REJECTED).count(), 0, "{}", relay.log_tail(60));
    assert_eq!(shards(status, "b"), 4);
    assert_eq!(ooo_a, 0.0, "a refused samples as out of order");
    if assumed_b == 0 {
        // Nothing of b's was sent twice (no ambiguous attempt at its kill):
        // no sample may reach it out of order.
        assert_eq!(ooo_b, 0.0, "b refused samples as out of order");
    }
    assert!(max_lag > 100, "b's backlog was only {max_lag} records");
}

// ---------------------------------------------------------------------
// The negative control.

/// A stored remote-write 1.0 record holding one sample of each of `series`
/// at `ts`.
fn record(seq: u64, series: &[Vec<u8>], ts: i64) -> Record {
    let mut body = Vec::new();
    for (i, labels) in series.iter().enumerate() {
        put_timeseries(&mut body, labels, &[(seq as f64 * 1000.0 + i as f64, ts)]);
    }
    Record {
        seq,
        meta: RecordMeta {
            receive_time_ms: now_ms(),
            min_sample_ts: ts,
            max_sample_ts: ts,
            samples: series.len() as u32,
            kind: PayloadKind::RemoteWriteV1,
            encoding: PayloadEncoding::Identity,
        },
        payload: Bytes::from(body),
    }
}

/// What N concurrent streams got for their requests.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    out_of_order: u64,
    /// Any other answer: (status, body).
    other: Vec<(u16, String)>,
    first_refusal: Option<String>,
}

/// Sends `streams[j]` (snappy request bodies) from task j, in order, one
/// request in flight per task, all tasks at once. Task j starts once task
/// j+1 got its first answer (the last task starts at once): from then on
/// they race freely. The staggered start is one interleaving concurrent
/// streams may take; it makes the control refuse for certain, and it is
/// harmless to streams that share no series.
async fn race(url: &str, streams: Vec<Vec<Vec<u8>>>) -> Tally {
    let n = streams.len();
    // go[j]: task j may start; the last task's is set from the start.
    let (go_tx, go_rx): (Vec<_>, Vec<_>) = (0..n)
        .map(|j| tokio::sync::watch::channel(j + 1 == n))
        .unzip();
    let go_tx: Vec<_> = go_tx.into_iter().map(Arc::new).collect();
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let client = chaos_tests::client(Duration::from_secs(30)).unwrap();
    let mut tasks = Vec::new();
    for (j, (bodies, mut go)) in streams.into_iter().zip(go_rx).enumerate() {
        let release = j.checked_sub(1).map(|i| Arc::clone(&go_tx[i]));
        let (url, client, tally) = (url.to_string(), client.clone(), Arc::clone(&tally));
        tasks.push(tokio::spawn(async move {
            go.wait_for(|s| *s).await.unwrap();
            for body in bodies {
                let (status, text) = post_remote_write_with(&client, &url, body).await.unwrap();
                {
                    let mut t = tally.lock().unwrap();
                    match status {
                        200..=299 => t.ok += 1,
                        400 if text.contains("out of order") => {
                            t.out_of_order += 1;
                            t.first_refusal.get_or_insert(text);
                        }
                        _ => t.other.push((status, text)),
                    }
                }
                if let Some(tx) = &release {
                    tx.send_replace(true);
                }
            }
            // A task with nothing to send releases the next one too.
            if let Some(tx) = &release {
                tx.send_replace(true);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(go_tx);
    Arc::try_unwrap(tally).unwrap().into_inner().unwrap()
}

/// Samples of `run` that Prometheus `p` holds.
async fn stored_samples(p: &Prometheus, run: &str) -> u64 {
    p.api()
        .query_value(&format!(
            "sum(count_over_time(walrelay_shard_control{{run=\"{run}\"}}[30m]))"
        ))
        .await
        .unwrap()
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_that_do_not_hash_by_series_are_refused_out_of_order() {
    let _serial = SERIAL.lock().await;
    const N: u32 = 4;
    const SERIES: usize = 120;
    const RECORDS: u64 = 60;
    let run = LoadSpec::new_run_id();
    let series: Vec<Vec<u8>> = (0..SERIES)
        .map(|i| {
            let i = i.to_string();
            encode_labels(&[
                ("__name__", "walrelay_shard_control"),
                ("run", &run),
                ("series", &i),
            ])
        })
        .collect();
    // Record k holds every series at t0 + k s: each is newer than the last
    // for every series, as a sender's consecutive requests are.
    let t0 = now_ms() - 10 * 60_000;
    let records: Vec<Record> = (0..RECORDS)
        .map(|k| record(k, &series, t0 + k as i64 * 1000))
        .collect();
    let compress = |r: &Record| snappy_compress(&r.payload).unwrap();

    // By record, round-robin: stream j sends records j, j+N, j+2N, ...
    let by_record: Vec<Vec<Vec<u8>>> = (0..N as u64)
        .map(|j| {
            records
                .iter()
                .filter(|r| r.seq % u64::from(N) == j)
                .map(compress)
                .collect()
        })
        .collect();
    // By series hash, as the relay cuts them: stream j sends part j of
    // every record (empty parts are not sent, as a shard skips them).
    let mut by_series: Vec<Vec<Vec<u8>>> = vec![Vec::new(); N as usize];
    for r in &records {
        for (j, part) in walrelay::ship::cut::cut(r, N).iter().enumerate() {
            if !walrelay::ship::cut::is_empty(part) {
                by_series[j].push(compress(part));
            }
        }
    }
    let parts: Vec<usize> = by_series.iter().map(Vec::len).collect();
    assert!(
        parts.iter().all(|&p| p as u64 == RECORDS),
        "every shard has series in every record: {parts:?}"
    );

    let control = Prometheus::start_server().await.unwrap();
    let sharded = Prometheus::start_server().await.unwrap();
    let t_control = race(&control.write_url(), by_record).await;
    let t_sharded = race(&sharded.write_url(), by_series).await;
    let want = SERIES as u64 * RECORDS;
    let (held_control, held_sharded) = (
        stored_samples(&control, &run).await,
        stored_samples(&sharded, &run).await,
    );
    let (ooo_control, ooo_sharded) = (
        out_of_order_samples(&control).await,
        out_of_order_samples(&sharded).await,
    );
    println!(
        "NEGATIVE CONTROL: {RECORDS} records of {SERIES} series through {N} concurrent in-order \
         streams | by record (round-robin): {} stored, {} refused 400 out of order (Prometheus' \
         out-of-order counter {ooo_control}), other {:?}, {held_control}/{want} samples held; first refusal: \
         {:?} | by series hash (walrelay::ship::cut): {} stored, {} refused (counter \
         {ooo_sharded}), other {:?}, {held_sharded}/{want} samples held",
        t_control.ok,
        t_control.out_of_order,
        t_control.other,
        t_control.first_refusal.as_deref().map(str::trim),
        t_sharded.ok,
        t_sharded.out_of_order,
        t_sharded.other,
    );
    assert!(t_control.other.is_empty(), "{:?}", t_control.other);
    assert!(t_sharded.other.is_empty(), "{:?}", t_sharded.other);
    assert!(
        t_control.out_of_order > 0,
        "streams split by record were never refused: {t_control:?}"
    );
    assert!(
        held_control < want,
        "the refused requests' samples are lost"
    );
    assert_eq!(t_sharded.out_of_order, 0, "{t_sharded:?}");
    assert_eq!(t_sharded.ok, u64::from(N) * RECORDS);
    assert_eq!(
        held_sharded, want,
        "every sample of the sharded streams is held"
    );
    assert_eq!(ooo_sharded, 0.0);
}

// ---------------------------------------------------------------------
// A far replica.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_replica_catches_up_with_adaptive_shards_through_kills() {
    let _serial = SERIAL.lock().await;
    let rounds: u32 = scenario::scaled(2, 10);
    let mut rng = scenario::rng("shards-far");
    let mut report = Report::new("sharded_far_replica_kills", "");
    let a = Prometheus::start_server().await.unwrap();
    let mut b = Prometheus::start_server().await.unwrap();
    let proxy = FaultProxy::start_seeded(b.addr(), scenario::seed())
        .await
        .unwrap();
    // 100 ms before each chunk forwarded, each way: a round trip of 200 ms.
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(100)));
    let data = tempfile::tempdir().unwrap();
    let args = relay_args(&[
        // 500 samples per 200 ms round trip: 2,500 samples/s per shard,
        // half the load's 5,000: one shard cannot keep up.
        "--max-samples-per-send",
        "500",
        "--replica-shards",
        "a=2",
        "--max-shards",
        "8",
        "--shard-update-interval",
        "1s",
    ]);
    let b_url = proxy.write_url();
    let (mut relay, load) = start(data.path(), &a.write_url(), &b_url, &args, 25).await;

    let mut max_b = 0;
    let (mut kills, mut during_catch_up, mut max_backlog) = (0u32, 0u32, 0u64);
    let mut shards_at_kills = Vec::new();
    let seen = |st: &Value, max_b: &mut u64| *max_b = (*max_b).max(shards(st, "b"));
    // One shard carries 2,500 samples/s to b, half the load: b's count must
    // grow before anything else.
    let st = wait_status(
        &relay,
        Duration::from_secs(30),
        "b delivered by more than one shard (one cannot keep up with the load)",
        |st| shards(st, "b") > 1,
    )
    .await;
    seen(&st, &mut max_b);
    for _ in 0..rounds {
        b.kill().unwrap();
        let down = Instant::now();
        let outage = Duration::from_millis(rng.random_range(3000..5000));
        while down.elapsed() < outage {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let st = relay.status().await.unwrap();
            seen(&st, &mut max_b);
            max_backlog = max_backlog.max(lag_records(&st, "b"));
        }
        b.start_again().await.unwrap();
        // Kill the relay at random moments while b catches up.
        for _ in 0..4 {
            let d = rng.random_range(300..1500u64);
            tokio::time::sleep(Duration::from_millis(d)).await;
            let Ok(st) = relay.status().await else {
                continue;
            };
            seen(&st, &mut max_b);
            let lag = lag_records(&st, "b");
            if lag < 100 {
                break;
            }
            relay.sigkill().unwrap();
            kills += 1;
            during_catch_up += 1;
            shards_at_kills.push(shards(&st, "b"));
            relay.restart().await.unwrap();
        }
        wait_status(&relay, Duration::from_secs(120), "b caught up", |st| {
            seen(st, &mut max_b);
            lag_records(st, "b") < 100
        })
        .await;
    }
    let end = scenario::end_run(&relay, load, 0, &a, &b).await.unwrap();
    let (ack, status, log) = (&end.ack, &end.status, end.log.as_str());
    seen(status, &mut max_b);
    let stats = proxy.stats();

    report.set_injected(format!(
        "replica b behind a proxy adding 100ms each way, adaptive shards 1..8, 500 samples per \
         request; b SIGKILLed {rounds} times for 3-5s (backlog up to {max_backlog} records); \
         {kills} SIGKILLs of walrelay during b's catch-up ({during_catch_up} with b 100+ records \
         behind, b's shards at those kills {shards_at_kills:?}); b used up to {max_b} shards"
    ));
    let shard_resends = log
        .lines()
        .filter(|l| l.contains("re-sending the request that was in flight"))
        .filter(|l| l.contains("replica=b") && l.contains("stream=\"shard\""))
        .count();
    report
        .run_end(&end)
        .note(format!(
            "relay log over all runs: {}; reshards written for b {}; in-flight re-sends of b's \
             shards {shard_resends}; {} requests through the proxy",
            log_events(log),
            log_count(log, "shards changed", "b"),
            stats.requests("delay")
        ))
        .note(format!("sender: {}", ack.summary()));
    report.emit();
    report.assert_lossless();

    assert_eq!(log.matches("panicked at").count(), 0, "walrelay panicked");
    assert_eq!(log.matches(REJECTED).count(), 0, "{}", relay.log_tail(60));
    for name in ["a", "b"] {
        assert_eq!(counter(status, name, "rejected_records"), 0, "{name}");
    }
    assert!(max_b > 1, "b never used more than one shard");
    assert!(
        shard_resends >= 1,
        "no kill left a request of one of b's shards in flight"
    );
    assert!(
        during_catch_up >= rounds,
        "too few kills landed during a catch-up: {during_catch_up}"
    );
}

// ---------------------------------------------------------------------
// The store's view of a sharded replica.

/// A sharded replica is one replica: its shards' keys
/// (`replica/a/shard/<i>/delivered`) are not other replicas. Taken for
/// replicas, every start of the relay logs each shard of a as "no longer
/// configured", and `walrelay cursors list` / `cursors set` treat them as
/// replicas of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_replica_is_one_replica_in_the_checkpoint_store() {
    let _serial = SERIAL.lock().await;
    let a = Prometheus::start_server().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(
        data.path(),
        &[("a", &a.write_url())],
        &["--replica-shards", "a=3"],
    )
    .await
    .unwrap();
    wait_status(&relay, Duration::from_secs(20), "a with 3 shards", |st| {
        shards(st, "a") == 3
    })
    .await;
    relay.stop(Duration::from_secs(30)).await.unwrap();
    let names = Checkpoints::open(&data.path().join("checkpoints"))
        .unwrap()
        .replicas()
        .unwrap();
    let from = std::fs::metadata(relay.log_path()).map_or(0, |m| m.len());
    relay.restart().await.unwrap();
    wait_status(&relay, Duration::from_secs(20), "a with 3 shards", |st| {
        shards(st, "a") == 3
    })
    .await;
    relay.stop(Duration::from_secs(30)).await.unwrap();
    let log = log_since(&relay.log_path(), from);
    let stale: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("replica no longer configured"))
        .collect();
    assert!(
        stale.is_empty(),
        "the relay takes a's shards for replicas no longer configured:\n{}",
        stale.join("\n")
    );
    assert_eq!(names, ["a"], "the replicas in the checkpoint store");
}

/// A guard for the fix of the test above: the relay numbers new records
/// past every position a replica's checkpoint refers to (a log that lost
/// its tail must not give old numbers to new records, which a shard past
/// them would skip). For a sharded replica that is its highest shard's
/// position and in-flight end, not its lowest position (what
/// `Checkpoints::cursor` reports as its `delivered`). This holds today
/// because the shards are listed as replicas of their own; taking them out
/// of that list must keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_ends_before_a_shards_position_numbers_new_records_past_it() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    {
        // Shards of a at 0, 50 and 0 with 40..70 in flight; the log is
        // empty.
        let cp = Checkpoints::open(&data.path().join("checkpoints")).unwrap();
        cp.set("a", 0).unwrap();
        cp.reshard("a", 0, 3, None).unwrap();
        cp.complete_on("a", Stream::Shard { index: 1, of: 3 }, 50)
            .unwrap();
        cp.begin_send_on("a", Stream::Shard { index: 2, of: 3 }, 40..70)
            .unwrap();
    }
    // Nothing listens on port 1: a's shards only retry.
    let mut relay = Relay::start(
        data.path(),
        &[("a", "http://127.0.0.1:1/api/v1/write")],
        &["--replica-shards", "a=3"],
    )
    .await
    .unwrap();
    let series = chaos_tests::encode::v1_series(
        &[("__name__", "walrelay_shard_floor"), ("job", "shards")],
        &[(1.0, now_ms())],
    );
    let body = chaos_tests::encode::write_request_body(&prom_remote_write::v1::WriteRequest {
        timeseries: vec![series],
        ..Default::default()
    });
    let (code, text) = chaos_tests::encode::post_remote_write(&relay.write_url(), body)
        .await
        .unwrap();
    assert!((200..300).contains(&code), "{code} {text}");
    let st = relay.status().await.unwrap();
    relay.stop(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        st["wal"]["head_seq"], 71,
        "the new record is numbered past shard 2's in-flight end (70): {:#}",
        st["wal"]
    );
}
