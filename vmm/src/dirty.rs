//! KVM's dirty tracking as ferry's [`DirtyLog`], two ways ([`DirtyTracker`]):
//!
//! - **kvm-log**: the per-slot dirty bitmap. `KVM_GET_DIRTY_LOG` per memory
//!   slot (one slot per RAM block), each bit a 4 KiB page, ORed into the
//!   pass's bitmaps. Without manual protect the kernel returns and clears
//!   the slot's bitmap in one ioctl and write-protects the dirty pages
//!   again. Where the kernel has `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (and it
//!   is asked for), the VMM enables it on the VM before registering memory:
//!   `KVM_GET_DIRTY_LOG` then only copies the bitmap, and the sync clears
//!   exactly the bits it took with `KVM_CLEAR_DIRTY_LOG`, which
//!   write-protects those pages; a page written between the two ioctls
//!   keeps its bit for the next sync. kvm-ioctls 0.25 has no wrapper for
//!   `KVM_CLEAR_DIRTY_LOG`; [`clear_dirty_log`] issues it.
//! - **kvm-ring**: `KVM_CAP_DIRTY_LOG_RING`, enabled on the VM before any
//!   vCPU exists. Each vCPU has a ring of `kvm_dirty_gfn` entries (slot,
//!   page offset, flags) that KVM fills as the vCPU first writes a
//!   protected page, mapped from the vCPU fd at
//!   `KVM_DIRTY_LOG_PAGE_OFFSET` pages. A harvest walks each ring from its
//!   fetch index while an entry is marked DIRTY, notes the page in a
//!   per-slot pending bitmap and marks the entry RESET; then
//!   `KVM_RESET_DIRTY_RINGS` (no kvm-ioctls wrapper either) write-protects
//!   the harvested pages again and frees their entries. A sync harvests and
//!   moves the pending bits into the pass. When a ring fills up between
//!   syncs the vCPU exits with `KVM_EXIT_DIRTY_RING_FULL` and its thread
//!   harvests into the pending bitmaps itself ([`DirtyRings::on_ring_full`]).
//!   One lock covers a whole harvest (walk, mark, reset), so a sync never
//!   returns a page whose entry another harvest has taken but not yet
//!   reset (the page would stay writable, unlogged, while it is sent).
//!
//! Either way a page is clean in the log (protected again) before the sync
//! returns, so before the sender reads it: a write after that is caught by
//! the next sync.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_ram::{DirtyLog, PageBitmap, RamError};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::VmmError;
use crate::vm::Slot;

/// `KVM_DIRTY_GFN_F_DIRTY` and `KVM_DIRTY_GFN_F_RESET` (include/uapi/linux/kvm.h:
/// `_BITUL(0)`, `_BITUL(1)`; bindgen does not carry them).
const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;

/// `_IOC(dir, KVMIO, nr, size)` as the kernel's asm-generic ioctl.h builds it.
const fn kvm_ioc(dir: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr) as libc::c_ulong
}
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
pub const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = kvm_ioc(3, 0xc0, size_of::<kvm_clear_dirty_log>());
/// `_IO(KVMIO, 0xc7)`.
pub const KVM_RESET_DIRTY_RINGS: libc::c_ulong = kvm_ioc(0, 0xc7, 0);

/// Which of KVM's dirty trackers a VM uses; chosen when the VM is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyTracker {
    /// `KVM_GET_DIRTY_LOG`; with `manual_protect`, where the kernel has
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, plus `KVM_CLEAR_DIRTY_LOG`.
    Log { manual_protect: bool },
    /// `KVM_CAP_DIRTY_LOG_RING` with `entries` entries per vCPU (a power
    /// of two; 16 bytes each).
    Ring { entries: u32 },
}

/// Ring entries per vCPU unless asked otherwise: 16384 (256 KiB a vCPU).
pub const DEFAULT_RING_ENTRIES: u32 = 16384;

impl Default for DirtyTracker {
    fn default() -> Self {
        Self::Log {
            manual_protect: true,
        }
    }
}

