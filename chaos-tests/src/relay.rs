//! The walrelay binary under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::http::client;
use crate::ports::try_free_port;
use crate::process::Proc;

/// The walrelay binary: `$WALRELAY_BIN`, else the newest of
/// `{$CARGO_TARGET_DIR, <workspace>/target}/{debug,release}/walrelay`.
pub fn walrelay_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WALRELAY_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("WALRELAY_BIN={} does not exist", p.display());
    }
    let root = workspace_root();
    let mut target_dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        target_dirs.push(if t.is_absolute() { t } else { root.join(t) });
    }
    target_dirs.push(root.join("target"));
    let candidates: Vec<PathBuf> = target_dirs
        .iter()
        .flat_map(|t| ["debug", "release"].map(|p| t.join(p).join("walrelay")))
        .collect();
    let newest = candidates
        .iter()
        .filter_map(|p| {
            let m = p.metadata().ok()?;
            m.is_file()
                .then(|| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), p.clone()))
        })
        .max();
    match newest {
        Some((_, p)) => Ok(p),
        None => bail!(
            "the walrelay binary is not built: run `cargo build --bin walrelay` in {} \
             (or set WALRELAY_BIN); looked at {candidates:?}",
            root.display()
        ),
    }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// A walrelay `serve` process on a free port.
pub struct Relay {
    bin: PathBuf,
    data_dir: PathBuf,
    replicas: Vec<(String, String)>,
    extra_args: Vec<String>,
    port: u16,
    /// `--admin-listen` port: readiness and status are read there (the main
    /// port may speak TLS or demand client certificates).
    admin_port: Option<u16>,
    log_dir: tempfile::TempDir,
    proc: Option<Proc>,
    http: reqwest::Client,
    ready_timeout: Duration,
}

