//! `walrelay wal repair`: cuts a torn tail and moves damaged segments and
//! damaged byte ranges aside, never deleting anything, and says what it did.
//!
//! Everything removed from the log goes under `wal/damaged/`:
//!
//! - a torn (or corrupt) tail of the newest segment: its bytes are copied to
//!   `damaged/<segment>.<offset>.bin` and fsync'd, then the segment is cut
//!   back to its last intact frame, as the relay's recovery would;
//! - a segment with damage anywhere else (or an unreadable header): the
//!   original file is hard-linked as `damaged/<segment>`, and a new file with
//!   a fresh header and every intact frame, byte for byte (frames keep their
//!   sequence numbers and checksums), is written under a temporary name,
//!   fsync'd and renamed over it; then the directory is fsync'd. At every
//!   instant either the old or the new file is in place.
//!
//! The sequence numbers this costs (and holes that were already there, such
//! as a lost segment file) are written down in `damaged/repairs.jsonl`, so
//! `wal verify` then reports them as known instead of failing. If a replica's
//! checkpoint is past the new end of the log, an empty segment starting at
//! that position is created, so new records are never numbered below what a
//! replica already has.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use wal_format::{segment_file_name, SegmentHeader};

use super::common::SeqRange;
use super::common::{self, DataDir};
use super::journal::{self, damaged_dir, sync_dir, JournalEntry};
use super::verify::{self, Analysis, SegmentReport};
use crate::checkpoint::Checkpoints;

/// `walrelay wal repair`
#[derive(Debug, clap::Args)]
pub struct RepairArgs {
    /// The relay's data directory (the relay must be stopped).
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Show what would be done, change nothing (exit 0 once planned).
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One thing repair did (or would do).
#[derive(Debug, Clone, Serialize)]
struct Action {
    action: &'static str,
    file: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    moved_to: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lost: Option<SeqRange>,
    detail: String,
}

fn append_journal(wal_dir: &Path, actions: &[Action]) -> Result<()> {
    let now = crate::types::now_ms();
    let entries: Vec<JournalEntry> = actions
        .iter()
        .map(|a| JournalEntry {
            time: common::fmt_time(now),
            time_unix_ms: now,
            action: a.action.to_owned(),
            file: a.file.clone(),
            moved_to: a.moved_to.clone(),
            lost_from: a.lost.map(|l| l.from),
            lost_to: a.lost.map(|l| l.to),
            detail: a.detail.clone(),
        })
        .collect();
    journal::append(wal_dir, &entries)
}

/// `base`, or `base.1`, `base.2`... whichever does not exist yet.
fn unused_path(base: PathBuf) -> PathBuf {
    if !base.exists() {
        return base;
    }
    (1..)
        .map(|i| PathBuf::from(format!("{}.{i}", base.display())))
        .find(|p| !p.exists())
        .unwrap_or(base)
}

/// What to do with one segment.
enum Plan<'a> {
    /// Copy `offset..` aside, then cut the file at `offset`.
    TruncateTail { seg: &'a SegmentReport, offset: u64 },
    /// Keep the original aside and write its intact frames into a new file
    /// (none when `keep_file` is false and nothing is intact).
    Rewrite {
        seg: &'a SegmentReport,
        keep_file: bool,
    },
}

fn plan(a: &Analysis) -> Vec<Plan<'_>> {
    let count = a.segments.len();
    let mut plans = Vec::new();
    for (i, seg) in a.segments.iter().enumerate() {
        let is_last = i + 1 == count;
        if seg.header_problem.is_none() && seg.damage.is_empty() {
            continue;
        }
        match seg.damage.as_slice() {
            [(offset, end, _)]
                if seg.header_problem.is_none() && is_last && *end >= seg.file.len =>
            {
                plans.push(Plan::TruncateTail {
                    seg,
                    offset: *offset,
                })
            }
            _ => plans.push(Plan::Rewrite {
                seg,
                // The newest segment stays (maybe empty), so the next start
                // numbers on from it.
                keep_file: is_last || !seg.frames.is_empty(),
            }),
        }
    }
    plans
}

