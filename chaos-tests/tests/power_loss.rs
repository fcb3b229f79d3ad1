//! Power loss and fsync failure, on powerfs (a FUSE filesystem that keeps
//! writes in memory until they are fsync'd and throws away everything
//! unsynced at a simulated crash; see `chaos_tests::powerfs`), against the
//! real walrelay binary and real Prometheus replicas.
//!
//! Needs `/dev/fuse`, Debian's `fuse3` (fusermount3) and `prometheus`, and
//! `cargo build --bin walrelay` first. Nothing is skipped: a missing piece
//! fails the test with what to install.
//!
//! * The filesystem's own rules, checked through the kernel: unsynced data
//!   and unsynced directory entries vanish at a crash, a failed fsync is not
//!   made good by a retry.
//! * `power_loss_under_load`: SIGKILL + crash of the filesystem at random
//!   moments under load, replica b away the whole time (so what it gets
//!   comes only from a log that went through every power loss); at the end
//!   both replicas hold every acknowledged sample.
//! * `power_loss_negative_control`: the same with walrelay's file fsyncs
//!   (then directory fsyncs) turned into no-ops by the filesystem: the oracle
//!   must find acknowledged samples lost, or the positive test proves nothing.
//! * `fsync_failure`: an fsync of the log fails (EIO): ingest stops
//!   acknowledging (503) and says so on `/-/healthy` and in its metrics, never
//!   fsyncs that file again; after a restart ingest works, and after a later
//!   power loss every acknowledged sample is still delivered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use chaos_tests::encode::{encode_labels, put_timeseries, snappy_compress};
use chaos_tests::load::{AckLog, Load, LoadSpec, Outcome, RetryPolicy};
use chaos_tests::powerfs::{sync_dir, PowerFs, PowerFsOpts};
use chaos_tests::prometheus::Prometheus;
use chaos_tests::relay::Relay;
use chaos_tests::scenario::{self, replica_status, Report};
use chaos_tests::verify::verify;
use rand::Rng;
use serde_json::Value;

const POWERFS: &str = env!("CARGO_BIN_EXE_powerfs");

/// Small segments, so crashes land around segment rolls too; quick
/// retries, so a returning replica catches up within the test.
const RELAY_ARGS: &[&str] = &[
    "--segment-bytes",
    "256KiB",
    "--retry-min-backoff",
    "50ms",
    "--retry-max-backoff",
    "500ms",
];

fn mount(salt: u64, torn: bool) -> PowerFs {
    PowerFs::start_with_bin(
        POWERFS,
        PowerFsOpts {
            seed: scenario::seed() ^ salt,
            torn,
            threads: 2,
        },
    )
    .unwrap()
}

fn spec(workers: u32, series: u32) -> LoadSpec {
    LoadSpec {
        workers,
        series_per_worker: series,
        samples_per_series: 2,
        interval: Duration::from_millis(5),
        retry: RetryPolicy::Retryable,
        request_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        seed: scenario::seed(),
        ..LoadSpec::default()
    }
}

fn write_file(path: &Path, data: &[u8], sync: bool) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

// ---------------------------------------------------------------------
// The filesystem itself, through the kernel.
// ---------------------------------------------------------------------

/// Data written without fsync is gone after a crash; data fsync'd stays.
#[test]
fn powerfs_drops_unsynced_file_data() {
    let fs = mount(1, false);
    let d = fs.mkdir_durable("d").unwrap();
    let synced = d.join("synced");
    let unsynced = d.join("unsynced");
    write_file(&synced, b"durable", true);
    write_file(&unsynced, b"volatile", false);
    sync_dir(&d).unwrap();
    write_file(&synced, b" and more", false);
    assert_eq!(std::fs::read(&synced).unwrap(), b"durable and more");
    let r = fs.crash().unwrap();
    assert_eq!(std::fs::read(&synced).unwrap(), b"durable");
    // The entry was synced, its data was not: an empty file.
    assert_eq!(std::fs::read(&unsynced).unwrap(), b"");
    assert_eq!(r.bytes_dropped, 9 + 8, "{r:?}");
    assert_eq!(r.vanished, 0, "{r:?}");
}

