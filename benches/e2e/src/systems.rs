//! The three systems under test, each started fresh with its own data
//! directory and forwarding to two remote-write URLs, and how to tell that
//! each has delivered everything it acknowledged.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chaos_tests::ports::try_free_port;
use chaos_tests::relay::metric_sum;
use chaos_tests::tools::VMAGENT;
use chaos_tests::{Proc, Prometheus, PrometheusOpts, Relay};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Walrelay,
    /// walrelay from `--baseline-bin` (another build, to compare two).
    WalrelayBaseline,
    Vmagent,
    PrometheusAgent,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Walrelay => "walrelay",
            Kind::WalrelayBaseline => "walrelay-baseline",
            Kind::Vmagent => "vmagent",
            Kind::PrometheusAgent => "prometheus-agent",
        }
    }
}

enum Handle {
    Relay(Relay),
    Vmagent(Proc),
    Agent(Prometheus),
}

/// One running system.
pub struct System {
    handle: Handle,
    /// Where it keeps what it buffers (what "disk bytes per sample" measures).
    pub data_dir: PathBuf,
    /// Keeps walrelay's and vmagent's directories alive.
    _dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
    /// Delivery counters at start.
    start: Counters,
    urls: [String; 2],
}

/// Settings of a system start.
#[derive(Clone)]
pub struct Start<'a> {
    pub walrelay_bin: &'a Path,
    pub baseline_bin: Option<&'a Path>,
    pub walrelay_args: &'a [String],
    pub data_root: &'a Path,
}

impl System {
    pub async fn start(kind: Kind, urls: [String; 2], s: &Start<'_>) -> Result<System> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("walrelay-bench-{}-", kind.label()))
            .tempdir_in(s.data_root)?;
        chaos_tests::install_tls_provider();
        // Idle connections are dropped well before a server's own idle
        // timeout (walrelay closes a kept-alive connection idle for its
        // header-read timeout): reusing one as the server closes it fails
        // the GET ("connection closed before message completed"), which
        // ended a run whose phases read /metrics 30 s apart.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(2))
            .build()?;
        let (handle, data_dir, base) = match kind {
            Kind::Walrelay | Kind::WalrelayBaseline => {
                let data = dir.path().join("data");
                let args: Vec<&str> = s.walrelay_args.iter().map(String::as_str).collect();
                let bin = match kind {
                    Kind::WalrelayBaseline => s
                        .baseline_bin
                        .context("walrelay-baseline needs --baseline-bin")?,
                    _ => s.walrelay_bin,
                };
                let relay = Relay::start_with_bin(
                    bin,
                    &data,
                    &[("a", urls[0].as_str()), ("b", urls[1].as_str())],
                    &args,
                )
                .await?;
                let base = relay.url();
                (Handle::Relay(relay), data, base)
            }
            Kind::Vmagent => {
                let data = dir.path().join("vmagent-data");
                let (proc, base) = start_vmagent(&data, &urls, dir.path(), &http).await?;
                (Handle::Vmagent(proc), data, base)
            }
            Kind::PrometheusAgent => {
                let mut opts = PrometheusOpts::agent();
                // Defaults otherwise, as shipped; a name keeps the two
                // queues apart in the metrics.
                for (u, name) in urls.iter().zip(["a", "b"]) {
                    opts = opts.remote_write_with(u.clone(), serde_json::json!({ "name": name }));
                }
                opts.ready_timeout = Duration::from_secs(60);
                let p = Prometheus::start(opts).await?;
                let data = p.data_dir().to_path_buf();
                let base = p.url();
                (Handle::Agent(p), data, base)
            }
        };
        let mut s = System {
            handle,
            data_dir,
            _dir: dir,
            base,
            http,
            start: Counters::default(),
            urls,
        };
        s.start = s.counters().await.unwrap_or_default();
        Ok(s)
    }

    pub fn pid(&self) -> Result<u32> {
        match &self.handle {
            Handle::Relay(r) => r.pid().context("walrelay is not running"),
            Handle::Vmagent(p) => Ok(p.pid()),
            Handle::Agent(p) => Ok(p.proc().context("prometheus is not running")?.pid()),
        }
    }

