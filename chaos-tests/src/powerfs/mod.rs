//! powerfs: a FUSE filesystem that models a disk with a volatile write
//! cache, for power-loss and fsync-failure tests.
//!
//! Every file keeps a *written* copy (what reads see) and a *durable* copy
//! (as of its last fsync/fdatasync); every directory keeps its live entries
//! and its *durable* entries (as of its last fsync). A `crash` request is a
//! power failure: files revert to their durable bytes (optionally keeping a
//! seeded random prefix of the bytes appended since, a torn write),
//! directories to their durable entries, so an unsynced creation vanishes
//! and an unsynced unlink or rename is undone. A `fail-fsync N` request makes
//! the next N fsyncs fail with EIO without making anything durable, and, as
//! on Linux after a write-back error, the data they covered never becomes
//! durable even if a later fsync succeeds.
//!
//! * [`model`]: the filesystem state and its rules (no FUSE; unit-tested).
//! * [`fuse`]: the `fuser` adapter the `powerfs` binary serves.
//! * [`control`]: the control socket protocol and its client.
//! * [`mount`]: [`PowerFs`], a mounted instance for a test.
//!
//! ```text
//! cargo build -p chaos-tests --bin powerfs
//! target/debug/powerfs /mnt/p --control /tmp/p.sock --seed 7 --torn &
//! echo crash | socat - UNIX-CONNECT:/tmp/p.sock
//! fusermount3 -u /mnt/p
//! ```
//!
//! Needs `/dev/fuse` and Debian's `fuse3` package (fusermount3); as root the
//! mount itself needs neither setuid helper nor `allow_other`.

pub mod control;
pub mod fuse;
pub mod model;
pub mod mount;

pub use control::Control;
pub use model::{CrashReport, Stats};
pub use mount::{powerfs_bin, sync_dir, PowerFs, PowerFsOpts};
