//! `walrelay-bench`: the end-to-end benchmark of issue #6, in one command.
//!
//! On one machine, in one run, on the same load (`walrelay-load`'s
//! generator: one request in flight per worker, disjoint series per worker,
//! fresh timestamps), one system after the other:
//!
//! 1. **throughput**: walrelay (two replicas), vmagent (two
//!    `-remoteWrite.url`) and Prometheus in agent mode with the receiver (two
//!    `remote_write`), each forwarding to the same two nginx null sinks.
//!    Acknowledged samples/s, ack latency p50/p99, CPU seconds per million
//!    samples (utime+stime of the process from the load's start until it has
//!    delivered everything), peak RSS (VmHWM), and the drain time: from the
//!    end of the load until both sinks have everything it acknowledged.
//! 2. **absent replica**: the same systems started afresh with their second
//!    URL pointing at a closed port; bytes their data directory grew by, per
//!    acknowledged sample.
//! 3. **catch-up** (walrelay only): two real Prometheus servers as replicas,
//!    a fixed-rate load, replica b stopped for a while, then started again:
//!    the rate at which walrelay fills b's gap, as a multiple of the live
//!    ingest rate.
//!
//! Plus the disk's fsync latency (4 KiB write + fdatasync), to compare the
//! acknowledgement latency with. Results go to `--out` as `results.json`
//! and `results.md`; `benches/e2e/plot.py` draws the PNGs from the JSON.
//! `benches/e2e/run.sh` does everything (install, build, run, plot).

mod far;
mod nginx;
mod procstat;
mod rounds;
mod senders;
mod sweep;
mod systems;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos_tests::load::{AckLog, Load, LoadSpec, RetryPolicy};
use chaos_tests::{Prometheus, PrometheusOpts, Relay};
use clap::Parser;
use serde::Serialize;

