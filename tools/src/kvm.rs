//! `--guest kvm`: the KVM micro-VM of ferry-vmm on the command line. The
//! source side boots it from the guest options (`send`, `save`); the
//! destination side (`recv`, `restore --run-guest`) builds a VM from the
//! received or saved vCPU state (refused, naming the field, before any VM
//! runs if it is damaged), resumes it, and after a while reads the guest's
//! own counters and self-check from its memory.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry::{DirtyPattern, Guest, GuestBuilder, GuestMemory, Resources, Workload};
use ferry_vmm::{
    kvm_usable, DirtyTracker, KvmGuest, PreparedVm, SharedKvmGuest, VcpuStatus, Vm, VmConfig,
    VmmError, WritePattern, DEFAULT_RING_ENTRIES,
};

use crate::guest_args::{GuestArgs, TrackerArg};

/// How long a fresh guest may take to boot every vCPU.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails unless /dev/kvm can run a guest, saying so.
pub fn require_kvm() -> anyhow::Result<()> {
    kvm_usable().map_err(|why| anyhow::anyhow!("--guest kvm needs a usable /dev/kvm: {why}"))
}

/// Boots the KVM guest the options describe, running, every vCPU booted.
pub fn boot(a: &GuestArgs, resources: Resources) -> anyhow::Result<KvmGuest> {
    boot_with_output(a, resources, 0)
}

/// [`boot`] whose guest emits an output record every `output_every` page
/// writes of each vCPU (0: none; COLO compares them).
pub fn boot_with_output(
    a: &GuestArgs,
    resources: Resources,
    output_every: u64,
) -> anyhow::Result<KvmGuest> {
    require_kvm()?;
    let memory = a.size.context(
        "--guest kvm needs --size: its RAM, a multiple of 2 MiB from 4 MiB to 3 GiB (e.g. 64M)",
    )?;
    let config = VmConfig {
        memory,
        vcpus: usize::from(a.vcpus),
        dirty_rate: a.dirty_rate,
        pattern: match a.dirty_pattern {
            DirtyPattern::Random => WritePattern::Random,
            DirtyPattern::Sequential => WritePattern::Sequential,
            DirtyPattern::Hotset(p) => WritePattern::Hotset(p),
        },
        seed: a.seed,
        tracker: match a.dirty_tracker {
            Some(TrackerArg::KvmRing) => DirtyTracker::Ring {
                entries: DEFAULT_RING_ENTRIES,
            },
            _ => DirtyTracker::default(),
        },
    };
    let guest = KvmGuest::boot_with_output(&config, output_every, resources)
        .context("starting the KVM guest")?;
    guest
        .wait_booted(BOOT_TIMEOUT)
        .context("starting the KVM guest")?;
    Ok(guest)
}

/// A KVM guest a destination built, and every vCPU's counters as they
/// arrived: read by [`take_arrived`] when the migration has ended here
/// (empty until then).
pub struct Arrived {
    pub guest: Arc<KvmGuest>,
    pub at_arrival: Vec<VcpuStatus>,
}

/// Where a destination's guest builder leaves the KVM guest it built.
pub type ArrivedSlot = Arc<Mutex<Option<Arrived>>>;

/// The KVM guest the builder left in `slot`, if any, with its counters
/// read now. Not in the builder: under postcopy it runs before every page
/// is there, and reading a missing status page would wait for it on the
/// migration's own thread, which a link cut at that moment would leave
/// waiting with nobody to recover the link.
pub fn take_arrived(slot: &ArrivedSlot) -> anyhow::Result<Option<Arrived>> {
    let Some(mut arrived) = slot.lock().unwrap().take() else {
        return Ok(None);
    };
    if arrived.at_arrival.is_empty() {
        arrived.at_arrival = arrived.guest.statuses()?;
    }
    Ok(Some(arrived))
}

/// `recv --prebuild-kvm`: the VM a destination prepares over its memory
/// (KVM_CREATE_VM, the memory slots) in a thread of its own while pages
/// arrive, for the switchover to take instead of building it then.
#[derive(Clone, Default)]
pub struct Prebuilt(Arc<Mutex<Option<Preparing>>>);

/// The thread preparing a VM.
type Preparing = JoinHandle<Result<PreparedVm, VmmError>>;

