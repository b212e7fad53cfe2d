//! How file mode runs ([`FileOptions`]) and the descriptor page data moves
//! through ([`DataFile`]: O_DIRECT when asked and allowed, else buffered).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use ferry_ram::mapped::open_regular;
use ferry_ram::RamError;

use crate::FileError;

/// How file mode runs.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// Threads, each with its own ring.
    pub channels: u16,
    /// Open the file with O_DIRECT (falls back to buffered I/O if refused).
    pub direct_io: bool,
    /// Reads or writes in flight per thread.
    pub queue_depth: usize,
    /// Saving: the shortest run of zero pages left as a hole in the file.
    /// Shorter runs between non-zero pages are written (as the zeros they
    /// are) so writes stay large; their bitmap bits stay clear either way.
    /// A page size (or less) leaves every zero page a hole.
    pub hole_min: u64,
    /// Set (from any thread) to stop early: threads claim no more work,
    /// wait for what they have in flight, and the call returns
    /// [`FileError::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            channels: 2,
            direct_io: false,
            queue_depth: 64,
            hole_min: 0,
            cancel: None,
        }
    }
}

impl FileOptions {
    /// Whether [`FileOptions::cancel`] is set.
    pub fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Relaxed))
    }
}

/// The error a cancelled file operation ends with.
pub(crate) fn cancelled(path: &Path) -> FileError {
    FileError::Cancelled { path: path.into() }
}

/// The file descriptor page data moves through.
pub struct DataFile {
    pub(crate) file: File,
    /// O_DIRECT is in effect.
    pub direct: bool,
    /// Why O_DIRECT was asked for and not used.
    pub note: Option<String>,
}

impl DataFile {
    /// Opens `path` (which exists, and must be a regular file) for page
    /// I/O, with O_DIRECT if asked and the file system allows it.
    pub fn open(path: &Path, write: bool, direct: bool) -> Result<Self, FileError> {
        let open = |flags: i32| {
            open_regular(
                path,
                File::options().read(true).write(write),
                flags,
                "opening for page I/O",
                "a saved guest is a regular file",
            )
        };
        if !direct {
            return Ok(Self {
                file: open(0)?,
                direct: false,
                note: None,
            });
        }
        match open(libc::O_DIRECT) {
            Ok(file) => Ok(Self {
                file,
                direct: true,
                note: None,
            }),
            Err(RamError::PathIo { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Ok(Self {
                    file: open(0)?,
                    direct: false,
                    note: Some(format!(
                        "the file system of {} refuses O_DIRECT (tmpfs did before Linux 6.6); used buffered I/O",
                        path.display()
                    )),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}
