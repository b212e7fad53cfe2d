//! The `ferry` binary end to end: real processes, real sockets, and faults
//! injected between them (a killed sender, a byte flipped in transit, a
//! client that is not ferry at all).
//!
//! Every child runs under a deadline: a hang kills it and fails the test.
//! Every run checks that the binary did not panic. No test asserts timing.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    assert_contains, ctl_within, ferry, local_port, start_send_synthetic, wait_for_query_within,
    Done, Proc,
};

const MIB: u64 = 1 << 20;
/// How long any child may run before the test calls it a hang.
const DEADLINE: Duration = Duration::from_secs(30);
/// The proxy has not flipped a byte (yet).
const NOT_YET: u64 = u64::MAX;

// ---------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------

/// Runs a short command to completion under the deadline.
fn run(args: &[&str]) -> Done {
    Proc::spawn(args).wait(DEADLINE)
}

/// `ferry gen` into `dir`; returns the file.
fn gen(dir: &Path, size: &str, pattern: &str, seed: u64) -> PathBuf {
    let path = dir.join(format!("{pattern}-{size}-{seed}.img"));
    let seed = seed.to_string();
    let d = run(&[
        "gen",
        "--size",
        size,
        "--pattern",
        pattern,
        "--seed",
        &seed,
        "-o",
        path.to_str().unwrap(),
    ]);
    assert_eq!(d.code(), Some(0), "ferry gen failed:\n{}", d.stderr);
    path
}

/// `ferry recv --listen tcp:127.0.0.1:0 --json EXTRA...`, once it listens.
fn start_recv(extra: &[&str]) -> (Proc, u16) {
    let mut args = vec![
        "recv",
        "--listen",
        "tcp:127.0.0.1:0",
        "--json",
        "--timeout",
        "30",
    ];
    args.extend_from_slice(extra);
    let p = Proc::named("ferry recv", &args);
    let Some(uri) = p.listening(DEADLINE) else {
        let d = p.kill();
        panic!(
            "ferry recv never printed 'ferry: listening on ...':\nstderr:\n{}",
            d.stderr
        );
    };
    let port = local_port(&uri);
    assert_ne!(port, 0, "the real port is printed, not 0");
    (p, port)
}

fn start_send(ram: &Path, port: u16, channels: u16, extra: &[&str]) -> Proc {
    let to = format!("tcp:127.0.0.1:{port}");
    let channels = channels.to_string();
    let mut args = vec![
        "send",
        "--ram",
        ram.to_str().unwrap(),
        "--to",
        &to,
        "--channels",
        &channels,
        "--json",
    ];
    args.extend_from_slice(extra);
    Proc::named("ferry send", &args)
}