/// A file fsync'd but not its directory entry vanishes; so do an unsynced
/// directory with everything in it; unsynced unlinks and renames are undone.
#[test]
fn powerfs_drops_unsynced_directory_entries() {
    let fs = mount(2, false);
    let d = fs.mkdir_durable("d").unwrap();
    write_file(&d.join("a"), b"A", true);
    // Not synced: "d"'s entry for "a".
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    write_file(&sub.join("x"), b"X", true);
    sync_dir(&sub).unwrap();
    // "sub"'s own entries are durable, its entry in "d" is not.
    let r = fs.crash().unwrap();
    assert!(!d.join("a").exists(), "a file whose entry was not synced");
    assert!(!sub.exists(), "a directory whose entry was not synced");
    assert_eq!(r.vanished, 3, "{r:?}");

    write_file(&d.join("a"), b"A", true);
    sync_dir(&d).unwrap();
    std::fs::rename(d.join("a"), d.join("b")).unwrap();
    write_file(&d.join("c"), b"C", true);
    fs.crash().unwrap();
    assert_eq!(std::fs::read(d.join("a")).unwrap(), b"A");
    assert!(!d.join("b").exists() && !d.join("c").exists());
    std::fs::remove_file(d.join("a")).unwrap();
    fs.crash().unwrap();
    assert_eq!(std::fs::read(d.join("a")).unwrap(), b"A", "unlink undone");
    std::fs::remove_file(d.join("a")).unwrap();
    sync_dir(&d).unwrap();
    fs.crash().unwrap();
    assert!(!d.join("a").exists());
    let names: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");
}

/// An injected EIO makes nothing durable, and a retried fsync that
/// "succeeds" does not bring the data back (Linux after a write-back error).
#[test]
fn powerfs_failed_fsync_is_not_made_good_by_a_retry() {
    let fs = mount(3, false);
    let d = fs.mkdir_durable("d").unwrap();
    let p = d.join("log");
    write_file(&p, b"one,", true);
    sync_dir(&d).unwrap();
    fs.fail_fsync(1, Some("/d/log")).unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"two,").unwrap();
    let err = f.sync_data().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Reads still see it and the retry succeeds...
    assert_eq!(std::fs::read(&p).unwrap(), b"one,two,");
    f.sync_data().unwrap();
    f.write_all(b"three").unwrap();
    f.sync_data().unwrap();
    drop(f);
    let st = fs.stats().unwrap();
    assert_eq!((st.fsync_failures, st.fsyncs_after_eio), (1, 2), "{st:?}");
    fs.crash().unwrap();
    // ...but the bytes the failed fsync covered never reached the disk.
    assert_eq!(std::fs::read(&p).unwrap(), b"one,\0\0\0\0three");
    // Locks work on the mount (walrelay flocks DATA_DIR/LOCK).
    let lock = File::create(d.join("LOCK")).unwrap();
    lock.try_lock().unwrap();
    let again = File::open(d.join("LOCK")).unwrap();
    assert!(again.try_lock().is_err(), "a second flock must conflict");
}

// ---------------------------------------------------------------------
// walrelay on powerfs.
// ---------------------------------------------------------------------

