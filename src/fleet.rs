//! The running shippers, one per configured replica, and how the set changes
//! when the configuration is reloaded (SIGHUP, `POST /-/reload`).
//!
//! A reload compares each replica's whole shipping configuration (its table
//! plus the global send settings it uses) with the running one:
//!
//! - unchanged: its shipper keeps running, untouched;
//! - removed: its shipper is stopped; its checkpoint stays in the store (a
//!   replica added back later resumes there) but no longer holds segments;
//! - changed (URL, credentials, TLS, limits, protocol..., or its TLS
//!   certificate, key or CA file modified since its client was built): the
//!   old shipper is stopped and a new one started under the same name, from
//!   the same checkpoint;
//! - added: its position is set as for a replica seen for the first time
//!   (`--new-replica-start`), then its shipper starts.
//!
//! A live-first replica's backfill ([`crate::ship::backfill`]) is part of
//! its shipper: it drains with it, and the new shipper resumes it from its
//! own checkpoint. A removed replica's backfill checkpoint stays with its
//! cursor.
//!
//! A replica that cannot be started at a reload (its stored position cannot
//! be read, or its client cannot be built after its old shipper stopped)
//! stays in the published list without a shipper: its state shows phase
//! `error` with the reason, and its stored position (or, when that cannot be
//! read, the position its old shipper had, else the oldest record) keeps
//! holding the segments it still needs, exactly as a running replica's
//! would, until it is removed from the configuration. The next reload (or a
//! restart) tries to start it again; the reload reports it as changed.
//!
//! Stopping drains: the shipper is asked to stop between requests, so the
//! request it is sending is answered and checkpointed first and nothing is
//! sent twice. A replica that does not answer within [`DRAIN_TIMEOUT`] (it
//! is down, which is often why it is being changed) is stopped where it is;
//! its in-flight range is in the checkpoint and the new shipper re-sends
//! exactly that range first, as after a restart. Nothing is lost either way.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{CheckpointError, Checkpoints, Cursor};
use crate::config::{ReplicaConfig, ServeConfig};
use crate::retention::Retention;
use crate::ship::{
    BatchLimits, RateLimits, ReplicaState, Sender, SenderError, SenderOptions, Shipper,
};
use crate::types::StartAt;
use crate::wal::Wal;

/// Why shippers could not be started or moved to a new configuration.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A replica's client cannot be built (TLS or credentials files, a
    /// header, the URL).
    #[error("replica {name}: {source}")]
    Client {
        name: String,
        #[source]
        source: SenderError,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A reload applied what it could; these replicas have no shipper.
    #[error("not started: {failed}; applied otherwise: {applied}")]
    NotStarted { failed: String, applied: String },
}

/// How long a stopping shipper may take to finish its request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a replica's shipper is built from: two replicas' shippers are
/// interchangeable exactly when these are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipperConfig {
    pub replica: ReplicaConfig,
    pub batch: BatchLimits,
    pub send_timeout: Duration,
    pub retry_min_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub start_at: StartAt,
    pub shard_update_interval: Duration,
    /// How long a small batch waits for more records.
    pub linger: Duration,
}

impl ShipperConfig {
    /// One per replica of `config`.
    pub fn all(config: &ServeConfig) -> Vec<ShipperConfig> {
        config
            .replicas
            .iter()
            .map(|r| ShipperConfig {
                replica: r.clone(),
                batch: BatchLimits {
                    max_samples: config.max_samples_per_send,
                    max_bytes: config.max_bytes_per_send,
                },
                send_timeout: config.send_timeout,
                retry_min_backoff: config.retry_min_backoff,
                retry_max_backoff: config.retry_max_backoff,
                start_at: config.new_replica_start,
                shard_update_interval: config.shard_update_interval,
                linger: config.batch_linger,
            })
            .collect()
    }
}

struct Running {
    config: ShipperConfig,
    /// When the replica's TLS files were last modified as its client was
    /// built: a reload rebuilds a client whose files changed since, so that
    /// rotated certificates take effect at the next reload.
    tls_files: Vec<Option<SystemTime>>,
    state: Arc<ReplicaState>,
    /// Stop between requests.
    drain: CancellationToken,
    /// Stop now.
    stop: CancellationToken,
    /// None for a replica that could not be started (see the module
    /// documentation): only its state is kept.
    task: Option<JoinHandle<()>>,
}

/// Modification times of a replica's TLS files (CA, certificate, key).
fn tls_files(c: &ShipperConfig) -> Vec<Option<SystemTime>> {
    let t = &c.replica.tls;
    [&t.ca_file, &t.cert_file, &t.key_file]
        .into_iter()
        .map(|f| {
            f.as_ref()
                .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        })
        .collect()
}

