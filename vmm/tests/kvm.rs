//! The KVM micro-VM end to end: boot and count, pause, save → load into a
//! new VM → continue, the self-check catching a corrupted page, a flipped
//! state byte refused, and a live migration over loopback TCP with
//! `ferry::migrate_out` / `migrate_in`. Each test skips (with a message)
//! where /dev/kvm is not usable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::{
    migrate_in, migrate_out, Guest, IncomingOptions, Listener, OutgoingOptions, Parameters,
    Progress, Resources, SocketTuning, Status,
};
use ferry_ram::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use ferry_ram::GuestMemory;
use ferry_vmm::layout::{work_start, PAGE};
use ferry_vmm::{
    kvm_usable, vcpu_status, BootParams, DirtyTracker, GuestReport, KvmGuest, SharedKvmGuest,
    VmConfig, WritePattern,
};

const MIB: u64 = 1 << 20;

fn kvm_or_skip(test: &str) -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: SKIPPED: {why}");
            false
        }
    }
}

fn config(memory: u64, vcpus: usize, rate: u64, pattern: WritePattern) -> VmConfig {
    VmConfig {
        memory,
        vcpus,
        dirty_rate: rate,
        pattern,
        seed: 42,
        tracker: DirtyTracker::default(),
    }
}

/// Polls `cond` every 10 ms for up to 30 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn writes(memory: &GuestMemory, vcpus: usize) -> u64 {
    (0..vcpus)
        .map(|i| vcpu_status(memory, i).unwrap().writes)
        .sum()
}

fn assert_clean(memory: &GuestMemory, vcpus: usize) {
    for i in 0..vcpus {
        let s = vcpu_status(memory, i).unwrap();
        assert_eq!(
            s.errors, 0,
            "vCPU {i}: self-check errors, first at {:#x}",
            s.first_error
        );
        assert!(s.verified > 0, "vCPU {i} verified pages");
    }
}

/// A copy of `memory` (one region at 0) in a new GuestMemoryMmap.
fn copy_memory(memory: &GuestMemory) -> Arc<GuestMemory> {
    let len = memory.total_bytes() as usize;
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap();
    let mut buf = vec![0u8; len];
    memory
        .guest_memory_mmap()
        .read_slice(&mut buf, GuestAddress(0))
        .unwrap();
    mmap.write_slice(&buf, GuestAddress(0)).unwrap();
    Arc::new(GuestMemory::from_guest_memory_mmap(&mmap, 4096).unwrap())
}