/// One migration between two processes; returns (send, recv) results.
fn migrate(ram: &Path, channels: u16, recv_extra: &[&str], send_extra: &[&str]) -> (Done, Done) {
    let (recv, port) = start_recv(recv_extra);
    let send = start_send(ram, port, channels, send_extra).wait(DEADLINE);
    let recv = recv.wait(DEADLINE);
    (send, recv)
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// A TCP proxy between the two processes, to slow down or corrupt the stream
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Tamper {
    /// Source → destination in 64 KiB chunks with a pause after each.
    Throttle,
    /// On the multifd[0] connection, flip one byte 100 bytes into the first
    /// packet's payload.
    FlipFirstPayloadByteOfMultifd0,
}

struct Proxy {
    port: u16,
    /// Most bytes forwarded source → destination on any one connection.
    max_forwarded: Arc<AtomicU64>,
    /// Guest RAM offset of the page whose byte was flipped, once it was
    /// (`NOT_YET` before).
    flipped_page: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: u16, tamper: Tamper) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let max_forwarded = Arc::new(AtomicU64::new(0));
        let flipped_page = Arc::new(AtomicU64::new(NOT_YET));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, f, s) = (max_forwarded.clone(), flipped_page.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((src, _)) => {
                        src.set_nonblocking(false).unwrap();
                        let Ok(dst) = TcpStream::connect(("127.0.0.1", target)) else {
                            let _ = src.shutdown(Shutdown::Both);
                            continue;
                        };
                        let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
                        let (m, f) = (m.clone(), f.clone());
                        std::thread::spawn(move || pump(src, dst, Some(tamper), &m, &f));
                        let (m, f) = (AtomicU64::new(0), AtomicU64::new(NOT_YET));
                        std::thread::spawn(move || pump(dst2, src2, None, &m, &f));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        });
        Proxy {
            port,
            max_forwarded,
            flipped_page,
            stop,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Forwards `from` → `to` until EOF (passed on as a half close) or an error
/// (both connections shut down). `tamper` is set on the source → destination
/// direction only.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    tamper: Option<Tamper>,
    forwarded: &AtomicU64,
    flipped_page: &AtomicU64,
) {
    // The hello, the first packet's header and its first page offset.
    const PREFIX: usize = 40 + 64 + 8;
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    let mut prefix = Vec::with_capacity(PREFIX);
    // Where in the stream to flip, and the offset of the page that byte is in.
    let mut flip_at: Option<(u64, u64)> = None;
    let flip = matches!(tamper, Some(Tamper::FlipFirstPayloadByteOfMultifd0));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = &mut buf[..n];
        if flip && prefix.len() < PREFIX {
            let take = (PREFIX - prefix.len()).min(n);
            prefix.extend_from_slice(&chunk[..take]);
            if prefix.len() == PREFIX {
                let role = prefix[10];
                let index = u16::from_le_bytes([prefix[12], prefix[13]]);
                let h = &prefix[40..];
                let normal = u32::from_le_bytes(h[12..16].try_into().unwrap());
                let zero = u32::from_le_bytes(h[16..20].try_into().unwrap());
                if role == 1 && index == 0 && &h[0..4] == b"FMFD" && normal > 0 {
                    // Normal pages come first: byte 100 of the payload is in
                    // the page at the first offset.
                    let page = u64::from_le_bytes(h[64..72].try_into().unwrap());
                    let payload = 40 + 64 + (u64::from(normal) + u64::from(zero)) * 8;
                    flip_at = Some((payload + 100, page));
                }
            }
        }
        if let Some((at, page)) = flip_at {
            if at >= pos && at < pos + n as u64 {
                chunk[(at - pos) as usize] ^= 0x5a;
                flipped_page.store(page, Ordering::SeqCst);
                flip_at = None;
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        pos += n as u64;
        forwarded.fetch_max(pos, Ordering::SeqCst);
        if matches!(tamper, Some(Tamper::Throttle)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------
// 1. Happy path
// ---------------------------------------------------------------------------

#[test]
fn send_and_recv_migrate_32_mib_over_1_2_and_4_channels() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "32M", "mixed", 1);
    let pages = 32 * MIB / 4096;
    for channels in [1u16, 2, 4] {
        let (send, recv) = migrate(&ram, channels, &[], &[]);
        let s = send.completed();
        let r = recv.completed();
        assert_eq!(s["digest"], r["digest"], "{channels} channel(s): digests");
        assert_eq!(s["session"], r["session"]);
        for v in [&s, &r] {
            assert_eq!(v["ram_bytes"], 32 * MIB, "{v}");
            assert_eq!(v["channels"], u64::from(channels), "{v}");
            assert_eq!(v["checksum_mismatches"], 0, "{v}");
            let normal = v["pages_normal"].as_u64().unwrap();
            let zero = v["pages_zero"].as_u64().unwrap();
            assert_eq!(normal + zero, pages, "{v}");
            assert_eq!(zero, pages / 4, "a quarter of a mixed dataset is zero: {v}");
            assert!(v["wire_bytes"].as_u64().unwrap() > 0, "{v}");
            for k in ["seconds", "gbps_ram", "gbps_wire"] {
                assert!(v[k].is_number(), "{k}: {v}");
            }
        }
    }
}

#[test]
fn recv_with_ram_out_leaves_the_exact_dataset_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "32M", "mixed", 7);
    let out = dir.path().join("received.img");
    let (send, recv) = migrate(&ram, 2, &["--ram-out", out.to_str().unwrap()], &[]);
    let s = send.completed();
    let r = recv.completed();
    assert_eq!(s["digest"], r["digest"]);
    let want = std::fs::read(&ram).unwrap();
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), want.len(), "size of {}", out.display());
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!("--ram-out differs from the dataset first at byte {i:#x}");
    }
}

