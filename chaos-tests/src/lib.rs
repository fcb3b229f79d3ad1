//! Test harness for walrelay's fault-injection suite.
//!
//! * [`ports`]: free loopback ports and waiting for listeners.
//! * [`process`]: child processes that log to their own file and are always
//!   killed on drop (even when a test panics).
//! * [`prometheus`]: a real Prometheus (server or agent mode) with query helpers.
//! * [`victoria`]: a real single-node VictoriaMetrics as a replica.
//! * [`relay`]: the walrelay binary under test.
//! * [`load`]: the remote-write load generator and its acknowledgement log.
//! * [`verify`]: the oracle comparing what was acknowledged with what a
//!   replica holds.
//! * [`proxy`]: a TCP fault-injection proxy whose mode switches at runtime.
//! * [`tools`]: locating the real programs, with install hints.
//! * [`encode`]: remote-write 1.0 encoding for the generator, and helpers to
//!   post hand-made requests.
//!
//! # Running
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-chaos cargo test -p chaos-tests
//! cargo build --bin walrelay      # before suites that start the relay
//! cargo run -p chaos-tests --bin walrelay-load -- --url URL --duration 30s
//! ```
//!
//! The real programs come from Debian (`apt-get install -y prometheus
//! prometheus-node-exporter victoria-metrics nginx`); a missing one fails
//! the test that needs it with the package to install. `WALRELAY_BIN`
//! overrides the relay binary, `CHAOS_<PROGRAM>_BIN` any other program.
//! Every process, port and directory is private to the test that made it,
//! so tests run in parallel; processes die with their handle, with the test
//! process (`PR_SET_PDEATHSIG`), and their logs and data are kept in /tmp
//! when a test panics.

pub mod encode;
pub use http::{client, install_tls_provider};
pub mod load;
pub mod ports;
pub mod powerfs;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod relay;
pub mod scenario;
pub mod tools;
pub mod verify;
pub mod victoria;

mod http;

pub use http::now_ms;

pub use load::{AckLog, Load, LoadHandle, LoadSpec, RetryPolicy, Routing};
pub use process::Proc;
pub use prometheus::{Prometheus, PrometheusOpts};
pub use proxy::{FaultProxy, ProxyMode};
pub use relay::Relay;
pub use verify::{verify, verify_api, Verdict};
pub use victoria::VictoriaMetrics;