#[test]
fn the_guest_boots_and_its_counter_advances() {
    if !kvm_or_skip("the_guest_boots_and_its_counter_advances") {
        return;
    }
    let g = KvmGuest::boot(
        &config(16 * MIB, 2, 16 * MIB, WritePattern::Random),
        Resources::none(true),
    )
    .unwrap();
    let mem = g.memory().clone();
    wait_for("both vCPUs writing", || {
        (0..2).all(|i| g.status(i).unwrap().writes > 100)
    });
    let r = g.reports();
    assert!(r.contains(&GuestReport::Booted { vcpu: 0 }), "{r:?}");
    assert!(r.contains(&GuestReport::Booted { vcpu: 1 }), "{r:?}");
    assert_eq!(g.vm().failure(), None);
    assert_clean(&mem, 2);
    // Each vCPU's progress line on the port (every second) carries its
    // counters and its largest TSC gap, as its status block does.
    wait_for("a progress line from each vCPU", || {
        g.vm().progress().iter().all(Option::is_some)
    });
    for (i, p) in g.vm().progress().into_iter().enumerate() {
        let p = p.unwrap();
        let s = g.status(i).unwrap();
        assert_eq!(p.vcpu, i);
        assert_eq!(p.errors, 0);
        assert!(p.writes > 0 && p.writes <= s.writes, "{p:?} {s:?}");
        assert!(
            p.max_gap_us.is_some() && s.max_gap_us.is_some(),
            "{p:?} {s:?}"
        );
        assert!(p.max_gap_ticks <= s.max_gap_ticks, "{p:?} {s:?}");
    }

    // Paused, nothing moves.
    g.pause().unwrap();
    assert!(!g.is_running());
    let w = writes(&mem, 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(writes(&mem, 2), w, "no write while paused");
    g.resume().unwrap();
    wait_for("writes after resume", || writes(&mem, 2) > w);

    // Throttled, it still runs.
    g.set_throttle(50);
    let w = writes(&mem, 2);
    wait_for("writes while throttled", || writes(&mem, 2) > w + 10);
    g.set_throttle(0);
    assert_eq!(g.vm().failure(), None);
}

/// The guest's largest TSC gap is the time it did not run: a 300 ms pause
/// shows up as a gap of at least that, in its status block and in its next
/// progress line on the port.
#[test]
fn a_pause_shows_as_the_guests_largest_tsc_gap() {
    if !kvm_or_skip("a_pause_shows_as_the_guests_largest_tsc_gap") {
        return;
    }
    let g = KvmGuest::boot(
        &config(8 * MIB, 1, 4 * MIB, WritePattern::Random),
        Resources::none(true),
    )
    .unwrap();
    wait_for("writes", || g.status(0).unwrap().writes > 50);
    g.pause().unwrap();
    let before = g.status(0).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    g.resume().unwrap();
    wait_for("writes after the pause", || {
        g.status(0).unwrap().writes > before.writes + 50
    });
    let s = g.status(0).unwrap();
    let us = s.max_gap_us.unwrap();
    assert!(
        (300_000..30_000_000).contains(&us),
        "a 300 ms pause, the guest's largest gap {us} µs (before it: {:?} µs)",
        before.max_gap_us
    );
    wait_for("a progress line after the pause", || {
        g.vm().progress()[0].is_some_and(|p| p.max_gap_us.is_some_and(|gap| gap >= us))
    });
    // The line after the pause carried it as its window's gap too.
    let line = g.vm().largest_line_gap_us().unwrap();
    assert!(line >= 300_000, "{line} µs");
    // Every line places its window's largest gap on the guest's clock: the
    // TSC that ended it, which a gap of gap_ticks cannot precede.
    let p = g.vm().progress()[0].unwrap();
    assert!(
        p.gap_end_tsc.is_some_and(|t| t > 0 && t >= p.gap_ticks),
        "a progress line's gap_end_tsc {:?} (gap_ticks {})",
        p.gap_end_tsc,
        p.gap_ticks
    );
    eprintln!("a 300 ms pause: the guest saw a gap of {us} µs (its line: {line} µs)");
}

/// Each vCPU's IA32_TSC in a saved state.
fn saved_tscs(state: &[u8]) -> Vec<u64> {
    ferry_vmm::VmState::decode(state)
        .unwrap()
        .vcpus
        .iter()
        .map(|v| v.msrs.iter().find(|e| e.index == 0x10).unwrap().data)
        .collect()
}

/// The TSC a state carries is the one the vCPUs had when they stopped
/// (as QEMU keeps it), not the one when the state was saved: two saves of
/// a paused VM 50 ms apart carry the same TSCs; and a VM loaded from that
/// state saves, before it ran, the TSCs it was loaded with.
#[test]
fn a_paused_vm_keeps_the_tsc_of_its_pause_in_every_state_it_saves() {
    if !kvm_or_skip("a_paused_vm_keeps_the_tsc_of_its_pause_in_every_state_it_saves") {
        return;
    }
    let src = KvmGuest::boot(
        &config(8 * MIB, 2, 4 * MIB, WritePattern::Random),
        Resources::none(true),
    )
    .unwrap();
    wait_for("writes", || writes(src.memory(), 2) > 50);
    src.pause().unwrap();
    let first = src.save_device_state().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let second = src.save_device_state().unwrap();
    let tscs = saved_tscs(&first);
    assert!(tscs.iter().all(|&t| t > 0), "{tscs:?}");
    assert_eq!(tscs, saved_tscs(&second), "two saves of one pause");

    let copy = copy_memory(src.memory());
    let dst = KvmGuest::from_state(copy, &first, Resources::none(false)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        saved_tscs(&dst.save_device_state().unwrap()),
        tscs,
        "a loaded VM that has not run"
    );
}

/// The guest checks its command line: ferry's VMM boots it with a bad one
/// (a hot set of 0%), the guest says why on its port and stops, and the
/// VMM reports that as the guest's failure. A good one with faster
/// progress lines gives a line within a second.
#[test]
fn the_guest_refuses_bad_boot_parameters_through_the_port() {
    if !kvm_or_skip("the_guest_refuses_bad_boot_parameters_through_the_port") {
        return;
    }
    let c = config(8 * MIB, 1, 4 * MIB, WritePattern::Hotset(10));
    let tsc_khz = ferry_vmm::host_tsc_khz().unwrap();
    let mut params = BootParams::of(&c, tsc_khz);
    params.pattern = WritePattern::Hotset(0);
    let g = KvmGuest::boot_with(&c, Some(&params), Resources::none(true)).unwrap();
    let e = g
        .wait_booted(Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused its boot parameters: hot= must be 1 to 100"),
        "{e}"
    );
    params.pattern = WritePattern::Hotset(10);
    params.report_ms = Some(100);
    let g = KvmGuest::boot_with(&c, Some(&params), Resources::none(true)).unwrap();
    g.wait_booted(Duration::from_secs(30)).unwrap();
    wait_for("a progress line", || g.vm().progress()[0].is_some());
    assert_eq!(g.vm().failure(), None);
}

#[test]
fn saved_state_loads_into_a_new_vm_and_the_guest_continues() {
    if !kvm_or_skip("saved_state_loads_into_a_new_vm_and_the_guest_continues") {
        return;
    }
    let src = KvmGuest::boot(
        &config(16 * MIB, 2, 32 * MIB, WritePattern::Hotset(50)),
        Resources::none(true),
    )
    .unwrap();
    wait_for("source writes", || writes(src.memory(), 2) > 500);
    src.pause().unwrap();
    let state = src.save_device_state().unwrap();
    let saved = [src.status(0).unwrap(), src.status(1).unwrap()];
    let copy = copy_memory(src.memory());
    drop(src);

    let dst = KvmGuest::from_state(copy.clone(), &state, Resources::none(false)).unwrap();
    assert!(!dst.is_running(), "a loaded guest waits for resume");
    assert_eq!(dst.status(0).unwrap(), saved[0]);
    assert_eq!(dst.save_device_state().unwrap().len(), state.len());
    dst.resume().unwrap();
    wait_for("the restored guest's counters advance", || {
        (0..2).all(|i| dst.status(i).unwrap().writes > saved[i].writes + 200)
    });
    assert_eq!(dst.vm().failure(), None);
    assert_clean(&copy, 2);
    assert!(
        !dst.reports()
            .iter()
            .any(|r| matches!(r, GuestReport::SelfCheckError { .. })),
        "{:?}",
        dst.reports()
    );
}

#[test]
fn the_self_check_reports_a_corrupted_page_through_the_port() {
    if !kvm_or_skip("the_self_check_reports_a_corrupted_page_through_the_port") {
        return;
    }
    let memory = 8 * MIB;
    // Slow sequential writes from the slice's start (64 KiB/s, paced by
    // the TSC: about 110 s to reach the last page, whatever the load):
    // the last page stays unwritten while verification sweeps it. At
    // 1 MiB/s a loaded machine let the writer reach and rewrite it first.
    let g = KvmGuest::boot(
        &config(memory, 1, 64 << 10, WritePattern::Sequential),
        Resources::none(true),
    )
    .unwrap();
    wait_for("a verified sweep", || {
        g.status(0).unwrap().verified > (memory - work_start(memory)) / PAGE
    });
    assert_eq!(g.status(0).unwrap().errors, 0);
    g.pause().unwrap();
    let bad = memory - PAGE + 16;
    g.memory()
        .guest_memory_mmap()
        .write_obj(0xdead_beef_u64, GuestAddress(bad))
        .unwrap();
    g.resume().unwrap();
    wait_for("the self-check error", || g.status(0).unwrap().errors > 0);
    assert_eq!(g.status(0).unwrap().first_error, bad);
    wait_for("the port report", || {
        g.reports()
            .contains(&GuestReport::SelfCheckError { vcpu: 0, addr: bad })
    });
}

#[test]
fn a_flipped_or_truncated_state_is_refused_naming_the_field() {
    if !kvm_or_skip("a_flipped_or_truncated_state_is_refused_naming_the_field") {
        return;
    }
    let g = KvmGuest::boot(
        &config(8 * MIB, 1, 4 * MIB, WritePattern::Random),
        Resources::none(true),
    )
    .unwrap();
    wait_for("writes", || g.status(0).unwrap().writes > 10);
    g.pause().unwrap();
    let state = g.save_device_state().unwrap();
    // header 28 bytes, regs section 12 + 144, sregs header 12: byte 10 of sregs.
    let mut bad = state.clone();
    bad[28 + 12 + 144 + 12 + 10] ^= 0x04;
    let e = KvmGuest::from_state(copy_memory(g.memory()), &bad, Resources::none(false))
        .err()
        .expect("a flipped byte is refused")
        .to_string();
    assert!(e.contains("vCPU 0 sregs") && e.contains("crc"), "{e}");
    // The running guest refuses it too, and its own state is unchanged.
    let e = g.load_device_state(&bad).unwrap_err().to_string();
    assert!(e.contains("vCPU 0 sregs"), "{e}");
    let e = g
        .load_device_state(&state[..state.len() - 20])
        .unwrap_err()
        .to_string();
    assert!(e.contains("clock") && e.contains("truncated"), "{e}");
    g.load_device_state(&state).unwrap();
    g.resume().unwrap();
    let w = g.status(0).unwrap().writes;
    wait_for("writes after reloading its own state", || {
        g.status(0).unwrap().writes > w
    });
    assert_eq!(g.vm().failure(), None);
}

#[test]
fn a_live_migration_over_loopback_resumes_the_guest_on_the_destination() {
    if !kvm_or_skip("a_live_migration_over_loopback_resumes_the_guest_on_the_destination") {
        return;
    }
    let guest = KvmGuest::boot(
        &config(32 * MIB, 1, 8 * MIB, WritePattern::Random),
        Resources::none(true),
    )
    .unwrap();
    wait_for("source writes", || guest.status(0).unwrap().writes > 200);

    // The destination's builder keeps a handle on the VM it builds (to read
    // its port lines).
    let built: Arc<Mutex<Option<Arc<KvmGuest>>>> = Arc::default();
    let slot = built.clone();
    let incoming = IncomingOptions {
        build_guest: Arc::new(move |memory, state| {
            let g = Arc::new(KvmGuest::from_state(memory, state, Resources::none(false))?);
            *slot.lock().unwrap() = Some(g.clone());
            Ok(Box::new(SharedKvmGuest(g)) as Box<dyn Guest>)
        }),
        verify_switchover: Some(true),
        ..Default::default()
    };
    let (sent, got, progress) = migrate_locally(
        &guest,
        incoming,
        &OutgoingOptions::default(),
        two_second_downtime(),
    );
    let vm = built.lock().unwrap().clone().expect("the builder ran");
    assert_eq!(progress.status(), Status::Completed);
    assert!(!guest.is_running(), "the source stays paused");
    assert!(got.guest.is_running(), "the destination runs the guest");
    assert_eq!(sent.dirty_tracker.as_deref(), Some("kvm-log"));
    assert_eq!(
        sent.switchover_digest, got.summary.switchover_digest,
        "memory and device state at switchover equal the destination's"
    );
    let at_switchover = guest.status(0).unwrap();
    assert_clean(guest.memory(), 1);
    wait_for("the destination's counter advances", || {
        vcpu_status(&got.memory, 0).unwrap().writes > at_switchover.writes + 200
    });
    assert_clean(&got.memory, 1);
    // The first progress line on the destination carries the blackout as
    // the guest saw it.
    wait_for("a progress line on the destination", || {
        vm.vm().largest_line_gap_us().is_some()
    });
    let d = vcpu_status(&got.memory, 0).unwrap();
    eprintln!(
        "live: {} passes, {} bytes of RAM, downtime {:?} ms; source stopped at {} writes, destination at {} (verified {}, errors {}); guest-seen TSC gap: largest {} µs, across the switchover {} µs",
        sent.passes,
        sent.ram_bytes,
        sent.downtime_ms,
        at_switchover.writes,
        d.writes,
        d.verified,
        d.errors,
        d.max_gap_ticks * 1000 / u64::from(guest.vm().tsc_khz()),
        vm.vm().largest_line_gap_us().unwrap()
    );
    got.guest.pause().unwrap();
}

/// Migrates `guest` over loopback into a destination with `incoming`,
/// with `opts` and the parameters `params`; both sides must complete.
/// Returns the source's summary, the destination's outcome and the
/// source's progress.
fn migrate_locally(
    guest: &dyn Guest,
    incoming: IncomingOptions,
    opts: &OutgoingOptions,
    params: Parameters,
) -> (ferry::Summary, ferry::IncomingOutcome, Progress) {
    let listener =
        Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), SocketTuning::default()).unwrap();
    let uri = listener.uri().clone();
    let dst = std::thread::spawn(move || {
        migrate_in(&listener, &incoming, &Progress::default()).map_err(|e| e.to_string())
    });
    let progress = Progress::with_parameters(params);
    let sent = migrate_out(guest, &uri, opts, &progress).expect("the source completes");
    let got = dst.join().unwrap().expect("the destination completes");
    (sent, got, progress)
}