impl DirtyTracker {
    /// `kvm-log` or `kvm-ring`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Log { .. } => "kvm-log",
            Self::Ring { .. } => "kvm-ring",
        }
    }
}

impl FromStr for DirtyTracker {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm-log" => Ok(Self::default()),
            "kvm-ring" => Ok(Self::Ring {
                entries: DEFAULT_RING_ENTRIES,
            }),
            _ => Err(format!(
                "KVM dirty tracker '{s}': expected kvm-log or kvm-ring"
            )),
        }
    }
}

/// What this kernel offers for dirty tracking (KVM_CHECK_EXTENSION on a VM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerSupport {
    /// The flags KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 accepts (0: none).
    pub manual_protect_flags: u32,
    /// The largest dirty ring per vCPU in bytes (0: no KVM_CAP_DIRTY_LOG_RING).
    pub ring_max_bytes: u32,
    /// Why this host's dirty ring, though announced, cannot be trusted.
    pub ring_defect: Option<&'static str>,
}

/// kvm_pvm (the software KVM of these machines) announces
/// KVM_CAP_DIRTY_LOG_RING, but its instruction emulator (which handles the
/// guest's writes to write-protected pages, up to `pvm_emul_batch`
/// instructions per exit) pushes one ring entry per emulated write through
/// `__kvm_write_guest_page` and never stops at the soft limit: the ring
/// overflows (kernel WARNING at virt/kvm/dirty_ring.c `kvm_dirty_ring_push`),
/// overwritten entries lose their pages, and the vCPU then exits with
/// KVM_EXIT_DIRTY_RING_FULL for ever while KVM_RESET_DIRTY_RINGS resets 0.
/// Measured on Linux 6.18 with kvm_pvm, rings of 1024 to 65536 entries.
const KVM_PVM_RING_DEFECT: &str =
    "this host's KVM is kvm_pvm, whose instruction emulator writes one \
     dirty-ring entry per emulated guest write without stopping the vCPU at the ring's soft limit: \
     the ring overflows (kernel WARNING in kvm_dirty_ring_push) and dirty pages are lost, so \
     KVM_CAP_DIRTY_LOG_RING is announced but unusable; use kvm-log";

impl TrackerSupport {
    /// Asks the kernel (creates and drops a VM).
    pub fn probe() -> Result<Self, VmmError> {
        let kvm = kvm_ioctls::Kvm::new()
            .map_err(|e| VmmError::NoKvm(io::Error::from_raw_os_error(e.errno())))?;
        let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        Ok(Self::of(&vm))
    }

