//! Postcopy end to end over loopback: a synthetic guest writing fast is
//! switched to postcopy (each trigger), the destination runs it while its
//! missing pages are asked for and pushed, and the replay check holds:
//! the destination's memory equals the source's at the switch with the
//! destination's own writes replayed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry::{
    migrate_out, replay_check, DirtyPattern, Guest, IncomingOptions, Listener, OutgoingOptions,
    Parameters, Progress, SocketTuning, Status, Summary, SyntheticGuest, TlsClient, TlsServer,
    TrackerKind,
};
use ferry_transport::certs::{generate, CertRequest};

fn postcopy_opts(after: u64) -> OutgoingOptions {
    OutgoingOptions {
        postcopy_after: Some(after),
        ..postcopy_uncounted()
    }
}

/// Postcopy with no pass count: it switches on request, or by itself.
fn postcopy_uncounted() -> OutgoingOptions {
    OutgoingOptions {
        postcopy: true,
        ..OutgoingOptions::default()
    }
}

/// Checks a completed postcopy: both summaries, then lets the destination
/// guest run a moment, pauses it and runs the replay check against the
/// source (paused since the switch, so its memory and device state are
/// the switch's).
fn check_postcopy(source: &SyntheticGuest, sent: &Summary, got: ferry::IncomingOutcome) {
    assert_eq!(sent.status, "completed", "{:?}", sent.error);
    let pc = sent
        .postcopy
        .as_ref()
        .expect("the source switched to postcopy");
    let theirs = got.summary.postcopy.as_ref().expect("postcopy figures");
    assert_eq!(pc.postcopy_discarded_pages, theirs.postcopy_discarded_pages);
    // Requests still queued when the last page was placed go unserved.
    assert!(pc.postcopy_requests <= theirs.postcopy_requests);
    assert!(theirs.fault_latency_max_us.is_some());
    assert!(sent.downtime_ms.is_some());
    assert!(
        !source.is_running(),
        "the source never resumes after the switch"
    );
    assert!(got.guest.is_running(), "the destination runs the guest");
    std::thread::sleep(Duration::from_millis(200));
    got.guest.pause().unwrap();
    let now = got.guest.save_device_state().unwrap();
    let switchover = source.save_device_state().unwrap();
    let reference = source.memory().blocks()[0].copy_all();
    let r = replay_check(&reference, &switchover, &got.memory, &now).unwrap();
    assert!(r.writes > 0, "the destination's guest wrote: {r:?}");
    assert!(r.equal(), "replay check: {r:?}");
}

/// 32 MiB written at 1 GiB/s, at random, already writing.
fn fast_guest() -> SyntheticGuest {
    let g = synthetic(32, 1 << 30, DirtyPattern::Random, TrackerKind::Bitmap);
    while g.first_write_at().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    g
}

#[test]
fn postcopy_after_one_pass_passes_the_replay_check_in_several_runs() {
    within(240, || {
        for _ in 0..3 {
            let guest = fast_guest();
            let (l, uri) = listener();
            let dst = spawn_destination(l, IncomingOptions::default());
            let progress = Progress::default();
            let sent = migrate_out(&guest, &uri, &postcopy_opts(1), &progress).unwrap();
            assert_eq!(sent.passes, 1, "switched after the first pass");
            assert_eq!(progress.status(), Status::Completed);
            // query-migrate shows postcopy's figures.
            let q = progress.query();
            let pc = sent.postcopy.as_ref().unwrap();
            assert_eq!(q["ram"]["postcopy-requests"], pc.postcopy_requests, "{q}");
            assert_eq!(q["ram"]["postcopy-bytes"], pc.postcopy_bytes, "{q}");
            assert_eq!(q["ram"]["postcopy-pages-left"], 0, "{q}");
            let got = dst.join().unwrap().expect("destination completes");
            check_postcopy(&guest, &sent, got);
        }
    });
}

