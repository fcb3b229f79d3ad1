//! `walrelay serve`: wires the log, the group commit, the shippers, retention
//! and the HTTP endpoints together, and takes them down in order.
//!
//! [`run`] takes an already-bound listener (tests bind `127.0.0.1:0`) and a
//! cancellation token (SIGTERM in `main`). Shutdown order: stop accepting,
//! let open requests finish (their appends are synced and answered), stop the
//! commit thread (it syncs what it has), stop the shippers (their checkpoints
//! are consistent at every await point), exit.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prom_remote_write::Limits;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::checkpoint::Checkpoints;
use crate::commit::{Budget, Committer};
use crate::config::{ConfigError, ServeConfig};
use crate::connections::{Activity, ConnectionLimit};
use crate::fleet::{Changes, Fleet, ShipperConfig};
use crate::ingest::budget::MemoryBudget;
use crate::ingest::pool::DecodePool;
use crate::ingest::{text, HttpResponse, Ingest};
use crate::retention::Retention;
use crate::tls::ServerTls;
use crate::types::StartAt;
use crate::wal::{self, RealStorage, RecoveryReport, Wal, WalOptions};

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

/// Reads the configuration again for a reload (flags and environment as at
/// startup, the file as it is now).
pub type ReloadSource = Arc<dyn Fn() -> Result<ServeConfig, ConfigError> + Send + Sync>;

/// What a reload needs: where the configuration comes from, and the one in
/// force (to tell which changes need a restart).
struct Reload {
    source: Option<ReloadSource>,
    running: Mutex<ServeConfig>,
    /// `--enable-reload-endpoint`: `POST /-/reload` is served (with the
    /// ingest credentials) on the main address.
    endpoint_enabled: bool,
    /// Held by the reload under way, so reloads run one at a time; it holds
    /// when the endpoint last finished one, for [`RELOAD_ENDPOINT_INTERVAL`].
    gate: tokio::sync::Mutex<Option<Instant>>,
}

/// Least time between two reloads by `POST /-/reload`: a reload re-reads
/// every file and may restart shippers, and a client that may reload must
/// not be able to keep the relay doing only that. SIGHUP is not limited
/// (it needs the pod), only serialised with the others.
const RELOAD_ENDPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Why a reload was refused. The whole reason (which never holds a secret:
/// URLs are redacted, a file that does not parse is named by its line) goes
/// to the log; an HTTP client gets [`ReloadError::summary`].
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("this relay was started without a configuration to reload")]
    NoSource,
    #[error("reading the configuration: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0:#}")]
    Apply(anyhow::Error),
}

impl ReloadError {
    /// What `POST /-/reload` answers: which file or setting, the line of a
    /// file that does not parse, no text of the configuration.
    fn summary(&self) -> String {
        match self {
            ReloadError::NoSource => self.to_string(),
            ReloadError::Task(_) => "the configuration could not be read".to_owned(),
            ReloadError::Config(e) => e.summary(),
            ReloadError::Apply(_) => {
                "a replica could not be started with the new settings".to_owned()
            }
        }
    }
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
) -> anyhow::Result<()> {
    let metrics = crate::metrics::install();
    crate::metrics::set_instance(&config.instance_name);
    let _lock = crate::lock::lock_data_dir(&config.data_dir)?;
    let wal_dir = config.data_dir.join("wal");
    let segment_bytes = effective_segment_bytes(&config);
    let options = WalOptions {
        segment_bytes,
        compression: config.compression,
        zstd_level: config.zstd_level,
        ..WalOptions::default()
    };
    let (mut writer, wal, recovery) = {
        let dir = wal_dir.clone();
        tokio::task::spawn_blocking(move || wal::open(Arc::new(RealStorage), &dir, options))
            .await
            .context("recovery task")?
            .with_context(|| format!("opening the log in {}", wal_dir.display()))?
    };
    report_recovery(&recovery);
    load_tombstones(&wal);
    let checkpoints_dir = config.data_dir.join("checkpoints");
    let checkpoints = Checkpoints::open(&checkpoints_dir)?;
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
    )
    .context("ingest authentication")?
    .with_password_check_limit(config.max_concurrent_password_checks);
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(
            ServerTls::new(files.clone()).context("ingest TLS")?,
        )),
        None => None,
    };
    let admin_listener = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin-listen)"))?,
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
    )?;

    // Retention sees every replica's position from the first shipper on.
    fleet.start(ShipperConfig::all(&config)).await?;
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
            pool: Arc::new(DecodePool::per_core()),
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
    tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(),
        replicas = config.replicas.len(), tls = tls.is_some(),
        client_certificates = config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
        authentication = app.ingest.auth.is_enabled(), "walrelay serving");
    if let Some(a) = &admin_listener {
        tracing::info!(admin_listen = %a.local_addr()?,
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
    tracing::info!("walrelay stopped");
    Ok(())
}

/// How many times `--max-decoded-bytes` the label names and values of a 2.0
/// request's 1.0 translation may take. Ordinary 2.0 requests expand about
/// 3x (measured on tiny series, the worst of the usual shapes); one long
/// symbol referenced by millions of series would expand without limit.
const TRANSLATION_EXPANSION: usize = 4;

/// Reloads on every SIGHUP until shutdown.
async fn reload_on_sighup(app: Arc<App>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!(
            "cannot install the SIGHUP handler; reload with POST /-/reload \
             (--enable-reload-endpoint) or restart"
        );
        return;
    };
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            () = shutdown.cancelled() => return,
        }
        tracing::info!("SIGHUP: reloading the configuration");
        let _ = reload(&app).await;
    }
}

