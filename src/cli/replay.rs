//! `walrelay wal replay`: sends part of the log to any remote-write URL by
//! hand, after an incident.
//!
//! It sends through the shippers' own delivery core
//! ([`crate::ship::delivery`]): in log order, one request at a time,
//! consecutive records coalesced up to a sample and byte budget (and cut
//! where the kind changes, for a 2.0 target), with the shippers' status
//! policy ([`crate::ship::policy`]): only 400, 409 and 422 (and what
//! `--drop-on-status` adds) reject a record, and a rejected multi-record
//! request is re-sent record by record so only the records the receiver
//! refuses are counted and skipped; 413 and timeouts split; every other
//! answer is retried with backoff, except that a run stops after
//! [`BLOCKED_ATTEMPTS_BEFORE_STOPPING`] answers in a row that are not about
//! the data (401, 404, ...): run by hand, it says why rather than retry in
//! silence, skipping nothing. It reaches the target as a replica is reached
//! (TLS, client certificates, credentials from files, headers, remote-write
//! 2.0), with flags named as the `[[replica]]` table's keys.
//!
//! `--shards N` sends through N shards at once, as a replica's shards do
//! ([`crate::ship::shards`]): the batch, N times the request size, is cut
//! by series hash into N requests sent concurrently, each series through
//! one of them, so per-series order holds with N requests in flight. The
//! journal then holds the whole batch as in flight: resumed, every shard
//! re-sends its part of it on its own, with the N stored in the journal.
//!
//! Resume: progress goes to a journal (the state file), written (and
//! fsync'd) before each request with its exact range, and after each batch
//! with the position reached. Run again with the same arguments, it re-sends
//! the interrupted request on its own first (a 400, 409 or 422 for it then
//! means the receiver already had it), then the rest of its batch, and
//! continues from there. `--restart` ignores the state.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use wal_format::{parse_segment_file_name, Record};

use super::common::{self, DataDir};
use crate::config::ReplicaAccess;
use crate::ship::cut;
use crate::ship::delivery::{self, BatchFill, Done, Ledger, Link, Request, Resend};
use crate::ship::{BatchLimits, SendObserver, Sender, SenderOptions, WrittenCounts};
use crate::tls::ClientTlsOptions;
use crate::types::{now_ms, parse_statuses, redact_url, ReplicaProtocol, StatusPolicy};
use crate::wal::{Gap, ReadItem, Wal, WalReader};

/// `walrelay wal replay`
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The relay's data directory.
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The remote-write URL to send to (e.g. http://prometheus:9090/api/v1/write).
    #[arg(long)]
    pub to: String,
    /// First sequence number to send.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last sequence number to send (inclusive).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Segments to send, as A..B (inclusive; A.. for A to the end), each a
    /// segment file name or its first sequence number.
    #[arg(long, conflicts_with_all = ["from_seq", "to_seq"])]
    pub segments: Option<String>,
    /// Only records received at or after this time (RFC 3339, unix ms, or a
    /// duration ago such as 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records received before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Pace the replay to at most this many samples per second.
    #[arg(long)]
    pub max_samples_per_second: Option<f64>,
    /// Most samples coalesced into one request.
    #[arg(long, default_value_t = 20_000)]
    pub max_samples_per_send: u64,
    /// Most decoded bytes coalesced into one request.
    #[arg(long, default_value = "8MiB")]
    pub max_bytes_per_send: String,
    /// Requests in flight at once, each series always through the same one
    /// (for a far target: throughput is a request per round trip each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: u32,
    /// Timeout of one request.
    #[arg(long, default_value = "30s")]
    pub send_timeout: String,
    /// Longest wait between retries.
    #[arg(long, default_value = "30s")]
    pub retry_max_backoff: String,
    /// Statuses that also reject a record, on top of 400, 409 and 422, as
    /// a replica's `drop_on_status` (e.g. 404,410).
    #[arg(long, value_parser = parse_drop_on_status)]
    pub drop_on_status: Option<StatusPolicy>,
    /// Read and batch everything, send nothing, write no state.
    #[arg(long)]
    pub dry_run: bool,
    /// Remote-write protocol the target is sent: 1.0, or 2.0 for a receiver
    /// that speaks it (2.0 records then go as they are, 1.0 records as 1.0
    /// requests), as a replica's `protocol`.
    #[arg(long, default_value = "1.0", value_parser = ReplicaProtocol::parse)]
    pub protocol: ReplicaProtocol,
    /// An extra HTTP header, as NAME=VALUE (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// File holding a bearer token to send as Authorization (re-read when
    /// it changes).
    #[arg(long)]
    pub bearer_token_file: Option<PathBuf>,
    /// User name for basic auth, with --basic-auth-password-file.
    #[arg(long, requires = "basic_auth_password_file")]
    pub basic_auth_username: Option<String>,
    /// File holding the basic-auth password (re-read when it changes).
    #[arg(long, requires = "basic_auth_username")]
    pub basic_auth_password_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for an https:// target instead of the
    /// system's.
    #[arg(long)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to the target, with --tls-key-file.
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Name the target's certificate must carry, when it differs from the
    /// URL's host (e.g. the URL holds an IP address).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Accept any certificate. For tests only.
    #[arg(long)]
    pub tls_insecure_skip_verify: bool,
    /// Where progress is kept for resuming [default: DATA_DIR/replay-<hash of URL>.state].
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Ignore the progress of an earlier run and start over.
    #[arg(long)]
    pub restart: bool,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Counters, per run and cumulated over resumed runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Totals {
    requests: u64,
    records: u64,
    samples: u64,
    rejected_records: u64,
    rejected_samples: u64,
    /// Re-sent after an interruption and refused as already present.
    already_delivered_records: u64,
    /// Could not be read from the log (damage, or deleted).
    skipped_records: u64,
    /// Outside --since/--until.
    filtered_records: u64,
    /// 2.0 requests the target stored only in part (its written counts
    /// below what was sent).
    #[serde(default)]
    partial_writes: u64,
    /// 2.0 requests answered 2xx without written counts: the target may not
    /// speak 2.0 at all.
    #[serde(default)]
    unconfirmed_writes: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.records += o.records;
        self.samples += o.samples;
        self.rejected_records += o.rejected_records;
        self.rejected_samples += o.rejected_samples;
        self.already_delivered_records += o.already_delivered_records;
        self.skipped_records += o.skipped_records;
        self.filtered_records += o.filtered_records;
        self.partial_writes += o.partial_writes;
        self.unconfirmed_writes += o.unconfirmed_writes;
    }
}

