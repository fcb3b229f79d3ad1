//! The far replica (issue 18): both replicas answer a round trip away.
//!
//! A [`FaultProxy`] in front of each nginx null sink holds every request
//! `--far-delay` before it forwards it, once per request whatever its size
//! ([`ProxyMode::Latency`]); answers come back at once. So each request
//! takes one round trip of `--far-delay` more than on the loopback, as
//! from a replica that answers 204 that much later. The TCP connect is not
//! delayed (kept-alive connections make it rare). Measured, one system or
//! variant after the other, on a fixed-rate load (`--far-interval`, as
//! many workers of `--series-per-worker` series as the rate needs):
//!
//! 1. **live**: at `--far-rate` for `--far-duration`: walrelay as it comes
//!    (adaptive shards), walrelay with `--replica-shards a=1,b=1` (one
//!    request in flight per replica, as before sharding), vmagent with its
//!    defaults, and any `--far-variant`: what each delivers and how long it
//!    takes to drain once the load ends.
//! 2. **ladder**: the same at each of `--far-rates` (ascending), until a
//!    system no longer keeps up: a run keeps up when the load was
//!    acknowledged at its rate (within 5 %) and everything reached both
//!    replicas within `--far-keep-up` of its end.
//! 3. **catch-up** (walrelay): at each of `--far-catchup-delays`, the live
//!    load at `--far-rate`; after `--far-warmup`, replica b's proxy refuses
//!    connections for `--far-outage`, then forwards again. From that moment:
//!    the first delivery, the backlog delivered (b's cursor at the log's
//!    head of that moment), and b caught up (as current as a, which never
//!    left: b's cursor at or past a's). The backlog (samples acknowledged
//!    and not delivered to b when it came back) over the time to catch up,
//!    as a multiple of the live rate, is the figure.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chaos_tests::load::{Load, LoadSpec};
use chaos_tests::proxy::{FaultProxy, ProxyMode};
use serde::Serialize;

use crate::nginx::NullSinks;
use crate::systems::{Kind, ReplicaNow, Start, System};
use crate::{
    cpu, fmt_opt, offered, procstat, spec, table_head, throughput_phase, wait_drained, Args, Run,
    Sampler, ThroughputResult, Timeline,
};

/// A system as this phase runs it: walrelay with extra arguments, or vmagent.
#[derive(Clone, Debug)]
pub struct Variant {
    pub label: String,
    pub kind: Kind,
    pub args: Vec<String>,
}

