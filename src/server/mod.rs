//! `walrelay serve`: wires the log, the group commit, the shippers, retention
//! and the HTTP endpoints together, and takes them down in order.
//!
//! The HTTP side is in its own files: the listeners and their connections
//! ([`http`]), what each path answers ([`routes`]), and reloading
//! ([`reload`]). What remains here is the wiring and the shutdown.
//!
//! [`run`] takes an already-bound listener (tests bind `127.0.0.1:0`) and a
//! cancellation token (SIGTERM in `main`). Shutdown order: stop accepting,
//! let open requests finish (their appends are synced and answered), stop the
//! commit thread (it syncs what it has), stop the shippers (their checkpoints
//! are consistent at every await point), exit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prom_remote_write::Limits;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::checkpoint::Checkpoints;
use crate::commit::{Budget, Committer};
use crate::config::ServeConfig;
use crate::fleet::{Fleet, ShipperConfig};
use crate::ingest::budget::MemoryBudget;
use crate::ingest::pool::DecodePool;
use crate::ingest::Ingest;
use crate::repacker::Repacker;
use crate::retention::Retention;
use crate::tls::ServerTls;
use crate::types::StartAt;
use crate::wal::repack::RepackOptions;
use crate::wal::{self, RealStorage, RecoveryReport, Wal, WalOptions};

mod http;
mod reload;
mod routes;

use http::{serve_http, warn_if_files_short, ListenerLimits, ADMIN_MAX_CONNECTIONS};
pub use reload::ReloadSource;
use reload::{reload_on_sighup, Reload};
use routes::Endpoints;

/// How long a write request waits for room in the memory budget before
/// it is answered 503. A maximal plain request (32 MiB decoded) takes
/// ~0.2 s from its body to its fsync (release build, measured), so the
/// seven that fill the default budget are through within a second on two
/// cores, and a request that found the budget taken by such a burst gets
/// in instead of costing its sender a retry. Waiting longer would only
/// hold its connection and its slot of `--max-concurrent-requests` while
/// the relay is truly saturated, and delay the sender's own backoff.
const BUDGET_WAIT: Duration = Duration::from_secs(1);