/// The request in flight, `from..to`, and where its batch ends: the records
/// of the batch before `from` are done, those from `to` to `next` are not
/// sent yet, and reading resumes at `next` once they are.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct InFlight {
    from: u64,
    to: u64,
    next: u64,
}

/// The state file (mode 0600: it names the target).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    version: u32,
    /// The target, redacted ([`redact_url`]): for people.
    url: String,
    /// SHA-256 of the target's full URL, hex: what a re-run is matched by,
    /// since two targets may differ only in what the redaction removes.
    /// Absent in a version 1 file, whose `url` is the full URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url_sha256: Option<String>,
    /// The selection arguments as given: a re-run must match them.
    args: String,
    /// The selection as resolved by the first run (a relative --since stays
    /// what it was).
    start: u64,
    end: u64,
    since: Option<i64>,
    until: Option<i64>,
    next_seq: u64,
    inflight: Option<InFlight>,
    /// Shards the batch in flight was cut into (absent: one).
    #[serde(default = "one_shard")]
    shards: u32,
    done: bool,
    totals: Totals,
    updated: String,
}

fn one_shard() -> u32 {
    1
}

/// A range the log could not provide.
#[derive(Debug, Clone, Serialize)]
struct GapInfo {
    from: u64,
    to: u64,
    file: Option<PathBuf>,
    offset: Option<u64>,
    reason: String,
}

/// A record the receiver refused.
#[derive(Debug, Clone, Serialize)]
struct Rejection {
    seq: u64,
    status: u16,
    body: String,
}

#[derive(Debug, Serialize)]
struct Report {
    url: String,
    dry_run: bool,
    state_file: Option<PathBuf>,
    from_seq: u64,
    end_seq: u64,
    resumed_at: Option<u64>,
    complete: bool,
    this_run: Totals,
    total: Totals,
    gaps: Vec<GapInfo>,
    rejections: Vec<Rejection>,
    /// Why the run stopped before the end: the target's answer, which is
    /// not about the data (nothing was skipped; run again to resume).
    blocked: Option<String>,
    elapsed_seconds: f64,
    samples_per_second: f64,
}

const MAX_REJECTIONS_KEPT: usize = 100;

fn selection_fingerprint(a: &ReplayArgs) -> String {
    format!(
        "from_seq={:?} to_seq={:?} segments={:?} since={:?} until={:?}",
        a.from_seq, a.to_seq, a.segments, a.since, a.until
    )
}

/// The state's version: 2 stores the URL redacted, with a digest of it.
const STATE_VERSION: u32 = 2;

