//! ferry-vmm: a minimal KVM VMM whose guest ferry migrates (issue #15).
//!
//! - [`layout`]: the guest's physical memory layout, shared with the guest
//!   program (`guest/guest.S`, assembled by `build.rs`);
//! - [`vm`]: the VM, its vCPU threads, port reports, pause/resume/throttle,
//!   saving and loading vCPU state;
//! - [`state`]: the device state's binary format and its parser;
//! - [`dirty`]: KVM's dirty log as ferry's `DirtyLog`;
//! - [`guest`]: [`KvmGuest`], the VM as a `ferry::Guest`, and its builder
//!   for a destination.
//!
//! Dependencies: ferry-vmm → ferry (the `Guest` trait) → ferry-ram; ferry
//! knows nothing of this crate.

pub mod dirty;
pub mod error;
pub mod guest;
pub mod layout;
pub mod state;
pub mod vm;

pub use dirty::KvmDirtyLog;
pub use error::{StateError, VmmError};
pub use guest::KvmGuest;
pub use state::{is_kvm_state, VmState};
pub use vm::{vcpu_status, GuestReport, VcpuStatus, Vm, VmConfig, WritePattern};

/// Whether this machine can run a KVM guest: `Err` says why not (tests
/// skip with that message).
pub fn kvm_usable() -> Result<(), String> {
    kvm_ioctls::Kvm::new()
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable here ({e})"))
}
