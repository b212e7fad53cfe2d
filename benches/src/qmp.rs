//! The QEMU peer: a minimal QMP client and the driver that has QEMU migrate
//! a paused KVM guest whose RAM holds the dataset, the way
//! `shared/peer/qemu_peer.py tcp` does.
//!
//! Source: `-S`, RAM from `memory-backend-file,share=on` over a copy of the
//! dataset in /dev/shm. Destination: `-incoming defer`, anonymous RAM. Both
//! get the multifd capability (when K > 1), K channels, and the source
//! max-bandwidth 1<<40 and downtime-limit 2000 ms. Wall time runs from the
//! `migrate` command until the destination reports `completed`, polling
//! `query-migrate` every 10 ms. The CPU model is `host,-arch-capabilities`
//! (see [`CPU`]). Both QEMUs are killed when a run ends, and the
//! RAM copy is removed when the peer is dropped, error or not.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::run::{display, run_timeout, wait_all, Proc, TAIL_LINES};
use crate::sys::RemoveOnDrop;
use crate::sys::{children_cpu_s, proc_cpu_s, tail};
use crate::{BenchError, Sample};

/// How long a QMP command may take to answer, and QEMU to open its socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `query-migrate` is polled.
const POLL: Duration = Duration::from_millis(10);
/// The guest CPU. Plain `host` makes QEMU abort on hosts whose KVM refuses
/// IA32_ARCH_CAPABILITIES (MSR 0x10a: "failed to set MSR 0x10a", seen on
/// these nested machines); the guest never runs (-S), so dropping that one
/// feature changes nothing the migration measures.
const CPU: &str = "host,-arch-capabilities";
/// The oldest QEMU with what the peer needs (multifd; mapped-ram in 9.0).
const MIN_MAJOR: u32 = 9;

/// One line from a QMP server.
#[derive(Debug, PartialEq)]
pub(crate) enum Reply {
    /// `{"QMP": {...}}`: the greeting.
    Greeting(Value),
    /// `{"return": ...}`: a command succeeded.
    Return(Value),
    /// `{"error": {"class", "desc"}}`: a command failed.
    Error { class: String, desc: String },
    /// `{"event": NAME, ...}`: asynchronous, skipped by [`Qmp::cmd`].
    Event(String),
}

/// Parses one line of QMP.
pub(crate) fn parse_reply(line: &str) -> Result<Reply, String> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("not JSON ({e}): {}", line.trim()))?;
    if let Some(r) = v.get("return") {
        return Ok(Reply::Return(r.clone()));
    }
    if let Some(e) = v.get("error") {
        return Ok(Reply::Error {
            class: e["class"].as_str().unwrap_or("?").into(),
            desc: e["desc"].as_str().unwrap_or("(no description)").into(),
        });
    }
    if let Some(ev) = v.get("event") {
        return Ok(Reply::Event(ev.as_str().unwrap_or("?").into()));
    }
    if let Some(g) = v.get("QMP") {
        return Ok(Reply::Greeting(g.clone()));
    }
    Err(format!("unexpected QMP message: {}", line.trim()))
}

/// A QMP session over a Unix socket, past the capabilities negotiation.
pub(crate) struct Qmp {
    side: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn err(&self, msg: String) -> BenchError {
        BenchError::Qmp {
            side: self.side.clone(),
            msg,
        }
    }