#[test]
fn outputs_are_kept_and_verified_before_either_side_says_completed() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "16M", "mixed", 8);
    let out = dir.path().join("received.img");
    let ds = dir.path().join("device.state");
    // The destination asks to verify the switchover.
    let recv_args = [
        "--ram-out",
        out.to_str().unwrap(),
        "--device-state-out",
        ds.to_str().unwrap(),
        "--verify-switchover",
    ];
    let (send, recv) = migrate(&ram, 2, &recv_args, &[]);
    let s = send.completed();
    let r = recv.completed();
    // Both sides compared the digests before the destination's guest ran.
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(s["switchover_digest"], r["switchover_digest"]);
    assert!(ds.is_file(), "the device state was written");
    // An image guest does not change: one pass, no final pass after it.
    assert_eq!(s["passes"], 1, "{s}");
    assert_eq!(s["guest_bytes"], 16 * MIB);
    assert_eq!(r["guest_bytes"], 16 * MIB);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&ram).unwrap());
    // Nothing but the dataset and the two outputs: no temporary files.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

/// Without --verify-switchover on either side, no digest is compared and
/// both summaries say so; `recv --no-digest` refuses a source that asks.
#[test]
fn the_switchover_is_verified_only_when_asked_and_no_digest_refuses_a_source_that_asks() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "8M", "mixed", 12);
    let (send, recv) = migrate(&ram, 2, &[], &[]);
    let (s, r) = (send.completed(), recv.completed());
    assert_eq!(
        (&s["verified"], &r["verified"]),
        (&false.into(), &false.into())
    );
    assert!(
        r.get("switchover_digest").is_none() && r.get("digest_ms").is_none(),
        "{r}"
    );
    assert_eq!(s["digest"], r["digest"], "the bytes arrived all the same");
    let (send, recv) = migrate(&ram, 2, &["--no-digest"], &["--verify-switchover"]);
    let (_, serr) = send.failed();
    let (_, rerr) = recv.failed();
    for e in [serr, rerr] {
        assert!(
            e.contains("--verify-switchover") && e.contains("--no-digest"),
            "{e}"
        );
    }
}

/// `exec:`: each of the session's streams goes through its own command
/// (here socat, standing in for `ssh host socat ...`).
#[test]
fn exec_migrates_each_channel_through_its_own_command() {
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("skipped: socat is not installed (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "16M", "mixed", 9);
    let (recv, port) = start_recv(&[]);
    let to = format!("exec:socat - TCP:127.0.0.1:{port}");
    let send = Proc::named(
        "ferry send",
        &[
            "send",
            "--ram",
            ram.to_str().unwrap(),
            "--to",
            &to,
            "--channels",
            "3",
            "--verify-switchover",
            "--json",
        ],
    )
    .wait(DEADLINE);
    let recv = recv.wait(DEADLINE);
    let (s, r) = (send.completed(), recv.completed());
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["switchover_digest"], r["switchover_digest"]);
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(r["channels"], 3, "{r}");
}

/// `recv --listen fd:3`: a listening socket handed over by a parent (as
/// systemd's socket activation does).
#[test]
fn recv_listens_on_an_inherited_socket() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "8M", "mixed", 10);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fd = listener.as_raw_fd();
    let mut cmd = ferry();
    cmd.args(["recv", "--listen", "fd:3", "--json", "--timeout", "30"]);
    // SAFETY: between fork and exec only dup2 and fcntl, which are
    // async-signal-safe. Descriptor 3 ends up without close-on-exec, so
    // ferry inherits it (dup2 onto itself would keep the flag: clear it).
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let recv = std::thread::spawn(move || cmd.output().unwrap());
    let send = start_send(&ram, port, 2, &["--verify-switchover"]).wait(DEADLINE);
    let recv = recv.join().unwrap();
    // Events, one a line, then the summary last.
    let stdout = String::from_utf8_lossy(&recv.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let r: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&recv.stderr)));
    let s = send.completed();
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(s["switchover_digest"], r["switchover_digest"]);
    drop(listener);
}