/// Truncations and damage recovery reported at the last start.
fn recovery_summary(status: &Value) -> (bool, usize) {
    let r = &status["recovery"];
    (
        !r["truncated"].is_null(),
        r["damage"].as_array().map_or(0, Vec::len),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_under_load() {
    let crashes: u32 = scenario::scaled(5, 30);
    let mut rng = scenario::rng("power_loss");
    let mut report = Report::new("power_loss", "");
    let fs = mount(4, true);
    // A disk's fsync takes time: writes wait longer between write(2) and
    // their fsync, so more crashes land there and leave a torn tail.
    fs.control()
        .set_fsync_delay(Duration::from_millis(2))
        .unwrap();
    let data = fs.mkdir_durable("data").unwrap();
    let prom_a = Prometheus::start_server().await.unwrap();
    let mut prom_b = Prometheus::start_server().await.unwrap();
    let (ua, ub) = (prom_a.write_url(), prom_b.write_url());
    let mut relay = Relay::start(&data, &[("a", &ua), ("b", &ub)], RELAY_ARGS)
        .await
        .unwrap();
    let load = Load::start(spec(4, 50), &relay.write_url()).unwrap();
    load.wait_acked_requests(20, Duration::from_secs(20))
        .await
        .unwrap();
    // b is away through every power loss: all it gets afterwards comes from
    // a log that survived them.
    prom_b.stop().await.unwrap();
    let mut truncations = 0;
    let mut dropped_bytes = 0;
    let mut torn_kept = 0;
    let mut vanished = 0;
    for i in 0..crashes {
        let acked = load.progress().acked_requests;
        load.wait_acked_requests(acked + 10, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("round {i}: {e:#}\n{}", relay.log_tail(30)));
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1200))).await;
        relay.sigkill().unwrap();
        let cr = fs.crash().unwrap();
        dropped_bytes += cr.bytes_dropped;
        torn_kept += cr.bytes_torn_kept;
        vanished += cr.vanished;
        relay
            .restart()
            .await
            .unwrap_or_else(|e| panic!("round {i}: restart after a power loss: {e:#}"));
        let st = relay.status().await.unwrap();
        let (truncated, damage) = recovery_summary(&st);
        truncations += u32::from(truncated);
        assert_eq!(
            damage, 0,
            "round {i}: a power loss must leave at most a torn tail, not damage: {}",
            st["recovery"]
        );
    }
    let ack_before_stop = load.progress().acked_requests;
    load.wait_acked_requests(ack_before_stop + 10, Duration::from_secs(20))
        .await
        .unwrap();
    let ack = load.stop().await.unwrap();
    prom_b.start_again().await.unwrap();
    let status = scenario::wait_caught_up(&relay, Duration::from_secs(60))
        .await
        .unwrap();
    let stats = fs.stats().unwrap();
    report.set_injected(format!(
        "{crashes} power losses (SIGKILL + unsynced writes dropped, torn tails) under load, \
         replica b down throughout; {dropped_bytes} unsynced bytes dropped, {torn_kept} kept torn, \
         {vanished} unsynced files gone"
    ));
    report.acknowledged(&ack);
    report.replica("a", &verify(&prom_a, &ack).await.unwrap());
    report.replica("b", &verify(&prom_b, &ack).await.unwrap());
    report.relay_counters(&status);
    report.note(format!(
        "{truncations} of {crashes} restarts cut a torn tail; filesystem: {} fsyncs, {} directory \
         fsyncs, {} bytes written",
        stats.fsyncs, stats.fsyncdirs, stats.bytes_written
    ));
    report.finish();
    assert!(ack.counts().acked_requests > 0);
}

/// One phase of the negative control: walrelay on `data` with the
/// filesystem ignoring one kind of fsync; replica b away until after the
/// power loss. Returns what b holds of what was acknowledged.
async fn unsynced_phase(
    fs: &PowerFs,
    prom_b: &mut Prometheus,
    data: &Path,
    ignore_dir: bool,
) -> (AckLog, chaos_tests::Verdict) {
    let ub = prom_b.write_url();
    prom_b.stop().await.unwrap();
    let mut relay = Relay::start(data, &[("b", &ub)], RELAY_ARGS).await.unwrap();
    if ignore_dir {
        fs.control().ignore_fsyncdir(true).unwrap();
    } else {
        fs.control().ignore_fsync(true).unwrap();
    }
    let ack = Load::run(
        LoadSpec {
            duration: Some(Duration::from_secs(2)),
            ..spec(2, 20)
        },
        &relay.write_url(),
    )
    .await
    .unwrap();
    assert!(ack.counts().acked_requests > 10, "{}", ack.summary());
    relay.sigkill().unwrap();
    fs.crash().unwrap();
    fs.control().ignore_fsync(false).unwrap();
    fs.control().ignore_fsyncdir(false).unwrap();
    relay.restart().await.unwrap();
    prom_b.start_again().await.unwrap();
    scenario::wait_caught_up(&relay, Duration::from_secs(30))
        .await
        .unwrap();
    let v = verify(prom_b, &ack).await.unwrap();
    (ack, v)
}

/// The oracle and the filesystem catch a missing fsync: with walrelay's
/// fsyncs turned into no-ops, a power loss loses acknowledged samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_negative_control() {
    let fs = mount(5, true);
    let mut prom_b = Prometheus::start_server().await.unwrap();
    for (ignore_dir, what) in [(false, "file"), (true, "directory")] {
        let mut report = Report::new(
            &format!("power_loss_negative_control_{what}"),
            format!(
                "every {what} fsync of walrelay acknowledged but ignored by the filesystem, \
                 then a power loss (replica b down until after it)"
            ),
        );
        let data = fs.mkdir_durable(&format!("data-{what}")).unwrap();
        let (ack, v) = unsynced_phase(&fs, &mut prom_b, &data, ignore_dir).await;
        report.acknowledged(&ack);
        report.replica("b", &v);
        report.note("negative control: the loss must be detected");
        report.emit();
        assert!(
            v.lost > 0,
            "with {what} fsyncs ignored a power loss must lose acknowledged samples, and the \
             oracle must see it: {v}"
        );
    }
}

