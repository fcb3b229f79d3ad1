//! `walrelay serve` settings: command-line flags, `WALRELAY_*` environment
//! variables and an optional TOML file, in that order of precedence, over
//! defaults that work out of the box.
//!
//! Every setting is one field of [`ServeArgs`] (flag and environment variable,
//! via clap) and the same name in snake_case in the TOML file. Replicas are
//! `--replica NAME=URL` (repeatable, or `WALRELAY_REPLICA=a=URL,b=URL`) or
//! `[[replica]]` tables with `name`, `url` and the per-replica settings
//! (`protocol`, rate limits: file only); flags replace the file's list (a
//! replica given as a flag speaks 1.0 and is unlimited).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use wal_format::Compression;

use crate::auth::ReplicaAuthConfig;
use crate::tls::{ClientTlsOptions, ServerTlsFiles};
use crate::types::{
    parse_statuses, redact_url, CatchUp, FullPolicy, ReplicaProtocol, Shards, StartAt, StatusPolicy,
};

/// Default `--max-decoded-bytes`: vmagent's default cap. Senders send far
/// less (Prometheus ~0.5 MiB, the OpenTelemetry Collector up to ~3 MB per
/// request), and each allowed byte is memory a request may hold.
pub const DEFAULT_MAX_DECODED_BYTES: u64 = 32 << 20;

/// Default `--max-inflight-decoded-bytes`: with validation's working memory
/// on top (see `docs/configuration.md`, "Memory") and the relay's own base,
/// it fits the StatefulSet's 1 GiB memory limit, and holds five maximal
/// requests (16 MiB body + 32 MiB decoded) or hundreds of typical ones at
/// once.
pub const DEFAULT_MAX_INFLIGHT_DECODED_BYTES: u64 = 256 << 20;

/// Default `--max-connections`: as many as `--max-concurrent-requests`'
/// default, so each request slot can have a connection of its own (HTTP/1
/// carries one request at a time), and with the admin address' 64 and the
/// relay's own files still under the common soft limit of 1024 open files.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Errors in the configuration: each names the setting and the bad value,
/// never a secret: URLs are shown without their userinfo, query and
/// fragment ([`redact_url`]), and a file that does not parse is shown by
/// its line and column, not by its text (which may hold a header value).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML file cannot be read (missing, no permission).
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML file does not parse, or a key has the wrong type or is
    /// unknown. `message` is the parser's, with any value it quotes left
    /// out ([`toml_message`]).
    #[error("config file {path} line {line} column {column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A setting has a bad value.
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

impl ConfigError {
    /// What an HTTP client is told of this error (a refused `POST
    /// /-/reload`): which file or setting, and the line of a file that does
    /// not parse, but no value from the configuration. The whole reason
    /// goes to the log.
    pub fn summary(&self) -> String {
        match self {
            ConfigError::Read { path, .. } => {
                format!("cannot read the config file {}", path.display())
            }
            ConfigError::Parse { path, line, .. } => format!(
                "the config file {} does not parse (line {line})",
                path.display()
            ),
            ConfigError::Invalid { setting, .. } => format!("setting {setting} is invalid"),
        }
    }
}

