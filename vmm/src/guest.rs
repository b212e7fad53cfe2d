//! [`KvmGuest`]: the micro-VM as a ferry [`Guest`]. Its memory is the VM's
//! `GuestMemoryMmap` (shared with ferry, no copy), its dirty log KVM's
//! ([`KvmDirtyLog`]), pause/resume/throttle the VMM's, and its device state
//! the vCPU and clock state of [`crate::state`]. [`KvmGuest::builder`] is
//! the destination's `build_guest`: a VM over the received memory with the
//! received state, paused.

use std::sync::Arc;

use ferry::{Guest, GuestBuilder, GuestError, Resources};
use ferry_ram::{DirtyLog, GuestMemory};

use crate::dirty::KvmDirtyLog;
use crate::error::VmmError;
use crate::state::VmState;
use crate::vm::{GuestReport, VcpuStatus, Vm, VmConfig};

pub struct KvmGuest {
    vm: Vm,
    log: KvmDirtyLog,
    resources: Resources,
}

impl KvmGuest {
    /// Boots the guest program and lets it run; owns `resources`.
    pub fn boot(config: &VmConfig, resources: Resources) -> Result<Self, VmmError> {
        let g = Self::over(Vm::boot(config)?, resources);
        g.vm.resume();
        Ok(g)
    }

    /// A paused guest over `memory` (holding a migrated guest's pages) with
    /// the device state `state` loaded.
    pub fn from_state(
        memory: Arc<GuestMemory>,
        state: &[u8],
        resources: Resources,
    ) -> Result<Self, VmmError> {
        let s = VmState::decode(state)?;
        Ok(Self::over(Vm::restore(memory, &s)?, resources))
    }

    fn over(vm: Vm, resources: Resources) -> Self {
        let log = KvmDirtyLog::new(vm.vm_fd().clone(), vm.slots().to_vec());
        Self { vm, log, resources }
    }

    /// The destination's guest builder: a [`KvmGuest`] over the received
    /// memory and state, paused, its resources inactive.
    pub fn builder() -> GuestBuilder {
        Arc::new(|memory, state| {
            let g = Self::from_state(memory, state, Resources::none(false))?;
            Ok(Box::new(g) as Box<dyn Guest>)
        })
    }

    /// Another handle on this guest's dirty log (the same KVM slots), for
    /// a caller that wraps or measures it.
    pub fn dirty_log_handle(&self) -> KvmDirtyLog {
        KvmDirtyLog::new(self.vm.vm_fd().clone(), self.vm.slots().to_vec())
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn status(&self, vcpu: usize) -> Result<VcpuStatus, VmmError> {
        self.vm.status(vcpu)
    }

    pub fn reports(&self) -> Vec<GuestReport> {
        self.vm.reports()
    }
}

impl Guest for KvmGuest {
    fn memory(&self) -> &Arc<GuestMemory> {
        self.vm.memory()
    }

    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        Some(&self.log)
    }

    fn pause(&self) -> Result<(), GuestError> {
        Ok(self.vm.pause()?)
    }

    fn resume(&self) -> Result<(), GuestError> {
        self.vm.resume();
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.vm.is_running()
    }

    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(self.vm.save_state()?.encode())
    }

    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        let s = VmState::decode(state).map_err(VmmError::from)?;
        Ok(self.vm.load_state(&s)?)
    }

    fn set_throttle(&self, percent: u8) {
        self.vm.set_throttle(percent);
    }

    fn resources(&self) -> &Resources {
        &self.resources
    }
}
