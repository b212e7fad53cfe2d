//! userfaultfd helpers (missing mode): register guest memory so its first
//! touches come to us as messages, and fill pages in atomically.
//!
//! Owns the few kernel structures and ioctls ferry uses (from
//! `linux/userfaultfd.h`; the libc crate does not carry them): the API
//! handshake, REGISTER (missing mode), COPY, ZEROPAGE, MOVE, WAKE and
//! reading page-fault messages. Closing the descriptor unregisters everything and
//! lets any thread still waiting on a fault continue with a zero page.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `_IOWR(0xAA, nr, size)`.
/// `_IOWR(0xAA, nr, size)`: a userfaultfd ioctl that reads and writes its struct.
pub(crate) const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x02; // _IOR, uffdio_range
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_MOVE: u64 = iowr(0x05, std::mem::size_of::<UffdioMove>());
/// UFFDIO_MOVE is offered (Linux 6.8+).
const UFFD_FEATURE_MOVE: u64 = 1 << 16;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
/// `struct uffdio_range` (also used by `crate::uffd_wp`).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    /// Bytes moved, or a negated errno.
    moved: i64,
}
/// `struct uffd_msg`: 32 bytes; for a page fault, the address is at 16.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// A userfaultfd in missing mode, non-blocking.
pub struct Userfault {
    fd: OwnedFd,
    /// UFFDIO_MOVE was asked for and offered ([`Self::open_with_move`]).
    can_move: bool,
}

impl Userfault {
    /// Opens a userfaultfd. Without the privilege for kernel-mode faults
    /// (`vm.unprivileged_userfaultfd` = 0), falls back to user-mode-only.
    pub fn open() -> io::Result<Self> {
        Self::open_with_features(0)
    }

    /// [`Self::open`], with UFFDIO_MOVE ([`Self::move_pages`]) where the
    /// kernel offers it (Linux 6.8+) and transparent huge pages are on
    /// ([`transparent_huge_pages`]: without them a 2 MiB move goes 4 KiB
    /// at a time, each with a TLB flush, slower than copying);
    /// [`Self::can_move`] says whether it is used.
    pub fn open_with_move() -> io::Result<Self> {
        if !transparent_huge_pages() {
            return Self::open();
        }
        match Self::open_with_features(UFFD_FEATURE_MOVE) {
            Ok(mut u) => {
                u.can_move = true;
                Ok(u)
            }
            // EINVAL: a feature this kernel does not know.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Self::open(),
            Err(e) => Err(e),
        }
    }

    /// Whether [`Self::move_pages`] is available.
    pub fn can_move(&self) -> bool {
        self.can_move
    }

