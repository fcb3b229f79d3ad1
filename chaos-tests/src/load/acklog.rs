//! The ack log: every request a load sent and what came of it, as it is
//! kept in memory, streamed to a JSON-lines file, and summed up.

use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::generator::Batch;
use super::LoadSpec;

/// What happened to one attempt that was not acknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub worker: u32,
    pub seq: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub at_ms: i64,
    pub latency_us: u64,
    pub outcome: Outcome,
}

/// What one attempt came to: a 2xx, another status, or no answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    Acked {
        status: u16,
    },
    Refused {
        status: u16,
        body: String,
        retry_after: Option<u32>,
    },
    Failed {
        error: String,
    },
}

/// One line of a JSON-lines ack log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Line {
    Start {
        spec: LoadSpec,
        url: String,
        started_ms: i64,
    },
    Batch(Batch),
    Attempt(Attempt),
    End {
        elapsed_ms: u64,
    },
}

/// Everything a load run sent and what came of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AckLog {
    pub spec: LoadSpec,
    pub url: String,
    pub started_ms: i64,
    pub elapsed_ms: u64,
    /// Every request, acknowledged or not, by worker then seq.
    pub batches: Vec<Batch>,
    /// Attempts that were not acknowledged (the first 10 000).
    pub attempts: Vec<Attempt>,
}

/// Request and attempt counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub acked_requests: u64,
    pub attempts: u64,
    pub refused: u64,
    pub failed: u64,
    pub acked_samples: u64,
    pub sent_samples: u64,
}

/// Latency of acknowledged requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// The one-line report of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub counts: Counts,
    pub latency: Latency,
    pub elapsed_ms: u64,
    pub acked_samples_per_sec: f64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        write!(
            f,
            "{:.0} acknowledged samples/s ({} samples) in {:.1}s; requests {} (acked {}), \
             attempts {}, refused {}, failed {}; ack latency p50 {} p99 {} max {}",
            self.acked_samples_per_sec,
            c.acked_samples,
            self.elapsed_ms as f64 / 1000.0,
            c.requests,
            c.acked_requests,
            c.attempts,
            c.refused,
            c.failed,
            fmt_us(self.latency.p50_us),
            fmt_us(self.latency.p99_us),
            fmt_us(self.latency.max_us),
        )
    }
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.2}ms", us as f64 / 1000.0)
    }
}