impl Prebuilt {
    /// The hook that starts preparing over the destination's memory.
    pub fn hook(&self) -> ferry::incoming::PrepareHook {
        let me = self.clone();
        Arc::new(move |memory: &Arc<GuestMemory>| {
            // Before any page lands (this hook runs before the receivers
            // start): base pages, as the source's VM had.
            ferry_vmm::use_base_pages(memory);
            let memory = memory.clone();
            let started = std::thread::Builder::new()
                .name("ferry-kvm-prebuild".into())
                .spawn(move || Vm::prepare(memory, DirtyTracker::default()));
            // Without the thread the switchover builds the whole VM.
            *me.0.lock().unwrap() = started.ok();
        })
    }

    /// The VM prepared over `memory`, once its thread ended; `None` if
    /// none was started or it failed (the switchover then builds the VM
    /// and reports why it cannot).
    fn take(&self, memory: &Arc<GuestMemory>) -> Option<PreparedVm> {
        let handle = self.0.lock().unwrap().take()?;
        match handle.join() {
            Ok(Ok(p)) if Arc::ptr_eq(p.memory(), memory) => Some(p),
            Ok(Err(e)) => {
                tracing::info!(
                    "the VM prepared before the switchover failed ({e}): building it now"
                );
                None
            }
            _ => None,
        }
    }
}

/// A paused KVM guest over `memory` with the vCPU state `state` (checked
/// first: a damaged state is refused naming the field, before any VM
/// exists), and its counters as they are in that memory.
pub fn from_state(
    memory: Arc<GuestMemory>,
    state: &[u8],
    resources: Resources,
) -> anyhow::Result<Arrived> {
    let mut arrived = from_state_or_prepared(memory, state, resources, None)?;
    arrived.at_arrival = arrived.guest.statuses()?;
    Ok(arrived)
}

/// [`from_state`] into `prepared`, a VM made over `memory` beforehand,
/// if there is one.
fn from_state_or_prepared(
    memory: Arc<GuestMemory>,
    state: &[u8],
    resources: Resources,
    prepared: Option<PreparedVm>,
) -> anyhow::Result<Arrived> {
    kvm_usable().map_err(|why| {
        anyhow::anyhow!("the guest is a KVM guest, which needs a usable /dev/kvm here: {why}")
    })?;
    let guest = match prepared {
        Some(p) => KvmGuest::from_prepared(p, state, resources),
        None => KvmGuest::from_state(memory, state, resources),
    }
    .context("building the KVM guest from its saved state")?;
    Ok(Arrived {
        guest: Arc::new(guest),
        at_arrival: Vec::new(),
    })
}

/// Wraps `other` (the builder for every other kind of guest): a KVM
/// micro-VM's state builds a KVM guest owning `resources()`, noted in
/// `slot`.
/// With `prebuilt`, the VM it prepared over this memory is used.
pub fn builder(
    other: GuestBuilder,
    resources: impl Fn() -> Result<Resources, ferry::GuestError> + Send + Sync + 'static,
    slot: ArrivedSlot,
    prebuilt: Option<Prebuilt>,
) -> GuestBuilder {
    Arc::new(move |memory, state| {
        let prepared = prebuilt.as_ref().and_then(|p| p.take(&memory));
        if !ferry_vmm::is_kvm_state(state) {
            return other(memory, state);
        }
        let arrived = from_state_or_prepared(memory, state, resources()?, prepared)
            .map_err(|e| ferry::GuestError::DeviceState(crate::output::error_chain(&e)))?;
        let shared = SharedKvmGuest(arrived.guest.clone());
        *slot.lock().unwrap() = Some(arrived);
        Ok(Box::new(shared) as Box<dyn Guest>)
    })
}

/// Lets the (running) guest run `secs`, pauses it and reports how far its
/// vCPUs went from `arrived.at_arrival`, with its self-check's verdict.
pub fn run_workload(arrived: &Arrived, secs: f64) -> anyhow::Result<Workload> {
    std::thread::sleep(Duration::from_secs_f64(secs));
    arrived.guest.pause()?;
    workload(arrived, secs)
}