/// `level` if it is from `lowest` to 19 (levels 20 and up need far more
/// memory, for little more), else `setting`'s error saying what is.
fn level_within(
    setting: &'static str,
    level: i32,
    lowest: i32,
    expected: &str,
) -> Result<i32, ConfigError> {
    if (lowest..=19).contains(&level) {
        Ok(level)
    } else {
        Err(invalid(setting, format!("{level} (expected {expected})")))
    }
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

/// Flags of `walrelay serve`. All optional here; defaults are applied in
/// [`ServeArgs::resolve`] after the TOML file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of these settings (flags and environment win).
    #[arg(long, env = "WALRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on for remote-write, metrics, health and status. [default: 0.0.0.0:9201]
    #[arg(long, env = "WALRELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the log, checkpoints and lock (a persistent volume). [default: ./data]
    #[arg(long, env = "WALRELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A replica to ship to, as NAME=URL (repeatable).
    #[arg(long = "replica", env = "WALRELAY_REPLICA", value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// More statuses that make a replica skip a record it refuses, as NAME=STATUS[,STATUS] (repeatable, e.g. a=404). [default: none: only 400, 409 and 422]
    #[arg(
        long = "replica-drop-on-status",
        env = "WALRELAY_REPLICA_DROP_ON_STATUS",
        value_delimiter = ';'
    )]
    pub replica_drop_on_status: Vec<String>,
    /// A fixed number of delivery shards for a replica, as NAME=N (repeatable, e.g. far=8); without it a replica's shards adapt between --min-shards and --max-shards.
    #[arg(
        long = "replica-shards",
        env = "WALRELAY_REPLICA_SHARDS",
        value_delimiter = ','
    )]
    pub replica_shards: Vec<String>,
    /// Fewest delivery shards of a replica whose count adapts. [default: 1]
    #[arg(long, env = "WALRELAY_MIN_SHARDS")]
    pub min_shards: Option<u32>,
    /// Most delivery shards of a replica whose count adapts (each has one request in flight). [default: 16]
    #[arg(long, env = "WALRELAY_MAX_SHARDS")]
    pub max_shards: Option<u32>,
    /// How often an adaptive shard count is re-evaluated. [default: 10s]
    #[arg(long, env = "WALRELAY_SHARD_UPDATE_INTERVAL")]
    pub shard_update_interval: Option<String>,
    /// File holding the bearer token senders must present (none: no auth).
    #[arg(long, env = "WALRELAY_BEARER_TOKEN_FILE")]
    pub bearer_token_file: Option<PathBuf>,
    /// File of `user:bcrypt-hash` lines for basic auth (with a bearer token too, either passes).
    #[arg(long, env = "WALRELAY_BASIC_AUTH_USERS_FILE")]
    pub basic_auth_users_file: Option<PathBuf>,
    /// PEM certificate (chain) to serve HTTPS with; needs --tls-key-file. [default: plain HTTP]
    #[arg(long, env = "WALRELAY_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "WALRELAY_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one (mTLS).
    #[arg(long, env = "WALRELAY_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Second address serving only metrics, health, readiness and status, plain HTTP without auth. [default: unset]
    #[arg(long, env = "WALRELAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Serve POST /-/reload on --listen, to clients with the credentials ingest asks for (never on --admin-listen), at most one reload a second. SIGHUP reloads either way. [default: false]
    #[arg(
        long,
        env = "WALRELAY_ENABLE_RELOAD_ENDPOINT",
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    pub enable_reload_endpoint: Option<bool>,
    /// Largest request body accepted, compressed (e.g. 16MiB). [default: 16MiB]
    #[arg(long, env = "WALRELAY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<String>,
    /// Largest decoded (decompressed) request accepted. [default: 32MiB]
    #[arg(long, env = "WALRELAY_MAX_DECODED_BYTES")]
    pub max_decoded_bytes: Option<String>,
    /// Memory for write requests in flight (body plus declared decoded size); one that does not fit waits up to 1s, then 503. At least max-body-bytes + max-decoded-bytes. [default: 256MiB]
    #[arg(long, env = "WALRELAY_MAX_INFLIGHT_DECODED_BYTES")]
    pub max_inflight_decoded_bytes: Option<String>,
    /// Requests handled at once; more are answered 503. [default: 512]
    #[arg(long, env = "WALRELAY_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Open connections to --listen at once; more are accepted and closed at once (--admin-listen has its own 64). [default: 512]
    #[arg(long, env = "WALRELAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections to --listen from one client IP address at once; more are closed. 0 = no limit but --max-connections. [default: 0]
    #[arg(long, env = "WALRELAY_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Basic-auth passwords checked (bcrypt) at once; a request needing one more is answered 503. [default: the number of CPU cores]
    #[arg(long, env = "WALRELAY_MAX_CONCURRENT_PASSWORD_CHECKS")]
    pub max_concurrent_password_checks: Option<usize>,
    /// Most series in one request; more is answered 413. 0 = unlimited. [default: 0]
    #[arg(long, env = "WALRELAY_MAX_SERIES_PER_REQUEST")]
    pub max_series_per_request: Option<usize>,
    /// Most labels of one series; more is answered 400. 0 = unlimited. [default: 0]
    #[arg(long, env = "WALRELAY_MAX_LABELS_PER_SERIES")]
    pub max_labels_per_series: Option<usize>,
    /// Longest label name in bytes; longer is answered 400. 0 = unlimited. [default: 0]
    #[arg(long, env = "WALRELAY_MAX_LABEL_NAME_LENGTH")]
    pub max_label_name_length: Option<usize>,
    /// Longest label value in bytes; longer is answered 400. 0 = unlimited. [default: 0]
    #[arg(long, env = "WALRELAY_MAX_LABEL_VALUE_LENGTH")]
    pub max_label_value_length: Option<usize>,
    /// Longest a client may take to send a request's head; then the connection is closed. [default: 30s]
    #[arg(long, env = "WALRELAY_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<String>,
    /// Longest a client may take to send a request's body; then 408. [default: 60s]
    #[arg(long, env = "WALRELAY_BODY_READ_TIMEOUT")]
    pub body_read_timeout: Option<String>,
    /// Disk budget for the log (e.g. 20GiB); 0 means no budget. [default: 0]
    #[arg(long, env = "WALRELAY_MAX_DISK_BYTES")]
    pub max_disk_bytes: Option<String>,
    /// Delete segments older than this even if a replica still needs them
    /// (e.g. 72h; counted as dropped); unset means keep. [default: unset]
    #[arg(long, env = "WALRELAY_RETENTION")]
    pub retention: Option<String>,
    /// What to do when the disk budget is reached. [default: block]
    #[arg(long, env = "WALRELAY_FULL_POLICY", value_enum)]
    pub full_policy: Option<FullPolicy>,
    /// Size at which a segment is sealed and a new one started. [default: 128MiB]
    #[arg(long, env = "WALRELAY_SEGMENT_BYTES")]
    pub segment_bytes: Option<String>,
    /// Compression of log frames: zstd or none. [default: zstd]
    #[arg(long, env = "WALRELAY_COMPRESSION")]
    pub compression: Option<String>,
    /// zstd level for log frames under load (1 is fast and already pays).
    /// [default: 1]
    #[arg(long, env = "WALRELAY_ZSTD_LEVEL")]
    pub zstd_level: Option<i32>,
    /// Highest zstd level for log frames: the writer climbs from
    /// --zstd-level towards it while compressing takes under 0.5% of a
    /// core (a light load), and drops back when it takes more; at or below
    /// --zstd-level, one level always. [default: 6]
    #[arg(long, env = "WALRELAY_ZSTD_MAX_LEVEL")]
    pub zstd_max_level: Option<i32>,
    /// A segment holding records is sealed at the first write after it has
    /// been the active one this long, so that it can be repacked (0s: only
    /// by size). [default: 5m]
    #[arg(long, env = "WALRELAY_SEGMENT_MAX_AGE")]
    pub segment_max_age: Option<String>,
    /// zstd level at which sealed segments that replicas still need are
    /// rewritten in large frames, in the background (0: never). [default: 6]
    #[arg(long, env = "WALRELAY_REPACK_ZSTD_LEVEL")]
    pub repack_zstd_level: Option<i32>,
    /// Most samples coalesced into one request to a replica. [default: 20000]
    #[arg(long, env = "WALRELAY_MAX_SAMPLES_PER_SEND")]
    pub max_samples_per_send: Option<u64>,
    /// Most decoded bytes coalesced into one request to a replica. [default: 8MiB]
    #[arg(long, env = "WALRELAY_MAX_BYTES_PER_SEND")]
    pub max_bytes_per_send: Option<String>,
    /// How long a request to a replica below the send limits waits for more records (0s: sent at once). [default: 100ms]
    #[arg(long, env = "WALRELAY_BATCH_LINGER")]
    pub batch_linger: Option<String>,
    /// A request to a replica not answered within this is slow: later ones are made smaller; it is given up after 4 times this. [default: 30s]
    #[arg(long, env = "WALRELAY_SEND_TIMEOUT")]
    pub send_timeout: Option<String>,
    /// First retry delay after a failed send. [default: 100ms]
    #[arg(long, env = "WALRELAY_RETRY_MIN_BACKOFF")]
    pub retry_min_backoff: Option<String>,
    /// Longest retry delay (Retry-After is honoured up to this). [default: 30s]
    #[arg(long, env = "WALRELAY_RETRY_MAX_BACKOFF")]
    pub retry_max_backoff: Option<String>,
    /// Where a replica with no stored position starts: head or oldest. [default: head]
    #[arg(long, env = "WALRELAY_NEW_REPLICA_START", value_enum)]
    pub new_replica_start: Option<StartAt>,
    /// Longest a graceful shutdown (SIGTERM) waits for in-flight work. [default: 20s]
    #[arg(long, env = "WALRELAY_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Log format: text or json. [default: text]
    #[arg(long, env = "WALRELAY_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// This relay's name in its metrics and status (one per pod). [default: $HOSTNAME, else the machine's hostname]
    #[arg(long, env = "WALRELAY_INSTANCE_NAME")]
    pub instance_name: Option<String>,
}

/// One `[[replica]]` table of the TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReplica {
    name: String,
    url: String,
    max_samples_per_second: Option<u64>,
    max_bytes_per_second: Option<toml::Value>,
    /// `"1.0"` or `"2.0"`; a value so that the error can name the replica.
    protocol: Option<toml::Value>,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_server_name: Option<String>,
    #[serde(default)]
    tls_insecure_skip_verify: bool,
    bearer_token_file: Option<PathBuf>,
    basic_auth_username: Option<String>,
    basic_auth_password_file: Option<PathBuf>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    timeout: Option<String>,
    /// `"in-order"` or `"live-first"`.
    catch_up: Option<String>,
    /// Lag (a duration) past which a live-first replica splits.
    live_first_after: Option<String>,
    /// Statuses that refuse a record's data, on top of 400, 409 and 422.
    drop_on_status: Option<Vec<u16>>,
    /// A fixed number of delivery shards.
    shards: Option<u32>,
    /// Bounds of an adaptive number of shards.
    min_shards: Option<u32>,
    max_shards: Option<u32>,
}

/// The TOML file: the same settings, snake_case.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    replica: Vec<FileReplica>,
    replica_drop_on_status: Option<Vec<String>>,
    replica_shards: Option<Vec<String>>,
    min_shards: Option<u32>,
    max_shards: Option<u32>,
    shard_update_interval: Option<String>,
    bearer_token_file: Option<PathBuf>,
    basic_auth_users_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
    admin_listen: Option<SocketAddr>,
    enable_reload_endpoint: Option<bool>,
    max_body_bytes: Option<toml::Value>,
    max_decoded_bytes: Option<toml::Value>,
    max_inflight_decoded_bytes: Option<toml::Value>,
    max_concurrent_requests: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_concurrent_password_checks: Option<usize>,
    max_series_per_request: Option<usize>,
    max_labels_per_series: Option<usize>,
    max_label_name_length: Option<usize>,
    max_label_value_length: Option<usize>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    max_disk_bytes: Option<toml::Value>,
    retention: Option<String>,
    full_policy: Option<FullPolicy>,
    segment_bytes: Option<toml::Value>,
    compression: Option<String>,
    zstd_level: Option<i32>,
    zstd_max_level: Option<i32>,
    segment_max_age: Option<String>,
    repack_zstd_level: Option<i32>,
    max_samples_per_send: Option<u64>,
    max_bytes_per_send: Option<toml::Value>,
    batch_linger: Option<String>,
    send_timeout: Option<String>,
    retry_min_backoff: Option<String>,
    retry_max_backoff: Option<String>,
    new_replica_start: Option<StartAt>,
    shutdown_timeout: Option<String>,
    log_format: Option<String>,
    instance_name: Option<String>,
}

