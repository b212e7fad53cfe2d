//! `ferry save / restore / inspect / verify` end to end, as a user runs
//! them: real files on a real disk, io_uring, O_DIRECT where the file system
//! allows it. Round trips must give back byte-identical memory; every kind
//! of damage to a saved file must end in a clear error naming what is
//! wrong and where, a non-zero exit, and nothing reported as restored.
//!
//! Every child runs under a deadline and must not panic.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_ram::mapped::FileLayout;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

struct Done {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `ferry args…` to the end (killed at the deadline), output captured in files.
fn ferry(dir: &Path, args: &[&str]) -> Done {
    let out = dir.join("stdout");
    let err = dir.join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRY_LOG")
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("ferry {args:?} hung for {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let d = Done {
        ok: status.success(),
        stdout: fs::read_to_string(&out).unwrap(),
        stderr: fs::read_to_string(&err).unwrap(),
    };
    assert!(
        !d.stderr.contains("panicked"),
        "ferry {args:?} panicked:\n{}",
        d.stderr
    );
    d
}

fn json(d: &Done) -> Value {
    serde_json::from_str(d.stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}\n{}", d.stdout, d.stderr))
}

/// A directory on the machine's disk (not tmpfs), so O_DIRECT is real.
fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-file-test")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a `mixed` dataset of `mib` MiB to `ram`.
fn gen_mixed(dir: &Path, ram: &Path, mib: u64, seed: u64) {
    let (size, seed) = (format!("{mib}M"), seed.to_string());
    let args = [
        "gen",
        "--size",
        &size,
        "--pattern",
        "mixed",
        "--seed",
        &seed,
        "-o",
        s(ram),
    ];
    let d = ferry(dir, &args);
    assert!(d.ok, "gen failed: {}", d.stderr);
}

/// A `mixed` dataset of `mib` MiB and a saved copy of it; returns both paths.
fn saved(dir: &Path, mib: u64, extra: &[&str]) -> (PathBuf, PathBuf) {
    let ram = dir.join("guest.ram");
    let sav = dir.join("guest.ferry");
    gen_mixed(dir, &ram, mib, 7);
    let to = format!("file:{}", s(&sav));
    let mut args = vec!["save", "--ram", s(&ram), "--to", &to, "--json"];
    args.extend_from_slice(extra);
    let d = ferry(dir, &args);
    assert!(d.ok, "save failed: {}\n{}", d.stdout, d.stderr);
    (ram, sav)
}

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

fn round_trip(dir: &Path, mib: u64, channels: &str, save_extra: &[&str], restore_extra: &[&str]) {
    let ram = dir.join("guest.ram");
    let sav = dir.join("guest.ferry");
    let out = dir.join("restored.ram");
    gen_mixed(dir, &ram, mib, 3);
    let to = format!("file:{}", s(&sav));
    let mut args = vec![
        "save",
        "--ram",
        s(&ram),
        "--to",
        &to,
        "--channels",
        channels,
        "--json",
    ];
    args.extend_from_slice(save_extra);
    let d = ferry(dir, &args);
    assert!(d.ok, "save: {}\n{}", d.stdout, d.stderr);
    let saved = json(&d);
    assert_eq!(saved["status"], "completed");
    let pages = mib * MIB / 4096;
    // mixed: every 4th page is zero.
    assert_eq!(saved["pages_zero"], pages / 4);
    assert_eq!(saved["pages_normal"], pages - pages / 4);
    assert_eq!(saved["ram_bytes"], mib * MIB);

    let from = format!("file:{}", s(&sav));
    let mut args = vec![
        "restore",
        "--from",
        &from,
        "--ram-out",
        s(&out),
        "--channels",
        channels,
        "--json",
    ];
    args.extend_from_slice(restore_extra);
    let d = ferry(dir, &args);
    assert!(d.ok, "restore: {}\n{}", d.stdout, d.stderr);
    let restored = json(&d);
    assert_eq!(restored["status"], "completed");
    assert_eq!(restored["digest"], saved["digest"]);
    assert_eq!(
        restored["device_state_digest"],
        saved["device_state_digest"]
    );
    assert!(
        fs::read(&ram).unwrap() == fs::read(&out).unwrap(),
        "restored memory differs from the saved guest's"
    );
    for f in [ram, sav, out] {
        fs::remove_file(f).unwrap();
    }
}

#[test]
fn round_trip_is_byte_identical_for_1_2_4_channels_buffered_and_direct() {
    let dir = disk_dir();
    for channels in ["1", "2", "4"] {
        round_trip(dir.path(), 24, channels, &[], &[]);
        round_trip(dir.path(), 24, channels, &["--direct-io"], &["--direct-io"]);
    }
}

#[test]
fn round_trip_with_large_holes_only_and_small_queues() {
    let dir = disk_dir();
    round_trip(
        dir.path(),
        20,
        "3",
        &["--hole-min", "1M", "--direct-io", "--queue-depth", "2"],
        &["--queue-depth", "1"],
    );
}

#[test]
fn zero_pages_are_holes_in_the_file() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 16, &[]);
    let d = ferry(dir.path(), &["inspect", s(&sav), "--json"]);
    assert!(d.ok, "{}", d.stderr);
    let v = json(&d);
    let present = 16 * MIB / 4096 * 3 / 4;
    assert_eq!(v["pages_present"], present);
    assert_eq!(v["blocks"][0]["name"], "ram");
    assert_eq!(v["blocks"][0]["pages_offset"].as_u64().unwrap() % MIB, 0);
    let disk = v["file_disk_bytes"].as_u64().unwrap();
    let len = v["file_len"].as_u64().unwrap();
    // Page data on disk: the present pages plus at most 1 MiB of metadata.
    assert!(
        disk <= present * 4096 + MIB,
        "disk {disk} bytes, file {len}"
    );
    assert!(disk < len);
}

/// tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since: either
/// way the save must complete, and say so when it fell back.
#[test]
fn direct_io_on_tmpfs_completes_and_says_what_it_used() {
    if fs::metadata("/dev/shm").is_err() {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (ram, sav) = saved(dir.path(), 4, &[]);
    let to = format!("file:{}", s(&sav));
    let d = ferry(
        dir.path(),
        &[
            "save",
            "--ram",
            s(&ram),
            "--to",
            &to,
            "--direct-io",
            "--json",
        ],
    );
    assert!(d.ok, "{}", d.stderr);
    let v = json(&d);
    assert_eq!(v["direct_io_requested"], true);
    if v["direct_io"] == false {
        assert!(v["note"].as_str().unwrap().contains("O_DIRECT"), "{v}");
    } else {
        assert!(v.get("note").is_none(), "{v}");
    }
    let d = ferry(dir.path(), &["verify", s(&sav), "--json"]);
    assert!(d.ok, "{}", d.stderr);
    assert_eq!(json(&d)["digest"], v["digest"]);
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/// Restore (to a RAM file) and verify must both fail with an error containing
/// every one of `needles`, print no digest, and leave no restored RAM behind.
fn refused(dir: &Path, sav: &Path, needles: &[&str]) {
    let out = dir.join("restored.ram");
    let from = format!("file:{}", s(sav));
    for args in [
        vec!["restore", "--from", &from, "--ram-out", s(&out), "--json"],
        vec!["verify", s(sav), "--json"],
    ] {
        let d = ferry(dir, &args);
        assert!(!d.ok, "{args:?} succeeded on a bad file:\n{}", d.stdout);
        let v = json(&d);
        assert_eq!(v["status"], "failed", "{v}");
        assert!(
            v.get("digest").is_none(),
            "a failed {args:?} reported a digest: {v}"
        );
        let err = v["error"].as_str().unwrap();
        for n in needles {
            assert!(
                err.contains(n),
                "{args:?}: error {err:?} does not say {n:?}"
            );
        }
        assert!(
            !out.exists(),
            "a failed restore left {} behind",
            out.display()
        );
    }
    // Without --json too: the error goes to stderr and the exit status is 1.
    let d = ferry(dir, &["restore", "--from", &from]);
    assert!(!d.ok);
    assert!(d.stderr.contains("failed"), "{}", d.stderr);
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = File::options().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn flip(path: &Path, offset: u64) {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
}

fn layout(path: &Path) -> FileLayout {
    FileLayout::read(&File::open(path).unwrap(), path).unwrap()
}

/// Writes `good` with `edit` applied as the header and block table (checksum
/// recomputed): a header that is well formed but lies.
fn rewrite_header(path: &Path, good: &FileLayout, edit: impl FnOnce(&mut FileLayout)) {
    let mut l = good.clone();
    edit(&mut l);
    patch(path, 0, &l.encode());
}

#[test]
fn truncated_files_are_refused() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 8, &[]);
    let len = fs::metadata(&sav).unwrap().len();
    File::options()
        .write(true)
        .open(&sav)
        .unwrap()
        .set_len(len - 4096 * 3)
        .unwrap();
    refused(
        dir.path(),
        &sav,
        &["truncated", &format!("{}", len - 4096 * 3)],
    );
    File::options()
        .write(true)
        .open(&sav)
        .unwrap()
        .set_len(40)
        .unwrap();
    refused(dir.path(), &sav, &["truncated", "file header"]);
    File::options()
        .write(true)
        .open(&sav)
        .unwrap()
        .set_len(0)
        .unwrap();
    refused(dir.path(), &sav, &["truncated"]);
}

#[test]
fn wrong_magic_and_wrong_version_are_refused() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 4, &[]);
    patch(&sav, 0, b"QEVM");
    refused(dir.path(), &sav, &["not a ferry saved guest", "offset 0"]);
    patch(&sav, 0, b"FERR");
    patch(&sav, 8, &2u32.to_le_bytes());
    refused(dir.path(), &sav, &["version 2", "offset 0x8"]);
    let not_ferry = dir.path().join("random.bin");
    fs::write(&not_ferry, vec![0x5a; 100_000]).unwrap();
    refused(dir.path(), &not_ferry, &["not a ferry saved guest"]);
}