/// Everything the HTTP handlers need.
struct App {
    ingest: Ingest,
    wal: Wal,
    fleet: Arc<Fleet>,
    reload: Reload,
    recovery: RecoveryReport,
    max_disk_bytes: u64,
    ready: AtomicBool,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    checkpoints: Checkpoints,
    /// `--instance-name`, as at startup (a reload does not rename a relay).
    instance: String,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("opening the log in {dir}: {source}")]
    Wal {
        dir: PathBuf,
        #[source]
        source: wal::WalError,
    },
    #[error("the recovery task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("checkpoint store: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("fsync {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ingest authentication: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("ingest TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        addr: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the commit thread: {0}")]
    CommitThread(#[source] std::io::Error),
    #[error("starting the repack thread: {0}")]
    RepackThread(#[source] std::io::Error),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

/// Runs the relay until `shutdown` is cancelled. With `reload_source`,
/// SIGHUP and `POST /-/reload` re-read the configuration and apply its
/// replicas (see [`crate::fleet`]) without a restart.
///
/// # Errors
/// Startup failures: the data dir is locked or unusable, recovery failed, a
/// replica's settings are invalid.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: CancellationToken,
    reload_source: Option<ReloadSource>,
) -> Result<(), ServeError> {
    let metrics = crate::metrics::install();
    crate::metrics::set_instance(&config.instance_name);
    let _lock = crate::lock::lock_data_dir(&config.data_dir)?;
    let wal_dir = config.data_dir.join("wal");
    let segment_bytes = effective_segment_bytes(&config);
    let options = WalOptions {
        segment_bytes,
        compression: config.compression,
        zstd_level: config.zstd_level,
        zstd_max_level: config.zstd_max_level,
        segment_max_age: config.segment_max_age,
        ..WalOptions::default()
    };
    let max_frame_bytes = options.max_frame_bytes;
    let (mut writer, wal, recovery) = {
        let dir = wal_dir.clone();
        tokio::task::spawn_blocking(move || wal::open(Arc::new(RealStorage), &dir, options))
            .await?
            .map_err(|source| ServeError::Wal {
                dir: wal_dir.clone(),
                source,
            })?
    };
    report_recovery(&recovery);
    load_tombstones(&wal);
    let checkpoints_dir = config.data_dir.join("checkpoints");
    let (checkpoints, set_aside) = Checkpoints::open_or_set_aside(&checkpoints_dir)?;
    if let Some(damaged) = &set_aside {
        metrics::counter!("walrelay_checkpoint_store_set_aside_total").increment(1);
        tracing::error!(
            store = %checkpoints_dir.display(),
            moved_to = %damaged.to.display(),
            cause = %damaged.cause,
            "the checkpoint store is damaged: moved aside and started empty; every replica \
             starts again at the oldest record (nothing is skipped, delivered records are \
             sent again)"
        );
    }
    make_durable(&config.data_dir, &checkpoints_dir)?;

    let retention = Arc::new(
        Retention::new(wal.clone(), config.retention).with_budget_drops(
            config.max_disk_bytes > 0 && config.full_policy == crate::types::FullPolicy::DropOldest,
        ),
    );
    // Each replica's position is loaded (or set, for a new replica) before
    // retention or the commit thread start: retention must never see a
    // position the replica does not really have.
    raise_sequence_floor(&checkpoints, &config, &mut writer)?;
    let extent = wal.extent();
    // A store holding no position at all beside a log holding records was
    // lost or recreated (not a new replica joining a running relay): then
    // "head" would silently skip what the replicas never received, so every
    // replica starts at the oldest record instead.
    let store_lost = checkpoints.replicas()?.is_empty() && extent.first_seq < extent.end_seq;
    if store_lost && !config.replicas.is_empty() {
        tracing::error!(
            first_seq = extent.first_seq,
            end_seq = extent.end_seq,
            "the checkpoint store holds no replica position but the log holds records: \
             starting every replica at the oldest record (re-sends are refused as duplicates \
             by the replicas and counted, nothing is skipped)"
        );
    }
    let start_at = if store_lost {
        StartAt::Oldest
    } else {
        config.new_replica_start
    };
    for r in &config.replicas {
        if checkpoints.cursor(&r.name)?.delivered.is_none() {
            crate::ship::place_new_replica(&checkpoints, &wal, &r.name, start_at)?;
        }
    }
    let fleet = Arc::new(Fleet::new(
        wal.clone(),
        checkpoints.clone(),
        Arc::clone(&retention),
    ));
    for stale in checkpoints.replicas()? {
        if !config.replicas.iter().any(|r| r.name == stale) {
            tracing::info!(replica = %stale, "replica no longer configured; its checkpoint is kept but no longer holds back deletion");
        }
    }
    if config.replicas.is_empty() {
        tracing::warn!(
            "no replicas configured: acknowledged records are kept until a replica delivers \
             them; only --retention or --max-disk-bytes with --full-policy drop-oldest \
             delete them before that"
        );
    }

    // Credentials and certificates are loaded before anything starts, so a
    // file that went bad since the configuration was checked stops the start.
    let auth = Authenticator::new(
        config.bearer_token_file.as_deref(),
        config.basic_auth_users_file.as_deref(),
    )?
    .with_password_check_limit(config.max_concurrent_password_checks);
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(ServerTls::new(files.clone())?)),
        None => None,
    };
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: addr.to_string(),
                    what: "admin-listen",
                    source,
                })?,
        ),
        None => None,
    };

    let (committer, commit_thread) = Committer::start(
        writer,
        wal.clone(),
        Arc::clone(&retention),
        Budget {
            max_disk_bytes: config.max_disk_bytes,
            policy: config.full_policy,
        },
    )
    .map_err(ServeError::CommitThread)?;

    // Retention sees every replica's position from the first shipper on.
    fleet.start(ShipperConfig::all(&config)).await?;
    // Exposed from the first scrape, not from housekeeping's first round.
    set_wal_gauges(&wal);
    let repacker = if config.repack_zstd_level > 0 {
        let options = RepackOptions {
            zstd_level: config.repack_zstd_level,
            max_frame_bytes,
        };
        Some(
            Repacker::start(wal.clone(), Arc::clone(&retention), options)
                .map_err(ServeError::RepackThread)?,
        )
    } else {
        None
    };
    let housekeeping_stop = CancellationToken::new();
    let housekeeping = tokio::spawn(housekeeping(
        Arc::clone(&retention),
        wal.clone(),
        Arc::clone(&fleet),
        housekeeping_stop.clone(),
    ));

    let app = Arc::new(App {
        ingest: Ingest {
            committer,
            auth,
            max_body_bytes: config.max_body_bytes,
            limits: Limits {
                max_decoded_bytes: config.max_decoded_bytes,
                max_series: config.max_series_per_request,
                max_labels_per_series: config.max_labels_per_series,
                max_label_name_len: config.max_label_name_length,
                max_label_value_len: config.max_label_value_length,
                // A stored 2.0 record is translated for 1.0 replicas, each
                // series spelling out its labels: bounded like the request
                // itself, so that no record can run a shipper out of memory.
                max_translated_bytes: config
                    .max_decoded_bytes
                    .saturating_mul(TRANSLATION_EXPANSION),
            },
            body_read_timeout: config.body_read_timeout,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            budget: MemoryBudget::new(config.max_inflight_decoded_bytes, BUDGET_WAIT),
            pool: DecodePool::per_core(),
        },
        wal: wal.clone(),
        fleet: Arc::clone(&fleet),
        reload: Reload {
            source: reload_source,
            running: Mutex::new(config.clone()),
            endpoint_enabled: config.enable_reload_endpoint,
            gate: tokio::sync::Mutex::new(None),
        },
        recovery,
        instance: config.instance_name.clone(),
        max_disk_bytes: config.max_disk_bytes,
        ready: AtomicBool::new(true),
        metrics,
        checkpoints: checkpoints.clone(),
    });
    metrics::gauge!("walrelay_disk_budget_bytes").set(config.max_disk_bytes as f64);
    tracing::info!(listen = ?listener.local_addr().ok(), data_dir = %config.data_dir.display(),
        replicas = config.replicas.len(), tls = tls.is_some(),
        client_certificates = config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
        authentication = app.ingest.auth.is_enabled(), "walrelay serving");
    if let Some(a) = &admin_listener {
        tracing::info!(admin_listen = ?a.local_addr().ok(),
            "serving /metrics, /-/healthy, /-/ready and /api/v1/status on the admin address too");
    }
    if config.enable_reload_endpoint && !app.ingest.auth.is_enabled() {
        let mtls = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        if !mtls {
            tracing::warn!(
                "--enable-reload-endpoint without ingest credentials: any client that can \
                 reach --listen can reload the configuration (at most once a second)"
            );
        }
    }

    metrics::gauge!("walrelay_config_last_reload_successful").set(1.0);
    metrics::gauge!("walrelay_config_last_reload_success_timestamp_seconds")
        .set(crate::types::now_ms() as f64 / 1000.0);
    let sighup = tokio::spawn(reload_on_sighup(Arc::clone(&app), shutdown.clone()));

    warn_if_files_short(&config);
    let main_limits = ListenerLimits {
        label: "main",
        max_connections: config.max_connections,
        max_connections_per_ip: config.max_connections_per_ip,
        header_read_timeout: config.header_read_timeout,
        grace: config.shutdown_timeout,
    };
    let main = serve_http(
        listener,
        Endpoints::All,
        tls,
        Arc::clone(&app),
        shutdown.clone(),
        main_limits,
    );
    let admin = async {
        if let Some(l) = admin_listener {
            let admin_limits = ListenerLimits {
                label: "admin",
                max_connections: ADMIN_MAX_CONNECTIONS,
                max_connections_per_ip: 0,
                ..main_limits
            };
            serve_http(
                l,
                Endpoints::Admin,
                None,
                Arc::clone(&app),
                shutdown.clone(),
                admin_limits,
            )
            .await;
        }
    };
    tokio::join!(main, admin);

    // The listener is closed and open requests are answered: stop the commit
    // thread by dropping the last sender, then the shippers.
    app.ready.store(false, Ordering::Relaxed);
    app.ingest.committer.stop();
    let joined = tokio::task::spawn_blocking(move || commit_thread.join()).await;
    if !matches!(joined, Ok(Ok(_))) {
        tracing::error!("the commit thread did not stop cleanly");
    }
    sighup.abort();
    fleet.stop_all().await;
    housekeeping_stop.cancel();
    let _ = housekeeping.await;
    if let Some(r) = repacker {
        let _ = tokio::task::spawn_blocking(move || r.stop()).await;
    }
    tracing::info!("walrelay stopped");
    Ok(())
}

