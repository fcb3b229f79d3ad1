//! Tombstones: what each segment deleted under a limit held, so that every
//! replica that finds those records gone accounts exactly what it lost (the
//! records, the samples of each, and which limit deleted them) instead of
//! counting them as skipped for an unknown reason. They are kept in memory
//! for the readers and in a small file for the next start, written durably
//! *before* the segment is deleted: a crash between the two leaves a
//! tombstone for a segment that may still exist (harmless: no reader finds
//! a gap there, and it is pruned once every replica has passed it), never a
//! deleted segment without its tombstone.
//!
//! # The file `tombstones` in the log's directory
//!
//! All integers are little-endian; the checksums are CRC-32 (IEEE, as
//! `crc32fast` computes it).
//!
//! ```text
//! header (16 bytes)
//!   0  magic    8 bytes  "WRTOMBST"
//!   8  version  u32      1
//!  12  crc      u32      CRC-32 of bytes 0..12
//! then entries, one per deleted segment, oldest first:
//!   0  len      u32      bytes of the body (21 + 4 * count)
//!   4  crc      u32      CRC-32 of the 4 bytes of len followed by the body
//!   8  body:
//!        first   u64     sequence number of the segment's first record
//!        end     u64     first sequence number after the segment (> first)
//!        reason  u8      1 = disk_budget, 2 = retention_age
//!        count   u32     sample counts that follow (at most end - first)
//!        samples count x u32: the samples of records first, first+1, ...;
//!                        records past `count` (numbers the log skipped, or
//!                        records that could not be read) had none
//! ```
//!
//! A tombstone is appended (one write and one fdatasync per deleted
//! segment, on the path that deletes it: the commit thread under a disk
//! budget, so a segment dropped for space costs ingest that one small
//! fsync). The file is rewritten whole, atomically (a temporary file
//! written and fsync'd, renamed over it, the directory fsync'd), when it is
//! created, when tombstones every replica has passed are pruned, and after
//! an append failed or the file was found damaged.
//!
//! Reading stops at the first entry that is incomplete (an append cut by a
//! crash: its segment was not deleted yet, since deletion waits for the
//! fsync) or whose checksum, length or fields are wrong (damage: reported;
//! the entries after it are lost, and those records are then counted as
//! skipped, without their samples). The next write rewrites the file
//! without it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::env::Storage;
use super::WalError;

const MAGIC: [u8; 8] = *b"WRTOMBST";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
/// Entry length and checksum.
const ENTRY_HEAD_LEN: usize = 8;
/// first, end, reason, count.
const BODY_FIXED_LEN: usize = 21;

/// The file's name in the log's directory.
pub const FILE_NAME: &str = "tombstones";

/// Which limit deleted a segment that replicas still needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// `--max-disk-bytes` with `--full-policy drop-oldest`.
    DiskBudget,
    /// `--retention`.
    RetentionAge,
}

impl DropReason {
    /// The label of metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::DiskBudget => "disk_budget",
            DropReason::RetentionAge => "retention_age",
        }
    }

    fn code(self) -> u8 {
        match self {
            DropReason::DiskBudget => 1,
            DropReason::RetentionAge => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(DropReason::DiskBudget),
            2 => Some(DropReason::RetentionAge),
            _ => None,
        }
    }
}

/// What a segment deleted under a limit held: records `first..end` (the key
/// of the map holding it is `first`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub end: u64,
    /// The samples of each record from `first` on; records past its length
    /// had none.
    pub samples: Vec<u32>,
    pub reason: DropReason,
}

impl Tombstone {
    /// The samples of records `from..to` (clamped to this tombstone's
    /// records, whose first is `first`).
    pub fn samples_in(&self, first: u64, from: u64, to: u64) -> u64 {
        let lo = from.saturating_sub(first) as usize;
        let hi = to.min(self.end).saturating_sub(first) as usize;
        self.samples
            .get(lo.min(self.samples.len())..hi.min(self.samples.len()))
            .map_or(0, |s| s.iter().map(|&n| u64::from(n)).sum())
    }

    /// Every sample of the segment.
    pub fn total_samples(&self) -> u64 {
        self.samples.iter().map(|&n| u64::from(n)).sum()
    }
}

