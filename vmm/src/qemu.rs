//! The same guest program under QEMU: `qemu-system-x86_64 -kernel
//! guest.elf -append "<boot parameters>"`, its report port (0xe9) an
//! `isa-debugcon` writing to a file, which [`QemuGuest::lines`] parses
//! (port.rs). This is what a QEMU-to-QEMU comparison runs (the bench's
//! `--peer qemu`, issue #15 item 6).
//!
//! The firmware is qboot (`-bios qboot.rom`, shipped with QEMU): it boots
//! a PVH ELF itself. SeaBIOS boots one too, through the `pvh.bin` option
//! ROM, but that crashes under the nested, software KVM of the machines
//! ferry is developed on (the vCPU runs the ROM's real-mode code with a
//! 32-bit code segment and triple-faults), so qboot is the default.
//! The guest starts its other vCPUs itself (INIT, SIPI), as under ferry's
//! VMM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    /// Extra arguments, appended (`-incoming`, `-qmp`, ...).
    pub extra: Vec<String>,
}

impl QemuConfig {
    pub fn new(memory: u64) -> Self {
        Self {
            binary: std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
            cpu: "host,-arch-capabilities".into(),
            firmware: "qboot.rom".into(),
            memory,
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
            .args(&config.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        let child = cmd.spawn().map_err(|source| QemuError::Spawn {
            binary: config.binary.clone(),
            source,
        })?;
        Ok(Self {
            child,
            report,
            stderr,
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

    /// QEMU's process id (for a caller that talks to it over QMP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        // Our own child: kill it by its handle and reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
