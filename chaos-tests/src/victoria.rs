//! A real single-node VictoriaMetrics (Debian's `victoria-metrics` package)
//! as a replica: it accepts remote-write 1.0 at `/api/v1/write`, takes
//! samples in any order, and answers the Prometheus query API.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::http::client;
use crate::ports::try_free_port;
use crate::process::Proc;
use crate::prometheus::PromApi;
use crate::tools;

/// See the module documentation. Killed with its handle; its storage is a
/// temp dir of its own, kept across [`VictoriaMetrics::stop`] and
/// [`VictoriaMetrics::start_again`].
pub struct VictoriaMetrics {
    dir: tempfile::TempDir,
    port: u16,
    proc: Option<Proc>,
    http: reqwest::Client,
}

impl VictoriaMetrics {
    /// Starts one on a free port and waits until it answers `/health`.
    pub async fn start() -> Result<VictoriaMetrics> {
        tools::VICTORIA_METRICS.path()?;
        let dir = tempfile::Builder::new().prefix("chaos-vm-").tempdir()?;
        let mut vm = VictoriaMetrics {
            dir,
            port: 0,
            proc: None,
            http: client(Duration::from_secs(10))?,
        };
        let mut last = None;
        for _ in 0..5 {
            vm.port = try_free_port()?;
            match vm.launch().await {
                Ok(()) => return Ok(vm),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no port")))
    }

    fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(tools::VICTORIA_METRICS.path()?);
        cmd.arg(format!("-storageDataPath={}", self.storage().display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg("-retentionPeriod=100y")
            // Queries see samples as soon as they are stored (the default
            // hides the last 30 s), and no cached answer hides new ones.
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            .arg("-loggerLevel=WARN");
        cmd.current_dir(self.dir.path());
        Ok(cmd)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = self.log_path();
        self.proc = Some(Proc::spawn_logging_to(
            "victoria-metrics",
            self.command()?,
            &log,
        )?);
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/health", self.url());
        loop {
            if let Some(st) = self.proc.as_ref().and_then(|p| p.try_exit().ok().flatten()) {
                let tail = self
                    .proc
                    .as_ref()
                    .map(|p| p.log_tail(20))
                    .unwrap_or_default();
                self.proc = None;
                bail!("victoria-metrics exited ({st}) before it was ready:\n{tail}");
            }
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "victoria-metrics on port {} not ready within 30s",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/api/v1/write`
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    /// Its Prometheus-compatible query API.
    pub fn api(&self) -> Result<PromApi> {
        PromApi::new(self.url())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("victoria-metrics.log")
    }

    /// `GET /internal/force_flush`: makes every sample received so far
    /// searchable (VictoriaMetrics otherwise buffers them for about a
    /// second), so an oracle query right after a load sees all of it.
    ///
    /// # Errors
    /// The request fails or is not answered 2xx.
    pub async fn force_flush(&self) -> Result<()> {
        let r = self
            .http
            .get(format!("{}/internal/force_flush", self.url()))
            .send()
            .await
            .context("GET /internal/force_flush")?;
        if !r.status().is_success() {
            bail!("/internal/force_flush: HTTP {}", r.status());
        }
        Ok(())
    }

    /// SIGTERM (it flushes what it holds in memory), SIGKILL after 30 s;
    /// the storage stays.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.terminate(Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Starts a stopped one again on the same port with the same storage.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.proc.is_some() {
            bail!("victoria-metrics is already running");
        }
        let mut last = None;
        for _ in 0..10 {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("cannot restart victoria-metrics")))
    }
}
