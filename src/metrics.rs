//! The process-wide metrics recorder and the `/metrics` exposition.
//!
//! Metric names (all prefixed `walrelay_`) are documented in
//! `docs/operations.md`; the dashboard and the alert rules use only those, and
//! a test scrapes a running relay to check that they exist.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static HOT: OnceLock<Hot> = OnceLock::new();

/// Latency buckets from 100 µs to 30 s: fsync on a good SSD is ~100 µs-1 ms,
/// on network volumes several ms, and replica requests can take seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the global recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("walrelay_wal_group_commit_requests".into()),
                        BATCH_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder is installed (tests in one
            // process); the handle still renders this recorder's metrics.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            register_at_zero();
            metrics::gauge!("walrelay_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Handles of the series recorded at every write request or group commit.
///
/// A `metrics` macro looks its series up in the recorder's registry at each
/// call: it hashes the name and labels (allocating a label's value) and
/// takes a lock. A handle is that lookup done once. At 64 senders of 100
/// series each the lookups were 2.4 % of the relay's CPU (issue 19,
/// `benches/README.md`). Rarer series keep the macros.
pub struct Hot {
    /// `walrelay_ingest_requests_total{status="204"}`.
    pub ingest_stored: Counter,
    pub ingest_duration: Histogram,
    pub ingest_samples: Counter,
    pub ingest_bytes: Counter,
    pub ingest_requests_in_flight: Gauge,
    pub ingest_inflight_bytes: Gauge,
    pub wal_append_duration: Histogram,
    pub wal_fsync_duration: Histogram,
    pub wal_group_commit_requests: Histogram,
    pub wal_appended_bytes: Counter,
}

/// The hot path's handles, made once in the process-wide recorder (which
/// this installs first, so that no handle is bound to the no-op recorder
/// of a process without one).
pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| {
        let _ = install();
        Hot {
            ingest_stored: metrics::counter!("walrelay_ingest_requests_total", "status" => "204"),
            ingest_duration: metrics::histogram!("walrelay_ingest_duration_seconds"),
            ingest_samples: metrics::counter!("walrelay_ingest_samples_total"),
            ingest_bytes: metrics::counter!("walrelay_ingest_bytes_total"),
            ingest_requests_in_flight: metrics::gauge!("walrelay_ingest_requests_in_flight"),
            ingest_inflight_bytes: metrics::gauge!("walrelay_ingest_inflight_bytes"),
            wal_append_duration: metrics::histogram!("walrelay_wal_append_duration_seconds"),
            wal_fsync_duration: metrics::histogram!("walrelay_wal_fsync_duration_seconds"),
            wal_group_commit_requests: metrics::histogram!("walrelay_wal_group_commit_requests"),
            wal_appended_bytes: metrics::counter!("walrelay_wal_appended_bytes_total"),
        }
    })
}

/// Sets `walrelay_instance_info{instance_name}` to 1: which relay this is
/// when several serve the same replicas (their series carry the same
/// `replica` labels). A relay is named once, at startup.
pub fn set_instance(name: &str) {
    metrics::gauge!("walrelay_instance_info", "instance_name" => name.to_owned()).set(1.0);
}