impl Variant {
    /// `LABEL=ARGS`: walrelay with ARGS (whitespace-separated) added.
    pub fn parse(s: &str) -> Result<Variant, String> {
        let (label, args) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} must be LABEL=ARGS"))?;
        Ok(Variant {
            label: label.trim().to_string(),
            kind: Kind::Walrelay,
            args: args.split_whitespace().map(str::to_string).collect(),
        })
    }

    /// `base` and this variant's own arguments.
    fn walrelay_args(&self, base: &[String]) -> Vec<String> {
        base.iter().chain(&self.args).cloned().collect()
    }

    fn builtin(label: &str, kind: Kind, args: &[&str]) -> Variant {
        Variant {
            label: label.to_string(),
            kind,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// Every variant by label: walrelay, walrelay-1-shard, vmagent, then
/// `--far-variant`s.
fn variants(args: &Args) -> Vec<Variant> {
    let mut v = vec![
        Variant::builtin("walrelay", Kind::Walrelay, &[]),
        Variant::builtin(
            "walrelay-1-shard",
            Kind::Walrelay,
            &["--replica-shards", "a=1,b=1"],
        ),
        Variant::builtin("vmagent", Kind::Vmagent, &[]),
    ];
    v.extend(args.far_variant.iter().cloned());
    v
}

/// The variants named in `labels` ("none" names none), in that order, then
/// the `--far-variant`s not named there if `with_extra`.
fn pick(args: &Args, labels: &[String], with_extra: bool) -> Result<Vec<Variant>> {
    let all = variants(args);
    let mut out = Vec::new();
    for l in labels.iter().filter(|l| l.as_str() != "none") {
        let v = all
            .iter()
            .find(|v| &v.label == l)
            .with_context(|| format!("no far variant is labelled {l:?}"))?;
        out.push(v.clone());
    }
    if with_extra {
        for v in &args.far_variant {
            if !labels.contains(&v.label) {
                out.push(v.clone());
            }
        }
    }
    Ok(out)
}

#[derive(Serialize)]
pub struct FarResults {
    /// Added to each request to a replica (a round trip).
    pub delay_ms: f64,
    /// The live rate offered in the live and catch-up runs.
    pub rate: f64,
    pub duration_s: f64,
    pub interval_ms: f64,
    pub series_per_worker: u32,
    pub keep_up_drain_s: f64,
    pub live: Vec<ThroughputResult>,
    pub ladder: Vec<LadderStep>,
    pub catchup: Vec<FarCatchup>,
}

#[derive(Serialize)]
pub struct LadderStep {
    pub keeps_up: bool,
    /// Why it does or does not.
    pub verdict: String,
    pub run: ThroughputResult,
}

#[derive(Serialize)]
pub struct FarCatchup {
    pub label: String,
    /// Added to each request (a round trip).
    pub delay_ms: f64,
    /// Acknowledged samples/s over the whole run.
    pub live_samples_per_s: f64,
    pub outage_s: f64,
    /// Acknowledged samples b lacked when it became reachable again.
    pub backlog_samples: f64,
    /// From b reachable: its first delivery, its cursor at the log's head
    /// of that moment, and its cursor at or past a's.
    pub first_delivery_s: Option<f64>,
    pub backlog_delivered_s: Option<f64>,
    pub caught_up_s: Option<f64>,
    /// backlog / caught_up_s / live rate (the figure), and the same
    /// over backlog_delivered_s.
    pub multiple_of_live: Option<f64>,
    pub backlog_multiple_of_live: Option<f64>,
    /// Shards of b when it came back and at most until caught up, and of a
    /// then.
    pub shards_b_at_return: u32,
    pub shards_b_max: u32,
    pub shards_a_at_return: u32,
    /// Seconds from b reachable to the first change of b's shard count.
    pub first_reshard_s: Option<f64>,
    /// Mean cores used from b reachable to caught up (or the timeout): the
    /// relay, the bench process (load generator and proxies), the machine.
    pub relay_cpu_cores: f64,
    pub bench_cpu_cores: f64,
    pub machine_cpu_cores: f64,
    /// The relay's peak RSS over the run.
    pub peak_rss_bytes: u64,
    /// Seconds of `timeline` when b became unreachable and reachable.
    pub outage_at_s: f64,
    pub return_at_s: f64,
    pub timeline: Timeline,
    /// At the end, after the load stopped and the relay drained: samples
    /// acknowledged and delivered to b (a sanity check: b has everything).
    pub acked_samples: u64,
    pub b_sent_samples: f64,
    pub drained: bool,
}

/// A fixed-rate load of about `rate` samples/s: `--far-interval` between a
/// worker's requests, as many workers as the rate needs.
fn rate_spec(args: &Args, rate: f64, duration: Duration) -> LoadSpec {
    let series = f64::from(args.series_per_worker.max(1));
    let workers = (rate * args.far_interval.as_secs_f64() / series)
        .round()
        .max(1.0) as u32;
    LoadSpec {
        workers,
        interval: args.far_interval,
        ..spec(args, duration)
    }
}

/// Whether a run kept up, and why (not).
fn verdict(r: &ThroughputResult, keep_up: Duration) -> (bool, String) {
    let offered = r.offered_samples_per_s.unwrap_or(0.0);
    if r.samples_per_s < 0.95 * offered {
        return (
            false,
            format!(
                "the load was acknowledged at {:.0} of {offered:.0} samples/s",
                r.samples_per_s
            ),
        );
    }
    match r.drain_s {
        None => (false, "did not drain".into()),
        Some(d) if d > keep_up.as_secs_f64() => (false, format!("drain {d:.1} s")),
        Some(d) => (true, format!("drain {d:.2} s")),
    }
}

fn mode(delay: Duration) -> ProxyMode {
    if delay.is_zero() {
        ProxyMode::Pass
    } else {
        ProxyMode::Latency(delay)
    }
}

pub async fn far_phase(args: &Args, sinks: &NullSinks, start: &Start<'_>) -> Result<FarResults> {
    let proxies = [
        FaultProxy::start(("127.0.0.1", sinks.ports[0])).await?,
        FaultProxy::start(("127.0.0.1", sinks.ports[1])).await?,
    ];
    let urls = || [proxies[0].write_url(), proxies[1].write_url()];
    let set_delay = |d: Duration| proxies.iter().for_each(|p| p.set_mode(mode(d)));
    let rate = args.far_rate as f64;
    let go = |v: &Variant, load: LoadSpec, drain_timeout: Duration| {
        far_run(sinks, start, urls(), v.clone(), load, drain_timeout)
    };

    eprintln!(
        "== far replica: {:?} added to each request, {rate:.0} samples/s",
        args.far_delay
    );
    set_delay(args.far_delay);
    let mut live = Vec::new();
    for v in pick(args, &args.far_systems, true)? {
        let load = rate_spec(args, rate, args.far_duration);
        live.push(go(&v, load, args.drain_timeout).await?);
    }

    let mut ladder = Vec::new();
    let mut rates: Vec<u64> = args.far_rates.iter().copied().filter(|r| *r > 0).collect();
    rates.sort_unstable();
    for v in pick(args, &args.far_ladder_systems, false)? {
        for &r in &rates {
            let load = rate_spec(args, r as f64, args.far_duration);
            let same = live
                .iter()
                .find(|t| t.label == v.label && t.offered_samples_per_s == offered(&load));
            let result = match same {
                Some(t) => t.clone(),
                None => go(&v, load, args.far_ladder_drain_timeout).await?,
            };
            let (keeps_up, why) = verdict(&result, args.far_keep_up);
            eprintln!(
                "   {} at {r}: {} ({why})",
                v.label,
                if keeps_up {
                    "keeps up"
                } else {
                    "does not keep up"
                }
            );
            ladder.push(LadderStep {
                keeps_up,
                verdict: why,
                run: result,
            });
            if !keeps_up {
                break;
            }
        }
    }

    let mut catchup = Vec::new();
    for &d in &args.far_catchup_delays {
        for v in pick(args, &args.far_catchup_systems, true)? {
            set_delay(d);
            let c = catchup_run(args, &proxies, &v, d, start)
                .await
                .with_context(|| format!("far catch-up of {} at {d:?}", v.label))?;
            eprintln!(
                "   catch-up {} at {d:?}: backlog {:.0} samples, caught up in {}, {} the live rate; shards of b {} -> {}",
                v.label,
                c.backlog_samples,
                c.caught_up_s.map_or("timeout".into(), |s| format!("{s:.2} s")),
                c.multiple_of_live.map_or("-".into(), |m| format!("{m:.1}x")),
                c.shards_b_at_return,
                c.shards_b_max
            );
            catchup.push(c);
        }
    }
    Ok(FarResults {
        delay_ms: args.far_delay.as_secs_f64() * 1e3,
        rate: offered(&rate_spec(args, rate, args.far_duration)).unwrap_or(rate),
        duration_s: args.far_duration.as_secs_f64(),
        interval_ms: args.far_interval.as_secs_f64() * 1e3,
        series_per_worker: args.series_per_worker,
        keep_up_drain_s: args.far_keep_up.as_secs_f64(),
        live,
        ladder,
        catchup,
    })
}

/// One run of `v` at a fixed rate, through the proxies at `urls`.
async fn far_run(
    sinks: &NullSinks,
    start: &Start<'_>,
    urls: [String; 2],
    v: Variant,
    load: LoadSpec,
    drain_timeout: Duration,
) -> Result<ThroughputResult> {
    let wargs = v.walrelay_args(start.walrelay_args);
    let start = Start {
        walrelay_args: &wargs,
        ..start.clone()
    };
    let run = Run {
        kind: v.kind,
        label: v.label.clone(),
        urls,
        start,
        load,
        drain_timeout,
    };
    let r = throughput_phase(sinks, run)
        .await
        .with_context(|| format!("far phase of {}", v.label))?;
    eprintln!(
        "   {}: offered {:.0}, acked {:.0} samples/s, drain {}, shards of b at most {}, {:.2} CPU s/M",
        v.label,
        r.offered_samples_per_s.unwrap_or(0.0),
        r.samples_per_s,
        fmt_opt(r.drain_s, "s"),
        max_shards(&r.timeline, 1).map_or("-".into(), |n| n.to_string()),
        r.cpu_s_per_million
    );
    Ok(r)
}

/// The most shards replica `i` (0: a, 1: b) had in `t`.
fn max_shards(t: &Timeline, i: usize) -> Option<u32> {
    t.replicas.iter().map(|r| r[i].shards).max()
}

/// walrelay's replicas a and b now.
async fn replicas(sys: &System) -> Result<[ReplicaNow; 2]> {
    sys.replicas()
        .await?
        .context("the catch-up runs walrelay only")
}

/// One catch-up run: see the module's documentation.
async fn catchup_run(
    args: &Args,
    proxies: &[FaultProxy; 2],
    v: &Variant,
    delay: Duration,
    start: &Start<'_>,
) -> Result<FarCatchup> {
    eprintln!(
        "== far catch-up: {}, {delay:?} added to each request, b unreachable for {:?}",
        v.label, args.far_outage
    );
    let wargs = v.walrelay_args(start.walrelay_args);
    let start = Start {
        walrelay_args: &wargs,
        ..start.clone()
    };
    let sys = System::start(
        v.kind,
        [proxies[0].write_url(), proxies[1].write_url()],
        &start,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = sys.pid()?;
    let load = Load::start(
        LoadSpec {
            duration: None,
            ..rate_spec(args, args.far_rate as f64, args.far_duration)
        },
        &sys.write_url(),
    )?;
    let began = Instant::now();
    let acked = || load.progress().acked_samples;
    let mut sampler = Sampler::new(pid);
    sampler.run_for(args.far_warmup, &sys, acked).await;
    let outage_at = began.elapsed().as_secs_f64();
    proxies[1].set_mode(ProxyMode::Refuse);
    sampler.run_for(args.far_outage, &sys, acked).await;
    proxies[1].set_mode(mode(delay));
    let back = Instant::now();
    let return_at = began.elapsed().as_secs_f64();
    let [a0, b0] = replicas(&sys).await?;
    let backlog = acked() as f64 - b0.sent_samples;
    let head0 = a0.head().max(b0.head());
    let usage0 = (
        cpu(pid),
        cpu(std::process::id()),
        procstat::machine_busy_seconds()?,
    );
    let (mut first, mut delivered, mut caught_up, mut first_reshard) = (None, None, None, None);
    let mut shards_max = b0.shards;
    let deadline = back + args.far_catchup_timeout;
    while caught_up.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sampler.tick(&sys, acked()).await;
        let [a, b] = match replicas(&sys).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("   (status failed: {e:#})");
                continue;
            }
        };
        let t = back.elapsed().as_secs_f64();
        shards_max = shards_max.max(b.shards);
        if first_reshard.is_none() && b.shards != b0.shards {
            first_reshard = Some(t);
        }
        if first.is_none() && b.sent_samples > b0.sent_samples {
            first = Some(t);
        }
        if delivered.is_none() && b.cursor >= head0 {
            delivered = Some(t);
        }
        if delivered.is_some() && b.cursor >= a.cursor {
            caught_up = Some(t);
        }
    }
    let spent = back.elapsed().as_secs_f64().max(1e-3);
    let relay_cpu = (cpu(pid) - usage0.0) / spent;
    let bench_cpu = (cpu(std::process::id()) - usage0.1) / spent;
    let machine_cpu = (procstat::machine_busy_seconds()? - usage0.2) / spent;
    // A few seconds of the steady state after it, for the timeline.
    sampler.run_for(Duration::from_secs(5), &sys, acked).await;
    let log = load.stop().await?;
    let live_rate = log.acked_samples() as f64 / began.elapsed().as_secs_f64();
    let drained = wait_drained(
        &sys,
        log.acked_samples(),
        args.drain_timeout,
        Instant::now(),
        &mut sampler,
    )
    .await?
    .is_some();
    let [_, b_end] = replicas(&sys).await?;
    let peak_rss = procstat::peak_rss(pid)?;
    sys.stop().await?;
    let multiple = |s: Option<f64>| s.map(|s| backlog / s.max(1e-3) / live_rate.max(1.0));
    Ok(FarCatchup {
        label: v.label.clone(),
        delay_ms: delay.as_secs_f64() * 1e3,
        live_samples_per_s: live_rate,
        outage_s: args.far_outage.as_secs_f64(),
        backlog_samples: backlog,
        first_delivery_s: first,
        backlog_delivered_s: delivered,
        caught_up_s: caught_up,
        multiple_of_live: multiple(caught_up),
        backlog_multiple_of_live: multiple(delivered),
        shards_b_at_return: b0.shards,
        shards_b_max: shards_max,
        shards_a_at_return: a0.shards,
        first_reshard_s: first_reshard,
        relay_cpu_cores: relay_cpu,
        bench_cpu_cores: bench_cpu,
        machine_cpu_cores: machine_cpu,
        peak_rss_bytes: peak_rss,
        outage_at_s: outage_at,
        return_at_s: return_at,
        timeline: sampler.timeline,
        acked_samples: log.acked_samples(),
        b_sent_samples: b_end.sent_samples,
        drained,
    })
}