use nginx::{NullSinks, SinkTraffic};
use systems::{Kind, ReplicaNow, Start, System};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "walrelay-bench",
    about = "walrelay vs vmagent vs Prometheus agent, end to end"
)]
struct Args {
    /// Where results.json and results.md go.
    #[arg(long, default_value = "benches/e2e/results")]
    out: PathBuf,
    /// The walrelay binary (a release build).
    #[arg(long, default_value = "target/release/walrelay")]
    walrelay_bin: PathBuf,
    /// Another walrelay build to run as the system `walrelay-baseline`,
    /// right after `walrelay` (e.g. the code before a change).
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// Extra arguments for `walrelay serve`.
    #[arg(long, allow_hyphen_values = true)]
    walrelay_arg: Vec<String>,
    /// Parent of the systems' data directories (the disk under test).
    #[arg(long, default_value = "/tmp")]
    data_root: PathBuf,
    /// Systems, in the order they run.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [Kind::Walrelay, Kind::Vmagent, Kind::PrometheusAgent])]
    systems: Vec<Kind>,
    /// Load: concurrent workers, each with one request in flight.
    #[arg(long, default_value_t = 8)]
    workers: u32,
    /// Load: series per worker (= samples per request).
    #[arg(long, default_value_t = 1000)]
    series_per_worker: u32,
    /// Length of the throughput phase per system (0 skips it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// Fixed-rate phase: time between a worker's requests (the same workers
    /// and series as the throughput phase), for the ack latency at a load
    /// every system sustains.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "80ms")]
    fixed_interval: Duration,
    /// Length of the fixed-rate phase per system (0 skips it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    fixed_duration: Duration,
    /// Length of the absent-replica phase per system (0 skips it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    absent_duration: Duration,
    /// Longest wait for a system to deliver everything after the load.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    drain_timeout: Duration,
    /// Catch-up: workers of the fixed-rate live load (0 skips the phase).
    #[arg(long, default_value_t = 4)]
    catchup_workers: u32,
    /// Catch-up: series per worker of the live load.
    #[arg(long, default_value_t = 1000)]
    catchup_series_per_worker: u32,
    /// Catch-up: time between a worker's requests (rate = workers x series / interval).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    catchup_interval: Duration,
    /// Catch-up: how long replica b is down.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    catchup_outage: Duration,
    /// Catch-up: load before the outage.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    catchup_warmup: Duration,
    /// Far replica (issue 18): time a proxy in front of each sink holds
    /// every request before forwarding it (a round trip of this much); 0
    /// skips the phase.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    far_delay: Duration,
    /// Far replica: the live rate, samples/s (live and catch-up runs).
    #[arg(long, default_value_t = 400_000)]
    far_rate: u64,
    /// Far replica: length of the load of a live or ladder run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    far_duration: Duration,
    /// Far replica: time between a worker's requests (`--series-per-worker`
    /// series each); workers = rate x interval / series. Long enough that
    /// a slower acknowledgement (up to this) does not lower the rate
    /// offered: many senders, each with one request in flight.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    far_interval: Duration,
    /// Far replica: a run keeps up when everything is delivered within this
    /// of the load's end.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    far_keep_up: Duration,
    /// Far replica: systems of the live runs, by label (walrelay,
    /// walrelay-1-shard = `--replica-shards a=1,b=1`, vmagent; none), then
    /// every --far-variant.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "walrelay,walrelay-1-shard,vmagent"
    )]
    far_systems: Vec<String>,
    /// Far replica: a walrelay variant, LABEL=ARGS (arguments for `walrelay
    /// serve`, whitespace-separated), e.g. "walrelay-2s=--shard-update-interval
    /// 2s"; it runs in the live and catch-up runs. Repeatable.
    #[arg(long, value_parser = far::Variant::parse)]
    far_variant: Vec<far::Variant>,
    /// Far replica: live rates (samples/s) each ladder system is stepped
    /// through, until it no longer keeps up (0 skips the ladder).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "200000,400000,800000,1200000,1600000,2000000"
    )]
    far_rates: Vec<u64>,
    /// Far replica: systems stepped through --far-rates, by label.
    #[arg(long, value_delimiter = ',', default_value = "walrelay,vmagent")]
    far_ladder_systems: Vec<String>,
    /// Far replica: longest wait for a drain in the ladder (longer does not
    /// keep up anyway).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    far_ladder_drain_timeout: Duration,
    /// Far replica catch-up: the time added to each request, one run each
    /// (none skips the catch-up).
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration, default_value = "1ms,100ms")]
    far_catchup_delays: Vec<Duration>,
    /// Far replica catch-up: walrelay variants measured, by label, then
    /// every --far-variant.
    #[arg(long, value_delimiter = ',', default_value = "walrelay")]
    far_catchup_systems: Vec<String>,
    /// Far replica catch-up: how long replica b refuses connections.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    far_outage: Duration,
    /// Far replica catch-up: load before the outage (the adaptive shard
    /// count settles: two evaluations at the default 10 s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    far_warmup: Duration,
    /// Far replica catch-up: longest wait for b to catch up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "180s")]
    far_catchup_timeout: Duration,
    /// fdatasync probes for the disk's fsync latency.
    #[arg(long, default_value_t = 500)]
    fsync_probes: usize,
    /// Concurrency sweep: points `SENDERSxSERIES` (e.g.
    /// `4x500,8x1000,16x500,64x100`), each a throughput phase of
    /// `--duration` for every system; see `sweep.rs`. Empty: no sweep.
    #[arg(long, value_delimiter = ',', value_parser = sweep::Point::parse)]
    sweep: Vec<sweep::Point>,
    /// Rounds of the sweep: every point runs every system this many times,
    /// the systems taking turns, and reports each system's median round by
    /// CPU per sample (the others in `rounds` of results.json). This
    /// machine's CPU per sample varies by a quarter from one 20 s run to
    /// the next; alternated rounds put both sides' noise in the ratio.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    sweep_rounds: u32,
    /// Real senders (issue 19): how long each of a Prometheus agent and a
    /// vmagent sends into each system after a warm-up (0 skips the phase).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    senders_duration: Duration,
    /// Real senders: targets each sender scrapes every second, of
    /// 2,000 series each.
    #[arg(long, default_value_t = 50)]
    senders_targets: usize,
    /// Rounds of the real senders: each sender runs into every system this
    /// many times, the systems taking turns, and each system's median round
    /// by CPU per sample is reported, as with `--sweep-rounds`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    senders_rounds: u32,
}

/// Everything one run measured.
#[derive(Serialize)]
struct Results {
    started_unix_ms: i64,
    machine: Machine,
    args: ArgsRecord,
    fsync: procstat::FsyncLatency,
    throughput: Vec<ThroughputResult>,
    /// The same measurements at a fixed rate below every system's capacity.
    fixed_rate: Vec<ThroughputResult>,
    absent: Vec<AbsentResult>,
    catchup: Option<CatchupResult>,
    /// The far replica phase (issue 18).
    far: Option<far::FarResults>,
    /// The concurrency sweep (issue 19).
    sweep: Vec<sweep::SweepPoint>,
    /// Real senders (issue 19).
    senders: Vec<senders::SenderResult>,
}

#[derive(Serialize)]
struct ArgsRecord {
    command: String,
    workers: u32,
    series_per_worker: u32,
    duration_s: f64,
    fixed_interval_ms: f64,
    fixed_duration_s: f64,
    absent_duration_s: f64,
    walrelay_args: Vec<String>,
}