/// Creates the series of rare events at zero, so that `increase()` and
/// `rate()` see their first event (a series born at 1 has no increase).
fn register_at_zero() {
    for name in [
        "walrelay_wal_corruptions_total",
        "walrelay_wal_truncations_total",
        "walrelay_ingest_samples_total",
        "walrelay_ingest_bytes_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    // Every series the dashboard or the alerts query exists from the start
    // (tests/deploy.rs checks): a panel on a healthy relay reads 0, not
    // "No data". A histogram registered without a sample renders zeros.
    metrics::counter!("walrelay_wal_appended_bytes_total").increment(0);
    for name in [
        "walrelay_ingest_duration_seconds",
        "walrelay_wal_append_duration_seconds",
        "walrelay_wal_fsync_duration_seconds",
        "walrelay_wal_group_commit_requests",
    ] {
        let _ = metrics::histogram!(name);
    }
    for outcome in crate::repacker::OUTCOMES {
        metrics::counter!("walrelay_wal_repacks_total", "outcome" => outcome).increment(0);
    }
    metrics::counter!("walrelay_wal_repack_saved_bytes_total").increment(0);
    for reason in ["delivered", "disk_budget", "retention_age"] {
        metrics::counter!("walrelay_wal_segments_deleted_total", "reason" => reason).increment(0);
    }
    for &reason in INGEST_REFUSED_REASONS {
        metrics::counter!("walrelay_ingest_refused_total", "reason" => reason).increment(0);
    }
    for reason in ["budget_full", "no_space", "writer_failed", "io"] {
        metrics::counter!("walrelay_wal_append_errors_total", "reason" => reason).increment(0);
    }
    for status in ["204", "400", "413", "415", "429", "503"] {
        metrics::counter!("walrelay_ingest_requests_total", "status" => status).increment(0);
    }
    metrics::gauge!("walrelay_wal_writer_failed").set(0.0);
    metrics::gauge!("walrelay_checkpoint_store_failed").set(0.0);
    metrics::counter!("walrelay_checkpoint_store_set_aside_total").increment(0);
    metrics::gauge!("walrelay_ingest_requests_in_flight").set(0.0);
    metrics::gauge!("walrelay_ingest_inflight_bytes").set(0.0);
    for reason in ["concurrency", "memory", "password_checks"] {
        metrics::counter!("walrelay_ingest_overloaded_total", "reason" => reason).increment(0);
    }
    for result in ["accepted", "refused"] {
        metrics::counter!("walrelay_auth_password_checks_total", "result" => result).increment(0);
    }
    metrics::gauge!("walrelay_auth_password_checks_in_flight").set(0.0);
    metrics::counter!("walrelay_http2_idle_closed_total").increment(0);
    for result in ["success", "failure"] {
        metrics::counter!("walrelay_config_reloads_total", "result" => result).increment(0);
    }
}

/// The `reason`s of `walrelay_ingest_refused_total`: the codes of
/// `prom_remote_write::DecodeError::as_error_code` and ingest's own
/// `over_memory_budget`. A code missing here is still counted, from its first
/// refusal on.
const INGEST_REFUSED_REASONS: &[&str] = &[
    "over_memory_budget",
    "too_large",
    "expands_too_much",
    "too_many_series",
    "translation_too_large",
    "snappy",
    "protobuf",
    "first_symbol_not_empty",
    "odd_labels_refs",
    "symbol_ref_out_of_range",
    "no_labels",
    "missing_metric_name",
    "empty_label_name",
    "duplicate_label_name",
    "too_many_labels",
    "label_name_too_long",
    "label_value_too_long",
    "histogram_count_mismatch",
    "histogram_count_not_big_enough",
    "histogram_negative_bucket_count",
    "histogram_spans_mismatch",
    "histogram_negative_span_offset",
];

/// Creates one listener's connection series at zero (`main`, `admin`).
pub fn register_listener_at_zero(listener: &'static str) {
    metrics::gauge!("walrelay_http_connections", "listener" => listener).set(0.0);
    for reason in ["max_connections", "max_connections_per_ip"] {
        metrics::counter!("walrelay_http_connections_refused_total",
            "listener" => listener, "reason" => reason)
        .increment(0);
    }
}

/// Creates one replica's series of rare events at zero.
pub fn register_replica_at_zero(replica: &str) {
    let r = || replica.to_owned();
    for name in [
        "walrelay_replica_retries_total",
        "walrelay_replica_sent_records_total",
        "walrelay_replica_sent_samples_total",
        "walrelay_replica_rejected_records_total",
        "walrelay_replica_rejected_samples_total",
        "walrelay_replica_assumed_delivered_records_total",
        "walrelay_replica_assumed_delivered_samples_total",
        "walrelay_replica_partial_writes_total",
        "walrelay_replica_unconfirmed_writes_total",
    ] {
        metrics::counter!(name, "replica" => r()).increment(0);
    }
    for status in [
        "2xx",
        "4xx",
        "413",
        "blocked",
        "5xx",
        "429",
        "timeout",
        "connection",
    ] {
        metrics::counter!("walrelay_replica_requests_total", "replica" => r(), "status" => status)
            .increment(0);
    }
    for reason in ["disk_budget", "retention_age"] {
        metrics::counter!("walrelay_replica_dropped_records_total", "replica" => r(), "reason" => reason)
            .increment(0);
        metrics::counter!("walrelay_replica_dropped_samples_total", "replica" => r(), "reason" => reason)
            .increment(0);
    }
    metrics::counter!("walrelay_replica_skipped_records_total", "replica" => r(), "reason" => "retention")
        .increment(0);
    metrics::gauge!("walrelay_replica_backfill_remaining_records", "replica" => r()).set(0.0);
    for what in ["created_timestamps", "metadata"] {
        metrics::counter!("walrelay_replica_dropped_by_translation_total", "replica" => r(), "what" => what)
            .increment(0);
    }
    for reason in ["too_large", "timeout"] {
        metrics::counter!("walrelay_replica_splits_total", "replica" => r(), "reason" => reason)
            .increment(0);
    }
    // At 0 from the start, so that the alerts on them have a series to watch.
    metrics::gauge!("walrelay_replica_stuck_attempts", "replica" => r()).set(0.0);
    metrics::gauge!("walrelay_replica_blocked", "replica" => r()).set(0.0);
    // No request has succeeded yet.
    metrics::gauge!("walrelay_replica_up", "replica" => r()).set(0.0);
    // A replica starts unsharded: one shard, shard 0, until its shipper
    // restores its stored count or changes it. The most is the default's
    // until the shipper sets the replica's own bound.
    metrics::gauge!("walrelay_replica_shards", "replica" => r()).set(1.0);
    metrics::gauge!("walrelay_replica_shards_desired", "replica" => r()).set(1.0);
    metrics::gauge!("walrelay_replica_shards_max", "replica" => r())
        .set(f64::from(crate::types::DEFAULT_SHARDS.bounds().1));
    metrics::counter!("walrelay_replica_reshards_total", "replica" => r()).increment(0);
    metrics::gauge!("walrelay_replica_shard_lag_records", "replica" => r(), "shard" => "0")
        .set(0.0);
    let _ = metrics::histogram!("walrelay_replica_send_duration_seconds", "replica" => r());
}

/// The exposition of counters the recorder cannot hold: the `metrics` crate
/// counts in integers, and time waited for a rate limit is fractional
/// seconds. Appended to the recorder's output by `/metrics`, from each
/// replica's name and seconds waited. Replica names are letters, digits,
/// `-`, `_` and `.`, so they need no escaping.
pub fn render_replica_counters<'a>(
    rate_limited_seconds: impl IntoIterator<Item = (&'a str, f64)>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# HELP walrelay_replica_rate_limited_seconds_total Time the replica's shipper waited for its rate limits.\n\
         # TYPE walrelay_replica_rate_limited_seconds_total counter\n",
    );
    for (replica, seconds) in rate_limited_seconds {
        let _ = writeln!(
            out,
            "walrelay_replica_rate_limited_seconds_total{{replica=\"{replica}\"}} {seconds}"
        );
    }
    out
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "walrelay_ingest_requests_total",
        "Write requests answered, by HTTP status."
    );
    describe_counter!(
        "walrelay_ingest_samples_total",
        "Samples (and histograms) acknowledged."
    );
    describe_counter!(
        "walrelay_ingest_bytes_total",
        Unit::Bytes,
        "Request body bytes received."
    );
    describe_gauge!(
        "walrelay_instance_info",
        "1, with this relay's --instance-name (one per pod when several relays serve the same replicas)."
    );
    describe_gauge!(
        "walrelay_config_last_reload_successful",
        "1 when the last configuration reload succeeded (or none was tried), 0 after a refused one."
    );
    describe_gauge!(
        "walrelay_config_last_reload_success_timestamp_seconds",
        Unit::Seconds,
        "When the configuration was last loaded successfully (start or reload)."
    );
    describe_counter!(
        "walrelay_config_reloads_total",
        "Configuration reloads (SIGHUP, POST /-/reload), by result."
    );
    describe_gauge!(
        "walrelay_auth_credentials_file_ok",
        "1 while a credentials file (file, used_for, replica) holds credentials, 0 while it is missing, empty or bad: then nothing it held is accepted (ingest) or sent (replica)."
    );
    describe_gauge!(
        "walrelay_ingest_requests_in_flight",
        "Write requests being handled now (at most --max-concurrent-requests)."
    );
    describe_counter!(
        "walrelay_ingest_refused_total",
        "Requests refused as bad input, by reason."
    );
    describe_gauge!(
        "walrelay_ingest_inflight_bytes",
        Unit::Bytes,
        "Memory reserved by write requests in flight: body plus declared decoded size."
    );
    describe_gauge!(
        "walrelay_ingest_inflight_bytes_limit",
        Unit::Bytes,
        "--max-inflight-decoded-bytes: the most walrelay_ingest_inflight_bytes can reach."
    );
    describe_counter!(
        "walrelay_ingest_overloaded_total",
        "Write requests answered 503 because the relay was at a limit, by which: concurrency (--max-concurrent-requests), memory (--max-inflight-decoded-bytes) or password_checks (--max-concurrent-password-checks)."
    );
    describe_counter!(
        "walrelay_auth_password_checks_total",
        "bcrypt checks of basic-auth passwords run, by result (an unknown user's is refused); a remembered password costs none."
    );
    describe_gauge!(
        "walrelay_auth_password_checks_in_flight",
        "bcrypt checks running now (at most --max-concurrent-password-checks)."
    );
    describe_gauge!(
        "walrelay_http_connections",
        "Connections open on a listener (main: at most --max-connections; admin: at most 64)."
    );
    describe_counter!(
        "walrelay_http_connections_refused_total",
        "Connections closed as soon as accepted because a listener was at a cap, by listener and reason (max_connections, max_connections_per_ip)."
    );
    describe_counter!(
        "walrelay_http2_idle_closed_total",
        "HTTP/2 connections closed for having no request in progress for --header-read-timeout."
    );
    describe_histogram!(
        "walrelay_ingest_duration_seconds",
        Unit::Seconds,
        "Time from request to answer (acknowledgement latency)."
    );
    describe_histogram!(
        "walrelay_wal_append_duration_seconds",
        Unit::Seconds,
        "Time to write one group-commit batch."
    );
    describe_histogram!(
        "walrelay_wal_fsync_duration_seconds",
        Unit::Seconds,
        "Time of one group-commit fdatasync."
    );
    describe_histogram!(
        "walrelay_wal_group_commit_requests",
        "Requests made durable by one fsync."
    );
    describe_counter!(
        "walrelay_wal_appended_bytes_total",
        Unit::Bytes,
        "Payload bytes appended to the log, as records hold them before frame compression (a 1.0 request as its sender compressed it, a 2.0 request decoded)."
    );
    describe_gauge!(
        "walrelay_wal_zstd_level",
        "zstd level of the log's frames being written: --zstd-level under load, up to --zstd-max-level while compressing takes under 0.5% of a core (0: --compression none)."
    );
    describe_counter!(
        "walrelay_wal_append_errors_total",
        "Group commits that failed, by reason."
    );
    describe_gauge!(
        "walrelay_wal_writer_failed",
        "1 when the log writer stopped after a failed fsync."
    );
    describe_gauge!(
        "walrelay_wal_bytes",
        Unit::Bytes,
        "Bytes of the log on disk."
    );
    describe_gauge!("walrelay_wal_segments", "Segments of the log on disk.");
    describe_gauge!(
        "walrelay_wal_first_seq",
        "Sequence number of the oldest record on disk."
    );
    describe_gauge!(
        "walrelay_wal_head_seq",
        "One past the newest durable record."
    );
    describe_gauge!(
        "walrelay_disk_budget_bytes",
        Unit::Bytes,
        "The configured disk budget (0: none)."
    );
    describe_counter!(
        "walrelay_wal_truncations_total",
        "Torn tails cut off at recovery."
    );
    describe_counter!(
        "walrelay_wal_corruptions_total",
        "Damaged places found in the log."
    );
    describe_counter!(
        "walrelay_wal_segments_deleted_total",
        "Segments deleted, by reason."
    );
    describe_counter!(
        "walrelay_wal_repacks_total",
        "Sealed segments looked at by the repacker, by outcome (repacked, already_dense, \
         not_worth, damaged, gone, stopped, error)."
    );
    describe_counter!(
        "walrelay_wal_repack_saved_bytes_total",
        Unit::Bytes,
        "Disk bytes the repacked segments no longer take."
    );
    describe_gauge!(
        "walrelay_replica_rate_limit_samples_per_second",
        "The replica's configured samples per second (0: unlimited)."
    );
    describe_gauge!(
        "walrelay_replica_rate_limit_bytes_per_second",
        Unit::Bytes,
        "The replica's configured decoded bytes per second (0: unlimited)."
    );
    describe_gauge!(
        "walrelay_replica_stuck_attempts",
        "Consecutive attempts of the request in flight that the replica answered with the same 5xx status and body (0 once it is delivered or fails otherwise)."
    );
    describe_counter!(
        "walrelay_housekeeping_runs_total",
        "Passes of the housekeeping task (retention, gauges), about one a second."
    );
    describe_gauge!(
        "walrelay_replica_blocked",
        "1 while the replica refuses the request in flight for a reason that is not about its data (401, 403, 404, ...): it is retried, nothing is skipped; 0 otherwise."
    );
    describe_counter!(
        "walrelay_replica_splits_total",
        "Requests to a replica split in halves, by reason (too_large: answered 413; timeout)."
    );
    describe_counter!(
        "walrelay_replica_requests_total",
        "Attempts of requests to a replica, by outcome (2xx; 4xx: data refused; 413; blocked: refused for a reason that is not about the data; 5xx; 429; timeout; connection)."
    );
    describe_counter!(
        "walrelay_replica_retries_total",
        "Requests to a replica that were retried."
    );
    describe_counter!(
        "walrelay_replica_sent_records_total",
        "Records delivered to a replica."
    );
    describe_counter!(
        "walrelay_replica_sent_samples_total",
        "Samples delivered to a replica."
    );
    describe_counter!(
        "walrelay_replica_rejected_records_total",
        "Records a replica refused on their own: as data (400, 409, 422, or a status in its drop_on_status) or as too large (413)."
    );
    describe_counter!(
        "walrelay_replica_rejected_samples_total",
        "Samples in records a replica refused."
    );
    describe_counter!(
        "walrelay_replica_skipped_records_total",
        "Records a replica's reader skipped (damage or deleted), by reason."
    );
    describe_counter!(
        "walrelay_replica_dropped_records_total",
        "Records deleted by retention before the replica got them."
    );
    describe_counter!(
        "walrelay_replica_dropped_samples_total",
        "Samples deleted by retention before the replica got them."
    );
    describe_counter!(
        "walrelay_replica_dropped_by_translation_total",
        "What translating 2.0 records to 1.0 for a replica dropped, by what (created_timestamps, metadata)."
    );
    describe_counter!(
        "walrelay_replica_partial_writes_total",
        "2.0 requests a replica answered 2xx with written counts below what was sent."
    );
    describe_counter!(
        "walrelay_replica_unconfirmed_writes_total",
        "2.0 requests a replica answered 2xx without the written-count headers."
    );
    describe_gauge!(
        "walrelay_replica_lag_records",
        "Records not yet delivered to the replica (a live-first backfill's remaining records included)."
    );
    describe_gauge!(
        "walrelay_replica_backfill_remaining_records",
        "Records of a live-first replica's backfill range not yet delivered (0: no backfill)."
    );
    describe_gauge!(
        "walrelay_replica_lag_bytes",
        Unit::Bytes,
        "Log bytes not yet delivered to the replica (upper bound)."
    );
    describe_gauge!(
        "walrelay_replica_lag_seconds",
        Unit::Seconds,
        "Age of the oldest record not yet delivered."
    );
    describe_gauge!(
        "walrelay_replica_cursor",
        "The replica's checkpoint (next sequence number to deliver; the live stream's for a live-first replica)."
    );
    describe_gauge!(
        "walrelay_replica_up",
        "1 when the last request to the replica succeeded (0 before the first)."
    );
    describe_gauge!(
        "walrelay_replica_shards",
        "Shards delivering the replica's live stream now, each with one request in flight and the series that hash to it (1: unsharded)."
    );
    describe_gauge!(
        "walrelay_replica_shards_desired",
        "Shards the replica's live stream is to have: its fixed count, or what the adaptive count asked for at its last evaluation (every --shard-update-interval); the stream moves to it at its next barrier."
    );
    describe_gauge!(
        "walrelay_replica_shards_max",
        "The most shards the replica's live stream may have: its fixed count, or its max_shards (--max-shards, 16 by default)."
    );
    describe_counter!(
        "walrelay_replica_reshards_total",
        "Changes of the replica's shard count, each at a barrier (every shard delivers what it was given, then the new count starts there)."
    );
    describe_gauge!(
        "walrelay_replica_shard_lag_records",
        "Records between the log's head and a shard's position, by shard (0 to shards - 1)."
    );
    describe_counter!(
        "walrelay_replica_backfills_total",
        "Live-first splits of the replica: a backfill of its gap started while the live stream went on from the head."
    );
    describe_histogram!(
        "walrelay_replica_send_duration_seconds",
        Unit::Seconds,
        "Duration of one request to a replica."
    );
}