fn secs(v: Option<f64>) -> String {
    v.map_or("not within the run".into(), |v| format!("{v:.2} s"))
}

/// The far phase's tables, for results.md.
pub fn markdown(f: &FarResults) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Far replica: {:.0} ms added to each request (issue 18)\n\n\
         Fixed-rate load: {:.0} samples/s ({} series per request, a request every {:.0} ms per worker) for {:.0} s; \
         keeping up = acknowledged at the rate and drained within {:.0} s.\n",
        f.delay_ms,
        f.rate,
        f.series_per_worker,
        f.interval_ms,
        f.duration_s,
        f.keep_up_drain_s
    );
    if !f.live.is_empty() {
        table_head(&mut s, "| system | acked samples/s | delivered samples/s (acked / (load + drain)) | × offered | drain | shards of a / b at most | CPU s per M samples | peak RSS | requests to b |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for t in &f.live {
            let delivered = t
                .drain_s
                .map(|d| t.acked_samples as f64 / (t.elapsed_s + d));
            let _ = writeln!(
                s,
                "| {} | {:.0} | {} | {} | {} | {} | {:.2} | {:.0} MiB | {} |",
                t.label,
                t.samples_per_s,
                delivered.map_or("-".into(), |d| format!("{d:.0}")),
                delivered.map_or("-".into(), |d| format!(
                    "{:.2}",
                    d / t.offered_samples_per_s.unwrap_or(f64::NAN)
                )),
                fmt_opt(t.drain_s, "s"),
                match (max_shards(&t.timeline, 0), max_shards(&t.timeline, 1)) {
                    (Some(a), Some(b)) => format!("{a} / {b}"),
                    _ => "-".into(),
                },
                t.cpu_s_per_million,
                t.peak_rss_bytes as f64 / 1048576.0,
                t.sinks[1].requests,
            );
        }
    }
    if !f.ladder.is_empty() {
        let _ = writeln!(
            s,
            "\nThe largest live rate kept up with (a system is stepped up until it does not keep up):\n"
        );
        table_head(&mut s, "| system | offered samples/s | acked samples/s | ack p99 | drain | shards of b at most | system CPU (cores) | bench CPU (cores) | machine CPU (cores) | keeps up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for l in &f.ladder {
            let t = &l.run;
            let n = t.load_seconds.max(1) as f64;
            let mean = |v: &[f64]| v.iter().take(t.load_seconds).sum::<f64>() / n;
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {:.1} ms | {} | {} | {:.2} | {:.2} | {:.2} | {} ({}) |",
                t.label,
                t.offered_samples_per_s.unwrap_or(0.0),
                t.samples_per_s,
                t.p99_ms,
                fmt_opt(t.drain_s, "s"),
                max_shards(&t.timeline, 1).map_or("-".into(), |n| n.to_string()),
                mean(&t.timeline.cpu),
                mean(&t.timeline.loader_cpu),
                mean(&t.timeline.machine_cpu),
                if l.keeps_up { "yes" } else { "**no**" },
                l.verdict
            );
        }
    }
    if !f.catchup.is_empty() {
        let _ = writeln!(
            s,
            "\nCatch-up: replica b refuses connections for a while under the live load, then answers again:\n"
        );
        table_head(&mut s, "| system | added per request | live samples/s | backlog (samples) | first delivery | backlog delivered | caught up (as current as a) | backlog / time / live | shards of b at return → most (first change) | relay / bench / machine CPU (cores) | peak RSS | b has everything at the end |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for c in &f.catchup {
            let _ = writeln!(
                s,
                "| {} | {:.0} ms | {:.0} | {:.0} | {} | {} | {} | **{}** ({} to the backlog delivered) | {} → {} ({}) | {:.2} / {:.2} / {:.2} | {:.0} MiB | {} |",
                c.label,
                c.delay_ms,
                c.live_samples_per_s,
                c.backlog_samples,
                secs(c.first_delivery_s),
                secs(c.backlog_delivered_s),
                secs(c.caught_up_s),
                c.multiple_of_live.map_or("-".into(), |m| format!("{m:.1}x")),
                c.backlog_multiple_of_live.map_or("-".into(), |m| format!("{m:.1}x")),
                c.shards_b_at_return,
                c.shards_b_max,
                c.first_reshard_s.map_or("none".into(), |t| format!("after {t:.1} s")),
                c.relay_cpu_cores,
                c.bench_cpu_cores,
                c.machine_cpu_cores,
                c.peak_rss_bytes as f64 / 1048576.0,
                if c.drained && c.b_sent_samples >= c.acked_samples as f64 {
                    "yes".to_string()
                } else {
                    format!("{:.0} of {} samples", c.b_sent_samples, c.acked_samples)
                },
            );
        }
    }
    s
}
