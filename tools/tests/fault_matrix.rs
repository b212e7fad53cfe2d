//! Fault injection between real `ferry send` and `ferry recv` processes.
//!
//! A relay (`relay/mod.rs`) sits between the two on every channel (main and
//! K = 2 multifd), parses the wire into messages and applies one fault per
//! case: a flipped bit in a header or a body, a truncation closed with FIN,
//! a cut with RST, a duplicate, a drop, a stall, a reorder — at every phase
//! (SETUP ... END). Each case must end in exactly one of:
//! - COMPLETED-EQUAL: both exit 0 saying completed, and their switchover
//!   digests (memory and device state at switchover), device state digests
//!   and, for an image guest, memory digests are equal;
//! - FAILED-CLEAN: both exit non-zero within [`AFTER_FAULT`] of the fault,
//!   with an error that names the channel of the fault (`multifd[i]` for a
//!   multifd fault; `main` or a message kind for a main channel fault).
//!
//! Anything else fails the matrix: HANG (a process still running at the
//! deadline: killed), WRONG-COMPLETED (completed with different digests, or
//! one side completed while the other failed), PANIC (`panicked` on stderr,
//! or death by a signal we did not send), UNCLEAR-ERROR (failed without
//! naming the channel), NOT-TRIGGERED (the relay never met the message: a
//! bug of this suite). Each process's peak RSS must also stay under
//! 4 x the guest + 64 MiB.
//!
//! `FERRY_FAULT_FILTER=a,b` runs the cases whose name contains a or b;
//! `FERRY_FAULT_REPEAT=N` runs the matrix N times; `FERRY_FAULT_JOBS=N`
//! cases at a time (default 3).
//!
//! The crafted-input tests at the end talk to `ferry recv` directly with a
//! raw client (valid hellos, then a SETUP of absurd size, a zstd bomb, or
//! nothing at all), or leave a control client that never reads.

mod relay;
mod support;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay::{Action, At, Dir, Fault, Relay};
use serde_json::Value;
use support::{local_port, Pipes};

const MIB: u64 = 1 << 20;
/// Guest size for the matrix: every guest is this big.
const GUEST: u64 = 16 * MIB;
const GUEST_ARG: &str = "16M";
/// Both processes must have exited this long after the fault.
const AFTER_FAULT: Duration = Duration::from_secs(20);
/// A fault that has not fired by then never will: the case is stopped.
const BEFORE_FAULT: Duration = Duration::from_secs(60);
/// Peak RSS allowed to each process of a matrix case.
const MATRIX_RSS_LIMIT: u64 = 4 * GUEST + 64 * MIB;
/// Peak RSS allowed to `ferry recv` fed crafted input.
const CRAFTED_RSS_LIMIT: u64 = 256 * MIB;
/// A process above this is killed at once (protects the shared machine).
const RSS_KILL: u64 = 3 << 30;

// ---------------------------------------------------------------------------
// Processes: spawned, memory sampled, reaped (exit time), killed
// ---------------------------------------------------------------------------

/// `ferry` without FERRY_LOG (unlike `support::ferry`, RUST_LOG is kept).
fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_LOG");
    c
}

#[derive(Clone, Copy, Debug)]
struct Exit {
    at: Instant,
    code: Option<i32>,
    signal: Option<i32>,
    /// We killed it (a hang, or RSS past [`RSS_KILL`]).
    killed: bool,
}

/// A running `ferry`; stdout and stderr drained by threads; its memory
/// sampled while it runs; killed if dropped while running.
///
/// Peak RSS is the VmHWM of /proc/PID/status, polled: wait4's ru_maxrss is
/// no use here, because a child spawned with vfork/CLONE_VM (as std does)
/// inherits the test process's own high-water mark at exec.
struct Proc {
    name: String,
    pid: libc::pid_t,
    _child: Child,
    pipes: Pipes,
    exit: Option<Exit>,
    /// Highest VmHWM seen while it ran, bytes.
    hwm: u64,
    rss_killed: bool,
}

/// A finished process: how it ended and what it printed.
#[derive(Debug)]
struct Done {
    name: String,
    exit: Exit,
    stdout: String,
    stderr: String,
    peak_rss: u64,
    rss_killed: bool,
}

impl Proc {
    fn spawn(name: &str, args: &[String]) -> Proc {
        let (child, pipes) = Pipes::spawn(ferry().args(args), &format!("ferry {args:?}"));
        Proc {
            name: name.to_string(),
            pid: child.id() as libc::pid_t,
            _child: child,
            pipes,
            exit: None,
            hwm: 0,
            rss_killed: false,
        }
    }

    /// Reaps the process if it exited (without waiting); samples its memory
    /// while it runs and kills it past [`RSS_KILL`]. True once it exited.
    /// Called every 10 ms by every wait here.
    fn poll(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        if let Some((hwm, rss)) = proc_memory(self.pid) {
            self.hwm = self.hwm.max(hwm);
            if rss > RSS_KILL {
                self.rss_killed = true;
                self.kill();
                return true;
            }
        }
        self.reap(libc::WNOHANG, false)
    }

