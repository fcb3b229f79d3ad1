//! The concurrency sweep (issue 19): the throughput phase at several
//! numbers of senders, every system at each, so that one run shows how
//! each scales with concurrency.
//!
//! A point is `WxS`: W workers (senders), each with one request in flight
//! of S series (one fresh sample each). Each point runs every system of
//! `--systems` for `--duration`, one after the other, exactly as the
//! throughput phase does.

use std::fmt::Write;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::nginx::NullSinks;
use crate::rounds;
use crate::systems::{Kind, Start};
use crate::{spec_of, throughput_phase, Args, Run, ThroughputResult};

/// `WxS`: senders and series per request.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Point {
    pub workers: u32,
    pub series_per_worker: u32,
}

impl Point {
    /// Parses `WxS` (`16x500`).
    pub fn parse(s: &str) -> Result<Point, String> {
        let (w, s2) = s
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("{s:?}: expected SENDERSxSERIES, e.g. 16x500"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{s:?}: {v:?} is not a positive number"))
        };
        Ok(Point {
            workers: num(w)?,
            series_per_worker: num(s2)?,
        })
    }
}

/// Every system at one point.
#[derive(Serialize)]
pub struct SweepPoint {
    #[serde(flatten)]
    pub point: Point,
    /// Each system's median round by CPU per sample (its only round
    /// without `--sweep-rounds`).
    pub results: Vec<ThroughputResult>,
    /// With several rounds, each system's rounds in the order they ran.
    pub rounds: Vec<Rounds>,
}

/// One system's rounds at one point.
#[derive(Serialize)]
pub struct Rounds {
    pub system: Kind,
    pub runs: Vec<ThroughputResult>,
}

/// Runs every point of `--sweep` for every system, `--sweep-rounds` times
/// with the systems taking turns.
pub async fn sweep(args: &Args, sinks: &NullSinks, start: &Start<'_>) -> Result<Vec<SweepPoint>> {
    let mut out = Vec::new();
    for &point in &args.sweep {
        let mut runs: Vec<Vec<ThroughputResult>> =
            args.systems.iter().map(|_| Vec::new()).collect();
        for round in 0..args.sweep_rounds {
            for (i, &kind) in args.systems.iter().enumerate() {
                let spec = spec_of(point.workers, point.series_per_worker, args.duration);
                let run = Run::plain(args, kind, sinks, start, spec);
                let r = throughput_phase(sinks, run).await.with_context(|| {
                    format!(
                        "sweep point {}x{} of {}, round {}",
                        point.workers,
                        point.series_per_worker,
                        kind.label(),
                        round + 1
                    )
                })?;
                eprintln!(
                    "   {}x{} {}{}: {:.0} samples/s, p50 {:.2} ms, p99 {:.2} ms, {:.2} CPU s/M, peak RSS {:.0} MiB",
                    point.workers,
                    point.series_per_worker,
                    kind.label(),
                    rounds::suffix(round + 1, args.sweep_rounds),
                    r.samples_per_s,
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_s_per_million,
                    r.peak_rss_bytes as f64 / 1048576.0,
                );
                runs[i].push(r);
            }
        }
        let mut results = Vec::new();
        let mut rounds = Vec::new();
        for (&kind, runs) in args.systems.iter().zip(runs) {
            let cpu: Vec<f64> = runs.iter().map(|r| r.cpu_s_per_million).collect();
            results.push(runs[rounds::median_index(&cpu)].clone());
            if args.sweep_rounds > 1 {
                rounds.push(Rounds { system: kind, runs });
            }
        }
        out.push(SweepPoint {
            point,
            results,
            rounds,
        });
    }
    Ok(out)
}

/// The sweep as a table: a row per point and system, with the ratios to
/// vmagent at the same point.
pub fn markdown(points: &[SweepPoint], s: &mut String) {
    if points.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nConcurrency sweep (one request in flight per sender):\n\n\
         | senders × series | system | acked samples/s | × vmagent | ack p50 | ack p99 | CPU s per M samples | × vmagent | peak RSS | × vmagent |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in points {
        let vm = p.results.iter().find(|t| t.system == Kind::Vmagent);
        for t in &p.results {
            let _ = writeln!(
                s,
                "| {} × {} | {} | {} |",
                p.point.workers,
                p.point.series_per_worker,
                t.label,
                crate::throughput_cells(t, vm),
            );
        }
    }
    if points.iter().all(|p| p.rounds.is_empty()) {
        return;
    }
    let _ = writeln!(
        s,
        "\nEach row above is the system's median round by CPU per sample. Every \
         round (the systems took turns), CPU s per M samples and, for every \
         system but vmagent, its ratio to vmagent's round of the same number:\n\n\
         | senders × series | system | CPU s per M, by round | samples/s, by round | × vmagent's CPU, by round |\n\
         |---|---|---|---|---|"
    );
    for p in points {
        let vm = p.rounds.iter().find(|r| r.system == Kind::Vmagent);
        for r in &p.rounds {
            let _ = writeln!(
                s,
                "| {} × {} | {} | {} | {} | {} |",
                p.point.workers,
                p.point.series_per_worker,
                r.system.label(),
                rounds::cell(&r.runs, |_, t| Some(format!("{:.2}", t.cpu_s_per_million))),
                rounds::cell(&r.runs, |_, t| Some(format!(
                    "{:.2} M",
                    t.samples_per_s / 1e6
                ))),
                rounds::cell(&r.runs, |i, t| {
                    let v = vm.filter(|_| r.system != Kind::Vmagent)?.runs.get(i)?;
                    Some(format!("{:.2}", t.cpu_s_per_million / v.cpu_s_per_million))
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_point_is_senders_x_series() {
        let p = Point::parse("16x500").unwrap();
        assert_eq!((p.workers, p.series_per_worker), (16, 500));
        assert!(Point::parse("16").is_err());
        assert!(Point::parse("0x500").is_err());
        assert!(Point::parse("4xmany").is_err());
    }
}