    /// The remote-write URL senders post to.
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.base)
    }

    async fn metrics(&self) -> Result<String> {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("GET /metrics: {}", r.status());
        }
        Ok(r.text().await?)
    }

    /// Samples the system has taken in from its senders so far (its own
    /// counter).
    pub async fn samples_taken_in(&self) -> Result<f64> {
        let m = self.metrics().await?;
        match &self.handle {
            Handle::Relay(_) => Ok(metric_sum(&m, "walrelay_ingest_samples_total", &[])),
            Handle::Vmagent(_) => Ok(metric_sum(
                &m,
                "vmagent_rows_inserted_total",
                &[("type", "promremotewrite")],
            )),
            Handle::Agent(_) => bail!("a Prometheus agent takes no remote-write in"),
        }
    }

    /// The delivery counters (see [`Counters`]).
    async fn counters(&self) -> Result<Counters> {
        match &self.handle {
            Handle::Relay(r) => {
                let st = r.status().await?;
                Ok(Counters {
                    sent: ["a", "b"].map(|n| ReplicaNow::of(&st, n).sent_samples),
                    ..Counters::default()
                })
            }
            Handle::Vmagent(_) => {
                let m = self.metrics().await?;
                let sum = |name: &str| metric_sum(&m, name, &[]);
                Ok(Counters {
                    sent: [0, 1].map(|i| {
                        metric_sum(
                            &m,
                            "vmagent_remotewrite_rows_pushed_after_relabel_total",
                            &[("url", &format!("{}:{}", i + 1, self.urls[i]))],
                        )
                    }),
                    block_rows: sum("vmagent_remotewrite_block_size_rows_sum"),
                    blocks_made: sum("vmagent_remotewrite_block_size_rows_count"),
                    blocks_sent: sum("vmagent_remotewrite_blocks_sent_total"),
                    pending: sum("vmagent_remotewrite_pending_data_bytes")
                        + sum("vmagent_remotewrite_pending_inmemory_blocks"),
                })
            }
            Handle::Agent(_) => {
                let m = self.metrics().await?;
                Ok(Counters {
                    sent: ["a", "b"].map(|n| {
                        metric_sum(
                            &m,
                            "prometheus_remote_storage_samples_total",
                            &[("remote_name", n)],
                        )
                    }),
                    pending: metric_sum(&m, "prometheus_remote_storage_samples_pending", &[]),
                    ..Counters::default()
                })
            }
        }
    }

    /// walrelay: replicas a and b as `/api/v1/status` has them; None for
    /// the other systems.
    pub async fn replicas(&self) -> Result<Option<[ReplicaNow; 2]>> {
        let Handle::Relay(r) = &self.handle else {
            return Ok(None);
        };
        let st = r.status().await?;
        Ok(Some(["a", "b"].map(|n| ReplicaNow::of(&st, n))))
    }

    /// True when everything acknowledged has been delivered to both URLs.
    /// `acked` is the number of samples acknowledged since the start.
    ///
    /// - walrelay: every replica's `lag_records` is 0 in `/api/v1/status`.
    /// - vmagent: both URLs took every row in (`rows_pushed_after_relabel`),
    ///   every row is in a block (`block_size_rows_sum`), every block made
    ///   has been sent (`block_size_rows_count` = `blocks_sent_total`), and
    ///   nothing is pending in memory or on disk.
    /// - Prometheus agent: `prometheus_remote_storage_samples_total` of both
    ///   queues has grown by the acknowledged samples and nothing is pending.
    pub async fn drained(&self, acked: u64) -> Result<bool> {
        let acked = acked as f64;
        match &self.handle {
            Handle::Relay(r) => {
                let st = r.status().await?;
                let reps = st["replicas"].as_array().context("status: no replicas")?;
                Ok(reps
                    .iter()
                    .all(|rep| rep["lag_records"].as_u64() == Some(0)))
            }
            Handle::Vmagent(_) => {
                let c = self.counters().await?;
                let s = &self.start;
                Ok((0..2).all(|i| c.sent[i] - s.sent[i] >= acked)
                    && c.block_rows - s.block_rows >= 2.0 * acked
                    && c.blocks_made - s.blocks_made == c.blocks_sent - s.blocks_sent
                    && c.pending == 0.0)
            }
            Handle::Agent(_) => {
                let c = self.counters().await?;
                let s = &self.start;
                Ok((0..2).all(|i| c.sent[i] - s.sent[i] >= acked) && c.pending == 0.0)
            }
        }
    }

    /// Sends SIGTERM and waits for a clean exit (SIGKILL after 30 s).
    pub async fn stop(self) -> Result<()> {
        match self.handle {
            Handle::Relay(mut r) => {
                r.stop(Duration::from_secs(30)).await?;
            }
            Handle::Vmagent(p) => {
                p.terminate(Duration::from_secs(30)).await?;
            }
            Handle::Agent(mut p) => p.stop().await?,
        }
        Ok(())
    }

    pub fn log_tail(&self, n: usize) -> String {
        match &self.handle {
            Handle::Relay(r) => r.log_tail(n),
            Handle::Vmagent(p) => p.log_tail(n),
            Handle::Agent(p) => p.log_tail(n),
        }
    }
}

