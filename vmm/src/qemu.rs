//! The same guest program under QEMU: `qemu-system-x86_64 -kernel
//! guest.elf -append "<boot parameters>"`, its report port (0xe9) an
//! `isa-debugcon` writing to a file, which [`QemuGuest::lines`] parses
//! (port.rs). With `qmp` on, [`Qmp`] drives it (`migrate`, `query-migrate`);
//! with `incoming`, it waits for a migration. This is what a QEMU-to-QEMU
//! comparison runs (the bench's `--peer qemu`, issue #15 item 6).
//!
//! The firmware is qboot (`-bios qboot.rom`, shipped with QEMU): it boots
//! a PVH ELF itself. SeaBIOS boots one too, through the `pvh.bin` option
//! ROM, but that crashes under the nested, software KVM of the machines
//! ferry is developed on (the vCPU runs the ROM's real-mode code with a
//! 32-bit code segment and triple-faults), so qboot is the default.
//! The guest starts its other vCPUs itself (INIT, SIPI), as under ferry's
//! VMM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::port::{parse_all, PortLine};
use crate::pvh::{BootParams, GUEST_ELF};

/// A QEMU run that could not start or did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU exited ({status}) {when}: {stderr}")]
    Exited {
        status: std::process::ExitStatus,
        when: String,
        stderr: String,
    },
    #[error("the guest under QEMU refused its boot parameters: {0}")]
    Fatal(String),
    #[error("QMP {what}: {why}")]
    Qmp { what: String, why: String },
    #[error("timed out after {secs} s waiting for {what}; the guest's last lines: {tail}")]
    Timeout {
        what: String,
        secs: u64,
        tail: String,
    },
}

/// How to run QEMU.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// The binary (default `qemu-system-x86_64`, or `$FERRY_QEMU`).
    pub binary: String,
    /// `-cpu` (default `host,-arch-capabilities`: plain `host` aborts under
    /// nested KVM, MSR 0x10a).
    pub cpu: String,
    /// `-bios` (default `qboot.rom`, found in QEMU's data directory).
    pub firmware: String,
    /// Guest RAM bytes (`-m`, a whole number of MiB).
    pub memory: u64,
    /// A QMP socket (`dir/qmp.sock`) to drive it through [`QemuGuest::qmp`].
    pub qmp: bool,
    /// `-incoming URI`: wait for a migration instead of booting.
    pub incoming: Option<String>,
    /// Extra arguments, appended.
    pub extra: Vec<String>,
}

impl QemuConfig {
    pub fn new(memory: u64) -> Self {
        Self {
            binary: std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
            cpu: "host,-arch-capabilities".into(),
            firmware: "qboot.rom".into(),
            memory,
            qmp: false,
            incoming: None,
            extra: Vec::new(),
        }
    }
}

/// Whether QEMU can be run here: `Err` says why not (tests skip with it).
pub fn qemu_usable(config: &QemuConfig) -> Result<(), String> {
    crate::kvm_usable()?;
    match Command::new(&config.binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{} --version exited {s}", config.binary)),
        Err(e) => Err(format!("{} is not runnable here: {e}", config.binary)),
    }
}

/// The guest program running under QEMU; killed when dropped.
pub struct QemuGuest {
    child: Child,
    report: PathBuf,
    stderr: PathBuf,
    qmp: Option<PathBuf>,
}

