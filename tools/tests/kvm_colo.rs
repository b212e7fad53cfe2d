//! COLO with the KVM micro-VM (issue #15 item 5): the library's primary
//! and secondary over loopback with a 32 MiB, 2-vCPU KVM guest whose
//! output records come from its port (vmm/src/port.rs), and `ferry send
//! --guest kvm --colo` / `ferry recv --colo` between two processes.
//! Checks: the secondary's memory equals the primary's at every checkpoint
//! and the two copies emit the same records (no mismatch: a KVM guest's
//! records follow its state only); across a failover (either side killed
//! at several points, a hung side among them) the client's released
//! records form one history the survivor continues, and the survivor's
//! self-check stays clean while its counters advance; the CLI's summary.
//! Tests skip, saying so, where /dev/kvm is not usable.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::colo::{
    forward_outputs, run_primary, run_secondary, secondary_builder_with, ColoControl,
    ColoGuestKind, ColoOptions, ColoSummary, HistorySink, KillPoint, KillStage, LoadHook,
    OutputQueue, OutputSink,
};
use ferry::synthetic::OutputHook;
use ferry::{migrate_in, migrate_out, Guest, IncomingOptions, OutgoingOptions, Progress};
use ferry_colo::{ColoMode, FailoverReason, FailoverState, Record};
use ferry_vmm::{vcpu_status, DirtyTracker, KvmGuest, SharedKvmGuest, VmConfig, WritePattern};
use serde_json::Value;
use support::{ctl, start_recv, Proc};

const MIB: u64 = 1 << 20;
/// Every `EVERY`-th page write of a vCPU emits a record.
const EVERY: u64 = 4;
const VCPUS: usize = 2;

fn kvm_or_skip(test: &str) -> bool {
    match ferry_vmm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: SKIPPED: {why}");
            false
        }
    }
}

fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

/// The client: takes every released record, keeps the errors.
type Client = HistorySink;

fn tee(into: Arc<Mutex<Vec<Record>>>) -> OutputHook {
    Arc::new(move |r| into.lock().unwrap().push(r))
}

/// Each vCPU's page writes as `memory` holds them.
fn writes(memory: &ferry::GuestMemory) -> Vec<u64> {
    (0..VCPUS)
        .map(|i| vcpu_status(memory, i).unwrap().writes)
        .collect()
}

/// Self-check failures over all vCPUs, and the first failing address.
fn errors(memory: &ferry::GuestMemory) -> (u64, u64) {
    let s: Vec<_> = (0..VCPUS)
        .map(|i| vcpu_status(memory, i).unwrap())
        .collect();
    (
        s.iter().map(|v| v.errors).sum(),
        s.iter()
            .map(|v| v.first_error)
            .find(|&a| a != 0)
            .unwrap_or(0),
    )
}

struct Case {
    opts: ColoOptions,
    primary_kill: Option<KillPoint>,
    secondary_kill: Option<KillPoint>,
    alone: Duration,
}

/// One side's end: its summary, the records its guest made, and its
/// guest's counters when COLO ended and after it ran alone.
struct Side {
    summary: ColoSummary,
    made: Vec<Record>,
    writes_at_end: Vec<u64>,
    writes_after: Vec<u64>,
    errors: (u64, u64),
    failure: Option<String>,
    /// Each vCPU's record number when the last checkpoint was loaded
    /// (secondary; the migration's for none): later records are its own.
    bases: Vec<u64>,
}

struct Run {
    primary: Side,
    secondary: Side,
    client: Arc<Client>,
}

/// The survivor runs alone for `alone`, its outputs going to the client;
/// then it is paused.
fn survive(guest: &dyn Guest, outputs: &OutputQueue, client: &dyn OutputSink, alone: Duration) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| forward_outputs(outputs, client, &stop));
        std::thread::sleep(alone);
        guest.pause().unwrap();
        stop.store(true, Ordering::SeqCst);
    });
}