impl Running {
    /// Whether this shipper is what `c` would start: the same settings and
    /// unchanged TLS files, and it runs (one that could not be started is
    /// started again).
    fn is(&self, c: &ShipperConfig) -> bool {
        self.task.is_some() && self.config == *c && self.tls_files == tls_files(c)
    }

    async fn shut_down(self) {
        self.drain.cancel();
        let Some(mut task) = self.task else {
            return;
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            tracing::info!(replica = %self.state.name,
                "the replica did not finish its request in time; stopping its shipper now \
                 (its in-flight range is re-sent first when it starts again)");
            self.stop.cancel();
            let _ = task.await;
        }
    }
}

/// What a reload changed, for the log and the reload endpoint's answer.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
}

/// See the module documentation.
pub struct Fleet {
    wal: Wal,
    checkpoints: Checkpoints,
    retention: Arc<Retention>,
    /// The running shippers; one reload or shutdown at a time.
    running: tokio::sync::Mutex<Vec<Running>>,
    /// Their states, for status, metrics and housekeeping (read often,
    /// without waiting for a reload in progress).
    states: RwLock<Vec<Arc<ReplicaState>>>,
}

impl Fleet {
    pub fn new(wal: Wal, checkpoints: Checkpoints, retention: Arc<Retention>) -> Self {
        Self {
            wal,
            checkpoints,
            retention,
            running: tokio::sync::Mutex::new(Vec::new()),
            states: RwLock::new(Vec::new()),
        }
    }

    /// The replicas' states, in configuration order.
    pub fn states(&self) -> Vec<Arc<ReplicaState>> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the first shippers. Their positions must be in the store
    /// already (startup sets them, with its own rules for a lost store).
    ///
    /// # Errors
    /// A replica's client cannot be built (its credentials cannot be read).
    pub async fn start(&self, configs: Vec<ShipperConfig>) -> Result<(), FleetError> {
        let mut running = self.running.lock().await;
        let mut started = Vec::new();
        for c in configs {
            let cursor = self.checkpoints.cursor(&c.replica.name)?;
            started.push(self.spawn(c, cursor)?);
        }
        *running = started;
        self.publish(&running);
        Ok(())
    }

    /// Moves the running shippers to `configs`. Everything is checked and
    /// built before anything is stopped: a reload that fails changes
    /// nothing.
    ///
    /// # Errors
    /// A replica's client cannot be built, or the checkpoint store fails.
    pub async fn apply(&self, configs: Vec<ShipperConfig>) -> Result<Changes, FleetError> {
        let mut running = self.running.lock().await;
        let mut changes = Changes::default();
        // Build every new client first: bad credentials or certificates
        // refuse the reload before any shipper is touched.
        let mut senders = Vec::new();
        for c in &configs {
            let keep = running.iter().any(|r| r.is(c));
            senders.push(if keep { None } else { Some(sender(c)?) });
        }
        let mut old: Vec<Running> = std::mem::take(&mut *running);
        let mut next = Vec::new();
        let mut failed = Vec::new();
        for (c, sender) in configs.into_iter().zip(senders) {
            let name = c.replica.name.clone();
            if let Some(i) = old.iter().position(|r| r.is(&c)) {
                next.push(old.swap_remove(i));
                changes.unchanged.push(name);
                continue;
            }
            let mut previous = None;
            if let Some(i) = old.iter().position(|r| r.config.replica.name == name) {
                let r = old.swap_remove(i);
                previous = Some(Arc::clone(&r.state));
                r.shut_down().await;
                changes.changed.push(name.clone());
            } else {
                changes.added.push(name.clone());
            }
            // Read after the old shipper stopped: its last checkpoint, and
            // any backfill it left, are what the new one continues from.
            // A failure here (the checkpoint store) leaves this replica
            // without a shipper but still holding its segments, and the
            // others tracked: the reload reports it, and the next reload
            // (or a restart) starts it.
            let started = self.position(&name, c.start_at).and_then(|cursor| {
                let sender = match sender {
                    Some(s) => s,
                    None => self::sender(&c)?,
                };
                Ok(self.spawn_with(c.clone(), cursor, sender))
            });
            match started {
                Ok(r) => next.push(r),
                Err(e) => {
                    let why = format!("replica {name}: {e:#}");
                    next.push(self.not_started(c, previous.as_deref(), &why));
                    failed.push(why);
                }
            }
        }
        for r in old {
            changes.removed.push(r.state.name.clone());
            r.shut_down().await;
        }
        *running = next;
        self.publish(&running);
        if failed.is_empty() {
            Ok(changes)
        } else {
            Err(FleetError::NotStarted {
                failed: failed.join("; "),
                applied: format!("{changes:?}"),
            })
        }
    }

