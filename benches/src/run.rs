//! Child processes and one ferry run.
//!
//! [`Proc`] wraps a child whose stdout and stderr are drained by threads (so
//! a chatty child never blocks on a full pipe) and which is killed and reaped
//! if dropped while still running. [`ferry_once`] runs `ferry recv` and
//! `ferry send` over loopback TCP and turns their two JSON reports into a
//! [`Sample`], checking status and digests.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sys::{children_cpu_s, tail, unix_now, wait4, Cpu};
use crate::{BenchError, Sample};

/// How long `ferry recv` may take to print its listening line.
pub(crate) const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one ferry process may run on once the other has failed.
const FAILURE_GRACE: Duration = Duration::from_secs(5);
/// How many stderr lines a [`Proc`] keeps (the last ones).
const STDERR_KEEP: usize = 400;
/// Lines of stderr quoted in an error.
pub(crate) const TAIL_LINES: usize = 20;

/// A time limit for one migration of `size` bytes: generous, so that only a
/// hang trips it (a minute plus 10 MB/s).
pub(crate) fn run_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / 10_000_000)
}

/// A running child with drained pipes; killed and reaped on drop. It is
/// reaped with `wait4`, which also gives its own CPU time ([`Proc::cpu`]).
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    status: Option<ExitStatus>,
    cpu: Option<Cpu>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<()>>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
}

/// What a finished [`Proc`] left behind.
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    /// The process's own user and system CPU time (wait4).
    pub(crate) cpu: Option<Cpu>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout/stderr piped. Every stderr
    /// line is also sent to `lines` when given.
    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        lines: Option<Sender<String>>,
    ) -> Result<Self, BenchError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
            process: name.into(),
            exe: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let stdout = child.stdout.take().map(drain_stdout);
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child
            .stderr
            .take()
            .map(|e| drain_stderr(e, Arc::clone(&stderr_lines), lines));
        Ok(Self {
            name: name.into(),
            child,
            status: None,
            cpu: None,
            stdout,
            stderr,
            stderr_lines,
        })
    }

    /// Reaps the child with wait4 (blocking or not), keeping its status
    /// and CPU time.
    fn reap(&mut self, block: bool) -> Result<Option<ExitStatus>, BenchError> {
        if self.status.is_none() {
            let reaped = wait4(self.child.id(), block).map_err(|source| BenchError::Process {
                process: self.name.clone(),
                source,
            })?;
            if let Some((status, cpu)) = reaped {
                self.status = Some(status);
                self.cpu = Some(cpu);
            }
        }
        Ok(self.status)
    }

    /// The exit status if the child has exited (reaping it).
    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>, BenchError> {
        self.reap(false)
    }

    /// Kills the child if it still runs, and reaps it.
    pub(crate) fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.reap(true);
        }
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's own user and system CPU time, once it has been reaped.
    pub(crate) fn cpu(&self) -> Option<Cpu> {
        self.cpu
    }

    /// The stderr lines seen so far (the last [`STDERR_KEEP`]).
    pub(crate) fn stderr_so_far(&self) -> String {
        self.stderr_lines
            .lock()
            .map(|l| l.join("\n"))
            .unwrap_or_default()
    }

    /// Waits for the child to exit (it must be about to: call after
    /// [`wait_all`]), then collects its output.
    pub(crate) fn finish(mut self) -> Result<Finished, BenchError> {
        let status = match self.reap(true)? {
            Some(s) => s,
            None => {
                return Err(BenchError::Process {
                    process: self.name.clone(),
                    source: std::io::Error::other("wait4 returned without a status"),
                })
            }
        };
        let stdout = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        Ok(Finished {
            status,
            cpu: self.cpu,
            stdout,
            stderr: self.stderr_so_far(),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn drain_stdout(mut out: ChildStdout) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn drain_stderr(
    err: ChildStderr,
    keep: Arc<Mutex<Vec<String>>>,
    lines: Option<Sender<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(err);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if let Ok(mut k) = keep.lock() {
                if k.len() >= STDERR_KEEP {
                    k.remove(0);
                }
                k.push(line.clone());
            }
            if let Some(tx) = &lines {
                let _ = tx.send(line);
            }
        }
    })
}

