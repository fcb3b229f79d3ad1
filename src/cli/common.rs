//! What the operator commands share: the data dir, the checkpoint store,
//! times and sizes as people write them, tables and JSON on stdout.

use std::io::{self, BufWriter, StdoutLock, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use crate::checkpoint::{Checkpoints, Cursor};
use crate::lock::{DirLock, LockError};
use crate::types::now_ms;
use crate::wal::{self, RealStorage, RecoveryReport, Wal};

/// Turns a command's result into the process exit code: errors are printed
/// as `walrelay: ...` and exit 1; a closed stdout (`| head`) is not an error.
pub fn finish(result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Exit code 0 when `ok`, else 1.
pub fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A relay's data directory, checked to look like one.
pub struct DataDir {
    pub root: PathBuf,
    pub wal: PathBuf,
}

impl DataDir {
    /// Checks that `root` exists and has a `wal/` directory.
    ///
    /// # Errors
    /// A clear message when it does not.
    pub fn open(root: &Path) -> Result<Self> {
        let meta = std::fs::metadata(root).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => anyhow!("data dir {} does not exist", root.display()),
            _ => anyhow!("data dir {}: {e}", root.display()),
        })?;
        if !meta.is_dir() {
            bail!("data dir {} is not a directory", root.display());
        }
        let wal = root.join("wal");
        if !wal.is_dir() {
            bail!(
                "{} is not a walrelay data dir: it has no wal/ directory \
                 (pass the --data-dir the relay runs with)",
                root.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            wal,
        })
    }

    pub fn checkpoints_path(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The pid of a relay holding the data dir, if one does.
    ///
    /// # Errors
    /// The lock file cannot be read.
    pub fn relay_pid(&self) -> Result<Option<String>> {
        crate::lock::is_locked(&self.root)
            .with_context(|| format!("reading {}", self.root.join("LOCK").display()))
    }

    /// Opens the log without changing anything on disk.
    ///
    /// # Errors
    /// The log cannot be listed or read.
    pub fn open_wal(&self) -> Result<(Wal, RecoveryReport)> {
        wal::open_read_only(Arc::new(RealStorage), &self.wal)
            .with_context(|| format!("opening the log in {}", self.wal.display()))
    }

    /// Takes the data dir's lock for a command that changes it, refusing
    /// (with the relay's pid) while a relay runs.
    ///
    /// # Errors
    /// The lock is held, or cannot be taken.
    pub fn lock(&self, what: &str) -> Result<DirLock> {
        crate::lock::lock_data_dir(&self.root).map_err(|e| match e {
            LockError::Held { dir, holder } => anyhow!(
                "refusing to {what}: a walrelay (pid {holder}) is running on {}; stop it first",
                dir.display()
            ),
            other => anyhow::Error::new(other),
        })
    }

    /// The replicas' stored positions, when the store can be opened.
    ///
    /// # Errors
    /// Only unexpected failures; a store that is absent or locked by a
    /// running relay is [`CursorsView::Unavailable`].
    pub fn read_cursors(&self) -> Result<CursorsView> {
        let path = self.checkpoints_path();
        if !path.exists() {
            return Ok(CursorsView::Unavailable(format!(
                "no checkpoint store at {} (no replica has run on this data dir)",
                path.display()
            )));
        }
        if let Some(pid) = self.relay_pid()? {
            return Ok(CursorsView::Unavailable(format!(
                "a walrelay (pid {pid}) is running on {} and holds its checkpoint store; \
                 its /status endpoint shows the live positions",
                self.root.display()
            )));
        }
        let cp = match Checkpoints::open(&path) {
            Ok(cp) => cp,
            Err(e) => return Ok(CursorsView::Unavailable(format!("{e}"))),
        };
        let mut out = Vec::new();
        for name in cp.replicas()? {
            let cursor = cp.cursor(&name)?;
            out.push((name, cursor));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(CursorsView::Available(out))
    }
}

/// The replicas' positions, or why they cannot be read.
pub enum CursorsView {
    Available(Vec<(String, Cursor)>),
    Unavailable(String),
}

/// Parses a point in time: unix milliseconds (`1700000000000`), RFC 3339
/// (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00.5+02:00`), or a duration
/// ago (`90m`, `2h`).
///
/// # Errors
/// None of these forms.
pub fn parse_time(s: &str) -> Result<i64> {
    let t = s.trim();
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    }
    parse_rfc3339(t).ok_or_else(|| {
        anyhow!(
            "{s:?} is not a time: use unix milliseconds, RFC 3339 \
             (2024-05-01T12:00:00Z) or a duration ago (2h)"
        )
    })
}

fn parse_rfc3339(t: &str) -> Option<i64> {
    // humantime reads UTC only; take a numeric offset off by hand.
    let (base, offset_min) = match t.char_indices().rev().find(|(_, c)| *c == '+' || *c == '-') {
        Some((i, sign)) if i > 10 && t[i + 1..].len() == 5 && t.as_bytes()[i + 3] == b':' => {
            let h: i64 = t[i + 1..i + 3].parse().ok()?;
            let m: i64 = t[i + 4..].parse().ok()?;
            let off = h * 60 + m;
            (
                format!("{}Z", &t[..i]),
                if sign == '-' { -off } else { off },
            )
        }
        _ => (t.to_owned(), 0),
    };
    let st = humantime::parse_rfc3339_weak(&base).ok()?;
    let ms = match st.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).ok()?,
        Err(e) => -i64::try_from(e.duration().as_millis()).ok()?,
    };
    Some(ms - offset_min * 60_000)
}

