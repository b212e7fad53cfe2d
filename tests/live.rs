//! Live migrations of the synthetic guest over loopback: its vCPUs keep
//! writing while passes run; the destination must hold exactly the source's
//! memory and device state at switchover and continue the workload.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry::{
    migrate_out, DirtyPattern, Guest, IncomingOptions, OutgoingOptions, Parameters, Progress,
    Resources, Status, SyntheticGuest, TrackerKind,
};

fn converges(tracker: TrackerKind, opts: OutgoingOptions) {
    // The source asks for the switchover to be verified: the digests below
    // are compared by both sides before the destination's guest runs.
    let opts = OutgoingOptions {
        verify_switchover: true,
        ..opts
    };
    within(120, move || {
        let guest = synthetic(32, 8 * MIB, DirtyPattern::Hotset(25), tracker);
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let progress = Progress::with_parameters(Parameters {
            // Generous: a loaded 2-core machine must still converge.
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        let sent = migrate_out(&guest, &uri, &opts, &progress).expect("source completes");
        let got = dst.join().unwrap().expect("destination completes");
        assert_eq!(progress.status(), Status::Completed);
        assert!(!guest.is_running(), "the source stays paused after success");
        assert!(got.guest.is_running(), "the destination runs the guest");
        assert!(
            sent.passes >= 2,
            "a live pass then the final one: {}",
            sent.passes
        );
        assert_eq!(sent.dirty_tracker.as_deref(), Some(tracker_name(tracker)));
        assert!(sent.switchover_digest.is_some());
        assert_eq!(
            sent.switchover_digest, got.summary.switchover_digest,
            "memory and device state at switchover equal the destination's before resume"
        );
        assert!(sent.verified && got.summary.verified);
        assert!(sent.downtime_ms.is_some());
        assert!(sent.dirty_sync_count >= 2);
        assert!(
            !guest.resources().is_active(),
            "the source gave its resources away"
        );
        assert!(got.guest.resources().is_active());
    });
}

fn tracker_name(t: TrackerKind) -> &'static str {
    match t {
        TrackerKind::Bitmap => "bitmap",
        TrackerKind::Uffd => "uffd",
    }
}

#[test]
fn converges_with_the_bitmap_tracker() {
    converges(TrackerKind::Bitmap, OutgoingOptions::default());
}

/// Live packets with per-page crcs and a zstd frame at once.
#[test]
fn converges_with_zstd_compressed_live_passes() {
    let mut opts = OutgoingOptions::default();
    opts.sender.compress = Some(1);
    converges(TrackerKind::Bitmap, opts);
}

/// The io_uring copy path for live passes (the default is splice).
#[test]
fn converges_over_the_io_uring_copy_path() {
    let mut opts = OutgoingOptions::default();
    opts.sender.path = ferry::SendPath::Copy;
    converges(TrackerKind::Bitmap, opts);
}

#[test]
fn converges_with_the_uffd_tracker() {
    converges(TrackerKind::Uffd, OutgoingOptions::default());
}

#[test]
fn destination_continues_the_workload() {
    within(120, || {
        let guest = synthetic(16, 4 * MIB, DirtyPattern::Random, TrackerKind::Bitmap);
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let progress = Progress::with_parameters(Parameters {
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        migrate_out(&guest, &uri, &OutgoingOptions::default(), &progress).unwrap();
        let got = dst.join().unwrap().unwrap();
        let at_switchover = guest.writes();
        let g = &got.guest;
        // The destination guest runs: its write counters grow past the source's.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let continued = loop {
            std::thread::sleep(Duration::from_millis(50));
            g.pause().unwrap();
            let state: serde_json::Value =
                serde_json::from_slice(&g.save_device_state().unwrap()).unwrap();
            let writes: u64 = state["vcpus"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["writes"].as_u64().unwrap())
                .sum();
            g.resume().unwrap();
            if writes > at_switchover || std::time::Instant::now() > deadline {
                break writes;
            }
        };
        assert!(continued > at_switchover, "{continued} > {at_switchover}");
        let _ = Arc::clone(got.guest.memory());
    });
}

/// A 16 MiB guest writing `rate` bytes/s that holds a lock file (a stand-in
/// for a shared disk) in a fresh directory; the directory lives as long as
/// the returned handle.
fn guest_with_lock(rate: u64) -> (tempfile::TempDir, PathBuf, Arc<SyntheticGuest>) {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("disk.lock");
    let config = workload(rate, DirtyPattern::Random, TrackerKind::Bitmap);
    let resources = Resources::new(std::slice::from_ref(&lock), true).unwrap();
    let guest = Arc::new(synthetic_guest(16, 5, &config, resources));
    (dir, lock, guest)
}

#[test]
fn cancel_mid_pass_leaves_the_source_running_and_the_destination_empty() {
    within(120, || {
        let (_dir, lock, guest) = guest_with_lock(4 * MIB);
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        // 1 MiB/s: pass 1 of 16 MiB cannot end before the cancel.
        let progress = progress_with(Parameters {
            max_bandwidth: MIB,
            ..Default::default()
        });
        let src = spawn_source(guest.clone(), uri, progress.clone());
        wait_until(|| progress.status() == Status::Active && progress.totals().ram_bytes > 0);
        assert!(progress.cancel());
        let failed = src
            .join()
            .unwrap()
            .expect_err("a cancelled migration fails");
        assert!(
            failed.error.to_string().contains("cancelled"),
            "{}",
            failed.error
        );
        assert_eq!(failed.summary.status, "cancelled");
        assert_eq!(progress.status(), Status::Cancelled);
        assert!(progress.query()["error-desc"]
            .as_str()
            .unwrap()
            .contains("cancelled"));
        assert!(guest.is_running(), "the source guest runs on");
        assert!(failed.summary.guest_running);
        assert!(guest.resources().is_active());
        assert_eq!(guest.resources().transitions(), (1, 0), "never inactivated");
        let before = guest.writes();
        wait_until(|| {
            guest.pause().unwrap();
            let w = guest.writes();
            guest.resume().unwrap();
            w > before
        });
        let got = dst.join().unwrap().err().expect("the destination discards");
        assert!(
            got.error.to_string().contains("cancelled by the source"),
            "{}",
            got.error
        );
        assert_eq!(got.summary.status, "cancelled");
        assert!(!got.summary.guest_running);
        // Nobody else took the lock: the source still owns it.
        assert!(ferry::Resources::new(&[lock], true).is_err());
    });
}

#[test]
fn a_cut_link_fails_the_source_which_keeps_running_with_its_resources() {
    within(120, || {
        let (_dir, _lock, guest) = guest_with_lock(4 * MIB);
        let (l, uri) = listener();
        // A destination that accepts the session, then drops every channel.
        let dst = std::thread::spawn(move || {
            let s = ferry_transport::accept_session(&l, &ferry::AcceptOptions::default()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            drop(s);
        });
        let progress = progress_with(Parameters {
            max_bandwidth: MIB,
            ..Default::default()
        });
        let failed = spawn_source(guest.clone(), uri, progress.clone())
            .join()
            .unwrap()
            .expect_err("the link is gone");
        dst.join().unwrap();
        assert_eq!(failed.summary.status, "failed");
        assert_eq!(progress.status(), Status::Failed);
        assert!(progress.query()["error-desc"].is_string());
        assert!(guest.is_running() && guest.resources().is_active());
    });
}

#[test]
fn pause_before_switchover_waits_for_continue() {
    within(120, || {
        let (_dir, lock, guest) = guest_with_lock(2 * MIB);
        let (l, uri) = listener();
        let dst_lock = lock.clone();
        let opts = IncomingOptions {
            build_guest: Arc::new(move |memory, state| {
                let g = SyntheticGuest::from_device_state(
                    memory,
                    state,
                    TrackerKind::Bitmap,
                    Resources::new(std::slice::from_ref(&dst_lock), false)?,
                )?;
                Ok(Box::new(g) as Box<dyn Guest>)
            }),
            // The destination verifies by itself (the source does not ask).
            verify_switchover: Some(true),
            ..Default::default()
        };
        let dst = spawn_destination(l, opts);
        let progress = progress_with(Parameters {
            pause_before_switchover: true,
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        let src = spawn_source(guest.clone(), uri, progress.clone());
        wait_until(|| progress.status() == Status::PreSwitchover);
        assert!(!guest.is_running(), "paused in pre-switchover");
        assert!(
            guest.resources().is_active(),
            "resources are given up only in device"
        );
        assert!(progress.continue_from("active").is_err());
        progress.continue_from("pre-switchover").unwrap();
        let sent = src.join().unwrap().expect("completes after continue");
        let got = dst.join().unwrap().expect("destination completes");
        assert_eq!(sent.switchover_digest, got.summary.switchover_digest);
        assert!(!guest.resources().is_active());
        assert!(
            got.guest.resources().is_active(),
            "the lock moved to the destination"
        );
        assert_eq!(guest.resources().transitions(), (1, 1));
    });
}

#[test]
fn a_cancel_in_pre_switchover_resumes_and_reactivates_the_source() {
    within(120, || {
        let (_dir, _lock, guest) = guest_with_lock(2 * MIB);
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let progress = progress_with(Parameters {
            pause_before_switchover: true,
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        let src = spawn_source(guest.clone(), uri, progress.clone());
        wait_until(|| progress.status() == Status::PreSwitchover);
        assert!(progress.cancel());
        let failed = src.join().unwrap().unwrap_err();
        assert_eq!(failed.summary.status, "cancelled");
        assert!(guest.is_running() && guest.resources().is_active());
        assert!(
            dst.join().unwrap().is_err(),
            "the destination never runs the guest"
        );
    });
}

#[test]
fn a_guest_faster_than_the_link_converges_only_with_auto_converge() {
    within(300, || {
        let run = |auto_converge: bool| {
            let guest = Arc::new(synthetic(
                8,
                64 * MIB,
                DirtyPattern::Random,
                TrackerKind::Bitmap,
            ));
            let (l, uri) = listener();
            let dst = spawn_destination(l, IncomingOptions::default());
            let progress = progress_with(Parameters {
                max_bandwidth: 16 * MIB,
                downtime_limit: Duration::from_millis(100),
                auto_converge,
                max_passes: if auto_converge { 40 } else { 6 },
                ..Default::default()
            });
            let result = spawn_source(guest.clone(), uri, progress).join().unwrap();
            let _ = dst.join().unwrap();
            (result, guest)
        };
        let (stuck, guest) = run(false);
        let failed = stuck.expect_err("64 MiB/s of writes over a 16 MiB/s link never converge");
        assert!(
            failed.error.to_string().contains("did not converge"),
            "{}",
            failed.error
        );
        assert!(guest.is_running());
        assert_eq!(guest.throttle(), 0);
        let (done, guest) = run(true);
        let sent = done.expect("auto-converge throttles the guest until it fits");
        assert!(sent.throttle_percent >= 20, "{}", sent.throttle_percent);
        assert!(sent.passes > 2);
        assert!(!guest.is_running());
    });
}

#[test]
fn a_source_whose_resources_were_taken_over_is_not_resumed() {
    within(120, || {
        let (_dir, lock, guest) = guest_with_lock(2 * MIB);
        let (l, uri) = listener();
        // A destination that takes the lock, then fails to start its guest
        // while something there keeps holding the lock.
        let holder = Arc::new(std::sync::Mutex::new(None));
        let (dst_lock, dst_holder) = (lock.clone(), holder.clone());
        let opts = IncomingOptions {
            build_guest: Arc::new(move |_memory, _state| {
                let r = Resources::new(std::slice::from_ref(&dst_lock), true)?;
                *dst_holder.lock().unwrap() = Some(r);
                Err(ferry::GuestError::Control("refusing to start".into()))
            }),
            ..Default::default()
        };
        let dst = spawn_destination(l, opts);
        let progress = progress_with(Parameters {
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        let failed = spawn_source(guest.clone(), uri, progress)
            .join()
            .unwrap()
            .unwrap_err();
        assert!(dst.join().unwrap().is_err());
        let e = failed.error.to_string();
        assert!(
            e.contains("refusing to start") && e.contains("stays paused"),
            "{e}"
        );
        assert!(
            !guest.is_running(),
            "two owners would corrupt the shared disk"
        );
        assert!(!guest.resources().is_active());
        // Once the other owner lets go, the source can take its resources back.
        holder.lock().unwrap().take();
        assert!(guest.resources().activate().unwrap());
    });
}

#[test]
fn a_cancel_on_the_destination_fails_the_source_which_runs_on() {
    within(120, || {
        let guest = Arc::new(synthetic(
            16,
            2 * MIB,
            DirtyPattern::Random,
            TrackerKind::Bitmap,
        ));
        let (l, uri) = listener();
        let dst_progress = Arc::new(Progress::default());
        let dst = {
            let p = dst_progress.clone();
            std::thread::spawn(move || ferry::migrate_in(&l, &IncomingOptions::default(), &p))
        };
        let progress = progress_with(Parameters {
            max_bandwidth: MIB,
            ..Default::default()
        });
        let src = spawn_source(guest.clone(), uri, progress.clone());
        wait_until(|| {
            dst_progress.status() == Status::Active && dst_progress.totals().ram_bytes > 0
        });
        assert!(dst_progress.cancel());
        let got = dst.join().unwrap().err().expect("the destination discards");
        assert_eq!(got.summary.status, "cancelled");
        assert_eq!(dst_progress.status(), Status::Cancelled);
        let failed = src.join().unwrap().unwrap_err();
        assert_eq!(failed.summary.status, "failed", "{}", failed.error);
        assert!(
            failed
                .error
                .to_string()
                .contains("cancelled on the destination"),
            "{}",
            failed.error
        );
        assert!(guest.is_running());
    });
}

/// `query-migrate` during the first pass: `remaining` falls and the rate
/// is measured while the pass runs, not only between passes; and progress
/// events come a few times a second.
#[test]
fn query_figures_are_live_during_a_pass() {
    within(120, || {
        let guest = Arc::new(synthetic(
            32,
            MIB,
            DirtyPattern::Sequential,
            TrackerKind::Bitmap,
        ));
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        // 32 MiB at 8 MiB/s: pass 1 takes about 4 s.
        let progress = progress_with(Parameters {
            max_bandwidth: 8 * MIB,
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        let events = progress.subscribe();
        let src = spawn_source(guest.clone(), uri, progress.clone());
        wait_until(|| progress.status() == Status::Active && progress.totals().wire_bytes > 0);
        let mut samples = Vec::new();
        while samples.len() < 6 && progress.figures().pass == 0 {
            let q = progress.query();
            samples.push((
                q["ram"]["remaining"].as_u64().unwrap(),
                q["ram"]["mbps"].as_f64().unwrap(),
            ));
            std::thread::sleep(Duration::from_millis(400));
        }
        src.join().unwrap().expect("source completes");
        dst.join().unwrap().expect("destination completes");
        assert!(
            samples.len() >= 3,
            "pass 1 ended too soon to sample: {samples:?}"
        );
        let first = samples[0].0;
        let last = samples[samples.len() - 1].0;
        assert!(first > 0 && last < first, "remaining falls: {samples:?}");
        assert!(first <= 32 * MIB, "{samples:?}");
        assert!(
            samples[1..].iter().all(|s| s.1 > 0.0),
            "mbps is measured: {samples:?}"
        );
        let progress_events = events
            .try_iter()
            .filter(|e| matches!(e, ferry::Event::Progress(_)))
            .count();
        assert!(progress_events >= 4, "{progress_events} progress events");
    });
}