/// Re-reads the configuration and applies its replicas, after the reload
/// under way if there is one. A file that does not parse or validate, or a
/// replica whose client cannot be built, is refused with the reason logged:
/// the running configuration stays as it was and
/// `walrelay_config_last_reload_successful` is 0 until a reload succeeds.
async fn reload(app: &App) -> Result<Changes, ReloadError> {
    let _turn = app.reload.gate.lock().await;
    reload_now(app).await
}

/// [`reload`], for a caller that holds the gate.
async fn reload_now(app: &App) -> Result<Changes, ReloadError> {
    let result = try_reload(app).await;
    // The ingest credentials files are re-read by themselves when they
    // change; checked here too, so a reload reports one that went bad.
    app.ingest.auth.refresh();
    let ok = result.is_ok();
    metrics::gauge!("walrelay_config_last_reload_successful").set(if ok { 1.0 } else { 0.0 });
    metrics::counter!("walrelay_config_reloads_total", "result" => if ok { "success" } else { "failure" })
        .increment(1);
    match &result {
        Ok(c) => {
            metrics::gauge!("walrelay_config_last_reload_success_timestamp_seconds")
                .set(crate::types::now_ms() as f64 / 1000.0);
            tracing::info!(added = ?c.added, removed = ?c.removed, changed = ?c.changed,
                unchanged = c.unchanged.len(), "configuration reloaded");
        }
        Err(e) => tracing::error!(error = %e,
            "configuration reload refused; the running configuration is kept"),
    }
    result
}

async fn try_reload(app: &App) -> Result<Changes, ReloadError> {
    let Some(source) = app.reload.source.clone() else {
        return Err(ReloadError::NoSource);
    };
    let config = tokio::task::spawn_blocking(move || source()).await??;
    let changes = app
        .fleet
        .apply(ShipperConfig::all(&config))
        .await
        .map_err(ReloadError::Apply)?;
    let mut running = app.reload.running.lock().unwrap_or_else(|p| p.into_inner());
    if restart_only(&running) != restart_only(&config) {
        tracing::warn!(
            "settings other than the replicas and their send settings changed; \
             they take effect at the next restart"
        );
    }
    *running = config;
    Ok(changes)
}

/// The settings a reload does not apply, as one comparable string (no
/// secrets: the configuration holds file names, not their contents).
fn restart_only(c: &ServeConfig) -> String {
    let mut c = c.clone();
    c.replicas.clear();
    c.max_samples_per_send = 0;
    c.max_bytes_per_send = 0;
    c.send_timeout = Duration::ZERO;
    c.retry_min_backoff = Duration::ZERO;
    c.retry_max_backoff = Duration::ZERO;
    c.new_replica_start = StartAt::Head;
    format!("{c:?}")
}

