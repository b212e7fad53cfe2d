//! The errors of ferry-vmm: each names what failed (which ioctl, which
//! vCPU, which field of a device state).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("/dev/kvm is not usable: {0}")]
    NoKvm(io::Error),
    #[error("KVM: {what}: {source}")]
    Kvm { what: String, source: io::Error },
    #[error("vCPU {vcpu}: {what}: {source}")]
    Vcpu {
        vcpu: usize,
        what: &'static str,
        source: io::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("VM configuration: {0}")]
    Config(String),
    #[error("vCPU control: {0}")]
    Control(String),
    #[error("{what} is not available: {why}")]
    Unsupported { what: &'static str, why: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Elf(#[from] crate::pvh::ElfError),
    #[error(transparent)]
    Ram(#[from] ferry_ram::RamError),
}

impl VmmError {
    pub(crate) fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        let what = what.into();
        move |e| Self::Kvm {
            what,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }
    pub(crate) fn vcpu(vcpu: usize, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |e| Self::Vcpu {
            vcpu,
            what,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }
}

/// A device state that cannot be loaded; `field` names where it went wrong
/// (`header`, `vCPU 1 sregs`, `clock`, ...).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM device state, {field}: truncated: {have} bytes left, {need} needed")]
    Truncated {
        field: String,
        have: usize,
        need: usize,
    },
    #[error("KVM device state, {field}: crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        field: String,
        stored: u32,
        computed: u32,
    },
    #[error("KVM device state, {field}: {what}")]
    Invalid { field: String, what: String },
}

impl From<VmmError> for ferry::GuestError {
    fn from(e: VmmError) -> Self {
        match e {
            VmmError::State(s) => ferry::GuestError::DeviceState(s.to_string()),
            VmmError::Ram(r) => ferry::GuestError::Ram(r),
            other => ferry::GuestError::Control(other.to_string()),
        }
    }
}
