//! A real child process appends and syncs to a log on the real filesystem and
//! reports every sync on stdout; the parent SIGKILLs it at a random moment,
//! reopens the log, and checks that every record the child reported as synced
//! reads back byte for byte. Repeated, so recovery runs on logs that were
//! themselves recovered.
//!
//! The child is this same test binary, re-run with an environment variable
//! naming the directory, so no extra binary is needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wal_format::{Compression, PayloadEncoding, PayloadKind, RecordMeta, RecordRef};
use walrelay::wal::{open, ReadItem, RealStorage, WalOptions};

const CHILD_ENV: &str = "WALRELAY_SIGKILL_CHILD_DIR";

fn options() -> WalOptions {
    WalOptions {
        segment_bytes: 256 << 10,
        compression: Compression::Zstd,
        zstd_level: 1,
        zstd_max_level: 6,
        max_frame_bytes: 64 << 10,
        initial_seq: 0,
        segment_max_age: None,
    }
}

/// The payload of record `seq`: recomputable by the parent.
fn payload(seq: u64) -> Vec<u8> {
    let len = 100 + (seq * 7919 % 3000) as usize;
    (0..len).map(|i| (seq as usize ^ (i * 31)) as u8).collect()
}

fn meta(seq: u64) -> RecordMeta {
    RecordMeta {
        receive_time_ms: seq as i64,
        min_sample_ts: 0,
        max_sample_ts: 0,
        samples: 1,
        kind: PayloadKind::RemoteWriteV1,
        encoding: PayloadEncoding::Identity,
    }
}

/// The child's body: append batches of 1-8 records, sync, report, forever.
fn child(dir: &Path) {
    let (mut w, _wal, _) = open(Arc::new(RealStorage), dir, options()).unwrap();
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    loop {
        let first = w.next_seq();
        let count = 1 + (n % 8);
        let payloads: Vec<Vec<u8>> = (first..first + count).map(payload).collect();
        let refs: Vec<RecordRef<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| RecordRef {
                meta: meta(first + i as u64),
                payload: p,
            })
            .collect();
        w.append(&refs).unwrap();
        let durable = w.sync().unwrap();
        writeln!(out, "synced {durable}").unwrap();
        out.flush().unwrap();
        n += 1;
    }
}

#[test]
fn every_record_reported_synced_survives_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let exe = std::env::current_exe().unwrap();
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut last_synced_overall = 0u64;
    for round in 0..8 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "every_record_reported_synced_survives_sigkill",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Kill after a pseudo-random number of reported syncs.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let kill_after = 20 + rng_state % 300;
        let mut reader = BufReader::new(stdout);
        let mut synced = None;
        let mut line = String::new();
        let started = Instant::now();
        let mut seen = 0;
        while seen < kill_after && started.elapsed() < Duration::from_secs(60) {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if let Some(n) = line.trim().strip_prefix("synced ") {
                synced = Some(n.parse::<u64>().unwrap());
                seen += 1;
            }
        }
        // SIGKILL while it is still appending.
        sigkill(child.id());
        let _ = child.wait();
        let synced = synced.expect("the child reported at least one sync");
        assert!(synced >= last_synced_overall);
        last_synced_overall = synced;

        let (_w, wal, report) = open(Arc::new(RealStorage), &dir, options()).unwrap();
        assert!(
            report.next_seq >= synced,
            "round {round}: synced up to {synced} but recovery ends at {}",
            report.next_seq
        );
        assert!(
            report.damage.is_empty(),
            "round {round}: {:?}",
            report.damage
        );
        let mut r = wal.reader(0);
        let mut expect = 0;
        while let Some(item) = r.try_next().unwrap() {
            match item {
                ReadItem::Record(rec) => {
                    assert_eq!(rec.seq, expect);
                    assert_eq!(
                        rec.payload.as_ref(),
                        payload(rec.seq).as_slice(),
                        "record {}",
                        rec.seq
                    );
                    expect += 1;
                }
                ReadItem::Gap(g) => panic!("round {round}: gap {g:?}"),
            }
        }
        assert!(expect >= synced);
    }
}

/// SIGKILL by pid through the `kill` command (the crate forbids `unsafe`).
fn sigkill(pid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
