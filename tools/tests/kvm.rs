//! `--guest kvm` on the command line: the KVM micro-VM sent and received
//! over loopback (plain, and with TLS, zstd and auto-converge), saved and
//! restored (live, background, lazily) and run with its self-check clean;
//! a flipped byte in its saved vCPU state refused before the VM runs; each
//! dirty tracker; and the errors for a missing /dev/kvm and options that
//! do not fit the guest. Tests that need /dev/kvm skip, saying so, where
//! it is not usable. Guests are 32 MiB: /dev/kvm may be a slow software
//! implementation, and nothing here asserts a time.

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_ram::mapped::{region_checksum, FileLayout};
use serde_json::Value;
use support::{assert_contains, ctl, run, start_recv, wait_for_query, Done, Proc, DEADLINE};

fn kvm_or_skip(test: &str) -> bool {
    match ferry_vmm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: SKIPPED: {why}");
            false
        }
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-kvm-test")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The KVM guest's options: 32 MiB, 2 vCPUs writing 16 MiB/s at random.
const GUEST: [&str; 8] = [
    "--guest",
    "kvm",
    "--size",
    "32M",
    "--vcpus",
    "2",
    "--dirty-rate",
    "16M",
];

/// The guest ran on after it was resumed, and its self-check is clean.
fn assert_ran_clean(who: &str, v: &Value) {
    let w = &v["workload"];
    assert_eq!(w["self_check_errors"], 0, "{who}: self-check: {v}");
    assert!(w.get("guest_failure").is_none(), "{who}: {v}");
    assert_eq!(w["continued"], true, "{who}: every vCPU writes on: {v}");
    assert!(
        w["writes_after"].as_u64().unwrap() > w["writes_at_switchover"].as_u64().unwrap(),
        "{who}: counters advance: {v}"
    );
    assert!(
        w["guest_max_gap_us"].as_u64().is_some_and(|us| us > 0),
        "{who}: the guest's largest TSC gap: {v}"
    );
}

/// `ferry send GUEST --to tcp:127.0.0.1:PORT --json EXTRA...` to a `ferry
/// recv --run-after 1s RECV_EXTRA...`; both outcomes.
fn send_recv(send_extra: &[&str], recv_extra: &[&str]) -> (Done, Done) {
    let mut r = vec!["--run-after", "1s"];
    r.extend_from_slice(recv_extra);
    let (recv, port) = start_recv(&r);
    let to = format!("tcp:127.0.0.1:{port}");
    let mut args = vec!["send"];
    args.extend(GUEST);
    args.extend(["--to", &to, "--json"]);
    args.extend_from_slice(send_extra);
    let sent = Proc::spawn(&args).wait(DEADLINE);
    (sent, recv.wait(DEADLINE))
}

#[test]
fn send_recv_of_a_kvm_guest_resumes_it_on_the_destination_with_its_self_check_clean() {
    if !kvm_or_skip(
        "send_recv_of_a_kvm_guest_resumes_it_on_the_destination_with_its_self_check_clean",
    ) {
        return;
    }
    let (sent, got) = send_recv(&["--downtime-limit", "2s", "--verify-switchover"], &[]);
    let sv = sent.completed();
    let rv = got.completed();
    assert_eq!(sv["dirty_tracker"], "kvm-log", "{sv}");
    assert_eq!(sv["switchover_digest"], rv["switchover_digest"]);
    assert_ran_clean("recv", &rv);
}

