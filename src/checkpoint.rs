//! Per-replica checkpoints, in sled, behind one small module.
//!
//! For each replica two facts are kept:
//!
//! - `delivered`: every record below this sequence number has been delivered
//!   to the replica (or was rejected by it, or lost to damage or retention and
//!   counted). The shipper resumes here.
//! - `inflight`: the exact sequence range of the request being sent, written
//!   (and flushed) *before* the request leaves. After a crash the shipper
//!   re-sends exactly that range, on its own, before anything else: merged
//!   with newer records, a re-send of samples the replica already holds would
//!   be refused whole as out of order and the newer records with it.
//!
//! Keys are `replica/<name>/delivered` and `replica/<name>/inflight`, values
//! little-endian u64s (one, or two for a range). Every change is flushed
//! (fsync'd) before the call returns.

use std::ops::Range;
use std::path::Path;

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The sled database could not be opened, read or flushed. Not
    /// recoverable in place: the relay stops shipping to be safe.
    #[error("checkpoint store {path}: {source}")]
    Store { path: String, source: sled::Error },
    /// A checkpoint operation panicked in its worker thread; retried.
    #[error("checkpoint operation failed: {0}")]
    Panicked(String),
    /// A stored value has the wrong size: the store is damaged.
    #[error("checkpoint store: value of {key} has {len} bytes, expected {expected}")]
    BadValue {
        key: String,
        len: usize,
        expected: usize,
    },
}

/// One replica's persisted position.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Cursor {
    pub delivered: Option<u64>,
    pub inflight: Option<Range<u64>>,
}

/// The checkpoint store.
#[derive(Clone)]
pub struct Checkpoints {
    db: sled::Db,
    path: String,
}

fn key(replica: &str, field: &str) -> String {
    format!("replica/{replica}/{field}")
}

impl Checkpoints {
    /// Opens (creating) the store at `path`.
    ///
    /// # Errors
    /// [`CheckpointError::Store`] when sled cannot open it (held by another
    /// process, damaged, no permission).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let p = path.display().to_string();
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|source| CheckpointError::Store {
                path: p.clone(),
                source,
            })?;
        Ok(Self { db, path: p })
    }

    fn err(&self, source: sled::Error) -> CheckpointError {
        CheckpointError::Store {
            path: self.path.clone(),
            source,
        }
    }

    fn get_u64s<const N: usize>(&self, k: &str) -> Result<Option<[u64; N]>, CheckpointError> {
        let Some(v) = self.db.get(k).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        if v.len() != N * 8 {
            return Err(CheckpointError::BadValue {
                key: k.to_owned(),
                len: v.len(),
                expected: N * 8,
            });
        }
        let mut out = [0u64; N];
        for (i, chunk) in v.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            out[i] = u64::from_le_bytes(b);
        }
        Ok(Some(out))
    }

    /// The replica's persisted position.
    ///
    /// # Errors
    /// Store errors and damaged values.
    pub fn cursor(&self, replica: &str) -> Result<Cursor, CheckpointError> {
        Ok(Cursor {
            delivered: self.get_u64s::<1>(&key(replica, "delivered"))?.map(|[d]| d),
            inflight: self
                .get_u64s::<2>(&key(replica, "inflight"))?
                .map(|[a, b]| a..b),
        })
    }

    /// The names of every replica with a stored position.
    ///
    /// # Errors
    /// Store errors.
    pub fn replicas(&self) -> Result<Vec<String>, CheckpointError> {
        let mut names = Vec::new();
        for item in self.db.scan_prefix("replica/") {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let k = String::from_utf8_lossy(&k).into_owned();
            if let Some(name) = k
                .strip_prefix("replica/")
                .and_then(|r| r.strip_suffix("/delivered"))
            {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    /// Records the range about to be sent, durably, before it is sent.
    ///
    /// # Errors
    /// Store errors.
    pub fn begin_send(&self, replica: &str, range: Range<u64>) -> Result<(), CheckpointError> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&range.start.to_le_bytes());
        v.extend_from_slice(&range.end.to_le_bytes());
        self.db
            .insert(key(replica, "inflight"), v)
            .map_err(|e| self.err(e))?;
        self.flush()
    }

    /// Records that everything below `delivered` is done and clears the
    /// in-flight range, atomically and durably.
    ///
    /// # Errors
    /// Store errors.
    pub fn complete(&self, replica: &str, delivered: u64) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            key(replica, "delivered").as_bytes(),
            &delivered.to_le_bytes()[..],
        );
        batch.remove(key(replica, "inflight").as_bytes());
        self.db.apply_batch(batch).map_err(|e| self.err(e))?;
        self.flush()
    }

    /// Moves a replica's cursor (operator action or first start), clearing
    /// any in-flight range.
    ///
    /// # Errors
    /// Store errors.
    pub fn set(&self, replica: &str, delivered: u64) -> Result<(), CheckpointError> {
        self.complete(replica, delivered)
    }

    /// Forgets a replica.
    ///
    /// # Errors
    /// Store errors.
    pub fn remove(&self, replica: &str) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        batch.remove(key(replica, "delivered").as_bytes());
        batch.remove(key(replica, "inflight").as_bytes());
        self.db.apply_batch(batch).map_err(|e| self.err(e))?;
        self.flush()
    }

    fn flush(&self) -> Result<(), CheckpointError> {
        self.db.flush().map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn inflight_range_survives_reopen_until_completed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        {
            let cp = Checkpoints::open(&path).unwrap();
            cp.set("a", 10).unwrap();
            cp.begin_send("a", 10..25).unwrap();
        }
        let cp = Checkpoints::open(&path).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(10),
                inflight: Some(10..25)
            }
        );
        cp.complete("a", 25).unwrap();
        assert_eq!(
            cp.cursor("a").unwrap(),
            Cursor {
                delivered: Some(25),
                inflight: None
            }
        );
        assert_eq!(cp.replicas().unwrap(), vec!["a".to_string()]);
        assert_eq!(cp.cursor("b").unwrap(), Cursor::default());
    }
}
