//! Child processes that never outlive the test that started them.
//!
//! Every [`Proc`] writes stdout and stderr to a log file, is killed with
//! SIGKILL and reaped when dropped (also while a test panics), and is spawned
//! with `PR_SET_PDEATHSIG = SIGKILL` from a long-lived spawner thread, so it
//! also dies when the whole test process is killed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A spawned child process with its own log file.
pub struct Proc {
    name: String,
    pid: u32,
    child: Mutex<Child>,
    exit: Mutex<Option<ExitStatus>>,
    log_path: PathBuf,
    /// Set when the Proc created its own log directory.
    own_dir: Option<tempfile::TempDir>,
    cmdline: String,
}

impl Proc {
    /// Spawns `cmd` with stdout/stderr going to `<new temp dir>/<name>.log`.
    pub fn spawn(name: &str, cmd: Command) -> Result<Proc> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("chaos-{name}-"))
            .tempdir()
            .context("create a temp dir for the process log")?;
        let log_path = dir.path().join(format!("{name}.log"));
        let mut p = Self::spawn_logging_to(name, cmd, &log_path)?;
        p.own_dir = Some(dir);
        Ok(p)
    }

    /// Spawns `cmd` appending its stdout/stderr to `log_path` (so a restarted
    /// server keeps one log with every run in it). The caller owns the file.
    pub fn spawn_logging_to(name: &str, mut cmd: Command, log_path: &Path) -> Result<Proc> {
        let cmdline = format!("{cmd:?}");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open log file {}", log_path.display()))?;
        writeln!(log, "=== chaos-tests: starting {name}: {cmdline}")?;
        let err_log = log.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        sys::kill_with_parent(&mut cmd);
        let child =
            spawn_from_spawner_thread(cmd).with_context(|| format!("spawn {name}: {cmdline}"))?;
        Ok(Proc {
            name: name.to_string(),
            pid: child.id(),
            child: Mutex::new(child),
            exit: Mutex::new(None),
            log_path: log_path.to_path_buf(),
            own_dir: None,
            cmdline,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status if the process has exited (reaps it), else None.
    pub fn try_exit(&self) -> Result<Option<ExitStatus>> {
        let mut exit = lock(&self.exit);
        if let Some(st) = *exit {
            return Ok(Some(st));
        }
        let st = lock(&self.child).try_wait()?;
        *exit = st;
        Ok(st)
    }

    pub fn is_running(&self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// Sends `sig` unless the process has already been reaped (its pid could
    /// belong to someone else by then).
    pub fn signal(&self, sig: i32) -> Result<()> {
        if self.try_exit()?.is_some() {
            bail!("{} (pid {}) has already exited", self.name, self.pid);
        }
        sys::kill(self.pid, sig)
    }

    /// SIGKILL and reap.
    pub fn sigkill(&self) -> Result<ExitStatus> {
        if let Some(st) = self.try_exit()? {
            return Ok(st);
        }
        sys::kill(self.pid, libc::SIGKILL)?;
        let st = lock(&self.child).wait()?;
        *lock(&self.exit) = Some(st);
        Ok(st)
    }

    pub fn sigterm(&self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    pub fn sigstop(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    pub fn sigcont(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Polls for exit (blocking the thread) until `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) did not exit within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.pid,
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Like [`Proc::wait_exit`] without blocking the async runtime.
    pub async fn wait_exit_async(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) did not exit within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.pid,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub async fn terminate(&self, grace: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_exit()? {
            return Ok(st);
        }
        // A stopped process does not act on SIGTERM until continued.
        let _ = sys::kill(self.pid, libc::SIGCONT);
        sys::kill(self.pid, libc::SIGTERM)?;
        match self.wait_exit_async(grace).await {
            Ok(st) => Ok(st),
            Err(_) => self.sigkill(),
        }
    }

    /// The last `n` lines of the log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.sigkill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}) log tail, {} ---\n{}",
                self.name,
                self.pid,
                self.log_path.display(),
                self.log_tail(40)
            );
            if let Some(dir) = self.own_dir.take() {
                let kept = dir.keep();
                eprintln!("--- kept {} for inspection", kept.display());
            }
        }
    }
}

/// The last `n` lines of a file, or a note that it cannot be read.
pub fn log_tail(path: &Path, n: usize) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        // Lines are short; 64 KiB per requested line at most is plenty.
        let want = (n as u64).saturating_mul(512).clamp(4096, 1 << 20);
        f.seek(SeekFrom::Start(len.saturating_sub(want)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type SpawnReply = mpsc::Sender<io::Result<Child>>;

/// Children are forked from one thread that lives as long as the test
/// process: `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
/// exits, and test or runtime threads come and go.
fn spawn_from_spawner_thread(cmd: Command) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(Command, SpawnReply)>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
        let spawned = std::thread::Builder::new()
            .name("chaos-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            eprintln!("chaos-tests: cannot start the spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    lock(tx)
        .send((cmd, reply_tx))
        .map_err(|_| anyhow!("the spawner thread is gone"))?;
    let child = reply_rx
        .recv()
        .map_err(|_| anyhow!("the spawner thread did not answer"))??;
    Ok(child)
}

/// The only unsafe code of the crate: raw signals and the pre-exec hook.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use anyhow::{bail, Result};

    pub fn kill(pid: u32, sig: i32) -> Result<()> {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            bail!("pid {pid} out of range");
        };
        if pid <= 0 {
            bail!("refusing to signal pid {pid}");
        }
        // SAFETY: kill(2) has no memory-safety preconditions; pid > 0 names
        // exactly one process (our unreaped child).
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            bail!("kill({pid}, {sig}) failed: {}", io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes the child receive SIGKILL when the forking thread exits.
    pub fn kill_with_parent(cmd: &mut Command) {
        let parent = std::process::id();
        // SAFETY: the hook runs in the forked child before exec and only
        // calls async-signal-safe functions (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent died between fork and prctl: exit now.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
}