    /// Stops every shipper now (shutdown: their checkpoints are consistent
    /// at every await point).
    pub async fn stop_all(&self) {
        let mut running = self.running.lock().await;
        for r in running.iter() {
            r.stop.cancel();
        }
        for r in running.drain(..) {
            if let Some(task) = r.task {
                let _ = task.await;
            }
        }
    }

    /// The replica's stored cursor, or, for a name never seen, the start
    /// `start_at` gives, stored before its shipper or retention see it.
    fn position(&self, name: &str, start_at: StartAt) -> Result<Cursor, FleetError> {
        let cursor = self.checkpoints.cursor(name)?;
        if let Some(delivered) = cursor.delivered {
            // Cannot happen while the relay runs (see
            // `server::raise_sequence_floor`); if it did, the replica would
            // skip the records numbered below its position.
            if delivered > self.wal.durable_end() {
                tracing::error!(replica = %name, position = delivered,
                    log_end = self.wal.durable_end(),
                    "the replica's stored position is past the end of the log");
            }
            return Ok(cursor);
        }
        crate::ship::place_new_replica(&self.checkpoints, &self.wal, name, start_at)?;
        Ok(self.checkpoints.cursor(name)?)
    }

    fn spawn(&self, c: ShipperConfig, cursor: Cursor) -> Result<Running, FleetError> {
        let s = sender(&c)?;
        Ok(self.spawn_with(c, cursor, s))
    }

    fn spawn_with(&self, c: ShipperConfig, cursor: Cursor, sender: Sender) -> Running {
        let r = &c.replica;
        let limits = RateLimits {
            max_samples_per_second: r.max_samples_per_second,
            max_bytes_per_second: r.max_bytes_per_second,
        };
        if !limits.is_unlimited() {
            tracing::info!(replica = %r.name, max_samples_per_second = limits.max_samples_per_second,
                max_bytes_per_second = limits.max_bytes_per_second, "replica rate limits");
        }
        if let Some(b) = &cursor.backfill {
            tracing::info!(replica = %r.name, from = b.from, to = b.to,
                remaining_records = b.to.saturating_sub(b.from),
                "live-first backfill found in the checkpoint store; it resumes");
        }
        let state = Arc::new(
            replica_state(
                &c,
                cursor.delivered.unwrap_or(0),
                cursor.backfill.map(|b| b.from..b.to),
            )
            .with_rate_limits(limits),
        );
        let shipper = Shipper::new(
            Arc::clone(&state),
            self.wal.clone(),
            self.checkpoints.clone(),
            sender,
            r.protocol,
            c.batch,
            c.start_at,
        )
        .with_catch_up(r.catch_up)
        .with_linger(c.linger)
        .with_shards(r.shards, c.shard_update_interval);
        let drain = CancellationToken::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(shipper.run(stop.clone(), drain.clone()));
        Running {
            tls_files: tls_files(&c),
            config: c,
            state,
            drain,
            stop,
            task: Some(task),
        }
    }

    /// A replica that could not be started: no shipper, but a state that
    /// says why and holds its position, so that retention keeps what it
    /// needs. The position is its stored cursor; if that cannot be read,
    /// the one its old shipper had (`previous`); failing both, the oldest
    /// record of the log (nothing it might need goes).
    fn not_started(&self, c: ShipperConfig, previous: Option<&ReplicaState>, why: &str) -> Running {
        let (delivered, backfill) = match self.checkpoints.cursor(&c.replica.name) {
            Ok(Cursor {
                delivered: Some(delivered),
                backfill,
                ..
            }) => (delivered, backfill.map(|b| b.from..b.to)),
            _ => match previous {
                Some(s) => (s.delivered(), s.backfill()),
                None => (self.wal.extent().first_seq, None),
            },
        };
        let state = replica_state(&c, delivered, backfill);
        state.set_error(format!(
            "not started: {why}; its position still holds the segments it needs; \
             the next reload or a restart starts it again"
        ));
        Running {
            tls_files: tls_files(&c),
            config: c,
            state: Arc::new(state),
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
            task: None,
        }
    }

    /// Makes the running set the one status, metrics and retention see.
    fn publish(&self, running: &[Running]) {
        let states: Vec<_> = running.iter().map(|r| Arc::clone(&r.state)).collect();
        self.retention.set_replicas(states.clone());
        *self.states.write().unwrap_or_else(|p| p.into_inner()) = states;
    }
}