#[test]
fn postcopy_after_zero_switches_before_any_pass_and_every_page_follows() {
    within(120, || {
        let guest = fast_guest();
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let progress = Progress::default();
        let sent = migrate_out(&guest, &uri, &postcopy_opts(0), &progress).unwrap();
        assert_eq!(sent.passes, 0, "no precopy pass before the switch");
        assert_eq!(sent.precopy_bytes, 0, "{sent:?}");
        let pc = sent.postcopy.as_ref().unwrap();
        let pages = guest.memory().blocks()[0].len() / 4096;
        assert_eq!(
            pc.postcopy_discarded_pages, pages,
            "every page is pending at the switch"
        );
        let got = dst.join().unwrap().expect("destination completes");
        assert_eq!(got.summary.passes, 0);
        check_postcopy(&guest, &sent, got);
    });
}

#[test]
fn start_postcopy_switches_a_migration_that_would_not_converge() {
    within(120, || {
        let guest = Arc::new(fast_guest());
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        // A downtime limit no pass meets: precopy alone never ends.
        let progress = progress_with(Parameters {
            downtime_limit: Duration::from_micros(1),
            ..Default::default()
        });
        let e = progress.start_postcopy().unwrap_err();
        assert!(e.contains("no migration has started yet"), "{e}");
        let (g, p) = (guest.clone(), progress.clone());
        // Only on request: --postcopy-after and the automatic switch are off
        // (the automatic one is tested below).
        let opts = postcopy_uncounted();
        let src = std::thread::spawn(move || migrate_out(&*g, &uri, &opts, &p));
        while progress.status() != Status::Active {
            std::thread::sleep(Duration::from_millis(10));
        }
        progress.start_postcopy().unwrap();
        let sent = src.join().unwrap().unwrap();
        let got = dst.join().unwrap().expect("destination completes");
        check_postcopy(&guest, &sent, got);
        let e = progress.start_postcopy().unwrap_err();
        assert!(e.contains("state 'completed'"), "{e}");
    });
}