/// The guest's counters now against those it arrived with.
pub fn workload(arrived: &Arrived, secs: f64) -> anyhow::Result<Workload> {
    let now = arrived.guest.statuses()?;
    let sum = |s: &[VcpuStatus]| s.iter().map(|v| v.writes).sum::<u64>();
    let errors: u64 = now.iter().map(|s| s.errors).sum();
    let first = now
        .iter()
        .map(|s| s.first_error)
        .find(|&a| a != 0)
        .map(|a| format!("{a:#x}"));
    Ok(Workload {
        writes_at_switchover: sum(&arrived.at_arrival),
        writes_after: sum(&now),
        seconds: secs,
        continued: now
            .iter()
            .zip(&arrived.at_arrival)
            .all(|(n, a)| n.writes > a.writes),
        self_check_errors: Some(errors),
        self_check_first_error: first,
        guest_failure: arrived.guest.vm().failure(),
        guest_max_gap_us: now.iter().filter_map(|s| s.max_gap_us).max(),
        guest_blackout_us: arrived.guest.vm().largest_line_gap_us(),
        guest_switchover_gap_us: arrived.guest.vm().first_line_gap_us(),
        ..Default::default()
    })
}

/// Why a workload means the guest did not survive the move, if it did not.
pub fn verdict(w: &Workload) -> Option<String> {
    if let Some(f) = &w.guest_failure {
        return Some(format!("the KVM guest stopped: {f}"));
    }
    if let Some(n) = w.self_check_errors.filter(|&n| n > 0) {
        return Some(format!(
            "the KVM guest's self-check found {n} wrong word(s), the first at {}",
            w.self_check_first_error.as_deref().unwrap_or("?")
        ));
    }
    if !w.continued {
        return Some("the KVM guest's vCPUs did not all write on after it resumed".into());
    }
    None
}

/// Waits (up to 10 s) until some vCPU wrote a page after `arrived`; true
/// once one did.
pub fn wait_first_write(arrived: &Arrived) -> anyhow::Result<bool> {
    let before: u64 = arrived.at_arrival.iter().map(|s| s.writes).sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: u64 = arrived.guest.statuses()?.iter().map(|s| s.writes).sum();
        if now > before {
            return Ok(true);
        }
        if let Some(f) = arrived.guest.vm().failure() {
            bail!("the KVM guest stopped: {f}");
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `restore --run-guest` after an eager restore: runs the saved guest (a
/// KVM or synthetic guest) from `state` on `memory` for `run_for`, pauses
/// it and reports its workload. A KVM state that fails its checks is
/// refused (naming the field) before any VM exists.
pub fn run_after_restore(
    memory: Arc<GuestMemory>,
    state: &[u8],
    run_for: Duration,
) -> anyhow::Result<Workload> {
    let secs = run_for.as_secs_f64();
    if ferry_vmm::is_kvm_state(state) {
        let arrived = from_state(memory, state, Resources::none(false))?;
        arrived.guest.resume()?;
        return run_workload(&arrived, secs);
    }
    if !ferry::synthetic::is_synthetic_state(state) {
        bail!("--run-guest: the saved device state is neither a synthetic nor a KVM guest's");
    }
    let guest = ferry::SyntheticGuest::from_device_state(
        memory,
        state,
        ferry::TrackerKind::Bitmap,
        Resources::none(false),
    )?;
    guest.resume()?;
    crate::recv::run_workload(&guest, state, secs)?
        .context("the synthetic guest reported no workload")
}

/// `restore --lazy --run-guest` of a saved KVM guest: builds the VM over
/// the lazily restored memory (pages load as its vCPUs touch them),
/// resumes it at once, notes when its first write finished, waits for
/// every page, lets it run `run_for` more, pauses it and reports.
pub fn run_lazily(
    restoring: ferry::LazyRestoring,
    run_for: Duration,
) -> anyhow::Result<Result<ferry::LazyRestored, ferry::FileFailed>> {
    let started = restoring.started();
    let arrived = match from_state(
        restoring.memory().clone(),
        restoring.device_state(),
        Resources::none(false),
    ) {
        Ok(a) => a,
        Err(e) => {
            // Let the prefetch end before saying so: nothing is left running.
            let _ = restoring.finish(None);
            return Err(e);
        }
    };
    arrived.guest.resume()?;
    let first_write_ms = match wait_first_write(&arrived) {
        Ok(true) => Some(started.elapsed().as_secs_f64() * 1e3),
        _ => None,
    };
    let result = restoring.finish(first_write_ms);
    let workload = run_workload(&arrived, run_for.as_secs_f64());
    let mut r = match result {
        Ok(r) => r,
        Err(f) => {
            let _ = arrived.guest.pause();
            return Ok(Err(f));
        }
    };
    r.summary.workload = Some(workload?);
    Ok(Ok(r))
}