/// A downtime limit the slow software KVM here can meet.
fn two_second_downtime() -> Parameters {
    Parameters {
        downtime_limit: Duration::from_secs(2),
        ..Default::default()
    }
}

/// One hop: migrates `guest` to a fresh destination (its memory ferry's
/// own, or a `GuestMemoryMmap` the destination VMM holds) and returns the
/// destination's guest and memory once its counters advanced past the
/// source's.
fn hop(
    guest: &dyn Guest,
    vcpus: usize,
    provided: bool,
    params: Parameters,
) -> (Box<dyn Guest>, Arc<GuestMemory>, ferry::Summary) {
    let memory = if provided {
        let len = guest.memory().total_bytes() as usize;
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap();
        ferry::DestinationMemory::Provided(Arc::new(
            GuestMemory::from_guest_memory_mmap(&mmap, 4096).unwrap(),
        ))
    } else {
        ferry::DestinationMemory::Anonymous
    };
    let incoming = IncomingOptions {
        memory,
        build_guest: KvmGuest::builder(),
        verify_switchover: Some(true),
        ..Default::default()
    };
    let (sent, got, progress) =
        migrate_locally(guest, incoming, &OutgoingOptions::default(), params);
    assert_eq!(progress.status(), Status::Completed);
    assert!(!guest.is_running() && got.guest.is_running());
    assert_eq!(sent.switchover_digest, got.summary.switchover_digest);
    let before: Vec<u64> = (0..vcpus)
        .map(|i| vcpu_status(guest.memory(), i).unwrap().writes)
        .collect();
    assert_clean(guest.memory(), vcpus);
    wait_for("every vCPU's counter advances on the destination", || {
        (0..vcpus).all(|i| vcpu_status(&got.memory, i).unwrap().writes > before[i] + 50)
    });
    assert_clean(&got.memory, vcpus);
    (got.guest, got.memory, sent)
}

