//! `ferry send --colo` / `ferry recv --colo` between two processes over
//! loopback (32 MiB synthetic guest): the ctl commands (checkpoint,
//! set checkpoint-delay, query-colo-status, failover, poweroff) and the
//! summaries' `colo` object.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{ctl, start_recv, start_send_synthetic};

const DEADLINE: Duration = Duration::from_secs(60);

/// Polls query-colo-status on `sock` until `want` holds.
fn colo_status(sock: &std::path::Path, want: impl Fn(&Value) -> bool) -> Value {
    support::colo_status(sock, DEADLINE, want)
}

#[test]
fn ctl_steers_colo_and_poweroff_ends_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (ssock, rsock) = (dir.path().join("s.sock"), dir.path().join("r.sock"));
    let out = dir.path().join("out.txt");
    let (recv, port) = start_recv(&[
        "--colo",
        "--colo-output-every",
        "8",
        "--control",
        rsock.to_str().unwrap(),
    ]);
    let send = start_send_synthetic(
        port,
        &[
            "--colo",
            // An hour: only requests make checkpoints until the delay changes.
            "--checkpoint-delay",
            "3600000",
            "--colo-output",
            out.to_str().unwrap(),
            "--colo-output-every",
            "8",
            "--dirty-rate",
            "8M",
            "--control",
            ssock.to_str().unwrap(),
        ],
    );
    let s = colo_status(&ssock, |r| r["status"]["mode"] == "primary");
    assert_eq!(s["live"]["checkpoints"], 0, "{s}");
    // While COLO runs, query-migrate says colo on both sides.
    colo_status(&rsock, |r| r["status"]["mode"] == "secondary");
    for sock in [&ssock, &rsock] {
        let (code, q) = ctl(sock, &["query"]);
        assert_eq!(
            (code, q["return"]["status"].as_str()),
            (Some(0), Some("colo")),
            "{q}"
        );
    }
    assert_eq!(ctl(&ssock, &["checkpoint"]).0, Some(0));
    colo_status(&ssock, |r| r["live"]["checkpoints"] == 1);
    let r = colo_status(&rsock, |r| r["live"]["checkpoints"] == 1);
    assert_eq!(r["status"]["mode"], "secondary", "{r}");
    // A shorter delay takes effect at once.
    let (code, v) = ctl(&ssock, &["set", "checkpoint-delay=10"]);
    assert_eq!(code, Some(0), "{v}");
    colo_status(&ssock, |r| r["live"]["checkpoints"].as_u64() >= Some(5));
    assert_eq!(ctl(&ssock, &["poweroff"]).0, Some(0));
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let (sv, rv) = (s.completed(), r.completed());
    for (side, v) in [("send", &sv), ("recv", &rv)] {
        assert_eq!(v["colo"]["end"], "poweroff", "{side}: {v}");
        assert_eq!(v["guest_running"], false, "{side}: {v}");
    }
    // The events: device → colo, then completed at the poweroff.
    for d in [&s, &r] {
        let st = d.statuses();
        assert_eq!(
            st[st.len().saturating_sub(3)..],
            ["device", "colo", "completed"],
            "{st:?}"
        );
    }
    let c = &sv["colo"];
    assert_eq!(c["by_trigger"]["request"], 1, "{c}");
    assert!(c["by_trigger"]["periodic"].as_u64() >= Some(4), "{c}");
    assert!(c["pause"]["p99_ms"].as_f64() > Some(0.0), "{c}");
    assert!(c["bytes_per_checkpoint_mean"].as_u64() > Some(0), "{c}");
    // The client got numbered records, in order per vCPU.
    let text = std::fs::read_to_string(&out).unwrap();
    let released = c["released"].as_u64().unwrap();
    assert_eq!(text.lines().count() as u64, released, "{c}");
    assert!(released > 0);
}

#[test]
fn ctl_failover_on_the_secondary_makes_it_go_on_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (ssock, rsock) = (dir.path().join("s.sock"), dir.path().join("r.sock"));
    let (recv, port) = start_recv(&[
        "--colo",
        "--colo-alone",
        "0.3",
        "--control",
        rsock.to_str().unwrap(),
    ]);
    let send = start_send_synthetic(
        port,
        &[
            "--colo",
            "--checkpoint-delay",
            "50",
            "--colo-alone",
            "0.3",
            "--control",
            ssock.to_str().unwrap(),
        ],
    );
    colo_status(&rsock, |r| r["live"]["checkpoints"].as_u64() >= Some(2));
    let (code, v) = ctl(&rsock, &["failover"]);
    assert_eq!(code, Some(0), "{v}");
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let (sv, rv) = (s.completed(), r.completed());
    let st = &rv["colo"]["status"];
    assert_eq!(
        (
            st["reason"].as_str(),
            st["last_mode"].as_str(),
            st["failover"].as_str()
        ),
        (Some("request"), Some("secondary"), Some("completed")),
        "{rv}"
    );
    assert!(rv["colo"]["failover_ms"].as_f64().is_some(), "{rv}");
    // The primary lost its secondary: an error, and it went on alone too.
    assert_eq!(sv["colo"]["status"]["reason"], "error", "{sv}");
    assert_eq!(sv["colo"]["end"], "failover", "{sv}");
    // After a failover both sides leave colo for completed, as QEMU does.
    for d in [&s, &r] {
        let st = d.statuses();
        assert_eq!(
            st[st.len().saturating_sub(2)..],
            ["colo", "completed"],
            "{st:?}"
        );
    }
}

#[test]
fn colo_output_every_must_agree_or_the_secondary_refuses_colo() {
    let (recv, port) = start_recv(&["--colo", "--colo-output-every", "8"]);
    let send = start_send_synthetic(
        port,
        &["--colo", "--colo-output-every", "64", "--colo-alone", "0.3"],
    );
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    let want = "--colo-output-every differs: the primary has 64, this secondary 8";
    // The secondary was never a replica: it stops, refused, status failed.
    let rv = r.summary();
    assert_eq!(rv["colo"]["end"], "refused", "{rv}");
    assert_eq!(rv["guest_running"], false, "{rv}");
    let why = rv["colo"]["status"]["error"].as_str().unwrap_or("");
    assert!(why.contains(want), "{rv}");
    assert_eq!(
        r.statuses().last().map(String::as_str),
        Some("failed"),
        "{}",
        r.stdout
    );
    // The primary hears why and goes on alone.
    let sv = s.summary();
    assert_eq!(sv["colo"]["end"], "failover", "{sv}");
    let why = sv["colo"]["status"]["error"].as_str().unwrap_or("");
    assert!(why.contains(want), "{sv}");
}