impl QemuGuest {
    /// Writes the guest ELF into `dir` and starts QEMU on it with `params`
    /// on its command line; the report lines go to `dir/report.txt`.
    pub fn boot(config: &QemuConfig, params: &BootParams, dir: &Path) -> Result<Self, QemuError> {
        let file = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| QemuError::File { what, path, source }
        };
        let elf = dir.join("guest.elf");
        std::fs::write(&elf, GUEST_ELF).map_err(file("writing the guest ELF to", &elf))?;
        let report = dir.join("report.txt");
        std::fs::write(&report, b"").map_err(file("creating", &report))?;
        let stderr = dir.join("qemu.stderr");
        let err = std::fs::File::create(&stderr).map_err(file("creating", &stderr))?;
        let mut cmd = Command::new(&config.binary);
        cmd.args(["-accel", "kvm", "-cpu", &config.cpu, "-M", "pc", "-bios"])
            .arg(&config.firmware)
            .args(["-m", &format!("{}M", config.memory >> 20)])
            .args(["-smp", &params.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&elf)
            .args(["-append", &params.cmdline()])
            .args(["-device", "isa-debugcon,iobase=0xe9,chardev=ferry-report"])
            .arg("-chardev")
            .arg(format!("file,id=ferry-report,path={}", report.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        let qmp = config.qmp.then(|| dir.join("qmp.sock"));
        if let Some(q) = &qmp {
            let _ = std::fs::remove_file(q);
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", q.display()));
        }
        if let Some(uri) = &config.incoming {
            cmd.args(["-incoming", uri]);
        }
        cmd.args(&config.extra);
        let child = cmd.spawn().map_err(|source| QemuError::Spawn {
            binary: config.binary.clone(),
            source,
        })?;
        Ok(Self {
            child,
            report,
            stderr,
            qmp,
        })
    }

    /// The report file's text so far.
    pub fn report_text(&self) -> String {
        std::fs::read_to_string(&self.report).unwrap_or_default()
    }

    /// Every report line so far.
    pub fn lines(&self) -> Vec<PortLine> {
        parse_all(&self.report_text())
    }

    /// Polls the report lines every 50 ms until `done` holds for them;
    /// fails if QEMU exits, the guest prints `fatal`, or `timeout` passes.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[PortLine]) -> bool,
    ) -> Result<Vec<PortLine>, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(why) = lines.iter().find_map(|l| match l {
                PortLine::Fatal(w) => Some(w.clone()),
                _ => None,
            }) {
                return Err(QemuError::Fatal(why));
            }
            if done(&lines) {
                return Ok(lines);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(QemuError::Exited {
                    status,
                    when: format!("while waiting for {what}"),
                    stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                });
            }
            if Instant::now() >= deadline {
                let text = self.report_text();
                let tail: Vec<&str> = text.lines().rev().take(4).collect();
                return Err(QemuError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Each vCPU's latest progress line (index = vCPU).
    pub fn progress(&self, vcpus: usize) -> Vec<Option<crate::Progress>> {
        let mut out = vec![None; vcpus];
        for l in self.lines() {
            if let PortLine::Progress(p) = l {
                if let Some(slot) = out.get_mut(p.vcpu) {
                    *slot = Some(p);
                }
            }
        }
        out
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A QMP session (the config's `qmp` must be on), capabilities
    /// negotiated; waits up to 30 s for QEMU to open the socket.
    pub fn qmp(&self) -> Result<Qmp, QemuError> {
        let path = self.qmp.as_ref().ok_or_else(|| QemuError::Qmp {
            what: "connect".into(),
            why: "this QEMU was started without a QMP socket (QemuConfig::qmp)".into(),
        })?;
        Qmp::connect(path, Duration::from_secs(30))
    }

    /// The u64 at guest physical `addr` (HMP `xp` over QMP): a status
    /// block's counter of a paused or running guest.
    pub fn read_phys_u64(&self, addr: u64) -> Result<u64, QemuError> {
        let out = self.qmp()?.execute(
            "human-monitor-command",
            json!({ "command-line": format!("xp /1gx {addr:#x}") }),
        )?;
        // "0000000000009000: 0x00000000000000cd\r\n"
        let text = out.as_str().unwrap_or_default();
        text.split_once(": 0x")
            .and_then(|(_, v)| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| QemuError::Qmp {
                what: format!("xp {addr:#x}"),
                why: format!("unexpected answer {out}"),
            })
    }

    /// Migrates this (source) QEMU to `uri` and waits, polling
    /// `query-migrate` every 50 ms, until it completes; returns the last
    /// `query-migrate` answer (QEMU's `total-time`, `downtime`, `ram`...).
    pub fn migrate(&self, uri: &str, timeout: Duration) -> Result<Value, QemuError> {
        let mut qmp = self.qmp()?;
        qmp.execute("migrate", json!({ "uri": uri }))?;
        let deadline = Instant::now() + timeout;
        loop {
            let r = qmp.execute("query-migrate", json!({}))?;
            match r["status"].as_str() {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(QemuError::Qmp {
                        what: "migrate".into(),
                        why: format!("the migration ended {r}"),
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Qmp {
                    what: "migrate".into(),
                    why: format!("not completed after {} s: {r}", timeout.as_secs()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A QMP session: JSON objects, one a line, over QEMU's unix socket.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// How long one QMP answer may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU opens the socket as it
    /// starts), reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QemuError> {
        let err = |why: String| QemuError::Qmp {
            what: format!("connect to {}", path.display()),
            why,
        };
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(err(e.to_string())),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(QMP_TIMEOUT))
            .map_err(|e| err(e.to_string()))?;
        let writer = stream.try_clone().map_err(|e| err(e.to_string()))?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| QemuError::Qmp {
                what: "read".into(),
                why: e.to_string(),
            })?;
        if n == 0 {
            return Err(QemuError::Qmp {
                what: "read".into(),
                why: "QEMU closed the socket".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| QemuError::Qmp {
            what: "read".into(),
            why: format!("{e}: {line}"),
        })
    }

    /// Runs `command` with `arguments`; its `return` value (events that
    /// arrive meanwhile are skipped), or its `error` as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let err = |why: String| QemuError::Qmp {
            what: command.to_string(),
            why,
        };
        let mut msg = json!({ "execute": command, "arguments": arguments }).to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| err(e.to_string()))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(err(e.to_string()));
            }
        }
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        // Our own child: kill it by its handle and reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