/// Boots a KVM guest, migrates it, then runs COLO until both sides end.
fn kvm_colo(case: Case) -> Run {
    let made_p = Arc::new(Mutex::new(Vec::new()));
    let made_s = Arc::new(Mutex::new(Vec::new()));
    let guest = Arc::new(
        KvmGuest::boot_with_output(
            &VmConfig {
                memory: 32 * MIB,
                vcpus: VCPUS,
                dirty_rate: 8 * MIB,
                pattern: WritePattern::Hotset(50),
                seed: 11,
                tracker: DirtyTracker::default(),
            },
            EVERY,
            ferry::Resources::none(true),
        )
        .unwrap(),
    );
    guest.wait_booted(Duration::from_secs(30)).unwrap();
    let primary_out = OutputQueue::new();
    {
        let (q, t) = (primary_out.hook(), tee(made_p.clone()));
        guest.set_output(Some(Arc::new(move |r| {
            t(r);
            q(r)
        })));
    }
    let client = Arc::new(Client::default());
    let l = ferry::Listener::bind(
        &"tcp:127.0.0.1:0".parse().unwrap(),
        ferry::SocketTuning::default(),
    )
    .unwrap();
    let uri = l.uri().clone();
    // The secondary's KVM guest, kept here to read its failure.
    let built: Arc<Mutex<Option<Arc<KvmGuest>>>> = Arc::default();
    let kind: ColoGuestKind = {
        let built = built.clone();
        Arc::new(move |memory, state, _every, hook| {
            if !ferry_vmm::is_kvm_state(state) {
                return None;
            }
            Some(
                KvmGuest::colo_secondary(
                    memory,
                    state,
                    hook,
                    ferry::Resources::none(false),
                    DirtyTracker::default(),
                )
                .map(|g| {
                    let g = Arc::new(g);
                    *built.lock().unwrap() = Some(g.clone());
                    Box::new(SharedKvmGuest(g)) as Box<dyn Guest>
                })
                .map_err(ferry::GuestError::from),
            )
        })
    };
    let (builder, parts) = secondary_builder_with(EVERY, 0, Some(tee(made_s.clone())), Some(kind));
    let incoming = IncomingOptions {
        colo: true,
        build_guest: builder,
        ..Default::default()
    };
    let pctl = ColoControl::new(case.opts.checkpoint_delay);
    let sctl = ColoControl::new(case.opts.checkpoint_delay);
    let secondary = {
        let (client, opts, sctl, made_s) = (
            client.clone(),
            case.opts.clone(),
            sctl.clone(),
            made_s.clone(),
        );
        let (kill, alone) = (case.secondary_kill, case.alone);
        std::thread::spawn(move || {
            let got = migrate_in(&l, &incoming, &Progress::default()).expect("migration in");
            let parts = parts.get().expect("the COLO builder ran");
            let memory = got.guest.memory().clone();
            // The records the secondary took over with each checkpoint:
            // its memory is the primary's during the load.
            let bases = Arc::new(Mutex::new(
                writes(&memory)
                    .iter()
                    .map(|w| w / EVERY)
                    .collect::<Vec<u64>>(),
            ));
            let hook = {
                let (bases, memory) = (bases.clone(), memory.clone());
                LoadHook(Arc::new(move || {
                    *bases.lock().unwrap() = writes(&memory).iter().map(|w| w / EVERY).collect();
                }))
            };
            let opts = ColoOptions {
                kill,
                test_during_load: Some(hook),
                ..opts
            };
            let s = run_secondary(&*got.guest, parts, &l, &opts, &sctl, client.clone());
            let writes_at_end = writes(&memory);
            if s.guest_running {
                survive(&*got.guest, &parts.outputs, &*client, alone);
            }
            let g = built
                .lock()
                .unwrap()
                .clone()
                .expect("a KVM guest was built");
            let bases = bases.lock().unwrap().clone();
            Side {
                writes_after: writes(&memory),
                errors: errors(&memory),
                failure: g.vm().failure(),
                summary: s,
                made: made_s.lock().unwrap().clone(),
                writes_at_end,
                bases,
            }
        })
    };
    let link = OutgoingOptions {
        colo: true,
        channels: 2,
        ..Default::default()
    };
    migrate_out(&*guest, &uri, &link, &Progress::default()).expect("migration out");
    let opts = ColoOptions {
        kill: case.primary_kill,
        ..case.opts
    };
    let p = run_primary(
        &*guest,
        &primary_out,
        &uri,
        &link,
        &opts,
        &pctl,
        client.clone(),
    );
    let memory = guest.memory().clone();
    let writes_at_end = writes(&memory);
    if p.guest_running {
        survive(&*guest, &primary_out, &*client, case.alone);
    }
    let primary = Side {
        writes_after: writes(&memory),
        errors: errors(&memory),
        failure: guest.vm().failure(),
        summary: p,
        made: made_p.lock().unwrap().clone(),
        writes_at_end,
        bases: vec![0; VCPUS],
    };
    let secondary = secondary.join().expect("secondary thread");
    Run {
        primary,
        secondary,
        client,
    }
}