/// Issue #15's "20 live migrations in a row": the guest goes back and
/// forth between fresh destinations (alternately ferry's own memory and
/// memory the destination VMM provides), and after every hop the self-check
/// is clean on both sides and every vCPU's counter advanced past where the
/// source stopped (`hop`). Sized for a loaded 2-core machine: 32 MiB,
/// 8 MiB/s.
#[test]
fn two_vcpus_ping_pong_through_twenty_live_migrations() {
    if !kvm_or_skip("two_vcpus_ping_pong_through_twenty_live_migrations") {
        return;
    }
    let first = KvmGuest::boot(
        &config(32 * MIB, 2, 8 * MIB, WritePattern::Hotset(25)),
        Resources::none(true),
    )
    .unwrap();
    wait_for("source writes", || writes(first.memory(), 2) > 200);
    let params = two_second_downtime();
    let (mut guest, mut memory, _) = hop(&first, 2, false, params.clone());
    drop(first);
    for n in 1..20 {
        let (next, next_memory, sent) = hop(&*guest, 2, n % 2 == 1, params.clone());
        let gap = (0..2)
            .filter_map(|i| vcpu_status(&next_memory, i).unwrap().max_gap_us)
            .max();
        eprintln!(
            "hop {}: {} passes, destination at {} writes, guest's largest TSC gap {gap:?} µs",
            n + 1,
            sent.passes,
            writes(&next_memory, 2)
        );
        guest.pause().unwrap();
        drop(guest);
        (guest, memory) = (next, next_memory);
    }
    assert_clean(&memory, 2);
    guest.pause().unwrap();
}

