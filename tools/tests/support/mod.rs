//! Running the `ferry` binary from the tools' tests: children under a
//! deadline (a hang kills them and fails the test), their output drained by
//! threads, stderr lines also streamed so a test can wait for one.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any child may run before the test calls it a hang.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// What `ferry recv` prints on stderr before the URI it listens on.
pub const LISTENING: &str = "ferry: listening on ";

/// The `ferry` binary, without the logging variables of the test's own
/// environment.
pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_LOG");
    c.env_remove("RUST_LOG");
    c
}

/// A child's stdout and stderr, drained by threads so it can never block on
/// a full pipe; every stderr line is also sent as it comes.
pub struct Pipes {
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    /// Every stderr line as it comes, trailing white space trimmed.
    lines: mpsc::Receiver<String>,
}

impl Pipes {
    /// Spawns `cmd` (stdin from /dev/null) with its output drained; `what`
    /// names it if it cannot be spawned.
    pub fn spawn(cmd: &mut Command, what: &str) -> (Child, Pipes) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let mut r = BufReader::new(err);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = tx.send(line.trim_end().to_string());
                        all.push_str(&line);
                    }
                }
            }
            all
        });
        let pipes = Pipes {
            stdout: Some(stdout),
            stderr: Some(stderr),
            lines,
        };
        (child, pipes)
    }

    /// The first stderr line still unread that `pick` takes, within `limit`;
    /// None if stderr closes (the child ended) or the time passes first.
    pub fn find_line<T>(
        &self,
        limit: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Option<T> {
        let t = Instant::now();
        loop {
            let left = limit.saturating_sub(t.elapsed());
            let line = self.lines.recv_timeout(left).ok()?;
            if let Some(v) = pick(&line) {
                return Some(v);
            }
        }
    }

    /// The URI of the `ferry: listening on URI` line, within `limit`.
    pub fn listening(&self, limit: Duration) -> Option<String> {
        self.find_line(limit, |l| l.strip_prefix(LISTENING).map(str::to_string))
    }

    /// Everything the child printed (stdout, stderr): waits for it to close
    /// both, so call it once the child has exited. Empty the second time.
    pub fn collect(&mut self) -> (String, String) {
        let out = self.stdout.take().map(|h| h.join().unwrap_or_default());
        let err = self.stderr.take().map(|h| h.join().unwrap_or_default());
        (out.unwrap_or_default(), err.unwrap_or_default())
    }
}

/// The port of a `tcp:127.0.0.1:PORT` listening URI; fails the test on any
/// other.
pub fn local_port(uri: &str) -> u16 {
    uri.strip_prefix("tcp:127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected listening line: {uri}"))
}

/// A running `ferry` child, its output drained ([`Pipes`]). Killed if
/// dropped while running.
pub struct Proc {
    name: String,
    child: Child,
    pipes: Pipes,
}

/// A finished child: its exit status and everything it printed.
pub struct Done {
    pub name: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Proc {
    /// `ferry ARGS...`, named by its command line in the test's messages.
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::named(&format!("ferry {}", args.join(" ")), args)
    }