/// One walrelay replica at a moment, from `/api/v1/status`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ReplicaNow {
    /// Samples delivered since the relay started.
    pub sent_samples: f64,
    /// Shards delivering its live stream.
    pub shards: u32,
    /// Everything below it is delivered (the lowest shard's position).
    pub cursor: u64,
    /// Records between the log's head and `cursor`.
    pub lag_records: u64,
}

impl ReplicaNow {
    /// Replica `name` of a status answer (zeros if it is not there).
    pub fn of(status: &serde_json::Value, name: &str) -> ReplicaNow {
        let Some(r) = status["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == name)
        else {
            return ReplicaNow::default();
        };
        ReplicaNow {
            sent_samples: r["sent_samples"].as_f64().unwrap_or(0.0),
            shards: r["shards"].as_u64().map_or(1, |n| n as u32),
            cursor: r["cursor"].as_u64().unwrap_or(0),
            lag_records: r["lag_records"].as_u64().unwrap_or(u64::MAX),
        }
    }

    /// The log's head as this replica sees it.
    pub fn head(&self) -> u64 {
        self.cursor.saturating_add(self.lag_records)
    }
}

/// What a system says it has delivered, by URL, and what it still holds.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    /// walrelay: samples delivered; vmagent: rows queued for the URL;
    /// agent: samples delivered.
    sent: [f64; 2],
    /// vmagent: rows packed into blocks, blocks made, blocks delivered.
    block_rows: f64,
    blocks_made: f64,
    blocks_sent: f64,
    /// vmagent: bytes and blocks pending; agent: samples pending.
    pending: f64,
}

async fn start_vmagent(
    data: &Path,
    urls: &[String; 2],
    dir: &Path,
    http: &reqwest::Client,
) -> Result<(Proc, String)> {
    let bin = VMAGENT.path()?;
    let mut last = None;
    for _ in 0..5 {
        let port = try_free_port()?;
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-remoteWrite.tmpDataPath={}", data.display()))
            .arg("-remoteWrite.showURL")
            .arg("-loggerLevel=WARN");
        for u in urls {
            cmd.arg(format!("-remoteWrite.url={u}"));
        }
        cmd.current_dir(dir);
        let proc = Proc::spawn_logging_to("vmagent", cmd, &dir.join("vmagent.log"))?;
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{base}/health")).send().await {
                if r.status().is_success() {
                    return Ok((proc, base));
                }
            }
            if !proc.is_running() || Instant::now() > deadline {
                last = Some(anyhow::anyhow!(
                    "vmagent did not start: {}",
                    proc.log_tail(20)
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("vmagent did not start")))
}
