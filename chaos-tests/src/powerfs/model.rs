//! The in-memory disk behind powerfs: a page cache that is lost at power
//! failure, in front of a durable store that only fsync reaches.
//!
//! * A file has its *written* bytes (what reads see) and its *durable*
//!   bytes (as of its last successful fsync/fdatasync), plus the ranges
//!   written since the last write-back (`dirty`).
//! * A directory has its *live* entries and its *durable* entries (as of
//!   its last fsync). A file or directory exists after a crash only if it is
//!   reachable from the root through durable entries: an unsynced creation
//!   vanishes, an unsynced unlink or rename is undone.
//! * A successful fsync writes the dirty ranges and the size; a failed one
//!   (injected) returns EIO and, like Linux after a write-back error, marks
//!   the dirty ranges clean without writing them: a later fsync that
//!   succeeds does not bring them back (they read as zeros on the durable
//!   copy, or vanish at a crash). That is what makes "retry the fsync and
//!   trust it" lose data here, as it does on a real kernel.
//! * [`Model::crash`] is the power failure: every file reverts to its
//!   durable bytes (optionally keeping a seeded random prefix of the bytes
//!   appended since, to model a torn write), every directory to its durable
//!   entries, and whatever is no longer reachable is gone.
//!
//! Everything here is plain data, so it is tested without FUSE; the FUSE
//! layer ([`super::fuse`]) only translates requests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The root directory's inode number (FUSE's).
pub const ROOT: u64 = 1;

/// An errno, as FUSE replies carry them.
pub type Errno = i32;

pub type Res<T> = Result<T, Errno>;

/// Byte ranges `[start, end)`, sorted, disjoint and not touching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.0 {
            if b < s {
                out.push((a, b));
            } else if a > e {
                if !placed {
                    out.push((s, e));
                    placed = true;
                }
                out.push((a, b));
            } else {
                s = s.min(a);
                e = e.max(b);
            }
        }
        if !placed {
            out.push((s, e));
        }
        self.0 = out;
    }

    /// Drops everything at or past `len`.
    pub fn clamp(&mut self, len: u64) {
        self.0.retain(|&(a, _)| a < len);
        if let Some(last) = self.0.last_mut() {
            last.1 = last.1.min(len);
        }
    }

    pub fn extend(&mut self, other: &Ranges) {
        for &(a, b) in &other.0 {
            self.add(a, b);
        }
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().copied()
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }

    /// End of the range that starts at or covers `at`, if any.
    fn covering_end(&self, at: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|&&(a, b)| a <= at && at < b)
            .map(|&(_, b)| b)
    }

    fn first_start_at_or_after(&self, at: u64) -> Option<u64> {
        self.0
            .iter()
            .map(|&(a, b)| if a < at && at < b { at } else { a })
            .find(|&a| a >= at)
    }
}

#[derive(Clone, Debug, Default)]
pub struct FileData {
    /// What reads see.
    pub data: Vec<u8>,
    /// What survives a power failure.
    pub durable: Vec<u8>,
    /// Written since the last write-back (successful or failed fsync).
    pub dirty: Ranges,
    /// Dropped by a failed fsync and never rewritten: these bytes never
    /// reach the durable copy.
    pub lost: Ranges,
}

#[derive(Clone, Debug, Default)]
pub struct DirData {
    pub parent: u64,
    pub entries: BTreeMap<OsString, u64>,
    pub durable: BTreeMap<OsString, u64>,
}

#[derive(Clone, Debug)]
pub enum Node {
    File(FileData),
    Dir(DirData),
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: u64,
    pub node: Node,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Open file handles.
    pub open: u32,
    /// An fsync of this inode failed (injected) since it was created.
    pub eio_seen: bool,
    /// Write-back errors of this inode so far (Linux's `errseq_t`).
    pub err_seq: u64,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.node, Node::Dir(_))
    }

    pub fn size(&self) -> u64 {
        match &self.node {
            Node::File(f) => f.data.len() as u64,
            Node::Dir(d) => d.entries.len() as u64,
        }
    }
}

