//! The FUSE face of the [`Model`]: every request takes the model's lock,
//! does its work in memory and replies.
//!
//! Attributes and entries are replied with a zero TTL and files are opened
//! without `FOPEN_KEEP_CACHE`, so after a crash the kernel asks again instead
//! of serving what it remembered. The filesystem implements no locking
//! requests and does not ask for `FUSE_POSIX_LOCKS`/`FUSE_FLOCK_LOCKS`, so the
//! kernel handles `flock` (walrelay's `DATA_DIR/LOCK`, sled's `db`) locally.
//! No `FUSE_WRITEBACK_CACHE` either: every `write(2)` reaches the model
//! before it returns, so "written" in the model is exactly what the program
//! wrote.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::model::{Inode, Model, Node, Res};

const TTL: Duration = Duration::ZERO;
const BLOCK: u64 = 4096;
/// What statfs reports as the size of the disk.
const CAPACITY_BYTES: u64 = 64 << 30;

/// The filesystem served to the kernel.
pub struct FuseFs {
    model: Arc<Mutex<Model>>,
}

impl FuseFs {
    pub fn new(model: Arc<Mutex<Model>>) -> FuseFs {
        FuseFs { model }
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps for the model's fsync delay, without holding the lock.
    fn fsync_delay(&self) {
        let d = self.m().fsync_delay;
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn attr(m: &Model, i: &Inode) -> FileAttr {
    let size = i.size();
    FileAttr {
        ino: INodeNo(i.ino),
        size,
        blocks: size.div_ceil(512),
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.ctime,
        kind: if i.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: i.perm,
        nlink: if i.is_dir() { 2 } else { m.nlink(i.ino).max(1) },
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        blksize: BLOCK as u32,
        flags: 0,
    }
}

fn attr_of(m: &Model, ino: u64) -> Res<FileAttr> {
    Ok(attr(m, m.get(ino)?))
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn perm_bits(mode: u32, umask: u32) -> u16 {
    ((mode & !umask) & 0o7777) as u16
}

impl Filesystem for FuseFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let m = self.m();
        match m.lookup(parent.0, name).and_then(|ino| attr_of(&m, ino)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let m = self.m();
        match attr_of(&m, ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut m = self.m();
        let r = (|| {
            if let Some(len) = size {
                m.set_len(ino.0, len)?;
            }
            m.set_attr(
                ino.0,
                mode.map(|mo| (mo & 0o7777) as u16),
                uid,
                gid,
                atime.map(time),
                mtime.map(time),
            )?;
            attr_of(&m, ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut m = self.m();
        let r = m
            .mkdir(parent.0, name, perm_bits(mode, umask), req.uid(), req.gid())
            .and_then(|ino| attr_of(&m, ino));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.m().unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.m().rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .m()
            .rename(parent.0, name, newparent.0, newname, noreplace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut m = self.m();
        let append = flags.0 & libc::O_APPEND != 0;
        match m.get(ino.0).map(|i| i.is_dir()) {
            Ok(true) => reply.error(Errno::EISDIR),
            Ok(false) => match m.open(ino.0, append) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(e)),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let m = self.m();
        match m.read(ino.0, offset, size) {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.m().write(ino.0, Some(fh.0), offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.m().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_delay();
        match self.m().fsync(ino.0, Some(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.m().get(ino.0).map(|i| i.is_dir()) {
            Ok(true) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(false) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.m().list(ino.0) {
            Ok(l) => l,
            Err(e) => {
                reply.error(errno(e));
                return;
            }
        };
        for (i, (child, is_dir, name)) in list.into_iter().enumerate().skip(offset as usize) {
            let kind = if is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_delay();
        match self.m().fsyncdir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.m().stats();
        let blocks = CAPACITY_BYTES / BLOCK;
        let used = s.bytes_stored.div_ceil(BLOCK);
        let free = blocks.saturating_sub(used);
        let files = 1 << 20;
        reply.statfs(
            blocks,
            free,
            free,
            files,
            files - (s.files + s.dirs).min(files),
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.m().get(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut m = self.m();
        let append = flags & libc::O_APPEND != 0;
        let r = m
            .create(
                parent.0,
                name,
                perm_bits(mode, umask),
                req.uid(),
                req.gid(),
                append,
            )
            .and_then(|(ino, fh)| Ok((attr_of(&m, ino)?, fh)));
        match r {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let mut m = self.m();
        let end = offset.saturating_add(length);
        let r = match m.get(ino.0) {
            Ok(i) if matches!(i.node, Node::File(_)) && i.size() < end => m.set_len(ino.0, end),
            Ok(i) if i.is_dir() => Err(libc::EISDIR),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}