fn url_digest(url: &str) -> String {
    use std::fmt::Write as _;
    ring::digest::digest(&ring::digest::SHA256, url.as_bytes())
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

impl State {
    /// Whether this state belongs to a replay to `url` (the full URL).
    fn is_for(&self, url: &str) -> bool {
        match &self.url_sha256 {
            Some(digest) => *digest == url_digest(url),
            None => self.url == url,
        }
    }
}

fn default_state_file(dir: &DataDir, url: &str) -> PathBuf {
    dir.root.join(format!(
        "replay-{:08x}.state",
        crc32fast::hash(url.as_bytes())
    ))
}

/// Resolves the sequence range `start..end` the arguments select.
fn resolve_range(a: &ReplayArgs, wal: &Wal) -> Result<(u64, u64)> {
    let extent = wal.extent();
    if let Some(spec) = &a.segments {
        let segs = wal.segments();
        let find = |s: &str| -> Result<usize> {
            let s = s.trim();
            let first = parse_segment_file_name(s)
                .or_else(|| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    anyhow!("{s:?} is neither a segment file name nor a sequence number")
                })?;
            segs.iter()
                .position(|g| g.first_seq == first)
                .ok_or_else(|| anyhow!("no segment starts at {first} (see `walrelay wal inspect`)"))
        };
        let (a_s, b_s) = match spec.split_once("..") {
            Some((a, b)) => (a, b),
            None => (spec.as_str(), spec.as_str()),
        };
        let first = find(a_s)?;
        let last = if b_s.trim().is_empty() {
            segs.len().saturating_sub(1)
        } else {
            find(b_s)?
        };
        if last < first {
            bail!("--segments {spec}: the second segment comes before the first");
        }
        let start = segs[first].first_seq;
        let end = segs.get(last + 1).map_or(extent.end_seq, |g| g.first_seq);
        return Ok((start, end));
    }
    let start = a.from_seq.unwrap_or(extent.first_seq);
    let end = match a.to_seq {
        Some(t) => t.saturating_add(1),
        None => extent.end_seq,
    };
    if end < start {
        match a.to_seq {
            Some(t) => bail!("--to-seq {t} is before --from-seq {start}"),
            None => bail!(
                "--from-seq {start} is past the end of the log ({})",
                extent.end_seq
            ),
        }
    }
    Ok((start, end))
}

fn save_state(path: &Path, st: &mut State) -> Result<()> {
    st.updated = common::fmt_time(now_ms());
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // A leftover from an older version may have been made 0644.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&serde_json::to_vec_pretty(st)?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| {
        format!(
            "writing the replay state file {} (--state-file puts it elsewhere)",
            path.display()
        )
    })
}

fn load_state(path: &Path) -> Result<Option<State>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "state file {} is unreadable (--restart ignores it)",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Everything one run works with.
struct Run {
    /// The target's client and body builder (used by no request of a dry
    /// run).
    link: Link,
    dry_run: bool,
    /// What the sender reports: shown by the progress line, counted.
    watch: Arc<Watch>,
    state: State,
    state_path: Option<PathBuf>,
    run: Totals,
    gaps: Vec<GapInfo>,
    rejections: Vec<Rejection>,
    limits: BatchLimits,
    rate: Option<f64>,
    started: Instant,
    paced_samples: f64,
    progress: Progress,
    /// The target's answer, when it kept refusing requests for a reason
    /// that is not about the data: the run stops there, nothing skipped.
    blocked: Option<String>,
    /// Why the journal could not be written before a request: the run
    /// stops without sending it.
    failed: Option<anyhow::Error>,
    /// Where the batch being delivered ends: the `next` of the journal's
    /// request in flight.
    batch_end: u64,
    /// `--shards`; with more than one, a link for each.
    shards: u32,
    shard_links: Vec<Link>,
}

/// Blocked attempts in a row (401, 404, ...) after which a replay stops:
/// run by hand, it says why at once rather than retry in silence; run again,
/// it resumes where it stopped.
const BLOCKED_ATTEMPTS_BEFORE_STOPPING: u64 = 5;

/// What the sender reports during a replay: why the request in flight is
/// being retried (for the progress line), and the 2.0 writes the target did
/// not confirm in full (for the report). No replica state, no metrics.
#[derive(Default)]
struct Watch {
    retrying: Mutex<Option<String>>,
    partial_writes: AtomicU64,
    unconfirmed_writes: AtomicU64,
}

impl Watch {
    fn set_retrying(&self, reason: Option<String>) {
        *self.retrying.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    fn retrying(&self) -> Option<String> {
        self.retrying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl SendObserver for Watch {
    fn name(&self) -> &str {
        "replay"
    }

    fn retrying(&self, reason: String) {
        self.set_retrying(Some(reason));
    }

    fn blocked(&self, reason: String) {
        self.set_retrying(Some(reason));
    }

    fn stored(&self) {
        self.set_retrying(None);
    }

    fn answered(&self) {
        self.set_retrying(None);
    }

    fn partial_write(&self, _sent: &WrittenCounts, _written: &WrittenCounts) {
        self.partial_writes.fetch_add(1, Ordering::Relaxed);
    }

    fn unconfirmed_write(&self, _why: &str) {
        self.unconfirmed_writes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Progress on stderr: a bar on a terminal, a line every 10 s otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    base: u64,
    samples: Arc<AtomicU64>,
    position: Arc<AtomicU64>,
}

impl Progress {
    fn new(start: u64, end: u64) -> Progress {
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(end.saturating_sub(start));
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} records ({per_sec}, ETA {eta}) {msg}",
            ) {
                bar.set_style(style);
            }
            Some(bar)
        } else {
            None
        };
        Progress {
            bar,
            base: start,
            samples: Arc::new(AtomicU64::new(0)),
            position: Arc::new(AtomicU64::new(start)),
        }
    }

    fn set(&self, next_seq: u64, samples: u64) {
        self.position.store(next_seq, Ordering::Relaxed);
        self.samples.store(samples, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(next_seq.saturating_sub(self.base));
        }
    }

    /// Reports retries and progress while requests are slow.
    fn ticker(&self, watch: Arc<Watch>, end: u64) -> tokio::task::JoinHandle<()> {
        let bar = self.bar.clone();
        let samples = Arc::clone(&self.samples);
        let position = Arc::clone(&self.position);
        let started = Instant::now();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last_line = Instant::now();
            loop {
                tick.tick().await;
                let retrying = watch.retrying().map_or_else(String::new, |e| {
                    let short: String = e.chars().take(120).collect();
                    format!(" retrying: {short}")
                });
                let s = samples.load(Ordering::Relaxed);
                let rate = s as f64 / started.elapsed().as_secs_f64().max(0.001);
                match &bar {
                    Some(bar) => bar.set_message(format!("{s} samples, {rate:.0}/s{retrying}")),
                    None if last_line.elapsed() >= Duration::from_secs(10) => {
                        last_line = Instant::now();
                        eprintln!(
                            "walrelay replay: at sequence {} of {end}, {s} samples sent ({rate:.0}/s){retrying}",
                            position.load(Ordering::Relaxed)
                        );
                    }
                    None => {}
                }
            }
        })
    }
}

