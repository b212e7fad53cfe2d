//! The guest's TSC across a pause, as QEMU keeps it: read when the vCPUs
//! stop (not when the state is saved later, after a migration's final
//! pass), and set again when they start (not when the state is loaded,
//! before the destination has finished its switchover). The time between
//! is time the guest did not run, and its TSC does not count it.
//!
//! Setting a TSC through `KVM_SET_MSRS` meets KVM's synchronisation
//! heuristic (a write within a second of the previous one is taken as
//! "the same TSC" and may be ignored), so where the kernel has it the TSC
//! is set through the vCPU's `KVM_VCPU_TSC_OFFSET` attribute (Linux 5.16+)
//! instead: offset = the TSC wanted less the host's TSC now, one reading
//! of the host's TSC for every vCPU (`Vm::resume`). kvm_pvm, the nested
//! software KVM of this project's machines, accepts the offset and gives
//! its guests the host's TSC anyway (docs/MEASUREMENTS.md).

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_device_attr, kvm_msr_entry, Msrs, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET};
use kvm_ioctls::VcpuFd;

use crate::error::VmmError;

/// The TSC's MSR.
pub(crate) const IA32_TSC: u32 = 0x10;

// _IOW(KVMIO = 0xae, nr, struct kvm_device_attr): the struct is 24 bytes
// (u32 flags, u32 group, u64 attr, u64 addr).
const KVM_SET_DEVICE_ATTR: u64 = 0x4018_aee1;
const KVM_GET_DEVICE_ATTR: u64 = 0x4018_aee2;
const KVM_HAS_DEVICE_ATTR: u64 = 0x4018_aee3;

/// vCPU `i`'s TSC now.
pub(crate) fn read(fd: &VcpuFd, i: usize) -> Result<u64, VmmError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }])
    .map_err(|e| VmmError::Control(format!("vCPU {i}: the TSC's MSR list: {e:?}")))?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(VmmError::vcpu(i, "KVM_GET_MSRS (IA32_TSC)"))?;
    if n != 1 {
        return Err(VmmError::Control(format!(
            "vCPU {i}: KVM_GET_MSRS read no IA32_TSC"
        )));
    }
    Ok(msrs.as_slice()[0].data)
}

/// One `KVM_*_DEVICE_ATTR` ioctl on the TSC offset attribute, the offset
/// read from or written to `value`.
fn offset_ioctl(fd: &VcpuFd, request: u64, value: &mut u64) -> io::Result<()> {
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: value as *mut u64 as u64,
    };
    // SAFETY: a vCPU fd, one of the three device-attribute ioctls with a
    // valid `kvm_device_attr` (24 bytes, the size the request encodes)
    // that outlives the call; its `addr` points at `value`, a live u64
    // the kernel reads (SET) or writes (GET) 8 bytes of, and HAS ignores.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            request as _,
            &attr as *const kvm_device_attr,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The host's TSC (as scaled for the guest) now, read through vCPU `i`'s
/// offset attribute: its TSC less its offset. `None` where KVM lacks the
/// attribute.
pub(crate) fn host_now(fd: &VcpuFd, i: usize) -> Result<Option<u64>, VmmError> {
    let mut unused = 0;
    if offset_ioctl(fd, KVM_HAS_DEVICE_ATTR, &mut unused).is_err() {
        return Ok(None);
    }
    let mut offset = 0;
    offset_ioctl(fd, KVM_GET_DEVICE_ATTR, &mut offset).map_err(|source| VmmError::Vcpu {
        vcpu: i,
        what: "KVM_GET_DEVICE_ATTR (TSC offset)",
        source,
    })?;
    Ok(Some(read(fd, i)?.wrapping_sub(offset)))
}

/// Sets vCPU `i`'s TSC offset (its TSC is the host's plus `offset`).
pub(crate) fn set_offset(fd: &VcpuFd, i: usize, offset: u64) -> Result<(), VmmError> {
    let mut offset = offset;
    offset_ioctl(fd, KVM_SET_DEVICE_ATTR, &mut offset).map_err(|source| VmmError::Vcpu {
        vcpu: i,
        what: "KVM_SET_DEVICE_ATTR (TSC offset)",
        source,
    })
}

/// Sets vCPU `i`'s TSC to `value` by `KVM_SET_MSRS`, which KVM may take
/// as a resynchronisation (and ignore) within a second of the last write.
pub(crate) fn set_msr(fd: &VcpuFd, i: usize, value: u64) -> Result<(), VmmError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        data: value,
        ..Default::default()
    }])
    .map_err(|e| VmmError::Control(format!("vCPU {i}: the TSC's MSR list: {e:?}")))?;
    let n = fd
        .set_msrs(&msrs)
        .map_err(VmmError::vcpu(i, "KVM_SET_MSRS (IA32_TSC)"))?;
    if n != 1 {
        return Err(VmmError::Control(format!(
            "vCPU {i}: KVM_SET_MSRS wrote no IA32_TSC"
        )));
    }
    Ok(())
}
