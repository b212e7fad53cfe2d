//! COLO over loopback: an ordinary live migration of the synthetic guest,
//! then the primary and the secondary run it in lockstep. Checks: the
//! secondary's memory equals the primary's at every checkpoint (digest
//! compared by the primary), the client's released outputs form one
//! history across a failover wherever one side dies, a forced failover,
//! poweroff, and a link cut.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry::colo::{
    forward_outputs, run_primary, run_secondary, secondary_builder, ColoControl, ColoOptions,
    ColoSummary, HistorySink, KillPoint, KillStage, LoadHook, OutputQueue, OutputSink,
};
use ferry::synthetic::{synthetic_memory, OutputHook};
use ferry::{
    migrate_in, migrate_out, DirtyPattern, Guest, IncomingOptions, OutgoingOptions, Progress,
    Resources, SyntheticConfig, SyntheticGuest, TrackerKind,
};
use ferry_colo::{ColoMode, FailoverReason, FailoverState, Record};

/// Every `EVERY`-th write of a vCPU emits a record.
const EVERY: u64 = 4;

/// The client: takes every released record, keeps the errors.
type Client = HistorySink;

/// A hook that keeps every record a guest produced, then queues it.
fn tee(into: Arc<Mutex<Vec<Record>>>) -> OutputHook {
    Arc::new(move |r| into.lock().unwrap().push(r))
}

struct Run {
    primary: ColoSummary,
    secondary: ColoSummary,
    client: Arc<Client>,
    made_by_primary: Vec<Record>,
    made_by_secondary: Vec<Record>,
}

struct Case {
    opts: ColoOptions,
    primary_kill: Option<KillPoint>,
    secondary_kill: Option<KillPoint>,
    jitter: u32,
    /// Forces a failover on this side after this long.
    force: Option<(ColoMode, Duration)>,
    /// How long the survivor runs alone before the test stops it.
    alone: Duration,
    /// zstd on the migration's and COLO's multifd channels.
    zstd: bool,
    /// TLS on every channel of both sessions.
    tls: bool,
}

/// Migrates a synthetic guest and runs COLO until both sides end.
fn colo(case: Case) -> Run {
    colo_with(case, None, None)
}

/// [`colo`] with a hook in the secondary's loads, made from its control.
fn colo_hooked(case: Case, hook: impl FnOnce(Arc<ColoControl>) -> LoadHook + 'static) -> Run {
    colo_with(case, None, Some(Box::new(hook)))
}

type MakeHook = Box<dyn FnOnce(Arc<ColoControl>) -> LoadHook>;

