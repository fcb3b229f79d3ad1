//! What the kernel says about a process and a directory: CPU time, peak
//! memory, and bytes on disk.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// user + system CPU seconds of `pid` (all its threads), from
/// `/proc/<pid>/stat` fields 14 and 15.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields from the last ')'.
    let Some(close) = stat.rfind(')') else {
        bail!("/proc/{pid}/stat: no ')' in {stat:?}");
    };
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| -> Result<u64> {
        rest.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("/proc/{pid}/stat field {n}"))
    };
    let ticks = field(14)? + field(15)?;
    Ok(ticks as f64 / clock_ticks())
}

/// CPU seconds the whole machine spent busy (every CPU, everything but
/// idle and iowait), from the first line of `/proc/stat`.
pub fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().next().unwrap_or_default();
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if fields.len() < 5 || !line.starts_with("cpu ") {
        bail!("/proc/stat: unexpected first line {line:?}");
    }
    // user nice system idle iowait irq softirq steal ...: guest time is
    // already in user and nice.
    let busy: u64 = fields.iter().take(8).sum::<u64>() - fields[3] - fields[4];
    Ok(busy as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|v| v.strip_prefix(':')) {
            let kb: u64 = v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("/proc/{pid}/status {field}: {v:?}"))?;
            return Ok(kb * 1024);
        }
    }
    bail!("/proc/{pid}/status has no {field}")
}

/// Peak resident set size (`VmHWM`).
pub fn peak_rss(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmHWM")
}

/// Resident set size now (`VmRSS`).
pub fn rss(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// Bytes under `dir`: the files' lengths, and the blocks they hold.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DirSize {
    pub apparent: u64,
    pub allocated: u64,
    pub files: u64,
}

/// Walks `dir` (not following symlinks); a missing directory is empty.
/// Files that vanish during the walk are skipped.
pub fn dir_size(dir: &Path) -> DirSize {
    use std::os::unix::fs::MetadataExt;
    let mut total = DirSize::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total.apparent += m.len();
                total.allocated += m.blocks() * 512;
                total.files += 1;
            }
        }
    }
    total
}

/// Latency of `write(4 KiB) + fdatasync` in `dir`, `n` times: what one
/// durable acknowledgement costs at the least on this disk.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FsyncLatency {
    pub n: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
}

pub fn fsync_latency(dir: &Path, n: usize) -> Result<FsyncLatency> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).with_context(|| format!("create {path:?}"))?;
    let block = vec![0x5au8; 4096];
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        us.push(t.elapsed().as_micros() as u64);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    us.sort_unstable();
    let pct = |p: f64| us[((us.len() as f64 * p).ceil() as usize).clamp(1, us.len()) - 1];
    Ok(FsyncLatency {
        n,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        max_us: us[us.len() - 1],
        mean_us: us.iter().sum::<u64>() / us.len() as u64,
    })
}
