//! How file mode runs ([`FileOptions`]) and the descriptor page data moves
//! through ([`DataFile`]: O_DIRECT unless told otherwise or refused, else
//! buffered; [`IoMode`]).

use std::fs::File;
use std::os::fd::AsRawFd;
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
    /// How page data moves between memory and the file (default
    /// [`IoMode::Auto`]: O_DIRECT wherever the file system takes it).
    pub io: IoMode,
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
            io: IoMode::Auto,
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

/// How page data moves between guest memory and a saved file.
///
/// O_DIRECT bypasses the page cache: page data goes straight between guest
/// memory and the disk (pages are page aligned, so no bounce buffer), the
/// cache is neither filled nor evicted, and on this project's VMs it is
/// about twice as fast as buffered I/O (docs/MEASUREMENTS.md). The device
/// state, bitmaps, checksum tables and header always go through the page
/// cache (another descriptor; they are small), and a save ends with an
/// fsync either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// O_DIRECT where the file system takes it for this file and the
    /// pages meet its alignment; else buffered I/O, and
    /// [`DataFile::fallback`] says why.
    #[default]
    Auto,
    /// O_DIRECT or an error ([`FileError::DirectIo`]).
    Direct,
    /// Through the page cache.
    Buffered,
}

impl IoMode {
    /// The name the command line and summaries use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Direct => "direct",
            Self::Buffered => "buffered",
        }
    }
}

/// What a file's statx says about O_DIRECT on it.
enum DioAlign {
    /// The file system does not say (tmpfs, older kernels): it took the
    /// O_DIRECT open, so page-aligned I/O is assumed to work.
    Unknown,
    /// The file system does not support O_DIRECT on this file.
    Unsupported,
    /// Memory addresses, file offsets and lengths must be multiples of this.
    Needs(u32),
}

/// Asks the kernel (statx `STATX_DIOALIGN`, Linux 6.1) what alignment
/// O_DIRECT needs on `file`.
fn dio_alignment(file: &File) -> DioAlign {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on a descriptor `file` owns (AT_EMPTY_PATH with an
    // empty, NUL-terminated path), writing into `stx`, which lives across
    // the call.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return DioAlign::Unknown;
    }
    if stx.stx_dio_offset_align == 0 {
        return DioAlign::Unsupported;
    }
    DioAlign::Needs(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align))
}

/// Alignment of [`AlignedBuf`]: a page, which meets O_DIRECT's
/// alignment wherever [`DataFile::open`] chose it (it checks the pages
/// against what the file system needs, and pages are at least 4 KiB).
const ALIGN: usize = 4096;

/// A buffer whose usable part starts on an `ALIGN` boundary (no unsafe:
/// an oversized vector and an offset into it).
pub(crate) struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let v = vec![0u8; len + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        let off = if off < ALIGN { off } else { 0 };
        Self { v, off, len }
    }
    pub(crate) fn get(&self, len: usize) -> &[u8] {
        &self.v[self.off..self.off + len.min(self.len)]
    }
    pub(crate) fn get_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.v[self.off..self.off + len.min(self.len)]
    }
}

/// The file system `path` lies on, for messages: "ramfs at DIR" (the
/// directory, not the file: a save writes a temporary name there).
fn file_system(path: &Path) -> String {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|c| {
            // SAFETY: an all-zero statfs is a valid value of this plain C struct.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: `c` is a NUL-terminated path and `st` lives across the call.
            let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
            (r == 0).then_some(st.f_type)
        })
        // f_type's width differs between architectures; the magic
        // numbers (linux/magic.h) are 32 bits.
        .and_then(|t| match t as u32 {
            0x0102_1994 => Some("tmpfs"),
            0x8584_58f6 => Some("ramfs"),
            0xef53 => Some("ext4"),
            0x5846_5342 => Some("xfs"),
            0x9123_683e => Some("btrfs"),
            0x6969 => Some("nfs"),
            0x6573_5546 => Some("a FUSE file system"),
            0x794c_7630 => Some("overlayfs"),
            _ => None,
        })
        .unwrap_or("the file system");
    format!("{name} at {}", dir.display())
}

/// The file descriptor page data moves through.
pub struct DataFile {
    pub(crate) file: File,
    /// O_DIRECT is in effect.
    pub direct: bool,
    /// Why [`IoMode::Auto`] used buffered I/O instead of O_DIRECT.
    pub fallback: Option<String>,
}

impl DataFile {
    /// Opens `path` (which exists, and must be a regular file) for page
    /// I/O as `mode` says. `align` is what every transfer's memory address,
    /// file offset and length is a multiple of (the smallest page size of
    /// the file's blocks): O_DIRECT is used only if that meets the file
    /// system's alignment.
    pub fn open(path: &Path, write: bool, mode: IoMode, align: u64) -> Result<Self, FileError> {
        let open = |flags: i32| {
            open_regular(
                path,
                File::options().read(true).write(write),
                flags,
                "opening for page I/O",
                "a saved guest is a regular file",
            )
        };
        let buffered = |fallback| -> Result<Self, FileError> {
            Ok(Self {
                file: open(0)?,
                direct: false,
                fallback,
            })
        };
        if mode == IoMode::Buffered {
            return buffered(None);
        }
        let why = match open(libc::O_DIRECT) {
            Ok(file) => match dio_alignment(&file) {
                DioAlign::Unknown => {
                    return Ok(Self {
                        file,
                        direct: true,
                        fallback: None,
                    })
                }
                DioAlign::Needs(n) if align.is_multiple_of(u64::from(n)) && n as usize <= ALIGN => {
                    return Ok(Self {
                        file,
                        direct: true,
                        fallback: None,
                    })
                }
                DioAlign::Needs(n) => format!(
                    "O_DIRECT on {} needs {n}-byte alignment, more than the pages ({align} \
                     bytes) or ferry's {ALIGN}-byte buffers have",
                    file_system(path)
                ),
                DioAlign::Unsupported => format!(
                    "{} does not support O_DIRECT for this file",
                    file_system(path)
                ),
            },
            Err(RamError::PathIo { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                format!("{} refuses O_DIRECT (EINVAL on open)", file_system(path))
            }
            Err(e) => return Err(e.into()),
        };
        if mode == IoMode::Direct {
            return Err(FileError::DirectIo {
                path: path.into(),
                why,
            });
        }
        buffered(Some(format!("{why}; used buffered I/O")))
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether a read into (or a write from) `buf` may go through this
    /// handle: always when buffered; with O_DIRECT when `buf` starts and
    /// ends on an [`ALIGN`] boundary (page offsets are page aligned, and
    /// [`DataFile::open`] chose O_DIRECT only if that alignment suffices).
    pub fn takes(&self, buf: &[u8]) -> bool {
        !self.direct
            || ((buf.as_ptr() as usize).is_multiple_of(ALIGN) && buf.len().is_multiple_of(ALIGN))
    }
}