impl Run {
    /// Writes the state file with the counters of earlier runs and this one.
    fn save(&mut self) -> Result<()> {
        let Some(path) = self.state_path.clone() else {
            return Ok(());
        };
        let earlier = self.state.totals.clone();
        self.state.totals.add(&self.run);
        let r = save_state(&path, &mut self.state);
        self.state.totals = earlier;
        r
    }

    fn in_time(&self, r: &Record) -> bool {
        let t = r.meta.receive_time_ms;
        !(self.state.since.is_some_and(|s| t < s) || self.state.until.is_some_and(|u| t >= u))
    }

    /// The next request's records, and where reading continues after them;
    /// an empty batch means the selection is done. A batch never spans a
    /// gap: the gap is counted on its own, so that the journal's range of a
    /// batch holds every record of it.
    fn next_batch(
        &mut self,
        reader: &mut WalReader,
        held: &mut Option<ReadItem>,
    ) -> Result<(Vec<Record>, u64)> {
        let mut records: Vec<Record> = Vec::new();
        let mut fill: Option<BatchFill> = None;
        let mut consumed = self.state.next_seq;
        let end = self.state.end;
        loop {
            let item = match held.take() {
                Some(item) => item,
                None => match reader.try_next()? {
                    Some(item) => item,
                    None => break,
                },
            };
            match item {
                ReadItem::Gap(g) if g.from >= end => break,
                ReadItem::Gap(g) if !records.is_empty() => {
                    *held = Some(ReadItem::Gap(g));
                    break;
                }
                ReadItem::Gap(g) => {
                    self.gap(&g);
                    consumed = consumed.max(g.to.min(end));
                }
                ReadItem::Record(r) if r.seq >= end => break,
                ReadItem::Record(r) if r.seq < self.state.next_seq => {}
                ReadItem::Record(r) if !self.in_time(&r) => {
                    self.run.filtered_records += 1;
                    consumed = r.seq + 1;
                }
                ReadItem::Record(r) => {
                    let joined = match &mut fill {
                        None => {
                            fill = Some(BatchFill::new(&r));
                            true
                        }
                        Some(f) => f.take(&r, self.limits, self.link.protocol),
                    };
                    if !joined {
                        *held = Some(ReadItem::Record(r));
                        break;
                    }
                    consumed = r.seq + 1;
                    records.push(r);
                    if fill.is_some_and(|f| !f.has_room(self.limits)) {
                        break;
                    }
                }
            }
        }
        Ok((records, consumed))
    }

    /// Counts and reports the part of `g` inside the selection: records the
    /// log cannot provide (damage, or deleted).
    fn gap(&mut self, g: &Gap) {
        let (from, to) = (g.from.max(self.state.start), g.to.min(self.state.end));
        if to <= from {
            return;
        }
        self.run.skipped_records += to - from;
        self.progress_println(&format!(
            "walrelay replay: records {from}..{to} cannot be read and are skipped: {}{}",
            g.file.as_ref().map_or_else(String::new, |f| format!(
                "{} at offset {}: ",
                f.display(),
                g.offset.unwrap_or(0)
            )),
            g.reason
        ));
        self.gaps.push(GapInfo {
            from,
            to,
            file: g.file.clone(),
            offset: g.offset,
            reason: g.reason.clone(),
        });
    }