#[test]
fn a_kvm_guest_moves_with_tls_zstd_and_auto_converge() {
    if !kvm_or_skip("a_kvm_guest_moves_with_tls_zstd_and_auto_converge") {
        return;
    }
    let dir = tmp();
    let certs = dir.path().join("certs");
    let d = run(&["certs", "--out", s(&certs), "--host", "127.0.0.1"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    let (sent, got) = send_recv(
        &[
            "--tls-dir",
            s(&certs),
            "--compress",
            "zstd",
            "--auto-converge",
            "--downtime-limit",
            "100ms",
        ],
        &["--tls-dir", s(&certs), "--compress", "zstd"],
    );
    let sv = sent.completed();
    let rv = got.completed();
    assert_eq!(
        (sv["tls"].as_bool(), rv["tls"].as_bool()),
        (Some(true), Some(true))
    );
    assert!(
        sv["compression"].as_str().unwrap().starts_with("zstd"),
        "{sv}"
    );
    assert_ran_clean("recv", &rv);
}

#[test]
fn the_control_socket_holds_a_kvm_migration_before_switchover_and_continues_it() {
    if !kvm_or_skip("the_control_socket_holds_a_kvm_migration_before_switchover_and_continues_it") {
        return;
    }
    let dir = tmp();
    let sock = dir.path().join("send.sock");
    let (recv, port) = start_recv(&["--run-after", "1s"]);
    let to = format!("tcp:127.0.0.1:{port}");
    let mut args = vec!["send"];
    args.extend(GUEST);
    args.extend([
        "--to",
        &to,
        "--json",
        "--pause-before-switchover",
        "--control",
        s(&sock),
    ]);
    let send = Proc::spawn(&args);
    let q = wait_for_query(&sock, |q| q["status"] == "pre-switchover");
    assert!(q["ram"]["dirty-sync-count"].as_u64() >= Some(1), "{q}");
    let (code, _) = ctl(&sock, &["set", "downtime-limit=1000"]);
    assert_eq!(code, Some(0));
    let (code, v) = ctl(&sock, &["continue"]);
    assert_eq!(code, Some(0), "{v}");
    let sv = send.wait(DEADLINE).completed();
    assert_eq!(sv["dirty_tracker"], "kvm-log", "{sv}");
    assert_ran_clean("recv", &recv.wait(DEADLINE).completed());
}

/// `ferry save GUEST --to FILE --json EXTRA...`, completed (a background
/// save reports no digest of memory: the guest ran on).
fn save(path: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["save"];
    args.extend(GUEST);
    args.extend(["--to", s(path), "--json"]);
    args.extend_from_slice(extra);
    let d = run(&args);
    let v = d.summary();
    assert_eq!(
        (d.code(), v["status"].as_str()),
        (Some(0), Some("completed")),
        "{v}\n{}",
        d.stderr
    );
    v
}

fn restore_and_run(path: &Path, extra: &[&str]) -> Done {
    let mut args = vec![
        "restore",
        "--from",
        s(path),
        "--run-guest",
        "--run-for",
        "1s",
        "--json",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn save_then_restore_runs_the_kvm_guest_clean_eagerly_and_lazily() {
    if !kvm_or_skip("save_then_restore_runs_the_kvm_guest_clean_eagerly_and_lazily") {
        return;
    }
    let dir = tmp();
    let f = dir.path().join("guest.ferry");
    let saved = save(&f, &["--verify-digest"]);
    assert_eq!(saved["mode"], "live", "{saved}");
    let eager = restore_and_run(&f, &[]);
    let v = eager.completed();
    assert_eq!(
        v["switchover_digest"], saved["switchover_digest"],
        "memory and vCPU state as saved"
    );
    assert_ran_clean("restore", &v);
    let lazy = restore_and_run(&f, &["--lazy"]);
    let v = lazy.summary();
    assert_eq!(v["status"], "completed", "{v}\n{}", lazy.stderr);
    assert!(v["lazy"]["first_write_ms"].is_number(), "{v}");
    assert_ran_clean("restore --lazy", &v);
}

#[test]
fn a_background_save_of_a_running_kvm_guest_holds_it_as_at_the_pause() {
    if !kvm_or_skip("a_background_save_of_a_running_kvm_guest_holds_it_as_at_the_pause") {
        return;
    }
    let dir = tmp();
    let f = dir.path().join("bg.ferry");
    let saved = save(
        &f,
        &["--background", "--digest-at-pause", "--verify-digest"],
    );
    assert_eq!(saved["mode"], "background", "{saved}");
    assert_eq!(saved["file_digest"], saved["digest_at_pause"], "{saved}");
    let v = restore_and_run(&f, &[]).completed();
    assert_ran_clean("restore", &v);
}

/// Byte offset of vCPU 0's sregs payload in the KVM device state: header
/// 28, regs section 12 + 144, sregs section header 12 (vmm/src/state.rs).
const VCPU0_SREGS: u64 = 28 + 12 + 144 + 12;

fn flip(path: &Path, offset: u64) {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], offset).unwrap();
}

#[test]
fn a_flipped_byte_in_saved_vcpu_state_is_refused_before_the_vm_runs() {
    if !kvm_or_skip("a_flipped_byte_in_saved_vcpu_state_is_refused_before_the_vm_runs") {
        return;
    }
    let dir = tmp();
    let good = dir.path().join("good.ferry");
    save(&good, &[]);
    let layout = FileLayout::read(&File::open(&good).unwrap(), &good).unwrap();
    let at = layout.device_state_offset + VCPU0_SREGS + 10;

    // As it lands on disk: the file's own checksum of the device state
    // catches it.
    let bad = dir.path().join("bad.ferry");
    std::fs::copy(&good, &bad).unwrap();
    flip(&bad, at);
    let d = restore_and_run(&bad, &[]);
    let (v, err) = d.failed();
    assert_contains(&err, &["device state"]);
    assert!(v.get("workload").is_none(), "never ran: {v}");

    // Damaged before it was saved (the file's checksum agrees with it):
    // the vCPU state's own section checksum refuses it, naming the field.
    let f = File::open(&bad).unwrap();
    let mut state = vec![0u8; layout.device_state_len as usize];
    f.read_exact_at(&mut state, layout.device_state_offset)
        .unwrap();
    let mut lying = layout.clone();
    lying.device_state_checksum = region_checksum(&state);
    File::options()
        .write(true)
        .open(&bad)
        .unwrap()
        .write_all_at(&lying.encode(), 0)
        .unwrap();
    let d = restore_and_run(&bad, &[]);
    let (v, err) = d.failed();
    assert_contains(&err, &["vCPU 0 sregs", "crc"]);
    assert!(v.get("workload").is_none(), "never ran: {v}");
    let d = restore_and_run(&bad, &["--lazy"]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stdout, &["vCPU 0 sregs"]);

    // The untouched file still runs clean.
    assert_ran_clean("restore", &restore_and_run(&good, &[]).completed());
}

#[test]
fn kvm_log_tracks_a_migration_and_kvm_ring_runs_or_says_why_not() {
    if !kvm_or_skip("kvm_log_tracks_a_migration_and_kvm_ring_runs_or_says_why_not") {
        return;
    }
    let (sent, got) = send_recv(&["--dirty-tracker", "kvm-log"], &[]);
    assert_eq!(sent.completed()["dirty_tracker"], "kvm-log");
    assert_ran_clean("recv (kvm-log)", &got.completed());

    match ferry_vmm::dirty_ring_usable() {
        Ok(()) => {
            let (sent, got) = send_recv(&["--dirty-tracker", "kvm-ring"], &[]);
            assert_eq!(sent.completed()["dirty_tracker"], "kvm-ring");
            assert_ran_clean("recv (kvm-ring)", &got.completed());
        }
        Err(why) => {
            eprintln!(
                "kvm_log_tracks_a_migration_and_kvm_ring_runs_or_says_why_not: kvm-ring \
                 migration SKIPPED: {why}"
            );
            let mut args = vec!["send"];
            args.extend(GUEST);
            args.extend([
                "--dirty-tracker",
                "kvm-ring",
                "--to",
                "tcp:127.0.0.1:1",
                "--json",
            ]);
            let (_, err) = run(&args).failed();
            assert_contains(&err, &["kvm-ring", "KVM_CAP_DIRTY_LOG_RING"]);
        }
    }
}

#[test]
fn without_a_usable_dev_kvm_guest_kvm_fails_naming_it() {
    let send = [
        "send",
        "--guest",
        "kvm",
        "--size",
        "32M",
        "--to",
        "tcp:127.0.0.1:1",
        "--json",
    ];
    let d = if ferry_vmm::kvm_usable().is_err() {
        run(&send)
    } else {
        // Hide /dev/kvm behind /dev/null in a mount namespace of our own.
        let unshare = std::process::Command::new("unshare")
            .args(["--mount", "true"])
            .status();
        if !matches!(unshare, Ok(s) if s.success()) {
            eprintln!(
                "without_a_usable_dev_kvm_guest_kvm_fails_naming_it: SKIPPED: /dev/kvm works \
                 here and `unshare --mount` (root) is not available to hide it"
            );
            return;
        }
        let script = format!(
            "mount --bind /dev/null /dev/kvm && exec {} {}",
            env!("CARGO_BIN_EXE_ferry"),
            send.join(" ")
        );
        let out = std::process::Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .output()
            .unwrap();
        Done {
            name: "ferry send --guest kvm (no /dev/kvm)".into(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    };
    let (_, err) = d.failed();
    assert_contains(&err, &["--guest kvm needs a usable /dev/kvm"]);
}

/// A `ferry recv` in a mount namespace where /dev/kvm is /dev/null, and
/// the `tcp:` address it listens on; `None` (the test skips, saying why)
/// without /dev/kvm here or without `unshare --mount` (root).
fn recv_without_dev_kvm(test: &str) -> Option<(std::process::Child, support::Pipes, String)> {
    if !kvm_or_skip(test) {
        return None;
    }
    if !matches!(
        std::process::Command::new("unshare").args(["--mount", "true"]).status(),
        Ok(st) if st.success()
    ) {
        eprintln!("{test}: SKIPPED: `unshare --mount` (root) is not available to hide /dev/kvm");
        return None;
    }
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec {} recv --listen tcp:127.0.0.1:0 --json",
        env!("CARGO_BIN_EXE_ferry")
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "sh", "-c", &script]);
    let (child, pipes) = support::Pipes::spawn(&mut cmd, "ferry recv (no /dev/kvm)");
    let uri = pipes.listening(DEADLINE).expect("the destination listens");
    let to = format!("tcp:127.0.0.1:{}", support::local_port(&uri));
    Some((child, pipes, to))
}

#[test]
fn a_destination_without_dev_kvm_fails_the_migration_naming_it_and_the_source_runs_on() {
    let test = "a_destination_without_dev_kvm_fails_the_migration_naming_it_and_the_source_runs_on";
    let Some((mut child, mut pipes, to)) = recv_without_dev_kvm(test) else {
        return;
    };
    let mut args = vec!["send"];
    args.extend(GUEST);
    args.extend(["--to", &to, "--json"]);
    let sent = Proc::spawn(&args).wait(DEADLINE);
    let _ = child.wait();
    let (out, _) = pipes.collect();
    let (sv, err) = sent.failed();
    assert_contains(&err, &["/dev/kvm"]);
    assert_eq!(sv["guest_running"], true, "the source guest runs on: {sv}");
    assert_contains(&out, &["needs a usable /dev/kvm here"]);
}

/// Exit status 2 (clap's usage error) with every part in the message.
fn assert_usage_error(args: &[&str], parts: &[&str]) {
    let d = run(args);
    assert_eq!(d.code(), Some(2), "ferry {args:?}:\n{}", d.stderr);
    assert_contains(&d.stderr, parts);
}

#[test]
fn options_that_do_not_fit_a_kvm_guest_are_usage_errors_and_help_explains_kvm() {
    let to = ["--to", "tcp:127.0.0.1:1"];
    let kvm = ["send", "--guest", "kvm", "--size", "32M"];
    for (extra, parts) in [
        (
            &["--dirty-tracker", "bitmap"][..],
            &[
                "--dirty-tracker bitmap only applies to a synthetic guest",
                "kvm-log or kvm-ring",
            ][..],
        ),
        (
            &["--ram", "/dev/null"],
            &["--ram only applies to an image or synthetic guest"],
        ),
        (
            &["--device-state", "/dev/null"],
            &["--device-state only applies to an image guest"],
        ),
    ] {
        let mut args = kvm.to_vec();
        args.extend_from_slice(extra);
        args.extend(to);
        assert_usage_error(&args, parts);
    }
    assert_usage_error(
        &[
            "send",
            "--guest",
            "synthetic",
            "--size",
            "4M",
            "--dirty-tracker",
            "kvm-ring",
            "--to",
            "tcp:127.0.0.1:1",
        ],
        &["--dirty-tracker kvm-ring only applies to a KVM guest (--guest kvm)"],
    );
    for cmd in ["send", "save"] {
        let d = run(&[cmd, "--help"]);
        assert_contains(
            &d.stdout,
            &[
                "kvm",
                "/dev/kvm",
                "kvm-log",
                "kvm-ring",
                "KVM_CLEAR_DIRTY_LOG",
            ],
        );
    }
    let d = run(&["restore", "--help"]);
    assert_contains(&d.stdout, &["--run-guest", "--run-for", "KVM guest"]);
}

/// Every JSON summary object a `ferry ... --json` printed (events left out),
/// in order: a forwarding `recv` prints its own, then its `send`'s.
fn summaries(d: &Done) -> Vec<Value> {
    d.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.is_object() && v.get("event").is_none())
        .collect()
}

/// The number of live migrations in the ping-pong.
const HOPS: usize = 20;

/// Issue #15: 20 live migrations in a row through separate CLI processes.
/// `ferry send --guest kvm` boots the guest and sends it to the first of
/// 20 `ferry recv --forward-to` processes, each of which runs it 300 ms
/// and hands it on, running, to the next; the last runs it and stops it.
/// Every hop: the migration completed, the guest's self-check found no
/// wrong word, no vCPU stopped, and every vCPU's counters advanced after
/// the resume; and each hop's guest starts from at least the writes the
/// previous one had counted (the same guest went on, not a fresh one).
#[test]
fn twenty_live_migrations_through_cli_processes_keep_the_kvm_guest_clean_and_running() {
    if !kvm_or_skip(
        "twenty_live_migrations_through_cli_processes_keep_the_kvm_guest_clean_and_running",
    ) {
        return;
    }
    // Started from the last: each forwards to the one started before it.
    let mut recvs = Vec::with_capacity(HOPS);
    let mut next: Option<String> = None;
    for _ in 0..HOPS {
        let mut args = vec!["--run-after", "300ms", "--prebuild-kvm"];
        if let Some(to) = &next {
            args.extend(["--forward-to", to.as_str()]);
        }
        let (p, port) = start_recv(&args);
        next = Some(format!("tcp:127.0.0.1:{port}"));
        recvs.push(p);
    }
    recvs.reverse();
    let to = next.unwrap();
    let mut args = vec!["send"];
    args.extend(GUEST);
    args.extend(["--to", &to, "--json"]);
    Proc::spawn(&args).wait(DEADLINE).completed();

    let mut writes_before = 0;
    for (hop, p) in recvs.into_iter().enumerate() {
        let d = p.wait(DEADLINE);
        let who = format!("hop {}", hop + 1);
        let all = summaries(&d);
        let last = hop + 1 == HOPS;
        assert_eq!(
            (d.code(), all.len()),
            (Some(0), if last { 1 } else { 2 }),
            "{who}: exit status and summaries: {all:?}\nstderr:\n{}",
            d.stderr
        );
        let got = &all[0];
        assert_eq!(got["status"], "completed", "{who}: {got}");
        let w = &got["workload"];
        assert_eq!(w["self_check_errors"], 0, "{who}: self-check: {got}");
        assert!(w.get("guest_failure").is_none(), "{who}: {got}");
        assert_eq!(w["continued"], true, "{who}: every vCPU wrote on: {got}");
        let (at, after) = (
            w["writes_at_switchover"].as_u64().unwrap(),
            w["writes_after"].as_u64().unwrap(),
        );
        assert!(after > at, "{who}: the counters advance: {got}");
        assert!(
            at >= writes_before,
            "{who}: the guest arrived with {at} writes, fewer than the {writes_before} \
             the previous hop counted: not the same guest"
        );
        writes_before = after;
        if !last {
            let sent = &all[1];
            assert_eq!(sent["status"], "completed", "{who}: forwarding: {sent}");
        }
    }
}

/// The KVM guest's options for postcopy: as [`GUEST`], writing 64 MiB/s
/// (asked: this machine's nested KVM gets less) so the pages left at the
/// switch are many.
const PC_GUEST: [&str; 8] = [
    "--guest",
    "kvm",
    "--size",
    "32M",
    "--vcpus",
    "2",
    "--dirty-rate",
    "64M",
];

/// A postcopy of the KVM guest that ended: both summaries, and both
/// sides' statuses in order.
struct PostcopyRun {
    sent: Value,
    got: Value,
    send_statuses: Vec<String>,
    recv_statuses: Vec<String>,
}

/// `ferry send PC_GUEST --postcopy SEND_EXTRA...` to `ferry recv
/// --run-after 1s RECV_EXTRA...`; with `start`, the switch is asked for
/// by `ferry ctl SOCK start-postcopy` once precopy is active. Both must
/// complete.
fn postcopy_run(send_extra: &[&str], recv_extra: &[&str], start: bool) -> PostcopyRun {
    let dir = tmp();
    let sock = dir.path().join("send.sock");
    let mut r = vec!["--run-after", "1s"];
    r.extend_from_slice(recv_extra);
    let (recv, port) = start_recv(&r);
    // With `start`, through a relay at 64 KiB/s a channel until the
    // switch is asked for: precopy stays active (its first pass takes
    // seconds) for however long a loaded machine takes to ask.
    let relay = start.then(|| CutRelay::start(port, 64 << 10));
    let to = format!("tcp:127.0.0.1:{}", relay.as_ref().map_or(port, |r| r.port));
    let mut args = vec!["send"];
    args.extend(PC_GUEST);
    args.extend(["--to", &to, "--json", "--postcopy"]);
    args.extend_from_slice(send_extra);
    if start {
        args.extend(["--control", s(&sock)]);
    }
    let send = Proc::spawn(&args);
    if let Some(relay) = &relay {
        wait_for_query(&sock, |q| q["status"] == "active");
        let (code, v) = ctl(&sock, &["start-postcopy"]);
        assert_eq!(code, Some(0), "start-postcopy: {v}");
        relay.set_rate(0);
    }
    let (sent, got) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    PostcopyRun {
        sent: sent.completed(),
        got: got.completed(),
        send_statuses: sent.statuses(),
        recv_statuses: got.statuses(),
    }
}

/// What every postcopy of the KVM guest must show: both sides went
/// through postcopy-active to completed, the source's guest stays paused
/// and the destination's runs, its vCPUs wrote on after the switch and
/// its self-check (which reads back every word it wrote, on pages that
/// came by precopy, by request and by the push) found nothing wrong.
fn assert_postcopy_clean(who: &str, run: &PostcopyRun) {
    for (side, st) in [("send", &run.send_statuses), ("recv", &run.recv_statuses)] {
        assert!(
            st.iter().any(|s| s == "postcopy-active"),
            "{who}: {side} never in postcopy: {st:?}"
        );
        assert_eq!(
            st.last().map(String::as_str),
            Some("completed"),
            "{who}: {side}: {st:?}"
        );
    }
    let (sv, rv) = (&run.sent, &run.got);
    assert_eq!(
        sv["guest_running"], false,
        "{who}: the source stays paused: {sv}"
    );
    assert_eq!(rv["guest_running"], true, "{who}: {rv}");
    assert!(rv["postcopy_requests"].as_u64().is_some(), "{who}: {rv}");
    assert_ran_clean(&format!("{who}: recv"), rv);
    // The synthetic guest's replay check is not this guest's: it checks
    // itself, and the destination keeps no copy of its memory for it.
    assert!(
        rv["workload"].get("replay_equal").is_none(),
        "{who}: a replay check on a KVM guest: {rv}"
    );
}

/// Issue #15 item 5: the KVM guest under postcopy, switched by each
/// trigger. `--postcopy-after 1` (and 0: huge pages moved in whole);
/// `ctl start-postcopy` into a destination
/// that prepared its VM beforehand (`--prebuild-kvm`: the memory slots
/// were made before userfaultfd registered that memory); and the
/// automatic switch when precopy does not converge (1 ms of downtime
/// allowed over 2 MiB/s), slow enough that the vCPUs touch pages still
/// missing: KVM's own accesses (get_user_pages on a userfaultfd-registered
/// range) become page requests the source answers.
#[test]
fn a_kvm_guest_moves_under_postcopy_on_each_trigger_with_its_self_check_clean() {
    if !kvm_or_skip("a_kvm_guest_moves_under_postcopy_on_each_trigger_with_its_self_check_clean") {
        return;
    }
    // 1 ms of downtime allowed: precopy never converges on its own, so
    // only the trigger under test ends it (a loaded machine's guest
    // dirties so little that a pass could otherwise converge first).
    let after = postcopy_run(
        &["--postcopy-after", "1", "--downtime-limit", "1ms"],
        &[],
        false,
    );
    assert_postcopy_clean("--postcopy-after 1", &after);
    assert_eq!(after.sent["passes"], 1, "{}", after.sent);

    // Before any pass: every page is missing, so whole 2 MiB regions are
    // asked for and moved into the VM's memory as huge pages (UFFDIO_MOVE,
    // Linux 6.8+) under KVM's own mappings of it.
    let first = postcopy_run(
        &["--postcopy-after", "0", "--downtime-limit", "1ms"],
        &[],
        false,
    );
    assert_postcopy_clean("--postcopy-after 0", &first);
    assert_eq!(first.sent["passes"], 0, "{}", first.sent);
    let moved = first.got["postcopy_huge_pages_moved"].as_u64();
    if ferry_ram::uffd::Userfault::open_with_move().is_ok_and(|u| u.can_move()) {
        assert!(
            moved > Some(0),
            "no huge page moved in whole: {}",
            first.got
        );
    }

    let asked = postcopy_run(&["--downtime-limit", "1ms"], &["--prebuild-kvm"], true);
    assert_postcopy_clean("ctl start-postcopy, --prebuild-kvm", &asked);

    // The automatic switch needs a guest that keeps dirtying pages. On a
    // loaded machine its vCPUs may not run at all during a short pass (a
    // few pages at 2 MiB/s), and precopy then rightly converges, without
    // postcopy (seen twice in CI runs). Up to three tries; each must end
    // completed either way.
    let auto = (0..3)
        .map(|_| {
            postcopy_run(
                &["--downtime-limit", "1ms", "--max-bandwidth", "2M"],
                &[],
                false,
            )
        })
        .find(|r| {
            let switched = r.send_statuses.iter().any(|s| s == "postcopy-active");
            if !switched {
                assert_eq!(
                    r.send_statuses.last().map(String::as_str),
                    Some("completed"),
                    "a precopy that converged must complete: {:?}",
                    r.send_statuses
                );
                eprintln!("precopy converged without postcopy (vCPUs starved?): trying again");
            }
            switched
        })
        .expect("in three tries precopy converged every time: the guest never kept dirtying");
    assert_postcopy_clean("precopy does not converge", &auto);
    let rv = &auto.got;
    assert!(
        rv["postcopy_requests"].as_u64().unwrap() > 0,
        "the vCPUs never faulted on a missing page: {rv}"
    );
}

/// A TCP relay to 127.0.0.1:`to` that [`CutRelay::cut`] can cut: every
/// connection forwarded both ways, toward the destination at most
/// `rate` bytes/s per connection (0: as fast as it goes; changed with
/// [`CutRelay::set_rate`]); after a cut, new connections are relayed
/// again.
struct CutRelay {
    port: u16,
    open: Arc<Mutex<Vec<TcpStream>>>,
    rate: Arc<AtomicU64>,
}

impl CutRelay {
    fn start(to: u16, rate: u64) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let open: Arc<Mutex<Vec<TcpStream>>> = Default::default();
        let rate = Arc::new(AtomicU64::new(rate));
        let (o, r) = (open.clone(), rate.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(src) = c else { return };
                let Ok(dst) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let _ = (src.set_nodelay(true), dst.set_nodelay(true));
                o.lock()
                    .unwrap()
                    .extend([src.try_clone().unwrap(), dst.try_clone().unwrap()]);
                let (a, b, up) = (
                    src.try_clone().unwrap(),
                    dst.try_clone().unwrap(),
                    r.clone(),
                );
                std::thread::spawn(move || relay_paced(a, b, Some(&up)));
                std::thread::spawn(move || relay_paced(dst, src, None));
            }
        });
        Self { port, open, rate }
    }

    fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Cuts every connection it relays, both ways, at once.
    fn cut(&self) {
        for c in self.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` until either ends, each chunk followed by the
/// time it takes at `rate` bytes/s, if a rate is set.
fn relay_paced(mut from: TcpStream, mut to: TcpStream, rate: Option<&AtomicU64>) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        match rate.map(|r| r.load(Ordering::Relaxed)) {
            Some(r) if r > 0 => std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64)),
            _ => {}
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Issue #15 item 5: a KVM guest's postcopy whose link is cut after the
/// switch. Both sides pause (postcopy-paused); the destination's vCPUs
/// that touch a missing page meanwhile stay blocked in KVM_RUN on it (a
/// fault held more than the second the link stays cut); `ctl recover`
/// and `ctl resume` reconnect every channel, and the migration completes
/// with the guest's self-check clean and its counters advancing.
#[test]
fn a_kvm_guest_postcopy_with_its_link_cut_pauses_and_recovers_with_its_self_check_clean() {
    if !kvm_or_skip(
        "a_kvm_guest_postcopy_with_its_link_cut_pauses_and_recovers_with_its_self_check_clean",
    ) {
        return;
    }
    let dir = tmp();
    let (rsock, ssock) = (dir.path().join("recv.sock"), dir.path().join("send.sock"));
    let (recv, port) = start_recv(&["--run-after", "1s", "--control", s(&rsock)]);
    // 256 KiB/s a channel toward the destination: the first pass takes
    // seconds, the guest dirties many pages meanwhile, and pushing those
    // after the switch takes seconds more.
    let relay = CutRelay::start(port, 256 << 10);
    let via = format!("tcp:127.0.0.1:{}", relay.port);
    let mut args = vec!["send"];
    args.extend(PC_GUEST);
    args.extend([
        "--to",
        &via,
        "--json",
        "--postcopy",
        "--postcopy-after",
        "1",
    ]);
    // Precopy never converges on its own: the switch is postcopy's.
    args.extend(["--downtime-limit", "1ms", "--control", s(&ssock)]);
    let send = Proc::spawn(&args);
    // Cut once the destination holds the package and runs the guest (a
    // cut before the package lands fails the destination: nothing to
    // recover there).
    wait_for_query(&rsock, |q| q["status"] == "postcopy-active");
    relay.cut();
    // The rest at full speed, once recovered.
    relay.set_rate(0);
    wait_for_query(&ssock, |q| q["status"] == "postcopy-paused");
    wait_for_query(&rsock, |q| q["status"] == "postcopy-paused");
    // The guest runs on the destination meanwhile, its vCPUs blocking
    // one by one on pages that cannot come.
    std::thread::sleep(Duration::from_secs(1));
    let here = format!("tcp:127.0.0.1:{port}");
    let (code, v) = ctl(&rsock, &["recover", &here]);
    assert_eq!(code, Some(0), "recover: {v}");
    let (code, v) = ctl(&ssock, &["resume", &via]);
    assert_eq!(code, Some(0), "resume: {v}");
    let (sent, got) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let run = PostcopyRun {
        sent: sent.completed(),
        got: got.completed(),
        send_statuses: sent.statuses(),
        recv_statuses: got.statuses(),
    };
    assert_postcopy_clean("cut and recovered", &run);
    for (side, st, v) in [
        ("send", &run.send_statuses, &run.sent),
        ("recv", &run.recv_statuses, &run.got),
    ] {
        assert_eq!(v["recoveries"], 1, "{side}: {v}");
        for want in ["postcopy-paused", "postcopy-recover"] {
            assert!(st.iter().any(|s| s == want), "{side}: no {want}: {st:?}");
        }
    }
    let rv = &run.got;
    eprintln!(
        "cut and recovered: {} page request(s), longest fault {} us, {} page(s) discarded at the switch",
        rv["postcopy_requests"], rv["fault_latency_max_us"], rv["postcopy_discarded_pages"]
    );
    assert!(
        rv["fault_latency_max_us"].as_u64().unwrap() >= 1_000_000,
        "no vCPU was held on a missing page while the link was cut: {rv}"
    );
}

/// Issue #15 item 5, 2: a destination that refuses the device state
/// after the postcopy switch (here a KVM guest's, on a host whose
/// /dev/kvm is not usable) fails, and so does the source: exit 1, status
/// failed, naming the destination's reason. The source's guest stays
/// paused: past the switch neither side alone holds the whole guest (the
/// destination has the pages sent so far, the source the newest state of
/// the rest), so resuming it here could run a guest whose pages the
/// destination also changed.
#[test]
fn a_destination_refusing_the_state_after_the_postcopy_switch_fails_the_source_paused() {
    let test = "a_destination_refusing_the_state_after_the_postcopy_switch_fails_the_source_paused";
    let Some((mut child, mut pipes, to)) = recv_without_dev_kvm(test) else {
        return;
    };
    let mut args = vec!["send"];
    args.extend(GUEST);
    args.extend(["--to", &to, "--json", "--postcopy", "--postcopy-after", "1"]);
    let sent = Proc::spawn(&args).wait(DEADLINE);
    let recv_exit = child.wait().unwrap();
    let (out, _) = pipes.collect();
    let (sv, err) = sent.failed();
    assert!(
        sent.statuses().iter().any(|s| s == "postcopy-active"),
        "the source switched to postcopy: {:?}",
        sent.statuses()
    );
    assert_contains(&err, &["the destination failed", "/dev/kvm"]);
    assert_eq!(
        sv["guest_running"], false,
        "the source guest stays paused: {sv}"
    );
    assert_eq!(recv_exit.code(), Some(1), "the destination exits 1:\n{out}");
    assert_contains(
        &out,
        &["\"status\":\"failed\"", "needs a usable /dev/kvm here"],
    );
}