/// `--metrics-listen`: the figures of `ctl query` for Prometheus.
#[test]
fn recv_serves_its_figures_for_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "8M", "mixed", 11);
    let addr = format!("127.0.0.1:{}", free_port());
    let (recv, port) = start_recv(&["--metrics-listen", &addr]);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ferry\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert_contains(
        &text,
        &[
            "HTTP/1.1 200 OK",
            "text/plain; version=0.0.4",
            "# TYPE ferry_ram_transferred_bytes counter",
            "ferry_status{status=\"completed\"} 0",
        ],
    );
    let send = start_send(&ram, port, 2, &[]).wait(DEADLINE);
    send.completed();
    recv.wait(DEADLINE).completed();
}

#[test]
fn an_output_path_that_cannot_be_written_is_refused_before_listening() {
    for flag in ["--device-state-out", "--ram-out"] {
        let d = run(&[
            "recv",
            "--listen",
            "tcp:127.0.0.1:0",
            "--timeout",
            "5",
            flag,
            "/nonexistent/dir/out",
        ]);
        assert_eq!(d.code(), Some(1), "{flag}: {}", d.stderr);
        assert_contains(
            &d.stderr,
            &[
                "cannot write /nonexistent/dir/out",
                "/nonexistent/dir does not exist",
            ],
        );
        assert!(!d.stderr.contains("listening on"), "{}", d.stderr);
    }
}

// ---------------------------------------------------------------------------
// 6. --no-checksum
// ---------------------------------------------------------------------------

#[test]
fn no_checksum_still_migrates_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "16M", "mixed", 3);
    let (send, recv) = migrate(&ram, 2, &[], &["--no-checksum"]);
    let s = send.completed();
    let r = recv.completed();
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(s["checksum"], false, "{s}");
    assert_eq!(r["ram_bytes"], 16 * MIB);
}

// ---------------------------------------------------------------------------
// 2. Nothing listens
// ---------------------------------------------------------------------------

#[test]
fn send_to_a_port_where_nothing_listens_fails_with_connection_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "16M", "mixed", 1);
    let port = free_port();
    let send = start_send(&ram, port, 2, &[]).wait(DEADLINE);
    let (v, err) = send.failed();
    assert_contains(&err, &["cannot connect", "refused", &port.to_string()]);
    assert!(v.get("digest").is_none(), "{v}");

    // Without --json, the same failure in one line on stderr.
    let to = format!("tcp:127.0.0.1:{port}");
    let d = run(&["send", "--ram", ram.to_str().unwrap(), "--to", &to]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(
        &d.stderr,
        &["ferry send: failed after", "cannot connect", "refused"],
    );
}

#[test]
fn recv_with_a_timeout_and_no_source_fails_instead_of_waiting_for_ever() {
    let d = run(&[
        "recv",
        "--listen",
        "tcp:127.0.0.1:0",
        "--json",
        "--timeout",
        "0.5",
    ]);
    let (_, err) = d.failed();
    assert_contains(&err, &["timed out"]);
}

// ---------------------------------------------------------------------------
// 3. Not a ferry client
// ---------------------------------------------------------------------------

fn recv_fed_with(bytes: &[u8]) -> String {
    let (recv, port) = start_recv(&[]);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(bytes).unwrap();
    let done = recv.wait(DEADLINE);
    drop(c);
    let (v, err) = done.failed();
    assert!(v.get("digest").is_none(), "{v}");
    err
}

#[test]
fn recv_names_an_http_client_at_its_listener() {
    let req = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    assert!(req.len() > 40);
    let err = recv_fed_with(req);
    assert_contains(&err, &["not a ferry channel", "HTTP"]);
}

