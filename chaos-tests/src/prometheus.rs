//! A real Prometheus (Debian's `prometheus` package) for tests: server mode
//! with the remote-write receiver (the replicas whose contents tests query),
//! or agent mode (a sender or the seed's replica topology).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::{client, form, ms_to_secs_str};
use crate::ports::try_free_port;
use crate::process::Proc;
use crate::tools;

/// How to run a Prometheus. `PrometheusOpts::default()` is a server with the
/// remote-write receiver and no scrape jobs.
#[derive(Clone, Debug)]
pub struct PrometheusOpts {
    /// `--enable-feature=agent` (no local queries possible).
    pub agent: bool,
    /// `--web.enable-remote-write-receiver` (default true).
    pub receiver: bool,
    /// Flags appended as they are, e.g. `--enable-feature=native-histograms`.
    pub extra_flags: Vec<String>,
    /// `remote_write` entries: url plus extra keys for the entry (e.g.
    /// `{"queue_config": {"max_shards": 1}}`).
    pub remote_write: Vec<(String, Value)>,
    /// `global.external_labels`.
    pub external_labels: BTreeMap<String, String>,
    /// `scrape_configs` entries (as JSON, which is valid YAML).
    pub scrape_configs: Vec<Value>,
    /// `global.scrape_interval` and `evaluation_interval`.
    pub scrape_interval: Duration,
    /// `storage.tsdb.out_of_order_time_window` (server mode).
    pub out_of_order_window: Option<Duration>,
    /// How long to wait for `/-/ready`.
    pub ready_timeout: Duration,
    /// Serve HTTPS (`--web.config.file`), optionally requiring client
    /// certificates; the suite's own client then speaks TLS too.
    pub web_tls: Option<Box<WebTls>>,
}

/// Prometheus' web TLS: its certificate, and the CA whose client
/// certificates it requires, if any. The suite's client trusts `ca_file`
/// and presents `client_identity`.
#[derive(Clone, Debug)]
pub struct WebTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signed `cert_file`, which the suite trusts.
    pub ca_file: PathBuf,
    /// Client certificates are required and verified against this CA
    /// (`RequireAndVerifyClientCert`).
    pub client_ca_file: Option<PathBuf>,
    /// The certificate and key the suite's own client presents.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

impl WebTls {
    /// The `--web.config.file` content (JSON is valid YAML).
    fn web_config(&self) -> Value {
        let mut tls = json!({
            "cert_file": self.cert_file,
            "key_file": self.key_file,
        });
        if let Some(ca) = &self.client_ca_file {
            tls["client_auth_type"] = json!("RequireAndVerifyClientCert");
            tls["client_ca_file"] = json!(ca);
        }
        json!({ "tls_server_config": tls })
    }

    /// A client that trusts `ca_file` and presents `client_identity`.
    fn client(&self, timeout: Duration) -> Result<reqwest::Client> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        crate::http::install_tls_provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca_file)
            .with_context(|| format!("reading {}", self.ca_file.display()))?
        {
            roots.add(c?)?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match &self.client_identity {
            Some((cert, key)) => builder.with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?,
                PrivateKeyDer::from_pem_file(key)?,
            )?,
            None => builder.with_no_client_auth(),
        };
        Ok(reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .tls_backend_preconfigured(config)
            .build()?)
    }
}

impl Default for PrometheusOpts {
    fn default() -> Self {
        PrometheusOpts {
            agent: false,
            receiver: true,
            extra_flags: Vec::new(),
            remote_write: Vec::new(),
            external_labels: BTreeMap::new(),
            scrape_configs: Vec::new(),
            scrape_interval: Duration::from_secs(1),
            out_of_order_window: None,
            ready_timeout: Duration::from_secs(30),
            web_tls: None,
        }
    }
}

impl PrometheusOpts {
    /// Server mode with the remote-write receiver.
    pub fn server() -> Self {
        Self::default()
    }

    /// Agent mode (`--enable-feature=agent`), with the receiver enabled.
    pub fn agent() -> Self {
        PrometheusOpts {
            agent: true,
            ..Self::default()
        }
    }

    pub fn flag(mut self, flag: impl Into<String>) -> Self {
        self.extra_flags.push(flag.into());
        self
    }

    pub fn native_histograms(self) -> Self {
        self.flag("--enable-feature=native-histograms")
    }

    pub fn remote_write(self, url: impl Into<String>) -> Self {
        self.remote_write_with(url, json!({}))
    }