/// `wal/` and `checkpoints/` are created without syncing the directory that
/// holds them, and sled 0.34 writes its `conf` file without fsync and never
/// syncs a directory: until that is done, a power loss can take the whole log
/// and every replica's position with it, or leave a torn `conf` that sled
/// refuses to open. Done once at startup, before anything is acknowledged.
fn make_durable(
    data_dir: &std::path::Path,
    checkpoints_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let sync = |p: &std::path::Path| {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("fsync {}", p.display()))
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
) -> anyhow::Result<()> {
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
        let backfill = cursor.backfill.as_ref();
        let passed = [
            cursor.delivered,
            cursor.inflight.as_ref().map(|i| i.end),
            backfill.map(|b| b.to),
            backfill.and_then(|b| b.inflight.as_ref()).map(|i| i.end),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
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
        tracing::warn!(file = %p.display(), "removed an empty segment left by a crash");
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
        let extent = wal.extent();
        metrics::gauge!("walrelay_wal_bytes").set(extent.bytes as f64);
        metrics::gauge!("walrelay_wal_segments").set(extent.segments as f64);
        metrics::gauge!("walrelay_wal_first_seq").set(extent.first_seq as f64);
        metrics::gauge!("walrelay_wal_head_seq").set(extent.end_seq as f64);
        for r in &fleet.states() {
            let s = r.status(extent.end_seq, lag_bytes(&wal, r.low_water()));
            let name = r.name.clone();
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

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoints {
    /// Everything: the main listener.
    All,
    /// Metrics, health, readiness and status only: `--admin-listen`, plain
    /// HTTP without credentials for probes and scrapers that hold no client
    /// certificate.
    Admin,
}

/// The bounds of one listener's connections.
#[derive(Debug, Clone, Copy)]
struct ListenerLimits {
    /// `listener` label of the connection metrics.
    label: &'static str,
    max_connections: usize,
    /// 0: none.
    max_connections_per_ip: usize,
    /// hyper's header read timeout for HTTP/1 (the whole head, and a new
    /// or idle keep-alive connection's first bytes), the TLS handshake's,
    /// and the idle deadline of an HTTP/2 connection.
    header_read_timeout: Duration,
    /// Longest a graceful shutdown waits for open requests.
    grace: Duration,
}

/// Connections the admin address holds at once: probes and scrapes need a
/// few; the cap keeps a flood of it from taking the descriptors the main
/// address needs, and the main address' cap from starving it.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// HTTP/2 streams one connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 64;

/// Descriptors the relay needs besides its listeners' connections
/// (segments, checkpoints, replica connections, the runtime): what the
/// open-files warning at startup leaves aside.
const OWN_FILES: u64 = 128;

/// Warns when the listeners' connection caps and the relay's own files may
/// not fit in the soft limit of open files: accepts would then fail with
/// EMFILE before the caps apply.
fn warn_if_files_short(config: &ServeConfig) {
    let admin = if config.admin_listen.is_some() {
        ADMIN_MAX_CONNECTIONS
    } else {
        0
    };
    let needed = (config.max_connections + admin) as u64 + OWN_FILES;
    if let Some(limit) = crate::connections::open_files_limit() {
        if limit < needed {
            tracing::warn!(
                open_files_limit = limit,
                needed,
                max_connections = config.max_connections,
                "the open-files limit (ulimit -n) is below --max-connections plus what the \
                 relay needs for itself: raise it or lower --max-connections"
            );
        }
    }
}

async fn serve_http(
    listener: TcpListener,
    endpoints: Endpoints,
    tls: Option<Arc<ServerTls>>,
    app: Arc<App>,
    shutdown: CancellationToken,
    limits: ListenerLimits,
) {
    let connections = ConnectionLimit::new(
        limits.label,
        limits.max_connections,
        limits.max_connections_per_ip,
    );
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // A peer that stops answering pings is dropped; one that answers but
    // sends no request is closed by the idle deadline in `serve_connection`.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Beyond a cap: closed at once (dropped), before any TLS work.
        let Ok(admitted) = connections.admit(peer.ip()) else {
            continue;
        };
        let conn = Conn {
            app: Arc::clone(&app),
            endpoints,
            builder: builder.clone(),
            shutdown: shutdown.clone(),
            idle: limits.header_read_timeout,
        };
        // Taken per connection: a replaced certificate is seen by the next
        // connection (the files are checked at most once a second).
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _admitted = admitted;
            let Some(acceptor) = acceptor else {
                // Plain connections speak HTTP/1 only (see `Conn`).
                conn.serve(stream, false).await;
                return;
            };
            // The handshake timeout also bounds a client that connects and
            // sends nothing.
            let timeout = limits.header_read_timeout;
            let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // Debug only: scanners and clients without a
                    // certificate would flood the log; the counter shows it.
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    metrics::counter!("walrelay_tls_handshake_failures_total").increment(1);
                    return;
                }
                Err(_) => {
                    metrics::counter!("walrelay_tls_handshake_failures_total").increment(1);
                    return;
                }
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            conn.serve(stream, h2).await;
        });
    }
    drop(listener);
    if endpoints == Endpoints::All {
        tracing::info!("shutting down: no new connections; finishing open requests");
    }
    if tokio::time::timeout(limits.grace, connections.all_closed())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within the shutdown timeout");
    }
}

