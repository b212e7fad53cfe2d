//! The minimal VMM: one KVM VM over a vm-memory `GuestMemoryMmap`, its
//! vCPUs each on its own thread, the guest program's report port, pause /
//! resume / throttle, and saving and loading the vCPU and clock state.
//!
//! Booting loads the guest program's PVH ELF and enters it the PVH way
//! (pvh.rs): vCPU 0 in 32-bit protected mode at the ELF's entry with the
//! `hvm_start_info` in EBX; the other vCPUs wait, as KVM creates them with
//! the in-kernel LAPIC, for the guest's INIT and SIPI.
//!
//! A vCPU thread loops on KVM_RUN. To stop it, the controller sets
//! `paused` and kicks the thread with a signal (`SIG_KICK`, a no-op
//! handler) until every thread has parked: KVM_RUN returns EINTR, the
//! thread re-enters KVM_RUN once with `immediate_exit` set (which completes
//! a pending port write so the saved RIP is past it), then waits on the
//! condition variable. A parked thread holds no lock on its `VcpuFd`, so
//! the controller saves or loads registers through it. Throttling is a
//! ticker thread: every 10 ms it asks each vCPU to sleep `percent`% of the
//! tick and kicks it.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_ram::vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use ferry_ram::GuestMemory;
use kvm_bindings::{
    kvm_fpu, kvm_regs, kvm_segment, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use crate::dirty::{enable_manual_protect, enable_ring, DirtyRings, DirtyTracker, TrackerSupport};
use crate::error::VmmError;
use crate::layout::*;
use crate::port::{parse_line, parse_record, LineBuffer, PortLine, Progress};
use crate::pvh::{self, PvhElf};
use crate::state::{VcpuState, VmState, MSRS};

/// How long `pause` waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The throttle's time slice.
const THROTTLE_TICK: Duration = Duration::from_millis(10);
/// KVM's TSS pages (3) sit here, above any guest RAM we allow.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Where the guest program's vCPUs write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePattern {
    Random,
    Sequential,
    /// Random within the first PCT% of each vCPU's slice.
    Hotset(u8),
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM bytes (4 MiB .. 3 GiB, a multiple of 2 MiB).
    pub memory: u64,
    pub vcpus: usize,
    /// Bytes per second the whole guest writes (page-sized writes spread
    /// over the vCPUs); 0: as fast as the vCPUs can.
    pub dirty_rate: u64,
    pub pattern: WritePattern,
    pub seed: u64,
    /// How KVM tracks the pages the guest writes.
    pub tracker: DirtyTracker,
}

/// Something the guest reported through its port (port.rs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestReport {
    Booted {
        vcpu: usize,
    },
    /// The self-check found a word that differs from what was written.
    SelfCheckError {
        vcpu: usize,
        addr: u64,
    },
}

/// A vCPU's counters, read from its status block in guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStatus {
    pub booted: bool,
    pub writes: u64,
    pub verified: u64,
    pub errors: u64,
    /// Guest address of the first word that failed verification (0: none).
    pub first_error: u64,
    /// The longest gap between two consecutive TSC reads, in TSC ticks.
    pub max_gap_ticks: u64,
    /// The same in microseconds, if the guest was told its TSC's frequency.
    pub max_gap_us: Option<u64>,
}

/// Reads vCPU `vcpu`'s status block from guest memory (the source's or a
/// destination's: it travels with the memory).
pub fn vcpu_status(memory: &GuestMemory, vcpu: usize) -> Result<VcpuStatus, VmmError> {
    let mem = memory.guest_memory_mmap();
    let base = STATUS + ((vcpu as u64) << STATUS_SHIFT);
    let get = |off: u64| -> Result<u64, VmmError> {
        mem.read_obj::<u64>(GuestAddress(base + off))
            .map_err(|e| VmmError::Memory(format!("vCPU {vcpu} status at {:#x}: {e}", base + off)))
    };
    let max_gap_ticks = get(S_MAX_GAP)?;
    let khz = mem
        .read_obj::<u64>(GuestAddress(PARAMS + P_TSC_KHZ))
        .map_err(|e| VmmError::Memory(format!("the guest's tsc_khz: {e}")))?;
    Ok(VcpuStatus {
        booted: get(S_BOOTED)? != 0,
        writes: get(S_WRITES)?,
        verified: get(S_VERIFIED)?,
        errors: get(S_ERRORS)?,
        first_error: get(S_FIRST_ERROR)?,
        max_gap_ticks,
        max_gap_us: (khz != 0).then(|| (u128::from(max_gap_ticks) * 1000 / u128::from(khz)) as u64),
    })
}

/// One KVM memory slot: a RAM block of ferry's memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub slot: u32,
    pub block: usize,
    pub pages: u64,
    pub len: u64,
}

struct RunState {
    paused: bool,
    quit: bool,
    parked: usize,
}

struct Shared {
    run: Mutex<RunState>,
    cv: Condvar,
    throttle: AtomicU8,
    /// Each vCPU thread's pthread id (0 until it starts).
    tids: Vec<AtomicU64>,
    /// Nanoseconds each vCPU is asked to sleep (the throttle).
    sleep_ns: Vec<AtomicU64>,
    reports: Mutex<Vec<GuestReport>>,
    /// Each vCPU's latest progress line.
    progress: Mutex<Vec<Option<Progress>>>,
    /// The largest `gap_us` of any progress line on this VM's port.
    line_gap_us: Mutex<Option<u64>>,
    /// Each vCPU's `gap_us` in its first progress line on this VM's port.
    first_gap_us: Mutex<Vec<Option<u64>>>,
    /// The first fatal vCPU exit (triple fault, halt, entry failure...).
    failure: Mutex<Option<String>>,
    /// Where the guest's output records go ([`Vm::set_output`]).
    output: Mutex<Option<ferry::synthetic::OutputHook>>,
    /// The guest's memory, to read an output record's status block.
    memory: Arc<GuestMemory>,
}

