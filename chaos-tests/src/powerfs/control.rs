//! The control protocol of a running powerfs: one text line per request on
//! a Unix socket, one line back, `ok <json>` or `err <message>`.
//!
//! | request | effect | answer |
//! | --- | --- | --- |
//! | `ping` | | `ok {}` |
//! | `crash` | power failure (see [`Model::crash`]) | a [`CrashReport`] |
//! | `torn on\|off` | keep a random prefix of unsynced appends at a crash | `ok {}` |
//! | `fail-fsync N [FILTER]` | the next N file fsyncs (on paths containing FILTER) fail with EIO | `ok {}` |
//! | `fail-fsync-all N [FILTER]` | the same, directory fsyncs included | `ok {}` |
//! | `ignore-fsync on\|off` | file fsyncs succeed and do nothing | `ok {}` |
//! | `ignore-fsyncdir on\|off` | directory fsyncs succeed and do nothing | `ok {}` |
//! | `fsync-delay MS` | every fsync takes MS milliseconds | `ok {}` |
//! | `stats` | | [`Stats`] |
//!
//! By hand: `echo crash | socat - UNIX-CONNECT:/path/to/control.sock`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::model::{CrashReport, FailFsync, Model, Stats};

/// Executes one request line against the model; the answer line without
/// its newline.
pub fn execute(model: &Mutex<Model>, line: &str) -> String {
    match execute_inner(model, line) {
        Ok(v) => format!("ok {v}"),
        Err(e) => format!("err {e:#}"),
    }
}

fn on_off(arg: Option<&str>) -> Result<bool> {
    match arg {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        other => bail!("expected on or off, got {other:?}"),
    }
}

fn execute_inner(model: &Mutex<Model>, line: &str) -> Result<Value> {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("");
    let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
    let empty = || Value::Object(serde_json::Map::new());
    match cmd {
        "ping" => Ok(empty()),
        "crash" => {
            let r = m.crash();
            eprintln!("powerfs: crash: {}", serde_json::to_string(&r)?);
            Ok(serde_json::to_value(r)?)
        }
        "torn" => {
            m.torn = on_off(words.next())?;
            Ok(empty())
        }
        "fail-fsync" | "fail-fsync-all" => {
            let n: u64 = words
                .next()
                .ok_or_else(|| anyhow!("{cmd} needs a count"))?
                .parse()
                .context("count")?;
            m.fail = FailFsync {
                remaining: n,
                filter: words.next().map(str::to_owned),
                dirs: cmd == "fail-fsync-all",
            };
            eprintln!("powerfs: {line}");
            Ok(empty())
        }
        "ignore-fsync" => {
            m.ignore_fsync = on_off(words.next())?;
            Ok(empty())
        }
        "ignore-fsyncdir" => {
            m.ignore_fsyncdir = on_off(words.next())?;
            Ok(empty())
        }
        "fsync-delay" => {
            let ms: u64 = words
                .next()
                .ok_or_else(|| anyhow!("fsync-delay needs milliseconds"))?
                .parse()
                .context("milliseconds")?;
            m.fsync_delay = Duration::from_millis(ms);
            Ok(empty())
        }
        "stats" => {
            let mut v = serde_json::to_value(m.stats())?;
            v["fail_fsync_remaining"] = m.fail.remaining.into();
            Ok(v)
        }
        other => bail!("unknown request {other:?}"),
    }
}

/// Serves the control socket at `path` on a background thread.
pub fn serve(path: &Path, model: Arc<Mutex<Model>>) -> Result<std::thread::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("bind control socket {}", path.display()))?;
    Ok(std::thread::Builder::new()
        .name("powerfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let model = Arc::clone(&model);
                let _ = std::thread::Builder::new()
                    .name("powerfs-conn".into())
                    .spawn(move || handle(conn, &model));
            }
        })?)
}

fn handle(conn: UnixStream, model: &Mutex<Model>) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let answer = execute(model, &line);
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// A client of the control socket.
#[derive(Clone, Debug)]
pub struct Control {
    path: PathBuf,
}