#[derive(Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    mem_total: String,
    kernel: String,
    disk: String,
    loadavg_before: String,
    versions: Vec<(String, String)>,
}

#[derive(Serialize, Clone)]
struct ThroughputResult {
    system: Kind,
    /// The system's name, or its variant's (far phase).
    label: String,
    /// A fixed-rate load's samples/s (workers x series / interval).
    offered_samples_per_s: Option<f64>,
    acked_samples: u64,
    acked_requests: u64,
    refused_attempts: u64,
    failed_attempts: u64,
    elapsed_s: f64,
    samples_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_s: f64,
    cpu_s_per_million: f64,
    peak_rss_bytes: u64,
    drain_s: Option<f64>,
    /// Seconds of the load in `timeline` (the drain follows).
    load_seconds: usize,
    /// Per second of the load and the drain.
    timeline: Timeline,
    /// Per second of the load: acknowledged samples/s.
    timeline_samples_per_s: Vec<f64>,
    /// Per second of the load: CPU use of the system (cores).
    timeline_cpu: Vec<f64>,
    /// Per second of the load: RSS in bytes.
    timeline_rss: Vec<u64>,
    /// Latency quantiles (ms) at 0, 1, ..., 100 %.
    latency_quantiles_ms: Vec<f64>,
    /// The generator's own CPU seconds (the bench process) during the load.
    loader_cpu_s: f64,
    sinks: [SinkTraffic; 2],
}

#[derive(Serialize)]
struct AbsentResult {
    system: Kind,
    acked_samples: u64,
    samples_per_s: f64,
    dir_before: procstat::DirSize,
    dir_after: procstat::DirSize,
    bytes_per_sample: f64,
    allocated_bytes_per_sample: f64,
}