/// A VM without vCPUs yet, its memory registered ([`Vm::prepare`]).
pub struct PreparedVm {
    kvm: Kvm,
    vm: VmFd,
    slots: Vec<Slot>,
    manual_protect: bool,
    tracker: DirtyTracker,
    /// Last: KVM maps this memory for as long as the VM lives.
    memory: Arc<GuestMemory>,
}

impl PreparedVm {
    /// The memory it was prepared over.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
}

/// A KVM VM running the guest program (or a restored one).
pub struct Vm {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    /// The vCPUs' dirty rings (kvm-ring).
    rings: Option<Arc<DirtyRings>>,
    /// Whether KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on (kvm-log).
    manual_protect: bool,
    tracker: DirtyTracker,
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    tsc_khz: u32,
    /// Each vCPU's TSC when a pause stopped the running VM (tsc.rs): what
    /// a state saved while it stays paused carries.
    frozen_tsc: Mutex<Option<Vec<u64>>>,
    /// Each vCPU's TSC from the last state loaded, set again when the VM
    /// next starts (tsc.rs).
    start_tsc: Mutex<Option<Vec<u64>>>,
    /// Last: KVM maps this memory for as long as the VM lives.
    memory: Arc<GuestMemory>,
}

impl Vm {
    /// Boots the guest program in a fresh VM with fresh memory, the PVH
    /// way: its ELF loaded, the start_info and command line (the boot
    /// parameters of `config`) in memory, vCPU 0 at the PVH entry. The VM
    /// comes back paused (call [`Vm::resume`]).
    pub fn boot(config: &VmConfig) -> Result<Self, VmmError> {
        Self::boot_with(config, None)
    }

    /// [`Vm::boot`] with the guest's command line from `params` instead of
    /// `config` (which still gives RAM, vCPUs and tracker): a caller that
    /// wants other report intervals, say, or the guest's own checks of
    /// bad parameters (it refuses them with a `fatal` line, which becomes
    /// [`Vm::failure`]).
    pub fn boot_with(
        config: &VmConfig,
        params: Option<&pvh::BootParams>,
    ) -> Result<Self, VmmError> {
        Self::boot_with_output(config, params, 0)
    }

