//! Command-line arguments: every duration and size is checked by clap with
//! a message (never a panic, never a silent wrap), options a guest kind
//! would ignore are refused with the reason, and `ferry ctl` says what is
//! wrong with the socket it was given.

mod support;

use std::os::unix::net::UnixListener;
use std::path::Path;

use support::{assert_contains, ctl, run, start_recv, wait_for_query, Proc, DEADLINE};

/// Exit status 2 (clap's usage error) with every part in the message.
fn assert_usage_error(args: &[&str], parts: &[&str]) {
    let d = run(args);
    assert_eq!(
        d.code(),
        Some(2),
        "ferry {args:?}: a usage error:\n{}",
        d.stderr
    );
    for p in parts {
        assert!(
            d.stderr.contains(p),
            "ferry {args:?}: expected {p:?} in:\n{}",
            d.stderr
        );
    }
}

fn gen(dir: &Path) -> String {
    let ram = dir.join("guest.img");
    let d = run(&["gen", "--size", "4M", "-o", ram.to_str().unwrap()]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    ram.to_str().unwrap().to_string()
}

#[test]
fn bad_durations_are_usage_errors_that_say_why() {
    let recv = ["recv", "--listen", "tcp:127.0.0.1:0"];
    let cases: &[(&str, &str, &str)] = &[
        ("--timeout", "nan", "not a number"),
        ("--timeout", "inf", "too long"),
        ("--timeout", "1e30", "too long"),
        ("--timeout", "400d", "unknown unit 'd'"),
        ("--timeout", "-1", "cannot be negative"),
        (
            "--timeout",
            "0",
            "must be more than 0; omit the option to wait for ever",
        ),
        ("--timeout", "soon", "not a duration"),
        ("--run-after", "-1", "cannot be negative"),
        ("--run-after", "nan", "not a number"),
        ("--run-after", "1e30", "too long"),
    ];
    for (flag, value, why) in cases {
        let mut args = recv.to_vec();
        args.extend([*flag, *value]);
        assert_usage_error(&args, &[flag, value, why]);
    }
    for value in ["inf", "0", "-2", "nan"] {
        assert_usage_error(
            &["ctl", "/nonexistent.sock", "--timeout", value, "query"],
            &["--timeout"],
        );
    }
    let downtime_limits: &[(&str, &[&str])] = &[
        ("2x", &["unknown unit 'x'", "a bare number is milliseconds"]),
        ("-300", &["cannot be negative"]),
    ];
    for cmd in ["send", "save"] {
        for (value, parts) in downtime_limits {
            assert_usage_error(
                &[
                    cmd,
                    "--guest",
                    "synthetic",
                    "--size",
                    "4M",
                    "--to",
                    "file:/x",
                    "--downtime-limit",
                    value,
                ],
                parts,
            );
        }
    }
}

#[test]
fn durations_take_units_and_bare_numbers_keep_their_old_unit() {
    // recv --timeout: a unit, and a bare number in seconds.
    for t in ["300ms", "0.3"] {
        let d = run(&[
            "recv",
            "--listen",
            "tcp:127.0.0.1:0",
            "--json",
            "--timeout",
            t,
        ]);
        assert_eq!(d.code(), Some(1), "{}", d.stderr);
        assert_contains(d.json()["error"].as_str().unwrap(), &["timed out"]);
    }
    // send --downtime-limit: a bare number is milliseconds, as it always was.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("send.sock");
    let (recv, port) = start_recv(&["--timeout", "1m"]);
    let to = format!("tcp:127.0.0.1:{port}");
    let send = Proc::spawn(&[
        "send",
        "--guest",
        "synthetic",
        "--size",
        "8M",
        "--to",
        &to,
        "--json",
        "--downtime-limit",
        "1.5s",
        "--max-bandwidth",
        "2M",
        "--control",
        sock.to_str().unwrap(),
    ]);
    wait_for_query(&sock, |q| q["status"] == "active");
    let (code, v) = ctl(&sock, &["params"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["return"]["downtime-limit"], 1500, "{v}");
    assert_eq!(v["return"]["max-bandwidth"], 2 << 20, "{v}");
    // ctl set: units too, and a bare downtime-limit is milliseconds.
    let (code, v) = ctl(&sock, &["set", "downtime-limit=2s", "max-bandwidth=3M"]);
    assert_eq!(code, Some(0), "{v}");
    let (_, v) = ctl(&sock, &["params"]);
    assert_eq!(v["return"]["downtime-limit"], 2000, "{v}");
    assert_eq!(v["return"]["max-bandwidth"], 3 << 20, "{v}");
    let (code, _) = ctl(&sock, &["set", "downtime-limit=700"]);
    assert_eq!(code, Some(0));
    let (_, v) = ctl(&sock, &["params"]);
    assert_eq!(v["return"]["downtime-limit"], 700, "{v}");
    let (code, _) = ctl(&sock, &["cancel"]);
    assert_eq!(code, Some(0));
    let (s, r) = (send.wait(DEADLINE), recv.wait(DEADLINE));
    assert_eq!(s.json()["status"], "cancelled", "{}", s.stdout);
    assert_eq!(r.code(), Some(1));
}

#[test]
fn sizes_that_overflow_or_are_not_sizes_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.img");
    let out = out.to_str().unwrap();
    assert_usage_error(
        &["gen", "--size", "99999999999T", "-o", out],
        &["99999999999T", "too large"],
    );
    assert_usage_error(
        &["gen", "--size", "99999999999999999999", "-o", out],
        &["too large"],
    );
    assert_usage_error(&["gen", "--size=-1", "-o", out], &["not a size"]);
    assert!(!Path::new(out).exists(), "nothing written on a usage error");
    assert_usage_error(
        &[
            "send",
            "--guest",
            "synthetic",
            "--size",
            "4M",
            "--to",
            "tcp:127.0.0.1:1",
            "--max-bandwidth",
            "99999999999T",
        ],
        &["--max-bandwidth", "too large"],
    );
}

#[test]
fn counts_out_of_range_are_usage_errors_not_hangs_or_panics() {
    // demo --channels 0 used to hang; certs --days 4294967295 panicked.
    assert_usage_error(&["demo", "--channels", "0"], &["--channels"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    for days in ["0", "4294967295"] {
        assert_usage_error(
            &[
                "certs",
                "--out",
                out.to_str().unwrap(),
                "--host",
                "localhost",
                "--days",
                days,
            ],
            &["--days"],
        );
    }
    assert!(!out.exists());
}

#[test]
fn options_the_guest_kind_would_ignore_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path());
    let sav = dir.path().join("guest.sav");
    let to_file = format!("file:{}", sav.display());
    // (command, extra options, the option named, part of the reason)
    let image =
        |cmd: &'static str| -> Vec<(&'static str, Vec<&'static str>, &'static str, &'static str)> {
            vec![
                (
                    cmd,
                    vec!["--size", "64M"],
                    "--size",
                    "size of its --ram file",
                ),
                (cmd, vec!["--vcpus", "3"], "--vcpus", "no vCPUs"),
                (cmd, vec!["--dirty-rate", "1M"], "--dirty-rate", "no vCPUs"),
                (
                    cmd,
                    vec!["--dirty-pattern", "sequential"],
                    "--dirty-pattern",
                    "no vCPUs",
                ),
                (
                    cmd,
                    vec!["--dirty-tracker", "uffd"],
                    "--dirty-tracker",
                    "no dirty log",
                ),
                (cmd, vec!["--seed", "2"], "--seed", "nothing writes it"),
                (
                    cmd,
                    vec!["--downtime-limit", "300ms"],
                    "--downtime-limit",
                    "one pass",
                ),
                (cmd, vec!["--max-passes", "3"], "--max-passes", "one pass"),
            ]
        };
    let mut cases = image("send");
    cases.extend(image("save"));
    cases.push((
        "send",
        vec!["--auto-converge"],
        "--auto-converge",
        "an image guest has none",
    ));
    cases.push((
        "save",
        vec!["--background"],
        "--background",
        "without --background",
    ));
    for (cmd, extra, option, why) in cases {
        let to = if cmd == "send" {
            "tcp:127.0.0.1:1"
        } else {
            to_file.as_str()
        };
        let mut args = vec![cmd, "--ram", ram.as_str(), "--to", to];
        args.extend(extra.iter().copied());
        assert_usage_error(
            &args,
            &[
                &format!("{option} only applies to a live guest (--guest synthetic or kvm)"),
                why,
            ],
        );
    }
    // The other way round: an image guest's option on a synthetic guest.
    for cmd in ["send", "save"] {
        let to = if cmd == "send" {
            "tcp:127.0.0.1:1"
        } else {
            to_file.as_str()
        };
        assert_usage_error(
            &[
                cmd,
                "--guest",
                "synthetic",
                "--size",
                "4M",
                "--device-state",
                ram.as_str(),
                "--to",
                to,
            ],
            &[
                "--device-state only applies to an image guest",
                "vCPU counters",
            ],
        );
    }
    // Static conflicts: a background snapshot has no passes to steer.
    assert_usage_error(
        &[
            "save",
            "--guest",
            "synthetic",
            "--size",
            "4M",
            "--background",
            "--max-passes",
            "3",
            "--to",
            &to_file,
        ],
        &["--background", "--max-passes"],
    );
    assert!(!sav.exists(), "nothing saved on a usage error");
    // Defaults and the options of the guest's own kind still go through:
    // these reach the connection (refused: status 1, not a usage error).
    let d = run(&[
        "send",
        "--ram",
        &ram,
        "--to",
        "tcp:127.0.0.1:1",
        "--device-state",
        &ram,
    ]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stderr, &["cannot connect"]);
    let d = run(&[
        "send",
        "--guest",
        "synthetic",
        "--ram",
        &ram,
        "--seed",
        "3",
        "--vcpus",
        "1",
        "--downtime-limit",
        "300",
        "--auto-converge",
        "--to",
        "tcp:127.0.0.1:1",
    ]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stderr, &["cannot connect"]);
}