/// A migration with auto-converge on: ferry throttles the KVM guest's
/// vCPUs through `set_throttle` when a pass dirties more than half of what
/// it sends (here usually: the guest writes as fast as it can, the passes
/// may send 4 MiB/s); how far it goes depends on the machine's speed, so
/// the test asserts only that the migration completes and the guest runs
/// clean (the throttle itself is exercised in the boot test).
#[test]
fn auto_converge_migrates_the_kvm_guest() {
    if !kvm_or_skip("auto_converge_migrates_the_kvm_guest") {
        return;
    }
    let g = KvmGuest::boot(
        &config(8 * MIB, 1, 0, WritePattern::Random),
        Resources::none(true),
    )
    .unwrap();
    wait_for("source writes", || writes(g.memory(), 1) > 100);
    let params = Parameters {
        downtime_limit: Duration::from_millis(50),
        auto_converge: true,
        max_bandwidth: 4 * MIB,
        ..Default::default()
    };
    let (dst, _memory, sent) = hop(&g, 1, false, params);
    eprintln!(
        "auto-converge: {} passes, throttle up to {}%",
        sent.passes, sent.throttle_percent
    );
    dst.pause().unwrap();
}

/// A source whose dirty log loses every work-area page: the destination
/// gets stale pages, and the guest's self-check must say so. This is what
/// gives the clean self-check of the other migrations its meaning.
struct LossyGuest {
    inner: KvmGuest,
    log: LossyLog,
}

