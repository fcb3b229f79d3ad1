//! `walrelay cursors list|set|reset`: the replicas' checkpoints.
//!
//! A cursor is "every record below this sequence number is delivered". The
//! relay reads cursors at start only, so moving one needs the relay stopped:
//! `set` and `reset` take the data dir's lock and refuse, naming the pid,
//! while a relay holds it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Subcommand};
use serde::Serialize;

use super::common::{self, CursorsView, DataDir, Table};
use crate::checkpoint::Checkpoints;
use crate::wal::{ReadItem, Wal};

/// `walrelay cursors ...`
#[derive(Debug, Subcommand)]
pub enum CursorsCommand {
    /// Each replica's position, in-flight request, live-first backfill and lag.
    List(ListArgs),
    /// Move a replica's position (the relay must be stopped); drops a
    /// live-first backfill.
    Set(SetArgs),
    /// Forget a replica's position: at its next start it begins where the
    /// relay's --new-replica-start says (the relay must be stopped).
    Reset(ResetArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The relay's data directory.
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("target").required(true).args(["seq", "time", "head", "tail"])))]
pub struct SetArgs {
    /// The relay's data directory.
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The replica's name (as in --replica NAME=URL).
    #[arg(long)]
    pub replica: String,
    /// Everything below this sequence number counts as delivered.
    #[arg(long)]
    pub seq: Option<u64>,
    /// The first record received at or after this time (RFC 3339, unix ms,
    /// or a duration ago such as 2h).
    #[arg(long)]
    pub time: Option<String>,
    /// The end of the log: skip everything now on disk.
    #[arg(long)]
    pub head: bool,
    /// The oldest record on disk: deliver everything again.
    #[arg(long)]
    pub tail: bool,
    /// Create the position for a replica that has none yet.
    #[arg(long)]
    pub create: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// The relay's data directory.
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The replica's name.
    #[arg(long)]
    pub replica: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `cursors` subcommand.
///
/// # Errors
/// The data dir is missing, locked (set, reset), or the store is unreadable.
pub fn run(cmd: &CursorsCommand) -> Result<ExitCode> {
    match cmd {
        CursorsCommand::List(a) => list(a),
        CursorsCommand::Set(a) => set(a),
        CursorsCommand::Reset(a) => reset(a),
    }
}

#[derive(Serialize)]
struct Row {
    replica: String,
    delivered: Option<u64>,
    inflight: Option<std::ops::Range<u64>>,
    /// A live-first backfill's range still missing, and its request in flight.
    backfill: Option<crate::checkpoint::Backfill>,
    /// Delivery shards of the live stream; with more than one, `delivered`
    /// is the lowest shard's position and each shard's is in `shard_cursors`.
    shards: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shard_cursors: Vec<crate::checkpoint::ShardCursor>,
    lag_records: u64,
    lag_seconds: Option<f64>,
}

/// Receive time of the first readable record at or after `seq`.
fn receive_time_at(wal: &Wal, seq: u64) -> Result<Option<i64>> {
    let mut reader = wal.reader(seq);
    while let Some(item) = reader.try_next()? {
        if let ReadItem::Record(r) = item {
            return Ok(Some(r.meta.receive_time_ms));
        }
    }
    Ok(None)
}

fn list(a: &ListArgs) -> Result<ExitCode> {
    let dir = DataDir::open(&a.data_dir)?;
    let cursors = match dir.read_cursors()? {
        CursorsView::Available(c) => c,
        CursorsView::Unavailable(why) => bail!("cannot read the replica cursors: {why}"),
    };
    let (wal, _) = dir.open_wal()?;
    let end = wal.durable_end();
    let now = crate::types::now_ms();
    let mut rows = Vec::new();
    for (name, c) in cursors {
        let from = c.delivered.unwrap_or(0);
        let backfill_remaining = c
            .backfill
            .as_ref()
            .map_or(0, |b| b.to.saturating_sub(b.from));
        let lag = end.saturating_sub(from) + backfill_remaining;
        // The age of the oldest record not delivered: the backfill's start
        // when there is one.
        let from = c.backfill.as_ref().map_or(from, |b| b.from);
        let lag_seconds = if lag == 0 {
            Some(0.0)
        } else {
            receive_time_at(&wal, from)?.map(|t| (now - t).max(0) as f64 / 1000.0)
        };
        rows.push(Row {
            replica: name,
            delivered: c.delivered,
            shards: c.shard_count(),
            shard_cursors: c.shards.clone(),
            inflight: c.inflight,
            backfill: c.backfill,
            lag_records: lag,
            lag_seconds,
        });
    }
    let mut out = common::stdout();
    if a.json {
        common::write_json_pretty(&mut out, &rows)?;
    } else if rows.is_empty() {
        writeln!(out, "no replica cursors stored")?;
    } else {
        let mut t = Table::new(&[
            "REPLICA",
            "DELIVERED",
            "SHARDS",
            "INFLIGHT",
            "BACKFILL",
            "LAG_RECORDS",
            "LAG_TIME",
        ]);
        for r in &rows {
            t.row(vec![
                r.replica.clone(),
                r.delivered.map_or_else(|| "-".into(), |d| d.to_string()),
                r.shards.to_string(),
                inflight_cell(r),
                r.backfill.as_ref().map_or_else(
                    || "-".into(),
                    |b| match &b.inflight {
                        Some(i) => {
                            format!("{}..{} (inflight {}..{})", b.from, b.to, i.start, i.end)
                        }
                        None => format!("{}..{}", b.from, b.to),
                    },
                ),
                r.lag_records.to_string(),
                r.lag_seconds.map_or_else(
                    || "-".into(),
                    |s| common::fmt_duration_ms((s * 1000.0) as i64),
                ),
            ]);
        }
        t.write(&mut out)?;
        writeln!(out, "log: sequence {}..{}", wal.extent().first_seq, end)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The request in flight, or each shard's as `shard:from..to`.
fn inflight_cell(r: &Row) -> String {
    let ranges: Vec<String> = (0..)
        .zip(&r.shard_cursors)
        .filter_map(|(i, s)| {
            s.inflight
                .as_ref()
                .map(|f| format!("{i}:{}..{}", f.start, f.end))
        })
        .chain(
            r.inflight
                .as_ref()
                .map(|f| format!("{}..{}", f.start, f.end)),
        )
        .collect();
    if ranges.is_empty() {
        "-".into()
    } else {
        ranges.join(" ")
    }
}

/// The first sequence number whose record was received at or after `t`
/// (the end of the log when none was).
fn seq_at_time(wal: &Wal, t: i64) -> Result<u64> {
    // Receive times rise with sequence numbers (up to concurrent requests in
    // one group commit): start from the last segment whose first record is
    // older than `t`, then read on.
    let mut start = wal.extent().first_seq;
    for seg in wal.segments() {
        match receive_time_at(wal, seg.first_seq)? {
            Some(rt) if rt < t => start = seg.first_seq,
            _ => break,
        }
    }
    let mut reader = wal.reader(start);
    while let Some(item) = reader.try_next()? {
        if let ReadItem::Record(r) = item {
            if r.meta.receive_time_ms >= t {
                return Ok(r.seq);
            }
        }
    }
    Ok(wal.durable_end())
}

fn open_store(dir: &DataDir, create: bool) -> Result<Checkpoints> {
    let path = dir.checkpoints_path();
    if !path.exists() && !create {
        bail!(
            "no checkpoint store at {} (no replica has run on this data dir; \
             --create makes one)",
            path.display()
        );
    }
    Checkpoints::open(&path).with_context(|| format!("opening {}", path.display()))
}

fn set(a: &SetArgs) -> Result<ExitCode> {
    let dir = DataDir::open(&a.data_dir)?;
    let _lock = dir.lock("move a cursor")?;
    let cp = open_store(&dir, a.create)?;
    let known = cp.replicas()?;
    if !known.contains(&a.replica) && !a.create {
        bail!(
            "replica {:?} has no stored position (known: {}); pass --create to set one anyway",
            a.replica,
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        );
    }
    let (wal, _) = dir.open_wal()?;
    let extent = wal.extent();
    let target = if let Some(seq) = a.seq {
        if seq > extent.end_seq {
            bail!(
                "sequence {seq} is past the end of the log ({}): the replica would skip \
                 records written later; use --head for the end",
                extent.end_seq
            );
        }
        if seq < extent.first_seq {
            bail!(
                "sequence {seq} is before the oldest record on disk ({}); use --tail for the oldest",
                extent.first_seq
            );
        }
        seq
    } else if let Some(t) = &a.time {
        seq_at_time(&wal, common::parse_time(t)?)?
    } else if a.head {
        extent.end_seq
    } else {
        extent.first_seq
    };
    let before = cp.cursor(&a.replica)?;
    cp.set(&a.replica, target)?;
    if let Some(b) = &before.backfill {
        // Said on stderr so that --json output stays one document.
        eprintln!(
            "note: the live-first backfill {}..{} was dropped with the move: from {target} on \
             everything is sent in order",
            b.from, b.to
        );
    }
    let mut out = common::stdout();
    if a.json {
        common::write_json_pretty(
            &mut out,
            &serde_json::json!({
                "replica": a.replica,
                "before": before,
                "delivered": target,
                "log_first_seq": extent.first_seq,
                "log_end_seq": extent.end_seq,
                "to_deliver": extent.end_seq.saturating_sub(target),
            }),
        )?;
    } else {
        writeln!(
            out,
            "replica {}: cursor {} -> {target}; {} records to deliver at its next start \
             (log {}..{})",
            a.replica,
            before
                .delivered
                .map_or_else(|| "(none)".into(), |d| d.to_string()),
            extent.end_seq.saturating_sub(target),
            extent.first_seq,
            extent.end_seq
        )?;
        if let Some(r) = before.inflight {
            writeln!(
                out,
                "the in-flight request {}..{} was forgotten with the old position",
                r.start, r.end
            )?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn reset(a: &ResetArgs) -> Result<ExitCode> {
    let dir = DataDir::open(&a.data_dir)?;
    let _lock = dir.lock("reset a cursor")?;
    let cp = open_store(&dir, false)?;
    let known = cp.replicas()?;
    if !known.contains(&a.replica) {
        bail!(
            "replica {:?} has no stored position (known: {})",
            a.replica,
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        );
    }
    let before = cp.cursor(&a.replica)?;
    cp.remove(&a.replica)?;
    let mut out = common::stdout();
    if a.json {
        common::write_json_pretty(
            &mut out,
            &serde_json::json!({"replica": a.replica, "before": before, "reset": true}),
        )?;
    } else {
        writeln!(
            out,
            "replica {}: position {} forgotten; at the relay's next start it begins where \
             --new-replica-start says (head by default)",
            a.replica,
            before
                .delivered
                .map_or_else(|| "(none)".into(), |d| d.to_string())
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