/// An open file.
#[derive(Clone, Debug)]
pub struct Handle {
    pub ino: u64,
    pub append: bool,
    /// The inode's `err_seq` this handle has reported: like Linux, every
    /// file description open when a write-back failed reports it once at
    /// its next fsync, whoever's fsync hit it first.
    pub err_seen: u64,
}

/// Injected fsync failures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FailFsync {
    /// How many more fsync/fdatasync calls fail.
    pub remaining: u64,
    /// Only calls on files whose path contains this fail (None: any file).
    pub filter: Option<String>,
    /// Whether directory fsyncs (matching the filter) fail too.
    pub dirs: bool,
}

/// Counters for reports. All since mount.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// fsync/fdatasync calls on files (including failed and ignored ones).
    pub fsyncs: u64,
    /// fsync calls on directories.
    pub fsyncdirs: u64,
    /// fsync calls answered EIO by injection.
    pub fsync_failures: u64,
    /// fsync calls on a file after an fsync of that same file failed: a
    /// program that retries the fsync and trusts it shows up here.
    pub fsyncs_after_eio: u64,
    /// fsync calls acknowledged without doing anything (`ignore-fsync`).
    pub fsyncs_ignored: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub creates: u64,
    pub unlinks: u64,
    pub renames: u64,
    pub mkdirs: u64,
    pub crashes: u64,
    /// Files and directories that exist now.
    pub files: u64,
    pub dirs: u64,
    /// Bytes in files now (what reads see).
    pub bytes_stored: u64,
    /// Bytes of files written but not durable now.
    pub bytes_unsynced: u64,
}

/// What one crash threw away.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CrashReport {
    /// Files and directories that existed and are gone.
    pub vanished: u64,
    /// Files that existed (reachable) and whose content was reverted.
    pub files_reverted: u64,
    /// Unsynced bytes dropped (written bytes minus what was kept).
    pub bytes_dropped: u64,
    /// Unsynced appended bytes kept as a torn write.
    pub bytes_torn_kept: u64,
    /// Directory entries restored or removed.
    pub entries_changed: u64,
}

