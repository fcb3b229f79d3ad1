//! The disk really fills.
//!
//! walrelay's data directory sits on a small filesystem of its own (a tmpfs,
//! and a loop-mounted ext4 image) while replica `b` is away, so the log grows
//! until the filesystem is full. Then:
//!
//! * ingest answers a retryable 429/503 with `Retry-After`, never anything
//!   else, and the relay stays up (healthy, writer not failed);
//! * nothing it acknowledged is lost, for either replica;
//! * once `b` is back and has drained the backlog, ingest resumes by itself
//!   (the load generator simply keeps retrying).
//!
//! The verdict line of each run is printed and, when `CHAOS_REPORT` names a
//! file, appended there as JSON. `CHAOS_SOAK=1` fills a larger filesystem
//! several times.
//!
//! Needs root (mount) and Debian's `prometheus`. Mounts are private to each
//! test and always unmounted (lazily as a last resort) by a guard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chaos_tests::load::{Outcome, Progress};
use chaos_tests::scenario::{self, replica_status, scaled, Report};
use chaos_tests::{verify, Load, LoadSpec, Prometheus, PrometheusOpts, Relay, RetryPolicy};
use serde_json::json;

/// A filesystem mounted on a private temp dir, unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
    /// The ext4 image (in its own temp dir), if any.
    _image: Option<tempfile::TempDir>,
    kind: String,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Mount {
    fn tmpfs(size_mib: u64) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("chaos-diskfull-tmpfs-")
            .tempdir()
            .unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0700"))
            .arg("tmpfs")
            .arg(dir.path()))
        .expect("mounting a tmpfs needs root");
        Mount {
            dir,
            _image: None,
            kind: format!("tmpfs {size_mib}MiB"),
        }
    }

    fn ext4(size_mib: u64) -> Mount {
        let image_dir = tempfile::Builder::new()
            .prefix("chaos-diskfull-img-")
            .tempdir()
            .unwrap();
        let img = image_dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)).expect("mkfs.ext4 (e2fsprogs)");
        let dir = tempfile::Builder::new()
            .prefix("chaos-diskfull-ext4-")
            .tempdir()
            .unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(dir.path()))
        .expect("loop-mounting an ext4 image needs root and /dev/loop*");
        Mount {
            dir,
            _image: Some(image_dir),
            kind: format!("ext4 loop {size_mib}MiB"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// (total, available) bytes, from `df`.
    fn space(&self) -> (u64, u64) {
        let out = Command::new("df")
            .args(["-B1", "--output=size,avail"])
            .arg(self.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let nums: Vec<u64> = text
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        (
            nums.first().copied().unwrap_or(0),
            nums.get(1).copied().unwrap_or(0),
        )
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let p = self.dir.path().to_path_buf();
        if run(Command::new("umount").arg(&p)).is_err() {
            // Something still holds it (a process that outlived its test):
            // detach it now, the kernel frees it when the last user goes.
            if let Err(e) = run(Command::new("umount").arg("-l").arg(&p)) {
                eprintln!("cannot unmount {}: {e}", p.display());
            }
        }
    }
}

/// Peak and current resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// POSTs one valid request of 1000 series (larger than any load request,
/// so it cannot slip into the last free blocks) and returns (status,
/// Retry-After, body).
async fn probe(url: &str, i: usize) -> (u16, Option<String>, String) {
    use prom_remote_write::v1;
    let now = chaos_tests::now_ms();
    let req = v1::WriteRequest {
        timeseries: (0..1000)
            .map(|s| v1::TimeSeries {
                labels: vec![
                    v1::Label {
                        name: "__name__".into(),
                        value: "chaos_disk_full_probe".into(),
                    },
                    v1::Label {
                        name: "probe".into(),
                        value: format!("{i}-{s}"),
                    },
                ],
                samples: vec![v1::Sample {
                    value: 1.0,
                    timestamp: now,
                }],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let body = chaos_tests::encode::write_request_body(&req);
    chaos_tests::install_tls_provider();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "snappy")
        .body(body)
        .send()
        .await
        .expect("the relay answers while the disk is full");
    let status = resp.status().as_u16();
    let ra = resp
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, ra, resp.text().await.unwrap_or_default())
}

/// What fills the disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cause {
    /// Replica b is stopped: the log cannot shrink and grows until the
    /// filesystem is full; space returns when b is back and has drained.
    ReplicaAway,
    /// Both replicas are up, but another writer on the same volume takes
    /// every free block (and every block the relay frees) until it stops and
    /// deletes its file: the log, the checkpoint store and segment creation
    /// all hit ENOSPC.
    Neighbour,
}

/// A writer that keeps the filesystem full until dropped (then deletes its
/// file).
struct Filler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Filler {
    fn start(path: std::path::PathBuf) -> Filler {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            let chunk = vec![0xa5u8; 16 << 10];
            let mut written = 0u64;
            while !flag.load(Ordering::Relaxed) {
                // Take whatever is free, down to the last bytes.
                let mut size = chunk.len();
                while size > 0 && !flag.load(Ordering::Relaxed) {
                    match f.write(&chunk[..size]) {
                        Ok(n) => written += n as u64,
                        Err(_) => size /= 2,
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(f);
            std::fs::remove_file(&path).unwrap();
            written
        });
        Filler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops, deletes the file, and returns the bytes it had written.
    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn disk_full_scenario(mount: Mount, cause: Cause) {
    let t0 = Instant::now();
    let fills = scaled(1, 3);
    let name = format!(
        "disk_full_{}_{}",
        mount.kind.split_whitespace().next().unwrap_or(""),
        match cause {
            Cause::ReplicaAway => "replica_away",
            Cause::Neighbour => "neighbour",
        }
    );
    let mut report = Report::new(&name, "");
    let data = mount.path().join("data");
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let mut b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let relay = Relay::start(
        &data,
        &[("a", &a.write_url()), ("b", &b.write_url())],
        &[
            "--segment-bytes",
            "256KiB",
            "--compression",
            "none",
            "--retry-min-backoff",
            "50ms",
            "--retry-max-backoff",
            "1s",
            "--send-timeout",
            "5s",
            // One record per request to a replica: a backlog costs many
            // checkpoint writes, so the checkpoint store (on the same full
            // filesystem) must write while there is no free block.
            "--max-samples-per-send",
            "200",
        ],
    )
    .await
    .unwrap();
    let pid = relay.pid().unwrap();
    let (total, avail0) = mount.space();
    println!(
        "{}: {} bytes, {} available at start",
        mount.kind, total, avail0
    );

    // Four workers, 100 series each, retrying like Prometheus does (5xx and
    // 429 with Retry-After) for as long as it takes.
    let spec = LoadSpec {
        workers: 4,
        series_per_worker: 100,
        samples_per_series: 2,
        retry: RetryPolicy::Retryable,
        request_timeout: Duration::from_secs(20),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        seed: 0xd15c,
        ..LoadSpec::default()
    };
    let load = Load::start(spec, &relay.write_url()).unwrap();
    load.wait_acked_requests(20, Duration::from_secs(30))
        .await
        .unwrap();

    let mut full_phases = Vec::new();
    let mut probes_refused = Vec::new();
    for fill in 0..fills {
        let before: Progress = load.progress();
        let filler = match cause {
            Cause::ReplicaAway => {
                // b goes away; the log can no longer shrink and fills the disk.
                b.kill().unwrap();
                None
            }
            Cause::Neighbour => {
                // b is away for a moment, so it has a backlog to catch up
                // with (and checkpoints to write) while the disk is full.
                b.kill().unwrap();
                tokio::time::sleep(Duration::from_secs(3)).await;
                Some(Filler::start(mount.path().join(format!("filler-{fill}"))))
            }
        };
        wait_until(
            "the disk to fill (ingest refused)",
            Duration::from_secs(120),
            || {
                let p = load.progress();
                async move { Ok(p.refused > before.refused + 8) }
            },
        )
        .await;
        let full_at = Instant::now();
        let (_, avail) = mount.space();
        println!(
            "fill {fill}: full after {:.1}s: {} bytes available, progress {:?}",
            t0.elapsed().as_secs_f64(),
            avail,
            load.progress()
        );

        // While full: a fresh request gets a retryable status with
        // Retry-After, the relay stays healthy, its writer has not failed,
        // status and metrics answer, and a keeps receiving what was stored.
        let (st, ra, text) = probe(&relay.write_url(), fill).await;
        assert!(
            (st == 503 || st == 429) && ra.is_some(),
            "a request to a full relay got {st} (Retry-After {ra:?}): {text}"
        );
        probes_refused.push(json!({"status": st, "retry_after": ra, "reason": text.trim()}));
        let status = relay.status().await.unwrap();
        assert_eq!(status["wal"]["writer_failed"], false, "{status}");
        let h = reqwest::get(format!("{}/-/healthy", relay.url()))
            .await
            .unwrap();
        assert_eq!(h.status().as_u16(), 200, "healthy while the disk is full");
        relay.metrics_text().await.unwrap();
        if cause == Cause::Neighbour {
            // b returns while the disk is still full: its shipper sends and
            // checkpoints on a filesystem with no free block.
            b.start_again().await.unwrap();
        }
        // Stay full for a while.
        tokio::time::sleep(Duration::from_secs(scaled(5, 20))).await;
        if cause == Cause::Neighbour {
            let st = relay.status().await.unwrap();
            let rb = replica_status(&st, "b");
            println!(
                "fill {fill}: b while the disk is full: state {}, lag {} records, last error {}",
                rb["state"], rb["lag_records"], rb["last_error"]
            );
        }
        assert!(relay.is_running(), "{}", relay.log_tail(40));
        let stuck = load.progress();

        // b comes back, drains the backlog, segments are deleted (or the
        // neighbour deletes its file), and ingest resumes by itself.
        match filler {
            None => b.start_again().await.unwrap(),
            Some(f) => println!(
                "fill {fill}: the neighbour wrote {} bytes and deleted its file; {} bytes available",
                f.finish(),
                mount.space().1
            ),
        }
        wait_until(
            "ingest to resume once space returned",
            Duration::from_secs(180),
            || {
                let p = load.progress();
                async move { Ok(p.acked_requests >= stuck.acked_requests + 40) }
            },
        )
        .await;
        let resumed_after = full_at.elapsed();
        let (_, avail) = mount.space();
        println!(
            "fill {fill}: ingest resumed {:.1}s after the disk filled; {} bytes available; {:?}",
            resumed_after.as_secs_f64(),
            avail,
            load.progress()
        );
        full_phases.push(resumed_after.as_secs_f64());
    }
    let ack = load.stop().await.unwrap();
    let summary = ack.summary();
    println!("{summary}");

    // Everything refused was refused with a retryable status and
    // Retry-After; nothing failed at the connection level.
    let mut by_status = std::collections::BTreeMap::<u16, u64>::new();
    for a in &ack.attempts {
        match &a.outcome {
            Outcome::Refused {
                status,
                retry_after,
                body,
            } => {
                assert!(
                    (*status == 503 || *status == 429) && retry_after.is_some(),
                    "refused with {status} (Retry-After {retry_after:?}): {body}"
                );
                *by_status.entry(*status).or_default() += 1;
            }
            Outcome::Failed { error } => panic!("a request failed outright: {error}"),
            Outcome::Acked { .. } => {}
        }
    }
    let c = &summary.counts;
    assert!(c.refused > 0, "the disk never filled: {summary}");
    // Only requests still waiting to be retried when the load stopped can
    // be unacknowledged (at most one per worker).
    assert!(
        c.requests - c.acked_requests <= u64::from(ack.spec.workers),
        "{summary}"
    );

    // Both replicas catch up with everything in the log.
    let status = scenario::wait_caught_up(&relay, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(relay.pid(), Some(pid), "the relay was never restarted");
    assert!(relay.is_running());
    let (hwm, rss) = rss_kib(pid);

    let va = verify(&a, &ack).await.unwrap();
    let vb = verify(&b, &ack).await.unwrap();
    report.set_injected(format!(
        "data dir on {} filled {fills}x ({}): {} refusals {:?}, \
             all with Retry-After; ingest resumed by itself {:?}s after filling",
        mount.kind,
        match cause {
            Cause::ReplicaAway => "replica b away",
            Cause::Neighbour => "another writer takes every free block for a while",
        },
        c.refused,
        by_status,
        full_phases
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>(),
    ));
    report.acknowledged(&ack);
    report.replica("a", &va).replica("b", &vb);
    report.relay_counters(&status);
    let log_samples = status["wal"]["head_seq"].as_u64().unwrap()
        * u64::from(ack.spec.series_per_worker * ack.spec.samples_per_series);
    let mut dups = Vec::new();
    for n in ["a", "b"] {
        let r = replica_status(&status, n);
        for k in ["skipped_records", "dropped_samples", "rejected_records"] {
            assert_eq!(r[k], 0, "replica {n}: {k} in {r}");
        }
        // The log holds only load records: anything sent beyond them was
        // sent twice.
        let sent = r["sent_samples"].as_u64().unwrap_or(0);
        dups.push(format!("{n}={}", sent.saturating_sub(log_samples)));
    }
    report.note(format!(
        "duplicates (samples sent twice): {}",
        dups.join(" ")
    ));
    report.note(format!(
        "probes while full: {}; relay VmHWM {hwm} KiB, VmRSS {rss} KiB",
        json!(probes_refused)
    ));
    let log = std::fs::read_to_string(relay.log_path()).unwrap_or_default();
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    let checkpoint_errors = problems.iter().filter(|l| l.contains("checkpoint")).count();
    report.note(format!(
        "relay log: {} warnings/errors, {checkpoint_errors} about the checkpoint store{}",
        problems.len(),
        problems
            .iter()
            .take(3)
            .map(|l| format!("\n    {l}"))
            .collect::<String>()
    ));
    report.finish();
    assert_eq!(va.delivered, va.acknowledged);
    assert_eq!(vb.delivered, vb.acknowledged);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_fills_ingest_refuses_retryably_and_resumes_after_the_replica_drains() {
    let size = scaled(12, 64);
    disk_full_scenario(Mount::tmpfs(size), Cause::ReplicaAway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_taken_by_another_writer_ingest_refuses_retryably_and_resumes_when_space_returns() {
    let size = scaled(12, 64);
    disk_full_scenario(Mount::tmpfs(size), Cause::Neighbour).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_loop_device_fills_ingest_refuses_retryably_and_resumes_after_the_replica_drains() {
    let size = scaled(24, 128);
    disk_full_scenario(Mount::ext4(size), Cause::ReplicaAway).await;
}