/// What one connection is served with.
///
/// HTTP/2 is served only where TLS ALPN chose it: remote-write senders
/// (Prometheus, vmagent, the OpenTelemetry Collector) speak HTTP/1.1 on
/// plain connections, and telling the two apart on a plain connection
/// meant reading its first bytes with no deadline of hyper's. A plain
/// connection that sends the HTTP/2 preface is refused by the HTTP/1
/// parser and closed.
struct Conn {
    app: Arc<App>,
    endpoints: Endpoints,
    builder: auto::Builder<TokioExecutor>,
    shutdown: CancellationToken,
    /// How long an HTTP/2 connection may go without a request in
    /// progress (the first one included) before it is closed.
    idle: Duration,
}

impl Conn {
    async fn serve<I>(self, io: I, h2: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            app,
            endpoints,
            builder,
            shutdown,
            idle,
        } = self;
        let activity = Activity::new();
        let svc = {
            let activity = Arc::clone(&activity);
            service_fn(move |req| {
                let app = Arc::clone(&app);
                let active = activity.begin();
                async move {
                    let _active = active;
                    Ok::<_, Infallible>(route(&app, endpoints, req).await)
                }
            })
        };
        // The protocol is decided here, so hyper does not sniff it (its
        // header read timeout then runs from the connection's start).
        let builder = if h2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        };
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        // hyper closes an idle HTTP/1 connection itself, at its header
        // read timeout.
        let idle_h2 = async {
            if h2 {
                activity.idle_for(idle).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let bound = tokio::select! {
            _ = conn.as_mut() => return,
            () = shutdown.cancelled() => None,
            () = idle_h2 => {
                metrics::counter!("walrelay_http2_idle_closed_total").increment(1);
                Some(idle)
            }
        };
        // GOAWAY for HTTP/2; an HTTP/1 connection finishes the request in
        // progress, if any, and closes. At shutdown, the listener's grace
        // bounds the wait; an idle connection gets one more deadline to
        // finish before it is dropped.
        conn.as_mut().graceful_shutdown();
        match bound {
            Some(b) => {
                let _ = tokio::time::timeout(b, conn).await;
            }
            None => {
                let _ = conn.await;
            }
        }
    }
}

/// The endpoints that only read, answered for GET and HEAD only.
const READ_ONLY: &[&str] = &["/metrics", "/-/healthy", "/-/ready", "/api/v1/status"];

/// 405 with `Allow` for another method on a read-only endpoint, as ingest
/// answers a method other than POST.
fn read_only_method(req: &Request<Incoming>) -> Option<HttpResponse> {
    if !READ_ONLY.contains(&req.uri().path())
        || matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD)
    {
        return None;
    }
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} not allowed; use GET", req.method()),
    );
    r.headers_mut()
        .insert("Allow", HeaderValue::from_static("GET, HEAD"));
    Some(r)
}

