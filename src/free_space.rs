//! The space the log may still use on its filesystem: what the commit
//! thread checks before every group commit and the repacker before it
//! writes a segment again.

use std::time::Instant;

/// Free space the log leaves on its filesystem (at most a quarter of it):
/// the replicas' checkpoint store lives on the same volume, and a replica
/// whose position cannot be written can never advance, so the segments it
/// holds could never be deleted and a full disk would never drain.
const DISK_RESERVE_BYTES: u64 = 16 << 20;

/// How long a commit far from a full disk goes on the filesystem's last
/// answer, less what the log wrote since, before asking again: statvfs at
/// every group commit was 1.9 % of the relay's CPU fed by a Prometheus
/// agent (`benches/README.md`).
const SPACE_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Below this much space left by that estimate, every commit asks the
/// filesystem: near the edge the answer is always fresh, and whatever else
/// writes to the volume would have to write this much in [`SPACE_RECHECK`]
/// to get past the check (and would then meet the writer's own ENOSPC
/// handling, which refuses the batch as well).
const SPACE_NEAR_FULL: u64 = 256 << 20;

/// [`disk_space_left`] for the commit thread, asked of the filesystem at
/// most every [`SPACE_RECHECK`] while far from full (see there).
pub(crate) struct FreeSpace {
    dir: std::path::PathBuf,
    /// The last answer and when it was asked.
    last: Option<(Instant, Option<u64>)>,
    /// Bytes the log wrote since, or more.
    written: u64,
}

impl FreeSpace {
    pub(crate) fn new(dir: &std::path::Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            last: None,
            written: 0,
        }
    }

    pub(crate) fn left(&mut self) -> Option<u64> {
        match self.estimate(Instant::now()) {
            Some(estimate) => estimate,
            None => self.fresh(),
        }
    }

    /// The last answer less what was written since, if it still stands at
    /// `now`.
    fn estimate(&self, now: Instant) -> Option<Option<u64>> {
        let (at, answer) = self.last?;
        let estimate = answer.map(|left| left.saturating_sub(self.written));
        let near_full = estimate.is_some_and(|left| left < SPACE_NEAR_FULL);
        (now.duration_since(at) < SPACE_RECHECK && !near_full).then_some(estimate)
    }

    /// Asks the filesystem now (after space was freed, or to be sure
    /// before refusing).
    pub(crate) fn fresh(&mut self) -> Option<u64> {
        let answer = disk_space_left(&self.dir);
        self.last = Some((Instant::now(), answer));
        self.written = 0;
        answer
    }

    pub(crate) fn wrote(&mut self, bytes: usize) {
        self.written = self.written.saturating_add(bytes as u64);
    }
}

/// Bytes the log may still use on the filesystem holding `dir`, after the
/// reserve; None when the filesystem cannot be asked or reports no size
/// (some FUSE and network filesystems), so that it is never refused on a
/// number that means nothing.
pub(crate) fn disk_space_left(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    if total == 0 {
        return None;
    }
    Some(free.saturating_sub(DISK_RESERVE_BYTES.min(total / 4)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn free_space_is_asked_again_after_a_while_and_always_near_full() {
        let t = Instant::now();
        let mut space = FreeSpace::new(std::path::Path::new("."));
        assert_eq!(space.estimate(t), None, "nothing asked yet");
        let gib = 1 << 30;
        space.last = Some((t, Some(gib)));
        space.wrote(1000);
        assert_eq!(space.estimate(t), Some(Some(gib - 1000)));
        assert_eq!(space.estimate(t + SPACE_RECHECK), None, "stale");
        // Near full by the estimate: asked at every commit.
        space.wrote((gib - SPACE_NEAR_FULL) as usize);
        assert_eq!(space.estimate(t), None);
        // A filesystem that cannot be asked is not asked at every commit.
        space.last = Some((t, None));
        assert_eq!(space.estimate(t), Some(None));
        // A fresh answer forgets what was written.
        assert!(space.fresh().is_some(), "the current directory has a size");
        assert_eq!(space.written, 0);
    }
}