#[test]
fn a_flipped_byte_in_the_pages_is_found_with_its_block_and_offset() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 8, &[]);
    let l = layout(&sav);
    let b = &l.blocks[0];
    // Page 4 × 256 + 5 is present (mixed: page i is zero when i % 4 == 0);
    // its region is the fifth MiB of the block.
    let page = 4 * 256 + 5;
    flip(&sav, b.page_file_offset(page) + 100);
    refused(
        dir.path(),
        &sav,
        &[
            "block 'ram'",
            "checksum mismatch",
            "offset 0x400000",
            &format!("{:#x}", b.pages_offset + 0x400000),
        ],
    );
}

#[test]
fn a_flipped_byte_where_a_zero_page_lies_is_found() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 8, &[]);
    let l = layout(&sav);
    // Page 2 × 256 + 4 is a zero page: a hole in the file.
    flip(&sav, l.blocks[0].page_file_offset(2 * 256 + 4) + 7);
    refused(
        dir.path(),
        &sav,
        &["block 'ram'", "checksum mismatch", "offset 0x200000"],
    );
}

#[test]
fn a_flipped_byte_in_the_bitmap_or_checksum_table_is_found() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 8, &[]);
    let l = layout(&sav);
    let b = l.blocks[0].clone();
    flip(&sav, b.bitmap_offset + 17);
    refused(
        dir.path(),
        &sav,
        &["block 'ram'", "bitmap", &format!("{:#x}", b.bitmap_offset)],
    );
    flip(&sav, b.bitmap_offset + 17);
    flip(&sav, b.checksums_offset + 9);
    refused(
        dir.path(),
        &sav,
        &[
            "block 'ram'",
            "checksum table",
            &format!("{:#x}", b.checksums_offset),
        ],
    );
}

#[test]
fn a_flipped_byte_in_the_device_state_is_found() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 4, &[]);
    let l = layout(&sav);
    flip(&sav, l.device_state_offset + 3);
    refused(
        dir.path(),
        &sav,
        &["device state", &format!("{:#x}", l.device_state_offset)],
    );
}

#[test]
fn a_flipped_byte_in_the_header_is_found() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 4, &[]);
    // The block's name, inside the block table.
    flip(&sav, 64 + 5);
    refused(dir.path(), &sav, &["header checksum"]);
}

#[test]
fn header_offsets_outside_the_file_are_refused_naming_block_and_offset() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 4, &[]);
    let len = fs::metadata(&sav).unwrap().len();
    let good = layout(&sav);

    let past = (len / MIB + 1) * MIB;
    rewrite_header(&sav, &good, |l| l.blocks[0].pages_offset = past);
    refused(
        dir.path(),
        &sav,
        &[
            "block 'ram'",
            "pages",
            &format!("{past:#x}"),
            "outside the file",
        ],
    );

    let huge = u64::MAX - 4095;
    rewrite_header(&sav, &good, |l| l.blocks[0].bitmap_offset = huge);
    refused(
        dir.path(),
        &sav,
        &["block 'ram'", "bitmap", &format!("{huge:#x}")],
    );

    rewrite_header(&sav, &good, |l| l.blocks[0].checksums_offset = 0);
    refused(
        dir.path(),
        &sav,
        &["block 'ram'", "checksum table", "0x0", "outside"],
    );

    rewrite_header(&sav, &good, |l| l.device_state_len = len);
    refused(dir.path(), &sav, &["device state", "outside"]);

    rewrite_header(&sav, &good, |l| l.blocks[0].len = 1 << 40);
    refused(dir.path(), &sav, &["block 'ram'", "outside the file"]);

    // And the good header still restores: the damage was the header alone.
    rewrite_header(&sav, &good, |_| {});
    let d = ferry(dir.path(), &["verify", s(&sav), "--json"]);
    assert!(d.ok, "{}", d.stderr);
}

#[test]
fn an_unfinished_save_is_refused() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 4, &[]);
    let good = layout(&sav);
    rewrite_header(&sav, &good, |l| l.flags = 0);
    refused(dir.path(), &sav, &["never finished"]);
}

