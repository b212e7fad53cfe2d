//! [`KvmGuest`]: the micro-VM as a ferry [`Guest`]. Its memory is the VM's
//! `GuestMemoryMmap` (shared with ferry, no copy), its dirty log KVM's
//! ([`KvmDirtyLog`]), pause/resume/throttle the VMM's, and its device state
//! the vCPU and clock state of [`crate::state`]. [`KvmGuest::builder`] is
//! the destination's `build_guest`: a VM over the received memory with the
//! received state, paused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::{Guest, GuestBuilder, GuestError, Resources};
use ferry_ram::{DirtyLog, GuestMemory};

use crate::dirty::{DirtyTracker, KvmDirtyLog};
use crate::error::VmmError;
use crate::pvh::BootParams;
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
        Self::boot_with(config, None, resources)
    }

    /// [`KvmGuest::boot`] with the guest's command line from `params`
    /// ([`Vm::boot_with`]).
    pub fn boot_with(
        config: &VmConfig,
        params: Option<&BootParams>,
        resources: Resources,
    ) -> Result<Self, VmmError> {
        let g = Self::over(Vm::boot_with(config, params)?, resources);
        g.vm.resume();
        Ok(g)
    }

    /// [`KvmGuest::boot`] whose guest emits an output record every
    /// `output_every` page writes of each vCPU (port.rs; 0: none), to the
    /// hook [`KvmGuest::set_output`] gives.
    pub fn boot_with_output(
        config: &VmConfig,
        output_every: u64,
        resources: Resources,
    ) -> Result<Self, VmmError> {
        let g = Self::over(Vm::boot_with_output(config, None, output_every)?, resources);
        g.vm.resume();
        Ok(g)
    }

    /// Sends the guest's output records to `hook` (None: dropped), as
    /// `SyntheticGuest::set_output` does; how often the guest emits them
    /// is its boot parameter `output_every` ([`Vm::output_every`]).
    pub fn set_output(&self, hook: Option<ferry::synthetic::OutputHook>) {
        self.vm.set_output(hook);
    }

    /// COLO's secondary guest: a paused guest over `memory` with `state`
    /// ([`KvmGuest::from_state_with`]), its dirty log started (its own
    /// writes tracked from its first instruction), its output records to
    /// `hook`. How often it emits them is its boot parameter
    /// `output_every` (it travels in its memory); the primary booted it
    /// with the same `--colo-output-every` that COLO_SETUP makes both
    /// sides agree on.
    pub fn colo_secondary(
        memory: Arc<GuestMemory>,
        state: &[u8],
        hook: ferry::synthetic::OutputHook,
        resources: Resources,
        tracker: DirtyTracker,
    ) -> Result<Self, VmmError> {
        let g = Self::from_state_with(memory, state, resources, tracker)?;
        ferry_ram::DirtyLog::start(&g.log)?;
        g.set_output(Some(hook));
        Ok(g)
    }

    /// The [`ferry::colo::ColoGuestKind`] for a KVM guest's state (with
    /// `tracker`), for [`ferry::colo::secondary_builder_with`]; other
    /// states are not its kind.
    pub fn colo_kind(tracker: DirtyTracker) -> ferry::colo::ColoGuestKind {
        // The rate of records is the guest's own boot parameter.
        Arc::new(move |memory, state, _every, hook| {
            if !crate::is_kvm_state(state) {
                return None;
            }
            Some(
                Self::colo_secondary(memory, state, hook, Resources::none(false), tracker)
                    .map(|g| Box::new(g) as Box<dyn Guest>)
                    .map_err(GuestError::from),
            )
        })
    }

    /// A paused guest over `memory` (holding a migrated guest's pages) with
    /// the device state `state` loaded, tracked by the default kvm-log.
    /// A bad state is refused before any VM exists.
    pub fn from_state(
        memory: Arc<GuestMemory>,
        state: &[u8],
        resources: Resources,
    ) -> Result<Self, VmmError> {
        Self::from_state_with(memory, state, resources, DirtyTracker::default())
    }

    /// [`KvmGuest::from_state`] with the dirty tracker of your choice.
    pub fn from_state_with(
        memory: Arc<GuestMemory>,
        state: &[u8],
        resources: Resources,
        tracker: DirtyTracker,
    ) -> Result<Self, VmmError> {
        let s = VmState::decode(state)?;
        Ok(Self::over(Vm::restore(memory, &s, tracker)?, resources))
    }

    /// [`KvmGuest::from_state`] into a VM prepared beforehand over the
    /// memory ([`Vm::prepare`]): only its vCPUs and state are left to do.
    /// A bad state is refused before any vCPU exists.
    pub fn from_prepared(
        prepared: crate::PreparedVm,
        state: &[u8],
        resources: Resources,
    ) -> Result<Self, VmmError> {
        let s = VmState::decode(state)?;
        Ok(Self::over(Vm::restore_prepared(prepared, &s)?, resources))
    }

    fn over(vm: Vm, resources: Resources) -> Self {
        let log = vm.dirty_log();
        Self { vm, log, resources }
    }

    /// The destination's guest builder: a [`KvmGuest`] over the received
    /// memory and state, paused, its resources inactive.
    pub fn builder() -> GuestBuilder {
        Self::builder_with(DirtyTracker::default())
    }

    /// [`KvmGuest::builder`] whose guests use `tracker`.
    pub fn builder_with(tracker: DirtyTracker) -> GuestBuilder {
        Arc::new(move |memory, state| {
            let g = Self::from_state_with(memory, state, Resources::none(false), tracker)?;
            Ok(Box::new(g) as Box<dyn Guest>)
        })
    }

    /// Another handle on this guest's dirty log (the same KVM slots or
    /// rings), for a caller that wraps or measures it.
    pub fn dirty_log_handle(&self) -> KvmDirtyLog {
        self.vm.dirty_log()
    }

    /// The dirty log ferry reads.
    pub fn kvm_dirty_log(&self) -> &KvmDirtyLog {
        &self.log
    }

    /// Waits until every vCPU has booted (set itself up and reported
    /// through its port); fails if a vCPU stopped with a fatal exit or
    /// `timeout` passed. The guest must be running.
    pub fn wait_booted(&self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.vm.failure() {
                return Err(VmmError::Control(format!("the guest stopped: {f}")));
            }
            let mut waiting = Vec::new();
            for i in 0..self.vm.vcpu_count() {
                if !self.status(i)?.booted {
                    waiting.push(i);
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Control(format!(
                    "vCPU(s) {waiting:?} did not boot within {} ms",
                    timeout.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every vCPU's counters.
    pub fn statuses(&self) -> Result<Vec<VcpuStatus>, VmmError> {
        (0..self.vm.vcpu_count()).map(|i| self.status(i)).collect()
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
        ferry::switchover_trace::mark("vmm: saving the state");
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

/// A [`KvmGuest`] that ferry holds as its `Box<dyn Guest>` while the VMM
/// keeps another handle (to read the guest's counters or failures after a
/// migration or restore handed it over).
pub struct SharedKvmGuest(pub Arc<KvmGuest>);

impl Guest for SharedKvmGuest {
    fn memory(&self) -> &Arc<GuestMemory> {
        self.0.memory()
    }
    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        self.0.dirty_log()
    }
    fn pause(&self) -> Result<(), GuestError> {
        self.0.pause()
    }
    fn resume(&self) -> Result<(), GuestError> {
        self.0.resume()
    }
    fn is_running(&self) -> bool {
        self.0.is_running()
    }
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        self.0.save_device_state()
    }
    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        self.0.load_device_state(state)
    }
    fn set_throttle(&self, percent: u8) {
        self.0.set_throttle(percent)
    }
    fn resources(&self) -> &Resources {
        self.0.resources()
    }
}
