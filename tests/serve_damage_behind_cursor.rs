//! A replica whose position lies past a damaged frame header, in the same
//! sealed segment, across a restart of a real relay (issue 14).
//!
//! A reader opened inside a segment skips the frames before its position by
//! their headers; a damaged header stops that skip, and the reader
//! resynchronises on the next intact frame, which starts below its
//! position. That damage is not the replica's loss: the replica must get
//! every record from its position on, its cursor must never move below it,
//! and nothing may be counted as skipped for it. (Before the fix the reader
//! reported a gap ending behind its start; the shipper's `to - from`
//! underflowed, which stops a debug build's shipper for good and moves a
//! release build's cursor backwards.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_common;

use std::path::Path;
use std::time::{Duration, Instant};

use chaos_tests::prometheus::Prometheus;
use chaos_tests::relay::{replica_status, Relay};
use cli_common::*;
use wal_format::{decode_frame_header, SEGMENT_HEADER_LEN};

/// The frames of an intact segment file: (offset, first_seq, end_seq).
fn frames(path: &Path) -> Vec<(u64, u64, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let salt = first_seq(path);
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER_LEN;
    while at < bytes.len() {
        let h = decode_frame_header(salt, &bytes[at..]).unwrap();
        out.push((at as u64, h.first_seq, h.end_seq()));
        at += h.total_len();
    }
    out
}

/// What the relay's log says went wrong: its panics, else its tail.
fn trouble(relay: &Relay) -> String {
    let log = std::fs::read_to_string(relay.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let panics: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("panicked"))
        .map(|(i, l)| format!("{l} {}", lines.get(i + 1).unwrap_or(&"")))
        .collect();
    if panics.is_empty() {
        relay.log_tail(40)
    } else {
        panics.join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_checkpointed_past_a_damaged_frame_header_gets_every_record_from_its_position_after_a_restart(
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut prom = Prometheus::start_server().await.unwrap();
    // The replica is away while the log is written: it receives nothing.
    prom.kill().unwrap();
    let mut relay = Relay::start_with_bin(
        BIN,
        dir,
        &[("r", &prom.write_url())],
        &["--segment-bytes", "16KiB", "--compression", "none"],
    )
    .await
    .unwrap();
    // One request (40 series x 2 samples) to a frame, several frames to a
    // segment; one request at a time, so record i is request i.
    let t = Traffic {
        metric: "damage_behind_cursor_total".into(),
        requests: 30,
        series: 40,
        samples_per_series: 2,
    };
    let written = post_traffic(&relay, &t).await;
    let st = relay.status().await.unwrap();
    assert_eq!(st["wal"]["head_seq"], 30, "one record per request");
    relay.stop(Duration::from_secs(30)).await.unwrap();

    // Damage the header of a middle frame of a sealed segment, and put the
    // replica two frames after it, in the same segment.
    let segs = segments(dir);
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    let seg = &segs[1];
    let fr = frames(seg);
    let mid = fr.len() / 2;
    assert!(mid + 2 < fr.len(), "frames of {}: {fr:?}", seg.display());
    let (damaged_at, damaged_first, _) = fr[mid];
    // Two bytes of its first_seq field: the header checksum fails.
    let mut bytes = std::fs::read(seg).unwrap();
    let at = damaged_at as usize + 8;
    bytes[at..at + 2].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(seg, &bytes).unwrap();
    let position = fr[mid + 2].1;
    assert!(position > damaged_first);
    let o = cli_dir(
        &["cursors", "set"],
        dir,
        &["--replica", "r", "--seq", &position.to_string()],
    );
    expect_code(&o, 0, "cursors set");

    prom.start_again().await.unwrap();
    relay.restart().await.unwrap();

    // While it delivers, the cursor never goes below the position.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let caught_up = loop {
        let st = relay
            .status()
            .await
            .unwrap_or_else(|e| panic!("status: {e:#}\nwalrelay log:\n{}", trouble(&relay)));
        let r = replica_status(&st, "r").clone();
        let cursor = r["cursor"].as_u64().unwrap();
        if seen.last() != Some(&cursor) {
            seen.push(cursor);
        }
        assert!(
            cursor >= position,
            "the cursor went below {position}: {seen:?}\n{r:#}\nwalrelay log:\n{}",
            trouble(&relay)
        );
        if chaos_tests::scenario::settled(&r) && cursor == 30 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "r did not catch up from {position}; cursors seen {seen:?}\n{r:#}\nwalrelay log:\n{}",
            trouble(&relay)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "frame {mid} of {} damaged (records from {damaged_first}), r set to {position}; \
         cursors seen: {seen:?}",
        seg.display()
    );
    assert_eq!(
        caught_up["skipped_records"], 0,
        "the damage lies before r's position: {caught_up:#}"
    );
    assert!(relay.is_running());
    let log = std::fs::read_to_string(relay.log_path()).unwrap_or_default();
    assert!(!log.contains("panicked"), "{}", trouble(&relay));
    // The damage is still a damaged place of the log, found and counted once.
    assert!(
        log.contains("before this reader's position"),
        "the damage found is logged: {}",
        relay.log_tail(40)
    );
    let corruptions = relay
        .metric_sum("walrelay_wal_corruptions_total", &[])
        .await
        .unwrap();
    assert_eq!(corruptions, 1.0);

    // The replica holds exactly the samples of requests position.., each
    // once, and nothing from before.
    let per_request = t.series * t.samples_per_series;
    let mut want: std::collections::BTreeMap<String, Vec<(i64, f64)>> = Default::default();
    for s in &written.samples[position as usize * per_request..] {
        want.entry(s.instance.clone())
            .or_default()
            .push((s.ts, s.value));
    }
    let got: std::collections::BTreeMap<String, Vec<(i64, f64)>> = prom
        .api()
        .raw_series(&t.metric, written.min_ts - 1, written.max_ts + 1, 3_600_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(labels, samples)| (labels["instance"].clone(), samples))
        .collect();
    assert_eq!(got, want, "r holds exactly requests {position}..30");
}
