//! walrelay: a durable write-ahead-log mirror relay for Prometheus
//! remote-write.
//!
//! Senders push remote-write batches; each is validated, appended to a
//! segmented on-disk log and fsync'd (group commit) before the 2xx. One
//! independent shipper per replica replays the log from its own checkpoint,
//! so a replica's outage is filled when it returns. See `README.md` for when
//! exactly the relay answers 2xx, and `wal-format/SPEC.md` for the log format.
//!
//! # Layout
//!
//! A request flows down this list, and each replica's copy flows back out:
//!
//! * [`server`]: the HTTP listeners (ingest, admin, metrics, status, reload)
//!   and the wiring of everything below; startup and shutdown.
//! * [`ingest`]: one remote-write request: authentication, limits and the
//!   memory budget, snappy decompression and validation
//!   (`prom_remote_write::decode`), then hands the validated request (a
//!   1.0 body as its sender compressed it, a 2.0 one decoded) to
//!   [`commit`] and answers once it is durable.
//! * [`commit`]: group commit: one thread appends the queued requests and
//!   fsyncs once for all of them; a failed fsync stops it until a restart.
//! * [`wal`]: the log on disk (`wal-format` is its codec): the writer,
//!   segments, recovery at open, readers that follow the durable end, and
//!   the storage trait with a crash-simulating backend for tests.
//! * [`ship`]: one shipper per replica reads the log from its checkpoint,
//!   builds requests (`ship::payload`) and sends them through the delivery
//!   core (`ship::delivery`: send, status policy, split, retry), which
//!   `wal replay` shares; delivery shards for a far replica (`ship::shards`:
//!   records cut by series by `ship::cut`, the count sized by
//!   `ship::adapt`), live-first backfill and rate limits.
//! * [`checkpoint`]: each replica's durable position (sled), advanced only
//!   after its replica accepted the records.
//! * [`retention`]: deletes whole segments every replica has passed, or the
//!   oldest under the disk budget, counting what a replica lost.
//! * [`repacker`]: rewrites sealed segments that replicas still need as the
//!   same records in fewer, larger frames (`wal::repack`), at the lowest
//!   CPU priority.
//! * [`fleet`]: the set of running shippers, started, changed and stopped
//!   at a reload.
//! * [`cli`]: the operator commands (`wal inspect/verify/dump/replay/repair`,
//!   `cursors`), reading the same [`wal`] and [`checkpoint`].
//! * [`config`]: flags and the TOML file into settings; [`types`]: the
//!   settings types shared by ingest, ship and the CLI (imports nothing of
//!   the relay).
//! * Around them: [`auth`] (credentials), [`tls`] (certificates),
//!   [`connections`] (connection caps), [`watch`] (files re-read when they
//!   change), [`lock`] (one relay per data directory), [`metrics`] (the
//!   exported metrics).

pub mod auth;
pub mod checkpoint;
pub mod cli;
pub mod commit;
pub mod config;
pub mod connections;
pub mod fleet;
pub mod free_space;
pub mod ingest;
pub mod lock;
pub mod metrics;
pub mod repacker;
pub mod retention;
pub mod server;
pub mod ship;
pub mod tls;
pub mod types;
pub mod wal;
pub mod watch;