/// A hand-made valid request; its status and Retry-After.
async fn post_one(url: &str) -> (u16, Option<String>) {
    let mut raw = Vec::new();
    let labels = encode_labels(&[
        ("__name__", "walrelay_powerfs_probe"),
        ("job", "power_loss"),
    ]);
    put_timeseries(&mut raw, &labels, &[(1.0, chaos_tests::now_ms())]);
    chaos_tests::install_tls_provider();
    let resp = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(snappy_compress(&raw).unwrap())
        .send()
        .await
        .unwrap();
    let retry_after = resp
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (resp.status().as_u16(), retry_after)
}

async fn get_status(url: &str) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_failure() {
    let mut report = Report::new("fsync_failure", "");
    let fs = mount(6, true);
    let data = fs.mkdir_durable("data").unwrap();
    let prom_a = Prometheus::start_server().await.unwrap();
    let prom_b = Prometheus::start_server().await.unwrap();
    let (ua, ub) = (prom_a.write_url(), prom_b.write_url());
    let mut relay = Relay::start(&data, &[("a", &ua), ("b", &ub)], RELAY_ARGS)
        .await
        .unwrap();
    let spec1 = spec(4, 50);
    let load = Load::start(spec1.clone(), &relay.write_url()).unwrap();
    load.wait_acked_requests(50, Duration::from_secs(20))
        .await
        .unwrap();

    // The next fsync of a log file fails.
    fs.fail_fsync(1, Some("/wal/")).unwrap();
    let healthy = format!("{}/-/healthy", relay.url());
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_status(&healthy).await != 503 {
        assert!(
            Instant::now() < deadline,
            "/-/healthy still 200 10s after the fsync failed; stats {:?}\n{}",
            fs.stats().unwrap(),
            relay.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed_at = chaos_tests::now_ms();
    // Answers in flight when the fsync failed have landed after this.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked_at_failure = load.progress().acked_requests;
    assert_eq!(
        relay
            .metric_sum("walrelay_wal_writer_failed", &[])
            .await
            .unwrap(),
        1.0
    );
    let st = relay.status().await.unwrap();
    assert_eq!(st["wal"]["writer_failed"], true, "{}", st["wal"]);
    assert_eq!(get_status(&format!("{}/-/ready", relay.url())).await, 503);
    // Load keeps coming for a while: nothing is acknowledged any more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (probe_status, retry_after) = post_one(&relay.write_url()).await;
    assert_eq!(probe_status, 503, "a write after the fsync failure");
    assert!(retry_after.is_some(), "503 without Retry-After");
    assert_eq!(
        load.progress().acked_requests,
        acked_at_failure,
        "walrelay acknowledged writes after a failed fsync"
    );
    let stats = fs.stats().unwrap();
    assert_eq!(stats.fsync_failures, 1, "{stats:?}");
    assert_eq!(
        stats.fsyncs_after_eio, 0,
        "walrelay fsync'd the failed file again (retrying and trusting the fsync): {stats:?}"
    );
    assert_eq!(get_status(&healthy).await, 503);
    let mut ack = load.stop().await.unwrap();
    let refused_503 = ack
        .attempts
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Refused { status: 503, .. }))
        .count();
    assert!(refused_503 > 0, "no request was refused with 503");
    let other: Vec<_> = ack
        .attempts
        .iter()
        .filter(|a| a.at_ms >= failed_at)
        .filter(|a| !matches!(a.outcome, Outcome::Refused { status: 503, .. }))
        .take(3)
        .collect();
    assert!(
        other.is_empty(),
        "after the failure, answers other than 503: {other:?}"
    );
    let late_acks = ack
        .batches
        .iter()
        .filter(|b| b.acked && b.sent_ms > failed_at)
        .count();
    assert_eq!(
        late_acks, 0,
        "requests first sent after the failure were acknowledged"
    );

    // Restart (the filesystem is healthy again: the one failure is used up).
    let exit = relay.stop(Duration::from_secs(15)).await.unwrap();
    relay.restart().await.unwrap();
    assert_eq!(get_status(&healthy).await, 200);
    let spec2 = LoadSpec {
        run_id: spec1.run_id.clone(),
        first_worker: spec1.workers,
        duration: Some(Duration::from_secs(2)),
        ..spec(2, 50)
    };
    let ack2 = Load::run(spec2, &relay.write_url()).await.unwrap();
    assert!(
        ack2.counts().acked_requests > 10,
        "ingest after the restart: {}",
        ack2.summary()
    );
    // And a power loss for good measure: the bytes the failed fsync covered
    // never reached the disk, what was acknowledged did.
    relay.sigkill().unwrap();
    let cr = fs.crash().unwrap();
    relay.restart().await.unwrap();
    let st = relay.status().await.unwrap();
    let status = scenario::wait_caught_up(&relay, Duration::from_secs(60))
        .await
        .unwrap();
    let acked_before = ack.counts().acked_samples;
    ack.merge(ack2).unwrap();
    report.set_injected(format!(
        "1 fdatasync of a log segment failed with EIO under load ({} requests refused 503 \
         after it, 0 acknowledged); restart; more load; then a power loss",
        refused_503
    ));
    report.acknowledged(&ack);
    report.replica("a", &verify(&prom_a, &ack).await.unwrap());
    report.replica("b", &verify(&prom_b, &ack).await.unwrap());
    report.relay_counters(&status);
    report.note(format!(
        "{acked_before} samples acknowledged before the failure; SIGTERM after it: {exit}; \
         recovery after the power loss: truncated {}, damage {} ({} unsynced bytes dropped)",
        !st["recovery"]["truncated"].is_null(),
        st["recovery"]["damage"],
        cr.bytes_dropped
    ));
    for r in ["a", "b"] {
        let s = replica_status(&status, r);
        if s["skipped_records"].as_u64().unwrap_or(0) > 0 {
            report.note(format!(
                "replica {r} skipped {} records",
                s["skipped_records"]
            ));
        }
    }
    report.finish();
}

