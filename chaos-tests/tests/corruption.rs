//! Corruption between runs.
//!
//! A relay writes a log of small uncompressed segments while replica `a`
//! receives everything and replica `b` is away. The relay is stopped and its
//! log damaged the ways disks and people damage files:
//!
//! * bytes flipped in the body of a frame in the middle of a sealed segment;
//! * bytes flipped in the header of a frame of another sealed segment (the
//!   reader must resynchronise on the next frame);
//! * a sealed segment's 32-byte header flipped (its frames are intact: that
//!   costs nothing);
//! * a whole sealed segment deleted;
//! * bytes flipped in a frame in the middle of the newest segment;
//! * the newest segment's tail truncated in the middle of its last frame.
//!
//! `walrelay wal verify` must name each place (file, offset, lost range).
//! walrelay must start, report the damage, skip exactly the damaged records
//! (`skipped_records` for `b`, with file and offset in its log), deliver every
//! other acknowledged sample to `b`, keep everything `a` already had, and
//! keep serving: a second load after the restart must reach both replicas
//! entirely.
//!
//! The oracle for which records are damaged is this file's own parser of the
//! segment format (wal-format/SPEC.md), not the product's reader. One load
//! worker sends one request at a time, so record `i` of the log is request
//! `i` of the load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chaos_tests::relay::walrelay_bin;
use chaos_tests::scenario::{self, replica_status, scaled, Report};
use chaos_tests::{verify, AckLog, Load, LoadSpec, Prometheus, PrometheusOpts, Relay, RetryPolicy};
use serde_json::Value;

const SEGMENT_HEADER_LEN: u64 = 32;
const FRAME_HEADER_LEN: u64 = 40;

/// One frame as the format describes it.
#[derive(Clone, Debug)]
struct Frame {
    offset: u64,
    first_seq: u64,
    count: u64,
    body_len: u64,
}

impl Frame {
    fn end(&self) -> u64 {
        self.offset + FRAME_HEADER_LEN + self.body_len
    }
    fn seqs(&self) -> std::ops::Range<u64> {
        self.first_seq..self.first_seq + self.count
    }
}

#[derive(Clone, Debug)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    frames: Vec<Frame>,
}

impl Segment {
    fn end_seq(&self) -> u64 {
        self.frames
            .last()
            .map_or(self.first_seq, |f| f.first_seq + f.count)
    }
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parses every segment of a clean log (panics on anything unexpected).
fn parse_log(wal: &Path) -> Vec<Segment> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|path| {
            let b = std::fs::read(&path).unwrap();
            assert_eq!(&b[..8], b"WALRELAY", "{}", path.display());
            let first_seq = u64_at(&b, 16);
            let mut frames = Vec::new();
            let mut off = SEGMENT_HEADER_LEN as usize;
            // A live relay's active segment ends in the zeros its writer
            // reserved (SPEC, Writing rule 2): they are its end.
            while off < b.len() && b[off..].iter().any(|&x| x != 0) {
                assert_eq!(&b[off..off + 4], b"WRFR", "{} at {off}", path.display());
                let f = Frame {
                    offset: off as u64,
                    first_seq: u64_at(&b, off + 8),
                    count: u32_at(&b, off + 16),
                    body_len: u32_at(&b, off + 20),
                };
                off = f.end() as usize;
                frames.push(f);
            }
            assert!(off <= b.len(), "{}", path.display());
            Segment {
                path,
                first_seq,
                frames,
            }
        })
        .collect()
}

fn flip(path: &Path, at: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, at).unwrap();
    for b in &mut buf {
        *b ^= 0x5a;
    }
    f.write_all_at(&buf, at).unwrap();
    f.sync_all().unwrap();
}

/// One injected fault and what it must cost.
#[derive(Debug)]
struct Injury {
    what: &'static str,
    file: PathBuf,
    /// The byte the fault touched (for a deleted segment: 0 of the next one).
    at: u64,
    /// The frame (or segment) start a report may name instead of `at`.
    start: u64,
    lost: std::ops::Range<u64>,
}