    fn progress_println(&self, msg: &str) {
        match &self.progress.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Counts a record the target refused on its own.
    fn reject(&mut self, seq: u64, samples: u64, status: u16, body: String) {
        self.run.rejected_records += 1;
        self.run.rejected_samples += samples;
        self.progress_println(&format!(
            "walrelay replay: record {seq} rejected (HTTP {status}): {body}"
        ));
        if self.rejections.len() < MAX_REJECTIONS_KEPT {
            self.rejections.push(Rejection { seq, status, body });
        }
    }

    /// Waits so that the samples sent so far stay under the rate.
    async fn pace(&mut self, samples: u64) {
        let Some(rate) = self.rate else { return };
        let due = self.started + Duration::from_secs_f64(self.paced_samples / rate);
        tokio::time::sleep_until(due.into()).await;
        self.paced_samples += samples as f64;
    }

    fn update_progress(&self) {
        let mut t = self.state.totals.clone();
        t.add(&self.run);
        self.progress.set(self.state.next_seq, t.samples);
    }

    /// Delivers `records` with the shippers' delivery core; a dry run counts
    /// them as one request and sends nothing.
    async fn send(&mut self, records: Vec<Record>, resend: Resend) {
        if !self.dry_run && self.state.shards > 1 {
            self.send_sharded(records, resend).await;
            return;
        }
        if !self.dry_run {
            delivery::deliver(self, records, resend).await;
            return;
        }
        if !records.is_empty() {
            self.run.requests += 1;
            self.run.records += records.len() as u64;
            self.run.samples += records
                .iter()
                .map(|r| u64::from(r.meta.samples))
                .sum::<u64>();
        }
    }

    /// Delivers `records` through the journal's number of shards at once:
    /// the batch is journaled as in flight, each shard delivers its parts,
    /// and the counts are merged. A shard blocked stops the others after
    /// their request; the batch stays in flight in the journal.
    async fn send_sharded(&mut self, records: Vec<Record>, resend: Resend) {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return;
        };
        let range = first.seq..last.seq + 1;
        let samples: u64 = records.iter().map(|r| u64::from(r.meta.samples)).sum();
        self.pace(samples).await;
        self.state.inflight = Some(InFlight {
            from: range.start,
            to: range.end,
            next: self.batch_end.max(range.end),
        });
        if let Err(e) = self.save() {
            self.failed = Some(e);
            return;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = (self.state.shards as usize).min(self.shard_links.len());
        let mut shards: Vec<ShardRun> = self
            .shard_links
            .drain(..n)
            .zip(cut::split(&records, self.state.shards))
            .map(|(link, parts)| ShardRun {
                link,
                parts,
                totals: Totals::default(),
                rejections: Vec::new(),
                notes: Vec::new(),
                blocked: None,
                stop: Arc::clone(&stop),
            })
            .collect();
        futures_util::future::join_all(shards.iter_mut().map(|s| {
            let parts = std::mem::take(&mut s.parts);
            delivery::deliver(s, parts, resend)
        }))
        .await;
        for s in shards {
            self.run.add(&s.totals);
            for note in &s.notes {
                self.progress_println(note);
            }
            for r in s.rejections {
                self.reject(r.0, r.1, r.2, r.3);
            }
            if let (None, Some(reason)) = (&self.blocked, s.blocked) {
                self.blocked = Some(reason);
            }
            self.shard_links.push(s.link);
        }
        if !self.stopped() {
            // A record counts once, however many shards carried it.
            self.run.records += records.len() as u64;
        }
        self.run.partial_writes = self.watch.partial_writes.load(Ordering::Relaxed);
        self.run.unconfirmed_writes = self.watch.unconfirmed_writes.load(Ordering::Relaxed);
    }

    async fn replay(&mut self, wal: &Wal) -> Result<()> {
        if let Some(f) = self.state.inflight {
            self.resume(wal, f).await?;
            if self.stopped() {
                return self.stop();
            }
        }
        // From here on, batches are cut into this run's shards.
        self.state.shards = self.shards;
        if self.shards > 1 {
            self.limits = BatchLimits {
                max_samples: self
                    .limits
                    .max_samples
                    .saturating_mul(u64::from(self.shards)),
                max_bytes: self.limits.max_bytes.saturating_mul(self.shards as usize),
            };
        }
        let mut reader = wal.reader(self.state.next_seq);
        let mut held = None;
        loop {
            let (records, consumed) = self.next_batch(&mut reader, &mut held)?;
            if records.is_empty() {
                self.state.next_seq = self.state.next_seq.max(consumed);
                break;
            }
            self.batch_end = consumed;
            self.send(records, Resend::No).await;
            if self.stopped() {
                return self.stop();
            }
            self.state.next_seq = consumed;
            self.state.inflight = None;
            self.checkpoint()?;
        }
        self.state.done = true;
        self.checkpoint()
    }

    /// Re-sends the request that was in flight when the last run stopped on
    /// its own (what the log still holds of it, as the shippers do after a
    /// restart), then the rest of its batch.
    async fn resume(&mut self, wal: &Wal, f: InFlight) -> Result<()> {
        self.progress_println(&format!(
            "walrelay replay: re-sending the interrupted request {}..{} on its own",
            f.from, f.to
        ));
        self.batch_end = f.next;
        let mut read = delivery::read_range(wal, f.from..f.to)?;
        read.records.retain(|r| self.in_time(r));
        for g in &read.gaps {
            self.gap(g);
        }
        let resend = read.resend();
        self.send(read.records, resend).await;
        if self.stopped() {
            return Ok(());
        }
        if f.to < f.next {
            // Never sent. Its records outside --since/--until were counted
            // when the batch was read; a gap in it is damage found since.
            let mut rest = delivery::read_range(wal, f.to..f.next)?;
            rest.records.retain(|r| self.in_time(r));
            for g in &rest.gaps {
                self.gap(g);
            }
            self.send(rest.records, Resend::No).await;
            if self.stopped() {
                return Ok(());
            }
        }
        self.state.next_seq = self.state.next_seq.max(f.next);
        self.state.inflight = None;
        self.checkpoint()
    }

    /// The run stops before the end: the journal could not be written (an
    /// error), or the target keeps refusing for a reason that is not about
    /// the data. Then the request it refused stays in flight in the journal
    /// (re-sent on its own at the next run, then the rest of its batch):
    /// no record that was not delivered is passed.
    fn stop(&mut self) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.checkpoint()
    }