    /// Opens a userfaultfd asking for `features` (UFFD_FEATURE_* bits); an
    /// error if the kernel does not offer them all.
    pub(crate) fn open_with_features(features: u64) -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            // SAFETY: as above.
            fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
        }
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "userfaultfd is not allowed for this process: run as root (or with \
                     CAP_SYS_PTRACE), or allow it for everyone with \
                     `sysctl vm.unprivileged_userfaultfd=1`",
                ));
            }
            return Err(e);
        }
        // SAFETY: fd is a descriptor we just created and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api, which `api` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            can_move: false,
        })
    }

    /// The descriptor, for ioctls this module does not wrap.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Registers `[start, start + len)` (page aligned, mapped anonymous
    /// memory) for missing-page faults.
    pub fn register(&self, start: *mut u8, len: u64) -> io::Result<()> {
        self.register_mode(start as u64, len, UFFDIO_REGISTER_MODE_MISSING)
    }

    /// Registers `[start, start + len)` in `mode` (UFFDIO_REGISTER_MODE_*).
    pub(crate) fn register_mode(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register; the
        // kernel checks the range is mapped and refuses it otherwise.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Fills the missing pages `[dst, dst + len)` atomically with `src`, and
    /// wakes threads waiting on them.
    ///
    /// # Safety
    /// `dst..dst + len` must lie in a registered range; `src` must be
    /// readable for `len` bytes.
    pub unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: u64) -> io::Result<()> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one uffdio_copy; the caller
        // vouches for both ranges.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Moves the pages of `[src, src + len)` (this process's anonymous
    /// private memory, not shared with any other mapping) to the missing
    /// pages `[dst, dst + len)`, and wakes threads waiting on them: no copy,
    /// and a whole transparent huge page, where `src` holds one and the
    /// 2 MiB at `dst` are empty and aligned, moves as one page-table entry.
    /// `src` is left empty (its next touch is a fresh zero page). Returns
    /// the bytes moved, which is `len` unless the error was met part way:
    /// an error after some pages moved is `Ok` with fewer bytes (the rest
    /// is still at `src`); an error before any moved is `Err`.
    ///
    /// # Safety
    /// `dst..dst + len` must lie in a range registered here, its pages
    /// missing and claimed by the caller; nothing else may use
    /// `src..src + len` during the call, nor expect its bytes after.
    pub unsafe fn move_pages(&self, dst: *mut u8, src: *mut u8, len: u64) -> io::Result<u64> {
        let mut m = UffdioMove {
            dst: dst as u64,
            src: src as u64,
            len,
            mode: 0,
            moved: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes one uffdio_move; the caller
        // vouches for both ranges (the kernel checks they are anonymous,
        // private and that dst is registered).
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_MOVE as _, &mut m) } < 0 {
            let e = io::Error::last_os_error();
            return if m.moved > 0 {
                Ok(m.moved as u64)
            } else {
                Err(e)
            };
        }
        Ok(len)
    }

    /// Maps zero pages over the missing pages `[dst, dst + len)` and wakes waiters.
    pub fn zero(&self, dst: *mut u8, len: u64) -> io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage; the
        // kernel refuses ranges that are not registered with this descriptor.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes threads waiting on faults in `[start, start + len)` (pages
    /// already filled by someone else).
    pub fn wake(&self, start: *mut u8, len: u64) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len,
        };
        // SAFETY: UFFDIO_WAKE reads one uffdio_range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for page faults and returns their addresses
    /// (other events are ignored).
    pub fn faults(&self, timeout_ms: i32, out: &mut Vec<u64>) -> io::Result<()> {
        out.clear();
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, timeout_ms) } < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let mut msgs = [UffdMsg {
            event: 0,
            _reserved: [0; 7],
            flags: 0,
            address: 0,
            _feat: 0,
        }; 32];
        // SAFETY: reads at most size_of_val(msgs) bytes into our array of
        // plain-data messages.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(())
            } else {
                Err(e)
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(
            msgs[..count]
                .iter()
                .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
                .map(|m| m.address),
        );
        Ok(())
    }
}

/// Whether transparent huge pages can back anonymous memory here: the
/// system's setting (`/sys/kernel/mm/transparent_hugepage/enabled`) is
/// not `never` (with `madvise`, [`HugeStaging`] asks for them).
pub fn transparent_huge_pages() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"))
    })
}

/// The size of a transparent huge page with 4 KiB base pages (x86-64,
/// aarch64): what [`HugeStaging`] holds and [`Userfault::move_pages`] can
/// move as one page-table entry.
pub const HUGE_PAGE: u64 = 2 << 20;

/// A [`HUGE_PAGE`]-aligned buffer of this process's anonymous private
/// memory, backed by one transparent huge page where the kernel can
/// (MADV_HUGEPAGE): a huge page's worth of guest memory is filled here and
/// then moved into place whole ([`Userfault::move_pages`]), one page-table
/// entry rather than 512 freshly allocated 4 KiB pages. After a move the
/// buffer is empty; its next write faults in a fresh (zeroed) page.
pub struct HugeStaging {
    /// Twice [`HUGE_PAGE`], so that an aligned one lies inside.
    map: vm_memory::MmapRegion,
    /// Where the aligned [`HUGE_PAGE`] starts in `map`.
    offset: usize,
}