    pub(crate) fn of(vm: &VmFd) -> Self {
        let ext = |cap: u32| vm.check_extension_raw(libc::c_ulong::from(cap)).max(0) as u32;
        Self {
            manual_protect_flags: ext(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            ring_max_bytes: ext(KVM_CAP_DIRTY_LOG_RING),
            ring_defect: std::path::Path::new("/sys/module/kvm_pvm")
                .exists()
                .then_some(KVM_PVM_RING_DEFECT),
        }
    }

    /// Why `tracker` cannot run here, if it cannot.
    pub fn refuses(&self, tracker: DirtyTracker) -> Option<VmmError> {
        let DirtyTracker::Ring { entries } = tracker else {
            return None;
        };
        if self.ring_max_bytes == 0 {
            return Some(VmmError::Unsupported {
                what: "the kvm-ring dirty tracker",
                why: "this kernel lacks KVM_CAP_DIRTY_LOG_RING (KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING) returned 0); use kvm-log".into(),
            });
        }
        if let Some(why) = self.ring_defect {
            return Some(VmmError::Unsupported {
                what: "the kvm-ring dirty tracker",
                why: why.into(),
            });
        }
        let bytes = u64::from(entries) * size_of::<kvm_dirty_gfn>() as u64;
        if !entries.is_power_of_two() || bytes > u64::from(self.ring_max_bytes) {
            return Some(VmmError::Config(format!(
                "a dirty ring of {entries} entries ({bytes} bytes): a power of two of at most {} bytes here",
                self.ring_max_bytes
            )));
        }
        None
    }
}

/// Turns on manual protect if the kernel has it; says whether it did.
pub(crate) fn enable_manual_protect(vm: &VmFd, support: &TrackerSupport) -> Result<bool, VmmError> {
    if support.manual_protect_flags & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    vm.enable_cap(&cap).map_err(VmmError::kvm(
        "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL_PROTECT_ENABLE)",
    ))?;
    Ok(true)
}

/// Turns on the dirty ring (before any vCPU is created).
pub(crate) fn enable_ring(
    vm: &VmFd,
    support: &TrackerSupport,
    entries: u32,
) -> Result<(), VmmError> {
    if let Some(e) = support.refuses(DirtyTracker::Ring { entries }) {
        return Err(e);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = u64::from(entries) * size_of::<kvm_dirty_gfn>() as u64;
    vm.enable_cap(&cap).map_err(VmmError::kvm(format!(
        "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, {} bytes)",
        cap.args[0]
    )))
}

/// `KVM_CLEAR_DIRTY_LOG` over a whole slot: clears the bits set in
/// `bitmap` (one bit per page of the slot) and write-protects those pages.
pub fn clear_dirty_log(vm: &VmFd, slot: u32, pages: u64, bitmap: &mut [u64]) -> io::Result<()> {
    if (bitmap.len() as u64) * 64 < pages || pages > u64::from(u32::MAX) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a bitmap of {} words for {pages} pages", bitmap.len()),
        ));
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages: pages as u32,
        first_page: 0,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `vm` is an open KVM VM fd; `arg` is a kvm_clear_dirty_log
    // whose bitmap points at `bitmap`, checked above to hold a bit for each
    // of the `pages` pages the kernel reads (num_pages from first_page 0,
    // the whole slot, which KVM accepts whatever its size); the kernel only
    // reads the bitmap and `arg`, both live for the call.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One vCPU's dirty ring, mapped from its fd.
struct RingMap {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    bytes: usize,
}

// SAFETY: the mapping is process-wide memory shared with the kernel; every
// access goes through `DirtyRings`, which holds its `fetch` lock for the
// whole of a harvest, and touches an entry's `flags` only atomically (the
// kernel writes it too).
unsafe impl Send for RingMap {}
// SAFETY: as for Send: shared access is serialised by `DirtyRings::fetch`.
unsafe impl Sync for RingMap {}

impl RingMap {
    fn map(vcpu: &VcpuFd, index: usize, entries: u32) -> Result<Self, VmmError> {
        let bytes = entries as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page as libc::off_t;
        // SAFETY: a new shared mapping chosen by the kernel (no address
        // hint), of the vCPU fd's dirty ring at the offset KVM documents
        // (KVM_DIRTY_LOG_PAGE_OFFSET pages), exactly the ring's size as
        // enabled on the VM; it overlaps nothing of ours and is unmapped
        // only in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmmError::Vcpu {
                vcpu: index,
                what: "mmap of the dirty ring",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            base: NonNull::new(p.cast()).expect("mmap returned a non-null address"),
            entries,
            bytes,
        })
    }

    /// Entry `index` (modulo the ring's size).
    fn entry(&self, index: u32) -> *mut kvm_dirty_gfn {
        // SAFETY: the offset is below `entries`, so within the mapping.
        unsafe {
            self.base
                .as_ptr()
                .add((index & (self.entries - 1)) as usize)
        }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`bytes` are exactly the mapping `map` made, and
        // nothing refers to it any more (its owner is being dropped).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// Every vCPU's dirty ring of one VM, and the pages harvested from them
/// that no sync has taken yet.
pub(crate) struct DirtyRings {
    vm: Arc<VmFd>,
    rings: Vec<RingMap>,
    /// Each ring's fetch index; held for the whole of every harvest.
    fetch: Mutex<Vec<u32>>,
    /// Harvested pages per slot (indexed by slot id), not yet synced.
    pending: Vec<PageBitmap>,
    slots: Vec<Slot>,
    full_exits: AtomicU64,
    /// Entries naming a slot or page outside guest memory (ignored).
    strays: AtomicU64,
    /// The first overflow found: every later sync fails with it (pages
    /// were lost, so no pass may be trusted again).
    overflow: Mutex<Option<String>>,
}

impl DirtyRings {
    pub(crate) fn map(
        vm: Arc<VmFd>,
        vcpus: &[Arc<Mutex<VcpuFd>>],
        entries: u32,
        slots: &[Slot],
    ) -> Result<Self, VmmError> {
        let rings = vcpus
            .iter()
            .enumerate()
            .map(|(i, fd)| RingMap::map(&fd.lock().unwrap(), i, entries))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            vm,
            fetch: Mutex::new(vec![0; rings.len()]),
            rings,
            pending: slots
                .iter()
                .map(|s| PageBitmap::new(s.pages, false))
                .collect(),
            slots: slots.to_vec(),
            full_exits: AtomicU64::new(0),
            strays: AtomicU64::new(0),
            overflow: Mutex::new(None),
        })
    }

    /// A vCPU exited with KVM_EXIT_DIRTY_RING_FULL: harvest every ring
    /// now. A full ring with nothing to harvest cannot be emptied: the
    /// kernel's indices no longer match the ring (it overflowed).
    pub(crate) fn on_ring_full(&self) -> io::Result<()> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut fetch = self.fetch.lock().unwrap();
        if self.harvest(&mut fetch)? == 0 {
            let what = "KVM_EXIT_DIRTY_RING_FULL with no dirty entry to harvest \
                        (KVM_RESET_DIRTY_RINGS reset 0): the ring overflowed earlier";
            self.overflow.lock().unwrap().get_or_insert(what.into());
            return Err(io::Error::other(what));
        }
        Ok(())
    }

    /// Walks every ring into `pending`, marks the entries RESET, and has
    /// KVM re-protect their pages; returns how many entries KVM reset.
    /// The caller holds `fetch`.
    ///
    /// KVM stops a vCPU at the ring's soft limit (its size less at least
    /// 64 reserved entries), so a ring found entirely dirty has been
    /// written past its end: entries were overwritten and their pages are
    /// lost to the log. That is an error, never a silent loss.
    fn harvest(&self, fetch: &mut [u32]) -> io::Result<u64> {
        let mut overflowed = None;
        for (i, (ring, next)) in self.rings.iter().zip(fetch.iter_mut()).enumerate() {
            let mut taken = 0u32;
            loop {
                let e = ring.entry(*next);
                // SAFETY: `e` is an entry of the live mapping; `flags` is
                // its first, 4-byte-aligned field (kvm_dirty_gfn is 8-byte
                // aligned), which the kernel also writes, so it is read and
                // written only atomically here.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry is DIRTY, so the kernel has published
                // slot and offset (before the flag, which we loaded with
                // Acquire) and will not write them until we mark it RESET.
                let (slot, offset) = unsafe {
                    (
                        std::ptr::addr_of!((*e).slot).read_volatile(),
                        std::ptr::addr_of!((*e).offset).read_volatile(),
                    )
                };
                match self.slots.iter().find(|s| s.slot == slot) {
                    Some(s) if offset < s.pages => self.pending[s.block].set(offset),
                    _ => {
                        self.strays.fetch_add(1, Ordering::Relaxed);
                    }
                }
                flags.store(GFN_RESET, Ordering::Release);
                *next = next.wrapping_add(1);
                taken += 1;
                if taken == ring.entries {
                    break;
                }
            }
            if taken == ring.entries {
                overflowed.get_or_insert(i);
            }
        }
        // SAFETY: `vm` is an open KVM VM fd; KVM_RESET_DIRTY_RINGS takes no
        // argument.
        let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(i) = overflowed {
            let what = format!(
                "vCPU {i}'s dirty ring overflowed: all {} entries were dirty at harvest, so the \
                 kernel wrote past the ring's soft limit and overwrote entries (their pages are \
                 lost to the log)",
                self.rings[i].entries
            );
            self.overflow.lock().unwrap().get_or_insert(what.clone());
            return Err(io::Error::other(what));
        }
        if let Some(what) = self.overflow.lock().unwrap().clone() {
            return Err(io::Error::other(what));
        }
        Ok(r as u64)
    }

    fn error(what: &str, source: io::Error) -> RamError {
        RamError::DirtyLog {
            tracker: "kvm-ring",
            block: String::new(),
            what: what.into(),
            source,
        }
    }

    fn sync(&self, into: &[PageBitmap]) -> Result<u64, RamError> {
        let mut fetch = self.fetch.lock().unwrap();
        self.harvest(&mut fetch)
            .map_err(|e| Self::error("harvest and KVM_RESET_DIRTY_RINGS", e))?;
        let mut dirty = 0;
        for (s, pending) in self.slots.iter().zip(&self.pending) {
            let pass = into.get(s.block);
            for w in 0..pending.words() {
                let bits = pending.take_word(w);
                if bits != 0 {
                    if let Some(p) = pass {
                        p.or_word(w, bits);
                    }
                    dirty += u64::from(bits.count_ones());
                }
            }
        }
        ferry::switchover_trace::mark("vmm: dirty-log sync done");
        Ok(dirty)
    }
}