impl AckLog {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for b in &self.batches {
            c.requests += 1;
            c.attempts += b.attempts as u64;
            c.refused += b.refused as u64;
            c.failed += b.failed as u64;
            c.sent_samples += b.samples();
            if b.acked {
                c.acked_requests += 1;
                c.acked_samples += b.samples();
            }
        }
        c
    }

    pub fn acked_samples(&self) -> u64 {
        self.counts().acked_samples
    }

    pub fn latency(&self) -> Latency {
        let mut l: Vec<u64> = self.batches.iter().filter_map(|b| b.latency_us).collect();
        if l.is_empty() {
            return Latency::default();
        }
        l.sort_unstable();
        let pct = |p: f64| l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1];
        Latency {
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: l[l.len() - 1],
        }
    }

    pub fn summary(&self) -> Summary {
        let counts = self.counts();
        let secs = (self.elapsed_ms as f64 / 1000.0).max(1e-3);
        Summary {
            acked_samples_per_sec: counts.acked_samples as f64 / secs,
            counts,
            latency: self.latency(),
            elapsed_ms: self.elapsed_ms,
        }
    }

    /// The workers that sent anything, in order.
    pub fn workers(&self) -> Vec<u32> {
        let mut w: Vec<u32> = self.batches.iter().map(|b| b.worker).collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    pub fn batches_of(&self, worker: u32) -> impl Iterator<Item = &Batch> + '_ {
        self.batches.iter().filter(move |b| b.worker == worker)
    }

    /// The acknowledged samples of one worker as (series, ts, value).
    pub fn acked_samples_of(&self, worker: u32) -> Vec<(u32, i64, f64)> {
        let step = self.spec.step_ms;
        self.batches_of(worker)
            .filter(|b| b.acked)
            .flat_map(|b| b.iter_samples(step))
            .collect()
    }

    /// Smallest and largest timestamp of anything sent, if anything was.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        let step = self.spec.step_ms;
        let min = self.batches.iter().map(|b| b.ts0).min()?;
        let max = self.batches.iter().map(|b| b.last_ts(step)).max()?;
        Some((min, max))
    }

    /// Adds another generator's log of the same run (disjoint workers).
    pub fn merge(&mut self, other: AckLog) -> Result<()> {
        if other.spec.run_id != self.spec.run_id || other.spec.metric != self.spec.metric {
            bail!("cannot merge logs of different runs");
        }
        if other.spec.step_ms != self.spec.step_ms {
            bail!("cannot merge logs with different step_ms");
        }
        let end = (self.started_ms + self.elapsed_ms as i64)
            .max(other.started_ms + other.elapsed_ms as i64);
        self.started_ms = self.started_ms.min(other.started_ms);
        self.elapsed_ms = (end - self.started_ms).max(0) as u64;
        self.batches.extend(other.batches);
        self.batches.sort_by_key(|b| (b.worker, b.seq));
        self.attempts.extend(other.attempts);
        Ok(())
    }

    /// Writes the whole log as JSON lines (the format streamed by a run
    /// with [`LoadSpec::ack_log`]).
    pub fn write_jsonl(&self, path: &Path) -> Result<()> {
        let f =
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut w = BufWriter::new(f);
        write_line(
            &mut w,
            &Line::Start {
                spec: self.spec.clone(),
                url: self.url.clone(),
                started_ms: self.started_ms,
            },
        )?;
        for b in &self.batches {
            write_line(&mut w, &Line::Batch(b.clone()))?;
        }
        for a in &self.attempts {
            write_line(&mut w, &Line::Attempt(a.clone()))?;
        }
        write_line(
            &mut w,
            &Line::End {
                elapsed_ms: self.elapsed_ms,
            },
        )?;
        w.flush()?;
        Ok(())
    }

    /// Reads a JSON-lines log. A log cut short (the generator was killed)
    /// is fine: a torn last line is ignored and the elapsed time is taken
    /// from the last batch.
    pub fn read_jsonl(path: &Path) -> Result<AckLog> {
        let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut log: Option<AckLog> = None;
        let mut ended = false;
        let lines: Vec<String> = BufReader::new(f).lines().collect::<std::io::Result<_>>()?;
        let n = lines.len();
        for (i, line) in lines.into_iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed: Line = match serde_json::from_str(&line) {
                Ok(l) => l,
                Err(_) if i + 1 == n => break,
                Err(e) => bail!("{}:{}: {e}", path.display(), i + 1),
            };
            match parsed {
                Line::Start {
                    spec,
                    url,
                    started_ms,
                } => {
                    log = Some(AckLog {
                        spec,
                        url,
                        started_ms,
                        elapsed_ms: 0,
                        batches: Vec::new(),
                        attempts: Vec::new(),
                    })
                }
                other => {
                    let Some(l) = log.as_mut() else {
                        bail!("{}: first line is not a start line", path.display());
                    };
                    match other {
                        Line::Batch(b) => l.batches.push(b),
                        Line::Attempt(a) => l.attempts.push(a),
                        Line::End { elapsed_ms } => {
                            l.elapsed_ms = elapsed_ms;
                            ended = true;
                        }
                        Line::Start { .. } => {}
                    }
                }
            }
        }
        let mut log = log.ok_or_else(|| anyhow!("{}: empty ack log", path.display()))?;
        log.batches.sort_by_key(|b| (b.worker, b.seq));
        if !ended {
            let last = log
                .batches
                .iter()
                .map(|b| b.sent_ms + (b.latency_us.unwrap_or(0) / 1000) as i64)
                .max()
                .unwrap_or(log.started_ms);
            log.elapsed_ms = (last - log.started_ms).max(0) as u64;
        }
        Ok(log)
    }
}

fn write_line(w: &mut impl Write, line: &Line) -> Result<()> {
    serde_json::to_writer(&mut *w, line)?;
    w.write_all(b"\n")?;
    Ok(())
}

/// Streams the lines of a running load to `f` until every sender is gone,
/// then syncs the file.
pub(super) fn write_lines(f: std::fs::File, rx: mpsc::Receiver<Line>) -> Result<()> {
    let mut w = BufWriter::new(f);
    loop {
        let line = match rx.try_recv() {
            Ok(l) => l,
            Err(mpsc::TryRecvError::Empty) => {
                // Nothing queued: make what we have visible to readers.
                w.flush()?;
                match rx.recv() {
                    Ok(l) => l,
                    Err(_) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        write_line(&mut w, &line)?;
    }
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles() {
        let mut log = AckLog {
            spec: LoadSpec::default(),
            url: String::new(),
            started_ms: 0,
            elapsed_ms: 1000,
            batches: Vec::new(),
            attempts: Vec::new(),
        };
        for i in 1..=100u64 {
            log.batches.push(Batch {
                worker: 0,
                seq: i,
                k0: i,
                ts0: i as i64,
                n: 1,
                series: 2,
                acked: true,
                attempts: 1,
                refused: 0,
                failed: 0,
                sent_ms: 0,
                latency_us: Some(i * 10),
                last_status: Some(204),
            });
        }
        let l = log.latency();
        assert_eq!((l.p50_us, l.p99_us, l.max_us), (500, 990, 1000));
        assert_eq!(log.acked_samples(), 200);
    }
}