impl HugeStaging {
    pub fn new() -> io::Result<Self> {
        let len = 2 * HUGE_PAGE as usize;
        let map = vm_memory::MmapRegion::new(len).map_err(io::Error::other)?;
        let base = map.as_ptr() as usize;
        let offset = base.next_multiple_of(HUGE_PAGE as usize) - base;
        // SAFETY: madvise over [offset, offset + HUGE_PAGE) of our own
        // private anonymous mapping (inside its 2 × HUGE_PAGE); MADV_HUGEPAGE
        // only changes how the kernel backs it. Failure (a kernel without
        // THP) leaves 4 KiB pages, which moves accept too.
        unsafe {
            libc::madvise(
                map.as_ptr().add(offset).cast(),
                HUGE_PAGE as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        Ok(Self { map, offset })
    }

    /// The buffer.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: [offset, offset + HUGE_PAGE) lies inside `map`, which is
        // our own private mapping, readable and writable, living as long as
        // `self`; `&mut self` makes this the only reference to it. After a
        // move its pages are gone, and touching them maps fresh zero-filled
        // ones: the memory stays valid.
        unsafe {
            std::slice::from_raw_parts_mut(self.map.as_ptr().add(self.offset), HUGE_PAGE as usize)
        }
    }

    /// The buffer's start, for [`Userfault::move_pages`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.bytes_mut().as_mut_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_MOVE, 0xC028_AA05);
    }

    #[test]
    fn a_staged_huge_page_moves_into_place_whole_and_wakes_its_toucher() {
        let uffd = Userfault::open_with_move().expect("userfaultfd");
        if !uffd.can_move() {
            eprintln!("skipped: no UFFDIO_MOVE (Linux 6.8+) or transparent huge pages off");
            return;
        }
        let len = 2 * HUGE_PAGE;
        let block = crate::RamBlock::anonymous("t", len, 4096).unwrap();
        let aligned = (block.host_addr() as u64).next_multiple_of(HUGE_PAGE);
        uffd.register(block.host_addr(), block.len()).unwrap();
        let mut stage = HugeStaging::new().unwrap();
        for (i, b) in stage.bytes_mut().iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let want = stage.bytes_mut().to_vec();
        let dst = aligned as usize;
        let toucher = std::thread::spawn(move || {
            // SAFETY: a byte of the block's aligned huge page, inside the
            // block, which outlives this thread (joined below).
            unsafe { std::ptr::read_volatile((dst + 4096 * 300 + 5) as *const u8) }
        });
        // The toucher blocks on the missing page until the move lands.
        let mut faults = Vec::new();
        while faults.is_empty() {
            uffd.faults(1000, &mut faults).unwrap();
        }
        let src = stage.as_mut_ptr();
        // SAFETY: the aligned huge page lies inside the registered block and
        // is missing; the staging buffer is ours alone.
        let moved = unsafe { uffd.move_pages(dst as *mut u8, src, HUGE_PAGE) }.unwrap();
        assert_eq!(moved, HUGE_PAGE);
        assert_eq!(toucher.join().unwrap(), want[4096 * 300 + 5]);
        let off = dst - block.host_addr() as usize;
        let got = block.copy_bytes(off as u64, HUGE_PAGE as usize).unwrap();
        assert!(got == want, "the moved huge page's bytes differ");
        // The buffer gave its page away: it reads as a fresh zero page.
        assert!(stage.bytes_mut().iter().all(|&b| b == 0));
        // A second move onto the same (now present) pages is refused.
        stage.bytes_mut()[0] = 1;
        let src = stage.as_mut_ptr();
        // SAFETY: as above; the kernel refuses the present destination.
        let again = unsafe { uffd.move_pages(dst as *mut u8, src, HUGE_PAGE) };
        assert_eq!(again.unwrap_err().raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn a_first_touch_is_served_by_the_handler() {
        let uffd = Userfault::open().expect("userfaultfd (Linux >= 5.11 for user-mode-only)");
        let block = crate::RamBlock::anonymous("t", 4 * 4096, 4096).unwrap();
        uffd.register(block.host_addr(), block.len()).unwrap();
        let addr = block.host_addr() as usize;
        let toucher = std::thread::spawn(move || {
            // SAFETY: page 2 of the block, which outlives this thread (joined below).
            unsafe { std::ptr::read_volatile((addr + 2 * 4096 + 10) as *const u8) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            uffd.faults(1000, &mut faults).unwrap();
        }
        assert_eq!(faults[0] & !4095, addr as u64 + 2 * 4096);
        let src = vec![7u8; 4096];
        // SAFETY: page 2 is registered and missing; src is 4096 readable bytes.
        unsafe { uffd.copy((addr + 2 * 4096) as *mut u8, src.as_ptr(), 4096) }.unwrap();
        assert_eq!(toucher.join().unwrap(), 7);
    }
}
