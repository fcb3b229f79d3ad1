//! The common verdict of a chaos scenario, and helpers every scenario needs.
//!
//! A [`Report`] says what was injected, how many samples the sender had
//! acknowledged, and for each replica how many of the samples it must hold
//! were delivered, lost (must be 0), had a wrong value, and how many extra
//! samples (sent, never acknowledged, yet stored: allowed by at-least-once)
//! it holds. [`Report::finish`] prints it as one line, appends it as one JSON
//! line to the file named by `$CHAOS_REPORT` (if set; `chaos-tests/README.md`'s
//! table is generated from those lines), and panics with the details unless
//! nothing was lost.
//!
//! ```no_run
//! # async fn f(relay: chaos_tests::Relay, a: chaos_tests::Prometheus, ack: chaos_tests::AckLog) -> anyhow::Result<()> {
//! use chaos_tests::scenario::{self, Report};
//! let status = scenario::wait_caught_up(&relay, std::time::Duration::from_secs(60)).await?;
//! let mut report = Report::new("replica_down", "replica b SIGKILLed for 12 segments");
//! report.acknowledged(&ack);
//! report.replica("a", &chaos_tests::verify(&a, &ack).await?);
//! report.relay_counters(&status);
//! report.finish();
//! # Ok(()) }
//! ```
//!
//! Sizes: [`soak`] is true when `CHAOS_SOAK=1`, and [`scaled`] picks the CI
//! or the soak value; random choices use [`rng`], seeded from `CHAOS_SEED`
//! (default [`DEFAULT_SEED`]) so a CI failure can be replayed.

use std::fmt;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::SeedableRng;
use serde::Serialize;
use serde_json::Value;

use crate::load::{AckLog, Load, LoadHandle, LoadSpec, RetryPolicy};
use crate::prometheus::Prometheus;
use crate::relay::Relay;
use crate::verify::{verify, Verdict};

/// The seed used when `CHAOS_SEED` is not set.
pub const DEFAULT_SEED: u64 = 20_240_501;

/// `CHAOS_SEED`, else [`DEFAULT_SEED`]. Panics on a value that is not a u64
/// (a typo must not silently run another seed).
pub fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CHAOS_SEED={s:?} is not an unsigned integer")),
        _ => DEFAULT_SEED,
    }
}

/// A generator seeded with [`seed`] mixed with `salt` (so two scenarios do
/// not draw the same sequence).
pub fn rng(salt: &str) -> rand::rngs::StdRng {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    rand::rngs::StdRng::seed_from_u64(seed() ^ h)
}

/// True when `CHAOS_SOAK` is set to anything but "", "0" or "false".
pub fn soak() -> bool {
    std::env::var("CHAOS_SOAK").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// `ci` normally, `soak` when [`soak`] is on.
pub fn scaled<T>(ci: T, soak_value: T) -> T {
    if soak() {
        soak_value
    } else {
        ci
    }
}

/// The relay's status entry of replica `name` (`Value::Null` if absent).
pub fn replica_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or(&Value::Null)
}

/// True when a replica's status entry shows everything delivered and
/// checkpointed: `lag_records` 0 and no delivery waiting to be written
/// (`checkpoint_pending`, at most ~100 ms after the last request). What a
/// test waits for before a SIGKILL after which nothing may be re-sent.
pub fn settled(replica: &Value) -> bool {
    replica["lag_records"].as_u64() == Some(0)
        && replica["checkpoint_pending"].as_bool() == Some(false)
}