struct LossyLog {
    inner: ferry_vmm::KvmDirtyLog,
    first_lost_page: u64,
}

impl ferry::DirtyLog for LossyLog {
    fn name(&self) -> &'static str {
        "lossy"
    }
    fn start(&self) -> Result<(), ferry_ram::RamError> {
        self.inner.start()
    }
    fn sync(&self, into: &[ferry::PageBitmap]) -> Result<u64, ferry_ram::RamError> {
        let scratch: Vec<_> = into
            .iter()
            .map(|b| ferry::PageBitmap::new(b.pages(), false))
            .collect();
        let n = self.inner.sync(&scratch)?;
        for (s, b) in scratch.iter().zip(into) {
            for p in s.iter_set().filter(|&p| p < self.first_lost_page) {
                b.set(p);
            }
        }
        Ok(n)
    }
    fn stop(&self) -> Result<(), ferry_ram::RamError> {
        self.inner.stop()
    }
    fn mark(&self, _: usize, _: u64) {}
}

impl Guest for LossyGuest {
    fn memory(&self) -> &Arc<GuestMemory> {
        self.inner.memory()
    }
    fn dirty_log(&self) -> Option<&dyn ferry::DirtyLog> {
        Some(&self.log)
    }
    fn pause(&self) -> Result<(), ferry::GuestError> {
        self.inner.pause()
    }
    fn resume(&self) -> Result<(), ferry::GuestError> {
        self.inner.resume()
    }
    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
    fn save_device_state(&self) -> Result<Vec<u8>, ferry::GuestError> {
        self.inner.save_device_state()
    }
    fn load_device_state(&self, s: &[u8]) -> Result<(), ferry::GuestError> {
        self.inner.load_device_state(s)
    }
    fn set_throttle(&self, p: u8) {
        self.inner.set_throttle(p)
    }
    fn resources(&self) -> &Resources {
        self.inner.resources()
    }
}