#[derive(Serialize)]
struct CatchupResult {
    live_samples_per_s: f64,
    outage_s: f64,
    /// Samples b had not received when it came back.
    gap_samples: f64,
    /// From b ready to its first delivery (the shipper's retry backoff).
    first_delivery_after_s: f64,
    /// From the first delivery until b was caught up (lag 0).
    catchup_s: f64,
    /// From b ready until b was caught up, waiting included, and the rate
    /// and multiple of the live rate over that time.
    ready_to_caught_up_s: f64,
    effective_samples_per_s: f64,
    effective_multiple_of_live: f64,
    /// Samples delivered to b in that time.
    catchup_samples: f64,
    catchup_samples_per_s: f64,
    multiple_of_live: f64,
    /// Samples acked and samples b holds at the end (a sanity check).
    acked_samples: u64,
    b_sent_samples: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

fn spec(args: &Args, duration: Duration) -> LoadSpec {
    spec_of(args.workers, args.series_per_worker, duration)
}

/// The closed-loop load: `workers` senders of `series_per_worker` series.
fn spec_of(workers: u32, series_per_worker: u32, duration: Duration) -> LoadSpec {
    LoadSpec {
        workers,
        series_per_worker,
        samples_per_series: 1,
        duration: Some(duration),
        retry: RetryPolicy::Retryable,
        request_timeout: Duration::from_secs(30),
        run_id: LoadSpec::new_run_id(),
        ..LoadSpec::default()
    }
}

async fn run(args: Args) -> Result<()> {
    if !args.walrelay_bin.is_file() {
        bail!(
            "{} is not built: `cargo build --release --bin walrelay` first",
            args.walrelay_bin.display()
        );
    }
    std::fs::create_dir_all(&args.out)?;
    let mut args = args;
    if args.baseline_bin.is_some() && !args.systems.contains(&Kind::WalrelayBaseline) {
        let at = args
            .systems
            .iter()
            .position(|k| *k == Kind::Walrelay)
            .map_or(0, |i| i + 1);
        args.systems.insert(at, Kind::WalrelayBaseline);
    }
    let args = args;
    let machine = machine(&args)?;
    eprintln!(
        "== machine: {} x {}, {}",
        machine.cpus, machine.cpu_model, machine.disk
    );
    let fsync = procstat::fsync_latency(&args.data_root, args.fsync_probes)?;
    eprintln!(
        "== fsync (4 KiB write + fdatasync) in {}: p50 {:.2} ms, p99 {:.2} ms",
        args.data_root.display(),
        fsync.p50_us as f64 / 1e3,
        fsync.p99_us as f64 / 1e3
    );
    let mut sinks = NullSinks::start().await?;
    let start = Start {
        walrelay_bin: &args.walrelay_bin,
        baseline_bin: args.baseline_bin.as_deref(),
        walrelay_args: &args.walrelay_arg,
        data_root: &args.data_root,
    };
    let mut throughput = Vec::new();
    let closed_loop = if args.duration.is_zero() {
        &[][..]
    } else {
        &args.systems[..]
    };
    for &kind in closed_loop {
        let run = Run::plain(&args, kind, &sinks, &start, spec(&args, args.duration));
        let r = throughput_phase(&sinks, run)
            .await
            .with_context(|| format!("throughput phase of {}", kind.label()))?;
        eprintln!(
            "   {}: {:.0} samples/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} CPU s/M, peak RSS {:.0} MiB, drain {}",
            kind.label(),
            r.samples_per_s,
            r.p50_ms,
            r.p99_ms,
            r.cpu_s_per_million,
            r.peak_rss_bytes as f64 / 1048576.0,
            r.drain_s.map_or("timeout".into(), |d| format!("{d:.2} s"))
        );
        throughput.push(r);
    }
    let mut fixed_rate = Vec::new();
    if !args.fixed_duration.is_zero() {
        for &kind in &args.systems {
            let spec = LoadSpec {
                interval: args.fixed_interval,
                ..spec(&args, args.fixed_duration)
            };
            let r = throughput_phase(&sinks, Run::plain(&args, kind, &sinks, &start, spec))
                .await
                .with_context(|| format!("fixed-rate phase of {}", kind.label()))?;
            eprintln!(
                "   {} at a fixed rate: {:.0} samples/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} CPU s/M",
                kind.label(),
                r.samples_per_s,
                r.p50_ms,
                r.p99_ms,
                r.cpu_s_per_million,
            );
            fixed_rate.push(r);
        }
    }
    let mut absent = Vec::new();
    if !args.absent_duration.is_zero() {
        let closed = format!(
            "http://127.0.0.1:{}/api/v1/write",
            chaos_tests::ports::try_free_port()?
        );
        for &kind in &args.systems {
            let r = absent_phase(&args, kind, &sinks, &closed, &start)
                .await
                .with_context(|| format!("absent-replica phase of {}", kind.label()))?;
            eprintln!(
                "   {}: {:.2} bytes/sample buffered ({} samples)",
                kind.label(),
                r.bytes_per_sample,
                r.acked_samples
            );
            absent.push(r);
        }
    }
    let sweep = sweep::sweep(&args, &sinks, &start)
        .await
        .context("concurrency sweep")?;
    let senders = if args.senders_duration.is_zero() {
        Vec::new()
    } else {
        senders::senders_phase(
            &args.systems,
            args.senders_targets,
            args.senders_duration,
            args.senders_rounds,
            &sinks,
            &start,
        )
        .await
        .context("real senders")?
    };
    let far = if args.far_delay.is_zero() {
        None
    } else {
        Some(
            far::far_phase(&args, &sinks, &start)
                .await
                .context("far replica phase")?,
        )
    };
    sinks.stop();
    let catchup = if args.catchup_workers > 0 && args.systems.contains(&Kind::Walrelay) {
        let c = catchup_phase(&args).await.context("catch-up phase")?;
        eprintln!(
            "   catch-up: {:.0} samples/s live, gap {:.0} samples filled at {:.0} samples/s = {:.1}x live",
            c.live_samples_per_s, c.gap_samples, c.catchup_samples_per_s, c.multiple_of_live
        );
        Some(c)
    } else {
        None
    };
    let results = Results {
        started_unix_ms: chaos_tests::now_ms(),
        machine,
        args: ArgsRecord {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            workers: args.workers,
            series_per_worker: args.series_per_worker,
            duration_s: args.duration.as_secs_f64(),
            fixed_interval_ms: args.fixed_interval.as_secs_f64() * 1e3,
            fixed_duration_s: args.fixed_duration.as_secs_f64(),
            absent_duration_s: args.absent_duration.as_secs_f64(),
            walrelay_args: args.walrelay_arg.clone(),
        },
        fsync,
        throughput,
        fixed_rate,
        absent,
        catchup,
        far,
        sweep,
        senders,
    };
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = markdown(&results);
    std::fs::write(args.out.join("results.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// CPU seconds, tolerant of a process that is gone.
fn cpu(pid: u32) -> f64 {
    procstat::cpu_seconds(pid).unwrap_or(f64::NAN)
}

/// One run of a system under a load.
struct Run<'a> {
    kind: Kind,
    /// Its name in the results: the system's, or a variant's (walrelay
    /// with other arguments).
    label: String,
    /// Where it forwards: the sinks, or proxies in front of them.
    urls: [String; 2],
    start: Start<'a>,
    load: LoadSpec,
    drain_timeout: Duration,
}

impl Run<'_> {
    /// A run of `kind` straight into the sinks, as the system comes.
    fn plain<'a>(
        args: &Args,
        kind: Kind,
        sinks: &NullSinks,
        start: &Start<'a>,
        load: LoadSpec,
    ) -> Run<'a> {
        Run {
            kind,
            label: kind.label().to_string(),
            urls: [sinks.url(0), sinks.url(1)],
            start: start.clone(),
            load,
            drain_timeout: args.drain_timeout,
        }
    }
}

