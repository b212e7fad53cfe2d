//! ferry-vmm: a minimal KVM VMM whose guest ferry migrates (issue #15).
//!
//! - [`layout`]: the guest's physical memory layout, shared with the guest
//!   program (`guest/guest.S`, assembled and linked by `build.rs` into a
//!   PVH ELF);
//! - [`pvh`]: that ELF, its boot parameters (the command line) and the
//!   PVH boot (`hvm_start_info`), as ferry's VMM and QEMU do it;
//! - [`port`]: the guest's report lines on its I/O port;
//! - [`qemu`]: the same ELF booted under `qemu-system-x86_64`;
//! - [`vm`]: the VM, its vCPU threads, port reports, pause/resume/throttle,
//!   saving and loading vCPU state;
//! - [`state`]: the device state's binary format and its parser;
//! - [`dirty`]: KVM's dirty tracking (the dirty bitmap with manual
//!   protect, or the dirty ring) as ferry's `DirtyLog`;
//! - [`guest`]: [`KvmGuest`], the VM as a `ferry::Guest`, and its builder
//!   for a destination.
//!
//! Dependencies: ferry-vmm → ferry (the `Guest` trait) → ferry-ram; ferry
//! knows nothing of this crate.

pub mod dirty;
pub mod error;
pub mod guest;
pub mod layout;
pub mod port;
pub mod pvh;
pub mod qemu;
pub mod state;
mod tsc;
pub mod vm;

pub use dirty::{DirtyTracker, KvmDirtyLog, TrackerSupport, DEFAULT_RING_ENTRIES};
pub use error::{StateError, VmmError};
pub use guest::{KvmGuest, SharedKvmGuest};
pub use port::{PortLine, Progress};
pub use pvh::{BootParams, ElfError, PvhElf, GUEST_ELF};
pub use qemu::{qemu_usable, QemuConfig, QemuError, QemuGuest};
pub use state::{is_kvm_state, VmState};
pub use vm::{
    use_base_pages, vcpu_status, GuestReport, PreparedVm, VcpuStatus, Vm, VmConfig, WritePattern,
};

/// Whether this machine can run a KVM guest: `Err` says why not (tests
/// skip with that message).
pub fn kvm_usable() -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm is not usable here ({e})"))?;
    // Something else may sit at /dev/kvm (a container's /dev/null): ask.
    match kvm.get_api_version() {
        v if v == kvm_bindings::KVM_API_VERSION as i32 => Ok(()),
        -1 => Err(format!(
            "/dev/kvm is not usable here: it does not answer KVM_GET_API_VERSION ({})",
            std::io::Error::last_os_error()
        )),
        v => Err(format!(
            "/dev/kvm is not usable here: KVM API version {v}, ferry-vmm speaks {}",
            kvm_bindings::KVM_API_VERSION
        )),
    }
}

/// Whether this kernel has the dirty ring (`kvm-ring`): `Err` says why not
/// (tests skip with that message).
pub fn dirty_ring_usable() -> Result<(), String> {
    kvm_usable()?;
    let s = TrackerSupport::probe().map_err(|e| e.to_string())?;
    match s.refuses(DirtyTracker::Ring {
        entries: DEFAULT_RING_ENTRIES,
    }) {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

/// The TSC frequency (kHz) KVM gives a vCPU on this host by default (what
/// QEMU's guests run at too): the `tsc_khz=` to boot the guest program
/// with under another VMM.
pub fn host_tsc_khz() -> Result<u32, VmmError> {
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| VmmError::NoKvm(std::io::Error::from_raw_os_error(e.errno())))?;
    let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(VmmError::vcpu(0, "KVM_CREATE_VCPU"))?;
    vcpu.get_tsc_khz()
        .map_err(VmmError::vcpu(0, "KVM_GET_TSC_KHZ"))
}
