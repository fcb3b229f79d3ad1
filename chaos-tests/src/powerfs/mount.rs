//! A mounted powerfs for a test: spawns the `powerfs` binary on a fresh
//! mountpoint, waits until the mount is live, and unmounts it
//! (`fusermount3 -u`, then lazily with `-uz`) and kills the process when
//! dropped.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::control::Control;
use super::model::{CrashReport, Stats};
use crate::process::Proc;

/// How to start powerfs.
#[derive(Clone, Debug)]
pub struct PowerFsOpts {
    /// Seeds the torn-write choices.
    pub seed: u64,
    /// Keep a random prefix of unsynced appends at a crash.
    pub torn: bool,
    /// FUSE worker threads.
    pub threads: usize,
}

impl Default for PowerFsOpts {
    fn default() -> Self {
        PowerFsOpts {
            seed: 0,
            torn: true,
            threads: 2,
        }
    }
}

/// The `powerfs` binary: `$POWERFS_BIN`, else the newest
/// `{$CARGO_TARGET_DIR, <workspace>/target}/{debug,release}/powerfs`.
/// Integration tests of this crate pass `env!("CARGO_BIN_EXE_powerfs")`
/// to [`PowerFs::start_with_bin`] instead.
pub fn powerfs_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("POWERFS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = crate::relay::workspace_root();
    let mut dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        dirs.push(if t.is_absolute() { t } else { root.join(t) });
    }
    dirs.push(root.join("target"));
    dirs.iter()
        .flat_map(|t| ["debug", "release"].map(|p| t.join(p).join("powerfs")))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .with_context(|| {
            "the powerfs binary is not built: run `cargo build -p chaos-tests --bin powerfs`"
        })
}

/// A mounted powerfs.
pub struct PowerFs {
    dir: tempfile::TempDir,
    mountpoint: PathBuf,
    control: Control,
    proc: Option<Proc>,
    mounted: bool,
}

impl PowerFs {
    /// Mounts with the binary found by [`powerfs_bin`].
    pub fn start(opts: PowerFsOpts) -> Result<PowerFs> {
        Self::start_with_bin(powerfs_bin()?, opts)
    }

    /// Mounts a fresh, empty powerfs on a new temp dir and waits until it
    /// answers.
    pub fn start_with_bin(bin: impl AsRef<Path>, opts: PowerFsOpts) -> Result<PowerFs> {
        let fusermount = fusermount_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("chaos-powerfs-")
            .tempdir()?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)?;
        let sock = dir.path().join("control.sock");
        let mut cmd = Command::new(bin.as_ref());
        cmd.arg(&mountpoint)
            .arg("--control")
            .arg(&sock)
            .arg("--seed")
            .arg(opts.seed.to_string())
            .arg("--threads")
            .arg(opts.threads.to_string());
        if opts.torn {
            cmd.arg("--torn");
        }
        let proc = Proc::spawn_logging_to("powerfs", cmd, &dir.path().join("powerfs.log"))?;
        let mut fs = PowerFs {
            control: Control::new(&sock),
            dir,
            mountpoint,
            proc: Some(proc),
            mounted: false,
        };
        let parent_dev = fs.dir.path().metadata()?.dev();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = &fs.proc {
                if let Some(st) = p.try_exit()? {
                    bail!(
                        "powerfs exited ({st}) before it was mounted (is /dev/fuse there, and \
                         {} installed?); log:\n{}",
                        fusermount.display(),
                        p.log_tail(30)
                    );
                }
            }
            let dev = fs.mountpoint.metadata().map(|m| m.dev()).ok();
            if dev.is_some_and(|d| d != parent_dev) && fs.control.ping().is_ok() {
                fs.mounted = true;
                return Ok(fs);
            }
            if Instant::now() >= deadline {
                bail!(
                    "powerfs did not mount {} within 20s; log:\n{}",
                    fs.mountpoint.display(),
                    fs.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn control(&self) -> &Control {
        &self.control
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    pub fn log_tail(&self, n: usize) -> String {
        crate::process::log_tail(&self.dir.path().join("powerfs.log"), n)
    }

    /// Creates `mountpoint/rel` (one level) and makes it durable by
    /// fsyncing the mountpoint: a data directory that exists before the
    /// program under test starts, like a volume's mount.
    pub fn mkdir_durable(&self, rel: &str) -> Result<PathBuf> {
        let p = self.mountpoint.join(rel);
        std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
        sync_dir(&self.mountpoint)?;
        Ok(p)
    }

    /// Power failure: see [`super::model::Model::crash`]. Whoever uses the
    /// filesystem should be dead first (SIGKILL), as after a real one.
    pub fn crash(&self) -> Result<CrashReport> {
        self.control.crash()
    }

    pub fn fail_fsync(&self, n: u64, filter: Option<&str>) -> Result<()> {
        self.control.fail_fsync(n, filter)
    }

    pub fn stats(&self) -> Result<Stats> {
        self.control.stats()
    }

    /// Unmounts (lazily if busy) and stops the process.
    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            self.mounted = false;
            let fm = fusermount_bin()?;
            let ok = Command::new(&fm)
                .arg("-u")
                .arg(&self.mountpoint)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let lazy = Command::new(&fm)
                    .arg("-uz")
                    .arg(&self.mountpoint)
                    .status()
                    .with_context(|| format!("{} -uz", fm.display()))?;
                if !lazy.success() {
                    bail!("cannot unmount {}", self.mountpoint.display());
                }
            }
        }
        if let Some(p) = self.proc.take() {
            // Unmounting ends the session loop; give it a moment.
            if p.wait_exit(Duration::from_secs(5)).is_err() {
                p.sigkill()?;
            }
        }
        Ok(())
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- powerfs log tail:\n{}", self.log_tail(20));
        }
        if let Err(e) = self.unmount() {
            eprintln!("powerfs: {e:#}");
        }
        // If the mount is still there (the process was killed), try once
        // more lazily so the temp dir can go.
        if let Ok(fm) = fusermount_bin() {
            let _ = Command::new(fm)
                .arg("-uz")
                .arg(&self.mountpoint)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// fsync of a directory.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync directory {}", dir.display()))
}

fn fusermount_bin() -> Result<PathBuf> {
    for d in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(d).join("fusermount3");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "`fusermount3` is not installed: the power-loss tests need Debian's `fuse3` package \
         (`apt-get install -y fuse3`) and /dev/fuse"
    )
}