/// Samples/s a fixed-rate load offers (None for a closed loop).
fn offered(spec: &LoadSpec) -> Option<f64> {
    (!spec.interval.is_zero()).then(|| {
        f64::from(spec.workers)
            * f64::from(spec.series_per_worker)
            * f64::from(spec.samples_per_series)
            / spec.interval.as_secs_f64()
    })
}

/// One second's worth of counters.
#[derive(Clone, Copy)]
struct Point {
    acked: u64,
    cpu: f64,
    loader_cpu: f64,
    machine_cpu: f64,
}

impl Point {
    fn now(pid: u32, acked: u64) -> Point {
        Point {
            acked,
            cpu: cpu(pid),
            loader_cpu: cpu(std::process::id()),
            machine_cpu: procstat::machine_busy_seconds().unwrap_or(f64::NAN),
        }
    }
}

/// Per-second samples of a system under load: acknowledged samples, its
/// CPU and RSS, the bench process's CPU (the load generator, and the
/// proxies of the far phase), the machine's, and walrelay's replicas.
#[derive(Default, Serialize, Clone)]
pub(crate) struct Timeline {
    /// Acknowledged samples per second.
    pub samples_per_s: Vec<f64>,
    /// CPU of the system (cores).
    pub cpu: Vec<f64>,
    /// RSS of the system (bytes).
    pub rss: Vec<u64>,
    /// CPU of the bench process (cores).
    pub loader_cpu: Vec<f64>,
    /// CPU of the whole machine (cores busy).
    pub machine_cpu: Vec<f64>,
    /// walrelay: replicas a and b at each second.
    pub replicas: Vec<[systems::ReplicaNow; 2]>,
}

/// Takes a [`Timeline`] sample once a second, when ticked.
struct Sampler {
    pid: u32,
    next: Instant,
    last: Point,
    timeline: Timeline,
}

impl Sampler {
    fn new(pid: u32) -> Sampler {
        Sampler {
            pid,
            next: Instant::now() + Duration::from_secs(1),
            last: Point::now(pid, 0),
            timeline: Timeline::default(),
        }
    }

    /// Seconds sampled so far.
    fn seconds(&self) -> usize {
        self.timeline.samples_per_s.len()
    }

    /// Takes a sample if a second has passed since the last one.
    async fn tick(&mut self, sys: &System, acked: u64) {
        if Instant::now() < self.next {
            return;
        }
        self.next += Duration::from_secs(1);
        let now = Point::now(self.pid, acked);
        let t = &mut self.timeline;
        t.samples_per_s
            .push(now.acked.saturating_sub(self.last.acked) as f64);
        t.cpu.push(now.cpu - self.last.cpu);
        t.loader_cpu.push(now.loader_cpu - self.last.loader_cpu);
        t.machine_cpu.push(now.machine_cpu - self.last.machine_cpu);
        t.rss.push(procstat::rss(self.pid).unwrap_or(0));
        if let Ok(Some(r)) = sys.replicas().await {
            t.replicas.push(r);
        }
        self.last = now;
    }

    /// Ticks every 20 ms for `d`.
    async fn run_for(&mut self, d: Duration, sys: &System, acked: impl Fn() -> u64) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.tick(sys, acked()).await;
        }
    }
}