    /// [`Vm::boot_with`] whose guest emits an output record every
    /// `output_every` page writes of each vCPU (port.rs; 0: none, and the
    /// command line is exactly [`Vm::boot_with`]'s).
    pub fn boot_with_output(
        config: &VmConfig,
        params: Option<&pvh::BootParams>,
        output_every: u64,
    ) -> Result<Self, VmmError> {
        check_config(config)?;
        let elf = PvhElf::parse(pvh::GUEST_ELF)?;
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), config.memory as usize)])
            .map_err(|e| VmmError::Memory(format!("cannot map {} bytes: {e}", config.memory)))?;
        let memory = Arc::new(GuestMemory::from_guest_memory_mmap(&mmap, PAGE as u32)?);
        let vm = Self::create(memory, config.vcpus, config.tracker)?;
        let mem = vm.memory.guest_memory_mmap();
        write_gdt(mem)?;
        elf.load(mem).map_err(VmmError::Memory)?;
        let mut cmdline = params
            .cloned()
            .unwrap_or_else(|| pvh::BootParams::of(config, vm.tsc_khz))
            .cmdline();
        if output_every > 0 {
            cmdline += &format!(" output_every={output_every}");
        }
        pvh::write_start_info(mem, config.memory, &cmdline).map_err(VmmError::Memory)?;
        setup_pvh_entry(&vm.vcpus[0].lock().unwrap(), elf.entry)?;
        Ok(vm)
    }

    /// A paused VM over `memory` (a destination's, already holding the
    /// guest's pages) with the vCPU and clock state of `state`, its writes
    /// tracked by `tracker`.
    pub fn restore(
        memory: Arc<GuestMemory>,
        state: &VmState,
        tracker: DirtyTracker,
    ) -> Result<Self, VmmError> {
        if memory.total_bytes() != state.memory {
            return Err(VmmError::Config(format!(
                "the state is of a guest with {} bytes of RAM, this memory has {}",
                state.memory,
                memory.total_bytes()
            )));
        }
        ferry::switchover_trace::mark("vmm: restore: creating the VM");
        Self::restore_prepared(Self::prepare(memory, tracker)?, state)
    }

    /// [`Vm::restore`] into a VM [`Vm::prepare`] made beforehand (a
    /// destination builds it while pages arrive): only the vCPUs, their
    /// threads and the state are left.
    pub fn restore_prepared(prepared: PreparedVm, state: &VmState) -> Result<Self, VmmError> {
        if prepared.memory.total_bytes() != state.memory {
            return Err(VmmError::Config(format!(
                "the state is of a guest with {} bytes of RAM, this memory has {}",
                state.memory,
                prepared.memory.total_bytes()
            )));
        }
        let vm = Self::finish(prepared, state.vcpus.len())?;
        ferry::switchover_trace::mark("vmm: restore: VM created, threads parked");
        vm.load_state(state)?;
        ferry::switchover_trace::mark("vmm: restore: state loaded");
        Ok(vm)
    }

    /// The part of a VM that needs no vCPU: the VM, its in-kernel
    /// interrupt controller, dirty tracking as `tracker` says, and
    /// `memory` registered with KVM (for a guest of GiBs the slowest
    /// part: ~10 ms for 2 GiB under this project's nested KVM).
    pub fn prepare(
        memory: Arc<GuestMemory>,
        tracker: DirtyTracker,
    ) -> Result<PreparedVm, VmmError> {
        install_kick_handler()?;
        let kvm =
            Kvm::new().map_err(|e| VmmError::NoKvm(io::Error::from_raw_os_error(e.errno())))?;
        let xsave_size = kvm.check_extension_int(Cap::Xsave2);
        if xsave_size > 4096 {
            return Err(VmmError::Config(format!(
                "this host's guest XSAVE area is {xsave_size} bytes; ferry-vmm saves the 4 KiB legacy area only"
            )));
        }
        let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        // Both capabilities must be on before memory is registered and
        // vCPUs are created.
        let support = TrackerSupport::of(&vm);
        let manual_protect = match tracker {
            DirtyTracker::Log { manual_protect } => {
                manual_protect && enable_manual_protect(&vm, &support)?
            }
            DirtyTracker::Ring { entries } => {
                enable_ring(&vm, &support, entries)?;
                false
            }
        };
        ferry::switchover_trace::mark("vmm: create: VM and irqchip made");
        let slots = register_memory(&vm, &memory)?;
        ferry::switchover_trace::mark("vmm: create: memory registered");
        Ok(PreparedVm {
            kvm,
            vm,
            slots,
            manual_protect,
            tracker,
            memory,
        })
    }

    /// A VM with `vcpus` vCPUs (threads started, parked) over `memory`,
    /// dirty tracking set up as `tracker` says.
    fn create(
        memory: Arc<GuestMemory>,
        vcpus: usize,
        tracker: DirtyTracker,
    ) -> Result<Self, VmmError> {
        if vcpus == 0 || vcpus as u64 > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "{vcpus} vCPUs: between 1 and {MAX_VCPUS}"
            )));
        }
        Self::finish(Self::prepare(memory, tracker)?, vcpus)
    }

    /// A prepared VM with `vcpus` vCPUs (threads started, parked).
    fn finish(prepared: PreparedVm, vcpus: usize) -> Result<Self, VmmError> {
        if vcpus == 0 || vcpus as u64 > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "{vcpus} vCPUs: between 1 and {MAX_VCPUS}"
            )));
        }
        let PreparedVm {
            kvm,
            vm,
            slots,
            manual_protect,
            tracker,
            memory,
        } = prepared;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut fds = Vec::with_capacity(vcpus);
        for i in 0..vcpus {
            let fd = vm
                .create_vcpu(i as u64)
                .map_err(VmmError::vcpu(i, "KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid_of(&cpuid, i)?)
                .map_err(VmmError::vcpu(i, "KVM_SET_CPUID2"))?;
            fds.push(Arc::new(Mutex::new(fd)));
        }
        ferry::switchover_trace::mark("vmm: create: vCPUs made");
        let tsc_khz = fds[0]
            .lock()
            .unwrap()
            .get_tsc_khz()
            .map_err(VmmError::vcpu(0, "KVM_GET_TSC_KHZ"))?;
        let shared = Arc::new(Shared {
            run: Mutex::new(RunState {
                paused: true,
                quit: false,
                parked: 0,
            }),
            cv: Condvar::new(),
            throttle: AtomicU8::new(0),
            tids: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            sleep_ns: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            reports: Mutex::new(Vec::new()),
            progress: Mutex::new(vec![None; vcpus]),
            line_gap_us: Mutex::new(None),
            first_gap_us: Mutex::new(vec![None; vcpus]),
            failure: Mutex::new(None),
            output: Mutex::new(None),
            memory: memory.clone(),
        });
        let vm = Arc::new(vm);
        let rings = match tracker {
            DirtyTracker::Ring { entries } => Some(Arc::new(DirtyRings::map(
                vm.clone(),
                &fds,
                entries,
                &slots,
            )?)),
            DirtyTracker::Log { .. } => None,
        };
        let mut me = Self {
            shared,
            threads: Vec::new(),
            ticker: None,
            vcpus: fds,
            rings,
            manual_protect,
            tracker,
            vm,
            slots,
            tsc_khz,
            frozen_tsc: Mutex::new(None),
            start_tsc: Mutex::new(None),
            memory,
        };
        for i in 0..vcpus {
            let shared = me.shared.clone();
            let fd = me.vcpus[i].clone();
            let rings = me.rings.clone();
            let t = std::thread::Builder::new()
                .name(format!("ferry-kvm-vcpu-{i}"))
                .spawn(move || vcpu_thread(&shared, i, &fd, rings.as_deref()))
                .map_err(|e| VmmError::Control(format!("cannot start vCPU thread {i}: {e}")))?;
            me.threads.push(t);
        }
        let shared = me.shared.clone();
        me.ticker = Some(
            std::thread::Builder::new()
                .name("ferry-kvm-throttle".into())
                .spawn(move || throttle_thread(&shared))
                .map_err(|e| VmmError::Control(format!("cannot start the throttle thread: {e}")))?,
        );
        ferry::switchover_trace::mark("vmm: create: threads started");
        me.wait_parked()?;
        Ok(me)
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The TSC frequency KVM gives the vCPUs (kHz).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The tracker this VM was made with.
    pub fn tracker(&self) -> DirtyTracker {
        self.tracker
    }

    /// This VM's dirty log (another handle on the same KVM state).
    pub fn dirty_log(&self) -> crate::KvmDirtyLog {
        match &self.rings {
            Some(r) => crate::KvmDirtyLog::ring(self.vm.clone(), self.slots.clone(), r.clone()),
            None => {
                crate::KvmDirtyLog::log(self.vm.clone(), self.slots.clone(), self.manual_protect)
            }
        }
    }

    /// vCPU `i`'s counters (read from guest memory).
    pub fn status(&self, vcpu: usize) -> Result<VcpuStatus, VmmError> {
        vcpu_status(&self.memory, vcpu)
    }

    /// Everything the guest reported through its port so far (boots and
    /// self-check errors).
    pub fn reports(&self) -> Vec<GuestReport> {
        self.shared.reports.lock().unwrap().clone()
    }

    /// Each vCPU's latest `progress` line on this VM's port (`None` before
    /// its first, about a second after it started here).
    pub fn progress(&self) -> Vec<Option<Progress>> {
        self.shared.progress.lock().unwrap().clone()
    }

    /// The largest gap (µs) any vCPU saw in its TSC between two progress
    /// lines, over the lines on this VM's port: on a migration's
    /// destination, the first line after the switchover carries the
    /// blackout as the guest saw it (port.rs). `None` before a line came.
    pub fn largest_line_gap_us(&self) -> Option<u64> {
        *self.shared.line_gap_us.lock().unwrap()
    }

    /// The largest `gap_us` in the vCPUs' first progress lines on this
    /// VM's port: on a destination, each first line's window spans the
    /// switchover, so this is the blackout the guest saw with only that
    /// window's noise. `None` before any vCPU's first line.
    pub fn first_line_gap_us(&self) -> Option<u64> {
        self.shared
            .first_gap_us
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .copied()
            .max()
    }

    /// Sends the guest's output records (port.rs; the guest emits them
    /// when booted with `output_every=N`) to `hook`, on the vCPU threads;
    /// `None`: they are checked and dropped.
    pub fn set_output(&self, hook: Option<ferry::synthetic::OutputHook>) {
        *self.shared.output.lock().unwrap() = hook;
    }

    /// The guest's `output_every` (read from its parameters in memory:
    /// it travels with the guest); 0: no output records.
    pub fn output_every(&self) -> Result<u64, VmmError> {
        self.memory
            .guest_memory_mmap()
            .read_obj::<u64>(GuestAddress(PARAMS + P_OUTPUT_EVERY))
            .map_err(|e| VmmError::Memory(format!("the guest's output_every: {e}")))
    }

    /// The first fatal vCPU exit, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().unwrap().clone()
    }

    pub fn is_running(&self) -> bool {
        !self.shared.run.lock().unwrap().paused
    }

    /// Lets the vCPUs run. After a state was loaded, each vCPU's TSC is
    /// set to the loaded one first, so the guest's TSC does not count the
    /// time between loading and starting (tsc.rs); if KVM refuses that,
    /// the TSC stays as loaded.
    pub fn resume(&self) {
        if let Some(tscs) = self.start_tsc.lock().unwrap().take() {
            // The VM is paused since the load: no thread holds a vCPU fd.
            let fds: Vec<_> = self.vcpus.iter().map(|f| f.lock().unwrap()).collect();
            // One reading of the host's TSC for all: the vCPUs keep the
            // relation their TSCs had when they stopped.
            match crate::tsc::host_now(&fds[0], 0) {
                Ok(Some(host)) => {
                    for (i, (fd, &v)) in fds.iter().zip(&tscs).enumerate() {
                        let _ = crate::tsc::set_offset(fd, i, v.wrapping_sub(host));
                    }
                }
                _ => {
                    for (i, (fd, &v)) in fds.iter().zip(&tscs).enumerate() {
                        let _ = crate::tsc::set_msr(fd, i, v);
                    }
                }
            }
            if ferry::switchover_trace::enabled() {
                let now: Vec<_> = fds
                    .iter()
                    .enumerate()
                    .map(|(i, fd)| crate::tsc::read(fd, i).unwrap_or(0))
                    .collect();
                ferry::switchover_trace::mark(&format!(
                    "vmm: TSCs set to {tscs:?}, read back {now:?}"
                ));
            }
        }
        self.frozen_tsc.lock().unwrap().take();
        let mut run = self.shared.run.lock().unwrap();
        run.paused = false;
        self.shared.cv.notify_all();
    }

    /// Stops every vCPU; when this returns none runs and memory no longer
    /// changes through them.
    /// A running VM's TSCs are read as soon as every vCPU stopped: a
    /// state saved before it runs again carries those (tsc.rs).
    pub fn pause(&self) -> Result<(), VmmError> {
        let was_running = !std::mem::replace(&mut self.shared.run.lock().unwrap().paused, true);
        self.shared.cv.notify_all();
        self.wait_parked()?;
        if was_running {
            // Best effort: without them a save reads the TSCs it saves.
            let tscs: Result<Vec<u64>, VmmError> = self
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, fd)| crate::tsc::read(&fd.lock().unwrap(), i))
                .collect();
            *self.frozen_tsc.lock().unwrap() = tscs.ok();
        }
        Ok(())
    }

    /// Slows the vCPUs: each sleeps `percent`% (at most 99) of every 10 ms.
    pub fn set_throttle(&self, percent: u8) {
        self.shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
        self.shared.cv.notify_all();
    }

    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }

    fn wait_parked(&self) -> Result<(), VmmError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut run = self.shared.run.lock().unwrap();
        while run.parked < self.threads.len() {
            if Instant::now() >= deadline {
                return Err(VmmError::Control(format!(
                    "only {} of {} vCPUs stopped within {} s",
                    run.parked,
                    self.threads.len(),
                    PAUSE_TIMEOUT.as_secs()
                )));
            }
            drop(run);
            // A thread may have checked `paused` just before we set it and
            // entered KVM_RUN after our last signal: kick until all park.
            kick_all(&self.shared);
            run = self.shared.run.lock().unwrap();
            if run.parked < self.threads.len() {
                run = self
                    .shared
                    .cv
                    .wait_timeout(run, Duration::from_millis(1))
                    .unwrap()
                    .0;
            }
        }
        Ok(())
    }

    /// Every vCPU's registers and the KVM clock. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, VmmError> {
        if self.is_running() {
            return Err(VmmError::Control(
                "the VM must be paused to save its state".into(),
            ));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap();
            let mut msrs = Msrs::from_entries(&VcpuState::zeroed().msrs)
                .map_err(|e| VmmError::Control(format!("MSR list: {e:?}")))?;
            let n = fd
                .get_msrs(&mut msrs)
                .map_err(VmmError::vcpu(i, "KVM_GET_MSRS"))?;
            if n != MSRS.len() {
                return Err(VmmError::Control(format!(
                    "vCPU {i}: KVM_GET_MSRS read {n} of {} MSRs, not {}",
                    MSRS.len(),
                    MSRS[n].1
                )));
            }
            // The TSC as it was when the vCPUs stopped (or as loaded, if
            // they have not run since): see tsc.rs.
            let kept = self
                .start_tsc
                .lock()
                .unwrap()
                .as_ref()
                .or(self.frozen_tsc.lock().unwrap().as_ref())
                .and_then(|t| t.get(i).copied());
            if let Some(v) = kept {
                for e in msrs.as_mut_slice() {
                    if e.index == crate::tsc::IA32_TSC {
                        e.data = v;
                    }
                }
            }
            vcpus.push(VcpuState {
                regs: fd.get_regs().map_err(VmmError::vcpu(i, "KVM_GET_REGS"))?,
                sregs: fd.get_sregs().map_err(VmmError::vcpu(i, "KVM_GET_SREGS"))?,
                xsave: Box::new(fd.get_xsave().map_err(VmmError::vcpu(i, "KVM_GET_XSAVE"))?),
                xcrs: fd.get_xcrs().map_err(VmmError::vcpu(i, "KVM_GET_XCRS"))?,
                msrs: msrs.as_slice().to_vec(),
                lapic: fd.get_lapic().map_err(VmmError::vcpu(i, "KVM_GET_LAPIC"))?,
                events: fd
                    .get_vcpu_events()
                    .map_err(VmmError::vcpu(i, "KVM_GET_VCPU_EVENTS"))?,
                mp_state: fd
                    .get_mp_state()
                    .map_err(VmmError::vcpu(i, "KVM_GET_MP_STATE"))?,
                debugregs: fd
                    .get_debug_regs()
                    .map_err(VmmError::vcpu(i, "KVM_GET_DEBUGREGS"))?,
            });
        }
        let clock = self
            .vm
            .get_clock()
            .map_err(VmmError::kvm("KVM_GET_CLOCK"))?;
        Ok(VmState {
            memory: self.memory.total_bytes(),
            vcpus,
            clock,
        })
    }

    /// Loads `state` into the (paused) vCPUs and the VM's clock, in the
    /// order KVM needs: clock; then per vCPU mp_state, regs, sregs, xsave,
    /// xcrs, debugregs, lapic, msrs, events.
    pub fn load_state(&self, state: &VmState) -> Result<(), VmmError> {
        if self.is_running() {
            return Err(VmmError::Control(
                "the VM must be paused to load a state".into(),
            ));
        }
        if state.vcpus.len() != self.vcpus.len() {
            return Err(VmmError::Config(format!(
                "the state has {} vCPUs, this VM {}",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        let mut clock = state.clock;
        // Only the clock value: no realtime or host TSC adjustment.
        clock.flags = 0;
        self.vm
            .set_clock(&clock)
            .map_err(VmmError::kvm("KVM_SET_CLOCK"))?;
        for (i, (fd, s)) in self.vcpus.iter().zip(&state.vcpus).enumerate() {
            let fd = fd.lock().unwrap();
            fd.set_mp_state(s.mp_state)
                .map_err(VmmError::vcpu(i, "KVM_SET_MP_STATE"))?;
            fd.set_regs(&s.regs)
                .map_err(VmmError::vcpu(i, "KVM_SET_REGS"))?;
            fd.set_sregs(&s.sregs)
                .map_err(VmmError::vcpu(i, "KVM_SET_SREGS"))?;
            // SAFETY: KVM_SET_XSAVE reads the vCPU's XSAVE size from the
            // buffer; `create` refused hosts whose size (KVM_CAP_XSAVE2)
            // exceeds the 4096 bytes of `kvm_xsave`, so the read stays in it.
            unsafe { fd.set_xsave(&s.xsave) }.map_err(VmmError::vcpu(i, "KVM_SET_XSAVE"))?;
            fd.set_xcrs(&s.xcrs)
                .map_err(VmmError::vcpu(i, "KVM_SET_XCRS"))?;
            fd.set_debug_regs(&s.debugregs)
                .map_err(VmmError::vcpu(i, "KVM_SET_DEBUGREGS"))?;
            fd.set_lapic(&s.lapic)
                .map_err(VmmError::vcpu(i, "KVM_SET_LAPIC"))?;
            let msrs = Msrs::from_entries(&s.msrs)
                .map_err(|e| VmmError::Control(format!("vCPU {i} MSRs: {e:?}")))?;
            let n = fd
                .set_msrs(&msrs)
                .map_err(VmmError::vcpu(i, "KVM_SET_MSRS"))?;
            if n != s.msrs.len() {
                return Err(VmmError::Control(format!(
                    "vCPU {i}: KVM_SET_MSRS wrote {n} of {} MSRs, not {}",
                    s.msrs.len(),
                    MSRS.get(n).map_or("?", |m| m.1)
                )));
            }
            fd.set_vcpu_events(&s.events)
                .map_err(VmmError::vcpu(i, "KVM_SET_VCPU_EVENTS"))?;
        }
        let tscs = state
            .vcpus
            .iter()
            .map(|s| {
                s.msrs
                    .iter()
                    .find(|e| e.index == crate::tsc::IA32_TSC)
                    .map_or(0, |e| e.data)
            })
            .collect();
        *self.start_tsc.lock().unwrap() = Some(tscs);
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shared.run.lock().unwrap().quit = true;
        self.shared.cv.notify_all();
        for t in &self.threads {
            // A finished but unjoined thread's id stays valid for
            // pthread_kill, so kicking until it ends is sound.
            while !t.is_finished() {
                kick_all(&self.shared);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

fn check_config(c: &VmConfig) -> Result<(), VmmError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&c.memory) || !c.memory.is_multiple_of(2 << 20) {
        return Err(VmmError::Config(format!(
            "guest RAM of {} bytes: a multiple of 2 MiB from {} MiB to {} GiB",
            c.memory,
            MIN_MEMORY >> 20,
            MAX_MEMORY >> 30
        )));
    }
    if c.vcpus == 0 || c.vcpus as u64 > MAX_VCPUS {
        return Err(VmmError::Config(format!(
            "{} vCPUs: between 1 and {MAX_VCPUS}",
            c.vcpus
        )));
    }
    if let WritePattern::Hotset(p) = c.pattern {
        if !(1..=100).contains(&p) {
            return Err(VmmError::Config(format!("hot set of {p}%: 1 to 100")));
        }
    }
    let work = (c.memory - work_start(c.memory)) / PAGE;
    if work < c.vcpus as u64 {
        return Err(VmmError::Config(format!(
            "{} bytes of RAM leave {work} work pages for {} vCPUs",
            c.memory, c.vcpus
        )));
    }
    Ok(())
}

/// The flat 32-bit GDT the PVH entry's segments describe (the guest
/// loads its own before it reloads a segment).
fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    // null, 32-bit code (0x08), data (0x10), 32-bit TSS (0x18)
    for (i, d) in [
        0u64,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0000_8b00_0000_0067,
    ]
    .into_iter()
    .enumerate()
    {
        let addr = GDT + 8 * i as u64;
        mem.write_obj(d, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(format!("the GDT at {addr:#x}: {e}")))?;
    }
    Ok(())
}

/// The supported CPUID with vCPU `i`'s APIC ID where CPUID reports one
/// (KVM passes the host CPU's through): leaf 1 EBX[31:24], the initial
/// APIC ID the guest program takes as its index, and the x2APIC ID in EDX
/// of leaves 0xb and 0x1f. The in-kernel LAPIC's ID is the vCPU id.
fn cpuid_of(supported: &CpuId, i: usize) -> Result<CpuId, VmmError> {
    let mut entries = supported.as_slice().to_vec();
    for e in &mut entries {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((i as u32) << 24),
            0xb | 0x1f => e.edx = i as u32,
            _ => {}
        }
    }
    CpuId::from_entries(&entries)
        .map_err(|e| VmmError::Control(format!("vCPU {i}: its CPUID: {e:?}")))
}

/// Registers every block of `memory` as a KVM slot with dirty logging.
/// Makes a destination's memory use base pages, as a VM booted here
/// does (its vm-memory mapping is never advised, and transparent huge
/// pages are given only to advised memory on hosts set to `madvise`).
/// Call before any page lands: pages already faulted in stay as they are.
///
/// Why (docs/MEASUREMENTS.md, "KVM blackout: where it went"): a receiver's
/// memory asks for huge pages by default, so every scattered page of a
/// live KVM guest's later passes, and every first write of the guest once
/// it runs here, faults in and zeroes a 2 MiB page, with direct compaction
/// on a fragmented host: milliseconds per fault, seconds for a pass, inside
/// the downtime for the final pass and in the guest's blackout after it.
pub fn use_base_pages(memory: &GuestMemory) {
    for block in memory.blocks() {
        // SAFETY: madvise over exactly this block's own mapping (alive as
        // long as `memory`) with a hint that changes no contents.
        // A refusal (a kernel without THP) leaves the memory as it was,
        // which is all this asks for: nothing to report.
        let _ = unsafe {
            libc::madvise(
                block.host_addr().cast(),
                block.len() as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
    }
}

fn register_memory(vm: &VmFd, memory: &GuestMemory) -> Result<Vec<Slot>, VmmError> {
    let mut slots = Vec::new();
    for (i, (block, region)) in memory
        .blocks()
        .iter()
        .zip(memory.guest_memory_mmap().iter())
        .enumerate()
    {
        if u64::from(block.page_size()) != PAGE || !block.is_writable() {
            return Err(VmmError::Memory(format!(
                "block '{}': KVM needs writable memory tracked in {PAGE}-byte pages (page size {}, writable {})",
                block.name(),
                block.page_size(),
                block.is_writable()
            )));
        }
        let base = region.start_addr().0;
        let len = region.len();
        let host = memory
            .guest_memory_mmap()
            .get_host_address(GuestAddress(base))
            .map_err(|e| VmmError::Memory(format!("block '{}': {e}", block.name())))?;
        let r = kvm_userspace_memory_region {
            slot: i as u32,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: base,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` .. `host + len` is the block's own mapping (read
        // and write), which the VM keeps alive: `Vm` holds the
        // `Arc<GuestMemory>` and drops it only after the VM's fds.
        unsafe { vm.set_user_memory_region(r) }.map_err(VmmError::kvm(format!(
            "KVM_SET_USER_MEMORY_REGION slot {i} at {base:#x}"
        )))?;
        slots.push(Slot {
            slot: i as u32,
            block: i,
            pages: len / PAGE,
            len,
        });
    }
    if slots.is_empty() {
        return Err(VmmError::Memory("no RAM blocks".into()));
    }
    Ok(slots)
}

/// The PVH entry state (Xen's docs/misc/pvh.pandoc): 32-bit protected
/// mode, paging off, flat 4 GiB code (execute/read) and data (read/write)
/// segments, a busy 32-bit TSS, CR4 = 0, EFER = 0, interrupts off, RIP =
/// `entry`, EBX = the hvm_start_info's address.
fn setup_pvh_entry(fd: &VcpuFd, entry: u32) -> Result<(), VmmError> {
    let mut sregs = fd.get_sregs().map_err(VmmError::vcpu(0, "KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    let tss = kvm_segment {
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 31;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // ET, PE
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs)
        .map_err(VmmError::vcpu(0, "KVM_SET_SREGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(VmmError::vcpu(0, "KVM_SET_FPU"))?;
    let regs = kvm_regs {
        rflags: 2,
        rip: u64::from(entry),
        rbx: START_INFO,
        ..Default::default()
    };
    fd.set_regs(&regs)
        .map_err(VmmError::vcpu(0, "KVM_SET_REGS"))?;
    Ok(())
}

fn sig_kick() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with an empty mask and no flags (no
        // SA_RESTART, so KVM_RUN returns EINTR) installing a handler that
        // does nothing (async-signal-safe). The signal, SIGRTMIN+1, is
        // sent only by this module to its own vCPU threads.
        let failed = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig_kick(), &sa, std::ptr::null_mut()) != 0
        };
        if failed {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(-1);
            RESULT.store(errno, Ordering::Release);
        }
    });
    match RESULT.load(Ordering::Acquire) {
        0 => Ok(()),
        errno => Err(VmmError::Control(format!(
            "cannot install the vCPU kick signal handler: {}",
            io::Error::from_raw_os_error(errno)
        ))),
    }
}

fn kick_all(shared: &Shared) {
    for tid in &shared.tids {
        let tid = tid.load(Ordering::Acquire);
        if tid != 0 {
            // SAFETY: `tid` is the pthread id of one of this VM's vCPU
            // threads, stored by the thread itself; those threads are joined
            // only in `Vm::drop`, after the last kick, so the id is valid
            // (a finished, unjoined thread yields ESRCH, not UB).
            unsafe { libc::pthread_kill(tid as libc::pthread_t, sig_kick()) };
        }
    }
}

fn vcpu_thread(shared: &Shared, index: usize, fd: &Mutex<VcpuFd>, rings: Option<&DirtyRings>) {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    shared.tids[index].store(me as u64, Ordering::Release);
    let mut line = LineBuffer::default();
    let mut failed = false;
    let mut just_resumed = false;
    loop {
        let mut run = shared.run.lock().unwrap();
        if run.paused || run.quit || failed {
            drop(run);
            complete_pending_io(fd);
            run = shared.run.lock().unwrap();
            run.parked += 1;
            shared.cv.notify_all();
            while (run.paused || failed) && !run.quit {
                run = shared.cv.wait(run).unwrap();
            }
            run.parked -= 1;
            if run.quit {
                return;
            }
            just_resumed = true;
        }
        drop(run);
        let sleep = shared.sleep_ns[index].swap(0, Ordering::Relaxed);
        if sleep > 0 {
            std::thread::sleep(Duration::from_nanos(sleep));
            continue;
        }
        let mut vcpu = fd.lock().unwrap();
        let traced = just_resumed && ferry::switchover_trace::enabled();
        just_resumed = false;
        if traced {
            ferry::switchover_trace::mark(&format!("vmm: vCPU {index} enters KVM_RUN"));
        }
        let ran = vcpu.run();
        if traced {
            ferry::switchover_trace::mark(&format!("vmm: vCPU {index} first exit"));
        }
        let fatal = match ran {
            Ok(VcpuExit::IoOut(port, data)) if u64::from(port) == crate::port::OUTPUT_PORT => {
                on_record(shared, index, data).err()
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if u64::from(port) == DEFAULT_PORT && data.len() == 1 {
                    if let Some(l) = line.push(data[0]) {
                        on_line(shared, &l);
                    }
                }
                None
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::Intr) => None,
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => match rings {
                Some(r) => r
                    .on_ring_full()
                    .err()
                    .map(|e| format!("harvesting the full dirty ring: {e}")),
                None => Some("dirty ring full, but this VM has no dirty ring".to_string()),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Ok(VcpuExit::Hlt) => Some("halted".to_string()),
            Ok(VcpuExit::Shutdown) => Some("shut down (triple fault)".to_string()),
            Ok(other) => Some(format!("unexpected exit {other:?}")),
            Err(e) => Some(format!("KVM_RUN: {e}")),
        };
        drop(vcpu);
        if let Some(what) = fatal {
            let mut f = shared.failure.lock().unwrap();
            if f.is_none() {
                *f = Some(format!("vCPU {index}: {what}"));
            }
            failed = true;
        }
    }
}

/// Acts on an output record vCPU `index` wrote to its output port
/// (port.rs): checked, then handed to the output hook if there is one.
/// A malformed record is the vCPU's failure.
fn on_record(shared: &Shared, index: usize, data: &[u8]) -> Result<(), String> {
    let base = STATUS + ((index as u64) << STATUS_SHIFT);
    let mem = shared.memory.guest_memory_mmap();
    let r = parse_record(index, data, |off| {
        mem.read_obj::<u64>(GuestAddress(base + off))
            .map_err(|e| format!("status block at {:#x}: {e}", base + off))
    })
    .map_err(|e| format!("malformed output record: {}: {}", e.field, e.why))?;
    let hook = shared.output.lock().unwrap().clone();
    if let Some(h) = hook {
        h(ferry::colo::Record {
            vcpu: r.vcpu,
            seq: r.seq,
            value: r.value,
        });
    }
    Ok(())
}

/// Acts on one line from the guest's port.
fn on_line(shared: &Shared, line: &str) {
    match parse_line(line) {
        Some(PortLine::Boot { vcpu }) => shared
            .reports
            .lock()
            .unwrap()
            .push(GuestReport::Booted { vcpu }),
        Some(PortLine::Error { vcpu, addr }) => shared
            .reports
            .lock()
            .unwrap()
            .push(GuestReport::SelfCheckError { vcpu, addr }),
        Some(PortLine::Progress(p)) => {
            if ferry::switchover_trace::enabled() {
                ferry::switchover_trace::mark(&format!("guest: {line}"));
            }
            let first = match shared.progress.lock().unwrap().get_mut(p.vcpu) {
                Some(slot) => slot.replace(p).is_none(),
                None => false,
            };
            if first {
                if let Some(g) = shared.first_gap_us.lock().unwrap().get_mut(p.vcpu) {
                    *g = p.gap_us;
                }
            }
            if let Some(us) = p.gap_us {
                let mut max = shared.line_gap_us.lock().unwrap();
                *max = Some(max.map_or(us, |m| m.max(us)));
            }
        }
        Some(PortLine::Fatal(why)) => {
            let mut f = shared.failure.lock().unwrap();
            if f.is_none() {
                *f = Some(format!("the guest refused its boot parameters: {why}"));
            }
        }
        None => {}
    }
}

/// Re-enters KVM_RUN with `immediate_exit` set: KVM finishes an I/O exit
/// (advances RIP past the `out`) and returns at once, so the registers a
/// save reads are those of a completed instruction.
fn complete_pending_io(fd: &Mutex<VcpuFd>) {
    let mut vcpu = fd.lock().unwrap();
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

fn throttle_thread(shared: &Shared) {
    let mut run = shared.run.lock().unwrap();
    loop {
        if run.quit {
            return;
        }
        let p = shared.throttle.load(Ordering::Relaxed);
        if p == 0 {
            run = shared.cv.wait(run).unwrap();
            continue;
        }
        if !run.paused {
            let ns = THROTTLE_TICK.as_nanos() as u64 * u64::from(p) / 100;
            for s in &shared.sleep_ns {
                s.store(ns, Ordering::Relaxed);
            }
            kick_all(shared);
        }
        run = shared.cv.wait_timeout(run, THROTTLE_TICK).unwrap().0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ram::BlockSpec;

    /// The `AnonHugePages` kB of the mapping that starts at `addr`, from
    /// /proc/self/smaps.
    fn anon_huge_kb(addr: *mut u8) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", addr as usize);
        let mut inside = false;
        for line in smaps.lines() {
            if line.contains('-') && line.split_whitespace().count() >= 5 {
                inside = line.starts_with(&start);
            } else if inside && line.starts_with("AnonHugePages:") {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no mapping at {start} in /proc/self/smaps");
    }

    /// Writes one byte into every 2 MiB of the memory's only block.
    fn touch(memory: &GuestMemory) -> *mut u8 {
        let block = &memory.blocks()[0];
        let base = block.host_addr();
        for off in (0..block.len()).step_by(2 << 20) {
            // SAFETY: inside the block's own mapping, which nobody else
            // uses in this test.
            unsafe { base.add(off as usize).write_volatile(1) };
        }
        base
    }

    /// A destination's memory after `use_base_pages` holds no huge page,
    /// where the same memory without it gets them (checked first, when
    /// the host gives huge pages at all, so the test can fail).
    #[test]
    fn a_destination_in_base_pages_gets_no_huge_page() {
        let spec = [BlockSpec {
            name: "ram".into(),
            len: 64 << 20,
            page_size: PAGE as u32,
        }];
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !thp.contains("[never]") && !thp.is_empty() {
            let advised = GuestMemory::anonymous(&spec).unwrap();
            let huge = anon_huge_kb(touch(&advised));
            eprintln!("advised memory without use_base_pages: {huge} kB in huge pages");
        }
        let memory = GuestMemory::anonymous(&spec).unwrap();
        use_base_pages(&memory);
        assert_eq!(
            anon_huge_kb(touch(&memory)),
            0,
            "a huge page despite use_base_pages"
        );
    }
}