#[test]
fn recv_refuses_random_bytes_at_its_listener() {
    let noise: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).rotate_right(13) ^ 0xa5) as u8)
        .collect();
    let err = recv_fed_with(&noise);
    assert_contains(&err, &["not a ferry channel"]);
}

// ---------------------------------------------------------------------------
// 4. Sender killed mid-transfer
// ---------------------------------------------------------------------------

#[test]
fn recv_reports_a_sender_killed_mid_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "32M", "random", 5);
    let (recv, recv_port) = start_recv(&[]);
    let proxy = Proxy::start(recv_port, Tamper::Throttle);
    // A small send buffer keeps most of the data in the sender, not in the
    // kernel, when it dies.
    let send = start_send(&ram, proxy.port, 2, &["--socket-buffer", "256K"]);
    let t = Instant::now();
    while proxy.max_forwarded.load(Ordering::SeqCst) < 2 * MIB {
        assert!(
            t.elapsed() < DEADLINE,
            "the proxy never forwarded 2 MiB on one connection"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = send.kill();
    assert!(
        killed.code().is_none(),
        "ferry send was still running when killed (exit {:?}):\n{}",
        killed.code(),
        killed.stdout
    );
    let recv = recv.wait(DEADLINE);
    let (v, err) = recv.failed();
    assert_contains(&err, &["closed"]);
    assert!(!err.contains("completed"), "{err}");
    assert!(v.get("digest").is_none(), "no digest for a failed run: {v}");
}

// ---------------------------------------------------------------------------
// 5. A payload byte flipped in transit
// ---------------------------------------------------------------------------

/// A 16 MiB random dataset sent over one channel through a proxy that flips
/// a payload byte of multifd[0]; returns (send, recv, offset of the page hit).
fn migrate_with_a_flipped_payload_byte() -> (Done, Done, u64) {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "16M", "random", 9);
    let (recv, recv_port) = start_recv(&[]);
    let proxy = Proxy::start(recv_port, Tamper::FlipFirstPayloadByteOfMultifd0);
    let send = start_send(&ram, proxy.port, 1, &[]).wait(DEADLINE);
    let recv = recv.wait(DEADLINE);
    let page = proxy.flipped_page.load(Ordering::SeqCst);
    assert_ne!(
        page, NOT_YET,
        "the proxy found no multifd[0] payload to corrupt"
    );
    (send, recv, page)
}

#[test]
fn a_payload_byte_flipped_in_transit_fails_both_sides_naming_channel_block_and_offset() {
    let (send, recv, page) = migrate_with_a_flipped_payload_byte();

    let (rv, rerr) = recv.failed();
    let at = format!("checksum mismatch in block 'ram' at offset {page:#x} (packet #0)");
    assert_contains(
        &rerr,
        &[
            "multifd[0]",
            "checksum mismatch in block 'ram' at offset 0x",
            &at,
        ],
    );
    assert!(rv.get("digest").is_none(), "{rv}");

    let (sv, serr) = send.failed();
    assert_contains(
        &serr,
        &[
            "the destination failed",
            "checksum mismatch",
            "multifd[0]",
            &at,
        ],
    );
    assert!(sv.get("digest").is_none(), "{sv}");
}

/// BUG (see the report): a failed `ferry recv` reports zeros for everything
/// its receivers counted (ram_bytes, pages, packets, multifd_bytes,
/// checksum_mismatches), because `incoming::receive` only adds the pool's
/// totals to the summary on success.
#[test]
fn a_failed_recv_still_reports_what_it_received_and_the_mismatch() {
    let (_send, recv, _) = migrate_with_a_flipped_payload_byte();
    let (rv, _) = recv.failed();
    assert!(rv["checksum_mismatches"].as_u64().unwrap() >= 1, "{rv}");
    assert!(rv["pages_normal"].as_u64().unwrap() >= 1, "{rv}");
    assert!(rv["ram_bytes"].as_u64().unwrap() > 0, "{rv}");
    assert!(rv["multifd_bytes"].as_u64().unwrap() > 0, "{rv}");
}

