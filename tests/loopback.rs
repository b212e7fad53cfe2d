//! Whole migrations over loopback TCP and unix sockets: the destination must
//! hold exactly the source's bytes, zero pages included.

mod common;

use common::*;
use ferry::{migrate_out, DestinationMemory, IncomingOptions, OutgoingOptions, Progress, SendPath};
use ferry_ram::pattern::Pattern;

fn migrate(channels: u16, pattern: Pattern, path: SendPath, checksum: bool) {
    let mem = memory(&[("ram", 64)], pattern, 11);
    let (l, uri) = listener();
    let dst = spawn_destination(l, IncomingOptions::default());
    let mut opts = OutgoingOptions {
        channels,
        ..Default::default()
    };
    opts.sender.path = path;
    opts.sender.checksum = checksum;
    let sent = migrate_out(&image_guest(mem.clone()), &uri, &opts, &Progress::default())
        .expect("source completes");
    let got = dst.join().unwrap().expect("destination completes");
    assert_eq!(
        got.memory.digest(),
        mem.digest(),
        "destination holds the source's bytes"
    );
    assert_eq!(got.device_state, b"device state of the test guest");
    assert_eq!(sent.ram_bytes, 64 * MIB);
    assert_eq!(got.summary.ram_bytes, 64 * MIB);
    assert_eq!(sent.pages_normal + sent.pages_zero, 64 * MIB / 4096);
    assert_eq!(got.summary.pages_zero, sent.pages_zero);
    if pattern == Pattern::Mixed {
        assert_eq!(
            sent.pages_zero,
            64 * MIB / 4096 / 4,
            "a quarter of mixed pages are zero"
        );
    }
    assert!(sent.completed() && got.summary.completed());
    assert_eq!(sent.session, got.summary.session);
    assert_eq!(sent.send_path, path.name(), "{:?}", sent.send_path_note);
}

#[test]
fn one_channel_mixed() {
    migrate(1, Pattern::Mixed, SendPath::Splice, true);
}

#[test]
fn two_channels_mixed() {
    migrate(2, Pattern::Mixed, SendPath::Splice, true);
}

#[test]
fn four_channels_mixed() {
    migrate(4, Pattern::Mixed, SendPath::Splice, true);
}

#[test]
fn four_channels_random_zero_copy() {
    migrate(4, Pattern::Random, SendPath::ZeroCopy, true);
}

#[test]
fn two_channels_copied_by_io_uring_sendmsg() {
    migrate(2, Pattern::Mixed, SendPath::Copy, true);
}

#[test]
fn two_channels_without_checksums() {
    migrate(2, Pattern::Mixed, SendPath::Splice, false);
}