#[test]
fn a_lossy_dirty_log_is_caught_by_the_guest_self_check() {
    if !kvm_or_skip("a_lossy_dirty_log_is_caught_by_the_guest_self_check") {
        return;
    }
    let memory = 16 * MIB;
    // A page is lost only if the guest wrote it after the first pass sent
    // it; on a loaded machine (or one that lets the guest write only a few
    // pages during the migration) every write may have come before, which
    // proves nothing, so the attempt is made again. Whether a page went
    // stale is seen before the destination's guest runs: both guests are
    // paused then, and the memories are compared.
    let mut attempts = 0;
    let got = loop {
        attempts += 1;
        let inner = KvmGuest::boot(
            &config(memory, 1, 0, WritePattern::Random),
            Resources::none(true),
        )
        .unwrap();
        wait_for("source writes", || writes(inner.memory(), 1) > 100);
        let log = LossyLog {
            inner: inner.dirty_log_handle(),
            first_lost_page: work_start(memory) / PAGE,
        };
        let guest = LossyGuest { inner, log };
        let stale = Arc::new(AtomicBool::new(false));
        let build_guest: ferry::GuestBuilder = {
            let (stale, source, build) =
                (stale.clone(), guest.memory().clone(), KvmGuest::builder());
            Arc::new(move |memory, state| {
                let from = work_start(memory.total_bytes()) as usize;
                let (src, dst) = (source.blocks()[0].copy_all(), memory.blocks()[0].copy_all());
                stale.store(src[from..] != dst[from..], Ordering::SeqCst);
                build(memory, state)
            })
        };
        // ferry's own checks would refuse the result first: the switchover
        // digest (off here) and per-page checksums (off below).
        let incoming = IncomingOptions {
            build_guest,
            verify_switchover: Some(false),
            ..Default::default()
        };
        // Without per-page checksums: with them ferry itself notices pages
        // that changed in flight and were never sent again, and fails first.
        // The source completes: it cannot know its log lied.
        let mut opts = OutgoingOptions::default();
        opts.sender.checksum = false;
        let (_, got, _) = migrate_locally(&guest, incoming, &opts, two_second_downtime());
        if stale.load(Ordering::SeqCst) {
            break got;
        }
        assert!(
            attempts < 20,
            "in {attempts} migrations no page the lossy log dropped was stale on the \
             destination: the source's vCPU wrote nothing after the first pass"
        );
        eprintln!("lossy: no stale page after migration {attempts}; again");
        got.guest.pause().unwrap();
    };
    wait_for("the destination's self-check error", || {
        vcpu_status(&got.memory, 0).unwrap().errors > 0
    });
    let s = vcpu_status(&got.memory, 0).unwrap();
    assert!(s.first_error >= work_start(memory) && s.first_error < memory);
    eprintln!(
        "lossy: the destination found {} bad page(s), first word at {:#x}",
        s.errors, s.first_error
    );
    got.guest.pause().unwrap();
}

fn ring_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    match ferry_vmm::dirty_ring_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: SKIPPED: {why}");
            false
        }
    }
}