/// [`colo`], cutting the link (both sides' channels, no failover asked)
/// after a while when `cut` is given.
fn colo_with(case: Case, cut: Option<Duration>, hook: Option<MakeHook>) -> Run {
    let made_p = Arc::new(Mutex::new(Vec::new()));
    let made_s = Arc::new(Mutex::new(Vec::new()));
    let mem = synthetic_memory(8 * MIB, None, 3).unwrap();
    let guest = Arc::new(
        SyntheticGuest::start(
            mem,
            &SyntheticConfig {
                vcpus: 2,
                dirty_rate: 16 * MIB,
                pattern: DirtyPattern::Hotset(50),
                seed: 11,
                tracker: TrackerKind::Bitmap,
            },
            Resources::none(true),
        )
        .unwrap(),
    );
    let primary_out = OutputQueue::new();
    {
        let (q, t) = (primary_out.hook(), tee(made_p.clone()));
        guest.set_output(
            EVERY,
            Some(Arc::new(move |r| {
                t(r);
                q(r)
            })),
        );
    }
    guest.set_jitter(case.jitter);
    let client = Arc::new(Client::default());
    let certs = tempfile::tempdir().unwrap();
    let (l, uri) = if case.tls {
        ferry_transport::certs::generate(
            certs.path(),
            &ferry_transport::certs::CertRequest {
                hosts: vec!["localhost".into(), "127.0.0.1".into()],
                days: 30,
                expired: false,
            },
        )
        .unwrap();
        let l = ferry::Listener::bind(
            &"tcp:127.0.0.1:0".parse().unwrap(),
            ferry::SocketTuning::default(),
        )
        .unwrap()
        .with_tls(Arc::new(ferry::TlsServer::load(certs.path()).unwrap()));
        let uri = l.uri().clone();
        (l, uri)
    } else {
        listener()
    };
    let (builder, parts) = secondary_builder(EVERY, case.jitter, Some(tee(made_s.clone())));
    let incoming = IncomingOptions {
        colo: true,
        build_guest: builder,
        ..Default::default()
    };
    let pctl = ColoControl::new(case.opts.checkpoint_delay);
    let sctl = ColoControl::new(case.opts.checkpoint_delay);
    let secondary_opts = ColoOptions {
        test_during_load: hook.map(|h| h(sctl.clone())),
        ..case.opts.clone()
    };
    let secondary = {
        let (client, opts, sctl) = (client.clone(), secondary_opts, sctl.clone());
        let kill = case.secondary_kill;
        let alone = case.alone;
        std::thread::spawn(move || {
            let got = migrate_in(&l, &incoming, &Progress::default()).expect("migration in");
            let parts = parts.get().expect("the COLO builder ran");
            let opts = ColoOptions { kill, ..opts };
            let mut s = run_secondary(&*got.guest, parts, &l, &opts, &sctl, client.clone());
            survive(
                &*got.guest,
                &parts.outputs,
                &*client,
                s.guest_running,
                alone,
            );
            if s.last_loaded_state.is_empty() {
                // No checkpoint loaded: the secondary went on from the
                // state it migrated with.
                s.last_loaded_state = got.device_state.clone();
            }
            s
        })
    };
    let mut link = OutgoingOptions {
        colo: true,
        channels: 2,
        ..Default::default()
    };
    if case.zstd {
        link.sender.compress = Some(1);
    }
    if case.tls {
        link.tls = Some(Arc::new(
            ferry::TlsClient::load(certs.path(), None).unwrap(),
        ));
    }
    migrate_out(&*guest, &uri, &link, &Progress::default()).expect("migration out");
    if let Some(after) = cut {
        let (p, s) = (pctl.clone(), sctl.clone());
        std::thread::spawn(move || {
            std::thread::sleep(after);
            p.cut_link();
            s.cut_link();
        });
    }
    if let Some((side, after)) = case.force {
        let ctl = if side == ColoMode::Primary {
            pctl.clone()
        } else {
            sctl.clone()
        };
        std::thread::spawn(move || {
            std::thread::sleep(after);
            assert!(ctl.failover(), "failover refused while COLO runs");
        });
    }
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
    survive(&*guest, &primary_out, &*client, p.guest_running, case.alone);
    let s = secondary.join().expect("secondary thread");
    let made_by_primary = made_p.lock().unwrap().clone();
    let made_by_secondary = made_s.lock().unwrap().clone();
    Run {
        primary: p,
        secondary: s,
        client,
        made_by_primary,
        made_by_secondary,
    }
}

/// The survivor runs alone for `alone`, its outputs going to the client.
fn survive(
    guest: &dyn Guest,
    outputs: &OutputQueue,
    client: &dyn OutputSink,
    running: bool,
    alone: Duration,
) {
    if !running {
        return;
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| forward_outputs(outputs, client, &stop));
        std::thread::sleep(alone);
        guest.pause().unwrap();
        stop.store(true, Ordering::SeqCst);
    });
}

fn vcpu_bases(state: &[u8]) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_slice(state).unwrap();
    v["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["writes"].as_u64().unwrap() / EVERY)
        .collect()
}

