//! `ferry save / restore / inspect / verify` end to end, as a user runs
//! them: real files on a real disk, io_uring, O_DIRECT where the file system
//! allows it. Round trips must give back byte-identical memory; every kind
//! of damage to a saved file must end in a clear error naming what is
//! wrong and where, a non-zero exit, and nothing reported as restored.
//!
//! Every child runs under a deadline and must not panic. Save and restore
//! take the saved file as PATH or file:PATH, inspect and verify too: the
//! tests use both.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_ram::mapped::FileLayout;
use serde_json::Value;

#[path = "../../tests/common/sparse.rs"]
mod sparse;
use sparse::huge_sparse_file;

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

struct Done {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `ferry args…` to the end (killed at the deadline), output captured in files.
fn ferry(dir: &Path, args: &[&str]) -> Done {
    ferry_measured(dir, args).0
}

/// [`ferry`], also returning the child's peak resident memory in KiB (its
/// own, from wait4: not any other child's) and how long it ran.
// The child is reaped by wait4 (for its rusage), not by Child::wait.
#[allow(clippy::zombie_processes)]
fn ferry_measured(dir: &Path, args: &[&str]) -> (Done, u64, Duration) {
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
    let pid = child.id() as libc::pid_t;
    let (status, max_rss_kib) = loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, writing into the two locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break (status, usage.ru_maxrss as u64);
        }
        if t.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("ferry {args:?} hung for {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = t.elapsed();
    let d = Done {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout: fs::read_to_string(&out).unwrap(),
        stderr: fs::read_to_string(&err).unwrap(),
    };
    assert!(
        !d.stderr.contains("panicked"),
        "ferry {args:?} panicked:\n{}",
        d.stderr
    );
    (d, max_rss_kib, elapsed)
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
    let mut args = vec!["save", "--ram", s(&ram), "--to", s(&sav), "--json"];
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
fn round_trip_is_byte_identical_for_1_2_4_channels_direct_and_buffered() {
    let dir = disk_dir();
    for channels in ["1", "2", "4"] {
        // The default: O_DIRECT here (--io auto).
        round_trip(dir.path(), 24, channels, &[], &[]);
        let buffered = ["--io", "buffered"];
        round_trip(dir.path(), 24, channels, &buffered, &buffered);
    }
    // The flag from before O_DIRECT was the default still works (as auto).
    round_trip(dir.path(), 8, "2", &["--direct-io"], &["--direct-io"]);
    round_trip(dir.path(), 8, "2", &["--io", "direct"], &["--io", "direct"]);
}

#[test]
fn round_trip_with_large_holes_only_and_small_queues() {
    let dir = disk_dir();
    round_trip(
        dir.path(),
        20,
        "3",
        &["--hole-min", "1M", "--queue-depth", "2"],
        &["--queue-depth", "1"],
    );
}

#[test]
fn with_hole_min_4k_every_zero_page_is_a_hole() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 16, &["--hole-min", "4K"]);
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

/// By default (`--hole-min 1M`) a zero run of 1 MiB or more stays a hole
/// while the scattered zero pages between data are written as zeros; in
/// both cases no zero page is marked present, and the restore is exact.
#[test]
fn by_default_long_zero_runs_are_holes_and_short_ones_are_written() {
    let dir = disk_dir();
    let ram = dir.path().join("guest.ram");
    let sav = dir.path().join("guest.ferry");
    // 4 MiB of `mixed` (one zero page in four), 8 MiB of zeros, 4 MiB of
    // `mixed` again: the zero run lies between data.
    let half = dir.path().join("half.ram");
    gen_mixed(dir.path(), &half, 4, 5);
    let data = std::fs::read(&half).unwrap();
    let mut bytes = data.clone();
    bytes.resize(12 * MIB as usize, 0);
    bytes.extend_from_slice(&data);
    std::fs::write(&ram, &bytes).unwrap();
    let d = ferry(
        dir.path(),
        &["save", "--ram", s(&ram), "--to", s(&sav), "--json"],
    );
    assert!(d.ok, "{}", d.stderr);
    let d = ferry(dir.path(), &["inspect", s(&sav), "--json"]);
    assert!(d.ok, "{}", d.stderr);
    let v = json(&d);
    let present = 8 * MIB / 4096 * 3 / 4;
    assert_eq!(
        v["pages_present"], present,
        "no zero page is marked present"
    );
    let disk = v["file_disk_bytes"].as_u64().unwrap();
    // The mixed parts are written whole (their short zero runs too), the
    // zero run is not: at most 8 MiB of pages plus 1 MiB of metadata.
    assert!(
        disk >= 15 * MIB / 2,
        "disk {disk}: the short zero runs between data were left as holes"
    );
    assert!(
        disk <= 9 * MIB,
        "disk {disk}: the 8 MiB zero run was written"
    );
    let out = dir.path().join("restored.ram");
    let d = ferry(
        dir.path(),
        &["restore", "--from", s(&sav), "--ram-out", s(&out), "--json"],
    );
    assert!(d.ok, "{}", d.stderr);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&ram).unwrap(),
        "restored bytes differ"
    );
}

/// tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since: either
/// way the default save (--io auto) must complete, and say so when it fell
/// back.
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
        &["save", "--ram", s(&ram), "--to", &to, "--json"],
    );
    assert!(d.ok, "{}", d.stderr);
    let v = json(&d);
    assert_eq!(v["io"], "auto");
    assert_eq!(v["direct_io_requested"], true);
    if v["direct_io"] == false {
        let why = v["direct_io_fallback"].as_str().unwrap();
        assert!(why.contains("tmpfs") && why.contains("O_DIRECT"), "{v}");
    } else {
        assert!(v.get("direct_io_fallback").is_none(), "{v}");
    }
    let d = ferry(dir.path(), &["verify", s(&sav), "--json"]);
    assert!(d.ok, "{}", d.stderr);
    assert_eq!(json(&d)["digest"], v["digest"]);
}

/// Where the file system refuses O_DIRECT (ramfs: EINVAL on open), the
/// default save and restore fall back to buffered I/O by themselves and
/// say why; `--io direct` fails instead, naming the file system. ramfs is
/// mounted in a mount namespace of its own (root and util-linux's
/// `unshare`; the test says SKIPPED without them).
#[test]
fn where_o_direct_is_refused_auto_falls_back_and_says_why_and_direct_fails() {
    let probe = Command::new("unshare")
        .args(["--mount", "sh", "-c", "mount -t ramfs none /mnt"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: cannot mount ramfs in a mount namespace (needs root and unshare)");
        return;
    }
    let dir = disk_dir();
    let ram = dir.path().join("guest.ram");
    gen_mixed(dir.path(), &ram, 8, 5);
    let mnt = dir.path().join("ramfs");
    fs::create_dir(&mnt).unwrap();
    let (f, r, m) = (env!("CARGO_BIN_EXE_ferry"), s(&ram), s(&mnt));
    let script = format!(
        "set -e; mount -t ramfs none {m}; \
         {f} save --ram {r} --to {m}/g.ferry --json; \
         {f} restore --from {m}/g.ferry --json; \
         {f} verify {m}/g.ferry --json; \
         {f} restore --from {m}/g.ferry --lazy --json; \
         {f} save --ram {r} --to {m}/h.ferry --io direct --json || true; \
         {f} restore --from {m}/g.ferry --io direct --json || true"
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        v.len(),
        6,
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, what) in ["save", "restore", "verify"].iter().enumerate() {
        let x = &v[i];
        assert_eq!(x["status"], "completed", "{what}: {x}");
        assert_eq!(
            (&x["io"], &x["direct_io"]),
            (&"auto".into(), &false.into()),
            "{what}: {x}"
        );
        let why = x["direct_io_fallback"].as_str().unwrap_or_default();
        assert!(
            why.contains("ramfs") && why.contains("refuses O_DIRECT") && why.contains(m),
            "{what}: {x}"
        );
    }
    // A lazy restore reads buffered under --io auto anyway, by choice.
    assert_eq!(v[3]["status"], "completed", "{}", v[3]);
    assert_eq!(v[3]["direct_io"], false);
    assert!(v[3].get("direct_io_fallback").is_none(), "{}", v[3]);
    assert!(v[3]["note"]
        .as_str()
        .unwrap()
        .contains("lazy restore: buffered reads"));
    assert_eq!(v[1]["digest"], v[0]["digest"]);
    assert_eq!(v[3]["digest"], v[0]["digest"]);
    for (i, what) in [(4, "save --io direct"), (5, "restore --io direct")] {
        let x = &v[i];
        assert_eq!(x["status"], "failed", "{what}: {x}");
        let e = x["error"].as_str().unwrap();
        assert!(
            e.contains("O_DIRECT was asked for (--io direct)") && e.contains("ramfs"),
            "{what}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/// Restore (to a RAM file) and verify must both fail with an error containing
/// every one of `needles`, print no digest, and leave no restored RAM behind.
fn refused(dir: &Path, sav: &Path, needles: &[&str]) {
    let out = dir.join("restored.ram");
    let uri = format!("file:{}", s(sav));
    for args in [
        vec!["restore", "--from", s(sav), "--ram-out", s(&out), "--json"],
        vec!["verify", &uri, "--json"],
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
    let d = ferry(dir, &["restore", "--from", &uri]);
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
    let e = json(&d)["error"].as_str().unwrap().to_string();
    assert!(e.contains("tcp URI") && e.contains("file:PATH"), "{e}");
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
    // The default (--io auto) reads through the page cache; --io direct
    // with O_DIRECT.
    for extra in [&[][..], &["--io", "direct", "--channels", "1"][..]] {
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

// ---------------------------------------------------------------------------
// Paths, files that are not regular, RAM files, partial files, huge guests
// ---------------------------------------------------------------------------

/// The hidden files in `dir` (partial saves, staged RAM files).
fn hidden(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// The error of a failed `--json` run.
fn json_error(d: &Done, args: &[&str]) -> String {
    assert!(!d.ok, "{args:?} succeeded:\n{}", d.stdout);
    let v = json(d);
    assert_eq!(v["status"], "failed", "{args:?}: {v}");
    v["error"].as_str().unwrap().to_string()
}

/// Every file command takes the saved file as PATH or as file:PATH, with
/// the same result; other migration URIs and empty paths are refused.
#[test]
fn plain_paths_and_file_uris_are_alike() {
    let dir = disk_dir();
    let (_ram, sav) = saved(dir.path(), 2, &[]);
    let uri = format!("file:{}", s(&sav));
    let a = json(&ferry(dir.path(), &["inspect", s(&sav), "--json"]));
    let b = json(&ferry(dir.path(), &["inspect", &uri, "--json"]));
    assert_eq!(a["status"], "completed", "{a}");
    assert_eq!(a, b);
    let mut digests = Vec::new();
    for args in [
        ["verify", s(&sav), "--json"],
        ["verify", &uri, "--json"],
        ["restore", "--from", s(&sav)],
        ["restore", "--from", &uri],
    ] {
        let mut args = args.to_vec();
        args.push("--json");
        args.dedup();
        let v = json(&ferry(dir.path(), &args));
        assert_eq!(v["status"], "completed", "{args:?}: {v}");
        digests.push(v["digest"].as_str().unwrap().to_string());
    }
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    for (bad, says) in [("unix:/tmp/x", "unix URI"), ("file:", "names no file")] {
        for args in [
            vec!["restore", "--from", bad, "--json"],
            vec!["verify", bad, "--json"],
            vec!["inspect", bad, "--json"],
        ] {
            let e = json_error(&ferry(dir.path(), &args), &args);
            assert!(e.contains(says) && e.contains("file:PATH"), "{args:?}: {e}");
        }
    }
}

/// A FIFO (which nobody writes: a reader would block for ever), a
/// character device and a directory are each refused at once by every
/// file command, as the saved file, the RAM to save, the save's target or
/// the restore's RAM file, with an error naming the path and its kind;
/// nothing is left behind.
#[test]
fn files_that_are_not_regular_are_refused_at_once() {
    let dir = disk_dir();
    let (ram, sav) = saved(dir.path(), 1, &[]);
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let out = dir.path().join("out.ram");
    for (p, kind) in [
        (fifo.as_path(), "a FIFO"),
        (Path::new("/dev/zero"), "a character device"),
        (sub.as_path(), "a directory"),
    ] {
        let expect = format!("{} is {kind}, not a regular file", s(p));
        let uri = format!("file:{}", s(p));
        for args in [
            vec!["inspect", s(p), "--json"],
            vec!["verify", &uri, "--json"],
            vec!["restore", "--from", s(p), "--json"],
            vec!["restore", "--from", s(p), "--ram-out", s(&out), "--json"],
            vec!["save", "--ram", s(p), "--to", s(&out), "--json"],
            vec!["save", "--ram", s(&ram), "--to", s(p), "--json"],
            vec!["restore", "--from", s(&sav), "--ram-out", s(p), "--json"],
        ] {
            let e = json_error(&ferry(dir.path(), &args), &args);
            assert!(e.contains(&expect), "{args:?}: {e}");
            assert!(!out.exists(), "{args:?} left {}", out.display());
        }
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(fs::metadata(&sub).unwrap().is_dir());
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

/// `restore --ram-out` never writes through a symbolic link (refused, its
/// target untouched), and replaces a file there only with a complete
/// restore: one that fails leaves the old file as it was and nothing
/// beside it.
#[test]
fn ram_out_refuses_a_symlink_and_replaces_a_file_only_when_complete() {
    let dir = disk_dir();
    let (ram, sav) = saved(dir.path(), 4, &[]);
    let precious = dir.path().join("precious");
    fs::write(&precious, b"not RAM").unwrap();
    let link = dir.path().join("link.ram");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let args = [
        "restore",
        "--from",
        s(&sav),
        "--ram-out",
        s(&link),
        "--json",
    ];
    let e = json_error(&ferry(dir.path(), &args), &args);
    assert!(
        e.contains(&format!(
            "{} is a symbolic link, not a regular file",
            s(&link)
        )),
        "{e}"
    );
    assert_eq!(fs::read(&precious).unwrap(), b"not RAM");
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    // A damaged saved file: the restore fails and the old RAM file stays.
    let out = dir.path().join("out.ram");
    fs::write(&out, b"old RAM").unwrap();
    let at = layout(&sav).blocks[0].page_file_offset(5) + 1;
    flip(&sav, at);
    let args = ["restore", "--from", s(&sav), "--ram-out", s(&out), "--json"];
    let e = json_error(&ferry(dir.path(), &args), &args);
    assert!(e.contains("checksum mismatch"), "{e}");
    assert_eq!(fs::read(&out).unwrap(), b"old RAM");
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));

    // Whole again: the restore replaces the old file with the RAM.
    flip(&sav, at);
    let d = ferry(dir.path(), &args);
    assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
    assert!(fs::read(&out).unwrap() == fs::read(&ram).unwrap());
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

/// A hidden partial file left by a save that was killed (its process is
/// gone) is removed by the next save to that path, which names it.
#[test]
fn the_next_save_removes_a_killed_saves_partial_file_and_names_it() {
    let dir = disk_dir();
    let ram = dir.path().join("g.ram");
    gen_mixed(dir.path(), &ram, 1, 5);
    let sav = dir.path().join("g.ferry");
    // No process has a PID above the kernel's limit.
    let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = dir.path().join(format!(".g.ferry.partial-{}", pid_max + 1));
    File::create(&stale).unwrap().set_len(1 << 30).unwrap();
    let to = format!("file:{}", s(&sav));
    let d = ferry(
        dir.path(),
        &["save", "--ram", s(&ram), "--to", &to, "--json"],
    );
    assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
    let note = json(&d)["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains(s(&stale)), "{note}");
    assert!(!stale.exists());
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

/// A saved guest whose header announces 256 GiB of RAM but holds five
/// pages: verify, restore into a RAM file, and inspect each take the
/// memory (and time) of those pages, not of 256 GiB. The RAM file is
/// sparse and holds the pages where they belong; restore and verify agree
/// on the digest. A restore into anonymous memory either does the same or,
/// where 256 GiB cannot be mapped, fails at once saying to use --ram-out.
/// Times are printed, not asserted (the deadline is the hang guard).
#[test]
fn a_huge_sparse_guest_costs_only_its_present_pages() {
    const MAX_RSS_KIB: u64 = 200 << 10;
    let dir = disk_dir();
    let (sav, pages) = huge_sparse_file(dir.path(), 256 << 30);
    let out = dir.path().join("out.ram");
    let run = |args: &[&str]| {
        let (d, rss_kib, t) = ferry_measured(dir.path(), args);
        eprintln!(
            "ferry {}: {:.3} s, peak RSS {} KiB, ok: {}",
            args[..args.len() - 1].join(" "),
            t.as_secs_f64(),
            rss_kib,
            d.ok
        );
        assert!(
            rss_kib < MAX_RSS_KIB,
            "ferry {args:?} peaked at {rss_kib} KiB"
        );
        d
    };
    let d = run(&["verify", s(&sav), "--json"]);
    assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
    let v = json(&d);
    assert_eq!(v["pages_normal"], pages.len() as u64);
    assert_eq!(v["ram_bytes"], 256u64 << 30);

    let d = run(&["restore", "--from", s(&sav), "--ram-out", s(&out), "--json"]);
    assert!(d.ok, "{}\n{}", d.stdout, d.stderr);
    let r = json(&d);
    assert_eq!(r["digest"], v["digest"]);
    assert_eq!(r["pages_normal"], pages.len() as u64);
    assert_eq!(r["pages_zero"], (256u64 << 30) / 4096 - pages.len() as u64);
    let f = File::open(&out).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 256 << 30);
    let disk = std::os::unix::fs::MetadataExt::blocks(&md) * 512;
    assert!(disk < 16 * MIB, "the RAM file takes {disk} bytes on disk");
    for (p, byte) in pages.iter().copied() {
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, p * 4096).unwrap();
        assert!(b.iter().all(|&x| x == byte), "page {p}");
    }
    drop(f);
    fs::remove_file(&out).unwrap();

    let d = run(&["inspect", s(&sav), "--json"]);
    assert!(d.ok, "{}", d.stderr);
    assert_eq!(json(&d)["pages_present"], pages.len() as u64);

    let d = run(&["restore", "--from", s(&sav), "--json"]);
    if d.ok {
        assert_eq!(json(&d)["digest"], v["digest"]);
    } else {
        let e = json(&d)["error"].as_str().unwrap().to_string();
        assert!(e.contains("--ram-out"), "{e}");
    }
}