    /// `ferry ARGS...`, called `name` in the test's messages.
    pub fn named(name: &str, args: &[&str]) -> Proc {
        let (child, pipes) = Pipes::spawn(ferry().args(args), name);
        Proc {
            name: name.to_string(),
            child,
            pipes,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `part`; fails the test (killing
    /// the child) if the child ends or the deadline passes first.
    pub fn wait_for_line(&mut self, part: &str) -> String {
        if let Some(l) = self
            .pipes
            .find_line(DEADLINE, |l| l.contains(part).then(|| l.to_string()))
        {
            return l;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (out, err) = self.pipes.collect();
        panic!(
            "{}: no stderr line with {part:?} (ended or hung).\n\
             stdout:\n{out}\nstderr:\n{err}",
            self.name
        );
    }

    /// The URI of the `ferry: listening on URI` line on stderr, within
    /// `limit`; None if the child ends first.
    pub fn listening(&self, limit: Duration) -> Option<String> {
        self.pipes.listening(limit)
    }

    /// Sends a signal (`INT`, `TERM`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(st.success(), "kill -{sig} {} failed", self.pid());
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the child to exit; kills it and fails the test after `limit`.
    pub fn wait(mut self, limit: Duration) -> Done {
        let t = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if t.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let (out, err) = self.collect();
                    panic!(
                        "{}: still running after {limit:?} (a hang); killed.\n\
                         stdout:\n{out}\nstderr:\n{err}",
                        self.name
                    );
                }
                Err(e) => panic!("{}: waiting: {e}", self.name),
            }
        };
        let (stdout, stderr) = self.collect();
        let done = Done {
            name: self.name.clone(),
            status,
            stdout,
            stderr,
        };
        assert!(
            !done.stderr.contains("panicked"),
            "{}: the binary panicked:\n{}",
            done.name,
            done.stderr
        );
        done
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) -> Done {
        self.child.kill().expect("killing the child");
        self.wait(DEADLINE)
    }

    fn collect(&mut self) -> (String, String) {
        self.pipes.collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A test that fails half way must not leave ferry processes behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Done {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The summary JSON object: the last non-empty line on stdout (the lines
    /// before it unchecked, unlike [`Done::summary`]).
    pub fn json(&self) -> Value {
        let last = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("{}: nothing on stdout:\n{}", self.name, self.stderr));
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {last}", self.name))
    }

    /// The `MIGRATION` statuses among the event lines before the summary.
    pub fn statuses(&self) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "MIGRATION")
            .filter_map(|v| v["data"]["status"].as_str().map(str::to_string))
            .collect()
    }

    /// The summary JSON object: the last line on stdout. Every line before
    /// it must be an event (`--json` streams them while the run goes on).
    pub fn summary(&self) -> Value {
        let lines: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let Some((last, events)) = lines.split_last() else {
            panic!("{}: nothing on stdout; stderr:\n{}", self.name, self.stderr);
        };
        for e in events {
            let v: Value = serde_json::from_str(e)
                .unwrap_or_else(|err| panic!("{}: event line is not JSON ({err}): {e}", self.name));
            assert!(
                v["event"].is_string(),
                "{}: not an event before the summary: {v}",
                self.name
            );
        }
        let v: Value = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}): {last}", self.name));
        assert!(
            v.is_object() && v.get("event").is_none(),
            "{}: not a summary object: {v}",
            self.name
        );
        v
    }

    /// The events printed before the summary.
    pub fn events(&self) -> Vec<Value> {
        let lines: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        lines[..lines.len().saturating_sub(1)]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Exit 0 and a completed JSON summary ([`Done::summary`]) with a digest.
    pub fn completed(&self) -> Value {
        let v = self.summary();
        assert_eq!(
            (self.code(), v["status"].as_str()),
            (Some(0), Some("completed")),
            "{}: expected a completed run:\n{v}\nstderr:\n{}",
            self.name,
            self.stderr
        );
        assert!(v.get("error").is_none(), "{}: {v}", self.name);
        assert!(v["digest"].is_string(), "{}: no digest: {v}", self.name);
        v
    }

    /// Exit 1 and a failed JSON summary ([`Done::summary`]); returns the
    /// summary and its error text.
    pub fn failed(&self) -> (Value, String) {
        let v = self.summary();
        assert_eq!(
            (self.code(), v["status"].as_str()),
            (Some(1), Some("failed")),
            "{}: expected a failed run:\n{v}\nstderr:\n{}",
            self.name,
            self.stderr
        );
        let err = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: failed without an error text: {v}", self.name))
            .to_string();
        assert!(!err.is_empty(), "{}: empty error: {v}", self.name);
        (v, err)
    }
}

/// Runs a short command to completion under the deadline.
pub fn run(args: &[&str]) -> Done {
    Proc::spawn(args).wait(DEADLINE)
}

/// `ferry recv --listen tcp:127.0.0.1:0 --json EXTRA...` once it listens,
/// and its port.
pub fn start_recv(extra: &[&str]) -> (Proc, u16) {
    let mut args = vec!["recv", "--listen", "tcp:127.0.0.1:0", "--json"];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args);
    let line = p.wait_for_line(LISTENING);
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected listening line: {line}"));
    (p, port)
}

/// `ferry ctl SOCKET ARGS...`: exit status and the reply.
pub fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, Value) {
    ctl_within(socket, args, DEADLINE)
}

/// [`ctl`], killed and failing the test after `limit`.
pub fn ctl_within(socket: &Path, args: &[&str], limit: Duration) -> (Option<i32>, Value) {
    let mut all = vec!["ctl", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let d = Proc::spawn(&all).wait(limit);
    let v = serde_json::from_str(d.stdout.trim()).unwrap_or(Value::Null);
    (d.code(), v)
}

/// Polls query-migrate until `want` holds for its reply (the socket may not
/// exist yet); fails the test after the deadline.
pub fn wait_for_query(socket: &Path, want: impl Fn(&Value) -> bool) -> Value {
    wait_for_query_within(socket, DEADLINE, want)
}

/// [`wait_for_query`], failing the test after `limit` (each `ferry ctl`
/// also under `limit`).
pub fn wait_for_query_within(
    socket: &Path,
    limit: Duration,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        if socket.exists() {
            let (code, v) = ctl_within(socket, &["query"], limit);
            if code == Some(0) && want(&v["return"]) {
                return v["return"].clone();
            }
        }
        assert!(
            t.elapsed() < limit,
            "query-migrate on {} never showed the wanted state",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ferry send --guest synthetic --size 32M --to tcp:127.0.0.1:PORT --json
/// EXTRA...`.
pub fn start_send_synthetic(port: u16, extra: &[&str]) -> Proc {
    let to = format!("tcp:127.0.0.1:{port}");
    let mut args = vec![
        "send",
        "--guest",
        "synthetic",
        "--size",
        "32M",
        "--to",
        &to,
        "--json",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

pub fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in: {text}");
    }
}

/// Polls `ctl SOCK query-colo-status` until `want` holds for its answer
/// (the `return` object), failing the test after `deadline`.
pub fn colo_status(
    sock: &std::path::Path,
    deadline: std::time::Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = std::time::Instant::now();
    loop {
        if sock.exists() {
            let (code, v) = ctl(sock, &["query-colo-status"]);
            if code == Some(0) && want(&v["return"]) {
                return v["return"].clone();
            }
        }
        assert!(t.elapsed() < deadline, "query-colo-status never showed it");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
