//! Real senders (issue 19): a Prometheus agent and a vmagent, each
//! scraping many targets and remote-writing into the system under test,
//! which forwards to the two null sinks. What the load generator cannot
//! show: the request shapes real senders make (Prometheus: up to 2,000
//! samples a request from many queue shards at once; vmagent: its own
//! blocks), and the system's CPU per sample on them.
//!
//! The targets are one exposition file that the sinks' nginx serves at
//! `/metrics` (a static file costs nginx next to nothing); each target is
//! its own job, so every target's series are distinct. A sender scrapes
//! every target once a second. After a warm-up, the phase measures for its
//! duration: the samples the system took in (its own ingest counter), and
//! the CPU time of the system and of the sender.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos_tests::ports::try_free_port;
use chaos_tests::tools::VMAGENT;
use chaos_tests::{Proc, Prometheus, PrometheusOpts};
use serde::Serialize;

use crate::nginx::NullSinks;
use crate::procstat;
use crate::rounds;
use crate::systems::{Kind, Start, System};

/// Series in the exposition file, per target.
pub const SERIES_PER_TARGET: usize = 2_000;

/// Time given to the sender to discover, scrape and settle before measuring.
const WARMUP: Duration = Duration::from_secs(15);

/// A real sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SenderKind {
    PrometheusAgent,
    Vmagent,
}

impl SenderKind {
    fn label(self) -> &'static str {
        match self {
            SenderKind::PrometheusAgent => "Prometheus agent",
            SenderKind::Vmagent => "vmagent",
        }
    }
}

/// One sender into one system.
#[derive(Clone, Debug, Serialize)]
pub struct SenderResult {
    pub sender: SenderKind,
    pub system: Kind,
    pub label: String,
    pub targets: usize,
    /// Samples per second the system took in.
    pub samples_per_s: f64,
    /// The system's CPU seconds per million samples taken in.
    pub cpu_s_per_million: f64,
    /// The sender's, for scale.
    pub sender_cpu_s_per_million: f64,
    pub peak_rss_bytes: u64,
    /// With `--senders-rounds`: the system's CPU s per M samples in every
    /// round, in the order they ran (this result is the median round).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds_cpu_s_per_million: Vec<f64>,
}

/// The exposition file: `SERIES_PER_TARGET` series of 100 metric names,
/// with labels shaped like an HTTP server's.
fn exposition() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for i in 0..SERIES_PER_TARGET {
        let _ = writeln!(
            s,
            "bench_requests_{m}_total{{handler=\"/api/v1/{h}\",code=\"{c}\",method=\"{v}\"}} {n}",
            m = i % 100,
            h = (i / 100) % 5,
            c = [200, 204, 400, 500][(i / 500) % 4],
            v = ["GET", "POST"][(i / 10) % 2],
            n = i * 7 + 1,
        );
    }
    s
}

/// Runs every sender into every system (`systems`, in order), `rounds`
/// times with the systems taking turns, and returns each system's median
/// round by CPU per sample. At about 6 % of a core, the CPU per sample of
/// one 30 s run varies by a quarter on this machine, as the sweep's does.
pub async fn senders_phase(
    systems: &[Kind],
    targets: usize,
    duration: Duration,
    rounds: u32,
    sinks: &NullSinks,
    start: &Start<'_>,
) -> Result<Vec<SenderResult>> {
    sinks.serve_metrics(&exposition())?;
    let target = sinks.metrics_addr(0);
    // An agent does not take remote-write in.
    let systems: Vec<Kind> = systems
        .iter()
        .copied()
        .filter(|&k| k != Kind::PrometheusAgent)
        .collect();
    let mut out = Vec::new();
    for sender in [SenderKind::PrometheusAgent, SenderKind::Vmagent] {
        let mut runs: Vec<Vec<SenderResult>> = systems.iter().map(|_| Vec::new()).collect();
        for round in 1..=rounds {
            for (i, &kind) in systems.iter().enumerate() {
                eprintln!(
                    "== real sender: {} into {}{}",
                    sender.label(),
                    kind.label(),
                    rounds::suffix(round, rounds)
                );
                let r = one(sender, kind, targets, &target, duration, sinks, start)
                    .await
                    .with_context(|| {
                        format!("{} into {}, round {round}", sender.label(), kind.label())
                    })?;
                eprintln!(
                    "   {:.0} samples/s, {:.2} CPU s per M samples",
                    r.samples_per_s, r.cpu_s_per_million
                );
                runs[i].push(r);
            }
        }
        for runs in runs {
            let cpu: Vec<f64> = runs.iter().map(|r| r.cpu_s_per_million).collect();
            let mut median = runs[rounds::median_index(&cpu)].clone();
            if rounds > 1 {
                median.rounds_cpu_s_per_million = cpu;
            }
            out.push(median);
        }
    }
    Ok(out)
}

