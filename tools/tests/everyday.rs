//! What a person expects of any command-line tool: `--version` with the
//! commit, shell completions, a manual page, and logs on stderr at the
//! level asked for (`-v`, `-q`, `--log-format json`), without colour codes
//! when stderr is not a terminal.

mod support;

use support::{assert_contains, run};

#[test]
fn version_names_the_commit() {
    let d = run(&["--version"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    assert!(d.stdout.starts_with("ferry 0."), "{}", d.stdout);
    assert_contains(&d.stdout, &["(commit "]);
}

#[test]
fn completions_and_the_manual_page_are_generated() {
    let d = run(&["completions", "bash"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    assert_contains(
        &d.stdout,
        &["_ferry()", "complete -F _ferry", "--peer-timeout"],
    );
    let d = run(&["man"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    assert_contains(&d.stdout, &[".TH ferry 1", ".SH NAME", "recv"]);
    let dir = tempfile::tempdir().unwrap();
    let d = run(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    for page in ["ferry.1", "ferry-send.1", "ferry-recv.1", "ferry-save.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".SH OPTIONS"), "{page}: {text}");
    }
}

#[test]
fn verbose_logs_the_migration_plainly_and_json_logs_parse() {
    let d = run(&["demo", "--size", "16M", "-v"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    assert_contains(
        &d.stderr,
        &[
            "INFO ferry::outgoing: connected: main and 2 multifd channel(s)",
            "INFO ferry::incoming: memory and device state equal the source's",
            "INFO ferry::outgoing: the destination runs the guest",
        ],
    );
    assert!(!d.stderr.contains('\x1b'), "no ANSI codes into a pipe");
    let d = run(&["demo", "--size", "16M", "-v", "--log-format", "json"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    let logs: Vec<serde_json::Value> = d
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        logs.iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "pass done"),
        "{logs:?}"
    );
    let d = run(&["demo", "--size", "16M", "-q"]);
    assert_eq!(d.code(), Some(0), "{}", d.stderr);
    assert!(!d.stderr.contains(" INFO "), "{}", d.stderr);
}

#[test]
fn bench_refuses_a_plot_path_it_cannot_write_before_any_run() {
    let d = run(&[
        "bench",
        "--size",
        "16M",
        "--plot",
        "/nonexistent/dir/bench.svg",
    ]);
    assert_eq!(d.code(), Some(1), "{}", d.stderr);
    assert_contains(&d.stderr, &["cannot write /nonexistent/dir/bench.svg"]);
    assert!(!d.stderr.contains("run 1"), "no run started: {}", d.stderr);
}