/// Boots a guest tracked by `tracker`, lets it write for a while after the
/// log started, and checks the log against memory itself: every page whose
/// bytes changed is reported dirty (a false positive is allowed, a miss
/// is not), and a paused guest dirties nothing.
fn tracker_reports_every_written_page(tracker: DirtyTracker) -> (u64, u64) {
    let memory = 16 * MIB;
    let g = KvmGuest::boot(
        &VmConfig {
            tracker,
            ..config(memory, 2, 0, WritePattern::Random)
        },
        Resources::none(true),
    )
    .unwrap();
    g.wait_booted(Duration::from_secs(30)).unwrap();
    let log = g.kvm_dirty_log();
    assert_eq!(ferry::DirtyLog::name(log), tracker.name());
    g.pause().unwrap();
    ferry::DirtyLog::start(log).unwrap();
    let before = copy_memory(g.memory());
    let w = writes(g.memory(), 2);
    g.resume().unwrap();
    // Enough writes that a small ring fills more than once.
    wait_for("writes", || writes(g.memory(), 2) > w + 3000);
    g.pause().unwrap();
    let pages = memory / PAGE;
    let pass = vec![ferry::PageBitmap::new(pages, false)];
    let found = ferry::DirtyLog::sync(log, &pass).unwrap();
    let (mut a, mut b) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
    let mut changed = 0;
    for p in 0..pages {
        let at = GuestAddress(p * PAGE);
        before.guest_memory_mmap().read_slice(&mut a, at).unwrap();
        g.memory()
            .guest_memory_mmap()
            .read_slice(&mut b, at)
            .unwrap();
        if a != b {
            changed += 1;
            assert!(
                pass[0].test(p),
                "{}: page {p} ({:#x}) changed but the log did not report it",
                tracker.name(),
                p * PAGE
            );
        }
    }
    assert!(
        changed > 0 && found >= changed,
        "{found} found, {changed} changed"
    );
    let again = vec![ferry::PageBitmap::new(pages, false)];
    assert_eq!(
        ferry::DirtyLog::sync(log, &again).unwrap(),
        0,
        "paused: nothing new"
    );
    eprintln!(
        "{} ({}): {changed} pages changed, {found} reported, {} ring-full exits",
        tracker.name(),
        log.method(),
        log.ring_full_exits()
    );
    assert_eq!(log.stray_entries(), 0);
    assert_eq!(g.vm().failure(), None);
    assert_clean(g.memory(), 2);
    (found, log.ring_full_exits())
}

#[test]
fn kvm_log_without_manual_protect_reports_every_written_page() {
    if !kvm_or_skip("kvm_log_without_manual_protect_reports_every_written_page") {
        return;
    }
    tracker_reports_every_written_page(DirtyTracker::Log {
        manual_protect: false,
    });
}

#[test]
fn kvm_log_with_manual_protect_reports_every_written_page() {
    if !kvm_or_skip("kvm_log_with_manual_protect_reports_every_written_page") {
        return;
    }
    let support = ferry_vmm::TrackerSupport::probe().unwrap();
    if support.manual_protect_flags & 1 == 0 {
        eprintln!(
            "kvm_log_with_manual_protect_reports_every_written_page: note: this kernel lacks \
             KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; kvm-log runs with KVM_GET_DIRTY_LOG alone"
        );
    }
    tracker_reports_every_written_page(DirtyTracker::Log {
        manual_protect: true,
    });
}

#[test]
fn kvm_ring_reports_every_written_page_through_full_rings() {
    if !ring_or_skip("kvm_ring_reports_every_written_page_through_full_rings") {
        return;
    }
    // 1024 entries: KVM's smallest ring with PML (its soft limit leaves
    // 448 entries), so 3000 writes fill it more than once.
    let (_, full) = tracker_reports_every_written_page(DirtyTracker::Ring { entries: 1024 });
    assert!(full > 0, "the small ring never filled");
}

#[test]
fn a_live_migration_tracked_by_the_dirty_ring() {
    if !ring_or_skip("a_live_migration_tracked_by_the_dirty_ring") {
        return;
    }
    let ring = DirtyTracker::Ring { entries: 1024 };
    let guest = KvmGuest::boot(
        &VmConfig {
            tracker: ring,
            ..config(32 * MIB, 2, 16 * MIB, WritePattern::Random)
        },
        Resources::none(true),
    )
    .unwrap();
    wait_for("source writes", || writes(guest.memory(), 2) > 200);
    let incoming = IncomingOptions {
        build_guest: KvmGuest::builder_with(ring),
        verify_switchover: Some(true),
        ..Default::default()
    };
    let (sent, got, _) = migrate_locally(
        &guest,
        incoming,
        &OutgoingOptions::default(),
        two_second_downtime(),
    );
    assert_eq!(sent.dirty_tracker.as_deref(), Some("kvm-ring"));
    assert_eq!(sent.switchover_digest, got.summary.switchover_digest);
    let before = writes(guest.memory(), 2);
    assert_clean(guest.memory(), 2);
    wait_for("the destination's counters advance", || {
        writes(&got.memory, 2) > before + 200
    });
    assert_clean(&got.memory, 2);
    eprintln!(
        "kvm-ring live: {} passes, {} ring-full exits on the source",
        sent.passes,
        guest.kvm_dirty_log().ring_full_exits()
    );
    got.guest.pause().unwrap();
}