    /// A remote_write entry with extra keys (`queue_config`, `name`, ...).
    pub fn remote_write_with(mut self, url: impl Into<String>, extra: Value) -> Self {
        self.remote_write.push((url.into(), extra));
        self
    }

    pub fn external_label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.external_labels.insert(name.into(), value.into());
        self
    }

    /// A static scrape job.
    pub fn scrape(self, job: &str, targets: &[&str]) -> Self {
        self.scrape_config(json!({"job_name": job, "static_configs": [{"targets": targets}]}))
    }

    pub fn scrape_config(mut self, cfg: Value) -> Self {
        self.scrape_configs.push(cfg);
        self
    }

    pub fn scrape_interval(mut self, d: Duration) -> Self {
        self.scrape_interval = d;
        self
    }

    pub fn out_of_order_window(mut self, d: Duration) -> Self {
        self.out_of_order_window = Some(d);
        self
    }

    /// The configuration file's content (JSON is valid YAML).
    pub fn config(&self) -> Value {
        let mut global = json!({
            "scrape_interval": prom_duration(self.scrape_interval),
            "evaluation_interval": prom_duration(self.scrape_interval),
        });
        if !self.external_labels.is_empty() {
            global["external_labels"] = json!(self.external_labels);
        }
        let mut cfg = json!({ "global": global, "scrape_configs": self.scrape_configs });
        if !self.remote_write.is_empty() {
            let rw: Vec<Value> = self
                .remote_write
                .iter()
                .map(|(url, extra)| {
                    let mut e = json!({ "url": url });
                    if let (Some(e), Some(extra)) = (e.as_object_mut(), extra.as_object()) {
                        for (k, v) in extra {
                            e.insert(k.clone(), v.clone());
                        }
                    }
                    e
                })
                .collect();
            cfg["remote_write"] = json!(rw);
        }
        if let Some(w) = self.out_of_order_window {
            cfg["storage"] = json!({"tsdb": {"out_of_order_time_window": prom_duration(w)}});
        }
        cfg
    }
}

fn prom_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A running (or stopped) Prometheus with its own temp dir and port.
pub struct Prometheus {
    opts: PrometheusOpts,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    generation: u32,
    port: u16,
    proc: Option<Proc>,
    http: reqwest::Client,
}

impl Prometheus {
    /// A server-mode Prometheus with the remote-write receiver.
    pub async fn start_server() -> Result<Prometheus> {
        Self::start(PrometheusOpts::server()).await
    }

    /// Starts a Prometheus on a free port and waits for `/-/ready`.
    pub async fn start(opts: PrometheusOpts) -> Result<Prometheus> {
        // Fail early with the install hint.
        tools::PROMETHEUS.path()?;
        let dir = tempfile::Builder::new()
            .prefix("chaos-prometheus-")
            .tempdir()?;
        let cfg = serde_json::to_string_pretty(&opts.config())?;
        std::fs::write(dir.path().join("prometheus.yml"), cfg)?;
        let http = match &opts.web_tls {
            Some(tls) => {
                let web = serde_json::to_string_pretty(&tls.web_config())?;
                std::fs::write(dir.path().join("web.yml"), web)?;
                tls.client(Duration::from_secs(60))?
            }
            None => client(Duration::from_secs(60))?,
        };
        let data_dir = dir.path().join("data-0");
        let mut p = Prometheus {
            opts,
            dir,
            data_dir,
            generation: 0,
            port: 0,
            proc: None,
            http,
        };
        // The free port can be taken by someone else before Prometheus binds
        // it: try a few ports.
        let mut last_err = None;
        for _ in 0..5 {
            p.port = try_free_port()?;
            match p.launch().await {
                Ok(()) => return Ok(p),
                Err(e) if format!("{e:#}").contains("address already in use") => {
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("no port")))
    }

    fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(tools::PROMETHEUS.path()?);
        cmd.arg(format!(
            "--config.file={}",
            self.dir.path().join("prometheus.yml").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
        .arg("--web.enable-lifecycle")
        .arg("--log.level=info");
        if self.opts.agent {
            cmd.arg("--enable-feature=agent")
                .arg(format!("--storage.agent.path={}", self.data_dir.display()));
        } else {
            cmd.arg(format!("--storage.tsdb.path={}", self.data_dir.display()))
                .arg("--storage.tsdb.retention.time=3650d");
        }
        if self.opts.receiver {
            cmd.arg("--web.enable-remote-write-receiver");
        }
        if self.opts.web_tls.is_some() {
            cmd.arg(format!(
                "--web.config.file={}",
                self.dir.path().join("web.yml").display()
            ));
        }
        cmd.args(&self.opts.extra_flags);
        cmd.current_dir(self.dir.path());
        Ok(cmd)
    }

    async fn launch(&mut self) -> Result<()> {
        let cmd = self.command()?;
        let proc = Proc::spawn_logging_to("prometheus", cmd, &self.log_path())?;
        self.proc = Some(proc);
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        let url = format!("{}/-/ready", self.url());
        loop {
            if let Some(p) = &self.proc {
                if let Some(st) = p.try_exit()? {
                    bail!(
                        "prometheus exited ({st}) before it was ready; log tail:\n{}",
                        p.log_tail(30)
                    );
                }
            }
            if let Ok(r) = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let tail = self
                    .proc
                    .as_ref()
                    .map(|p| p.log_tail(30))
                    .unwrap_or_default();
                bail!(
                    "prometheus on port {} not ready within {:?}; log tail:\n{tail}",
                    self.port,
                    self.opts.ready_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` with [`PrometheusOpts::web_tls`]).
    pub fn url(&self) -> String {
        let scheme = if self.opts.web_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/api/v1/write`
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn opts(&self) -> &PrometheusOpts {
        &self.opts
    }

    /// The directory holding config, log and data directories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The current TSDB (or agent WAL) directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    pub fn log_tail(&self, n: usize) -> String {
        crate::process::log_tail(&self.log_path(), n)
    }

    /// The running process, if any.
    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| p.is_running())
    }

    /// SIGTERM (SIGKILL after 30 s); the data directory stays.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.terminate(Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// SIGKILL; the data directory stays.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.sigkill()?;
        }
        Ok(())
    }