async fn throughput_phase(sinks: &NullSinks, run: Run<'_>) -> Result<ThroughputResult> {
    let Run {
        kind,
        label,
        urls,
        start,
        load: spec,
        drain_timeout,
    } = run;
    eprintln!(
        "== {}: {label}{}",
        if spec.interval.is_zero() {
            "throughput"
        } else {
            "fixed rate"
        },
        offered(&spec).map_or(String::new(), |r| format!(" at {r:.0} samples/s"))
    );
    sinks.check_running()?;
    let offered_rate = offered(&spec);
    let sys = System::start(kind, urls, &start).await?;
    // Let the system settle (Prometheus replays nothing, but starts queues).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = sys.pid()?;
    let me = std::process::id();
    let log_offset = sinks.log_offset();
    let cpu0 = cpu(pid);
    let my_cpu0 = cpu(me);
    let load = Load::start(spec, &sys.write_url())?;
    let mut sampler = Sampler::new(pid);
    // The end of the load is noticed within 20 ms (the load's elapsed time
    // runs until it is joined).
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sampler.tick(&sys, load.progress().acked_samples).await;
    }
    let load_seconds = sampler.seconds();
    let log = load.join().await?;
    let my_cpu = cpu(me) - my_cpu0;
    let load_end = Instant::now();
    let summary = log.summary();
    let acked = summary.counts.acked_samples;
    let drain_s = wait_drained(&sys, acked, drain_timeout, load_end, &mut sampler).await?;
    let cpu_s = cpu(pid) - cpu0;
    let peak_rss = procstat::peak_rss(pid)?;
    // nginx writes its access log at least every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sink_traffic = sinks.traffic_since(log_offset)?;
    if drain_s.is_none() {
        eprintln!("   {label} did not drain; log tail:\n{}", sys.log_tail(20));
    }
    sys.stop().await?;
    let lat = latencies_ms(&log);
    let pct = |p: f64| quantile(&lat, p);
    let timeline = sampler.timeline;
    Ok(ThroughputResult {
        system: kind,
        label,
        offered_samples_per_s: offered_rate,
        acked_samples: acked,
        acked_requests: summary.counts.acked_requests,
        refused_attempts: summary.counts.refused,
        failed_attempts: summary.counts.failed,
        elapsed_s: summary.elapsed_ms as f64 / 1000.0,
        samples_per_s: summary.acked_samples_per_sec,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        cpu_s,
        cpu_s_per_million: cpu_s / (acked.max(1) as f64 / 1e6),
        peak_rss_bytes: peak_rss,
        drain_s,
        load_seconds,
        timeline_samples_per_s: timeline.samples_per_s[..load_seconds].to_vec(),
        timeline_cpu: timeline.cpu[..load_seconds].to_vec(),
        timeline_rss: timeline.rss[..load_seconds].to_vec(),
        timeline,
        latency_quantiles_ms: (0..=100).map(|i| pct(f64::from(i) / 100.0)).collect(),
        loader_cpu_s: my_cpu,
        sinks: sink_traffic,
    })
}