#[test]
fn start_postcopy_without_the_capability_says_so() {
    within(120, || {
        let guest = Arc::new(synthetic(
            16,
            64 * MIB,
            DirtyPattern::Random,
            TrackerKind::Bitmap,
        ));
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let progress = progress_with(Parameters {
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        let p = progress.clone();
        let g = guest.clone();
        let src =
            std::thread::spawn(move || migrate_out(&*g, &uri, &OutgoingOptions::default(), &p));
        let mut refused = None;
        while !progress.status().is_final() {
            if progress.status() == Status::Active {
                refused = Some(progress.start_postcopy().unwrap_err());
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let sent = src.join().unwrap().unwrap();
        dst.join().unwrap().unwrap();
        assert!(sent.postcopy.is_none(), "precopy only");
        if let Some(e) = refused {
            assert!(e.contains("does not have the postcopy capability"), "{e}");
            assert!(e.contains("--postcopy"), "{e}");
        }
    });
}

/// With a downtime limit no pass meets, precopy settles where each pass
/// leaves about as much as it found: postcopy starts by itself. (A pass
/// in which the guest, starved of CPU on a loaded machine, wrote nothing
/// at all converges honestly; such a run is tried again, up to 5 times.)
#[test]
fn postcopy_starts_by_itself_when_precopy_does_not_converge() {
    within(240, || {
        for attempt in 1..=5 {
            let guest = fast_guest();
            let (l, uri) = listener();
            let dst = spawn_destination(l, IncomingOptions::default());
            let progress = Progress::with_parameters(Parameters {
                downtime_limit: Duration::from_micros(1),
                ..Default::default()
            });
            // No count: only the automatic switch.
            let opts = postcopy_uncounted();
            let sent = migrate_out(&guest, &uri, &opts, &progress).unwrap();
            let got = dst.join().unwrap().expect("destination completes");
            if sent.postcopy.is_none() {
                assert_eq!(
                    sent.expected_downtime_ms,
                    Some(0.0),
                    "converged on nothing left"
                );
                eprintln!("attempt {attempt}: a pass found no dirty page; again");
                continue;
            }
            assert!(sent.passes >= 2, "it tried precopy first: {}", sent.passes);
            check_postcopy(&guest, &sent, got);
            return;
        }
        panic!("postcopy never started by itself in 5 attempts");
    });
}

#[test]
fn postcopy_over_tls_covers_the_preempt_channels() {
    within(240, || {
        let dir = tempfile::tempdir().unwrap();
        generate(
            dir.path(),
            &CertRequest {
                hosts: vec!["localhost".into(), "127.0.0.1".into()],
                days: 30,
                expired: false,
            },
        )
        .unwrap();
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), SocketTuning::default())
            .unwrap()
            .with_tls(Arc::new(TlsServer::load(dir.path()).unwrap()));
        let uri = l.uri().clone();
        let dst = spawn_destination(l, IncomingOptions::default());
        let guest = fast_guest();
        let mut opts = postcopy_opts(1);
        opts.tls = Some(Arc::new(TlsClient::load(dir.path(), None).unwrap()));
        let sent = migrate_out(&guest, &uri, &opts, &Progress::default()).unwrap();
        assert!(sent.tls);
        let got = dst.join().unwrap().expect("destination completes");
        assert!(got.summary.tls);
        check_postcopy(&guest, &sent, got);
    });
}

/// A destination whose memory userfaultfd cannot register (a file on a
/// disk filesystem) refuses postcopy at setup, saying why; the source
/// guest runs on.
#[test]
fn a_destination_that_cannot_register_userfaultfd_refuses_postcopy() {
    within(60, || {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let guest = fast_guest();
        let (l, uri) = listener();
        let dst = spawn_destination(
            l,
            IncomingOptions {
                memory: ferry::DestinationMemory::Files(dir.path().join("guest.ram")),
                ..IncomingOptions::default()
            },
        );
        let f = migrate_out(&guest, &uri, &postcopy_opts(1), &Progress::default()).unwrap_err();
        let e = f.error.to_string();
        assert!(e.contains("the source asks for postcopy, but"), "{e}");
        assert!(e.contains("userfaultfd"), "{e}");
        assert!(guest.is_running(), "nothing switched: the source runs on");
        assert!(dst.join().unwrap().is_err());
    });
}

/// Verification hashes the destination's memory before its guest runs,
/// which postcopy cannot offer: asked for by either side together with
/// postcopy, the migration is refused at setup, naming both flags, and the
/// source guest runs on.
#[test]
fn postcopy_and_switchover_verification_are_refused_together() {
    within(60, || {
        // The source asks for both: refused before connecting.
        let guest = fast_guest();
        let (l, uri) = listener();
        drop(l);
        let opts = OutgoingOptions {
            verify_switchover: true,
            ..postcopy_opts(1)
        };
        // Refused naming both flags, and the source guest runs on.
        let refused = |uri: &ferry::ChannelUri, opts: &OutgoingOptions| {
            let e = migrate_out(&guest, uri, opts, &Progress::default())
                .unwrap_err()
                .error
                .to_string();
            assert!(
                e.contains("--verify-switchover") && e.contains("--postcopy"),
                "{e}"
            );
            assert!(guest.is_running(), "the source runs on");
        };
        refused(&uri, &opts);

        // The destination asks to verify, the source announces postcopy.
        let (l, uri) = listener();
        let dst = spawn_destination(
            l,
            IncomingOptions {
                verify_switchover: Some(true),
                ..IncomingOptions::default()
            },
        );
        refused(&uri, &postcopy_opts(1));
        let theirs = dst.join().unwrap().map(|_| ()).unwrap_err().to_string();
        assert!(theirs.contains("--postcopy"), "{theirs}");
    });
}

/// A failure after the switch: the destination fails once the package is
/// in (its keep hook refuses), so neither side holds the whole guest. The
/// source never resumes its guest, passes through postcopy-paused and
/// says so.
#[test]
fn a_failure_after_the_switch_leaves_the_source_paused_in_postcopy_paused() {
    within(120, || {
        let guest = fast_guest();
        let (l, uri) = listener();
        let dst = spawn_destination(
            l,
            IncomingOptions {
                keep: Some(Arc::new(|_: &[u8]| Err("the disk is full".to_string()))),
                ..IncomingOptions::default()
            },
        );
        let progress = Progress::default();
        let events = progress.subscribe();
        let f = migrate_out(&guest, &uri, &postcopy_opts(1), &progress).unwrap_err();
        let e = f.error.to_string();
        assert!(e.contains("the disk is full"), "{e}");
        assert!(e.contains("postcopy-paused"), "{e}");
        assert!(e.contains("never resumed here"), "{e}");
        assert!(!guest.is_running(), "the source guest stays paused");
        let statuses: Vec<Status> = events
            .try_iter()
            .filter_map(|ev| match ev {
                ferry::Event::Status(s) => Some(s),
                _ => None,
            })
            .collect();
        assert!(
            statuses.ends_with(&[
                Status::PostcopyActive,
                Status::PostcopyPaused,
                Status::Failed
            ]),
            "{statuses:?}"
        );
        assert!(dst.join().unwrap().is_err());
    });
}

/// Forwards one connection to `to` both ways; a preempt channel (role 2
/// in its hello) is cut, both ways, once it would carry more than
/// `cut_after` bytes toward the destination.
fn pipe(mut src: std::net::TcpStream, to: std::net::SocketAddr, cut_after: usize) {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    let Ok(mut dst) = std::net::TcpStream::connect(to) else {
        return;
    };
    let (mut back_from, mut back_to) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_from, &mut back_to);
        let _ = back_to.shutdown(Shutdown::Both);
    });
    let mut hello = [0u8; ferry_transport::HELLO_LEN];
    if src.read_exact(&mut hello).is_err() || dst.write_all(&hello).is_err() {
        return;
    }
    let preempt = hello[10] == 2;
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if preempt && sent + n > cut_after {
            let _ = src.shutdown(Shutdown::Both);
            let _ = dst.shutdown(Shutdown::Both);
            return;
        }
        if dst.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = dst.shutdown(Shutdown::Write);
}