/// A replica to ship to.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    pub name: String,
    pub url: String,
    /// Most samples delivered per second; 0 is unlimited. Only settable in
    /// the TOML file's `[[replica]]` tables.
    pub max_samples_per_second: u64,
    /// Most decoded bytes delivered per second; 0 is unlimited.
    pub max_bytes_per_second: u64,
    pub protocol: ReplicaProtocol,
    pub tls: ClientTlsOptions,
    pub auth: Option<ReplicaAuthConfig>,
    /// Extra headers sent with every request.
    pub headers: Vec<(String, String)>,
    /// Overrides `send_timeout` for this replica.
    pub timeout: Option<Duration>,
    /// In order (default) or live-first after an outage.
    pub catch_up: CatchUp,
    /// Which answers make the shipper skip a record ([`crate::ship::policy`]).
    pub status_policy: StatusPolicy,
    /// How many shards deliver its live stream.
    pub shards: Shards,
}

impl ReplicaConfig {
    /// The URL without its userinfo, query and fragment, for logs, status
    /// and errors ([`redact_url`]).
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// Debug output names the replica and shows its URL redacted and only the
/// names of its headers: a configuration printed for debugging must not
/// carry a password, an API key in a query or a header's value.
impl std::fmt::Debug for ReplicaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("name", &self.name)
            .field("url", &self.display_url())
            .field("max_samples_per_second", &self.max_samples_per_second)
            .field("max_bytes_per_second", &self.max_bytes_per_second)
            .field("protocol", &self.protocol)
            .field("tls", &self.tls)
            .field("auth", &self.auth)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("catch_up", &self.catch_up)
            .field("status_policy", &self.status_policy)
            .finish()
    }
}

/// The resolved settings of `walrelay serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub replicas: Vec<ReplicaConfig>,
    pub bearer_token_file: Option<PathBuf>,
    pub basic_auth_users_file: Option<PathBuf>,
    /// HTTPS on the main listener.
    pub tls: Option<ServerTlsFiles>,
    pub admin_listen: Option<SocketAddr>,
    /// `POST /-/reload` is served on the main address (with the ingest
    /// credentials); off by default.
    pub enable_reload_endpoint: bool,
    pub max_body_bytes: usize,
    pub max_decoded_bytes: usize,
    /// Memory budget of write requests in flight (see
    /// [`crate::ingest::budget`]).
    pub max_inflight_decoded_bytes: u64,
    pub max_concurrent_requests: usize,
    /// Open connections to `listen` at once (see [`crate::connections`]).
    pub max_connections: usize,
    /// Open connections to `listen` from one IP address; 0: no such limit.
    pub max_connections_per_ip: usize,
    /// bcrypt checks at once.
    pub max_concurrent_password_checks: usize,
    pub max_series_per_request: usize,
    pub max_labels_per_series: usize,
    pub max_label_name_length: usize,
    pub max_label_value_length: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_disk_bytes: u64,
    pub retention: Option<Duration>,
    pub full_policy: FullPolicy,
    pub segment_bytes: u64,
    pub compression: Compression,
    pub zstd_level: i32,
    /// At or below `zstd_level`: one level.
    pub zstd_max_level: i32,
    /// None: segments are sealed by size only.
    pub segment_max_age: Option<Duration>,
    /// 0: no repacking.
    pub repack_zstd_level: i32,
    pub max_samples_per_send: u64,
    pub max_bytes_per_send: usize,
    pub batch_linger: Duration,
    pub send_timeout: Duration,
    pub retry_min_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub new_replica_start: StartAt,
    /// How often an adaptive shard count is re-evaluated.
    pub shard_update_interval: Duration,
    pub shutdown_timeout: Duration,
    pub log_json: bool,
    /// Which relay this is, among several in front of the same replicas:
    /// `walrelay_instance_info{instance_name}` and `"instance"` in status.
    pub instance_name: String,
}

/// Parses a byte size: a plain number of bytes, or a number with a suffix
/// KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024).
///
/// # Errors
/// A message naming the bad value.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1048576, 512MiB, 20GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("{s:?}: unknown size unit {other:?}")),
    };
    Ok((n * mult) as u64)
}

fn parse_duration(setting: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        invalid(
            setting,
            format!("{s:?} is not a duration (e.g. 30s, 5m, 72h): {e}"),
        )
    })
}

fn toml_bytes(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::String(s) => Ok(s.clone()),
        other => Err(format!("expected a size, got {other}")),
    }
}

/// Parses `NAME=URL`.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_replica(s: &str) -> Result<ReplicaConfig, String> {
    // The value is not echoed: without a '=' it may be a bare URL with a
    // password in it.
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| "a replica must be NAME=URL (this one has no '=')".to_owned())?;
    let name = name.trim();
    let url = url.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        // A bare URL with a query has a '=' too: its text before it is
        // shown as a URL would be.
        return Err(format!(
            "replica name {:?} must be non-empty letters, digits, '-', '_' or '.'",
            redact_url(name)
        ));
    }
    let shown = redact_url(url);
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("replica {name}: URL {shown:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "replica {name}: URL {shown:?} must be http or https"
        ));
    }
    Ok(ReplicaConfig {
        name: name.to_owned(),
        url: url.to_owned(),
        max_samples_per_second: 0,
        max_bytes_per_second: 0,
        protocol: ReplicaProtocol::V1,
        tls: ClientTlsOptions::default(),
        auth: None,
        headers: Vec::new(),
        timeout: None,
        catch_up: CatchUp::InOrder,
        status_policy: StatusPolicy::default(),
        shards: Shards::default(),
    })
}

/// A `[[replica]]` table: its URL as [`parse_replica`] checks it, then its
/// protocol, rate limits, TLS, credentials, headers and timeout.
fn file_replica(r: &FileReplica) -> Result<ReplicaConfig, String> {
    let mut c = parse_replica(&format!("{}={}", r.name, r.url))?;
    c.max_samples_per_second = r.max_samples_per_second.unwrap_or(0);
    c.max_bytes_per_second = match &r.max_bytes_per_second {
        Some(v) => toml_bytes(v)
            .and_then(|s| parse_bytes(&s))
            .map_err(|m| format!("replica {}: max_bytes_per_second: {m}", c.name))?,
        None => 0,
    };
    c.protocol = match &r.protocol {
        None => Ok(ReplicaProtocol::V1),
        Some(toml::Value::String(s)) => ReplicaProtocol::parse(s),
        // An unquoted 2.0 is a TOML float: say so rather than guess.
        Some(other) => Err(format!(
            "protocol {other} must be a string: \"1.0\" or \"2.0\" (quoted)"
        )),
    }
    .map_err(|m| format!("replica {}: {m}", c.name))?;
    let name = &c.name;
    let access = ReplicaAccess {
        tls: ClientTlsOptions {
            ca_file: r.tls_ca_file.clone(),
            cert_file: r.tls_cert_file.clone(),
            key_file: r.tls_key_file.clone(),
            server_name: r.tls_server_name.clone(),
            insecure_skip_verify: r.tls_insecure_skip_verify,
        },
        bearer_token_file: r.bearer_token_file.clone(),
        basic_auth_username: r.basic_auth_username.clone(),
        basic_auth_password_file: r.basic_auth_password_file.clone(),
    };
    (c.tls, c.auth) = access
        .check(&c.url)
        .map_err(|m| format!("replica {name}: {m}"))?;
    c.headers = r
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    c.timeout = r
        .timeout
        .as_deref()
        .map(|t| parse_duration("replica timeout", t))
        .transpose()
        .map_err(|e| format!("replica {name}: {e}"))?;
    c.catch_up = CatchUp::parse(r.catch_up.as_deref(), r.live_first_after.as_deref())
        .map_err(|m| format!("replica {name}: {m}"))?;
    if let Some(statuses) = &r.drop_on_status {
        c.status_policy = StatusPolicy::with_drop_on(statuses)
            .map_err(|m| format!("replica {name}: drop_on_status: {m}"))?;
    }
    c.shards = match (r.shards, r.min_shards, r.max_shards) {
        (Some(n), None, None) => Shards::adaptive(n, n),
        (Some(_), _, _) => Err("shards (a fixed number) excludes min_shards and max_shards".into()),
        (None, None, None) => Ok(Shards::default()),
        (None, min, max) => {
            let (dmin, dmax) = Shards::default().bounds();
            Shards::adaptive(min.unwrap_or(dmin), max.unwrap_or(dmax))
        }
    }
    .map_err(|m| format!("replica {name}: {m}"))?;
    Ok(c)
}