/// The property: the client's history has no gap, repeat (that is not
/// the same record again) or contradiction; the survivor continued it
/// (its last records are the client's last); and every released record
/// after the survivor's last checkpoint is one it produced (a secondary
/// survivor took every earlier one over with that checkpoint's state).
fn check_history(run: &Run, label: &str) {
    let errors = run.client.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{label}: the client saw {} errors, the first {:?}",
        errors.len(),
        &errors[..errors.len().min(4)]
    );
    let h = run.client.history.lock().unwrap();
    assert!(!h.is_empty(), "{label}: nothing released");
    let (survivor, made, bases) = if run.primary.guest_running {
        assert!(!run.secondary.guest_running, "{label}: two survivors");
        ("primary", &run.made_by_primary, vec![0, 0])
    } else {
        assert!(run.secondary.guest_running, "{label}: no survivor");
        let bases = vcpu_bases(&run.secondary.last_loaded_state);
        ("secondary", &run.made_by_secondary, bases)
    };
    // The survivor's last record of each vCPU, in the order it made them
    // (a checkpoint may have rolled it back below records it made before).
    let last_made = |vcpu: u16| made.iter().rev().find(|r| r.vcpu == vcpu).map(|r| r.seq);
    // Later copies of a number (made again after a roll-back) win.
    let made: std::collections::HashMap<(u16, u64), u64> =
        made.iter().map(|r| ((r.vcpu, r.seq), r.value)).collect();
    for (vcpu, (first, last)) in h.ranges() {
        for seq in first.max(bases[vcpu as usize] + 1)..=last {
            let v = h.value(vcpu, seq).unwrap();
            assert_eq!(
                made.get(&(vcpu, seq)),
                Some(&v),
                "{label}: vCPU {vcpu} record {seq} released to the client was not produced by \
                 the survivor ({survivor})"
            );
        }
        let survivor_last = last_made(vcpu).unwrap();
        assert_eq!(
            last, survivor_last,
            "{label}: the client's history of vCPU {vcpu} ends at {last}, the survivor's at \
             {survivor_last} ({survivor})"
        );
    }
}