/// Polls until every process has exited; past `deadline` kills them all and
/// fails with a timeout naming `what`. Returns when the last one was reaped.
pub(crate) fn wait_all(
    procs: &mut [&mut Proc],
    deadline: Instant,
    what: &str,
    timeout: Duration,
) -> Result<Instant, BenchError> {
    wait_all_with_grace(procs, deadline, what, timeout, None)
}

/// [`wait_all`], except that once one process has exited with a failure the
/// others get only `grace` more: then they are killed and this returns
/// normally, so the caller reports the failure rather than a timeout (a
/// `ferry recv` never reached by a failed `ferry send` would wait for ever).
pub(crate) fn wait_all_with_grace(
    procs: &mut [&mut Proc],
    deadline: Instant,
    what: &str,
    timeout: Duration,
    grace: Option<Duration>,
) -> Result<Instant, BenchError> {
    let mut cut_off: Option<Instant> = None;
    loop {
        let mut running = false;
        for p in procs.iter_mut() {
            match p.try_wait()? {
                None => running = true,
                Some(status) if !status.success() && cut_off.is_none() => {
                    cut_off = grace.map(|g| Instant::now() + g);
                }
                Some(_) => {}
            }
        }
        if !running {
            return Ok(Instant::now());
        }
        if cut_off.is_some_and(|c| Instant::now() >= c) {
            for p in procs.iter_mut() {
                p.kill();
            }
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            let mut detail = Vec::new();
            for p in procs.iter_mut() {
                let was_running = p.try_wait()?.is_none();
                p.kill();
                detail.push(format!(
                    "{}{}; stderr tail:\n{}",
                    p.name,
                    if was_running {
                        " was still running"
                    } else {
                        " had exited"
                    },
                    tail(&p.stderr_so_far(), TAIL_LINES)
                ));
            }
            return Err(BenchError::Timeout {
                what: what.into(),
                secs: timeout.as_secs(),
                detail: detail.join("\n"),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The one JSON object a ferry process prints on stdout: tries the whole
/// text, then each line that looks like an object, last first.
pub(crate) fn parse_json_object(stdout: &str) -> Option<Value> {
    let mut stream = serde_json::Deserializer::from_str(stdout.trim()).into_iter::<Value>();
    let mut last = None;
    for v in stream.by_ref() {
        match v {
            Ok(v @ Value::Object(_)) => last = Some(v),
            Ok(_) => {}
            Err(_) => {
                last = None;
                break;
            }
        }
    }
    last.or_else(|| {
        stdout
            .lines()
            .rev()
            .filter(|l| l.trim_start().starts_with('{'))
            .find_map(|l| {
                serde_json::from_str::<Value>(l.trim())
                    .ok()
                    .filter(Value::is_object)
            })
    })
}

/// The guest `ferry send` migrates.
#[derive(Clone, Copy)]
pub(crate) enum SendGuest<'a> {
    /// An image guest: `--ram DATASET` (the bandwidth cases).
    Image(&'a Path),
    /// A live guest, given by these `send` arguments (`--guest synthetic
    /// --size ...`: `live.rs`).
    Live(&'a [String]),
}

/// What one ferry run is asked to do.
pub(crate) struct FerryRun<'a> {
    pub(crate) exe: &'a Path,
    pub(crate) guest: SendGuest<'a>,
    /// Guest RAM in bytes (for the time limit and the rates).
    pub(crate) size: u64,
    pub(crate) channels: u16,
    pub(crate) send_args: &'a [String],
    /// Extra arguments for `ferry recv` (e.g. `--tls-dir DIR`).
    pub(crate) recv_args: &'a [String],
    /// TCP congestion control for both ends (`None`: the system's).
    pub(crate) congestion: Option<&'a str>,
    /// Whether the destination takes its switchover digest (of all memory
    /// and the device state, before its guest runs: inside the downtime)
    /// and compares it with the source's.
    pub(crate) switchover_digest: bool,
    /// What the run is called in errors: "ferry run with 2 channel(s)".
    pub(crate) label: &'a str,
}

/// `ferry recv`'s arguments that turn the destination's switchover digest
/// on or off: the one place that spells them. Builds where the digest is
/// opt-in (their `recv --help` lists `--verify-switchover`) get that flag
/// to turn it on and nothing to leave it off; older builds, where it is on
/// by default, nothing and `--no-digest`. Which kind `exe` is, is asked
/// once per binary, so `--ferry-exe` may name either.
pub(crate) fn switchover_digest_args(exe: &Path, on: bool) -> &'static [&'static str] {
    static OPT_IN: Mutex<Vec<(PathBuf, bool)>> = Mutex::new(Vec::new());
    let opt_in = {
        let mut known = OPT_IN.lock().unwrap_or_else(|p| p.into_inner());
        match known.iter().find(|(p, _)| p == exe) {
            Some(&(_, o)) => o,
            None => {
                let o = Command::new(exe)
                    .args(["recv", "--help"])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .is_ok_and(|out| {
                        String::from_utf8_lossy(&out.stdout).contains("--verify-switchover")
                    });
                known.push((exe.to_path_buf(), o));
                o
            }
        }
    };
    match (opt_in, on) {
        (true, true) => &["--verify-switchover"],
        (true, false) => &[],
        (false, true) => &[],
        (false, false) => &["--no-digest"],
    }
}

/// One side's report, checked; `Err` holds a description of the failure.
fn check_side(name: &str, fin: &Finished) -> Result<Value, String> {
    let stderr = tail(&fin.stderr, TAIL_LINES);
    let Some(json) = parse_json_object(&fin.stdout) else {
        let stdout = if fin.stdout.trim().is_empty() {
            String::new()
        } else {
            format!("; stdout tail:\n{}", tail(&fin.stdout, 5))
        };
        return Err(format!(
            "{name}: {}, printed no JSON report{stdout}\n{name} stderr tail:\n{stderr}",
            fin.status
        ));
    };
    let status = json["status"].as_str().unwrap_or("(no status)");
    if status != "completed" || !fin.status.success() {
        let error = json["error"].as_str().unwrap_or("(no error text)");
        return Err(format!(
            "{name}: {}, status \"{status}\": {error}\n{name} stderr tail:\n{stderr}",
            fin.status
        ));
    }
    Ok(json)
}

/// A completed pair of ferry processes: both JSON reports (both completed),
/// and what the harness measured around them.
pub(crate) struct Pair {
    /// `ferry send`'s report.
    pub(crate) sent: Value,
    /// `ferry recv`'s report.
    pub(crate) held: Value,
    /// Unix time just before `send` was spawned.
    pub(crate) t0: f64,
    /// CPU seconds of both processes, and the wall seconds from spawning
    /// the first to reaping the last.
    pub(crate) cpu: (f64, f64),
    pub(crate) send_cpu: Option<Cpu>,
    pub(crate) recv_cpu: Option<Cpu>,
}

/// Runs `ferry recv` then `ferry send` over loopback, waits for both, and
/// returns their reports once both say they completed; a failed side (or a
/// hang) is an error with both sides' stories.
pub(crate) fn ferry_pair(run: &FerryRun<'_>) -> Result<Pair, BenchError> {
    let cpu_err = |source| BenchError::Process {
        process: "getrusage".into(),
        source,
    };
    let timeout = run_timeout(run.size);
    let cpu0 = children_cpu_s().map_err(cpu_err)?;
    let born = Instant::now();

    let mut cmd = Command::new(run.exe);
    cmd.args(["recv", "--listen", "tcp:127.0.0.1:0", "--json"]);
    cmd.args(switchover_digest_args(run.exe, run.switchover_digest));
    cmd.args(["--tcp-congestion", run.congestion.unwrap_or("system")]);
    cmd.args(run.recv_args);
    let (tx, rx) = mpsc::channel();
    let mut recv = Proc::spawn("ferry recv", cmd, Some(tx))?;

    let listen_deadline = Instant::now() + LISTEN_TIMEOUT;
    let uri = loop {
        let left = listen_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(uri) = line.trim().strip_prefix("ferry: listening on ") {
                    break uri.trim().to_string();
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                recv.kill();
                return Err(BenchError::ListenTimeout {
                    secs: LISTEN_TIMEOUT.as_secs(),
                    stderr: tail(&recv.stderr_so_far(), TAIL_LINES),
                });
            }
            Err(RecvTimeoutError::Disconnected) => {
                // stderr closed: recv is exiting; give it a moment to do so.
                let grace = Duration::from_secs(5);
                wait_all(
                    &mut [&mut recv],
                    Instant::now() + grace,
                    "ferry recv",
                    grace,
                )?;
                let fin = recv.finish()?;
                return Err(BenchError::RecvExitedEarly {
                    status: fin.status.to_string(),
                    stderr: tail(&fin.stderr, TAIL_LINES),
                });
            }
        }
    };
    drop(rx);

    let t0 = unix_now();
    let mut cmd = Command::new(run.exe);
    cmd.arg("send");
    match run.guest {
        SendGuest::Image(dataset) => cmd.arg("--ram").arg(dataset),
        SendGuest::Live(args) => cmd.args(args),
    };
    cmd.args([
        "--to",
        &uri,
        "--channels",
        &run.channels.to_string(),
        "--json",
    ])
    .args(["--tcp-congestion", run.congestion.unwrap_or("system")])
    .args(run.send_args);
    let mut send = Proc::spawn("ferry send", cmd, None)?;

    let died = wait_all_with_grace(
        &mut [&mut recv, &mut send],
        born + timeout,
        run.label,
        timeout,
        Some(FAILURE_GRACE),
    )?;
    let cpu1 = children_cpu_s().map_err(cpu_err)?;
    let lifetime = died.duration_since(born).as_secs_f64();

    let recv = recv.finish()?;
    let send = send.finish()?;
    match (
        check_side("ferry send", &send),
        check_side("ferry recv", &recv),
    ) {
        (Ok(sent), Ok(held)) => Ok(Pair {
            sent,
            held,
            t0,
            cpu: ((cpu1 - cpu0).max(0.0), lifetime),
            send_cpu: send.cpu,
            recv_cpu: recv.cpu,
        }),
        (s, h) => Err(BenchError::FerryFailed {
            case: run.label.to_string(),
            failures: [s.err(), h.err()].into_iter().flatten().collect(),
        }),
    }
}

/// Runs `ferry recv` then `ferry send` of an image guest, checks that both
/// sides' digests of all memory are equal, and measures the wall time from
/// just before `send` was spawned until the receiver's `finished_at_unix`.
/// The destination takes no switchover digest: the harness compares both
/// sides' digests of all RAM, taken after the timing ends (the switchover
/// digest would add ~0.1 s/GiB that QEMU does not spend).
pub(crate) fn ferry_once(run: &FerryRun<'_>) -> Result<Sample, BenchError> {
    let Pair {
        sent,
        held,
        t0,
        cpu,
        send_cpu,
        recv_cpu,
    } = ferry_pair(run)?;
    let digest = |v: &Value| v["digest"].as_str().unwrap_or("").to_string();
    let (d_sent, d_held) = (digest(&sent), digest(&held));
    if d_sent.is_empty() || d_sent != d_held {
        return Err(BenchError::DigestMismatch {
            channels: run.channels,
            sent: if d_sent.is_empty() {
                "(none)".into()
            } else {
                d_sent
            },
            held: if d_held.is_empty() {
                "(none)".into()
            } else {
                d_held
            },
        });
    }
    let failed = |why: String| BenchError::FerryFailed {
        case: run.label.to_string(),
        failures: vec![why],
    };
    let Some(finished) = held["finished_at_unix"].as_f64() else {
        return Err(failed(
            "ferry recv: its JSON report has no numeric finished_at_unix".into(),
        ));
    };
    let wall = finished - t0;
    if wall.is_nan() || wall <= 0.0 {
        return Err(failed(format!(
            "ferry recv finished at {finished:.6}, not after the send was started ({t0:.6})"
        )));
    }
    let wire = sent["wire_bytes"].as_u64().unwrap_or(0);
    let detail = serde_json::json!({ "t0_unix": t0, "send": sent, "recv": held });
    let migration_cpu = |v: &Value| v["cpu_s"].as_f64();
    Ok(Sample::new(wall, run.size, wire, Some(cpu), detail)
        .with_sides(send_cpu, recv_cpu)
        .with_migration_cpu(migration_cpu(&sent), migration_cpu(&held)))
}

/// Path helper for messages.
pub(crate) fn display(p: &Path) -> String {
    p.display().to_string()
}

/// A file removed when this guard is dropped (a generated dataset, QEMU's copy).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_object_from_plain_pretty_and_noisy_stdout() {
        let one = r#"{"status":"completed","digest":"ab"}"#;
        assert_eq!(parse_json_object(one).expect("plain")["digest"], "ab");
        let pretty = "{\n  \"status\": \"failed\",\n  \"error\": \"boom\"\n}\n";
        assert_eq!(parse_json_object(pretty).expect("pretty")["error"], "boom");
        let noisy = "warming up\n{\"status\":\"completed\"}\n";
        assert_eq!(
            parse_json_object(noisy).expect("noisy")["status"],
            "completed"
        );
        assert!(parse_json_object("").is_none());
        assert!(parse_json_object("no json here").is_none());
    }

    #[test]
    fn proc_drains_and_reports_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo out; echo e1 >&2; echo 'ferry: listening on tcp:1.2.3.4:5' >&2; exit 3",
        ]);
        let (tx, rx) = mpsc::channel();
        let mut p = Proc::spawn("sh", cmd, Some(tx)).expect("spawn sh");
        let first = rx.recv_timeout(Duration::from_secs(10)).expect("line");
        assert_eq!(first, "e1");
        let t = Duration::from_secs(10);
        wait_all(&mut [&mut p], Instant::now() + t, "sh", t).expect("wait");
        let fin = p.finish().expect("finish");
        assert_eq!(fin.status.code(), Some(3));
        assert_eq!(fin.stdout.trim(), "out");
        assert!(fin.stderr.contains("listening on tcp:1.2.3.4:5"));
    }

    #[test]
    fn wait_all_times_out_and_kills() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn("sleep", cmd, None).expect("spawn sleep");
        let t = Duration::from_millis(50);
        let e = wait_all(&mut [&mut p], Instant::now() + t, "sleeper", t);
        assert!(matches!(e, Err(BenchError::Timeout { .. })));
        assert!(p.try_wait().is_ok_and(|s| s.is_some()));
    }

    #[test]
    fn missing_executable_is_a_spawn_error() {
        let run = FerryRun {
            exe: Path::new("/no/such/ferry"),
            guest: SendGuest::Image(Path::new("/dev/null")),
            size: 1 << 20,
            channels: 1,
            send_args: &[],
            recv_args: &[],
            congestion: None,
            switchover_digest: false,
            label: "ferry run with 1 channel(s)",
        };
        let e = ferry_once(&run)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cannot start ferry recv"), "{e}");
    }

    #[test]
    fn fake_ferry_end_to_end() {
        // A shell script standing in for the ferry binary: recv prints the
        // listening line and a report; send prints its report.
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("ferry");
        let script = r#"#!/bin/sh
case "$1" in
recv)
  echo "ferry: listening on tcp:127.0.0.1:45678" >&2
  sleep 0.2
  now=$(date +%s.%N)
  echo "{\"status\":\"completed\",\"digest\":\"d1\",\"ram_bytes\":1048576,\"wire_bytes\":1000000,\"finished_at_unix\":$now}"
  ;;
