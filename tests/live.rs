//! Live migrations of the synthetic guest over loopback: its vCPUs keep
//! writing while passes run; the destination must hold exactly the source's
//! memory and device state at switchover and continue the workload.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry::synthetic::synthetic_memory;
use ferry::{
    migrate_out, DirtyPattern, Guest, IncomingOptions, OutgoingOptions, Parameters, Progress,
    Resources, Status, SyntheticConfig, SyntheticGuest, TrackerKind,
};

pub fn synthetic(
    mib: u64,
    rate: u64,
    pattern: DirtyPattern,
    tracker: TrackerKind,
) -> SyntheticGuest {
    let mem = synthetic_memory(mib * MIB, None, 5).unwrap();
    let config = SyntheticConfig {
        vcpus: 2,
        dirty_rate: rate,
        pattern,
        seed: 3,
        tracker,
    };
    SyntheticGuest::start(mem, &config, Resources::none(true)).unwrap()
}

fn converges(tracker: TrackerKind) {
    within(120, move || {
        let guest = synthetic(32, 8 * MIB, DirtyPattern::Hotset(25), tracker);
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let progress = Progress::with_parameters(Parameters {
            // Generous: a loaded 2-core machine must still converge.
            downtime_limit: Duration::from_secs(2),
            ..Default::default()
        });
        let sent = migrate_out(&guest, &uri, &OutgoingOptions::default(), &progress)
            .expect("source completes");
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
    converges(TrackerKind::Bitmap);
}

#[test]
fn converges_with_the_uffd_tracker() {
    converges(TrackerKind::Uffd);
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