fn encode_header(out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let crc = crc32fast::hash(&out[out.len() - 12..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Appends one entry to `out`.
fn encode_entry(first: u64, stone: &Tombstone, out: &mut Vec<u8>) {
    let len = (BODY_FIXED_LEN + 4 * stone.samples.len()) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&stone.end.to_le_bytes());
    out.push(stone.reason.code());
    out.extend_from_slice(&(stone.samples.len() as u32).to_le_bytes());
    for n in &stone.samples {
        out.extend_from_slice(&n.to_le_bytes());
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&out[start..start + 4]);
    h.update(&out[start + ENTRY_HEAD_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&h.finalize().to_le_bytes());
}

/// Encodes a whole file holding `stones`.
pub fn encode_file(stones: &BTreeMap<u64, Tombstone>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_header(&mut out);
    for (&first, stone) in stones {
        encode_entry(first, stone, &mut out);
    }
    out
}

/// What [`decode_file`] found.
#[derive(Debug, Default)]
pub struct Decoded {
    pub stones: BTreeMap<u64, Tombstone>,
    /// Bytes of the file up to the end of its last intact entry.
    pub intact_len: u64,
    /// Why reading stopped before the end of the file: an incomplete last
    /// entry (a cut append) or damage, with its offset.
    pub stopped: Option<String>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes a file's bytes.
///
/// # Errors
/// A message when the header is not a tombstone file header of a known
/// version (nothing can be read then).
pub fn decode_file(bytes: &[u8]) -> Result<Decoded, String> {
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| format!("{} bytes: shorter than a header", bytes.len()))?;
    if header[..8] != MAGIC {
        return Err("not a tombstone file (bad magic)".into());
    }
    if crc32fast::hash(&header[..12]) != u32_at(header, 12) {
        return Err("header checksum mismatch".into());
    }
    let version = u32_at(header, 8);
    if version != VERSION {
        return Err(format!("unknown version {version}"));
    }
    let mut out = Decoded {
        intact_len: HEADER_LEN as u64,
        ..Decoded::default()
    };
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        match decode_entry(&bytes[at..]) {
            Ok((first, stone, used)) => {
                out.stones.insert(first, stone);
                at += used;
                out.intact_len = at as u64;
            }
            Err(reason) => {
                out.stopped = Some(format!("at offset {at}: {reason}"));
                break;
            }
        }
    }
    Ok(out)
}

/// One entry at the start of `b`: its first record, the tombstone and the
/// bytes it takes. The length is checked against the bytes left and the
/// count before anything is read from the body.
fn decode_entry(b: &[u8]) -> Result<(u64, Tombstone, usize), String> {
    if b.len() < ENTRY_HEAD_LEN {
        return Err("incomplete entry header (an append cut short)".into());
    }
    let len = u32_at(b, 0) as usize;
    if len < BODY_FIXED_LEN || !(len - BODY_FIXED_LEN).is_multiple_of(4) {
        return Err(format!("impossible entry length {len}"));
    }
    let body = b
        .get(ENTRY_HEAD_LEN..ENTRY_HEAD_LEN + len)
        .ok_or("incomplete entry (an append cut short)")?;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..4]);
    h.update(body);
    if h.finalize() != u32_at(b, 4) {
        return Err("entry checksum mismatch".into());
    }
    let first = u64_at(body, 0);
    let end = u64_at(body, 8);
    let reason = DropReason::from_code(body[16]).ok_or("unknown reason code")?;
    let count = u32_at(body, 17) as usize;
    if end <= first || count as u64 > end - first || BODY_FIXED_LEN + 4 * count != len {
        return Err(format!(
            "inconsistent entry: records {first}..{end}, {count} counts, length {len}"
        ));
    }
    let samples = (0..count)
        .map(|i| u32_at(body, BODY_FIXED_LEN + 4 * i))
        .collect();
    Ok((
        first,
        Tombstone {
            end,
            samples,
            reason,
        },
        ENTRY_HEAD_LEN + len,
    ))
}

/// The file on disk, as its one writer (the log's deletions, one at a time)
/// knows it.
pub struct TombstoneFile {
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    /// Bytes of intact content, where the next entry is appended; None when
    /// the file must be rewritten whole first (it does not exist yet, was
    /// found damaged, or an append failed part-way).
    len: Option<u64>,
}

impl TombstoneFile {
    /// The file of the log in `dir`, not read yet.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            path: dir.join(FILE_NAME),
            tmp: dir.join(format!("{FILE_NAME}.tmp")),
            len: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file: None when there is none.
    ///
    /// # Errors
    /// I/O errors reading it, and a header that cannot be read
    /// ([`WalError::BadDirectory`]).
    pub fn load(&mut self, storage: &dyn Storage) -> Result<Option<Decoded>, WalError> {
        let file = match storage.open_read(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(WalError::io("open tombstones", &self.path, e)),
        };
        let len = file
            .len()
            .map_err(|e| WalError::io("read tombstones", &self.path, e))?;
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        let n = file
            .read_full_at(&mut bytes, 0)
            .map_err(|e| WalError::io("read tombstones", &self.path, e))?;
        bytes.truncate(n);
        let decoded = decode_file(&bytes).map_err(|reason| WalError::BadDirectory {
            path: self.path.clone(),
            reason,
        })?;
        self.len = decoded
            .stopped
            .is_none()
            .then_some(decoded.intact_len)
            .filter(|&l| l == n as u64);
        Ok(Some(decoded))
    }

