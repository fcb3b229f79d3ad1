//! `walrelay-load`: remote-write load generator for walrelay's chaos tests
//! and benchmarks. Prints one summary line; `--ack-log` records every
//! request as JSON lines for a later `chaos_tests::verify`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use chaos_tests::load::{Load, LoadSpec, RetryPolicy};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "walrelay-load", version, about)]
struct Args {
    /// Remote-write URL, e.g. http://127.0.0.1:9201/api/v1/write
    #[arg(long)]
    url: String,
    /// Concurrent workers, each with one request in flight and its own series.
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// Index of the first worker (to split one run across generators).
    #[arg(long, default_value_t = 0)]
    first_worker: u32,
    #[arg(long, default_value_t = 100)]
    series_per_worker: u32,
    /// Samples per series in each request.
    #[arg(long, default_value_t = 1)]
    samples_per_series: u32,
    /// How long to send, e.g. 30s, 2m. Without it and without
    /// --requests-per-worker, runs until SIGINT/SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    #[arg(long)]
    requests_per_worker: Option<u64>,
    /// Time between a worker's request starts (0 = next as soon as acked).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    interval: Duration,
    /// Per-attempt timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
    /// never | retryable (5xx, 429, connection errors) | until-acked
    #[arg(long, default_value = "retryable")]
    retry: RetryPolicy,
    /// The `run` label (default: derived from --seed, else random).
    #[arg(long)]
    run_id: Option<String>,
    #[arg(long, default_value = chaos_tests::load::DEFAULT_METRIC)]
    metric: String,
    /// Timestamp of sample 0 in ms (default: wall clock, always fresh).
    #[arg(long)]
    start_ms: Option<i64>,
    #[arg(long, default_value_t = 1)]
    step_ms: i64,
    /// Write every request's outcome here as JSON lines.
    #[arg(long)]
    ack_log: Option<PathBuf>,
    /// Seeds start jitter and the default run id.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the summary as JSON instead of a line of text.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let mut spec = LoadSpec {
        workers: args.workers,
        first_worker: args.first_worker,
        series_per_worker: args.series_per_worker,
        samples_per_series: args.samples_per_series,
        interval: args.interval,
        duration: args.duration,
        requests_per_worker: args.requests_per_worker,
        metric: args.metric,
        start_ms: args.start_ms,
        step_ms: args.step_ms,
        retry: args.retry,
        request_timeout: args.timeout,
        seed: args.seed.unwrap_or(0),
        ack_log: args.ack_log,
        ..LoadSpec::default()
    };
    spec.run_id = match (args.run_id, args.seed) {
        (Some(r), _) => r,
        (None, Some(seed)) => format!("s{seed}"),
        (None, None) => LoadSpec::new_run_id(),
    };
    if spec.workers == 0 {
        bail!("--workers must be > 0");
    }
    let run_id = spec.run_id.clone();
    let handle = Load::start(spec, &args.url)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let log = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break handle.stop().await?,
            _ = sigterm.recv() => break handle.stop().await?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if handle.is_finished() {
                    break handle.join().await?;
                }
            }
        }
    };
    let summary = log.summary();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "run_id": run_id, "summary": summary })
        );
    } else {
        println!("run {run_id}: {summary}");
    }
    Ok(())
}
