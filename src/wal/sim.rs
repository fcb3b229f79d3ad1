//! A crash-simulating [`Storage`] for tests, after redb's
//! `tests/crash_consistency.rs`: every file keeps what was *written* and what
//! is *durable* (the state at its last `sync_data`), and every directory what
//! entries exist and which of them are durable (as of its last `sync_dir`).
//! [`SimStorage::crash`] throws away everything that was not made durable,
//! optionally keeping a prefix of the unsynced bytes (a torn write), exactly as
//! power loss may.
//!
//! It can also be told to fail the next `sync_data`, to prove that the writer
//! never retries an fsync and trusts it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::env::{ReadableFile, Storage, WritableFile};

#[derive(Default, Clone)]
struct SimFile {
    written: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Files by path, as the live system sees them.
    files: BTreeMap<PathBuf, Arc<Mutex<SimFile>>>,
    /// Paths whose directory entry is durable, with the file they name.
    durable_entries: BTreeMap<PathBuf, Arc<Mutex<SimFile>>>,
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
    fail_next_sync: Arc<AtomicBool>,
    fail_next_reserve: Arc<AtomicBool>,
    fail_next_append: Arc<AtomicBool>,
    /// Reads still to fail with EIO (see [`SimStorage::fail_reads`]).
    fail_reads: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates power loss. Files whose directory entry was never synced
    /// vanish; removals that were never synced are undone; each surviving
    /// file keeps its durable bytes, except that `keep_unsynced(unsynced_len)`
    /// bytes of what was written after its last sync survive, from the first
    /// byte where the written content differs from the durable one (past the
    /// durable length for appends, on the durable zeros for appends into a
    /// reservation).
    pub fn crash(&self, mut keep_unsynced: impl FnMut(usize) -> usize) {
        let mut st = lock(&self.state);
        let mut files = BTreeMap::new();
        for (path, file) in &st.durable_entries {
            let mut f = lock(file);
            let mut kept = f.durable.clone();
            let differs = f
                .written
                .iter()
                .zip(&f.durable)
                .position(|(w, d)| w != d)
                .unwrap_or(f.written.len().min(f.durable.len()));
            if f.written.len() > differs {
                let extra = f.written.len() - differs;
                let keep = keep_unsynced(extra).min(extra);
                let end = differs + keep;
                if kept.len() < end {
                    kept.resize(end, 0);
                }
                kept[differs..end].copy_from_slice(&f.written[differs..end]);
            }
            f.written = kept.clone();
            f.durable = kept;
            drop(f);
            files.insert(path.clone(), Arc::clone(file));
        }
        st.files = files;
    }

    /// Makes the next `sync_data` on any file fail with EIO.
    pub fn fail_next_sync(&self) {
        self.fail_next_sync.store(true, Ordering::SeqCst);
    }

    /// Makes the next `reserve` on any file fail with ENOSPC after writing
    /// half of its zeros.
    pub fn fail_next_reserve(&self) {
        self.fail_next_reserve.store(true, Ordering::SeqCst);
    }

    /// Makes the next `append` to any file fail with ENOSPC after writing
    /// half of its bytes.
    pub fn fail_next_append(&self) {
        self.fail_next_append.store(true, Ordering::SeqCst);
    }

    /// Makes the next `n` reads of any file fail with EIO (a bad sector, a
    /// disk that went away), to prove that readers retry rather than take
    /// an error for the end of what they read.
    pub fn fail_reads(&self, n: u64) {
        self.fail_reads.store(n, Ordering::SeqCst);
    }

    /// Reads that were set to fail and have not yet.
    pub fn reads_left_to_fail(&self) -> u64 {
        self.fail_reads.load(Ordering::SeqCst)
    }

    /// Flips one bit of a file's durable and written content.
    pub fn flip_bit(&self, path: &Path, offset: usize, bit: u8) {
        let st = lock(&self.state);
        if let Some(file) = st.files.get(path) {
            let mut f = lock(file);
            if offset < f.written.len() {
                f.written[offset] ^= 1 << (bit % 8);
            }
            if offset < f.durable.len() {
                f.durable[offset] ^= 1 << (bit % 8);
            }
        }
    }