/// How one VM's dirty log is read.
#[derive(Clone)]
enum Mode {
    Log { manual_protect: bool },
    Ring(Arc<DirtyRings>),
}

/// KVM's dirty log of one VM, as ferry's [`DirtyLog`].
#[derive(Clone)]
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    mode: Mode,
}

impl KvmDirtyLog {
    pub(crate) fn log(vm: Arc<VmFd>, slots: Vec<Slot>, manual_protect: bool) -> Self {
        Self {
            vm,
            slots,
            mode: Mode::Log { manual_protect },
        }
    }

    pub(crate) fn ring(vm: Arc<VmFd>, slots: Vec<Slot>, rings: Arc<DirtyRings>) -> Self {
        Self {
            vm,
            slots,
            mode: Mode::Ring(rings),
        }
    }

    /// The ioctls this log uses, for reports.
    pub fn method(&self) -> &'static str {
        match self.mode {
            Mode::Log {
                manual_protect: true,
            } => "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect)",
            Mode::Log {
                manual_protect: false,
            } => "KVM_GET_DIRTY_LOG",
            Mode::Ring(_) => "KVM dirty ring + KVM_RESET_DIRTY_RINGS",
        }
    }

    /// Times a vCPU exited because its dirty ring was full (kvm-ring).
    pub fn ring_full_exits(&self) -> u64 {
        match &self.mode {
            Mode::Ring(r) => r.full_exits.load(Ordering::Relaxed),
            Mode::Log { .. } => 0,
        }
    }

    /// Ring entries that named no page of guest memory (kvm-ring; 0 expected).
    pub fn stray_entries(&self) -> u64 {
        match &self.mode {
            Mode::Ring(r) => r.strays.load(Ordering::Relaxed),
            Mode::Log { .. } => 0,
        }
    }

    fn error(&self, slot: &Slot, what: &str, source: io::Error) -> RamError {
        RamError::DirtyLog {
            tracker: "kvm-log",
            block: format!("slot {}", slot.slot),
            what: what.into(),
            source,
        }
    }

    /// One slot's dirty bits (bits past the slot's end cleared), cleared in
    /// KVM and the pages protected again.
    fn fetch(&self, slot: &Slot, manual_protect: bool) -> Result<Vec<u64>, RamError> {
        let mut words = self
            .vm
            .get_dirty_log(slot.slot, slot.len as usize)
            .map_err(|e| {
                self.error(
                    slot,
                    "KVM_GET_DIRTY_LOG",
                    io::Error::from_raw_os_error(e.errno()),
                )
            })?;
        let full = (slot.pages / 64) as usize;
        if let Some(last) = words.get_mut(full) {
            *last &= (1u64 << (slot.pages % 64)) - 1;
        }
        words.truncate(slot.pages.div_ceil(64) as usize);
        if manual_protect && words.iter().any(|&w| w != 0) {
            clear_dirty_log(&self.vm, slot.slot, slot.pages, &mut words)
                .map_err(|e| self.error(slot, "KVM_CLEAR_DIRTY_LOG", e))?;
        }
        Ok(words)
    }
}

