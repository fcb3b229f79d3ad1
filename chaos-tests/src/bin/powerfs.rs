//! `powerfs`: mounts the power-loss filesystem (see
//! `chaos_tests::powerfs`) and serves it until unmounted
//! (`fusermount3 -u MOUNTPOINT`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use chaos_tests::powerfs::{control, fuse::FuseFs, model::Model};
use clap::Parser;
use fuser::{Config, MountOption, Session};

#[derive(Parser, Debug)]
#[command(name = "powerfs", version, about)]
struct Args {
    /// Where to mount (an existing, empty directory).
    mountpoint: PathBuf,
    /// The control socket (see chaos_tests::powerfs::control).
    #[arg(long)]
    control: PathBuf,
    /// Seeds the torn-write choices of crashes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// At a crash, keep a random prefix of the bytes appended since the
    /// last fsync (a torn write) instead of none.
    #[arg(long)]
    torn: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// How long every fsync takes, in milliseconds.
    #[arg(long, default_value_t = 0)]
    fsync_delay_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let meta = std::fs::metadata(&args.mountpoint)
        .with_context(|| format!("mountpoint {}", args.mountpoint.display()))?;
    let (uid, gid) = {
        use std::os::unix::fs::MetadataExt;
        (meta.uid(), meta.gid())
    };
    let mut m = Model::new(args.seed, args.torn, uid, gid);
    m.fsync_delay = std::time::Duration::from_millis(args.fsync_delay_ms);
    let model = Arc::new(Mutex::new(m));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("powerfs".into()),
        MountOption::Subtype("powerfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    config.n_threads = Some(args.threads.max(1));
    let session = Session::new(FuseFs::new(Arc::clone(&model)), &args.mountpoint, &config)
        .with_context(|| format!("mount powerfs on {}", args.mountpoint.display()))?;
    control::serve(&args.control, Arc::clone(&model))?;
    eprintln!(
        "powerfs: mounted on {} (seed {}, torn {}), control {}",
        args.mountpoint.display(),
        args.seed,
        args.torn,
        args.control.display()
    );
    session.run().context("FUSE session")?;
    let stats = model.lock().unwrap_or_else(|p| p.into_inner()).stats();
    eprintln!(
        "powerfs: unmounted; {}",
        serde_json::to_string(&stats).unwrap_or_default()
    );
    Ok(())
}
