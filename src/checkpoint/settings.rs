//! sled's settings file, `<store>/conf`, made whole before sled reads it.
//!
//! sled 0.34 writes `conf` once, when it opens a directory that has none (or
//! one of 8 bytes or less): the serialised settings (format version, I/O
//! buffer size, compression) followed by a little-endian CRC-32 of them,
//! written in place with two writes and no fsync. A relay killed between the
//! two writes, or a power loss before writeback, leaves a file whose CRC
//! fails, and sled then refuses the store for good ("Read corrupted data at
//! file offset None"): the relay could not start again although every
//! position in `db` is intact. (A chaos run hit exactly this: a SIGKILL
//! during a relay's first start.) An empty file is written again in place,
//! with the same hazard.
//!
//! The settings are the same for every store this relay opens (they are
//! fixed in `open_db`), so a missing or torn file is replaced by a whole one
//! before sled opens the store: sled itself writes one into a scratch
//! directory beside the store, and its bytes are written to `conf.tmp`,
//! synced, renamed over `conf`, and the directory synced. A crash at any
//! point leaves either the old file (replaced again at the next start) or
//! the whole new one. A file whose CRC holds is never touched, so a store
//! written with other settings still gets sled's own refusal.

use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "conf";

/// True when `bytes` is a settings file sled accepts as written: more than
/// 8 bytes, ending in the CRC-32 of the rest.
fn whole(bytes: &[u8]) -> bool {
    if bytes.len() <= 8 {
        return false;
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    crc32fast::hash(body).to_le_bytes() == crc
}

/// Makes `<store>/conf` whole (see the module docs), creating `store` if
/// needed, and says so in the log when it replaced a torn one.
///
/// # Errors
/// I/O errors reading, writing or syncing the file; sled errors opening the
/// scratch store, as I/O errors.
pub(super) fn ensure(
    store: &Path,
    open: impl FnOnce(&Path) -> sled::Result<sled::Db>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(store)?;
    let path = store.join(FILE);
    let old = match std::fs::read(&path) {
        Ok(bytes) if whole(&bytes) => return Ok(()),
        Ok(bytes) => Some(bytes.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let bytes = written_by_sled(store, open)?;
    let tmp = store.join("conf.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(store)?.sync_all()?;
    if let Some(len) = old {
        tracing::warn!(
            file = %path.display(),
            len,
            "sled's settings file was torn (sled writes it in place when it creates a store); \
             written again whole, the checkpoints themselves are untouched"
        );
    }
    Ok(())
}

/// The settings file sled writes for a new store opened by `open`.
fn written_by_sled(
    store: &Path,
    open: impl FnOnce(&Path) -> sled::Result<sled::Db>,
) -> std::io::Result<Vec<u8>> {
    let scratch = scratch_dir(store);
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    let db = open(&scratch).map_err(std::io::Error::other)?;
    drop(db);
    let bytes = std::fs::read(scratch.join(FILE));
    // Best effort: a leftover is removed at the next call.
    let _ = std::fs::remove_dir_all(&scratch);
    let bytes = bytes?;
    if !whole(&bytes) {
        return Err(std::io::Error::other(format!(
            "sled wrote a settings file of {} bytes that does not end in its CRC",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Where sled writes a fresh store and its settings file, beside the store.
fn scratch_dir(store: &Path) -> PathBuf {
    super::sibling(store, ".conf-scratch")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_file_is_whole_when_its_last_four_bytes_are_the_crc_of_the_rest() {
        let mut b = b"settings".to_vec();
        b.extend_from_slice(&crc32fast::hash(b"settings").to_le_bytes());
        assert!(whole(&b));
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(!whole(&b));
        assert!(!whole(&[]));
        // Eight bytes or less is what sled itself treats as absent.
        assert!(!whole(&[0, 0, 0, 0, 0, 0, 0, 0]));
    }
}
