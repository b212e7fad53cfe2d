//! `ferry bench --peer floor` end to end: the real binary runs ferry and the
//! floor peer (`ferry floor-peer recv|send`, two processes) on a small
//! dataset and reports both with each side's CPU cost per GiB. No timing is
//! asserted: only that the runs completed with identical bytes (the bench
//! fails otherwise) and that the figures are there and sane.

mod support;

use support::{assert_contains, run};

#[test]
fn floor_peer_moves_a_32_mib_dataset_over_2_streams() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let workdir = dir.path().to_str().unwrap();
    let d = run(&[
        "bench",
        "--size",
        "32M",
        "--channels",
        "2",
        "--runs",
        "1",
        "--peer",
        "floor",
        "--json",
        "--cold-memory",
        "--tcp-congestion",
        "system",
        "--workdir",
        workdir,
    ]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    let j: serde_json::Value = serde_json::from_str(&d.stdout).unwrap();
    let cases = j["cases"].as_array().unwrap();
    let tools: Vec<&str> = cases.iter().filter_map(|c| c["tool"].as_str()).collect();
    assert_eq!(tools, ["ferry", "floor"]);
    for case in cases {
        let tool = case["tool"].as_str().unwrap();
        assert_eq!(case["channels"], 2);
        let s = &case["samples"][0];
        assert!(s["wall_s"].as_f64().unwrap() > 0.0, "{tool}: {s}");
        assert_eq!(s["ram_bytes"], 32u64 << 20, "{tool}");
        for side in ["cpu_send_s", "cpu_recv_s"] {
            let c = s[side].as_f64();
            assert!(c.is_some_and(|c| c >= 0.0), "{tool}: {side} in {s}");
        }
        let total = s["cpu_send_s"].as_f64().unwrap() + s["cpu_recv_s"].as_f64().unwrap();
        assert!(total > 0.0, "{tool}: no CPU at all: {s}");
        for per in ["send_core_s_per_gib", "recv_core_s_per_gib"] {
            assert!(case["summary"][per].as_f64().is_some(), "{tool}: {per}");
        }
    }
    // The floor's own reports: the same digest on both sides, only the
    // non-zero pages sent (mixed: one page in four is zero).
    let floor = &cases[1]["samples"][0]["detail"];
    assert_eq!(floor["send"]["digest"], floor["recv"]["digest"]);
    assert_eq!(floor["send"]["nonzero_pages"], (32u64 << 20) / 4096 * 3 / 4);
    assert_eq!(
        floor["send"]["payload_bytes"],
        floor["recv"]["payload_bytes"]
    );
    assert!(j["ratios"][0]["ferry_over_floor_wall"].as_f64().is_some());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "dataset left behind"
    );
}

#[test]
fn floor_is_a_known_peer_and_documented() {
    let d = run(&["bench", "--peer", "flor", "--size", "1M"]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stderr, &["unknown peer 'flor'", "floor"]);
    let d = run(&["bench", "--help"]);
    assert_contains(&d.stdout, &["`floor`", "core-seconds per GiB"]);
    // The floor's processes are an internal subcommand: not in the help.
    let d = run(&["--help"]);
    assert!(!d.stdout.contains("floor-peer"), "{}", d.stdout);
}

#[test]
fn a_floor_sender_without_a_receiver_fails_with_a_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.ram");
    std::fs::write(&data, vec![1u8; 8192]).unwrap();
    let d = run(&[
        "floor-peer",
        "send",
        "--dataset",
        data.to_str().unwrap(),
        "--to",
        "127.0.0.1:1",
        "--channels",
        "2",
    ]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    let j: serde_json::Value = serde_json::from_str(d.stdout.trim()).unwrap();
    assert_eq!(j["status"], "failed");
    assert_contains(
        j["error"].as_str().unwrap(),
        &["connecting stream 0 to 127.0.0.1:1"],
    );
}