    /// Reads the greeting and sends `qmp_capabilities`.
    pub(crate) fn handshake(stream: UnixStream, side: &str) -> Result<Self, BenchError> {
        let io = |e: std::io::Error| BenchError::Qmp {
            side: side.into(),
            msg: format!("socket: {e}"),
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Self {
            side: side.into(),
            reader: BufReader::new(stream),
            writer,
        };
        match q.read_reply("the greeting")? {
            Reply::Greeting(_) => {}
            other => return Err(q.err(format!("expected the QMP greeting, got {other:?}"))),
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Connects to the socket at `path`, retrying until QEMU has created it;
    /// `alive` is asked between attempts whether QEMU still runs.
    pub(crate) fn connect(
        path: &Path,
        side: &str,
        alive: &mut dyn FnMut() -> Result<(), BenchError>,
    ) -> Result<Self, BenchError> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Self::handshake(s, side),
                Err(e) if start.elapsed() > QMP_TIMEOUT => {
                    return Err(BenchError::Qmp {
                        side: side.into(),
                        msg: format!(
                            "cannot connect to {} within {} s: {e}",
                            display(path),
                            QMP_TIMEOUT.as_secs()
                        ),
                    })
                }
                Err(_) => {
                    alive()?;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn read_reply(&mut self, waiting_for: &str) -> Result<Reply, BenchError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.err(format!("connection closed while waiting for {waiting_for}"))),
            Ok(_) => parse_reply(&line).map_err(|m| self.err(m)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(self
                .err(format!(
                    "no answer within {} s while waiting for {waiting_for}",
                    QMP_TIMEOUT.as_secs()
                ))),
            Err(e) => Err(self.err(format!("reading {waiting_for}: {e}"))),
        }
    }

    /// Runs a command and returns its `return` value; events are skipped,
    /// an `error` answer is an error naming the command.
    pub(crate) fn cmd(&mut self, name: &str, args: Value) -> Result<Value, BenchError> {
        let mut msg = json!({ "execute": name });
        if args.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.err(format!("sending {name}: {e}")))?;
        loop {
            match self.read_reply(&format!("the answer to {name}"))? {
                Reply::Return(v) => return Ok(v),
                Reply::Error { class, desc } => {
                    return Err(self.err(format!("{name} failed: {class}: {desc}")))
                }
                Reply::Event(_) => {}
                Reply::Greeting(_) => {
                    return Err(self.err(format!("a second greeting while waiting for {name}")))
                }
            }
        }
    }
}

/// Parses `qemu-system-x86_64 --version` output: the version and its major.
pub(crate) fn parse_version(text: &str) -> Option<(String, u32)> {
    let rest = &text[text.find("version ")? + "version ".len()..];
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let major = version.split('.').next()?.parse().ok()?;
    Some((version, major))
}

/// Whether the QEMU peer can run here: its version, or why not.
pub(crate) fn probe(exe: &str) -> Result<String, String> {
    let out = Command::new(exe)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {exe} --version: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (version, major) = parse_version(&text).ok_or_else(|| {
        format!(
            "cannot read a version from {exe} --version: {}",
            text.trim()
        )
    })?;
    if major < MIN_MAJOR {
        return Err(format!(
            "{exe} is version {version}; the peer needs {MIN_MAJOR} or later"
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm is not usable: {e}"))?;
    Ok(version)
}

/// The QEMU peer, ready to run: the dataset copied to /dev/shm.
pub(crate) struct QemuPeer {
    exe: String,
    copy: RemoveOnDrop,
    size: u64,
    /// TLS credentials (QEMU's x509 directory) for both QEMUs.
    pub(crate) tls_dir: Option<PathBuf>,
    /// multifd zstd at this level (QEMU takes 0 to 20).
    pub(crate) zstd_level: Option<i32>,
}

impl QemuPeer {
    /// Where the guest RAM copy goes.
    pub(crate) fn copy_path() -> PathBuf {
        PathBuf::from(format!(
            "/dev/shm/ferry-bench-qemu-{}.ram",
            std::process::id()
        ))
    }

    /// Copies the dataset (`size` bytes, a multiple of 1 MiB) for QEMU.
    pub(crate) fn prepare(exe: &str, dataset: &Path, size: u64) -> Result<Self, BenchError> {
        let path = Self::copy_path();
        let copy = RemoveOnDrop::new(path.clone());
        std::fs::copy(dataset, &path).map_err(|source| BenchError::Io {
            what: format!("copying the dataset {} for QEMU to", display(dataset)),
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            exe: exe.into(),
            copy,
            size,
            tls_dir: None,
            zstd_level: None,
        })
    }

    fn command(&self, qmp: &Path, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args([
            "-enable-kvm",
            "-M",
            "q35,memory-backend=mem",
            "-cpu",
            CPU,
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-nodefaults",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(args);
        cmd
    }

    /// One migration with `channels` channels (1: plain precopy).
    pub(crate) fn run_once(&self, channels: u16) -> Result<Sample, BenchError> {
        let dir = tempfile::tempdir().map_err(|source| BenchError::Io {
            what: "creating a temporary directory for QMP sockets in".into(),
            path: std::env::temp_dir(),
            source,
        })?;
        let (src_qmp, dst_qmp) = (dir.path().join("src.qmp"), dir.path().join("dst.qmp"));
        for p in [&src_qmp, &dst_qmp, self.copy.path()] {
            if p.to_string_lossy().contains(',') {
                return Err(BenchError::Config(format!(
                    "QEMU option paths may not contain ',': {}",
                    display(p)
                )));
            }
        }
        let mem = format!("{}M", self.size >> 20);
        let tls = |endpoint: &str| -> Vec<String> {
            match &self.tls_dir {
                Some(d) => vec![
                    "-object".into(),
                    format!(
                        "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
                        d.display()
                    ),
                ],
                None => Vec::new(),
            }
        };
        let src_args = [
            "-m".to_string(),
            mem.clone(),
            "-S".into(),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
                self.copy.path().display()
            ),
        ];
        let dst_args = [
            "-m".to_string(),
            mem.clone(),
            "-incoming".into(),
            "defer".into(),
            "-object".into(),
            format!("memory-backend-ram,id=mem,size={mem}"),
        ];
        let cpu_err = |source| BenchError::Process {
            process: "getrusage".into(),
            source,
        };
        let cpu0 = children_cpu_s().map_err(cpu_err)?;
        let born = Instant::now();
        let src_args = [&src_args[..], &tls("client")].concat();
        let dst_args = [&dst_args[..], &tls("server")].concat();
        let mut src = Proc::spawn("qemu (source)", self.command(&src_qmp, &src_args), None)?;
        let mut dst = Proc::spawn(
            "qemu (destination)",
            self.command(&dst_qmp, &dst_args),
            None,
        )?;

        let result = self.session(channels, &src_qmp, &dst_qmp, &mut src, &mut dst);

        src.kill();
        dst.kill();
        let grace = Duration::from_secs(10);
        wait_all(
            &mut [&mut src, &mut dst],
            Instant::now() + grace,
            "qemu",
            grace,
        )?;
        let died = Instant::now();
        let cpu1 = children_cpu_s().map_err(cpu_err)?;
        let (wall, info) = result.map_err(|e| match e {
            BenchError::Qmp { side, msg } => BenchError::Qmp {
                side,
                msg: format!(
                    "{msg}\nsource QEMU stderr tail:\n{}\ndestination QEMU stderr tail:\n{}",
                    tail(&src.stderr_so_far(), TAIL_LINES),
                    tail(&dst.stderr_so_far(), TAIL_LINES)
                ),
            },
            other => other,
        })?;
        let wire = info["ram"]["transferred"].as_u64().unwrap_or(0);
        let (src_cpu, dst_cpu) = (
            info["migration_cpu_src_s"].as_f64(),
            info["migration_cpu_dst_s"].as_f64(),
        );
        let detail = json!({
            "total_time_ms": info["total-time"],
            "downtime_ms": info["downtime"],
            "setup_time_ms": info["setup-time"],
            "transferred": info["ram"]["transferred"],
            "mbps": info["ram"]["mbps"],
            "normal_pages": info["ram"]["normal"],
            "zero_pages": info["ram"]["duplicate"],
            "multifd_bytes": info["ram"]["multifd-bytes"],
            "wall_src_s": info["wall_src_s"],
        });
        Ok(Sample::new(
            wall,
            self.size,
            wire,
            Some((
                (cpu1 - cpu0).max(0.0),
                died.duration_since(born).as_secs_f64(),
            )),
            detail,
        )
        .with_sides(src.cpu(), dst.cpu())
        .with_migration_cpu(src_cpu, dst_cpu))
    }

    /// Drives both QEMUs through one migration; returns the wall time to
    /// destination-completed and the source's final `query-migrate`.
    fn session(
        &self,
        channels: u16,
        src_qmp: &Path,
        dst_qmp: &Path,
        src: &mut Proc,
        dst: &mut Proc,
    ) -> Result<(f64, Value), BenchError> {
        let mut qs = Qmp::connect(src_qmp, "source", &mut || exited(src, "source"))?;
        let mut qd = Qmp::connect(dst_qmp, "destination", &mut || exited(dst, "destination"))?;
        let multifd = channels > 1 || self.zstd_level.is_some();
        let caps = json!({ "capabilities": [{ "capability": "multifd", "state": multifd }] });
        qd.cmd("migrate-set-capabilities", caps.clone())?;
        // Parameters both sides must agree on: TLS and compression.
        let mut shared = json!({});
        if multifd {
            shared["multifd-channels"] = json!(channels);
        }
        if self.tls_dir.is_some() {
            shared["tls-creds"] = json!("tls0");
            shared["tls-hostname"] = json!("127.0.0.1");
        }
        if let Some(level) = self.zstd_level {
            shared["multifd-compression"] = json!("zstd");
            shared["multifd-zstd-level"] = json!(level.clamp(0, 20));
        }
        if shared.as_object().is_some_and(|o| !o.is_empty()) {
            qd.cmd("migrate-set-parameters", shared.clone())?;
        }
        qd.cmd("migrate-incoming", json!({ "uri": "tcp:127.0.0.1:0" }))?;
        let port = listening_port(&qd.cmd("query-migrate", json!({}))?).ok_or_else(|| {
            BenchError::Qmp {
                side: "destination".into(),
                msg: "query-migrate after migrate-incoming reports no socket-address port".into(),
            }
        })?;
        qs.cmd("migrate-set-capabilities", caps)?;
        let mut params = shared;
        params["max-bandwidth"] = json!(1u64 << 40);
        params["downtime-limit"] = json!(2000);
        qs.cmd("migrate-set-parameters", params)?;

        let timeout = run_timeout(self.size);
        // Both QEMUs' CPU over the migration itself (their start-up and
        // the guest's set-up before it are not the migration's).
        let cpu = || (proc_cpu_s(src.pid()), proc_cpu_s(dst.pid()));
        let cpu0 = cpu();
        let t0 = Instant::now();
        qs.cmd("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))?;
        let mut info = poll_until(&mut qs, &["completed", "failed", "cancelled"], t0, timeout)?;
        let wall_src = t0.elapsed().as_secs_f64();
        if info["status"] != "completed" {
            return Err(migration_error(channels, &info));
        }
        let dinfo = poll_until(&mut qd, &["completed", "failed"], t0, timeout)?;
        let wall = t0.elapsed().as_secs_f64();
        if dinfo["status"] != "completed" {
            return Err(migration_error(channels, &dinfo));
        }
        info["wall_src_s"] = json!(wall_src);
        let cpu1 = cpu();
        let spent = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        info["migration_cpu_src_s"] = json!(spent(cpu0.0, cpu1.0));
        info["migration_cpu_dst_s"] = json!(spent(cpu0.1, cpu1.1));
        Ok((wall, info))
    }
}

fn exited(p: &mut Proc, side: &str) -> Result<(), BenchError> {
    match p.try_wait()? {
        None => Ok(()),
        Some(status) => Err(BenchError::QemuExited {
            side: side.into(),
            status: status.to_string(),
            stderr: tail(&p.stderr_so_far(), TAIL_LINES),
        }),
    }
}

fn migration_error(channels: u16, info: &Value) -> BenchError {
    BenchError::QemuMigration {
        channels,
        status: info["status"].as_str().unwrap_or("?").into(),
        error: info["error-desc"]
            .as_str()
            .unwrap_or("(no error-desc)")
            .into(),
    }
}

/// The port of the first `socket-address` in a destination's `query-migrate`
/// (QEMU reports it as a string).
pub(crate) fn listening_port(info: &Value) -> Option<u16> {
    let port = &info["socket-address"].as_array()?.first()?["port"];
    match port {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
    .filter(|&p| p != 0)
}

/// Polls `query-migrate` every [`POLL`] until its status is one of `done`.
fn poll_until(
    q: &mut Qmp,
    done: &[&str],
    t0: Instant,
    timeout: Duration,
) -> Result<Value, BenchError> {
    loop {
        let info = q.cmd("query-migrate", json!({}))?;
        if info["status"].as_str().is_some_and(|s| done.contains(&s)) {
            return Ok(info);
        }
        if t0.elapsed() > timeout {
            return Err(q.err(format!(
                "migration still '{}' after {} s",
                info["status"].as_str().unwrap_or("?"),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    #[test]
    fn reply_lines_parse() {
        assert!(matches!(
            parse_reply(
                r#"{"QMP": {"version": {"qemu": {"major": 10}}, "capabilities": ["oob"]}}"#
            ),
            Ok(Reply::Greeting(_))
        ));
        assert_eq!(
            parse_reply(r#"{"return": {}}"#),
            Ok(Reply::Return(json!({})))
        );
        assert_eq!(
            parse_reply(r#"{"error": {"class": "GenericError", "desc": "no"}}"#),
            Ok(Reply::Error {
                class: "GenericError".into(),
                desc: "no".into()
            })
        );
        assert_eq!(
            parse_reply(r#"{"timestamp": {"seconds": 1}, "event": "MIGRATION", "data": {}}"#),
            Ok(Reply::Event("MIGRATION".into()))
        );
        assert!(parse_reply("garbage").is_err());
        assert!(parse_reply(r#"{"what": 1}"#).is_err());
    }

    #[test]
    fn versions_and_ports() {
        let v = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright (c) 2003-2025";
        assert_eq!(parse_version(v), Some(("10.0.2".into(), 10)));
        assert_eq!(
            parse_version("QEMU emulator version 8.2.0"),
            Some(("8.2.0".into(), 8))
        );
        assert_eq!(parse_version("nothing"), None);
        let info = json!({"status": "setup", "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "40123"}]});
        assert_eq!(listening_port(&info), Some(40123));
        assert_eq!(listening_port(&json!({"status": "setup"})), None);
        assert_eq!(
            listening_port(&json!({"socket-address": [{"port": 7}]})),
            Some(7)
        );
    }

    /// A fake QMP server: greeting, then canned answers in order, recording
    /// the commands it received.
    fn fake_server(
        answers: Vec<&'static str>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<Value>>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let Ok((stream, _)) = listener.accept() else {
                return seen;
            };
            let Ok(mut w) = stream.try_clone() else {
                return seen;
            };
            let mut r = BufReader::new(stream);
            let _ = writeln!(
                w,
                r#"{{"QMP": {{"version": {{"qemu": {{"micro": 2, "minor": 0, "major": 10}}}}, "capabilities": ["oob"]}}}}"#
            );
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                seen.push(serde_json::from_str(&line).unwrap_or(Value::Null));
                let _ = w.write_all(a.as_bytes());
            }
            // Read one more command, then hang up without answering it.
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            seen
        });
        (dir, path, h)
    }

    #[test]
    fn client_against_fake_server() {
        let (_dir, path, h) = fake_server(vec![
            "{\"return\": {}}\n",
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"active\"}}\n{\"return\": {\"status\": \"completed\", \"total-time\": 1234, \"ram\": {\"transferred\": 999}}}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"There's a migration process in progress\"}}\n",
            "{\"return\": {\"status\": \"setup\", \"socket-address\": [{\"port\": \"41000\", \"host\": \"127.0.0.1\", \"type\": \"inet\"}]}}\n",
        ]);
        let mut q = Qmp::connect(&path, "source", &mut || Ok(())).expect("connect");
        let info = q.cmd("query-migrate", json!({})).expect("query");
        assert_eq!(info["status"], "completed");
        assert_eq!(info["ram"]["transferred"], 999);
        let e = q
            .cmd("migrate", json!({"uri": "tcp:127.0.0.1:1"}))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("QMP to the source QEMU: migrate failed: GenericError: There's a migration"),
            "{e}"
        );
        let info = q.cmd("query-migrate", json!({})).expect("query 2");
        assert_eq!(listening_port(&info), Some(41000));
        drop(q);
        let seen = h.join().expect("server thread");
        assert_eq!(seen[0], json!({"execute": "qmp_capabilities"}));
        assert_eq!(seen[1], json!({"execute": "query-migrate"}));
        assert_eq!(
            seen[2],
            json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}})
        );
    }

    #[test]
    fn closed_connection_is_an_error() {
        let (_dir, path, h) = fake_server(vec!["{\"return\": {}}\n"]);
        let mut q = Qmp::connect(&path, "destination", &mut || Ok(())).expect("connect");
        let e = q
            .cmd("query-migrate", json!({}))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("connection closed while waiting for the answer to query-migrate"),
            "{e}"
        );
        let _ = h.join();
    }

    #[test]
    fn connect_gives_up_when_qemu_died() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("never.sock");
        let mut calls = 0;
        let r = Qmp::connect(&path, "source", &mut || {
            calls += 1;
            Err(BenchError::QemuExited {
                side: "source".into(),
                status: "exit status: 1".into(),
                stderr: "  boom".into(),
            })
        });
        assert!(matches!(r, Err(BenchError::QemuExited { .. })));
        assert_eq!(calls, 1);
    }

    /// Needs QEMU >= 9 and /dev/kvm: `cargo test -p ferry-bench -- --ignored`.
    #[test]
    #[ignore]
    fn real_qemu_migrates_64_mib() {
        let version = match probe("qemu-system-x86_64") {
            Ok(v) => v,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let dataset = dir.path().join("d.ram");
        let size = 64 << 20;
        ferry_ram::pattern::write_file(&dataset, size, ferry_ram::pattern::Pattern::Mixed, 1)
            .expect("dataset");
        let peer = QemuPeer::prepare("qemu-system-x86_64", &dataset, size).expect("prepare");
        let copy = QemuPeer::copy_path();
        assert!(copy.exists());
        for k in [1, 2] {
            let s = peer.run_once(k).expect("qemu run");
            eprintln!("QEMU {version} K={k}: {s:?}");
            assert!(s.wall_s > 0.0 && s.wall_s < 60.0);
            assert!(s.wire_bytes > 0);
            assert!(s.cpu_percent.is_some_and(|c| c > 0.0));
        }
        drop(peer);
        assert!(!copy.exists(), "the RAM copy must be removed");
    }
}