    /// Stops (if running) and starts again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.launch_same_port().await
    }

    /// Stops (if running) and starts again on the same port with a new,
    /// empty storage directory.
    pub async fn restart_empty(&mut self) -> Result<()> {
        self.stop().await?;
        self.generation += 1;
        self.data_dir = self.dir.path().join(format!("data-{}", self.generation));
        self.launch_same_port().await
    }

    /// Starts a stopped Prometheus again (same port, same data).
    pub async fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("prometheus is already running");
        }
        self.launch_same_port().await
    }

    async fn launch_same_port(&mut self) -> Result<()> {
        // Our own previous process is gone; a stranger may hold the port for
        // a moment (e.g. a client's ephemeral port). Retry briefly.
        let mut last = None;
        for _ in 0..10 {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) if format!("{e:#}").contains("address already in use") => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("cannot restart prometheus")))
    }

    /// `GET /metrics`: this Prometheus' own metrics (Prometheus text
    /// format, see [`crate::relay::metric_sum`]), e.g. the samples its
    /// receiver refused as out of order.
    pub async fn metrics_text(&self) -> Result<String> {
        let url = format!("{}/metrics", self.url());
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        Ok(resp.error_for_status()?.text().await?)
    }

    /// The query API of this Prometheus (server mode).
    pub fn api(&self) -> PromApi {
        PromApi {
            base: self.url(),
            http: self.http.clone(),
        }
    }

    /// See [`PromApi::query`].
    pub async fn query(&self, promql: &str, time_ms: Option<i64>) -> Result<Value> {
        self.api().query(promql, time_ms).await
    }

    /// See [`PromApi::query_value`].
    pub async fn query_value(&self, promql: &str) -> Result<Option<f64>> {
        self.api().query_value(promql).await
    }

    /// See [`PromApi::raw_samples`].
    pub async fn raw_samples(
        &self,
        selector: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<BTreeMap<String, Vec<(i64, f64)>>> {
        self.api().raw_samples(selector, start_ms, end_ms).await
    }

    /// See [`PromApi::raw_series`].
    pub async fn raw_series(
        &self,
        selector: &str,
        start_ms: i64,
        end_ms: i64,
        window_ms: i64,
    ) -> Result<BTreeMap<BTreeMap<String, String>, Vec<(i64, f64)>>> {
        self.api()
            .raw_series(selector, start_ms, end_ms, window_ms)
            .await
    }
}

/// The Prometheus HTTP query API at some base URL (a [`Prometheus`], or
/// anything speaking the same API).
#[derive(Clone, Debug)]
pub struct PromApi {
    base: String,
    http: reqwest::Client,
}

