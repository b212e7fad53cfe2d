//! Running the `ferry` binary from the `args` and `signals` tests: children
//! under a deadline (a hang kills them and fails the test), their output
//! drained by threads, stderr lines also streamed so a test can wait for one.

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

pub struct Proc {
    name: String,
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    /// Every stderr line as it comes.
    lines: mpsc::Receiver<String>,
}

/// A finished child: its exit status and everything it printed.
pub struct Done {
    pub name: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let name = format!("ferry {}", args.join(" "));
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .env_remove("FERRY_LOG")
            .env_remove("RUST_LOG")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
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
        Proc {
            name,
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `part`; fails the test (killing
    /// the child) if the child ends or the deadline passes first.
    pub fn wait_for_line(&mut self, part: &str) -> String {
        let t = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(t.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(part) => return l,
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let (out, err) = self.collect();
                    panic!(
                        "{}: no stderr line with {part:?} (ended or hung).\n\
                         stdout:\n{out}\nstderr:\n{err}",
                        self.name
                    );
                }
            }
        }
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

    fn collect(&mut self) -> (String, String) {
        let out = self.stdout.take().map(|h| h.join().unwrap_or_default());
        let err = self.stderr.take().map(|h| h.join().unwrap_or_default());
        (out.unwrap_or_default(), err.unwrap_or_default())
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

    /// The summary JSON object: the last non-empty line on stdout.
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
    let line = p.wait_for_line("ferry: listening on ");
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected listening line: {line}"));
    (p, port)
}

/// `ferry ctl SOCKET ARGS...`: exit status and the reply.
pub fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["ctl", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let d = run(&all);
    let v = serde_json::from_str(d.stdout.trim()).unwrap_or(Value::Null);
    (d.code(), v)
}

/// Polls query-migrate until `want` holds for its reply (the socket may not
/// exist yet); fails the test after the deadline.
pub fn wait_for_query(socket: &Path, want: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        if socket.exists() {
            let (code, v) = ctl(socket, &["query"]);
            if code == Some(0) && want(&v["return"]) {
                return v["return"].clone();
            }
        }
        assert!(
            t.elapsed() < DEADLINE,
            "query-migrate on {} never showed the wanted state",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in: {text}");
    }
}