/// A replica's state at `delivered`, with the backfill still to do set
/// before retention can see it (so the gap's segments stay).
fn replica_state(
    c: &ShipperConfig,
    delivered: u64,
    backfill: Option<std::ops::Range<u64>>,
) -> ReplicaState {
    let r = &c.replica;
    ReplicaState::new(&r.name, &r.display_url(), delivered)
        .with_protocol(r.protocol.as_str())
        .with_catch_up(r.catch_up.as_str())
        .with_backfill(backfill)
}

/// The HTTP client of one replica, with its TLS, credentials, headers and
/// timeout.
fn sender(c: &ShipperConfig) -> Result<Sender, FleetError> {
    let r = &c.replica;
    let name = &r.name;
    if r.tls.insecure_skip_verify {
        tracing::warn!(replica = %name, url = %r.display_url(),
            "tls_insecure_skip_verify: the replica's certificate is not checked; \
             anyone on the path can read and change what is sent");
    }
    Sender::new(
        name,
        &r.url,
        SenderOptions {
            timeout: r.timeout.unwrap_or(c.send_timeout),
            min_backoff: c.retry_min_backoff,
            max_backoff: c.retry_max_backoff,
            tls: r.tls.clone(),
            policy: r.status_policy.clone(),
            max_blocked_attempts: None,
            headers: r.headers.clone(),
            auth: r.auth.clone(),
        },
    )
    .map_err(|source| FleetError::Client {
        name: name.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use wal_format::{PayloadEncoding, PayloadKind, RecordMeta, RecordRef};

    use super::*;
    use crate::wal::{RealStorage, WalOptions};

    fn config(name: &str, url: &str) -> ShipperConfig {
        ShipperConfig {
            replica: crate::config::parse_replica(&format!("{name}={url}")).unwrap(),
            batch: BatchLimits {
                max_samples: 10_000,
                max_bytes: 1 << 20,
            },
            send_timeout: Duration::from_secs(1),
            retry_min_backoff: Duration::from_millis(10),
            retry_max_backoff: Duration::from_millis(100),
            start_at: StartAt::Head,
            shard_update_interval: Duration::from_secs(10),
            linger: crate::ship::DEFAULT_LINGER,
        }
    }

    /// A log of `segments` sealed segments plus the active one.
    fn log(dir: &Path, segments: usize) -> Wal {
        let options = WalOptions {
            segment_bytes: 1024,
            ..WalOptions::default()
        };
        let (mut w, wal, _) = crate::wal::open(Arc::new(RealStorage), dir, options).unwrap();
        let payload = vec![7u8; 900];
        while wal.segments().len() <= segments {
            let meta = RecordMeta {
                receive_time_ms: 1,
                min_sample_ts: 1,
                max_sample_ts: 1,
                samples: 3,
                kind: PayloadKind::RemoteWriteV1,
                encoding: PayloadEncoding::Identity,
            };
            w.append(&[RecordRef {
                meta,
                payload: &payload,
            }])
            .unwrap();
            w.sync().unwrap();
        }
        wal
    }

    #[tokio::test]
    async fn a_replica_that_cannot_start_at_a_reload_is_shown_in_error_and_keeps_its_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = log(&tmp.path().join("wal"), 4);
        let before = wal.segments().len();
        // b was a replica once: its checkpoint is in the store, damaged (a
        // backfill value of the wrong size), so its position cannot be read.
        let store = tmp.path().join("checkpoints");
        {
            let db = sled::open(&store).unwrap();
            db.insert("replica/b/delivered", &0u64.to_le_bytes()[..])
                .unwrap();
            db.insert("replica/b/backfill", &[1u8, 2, 3][..]).unwrap();
            db.flush().unwrap();
        }
        let checkpoints = Checkpoints::open(&store).unwrap();
        assert!(checkpoints.cursor("b").is_err());
        checkpoints.set("a", wal.durable_end()).unwrap();
        let retention = Arc::new(Retention::new(wal.clone(), None));
        let fleet = Fleet::new(wal.clone(), checkpoints, Arc::clone(&retention));
        let a = config("a", "http://127.0.0.1:9/api/v1/write");
        fleet.start(vec![a.clone()]).await.unwrap();

        let err = fleet
            .apply(vec![a, config("b", "http://127.0.0.1:9/api/v1/write")])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("replica b"), "{err:#}");
        let states = fleet.states();
        let b = states.iter().find(|s| s.name == "b").expect("b is listed");
        let status = b.status(wal.durable_end(), 0);
        assert_eq!(status.state, "error");
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("not started")),
            "{status:?}"
        );
        // a has everything; b's segments must stay all the same.
        assert_eq!(retention.collect_delivered(), 0);
        assert_eq!(wal.segments().len(), before);
        fleet.stop_all().await;
    }
}
