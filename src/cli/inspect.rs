//! `walrelay wal inspect`: the segments, what they hold, and where each
//! replica stands.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

use super::common::{self, CursorsView, DataDir, Table};
use super::scan::{self, Event};
use crate::checkpoint::Cursor;

/// `walrelay wal inspect`
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The relay's data directory.
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One segment's contents.
#[derive(Debug, Default, Serialize)]
struct SegmentInfo {
    file: String,
    first_seq: u64,
    /// Last sequence number present (inclusive); None when empty.
    last_seq: Option<u64>,
    records: u64,
    samples: u64,
    bytes: u64,
    first_receive_ms: Option<i64>,
    last_receive_ms: Option<i64>,
    oldest_sample_ms: Option<i64>,
    newest_sample_ms: Option<i64>,
    damaged_places: usize,
    header_problem: Option<String>,
}

/// A replica's position and what it still has to get.
#[derive(Debug, Serialize)]
struct ReplicaInfo {
    name: String,
    cursor: Option<u64>,
    inflight: Option<std::ops::Range<u64>>,
    lag_records: u64,
    lag_bytes: u64,
    /// Now minus the receive time of the oldest record not yet delivered.
    lag_seconds: f64,
    oldest_undelivered_receive_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
struct Totals {
    segments: usize,
    records: u64,
    samples: u64,
    bytes: u64,
    first_seq: Option<u64>,
    end_seq: Option<u64>,
    first_receive_ms: Option<i64>,
    last_receive_ms: Option<i64>,
    oldest_sample_ms: Option<i64>,
    newest_sample_ms: Option<i64>,
    damaged_places: usize,
}

#[derive(Debug, Serialize)]
struct TornTail {
    file: PathBuf,
    offset: u64,
    bytes: u64,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Report {
    data_dir: PathBuf,
    relay_running_pid: Option<String>,
    segments: Vec<SegmentInfo>,
    totals: Totals,
    torn_tail: Option<TornTail>,
    replicas: Vec<ReplicaInfo>,
    replicas_unavailable: Option<String>,
}

fn min_opt(a: Option<i64>, b: i64) -> Option<i64> {
    Some(a.map_or(b, |a| a.min(b)))
}
fn max_opt(a: Option<i64>, b: i64) -> Option<i64> {
    Some(a.map_or(b, |a| a.max(b)))
}

/// Lag accounting for one replica while the log is scanned in order.
struct Lag {
    name: String,
    cursor: Cursor,
    from: u64,
    bytes: u64,
    oldest_ms: Option<i64>,
}

/// Runs `walrelay wal inspect`.
///
/// # Errors
/// The data dir is missing or unreadable.
pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    let dir = DataDir::open(&args.data_dir)?;
    let running = dir.relay_pid()?;
    let (mut lags, unavailable) = match dir.read_cursors()? {
        CursorsView::Available(list) => (
            list.into_iter()
                .map(|(name, cursor)| Lag {
                    from: cursor.delivered.unwrap_or(0),
                    name,
                    cursor,
                    bytes: 0,
                    oldest_ms: None,
                })
                .collect::<Vec<_>>(),
            None,
        ),
        CursorsView::Unavailable(why) => (Vec::new(), Some(why)),
    };
    let files = scan::list_segments(&dir.wal)?;
    let count = files.len();
    let mut segments = Vec::new();
    let mut torn_tail = None;
    let mut end_seq: Option<u64> = None;
    for (i, f) in files.iter().enumerate() {
        let mut s = SegmentInfo {
            file: f.name.clone(),
            first_seq: f.first_seq,
            bytes: f.len,
            header_problem: scan::header_problem(f)?,
            ..SegmentInfo::default()
        };
        if s.header_problem.is_some() {
            s.damaged_places += 1;
        }
        scan::scan_segment(f, f.len, |ev| {
            match ev {
                Event::Frame {
                    len,
                    header,
                    records,
                    ..
                } => {
                    for lag in &mut lags {
                        if header.end_seq() > lag.from {
                            lag.bytes += len;
                        }
                    }
                    for r in records {
                        s.records += 1;
                        s.samples += u64::from(r.meta.samples);
                        s.last_seq = Some(r.seq);
                        let t = r.meta.receive_time_ms;
                        s.first_receive_ms = s.first_receive_ms.or(Some(t));
                        s.last_receive_ms = Some(t);
                        if r.meta.min_sample_ts <= r.meta.max_sample_ts {
                            s.oldest_sample_ms = min_opt(s.oldest_sample_ms, r.meta.min_sample_ts);
                            s.newest_sample_ms = max_opt(s.newest_sample_ms, r.meta.max_sample_ts);
                        }
                        for lag in &mut lags {
                            if r.seq >= lag.from && lag.oldest_ms.is_none() {
                                lag.oldest_ms = Some(t);
                            }
                        }
                    }
                    end_seq = Some(header.end_seq());
                }
                Event::Damage {
                    offset,
                    end,
                    reason,
                    code,
                    ..
                } => {
                    if i + 1 == count && end >= f.len {
                        torn_tail = Some(TornTail {
                            file: f.path.clone(),
                            offset,
                            bytes: end - offset,
                            reason: format!("{reason} [{code}]"),
                        });
                    } else {
                        s.damaged_places += 1;
                    }
                }
            }
            Ok(())
        })?;
        if end_seq.is_none() {
            end_seq = Some(f.first_seq);
        }
        segments.push(s);
    }
    let totals = Totals {
        segments: segments.len(),
        records: segments.iter().map(|s| s.records).sum(),
        samples: segments.iter().map(|s| s.samples).sum(),
        bytes: segments.iter().map(|s| s.bytes).sum(),
        first_seq: segments.first().map(|s| s.first_seq),
        end_seq,
        first_receive_ms: segments.iter().filter_map(|s| s.first_receive_ms).min(),
        last_receive_ms: segments.iter().filter_map(|s| s.last_receive_ms).max(),
        oldest_sample_ms: segments.iter().filter_map(|s| s.oldest_sample_ms).min(),
        newest_sample_ms: segments.iter().filter_map(|s| s.newest_sample_ms).max(),
        damaged_places: segments.iter().map(|s| s.damaged_places).sum(),
    };
    let now = crate::types::now_ms();
    let end = end_seq.unwrap_or(0);
    let replicas = lags
        .into_iter()
        .map(|l| {
            let lag_records = end.saturating_sub(l.from);
            ReplicaInfo {
                lag_records,
                lag_bytes: if lag_records == 0 { 0 } else { l.bytes },
                lag_seconds: match (lag_records, l.oldest_ms) {
                    (0, _) | (_, None) => 0.0,
                    (_, Some(t)) => (now - t).max(0) as f64 / 1000.0,
                },
                oldest_undelivered_receive_ms: if lag_records == 0 { None } else { l.oldest_ms },
                name: l.name,
                cursor: l.cursor.delivered,
                inflight: l.cursor.inflight,
            }
        })
        .collect();
    let report = Report {
        data_dir: dir.root.clone(),
        relay_running_pid: running,
        segments,
        totals,
        torn_tail,
        replicas,
        replicas_unavailable: unavailable,
    };
    let mut out = common::stdout();
    if args.json {
        common::write_json_pretty(&mut out, &report)?;
    } else {
        write_text(&mut out, &report)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn write_text(out: &mut impl Write, r: &Report) -> Result<()> {
    if let Some(pid) = &r.relay_running_pid {
        writeln!(
            out,
            "note: a walrelay (pid {pid}) is running on this data dir; this is a snapshot\n"
        )?;
    }
    let mut t = Table::new(&[
        "SEGMENT",
        "FIRST_SEQ",
        "LAST_SEQ",
        "RECORDS",
        "SAMPLES",
        "BYTES",
        "FIRST_RECEIVED",
        "LAST_RECEIVED",
        "OLDEST_SAMPLE",
        "NEWEST_SAMPLE",
        "DAMAGE",
    ]);
    for s in &r.segments {
        t.row(vec![
            s.file.clone(),
            s.first_seq.to_string(),
            opt(s.last_seq),
            s.records.to_string(),
            s.samples.to_string(),
            s.bytes.to_string(),
            common::fmt_opt_time(s.first_receive_ms),
            common::fmt_opt_time(s.last_receive_ms),
            common::fmt_opt_time(s.oldest_sample_ms),
            common::fmt_opt_time(s.newest_sample_ms),
            s.damaged_places.to_string(),
        ]);
    }
    if t.is_empty() {
        writeln!(out, "the log is empty (no segments)")?;
    } else {
        t.write(out)?;
    }
    let tt = &r.totals;
    writeln!(
        out,
        "\ntotal: {} segments, {} records (sequence {}..{}), {} samples, {} ({} bytes)",
        tt.segments,
        tt.records,
        opt(tt.first_seq),
        opt(tt.end_seq),
        tt.samples,
        common::fmt_bytes(tt.bytes),
        tt.bytes
    )?;
    writeln!(
        out,
        "received {} .. {}; samples {} .. {}",
        common::fmt_opt_time(tt.first_receive_ms),
        common::fmt_opt_time(tt.last_receive_ms),
        common::fmt_opt_time(tt.oldest_sample_ms),
        common::fmt_opt_time(tt.newest_sample_ms),
    )?;
    if let Some(torn) = &r.torn_tail {
        writeln!(
            out,
            "TORN TAIL: {} bytes at offset {} of {} ({}); the relay's next start or \
             `walrelay wal repair` cuts them off",
            torn.bytes,
            torn.offset,
            torn.file.display(),
            torn.reason
        )?;
    }
    if tt.damaged_places > 0 {
        writeln!(
            out,
            "DAMAGE: {} damaged place(s); `walrelay wal verify` lists them",
            tt.damaged_places
        )?;
    }
    writeln!(out)?;
    if let Some(why) = &r.replicas_unavailable {
        writeln!(out, "replica cursors unavailable: {why}")?;
        return Ok(());
    }
    if r.replicas.is_empty() {
        writeln!(out, "no replica cursors stored")?;
        return Ok(());
    }
    let mut t = Table::new(&[
        "REPLICA",
        "CURSOR",
        "INFLIGHT",
        "LAG_RECORDS",
        "LAG_BYTES",
        "LAG_TIME",
    ]);
    for rep in &r.replicas {
        t.row(vec![
            rep.name.clone(),
            opt(rep.cursor),
            rep.inflight
                .as_ref()
                .map_or_else(|| "-".into(), |i| format!("{}..{}", i.start, i.end)),
            rep.lag_records.to_string(),
            rep.lag_bytes.to_string(),
            if rep.lag_records == 0 {
                "0s".into()
            } else {
                common::fmt_duration_ms((rep.lag_seconds * 1000.0) as i64)
            },
        ]);
    }
    t.write(out)?;
    Ok(())
}