impl Relay {
    /// Spawns `walrelay serve --listen 127.0.0.1:PORT --data-dir DIR
    /// --replica NAME=URL... EXTRA...` and waits for `GET /-/ready` = 200.
    pub async fn start(
        data_dir: impl AsRef<Path>,
        replicas: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Result<Relay> {
        Self::start_with_bin(walrelay_bin()?, data_dir, replicas, extra_args).await
    }

    /// [`Relay::start`] with another binary (another build, or a stand-in).
    pub async fn start_with_bin(
        bin: impl Into<PathBuf>,
        data_dir: impl AsRef<Path>,
        replicas: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Result<Relay> {
        Self::start_inner(bin.into(), data_dir.as_ref(), replicas, extra_args, false).await
    }

    /// [`Relay::start_with_bin`] with `--admin-listen` on a second free
    /// port, where readiness, status and metrics are then read: for a main
    /// listener with TLS (`extra_args` carry `--tls-cert-file` etc.).
    pub async fn start_with_admin(
        bin: impl Into<PathBuf>,
        data_dir: impl AsRef<Path>,
        replicas: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Result<Relay> {
        Self::start_inner(bin.into(), data_dir.as_ref(), replicas, extra_args, true).await
    }

    async fn start_inner(
        bin: PathBuf,
        data_dir: &Path,
        replicas: &[(&str, &str)],
        extra_args: &[&str],
        admin: bool,
    ) -> Result<Relay> {
        let log_dir = tempfile::Builder::new()
            .prefix("chaos-walrelay-")
            .tempdir()?;
        let mut r = Relay {
            bin,
            data_dir: data_dir.to_path_buf(),
            replicas: replicas
                .iter()
                .map(|(n, u)| (n.to_string(), u.to_string()))
                .collect(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            port: 0,
            admin_port: None,
            log_dir,
            proc: None,
            http: client(Duration::from_secs(30))?,
            ready_timeout: Duration::from_secs(30),
        };
        let mut last = None;
        for _ in 0..5 {
            r.port = try_free_port()?;
            if admin {
                r.admin_port = Some(try_free_port()?);
            }
            match r.launch().await {
                Ok(()) => return Ok(r),
                Err(e) if addr_in_use(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no port")))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir);
        for (name, url) in &self.replicas {
            cmd.arg("--replica").arg(format!("{name}={url}"));
        }
        if let Some(p) = self.admin_port {
            cmd.arg("--admin-listen").arg(format!("127.0.0.1:{p}"));
        }
        cmd.args(&self.extra_args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }

    async fn launch(&mut self) -> Result<()> {
        let proc = Proc::spawn_logging_to("walrelay", self.command(), &self.log_path())?;
        self.proc = Some(proc);
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        let url = format!("{}/-/ready", self.admin_url());
        loop {
            if let Some(p) = &self.proc {
                if let Some(st) = p.try_exit()? {
                    bail!(
                        "walrelay exited ({st}) before it was ready; log tail:\n{}",
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
                bail!(
                    "walrelay on port {} not ready within {:?}; log tail:\n{}",
                    self.port,
                    self.ready_timeout,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where metrics, health and status are read: the admin address when
    /// there is one, else [`Relay::url`].
    pub fn admin_url(&self) -> String {
        match self.admin_port {
            Some(p) => format!("http://127.0.0.1:{p}"),
            None => self.url(),
        }
    }

    /// `http://127.0.0.1:PORT/api/v1/write`
    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(|p| p.is_running())
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_dir.path().join("walrelay.log")
    }

    /// The last lines of the log of every run of this relay.
    pub fn log_tail(&self, n: usize) -> String {
        crate::process::log_tail(&self.log_path(), n)
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response> {
        let resp = self
            .http
            .get(format!("{}{path}", self.admin_url()))
            .send()
            .await
            .with_context(|| format!("GET {path} from walrelay on port {}", self.port))?;
        if !resp.status().is_success() {
            bail!("GET {path}: HTTP {}", resp.status());
        }
        Ok(resp)
    }

    /// `GET /api/v1/status` as JSON.
    pub async fn status(&self) -> Result<Value> {
        Ok(self.get("/api/v1/status").await?.json().await?)
    }

    /// `GET /metrics` (Prometheus text format).
    pub async fn metrics_text(&self) -> Result<String> {
        Ok(self.get("/metrics").await?.text().await?)
    }

    /// Sum of all samples of metric `name` in `/metrics` whose label set
    /// contains every `name="value"` in `labels`.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_sum(&self.metrics_text().await?, name, labels))
    }

    /// Waits until [`Self::metric_sum`] of `name` with `labels` is `want`
    /// (a scrape that fails, e.g. during a restart, is waited through).
    ///
    /// # Errors
    /// Not so within `timeout`: the last value and the relay's log tail.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        timeout: Duration,
    ) -> Result<()> {
        self.wait_metric_until(name, labels, &format!("{want}"), |v| v == want, timeout)
            .await
    }

    /// Waits until [`Self::metric_sum`] of `name` with `labels` satisfies
    /// `ok` (described as `want` in the error), as [`Self::wait_metric`].
    ///
    /// # Errors
    /// Not so within `timeout`: the last value and the relay's log tail.
    pub async fn wait_metric_until(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: &str,
        ok: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.metric_sum(name, labels).await;
            if got.as_ref().is_ok_and(|&v| ok(v)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name}{labels:?} is {got:?}, not {want}, after {timeout:?}; log:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `walrelay wal verify` on the data directory (the relay stopped
    /// first: it reads every record from disk).
    ///
    /// # Errors
    /// The command failed to run or found damage: its output.
    pub fn verify_log(&self) -> Result<()> {
        let out = std::process::Command::new(&self.bin)
            .args(["wal", "verify", "--data-dir"])
            .arg(&self.data_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "wal verify: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// SIGKILL and reap (the data directory stays).
    pub fn sigkill(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.sigkill()?;
        }
        Ok(())
    }

    pub fn sigstop(&self) -> Result<()> {
        self.running()?.sigstop()
    }

    pub fn sigcont(&self) -> Result<()> {
        self.running()?.sigcont()
    }

    fn running(&self) -> Result<&Proc> {
        self.proc
            .as_ref()
            .ok_or_else(|| anyhow!("walrelay is not running"))
    }

    /// SIGTERM and wait up to `grace` for a clean exit (SIGKILL after).
    pub async fn stop(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        let p = self
            .proc
            .take()
            .ok_or_else(|| anyhow!("walrelay is not running"))?;
        p.terminate(grace).await
    }

    /// Replaces the extra arguments (those after `--replica`) that the next
    /// [`Relay::restart`] passes: a setting changed between two runs.
    pub fn set_extra_args(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    }

    /// Starts again with the same arguments, port and data dir. A relay
    /// still running is stopped with SIGTERM first (SIGKILL after 30 s).
    pub async fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            self.stop(Duration::from_secs(30)).await?;
        }
        let mut last = None;
        for _ in 0..10 {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) if addr_in_use(&e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("cannot restart walrelay")))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.log_dir.disable_cleanup(true);
            eprintln!(
                "--- kept walrelay log dir {}",
                self.log_dir.path().display()
            );
        }
    }
}

fn addr_in_use(e: &anyhow::Error) -> bool {
    let s = format!("{e:#}").to_ascii_lowercase();
    s.contains("address already in use") || s.contains("addrinuse")
}

/// Sum of the samples of `name` in a Prometheus text exposition whose
/// labels include every `(label, value)` of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value_part) = if let Some(r) = rest.strip_prefix('{') {
            match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        if !labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Some(v) = value_part
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            sum += v;
        }
    }
    sum
}

/// One replica's entry in a relay's `/api/v1/status`; panics (in a test)
/// naming the replica when it is missing.
pub fn replica_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no replica {name} in the status: {status:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_metrics() {
        let text = "# HELP x y\nwalrelay_acked_total{replica=\"a\"} 3\nwalrelay_acked_total{replica=\"b\"} 4\nwalrelay_acked_total_bytes 9\nup 1\n";
        assert_eq!(metric_sum(text, "walrelay_acked_total", &[]), 7.0);
        assert_eq!(
            metric_sum(text, "walrelay_acked_total", &[("replica", "b")]),
            4.0
        );
        assert_eq!(metric_sum(text, "up", &[]), 1.0);
    }
}
