//! Two nginx null sinks: every POST is answered 204 after its body is read.
//! The access log records, per request, the port, the body length and the
//! `Content-Encoding` / `Content-Type` / `User-Agent`, so the benchmark can
//! show what each system really sent. `GET /metrics` serves a file for real
//! senders to scrape ([`NullSinks::serve_metrics`]), unlogged.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chaos_tests::ports::{try_free_port, wait_for_tcp};
use chaos_tests::tools::NGINX;
use chaos_tests::Proc;

pub struct NullSinks {
    dir: tempfile::TempDir,
    pub ports: [u16; 2],
    proc: Option<Proc>,
}

/// What one sink received between two [`NullSinks::log_offset`]s.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SinkTraffic {
    pub requests: u64,
    pub request_bytes: u64,
    /// Requests by `Content-Encoding` / `Content-Type` / `User-Agent`.
    pub kinds: BTreeMap<String, u64>,
}

impl NullSinks {
    pub async fn start() -> Result<NullSinks> {
        let bin = NGINX.path()?;
        let dir = tempfile::Builder::new()
            .prefix("walrelay-bench-nginx-")
            .tempdir()?;
        let mut last = None;
        for _ in 0..5 {
            let ports = [try_free_port()?, try_free_port()?];
            if ports[0] == ports[1] {
                continue;
            }
            let conf = config(dir.path(), ports);
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf)?;
            std::fs::create_dir_all(dir.path().join("logs"))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("-c")
                .arg(&conf_path)
                .arg("-p")
                .arg(dir.path())
                .arg("-g")
                .arg("daemon off;");
            let proc = Proc::spawn_logging_to("nginx", cmd, &dir.path().join("nginx.out"))?;
            let up = async {
                for p in ports {
                    wait_for_tcp(("127.0.0.1", p), Duration::from_secs(10)).await?;
                }
                anyhow::Ok(())
            }
            .await;
            match up {
                Ok(()) if proc.is_running() => {
                    return Ok(NullSinks {
                        dir,
                        ports,
                        proc: Some(proc),
                    })
                }
                Ok(()) => last = Some(anyhow::anyhow!("nginx exited: {}", proc.log_tail(20))),
                Err(e) => last = Some(e.context(proc.log_tail(20))),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nginx did not start")))
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.ports[i])
    }

    /// Makes `GET /metrics` on both sinks answer `text` (a Prometheus
    /// exposition).
    pub fn serve_metrics(&self, text: &str) -> Result<()> {
        std::fs::write(self.dir.path().join("metrics.txt"), text).context("write metrics.txt")
    }

    /// `host:port` of sink `i`, as a scrape target.
    pub fn metrics_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("logs").join("access.log")
    }

    /// The access log's current length: pass it to [`Self::traffic_since`].
    pub fn log_offset(&self) -> u64 {
        self.access_log().metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// Per sink (index 0 and 1), what arrived since `offset`.
    pub fn traffic_since(&self, offset: u64) -> Result<[SinkTraffic; 2]> {
        let mut f = std::fs::File::open(self.access_log()).context("open nginx access log")?;
        f.seek(SeekFrom::Start(offset))?;
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        let mut out = [SinkTraffic::default(), SinkTraffic::default()];
        for line in text.lines() {
            // port method length encoding "type" "agent"
            let mut it = line.splitn(4, ' ');
            let (Some(port), Some(_method), Some(len), Some(rest)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            let Some(i) = self.ports.iter().position(|p| *p == port) else {
                continue;
            };
            out[i].requests += 1;
            out[i].request_bytes += len.parse::<u64>().unwrap_or(0);
            *out[i].kinds.entry(rest.to_string()).or_default() += 1;
        }
        Ok(out)
    }

    /// Stops nginx with SIGTERM (its master then stops the worker; SIGKILL
    /// would orphan the worker), SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            if p.sigterm().is_ok() && p.wait_exit(Duration::from_secs(5)).is_ok() {
                return;
            }
            let _ = p.sigkill();
        }
    }

    pub fn check_running(&self) -> Result<()> {
        match &self.proc {
            Some(p) if p.is_running() => Ok(()),
            Some(p) => bail!("nginx exited: {}", p.log_tail(20)),
            None => bail!("nginx is stopped"),
        }
    }
}

impl Drop for NullSinks {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(prefix: &Path, ports: [u16; 2]) -> String {
    let p = prefix.display();
    format!(
        r#"# walrelay-bench: two remote-write null sinks.
user root;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  client_body_temp_path {p}/body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  log_format rw '$server_port $request_method $content_length $http_content_encoding "$http_content_type" "$http_user_agent"';
  access_log {p}/logs/access.log rw buffer=64k flush=1s;
  client_max_body_size 256m;
  client_body_buffer_size 1m;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{a}; location / {{ return 204; }} location = /metrics {{ access_log off; default_type "text/plain; version=0.0.4"; alias {p}/metrics.txt; }} }}
  server {{ listen 127.0.0.1:{b}; location / {{ return 204; }} location = /metrics {{ access_log off; default_type "text/plain; version=0.0.4"; alias {p}/metrics.txt; }} }}
}}
"#,
        a = ports[0],
        b = ports[1],
    )
}