/// A link cut after the switch (the preempt channels die mid-push): both
/// sides pause (postcopy-paused), and with no recovery within their
/// paused timeout give up, saying so; the source guest stays paused.
#[test]
fn a_link_cut_after_the_switch_pauses_both_sides() {
    within(120, || {
        let guest = fast_guest();
        let (l, dest_uri) = listener();
        let to: std::net::SocketAddr = dest_uri.to_string()["tcp:".len()..].parse().unwrap();
        let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("tcp:{}", relay.local_addr().unwrap())
            .parse()
            .unwrap();
        std::thread::spawn(move || {
            for c in relay.incoming() {
                let Ok(c) = c else { return };
                std::thread::spawn(move || pipe(c, to, 256 << 10));
            }
        });
        let give_up = Some(Duration::from_secs(2));
        let dst = spawn_destination(
            l,
            IncomingOptions {
                postcopy_paused_timeout: give_up,
                ..IncomingOptions::default()
            },
        );
        let opts = OutgoingOptions {
            postcopy_paused_timeout: give_up,
            ..postcopy_opts(1)
        };
        let f = migrate_out(&guest, &uri, &opts, &Progress::default()).unwrap_err();
        let e = f.error.to_string();
        assert!(e.contains("postcopy-paused"), "{e}");
        assert!(e.contains("no recovery within 2.0 s"), "{e}");
        assert!(!guest.is_running(), "the source guest stays paused");
        let theirs = match dst.join().unwrap() {
            Ok(_) => panic!("the destination completed over a cut link"),
            Err(f) => f.error.to_string(),
        };
        assert!(theirs.contains("postcopy-paused"), "{theirs}");
        assert!(theirs.contains("preempt"), "names the channel: {theirs}");
    });
}