async fn one(
    sender: SenderKind,
    kind: Kind,
    targets: usize,
    target: &str,
    duration: Duration,
    sinks: &NullSinks,
    start: &Start<'_>,
) -> Result<SenderResult> {
    let sys = System::start(kind, [sinks.url(0), sinks.url(1)], start).await?;
    let dir = tempfile::Builder::new()
        .prefix("walrelay-bench-sender-")
        .tempdir_in(start.data_root)?;
    let running = Sender::start(sender, targets, target, &sys.write_url(), dir.path()).await?;
    tokio::time::sleep(WARMUP).await;
    let pid = sys.pid()?;
    let (taken0, cpu0, scpu0) = (
        sys.samples_taken_in().await?,
        procstat::cpu_seconds(pid)?,
        procstat::cpu_seconds(running.pid()?)?,
    );
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    let (taken1, cpu1, scpu1) = (
        sys.samples_taken_in().await?,
        procstat::cpu_seconds(pid)?,
        procstat::cpu_seconds(running.pid()?)?,
    );
    let secs = t0.elapsed().as_secs_f64();
    let peak_rss_bytes = procstat::peak_rss(pid).unwrap_or(0);
    running.stop();
    sys.stop().await?;
    let taken = (taken1 - taken0).max(0.0);
    if taken < 1.0 {
        bail!("the system took in no sample from the sender");
    }
    let million = taken / 1e6;
    Ok(SenderResult {
        sender,
        system: kind,
        label: kind.label().to_string(),
        targets,
        samples_per_s: taken / secs,
        cpu_s_per_million: (cpu1 - cpu0) / million,
        sender_cpu_s_per_million: (scpu1 - scpu0) / million,
        peak_rss_bytes,
        rounds_cpu_s_per_million: Vec::new(),
    })
}

/// A running sender.
enum Sender {
    Agent(Box<Prometheus>),
    Vmagent(Proc),
}

impl Sender {
    async fn start(
        kind: SenderKind,
        targets: usize,
        target: &str,
        write_url: &str,
        dir: &std::path::Path,
    ) -> Result<Sender> {
        match kind {
            SenderKind::PrometheusAgent => {
                let mut opts = PrometheusOpts::agent().scrape_interval(Duration::from_secs(1));
                for t in 0..targets {
                    opts = opts.scrape_config(scrape_job(t, target));
                }
                opts = opts.remote_write(write_url);
                opts.ready_timeout = Duration::from_secs(60);
                Ok(Sender::Agent(Box::new(Prometheus::start(opts).await?)))
            }
            SenderKind::Vmagent => {
                let config = serde_json::json!({
                    "global": { "scrape_interval": "1s" },
                    "scrape_configs": (0..targets).map(|t| scrape_job(t, target)).collect::<Vec<_>>(),
                });
                // JSON is YAML.
                let path = dir.join("scrape.yml");
                std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
                let port = try_free_port()?;
                let mut cmd = Command::new(VMAGENT.path()?);
                cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                    .arg(format!("-promscrape.config={}", path.display()))
                    .arg(format!(
                        "-remoteWrite.tmpDataPath={}",
                        dir.join("data").display()
                    ))
                    .arg(format!("-remoteWrite.url={write_url}"))
                    .arg("-loggerLevel=WARN")
                    .current_dir(dir);
                let proc = Proc::spawn_logging_to("vmagent-sender", cmd, &dir.join("vmagent.log"))?;
                chaos_tests::ports::wait_for_tcp(("127.0.0.1", port), Duration::from_secs(30))
                    .await
                    .with_context(|| proc.log_tail(20))?;
                Ok(Sender::Vmagent(proc))
            }
        }
    }

    fn pid(&self) -> Result<u32> {
        match self {
            Sender::Agent(p) => Ok(p.proc().context("prometheus is not running")?.pid()),
            Sender::Vmagent(p) => Ok(p.pid()),
        }
    }

    fn stop(self) {
        match self {
            Sender::Agent(p) => drop(p),
            Sender::Vmagent(p) => {
                let _ = p.sigkill();
            }
        }
    }
}

fn scrape_job(t: usize, target: &str) -> serde_json::Value {
    serde_json::json!({
        "job_name": format!("target-{t}"),
        "static_configs": [{ "targets": [target] }],
    })
}

/// The results as a Markdown table.
pub fn markdown(results: &[SenderResult], s: &mut String) {
    use std::fmt::Write;
    if results.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nReal senders, each scraping {} targets of {} series every second:\n\n\
         | sender | system | samples/s taken in | CPU s per M samples | × vmagent | sender CPU s per M | peak RSS |\n\
         |---|---|---:|---:|---:|---:|---:|",
        results[0].targets, SERIES_PER_TARGET
    );
    for r in results {
        let vm = results
            .iter()
            .find(|v| v.sender == r.sender && v.system == Kind::Vmagent);
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.0} MiB |",
            r.sender.label(),
            r.label,
            r.samples_per_s,
            r.cpu_s_per_million,
            vm.map_or(String::new(), |v| format!(
                "{:.2}",
                r.cpu_s_per_million / v.cpu_s_per_million
            )),
            r.sender_cpu_s_per_million,
            r.peak_rss_bytes as f64 / 1048576.0,
        );
    }
    if results
        .iter()
        .all(|r| r.rounds_cpu_s_per_million.is_empty())
    {
        return;
    }
    let _ = writeln!(
        s,
        "\nEach row above is the system's median round by CPU per sample. Every \
         round (the systems took turns), CPU s per M samples and its ratio to \
         vmagent's round of the same number:\n\n\
         | sender | system | CPU s per M, by round | × vmagent's, by round |\n\
         |---|---|---|---|"
    );
    for r in results {
        let vm = results
            .iter()
            .find(|v| v.sender == r.sender && v.system == Kind::Vmagent)
            .filter(|_| r.system != Kind::Vmagent);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            r.sender.label(),
            r.label,
            rounds::cell(&r.rounds_cpu_s_per_million, |_, c| Some(format!("{c:.2}"))),
            rounds::cell(&r.rounds_cpu_s_per_million, |i, c| {
                let v = vm?.rounds_cpu_s_per_million.get(i)?;
                Some(format!("{:.2}", c / v))
            }),
        );
    }
}