#[test]
fn all_zero_guest_moves_as_offsets_only() {
    let mem = memory(&[("ram", 16)], Pattern::Zero, 0);
    let (l, uri) = listener();
    let dst = spawn_destination(l, IncomingOptions::default());
    let sent = migrate_out(
        &image_guest(mem.clone()),
        &uri,
        &OutgoingOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    let got = dst.join().unwrap().unwrap();
    assert_eq!(sent.pages_normal, 0);
    assert!(
        sent.multifd_bytes < MIB / 8,
        "zero pages carry no payload: {} bytes",
        sent.multifd_bytes
    );
    assert_eq!(got.memory.digest(), mem.digest());
}

#[test]
fn several_blocks_over_a_unix_socket_into_provided_memory() {
    let mem = memory(&[("pc.ram", 24), ("vga.vram", 8)], Pattern::Mixed, 3);
    let dir = tempfile::tempdir().unwrap();
    let uri: ferry::ChannelUri = format!("unix:{}", dir.path().join("m.sock").display())
        .parse()
        .unwrap();
    let l = ferry::Listener::bind(&uri, ferry::SocketTuning::default()).unwrap();
    // The destination's memory already holds other bytes: zero pages must be written.
    let target = memory(&[("pc.ram", 24), ("vga.vram", 8)], Pattern::Random, 99);
    let opts = IncomingOptions {
        memory: DestinationMemory::Provided(target.clone()),
        ..Default::default()
    };
    let dst = spawn_destination(l, opts);
    migrate_out(
        &image_guest(mem.clone()),
        &uri,
        &OutgoingOptions {
            channels: 3,
            ..Default::default()
        },
        &Progress::default(),
    )
    .unwrap();
    dst.join().unwrap().unwrap();
    assert_eq!(target.digest(), mem.digest());
}

/// Migrates `mem` into memory kept in files at `dst.ram` in a fresh
/// directory, which lives as long as the returned handle.
fn migrate_into_files(mem: &std::sync::Arc<ferry::GuestMemory>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (l, uri) = listener();
    let opts = IncomingOptions {
        memory: DestinationMemory::Files(dir.path().join("dst.ram")),
        ..Default::default()
    };
    let dst = spawn_destination(l, opts);
    migrate_out(
        &image_guest(mem.clone()),
        &uri,
        &OutgoingOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    drop(dst.join().unwrap().unwrap());
    dir
}

#[test]
fn destination_memory_in_a_file() {
    let mem = memory(&[("ram", 16)], Pattern::Mixed, 5);
    let dir = migrate_into_files(&mem);
    let held = std::fs::read(dir.path().join("dst.ram")).unwrap();
    assert_eq!(held, mem.blocks()[0].copy_all());
}

/// Block names come from the source; with several blocks each gets a file
/// beside the path, named after it with characters a file name cannot hold
/// replaced: a QEMU-style name with '/' must neither escape nor crash.
#[test]
fn destination_blocks_in_files_named_after_them() {
    let names = [("pc.ram", 8), ("0000:00:02.0/vga.vram", 4)];
    let mem = memory(&names, Pattern::Mixed, 6);
    let dir = migrate_into_files(&mem);
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["dst.ram.0000_00_02.0_vga.vram", "dst.ram.pc.ram"]);
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    assert_eq!(read("dst.ram.pc.ram"), mem.blocks()[0].copy_all());
    assert_eq!(
        read("dst.ram.0000_00_02.0_vga.vram"),
        mem.blocks()[1].copy_all()
    );
}

/// Every other page zero and packets of the largest size: 2048 separate
/// runs a packet, more than one sendmsg/recvmsg may carry (1024 iovecs).
/// The splice path and the receiver take them in pieces; the io_uring
/// sendmsg path refuses such packets up front, saying why.
#[test]
fn packets_of_more_runs_than_one_call_takes() {
    let mem = memory(&[("ram", 32)], Pattern::Random, 4);
    let block = &mem.blocks()[0];
    for page in (0..block.pages()).step_by(2) {
        block.zero_page(page);
    }
    let mut opts = OutgoingOptions::default();
    opts.sender.packet_pages = ferry_multifd::MAX_PACKET_PAGES;
    let (l, uri) = listener();
    let dst = spawn_destination(l, IncomingOptions::default());
    let sent = migrate_out(&image_guest(mem.clone()), &uri, &opts, &Progress::default())
        .expect("the splice path takes any number of runs");
    let got = dst.join().unwrap().expect("destination completes");
    assert_eq!(got.memory.digest(), mem.digest());
    assert_eq!(sent.pages_zero, block.pages() / 2);

    opts.sender.path = SendPath::Copy;
    let (l, uri) = listener();
    let dst = spawn_destination(l, IncomingOptions::default());
    let failed = migrate_out(&image_guest(mem), &uri, &opts, &Progress::default())
        .expect_err("sendmsg cannot carry 2048 runs");
    let e = failed.to_string();
    assert!(e.contains("at most 960 pages a packet"), "{e}");
    let _ = dst.join().unwrap();
}

/// One image migration of 16 MiB with the source asking to verify the
/// switchover or not, and the destination's own setting (`None`: as the
/// source asks).
fn verify_negotiation(
    source_asks: bool,
    destination: Option<bool>,
) -> (
    Result<ferry::Summary, ferry::Failed>,
    Result<ferry::IncomingOutcome, ferry::Failed>,
    std::sync::Arc<ferry::GuestMemory>,
) {
    let mem = memory(&[("ram", 16)], Pattern::Mixed, 7);
    let (l, uri) = listener();
    let dst = spawn_destination(
        l,
        IncomingOptions {
            verify_switchover: destination,
            ..Default::default()
        },
    );
    let opts = OutgoingOptions {
        verify_switchover: source_asks,
        ..Default::default()
    };
    let sent = migrate_out(&image_guest(mem.clone()), &uri, &opts, &Progress::default());
    (sent, dst.join().unwrap(), mem)
}

/// By default the switchover is not verified: no digest of memory is taken
/// on the destination (inside the downtime), both sides say so, and the
/// destination still holds exactly the source's bytes.
#[test]
fn by_default_the_switchover_is_not_verified_and_no_digest_is_taken_in_the_downtime() {
    let (sent, got, mem) = verify_negotiation(false, None);
    let (sent, got) = (
        sent.expect("source completes"),
        got.expect("destination completes"),
    );
    assert!(sent.completed() && got.summary.completed());
    assert!(!sent.verified && !got.summary.verified);
    assert_eq!(
        got.summary.switchover_digest, None,
        "no digest before resume"
    );
    assert_eq!(got.summary.digest_ms, None);
    // The source hashes after RESUMED, outside the downtime.
    assert!(sent.switchover_digest.is_some());
    assert_eq!(got.memory.digest(), mem.digest());
}

/// Either side may ask: the switchover is then verified on both.
#[test]
fn either_side_asking_verifies_the_switchover_on_both() {
    for (source_asks, destination) in [(true, None), (false, Some(true)), (true, Some(true))] {
        let (sent, got, mem) = verify_negotiation(source_asks, destination);
        let (sent, got) = (
            sent.expect("source completes"),
            got.expect("destination completes"),
        );
        let case = format!("source asks: {source_asks}, destination: {destination:?}");
        assert!(sent.verified && got.summary.verified, "{case}");
        assert!(sent.switchover_digest.is_some(), "{case}");
        assert_eq!(
            sent.switchover_digest, got.summary.switchover_digest,
            "{case}"
        );
        assert!(got.summary.digest_ms.is_some(), "{case}");
        assert_eq!(got.memory.digest(), mem.digest(), "{case}");
    }
}

/// A destination that refuses to verify (`recv --no-digest`) refuses a
/// source that asks, at setup, and both sides say why.
#[test]
fn a_destination_that_refuses_to_verify_refuses_a_source_that_asks() {
    let (sent, got, _) = verify_negotiation(true, Some(false));
    let dst = got.err().expect("the destination refuses").to_string();
    assert!(
        dst.contains("asks to verify the switchover") && dst.contains("--no-digest"),
        "{dst}"
    );
    let src = sent.expect_err("the source fails");
    assert!(
        src.to_string().contains("--no-digest"),
        "the source names the destination's reason: {src}"
    );
    assert_eq!(src.summary.status, "failed");
    // The same destination takes a source that does not ask.
    let (sent, got, _) = verify_negotiation(false, Some(false));
    assert!(sent.unwrap().completed() && !got.unwrap().summary.verified);
}