fn wal_verify(data: &Path) -> (i32, Value) {
    let out = std::process::Command::new(walrelay_bin().unwrap())
        .args(["wal", "verify", "--json", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("wal verify --json: {e}: {stderr}"));
    (out.status.code().unwrap_or(-1), v)
}

/// The verify finding that names `inj`, if any.
fn finding_for<'a>(v: &'a Value, inj: &Injury) -> Option<&'a Value> {
    v["damage"].as_array()?.iter().find(|d| {
        let file_ok = d["file"].as_str() == Some(inj.file.to_str().unwrap());
        let off = d["offset"].as_u64().unwrap_or(u64::MAX);
        let len = d["length"].as_u64().unwrap_or(0);
        let place_ok = off == inj.start || (off <= inj.at && inj.at < off + len.max(1));
        file_ok && place_ok
    })
}

fn lost_of(d: &Value) -> Option<std::ops::Range<u64>> {
    Some(d["lost"]["from"].as_u64()?..d["lost"]["to"].as_u64()?)
}

/// A copy of `ack` in which the requests whose records are in `lost` count
/// as not acknowledged: what a replica must still hold. `record` maps a
/// request (worker, number within the worker) to its record.
fn without(ack: &AckLog, lost: &BTreeSet<u64>, record: &BTreeMap<(u32, u64), u64>) -> AckLog {
    let mut a = ack.clone();
    for b in &mut a.batches {
        if record
            .get(&(b.worker, b.seq))
            .is_some_and(|r| lost.contains(r))
        {
            b.acked = false;
        }
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_log_is_reported_and_only_the_damage_is_skipped() {
    let mut report = Report::new("corruption", "");
    // Requests of 40 series x 2 samples, stored as their senders'
    // snappy bodies: frames of about 1.2 KB, 13 to a 16 KiB segment.
    let requests = scaled(160u64, 1600);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let mut b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let args = [
        "--segment-bytes",
        "16KiB",
        "--compression",
        "none",
        "--retry-min-backoff",
        "50ms",
        "--retry-max-backoff",
        "1s",
    ];
    let mut relay = Relay::start(
        &data,
        &[("a", &a.write_url()), ("b", &b.write_url())],
        &args,
    )
    .await
    .unwrap();
    b.kill().unwrap();

    // Phase 1: one worker, one request at a time: record i is request i.
    let run_id = LoadSpec::new_run_id();
    let spec = LoadSpec {
        workers: 1,
        series_per_worker: 40,
        samples_per_series: 2,
        requests_per_worker: Some(requests),
        retry: RetryPolicy::Never,
        run_id: run_id.clone(),
        seed: scenario::seed(),
        ..LoadSpec::default()
    };
    let ack1 = Load::run(spec.clone(), &relay.write_url()).await.unwrap();
    let c = ack1.counts();
    assert_eq!(c.acked_requests, requests, "{}", ack1.summary());
    assert!(ack1
        .batches
        .iter()
        .all(|b| b.attempts == 1 && b.seq < requests));
    // The newest segment needs 3 frames (below). How many it has depends
    // on the bodies' sizes, so requests of further one-request workers of
    // the same run are added, one at a time, until it has them.
    let mut ack1 = ack1;
    let mut record: BTreeMap<(u32, u64), u64> = (0..requests).map(|i| ((0, i), i)).collect();
    let mut written = requests;
    // Worker 1 is phase 2's.
    let mut worker = 2;
    while parse_log(&data.join("wal"))
        .last()
        .is_none_or(|s| s.frames.len() < 3)
    {
        let more = LoadSpec {
            workers: 1,
            first_worker: worker,
            requests_per_worker: Some(1),
            seed: scenario::seed() + u64::from(worker),
            ..spec.clone()
        };
        let more = Load::run(more, &relay.write_url()).await.unwrap();
        assert_eq!(more.counts().acked_requests, 1, "{}", more.summary());
        ack1.merge(more).unwrap();
        record.insert((worker, 0), written);
        written += 1;
        worker += 1;
    }
    let st = relay.status().await.unwrap();
    assert_eq!(st["wal"]["head_seq"], written, "one record per request");
    // a has everything before anything is damaged.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !scenario::settled(replica_status(&relay.status().await.unwrap(), "a")) {
        assert!(std::time::Instant::now() < deadline, "a did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop(Duration::from_secs(20)).await.unwrap();

    // Inject.
    let wal = data.join("wal");
    let segs = parse_log(&wal);
    let n = segs.len();
    assert!(n >= 10, "want at least 10 segments, got {n}");
    assert_eq!(segs[n - 1].end_seq(), written);
    let mut injuries = Vec::new();
    let mid = |s: &Segment| s.frames[s.frames.len() / 2].clone();
    // Body bytes of a middle frame of segment 2.
    let f = mid(&segs[2]);
    let at = f.offset + FRAME_HEADER_LEN + f.body_len / 2;
    flip(&segs[2].path, at, 4);
    injuries.push(Injury {
        what: "frame body flipped",
        file: segs[2].path.clone(),
        at,
        start: f.offset,
        lost: f.seqs(),
    });
    // The first_seq field of a middle frame's header in segment 4.
    let f = mid(&segs[4]);
    let at = f.offset + 8;
    flip(&segs[4].path, at, 2);
    injuries.push(Injury {
        what: "frame header flipped",
        file: segs[4].path.clone(),
        at,
        start: f.offset,
        lost: f.seqs(),
    });
    // Segment 5's own header: its frames stay readable, nothing is lost.
    flip(&segs[5].path, 4, 2);
    injuries.push(Injury {
        what: "segment header flipped",
        file: segs[5].path.clone(),
        at: 4,
        start: 0,
        lost: 0..0,
    });
    // Segment 7 deleted: a hole between segments 6 and 8.
    std::fs::remove_file(&segs[7].path).unwrap();
    injuries.push(Injury {
        what: "segment deleted",
        file: segs[8].path.clone(),
        at: 0,
        start: 0,
        lost: segs[7].first_seq..segs[8].first_seq,
    });
    // The newest segment: a middle frame flipped, and the tail cut inside
    // its last frame (acknowledged records, so lost).
    let last = &segs[n - 1];
    assert!(
        last.frames.len() >= 3,
        "the newest segment needs 3 frames (did the request size change?): {last:?}"
    );
    // An intact frame must follow it, else it is part of a corrupt tail.
    let f = last.frames[last.frames.len() - 3].clone();
    let at = f.offset + FRAME_HEADER_LEN + f.body_len / 3;
    flip(&last.path, at, 4);
    injuries.push(Injury {
        what: "frame body flipped in the newest segment",
        file: last.path.clone(),
        at,
        start: f.offset,
        lost: f.seqs(),
    });
    let tail = last.frames.last().unwrap().clone();
    let cut = tail.offset + FRAME_HEADER_LEN + tail.body_len / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last.path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    injuries.push(Injury {
        what: "tail truncated",
        file: last.path.clone(),
        at: tail.offset,
        start: tail.offset,
        lost: tail.seqs(),
    });
    let lost_records: BTreeSet<u64> = injuries.iter().flat_map(|i| i.lost.clone()).collect();
    // Every damaged record is skipped by b, the truncated tail included:
    // recovery cuts it, and since a had already received it, the relay
    // numbers new records after it and b's reader finds those records
    // missing.
    let skippable = lost_records.len() as u64;
    println!(
        "{n} segments; injured: {:#?}; {} records lost",
        injuries,
        lost_records.len()
    );

    // `wal verify` names every place.
    let (code, v) = wal_verify(&data);
    assert_eq!(code, 1, "verify of a damaged log exits 1: {v:#}");
    for inj in &injuries {
        let d = finding_for(&v, inj)
            .unwrap_or_else(|| panic!("wal verify does not name {inj:?}: {v:#}"));
        if inj.lost.is_empty() {
            assert!(lost_of(d).is_none_or(|l| l.is_empty()), "{inj:?}: {d}");
        } else {
            assert_eq!(lost_of(d), Some(inj.lost.clone()), "{inj:?}: {d}");
        }
    }

    // walrelay starts on the damaged log and reports what recovery sees.
    b.start_again().await.unwrap();
    relay.restart().await.unwrap();
    let st = relay.status().await.unwrap();
    let rec = &st["recovery"];
    let t = &rec["truncated"];
    assert_eq!(t["file"], last.path.to_str().unwrap(), "{rec:#}");
    assert_eq!(t["offset"], tail.offset, "{rec:#}");
    let damage = rec["damage"].as_array().unwrap();
    for inj in injuries.iter().filter(|i| {
        i.file == last.path && i.what != "tail truncated" || i.what == "segment header flipped"
    }) {
        assert!(
            damage
                .iter()
                .any(|d| d["file"] == inj.file.to_str().unwrap()
                    && (d["offset"] == inj.start || d["offset"] == inj.at)),
            "recovery does not report {inj:?}: {rec:#}"
        );
    }

    // Phase 2: the relay keeps serving. Same run, another worker.
    let spec2 = LoadSpec {
        workers: 1,
        first_worker: 1,
        series_per_worker: 40,
        samples_per_series: 2,
        requests_per_worker: Some(requests / 4),
        retry: RetryPolicy::Never,
        run_id: run_id.clone(),
        seed: scenario::seed() + 1,
        ..LoadSpec::default()
    };
    let ack2 = Load::run(spec2, &relay.write_url()).await.unwrap();
    assert_eq!(
        ack2.counts().acked_requests,
        requests / 4,
        "{}",
        ack2.summary()
    );
    let st = scenario::wait_caught_up(&relay, Duration::from_secs(120))
        .await
        .unwrap();
    let mut ack = ack1.clone();
    ack.merge(ack2.clone()).unwrap();

    // a had everything of phase 1 before the damage; it must also have
    // everything of phase 2.
    let va = verify(&a, &ack).await.unwrap();
    // b: exactly the damaged records are missing, nothing else.
    let vb_all = verify(&b, &ack).await.unwrap();
    let mut required_b = without(&ack1, &lost_records, &record);
    required_b.merge(ack2.clone()).unwrap();
    let vb = verify(&b, &required_b).await.unwrap();
    let per_request: u64 = 40 * 2;
    let expected_lost = lost_records.len() as u64 * per_request;

    let rb = replica_status(&st, "b");
    let log = std::fs::read_to_string(relay.log_path()).unwrap_or_default();
    let unreported: Vec<&Injury> = injuries
        .iter()
        .filter(|i| !i.lost.is_empty() && i.what != "tail truncated")
        .filter(|i| {
            let name = i.file.file_name().unwrap().to_str().unwrap();
            !log.lines().any(|l| {
                l.contains("skipped")
                    && l.contains(name)
                    && (l.contains(&format!("offset=Some({})", i.start))
                        || l.contains(&format!("offset={}", i.start)))
            })
        })
        .collect();

    report.set_injected(format!(
        "{n} segments: {}; {} acknowledged records damaged ({} of them in the truncated tail)",
        injuries
            .iter()
            .map(|i| format!(
                "{} ({} @{}, records {:?})",
                i.what,
                i.file.file_name().unwrap().to_string_lossy(),
                i.at,
                i.lost
            ))
            .collect::<Vec<_>>()
            .join("; "),
        lost_records.len(),
        tail.count,
    ));
    report.acknowledged(&ack);
    report.replica("a", &va);
    report.replica_scoped(
        "b",
        &vb,
        &format!(
            "acknowledged minus the {} damaged records ({} samples)",
            lost_records.len(),
            expected_lost
        ),
    );
    report.relay_counters(&st);
    report.note(format!(
        "b against everything acknowledged: lost {} samples, expected exactly {} (the damaged records)",
        vb_all.lost, expected_lost
    ));
    report.note(format!(
        "b skipped_records {} (expected {skippable}: every damaged record; the truncated tail is also reported by recovery)",
        rb["skipped_records"]
    ));
    report.note(format!(
        "damage the relay's log does not name with file and offset: {:?}",
        unreported.iter().map(|i| i.what).collect::<Vec<_>>()
    ));
    report.emit();

    assert_eq!(vb_all.lost, expected_lost, "{}", vb_all.details());
    assert_eq!(rb["skipped_records"], skippable, "{rb:#}");
    assert!(unreported.is_empty(), "not reported: {unreported:#?}");
    let ra = replica_status(&st, "a");
    assert_eq!(ra["skipped_records"], 0, "{ra:#}");
    report.assert_lossless();

    // verify still names the damage the relay did not repair (it cut the
    // torn tail only).
    relay.stop(Duration::from_secs(20)).await.unwrap();
    let (code, v) = wal_verify(&data);
    assert_eq!(code, 1, "{v:#}");
    for inj in injuries.iter().filter(|i| i.file != last.path) {
        assert!(
            finding_for(&v, inj).is_some(),
            "{inj:?} no longer named: {v:#}"
        );
    }
}

/// The checkpoint store damaged under a relay killed with SIGKILL, the two
/// ways sled is known to be damaged:
///
/// * its settings file (`checkpoints/conf`) torn: sled writes it in place,
///   in two writes, when it creates the store, and a relay killed between
///   them could never open its store again. The relay must write it again
///   whole and keep every position (a is not sent anything again).
/// * a file sled refuses (here a snapshot that does not check out): the
///   relay must start anyway, with the store moved aside, and start every
///   replica at the oldest record, so that b, away the whole time and
///   holding nothing, still receives every acknowledged sample, and a,
///   which had everything, loses nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_checkpoint_store_neither_stops_the_relay_nor_skips_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let a = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let mut b = Prometheus::start(PrometheusOpts::server()).await.unwrap();
    let args = ["--retry-min-backoff", "50ms", "--retry-max-backoff", "1s"];
    let mut relay = Relay::start(
        &data,
        &[("a", &a.write_url()), ("b", &b.write_url())],
        &args,
    )
    .await
    .unwrap();
    b.kill().unwrap();

    let run_id = LoadSpec::new_run_id();
    let spec = |worker: u32, seed: u64| LoadSpec {
        workers: 2,
        first_worker: worker,
        series_per_worker: 40,
        samples_per_series: 2,
        requests_per_worker: Some(scaled(60, 600)),
        retry: RetryPolicy::Never,
        run_id: run_id.clone(),
        seed,
        ..LoadSpec::default()
    };
    let ack1 = Load::run(spec(0, scenario::seed()), &relay.write_url())
        .await
        .unwrap();
    assert_eq!(ack1.counts().acked_requests, 2 * scaled(60, 600));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let head = loop {
        let st = relay.status().await.unwrap();
        if scenario::settled(replica_status(&st, "a")) {
            break st["wal"]["head_seq"].as_u64().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "a did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let store = data.join("checkpoints");

    // 1. The settings file torn: the settings without their CRC.
    relay.sigkill().unwrap();
    let conf = store.join("conf");
    let whole = std::fs::read(&conf).unwrap();
    std::fs::write(&conf, &whole[..whole.len() - 4]).unwrap();
    relay.restart().await.unwrap();
    let st = relay.status().await.unwrap();
    let ra = replica_status(&st, "a");
    assert_eq!(ra["cursor"], head, "a's position kept: {ra:#}");
    assert_eq!(ra["sent_records"], 0, "nothing sent to a again: {ra:#}");
    assert_eq!(std::fs::read(&conf).unwrap(), whole, "written again whole");
    let log = std::fs::read_to_string(relay.log_path()).unwrap_or_default();
    assert!(
        log.contains("settings file was torn"),
        "{}",
        relay.log_tail(30)
    );
    assert_eq!(
        relay
            .metric_sum("walrelay_checkpoint_store_set_aside_total", &[])
            .await
            .unwrap(),
        0.0
    );

    // 2. A file sled refuses: the store is moved aside.
    relay.sigkill().unwrap();
    std::fs::write(store.join("snap.000000000000FFFF"), [0xA5u8; 40]).unwrap();
    relay.restart().await.unwrap();
    assert_eq!(
        relay
            .metric_sum("walrelay_checkpoint_store_set_aside_total", &[])
            .await
            .unwrap(),
        1.0,
        "{}",
        relay.log_tail(30)
    );
    let aside: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoints.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged store is kept: {aside:?}");
    assert!(data.join(&aside[0]).join("snap.000000000000FFFF").exists());

    // b comes back; more load; both replicas must hold everything.
    b.start_again().await.unwrap();
    let ack2 = Load::run(spec(2, scenario::seed() + 1), &relay.write_url())
        .await
        .unwrap();
    let st = scenario::wait_caught_up(&relay, Duration::from_secs(120))
        .await
        .unwrap();
    let mut ack = ack1.clone();
    ack.merge(ack2).unwrap();
    let va = verify(&a, &ack).await.unwrap();
    let vb = verify(&b, &ack).await.unwrap();
    let ra = replica_status(&st, "a");
    assert!(
        ra["sent_records"].as_u64().unwrap() >= head,
        "a starts again at the oldest record: {ra:#}"
    );
    va.assert_lossless();
    vb.assert_lossless();
    relay.stop(Duration::from_secs(20)).await.unwrap();
}