/// A unix-ms time as RFC 3339 (UTC, milliseconds); `-` for none.
pub fn fmt_time(ms: i64) -> String {
    if ms <= 0 || ms == i64::MAX {
        return "-".into();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs());
    humantime::format_rfc3339_millis(t).to_string()
}

/// An optional unix-ms time for tables.
pub fn fmt_opt_time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), fmt_time)
}

/// Bytes in binary units (`12.3MiB`).
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// A duration in milliseconds, rounded to the second above one minute.
pub fn fmt_duration_ms(ms: i64) -> String {
    let ms = ms.max(0).unsigned_abs();
    let d = if ms >= 60_000 {
        Duration::from_secs(ms / 1000)
    } else {
        Duration::from_millis(ms)
    };
    humantime::format_duration(d).to_string()
}

/// Buffered stdout; write errors (a closed pipe) surface as `io::Error`.
pub fn stdout() -> BufWriter<StdoutLock<'static>> {
    BufWriter::new(io::stdout().lock())
}

/// Writes `value` as one line of JSON.
///
/// # Errors
/// Serialisation or write errors.
pub fn write_json<T: serde::Serialize>(out: &mut impl Write, value: &T) -> Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes `value` as indented JSON.
///
/// # Errors
/// Serialisation or write errors.
pub fn write_json_pretty<T: serde::Serialize>(out: &mut impl Write, value: &T) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// A table printed with aligned columns; numbers right-aligned.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// # Errors
    /// Write errors.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let numeric: Vec<bool> = (0..self.headers.len())
            .map(|i| {
                !self.rows.is_empty()
                    && self.rows.iter().all(|r| {
                        r.get(i).is_none_or(|c| {
                            c == "-" || c.chars().all(|ch| ch.is_ascii_digit() || ch == '.')
                        })
                    })
            })
            .collect();
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                let last = i + 1 == cells.len();
                if i > 0 {
                    s.push_str("  ");
                }
                if numeric.get(i).copied().unwrap_or(false) {
                    s.push_str(&format!("{c:>w$}"));
                } else if last {
                    s.push_str(c);
                } else {
                    s.push_str(&format!("{c:<w$}"));
                }
            }
            s
        };
        let headers: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        writeln!(out, "{}", line(&headers))?;
        for row in &self.rows {
            writeln!(out, "{}", line(row))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn times_parse_as_unix_ms_rfc3339_with_offsets_and_durations_ago() {
        assert_eq!(parse_time("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-15T00:13:20.5+02:00").unwrap(),
            1_700_000_000_500
        );
        assert_eq!(
            parse_time("2023-11-14T21:13:20-01:00").unwrap(),
            1_700_000_000_000
        );
        let ago = parse_time("1h").unwrap();
        assert!((now_ms() - ago - 3_600_000).abs() < 5_000);
        assert!(parse_time("yesterday-ish").is_err());
        assert_eq!(fmt_time(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }
}

/// A half-open range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SeqRange {
    pub from: u64,
    pub to: u64,
}

impl SeqRange {
    pub fn len(&self) -> u64 {
        self.to.saturating_sub(self.from)
    }
}

impl std::fmt::Display for SeqRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{} ({} records)", self.from, self.to, self.len())
    }
}