// ---------------------------------------------------------------------------
// 7. Help
// ---------------------------------------------------------------------------

#[test]
fn help_of_every_command_exits_0_and_lists_its_options() {
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["--help"],
            &["gen", "send", "recv", "demo", "bench", "certs"],
        ),
        (&["certs", "--help"], &["--out", "--host", "--days"]),
        (
            &["send", "--help"],
            &[
                "--ram",
                "--to",
                "--channels",
                "--json",
                "--zero-copy",
                "--no-checksum",
                "--tls-dir",
                "--tls-hostname",
                "--compress",
                "--verify-switchover",
            ],
        ),
        (
            &["recv", "--help"],
            &[
                "--listen",
                "--ram-out",
                "--json",
                "--timeout",
                "--tls-dir",
                "--compress",
                "--verify-switchover",
                "--no-digest",
            ],
        ),
        (
            &["gen", "--help"],
            &["--size", "--pattern", "--seed", "--output"],
        ),
        (
            &["bench", "--help"],
            &[
                "--size",
                "--channels",
                "--runs",
                "--peer",
                "--json",
                "--tls-dir",
                "--compress",
            ],
        ),
        (&["demo", "--help"], &["--size", "--channels", "--json"]),
    ];
    for (args, wants) in cases {
        let d = run(args);
        assert_eq!(d.code(), Some(0), "ferry {args:?}:\n{}", d.stderr);
        for w in wants {
            assert!(
                d.stdout.contains(w),
                "ferry {args:?} lacks {w}:\n{}",
                d.stdout
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 8. Usage errors
// ---------------------------------------------------------------------------

#[test]
fn send_with_a_bad_uri_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "16M", "zero", 1);
    let d = run(&["send", "--ram", ram.to_str().unwrap(), "--to", "http://x"]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stderr, &["bad URI", "http://x"]);
}

#[test]
fn gen_with_an_unknown_size_suffix_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.img");
    let d = run(&["gen", "--size", "5Q", "-o", out.to_str().unwrap()]);
    assert_eq!(d.code(), Some(2), "clap's usage error:\n{}", d.stderr);
    assert_contains(&d.stderr, &["suffix"]);
    assert!(!out.exists(), "nothing written on a usage error");
}

#[test]
fn send_with_a_missing_ram_file_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.img");
    let d = run(&[
        "send",
        "--ram",
        missing.to_str().unwrap(),
        "--to",
        "tcp:127.0.0.1:1",
    ]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(
        &d.stderr,
        &[missing.to_str().unwrap(), "No such file or directory"],
    );
    // The cause is said once, not repeated by the error chain.
    assert_eq!(
        d.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        d.stderr
    );
}

// ---------------------------------------------------------------------------
// Live migrations of the synthetic guest, and the control socket
// ---------------------------------------------------------------------------

/// `ferry ctl SOCKET ARGS...` under this file's deadline: exit status and
/// the reply.
fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, Value) {
    ctl_within(socket, args, DEADLINE)
}

/// Polls query-migrate until `want` holds for its reply, under this file's
/// deadline.
fn wait_for_query(socket: &Path, want: impl Fn(&Value) -> bool) -> Value {
    wait_for_query_within(socket, DEADLINE, want)
}