impl PromApi {
    /// `base` like `http://127.0.0.1:9090`.
    pub fn new(base: impl Into<String>) -> Result<PromApi> {
        Ok(PromApi {
            base: base.into().trim_end_matches('/').to_string(),
            http: client(Duration::from_secs(60))?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `/api/v1/query`: returns the `data` object (`resultType`, `result`).
    /// `time_ms` defaults to now.
    pub async fn query(&self, promql: &str, time_ms: Option<i64>) -> Result<Value> {
        let mut params = vec![("query", promql.to_string())];
        if let Some(t) = time_ms {
            params.push(("time", ms_to_secs_str(t)));
        }
        self.api("/api/v1/query", &params).await
    }

    /// The first value of an instant query's vector or scalar result.
    pub async fn query_value(&self, promql: &str) -> Result<Option<f64>> {
        let data = self.query(promql, None).await?;
        let v = match data["resultType"].as_str() {
            Some("vector") => data["result"][0]["value"][1].clone(),
            Some("scalar") => data["result"][1].clone(),
            _ => Value::Null,
        };
        Ok(v.as_str().and_then(|s| s.parse().ok()))
    }

    async fn api(&self, path: &str, params: &[(&str, String)]) -> Result<Value> {
        let pairs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form(&pairs))
            .send()
            .await
            .with_context(|| format!("POST {}{path}", self.base))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("{path}: response is not JSON (HTTP {status})"))?;
        if body["status"] != "success" {
            bail!(
                "{path} {params:?}: HTTP {status}: {} {}",
                body["errorType"],
                body["error"]
            );
        }
        Ok(body["data"].clone())
    }

    /// Raw samples of every series matching `selector` with timestamps in
    /// `[start_ms, end_ms]`, keyed by label set (see [`labelset_string`]).
    /// Queried in windows of 60 s; see [`Prometheus::raw_series`].
    pub async fn raw_samples(
        &self,
        selector: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<BTreeMap<String, Vec<(i64, f64)>>> {
        let series = self.raw_series(selector, start_ms, end_ms, 60_000).await?;
        Ok(series
            .into_iter()
            .map(|(labels, samples)| (labelset_string(&labels), samples))
            .collect())
    }

    /// Raw samples per series in `[start_ms, end_ms]`, sorted by timestamp,
    /// fetched with instant queries of `selector[Nms]` (which return raw
    /// samples) over windows of `window_ms`, so no response is huge.
    pub async fn raw_series(
        &self,
        selector: &str,
        start_ms: i64,
        end_ms: i64,
        window_ms: i64,
    ) -> Result<BTreeMap<BTreeMap<String, String>, Vec<(i64, f64)>>> {
        let window_ms = window_ms.max(1);
        let mut out: BTreeMap<BTreeMap<String, String>, BTreeMap<i64, f64>> = BTreeMap::new();
        let mut a = start_ms;
        while a <= end_ms {
            let b = a.saturating_add(window_ms - 1).min(end_ms);
            // One extra millisecond so both the closed [t-r, t] of 2.x and
            // the left-open (t-r, t] of 3.x cover [a, b]; filtered below.
            let promql = format!("{selector}[{}ms]", b - a + 1);
            let data = self
                .api(
                    "/api/v1/query",
                    &[("query", promql), ("time", ms_to_secs_str(b))],
                )
                .await?;
            let result: Vec<MatrixSeries> = serde_json::from_value(data["result"].clone())
                .with_context(|| format!("unexpected result for {selector}"))?;
            for s in result {
                let entry = out.entry(s.metric).or_default();
                for (t, v) in s.values {
                    let ts = (t * 1000.0).round() as i64;
                    if ts < a || ts > b {
                        continue;
                    }
                    let v: f64 = v
                        .parse()
                        .with_context(|| format!("bad sample value {v:?}"))?;
                    entry.insert(ts, v);
                }
            }
            a = b + 1;
        }
        Ok(out
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect())
    }
}

#[derive(Deserialize)]
struct MatrixSeries {
    metric: BTreeMap<String, String>,
    values: Vec<(f64, String)>,
}

/// `{__name__="m", a="x", b="y"}`: labels sorted by name, like Prometheus
/// prints a label set.
pub fn labelset_string(labels: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
        .collect();
    format!("{{{}}}", inner.join(", "))
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the log and data for whoever investigates the failure.
            self.dir.disable_cleanup(true);
            eprintln!("--- kept prometheus dir {}", self.dir.path().display());
        }
        // `proc`'s own Drop SIGKILLs the process.
    }
}
