//! walrelay: a durable write-ahead-log mirror relay for Prometheus
//! remote-write.
//!
//! Senders push remote-write batches; each is validated, appended to a
//! segmented on-disk log and fsync'd (group commit) before the 2xx. One
//! independent shipper per replica replays the log from its own checkpoint,
//! so a replica's outage is filled when it returns. See `README.md` for when
//! exactly the relay answers 2xx, and `wal-format/SPEC.md` for the log format.

pub mod auth;
pub mod checkpoint;
pub mod cli;
pub mod commit;
pub mod config;
pub mod connections;
pub mod fleet;
pub mod ingest;
pub mod lock;
pub mod metrics;
pub mod retention;
pub mod server;
pub mod ship;
pub mod tls;
pub mod types;
pub mod wal;
pub mod watch;