fn describe(p: &Plan<'_>, wal_dir: &Path) -> Action {
    let aside = damaged_dir(wal_dir);
    match p {
        Plan::TruncateTail { seg, offset } => Action {
            action: "truncate_tail",
            file: seg.file.path.clone(),
            offset: Some(*offset),
            bytes: Some(seg.file.len - offset),
            moved_to: Some(aside.join(format!("{}.{offset}.bin", seg.file.name))),
            lost: None,
            detail: format!(
                "cut the damaged tail at offset {offset} ({} bytes) after copying it aside",
                seg.file.len - offset
            ),
        },
        Plan::Rewrite { seg, keep_file } => {
            let kept: u64 = seg.frames.iter().map(|f| f.1).sum();
            let dropped = seg
                .file
                .len
                .saturating_sub(kept + wal_format::SEGMENT_HEADER_LEN as u64);
            let ranges: Vec<String> = seg
                .damage
                .iter()
                .map(|(o, e, _)| format!("{o}..{e}"))
                .collect();
            let why = match &seg.header_problem {
                Some(h) => format!("{h}; "),
                None => String::new(),
            };
            Action {
                action: if *keep_file {
                    "rewrite_segment"
                } else {
                    "move_segment_aside"
                },
                file: seg.file.path.clone(),
                offset: seg.damage.first().map(|d| d.0),
                bytes: Some(dropped),
                moved_to: Some(aside.join(&seg.file.name)),
                lost: None,
                detail: if *keep_file {
                    format!(
                        "{why}kept {} intact frames, dropped {dropped} damaged bytes at [{}]; \
                         the original is kept aside",
                        seg.frames.len(),
                        ranges.join(", ")
                    )
                } else {
                    format!("{why}nothing intact in it; moved aside whole")
                },
            }
        }
    }
}

fn copy_range(src: &File, from: u64, to: u64, dst: &mut File) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let want = ((to - pos) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            anyhow::bail!("file ended at {pos}, expected {to}");
        }
        dst.write_all(&buf[..n])?;
        pos += n as u64;
    }
    Ok(())
}

fn truncate_tail(wal_dir: &Path, seg: &SegmentReport, offset: u64, dest: &Path) -> Result<()> {
    let dir = damaged_dir(wal_dir);
    std::fs::create_dir_all(&dir)?;
    let src = File::open(&seg.file.path)?;
    let mut out = File::create_new(dest).with_context(|| format!("creating {}", dest.display()))?;
    copy_range(&src, offset, seg.file.len, &mut out)?;
    out.sync_all()?;
    sync_dir(&dir)?;
    let f = OpenOptions::new().write(true).open(&seg.file.path)?;
    f.set_len(offset)?;
    f.sync_all()?;
    Ok(())
}

fn rewrite(wal_dir: &Path, seg: &SegmentReport, keep_file: bool, aside: &Path) -> Result<()> {
    let dir = damaged_dir(wal_dir);
    std::fs::create_dir_all(&dir)?;
    // The original stays reachable under damaged/ whatever happens next.
    std::fs::hard_link(&seg.file.path, aside)
        .with_context(|| format!("linking {} to {}", seg.file.path.display(), aside.display()))?;
    sync_dir(&dir)?;
    if keep_file {
        let tmp = wal_dir.join(format!("{}.repair-tmp", seg.file.name));
        let src = File::open(&seg.file.path)?;
        let mut out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut header = Vec::new();
        SegmentHeader::new(seg.file.first_seq).encode(&mut header);
        out.write_all(&header)?;
        for (offset, len, _, _) in &seg.frames {
            copy_range(&src, *offset, offset + len, &mut out)?;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, &seg.file.path).with_context(|| {
            format!(
                "renaming {} over {}",
                tmp.display(),
                seg.file.path.display()
            )
        })?;
    } else {
        std::fs::remove_file(&seg.file.path).with_context(|| {
            format!(
                "unlinking {} (kept as {})",
                seg.file.path.display(),
                aside.display()
            )
        })?;
    }
    sync_dir(wal_dir)
}

/// The highest position any replica's checkpoint refers to.
fn highest_cursor(dir: &DataDir) -> Result<Option<(String, u64)>> {
    let path = dir.checkpoints_path();
    if !path.exists() {
        return Ok(None);
    }
    let cp = Checkpoints::open(&path)?;
    let mut best: Option<(String, u64)> = None;
    for name in cp.replicas()? {
        let pos = cp.cursor(&name)?.highest();
        if best.as_ref().is_none_or(|(_, b)| pos > *b) {
            best = Some((name, pos));
        }
    }
    Ok(best)
}

