//! `damaged/repairs.jsonl`: what `wal repair` moved aside and which sequence
//! numbers that cost, one JSON object a line, appended and fsync'd by each
//! repair. `wal verify` reads it to report those ranges as known losses
//! instead of failing on them.
//!
//! A line: `time` (RFC 3339) and `time_unix_ms`, `action` (what was done),
//! `file` (the segment) and `moved_to` (where its bytes went, if anywhere),
//! `lost_from`/`lost_to` (the half-open range of sequence numbers it cost,
//! if any) and `detail` (prose). Lines that do not parse are skipped: the
//! journal informs, it never stops a command.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::common::SeqRange;

/// A line of `damaged/repairs.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub time: String,
    pub time_unix_ms: i64,
    pub action: String,
    pub file: PathBuf,
    #[serde(default)]
    pub moved_to: Option<PathBuf>,
    #[serde(default)]
    pub lost_from: Option<u64>,
    #[serde(default)]
    pub lost_to: Option<u64>,
    pub detail: String,
}

/// The sequence ranges earlier repairs recorded as lost.
pub struct Journal {
    /// Merged, sorted ranges with when they were recorded.
    ranges: Vec<(SeqRange, String)>,
}

const JOURNAL: &str = "repairs.jsonl";

/// Where repair puts what it moves aside, and its journal.
pub fn damaged_dir(wal_dir: &Path) -> PathBuf {
    wal_dir.join("damaged")
}

impl Journal {
    /// Reads the journal (empty when there is none).
    ///
    /// # Errors
    /// The journal exists but cannot be read.
    pub fn read(wal_dir: &Path) -> Result<Journal> {
        let path = damaged_dir(wal_dir).join(JOURNAL);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Journal { ranges: Vec::new() })
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut ranges: Vec<(SeqRange, String)> = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            let Ok(e) = serde_json::from_str::<JournalEntry>(&line) else {
                continue;
            };
            if let (Some(from), Some(to)) = (e.lost_from, e.lost_to) {
                ranges.push((SeqRange { from, to }, e.time));
            }
        }
        ranges.sort_by_key(|(r, _)| r.from);
        let mut merged: Vec<(SeqRange, String)> = Vec::new();
        for (r, t) in ranges {
            match merged.last_mut() {
                Some((m, _)) if r.from <= m.to => m.to = m.to.max(r.to),
                _ => merged.push((r, t)),
            }
        }
        Ok(Journal { ranges: merged })
    }

    /// A note when `lost` lies within ranges recorded by an earlier repair.
    pub fn covering(&self, lost: SeqRange) -> Option<String> {
        self.ranges
            .iter()
            .find(|(r, _)| r.from <= lost.from && lost.to <= r.to)
            .map(|(_, t)| format!("recorded by wal repair at {t}"))
    }
}

/// Appends `entries` to the journal and makes them durable.
///
/// # Errors
/// The journal cannot be created, written or synced.
pub fn append(wal_dir: &Path, entries: &[JournalEntry]) -> Result<()> {
    let dir = damaged_dir(wal_dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(JOURNAL);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    for e in entries {
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        f.write_all(&line)?;
    }
    f.sync_all()?;
    sync_dir(&dir)
}

/// fsync of a directory.
///
/// # Errors
/// The directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {}", dir.display()))
}
