//! The filesystem as the log sees it: a small trait, so that tests can put a
//! crash-simulating implementation (one that forgets everything not yet
//! fsync'd) under the very same writer and recovery code that runs in
//! production.
//!
//! The trait is deliberately narrow. It has exactly the operations whose
//! durability the log reasons about: create a file (its directory entry is not
//! durable until [`Storage::sync_dir`]), append, reserve (zeros ahead of the
//! appends), `sync_data` (fdatasync), set the length (to cut a torn tail),
//! read at an offset, list, remove.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A file opened for appending. Appends go to the *append position*: the
/// end of the file when it is opened, and then the end of the last append,
/// which is before the end of the file once zeros were reserved after it.
pub trait WritableFile: Send {
    /// Writes all of `buf` at the append position and moves it past them.
    /// A short or failed write may leave part of `buf` in the file: the
    /// caller cuts it off with [`WritableFile::set_len`].
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Writes zero bytes from the end of the file up to `upto` (nothing if
    /// the file is that long already), leaving the append position where it
    /// is. Appends that then land on those zeros overwrite blocks the file
    /// already has, so their fdatasync has no file size or block allocation
    /// to make durable as well (see `writer.rs`). A failed call may leave
    /// part of the zeros: the caller cuts them off with
    /// [`WritableFile::set_len`].
    fn reserve(&mut self, upto: u64) -> io::Result<()>;
    /// Makes every byte written so far durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Truncates (or extends) the file to `len` bytes and puts the append
    /// position there.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// A file opened for reading at arbitrary offsets, shared by many readers.
pub trait ReadableFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read
    /// (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The file's current length.
    fn len(&self) -> io::Result<u64>;

    /// True when the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads exactly `buf.len()` bytes, or fewer only at end of file; returns
    /// how many were read.
    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

/// The directory-level operations the log needs.
pub trait Storage: Send + Sync + 'static {
    /// Creates a new file (failing if it exists) and opens it for appending.
    /// Its directory entry is durable only after [`Storage::sync_dir`].
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Opens an existing file for appending at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Opens an existing file for reading.
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadableFile>>;
    /// Lists the file names (not paths) in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Removes a file. Durable after [`Storage::sync_dir`].
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames a file. Durable after [`Storage::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, removals, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates the directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

/// A file written at explicit offsets (not opened with `O_APPEND`, under
/// which Linux ignores the offset of a positional write).
struct RealWritable {
    file: File,
    /// The append position.
    pos: u64,
    /// The file's length as this handle made it.
    len: u64,
}

impl RealWritable {
    fn at_end(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            pos: len,
            len,
        })
    }
}

/// Zeros written at once by [`WritableFile::reserve`].
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl WritableFile for RealWritable {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        self.len = self.len.max(self.pos);
        Ok(())
    }
    fn reserve(&mut self, upto: u64) -> io::Result<()> {
        while self.len < upto {
            let n = (upto - self.len).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], self.len)?;
            self.len += n as u64;
        }
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.pos = len;
        self.len = len;
        Ok(())
    }
}

struct RealReadable(File);

impl ReadableFile for RealReadable {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.0.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Storage for RealStorage {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let f = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(RealWritable::at_end(f)?))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let f = OpenOptions::new().write(true).open(path)?;
        Ok(Box::new(RealWritable::at_end(f)?))
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn ReadableFile>> {
        Ok(Arc::new(RealReadable(File::open(path)?)))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // On Linux a directory opened read-only can be fsync'd; that is what
        // makes a newly created segment's name survive power loss.
        File::open(dir)?.sync_all()
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
}
