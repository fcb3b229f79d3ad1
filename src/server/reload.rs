//! Reloading the configuration while the relay runs: on SIGHUP, and by
//! `POST /-/reload` ([`super::routes`]) when it is enabled. Reloads run one
//! at a time; a refused one keeps the running configuration.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::App;
use crate::config::{ConfigError, ServeConfig};
use crate::fleet::{Changes, ShipperConfig};
use crate::types::StartAt;

/// Reads the configuration again for a reload (flags and environment as at
/// startup, the file as it is now).
pub type ReloadSource = Arc<dyn Fn() -> Result<ServeConfig, ConfigError> + Send + Sync>;

/// What a reload needs: where the configuration comes from, and the one in
/// force (to tell which changes need a restart).
pub(super) struct Reload {
    pub(super) source: Option<ReloadSource>,
    pub(super) running: Mutex<ServeConfig>,
    /// `--enable-reload-endpoint`: `POST /-/reload` is served (with the
    /// ingest credentials) on the main address.
    pub(super) endpoint_enabled: bool,
    /// Held by the reload under way, so reloads run one at a time; it holds
    /// when the endpoint last finished one, for [`RELOAD_ENDPOINT_INTERVAL`].
    pub(super) gate: tokio::sync::Mutex<Option<Instant>>,
}

/// Least time between two reloads by `POST /-/reload`: a reload re-reads
/// every file and may restart shippers, and a client that may reload must
/// not be able to keep the relay doing only that. SIGHUP is not limited
/// (it needs the pod), only serialised with the others.
pub(super) const RELOAD_ENDPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Why a reload was refused. The whole reason (which never holds a secret:
/// URLs are redacted, a file that does not parse is named by its line) goes
/// to the log; an HTTP client gets [`ReloadError::summary`].
#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadError {
    #[error("this relay was started without a configuration to reload")]
    NoSource,
    #[error("reading the configuration: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Apply(crate::fleet::FleetError),
}

impl ReloadError {
    /// What `POST /-/reload` answers: which file or setting, the line of a
    /// file that does not parse, no text of the configuration.
    pub(super) fn summary(&self) -> String {
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

/// Reloads on every SIGHUP until shutdown.
pub(super) async fn reload_on_sighup(app: Arc<App>, shutdown: CancellationToken) {
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
pub(super) async fn reload_now(app: &App) -> Result<Changes, ReloadError> {
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
    c.batch_linger = Duration::ZERO;
    c.send_timeout = Duration::ZERO;
    c.retry_min_backoff = Duration::ZERO;
    c.retry_max_backoff = Duration::ZERO;
    c.new_replica_start = StartAt::Head;
    format!("{c:?}")
}