/// The replica a per-replica flag `arg` (`NAME=VALUE`, spelled `form`)
/// names, and its value.
fn named_replica<'r, 'a>(
    replicas: &'r mut [ReplicaConfig],
    arg: &'a str,
    form: &str,
) -> Result<(&'r mut ReplicaConfig, &'a str), String> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?} must be {form}"))?;
    let name = name.trim();
    let replica = replicas
        .iter_mut()
        .find(|r| r.name == name)
        .ok_or_else(|| format!("{arg:?}: no replica is named {name:?}"))?;
    Ok((replica, value))
}

/// `--replica-shards NAME=N`: replica NAME has N shards, fixed.
fn apply_shards(replicas: &mut [ReplicaConfig], arg: &str) -> Result<(), String> {
    let (replica, n) = named_replica(replicas, arg, "NAME=N")?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{arg:?}: {:?} is not a number of shards", n.trim()))?;
    replica.shards = Shards::adaptive(n, n).map_err(|m| format!("{arg:?}: {m}"))?;
    Ok(())
}

/// How the relay reaches a replica beyond its URL: TLS and credentials, as
/// a `[[replica]]` table's keys or `walrelay wal replay`'s flags of the
/// same names give them.
#[derive(Debug, Clone, Default)]
pub struct ReplicaAccess {
    pub tls: ClientTlsOptions,
    pub bearer_token_file: Option<PathBuf>,
    pub basic_auth_username: Option<String>,
    pub basic_auth_password_file: Option<PathBuf>,
}

impl ReplicaAccess {
    /// The TLS options and credentials of a replica at `url`, checked
    /// together.
    ///
    /// # Errors
    /// A client certificate without its key (or the reverse), TLS settings
    /// for a URL that is not https://, a user name without a password file
    /// (or the reverse), a bearer token and basic auth together, or
    /// credentials both here and in the URL.
    pub fn check(self, url: &str) -> Result<(ClientTlsOptions, Option<ReplicaAuthConfig>), String> {
        let tls = self.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err("tls_cert_file and tls_key_file go together".to_owned());
        }
        if tls != ClientTlsOptions::default() && !url.starts_with("https://") {
            return Err(format!(
                "tls_* settings need an https:// URL, not {}",
                redact_url(url)
            ));
        }
        let auth = match (
            self.bearer_token_file,
            self.basic_auth_username,
            self.basic_auth_password_file,
        ) {
            (None, None, None) => None,
            (Some(token_file), None, None) => Some(ReplicaAuthConfig::Bearer { token_file }),
            (None, Some(username), Some(password_file)) => Some(ReplicaAuthConfig::Basic {
                username,
                password_file,
            }),
            (None, _, _) => {
                return Err(
                    "basic_auth_username and basic_auth_password_file go together".to_owned(),
                )
            }
            (Some(_), _, _) => {
                return Err("bearer_token_file and basic auth exclude each other".to_owned())
            }
        };
        if auth.is_some() && reqwest::Url::parse(url).is_ok_and(|u| !u.username().is_empty()) {
            return Err(
                "credentials both in the URL and in bearer_token_file/basic_auth_*".to_owned(),
            );
        }
        Ok((tls, auth))
    }
}

/// Applies `--replica-drop-on-status NAME=STATUS[,STATUS]` to the replica it
/// names (which must be configured).
fn apply_drop_on_status(replicas: &mut [ReplicaConfig], arg: &str) -> Result<(), String> {
    let (replica, statuses) = named_replica(replicas, arg, "NAME=STATUS[,STATUS]")?;
    let statuses = parse_statuses(statuses)
        .and_then(|list| StatusPolicy::with_drop_on(&list))
        .map_err(|m| format!("{arg:?}: {m}"))?;
    let mut all = replica.status_policy.drop_on().to_vec();
    all.extend_from_slice(statuses.drop_on());
    replica.status_policy =
        StatusPolicy::with_drop_on(&all).map_err(|m| format!("{arg:?}: {m}"))?;
    Ok(())
}

/// A flag's value, else the file's, else `default`.
fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// A size setting (`64MiB`, `1GB`, `4096`): the flag's, else the file's
/// (a string or a number), else `default`.
fn merged_bytes(
    setting: &'static str,
    flag: &Option<String>,
    file: &Option<toml::Value>,
    default: u64,
) -> Result<u64, ConfigError> {
    let s = match (flag, file) {
        (Some(s), _) => s.clone(),
        (None, Some(v)) => toml_bytes(v).map_err(|m| invalid(setting, m))?,
        (None, None) => return Ok(default),
    };
    parse_bytes(&s).map_err(|m| invalid(setting, m))
}

/// A duration setting (`30s`, `5m`): the flag's, else the file's, else
/// `default`.
fn merged_duration(
    setting: &'static str,
    flag: &Option<String>,
    file: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match flag.as_ref().or(file.as_ref()) {
        Some(s) => parse_duration(setting, s),
        None => Ok(default),
    }
}

/// The ingest credentials and TLS files, each checked now so that a bad
/// file stops the start with a clear message (the server reads, and
/// re-reads, them itself).
struct IngestAccess {
    bearer_token_file: Option<PathBuf>,
    basic_auth_users_file: Option<PathBuf>,
    tls: Option<ServerTlsFiles>,
}

/// The memory bounds of a request: its body, its decoded size, and the
/// budget of all requests in flight.
struct RequestMemory {
    max_body_bytes: u64,
    max_decoded_bytes: u64,
    max_inflight_decoded_bytes: u64,
}

