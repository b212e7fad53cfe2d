//! Small system helpers: CPU time of reaped children (getrusage), reaping
//! one child with its own CPU time (wait4), this process's CPU time, free
//! space on a filesystem (statvfs), wall-clock Unix time, text tails, and
//! system settings changed for a measurement and put back
//! ([`SystemSetting`]: the TCP congestion control, free page reporting),
//! and the system-wide counters that explain a noisy run ([`SystemCounters`]).
//!
//! The crate's `unsafe` lives here, around these libc calls, and in
//! `floor.rs` (mmap, readv, sendfile of the floor peer).

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// User + system CPU seconds of every child this process has reaped so far
/// (`getrusage(RUSAGE_CHILDREN)`). The difference of two readings taken
/// around a run is the CPU its processes used, once they have been waited for.
pub(crate) fn children_cpu_s() -> io::Result<f64> {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` points to writable memory the size of a `rusage`, which
    // getrusage fills; RUSAGE_CHILDREN is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getrusage succeeded, so the struct is initialised (and an
    // all-zero `rusage`, plain integers, was valid to begin with).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// User and system CPU seconds of one process over its whole life.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Cpu {
    pub user_s: f64,
    pub sys_s: f64,
}

impl Cpu {
    /// User + system seconds.
    pub fn total_s(self) -> f64 {
        self.user_s + self.sys_s
    }

    fn of(ru: &libc::rusage) -> Self {
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Self {
            user_s: tv(ru.ru_utime),
            sys_s: tv(ru.ru_stime),
        }
    }
}

/// CPU seconds (user + system, all its threads, living and gone) another
/// running process has used so far, from `/proc/PID/stat` (clock-tick
/// resolution, 10 ms at the usual 100 Hz); None if it cannot be read.
pub(crate) fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3:
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (utime + stime) as f64 / hz as f64)
}

/// This process's own CPU time so far (`getrusage(RUSAGE_SELF)`).
pub fn self_cpu() -> io::Result<Cpu> {
    let mut ru = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` points to writable memory the size of a `rusage`, which
    // getrusage fills; RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getrusage succeeded, so the struct is initialised (an all-zero
    // `rusage` of plain integers was valid to begin with).
    Ok(Cpu::of(&unsafe { ru.assume_init() }))
}

/// Reaps the child `pid` if it has exited (or, with `block`, once it has),
/// returning its exit status and its own CPU time (`wait4`'s rusage: the
/// child's, not its siblings'). `Ok(None)`: still running (only without
/// `block`).
pub(crate) fn wait4(pid: u32, block: bool) -> io::Result<Option<(ExitStatus, Cpu)>> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        let mut status: libc::c_int = 0;
        let mut ru = MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `status` and `ru` point to writable memory of the types
        // wait4 fills; `pid` names one child of this process, which only
        // this call reaps (its `std::process::Child` is never waited for
        // once a `Proc` reaps it here).
        let rc = unsafe { libc::wait4(pid, &mut status, flags, ru.as_mut_ptr()) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Ok(None);
        }
        // SAFETY: wait4 reaped the child and filled `ru` (all-zero was valid
        // too).
        let ru = unsafe { ru.assume_init() };
        return Ok(Some((ExitStatus::from_raw(status), Cpu::of(&ru))));
    }
}

