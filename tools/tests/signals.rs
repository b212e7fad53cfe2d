//! Ctrl-C (SIGINT) and SIGTERM on `ferry send`, `recv` and `save`: the
//! first signal cancels through the normal cancel path (the source guest
//! runs on, the summaries say cancelled, the exit status is 1); a second
//! one, or one when there is nothing to cancel, exits at once with the
//! shell's status (130 for SIGINT, 143 for SIGTERM).
//!
//! Every child runs under a deadline; no test asserts timing.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{assert_contains, start_recv, start_send_synthetic, wait_for_query, Proc, DEADLINE};

const CANCELLING: &str = "ferry: cancelling (press Ctrl-C again to exit at once)";

/// A rate-limited synthetic guest (32 MiB at 1 MiB/s: half a minute at
/// least), so the migration is still running when the test signals it.
fn start_slow_send(port: u16, control: &Path) -> Proc {
    start_send_synthetic(
        port,
        &[
            "--max-bandwidth",
            "1M",
            "--control",
            control.to_str().unwrap(),
        ],
    )
}

#[test]
fn sigint_or_sigterm_on_send_cancels_and_the_source_guest_runs_on() {
    for sig in ["INT", "TERM"] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("send.sock");
        let (recv, port) = start_recv(&["--timeout", "30s"]);
        let send = start_slow_send(port, &sock);
        wait_for_query(&sock, |q| {
            q["status"] == "active" && q["ram"]["transferred"].as_u64() > Some(0)
        });
        send.signal(sig);
        let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));

        let v = s.json();
        assert_eq!(
            (s.code(), v["status"].as_str()),
            (Some(1), Some("cancelled")),
            "SIG{sig}: {v}\n{}",
            s.stderr
        );
        assert_eq!(v["guest_running"], true, "the source guest runs on: {v}");
        assert_eq!(
            s.stderr.matches(CANCELLING).count(),
            1,
            "one line at the signal:\n{}",
            s.stderr
        );
        let statuses = s.statuses();
        assert!(statuses.contains(&"cancelling".to_string()), "{statuses:?}");
        assert_eq!(statuses.last().map(String::as_str), Some("cancelled"));

        let rv = r.json();
        assert_eq!(
            (r.code(), rv["status"].as_str()),
            (Some(1), Some("cancelled")),
            "{rv}"
        );
        assert_contains(rv["error"].as_str().unwrap(), &["cancelled by the source"]);
        assert_eq!(rv["guest_running"], false, "the destination discards: {rv}");
    }
}

#[test]
fn sigint_on_recv_mid_migration_discards_and_the_source_guest_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("send.sock");
    let rsock = dir.path().join("recv.sock");
    let (recv, port) = start_recv(&["--timeout", "30", "--control", rsock.to_str().unwrap()]);
    let send = start_slow_send(port, &sock);
    wait_for_query(&rsock, |q| q["status"] == "active");
    recv.signal("INT");
    let (r, s) = (recv.wait(DEADLINE), send.wait(DEADLINE));

    let rv = r.json();
    assert_eq!(
        (r.code(), rv["status"].as_str()),
        (Some(1), Some("cancelled")),
        "{rv}\n{}",
        r.stderr
    );
    assert_contains(
        rv["error"].as_str().unwrap(),
        &["cancelled on the destination"],
    );
    assert_eq!(rv["guest_running"], false, "{rv}");
    assert!(r.stderr.contains(CANCELLING), "{}", r.stderr);

    let v = s.json();
    assert_eq!(s.code(), Some(1), "{v}");
    assert_ne!(v["status"], "completed", "{v}");
    assert_eq!(v["guest_running"], true, "the source guest runs on: {v}");
}

#[test]
fn a_signal_while_recv_waits_for_a_source_exits_at_once() {
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let (recv, _port) = start_recv(&[]);
        recv.signal(sig);
        let d = recv.wait(DEADLINE);
        assert_eq!(
            d.code(),
            Some(code),
            "SIG{sig}: the handler's exit status (a default kill has none):\n{}",
            d.stderr
        );
        assert!(
            !d.stderr.contains("cancelling"),
            "nothing to cancel:\n{}",
            d.stderr
        );
    }
}

/// Files in `dir` whose name has `.partial`.
fn partial_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial"))
        .collect()
}

/// A live save of a synthetic guest that never converges on its own: a
/// downtime limit of 0 (only a pass that finds no dirty page ends it), no
/// pass limit to speak of, and vCPUs asked to dirty far more than they can,
/// so they write without pause; returns it once its unfinished file exists.
fn start_endless_save(dir: &Path) -> Proc {
    let to = format!("file:{}", dir.join("guest.sav").display());
    let p = Proc::spawn(&[
        "save",
        "--guest",
        "synthetic",
        "--size",
        "64M",
        "--dirty-rate",
        "64G",
        "--downtime-limit",
        "0",
        "--max-passes",
        "1000000000",
        "--to",
        &to,
        "--json",
    ]);
    let t = std::time::Instant::now();
    while partial_files(dir).is_empty() {
        assert!(t.elapsed() < DEADLINE, "the save never created its file");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

#[test]
fn a_second_sigint_on_save_exits_at_once_leaving_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut save = start_endless_save(dir.path());
    save.signal("INT");
    save.wait_for_line(CANCELLING);
    // A save that honours the cancel may already have ended; else the
    // second signal ends it.
    std::thread::sleep(Duration::from_millis(200));
    if save.running() {
        save.signal("INT");
    }
    let d = save.wait(DEADLINE);
    match d.code() {
        Some(130) => {}
        Some(1) => assert_eq!(d.json()["status"], "cancelled", "{}", d.stdout),
        other => panic!("exit status {other:?}:\n{}\n{}", d.stdout, d.stderr),
    }
    assert_eq!(partial_files(dir.path()), Vec::<String>::new());
    assert!(!dir.path().join("guest.sav").exists(), "no saved file");
}

#[test]
fn sigint_on_save_cancels_it_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let save = start_endless_save(dir.path());
    save.signal("INT");
    let d = save.wait(DEADLINE);
    let v = d.json();
    assert_eq!(
        (d.code(), v["status"].as_str()),
        (Some(1), Some("cancelled")),
        "{v}\n{}",
        d.stderr
    );
    assert_eq!(d.stderr.matches(CANCELLING).count(), 1, "{}", d.stderr);
    assert_eq!(partial_files(dir.path()), Vec::<String>::new());
    assert!(!dir.path().join("guest.sav").exists(), "no saved file");
}

/// `ferry bench` cancels nothing, but a signal must not leave behind what
/// it made for the measurement: its generated dataset is removed (and the
/// system settings it changed are put back, which this test does not
/// touch: `--tcp-congestion system --cold-memory` change none) before it
/// exits with the shell's status.
#[test]
fn sigint_on_bench_removes_its_dataset_and_exits_130() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut bench = Proc::spawn(&[
        "bench",
        "--size",
        "32M",
        "--channels",
        "1",
        "--runs",
        "200",
        "--cold-memory",
        "--tcp-congestion",
        "system",
        "--workdir",
        dir.path().to_str().unwrap(),
    ]);
    bench.wait_for_line("dataset: generated");
    let made: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(made.len(), 1, "the dataset is in the workdir");
    bench.signal("INT");
    let d = bench.wait(DEADLINE);
    assert_eq!(d.code(), Some(130), "{}", d.stderr);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