async fn route(app: &App, endpoints: Endpoints, req: Request<Incoming>) -> HttpResponse {
    if let Some(refused) = read_only_method(&req) {
        return refused;
    }
    match req.uri().path() {
        "/api/v1/write" | "/" if endpoints == Endpoints::Admin => text(
            StatusCode::NOT_FOUND,
            "the admin address serves GET /metrics, /-/healthy, /-/ready and /api/v1/status only",
        ),
        "/api/v1/write" => app.ingest.handle(req).await,
        "/metrics" => {
            let mut text = app.metrics.render();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            let states = app.fleet.states();
            text.push_str(&crate::metrics::render_replica_counters(
                states
                    .iter()
                    .map(|s| (s.name.as_str(), s.rate_limited_seconds())),
            ));
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/-/healthy" => {
            if app.ingest.committer.writer_failed() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "log writer failed (fsync); restart to recover",
                )
            } else if app.checkpoints.failed() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "checkpoint store failed (fsync); restart to recover",
                )
            } else {
                text(StatusCode::OK, "walrelay is healthy")
            }
        }
        "/-/ready" => {
            if app.ready.load(Ordering::Relaxed) && !app.ingest.committer.writer_failed() {
                text(StatusCode::OK, "walrelay is ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "walrelay is not ready")
            }
        }
        "/api/v1/status" => status(app),
        "/-/reload" => reload_endpoint(app, endpoints, &req).await,
        "/" => text(
            StatusCode::OK,
            "walrelay: POST /api/v1/write, /-/reload; GET /metrics, /-/healthy, /-/ready, /api/v1/status",
        ),
        other => text(StatusCode::NOT_FOUND, format!("no such endpoint: {other}")),
    }
}

/// `POST /-/reload`, as Prometheus' with `--web.enable-lifecycle`: off
/// unless `--enable-reload-endpoint` (403), never on the admin address,
/// which has no credentials (404); the credentials ingest asks for (401;
/// client certificates were checked at the handshake); one reload at a time
/// and one a second (429 with `Retry-After`). Then 200 with the changes, or
/// 500 with a summary of why it was refused (the running configuration is
/// kept; the reason is in the log).
async fn reload_endpoint(app: &App, endpoints: Endpoints, req: &Request<Incoming>) -> HttpResponse {
    if endpoints == Endpoints::Admin {
        return text(
            StatusCode::NOT_FOUND,
            "the admin address does not serve /-/reload: it asks for no credentials",
        );
    }
    if !app.reload.endpoint_enabled {
        return text(
            StatusCode::FORBIDDEN,
            "POST /-/reload is off: start the relay with --enable-reload-endpoint, or reload with SIGHUP",
        );
    }
    if req.method() != hyper::Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST /-/reload");
        r.headers_mut()
            .insert("Allow", HeaderValue::from_static("POST"));
        return r;
    }
    if let Err(denied) = app.ingest.auth.check(req.headers()).await {
        return app.ingest.unauthorized(denied);
    }
    let too_soon = |why: &str| {
        let mut r = text(StatusCode::TOO_MANY_REQUESTS, why);
        r.headers_mut()
            .insert("Retry-After", HeaderValue::from_static("1"));
        r
    };
    let Ok(mut last) = app.reload.gate.try_lock() else {
        return too_soon("a reload is under way; retry later");
    };
    if last.is_some_and(|t| t.elapsed() < RELOAD_ENDPOINT_INTERVAL) {
        return too_soon("at most one reload a second; retry later");
    }
    let result = reload_now(app).await;
    *last = Some(Instant::now());
    match result {
        Ok(changes) => {
            let mut r = Response::new(Full::new(Bytes::from(
                serde_json::json!({ "status": "success", "replicas": changes }).to_string(),
            )));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "reload refused, running configuration kept: {}; the reason is in the relay's log",
                e.summary()
            ),
        ),
    }
}

#[derive(serde::Serialize)]
struct WalStatus {
    dir: PathBuf,
    first_seq: u64,
    head_seq: u64,
    segments: usize,
    bytes: u64,
    max_disk_bytes: u64,
    writer_failed: bool,
}

fn status(app: &App) -> HttpResponse {
    let extent = app.wal.extent();
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "instance": app.instance,
        "wal": WalStatus {
            dir: app.wal.dir().to_path_buf(),
            first_seq: extent.first_seq,
            head_seq: extent.end_seq,
            segments: extent.segments,
            bytes: extent.bytes,
            max_disk_bytes: app.max_disk_bytes,
            writer_failed: app.ingest.committer.writer_failed(),
        },
        "recovery": app.recovery,
        "replicas": app.fleet.states().iter()
            .map(|r| r.status(extent.end_seq, lag_bytes(&app.wal, r.low_water())))
            .collect::<Vec<_>>(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