    fn reap(&mut self, flags: libc::c_int, killed: bool) -> bool {
        let mut status = 0;
        // SAFETY: our own child's pid, a valid out-pointer.
        let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
        if r != self.pid {
            return false;
        }
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            (None, None)
        };
        self.exit = Some(Exit {
            at: Instant::now(),
            code,
            signal,
            killed,
        });
        true
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        // SAFETY: our own child, not reaped yet (so the pid is still ours).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        self.reap(0, true);
    }

    /// Polls until the process exits or `deadline`; kills it then.
    fn wait_until(&mut self, deadline: Instant) {
        while !self.poll() {
            if Instant::now() >= deadline {
                self.kill();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exited process's outcome and output.
    fn done(mut self) -> Done {
        self.kill(); // no-op if it exited
        let (stdout, stderr) = self.pipes.collect();
        let exit = self.exit.expect("reaped");
        Done {
            name: self.name.clone(),
            exit,
            stdout,
            stderr,
            peak_rss: self.hwm,
            rss_killed: self.rss_killed,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (VmHWM, VmRSS) of a running process, bytes.
fn proc_memory(pid: libc::pid_t) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let l = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = l[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

impl Done {
    /// The summary object: the last JSON line on stdout.
    fn summary(&self) -> Option<Value> {
        let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty())?;
        let v: Value = serde_json::from_str(last).ok()?;
        (v.is_object() && v.get("event").is_none()).then_some(v)
    }

    fn completed(&self) -> bool {
        self.exit.code == Some(0)
            && self
                .summary()
                .is_some_and(|v| v["status"].as_str() == Some("completed"))
    }

    /// The error text: the summary's, else the last line on stderr.
    fn error(&self) -> String {
        if let Some(e) = self
            .summary()
            .and_then(|v| v["error"].as_str().map(String::from))
        {
            return e;
        }
        self.stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string()
    }

    /// `completed`, `killed`, or the exit code and error text.
    fn status(&self) -> String {
        if self.completed() {
            "completed".into()
        } else if self.exit.killed {
            "killed (still running at the deadline)".into()
        } else {
            format!("exit {:?}: {}", self.exit.code, short(&self.error(), 200))
        }
    }

    fn panicked(&self) -> bool {
        self.stderr.contains("panicked")
    }

    /// Died of a signal we did not send.
    fn crashed(&self) -> Option<i32> {
        self.exit.signal.filter(|_| !self.exit.killed)
    }
}

fn start_recv(extra: &[&str]) -> (Proc, u16) {
    let mut args: Vec<String> = ["recv", "--listen", "tcp:127.0.0.1:0", "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn("recv", &args);
    let Some(uri) = p.pipes.listening(Duration::from_secs(30)) else {
        p.kill();
        let d = p.done();
        panic!("ferry recv never said where it listens:\n{}", d.stderr);
    };
    (p, local_port(&uri))
}

fn gen(dir: &Path, size: &str, pattern: &str, seed: u64) -> PathBuf {
    let path = dir.join(format!("{pattern}-{size}-{seed}.img"));
    let args: Vec<String> = [
        "gen",
        "--size",
        size,
        "--pattern",
        pattern,
        "--seed",
        &seed.to_string(),
        "-o",
        path.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Proc::spawn("gen", &args);
    p.wait_until(Instant::now() + Duration::from_secs(60));
    let d = p.done();
    assert_eq!(d.exit.code, Some(0), "ferry gen failed:\n{}", d.stderr);
    path
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guest {
    /// `ferry gen` mixed dataset as an image guest: one pass (+ an empty final one).
    Image,
    /// The same, `--compress zstd`.
    ImageZstd,
    /// The synthetic live guest, rate limited so there are several passes.
    Live,
}

impl Guest {
    fn tag(self) -> &'static str {
        match self {
            Guest::Image => "img",
            Guest::ImageZstd => "zstd",
            Guest::Live => "live",
        }
    }
    fn args(self, image: &Path) -> Vec<String> {
        let v: Vec<&str> = match self {
            Guest::Image => vec!["--ram", image.to_str().unwrap()],
            Guest::ImageZstd => vec!["--ram", image.to_str().unwrap(), "--compress", "zstd"],
            Guest::Live => vec![
                "--guest",
                "synthetic",
                "--size",
                GUEST_ARG,
                "--dirty-rate",
                "8M",
                "--max-bandwidth",
                "16M",
                "--downtime-limit",
                "100",
            ],
        };
        v.into_iter().map(String::from).collect()
    }
}

#[derive(Clone, Debug)]
struct Case {
    name: String,
    guest: Guest,
    fault: Option<Fault>,
}

impl Case {
    fn new(guest: Guest, fault: Fault) -> Case {
        Case {
            name: format!("{} ({})", fault.name(), guest.tag()),
            guest,
            fault: Some(fault),
        }
    }
}

fn fault(channel: &str, dir: Dir, kind: &'static str, nth: u64, action: Action) -> Fault {
    Fault {
        channel: channel.to_string(),
        dir,
        kind,
        nth,
        action,
    }
}

/// Where a body flip goes, per message kind: into the field that matters.
fn body_flip(kind: &str) -> Action {
    let (at, bit) = match kind {
        // The last block's length, bit 20 (+/- 1 MiB).
        "SETUP" => (At::FromEnd(10), 4),
        // The generation's low bit.
        "PASS_END" | "COMPLETE" => (At::Start(0), 0),
        // The SHUT error flag.
        "SHUT" => (At::Start(0), 0),
        // A high bit of the resume time.
        "RESUMED" => (At::Start(5), 3),
        // A payload byte, as a flaky link would.
        "DATA" => (At::Start(100), 4),
        _ => (At::Middle, 0),
    };
    Action::FlipBody { at, bit }
}

/// The whole matrix: every phase x every action that applies to it.
fn matrix() -> Vec<Case> {
    const GUESTS: [Guest; 3] = [Guest::Image, Guest::ImageZstd, Guest::Live];
    let mut cases = Vec::new();
    let mut rot = 0usize;
    let mut next_guest = || {
        rot += 1;
        GUESTS[rot % 3]
    };
    // Main channel frames, both directions.
    let main_kinds: [(Dir, &'static str, bool); 9] = [
        (Dir::Up, "SETUP", true),
        (Dir::Up, "PASS_END", true),
        (Dir::Up, "DEVICE_STATE", true),
        (Dir::Up, "COMPLETE", true),
        (Dir::Up, "VERIFY", true),
        (Dir::Down, "SETUP_ACK", true),
        (Dir::Down, "SWITCHOVER_ACK", false),
        (Dir::Down, "RESUMED", true),
        (Dir::Down, "SHUT", true),
    ];
    for (dir, kind, has_body) in main_kinds {
        let mut actions = vec![
            // Type field, low bit: the frame becomes another type.
            Action::FlipHeader { byte: 0, bit: 0 },
            // Length field, low bit: one byte more or less.
            Action::FlipHeader { byte: 4, bit: 0 },
            // The frame's CRC.
            Action::FlipHeader { byte: 8, bit: 0 },
        ];
        if has_body {
            actions.push(body_flip(kind));
        }
        actions.extend([
            Action::TruncateFin,
            Action::CutRst,
            Action::Duplicate,
            Action::Drop,
            Action::Stall,
        ]);
        for a in actions {
            cases.push(Case::new(next_guest(), fault("main", dir, kind, 1, a)));
        }
    }
    // Multifd packets (source -> destination).
    let mut ch = 0;
    for (kind, nth) in [("DATA", 3u64), ("SYNC", 1), ("END", 1)] {
        let mut actions = vec![
            // Block index, bit 3 (covered by the header crc).
            Action::FlipHeader { byte: 8, bit: 3 },
        ];
        if kind == "DATA" {
            actions.push(body_flip(kind));
        }
        actions.extend([
            Action::TruncateFin,
            Action::CutRst,
            Action::Duplicate,
            Action::Drop,
            Action::Stall,
            Action::ReorderCross,
        ]);
        if kind != "END" {
            actions.push(Action::SwapNext);
        }
        for a in actions {
            ch ^= 1;
            let channel = format!("multifd[{ch}]");
            let mut guest = next_guest();
            if kind == "SYNC" && a == Action::SwapNext {
                // Only a live guest sends more on a channel before the
                // destination has the first pass (an image guest waits for
                // SWITCHOVER_ACK, which needs this very SYNC): the swap
                // could not happen.
                guest = Guest::Live;
            }
            let channel = if a == Action::ReorderCross && kind != "DATA" {
                // The first SYNC (END) of all channels, held until another
                // channel's comes: always possible, whatever the timing.
                "multifd[*]".to_string()
            } else {
                channel
            };
            cases.push(Case::new(guest, fault(&channel, Dir::Up, kind, nth, a)));
        }
    }
    // Later passes of a live guest.
    for a in [
        body_flip("PASS_END"),
        Action::Drop,
        Action::Duplicate,
        Action::Stall,
    ] {
        cases.push(Case::new(
            Guest::Live,
            fault("main", Dir::Up, "PASS_END", 2, a),
        ));
    }
    for (i, a) in [
        Action::FlipHeader { byte: 8, bit: 3 },
        Action::Drop,
        Action::Duplicate,
    ]
    .into_iter()
    .enumerate()
    {
        let channel = format!("multifd[{}]", i % 2);
        cases.push(Case::new(
            Guest::Live,
            fault(&channel, Dir::Up, "SYNC", 2, a),
        ));
    }
    for (i, a) in [body_flip("DATA"), Action::TruncateFin]
        .into_iter()
        .enumerate()
    {
        let channel = format!("multifd[{}]", i % 2);
        cases.push(Case::new(
            Guest::Live,
            fault(&channel, Dir::Up, "DATA", 24, a),
        ));
    }
    cases
}

// ---------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    CompletedEqual,
    FailedClean,
    /// The destination verified and runs the guest; the source never got
    /// its word (RESUMED was lost) and so stays paused, saying to check the
    /// destination: the one honest answer to a lost last message.
    HandedOverUnconfirmed,
    Hang,
    WrongCompleted,
    Panic,
    UnclearError,
    NotTriggered,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::CompletedEqual => "COMPLETED-EQUAL",
            Outcome::FailedClean => "FAILED-CLEAN",
            Outcome::HandedOverUnconfirmed => "HANDED-OVER-UNCONFIRMED",
            Outcome::Hang => "HANG",
            Outcome::WrongCompleted => "WRONG-COMPLETED",
            Outcome::Panic => "PANIC",
            Outcome::UnclearError => "UNCLEAR-ERROR",
            Outcome::NotTriggered => "NOT-TRIGGERED",
        }
    }
    fn ok(self) -> bool {
        matches!(
            self,
            Outcome::CompletedEqual | Outcome::FailedClean | Outcome::HandedOverUnconfirmed
        )
    }
}

struct CaseResult {
    name: String,
    outcome: Outcome,
    /// From the fault to the later of the two exits (or to the kill).
    fault_to_exit: Option<Duration>,
    /// Whole case, from spawning recv.
    wall: Duration,
    rss_send: u64,
    rss_recv: u64,
    rss_ok: bool,
    is_cut: bool,
    detail: String,
    relay_seen: Vec<String>,
    relay_notes: Vec<String>,
}

impl CaseResult {
    fn ok(&self) -> bool {
        self.outcome.ok() && self.rss_ok
    }
}

fn short(s: &str, n: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

fn run_case(case: &Case, image: &Path) -> CaseResult {
    let t0 = Instant::now();
    // The destination verifies the switchover (#17's guarantee, opt-in
    // since #16): "completed" on both sides needs equal digests.
    let (mut recv, port) = start_recv(&["--timeout", "30", "--verify-switchover"]);
    let relay = Relay::start(port, case.fault.clone());
    let mut args: Vec<String> = ["send", "--to"].iter().map(|s| s.to_string()).collect();
    args.push(format!("tcp:127.0.0.1:{}", relay.port));
    args.extend(["--channels", "2", "--json"].iter().map(|s| s.to_string()));
    args.extend(case.guest.args(image));
    let mut send = Proc::spawn("send", &args);

    // Until both exit, or the deadline: AFTER_FAULT past the fault, or
    // BEFORE_FAULT past the start while the fault has not fired.
    let mut hung = Vec::new();
    loop {
        let both = send.poll() & recv.poll();
        if both {
            break;
        }
        let deadline = match relay.fired() {
            Some(f) => f.at + AFTER_FAULT,
            None => t0 + BEFORE_FAULT,
        };
        if Instant::now() >= deadline {
            for p in [&mut send, &mut recv] {
                if !p.poll() {
                    hung.push(p.name.clone());
                    p.kill();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let fired = relay.fired();
    let relay_seen = relay.seen_all();
    let relay_notes = relay.notes();
    drop(relay);
    let (s, r) = (send.done(), recv.done());
    let last_exit = s.exit.at.max(r.exit.at);
    let fault_to_exit = fired
        .as_ref()
        .map(|f| last_exit.saturating_duration_since(f.at));
    let wall = t0.elapsed();

    let rss_ok = s.peak_rss <= MATRIX_RSS_LIMIT && r.peak_rss <= MATRIX_RSS_LIMIT;
    let (outcome, mut detail) = classify(case, &s, &r, &hung, fired.as_ref());
    if let Some(f) = &fired {
        let wild = case.fault.as_ref().is_some_and(|c| c.channel != f.channel);
        detail = if wild {
            format!("[on {}: {}] {detail}", f.channel, f.note)
        } else {
            format!("[{}] {detail}", f.note)
        };
    }
    if !rss_ok {
        detail = format!(
            "RSS over {} MiB (send {} MiB, recv {} MiB{}); {detail}",
            MATRIX_RSS_LIMIT / MIB,
            s.peak_rss / MIB,
            r.peak_rss / MIB,
            if s.rss_killed || r.rss_killed {
                ", killed"
            } else {
                ""
            }
        );
    }
    CaseResult {
        name: case.name.clone(),
        outcome,
        fault_to_exit,
        wall,
        rss_send: s.peak_rss,
        rss_recv: r.peak_rss,
        rss_ok,
        is_cut: case.fault.as_ref().is_some_and(|f| f.action.is_cut()),
        detail,
        relay_seen,
        relay_notes,
    }
}

/// What a fault on this channel must be reported as: `multifd[i]` exactly;
/// on main, `main` (every main channel error says "main channel") or the
/// name of a main channel message.
fn names_the_channel(channel: &str, text: &str) -> bool {
    if channel == "main" {
        text.contains("main") || relay::FRAME_KINDS.iter().any(|(_, k)| text.contains(k))
    } else {
        text.contains(channel)
    }
}

fn classify(
    case: &Case,
    s: &Done,
    r: &Done,
    hung: &[String],
    fired: Option<&relay::Fired>,
) -> (Outcome, String) {
    let errs = || {
        format!(
            "send: {} | recv: {}",
            short(&s.error(), 160),
            short(&r.error(), 160)
        )
    };
    for d in [s, r] {
        if d.panicked() {
            let line = d
                .stderr
                .lines()
                .find(|l| l.contains("panicked"))
                .unwrap_or("");
            return (Outcome::Panic, format!("{}: {}", d.name, short(line, 200)));
        }
        if let Some(sig) = d.crashed() {
            return (
                Outcome::Panic,
                format!("{} died of signal {sig}; {}", d.name, errs()),
            );
        }
    }
    if case.fault.is_some() && fired.is_none() {
        return (
            Outcome::NotTriggered,
            format!("the relay never met the message; {}", errs()),
        );
    }
    if !hung.is_empty() {
        let state = |d: &Done| {
            if hung.contains(&d.name) {
                "still running".to_string()
            } else if d.completed() {
                "exited 0, completed".to_string()
            } else {
                format!("exited {:?}: {}", d.exit.code, short(&d.error(), 120))
            }
        };
        return (
            Outcome::Hang,
            format!("send {} | recv {}", state(s), state(r)),
        );
    }
    match (s.completed(), r.completed()) {
        (true, true) => {
            let (sv, rv) = (s.summary().unwrap(), r.summary().unwrap());
            let mut keys = vec!["switchover_digest", "device_state_digest"];
            if case.guest != Guest::Live {
                // A live guest ran on the destination before its final digest.
                keys.push("digest");
            }
            let differ: Vec<String> = keys
                .iter()
                .filter(|k| sv[**k].is_null() || sv[**k] != rv[**k])
                .map(|k| format!("{k} {} vs {}", sv[*k], rv[*k]))
                .collect();
            if differ.is_empty() {
                (Outcome::CompletedEqual, format!("passes {}", sv["passes"]))
            } else {
                (
                    Outcome::WrongCompleted,
                    format!("both completed, but {}", differ.join(", ")),
                )
            }
        }
        (false, true)
            if r.summary().is_some_and(|v| v["verified"] == true)
                && s.summary().is_some_and(|v| v["guest_running"] == false)
                && s.error()
                    .contains("check the destination before resuming here") =>
        {
            (Outcome::HandedOverUnconfirmed, errs())
        }
        (true, false) | (false, true) => {
            let (ok, failed) = if s.completed() { (s, r) } else { (r, s) };
            (
                Outcome::WrongCompleted,
                format!(
                    "{} completed, {} exited {:?}: {}",
                    ok.name,
                    failed.name,
                    failed.exit.code,
                    short(&failed.error(), 200)
                ),
            )
        }
        (false, false) => {
            let (se, re) = (s.error(), r.error());
            let codes_ok =
                s.exit.code.is_some_and(|c| c != 0) && r.exit.code.is_some_and(|c| c != 0);
            if !codes_ok || se.is_empty() || re.is_empty() {
                return (
                    Outcome::UnclearError,
                    format!(
                        "exit codes {:?}/{:?}, an empty error; {}",
                        s.exit.code,
                        r.exit.code,
                        errs()
                    ),
                );
            }
            // Without a fault a case must complete; this is worth a look.
            let Some(f) = fired else {
                return (
                    Outcome::UnclearError,
                    format!("failed without a fault: {}", errs()),
                );
            };
            if names_the_channel(&f.channel, &se) || names_the_channel(&f.channel, &re) {
                (Outcome::FailedClean, errs())
            } else {
                (
                    Outcome::UnclearError,
                    format!("neither error names {}; {}", f.channel, errs()),
                )
            }
        }
    }
}

/// Runs `cases` on `jobs` worker threads; results in case order.
fn run_pool(cases: Vec<Case>, image: &Path, jobs: usize) -> Vec<CaseResult> {
    let total = cases.len();
    let queue: Arc<Mutex<VecDeque<(usize, Case)>>> =
        Arc::new(Mutex::new(cases.into_iter().enumerate().collect()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..jobs.max(1))
        .map(|_| {
            let (queue, results, done) = (queue.clone(), results.clone(), done.clone());
            let image = image.to_path_buf();
            std::thread::spawn(move || loop {
                let Some((i, case)) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                let r = run_case(&case, &image);
                let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                eprintln!(
                    "[{n:>3}/{total}] {:<16} {:>6} {}",
                    r.outcome.label(),
                    r.fault_to_exit
                        .map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
                    r.name
                );
                results.lock().unwrap().push((i, r));
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a worker panicked");
    }
    let mut v = std::mem::take(&mut *results.lock().unwrap());
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, r)| r).collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The table, the counts per outcome, and the cut cases' fault-to-exit times.
fn report(results: &[CaseResult], wall: Duration) -> String {
    let mut out = String::new();
    let w = results.iter().map(|r| r.name.len()).max().unwrap_or(10);
    out.push_str(&format!(
        "{:<w$}  {:<16} {:>11} {:>7} {:>9} {:>9}  {}\n",
        "case", "outcome", "fault->exit", "wall", "rss send", "rss recv", "detail"
    ));
    for r in results {
        let outcome = if r.rss_ok {
            r.outcome.label().to_string()
        } else {
            format!("{}+RSS", r.outcome.label())
        };
        out.push_str(&format!(
            "{:<w$}  {:<16} {:>11} {:>6.1}s {:>7}Mi {:>7}Mi  {}\n",
            r.name,
            outcome,
            r.fault_to_exit
                .map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
            r.wall.as_secs_f64(),
            r.rss_send / MIB,
            r.rss_recv / MIB,
            short(&r.detail, 260)
        ));
        for n in &r.relay_notes {
            out.push_str(&format!("{:<w$}    {n}\n", ""));
        }
    }
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    for r in results {
        *counts.entry(r.outcome).or_default() += 1;
    }
    out.push_str(&format!(
        "\n{} cases in {:.1} s:",
        results.len(),
        wall.as_secs_f64()
    ));
    for (o, n) in &counts {
        out.push_str(&format!(" {} {n};", o.label()));
    }
    let rss_bad = results.iter().filter(|r| !r.rss_ok).count();
    out.push_str(&format!(" RSS over limit {rss_bad}\n"));
    let mut cut: Vec<f64> = results
        .iter()
        .filter(|r| r.is_cut && r.outcome != Outcome::Hang)
        .filter_map(|r| r.fault_to_exit.map(|d| d.as_secs_f64()))
        .collect();
    cut.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let cut_all = results.iter().filter(|r| r.is_cut).count();
    if cut_all == 0 {
        return out;
    }
    out.push_str(&format!(
        "cut cases (truncate-fin, cut-rst): {cut_all}, {} ended by themselves; fault->both exits p50 {:.3} s, p99 {:.3} s, max {:.3} s\n",
        cut.len(),
        percentile(&cut, 50.0),
        percentile(&cut, 99.0),
        cut.last().copied().unwrap_or(f64::NAN)
    ));
    let mut other: Vec<f64> = results
        .iter()
        .filter(|r| !r.is_cut && r.outcome == Outcome::FailedClean)
        .filter_map(|r| r.fault_to_exit.map(|d| d.as_secs_f64()))
        .collect();
    other.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out.push_str(&format!(
        "other FAILED-CLEAN cases: fault->both exits p50 {:.3} s, p99 {:.3} s\n",
        percentile(&other, 50.0),
        percentile(&other, 99.0)
    ));
    out
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The whole matrix, behind one test: prints the table, fails on any case
/// that is not COMPLETED-EQUAL or FAILED-CLEAN, or over its RSS limit.
#[test]
fn fault_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let image = gen(dir.path(), GUEST_ARG, "mixed", 7);
    let filter: Vec<String> = std::env::var("FERRY_FAULT_FILTER")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let repeat = env_usize("FERRY_FAULT_REPEAT", 1).max(1);
    let jobs = env_usize("FERRY_FAULT_JOBS", 3);
    let selected: Vec<Case> = matrix()
        .into_iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    assert!(
        !selected.is_empty(),
        "FERRY_FAULT_FILTER {filter:?} selects no case"
    );
    let mut cases = Vec::new();
    for round in 0..repeat {
        for c in &selected {
            let mut c = c.clone();
            if repeat > 1 {
                c.name = format!("{} r{}", c.name, round + 1);
            }
            cases.push(c);
        }
    }
    eprintln!("fault matrix: {} cases, {jobs} at a time", cases.len());
    let t = Instant::now();
    let results = run_pool(cases, &image, jobs);
    let table = report(&results, t.elapsed());
    println!("\n{table}");
    let bad: Vec<String> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| {
            format!(
                "{}: {}{}",
                r.name,
                r.outcome.label(),
                if r.rss_ok { "" } else { " +RSS" }
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} cases failed:\n{}",
        bad.len(),
        results.len(),
        bad.join("\n")
    );
}

/// The relay with no fault must be invisible: 10 migrations through it
/// (image, image + zstd, live), every one COMPLETED-EQUAL, every message
/// kind seen where it belongs, and the relay never losing step.
#[test]
fn relay_pass_through_completes_equal() {
    let dir = tempfile::tempdir().unwrap();
    let image = gen(dir.path(), GUEST_ARG, "mixed", 7);
    let guests = [Guest::Image, Guest::ImageZstd, Guest::Live];
    let cases: Vec<Case> = (0..10)
        .map(|i| {
            let guest = guests[i % 3];
            Case {
                name: format!("pass-through #{} ({})", i + 1, guest.tag()),
                guest,
                fault: None,
            }
        })
        .collect();
    let t = Instant::now();
    let results = run_pool(cases, &image, env_usize("FERRY_FAULT_JOBS", 3));
    println!("\n{}", report(&results, t.elapsed()));
    let mut bad = Vec::new();
    for r in &results {
        println!("{}: {}", r.name, r.relay_seen.join(" "));
        if !r.ok() || !r.relay_notes.is_empty() {
            bad.push(format!(
                "{}: {} {} {:?}",
                r.name,
                r.outcome.label(),
                r.detail,
                r.relay_notes
            ));
            continue;
        }
        let seen = |key: &str| -> u64 {
            r.relay_seen
                .iter()
                .find_map(|s| s.strip_prefix(&format!("{key}=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        for once in [
            "main>SETUP",
            "main>DEVICE_STATE",
            "main>COMPLETE",
            "main<SETUP_ACK",
            "main<SWITCHOVER_ACK",
            "main<RESUMED",
            "main<SHUT",
            "multifd[0]>END",
            "multifd[1]>END",
        ] {
            if seen(once) != 1 {
                bad.push(format!(
                    "{}: {once} seen {} times, not once",
                    r.name,
                    seen(once)
                ));
            }
        }
        let passes = seen("main>PASS_END");
        // An image guest changes nothing after its one pass; a live guest
        // needs at least a live pass and the final one.
        let least = if r.name.contains("(live)") { 2 } else { 1 };
        if passes < least {
            bad.push(format!("{}: {passes} PASS_END", r.name));
        }
        for ch in ["multifd[0]", "multifd[1]"] {
            if seen(&format!("{ch}>SYNC")) != passes {
                bad.push(format!(
                    "{}: {ch} SYNCs differ from {passes} passes",
                    r.name
                ));
            }
        }
        if seen("multifd[0]>DATA") + seen("multifd[1]>DATA") == 0 {
            bad.push(format!("{}: no DATA packets seen", r.name));
        }
    }
    assert!(bad.is_empty(), "pass-through failures:\n{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------
// Crafted input: a raw client at `ferry recv`
// ---------------------------------------------------------------------------

use ferry::protocol::{MainChannel, Message, Setup, CAP_CHECKSUM, CAP_ZSTD};
use ferry::BlockSpec;
use ferry_transport::{
    await_accept, connect_channel, Channel, ChannelHello, ChannelUri, Role, SessionId,
    SocketChannel,
};

/// A source driven by hand: every channel connected and accepted.
struct RawSource {
    main: Arc<MainChannel>,
    multifd: Vec<SocketChannel>,
}

fn raw_connect(port: u16, channels: u16) -> RawSource {
    let uri: ChannelUri = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let session = SessionId::random();
    let hello = |role, index| ChannelHello {
        session,
        role,
        index,
        multifd_channels: channels,
    };
    let tuning = Default::default();
    let main = connect_channel(&uri, &tuning, &hello(Role::Main, 0)).unwrap();
    let multifd: Vec<_> = (0..channels)
        .map(|i| connect_channel(&uri, &tuning, &hello(Role::Multifd, i)).unwrap())
        .collect();
    await_accept(&main, Duration::from_secs(10)).unwrap();
    for ch in &multifd {
        await_accept(ch, Duration::from_secs(10)).unwrap();
    }
    // Numbered frames, as a real source's; no heartbeats (a test that wants
    // the destination's peer timeout to see a silent source gets one).
    let main = MainChannel::new(Arc::new(main), Duration::from_secs(60)).unwrap();
    RawSource { main, multifd }
}

impl RawSource {
    fn setup(&self, capabilities: u8, blocks: Vec<BlockSpec>) {
        self.main
            .send(&Message::Setup(Setup {
                capabilities,
                multifd_channels: self.multifd.len() as u16,
                packet_pages: 128,
                blocks,
            }))
            .unwrap();
    }

    /// The destination's next message, waiting at most `secs`.
    fn reply(&self, secs: u64) -> Result<Message, String> {
        self.main
            .channel()
            .set_read_timeout(Some(Duration::from_secs(secs)))
            .unwrap();
        self.main
            .recv("destination")
            .map(|(m, _)| m)
            .map_err(|e| e.to_string())
    }
}

/// crc32 (IEEE) over the parts in order, as the packets carry it.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

const FLAG_SYNC: u16 = 1;
const FLAG_END: u16 = 2;
const FLAG_CHECKSUM: u16 = 4;
const FLAG_COMPRESSED: u16 = 16;

/// A multifd packet, header crc sealed (see `multifd/src/packet.rs`).
#[allow(clippy::too_many_arguments)]
fn packet(
    flags: u16,
    seq: u64,
    generation: u64,
    normal: u32,
    offsets: &[u64],
    payload: &[u8],
    payload_crc: u32,
    compressed_pages: u32,
) -> Vec<u8> {
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(b"FMFD");
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[6..8].copy_from_slice(&(flags | FLAG_CHECKSUM).to_le_bytes());
    h[12..16].copy_from_slice(&normal.to_le_bytes());
    h[16..20].copy_from_slice(&(offsets.len() as u32 - normal).to_le_bytes());
    h[20..24].copy_from_slice(&4096u32.to_le_bytes());
    h[24..32].copy_from_slice(&seq.to_le_bytes());
    h[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[40..48].copy_from_slice(&generation.to_le_bytes());
    h[48..52].copy_from_slice(&payload_crc.to_le_bytes());
    h[56..60].copy_from_slice(&compressed_pages.to_le_bytes());
    let offs: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    let crc = crc32(&[&h[0..52], &h[56..64], &offs]);
    h[52..56].copy_from_slice(&crc.to_le_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(&offs);
    out.extend_from_slice(payload);
    out
}

fn marker(flag: u16, seq: u64, generation: u64) -> Vec<u8> {
    packet(flag, seq, generation, 0, &[], &[], 0, 0)
}

/// The rules a crafted-input test checks, all of them, so one run reports
/// every way a case fails (not only the first).
struct Check {
    what: String,
    problems: Vec<String>,
}

impl Check {
    fn new(what: &str) -> Check {
        Check {
            what: what.to_string(),
            problems: Vec::new(),
        }
    }

    fn require(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            let p = problem();
            println!("{}: PROBLEM: {p}", self.what);
            self.problems.push(p);
        }
    }

    /// No panic, no hang (not killed by the deadline), peak RSS under `rss`.
    fn process(&mut self, d: &Done, from: Instant, rss: u64, limit: Duration) {
        let secs = d.exit.at.saturating_duration_since(from).as_secs_f64();
        println!(
            "{}: {} ended after {secs:.2} s, peak RSS {} MiB: {}",
            self.what,
            d.name,
            d.peak_rss / MIB,
            d.status()
        );
        self.require(!d.panicked(), || {
            format!("{} panicked:\n{}", d.name, d.stderr)
        });
        self.require(d.crashed().is_none(), || {
            format!("{} died of signal {:?}", d.name, d.crashed())
        });
        self.require(!d.exit.killed || d.rss_killed, || {
            format!("HANG: {} still running {limit:?} later; killed", d.name)
        });
        self.require(d.peak_rss <= rss && !d.rss_killed, || {
            format!(
                "{}'s peak RSS {} MiB is over {} MiB{}",
                d.name,
                d.peak_rss / MIB,
                rss / MIB,
                if d.rss_killed {
                    " (killed past 3 GiB)"
                } else {
                    ""
                }
            )
        });
    }

    fn finish(self) {
        assert!(
            self.problems.is_empty(),
            "{}:\n- {}",
            self.what,
            self.problems.join("\n- ")
        );
    }
}

/// Waits for `recv` (killing it `limit` after `from`) and checks it.
fn recv_ends(mut recv: Proc, from: Instant, limit: Duration, check: &mut Check) -> Done {
    recv.wait_until(from + limit);
    let d = recv.done();
    check.process(&d, from, CRAFTED_RSS_LIMIT, limit);
    d
}

/// What the destination says until its SHUT (or an error), at most 4 messages.
fn last_words(src: &RawSource, secs: u64) -> Vec<String> {
    let mut said = Vec::new();
    for _ in 0..4 {
        match src.reply(secs) {
            Ok(m) => {
                let shut = matches!(m, Message::Shut { .. });
                said.push(format!("{m:?}"));
                if shut {
                    break;
                }
            }
            Err(e) => {
                said.push(format!("error: {e}"));
                break;
            }
        }
    }
    said
}

/// What a raw source that announced a layout does once SETUP is
/// acknowledged: a legal but empty pass 1 (SYNC on every channel,
/// PASS_END), device state, COMPLETE and END. The destination must then
/// fail (no page ever came); on the way it handles the layout it agreed to.
fn empty_migration(src: &RawSource) -> Vec<String> {
    let mut log = Vec::new();
    let mut w = |what: &str, r: Result<(), String>| {
        if let Err(e) = r {
            log.push(format!("{what}: {e}"));
        }
    };
    for ch in &src.multifd {
        w(
            "SYNC",
            ch.write_all(&marker(FLAG_SYNC, 0, 1))
                .map_err(|e| e.to_string()),
        );
    }
    for m in [
        Message::PassEnd { generation: 1 },
        Message::DeviceState(b"crafted".to_vec()),
        Message::Complete { generation: 1 },
    ] {
        w(
            m.name(),
            src.main.send(&m).map(drop).map_err(|e| e.to_string()),
        );
    }
    for ch in &src.multifd {
        w(
            "END",
            ch.write_all(&marker(FLAG_END, 1, 0))
                .map_err(|e| e.to_string()),
        );
    }
    log
}

/// A SETUP announcing `blocks` to a recv started with `extra`: the recv
/// must refuse it, or fail when no page comes, within 20 s, with its RSS
/// bounded.
fn absurd_setup(extra: &[&str], blocks: Vec<BlockSpec>, check: &mut Check) -> Done {
    let what = check.what.clone();
    let (recv, port) = start_recv(extra);
    let src = raw_connect(port, 2);
    let t = Instant::now();
    src.setup(CAP_CHECKSUM, blocks);
    match src.reply(20) {
        Ok(Message::SetupAck { .. }) => {
            println!(
                "{what}: SETUP acknowledged after {:.2} s; sending an empty pass",
                t.elapsed().as_secs_f64()
            );
            let log = empty_migration(&src);
            println!(
                "{what}: write errors {log:?}; the destination then said {:?}",
                last_words(&src, 20)
            );
        }
        other => println!("{what}: SETUP answered with {other:?}"),
    }
    let d = recv_ends(recv, t, Duration::from_secs(20), check);
    drop(src);
    check.require(d.exit.code != Some(0), || {
        "recv completed a migration in which no page came".into()
    });
    check.require(!d.error().is_empty(), || {
        "recv failed without an error text".into()
    });
    d
}

/// 1000 blocks of 20 GiB each (20 TB) in one SETUP.
#[test]
fn crafted_setup_of_1000_blocks_of_20_gib_is_refused_or_fails_with_bounded_memory() {
    let mut check = Check::new("SETUP of 1000 x 20 GiB");
    let blocks = (0..1000)
        .map(|i| BlockSpec {
            name: format!("b{i}"),
            len: 20 << 30,
            page_size: 4096,
        })
        .collect();
    absurd_setup(&["--timeout", "30"], blocks, &mut check);
    check.finish();
}

/// One block of 15 TiB, kept in a file with --ram-out: after the failure
/// no file may be left behind.
#[test]
fn crafted_setup_of_one_15_tib_block_with_ram_out_leaves_no_file_behind() {
    let mut check = Check::new("SETUP of 1 x 15 TiB with --ram-out");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ram-out.img");
    let blocks = vec![BlockSpec {
        name: "ram".into(),
        len: 15 << 40,
        page_size: 4096,
    }];
    absurd_setup(
        &["--timeout", "30", "--ram-out", out.to_str().unwrap()],
        blocks,
        &mut check,
    );
    let left = std::fs::metadata(&out).ok().map(|m| m.len());
    check.require(left.is_none(), || {
        format!(
            "the failed migration left {} behind ({} bytes apparent size)",
            out.display(),
            left.unwrap_or(0)
        )
    });
    check.finish();
}

/// An existing --ram-out file is the user's data until a migration
/// completes: a failed one must leave it as it was.
#[test]
fn failed_migration_leaves_an_existing_ram_out_file_untouched() {
    let mut check = Check::new("failed migration onto an existing --ram-out");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("precious.img");
    let before: Vec<u8> = (0..8 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&out, &before).unwrap();
    let (recv, port) = start_recv(&["--timeout", "30", "--ram-out", out.to_str().unwrap()]);
    let src = raw_connect(port, 2);
    let t = Instant::now();
    // A valid layout of the file's size, then the source vanishes.
    src.setup(
        CAP_CHECKSUM,
        vec![BlockSpec {
            name: "ram".into(),
            len: 8 * MIB,
            page_size: 4096,
        }],
    );
    let ack = src.reply(20);
    println!(
        "{}: SETUP answered with {ack:?}; the source now vanishes",
        check.what
    );
    drop(src);
    let d = recv_ends(recv, t, Duration::from_secs(20), &mut check);
    check.require(d.exit.code != Some(0), || "recv completed".into());
    let after = std::fs::read(&out).unwrap_or_default();
    let first_diff = before.iter().zip(&after).position(|(a, b)| a != b);
    check.require(after.len() == before.len() && first_diff.is_none(), || {
        format!(
            "the failed migration changed {}: {} bytes before, {} after, first difference at byte {:?}",
            out.display(),
            before.len(),
            after.len(),
            first_diff
        )
    });
    check.finish();
}

/// A zstd frame of 1 GiB of zeros (32 KiB on the wire, window 128 MiB)
/// in a packet whose header says it holds 16 pages: refused naming the
/// channel, with memory bounded.
#[test]
fn zstd_bomb_is_refused_naming_the_channel_with_bounded_memory() {
    let mut check = Check::new("zstd bomb");
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.window_log(27).unwrap();
    let zeros = vec![0u8; MIB as usize];
    for _ in 0..1024 {
        enc.write_all(&zeros).unwrap();
    }
    let frame = enc.finish().unwrap();
    // The header must promise more bytes than the frame has (1 <= F < C x 4096).
    let pages = (frame.len() as u64 / 4096 + 1).max(16) as u32;
    assert!(pages <= 4096, "frame of {} bytes", frame.len());
    println!(
        "zstd bomb: a {}-byte frame of 1 GiB in a packet of {pages} pages",
        frame.len()
    );
    let (recv, port) = start_recv(&["--timeout", "30"]);
    let src = raw_connect(port, 1);
    let t = Instant::now();
    src.setup(
        CAP_CHECKSUM | CAP_ZSTD,
        vec![BlockSpec {
            name: "ram".into(),
            len: GUEST,
            page_size: 4096,
        }],
    );
    assert!(
        matches!(src.reply(20), Ok(Message::SetupAck { .. })),
        "the destination acknowledges SETUP"
    );
    let offsets: Vec<u64> = (0..u64::from(pages)).map(|p| p * 4096).collect();
    let crc = crc32(&[&vec![0u8; pages as usize * 4096]]);
    let bytes = packet(FLAG_COMPRESSED, 0, 1, pages, &offsets, &frame, crc, pages);
    let _ = src.multifd[0].write_all(&bytes);
    println!("zstd bomb: the destination said {:?}", last_words(&src, 20));
    let d = recv_ends(recv, t, Duration::from_secs(20), &mut check);
    drop(src);
    check.require(d.exit.code != Some(0), || "recv completed".into());
    let e = d.error();
    check.require(e.contains("multifd[0]"), || {
        format!("the error does not name the channel: {e}")
    });
    check.finish();
}

/// A source that connects every channel and then says nothing.
fn silent_source(extra: &[&str], limit: Duration, what: &str) {
    let mut check = Check::new(what);
    let (recv, port) = start_recv(extra);
    let src = raw_connect(port, 2);
    let t = Instant::now();
    let d = recv_ends(recv, t, limit, &mut check);
    drop(src);
    check.require(d.exit.code != Some(0), || "recv completed".into());
    check.finish();
}

/// With `recv --timeout 2`: recv must give up, not wait for ever.
#[test]
fn silent_source_after_hellos_with_recv_timeout_2_fails() {
    silent_source(
        &["--timeout", "2"],
        Duration::from_secs(20),
        "silent source after the hellos, recv --timeout 2",
    );
}

/// With no timeout flag: the default must still end it (with a generous
/// deadline for whatever default a peer timeout gets).
#[test]
fn silent_source_after_hellos_without_timeout_flag_fails() {
    silent_source(
        &[],
        Duration::from_secs(45),
        "silent source after the hellos, no timeout flag",
    );
}

/// A control client that floods requests and never reads a reply (nor the
/// events) must not hold up a migration, nor the exit of either process.
fn stuck_control_client(side: &str) {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut check = Check::new(&format!("control client that never reads, on {side}"));
    let dir = tempfile::tempdir().unwrap();
    let image = gen(dir.path(), GUEST_ARG, "mixed", 3);
    let sock = dir.path().join(format!("{side}.sock"));
    let sock_arg = sock.to_str().unwrap().to_string();
    let mut recv_extra = vec!["--timeout", "30", "--verify-switchover"];
    if side == "recv" {
        recv_extra.extend(["--control", &sock_arg]);
    }
    let (mut recv, port) = start_recv(&recv_extra);
    let mut args: Vec<String> = vec![
        "send".into(),
        "--to".into(),
        format!("tcp:127.0.0.1:{port}"),
        "--channels".into(),
        "2".into(),
        "--json".into(),
    ];
    args.extend(Guest::Live.args(&image));
    if side == "send" {
        args.extend(["--control".into(), sock_arg.clone()]);
    }
    let t = Instant::now();
    let mut send = Proc::spawn("send", &args);
    // Connect as soon as the socket exists; write requests until the
    // server stops reading them (its replies fill our buffer); never read.
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || -> (u64, Option<UnixStream>) {
            let t = Instant::now();
            let c = loop {
                if let Ok(c) = UnixStream::connect(&sock) {
                    break c;
                }
                if t.elapsed() > Duration::from_secs(20) || stop.load(Ordering::SeqCst) {
                    return (0, None);
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            c.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let req = b"{\"execute\":\"query-migrate\"}\n".repeat(64);
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                match (&c).write(&req) {
                    Ok(n) => sent += n as u64,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            (sent, Some(c)) // open and unread until both processes ended
        })
    };
    let limit = Duration::from_secs(30);
    // Both polled together, so both have their memory sampled.
    while !(send.poll() & recv.poll()) && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
    send.kill();
    recv.kill();
    stop.store(true, Ordering::SeqCst);
    let (sent, client) = flooder.join().unwrap();
    let (s, r) = (send.done(), recv.done());
    drop(client);
    println!(
        "{}: {sent} request bytes written, none of the replies read",
        check.what
    );
    check.require(sent > 0, || "the control client never connected".into());
    check.process(&s, t, CRAFTED_RSS_LIMIT, limit);
    check.process(&r, t, CRAFTED_RSS_LIMIT, limit);
    check.require(s.completed() && r.completed(), || {
        format!(
            "not completed on both sides: send {} | recv {}",
            s.status(),
            r.status()
        )
    });
    if let (Some(sv), Some(rv)) = (s.summary(), r.summary()) {
        check.require(
            s.completed() == r.completed()
                && (!s.completed() || sv["switchover_digest"] == rv["switchover_digest"]),
            || "switchover digests differ".into(),
        );
    }
    check.finish();
}

#[test]
fn control_client_that_never_reads_does_not_hold_up_recv() {
    stuck_control_client("recv");
}

#[test]
fn control_client_that_never_reads_does_not_hold_up_send() {
    stuck_control_client("send");
}