/// The whole filesystem state.
pub struct Model {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    rng: rand::rngs::StdRng,
    /// Keep a random prefix of unsynced appended bytes at a crash.
    pub torn: bool,
    pub fail: FailFsync,
    /// fsync of files answers success and does nothing (a program that
    /// forgot its fsync, for negative controls).
    pub ignore_fsync: bool,
    /// Same for directories.
    pub ignore_fsyncdir: bool,
    /// How long an fsync takes (the FUSE layer sleeps this long, outside
    /// the lock, before doing it): a wider window between write and fsync,
    /// like a real disk's, for crashes to land in.
    pub fsync_delay: std::time::Duration,
    stats: Stats,
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl Model {
    /// An empty filesystem whose root belongs to `uid:gid`.
    pub fn new(seed: u64, torn: bool, uid: u32, gid: u32) -> Model {
        let mut inodes = HashMap::new();
        let t = now();
        inodes.insert(
            ROOT,
            Inode {
                ino: ROOT,
                node: Node::Dir(DirData {
                    parent: ROOT,
                    ..DirData::default()
                }),
                perm: 0o755,
                uid,
                gid,
                atime: t,
                mtime: t,
                ctime: t,
                open: 0,
                eio_seen: false,
                err_seq: 0,
            },
        );
        Model {
            inodes,
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            torn,
            fail: FailFsync::default(),
            ignore_fsync: false,
            ignore_fsyncdir: false,
            fsync_delay: std::time::Duration::ZERO,
            stats: Stats::default(),
        }
    }

    pub fn get(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn get_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Res<&DirData> {
        match &self.get(ino)?.node {
            Node::Dir(d) => Ok(d),
            Node::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Res<&mut DirData> {
        match &mut self.get_mut(ino)?.node {
            Node::Dir(d) => Ok(d),
            Node::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut FileData> {
        match &mut self.get_mut(ino)?.node {
            Node::File(f) => Ok(f),
            Node::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// Live links to `ino` (1 for anything reachable; 0 once unlinked).
    pub fn nlink(&self, ino: u64) -> u32 {
        if ino == ROOT {
            return 2;
        }
        let links = self
            .inodes
            .values()
            .filter_map(|i| match &i.node {
                Node::Dir(d) => Some(d.entries.values().filter(|&&e| e == ino).count()),
                Node::File(_) => None,
            })
            .sum::<usize>();
        links as u32
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Res<u64> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// The entries of a directory: `.`, `..`, then the children by name.
    pub fn list(&self, ino: u64) -> Res<Vec<(u64, bool, OsString)>> {
        let d = self.dir(ino)?;
        let mut out = vec![
            (ino, true, OsString::from(".")),
            (d.parent, true, OsString::from("..")),
        ];
        for (name, &child) in &d.entries {
            let is_dir = self.get(child).map(|i| i.is_dir()).unwrap_or(false);
            out.push((child, is_dir, name.clone()));
        }
        Ok(out)
    }

    fn new_inode(&mut self, node: Node, perm: u16, uid: u32, gid: u32) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let t = now();
        self.inodes.insert(
            ino,
            Inode {
                ino,
                node,
                perm,
                uid,
                gid,
                atime: t,
                mtime: t,
                ctime: t,
                open: 0,
                eio_seen: false,
                err_seq: 0,
            },
        );
        ino
    }

    fn check_new_name(&self, parent: u64, name: &OsStr) -> Res<()> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    fn touch_dir(&mut self, ino: u64) {
        if let Ok(i) = self.get_mut(ino) {
            let t = now();
            i.mtime = t;
            i.ctime = t;
        }
    }

    /// Creates a regular file (not durable until its directory is synced)
    /// and opens it.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
        append: bool,
    ) -> Res<(u64, u64)> {
        self.check_new_name(parent, name)?;
        let ino = self.new_inode(Node::File(FileData::default()), perm, uid, gid);
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.touch_dir(parent);
        self.stats.creates += 1;
        let fh = self.open(ino, append)?;
        Ok((ino, fh))
    }

    pub fn mkdir(&mut self, parent: u64, name: &OsStr, perm: u16, uid: u32, gid: u32) -> Res<u64> {
        self.check_new_name(parent, name)?;
        let ino = self.new_inode(
            Node::Dir(DirData {
                parent,
                ..DirData::default()
            }),
            perm,
            uid,
            gid,
        );
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.touch_dir(parent);
        self.stats.mkdirs += 1;
        Ok(ino)
    }

    pub fn open(&mut self, ino: u64, append: bool) -> Res<u64> {
        let i = self.get_mut(ino)?;
        i.open += 1;
        let err_seen = i.err_seq;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                ino,
                append,
                err_seen,
            },
        );
        Ok(fh)
    }

    pub fn release(&mut self, fh: u64) {
        if let Some(h) = self.handles.remove(&fh) {
            if let Ok(i) = self.get_mut(h.ino) {
                i.open = i.open.saturating_sub(1);
            }
            self.maybe_free(h.ino);
        }
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Res<&[u8]> {
        match &self.get(ino)?.node {
            Node::File(f) => {
                let len = f.data.len() as u64;
                let start = offset.min(len) as usize;
                let end = offset.saturating_add(u64::from(size)).min(len) as usize;
                Ok(&f.data[start..end])
            }
            Node::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// Writes at `offset`, or at the end for a handle opened with O_APPEND.
    pub fn write(&mut self, ino: u64, fh: Option<u64>, offset: u64, buf: &[u8]) -> Res<u32> {
        let append = fh
            .and_then(|fh| self.handles.get(&fh))
            .is_some_and(|h| h.append);
        let f = self.file_mut(ino)?;
        let offset = if append { f.data.len() as u64 } else { offset };
        let end = offset.checked_add(buf.len() as u64).ok_or(libc::EFBIG)?;
        let (o, e) = (offset as usize, end as usize);
        if f.data.len() < e {
            let old = f.data.len() as u64;
            f.data.resize(e, 0);
            // A hole is part of the write-back too.
            f.dirty.add(old.min(offset), offset);
        }
        f.data[o..e].copy_from_slice(buf);
        f.dirty.add(offset, end);
        let i = self.get_mut(ino)?;
        let t = now();
        i.mtime = t;
        i.ctime = t;
        self.stats.writes += 1;
        self.stats.bytes_written += buf.len() as u64;
        u32::try_from(buf.len()).map_err(|_| libc::EINVAL)
    }

    pub fn set_len(&mut self, ino: u64, len: u64) -> Res<()> {
        let f = self.file_mut(ino)?;
        let old = f.data.len() as u64;
        let new = usize::try_from(len).map_err(|_| libc::EFBIG)?;
        f.data.resize(new, 0);
        if len < old {
            f.dirty.clamp(len);
            f.lost.clamp(len);
        } else {
            f.dirty.add(old, len);
        }
        let i = self.get_mut(ino)?;
        let t = now();
        i.mtime = t;
        i.ctime = t;
        Ok(())
    }

    pub fn set_attr(
        &mut self,
        ino: u64,
        perm: Option<u16>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Res<()> {
        let i = self.get_mut(ino)?;
        if let Some(p) = perm {
            i.perm = p;
        }
        if let Some(u) = uid {
            i.uid = u;
        }
        if let Some(g) = gid {
            i.gid = g;
        }
        if let Some(a) = atime {
            i.atime = a;
        }
        if let Some(m) = mtime {
            i.mtime = m;
        }
        i.ctime = now();
        Ok(())
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        if self.get(ino)?.is_dir() {
            return Err(libc::EISDIR);
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.touch_dir(parent);
        self.stats.unlinks += 1;
        self.maybe_free(ino);
        Ok(())
    }

    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.touch_dir(parent);
        self.maybe_free(ino);
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Res<()> {
        let ino = self.lookup(parent, name)?;
        self.dir(newparent)?;
        if newname.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let moving_dir = self.get(ino)?.is_dir();
        if moving_dir {
            // No moving a directory into itself or below.
            let mut p = newparent;
            loop {
                if p == ino {
                    return Err(libc::EINVAL);
                }
                if p == ROOT {
                    break;
                }
                p = self.dir(p)?.parent;
            }
        }
        let replaced = self.dir(newparent)?.entries.get(newname).copied();
        if let Some(old) = replaced {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (&self.get(old)?.node, moving_dir) {
                (Node::Dir(d), true) if !d.entries.is_empty() => return Err(libc::ENOTEMPTY),
                (Node::Dir(_), false) => return Err(libc::EISDIR),
                (Node::File(_), true) => return Err(libc::ENOTDIR),
                _ => {}
            }
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(newparent)?
            .entries
            .insert(newname.to_owned(), ino);
        if moving_dir {
            self.dir_mut(ino)?.parent = newparent;
        }
        self.touch_dir(parent);
        self.touch_dir(newparent);
        self.stats.renames += 1;
        if let Some(old) = replaced {
            self.maybe_free(old);
        }
        Ok(())
    }

    /// The first live path of `ino` ("/a/b"), for fsync filters.
    pub fn path_of(&self, ino: u64) -> String {
        if ino == ROOT {
            return "/".into();
        }
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..256 {
            if cur == ROOT {
                break;
            }
            let found = self.inodes.values().find_map(|i| match &i.node {
                Node::Dir(d) => d
                    .entries
                    .iter()
                    .find(|(_, &c)| c == cur)
                    .map(|(n, _)| (i.ino, n.to_string_lossy().into_owned())),
                Node::File(_) => None,
            });
            match found {
                Some((parent, name)) => {
                    parts.push(name);
                    cur = parent;
                }
                None => {
                    parts.push(format!("<unlinked {cur}>"));
                    break;
                }
            }
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// Whether this fsync is one of the injected failures.
    fn take_failure(&mut self, ino: u64, dir: bool) -> bool {
        if self.fail.remaining == 0 || (dir && !self.fail.dirs) {
            return false;
        }
        if let Some(filter) = &self.fail.filter {
            if !self.path_of(ino).contains(filter.as_str()) {
                return false;
            }
        }
        self.fail.remaining -= 1;
        true
    }

    /// fsync/fdatasync of a file through handle `fh` (None: no handle):
    /// writes back the dirty ranges and the size.
    ///
    /// An injected failure drops the dirty ranges instead (they never become
    /// durable) and returns EIO; every other handle open at that moment
    /// returns EIO once at its next fsync too (after writing back what is
    /// dirty then), as Linux reports a write-back error to each file
    /// description.
    pub fn fsync(&mut self, ino: u64, fh: Option<u64>) -> Res<()> {
        self.stats.fsyncs += 1;
        if self.get(ino)?.eio_seen {
            self.stats.fsyncs_after_eio += 1;
        }
        if self.get(ino)?.is_dir() {
            // fsync(2) on a directory fd arrives as fsyncdir; be lenient.
            return self.fsyncdir(ino);
        }
        if self.take_failure(ino, false) {
            self.stats.fsync_failures += 1;
            let i = self.get_mut(ino)?;
            i.eio_seen = true;
            i.err_seq += 1;
            let seq = i.err_seq;
            if let Node::File(f) = &mut i.node {
                let dirty = std::mem::take(&mut f.dirty);
                f.lost.extend(&dirty);
            }
            if let Some(h) = fh.and_then(|fh| self.handles.get_mut(&fh)) {
                h.err_seen = seq;
            }
            return Err(libc::EIO);
        }
        if self.ignore_fsync {
            self.stats.fsyncs_ignored += 1;
            return Ok(());
        }
        let err_seq = self.get(ino)?.err_seq;
        let f = self.file_mut(ino)?;
        let len = f.data.len();
        f.durable.resize(len, 0);
        for (a, b) in f.dirty.iter() {
            let (a, b) = (a as usize, (b as usize).min(len));
            if a < b {
                f.durable[a..b].copy_from_slice(&f.data[a..b]);
            }
        }
        f.dirty.clear();
        if let Some(h) = fh.and_then(|fh| self.handles.get_mut(&fh)) {
            if h.err_seen < err_seq {
                h.err_seen = err_seq;
                return Err(libc::EIO);
            }
        }
        Ok(())
    }

    /// fsync of a directory: its current entries become the durable ones.
    pub fn fsyncdir(&mut self, ino: u64) -> Res<()> {
        self.stats.fsyncdirs += 1;
        if self.take_failure(ino, true) {
            self.stats.fsync_failures += 1;
            self.get_mut(ino)?.eio_seen = true;
            return Err(libc::EIO);
        }
        if self.ignore_fsyncdir {
            self.stats.fsyncs_ignored += 1;
            return Ok(());
        }
        let d = self.dir_mut(ino)?;
        let dropped: Vec<u64> = d
            .durable
            .values()
            .filter(|v| !d.entries.values().any(|e| e == *v))
            .copied()
            .collect();
        d.durable = d.entries.clone();
        for old in dropped {
            self.maybe_free(old);
        }
        Ok(())
    }

    /// Forgets an inode nothing can reach any more: no live entry, no
    /// durable entry (a crash would bring it back), no open handle.
    fn maybe_free(&mut self, ino: u64) {
        if ino == ROOT {
            return;
        }
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if i.open > 0 {
            return;
        }
        let referenced = self.inodes.values().any(|i| match &i.node {
            Node::Dir(d) => {
                d.entries.values().any(|&e| e == ino) || d.durable.values().any(|&e| e == ino)
            }
            Node::File(_) => false,
        });
        if referenced {
            return;
        }
        let children: Vec<u64> = match &i.node {
            Node::Dir(d) => d
                .entries
                .values()
                .chain(d.durable.values())
                .copied()
                .collect(),
            Node::File(_) => Vec::new(),
        };
        self.inodes.remove(&ino);
        for c in children {
            self.maybe_free(c);
        }
    }

    /// Power failure. See the module documentation.
    pub fn crash(&mut self) -> CrashReport {
        let mut report = CrashReport::default();
        self.stats.crashes += 1;
        // What is reachable through durable entries survives.
        let mut reachable = HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if !reachable.insert(ino) {
                continue;
            }
            if let Some(Inode {
                node: Node::Dir(d), ..
            }) = self.inodes.get(&ino)
            {
                stack.extend(d.durable.values().copied());
            }
        }
        let live_before = self.live_set();
        report.vanished = live_before.difference(&reachable).count() as u64;
        self.inodes.retain(|ino, _| reachable.contains(ino));
        self.handles.clear();
        // Parents as the durable tree has them.
        let mut parents = Vec::new();
        for i in self.inodes.values() {
            if let Node::Dir(d) = &i.node {
                for &c in d.durable.values() {
                    parents.push((c, i.ino));
                }
            }
        }
        for (child, parent) in parents {
            if let Some(Inode {
                node: Node::Dir(d), ..
            }) = self.inodes.get_mut(&child)
            {
                d.parent = parent;
            }
        }
        let torn = self.torn;
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let keep_seed: u64 = self.rng.random();
            let Some(i) = self.inodes.get_mut(&ino) else {
                continue;
            };
            i.open = 0;
            match &mut i.node {
                Node::Dir(d) => {
                    let changed = d
                        .entries
                        .iter()
                        .filter(|(k, v)| d.durable.get(*k) != Some(*v))
                        .count()
                        + d.durable
                            .keys()
                            .filter(|k| !d.entries.contains_key(*k))
                            .count();
                    report.entries_changed += changed as u64;
                    d.entries = d.durable.clone();
                }
                Node::File(f) => {
                    let mut new = f.durable.clone();
                    if torn && f.data.len() > f.durable.len() {
                        // Appended bytes written back in order, up to a
                        // random point: never past bytes a failed fsync lost.
                        let start = f.durable.len() as u64;
                        let mut end = f.dirty.covering_end(start).unwrap_or(start);
                        if let Some(l) = f.lost.first_start_at_or_after(start) {
                            end = end.min(l);
                        }
                        let span = end.saturating_sub(start);
                        if span > 0 {
                            let mut r = rand::rngs::StdRng::seed_from_u64(keep_seed);
                            let k = r.random_range(0..=span);
                            new.extend_from_slice(&f.data[start as usize..(start + k) as usize]);
                            report.bytes_torn_kept += k;
                        }
                    }
                    if new != f.data {
                        report.files_reverted += 1;
                    }
                    report.bytes_dropped += unsynced_bytes(f)
                        .saturating_sub((new.len() as u64).saturating_sub(f.durable.len() as u64));
                    // What made it to the platter is durable from now on.
                    f.durable.clone_from(&new);
                    f.data = new;
                    f.dirty.clear();
                    f.lost.clear();
                }
            }
        }
        report
    }

    fn live_set(&self) -> HashSet<u64> {
        let mut live = HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if !live.insert(ino) {
                continue;
            }
            if let Some(Inode {
                node: Node::Dir(d), ..
            }) = self.inodes.get(&ino)
            {
                stack.extend(d.entries.values().copied());
            }
        }
        live
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        let live = self.live_set();
        for ino in &live {
            match self.inodes.get(ino).map(|i| &i.node) {
                Some(Node::File(f)) => {
                    s.files += 1;
                    s.bytes_stored += f.data.len() as u64;
                    s.bytes_unsynced += unsynced_bytes(f);
                }
                Some(Node::Dir(_)) => s.dirs += 1,
                None => {}
            }
        }
        s
    }
}

/// Bytes of `f` a crash would change: written past the durable length, plus
/// dirty or lost bytes inside it.
fn unsynced_bytes(f: &FileData) -> u64 {
    let durable_len = f.durable.len() as u64;
    let beyond = (f.data.len() as u64).saturating_sub(durable_len);
    let mut inside = f.dirty.clone();
    inside.extend(&f.lost);
    inside.clamp(durable_len.min(f.data.len() as u64));
    beyond + inside.bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn content(m: &Model, dir: u64, name: &str) -> Option<Vec<u8>> {
        let ino = m.lookup(dir, os(name)).ok()?;
        Some(m.read(ino, 0, u32::MAX).unwrap().to_vec())
    }

    #[test]
    fn ranges_merge_and_clamp() {
        let mut r = Ranges::default();
        r.add(10, 20);
        r.add(30, 40);
        r.add(20, 30);
        assert_eq!(r.0, vec![(10, 40)]);
        r.add(50, 60);
        r.add(0, 5);
        assert_eq!(r.0, vec![(0, 5), (10, 40), (50, 60)]);
        r.clamp(35);
        assert_eq!(r.0, vec![(0, 5), (10, 35)]);
        assert_eq!(r.bytes(), 30);
    }

    #[test]
    fn unsynced_data_and_entries_vanish() {
        let mut m = Model::new(1, false, 0, 0);
        let d = m.mkdir(ROOT, os("d"), 0o755, 0, 0).unwrap();
        m.fsyncdir(ROOT).unwrap();
        let (a, fa) = m.create(d, os("a"), 0o644, 0, 0, true).unwrap();
        m.write(a, Some(fa), 0, b"hello").unwrap();
        m.fsync(a, None).unwrap();
        m.fsyncdir(d).unwrap();
        m.write(a, Some(fa), 0, b" world").unwrap();
        let (b, fb) = m.create(d, os("b"), 0o644, 0, 0, false).unwrap();
        m.write(b, Some(fb), 0, b"synced but not its entry")
            .unwrap();
        m.fsync(b, None).unwrap();
        let r = m.crash();
        assert_eq!(content(&m, d, "a").unwrap(), b"hello");
        assert!(content(&m, d, "b").is_none());
        assert_eq!(r.vanished, 1);
        assert_eq!(r.bytes_dropped, 6);
        // A directory that was never synced into its parent vanishes with
        // everything in it, synced or not.
        let e = m.mkdir(d, os("e"), 0o755, 0, 0).unwrap();
        let (c, fc) = m.create(e, os("c"), 0o644, 0, 0, false).unwrap();
        m.write(c, Some(fc), 0, b"x").unwrap();
        m.fsync(c, None).unwrap();
        m.fsyncdir(e).unwrap();
        m.crash();
        assert!(m.lookup(d, os("e")).is_err());
    }

    #[test]
    fn unsynced_unlink_and_rename_are_undone() {
        let mut m = Model::new(1, false, 0, 0);
        let (a, fa) = m.create(ROOT, os("a"), 0o644, 0, 0, false).unwrap();
        m.write(a, Some(fa), 0, b"A").unwrap();
        m.fsync(a, None).unwrap();
        m.release(fa);
        m.fsyncdir(ROOT).unwrap();
        m.rename(ROOT, os("a"), ROOT, os("b"), false).unwrap();
        m.crash();
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"A");
        assert!(m.lookup(ROOT, os("b")).is_err());
        m.unlink(ROOT, os("a")).unwrap();
        assert!(m.lookup(ROOT, os("a")).is_err());
        m.crash();
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"A");
        m.unlink(ROOT, os("a")).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.crash();
        assert!(m.lookup(ROOT, os("a")).is_err());
        assert_eq!(m.inodes.len(), 1, "only the root is left");
    }

    #[test]
    fn failed_fsync_loses_the_data_for_good() {
        let mut m = Model::new(1, false, 0, 0);
        let (a, fa) = m.create(ROOT, os("a"), 0o644, 0, 0, true).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.write(a, Some(fa), 0, b"one").unwrap();
        m.fsync(a, None).unwrap();
        m.fail = FailFsync {
            remaining: 1,
            filter: Some("/a".into()),
            dirs: false,
        };
        m.write(a, Some(fa), 0, b"two").unwrap();
        assert_eq!(m.fsync(a, None), Err(libc::EIO));
        // Reads still see it, and a retried fsync "succeeds"...
        assert_eq!(m.read(a, 0, 100).unwrap(), b"onetwo");
        m.fsync(a, None).unwrap();
        assert_eq!(m.stats().fsyncs_after_eio, 1);
        m.write(a, Some(fa), 0, b"three").unwrap();
        m.fsync(a, None).unwrap();
        m.crash();
        // ...but what the failed fsync covered never reached the disk.
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"one\0\0\0three");
    }

    #[test]
    fn every_open_handle_reports_a_write_back_error_once() {
        let mut m = Model::new(1, false, 0, 0);
        let (a, w) = m.create(ROOT, os("a"), 0o644, 0, 0, true).unwrap();
        let other = m.open(a, false).unwrap();
        m.write(a, Some(w), 0, b"x").unwrap();
        m.fail = FailFsync {
            remaining: 1,
            filter: None,
            dirs: false,
        };
        assert_eq!(m.fsync(a, Some(w)), Err(libc::EIO));
        m.write(a, Some(w), 0, b"y").unwrap();
        // The other handle reports the failure (after writing back "y")...
        assert_eq!(m.fsync(a, Some(other)), Err(libc::EIO));
        assert_eq!(m.fsync(a, Some(other)), Ok(()));
        assert_eq!(m.fsync(a, Some(w)), Ok(()));
        // ...and a handle opened afterwards does not.
        let late = m.open(a, false).unwrap();
        assert_eq!(m.fsync(a, Some(late)), Ok(()));
        let f = match &m.get(a).unwrap().node {
            Node::File(f) => f.clone(),
            Node::Dir(_) => unreachable!(),
        };
        assert_eq!(f.durable, b"\0y");
    }

    #[test]
    fn fail_filter_spares_other_files() {
        let mut m = Model::new(1, false, 0, 0);
        let w = m.mkdir(ROOT, os("wal"), 0o755, 0, 0).unwrap();
        let (a, _) = m.create(w, os("seg"), 0o644, 0, 0, false).unwrap();
        let (b, _) = m.create(ROOT, os("other"), 0o644, 0, 0, false).unwrap();
        m.fail = FailFsync {
            remaining: 1,
            filter: Some("/wal/".into()),
            dirs: false,
        };
        m.fsync(b, None).unwrap();
        m.fsyncdir(w).unwrap();
        assert_eq!(m.fsync(a, None), Err(libc::EIO));
        m.fsync(a, None).unwrap();
        assert_eq!(m.stats().fsync_failures, 1);
    }

    #[test]
    fn torn_crash_keeps_a_prefix_of_appended_bytes() {
        let mut kept = HashSet::new();
        for seed in 0..20 {
            let mut m = Model::new(seed, true, 0, 0);
            let (a, fa) = m.create(ROOT, os("a"), 0o644, 0, 0, true).unwrap();
            m.fsyncdir(ROOT).unwrap();
            m.write(a, Some(fa), 0, b"0123").unwrap();
            m.fsync(a, None).unwrap();
            m.write(a, Some(fa), 0, b"456789").unwrap();
            m.crash();
            let c = content(&m, ROOT, "a").unwrap();
            assert!(c.len() >= 4 && b"0123456789".starts_with(&c), "{c:?}");
            kept.insert(c.len());
        }
        assert!(kept.len() > 3, "{kept:?}");
    }

    #[test]
    fn truncation_is_durable_only_after_fsync() {
        let mut m = Model::new(1, false, 0, 0);
        let (a, fa) = m.create(ROOT, os("a"), 0o644, 0, 0, false).unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.write(a, Some(fa), 0, b"abcdef").unwrap();
        m.fsync(a, None).unwrap();
        m.set_len(a, 2).unwrap();
        m.write(a, Some(fa), 2, b"XY").unwrap();
        m.crash();
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"abcdef");
        m.set_len(a, 2).unwrap();
        m.write(a, None, 2, b"XY").unwrap();
        m.fsync(a, None).unwrap();
        m.crash();
        assert_eq!(content(&m, ROOT, "a").unwrap(), b"abXY");
    }
}