impl Control {
    pub fn new(path: impl Into<PathBuf>) -> Control {
        Control { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request line; the JSON of an `ok` answer.
    pub fn request(&self, line: &str) -> Result<Value> {
        let mut s = UnixStream::connect(&self.path)
            .with_context(|| format!("connect to powerfs control {}", self.path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(s, "{line}")?;
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer)?;
        let answer = answer.trim_end();
        if let Some(json) = answer.strip_prefix("ok ") {
            Ok(serde_json::from_str(json).with_context(|| format!("bad answer {answer:?}"))?)
        } else if let Some(msg) = answer.strip_prefix("err ") {
            bail!("powerfs refused {line:?}: {msg}")
        } else {
            bail!("powerfs answered {answer:?} to {line:?}")
        }
    }

    pub fn ping(&self) -> Result<()> {
        self.request("ping").map(|_| ())
    }

    /// Power failure now.
    pub fn crash(&self) -> Result<CrashReport> {
        Ok(serde_json::from_value(self.request("crash")?)?)
    }

    pub fn set_torn(&self, on: bool) -> Result<()> {
        self.request(&format!("torn {}", if on { "on" } else { "off" }))
            .map(|_| ())
    }

    /// The next `n` file fsyncs on paths containing `filter` (any file when
    /// None) fail with EIO and make nothing durable.
    pub fn fail_fsync(&self, n: u64, filter: Option<&str>) -> Result<()> {
        self.request(&format!("fail-fsync {n} {}", filter.unwrap_or("")))
            .map(|_| ())
    }

    /// Like [`Control::fail_fsync`], directory fsyncs included.
    pub fn fail_fsync_all(&self, n: u64, filter: Option<&str>) -> Result<()> {
        self.request(&format!("fail-fsync-all {n} {}", filter.unwrap_or("")))
            .map(|_| ())
    }

    /// File fsyncs succeed without making anything durable.
    pub fn ignore_fsync(&self, on: bool) -> Result<()> {
        self.request(&format!("ignore-fsync {}", if on { "on" } else { "off" }))
            .map(|_| ())
    }

    /// Directory fsyncs succeed without making anything durable.
    pub fn ignore_fsyncdir(&self, on: bool) -> Result<()> {
        self.request(&format!(
            "ignore-fsyncdir {}",
            if on { "on" } else { "off" }
        ))
        .map(|_| ())
    }

    /// Every fsync (file or directory) takes `d` from now on.
    pub fn set_fsync_delay(&self, d: Duration) -> Result<()> {
        self.request(&format!("fsync-delay {}", d.as_millis()))
            .map(|_| ())
    }

    pub fn stats(&self) -> Result<Stats> {
        Ok(serde_json::from_value(self.request("stats")?)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn requests_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let model = Arc::new(Mutex::new(Model::new(3, false, 0, 0)));
        serve(&sock, Arc::clone(&model)).unwrap();
        let c = Control::new(&sock);
        c.ping().unwrap();
        c.fail_fsync(2, Some("/wal/")).unwrap();
        assert_eq!(model.lock().unwrap().fail.remaining, 2);
        assert_eq!(model.lock().unwrap().fail.filter.as_deref(), Some("/wal/"));
        c.fail_fsync(1, None).unwrap();
        assert_eq!(model.lock().unwrap().fail.filter, None);
        c.set_torn(true).unwrap();
        c.set_fsync_delay(Duration::from_millis(3)).unwrap();
        assert_eq!(model.lock().unwrap().fsync_delay, Duration::from_millis(3));
        assert!(model.lock().unwrap().torn);
        assert_eq!(c.crash().unwrap(), CrashReport::default());
        assert_eq!(c.stats().unwrap().crashes, 1);
        let err = c.request("explode").unwrap_err().to_string();
        assert!(err.contains("unknown request"), "{err}");
    }
}