#[test]
fn live_synthetic_guest_moves_exactly_with_both_trackers_and_runs_on() {
    for tracker in ["bitmap", "uffd"] {
        let (recv, port) = start_recv(&["--run-after", "0.3"]);
        let send = start_send_synthetic(
            port,
            &[
                "--dirty-rate",
                "16M",
                "--dirty-pattern",
                "hotset:25",
                "--dirty-tracker",
                tracker,
                "--downtime-limit",
                "2000",
                "--verify-switchover",
            ],
        )
        .wait(DEADLINE);
        let recv = recv.wait(DEADLINE);
        let (s, r) = (send.completed(), recv.completed());
        assert_eq!(s["dirty_tracker"], tracker);
        assert!(s["switchover_digest"].is_string(), "{s}");
        assert_eq!(
            s["switchover_digest"], r["switchover_digest"],
            "{tracker}: memory and device state at switchover equal the destination's before resume"
        );
        assert!(s["downtime_ms"].as_f64().is_some(), "{s}");
        assert!(s["passes"].as_u64().unwrap() >= 2 && s["dirty_sync_count"].as_u64().unwrap() >= 2);
        assert_eq!(r["workload"]["continued"], true, "{r}");
        assert!(
            r["workload"]["writes_after"].as_u64() > r["workload"]["writes_at_switchover"].as_u64()
        );
        let statuses: Vec<Value> = send
            .events()
            .iter()
            .filter(|e| e["event"] == "MIGRATION")
            .map(|e| e["data"]["status"].clone())
            .collect();
        assert_eq!(statuses, ["setup", "active", "device", "completed"]);
        assert!(send.events().iter().any(|e| e["event"] == "MIGRATION_PASS"));
    }
}

#[test]
fn a_killed_destination_fails_the_source_which_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("send.sock");
    let (recv, port) = start_recv(&[]);
    let send = start_send_synthetic(
        port,
        &["--max-bandwidth", "2M", "--control", sock.to_str().unwrap()],
    );
    wait_for_query(&sock, |q| {
        q["status"] == "active" && q["ram"]["transferred"].as_u64() > Some(0)
    });
    recv.kill();
    let send = send.wait(DEADLINE);
    let (v, err) = send.failed();
    assert_eq!(
        v["guest_running"], true,
        "the source guest keeps running: {v}"
    );
    assert!(!err.contains("cancelled"), "{err}");
    let last = send.events().last().cloned().unwrap();
    assert_eq!(last["data"]["status"], "failed");
}

#[test]
fn ctl_set_continue_and_malformed_requests_on_a_paused_switchover() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("send.sock");
    let rsock = dir.path().join("recv.sock");
    let (recv, port) = start_recv(&["--control", rsock.to_str().unwrap(), "--verify-switchover"]);
    let send = start_send_synthetic(
        port,
        &[
            "--pause-before-switchover",
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    let q = wait_for_query(&sock, |q| q["status"] == "pre-switchover");
    assert!(q["ram"]["dirty-sync-count"].as_u64() >= Some(1), "{q}");
    let (code, v) = ctl(&rsock, &["query"]);
    assert_eq!(
        (code, v["return"]["status"].as_str()),
        (Some(0), Some("active"))
    );

    let (code, v) = ctl(&sock, &["raw", "{\"execute\":"]);
    assert_eq!(code, Some(1));
    assert!(
        v["error"]["desc"].as_str().unwrap().contains("malformed"),
        "{v}"
    );
    let (code, v) = ctl(&sock, &["set", "downtime-limit=soon"]);
    assert_eq!(code, Some(1), "{v}");
    let (code, _) = ctl(&sock, &["set", "downtime-limit=1000", "max-bandwidth=0"]);
    assert_eq!(code, Some(0));
    let (_, v) = ctl(&sock, &["params"]);
    assert_eq!(v["return"]["downtime-limit"], 1000);
    let (code, v) = ctl(&sock, &["continue"]);
    assert_eq!((code, &v), (Some(0), &serde_json::json!({"return": {}})));
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let (s, r) = (s.completed(), r.completed());
    assert_eq!(s["switchover_digest"], r["switchover_digest"]);
}

#[test]
fn ctl_cancel_keeps_the_source_running_and_the_destination_discards() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("send.sock");
    let (recv, port) = start_recv(&[]);
    let send = start_send_synthetic(
        port,
        &["--max-bandwidth", "1M", "--control", sock.to_str().unwrap()],
    );
    wait_for_query(&sock, |q| q["status"] == "active");
    let (code, _) = ctl(&sock, &["cancel"]);
    assert_eq!(code, Some(0));
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let v = s.summary();
    assert_eq!(
        (s.code(), v["status"].as_str()),
        (Some(1), Some("cancelled")),
        "{v}"
    );
    assert_eq!(v["guest_running"], true);
    let rv = r.summary();
    assert_eq!(
        (r.code(), rv["status"].as_str()),
        (Some(1), Some("cancelled")),
        "{rv}"
    );
    assert!(rv["error"]
        .as_str()
        .unwrap()
        .contains("cancelled by the source"));
    assert_eq!(rv["guest_running"], false);
}