/// `lag_records` of replica `name` (u64::MAX if absent).
pub fn lag_records(status: &Value, name: &str) -> u64 {
    replica_status(status, name)["lag_records"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Waits until every replica is [`settled`] (`lag_records` 0, its
/// deliveries checkpointed) and returns that status.
/// Fails after `timeout` with the last status and the relay's log tail.
pub async fn wait_caught_up(relay: &Relay, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = relay.status().await;
        if let Ok(s) = &st {
            let replicas = s["replicas"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if !replicas.is_empty() && replicas.iter().all(settled) {
                return Ok(s.clone());
            }
        }
        if Instant::now() >= deadline {
            let last = match st {
                Ok(s) => serde_json::to_string_pretty(&s["replicas"]).unwrap_or_default(),
                Err(e) => format!("status unavailable: {e:#}"),
            };
            bail!(
                "the replicas did not catch up (lag_records 0, checkpointed) within {timeout:?}; \
                 last replica status:\n{last}\nwalrelay log tail:\n{}",
                relay.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the relay's status until `pred` holds and returns that status;
/// panics with the replicas' status and the relay's log tail after
/// `timeout` (a status the relay cannot give, e.g. while it restarts, is
/// waited through).
pub async fn wait_status(
    relay: &Relay,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = relay.status().await;
        if let Ok(st) = &st {
            if pred(st) {
                return st.clone();
            }
        }
        if Instant::now() >= deadline {
            let last = match st {
                Ok(s) => format!("{:#}", s["replicas"]),
                Err(e) => format!("status unavailable: {e:#}"),
            };
            panic!(
                "{what}: not seen within {timeout:?}; replicas: {last}\nwalrelay log tail:\n{}",
                relay.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sender like Prometheus's: 4 workers × `series_per_worker` series
/// every 20 ms, each request retried until it is acknowledged (3 s per
/// attempt, backing off 10 to 200 ms), seeded with [`seed`].
pub fn retrying_load(relay: &Relay, series_per_worker: u32) -> Result<LoadHandle> {
    Load::start(
        LoadSpec {
            workers: 4,
            series_per_worker,
            interval: Duration::from_millis(20),
            retry: RetryPolicy::UntilAcked,
            request_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
            seed: seed(),
            ..LoadSpec::default()
        },
        &relay.write_url(),
    )
}

/// How a run against two replicas a and b ended: see [`end_run`].
pub struct RunEnd {
    /// The sender's log.
    pub ack: AckLog,
    /// The relay's status once every replica had everything.
    pub status: Value,
    /// What replica a holds of what was acknowledged.
    pub a: Verdict,
    /// What replica b holds of what was acknowledged.
    pub b: Verdict,
    /// The relay's log over all its runs.
    pub log: String,
}

/// Ends a run: waits (up to 30 s) for `more_acks` more acknowledged
/// requests, so the sender was still being served, stops `load`, waits
/// (up to 120 s) until every replica has everything (lag 0) and verifies
/// replicas `a` and `b` against what was acknowledged.
pub async fn end_run(
    relay: &Relay,
    load: LoadHandle,
    more_acks: u64,
    a: &Prometheus,
    b: &Prometheus,
) -> Result<RunEnd> {
    let before = load.progress().acked_requests;
    load.wait_acked_requests(before + more_acks, Duration::from_secs(30))
        .await?;
    let ack = load.stop().await?;
    let status = wait_caught_up(relay, Duration::from_secs(120)).await?;
    Ok(RunEnd {
        a: verify(a, &ack).await?,
        b: verify(b, &ack).await?,
        log: std::fs::read_to_string(relay.log_path()).unwrap_or_default(),
        ack,
        status,
    })
}

/// What the relay's status says about one replica (counters of the current
/// process only: a restart resets them).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RelayCounters {
    pub sent_samples: u64,
    pub rejected_records: u64,
    pub rejected_samples: u64,
    pub skipped_records: u64,
    pub dropped_samples: u64,
}

/// One replica's part of a [`Report`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReplicaReport {
    pub name: String,
    /// Acknowledged samples this replica must hold (all acknowledged
    /// samples, unless the scenario scopes it: see `scope`).
    pub required: u64,
    pub delivered: u64,
    pub lost: u64,
    pub wrong_value: u64,
    /// Samples of the run that match nothing sent, or foreign series.
    pub unexpected: u64,
    /// Sent, never acknowledged, yet stored (at-least-once allows it); with
    /// a scope, also acknowledged samples outside it that were found.
    pub extra: u64,
    /// Why `required` is less than everything acknowledged, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayCounters>,
    #[serde(skip)]
    pub details: String,
}

impl ReplicaReport {
    pub fn is_lossless(&self) -> bool {
        self.lost == 0 && self.wrong_value == 0 && self.unexpected == 0
    }
}

/// The verdict of one scenario. See the module documentation.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// What was injected, in words (counts, durations, modes).
    pub injected: String,
    pub seed: u64,
    pub soak: bool,
    /// Samples of acknowledged requests.
    pub acknowledged: u64,
    /// Requests the sender made, acknowledged, and its attempts.
    pub requests: u64,
    pub acked_requests: u64,
    pub attempts: u64,
    pub replicas: Vec<ReplicaReport>,
    /// Records in the relay's log (`wal.head_seq` of a log that started
    /// empty) when only this load wrote to it: more than `acked_requests`
    /// means requests stored twice (the sender re-sent a request that was
    /// stored but not answered) or stored but never acknowledged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_records: Option<u64>,
    /// Free-form remarks (what a number means, what was observed).
    pub notes: Vec<String>,
    pub elapsed_s: f64,
    #[serde(skip)]
    started: Instant,
}

impl Report {
    /// Starts the clock of the scenario.
    pub fn new(scenario: &str, injected: impl Into<String>) -> Report {
        Report {
            scenario: scenario.to_string(),
            injected: injected.into(),
            seed: seed(),
            soak: soak(),
            acknowledged: 0,
            requests: 0,
            acked_requests: 0,
            attempts: 0,
            replicas: Vec::new(),
            log_records: None,
            notes: Vec::new(),
            elapsed_s: 0.0,
            started: Instant::now(),
        }
    }

    /// Replaces the description of what was injected.
    pub fn set_injected(&mut self, injected: impl Into<String>) -> &mut Self {
        self.injected = injected.into();
        self
    }

    /// Takes the sender's counts from its log.
    pub fn acknowledged(&mut self, ack: &AckLog) -> &mut Self {
        let c = ack.counts();
        self.acknowledged = c.acked_samples;
        self.requests = c.requests;
        self.acked_requests = c.acked_requests;
        self.attempts = c.attempts;
        self
    }

    /// Adds a replica's verdict against everything acknowledged.
    pub fn replica(&mut self, name: &str, v: &Verdict) -> &mut Self {
        self.push_replica(name, v, None)
    }

    /// Adds a replica's verdict against a scoped ack log (e.g. only what
    /// was acknowledged after its storage was wiped); `scope` says which.
    pub fn replica_scoped(&mut self, name: &str, v: &Verdict, scope: &str) -> &mut Self {
        self.push_replica(name, v, Some(scope.to_string()))
    }

    fn push_replica(&mut self, name: &str, v: &Verdict, scope: Option<String>) -> &mut Self {
        self.replicas.push(ReplicaReport {
            name: name.to_string(),
            required: v.acknowledged,
            delivered: v.delivered,
            lost: v.lost,
            wrong_value: v.wrong_value,
            unexpected: v.unexpected + v.foreign_series,
            extra: v.extra,
            scope,
            relay: None,
            details: v.details(),
        });
        self
    }

    /// Everything [`end_run`] found: the sender's counts, replicas a's and
    /// b's verdicts, the relay's counters and its log's records.
    pub fn run_end(&mut self, end: &RunEnd) -> &mut Self {
        self.acknowledged(&end.ack)
            .replica("a", &end.a)
            .replica("b", &end.b)
            .relay_counters(&end.status)
            .log_records(&end.status)
    }

    /// Records the relay's log holds, from a status (`wal.head_seq`): see
    /// [`Report::log_records`]. Only meaningful when the log started empty.
    pub fn log_records(&mut self, status: &Value) -> &mut Self {
        self.log_records = status["wal"]["head_seq"].as_u64();
        self
    }

    /// Log records beyond one per acknowledged request.
    pub fn duplicate_records(&self) -> Option<u64> {
        self.log_records
            .map(|r| r.saturating_sub(self.acked_requests))
    }

    /// Attaches the relay's counters (from `GET /api/v1/status`) to the
    /// replicas already added, by name.
    pub fn relay_counters(&mut self, status: &Value) -> &mut Self {
        for r in &mut self.replicas {
            let s = replica_status(status, &r.name);
            if s.is_null() {
                continue;
            }
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            r.relay = Some(RelayCounters {
                sent_samples: n("sent_samples"),
                rejected_records: n("rejected_records"),
                rejected_samples: n("rejected_samples"),
                skipped_records: n("skipped_records"),
                dropped_samples: n("dropped_samples"),
            });
        }
        self
    }

    pub fn note(&mut self, note: impl Into<String>) -> &mut Self {
        self.notes.push(note.into());
        self
    }

    /// Lost samples over all replicas (wrong values and unexpected samples
    /// count as lost too: the acknowledged sample is not there as sent).
    pub fn lost(&self) -> u64 {
        self.replicas
            .iter()
            .map(|r| r.lost + r.wrong_value + r.unexpected)
            .sum()
    }

    pub fn is_lossless(&self) -> bool {
        !self.replicas.is_empty() && self.replicas.iter().all(ReplicaReport::is_lossless)
    }

    /// The report as one JSON line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Stops the clock, prints the line (and the notes), and appends the
    /// JSON line to `$CHAOS_REPORT` if set.
    pub fn emit(&mut self) {
        self.elapsed_s = (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        println!("VERDICT {self}");
        for n in &self.notes {
            println!("  note: {n}");
        }
        if let Some(path) = std::env::var_os("CHAOS_REPORT").filter(|p| !p.is_empty()) {
            let line = format!("{}\n", self.json_line());
            let res = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = res {
                eprintln!("cannot append the report to {path:?}: {e}");
            }
        }
    }

    /// Panics with every replica's discrepancies unless nothing was lost.
    #[track_caller]
    pub fn assert_lossless(&self) {
        if self.replicas.is_empty() {
            panic!("{}: no replica was verified", self.scenario);
        }
        if !self.is_lossless() {
            let mut s = format!("{self}");
            for r in self.replicas.iter().filter(|r| !r.is_lossless()) {
                s.push_str(&format!("\nreplica {}: {}", r.name, r.details));
            }
            panic!("{s}");
        }
    }

    /// [`Report::emit`], then [`Report::assert_lossless`].
    #[track_caller]
    pub fn finish(&mut self) {
        self.emit();
        self.assert_lossless();
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} | injected: {} | acknowledged {} samples ({} of {} requests, {} attempts)",
            self.scenario,
            if self.is_lossless() {
                "LOSSLESS"
            } else {
                "NOT LOSSLESS"
            },
            self.injected,
            self.acknowledged,
            self.acked_requests,
            self.requests,
            self.attempts,
        )?;
        if let (Some(records), Some(dup)) = (self.log_records, self.duplicate_records()) {
            write!(
                f,
                ", log {records} records (+{dup} stored twice or unacknowledged)"
            )?;
        }
        for r in &self.replicas {
            write!(
                f,
                " | {}: delivered {}/{}{}, lost {}, extra {}",
                r.name,
                r.delivered,
                r.required,
                if r.scope.is_some() { " (scoped)" } else { "" },
                r.lost,
                r.extra,
            )?;
            if r.wrong_value > 0 {
                write!(f, ", wrong value {}", r.wrong_value)?;
            }
            if r.unexpected > 0 {
                write!(f, ", unexpected {}", r.unexpected)?;
            }
            if let Some(c) = &r.relay {
                if c.rejected_records > 0 || c.skipped_records > 0 || c.dropped_samples > 0 {
                    write!(
                        f,
                        " (relay: rejected {} records/{} samples, skipped {}, dropped {})",
                        c.rejected_records,
                        c.rejected_samples,
                        c.skipped_records,
                        c.dropped_samples
                    )?;
                }
            }
        }
        write!(
            f,
            " | lost {} | seed {}{} | {:.1}s",
            self.lost(),
            self.seed,
            if self.soak { " soak" } else { "" },
            self.elapsed_s
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn report_line_and_json() {
        let mut r = Report::new("demo", "nothing");
        let v = Verdict {
            acknowledged: 10,
            delivered: 10,
            extra: 2,
            ..Verdict::default()
        };
        r.replica("a", &v);
        r.replica_scoped(
            "b",
            &Verdict {
                lost: 1,
                ..v.clone()
            },
            "after the wipe",
        );
        let status = serde_json::json!({"replicas": [{"name": "a", "sent_samples": 12, "rejected_records": 1}]});
        r.relay_counters(&status);
        let line = r.to_string();
        assert!(
            line.starts_with("demo: NOT LOSSLESS | injected: nothing"),
            "{line}"
        );
        assert!(
            line.contains("a: delivered 10/10, lost 0, extra 2 (relay: rejected 1"),
            "{line}"
        );
        assert!(
            line.contains("b: delivered 10/10 (scoped), lost 1"),
            "{line}"
        );
        assert!(line.contains("| lost 1 |"), "{line}");
        let j: Value = serde_json::from_str(&r.json_line()).unwrap();
        assert_eq!(j["replicas"][0]["relay"]["sent_samples"], 12);
        assert_eq!(j["replicas"][1]["scope"], "after the wipe");
        assert!(std::panic::catch_unwind(|| r.assert_lossless()).is_err());
        r.replicas.pop();
        r.assert_lossless();
    }

    #[test]
    fn scaled_and_status_helpers() {
        assert_eq!(scaled(1, 2), if soak() { 2 } else { 1 });
        let st = serde_json::json!({"replicas": [{"name": "a", "lag_records": 3}]});
        assert_eq!(lag_records(&st, "a"), 3);
        assert_eq!(lag_records(&st, "b"), u64::MAX);
    }
}
