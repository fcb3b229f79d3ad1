//! The oracle: does a replica hold every acknowledged sample?

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use anyhow::{Context, Result};

use crate::load::AckLog;
use crate::prometheus::{labelset_string, PromApi, Prometheus};

/// How many examples of each kind of discrepancy a verdict keeps.
const EXAMPLES: usize = 10;

/// What a replica holds of a load run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Samples of acknowledged requests.
    pub acknowledged: u64,
    /// Acknowledged samples found with the right value.
    pub delivered: u64,
    /// Acknowledged samples not found.
    pub lost: u64,
    /// Acknowledged samples found at their timestamp with another value.
    pub wrong_value: u64,
    /// Samples found that were sent but never acknowledged (a request that
    /// timed out or was refused, yet stored): allowed by at-least-once.
    pub extra: u64,
    /// Samples found of this run that match nothing that was sent
    /// (a timestamp never sent, or a value that does not match): corruption.
    pub unexpected: u64,
    /// Series found that do not parse as this run's (bad worker/series label).
    pub foreign_series: u64,
    pub lost_examples: Vec<String>,
    pub wrong_value_examples: Vec<String>,
    pub unexpected_examples: Vec<String>,
    /// Lost samples per worker.
    pub lost_by_worker: BTreeMap<u32, u64>,
}

impl Verdict {
    /// No acknowledged sample lost or changed, nothing unexpected.
    pub fn is_lossless(&self) -> bool {
        self.lost == 0 && self.wrong_value == 0 && self.unexpected == 0 && self.foreign_series == 0
    }

    /// Panics with the report and the first discrepancies unless
    /// [`Verdict::is_lossless`].
    #[track_caller]
    pub fn assert_lossless(&self) {
        if !self.is_lossless() {
            panic!("{}", self.details());
        }
    }

    /// The one-line report followed by the first discrepancies.
    pub fn details(&self) -> String {
        let mut s = format!("{self}");
        for (title, ex) in [
            ("first lost samples", &self.lost_examples),
            ("first wrong values", &self.wrong_value_examples),
            ("first unexpected samples", &self.unexpected_examples),
        ] {
            if !ex.is_empty() {
                s.push_str(&format!("\n{title}:"));
                for e in ex {
                    s.push_str(&format!("\n  {e}"));
                }
            }
        }
        if !self.lost_by_worker.is_empty() {
            s.push_str(&format!("\nlost by worker: {:?}", self.lost_by_worker));
        }
        s
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: acknowledged {} samples, delivered {}, lost {}, wrong value {}, \
             extra {} (sent, unacknowledged), unexpected {}",
            if self.is_lossless() {
                "LOSSLESS"
            } else {
                "NOT LOSSLESS"
            },
            self.acknowledged,
            self.delivered,
            self.lost,
            self.wrong_value,
            self.extra,
            self.unexpected
        )?;
        if self.foreign_series > 0 {
            write!(f, ", foreign series {}", self.foreign_series)?;
        }
        Ok(())
    }
}

/// Queries `prom` for every series of the run and compares with `ack`.
pub async fn verify(prom: &Prometheus, ack: &AckLog) -> Result<Verdict> {
    verify_api(&prom.api(), ack).await
}

/// [`verify`] against any Prometheus-compatible query API.
pub async fn verify_api(api: &PromApi, ack: &AckLog) -> Result<Verdict> {
    let mut v = Verdict::default();
    let step = ack.spec.step_ms;
    // Samples a killed generator sent but never logged are later than its
    // last logged batch: look a minute further.
    const MARGIN_MS: i64 = 60_000;
    for w in ack.workers() {
        let mut acked: HashMap<(u32, i64), f64> = HashMap::new();
        let mut unacked: HashMap<(u32, i64), f64> = HashMap::new();
        let (mut min_ts, mut max_ts) = (i64::MAX, i64::MIN);
        for b in ack.batches_of(w) {
            min_ts = min_ts.min(b.ts0);
            max_ts = max_ts.max(b.last_ts(step));
            let target = if b.acked { &mut acked } else { &mut unacked };
            for (s, ts, val) in b.iter_samples(step) {
                target.insert((s, ts), val);
            }
        }
        v.acknowledged += acked.len() as u64;
        let start = min_ts;
        let end = max_ts.saturating_add(MARGIN_MS);
        // Windows of about 200k expected samples each.
        let sent = (acked.len() + unacked.len()).max(1) as i64;
        let span = (end - start + 1).max(1);
        let window = (span.saturating_mul(200_000) / sent).clamp(1_000, span.max(1_000));
        let found = api
            .raw_series(&ack.spec.selector(Some(w)), start, end, window)
            .await
            .with_context(|| format!("querying worker {w}'s series"))?;
        let mut seen: HashMap<(u32, i64), f64> = HashMap::with_capacity(acked.len());
        for (labels, samples) in found {
            let series = labels.get("series").and_then(|s| s.parse::<u32>().ok());
            let worker = labels.get("worker").and_then(|s| s.parse::<u32>().ok());
            let (Some(s), Some(true)) = (series, worker.map(|x| x == w)) else {
                v.foreign_series += 1;
                if v.unexpected_examples.len() < EXAMPLES {
                    v.unexpected_examples
                        .push(format!("foreign series {}", labelset_string(&labels)));
                }
                continue;
            };
            for (ts, val) in samples {
                seen.insert((s, ts), val);
            }
        }
        for (&(s, ts), &val) in &seen {
            if let Some(&want) = acked.get(&(s, ts)) {
                if want.to_bits() == val.to_bits() {
                    v.delivered += 1;
                } else {
                    v.wrong_value += 1;
                    if v.wrong_value_examples.len() < EXAMPLES {
                        v.wrong_value_examples.push(format!(
                            "worker {w} series {s} ts {ts}: want {want}, found {val}"
                        ));
                    }
                }
            } else if unacked
                .get(&(s, ts))
                .is_some_and(|want| want.to_bits() == val.to_bits())
            {
                v.extra += 1;
            } else {
                v.unexpected += 1;
                if v.unexpected_examples.len() < EXAMPLES {
                    v.unexpected_examples
                        .push(format!("worker {w} series {s} ts {ts}: value {val}"));
                }
            }
        }
        let mut missing: Vec<(u32, i64, f64)> = acked
            .iter()
            .filter(|(k, _)| !seen.contains_key(k))
            .map(|(&(s, ts), &val)| (s, ts, val))
            .collect();
        if !missing.is_empty() {
            missing.sort_by_key(|a| (a.1, a.0));
            v.lost += missing.len() as u64;
            v.lost_by_worker.insert(w, missing.len() as u64);
            for (s, ts, val) in missing
                .iter()
                .take(EXAMPLES.saturating_sub(v.lost_examples.len()))
            {
                let seq = ack
                    .batches_of(w)
                    .find(|b| *ts >= b.ts0 && *ts <= b.last_ts(step))
                    .map(|b| format!(" (request seq {}, {} attempts)", b.seq, b.attempts))
                    .unwrap_or_default();
                v.lost_examples
                    .push(format!("worker {w} series {s} ts {ts} value {val}{seq}"));
            }
        }
    }
    Ok(v)
}