impl ServeArgs {
    /// Merges flags/environment with the TOML file and the defaults.
    ///
    /// # Errors
    /// The file cannot be read or parsed, or a setting is invalid.
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let replicas = self.replicas(&file)?;
        let access = self.ingest_access(&file)?;
        let memory = self.request_memory(&file)?;
        let segment_bytes = merged_bytes(
            "segment-bytes",
            &self.segment_bytes,
            &file.segment_bytes,
            128 << 20,
        )?;
        if segment_bytes < 4096 {
            return Err(invalid("segment-bytes", "must be at least 4KiB"));
        }
        let retention = match self.retention.as_ref().or(file.retention.as_ref()) {
            Some(s) => Some(parse_duration("retention", s)?),
            None => None,
        };
        let log_json = self.log_json(&file)?;
        let instance_name = self.instance_name(&file)?;
        let f = &file;
        Ok(ServeConfig {
            listen: pick(
                self.listen,
                f.listen,
                SocketAddr::from(([0, 0, 0, 0], 9201)),
            ),
            data_dir: pick(
                self.data_dir.clone(),
                f.data_dir.clone(),
                PathBuf::from("./data"),
            ),
            replicas,
            bearer_token_file: access.bearer_token_file,
            basic_auth_users_file: access.basic_auth_users_file,
            tls: access.tls,
            admin_listen: self.admin_listen.or(f.admin_listen),
            enable_reload_endpoint: pick(
                self.enable_reload_endpoint,
                f.enable_reload_endpoint,
                false,
            ),
            max_body_bytes: memory.max_body_bytes as usize,
            max_decoded_bytes: memory.max_decoded_bytes as usize,
            max_inflight_decoded_bytes: memory.max_inflight_decoded_bytes,
            max_concurrent_requests: pick(
                self.max_concurrent_requests,
                f.max_concurrent_requests,
                512,
            )
            .max(1),
            max_connections: pick(
                self.max_connections,
                f.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )
            .max(1),
            max_connections_per_ip: pick(self.max_connections_per_ip, f.max_connections_per_ip, 0),
            max_concurrent_password_checks: self
                .max_concurrent_password_checks
                .or(f.max_concurrent_password_checks)
                .unwrap_or_else(crate::auth::default_password_check_limit)
                .max(1),
            max_series_per_request: pick(self.max_series_per_request, f.max_series_per_request, 0),
            max_labels_per_series: pick(self.max_labels_per_series, f.max_labels_per_series, 0),
            max_label_name_length: pick(self.max_label_name_length, f.max_label_name_length, 0),
            max_label_value_length: pick(self.max_label_value_length, f.max_label_value_length, 0),
            header_read_timeout: merged_duration(
                "header-read-timeout",
                &self.header_read_timeout,
                &f.header_read_timeout,
                Duration::from_secs(30),
            )?,
            body_read_timeout: merged_duration(
                "body-read-timeout",
                &self.body_read_timeout,
                &f.body_read_timeout,
                Duration::from_secs(60),
            )?,
            max_disk_bytes: merged_bytes(
                "max-disk-bytes",
                &self.max_disk_bytes,
                &f.max_disk_bytes,
                0,
            )?,
            retention,
            full_policy: pick(self.full_policy, f.full_policy, FullPolicy::Block),
            segment_bytes,
            compression: self.compression(f)?,
            zstd_level: pick(self.zstd_level, f.zstd_level, 1),
            zstd_max_level: self.zstd_max_level(f)?,
            segment_max_age: Some(merged_duration(
                "segment-max-age",
                &self.segment_max_age,
                &f.segment_max_age,
                Duration::from_secs(300),
            )?)
            .filter(|d| !d.is_zero()),
            repack_zstd_level: self.repack_zstd_level(f)?,
            max_samples_per_send: pick(self.max_samples_per_send, f.max_samples_per_send, 20_000)
                .max(1),
            max_bytes_per_send: merged_bytes(
                "max-bytes-per-send",
                &self.max_bytes_per_send,
                &f.max_bytes_per_send,
                8 << 20,
            )?
            .max(1) as usize,
            batch_linger: merged_duration(
                "batch-linger",
                &self.batch_linger,
                &f.batch_linger,
                crate::ship::DEFAULT_LINGER,
            )?,
            send_timeout: merged_duration(
                "send-timeout",
                &self.send_timeout,
                &f.send_timeout,
                Duration::from_secs(30),
            )?,
            retry_min_backoff: merged_duration(
                "retry-min-backoff",
                &self.retry_min_backoff,
                &f.retry_min_backoff,
                Duration::from_millis(100),
            )?,
            retry_max_backoff: merged_duration(
                "retry-max-backoff",
                &self.retry_max_backoff,
                &f.retry_max_backoff,
                Duration::from_secs(30),
            )?,
            new_replica_start: pick(self.new_replica_start, f.new_replica_start, StartAt::Head),
            shard_update_interval: merged_duration(
                "shard-update-interval",
                &self.shard_update_interval,
                &f.shard_update_interval,
                Duration::from_secs(10),
            )?,
            shutdown_timeout: merged_duration(
                "shutdown-timeout",
                &self.shutdown_timeout,
                &f.shutdown_timeout,
                Duration::from_secs(20),
            )?,
            log_json,
            instance_name,
        })
    }

    /// The replicas (the flags' replace the file's), with the statuses
    /// `--replica-drop-on-status` adds; names are unique.
    fn replicas(&self, file: &FileConfig) -> Result<Vec<ReplicaConfig>, ConfigError> {
        let mut replicas = if self.replicas.is_empty() {
            file.replica
                .iter()
                .map(file_replica)
                .collect::<Result<Vec<_>, _>>()
        } else {
            self.replicas.iter().map(|s| parse_replica(s)).collect()
        }
        .map_err(|m| invalid("replica", m))?;
        let drop_on_status = if self.replica_drop_on_status.is_empty() {
            file.replica_drop_on_status.clone().unwrap_or_default()
        } else {
            self.replica_drop_on_status.clone()
        };
        for arg in &drop_on_status {
            apply_drop_on_status(&mut replicas, arg)
                .map_err(|m| invalid("replica-drop-on-status", m))?;
        }
        // The relay-wide bounds apply to every replica without its own.
        let (min, max) = (
            self.min_shards.or(file.min_shards),
            self.max_shards.or(file.max_shards),
        );
        if min.is_some() || max.is_some() {
            let (dmin, dmax) = Shards::default().bounds();
            let bounds = Shards::adaptive(min.unwrap_or(dmin), max.unwrap_or(dmax))
                .map_err(|m| invalid("max-shards", m))?;
            // Not a replica whose table sets its own.
            let own = |name: &str| {
                self.replicas.is_empty()
                    && file.replica.iter().any(|f| {
                        f.name == name
                            && (f.shards.is_some()
                                || f.min_shards.is_some()
                                || f.max_shards.is_some())
                    })
            };
            for r in replicas.iter_mut().filter(|r| !own(&r.name)) {
                r.shards = bounds;
            }
        }
        let replica_shards = if self.replica_shards.is_empty() {
            file.replica_shards.clone().unwrap_or_default()
        } else {
            self.replica_shards.clone()
        };
        for arg in &replica_shards {
            apply_shards(&mut replicas, arg).map_err(|m| invalid("replica-shards", m))?;
        }
        let mut names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid("replica", format!("name {:?} is used twice", w[0])));
        }
        Ok(replicas)
    }

    fn ingest_access(&self, file: &FileConfig) -> Result<IngestAccess, ConfigError> {
        let bearer_token_file = self
            .bearer_token_file
            .clone()
            .or(file.bearer_token_file.clone());
        if let Some(path) = &bearer_token_file {
            read_secret(path)?;
        }
        let basic_auth_users_file = self
            .basic_auth_users_file
            .clone()
            .or(file.basic_auth_users_file.clone());
        if let Some(path) = &basic_auth_users_file {
            crate::auth::read_users(path)
                .map_err(|e| invalid("basic-auth-users-file", e.to_string()))?;
        }
        let tls = server_tls(
            self.tls_cert_file.clone().or(file.tls_cert_file.clone()),
            self.tls_key_file.clone().or(file.tls_key_file.clone()),
            self.tls_client_ca_file
                .clone()
                .or(file.tls_client_ca_file.clone()),
        )?;
        Ok(IngestAccess {
            bearer_token_file,
            basic_auth_users_file,
            tls,
        })
    }

    fn request_memory(&self, file: &FileConfig) -> Result<RequestMemory, ConfigError> {
        let max_decoded_bytes = merged_bytes(
            "max-decoded-bytes",
            &self.max_decoded_bytes,
            &file.max_decoded_bytes,
            DEFAULT_MAX_DECODED_BYTES,
        )?;
        if max_decoded_bytes > wal_format::MAX_RECORD_PAYLOAD as u64 {
            return Err(invalid(
                "max-decoded-bytes",
                format!(
                    "{max_decoded_bytes} is over the log's record limit of {} bytes",
                    wal_format::MAX_RECORD_PAYLOAD
                ),
            ));
        }
        let max_body_bytes = merged_bytes(
            "max-body-bytes",
            &self.max_body_bytes,
            &file.max_body_bytes,
            16 << 20,
        )?;
        let max_inflight_decoded_bytes = merged_bytes(
            "max-inflight-decoded-bytes",
            &self.max_inflight_decoded_bytes,
            &file.max_inflight_decoded_bytes,
            DEFAULT_MAX_INFLIGHT_DECODED_BYTES,
        )?;
        // A request within the limits reserves up to its body plus its
        // decoded size: a smaller budget would refuse it for ever (413), and
        // senders drop what is refused with 413.
        let largest_request = max_body_bytes.saturating_add(max_decoded_bytes);
        if max_inflight_decoded_bytes < largest_request {
            return Err(invalid(
                "max-inflight-decoded-bytes",
                format!(
                    "{max_inflight_decoded_bytes} is less than one request within the limits \
                     may need: max-body-bytes + max-decoded-bytes = {largest_request}"
                ),
            ));
        }
        Ok(RequestMemory {
            max_body_bytes,
            max_decoded_bytes,
            max_inflight_decoded_bytes,
        })
    }

    fn compression(&self, file: &FileConfig) -> Result<Compression, ConfigError> {
        match self
            .compression
            .as_deref()
            .or(file.compression.as_deref())
            .unwrap_or("zstd")
        {
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            other => Err(invalid(
                "compression",
                format!("{other:?} (expected zstd or none)"),
            )),
        }
    }

    /// The repack level: 0 (off) or a zstd level from 1 to 19 (20 and up
    /// need far more memory, for little more).
    fn repack_zstd_level(&self, file: &FileConfig) -> Result<i32, ConfigError> {
        level_within(
            "repack-zstd-level",
            pick(self.repack_zstd_level, file.repack_zstd_level, 6),
            0,
            "0 to turn repacking off, or 1 to 19",
        )
    }

    /// The highest level of the log's chains: 1 to 19, as a repack's.
    fn zstd_max_level(&self, file: &FileConfig) -> Result<i32, ConfigError> {
        level_within(
            "zstd-max-level",
            pick(self.zstd_max_level, file.zstd_max_level, 6),
            1,
            "1 to 19; at or below --zstd-level for one level",
        )
    }

    /// Whether logs are JSON lines (else text).
    fn log_json(&self, file: &FileConfig) -> Result<bool, ConfigError> {
        match self
            .log_format
            .as_deref()
            .or(file.log_format.as_deref())
            .unwrap_or("text")
        {
            "text" => Ok(false),
            "json" => Ok(true),
            other => Err(invalid(
                "log-format",
                format!("{other:?} (expected text or json)"),
            )),
        }
    }

    fn instance_name(&self, file: &FileConfig) -> Result<String, ConfigError> {
        let name = match self.instance_name.as_ref().or(file.instance_name.as_ref()) {
            Some(n) => n.trim().to_owned(),
            None => default_instance_name(),
        };
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(invalid(
                "instance-name",
                format!("{name:?} (expected a non-empty name without control characters)"),
            ));
        }
        Ok(name)
    }
}