/// Runs `walrelay wal repair`.
///
/// # Errors
/// The data dir is missing, locked by a relay, or an I/O step fails (the
/// message names the file).
pub fn run(args: &RepairArgs) -> Result<ExitCode> {
    let dir = DataDir::open(&args.data_dir)?;
    let _lock = if args.dry_run {
        None
    } else {
        Some(dir.lock("repair the log")?)
    };
    let before = verify::analyze(&dir.wal, true)?;
    let plans = plan(&before);
    let mut actions: Vec<Action> = Vec::new();
    for p in &plans {
        let mut a = describe(p, &dir.wal);
        if !args.dry_run {
            let dest = unused_path(a.moved_to.clone().unwrap_or_default());
            match p {
                Plan::TruncateTail { seg, offset } => truncate_tail(&dir.wal, seg, *offset, &dest)?,
                Plan::Rewrite { seg, keep_file } => rewrite(&dir.wal, seg, *keep_file, &dest)?,
            }
            a.moved_to = Some(dest);
        }
        actions.push(a);
    }
    if !args.dry_run {
        // Never number new records below a replica's position.
        let mid = verify::analyze(&dir.wal, false)?;
        let end = mid.end_seq.unwrap_or(0);
        if let Some((replica, pos)) = highest_cursor(&dir)? {
            if pos > end {
                let path = dir.wal.join(segment_file_name(pos));
                let mut f = File::create_new(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                let mut header = Vec::new();
                SegmentHeader::new(pos).encode(&mut header);
                f.write_all(&header)?;
                f.sync_all()?;
                sync_dir(&dir.wal)?;
                actions.push(Action {
                    action: "continue_numbering",
                    file: path,
                    offset: None,
                    bytes: None,
                    moved_to: None,
                    lost: None,
                    detail: format!(
                        "replica {replica} is at {pos}, past the log's new end {end}: \
                         new records will be numbered from {pos}"
                    ),
                });
            }
        }
    }
    // Record every hole in the log now as known: those repair just made and
    // those already there (a lost segment file).
    let after = if args.dry_run {
        None
    } else {
        let a = verify::analyze(&dir.wal, true)?;
        let mut lost = Vec::new();
        for f in a.open_findings().filter(|f| f.kind == "missing_records") {
            lost.push(Action {
                action: "record_lost_range",
                file: f.file.clone(),
                offset: Some(f.offset),
                bytes: None,
                moved_to: None,
                lost: f.lost,
                detail: format!(
                    "records {} are no longer in the log",
                    f.lost.map_or_else(String::new, |l| l.to_string())
                ),
            });
        }
        if !actions.is_empty() || !lost.is_empty() {
            actions.extend(lost);
            append_journal(&dir.wal, &actions)?;
        }
        Some(verify::analyze(&dir.wal, true)?)
    };
    report(args, &before, &actions, after.as_ref())
}

fn report(
    args: &RepairArgs,
    before: &Analysis,
    actions: &[Action],
    after: Option<&Analysis>,
) -> Result<ExitCode> {
    let remaining: Vec<verify::Finding> = after
        .map(|a| a.open_findings().cloned().collect())
        .unwrap_or_default();
    // A dry run succeeds once planned; a repair when the log ends up clean.
    let clean = after.is_none_or(|_| remaining.is_empty());
    let mut out = common::stdout();
    if args.json {
        #[derive(Serialize)]
        struct Json<'a> {
            dry_run: bool,
            damage_found: Vec<&'a verify::Finding>,
            actions: &'a [Action],
            clean_after: Option<bool>,
            remaining: &'a [verify::Finding],
        }
        common::write_json_pretty(
            &mut out,
            &Json {
                dry_run: args.dry_run,
                damage_found: before.open_findings().collect(),
                actions,
                clean_after: after.map(|_| remaining.is_empty()),
                remaining: &remaining,
            },
        )?;
    } else {
        let found: Vec<verify::Finding> = before.open_findings().cloned().collect();
        if found.is_empty() {
            writeln!(out, "no damage found; nothing to repair")?;
        } else {
            writeln!(out, "damage found:")?;
            verify::write_findings(&mut out, &found)?;
        }
        if !actions.is_empty() {
            writeln!(
                out,
                "{}",
                if args.dry_run {
                    "would do (dry run, nothing changed):"
                } else {
                    "done:"
                }
            )?;
            for a in actions {
                write!(out, "  {:<20} {}", a.action, a.file.display())?;
                if let Some(o) = a.offset {
                    write!(out, " @{o}")?;
                }
                write!(out, ": {}", a.detail)?;
                if let Some(m) = &a.moved_to {
                    write!(out, " -> {}", m.display())?;
                }
                writeln!(out)?;
            }
        }
        if after.is_some() {
            if remaining.is_empty() {
                writeln!(out, "the log is now clean (`walrelay wal verify` passes)")?;
            } else {
                writeln!(out, "still damaged (repair cannot fix these):")?;
                verify::write_findings(&mut out, &remaining)?;
            }
        }
    }
    out.flush()?;
    Ok(common::exit_code(clean))
}