#[test]
fn recv_run_after_with_an_image_guest_keeps_the_guest_and_says_there_was_no_workload() {
    let dir = tempfile::tempdir().unwrap();
    let ram = gen(dir.path());
    // An hour: were it slept, the deadline would fail the test.
    let (recv, port) = start_recv(&["--timeout", "30", "--run-after", "1h"]);
    let to = format!("tcp:127.0.0.1:{port}");
    let s = run(&["send", "--ram", &ram, "--to", &to, "--json"]);
    let r = recv.wait(DEADLINE);
    assert_eq!(s.code(), Some(0), "{}", s.stderr);
    let v = r.json();
    assert_eq!(
        (r.code(), v["status"].as_str()),
        (Some(0), Some("completed")),
        "{v}\n{}",
        r.stderr
    );
    assert_eq!(
        v["digest"],
        s.json()["digest"],
        "the migrated guest is kept"
    );
    assert!(v.get("workload").is_none(), "{v}");
    assert_contains(
        &r.stderr,
        &["--run-after had no workload to run", "image guest"],
    );
}

#[test]
fn ctl_names_a_missing_socket_a_dead_one_and_one_that_never_replies() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-yet.sock");
    let m = missing.to_str().unwrap();
    let d = run(&["ctl", m, "query"]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(
        &d.stderr,
        &[
            &format!("no control socket at {m}"),
            "is `ferry send --control",
        ],
    );

    // Bound, then closed: the file stays, nobody accepts.
    let dead = dir.path().join("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    let d = run(&["ctl", dead.to_str().unwrap(), "query"]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stderr, &["nothing accepts connections at", "dead.sock"]);

    // Accepts, never says a word.
    let mute = dir.path().join("mute.sock");
    let listener = UnixListener::bind(&mute).unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        // Hold the connection until the client gives up and closes it.
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut &conn, &mut buf);
    });
    let d = run(&["ctl", mute.to_str().unwrap(), "--timeout", "1", "query"]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(
        &d.stderr,
        &[&format!(
            "no reply from the control socket {} within 1s",
            mute.display()
        )],
    );
    assert!(!d.stderr.contains("os error 11"), "{}", d.stderr);
    server.join().unwrap();
}