send)
  echo "{\"status\":\"completed\",\"digest\":\"d1\",\"ram_bytes\":1048576,\"wire_bytes\":900000,\"args\":\"$*\"}"
  ;;
esac
"#;
        std::fs::write(&exe, script).expect("write script");
        let mut perm = std::fs::metadata(&exe).expect("meta").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&exe, perm).expect("chmod");
        let args = vec!["--no-checksum".to_string()];
        let run = FerryRun {
            exe: &exe,
            guest: SendGuest::Image(Path::new("/dev/shm/x.ram")),
            size: 1 << 20,
            channels: 2,
            send_args: &args,
            recv_args: &[],
            congestion: None,
            switchover_digest: false,
            label: "ferry run with 2 channel(s)",
        };
        // Another test thread forking while the script was open for writing
        // holds it open a moment (ETXTBSY): a race of the test, so retry.
        let mut tries = 0;
        let s = loop {
            match ferry_once(&run) {
                Err(BenchError::Spawn { source, .. })
                    if source.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other.expect("fake run"),
            }
        };
        assert!(s.wall_s > 0.1 && s.wall_s < 10.0, "{}", s.wall_s);
        assert_eq!(s.wire_bytes, 900_000);
        assert!(s.cpu_percent.is_some());
        let a = s.detail["send"]["args"].as_str().unwrap_or("");
        assert!(
            a.contains(
                "--ram /dev/shm/x.ram --to tcp:127.0.0.1:45678 --channels 2 --json \
                 --tcp-congestion system --no-checksum"
            ),
            "{a}"
        );
    }

    /// A shell script at `path` standing in for a ferry binary, ready to run
    /// (another test thread's fork may hold it open for writing a moment:
    /// ETXTBSY, so this waits until it runs).
    fn script(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write script");
        let mut perm = std::fs::metadata(path).expect("meta").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(path, perm).expect("chmod");
        for _ in 0..100 {
            match Command::new(path).output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return,
            }
        }
    }

    #[test]
    fn switchover_digest_flags_follow_the_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("old-ferry");
        script(
            &old,
            "#!/bin/sh\necho '      --no-digest  Do not take the digest'\n",
        );
        let new = dir.path().join("new-ferry");
        script(
            &new,
            "#!/bin/sh\necho '      --verify-switchover  Verify'; echo '      --no-digest'\n",
        );
        assert_eq!(switchover_digest_args(&old, true), [] as [&str; 0]);
        assert_eq!(switchover_digest_args(&old, false), ["--no-digest"]);
        assert_eq!(switchover_digest_args(&new, true), ["--verify-switchover"]);
        assert_eq!(switchover_digest_args(&new, false), [] as [&str; 0]);
        // A binary that cannot run is taken as the older kind (its run then
        // fails as it would anyway).
        let none = Path::new("/no/such/ferry");
        assert_eq!(switchover_digest_args(none, false), ["--no-digest"]);
    }

    #[test]
    fn a_failure_cuts_the_wait_short() {
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut a = Proc::spawn("sleep", sleeper, None).expect("spawn sleep");
        let mut fail = Command::new("sh");
        fail.args(["-c", "exit 1"]);
        let mut b = Proc::spawn("false", fail, None).expect("spawn sh");
        let t = Duration::from_secs(20);
        let start = Instant::now();
        let grace = Some(Duration::from_millis(100));
        wait_all_with_grace(&mut [&mut a, &mut b], start + t, "pair", t, grace).expect("wait");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(a.try_wait().is_ok_and(|s| s.is_some_and(|s| !s.success())));
    }
}