    /// Saves the position reached, with the counters so far.
    fn checkpoint(&mut self) -> Result<()> {
        self.update_progress();
        self.save()
    }
}

/// A replay's deliveries: each request's range written to the journal
/// before it is sent, the counts kept for the report.
impl Ledger for Run {
    fn name(&self) -> &str {
        "replay"
    }

    fn link(&mut self) -> &mut Link {
        &mut self.link
    }

    async fn begin(&mut self, request: &Request) -> ControlFlow<()> {
        self.pace(request.samples).await;
        self.state.inflight = Some(InFlight {
            from: request.range.start,
            to: request.range.end,
            next: self.batch_end.max(request.range.end),
        });
        match self.save() {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.failed = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    fn end(&mut self) {}

    async fn done(&mut self, request: &Request, how: Done) {
        self.run.partial_writes = self.watch.partial_writes.load(Ordering::Relaxed);
        self.run.unconfirmed_writes = self.watch.unconfirmed_writes.load(Ordering::Relaxed);
        match how {
            Done::Delivered { .. } => {
                self.run.requests += 1;
                self.run.records += request.records;
                self.run.samples += request.samples;
            }
            Done::AlreadyDelivered => self.run.already_delivered_records += request.records,
            Done::Rejected { status, body } => {
                self.reject(request.range.start, request.samples, status, body);
            }
            Done::Undecodable { error } => {
                self.run.skipped_records += request.records;
                self.progress_println(&format!(
                    "walrelay replay: record {} cannot be turned into a request and is \
                     skipped: {error}",
                    request.range.start
                ));
            }
        }
    }

    fn split(&mut self, _reason: &'static str) {}

    fn blocked(&mut self, reason: String) {
        self.progress_println(&format!(
            "walrelay replay: the target keeps refusing requests ({reason}); stopping, \
             nothing skipped"
        ));
        self.blocked = Some(reason);
    }

    fn stopped(&self) -> bool {
        self.blocked.is_some() || self.failed.is_some()
    }
}

/// One shard of a batch of `wal replay --shards`: its parts, its own link,
/// what it counted; the batch's journal entry is written for all shards.
struct ShardRun {
    link: Link,
    parts: Vec<Record>,
    totals: Totals,
    /// Records refused: seq, samples, status, answer.
    rejections: Vec<(u64, u64, u16, String)>,
    /// Lines for the progress output.
    notes: Vec<String>,
    blocked: Option<String>,
    /// Set by a shard that is blocked: the others stop after their request.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Ledger for ShardRun {
    fn name(&self) -> &str {
        "replay"
    }

    fn link(&mut self) -> &mut Link {
        &mut self.link
    }

    async fn begin(&mut self, _request: &Request) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn end(&mut self) {}

    async fn done(&mut self, request: &Request, how: Done) {
        match how {
            Done::Delivered { .. } => {
                self.totals.requests += 1;
                self.totals.samples += request.samples;
            }
            Done::AlreadyDelivered => self.totals.already_delivered_records += request.records,
            Done::Rejected { status, body } => {
                let seq = request.range.start;
                self.rejections.push((seq, request.samples, status, body));
            }
            Done::Undecodable { error } => {
                self.totals.skipped_records += request.records;
                self.notes.push(format!(
                    "walrelay replay: record {} cannot be turned into a request and is \
                     skipped: {error}",
                    request.range.start
                ));
            }
        }
    }

    fn split(&mut self, _reason: &'static str) {}

    fn blocked(&mut self, reason: String) {
        self.notes.push(format!(
            "walrelay replay: the target keeps refusing requests ({reason}); stopping, \
             nothing skipped"
        ));
        self.blocked = Some(reason);
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.blocked.is_some() || self.stop.load(Ordering::Relaxed)
    }
}

/// `--drop-on-status 404,410`.
fn parse_drop_on_status(s: &str) -> Result<StatusPolicy, String> {
    StatusPolicy::with_drop_on(&parse_statuses(s)?)
}

fn parse_headers(list: &[String]) -> Result<Vec<(String, String)>> {
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            h.split_once('=')
                .or_else(|| h.split_once(':'))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                // Not echoed: it may be a secret value.
                .ok_or_else(|| anyhow!("--header number {}: expected NAME=VALUE", i + 1))
        })
        .collect()
}

/// Runs `walrelay wal replay`.
///
/// # Errors
/// Bad arguments, a missing data dir, an unreadable log or state file.
pub fn run(args: &ReplayArgs) -> Result<ExitCode> {
    let dir = DataDir::open(&args.data_dir)?;
    let url = reqwest::Url::parse(&args.to)
        .map_err(|e| anyhow!("--to {:?}: {e}", redact_url(&args.to)))?
        .to_string();
    // What is printed and stored: no password, no query, no fragment.
    let shown = redact_url(&url);
    let headers = parse_headers(&args.headers)?;
    let (tls, auth) = ReplicaAccess {
        tls: ClientTlsOptions {
            ca_file: args.tls_ca_file.clone(),
            cert_file: args.tls_cert_file.clone(),
            key_file: args.tls_key_file.clone(),
            server_name: args.tls_server_name.clone(),
            insecure_skip_verify: args.tls_insecure_skip_verify,
        },
        bearer_token_file: args.bearer_token_file.clone(),
        basic_auth_username: args.basic_auth_username.clone(),
        basic_auth_password_file: args.basic_auth_password_file.clone(),
    }
    .check(&url)
    .map_err(|e| anyhow!("--to {shown}: {e}"))?;
    let max_bytes = crate::config::parse_bytes(&args.max_bytes_per_send)
        .map_err(|e| anyhow!("--max-bytes-per-send: {e}"))?;
    let timeout = humantime::parse_duration(&args.send_timeout)
        .map_err(|e| anyhow!("--send-timeout {:?}: {e}", args.send_timeout))?;
    let max_backoff = humantime::parse_duration(&args.retry_max_backoff)
        .map_err(|e| anyhow!("--retry-max-backoff {:?}: {e}", args.retry_max_backoff))?;
    if let Some(r) = args.max_samples_per_second {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--max-samples-per-second must be a positive number");
        }
    }
    // Built for a dry run too: it checks the TLS and credentials files.
    let sender = Sender::new(
        "replay",
        &url,
        SenderOptions {
            timeout,
            min_backoff: Duration::from_millis(100),
            max_backoff,
            tls,
            policy: args.drop_on_status.clone().unwrap_or_default(),
            max_blocked_attempts: Some(BLOCKED_ATTEMPTS_BEFORE_STOPPING),
            headers,
            auth,
        },
    )
    .map_err(|e| anyhow!("--to {shown}: {e}"))?;
    let watch = Arc::new(Watch::default());
    let link = Link::new(
        sender,
        args.protocol,
        Arc::clone(&watch) as Arc<dyn SendObserver>,
    );
    let (wal, _) = dir.open_wal()?;
    let fingerprint = selection_fingerprint(args);
    let state_path = args
        .state_file
        .clone()
        .unwrap_or_else(|| default_state_file(&dir, &url));
    let previous = if args.restart {
        None
    } else {
        load_state(&state_path)?
    };
    let previous = match previous {
        Some(st) if !st.is_for(&url) || st.args != fingerprint => bail!(
            "state file {} belongs to another replay ({} with {}); pass --restart to start \
             this one over, or --state-file for a separate one",
            state_path.display(),
            redact_url(&st.url),
            st.args
        ),
        Some(mut st) => {
            if st.url_sha256.is_none() && !args.dry_run {
                // A version 1 file holds the full URL: rewritten redacted
                // (and 0600) at once.
                st.version = STATE_VERSION;
                st.url = shown.clone();
                st.url_sha256 = Some(url_digest(&url));
                save_state(&state_path, &mut st)?;
            }
            Some(st)
        }
        None => None,
    };
    let (state, resumed_at) = match previous {
        Some(st) if st.done && !args.dry_run => {
            let mut out = common::stdout();
            writeln!(
                out,
                "this replay already completed (state file {}, records {}..{}): {} records, \
                 {} samples delivered; pass --restart to send it again",
                state_path.display(),
                st.start,
                st.end,
                st.totals.records,
                st.totals.samples
            )?;
            out.flush()?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(st) => {
            let at = st.next_seq;
            (st, Some(at))
        }
        None => {
            let (start, end) = resolve_range(args, &wal)?;
            let t = |s: &Option<String>| s.as_deref().map(common::parse_time).transpose();
            (
                State {
                    version: STATE_VERSION,
                    url: shown.clone(),
                    url_sha256: Some(url_digest(&url)),
                    args: fingerprint,
                    start,
                    end,
                    since: t(&args.since)?,
                    until: t(&args.until)?,
                    next_seq: start,
                    inflight: None,
                    shards: 1,
                    done: false,
                    totals: Totals::default(),
                    updated: String::new(),
                },
                None,
            )
        }
    };
    let max_samples = match args.max_samples_per_second {
        // A request never holds more than a second's worth (but at least
        // one record).
        Some(r) => args.max_samples_per_send.min(r.ceil() as u64).max(1),
        None => args.max_samples_per_send.max(1),
    };
    let progress = Progress::new(state.next_seq, state.end);
    let mut run = Run {
        dry_run: args.dry_run,
        state_path: (!args.dry_run).then(|| state_path.clone()),
        run: Totals::default(),
        gaps: Vec::new(),
        rejections: Vec::new(),
        limits: BatchLimits {
            max_samples,
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
        },
        rate: args.max_samples_per_second,
        started: Instant::now(),
        paced_samples: 0.0,
        progress,
        blocked: None,
        failed: None,
        batch_end: 0,
        shards: args.shards,
        shard_links: (0..state.shards.max(args.shards))
            .map(|_| {
                Link::new(
                    link.sender.clone(),
                    args.protocol,
                    Arc::clone(&watch) as Arc<dyn SendObserver>,
                )
            })
            .collect(),
        link,
        watch,
        state,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(async {
        let ticker = run.progress.ticker(Arc::clone(&run.watch), run.state.end);
        let r = run.replay(&wal).await;
        ticker.abort();
        r
    });
    if let Some(bar) = &run.progress.bar {
        bar.finish_and_clear();
    }
    result?;
    report(args, &run, &state_path, resumed_at)
}

fn report(
    args: &ReplayArgs,
    run: &Run,
    state_path: &Path,
    resumed_at: Option<u64>,
) -> Result<ExitCode> {
    let mut total = run.state.totals.clone();
    total.add(&run.run);
    let elapsed = run.started.elapsed().as_secs_f64();
    let r = Report {
        url: run.state.url.clone(),
        dry_run: args.dry_run,
        state_file: (!args.dry_run).then(|| state_path.to_path_buf()),
        from_seq: run.state.start,
        end_seq: run.state.end,
        resumed_at,
        complete: run.state.done,
        this_run: run.run.clone(),
        total: total.clone(),
        gaps: run.gaps.clone(),
        rejections: run.rejections.clone(),
        blocked: run.blocked.clone(),
        elapsed_seconds: elapsed,
        samples_per_second: run.run.samples as f64 / elapsed.max(0.001),
    };
    let ok = total.rejected_records == 0 && total.skipped_records == 0 && r.blocked.is_none();
    let mut out = common::stdout();
    if args.json {
        common::write_json_pretty(&mut out, &r)?;
    } else {
        let t = &r.this_run;
        writeln!(
            out,
            "replay of records {}..{} to {}{}{}",
            r.from_seq,
            r.end_seq,
            r.url,
            if args.dry_run {
                " (dry run: nothing sent)"
            } else {
                ""
            },
            resumed_at.map_or_else(String::new, |s| format!(", resumed at {s}"))
        )?;
        let verb = if args.dry_run {
            "would send"
        } else {
            "delivered"
        };
        writeln!(
            out,
            "  {verb}: {} records, {} samples in {} requests ({:.1}s, {:.0} samples/s)",
            t.records, t.samples, t.requests, elapsed, r.samples_per_second
        )?;
        writeln!(
            out,
            "  rejected: {} records ({} samples)",
            t.rejected_records, t.rejected_samples
        )?;
        if t.already_delivered_records > 0 {
            writeln!(
                out,
                "  already delivered before the interruption: {} records",
                t.already_delivered_records
            )?;
        }
        writeln!(
            out,
            "  skipped (unreadable): {} records in {} ranges",
            t.skipped_records,
            r.gaps.len()
        )?;
        if t.filtered_records > 0 {
            writeln!(
                out,
                "  outside --since/--until: {} records",
                t.filtered_records
            )?;
        }
        if resumed_at.is_some() {
            writeln!(
                out,
                "  all runs: {} records, {} samples delivered, {} rejected, {} skipped",
                total.records, total.samples, total.rejected_records, total.skipped_records
            )?;
        }
        for g in &r.gaps {
            writeln!(
                out,
                "  gap {}..{}: {}{}",
                g.from,
                g.to,
                g.file.as_ref().map_or_else(String::new, |f| format!(
                    "{} at offset {}: ",
                    f.display(),
                    g.offset.unwrap_or(0)
                )),
                g.reason
            )?;
        }
        for rej in &r.rejections {
            writeln!(
                out,
                "  rejected record {} (HTTP {}): {}",
                rej.seq, rej.status, rej.body
            )?;
        }
        if let Some(reason) = &r.blocked {
            writeln!(
                out,
                "  stopped at record {}: the target refuses requests for a reason that is not \
                 about the data ({reason}); nothing was skipped: fix it and run the same \
                 command again to resume",
                run.state.inflight.map_or(run.state.next_seq, |f| f.from)
            )?;
        }
        if let Some(p) = &r.state_file {
            writeln!(out, "  state: {}", p.display())?;
        }
    }
    out.flush()?;
    Ok(common::exit_code(ok))
}
