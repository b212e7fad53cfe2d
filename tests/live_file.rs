//! Saving a running guest: live (passes while its vCPUs write, then a
//! pause for the last) and in the background (memory as it was at a short
//! pause, written while the guest writes hard). The restored memory and
//! device state must be exactly the guest's at the pause, with one and two
//! channels; and the file is no longer for having had more passes.

mod common;

use std::sync::Arc;

use common::{synthetic_guest, within, workload, MIB};
use ferry::{
    restore_from_file, save_background, save_live_to_file, BackgroundOptions, Digest, DirtyPattern,
    Event, FileOptions, Guest, IoMode, LiveOptions, Progress, Resources, RestoreTarget,
    SaveOptions, Status, SyntheticGuest, TrackerKind,
};
use ferry_ram::mapped::FileLayout;

/// The statuses a save went through, and how many passes it reported.
fn statuses(events: std::sync::mpsc::Receiver<Event>) -> (Vec<Status>, u64) {
    let (mut statuses, mut passes) = (Vec::new(), 0);
    for e in events.try_iter() {
        match e {
            Event::Status(s) => statuses.push(s),
            Event::Pass(_) => passes += 1,
            Event::Progress(_) => {}
        }
    }
    (statuses, passes)
}

/// A guest of `mib` MiB whose 2 vCPUs write `rate` bytes/s at random.
fn synthetic(mib: u64, rate: u64, tracker: TrackerKind) -> SyntheticGuest {
    let config = workload(rate, DirtyPattern::Random, tracker);
    synthetic_guest(mib, 7, &config, Resources::none(true))
}

fn save_options(channels: u16) -> SaveOptions {
    save_options_io(channels, IoMode::default())
}

fn save_options_io(channels: u16, io: IoMode) -> SaveOptions {
    SaveOptions {
        file: FileOptions {
            channels,
            io,
            ..Default::default()
        },
        sync: false,
    }
}

/// The save used O_DIRECT as `io` says: `Auto` uses it unless the file
/// system refused it, and then says why (the fallback itself is tested in
/// tools/tests/file.rs).
fn expect_io(s: &ferry::FileSummary, io: IoMode) {
    assert_eq!(s.io, io.name(), "{s:?}");
    match io {
        IoMode::Auto if !s.direct_io => {
            let why = s
                .direct_io_fallback
                .as_deref()
                .expect("a fallback says why");
            eprintln!("note: the save fell back to buffered writes: {why}");
        }
        IoMode::Auto | IoMode::Direct => assert!(s.direct_io, "{s:?}"),
        IoMode::Buffered => assert!(!s.direct_io && s.direct_io_fallback.is_none(), "{s:?}"),
    }
}

fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-live-file")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// Restores `path` and returns the digest of its memory and device state.
fn restored_digest(path: &std::path::Path, channels: u16) -> String {
    let opts = FileOptions {
        channels,
        ..Default::default()
    };
    let r = restore_from_file(path, &RestoreTarget::Anonymous, &opts, &Progress::default())
        .unwrap_or_else(|f| panic!("restore: {}", f.error));
    Digest::of_guest(&r.memory, &r.device_state).to_string()
}

fn live_save(channels: u16, tracker: TrackerKind) {
    live_save_io(channels, tracker, IoMode::default());
}