    /// Makes the tombstone of records `first..stone.end` durable. `all`
    /// gives every tombstone kept (this one included), for when the file
    /// must be rewritten.
    ///
    /// # Errors
    /// I/O errors; nothing may be deleted then.
    pub fn add(
        &mut self,
        storage: &dyn Storage,
        first: u64,
        stone: &Tombstone,
        all: impl FnOnce() -> BTreeMap<u64, Tombstone>,
    ) -> Result<(), WalError> {
        if let Some(len) = self.len {
            let mut entry = Vec::new();
            encode_entry(first, stone, &mut entry);
            match self.append(storage, len, &entry) {
                Ok(()) => {
                    self.len = Some(len + entry.len() as u64);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, file = %self.path.display(),
                        "cannot append to the tombstone file; rewriting it whole");
                    self.len = None;
                }
            }
        }
        self.rewrite(storage, &all())
    }

    fn append(&self, storage: &dyn Storage, len: u64, entry: &[u8]) -> Result<(), WalError> {
        let mut f = storage
            .open_append(&self.path)
            .map_err(|e| WalError::io("open tombstones", &self.path, e))?;
        if let Err(e) = f.append(entry).and_then(|()| f.sync_data()) {
            // Cut back what landed, so the next reader does not stop at it
            // (the rewrite that follows replaces the file anyway).
            let _ = f.set_len(len);
            return Err(WalError::write(&self.path, e));
        }
        Ok(())
    }

    /// Replaces the file by one holding exactly `stones`, atomically.
    ///
    /// # Errors
    /// I/O errors; the old file is then still in place.
    pub fn rewrite(
        &mut self,
        storage: &dyn Storage,
        stones: &BTreeMap<u64, Tombstone>,
    ) -> Result<(), WalError> {
        self.len = None;
        let bytes = encode_file(stones);
        match storage.remove(&self.tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(WalError::io("remove", &self.tmp, e)),
        }
        let mut f = storage
            .create_new(&self.tmp)
            .map_err(|e| WalError::write(&self.tmp, e))?;
        f.append(&bytes)
            .and_then(|()| f.sync_data())
            .map_err(|e| WalError::write(&self.tmp, e))?;
        drop(f);
        storage
            .rename(&self.tmp, &self.path)
            .map_err(|e| WalError::io("rename", &self.tmp, e))?;
        storage
            .sync_dir(&self.dir)
            .map_err(|e| WalError::io("sync directory", &self.dir, e))?;
        self.len = Some(bytes.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn stones() -> BTreeMap<u64, Tombstone> {
        let mut m = BTreeMap::new();
        m.insert(
            0,
            Tombstone {
                end: 3,
                samples: vec![5, 6, 7],
                reason: DropReason::DiskBudget,
            },
        );
        m.insert(
            3,
            Tombstone {
                end: 10,
                samples: vec![1],
                reason: DropReason::RetentionAge,
            },
        );
        m
    }

    #[test]
    fn the_file_reads_back_what_was_written() {
        let bytes = encode_file(&stones());
        let d = decode_file(&bytes).unwrap();
        assert_eq!(d.stones, stones());
        assert_eq!(d.intact_len, bytes.len() as u64);
        assert!(d.stopped.is_none());
    }

    #[test]
    fn the_bytes_of_an_entry_are_as_documented() {
        let mut m = BTreeMap::new();
        m.insert(
            2,
            Tombstone {
                end: 4,
                samples: vec![9],
                reason: DropReason::DiskBudget,
            },
        );
        let bytes = encode_file(&m);
        assert_eq!(&bytes[..8], b"WRTOMBST");
        assert_eq!(&bytes[8..12], &[1, 0, 0, 0]);
        let e = &bytes[16..];
        assert_eq!(&e[..4], &[25, 0, 0, 0], "21 + 4 * 1 body bytes");
        assert_eq!(&e[8..16], &2u64.to_le_bytes());
        assert_eq!(&e[16..24], &4u64.to_le_bytes());
        assert_eq!(e[24], 1);
        assert_eq!(&e[25..29], &[1, 0, 0, 0]);
        assert_eq!(&e[29..33], &[9, 0, 0, 0]);
        assert_eq!(e.len(), 33);
    }

    #[test]
    fn a_cut_last_entry_is_ignored_and_the_ones_before_it_kept() {
        let bytes = encode_file(&stones());
        for cut in 1..30 {
            let d = decode_file(&bytes[..bytes.len() - cut]).unwrap();
            assert_eq!(d.stones.len(), 1, "cut {cut}");
            assert!(d.stopped.is_some());
        }
    }

    #[test]
    fn a_flipped_bit_stops_reading_at_its_entry() {
        let mut bytes = encode_file(&stones());
        let n = bytes.len();
        bytes[n - 2] ^= 4;
        let d = decode_file(&bytes).unwrap();
        assert_eq!(d.stones.len(), 1);
        assert!(d.stopped.unwrap().contains("checksum"));
        bytes[3] ^= 1;
        assert!(decode_file(&bytes).is_err(), "a damaged header");
    }

    #[test]
    fn samples_are_summed_over_the_part_of_a_range_a_tombstone_covers() {
        let s = &stones()[&0];
        assert_eq!(s.samples_in(0, 0, 3), 18);
        assert_eq!(s.samples_in(0, 1, 2), 6);
        assert_eq!(s.samples_in(0, 2, 100), 7);
        let short = &stones()[&3];
        assert_eq!(
            short.samples_in(3, 4, 10),
            0,
            "records past the counts had none"
        );
        assert_eq!(short.samples_in(3, 0, 10), 1);
    }
}