/// How many times `--max-decoded-bytes` the label names and values of a 2.0
/// request's 1.0 translation may take. Ordinary 2.0 requests expand about
/// 3x (measured on tiny series, the worst of the usual shapes); one long
/// symbol referenced by millions of series would expand without limit.
const TRANSLATION_EXPANSION: usize = 4;

/// `wal/` and `checkpoints/` are created without syncing the directory that
/// holds them, and sled 0.34 writes its `conf` file without fsync and never
/// syncs a directory: until that is done, a power loss can take the whole log
/// and every replica's position with it, or leave a torn `conf` that sled
/// refuses to open. Done once at startup, before anything is acknowledged.
fn make_durable(data_dir: &Path, checkpoints_dir: &Path) -> Result<(), ServeError> {
    let sync = |p: &Path| {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|source| ServeError::Sync {
                path: p.to_path_buf(),
                source,
            })
    };
    for file in ["conf", "db"] {
        let p = checkpoints_dir.join(file);
        if p.exists() {
            sync(&p)?;
        }
    }
    sync(checkpoints_dir)?;
    sync(data_dir)
}

/// Never hands out again a sequence number that a replica's checkpoint has
/// passed: when the log lost records at its end that a replica had already
/// received (a torn or bit-rotten last frame cut at recovery, a volume
/// restored from an older copy), new records would take their numbers and
/// that replica would skip them as delivered.
///
/// Every checkpoint in the store counts, not only the configured replicas':
/// a replica removed from the configuration and added back later (by a
/// restart or a reload) resumes from its stored position, so the numbers
/// below it must never name other records. Its live cursor, the end of its
/// in-flight range, and its backfill's range and in-flight end all count.
/// Done before new replicas take the head as their start.
///
/// While the relay runs, no stored position can pass the log's end: a
/// shipper only checkpoints what it read from the durable log, a removed
/// replica's checkpoint does not move, and `walrelay cursors set` is refused
/// while the relay holds the data dir. So a replica added back by a reload
/// finds its position within the log this floor made.
///
/// # Errors
/// The checkpoint store cannot list its replicas, or a configured replica's
/// position cannot be read (its shipper could not start either). An
/// unconfigured replica whose position cannot be read is logged and left
/// out: it cannot start again until the store is repaired, so it can skip
/// nothing.
fn raise_sequence_floor(
    checkpoints: &Checkpoints,
    config: &ServeConfig,
    writer: &mut wal::WalWriter,
) -> Result<(), ServeError> {
    let mut names = checkpoints.replicas()?;
    for r in &config.replicas {
        if !names.contains(&r.name) {
            names.push(r.name.clone());
        }
    }
    for name in names {
        let cursor = match checkpoints.cursor(&name) {
            Ok(c) => c,
            Err(e) if !config.replicas.iter().any(|r| r.name == name) => {
                tracing::error!(replica = %name, error = %e,
                    "cannot read the stored position of a replica that is not configured; \
                     it does not raise the log's sequence numbers");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let passed = cursor.highest();
        if passed > writer.next_seq() {
            tracing::error!(replica = %name, position = passed, log_end = writer.next_seq(),
                configured = config.replicas.iter().any(|r| r.name == name),
                "the log ends before this replica's position: records it received are no \
                 longer in the log; new records are numbered from its position on");
            writer.skip_to(passed);
        }
    }
    Ok(())
}

/// Keeps segments small enough under a disk budget that the active segment
/// (never deleted) cannot hold most of it.
fn effective_segment_bytes(config: &ServeConfig) -> u64 {
    if config.max_disk_bytes > 0 {
        config
            .segment_bytes
            .min((config.max_disk_bytes / 8).max(64 << 10))
    } else {
        config.segment_bytes
    }
}

fn report_recovery(r: &RecoveryReport) {
    tracing::info!(
        segments = r.segments,
        first_seq = r.first_seq,
        next_seq = r.next_seq,
        "log recovered"
    );
    if let Some(t) = &r.truncated {
        tracing::warn!(file = %t.file.display(), offset = t.offset, bytes = t.bytes_removed,
            reason = %t.reason, "torn tail truncated");
        metrics::counter!("walrelay_wal_truncations_total").increment(1);
    }
    for d in &r.damage {
        tracing::error!(file = %d.file.display(), offset = d.offset, reason = %d.reason,
            "corruption found in the log; readers will skip it");
        metrics::counter!("walrelay_wal_corruptions_total").increment(1);
    }
    for p in &r.removed {
        if p.to_string_lossy()
            .ends_with(crate::wal::repack::REPACK_SUFFIX)
        {
            tracing::info!(file = %p.display(),
                "removed the copy of a repack cut short by a crash (its segment is whole)");
        } else {
            tracing::warn!(file = %p.display(), "removed an empty segment left by a crash");
        }
    }
}

/// Loads the tombstones earlier runs left (what limits deleted, for the
/// replicas that have not passed it yet). A file that cannot be read costs
/// only that accounting (those records are then counted as skipped): logged,
/// and the start goes on.
fn load_tombstones(wal: &Wal) {
    match wal.load_tombstones() {
        Ok((0, None)) => {}
        Ok((n, None)) => tracing::info!(tombstones = n, "tombstones of dropped segments loaded"),
        Ok((n, Some(why))) => tracing::warn!(tombstones = n, stopped = %why,
            "tombstone file read only in part (an append cut by a crash, or damage); \
             it is rewritten at the next drop"),
        Err(e) => tracing::error!(error = %e,
            "cannot read the tombstone file: records dropped before this start are counted \
             as skipped, without their samples"),
    }
}

/// Periodic work: retention, and gauges of the log and the replicas.
async fn housekeeping(
    retention: Arc<Retention>,
    wal: Wal,
    fleet: Arc<Fleet>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut shard_gauges = ShardGauges::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // A drop under the disk budget waits for a segment's samples.
            () = retention.count_wanted() => {}
            () = stop.cancelled() => return,
        }
        let r = Arc::clone(&retention);
        let _ = tokio::task::spawn_blocking(move || {
            r.collect_delivered();
            r.count_ahead();
            r.enforce_age();
            r.prune_tombstones();
        })
        .await;
        if let Ok(st) = rustix::fs::statvfs(wal.dir()) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let total = st.f_blocks.saturating_mul(st.f_frsize);
            metrics::gauge!("walrelay_disk_free_bytes").set(free as f64);
            metrics::gauge!("walrelay_disk_total_bytes").set(total as f64);
        }
        let extent = set_wal_gauges(&wal);
        for r in &fleet.states() {
            let s = r.status(extent.end_seq, lag_bytes(&wal, r.low_water()));
            let name = r.name.clone();
            shard_gauges.set(&name, &s, extent.end_seq);
            metrics::gauge!("walrelay_replica_lag_records", "replica" => name.clone())
                .set(s.lag_records as f64);
            metrics::gauge!("walrelay_replica_lag_bytes", "replica" => name.clone())
                .set(s.lag_bytes as f64);
            metrics::gauge!("walrelay_replica_lag_seconds", "replica" => name).set(s.lag_seconds);
        }
        // Lets tests (and curious operators) tell that retention has run.
        metrics::counter!("walrelay_housekeeping_runs_total").increment(1);
    }
}