    /// Overwrites bytes of a file's durable and written content in place
    /// (as misdirected writes or a bad disk may).
    pub fn overwrite(&self, path: &Path, offset: usize, bytes: &[u8]) {
        let st = lock(&self.state);
        if let Some(file) = st.files.get(path) {
            let mut f = lock(file);
            let f = &mut *f;
            for content in [&mut f.written, &mut f.durable] {
                let end = (offset + bytes.len()).min(content.len());
                if offset < end {
                    content[offset..end].copy_from_slice(&bytes[..end - offset]);
                }
            }
        }
    }

    /// The length of a file as the live system sees it.
    pub fn file_len(&self, path: &Path) -> Option<usize> {
        let st = lock(&self.state);
        st.files.get(path).map(|f| lock(f).written.len())
    }

    fn file(&self, path: &Path) -> io::Result<Arc<Mutex<SimFile>>> {
        lock(&self.state)
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }
}

struct SimWritable {
    file: Arc<Mutex<SimFile>>,
    fail_next_sync: Arc<AtomicBool>,
    fail_next_reserve: Arc<AtomicBool>,
    fail_next_append: Arc<AtomicBool>,
    /// The append position.
    pos: usize,
}

impl SimWritable {
    fn at_end(storage: &SimStorage, file: Arc<Mutex<SimFile>>) -> Self {
        let pos = lock(&file).written.len();
        Self {
            file,
            fail_next_sync: Arc::clone(&storage.fail_next_sync),
            fail_next_reserve: Arc::clone(&storage.fail_next_reserve),
            fail_next_append: Arc::clone(&storage.fail_next_append),
            pos,
        }
    }
}

impl WritableFile for SimWritable {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut f = lock(&self.file);
        let fail = self.fail_next_append.swap(false, Ordering::SeqCst);
        // A failing append writes half of its bytes, as a disk that filled up.
        let buf = if fail { &buf[..buf.len() / 2] } else { buf };
        let end = self.pos + buf.len();
        if f.written.len() < end {
            f.written.resize(end, 0);
        }
        f.written[self.pos..end].copy_from_slice(buf);
        self.pos = end;
        if fail {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
    fn reserve(&mut self, upto: u64) -> io::Result<()> {
        let mut f = lock(&self.file);
        let upto = upto as usize;
        if f.written.len() < upto {
            if self.fail_next_reserve.swap(false, Ordering::SeqCst) {
                let half = f.written.len() + (upto - f.written.len()) / 2;
                f.written.resize(half, 0);
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            f.written.resize(upto, 0);
        }
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            // As on Linux after a failed writeback: the error is reported
            // once and the dirty pages are gone, so nothing becomes durable.
            return Err(io::Error::other("simulated fsync failure (EIO)"));
        }
        let mut f = lock(&self.file);
        f.durable = f.written.clone();
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut f = lock(&self.file);
        f.written.resize(len as usize, 0);
        self.pos = len as usize;
        Ok(())
    }
}

struct SimReadable(Arc<Mutex<SimFile>>, Arc<AtomicU64>);

impl ReadableFile for SimReadable {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let failing = self
            .1
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let f = lock(&self.0);
        let off = offset as usize;
        if off >= f.written.len() {
            return Ok(0);
        }
        let n = buf.len().min(f.written.len() - off);
        buf[..n].copy_from_slice(&f.written[off..off + n]);
        Ok(n)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.0).written.len() as u64)
    }
}

impl Storage for SimStorage {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let mut st = lock(&self.state);
        if st.files.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                path.display().to_string(),
            ));
        }
        let file = Arc::new(Mutex::new(SimFile::default()));
        st.files.insert(path.to_path_buf(), Arc::clone(&file));
        Ok(Box::new(SimWritable::at_end(self, file)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        Ok(Box::new(SimWritable::at_end(self, self.file(path)?)))
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadableFile>> {
        Ok(Arc::new(SimReadable(
            self.file(path)?,
            Arc::clone(&self.fail_reads),
        )))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = lock(&self.state);
        Ok(st
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.state)
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        let file = st
            .files
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.display().to_string()))?;
        st.files.insert(to.to_path_buf(), file);
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        let live: Vec<_> = st
            .files
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, f)| (p.clone(), Arc::clone(f)))
            .collect();
        st.durable_entries.retain(|p, _| p.parent() != Some(dir));
        st.durable_entries.extend(live);
        Ok(())
    }
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}