impl DirtyLog for KvmDirtyLog {
    fn name(&self) -> &'static str {
        match self.mode {
            Mode::Log { .. } => "kvm-log",
            Mode::Ring(_) => "kvm-ring",
        }
    }

    /// Slots are registered with KVM_MEM_LOG_DIRTY_PAGES from the start:
    /// starting drops what the log gathered so far.
    fn start(&self) -> Result<(), RamError> {
        match &self.mode {
            Mode::Log { manual_protect } => {
                for s in &self.slots {
                    self.fetch(s, *manual_protect)?;
                }
            }
            Mode::Ring(rings) => {
                rings.sync(&[])?;
            }
        }
        Ok(())
    }

    fn sync(&self, into: &[PageBitmap]) -> Result<u64, RamError> {
        let manual_protect = match &self.mode {
            Mode::Ring(rings) => return rings.sync(into),
            Mode::Log { manual_protect } => *manual_protect,
        };
        ferry::switchover_trace::mark("vmm: dirty-log sync begins");
        let mut dirty = 0;
        for s in &self.slots {
            let words = self.fetch(s, manual_protect)?;
            let Some(pass) = into.get(s.block) else {
                continue;
            };
            for (w, &bits) in words.iter().enumerate() {
                if bits != 0 {
                    pass.or_word(w, bits);
                    dirty += u64::from(bits.count_ones());
                }
            }
        }
        ferry::switchover_trace::mark("vmm: dirty-log sync done");
        Ok(dirty)
    }

    /// The slots keep logging (it costs write faults only after a sync).
    fn stop(&self) -> Result<(), RamError> {
        Ok(())
    }

    /// KVM sees the guest's writes itself.
    fn mark(&self, _block: usize, _page: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // include/uapi/linux/kvm.h on x86-64: _IOWR(KVMIO, 0xc0, 24 bytes)
        // and _IO(KVMIO, 0xc7).
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS, 0xaec7);
        assert_eq!(size_of::<kvm_dirty_gfn>(), 16);
    }

    #[test]
    fn trackers_parse_and_name_themselves() {
        for s in ["kvm-log", "kvm-ring"] {
            assert_eq!(s.parse::<DirtyTracker>().unwrap().name(), s);
        }
        let e = "bitmap".parse::<DirtyTracker>().unwrap_err();
        assert!(e.contains("kvm-log or kvm-ring"), "{e}");
    }

    #[test]
    fn a_kernel_without_the_ring_refuses_kvm_ring_saying_so() {
        let none = TrackerSupport {
            manual_protect_flags: 0,
            ring_max_bytes: 0,
            ring_defect: None,
        };
        let e = none
            .refuses(DirtyTracker::Ring { entries: 4096 })
            .unwrap()
            .to_string();
        assert!(e.contains("KVM_CAP_DIRTY_LOG_RING"), "{e}");
        assert!(none.refuses(DirtyTracker::default()).is_none());
        let some = TrackerSupport {
            manual_protect_flags: 3,
            ring_max_bytes: 1 << 16,
            ring_defect: None,
        };
        assert!(some.refuses(DirtyTracker::Ring { entries: 4096 }).is_none());
        let e = some
            .refuses(DirtyTracker::Ring { entries: 8192 })
            .unwrap()
            .to_string();
        assert!(e.contains("power of two"), "{e}");
        let pvm = TrackerSupport {
            ring_defect: Some(KVM_PVM_RING_DEFECT),
            ..some
        };
        let e = pvm
            .refuses(DirtyTracker::Ring { entries: 4096 })
            .unwrap()
            .to_string();
        assert!(e.contains("kvm_pvm") && e.contains("overflows"), "{e}");
    }
}