/// The log's size and extent gauges; returns the extent.
fn set_wal_gauges(wal: &Wal) -> crate::wal::WalExtent {
    let extent = wal.extent();
    metrics::gauge!("walrelay_wal_bytes").set(extent.bytes as f64);
    metrics::gauge!("walrelay_wal_segments").set(extent.segments as f64);
    metrics::gauge!("walrelay_wal_first_seq").set(extent.first_seq as f64);
    metrics::gauge!("walrelay_wal_head_seq").set(extent.end_seq as f64);
    extent
}

/// `walrelay_replica_shard_lag_records{replica,shard}`: records between
/// the log's head and each shard's cursor (one shard: the live stream's).
/// A shard gone since (fewer shards) is set to 0 rather than left showing
/// its last lag.
#[derive(Default)]
struct ShardGauges {
    shown: std::collections::HashMap<String, u32>,
}

impl ShardGauges {
    fn set(&mut self, replica: &str, s: &crate::ship::ReplicaStatus, head: u64) {
        let lags: Vec<u64> = if s.shard_cursors.is_empty() {
            vec![head.saturating_sub(s.cursor)]
        } else {
            s.shard_cursors.iter().map(|c| c.lag_records).collect()
        };
        let shown = self.shown.entry(replica.to_owned()).or_insert(0);
        let count = u32::try_from(lags.len()).unwrap_or(u32::MAX);
        for shard in 0..count.max(*shown) {
            let lag = lags.get(shard as usize).copied().unwrap_or(0);
            metrics::gauge!("walrelay_replica_shard_lag_records",
                "replica" => replica.to_owned(), "shard" => shard.to_string())
            .set(lag as f64);
        }
        *shown = count;
    }
}

/// Bytes of the log from the segment holding `cursor` to the end: an upper
/// bound of what the replica still has to receive.
fn lag_bytes(wal: &Wal, cursor: u64) -> u64 {
    let segs = wal.segments();
    let end = wal.durable_end();
    segs.iter()
        .enumerate()
        .filter(|(i, _)| segs.get(i + 1).map_or(end, |n| n.first_seq) > cursor)
        .map(|(_, s)| s.len)
        .sum()
}