/// Polls until `sys` has delivered `acked` samples to both URLs; returns
/// the seconds since `since`, or None after `timeout`. `sampler` goes on
/// sampling meanwhile.
async fn wait_drained(
    sys: &System,
    acked: u64,
    timeout: Duration,
    since: Instant,
    sampler: &mut Sampler,
) -> Result<Option<f64>> {
    let deadline = since + timeout;
    loop {
        match sys.drained(acked).await {
            Ok(true) => return Ok(Some(since.elapsed().as_secs_f64())),
            Ok(false) => {}
            Err(e) => eprintln!("   (drain check failed: {e:#})"),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        sampler.tick(sys, acked).await;
    }
}

fn latencies_ms(log: &AckLog) -> Vec<f64> {
    let mut l: Vec<f64> = log
        .batches
        .iter()
        .filter_map(|b| b.latency_us)
        .map(|us| us as f64 / 1000.0)
        .collect();
    l.sort_by(f64::total_cmp);
    l
}

fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn absent_phase(
    args: &Args,
    kind: Kind,
    sinks: &NullSinks,
    closed_url: &str,
    start: &Start<'_>,
) -> Result<AbsentResult> {
    eprintln!("== absent replica: {}", kind.label());
    let sys = System::start(kind, [sinks.url(0), closed_url.to_string()], start).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = procstat::dir_size(&sys.data_dir);
    let log = Load::run(spec(args, args.absent_duration), &sys.write_url()).await?;
    // vmagent flushes its in-memory buffers every second; give every
    // system a moment to put what it holds on disk.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = procstat::dir_size(&sys.data_dir);
    sys.stop().await?;
    let s = log.summary();
    let acked = s.counts.acked_samples.max(1) as f64;
    Ok(AbsentResult {
        system: kind,
        acked_samples: s.counts.acked_samples,
        samples_per_s: s.acked_samples_per_sec,
        bytes_per_sample: after.apparent.saturating_sub(before.apparent) as f64 / acked,
        allocated_bytes_per_sample: after.allocated.saturating_sub(before.allocated) as f64 / acked,
        dir_before: before,
        dir_after: after,
    })
}

async fn catchup_phase(args: &Args) -> Result<CatchupResult> {
    eprintln!(
        "== catch-up: walrelay with two Prometheus servers, replica b down for {:?}",
        args.catchup_outage
    );
    let a = Prometheus::start(PrometheusOpts::server()).await?;
    let mut b = Prometheus::start(PrometheusOpts::server()).await?;
    let dir = tempfile::Builder::new()
        .prefix("walrelay-bench-catchup-")
        .tempdir_in(&args.data_root)?;
    let wargs: Vec<&str> = args.walrelay_arg.iter().map(String::as_str).collect();
    let relay = Relay::start_with_bin(
        &args.walrelay_bin,
        dir.path().join("data"),
        &[("a", &a.write_url()), ("b", &b.write_url())],
        &wargs,
    )
    .await?;
    let spec = LoadSpec {
        workers: args.catchup_workers,
        series_per_worker: args.catchup_series_per_worker,
        interval: args.catchup_interval,
        duration: None,
        retry: RetryPolicy::Retryable,
        run_id: LoadSpec::new_run_id(),
        ..LoadSpec::default()
    };
    let load = Load::start(spec, &relay.write_url())?;
    tokio::time::sleep(args.catchup_warmup).await;
    let live_start = (Instant::now(), load.progress().acked_samples);
    b.stop().await?;
    tokio::time::sleep(args.catchup_outage).await;
    let sent_b = |st: &serde_json::Value| ReplicaNow::of(st, "b").sent_samples;
    let lag_b = |st: &serde_json::Value| ReplicaNow::of(st, "b").lag_records;
    b.start_again().await?;
    let ready = Instant::now();
    let acked_at_ready = load.progress().acked_samples;
    let st = relay.status().await?;
    let sent_at_ready = sent_b(&st);
    // Samples b lacks: everything acked minus what it was sent.
    let gap = acked_at_ready as f64 - sent_at_ready;
    // Wait for the first delivery (the shipper may be in a retry backoff).
    let deadline = Instant::now() + Duration::from_secs(300);
    let (first, sent_first) = loop {
        let st = relay.status().await?;
        let s = sent_b(&st);
        if s > sent_at_ready {
            break (Instant::now(), sent_at_ready);
        }
        if Instant::now() > deadline {
            bail!("replica b got nothing within 300 s of coming back");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (done, sent_done) = loop {
        let st = relay.status().await?;
        if lag_b(&st) <= 1 {
            break (Instant::now(), sent_b(&st));
        }
        if Instant::now() > deadline {
            bail!("replica b did not catch up within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let live_end = (Instant::now(), load.progress().acked_samples);
    let log = load.stop().await?;
    // Let the shippers deliver the last records, for the sanity check.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = relay.status().await?;
    let live_rate =
        (live_end.1 - live_start.1) as f64 / live_end.0.duration_since(live_start.0).as_secs_f64();
    let catchup_s = done.duration_since(first).as_secs_f64().max(1e-3);
    let catchup_samples = sent_done - sent_first;
    let rate = catchup_samples / catchup_s;
    let ready_to_done = done.duration_since(ready).as_secs_f64().max(1e-3);
    let effective = (sent_done - sent_at_ready) / ready_to_done;
    drop(relay);
    drop(a);
    drop(b);
    Ok(CatchupResult {
        live_samples_per_s: live_rate,
        outage_s: args.catchup_outage.as_secs_f64(),
        gap_samples: gap,
        first_delivery_after_s: first.duration_since(ready).as_secs_f64(),
        catchup_s,
        ready_to_caught_up_s: ready_to_done,
        effective_samples_per_s: effective,
        effective_multiple_of_live: effective / live_rate.max(1.0),
        catchup_samples,
        catchup_samples_per_s: rate,
        multiple_of_live: rate / live_rate.max(1.0),
        acked_samples: log.acked_samples(),
        b_sent_samples: sent_b(&st),
    })
}

fn machine(args: &Args) -> Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let disk = command_line("df", &["-hT", &args.data_root.display().to_string()])
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let versions = vec![
        (
            "walrelay".to_string(),
            first_line(&command_line(
                &args.walrelay_bin.display().to_string(),
                &["--version"],
            )),
        ),
        ("vmagent".to_string(), package_version("victoria-metrics")),
        ("prometheus".to_string(), package_version("prometheus")),
        ("nginx".to_string(), package_version("nginx-light")),
    ];
    Ok(Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        mem_total,
        kernel,
        disk,
        loadavg_before: loadavg,
        versions,
    })
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

fn package_version(pkg: &str) -> String {
    first_line(&command_line("dpkg-query", &["-W", "-f=${Version}", pkg]))
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("did not drain".to_string(), |v| format!("{v:.2} {unit}"))
}

/// The cells of a throughput row from the rate to the peak RSS, each with
/// its ratio to vmagent's (`vm`) when there is one: acked samples/s, ×,
/// ack p50, ack p99, CPU s per M samples, ×, peak RSS, ×.
fn throughput_cells(t: &ThroughputResult, vm: Option<&ThroughputResult>) -> String {
    let ratio = |f: fn(&ThroughputResult) -> f64| {
        vm.map_or(String::new(), |v| format!("{:.2}", f(t) / f(v)))
    };
    format!(
        "{:.0} | {} | {:.2} ms | {:.2} ms | {:.2} | {} | {:.0} MiB | {}",
        t.samples_per_s,
        ratio(|t| t.samples_per_s),
        t.p50_ms,
        t.p99_ms,
        t.cpu_s_per_million,
        ratio(|t| t.cpu_s_per_million),
        t.peak_rss_bytes as f64 / 1048576.0,
        ratio(|t| t.peak_rss_bytes as f64),
    )
}

/// The results as the Markdown table that goes into benches/README.md.
fn markdown(r: &Results) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let vm = r.throughput.iter().find(|t| t.system == Kind::Vmagent);
    let agent_bytes = r
        .absent
        .iter()
        .find(|a| a.system == Kind::PrometheusAgent)
        .map(|a| a.bytes_per_sample);
    if !r.throughput.is_empty() {
        table_head(&mut s, "| system | acked samples/s | × vmagent | ack p50 | ack p99 | CPU s per M samples | × vmagent | peak RSS | × vmagent | drain | disk bytes/sample, absent replica | × agent |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for t in &r.throughput {
        let absent = r.absent.iter().find(|a| a.system == t.system);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            t.label,
            throughput_cells(t, vm),
            fmt_opt(t.drain_s, "s"),
            absent.map_or("".into(), |a| format!("{:.2}", a.bytes_per_sample)),
            match (absent, agent_bytes) {
                (Some(a), Some(g)) if g > 0.0 => format!("{:.2}", a.bytes_per_sample / g),
                _ => String::new(),
            },
        );
    }
    if !r.fixed_rate.is_empty() {
        let _ = writeln!(
            s,
            "\nAt a fixed rate ({} workers x {} series every {:.0} ms):\n",
            r.args.workers, r.args.series_per_worker, r.args.fixed_interval_ms
        );
        table_head(&mut s, "| system | acked samples/s | ack p50 | ack p90 | ack p99 | max | CPU s per M samples | peak RSS | drain |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for t in &r.fixed_rate {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} ms | {:.2} | {:.0} MiB | {} |",
                t.label,
                t.samples_per_s,
                t.p50_ms,
                t.p90_ms,
                t.p99_ms,
                t.max_ms,
                t.cpu_s_per_million,
                t.peak_rss_bytes as f64 / 1048576.0,
                fmt_opt(t.drain_s, "s"),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nDisk fsync latency (4 KiB write + fdatasync, {} probes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms.",
        r.fsync.n,
        r.fsync.p50_us as f64 / 1e3,
        r.fsync.p99_us as f64 / 1e3,
        r.fsync.max_us as f64 / 1e3
    );
    if let Some(c) = &r.catchup {
        let _ = writeln!(
            s,
            "\nCatch-up (walrelay, replica b = Prometheus server down {:.0} s under a live load of {:.0} samples/s): \
             gap of {:.0} samples; first delivery {:.2} s after b was ready; caught up in {:.2} s, \
             delivering {:.0} samples/s = **{:.1}× the live rate**; from b ready to caught up \
             {:.2} s, {:.1}× the live rate with the wait for the first delivery.",
            c.outage_s,
            c.live_samples_per_s,
            c.gap_samples,
            c.first_delivery_after_s,
            c.catchup_s,
            c.catchup_samples_per_s,
            c.multiple_of_live,
            c.ready_to_caught_up_s,
            c.effective_multiple_of_live
        );
    }
    if !r.throughput.is_empty() {
        let _ = writeln!(s, "\nWhat the null sinks received (requests, MB, kinds):\n");
        table_head(
            &mut s,
            "| system | sink | requests | MB | bytes/sample | content-encoding, type, user agent |",
            "|---|---|---:|---:|---:|---|",
        );
    }
    for t in &r.throughput {
        for (i, k) in t.sinks.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.2} | {} |",
                t.label,
                ["a", "b"][i],
                k.requests,
                k.request_bytes as f64 / 1e6,
                k.request_bytes as f64 / t.acked_samples.max(1) as f64,
                k.kinds.keys().cloned().collect::<Vec<_>>().join("; ")
            );
        }
    }
    if let Some(f) = &r.far {
        s.push_str(&far::markdown(f));
    }
    sweep::markdown(&r.sweep, &mut s);
    senders::markdown(&r.senders, &mut s);
    s
}

/// A Markdown table's header line and its alignment line.
fn table_head(s: &mut String, head: &str, align: &str) {
    s.push_str(head);
    s.push('\n');
    s.push_str(align);
    s.push('\n');
}