fn live_save_io(channels: u16, tracker: TrackerKind, io: IoMode) {
    within(120, move || {
        let dir = disk_dir();
        let path = dir.path().join("live.sav");
        let guest = synthetic(24, 64 * MIB, tracker);
        // No downtime fits a limit of 0: every allowed pass runs, so pages
        // are rewritten in place several times.
        let live = LiveOptions {
            downtime_limit: std::time::Duration::ZERO,
            max_passes: 4,
        };
        let progress = Progress::default();
        let events = progress.subscribe();
        let s = save_live_to_file(
            &guest,
            &path,
            &save_options_io(channels, io),
            &live,
            &progress,
        )
        .unwrap_or_else(|f| panic!("live save: {}", f.error));
        // The session engine's phases, as a live migration's.
        let (statuses, passes) = statuses(events);
        use Status::*;
        assert_eq!(statuses, [Setup, Active, Device, Completed]);
        assert_eq!(passes + 1, s.passes.unwrap(), "a pass event per live pass");
        assert!(s.completed());
        assert_eq!(s.mode, Some("live"));
        expect_io(&s, io);
        assert!(s.passes.unwrap() >= 2, "{s:?}");
        assert!(s.downtime_ms.is_some());
        assert!(
            !guest.is_running(),
            "the guest stays paused after a live save"
        );
        assert!(guest.writes() > 0, "the guest wrote while it was saved");
        // The file's size is its layout's, whatever the passes.
        let plan = FileLayout::plan(&guest.memory().specs(), s.device_state_bytes).unwrap();
        assert_eq!(s.file_len, plan.file_len);
        assert_eq!(
            restored_digest(&path, channels),
            s.switchover_digest.clone().unwrap()
        );
    });
}

#[test]
fn live_save_restores_the_memory_at_the_pause_one_channel() {
    live_save(1, TrackerKind::Bitmap);
}

#[test]
fn live_save_restores_the_memory_at_the_pause_two_channels() {
    live_save(2, TrackerKind::Bitmap);
}

#[test]
fn live_save_with_the_kernel_dirty_log() {
    live_save(2, TrackerKind::Uffd);
}

fn background(channels: u16) {
    background_io(channels, IoMode::default());
}

fn background_io(channels: u16, io: IoMode) {
    within(120, move || {
        let dir = disk_dir();
        let path = dir.path().join("bg.sav");
        // Writing hard: most regions are written by the guest before the
        // writer threads reach them.
        let guest = Arc::new(synthetic(32, 512 * MIB, TrackerKind::Bitmap));
        let writes_before = guest.writes();
        let progress = Progress::default();
        let events = progress.subscribe();
        let s = save_background(
            &*guest,
            &path,
            &save_options_io(channels, io),
            &BackgroundOptions {
                digest_at_pause: true,
            },
            &progress,
        )
        .unwrap_or_else(|f| panic!("background save: {}", f.error));
        // Seed 004's background snapshot: one pass, no device phase.
        let (statuses, passes) = statuses(events);
        use Status::*;
        assert_eq!(statuses, [Setup, Active, Completed]);
        assert_eq!(passes, 1);
        assert!(s.completed());
        assert_eq!(s.mode, Some("background"));
        expect_io(&s, io);
        assert!(guest.is_running(), "the guest runs on");
        let regions = s.fault_regions.unwrap() + s.ordered_regions.unwrap();
        assert_eq!(regions, 32, "every 1 MiB region saved once");
        guest.pause().unwrap();
        assert!(guest.writes() > writes_before);
        assert_eq!(
            restored_digest(&path, channels),
            s.digest_at_pause.clone().unwrap(),
            "the file holds memory as it was when the snapshot began"
        );
    });
}

#[test]
fn live_save_buffered() {
    live_save_io(2, TrackerKind::Bitmap, IoMode::Buffered);
}

#[test]
fn background_snapshot_holds_the_memory_at_its_start_one_channel() {
    background(1);
}

#[test]
fn background_snapshot_holds_the_memory_at_its_start_two_channels() {
    background(2);
}

#[test]
fn background_snapshot_buffered() {
    background_io(2, IoMode::Buffered);
}

#[test]
fn background_snapshot_refuses_memory_another_userfaultfd_tracks() {
    within(60, || {
        let dir = disk_dir();
        let path = dir.path().join("bg.sav");
        let guest = synthetic(8, MIB, TrackerKind::Uffd);
        let f = save_background(
            &guest,
            &path,
            &save_options(1),
            &BackgroundOptions::default(),
            &Progress::default(),
        )
        .expect_err("memory registered with the dirty log's userfaultfd");
        assert!(f.error.to_string().contains("write-protect"), "{}", f.error);
        assert!(guest.is_running());
        assert!(!path.exists());
    });
}