#[test]
fn save_refuses_a_bad_target_and_leaves_nothing() {
    let dir = disk_dir();
    let ram = dir.path().join("g.ram");
    assert!(ferry(dir.path(), &["gen", "--size", "1M", "-o", s(&ram)]).ok);
    let d = ferry(
        dir.path(),
        &["save", "--ram", s(&ram), "--to", "tcp:1.2.3.4:5", "--json"],
    );
    assert!(!d.ok);
    assert!(json(&d)["error"].as_str().unwrap().contains("file:PATH"));
    let target = dir.path().join("no/such/dir/x.ferry");
    let to = format!("file:{}", s(&target));
    let d = ferry(
        dir.path(),
        &["save", "--ram", s(&ram), "--to", &to, "--json"],
    );
    assert!(!d.ok);
    assert_eq!(json(&d)["status"], "failed");
    assert!(!target.exists());
}

#[test]
fn lazy_restore_reports_its_first_write_and_the_saved_digest() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 32, &[]);
    let to = format!("file:{}", s(&sav));
    let saved = json(&ferry(dir.path(), &["inspect", s(&sav), "--json"]));
    assert_eq!(saved["status"], "completed");
    let verify = json(&ferry(dir.path(), &["verify", s(&sav), "--json"]));
    for extra in [&[][..], &["--direct-io", "--channels", "1"][..]] {
        let mut args = vec![
            "restore", "--from", &to, "--lazy", "--touch", "64", "--json",
        ];
        args.extend_from_slice(extra);
        let d = ferry(dir.path(), &args);
        assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
        let v = json(&d);
        assert_eq!(v["status"], "completed");
        assert_eq!(v["digest"], verify["digest"]);
        assert!(v["lazy"]["first_write_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["ram_bytes"], 32 * MIB);
    }
    let d = ferry(
        dir.path(),
        &["restore", "--from", &to, "--lazy", "--ram-out", "/tmp/x"],
    );
    assert!(!d.ok);
}

#[test]
fn saving_over_a_file_replaces_it_and_leaves_no_partial_file() {
    let dir = disk_dir();
    let (ram, sav) = saved(dir.path(), 2, &[]);
    fs::write(&ram, vec![0x11; 3 << 20]).unwrap();
    let to = format!("file:{}", s(&sav));
    let d = ferry(
        dir.path(),
        &["save", "--ram", s(&ram), "--to", &to, "--json"],
    );
    assert!(d.ok, "{}", d.stderr);
    let v = json(&d);
    assert_eq!(v["ram_bytes"], 3 * MIB);
    assert_eq!(
        json(&ferry(dir.path(), &["verify", s(&sav), "--json"]))["digest"],
        v["digest"]
    );
    let partial: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(partial.is_empty(), "{partial:?}");
}

#[test]
fn a_running_synthetic_guest_saves_live_and_in_the_background() {
    let dir = disk_dir();
    let sav = dir.path().join("guest.sav");
    let to = format!("file:{}", s(&sav));
    let guest = [
        "--guest",
        "synthetic",
        "--size",
        "16M",
        "--dirty-rate",
        "128M",
    ];
    for channels in ["1", "2"] {
        // Live: passes while it writes, the digest at the pause restored.
        let mut args = vec!["save", "--to", &to, "--channels", channels];
        args.extend_from_slice(&guest);
        args.extend_from_slice(&["--downtime-limit", "0", "--max-passes", "3"]);
        args.extend_from_slice(&["--verify-digest", "--json"]);
        let d = ferry(dir.path(), &args);
        assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
        let v = json(&d);
        assert_eq!(v["mode"], "live");
        assert!(v["passes"].as_u64().unwrap() >= 2, "{v}");
        assert!(v["downtime_ms"].as_f64().is_some(), "{v}");
        assert_eq!(v["file_digest"], v["switchover_digest"], "{v}");
        let r = json(&ferry(
            dir.path(),
            &["restore", "--from", &to, "--channels", channels, "--json"],
        ));
        assert_eq!(r["switchover_digest"], v["switchover_digest"]);

        // Background: the file holds memory as it was at the pause.
        let mut args = vec!["save", "--to", &to, "--channels", channels];
        args.extend_from_slice(&guest);
        args.extend_from_slice(&[
            "--background",
            "--digest-at-pause",
            "--verify-digest",
            "--json",
        ]);
        let d = ferry(dir.path(), &args);
        assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
        let v = json(&d);
        assert_eq!(v["mode"], "background");
        assert!(v["pause_ms"].as_f64().is_some(), "{v}");
        assert_eq!(v["file_digest"], v["digest_at_pause"], "{v}");

        // Lazy restore running the saved guest itself.
        let d = ferry(
            dir.path(),
            &["restore", "--from", &to, "--lazy", "--run-guest", "--json"],
        );
        assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
        let v = json(&d);
        assert_eq!(v["status"], "completed");
        assert!(v["lazy"]["first_write_ms"].as_f64().unwrap() > 0.0, "{v}");
    }
}