/// The guest's output stream itself (vmm/src/port.rs): each vCPU's
/// records are numbered from 1 without a gap, and two VMs started from
/// the same saved state emit the same records although one runs
/// throttled (its timing differs): the values follow the state only.
#[test]
fn kvm_guest_records_follow_its_state_not_its_timing() {
    if !kvm_or_skip("kvm_guest_records_follow_its_state_not_its_timing") {
        return;
    }
    within(300, || {
        let config = VmConfig {
            memory: 32 * MIB,
            vcpus: VCPUS,
            dirty_rate: 8 * MIB,
            pattern: WritePattern::Random,
            seed: 5,
            tracker: DirtyTracker::default(),
        };
        let a = KvmGuest::boot_with_output(&config, EVERY, ferry::Resources::none(true)).unwrap();
        let from_a = Arc::new(Mutex::new(Vec::new()));
        a.set_output(Some(tee(from_a.clone())));
        a.wait_booted(Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        a.pause().unwrap();
        let state = a.save_device_state().unwrap();
        let made = from_a.lock().unwrap().clone();
        assert!(!made.is_empty(), "no record in 400 ms");
        for v in 0..VCPUS as u16 {
            let seqs: Vec<u64> = made.iter().filter(|r| r.vcpu == v).map(|r| r.seq).collect();
            let want: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, want, "vCPU {v}'s record numbers");
        }
        // Two copies of the paused guest, one of them throttled.
        let copies: Vec<_> = (0..2)
            .map(|i| {
                let cache = ferry_colo::RamCache::copy_of(a.memory()).unwrap();
                let g = KvmGuest::from_state(
                    cache.memory().clone(),
                    &state,
                    ferry::Resources::none(false),
                )
                .unwrap();
                let got = Arc::new(Mutex::new(Vec::new()));
                g.set_output(Some(tee(got.clone())));
                if i == 1 {
                    g.set_throttle(60);
                }
                g.resume().unwrap();
                (g, got)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        let mut compared = 0;
        let runs: Vec<Vec<Record>> = copies
            .iter()
            .map(|(g, got)| {
                g.pause().unwrap();
                assert_eq!(g.vm().failure(), None);
                got.lock().unwrap().clone()
            })
            .collect();
        for v in 0..VCPUS as u16 {
            let of = |run: &Vec<Record>| -> Vec<(u64, u64)> {
                run.iter()
                    .filter(|r| r.vcpu == v)
                    .map(|r| (r.seq, r.value))
                    .collect()
            };
            let (x, y) = (of(&runs[0]), of(&runs[1]));
            let n = x.len().min(y.len());
            assert!(n > 0, "vCPU {v}: no records from both copies");
            assert_eq!(x[..n], y[..n], "vCPU {v}: the copies' records differ");
            // They go on from the saved guest's numbering.
            let before = made.iter().filter(|r| r.vcpu == v).count() as u64;
            assert_eq!(x[0].0, before + 1, "vCPU {v}");
            compared += n;
        }
        assert!(compared > 0);
    });
}

fn quick() -> ColoOptions {
    ColoOptions {
        checkpoint_delay: Duration::from_millis(40),
        heartbeat_timeout: Duration::from_millis(400),
        setup_timeout: Duration::from_secs(30),
        output_every: EVERY,
        ..Default::default()
    }
}

#[test]
fn kvm_secondary_memory_equals_the_primary_at_every_checkpoint() {
    if !kvm_or_skip("kvm_secondary_memory_equals_the_primary_at_every_checkpoint") {
        return;
    }
    let run = within(300, || {
        kvm_colo(Case {
            opts: ColoOptions {
                verify: true,
                max_checkpoints: Some(12),
                ..quick()
            },
            primary_kill: None,
            secondary_kill: None,
            alone: Duration::ZERO,
        })
    });
    let (p, s) = (&run.primary.summary, &run.secondary.summary);
    // A digest that differs ends COLO with a failover, not a poweroff.
    assert_eq!(
        (p.end, s.end),
        ("poweroff", "poweroff"),
        "{:?} / {:?}",
        p.status,
        s.status
    );
    assert_eq!((p.checkpoints, s.checkpoints), (12, 12));
    assert!(p.pages_per_checkpoint_mean > 0, "{p:?}");
    // Both copies emitted the same records: a KVM guest's records follow
    // its state, not the host's timing.
    assert!(p.compare.compared > 0, "{:?}", p.compare);
    assert_eq!(p.compare.mismatches, 0, "{:?}", p.compare);
    assert_eq!(p.by_trigger.mismatch, 0, "{:?}", p.by_trigger);
    assert!(run.client.errors.lock().unwrap().is_empty());
    assert_eq!(p.released, run.client.history.lock().unwrap().len());
    for side in [&run.primary, &run.secondary] {
        assert_eq!(
            side.errors.0, 0,
            "self-check failed at {:#x}",
            side.errors.1
        );
        assert_eq!(side.failure, None);
    }
}

/// The property across a failover: the client's history has no gap or
/// contradiction, the survivor continued it (its last records are the
/// client's last), every released record after the survivor's last
/// checkpoint is one it produced; and the survivor's self-check is clean
/// and its vCPUs wrote on alone.
fn check_failover(run: &Run, dead_side: ColoMode, label: &str) {
    let (dead, alive) = match dead_side {
        ColoMode::Primary => (&run.primary, &run.secondary),
        _ => (&run.secondary, &run.primary),
    };
    assert_eq!(dead.summary.end, "killed", "{label}");
    assert!(!dead.summary.guest_running, "{label}");
    assert_eq!(
        alive.summary.end, "failover",
        "{label}: {:?}",
        alive.summary.status
    );
    assert!(alive.summary.guest_running, "{label}");
    assert_eq!(
        alive.summary.status.reason,
        FailoverReason::Error,
        "{label}"
    );
    assert_eq!(
        alive.summary.status.failover,
        FailoverState::Completed,
        "{label}"
    );
    let errors = run.client.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{label}: the client saw {} errors, the first {:?}",
        errors.len(),
        &errors[..errors.len().min(4)]
    );
    let h = run.client.history.lock().unwrap();
    assert!(!h.is_empty(), "{label}: nothing released");
    let last_made = |vcpu: u16| {
        alive
            .made
            .iter()
            .rev()
            .find(|r| r.vcpu == vcpu)
            .map(|r| r.seq)
    };
    let made: std::collections::HashMap<(u16, u64), u64> = alive
        .made
        .iter()
        .map(|r| ((r.vcpu, r.seq), r.value))
        .collect();
    for (vcpu, (first, last)) in h.ranges() {
        for seq in first.max(alive.bases[vcpu as usize] + 1)..=last {
            assert_eq!(
                made.get(&(vcpu, seq)),
                h.value(vcpu, seq).as_ref(),
                "{label}: vCPU {vcpu} record {seq} released to the client was not produced by \
                 the survivor"
            );
        }
        assert_eq!(
            Some(last),
            last_made(vcpu),
            "{label}: the client's history of vCPU {vcpu} does not end where the survivor's does"
        );
    }
    assert_eq!(
        alive.errors.0, 0,
        "{label}: the survivor's self-check failed at {:#x}",
        alive.errors.1
    );
    assert_eq!(alive.failure, None, "{label}");
    for (v, (a, b)) in alive
        .writes_at_end
        .iter()
        .zip(&alive.writes_after)
        .enumerate()
    {
        assert!(b > a, "{label}: vCPU {v} wrote nothing alone ({a} -> {b})");
    }
}

fn kill_runs(side: ColoMode) {
    let points = [
        KillPoint {
            checkpoint: 1,
            stage: KillStage::Running(Duration::from_millis(150)),
        },
        KillPoint {
            checkpoint: 2,
            stage: KillStage::AfterRequest,
        },
        KillPoint {
            checkpoint: 2,
            stage: KillStage::MidCheckpoint,
        },
        KillPoint {
            checkpoint: 3,
            stage: KillStage::AfterReceived,
        },
        // A hung host: only the peer's heartbeat timeout finds it.
        KillPoint {
            checkpoint: 1,
            stage: KillStage::Silent(Duration::from_millis(250)),
        },
    ];
    for k in points {
        let label = format!("{side:?} killed at {k:?}");
        let run = within(300, move || {
            kvm_colo(Case {
                opts: quick(),
                primary_kill: (side == ColoMode::Primary).then_some(k),
                secondary_kill: (side == ColoMode::Secondary).then_some(k),
                alone: Duration::from_millis(300),
            })
        });
        check_failover(&run, side, &label);
    }
}

#[test]
fn kvm_history_holds_when_the_primary_dies() {
    if !kvm_or_skip("kvm_history_holds_when_the_primary_dies") {
        return;
    }
    kill_runs(ColoMode::Primary);
}

#[test]
fn kvm_history_holds_when_the_secondary_dies() {
    if !kvm_or_skip("kvm_history_holds_when_the_secondary_dies") {
        return;
    }
    kill_runs(ColoMode::Secondary);
}

const DEADLINE: Duration = Duration::from_secs(120);

/// Polls query-colo-status on `sock` until `want` holds.
fn colo_status(sock: &std::path::Path, want: impl Fn(&Value) -> bool) -> Value {
    support::colo_status(sock, DEADLINE, want)
}

#[test]
fn cli_send_guest_kvm_colo_checkpoints_and_fails_over() {
    if !kvm_or_skip("cli_send_guest_kvm_colo_checkpoints_and_fails_over") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ssock, rsock) = (dir.path().join("s.sock"), dir.path().join("r.sock"));
    let out = dir.path().join("out.txt");
    let (recv, port) = start_recv(&[
        "--colo",
        "--colo-output-every",
        "8",
        "--colo-alone",
        "0.5",
        "--run-after",
        "0.1",
        "--control",
        rsock.to_str().unwrap(),
    ]);
    let to = format!("tcp:127.0.0.1:{port}");
    let send = Proc::spawn(&[
        "send",
        "--guest",
        "kvm",
        "--size",
        "32M",
        "--vcpus",
        "2",
        "--dirty-rate",
        "8M",
        "--to",
        &to,
        "--json",
        "--colo",
        // An hour: only requests make checkpoints until the delay changes.
        "--checkpoint-delay",
        "3600000",
        "--colo-output",
        out.to_str().unwrap(),
        "--colo-output-every",
        "8",
        "--colo-alone",
        "0.5",
        "--control",
        ssock.to_str().unwrap(),
    ]);
    colo_status(&ssock, |r| r["status"]["mode"] == "primary");
    colo_status(&rsock, |r| r["status"]["mode"] == "secondary");
    assert_eq!(ctl(&ssock, &["checkpoint"]).0, Some(0));
    colo_status(&ssock, |r| r["live"]["checkpoints"] == 1);
    colo_status(&rsock, |r| r["live"]["checkpoints"] == 1);
    let (code, v) = ctl(&ssock, &["set", "checkpoint-delay=20"]);
    assert_eq!(code, Some(0), "{v}");
    colo_status(&rsock, |r| r["live"]["checkpoints"].as_u64() >= Some(4));
    // The secondary takes over; the primary, its secondary lost, too.
    let (code, v) = ctl(&rsock, &["failover"]);
    assert_eq!(code, Some(0), "{v}");
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let (sv, rv) = (s.completed(), r.completed());
    let st = &rv["colo"]["status"];
    assert_eq!(
        (
            st["reason"].as_str(),
            st["last_mode"].as_str(),
            st["failover"].as_str()
        ),
        (Some("request"), Some("secondary"), Some("completed")),
        "{rv}"
    );
    assert_eq!(rv["colo"]["end"], "failover", "{rv}");
    assert!(rv["colo"]["checkpoints"].as_u64() >= Some(4), "{rv}");
    // The secondary's KVM guest ran on: self-check clean, vCPUs wrote.
    let w = &rv["workload"];
    assert_eq!(w["self_check_errors"], 0, "{rv}");
    assert_eq!(w["continued"], true, "{rv}");
    assert!(w["guest_failure"].is_null(), "{rv}");
    let c = &sv["colo"];
    assert_eq!(c["end"], "failover", "{sv}");
    assert_eq!(c["by_trigger"]["request"], 1, "{c}");
    assert!(c["checkpoints"].as_u64() >= Some(4), "{c}");
    assert!(c["pause"]["p99_ms"].as_f64() > Some(0.0), "{c}");
    assert!(c["bytes_per_checkpoint_mean"].as_u64() > Some(0), "{c}");
    assert!(c["compare"]["compared"].as_u64() > Some(0), "{c}");
    assert_eq!(c["compare"]["mismatches"], 0, "{c}");
    // The client's file: at least what COLO released (the survivor's own
    // records after it), numbered on per vCPU without a gap or repeat.
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.lines().count() as u64 >= c["released"].as_u64().unwrap(),
        "{c}"
    );
    let mut last = std::collections::BTreeMap::<u64, u64>::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (vcpu, seq): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        if let Some(prev) = last.insert(vcpu, seq) {
            assert_eq!(seq, prev + 1, "vCPU {vcpu}: record {seq} after {prev}");
        }
    }
    assert_eq!(last.len(), 2, "records of both vCPUs: {last:?}");
}

#[test]
fn colo_jitter_with_guest_kvm_is_a_usage_error() {
    let d = support::run(&[
        "send",
        "--guest",
        "kvm",
        "--size",
        "32M",
        "--to",
        "tcp:127.0.0.1:9",
        "--colo",
        "--colo-jitter",
        "100",
    ]);
    assert_eq!(d.code(), Some(2), "{}", d.stderr);
    support::assert_contains(
        &d.stderr,
        &["--colo-jitter only applies to a synthetic guest", "KVM"],
    );
}