/// `$HOSTNAME` (a Kubernetes pod's name, e.g. `walrelay-0`), else the
/// kernel's hostname, else `"walrelay"`: a name is only a label, so a machine
/// without one must not stop the relay.
fn default_instance_name() -> String {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_kernel = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
    };
    from_env
        .filter(|h| !h.trim().is_empty())
        .map(|h| h.trim().to_owned())
        .or_else(from_kernel)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "walrelay".to_owned())
}

/// The listener's TLS files: certificate and key both or neither; a client
/// CA only with them. The files are loaded once here, so a bad one stops
/// the relay at startup with its name.
fn server_tls(
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
) -> Result<Option<ServerTlsFiles>, ConfigError> {
    let files =
        match (cert_file, key_file) {
            (Some(cert_file), Some(key_file)) => ServerTlsFiles {
                cert_file,
                key_file,
                client_ca_file,
            },
            (None, None) if client_ca_file.is_some() => return Err(invalid(
                "tls-client-ca-file",
                "needs --tls-cert-file and --tls-key-file (client certificates are a TLS feature)",
            )),
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(invalid(
                    "tls-key-file",
                    "--tls-cert-file is set but --tls-key-file is not (both or neither)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls-cert-file",
                    "--tls-key-file is set but --tls-cert-file is not (both or neither)",
                ))
            }
        };
    crate::tls::server_config(&files).map_err(|e| invalid("tls-cert-file", e.to_string()))?;
    Ok(Some(files))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| {
        // The error's own display quotes the offending line, which may
        // hold a secret (a header value, a URL's password): only its
        // position is kept.
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let before = text.get(..at).unwrap_or("");
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: before.matches('\n').count() + 1,
            column: before.get(line_start..).map_or(0, |l| l.chars().count()) + 1,
            message: toml_message(e.message()),
        }
    })
}

/// The parser's message without the value it quotes: serde's "invalid
/// type: string \"hunter2\", expected usize" becomes "invalid type: string,
/// expected usize" (a secret typed into the wrong key, or a header value
/// written as a number, must not reach the log). Other messages (syntax,
/// unknown keys) quote no value.
pub fn toml_message(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        let expected = rest.find(", expected").map_or("", |i| &rest[i..]);
        // "string \"x\"", "integer `1`": the kind is the first word; an
        // unknown variant's value is all there is.
        let kind = match prefix {
            "unknown variant " => "",
            _ => rest.split([' ', ',']).next().unwrap_or(""),
        };
        return format!("{prefix}{kind}{expected}").replace(" ,", ",");
    }
    message.to_owned()
}