/// Bytes an unprivileged writer may still put on the filesystem holding `path`.
pub(crate) fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st`
    // points to writable memory the size of a `statvfs`, which statvfs fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so the struct is initialised (all-zero was
    // already a valid value of this plain-integer struct).
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Now, as f64 seconds since the Unix epoch (the unit of ferry's
/// `started_at_unix` / `finished_at_unix`).
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The last `n` non-empty lines of `text`, each indented for an error message.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "  (empty)".into();
    }
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Touches `bytes` of fresh anonymous memory (in transparent huge pages, as
/// ferry's and QEMU's destinations allocate it) and releases it again.
///
/// This machine is a VM whose memory the host backs lazily and takes back a
/// few seconds after the guest frees it: the first touch of such memory
/// costs ~1.5 s per GiB, memory freed a moment ago costs ~50 ms per GiB.
/// Calling this just before each measured run puts every tool's destination
/// in the same state, so the figures compare the tools, not the host.
pub(crate) fn warm_free_memory(bytes: usize) -> io::Result<()> {
    // SAFETY: an anonymous private mapping with no address hint; the result
    // is checked against MAP_FAILED before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: p..p+bytes is the mapping made above, writable and ours alone
    // until the munmap below; madvise only hints at huge pages.
    unsafe {
        libc::madvise(p, bytes, libc::MADV_HUGEPAGE);
        let base = p.cast::<u8>();
        for off in (0..bytes).step_by(4096) {
            base.add(off).write_volatile(1);
        }
        libc::munmap(p, bytes);
    }
    Ok(())
}

/// Bytes of memory the kernel reports as available (MemAvailable).
pub(crate) fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

const CONGESTION: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// The system's TCP congestion control (`net.ipv4.tcp_congestion_control`).
pub(crate) fn system_congestion() -> Option<String> {
    std::fs::read_to_string(CONGESTION)
        .ok()
        .map(|s| s.trim().to_string())
}

/// A system setting (a file under /proc or /sys) changed for a
/// measurement, and put back as it was when this is dropped, or by
/// [`restore_system_settings`] if the process is interrupted first.
pub(crate) struct SystemSetting {
    path: &'static str,
    previous: String,
}

/// What a measurement changed and has not undone yet: what
/// [`restore_system_settings`] undoes if a signal ends the process first.
enum Undo {
    /// A setting to write back: its file and old value.
    Setting(&'static str, String),
    /// A file the measurement made (a dataset, QEMU's copy) to remove.
    File(PathBuf),
}

static PENDING: Mutex<Vec<Undo>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<Undo>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

impl SystemSetting {
    /// Writes `value` into `path` (root only). `Ok(None)` when it holds
    /// that value already.
    fn set(path: &'static str, value: &str) -> io::Result<Option<Self>> {
        let previous = std::fs::read_to_string(path)?.trim().to_string();
        if previous == value {
            return Ok(None);
        }
        let mut pending = pending();
        std::fs::write(path, value)?;
        pending.push(Undo::Setting(path, previous.clone()));
        Ok(Some(Self { path, previous }))
    }

    /// The value it had before (what is put back).
    pub(crate) fn previous(&self) -> &str {
        &self.previous
    }
}

impl Drop for SystemSetting {
    fn drop(&mut self) {
        pending().retain(|u| !matches!(u, Undo::Setting(p, _) if *p == self.path));
        if let Err(e) = std::fs::write(self.path, &self.previous) {
            eprintln!(
                "ferry bench: could not put {} back to {}: {e}",
                self.path, self.previous
            );
        }
    }
}

/// A file the bench made (a generated dataset, QEMU's copy of it), removed
/// when this is dropped, or by [`restore_system_settings`] if a signal
/// ends the process first.
pub(crate) struct RemoveOnDrop(PathBuf);

impl RemoveOnDrop {
    pub(crate) fn new(path: PathBuf) -> Self {
        pending().push(Undo::File(path.clone()));
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        pending().retain(|u| !matches!(u, Undo::File(p) if *p == self.0));
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Undoes what a measurement still holds changed: puts back the system
/// settings (the congestion control, free page reporting) and removes the
/// files it made. For a process about to exit on a signal, whose guards
/// will not be dropped.
pub fn restore_system_settings() {
    for undo in pending().drain(..) {
        match undo {
            Undo::Setting(path, previous) => {
                if let Err(e) = std::fs::write(path, &previous) {
                    eprintln!("ferry bench: could not put {path} back to {previous}: {e}");
                }
            }
            Undo::File(path) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The system's TCP congestion control set to `name` for as long as the
/// guard lives (so tools that cannot choose their own, QEMU, use it too).
/// `Ok(None)` when it already is the system's.
pub(crate) fn set_system_congestion(name: &str) -> io::Result<Option<SystemSetting>> {
    SystemSetting::set(CONGESTION, name)
}

const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// The order no free block reaches (the buddy allocator's largest is 10 on
/// x86-64), so that no freed memory is reported while it is set.
const NO_REPORTING_ORDER: &str = "11";

/// Free page reporting (virtio-balloon) paused for as long as the guard
/// lives (root only). `Ok(None)` when this kernel has none, or it is paused
/// already.
///
/// In a VM with free page reporting, memory freed in 2 MiB blocks is handed
/// back to the host a couple of seconds later, about 1.2 GiB per wave, and
/// the host takes it away. Two things then go wrong for a measurement: the
/// memory the harness warmed (`warm_free_memory`) is cold again, and each
/// wave stalls the whole VM: a KVM guest's vCPUs both saw one 30–40 ms gap
/// about 2 s after the warm-up released its memory, which fell inside a fast
/// tool's window after resume and outside a slow one's
/// (docs/MEASUREMENTS.md, "The KVM guest's 30–40 ms stall: free page
/// reporting"). Setting the reporting order above the largest block stops
/// new reports.
pub(crate) fn pause_page_reporting() -> io::Result<Option<SystemSetting>> {
    match SystemSetting::set(PAGE_REPORTING_ORDER, NO_REPORTING_ORDER) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\n\nc\n", 2), "  b\n  c");
        assert_eq!(tail("", 3), "  (empty)");
    }

    #[test]
    fn page_reporting_is_paused_and_put_back() {
        let Ok(before) = std::fs::read_to_string(PAGE_REPORTING_ORDER) else {
            eprintln!("skipped: this kernel has no free page reporting ({PAGE_REPORTING_ORDER})");
            return;
        };
        let before = before.trim().to_string();
        match pause_page_reporting() {
            Ok(Some(paused)) => {
                assert_eq!(paused.previous(), before);
                let now = std::fs::read_to_string(PAGE_REPORTING_ORDER).unwrap();
                assert_eq!(now.trim(), NO_REPORTING_ORDER);
                drop(paused);
                let after = std::fs::read_to_string(PAGE_REPORTING_ORDER).unwrap();
                assert_eq!(after.trim(), before);
            }
            Ok(None) => assert_eq!(before, NO_REPORTING_ORDER),
            Err(e) => eprintln!("skipped: pausing free page reporting needs root ({e})"),
        }
        // Interrupted before the guard's drop: the signal path puts it back.
        if let Ok(Some(paused)) = pause_page_reporting() {
            std::mem::forget(paused);
            restore_system_settings();
            let after = std::fs::read_to_string(PAGE_REPORTING_ORDER).unwrap();
            assert_eq!(after.trim(), before);
        }
    }

    #[test]
    fn cpu_and_space_readings_work() {
        assert!(children_cpu_s().is_ok_and(|s| s >= 0.0));
        assert!(free_bytes(Path::new("/")).is_ok());
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
        assert!(unix_now() > 1.6e9);
        assert!(self_cpu().is_ok_and(|c| c.user_s >= 0.0 && c.sys_s >= 0.0));
    }

    #[test]
    fn wait4_reaps_with_the_childs_own_cpu() {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 4",
            ])
            .spawn()
            .expect("spawn sh");
        let (status, cpu) = wait4(child.id(), true)
            .expect("wait4")
            .expect("blocking wait4 reaps");
        assert_eq!(status.code(), Some(4));
        assert!(cpu.total_s() > 0.0, "{cpu:?}");
        // Reaped: std must not find it again.
        assert!(child.try_wait().is_err());
    }
}

/// System-wide counters read around one run, whose differences explain a
/// slow run on this VM: CPU time the hypervisor gave to others (steal),
/// the kernel compacting memory to hand out a huge page (compaction
/// stalls), huge-page faults that fell back to base pages, and page faults.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SystemCounters {
    /// Milliseconds of CPU time stolen by the hypervisor, all CPUs together
    /// (`/proc/stat`, the `cpu` line's 8th field).
    pub steal_ms: u64,
    /// Milliseconds all CPUs spent idle (`/proc/stat`, 4th field).
    pub idle_ms: u64,
    /// Direct compactions a faulting thread waited for (`compact_stall`).
    pub compact_stall: u64,
    /// Transparent huge pages handed out at fault time (`thp_fault_alloc`).
    pub thp_fault_alloc: u64,
    /// Huge-page faults served with base pages instead (`thp_fault_fallback`).
    pub thp_fault_fallback: u64,
    /// Page faults, minor and major (`pgfault`).
    pub pgfault: u64,
}

impl SystemCounters {
    /// The counters now; fields this kernel does not have stay 0.
    pub fn read() -> Self {
        let mut c = Self::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
            if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
                let f: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                let ms = |i: usize| f.get(i).map_or(0, |t| t * 1000 / hz);
                (c.idle_ms, c.steal_ms) = (ms(3), ms(7));
            }
        }
        if let Ok(vmstat) = std::fs::read_to_string("/proc/vmstat") {
            for line in vmstat.lines() {
                let mut it = line.split_whitespace();
                let (Some(name), Some(Ok(v))) = (it.next(), it.next().map(str::parse::<u64>))
                else {
                    continue;
                };
                match name {
                    "compact_stall" => c.compact_stall = v,
                    "thp_fault_alloc" => c.thp_fault_alloc = v,
                    "thp_fault_fallback" => c.thp_fault_fallback = v,
                    "pgfault" => c.pgfault = v,
                    _ => {}
                }
            }
        }
        c
    }

    /// What each counter grew by since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            steal_ms: self.steal_ms.saturating_sub(before.steal_ms),
            idle_ms: self.idle_ms.saturating_sub(before.idle_ms),
            compact_stall: self.compact_stall.saturating_sub(before.compact_stall),
            thp_fault_alloc: self.thp_fault_alloc.saturating_sub(before.thp_fault_alloc),
            thp_fault_fallback: self
                .thp_fault_fallback
                .saturating_sub(before.thp_fault_fallback),
            pgfault: self.pgfault.saturating_sub(before.pgfault),
        }
    }
}

/// The system's load averages over 1, 5 and 15 minutes (`/proc/loadavg`);
/// None where it cannot be read.
pub(crate) fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}