/// fsync failures in the checkpoint store (sled), then a power loss.
///
/// Regression test: this used to lose acknowledged samples. sled 0.34's
/// `flush()` only calls `sync_file_range` and its periodic flusher logs a
/// failed fsync and carries on, so positions were never really durable;
/// after the power loss sled came back without a replica's position and the
/// relay started it at the head of the log, skipping what it had not yet
/// received. Now every flush is followed by an fdatasync of sled's data file
/// (a failure stops the store and fails /-/healthy), and a store with no
/// positions beside a non-empty log starts every replica at the oldest record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_fsync_failure() {
    let mut report = Report::new(
        "checkpoint_fsync_failure",
        "3 fsyncs of the checkpoint store failed with EIO under load, then a power loss",
    );
    let fs = mount(7, true);
    let data = fs.mkdir_durable("data").unwrap();
    let prom_a = Prometheus::start_server().await.unwrap();
    let ua = prom_a.write_url();
    let mut relay = Relay::start(&data, &[("a", &ua)], RELAY_ARGS)
        .await
        .unwrap();
    let load = Load::start(spec(4, 50), &relay.write_url()).unwrap();
    load.wait_acked_requests(50, Duration::from_secs(20))
        .await
        .unwrap();
    fs.fail_fsync(3, Some("/checkpoints/")).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let healthy = get_status(&format!("{}/-/healthy", relay.url())).await;
    let stats = fs.stats().unwrap();
    let ack = load.stop().await.unwrap();
    relay.sigkill().unwrap();
    fs.crash().unwrap();
    relay.restart().await.unwrap();
    let status = scenario::wait_caught_up(&relay, Duration::from_secs(30))
        .await
        .unwrap();
    report.acknowledged(&ack);
    report.replica("a", &verify(&prom_a, &ack).await.unwrap());
    report.relay_counters(&status);
    report.note(format!(
        "/-/healthy answered {healthy} after the failures; fsyncs after EIO on the failed \
         files: {}; relay log: {}",
        stats.fsyncs_after_eio,
        relay
            .log_tail(400)
            .lines()
            .filter(|l| l.contains("new replica"))
            .collect::<Vec<_>>()
            .join(" / ")
    ));
    report.finish();
}
