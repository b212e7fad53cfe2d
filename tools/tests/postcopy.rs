//! `ferry send --postcopy` and `ferry ctl start-postcopy` between two
//! processes over loopback (32 MiB synthetic guests).

mod support;

use std::time::Duration;

use support::{ctl, start_recv, start_send_synthetic, wait_for_query};

const DEADLINE: Duration = Duration::from_secs(60);

/// A pass held to 32 MiB/s gives `ctl start-postcopy` a second of precopy
/// to land in; the migration then switches after that pass (before it,
/// had the request come before it began), and both
/// sides report postcopy's phase and figures.
#[test]
fn ctl_start_postcopy_switches_and_both_sides_report_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("send.sock");
    let (recv, port) = start_recv(&[]);
    let send = start_send_synthetic(
        port,
        &[
            "--postcopy",
            "--max-bandwidth",
            "32M",
            "--downtime-limit",
            "1ms",
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    wait_for_query(&sock, |q| q["status"] == "active");
    let (code, v) = ctl(&sock, &["start-postcopy"]);
    assert_eq!(code, Some(0), "{v}");
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let (sv, rv) = (s.completed(), r.completed());
    // At its first chance: after the pass in flight, or before the first
    // if the request came before it began.
    assert!(
        sv["passes"].as_u64().is_some_and(|p| p <= 1),
        "switched after the pass in flight: {sv}"
    );
    for (side, done, v) in [("send", &s, &sv), ("recv", &r, &rv)] {
        assert!(
            done.statuses().iter().any(|st| st == "postcopy-active"),
            "{side}: {:?}",
            done.statuses()
        );
        assert!(
            v["postcopy_discarded_pages"].as_u64().is_some(),
            "{side}: {v}"
        );
        assert!(v["postcopy_bytes"].as_u64().is_some(), "{side}: {v}");
    }
    for key in [
        "fault_latency_p50_us",
        "fault_latency_p99_us",
        "fault_latency_max_us",
    ] {
        assert!(rv[key].as_u64().is_some(), "{key}: {rv}");
    }
    assert!(rv["guest_blocked_ms"].as_f64().is_some(), "{rv}");
    assert_eq!(sv["guest_running"], false, "the source stays paused");
    assert_eq!(rv["guest_running"], true);
}

/// Without `--postcopy`, `ctl start-postcopy` is refused saying why; the
/// migration goes on (cancelled here).
#[test]
fn ctl_start_postcopy_without_the_capability_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("send.sock");
    let (recv, port) = start_recv(&[]);
    let send = start_send_synthetic(
        port,
        &["--max-bandwidth", "8M", "--control", sock.to_str().unwrap()],
    );
    wait_for_query(&sock, |q| q["status"] == "active");
    let (code, v) = ctl(&sock, &["start-postcopy"]);
    assert_eq!(code, Some(1), "{v}");
    let desc = v["error"]["desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("does not have the postcopy capability"),
        "{v}"
    );
    assert!(desc.contains("--postcopy"), "{v}");
    let (code, _) = ctl(&sock, &["cancel"]);
    assert_eq!(code, Some(0));
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    assert_eq!(s.summary()["status"], "cancelled");
    assert_eq!(r.summary()["status"], "cancelled");
}

/// `recv --run-after` after a postcopy: the guest runs, is paused, and the
/// replay check (its memory against the source's at the switch with its
/// own writes replayed) is reported equal; `--no-postcopy-preempt` and
/// `--postcopy-recover auto` are taken. `ctl recover` on a side that is
/// not paused is refused saying why.
#[test]
fn recv_run_after_reports_the_postcopy_replay_check() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("recv.sock");
    let (recv, port) = start_recv(&[
        "--run-after",
        "0.3",
        "--postcopy-recover",
        "auto",
        "--control",
        sock.to_str().unwrap(),
    ]);
    let (code, v) = ctl(&sock, &["recover", "tcp:127.0.0.1:1"]);
    assert_eq!(code, Some(1), "{v}");
    let desc = v["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("only a postcopy in 'postcopy-paused'"), "{v}");
    let send = start_send_synthetic(
        port,
        &[
            "--dirty-rate",
            "1G",
            "--postcopy",
            "--postcopy-after",
            "1",
            "--no-postcopy-preempt",
            "--postcopy-recover",
            "auto",
        ],
    );
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let (sv, rv) = (s.completed(), r.completed());
    assert_eq!(sv["recoveries"], 0, "{sv}");
    assert_eq!(rv["workload"]["replay_equal"], true, "{rv}");
    assert!(
        rv["workload"]["replay_writes"].as_u64().unwrap() > 0,
        "{rv}"
    );
}