fn quick() -> ColoOptions {
    ColoOptions {
        checkpoint_delay: Duration::from_millis(30),
        heartbeat_timeout: Duration::from_millis(300),
        setup_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

#[test]
fn secondary_memory_equals_the_primary_at_every_checkpoint() {
    let run = within(120, || {
        colo(Case {
            opts: ColoOptions {
                verify: true,
                max_checkpoints: Some(25),
                ..quick()
            },
            primary_kill: None,
            secondary_kill: None,
            // Diverging guests: mismatches trigger checkpoints too.
            jitter: 3000,
            force: None,
            alone: Duration::ZERO,
            zstd: false,
            tls: false,
        })
    });
    // A digest that differs ends COLO with a failover, not a poweroff.
    assert_eq!(
        (run.primary.end, run.secondary.end),
        ("poweroff", "poweroff"),
        "{:?} / {:?}",
        run.primary.status,
        run.secondary.status
    );
    assert_eq!(run.primary.checkpoints, 25);
    assert_eq!(run.secondary.checkpoints, 25);
    assert!(run.primary.pages_per_checkpoint_mean > 0);
    assert!(
        run.primary.compare.compared > 0,
        "{:?}",
        run.primary.compare
    );
    let t = run.primary.by_trigger;
    assert_eq!(t.periodic + t.request + t.mismatch, 25);
    assert!(run.client.errors.lock().unwrap().is_empty());
    assert_eq!(
        run.primary.released,
        run.client.history.lock().unwrap().len()
    );
}

fn kill_point(seed: u64, i: u64) -> KillPoint {
    let x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = x ^ (x >> 29);
    let checkpoint = 1 + x % 4;
    let stage = match (x >> 8) % 5 {
        0 => KillStage::Running(Duration::from_millis(20 + (x >> 16) % 300)),
        1 => KillStage::AfterRequest,
        2 => KillStage::MidCheckpoint,
        3 => KillStage::AfterReceived,
        // A hung host: found by the peer's heartbeat timeout.
        _ => KillStage::Silent(Duration::from_millis(20 + (x >> 16) % 300)),
    };
    KillPoint { checkpoint, stage }
}

/// How many kills of each side the suite runs (COLO_KILLS overrides).
fn kills() -> u64 {
    std::env::var("COLO_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn kill_runs(side: ColoMode) {
    for i in 0..kills() {
        let k = kill_point(if side == ColoMode::Primary { 1 } else { 2 }, i);
        let label = format!("{side:?} killed at {k:?}");
        let run = within(120, move || {
            colo(Case {
                opts: quick(),
                primary_kill: (side == ColoMode::Primary).then_some(k),
                secondary_kill: (side == ColoMode::Secondary).then_some(k),
                // Often diverging: outputs are held at most checkpoints.
                jitter: 30_000,
                force: None,
                alone: Duration::from_millis(150),
                zstd: false,
                tls: false,
            })
        });
        let (dead, alive) = match side {
            ColoMode::Primary => (&run.primary, &run.secondary),
            _ => (&run.secondary, &run.primary),
        };
        assert_eq!(dead.end, "killed", "{label}");
        assert_eq!(alive.end, "failover", "{label}: {:?}", alive.status);
        assert!(alive.guest_running, "{label}");
        assert_eq!(alive.status.reason, FailoverReason::Error, "{label}");
        assert_eq!(alive.status.failover, FailoverState::Completed, "{label}");
        // In COLO a silent peer is found by --heartbeat-timeout, and the
        // reason says so.
        let why = alive.status.error.as_deref().unwrap_or("");
        assert!(!why.contains("--peer-timeout"), "{label}: {why}");
        if matches!(k.stage, KillStage::Silent(_)) && why.contains("timeout") {
            assert!(why.contains("--heartbeat-timeout"), "{label}: {why}");
        }
        check_history(&run, &label);
        eprintln!(
            "{label}: survivor went alone after {:.3} ms, {} records in the history, {} \
             checkpoints, primary compare {:?}",
            alive.failover_ms.unwrap(),
            run.client.history.lock().unwrap().len(),
            run.primary.checkpoints,
            run.primary.compare,
        );
    }
}

#[test]
fn history_holds_when_the_primary_dies_anywhere() {
    kill_runs(ColoMode::Primary);
}

#[test]
fn history_holds_when_the_secondary_dies_anywhere() {
    kill_runs(ColoMode::Secondary);
}

#[test]
fn a_requested_failover_ends_colo_on_both_sides_with_one_survivor() {
    for side in [ColoMode::Primary, ColoMode::Secondary] {
        let run = within(120, move || {
            colo(Case {
                opts: quick(),
                primary_kill: None,
                secondary_kill: None,
                jitter: 0,
                force: Some((side, Duration::from_millis(300))),
                alone: Duration::from_millis(100),
                zstd: false,
                tls: false,
            })
        });
        let (asked, other) = match side {
            ColoMode::Primary => (&run.primary, &run.secondary),
            _ => (&run.secondary, &run.primary),
        };
        assert_eq!(asked.status.reason, FailoverReason::Request, "{side:?}");
        assert_eq!(asked.status.last_mode, side);
        assert_eq!(asked.status.mode, ColoMode::None);
        assert_eq!(other.status.reason, FailoverReason::Error, "{side:?}");
        // Both took over (a split brain a real deployment fences); the
        // point here is that neither side hangs and both say why.
        assert!(asked.guest_running && other.guest_running);
    }
}

#[test]
fn a_cut_link_ends_colo_on_both_sides_with_a_reason_and_survivors_run() {
    let run = within(120, || {
        colo_with(
            Case {
                opts: quick(),
                primary_kill: None,
                secondary_kill: None,
                jitter: 0,
                force: None,
                alone: Duration::from_millis(50),
                zstd: false,
                tls: false,
            },
            Some(Duration::from_millis(300)),
            None,
        )
    });
    for s in [&run.primary, &run.secondary] {
        assert_eq!(s.end, "failover", "{s:?}");
        assert_eq!(s.status.reason, FailoverReason::Error);
        assert!(
            s.status.error.is_some(),
            "a reason is given: {:?}",
            s.status
        );
        assert!(s.guest_running);
    }
}

/// A failover asked for while the secondary loads a checkpoint waits for
/// the load (RELAUNCH) and then completes; a failed load ends in a
/// failover too, never a secondary stuck paused.
#[test]
fn a_failover_during_a_load_completes_after_it_and_after_a_failed_load() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let run = {
        let seen = seen.clone();
        within(120, move || {
            colo_hooked(
                Case {
                    opts: quick(),
                    primary_kill: None,
                    secondary_kill: None,
                    jitter: 0,
                    force: None,
                    alone: Duration::from_millis(50),
                    zstd: false,
                    tls: false,
                },
                // At checkpoint 2's load, ask the secondary to fail over.
                move |sctl: Arc<ColoControl>| {
                    let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
                    LoadHook(Arc::new(move || {
                        if n.fetch_add(1, Ordering::SeqCst) == 1 {
                            assert!(sctl.failover());
                            seen.lock().unwrap().push(sctl.query().failover);
                        }
                    }))
                },
            )
        })
    };
    assert_eq!(
        *seen.lock().unwrap(),
        vec![FailoverState::Relaunch],
        "asked during a load, the failover waits (RELAUNCH)"
    );
    assert_eq!(
        run.secondary.checkpoints, 2,
        "the load in progress completed"
    );
    let s = &run.secondary;
    assert_eq!(s.end, "failover");
    assert_eq!(s.status.reason, FailoverReason::Request);
    assert_eq!(s.status.failover, FailoverState::Completed);
    assert!(s.guest_running, "the secondary runs after the relaunch");
    assert!(
        !s.last_loaded_state.is_empty(),
        "the load in progress completed before the failover"
    );

    let run = within(120, || {
        colo(Case {
            opts: ColoOptions {
                test_load_error_at: Some(2),
                ..quick()
            },
            primary_kill: None,
            secondary_kill: None,
            jitter: 0,
            force: None,
            alone: Duration::from_millis(50),
            zstd: false,
            tls: false,
        })
    });
    let s = &run.secondary;
    assert_eq!(s.end, "failover");
    assert_eq!(s.status.reason, FailoverReason::Error);
    let e = s.status.error.as_deref().unwrap_or("");
    assert!(e.contains("checkpoint 2: load failed"), "{e}");
    assert!(
        s.guest_running,
        "a failed load ends in a failover, not a stuck secondary"
    );
}

#[test]
fn compressed_channels_keep_the_secondary_equal_at_every_checkpoint() {
    let run = within(120, || {
        colo(Case {
            opts: ColoOptions {
                verify: true,
                max_checkpoints: Some(10),
                ..quick()
            },
            primary_kill: None,
            secondary_kill: None,
            jitter: 0,
            force: None,
            alone: Duration::ZERO,
            zstd: true,
            tls: false,
        })
    });
    assert_eq!(
        (run.primary.end, run.secondary.end),
        ("poweroff", "poweroff")
    );
    assert_eq!(run.secondary.checkpoints, 10);
}

/// SETUP's COLO bit: each side refuses the other without `--colo`, at
/// setup, saying what to do; the source's guest runs on.
#[test]
fn colo_is_announced_and_both_sides_must_agree() {
    within(60, || {
        for (send_colo, recv_colo, says) in [
            (true, false, "start this receiver with --colo"),
            (false, true, "start the source with --colo"),
        ] {
            let guest = synthetic(2, 4 * MIB, DirtyPattern::Random, TrackerKind::Bitmap);
            let (l, uri) = listener();
            let dst = spawn_destination(
                l,
                IncomingOptions {
                    colo: recv_colo,
                    ..Default::default()
                },
            );
            let link = OutgoingOptions {
                colo: send_colo,
                ..Default::default()
            };
            let e = migrate_out(&guest, &uri, &link, &Progress::default())
                .expect_err("refused")
                .error
                .to_string();
            assert!(e.contains(says), "{e}");
            assert!(guest.is_running(), "the source guest runs on");
            assert!(dst.join().unwrap().is_err());
        }
    });
}

#[test]
fn tls_channels_keep_the_secondary_equal_at_every_checkpoint() {
    let run = within(120, || {
        colo(Case {
            opts: ColoOptions {
                verify: true,
                max_checkpoints: Some(10),
                ..quick()
            },
            primary_kill: None,
            secondary_kill: None,
            jitter: 0,
            force: None,
            alone: Duration::ZERO,
            zstd: false,
            tls: true,
        })
    });
    assert_eq!(
        (run.primary.end, run.secondary.end),
        ("poweroff", "poweroff")
    );
    assert_eq!(run.secondary.checkpoints, 10);
}

#[test]
fn a_silent_or_stalled_peer_in_colo_names_the_heartbeat_timeout() {
    use ferry::colo::ColoRunError;
    use ferry::MigrationError;
    for e in [
        MigrationError::PeerSilent {
            peer: "secondary",
            channel: "main".into(),
            secs: 1.0,
        },
        MigrationError::PeerStalled {
            what: "a COLO message".into(),
            channel: "main",
            secs: 1.0,
        },
        MigrationError::Multifd(ferry_multifd::MultifdError::Stalled {
            channel: "multifd channel 0".into(),
            secs: 1.0,
        }),
    ] {
        let plain = e.to_string();
        assert!(plain.contains("(--peer-timeout)"), "{plain}");
        let colo = ColoRunError::from(e).to_string();
        assert!(colo.contains("(--heartbeat-timeout)"), "{colo}");
        assert!(!colo.contains("--peer-timeout"), "{colo}");
        assert_eq!(colo.replace("heartbeat", "peer"), plain);
    }
}
