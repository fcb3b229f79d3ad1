//! `walrelay wal inspect|verify|dump|repair` over real logs written by
//! `walrelay serve`: clean, then damaged the ways disks and operators damage
//! them (bytes flipped mid-segment, a torn tail, a segment file deleted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use cli_common::*;
use serde_json::Value;

/// Uncompressed 16 KiB segments, so the hundred-odd KiB of stored bodies make several of them
/// and byte offsets are easy to aim at.
const SMALL_SEGMENTS: &[&str] = &["--segment-bytes", "16KiB", "--compression", "none"];

fn traffic(metric: &str) -> Traffic {
    Traffic {
        metric: metric.into(),
        requests: 60,
        series: 20,
        samples_per_series: 10,
    }
}

async fn log_with_segments(dir: &Path, metric: &str) -> Written {
    let w = write_log(dir, &traffic(metric), &[], SMALL_SEGMENTS).await;
    assert!(
        segments(dir).len() >= 4,
        "several segments written: {:?}",
        segments(dir)
    );
    w
}

fn verify_json(dir: &Path) -> (i32, Value) {
    let o = cli_dir(&["wal", "verify"], dir, &["--json"]);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    (o.status.code().unwrap(), json(&o))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_log_verifies_and_inspect_shows_its_segments_records_and_times() {
    let tmp = tempfile::tempdir().unwrap();
    let w = log_with_segments(tmp.path(), "cli_clean_total").await;

    let o = cli_dir(&["wal", "verify"], tmp.path(), &[]);
    expect_code(&o, 0, "verify of a clean log");
    assert!(stdout(&o).contains("clean"), "{}", stdout(&o));
    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 0);
    assert_eq!(v["clean"], true);
    assert_eq!(v["records"], w.requests as u64);
    assert_eq!(v["samples"], w.total_samples() as u64);

    let o = cli_dir(&["wal", "inspect"], tmp.path(), &["--json"]);
    expect_code(&o, 0, "inspect --json");
    let v = json(&o);
    let segs = v["segments"].as_array().unwrap();
    assert_eq!(segs.len(), segments(tmp.path()).len());
    assert_eq!(v["totals"]["records"], w.requests as u64);
    assert_eq!(v["totals"]["samples"], w.total_samples() as u64);
    assert_eq!(v["totals"]["first_seq"], 0);
    assert_eq!(v["totals"]["end_seq"], w.requests as u64);
    assert_eq!(v["totals"]["oldest_sample_ms"], w.min_ts);
    assert_eq!(v["totals"]["newest_sample_ms"], w.max_ts);
    assert!(v["torn_tail"].is_null());
    let now = now_ms();
    let received = v["totals"]["first_receive_ms"].as_i64().unwrap();
    assert!(
        (now - received).abs() < 300_000,
        "receive time is recent: {received}"
    );
    // Segments follow one another without holes.
    for pair in segs.windows(2) {
        assert_eq!(
            pair[0]["last_seq"].as_u64().unwrap() + 1,
            pair[1]["first_seq"].as_u64().unwrap()
        );
    }
    let o = cli_dir(&["wal", "inspect"], tmp.path(), &[]);
    expect_code(&o, 0, "inspect");
    let text = stdout(&o);
    assert!(text.contains("00000000000000000000.wal"), "{text}");
    assert!(text.contains(&format!("{} records", w.requests)), "{text}");
    assert!(
        text.contains("no replica cursors") || text.contains("no checkpoint store"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_selects_records_and_decodes_samples_by_range_time_and_matcher() {
    let tmp = tempfile::tempdir().unwrap();
    let t = Traffic {
        metric: "cli_dump_total".into(),
        requests: 12,
        series: 5,
        samples_per_series: 4,
    };
    let w = write_log(tmp.path(), &t, &[], &[]).await;

    let o = cli_dir(&["wal", "dump"], tmp.path(), &["--json"]);
    expect_code(&o, 0, "dump --json");
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    assert_eq!(lines[3]["seq"], 3);
    assert_eq!(lines[3]["samples"], 20);
    assert_eq!(lines[3]["kind"], "v1");
    // wal-format/SPEC.md, "Record entries": ingest stores a validated 1.0
    // body as its sender compressed it (encoding 1, snappy), unless snappy
    // made it larger than the message; these bodies repeat their labels.
    assert!(lines.iter().all(|l| l["encoding"] == "snappy"), "{lines:?}");

    let o = cli_dir(
        &["wal", "dump"],
        tmp.path(),
        &["--from-seq", "4", "--to-seq", "7"],
    );
    expect_code(&o, 0, "dump a sequence range");
    assert_eq!(stdout(&o).lines().count(), 1 + 4, "{}", stdout(&o));

    // Samples of one series, as JSON lines, exactly as written.
    let o = cli_dir(
        &["wal", "dump"],
        tmp.path(),
        &[
            "--samples",
            "--json",
            "--match",
            r#"cli_dump_total{instance=~"host-00[3]",job!="x"}"#,
        ],
    );
    expect_code(&o, 0, "dump --samples --match");
    let got: Vec<(i64, f64)> = stdout(&o)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["labels"]["instance"], "host-003");
            (
                v["timestamp"].as_i64().unwrap(),
                v["value"].as_f64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(i64, f64)> = w
        .samples
        .iter()
        .filter(|s| s.instance == "host-003")
        .map(|s| (s.ts, s.value))
        .collect();
    assert_eq!(got, want);

    // A sample-time window, in text.
    let from = w.samples[8].ts;
    let until = from + 400;
    let o = cli_dir(
        &["wal", "dump"],
        tmp.path(),
        &[
            "--samples",
            "--sample-since",
            &from.to_string(),
            "--sample-until",
            &until.to_string(),
            "--match",
            r#"{instance="host-000"}"#,
        ],
    );
    expect_code(&o, 0, "dump with a sample-time window");
    let text = stdout(&o);
    let want = w
        .samples
        .iter()
        .filter(|s| s.instance == "host-000" && s.ts >= from && s.ts < until)
        .count();
    assert_eq!(text.lines().count(), want, "{text}");
    assert!(
        text.lines()
            .all(|l| l
                .starts_with(r#"cli_dump_total{instance="host-000",job="walrelay-cli-test"} "#)),
        "{text}"
    );

    // Receive-time selection: everything was received within the last minutes.
    let o = cli_dir(&["wal", "dump"], tmp.path(), &["--since", "10m", "--json"]);
    expect_code(&o, 0, "dump --since");
    assert_eq!(stdout(&o).lines().count(), 12);
    let o = cli_dir(&["wal", "dump"], tmp.path(), &["--until", "10m", "--json"]);
    expect_code(&o, 0, "dump --until");
    assert_eq!(stdout(&o).lines().count(), 0);

    let o = cli_dir(&["wal", "dump"], tmp.path(), &["--match", "{job=~\"(\"}"]);
    expect_code(&o, 1, "a bad matcher");
    assert!(stderr(&o).contains("regular expression"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_mid_segment_fail_verify_naming_file_and_offset_and_repair_moves_them_aside()
{
    let tmp = tempfile::tempdir().unwrap();
    let w = log_with_segments(tmp.path(), "cli_flip_total").await;
    let segs = segments(tmp.path());
    let victim = &segs[1];
    let len = std::fs::metadata(victim).unwrap().len();
    let pos = len / 2;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(victim)
        .unwrap();
    let mut buf = [0u8; 16];
    f.read_exact_at(&mut buf, pos).unwrap();
    for b in &mut buf {
        *b ^= 0x5a;
    }
    f.write_all_at(&buf, pos).unwrap();
    drop(f);

    let o = cli_dir(&["wal", "verify"], tmp.path(), &[]);
    expect_code(&o, 1, "verify of a damaged log");
    let text = stdout(&o);
    assert!(text.contains(&victim.display().to_string()), "{text}");
    assert!(text.contains("DAMAGED"), "{text}");

    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 1);
    let damage = v["damage"].as_array().unwrap();
    assert_eq!(damage.len(), 1, "exactly one damaged place: {v:#}");
    let d = &damage[0];
    assert_eq!(d["file"], victim.display().to_string());
    assert_eq!(d["kind"], "corrupt");
    let offset = d["offset"].as_u64().unwrap();
    let length = d["length"].as_u64().unwrap();
    assert!(
        offset <= pos && pos < offset + length,
        "damage {offset}+{length} covers the flipped byte {pos}"
    );
    let lost_from = d["lost"]["from"].as_u64().unwrap();
    let lost_to = d["lost"]["to"].as_u64().unwrap();
    assert!(lost_from >= first_seq(victim) && lost_to > lost_from, "{d}");
    assert!(text.contains(&offset.to_string()), "{text}");

    // Repair keeps the damaged original and rewrites the segment around it.
    let o = cli_dir(&["wal", "repair"], tmp.path(), &["--dry-run"]);
    expect_code(&o, 0, "repair --dry-run");
    assert_eq!(verify_json(tmp.path()).0, 1, "a dry run changes nothing");
    let o = cli_dir(&["wal", "repair"], tmp.path(), &[]);
    expect_code(&o, 0, "repair");
    assert!(stdout(&o).contains("rewrite_segment"), "{}", stdout(&o));
    let kept = tmp
        .path()
        .join("wal/damaged")
        .join(victim.file_name().unwrap());
    assert_eq!(
        std::fs::metadata(&kept).unwrap().len(),
        len,
        "original kept whole"
    );
    assert!(std::fs::metadata(victim).unwrap().len() < len);

    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 0, "clean after repair: {v:#}");
    let known: Vec<&Value> = v["damage"].as_array().unwrap().iter().collect();
    assert_eq!(known.len(), 1, "the lost range is listed as known: {v:#}");
    assert_eq!(known[0]["lost"]["from"], lost_from);
    assert_eq!(known[0]["lost"]["to"], lost_to);
    assert!(known[0]["known"].is_string());
    assert_eq!(
        v["records"].as_u64().unwrap(),
        w.requests as u64 - (lost_to - lost_from)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_reported_by_inspect_and_cut_by_repair_which_keeps_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let w = log_with_segments(tmp.path(), "cli_torn_total").await;
    let last = segments(tmp.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 100)
        .unwrap();

    let o = cli_dir(&["wal", "inspect"], tmp.path(), &[]);
    expect_code(&o, 0, "inspect of a torn log");
    assert!(stdout(&o).contains("TORN TAIL"), "{}", stdout(&o));
    let o = cli_dir(&["wal", "inspect"], tmp.path(), &["--json"]);
    let v = json(&o);
    let torn = &v["torn_tail"];
    assert_eq!(torn["file"], last.display().to_string());
    let cut_at = torn["offset"].as_u64().unwrap();
    assert_eq!(torn["bytes"].as_u64().unwrap(), len - 100 - cut_at);
    assert_eq!(v["totals"]["records"], w.requests as u64 - 1);

    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 1);
    assert_eq!(v["damage"][0]["kind"], "torn_tail");
    assert_eq!(v["damage"][0]["offset"], cut_at);
    assert_eq!(v["damage"][0]["lost"]["from"], w.requests as u64 - 1);

    let o = cli_dir(&["wal", "repair"], tmp.path(), &["--json"]);
    expect_code(&o, 0, "repair of a torn tail");
    let r = json(&o);
    assert_eq!(r["actions"][0]["action"], "truncate_tail");
    assert_eq!(r["clean_after"], true);
    let aside = tmp.path().join("wal/damaged").join(format!(
        "{}.{cut_at}.bin",
        last.file_name().unwrap().to_string_lossy()
    ));
    assert_eq!(
        std::fs::metadata(&aside).unwrap().len(),
        len - 100 - cut_at,
        "the cut bytes are kept"
    );
    assert_eq!(std::fs::metadata(&last).unwrap().len(), cut_at);
    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 0, "{v:#}");
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v:#}");

    // The relay starts on the repaired log and goes on numbering after it
    // (with no replica configured it may delete the sealed segments).
    let t = Traffic {
        requests: 2,
        ..traffic("cli_torn_total")
    };
    write_log(tmp.path(), &t, &[], SMALL_SEGMENTS).await;
    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["end_seq"], w.requests as u64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_middle_segment_is_reported_as_the_missing_sequence_range() {
    let tmp = tempfile::tempdir().unwrap();
    log_with_segments(tmp.path(), "cli_missing_total").await;
    let segs = segments(tmp.path());
    let (gone, next) = (&segs[1], &segs[2]);
    std::fs::remove_file(gone).unwrap();

    let o = cli_dir(&["wal", "verify"], tmp.path(), &[]);
    expect_code(&o, 1, "verify with a missing segment");
    let text = stdout(&o);
    let range = format!("{}..{}", first_seq(gone), first_seq(next));
    assert!(text.contains(&range), "{text}");
    assert!(text.contains(&next.display().to_string()), "{text}");
    let (_, v) = verify_json(tmp.path());
    let d = &v["damage"][0];
    assert_eq!(d["kind"], "missing_records");
    assert_eq!(d["lost"]["from"], first_seq(gone));
    assert_eq!(d["lost"]["to"], first_seq(next));

    // Readers see the same hole.
    let o = cli_dir(&["wal", "dump"], tmp.path(), &["--json"]);
    expect_code(&o, 1, "dump across a missing segment");
    assert!(stderr(&o).contains(&range), "{}", stderr(&o));

    // Repair can only acknowledge it; verify then lists it as known.
    let o = cli_dir(&["wal", "repair"], tmp.path(), &[]);
    expect_code(&o, 0, "repair records the hole");
    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 0, "{v:#}");
    assert!(v["damage"][0]["known"].is_string(), "{v:#}");
}

#[test]
fn a_missing_or_wrong_data_dir_is_a_clear_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    for cmd in [
        &["wal", "inspect"][..],
        &["wal", "verify"],
        &["wal", "dump"],
        &["wal", "repair"],
        &["cursors", "list"],
    ] {
        let o = cli_dir(cmd, &missing, &[]);
        expect_code(&o, 1, &format!("{cmd:?} on a missing dir"));
        assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
        let o = cli_dir(cmd, tmp.path(), &[]);
        expect_code(&o, 1, &format!("{cmd:?} on a dir without a log"));
        assert!(
            stderr(&o).contains("not a walrelay data dir"),
            "{}",
            stderr(&o)
        );
    }
    let o = cli(&[
        "wal",
        "replay",
        "--data-dir",
        tmp.path().to_str().unwrap(),
        "--to",
        "http://127.0.0.1:1/",
    ]);
    expect_code(&o, 1, "replay on a dir without a log");
    let o = cli(&["wal", "verify"]);
    expect_code(&o, 2, "a missing --data-dir is a usage error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_prints_native_histograms_and_exemplars() {
    use chaos_tests::encode::{post_remote_write, write_request_body};
    use prom_remote_write::v1::{self, histogram};

    let tmp = tempfile::tempdir().unwrap();
    let mut relay = chaos_tests::relay::Relay::start_with_bin(BIN, tmp.path(), &[], &[])
        .await
        .unwrap();
    let ts = now_ms() - 60_000;
    let label = |n: &str, v: &str| v1::Label {
        name: n.into(),
        value: v.into(),
    };
    let req = v1::WriteRequest {
        timeseries: vec![
            v1::TimeSeries {
                labels: vec![label("__name__", "cli_latency_seconds")],
                histograms: vec![v1::Histogram {
                    count: Some(histogram::Count::CountInt(3)),
                    sum: 3.5,
                    schema: 0,
                    zero_threshold: 0.001,
                    zero_count: Some(histogram::ZeroCount::ZeroCountInt(1)),
                    positive_spans: vec![v1::BucketSpan {
                        offset: 0,
                        length: 2,
                    }],
                    positive_deltas: vec![1, 0],
                    timestamp: ts,
                    ..Default::default()
                }],
                ..Default::default()
            },
            v1::TimeSeries {
                labels: vec![label("__name__", "cli_requests_total")],
                samples: vec![v1::Sample {
                    value: 42.0,
                    timestamp: ts,
                }],
                exemplars: vec![v1::Exemplar {
                    labels: vec![label("trace_id", "abc123")],
                    value: 0.25,
                    timestamp: ts,
                }],
                ..Default::default()
            },
        ],
        metadata: vec![],
    };
    let (status, body) = post_remote_write(&relay.write_url(), write_request_body(&req))
        .await
        .unwrap();
    assert_eq!(status, 204, "{body}");
    relay
        .stop(std::time::Duration::from_secs(30))
        .await
        .unwrap();

    let o = cli_dir(&["wal", "dump"], tmp.path(), &["--samples", "--json"]);
    expect_code(&o, 0, "dump --samples --json");
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", stdout(&o));
    let h = &lines[0];
    assert_eq!(h["labels"]["__name__"], "cli_latency_seconds");
    assert_eq!(h["timestamp"], ts);
    assert_eq!(h["histogram"]["count"], 3);
    assert_eq!(h["histogram"]["zero_count"], 1);
    assert_eq!(h["histogram"]["positive_deltas"], serde_json::json!([1, 0]));
    assert_eq!(lines[1]["value"], 42.0);
    assert_eq!(lines[2]["exemplar"]["labels"]["trace_id"], "abc123");
    assert_eq!(lines[2]["exemplar"]["value"], 0.25);

    let o = cli_dir(&["wal", "dump"], tmp.path(), &["--samples"]);
    expect_code(&o, 0, "dump --samples");
    let text = stdout(&o);
    assert!(text.contains("cli_latency_seconds{} histogram{"), "{text}");
    assert!(
        text.contains(&format!(
            "cli_requests_total{{}} # exemplar {{trace_id=\"abc123\"}} 0.25 {ts}"
        )),
        "{text}"
    );
    let o = cli_dir(&["wal", "verify"], tmp.path(), &[]);
    expect_code(&o, 0, "histograms and exemplars verify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_header_is_reported_and_repair_rewrites_it_losing_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let w = log_with_segments(tmp.path(), "cli_header_total").await;
    let victim = segments(tmp.path())[2].clone();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.write_all_at(b"XX", 0).unwrap();
    drop(f);

    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 1);
    let d = &v["damage"][0];
    assert_eq!(d["kind"], "bad_segment_header", "{v:#}");
    assert_eq!(d["file"], victim.display().to_string());
    assert_eq!(d["offset"], 0);
    assert_eq!(v["records"], w.requests as u64, "its frames are still read");

    let o = cli_dir(&["wal", "repair"], tmp.path(), &[]);
    expect_code(&o, 0, "repair of a segment header");
    let (code, v) = verify_json(tmp.path());
    assert_eq!(code, 0, "{v:#}");
    assert!(v["damage"].as_array().unwrap().is_empty(), "{v:#}");
    assert_eq!(v["records"], w.requests as u64);
    let kept = tmp
        .path()
        .join("wal/damaged")
        .join(victim.file_name().unwrap());
    let mut magic = [0u8; 2];
    std::fs::File::open(&kept)
        .unwrap()
        .read_exact_at(&mut magic, 0)
        .unwrap();
    assert_eq!(&magic, b"XX", "the damaged original is kept");
}