// ---------------------------------------------------------------------------
// 9. TLS and compression between processes
// ---------------------------------------------------------------------------

#[test]
fn certs_then_tls_with_zstd_migrates_exactly_between_processes() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("pki");
    let c = run(&[
        "certs",
        "--out",
        certs.to_str().unwrap(),
        "--host",
        "localhost",
        "127.0.0.1",
    ]);
    assert_eq!(c.code(), Some(0), "ferry certs:\n{}", c.stderr);
    let ram = gen(dir.path(), "32M", "mixed", 9);
    let tls = ["--tls-dir", certs.to_str().unwrap()];
    let mut send_extra = tls.to_vec();
    send_extra.extend(["--compress", "zstd:3"]);
    let (send, recv) = migrate(&ram, 2, &tls, &send_extra);
    let (s, r) = (send.completed(), recv.completed());
    assert_eq!(s["digest"], r["digest"]);
    assert_eq!(
        (s["tls"].as_bool(), r["tls"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(s["compression"], "zstd:3");
    assert!(s["compression_ratio"].as_f64().unwrap() > 1.0, "{s}");

    // The same directory without the client pair: refused, saying why.
    std::fs::remove_file(certs.join("client-key.pem")).unwrap();
    std::fs::remove_file(certs.join("client-cert.pem")).unwrap();
    let (send, recv) = migrate(&ram, 2, &tls, &tls);
    assert_contains(&send.failed().1, &["client certificate"]);
    assert_contains(&recv.failed().1, &["the client sent no certificate"]);
}

/// Across a 1 Gbit/s veth link between two network namespaces, with and
/// without zstd: both arrive exactly. Needs root and iproute2; skipped
/// (with a message) without them.
#[test]
fn zstd_across_a_shaped_link_between_namespaces() {
    use ferry_bench::netns::{NetLink, Side, DESTINATION_ADDR};
    let link = match NetLink::up("1gbit") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED zstd_across_a_shaped_link_between_namespaces: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path(), "48M", "mixed", 4);
    let exe = env!("CARGO_BIN_EXE_ferry");
    for compress in ["none", "zstd"] {
        let listen = format!("tcp:{DESTINATION_ADDR}:4444");
        let mut recv = link
            .command(Side::Destination, exe)
            .args(["recv", "--listen", &listen, "--json", "--timeout", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the listening line before starting the source.
        let mut err = BufReader::new(recv.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("listening on") {
            line.clear();
            if err.read_line(&mut line).unwrap() == 0 {
                break;
            }
        }
        let send = link
            .command(Side::Source, exe)
            .args(["send", "--ram", ram.to_str().unwrap(), "--to", &listen])
            .args(["--channels", "2", "--json", "--compress", compress])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        while recv.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "ferry recv hangs");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        recv.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        // With --json, event lines come first and the summary last.
        let last = |t: &str| t.trim().lines().last().unwrap_or("").to_string();
        let r: Value = serde_json::from_str(&last(&out)).unwrap();
        let send_out = String::from_utf8_lossy(&send.stdout).into_owned();
        let s: Value = serde_json::from_str(&last(&send_out))
            .unwrap_or_else(|e| panic!("send: {e}: {}", String::from_utf8_lossy(&send.stderr)));
        assert_eq!(s["status"], "completed", "{s}");
        assert_eq!(r["status"], "completed", "{r}");
        assert_eq!(s["digest"], r["digest"]);
        eprintln!(
            "1 Gbit/s link, --compress {compress}: {:.3} s, guest RAM {:.2} GB/s, wire {:.2} GB/s",
            s["seconds"], s["gbps_ram"], s["gbps_wire"]
        );
    }
}