/// Reads a secret from a file, trimming the trailing newline editors add.
///
/// # Errors
/// The file cannot be read, or is empty.
pub fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        return Err(invalid(
            "bearer-token-file",
            format!("{} is empty", path.display()),
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("12XB").is_err());
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1\"\nsegment_bytes = \"1MiB\"\n[[replica]]\nname = \"a\"\nurl = \"http://x:1/api/v1/write\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.segment_bytes, 1 << 20);
        assert_eq!(c.replicas[0].name, "a");
        assert_eq!(c.full_policy, FullPolicy::Block);
    }

    fn resolve_file(toml: &str) -> Result<ServeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(&path, toml).unwrap();
        ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
    }

    #[test]
    fn small_batches_linger_100ms_unless_told_otherwise() {
        assert_eq!(
            resolve_file("").unwrap().batch_linger,
            Duration::from_millis(100)
        );
        let c = resolve_file("batch_linger = \"0s\"\n").unwrap();
        assert_eq!(c.batch_linger, Duration::ZERO, "0s: sent as soon as read");
        let c = ServeArgs {
            batch_linger: Some("1s".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.batch_linger, Duration::from_secs(1));
        assert!(resolve_file("batch_linger = \"soon\"\n").is_err());
    }

    #[test]
    fn frames_are_written_at_levels_1_to_6_unless_told_otherwise() {
        let c = resolve_file("").unwrap();
        assert_eq!((c.zstd_level, c.zstd_max_level), (1, 6));
        let c = resolve_file("zstd_level = 3\nzstd_max_level = 3\n").unwrap();
        assert_eq!((c.zstd_level, c.zstd_max_level), (3, 3));
        let c = ServeArgs {
            zstd_max_level: Some(9),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.zstd_max_level, 9);
        for bad in ["zstd_max_level = 0\n", "zstd_max_level = 20\n"] {
            let e = resolve_file(bad).unwrap_err().to_string();
            assert!(e.contains("zstd-max-level"), "{e}");
        }
    }

    #[test]
    fn segments_are_sealed_by_age_and_repacked_at_level_6_unless_told_otherwise() {
        let c = resolve_file("").unwrap();
        assert_eq!(c.segment_max_age, Some(Duration::from_secs(300)));
        assert_eq!(c.repack_zstd_level, 6);
        let c = resolve_file("segment_max_age = \"0s\"\nrepack_zstd_level = 0\n").unwrap();
        assert_eq!(c.segment_max_age, None, "0s: by size only");
        assert_eq!(c.repack_zstd_level, 0, "0: no repacking");
        for bad in ["repack_zstd_level = 20\n", "repack_zstd_level = -1\n"] {
            let e = resolve_file(bad).unwrap_err().to_string();
            assert!(e.contains("repack-zstd-level"), "{e}");
        }
    }

    #[test]
    fn replica_tables_take_tls_credentials_headers_and_timeout() {
        let c = resolve_file(
            "[[replica]]\nname = \"a\"\nurl = \"https://x:1/api/v1/write\"\n\
             tls_ca_file = \"/ca.pem\"\ntls_server_name = \"x.example\"\n\
             basic_auth_username = \"u\"\nbasic_auth_password_file = \"/pw\"\n\
             timeout = \"5s\"\n[replica.headers]\nX-Scope-OrgID = \"team\"\n",
        )
        .unwrap();
        let r = &c.replicas[0];
        assert_eq!(r.tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(r.tls.server_name.as_deref(), Some("x.example"));
        assert!(
            matches!(&r.auth, Some(ReplicaAuthConfig::Basic { username, .. }) if username == "u")
        );
        assert_eq!(r.timeout, Some(Duration::from_secs(5)));
        assert_eq!(r.headers, vec![("X-Scope-OrgID".into(), "team".into())]);
    }

    #[test]
    fn no_status_but_400_409_and_422_skips_a_record_unless_the_operator_says_so() {
        let c = resolve_file(
            "[[replica]]\nname = \"a\"\nurl = \"http://x:1/\"\ndrop_on_status = [404]\n\
             [[replica]]\nname = \"b\"\nurl = \"http://y:1/\"\n",
        )
        .unwrap();
        assert_eq!(c.replicas[0].status_policy.drop_on(), &[404]);
        assert_eq!(c.replicas[1].status_policy, StatusPolicy::default());
        assert!(
            !c.replicas[1].status_policy.refuses_data(404),
            "the default never skips on a 404"
        );
        let flags = ServeArgs {
            replicas: vec!["a=http://x:1/".into(), "b=http://y:1/".into()],
            replica_drop_on_status: vec!["b=404,410".into(), "b=500".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(flags.replicas[0].status_policy.drop_on(), &[] as &[u16]);
        assert_eq!(flags.replicas[1].status_policy.drop_on(), &[404, 410, 500]);
    }

    #[test]
    fn a_bad_drop_status_names_the_replica_and_the_status() {
        let e = resolve_file(
            "[[replica]]\nname = \"a\"\nurl = \"http://x:1/\"\ndrop_on_status = [429]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("replica a") && e.contains("429"), "{e}");
        for (arg, needle) in [
            ("c=404", "no replica is named \"c\""),
            ("a=4o4", "\"4o4\""),
            ("a", "NAME=STATUS"),
            ("a=413", "413"),
        ] {
            let e = ServeArgs {
                replicas: vec!["a=http://x:1/".into()],
                replica_drop_on_status: vec![arg.into()],
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("replica-drop-on-status") && e.contains(needle),
                "{arg}: {e}"
            );
        }
    }

    #[test]
    fn bad_replica_tls_and_auth_settings_are_named() {
        let table =
            |extra: &str| format!("[[replica]]\nname = \"a\"\nurl = \"https://x:1/\"\n{extra}");
        let cases = [
            (table("tls_cert_file = \"/c\"\n"), "go together"),
            (table("basic_auth_username = \"u\"\n"), "go together"),
            (
                table("bearer_token_file = \"/t\"\nbasic_auth_username = \"u\"\nbasic_auth_password_file = \"/p\"\n"),
                "exclude each other",
            ),
            (table("timeout = \"soon\"\n"), "not a duration"),
            (table("tls_typo = true\n"), "unknown field"),
            (
                "[[replica]]\nname = \"a\"\nurl = \"http://x:1/\"\ntls_ca_file = \"/ca\"\n".into(),
                "https://",
            ),
        ];
        for (toml, word) in cases {
            let e = resolve_file(&toml).unwrap_err().to_string();
            assert!(e.contains(word), "{toml}: {e}");
        }
    }

    #[test]
    fn tls_cert_and_key_go_together() {
        let args = ServeArgs {
            tls_cert_file: Some("/c.pem".into()),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(
            e.contains("tls-key-file") && e.contains("both or neither"),
            "{e}"
        );
        let args = ServeArgs {
            tls_key_file: Some("/k.pem".into()),
            ..Default::default()
        };
        assert!(args
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("both or neither"));
        let args = ServeArgs {
            tls_client_ca_file: Some("/ca.pem".into()),
            ..Default::default()
        };
        assert!(args
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("needs --tls-cert-file"));
        let args = ServeArgs {
            tls_cert_file: Some("/nonexistent/c.pem".into()),
            tls_key_file: Some("/nonexistent/k.pem".into()),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
    }

    #[test]
    fn a_bad_users_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, "alice:notahash\n").unwrap();
        let args = ServeArgs {
            basic_auth_users_file: Some(users),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(
            e.contains("basic-auth-users-file") && e.contains("line 1"),
            "{e}"
        );
    }

    /// Every secret a test puts in a configuration contains this.
    const SECRET: &str = "s3cret";

    #[test]
    fn a_refused_replica_url_is_named_without_its_password_or_query() {
        for replica in [
            "a=ftp://user:pw-s3cret@x:1/w?api_key=key-s3cret",
            "a=http://user:pw-s3cret@[::1/w?api_key=key-s3cret",
            "http://user:pw-s3cret@x:1/w?api_key=key-s3cret",
        ] {
            let e = ServeArgs {
                replicas: vec![replica.into()],
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("replica:") && !e.contains(SECRET), "{e}");
        }
        let e = resolve_file(
            "[[replica]]\nname = \"a\"\nurl = \"http://u:pw-s3cret@x:1/?k=key-s3cret\"\n\
             tls_ca_file = \"/ca\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("https://") && !e.contains(SECRET), "{e}");
    }

    #[test]
    fn a_file_that_does_not_parse_is_named_by_its_line_not_its_text() {
        let replica = "[[replica]]\nname = \"a\"\nurl = \"http://x:1/\"\n[replica.headers]\n";
        for (toml, line) in [
            // Syntax: an unterminated string.
            (format!("{replica}X-Key = \"hdr-s3cret\n"), 5),
            // Types: a header value written as a number, a string where a
            // number goes.
            (format!("{replica}X-Key = 1234567890\n"), 5),
            ("\nmax_concurrent_requests = \"s3cret\"\n".to_owned(), 2),
            ("full_policy = \"s3cret\"\n".to_owned(), 1),
        ] {
            let e = resolve_file(&toml).unwrap_err();
            let (shown, summary) = (e.to_string(), e.summary());
            assert!(shown.contains(&format!("line {line} ")), "{toml}: {shown}");
            assert!(summary.contains(&format!("line {line}")), "{summary}");
            for text in [&shown, &summary] {
                assert!(
                    !text.contains(SECRET) && !text.contains("1234567890"),
                    "{toml}: {text}"
                );
            }
        }
        // The rest of the parser's message stays: what was expected.
        let e = resolve_file("max_concurrent_requests = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("invalid type: string, expected usize"), "{e}");
        let e = resolve_file("typo = 1\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `typo`"), "{e}");
    }

    #[test]
    fn a_replica_in_debug_output_shows_no_url_secret_and_no_header_value() {
        let c = resolve_file(
            "[[replica]]\nname = \"a\"\nurl = \"http://u:pw-s3cret@x:1/w?k=key-s3cret#f-s3cret\"\n\
             [replica.headers]\nX-Key = \"hdr-s3cret\"\n",
        )
        .unwrap();
        let debug = format!("{c:?}");
        assert!(
            debug.contains("X-Key") && debug.contains("http://x:1/w"),
            "{debug}"
        );
        assert!(!debug.contains(SECRET), "{debug}");
    }

    #[test]
    fn the_reload_endpoint_is_off_unless_asked_for() {
        assert!(
            !ServeArgs::default()
                .resolve()
                .unwrap()
                .enable_reload_endpoint
        );
        assert!(
            resolve_file("enable_reload_endpoint = true\n")
                .unwrap()
                .enable_reload_endpoint
        );
        let flag_off = ServeArgs {
            enable_reload_endpoint: Some(false),
            ..Default::default()
        };
        assert!(!flag_off.resolve().unwrap().enable_reload_endpoint);
    }

    #[test]
    fn replica_tables_take_rate_limits_with_sizes_and_default_to_unlimited() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walrelay.toml");
        std::fs::write(
            &path,
            "[[replica]]\nname = \"a\"\nurl = \"http://x:1/api/v1/write\"\n\
             [[replica]]\nname = \"b\"\nurl = \"http://y:1/api/v1/write\"\n\
             max_samples_per_second = 5000\nmax_bytes_per_second = \"10MiB\"\n\
             [[replica]]\nname = \"c\"\nurl = \"http://z:1/api/v1/write\"\n\
             max_bytes_per_second = 4096\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        let limits: Vec<(u64, u64)> = c
            .replicas
            .iter()
            .map(|r| (r.max_samples_per_second, r.max_bytes_per_second))
            .collect();
        assert_eq!(limits, vec![(0, 0), (5000, 10 << 20), (0, 4096)]);

        std::fs::write(
            &path,
            "[[replica]]\nname = \"b\"\nurl = \"http://y:1/\"\nmax_bytes_per_second = \"fast\"\n",
        )
        .unwrap();
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("replica b: max_bytes_per_second"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let args = ServeArgs {
            replicas: vec!["a=http://x/".into(), "a=http://y/".into()],
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
        let args = ServeArgs {
            replicas: vec!["nourl".into()],
            ..Default::default()
        };
        assert!(args.resolve().unwrap_err().to_string().contains("NAME=URL"));
    }

    #[test]
    fn the_memory_budget_defaults_to_256mib_and_must_hold_one_largest_request() {
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.max_decoded_bytes, 32 << 20);
        assert_eq!(c.max_inflight_decoded_bytes, 256 << 20);
        let c = resolve_file("max_inflight_decoded_bytes = \"1GiB\"\n").unwrap();
        assert_eq!(c.max_inflight_decoded_bytes, 1 << 30);
        // 16 MiB body + 32 MiB decoded = 48 MiB: the least that serves
        // every request within the limits.
        let args = ServeArgs {
            max_inflight_decoded_bytes: Some("48MiB".into()),
            ..Default::default()
        };
        assert_eq!(args.resolve().unwrap().max_inflight_decoded_bytes, 48 << 20);
        let args = ServeArgs {
            max_inflight_decoded_bytes: Some("47MiB".into()),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(
            e.contains("max-inflight-decoded-bytes")
                && e.contains("max-body-bytes + max-decoded-bytes"),
            "{e}"
        );
        let args = ServeArgs {
            max_inflight_decoded_bytes: Some("47MiB".into()),
            max_decoded_bytes: Some("8MiB".into()),
            ..Default::default()
        };
        assert!(
            args.resolve().is_ok(),
            "smaller limits need a smaller budget"
        );
    }

    #[test]
    fn replica_protocol_defaults_to_1_0_and_takes_2_0_from_the_file() {
        let c = resolve_file(
            "[[replica]]\nname = \"a\"\nurl = \"http://x:1/api/v1/write\"\n\
             [[replica]]\nname = \"b\"\nurl = \"http://y:1/api/v1/write\"\nprotocol = \"2.0\"\n",
        )
        .unwrap();
        assert_eq!(c.replicas[0].protocol, ReplicaProtocol::V1);
        assert_eq!(c.replicas[1].protocol, ReplicaProtocol::V2);
        let flags = ServeArgs {
            replicas: vec!["a=http://x/".into()],
            ..Default::default()
        };
        assert_eq!(
            flags.resolve().unwrap().replicas[0].protocol,
            ReplicaProtocol::V1
        );
    }

    #[test]
    fn a_bad_replica_protocol_names_the_replica_and_the_setting() {
        for (value, expect) in [
            ("\"3.0\"", "\"3.0\" is not supported"),
            ("2.0", "must be a string"),
        ] {
            let e = resolve_file(&format!(
                "[[replica]]\nname = \"b\"\nurl = \"http://y:1/\"\nprotocol = {value}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("replica b: protocol"), "{e}");
            assert!(e.contains(expect), "{e}");
        }
    }

    #[test]
    fn catch_up_defaults_to_in_order_and_live_first_takes_a_lag_threshold() {
        let c = resolve_file(
            "[[replica]]\nname = \"a\"\nurl = \"http://x:1/api/v1/write\"\n\
             [[replica]]\nname = \"b\"\nurl = \"http://y:1/api/v1/write\"\ncatch_up = \"live-first\"\n\
             [[replica]]\nname = \"c\"\nurl = \"http://z:1/api/v1/write\"\ncatch_up = \"live-first\"\n\
             live_first_after = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(c.replicas[0].catch_up, CatchUp::InOrder);
        assert_eq!(
            c.replicas[1].catch_up,
            CatchUp::LiveFirst {
                after: crate::types::DEFAULT_LIVE_FIRST_AFTER
            }
        );
        assert_eq!(
            c.replicas[2].catch_up,
            CatchUp::LiveFirst {
                after: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn shards_adapt_by_default_and_take_a_fixed_count_or_bounds_from_tables_flags_and_the_file() {
        let c = resolve_file(
            "min_shards = 2\nmax_shards = 8\nreplica_shards = [\"d=5\"]\n\
             [[replica]]\nname = \"a\"\nurl = \"http://x:1/api/v1/write\"\n\
             [[replica]]\nname = \"b\"\nurl = \"http://y:1/api/v1/write\"\nshards = 4\n\
             [[replica]]\nname = \"c\"\nurl = \"http://z:1/api/v1/write\"\nmax_shards = 16\n\
             [[replica]]\nname = \"d\"\nurl = \"http://w:1/api/v1/write\"\n",
        )
        .unwrap();
        let shards: Vec<Shards> = c.replicas.iter().map(|r| r.shards).collect();
        assert_eq!(
            shards,
            vec![
                Shards::Adaptive { min: 2, max: 8 },
                Shards::Fixed(4),
                // Its own bounds, even when they equal the default's.
                Shards::Adaptive { min: 1, max: 16 },
                Shards::Fixed(5),
            ]
        );
        assert_eq!(c.shard_update_interval, Duration::from_secs(10));
        let plain = ServeArgs {
            replicas: vec!["a=http://x:1/".into(), "b=http://y:1/".into()],
            replica_shards: vec!["b=8".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(plain.replicas[0].shards, crate::types::DEFAULT_SHARDS);
        assert_eq!(plain.replicas[1].shards, Shards::Fixed(8));
    }

    #[test]
    fn bad_shard_settings_name_the_replica_or_the_flag() {
        for (table, expect) in [
            ("shards = 0", "1 <= min (0)"),
            ("shards = 300", "<= 256"),
            ("min_shards = 9\nmax_shards = 4", "min (9) <= max (4)"),
            ("shards = 4\nmax_shards = 8", "excludes min_shards"),
        ] {
            let e = resolve_file(&format!(
                "[[replica]]\nname = \"b\"\nurl = \"http://y:1/\"\n{table}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("replica b:"), "{e}");
            assert!(e.contains(expect), "{e}");
        }
        for (flag, expect) in [
            ("b", "must be NAME=N"),
            ("x=4", "no replica is named \"x\""),
            ("b=many", "not a number of shards"),
        ] {
            let e = ServeArgs {
                replicas: vec!["b=http://y:1/".into()],
                replica_shards: vec![flag.into()],
                ..Default::default()
            }
            .resolve()
            .unwrap_err()
            .to_string();
            assert!(e.contains("replica-shards"), "{e}");
            assert!(e.contains(expect), "{e}");
        }
    }

    #[test]
    fn bad_catch_up_settings_name_the_replica() {
        for (table, expect) in [
            ("catch_up = \"sideways\"", "\"sideways\" is not supported"),
            ("live_first_after = \"30s\"", "only meaningful with"),
            (
                "catch_up = \"live-first\"\nlive_first_after = \"soon\"",
                "not a duration",
            ),
            (
                "catch_up = \"live-first\"\nlive_first_after = \"10ms\"",
                "too short",
            ),
        ] {
            let e = resolve_file(&format!(
                "[[replica]]\nname = \"b\"\nurl = \"http://y:1/\"\n{table}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("replica b:"), "{e}");
            assert!(e.contains(expect), "{e}");
        }
    }

    #[test]
    fn instance_name_comes_from_the_flag_the_file_or_the_hostname() {
        let c = resolve_file("instance_name = \"walrelay-2\"\n").unwrap();
        assert_eq!(c.instance_name, "walrelay-2");
        let c = ServeArgs {
            instance_name: Some("relay-a".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.instance_name, "relay-a");
        // Unset: whatever the machine is called, never empty.
        assert!(!ServeArgs::default()
            .resolve()
            .unwrap()
            .instance_name
            .is_empty());
        let e = ServeArgs {
            instance_name: Some("  ".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("instance-name:"), "{e}");
    }
}