#[test]
fn ctl_set_lists_the_keys_in_its_help_and_when_one_is_unknown() {
    let keys = [
        "downtime-limit",
        "max-bandwidth",
        "avail-switchover-bandwidth",
        "auto-converge",
        "cpu-throttle-initial",
        "cpu-throttle-increment",
        "max-cpu-throttle",
        "pause-before-switchover",
        "max-passes",
    ];
    let d = run(&["ctl", "/nonexistent.sock", "set", "--help"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    assert_contains(&d.stdout, &keys);
    // Refused before connecting: the socket does not even exist.
    let d = run(&["ctl", "/nonexistent.sock", "set", "downtime-limt=5"]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stderr, &["unknown parameter 'downtime-limt'"]);
    assert_contains(&d.stderr, &keys);
}

#[test]
fn help_texts_give_the_units() {
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["send", "--help"],
            &[
                "300ms, 1.5s",
                "bare number is milliseconds",
                "500M: 500 MiB/s",
            ],
        ),
        (
            &["save", "--help"],
            &["300ms, 1.5s", "bare number is milliseconds"],
        ),
        (
            &["recv", "--help"],
            &["30s, 500ms, 2m", "bare number is seconds", "more than 0"],
        ),
    ];
    for (args, wants) in cases {
        let d = run(args);
        assert_eq!(d.code(), Some(0), "{args:?}: {}", d.stderr);
        assert_contains(&d.stdout, wants);
    }
    let d = run(&["ctl", "--help"]);
    assert_contains(&d.stdout, &["10s, 500ms, 1m", "bare number is seconds"]);
}
