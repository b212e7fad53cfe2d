//! ferry-bench: the end-to-end benchmark harness behind `ferry bench`, and
//! (in `benches/datapath.rs`) criterion micro-benches of the data path.
//!
//! This crate owns how ferry is measured against its peers on one machine:
//! making (or adopting) the dataset; running the real `ferry recv` and
//! `ferry send` binaries over loopback TCP for each channel count and
//! checking their digests; running QEMU's own multifd migration on the same
//! bytes through a small QMP client, and `iperf3 -P K` for what the link
//! carries; alternating the tools run by run so drift hits all of them alike;
//! and reporting medians and ratios as a table, JSON and an SVG plot.
//!
//! It never links the controller: ferry is measured as a user runs it.
//!
//! `ferry bench --live` (`live.rs`) measures live precopy instead: a guest
//! that keeps writing its memory, per dirty tracker, with downtime, passes
//! and bytes on the wire, and both sides' digests at switchover compared.
//!
//! Files: `run.rs` child processes and one ferry run; `live.rs` the live
//! cases; `qmp.rs` the QEMU peer; `iperf.rs` the iperf3 peer; `floor.rs`
//! the floor peer (splice of the non-zero pages into fresh memory, the
//! least work a migration does); `netns.rs` a shaped veth link between two
//! network namespaces; `report.rs` medians, ratios and renderings; `sys.rs`
//! the libc calls (rusage, statvfs, load average); `error.rs` errors.

mod error;
pub mod floor;
mod iperf;
mod live;
mod live_qemu;
pub mod netns;
mod postcopy;
mod postcopy_qemu;
mod qmp;
mod report;
mod run;
mod sys;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_ram::pattern::{write_file, Pattern};

pub use error::BenchError;
pub use live::{run_live, LiveGuest, LiveOptions, LiveReport};
pub use postcopy::{run_postcopy, PostcopyOptions, PostcopyReport};
pub use report::{
    compute_ratios, median, BenchReport, Case, LiveFigures, LiveSummary, Ratio, Sample, Spread,
    Summary, Tool,
};
pub use sys::{restore_system_settings, Cpu};

use run::{display, FerryRun, SendGuest};
use sys::RemoveOnDrop;

/// The QEMU binary the peer runs.
const QEMU_EXE: &str = "qemu-system-x86_64";
const MIB: u64 = 1 << 20;

/// What `ferry bench` should measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The `ferry` binary to run (`recv` and `send`).
    pub ferry_exe: PathBuf,
    /// Bytes of guest RAM (the dataset's size), a multiple of 1 MiB; when
    /// `dataset` is given, that file's size is used instead.
    pub size: u64,
    /// Channel counts to measure, e.g. `[1, 2, 4]`.
    pub channels: Vec<u16>,
    /// Runs per case; the report gives medians.
    pub runs: usize,
    /// Also run QEMU's multifd migration on the same dataset.
    pub peer_qemu: bool,
    /// Also run `iperf3 -P K` on loopback for each channel count.
    pub peer_iperf: bool,
    /// Also run the floor peer (`floor.rs`): K streams splice the
    /// dataset's non-zero pages into fresh anonymous memory.
    pub peer_floor: bool,
    /// With TLS or compression: also run ferry without them (same send
    /// arguments otherwise), alternating with the other tools.
    pub peer_plain: bool,
    /// Also run ferry with `send --no-checksum` (same arguments otherwise),
    /// alternating with the other tools: what the page checksums cost.
    pub peer_no_checksum: bool,
    /// Use this file instead of generating one (it is never removed).
    pub dataset: Option<PathBuf>,
    /// Seed of the generated dataset (pattern `mixed`).
    pub seed: u64,
    /// Where the generated dataset goes (callers pass /dev/shm by default).
    pub workdir: PathBuf,
    /// Before each measured run, touch and release enough memory that every
    /// tool's destination starts from the same (warm) memory state; see
    /// `sys::warm_free_memory`.
    pub warm_memory: bool,
    /// Leave the VM's free page reporting as it is. By default, when memory
    /// is warmed, reporting is paused for the measurement; see
    /// `sys::pause_page_reporting`.
    pub keep_page_reporting: bool,
    /// TCP congestion control for ferry's sockets and iperf3's (`-C`);
    /// `None` keeps the system's. QEMU always uses the system's.
    pub congestion: Option<String>,
    /// Extra arguments for `ferry send`, e.g. `--send-path copy`, `--no-checksum`.
    pub send_args: Vec<String>,
    /// TLS on every channel of both ferry and QEMU, with this x509 directory
    /// (QEMU's layout; `ferry certs --host localhost 127.0.0.1` makes one).
    pub tls_dir: Option<PathBuf>,
    /// zstd per packet at this level for ferry, and multifd zstd for QEMU
    /// (QEMU's levels start at 0; lower ones are clamped).
    pub zstd_level: Option<i32>,
}

impl BenchConfig {
    /// Defaults: 1 GiB, channels 1 and 2, 3 runs, no peers, seed 1, /dev/shm.
    pub fn new(ferry_exe: impl Into<PathBuf>) -> Self {
        Self {
            ferry_exe: ferry_exe.into(),
            size: 1 << 30,
            channels: vec![1, 2],
            runs: 3,
            peer_qemu: false,
            peer_iperf: false,
            peer_plain: false,
            peer_floor: false,
            peer_no_checksum: false,
            warm_memory: true,
            keep_page_reporting: false,
            congestion: Some("cubic".into()),
            dataset: None,
            seed: 1,
            workdir: PathBuf::from("/dev/shm"),
            send_args: Vec::new(),
            tls_dir: None,
            zstd_level: None,
        }
    }
}

fn human(size: u64) -> String {
    if size >= 1 << 30 {
        format!("{:.2} GiB", size as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", size / MIB)
    }
}

/// One migration tool's turn in a run.
#[derive(Clone, Copy)]
enum Turn {
    Ferry,
    Plain,
    NoChecksum,
    Qemu,
    Floor,
}

/// The channel counts, checked, duplicates dropped (first wins).
fn channel_list(config: &BenchConfig) -> Result<Vec<u16>, BenchError> {
    if config.channels.is_empty() {
        return Err(BenchError::Config("no channel counts given".into()));
    }
    if config.channels.contains(&0) {
        return Err(BenchError::Config("a channel count of 0".into()));
    }
    let mut out: Vec<u16> = Vec::new();
    for &k in &config.channels {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Fails when the files to be written do not fit; files on one filesystem
/// are added up. Each need is (what, directory, bytes).
fn check_space(needs: &[(&str, &Path, u64)]) -> Result<(), BenchError> {
    let mut by_fs: HashMap<u64, (Vec<&str>, &Path, u64)> = HashMap::new();
    for &(what, dir, bytes) in needs {
        let dev = std::fs::metadata(dir)
            .map_err(|source| BenchError::Io {
                what: "inspecting".into(),
                path: dir.to_path_buf(),
                source,
            })?
            .dev();
        let e = by_fs.entry(dev).or_insert((Vec::new(), dir, 0));
        e.0.push(what);
        e.2 += bytes;
    }
    for (whats, dir, needed) in by_fs.into_values() {
        let free = sys::free_bytes(dir).map_err(|source| BenchError::Io {
            what: "reading the free space of".into(),
            path: dir.to_path_buf(),
            source,
        })?;
        if free < needed {
            return Err(BenchError::NoSpace {
                what: whats.join(" and "),
                path: dir.to_path_buf(),
                needed,
                free,
            });
        }
    }
    Ok(())
}

fn fmt_sample(tool: &str, k: u16, run: usize, runs: usize, s: &Sample) -> String {
    let mut cpu = s
        .cpu_percent
        .map_or_else(|| "-".into(), |c| format!("{c:.0}%"));
    if let (Some(snd), Some(rcv)) = (s.send_core_s_per_gib, s.recv_core_s_per_gib) {
        cpu.push_str(&format!(", core-s/GiB send {snd:.3} recv {rcv:.3}"));
    }
    if let Some(c) = s.system {
        cpu.push_str(&format!(
            "; steal {} ms, compaction stalls {}",
            c.steal_ms, c.compact_stall
        ));
    }
    match s.gbps_ram {
        Some(ram) => format!(
            "{tool:<6} K={k} run {run}/{runs}: {:.3} s, {ram:.2} GB/s RAM, {:.2} GB/s wire, CPU {cpu}",
            s.wall_s, s.gbps_wire
        ),
        None => format!(
            "{tool:<6} K={k} run {run}/{runs}: {:.2} GB/s wire over {:.1} s, CPU {cpu}",
            s.gbps_wire, s.wall_s
        ),
    }
}

/// `ferry send`'s and `ferry recv`'s arguments for the configured TLS and
/// compression, on top of the configured send arguments.
fn tls_and_compression_args(config: &BenchConfig) -> (Vec<String>, Vec<String>) {
    let mut send_args = config.send_args.clone();
    let mut recv_args = Vec::new();
    if let Some(d) = &config.tls_dir {
        for a in [&mut send_args, &mut recv_args] {
            a.extend(["--tls-dir".to_string(), d.display().to_string()]);
        }
    }
    if let Some(l) = config.zstd_level {
        send_args.extend(["--compress".to_string(), format!("zstd:{l}")]);
    }
    (send_args, recv_args)
}

/// The terms every measured run shares: memory warmed before each run (and
/// kept warm: free page reporting paused), and one TCP congestion control
/// for every tool (the system's, for the whole measurement, when it can be
/// set). Both are put back when this is dropped.
struct Conditions {
    warm: Option<usize>,
    _system_cc: Option<sys::SystemSetting>,
    _reporting: Option<sys::SystemSetting>,
}

impl Conditions {
    /// Sets them up for guests of `size` bytes, noting them in `notes`.
    /// `chosen` names the tools that choose their own congestion control
    /// (when the system's cannot be set); `qemu` says QEMU runs too. With
    /// `system_wide` false (only tools that choose their own run) the
    /// system's is left alone and each tool's sockets get the chosen one.
    fn set(
        config: &BenchConfig,
        size: u64,
        chosen: &str,
        qemu: bool,
        system_wide: bool,
        notes: &mut Vec<String>,
        log: &mut dyn FnMut(&str),
    ) -> Self {
        // Enough for a destination's RAM and the source's page-table and socket
        // churn, within what the machine has free.
        let warm = config.warm_memory.then(|| {
            let want = 2 * size + (1 << 30);
            let have = sys::mem_available().unwrap_or(0) * 3 / 4;
            want.min(have) as usize
        });
        if let Some(bytes) = warm {
            notes.push(format!(
                "before each run the harness touched and released {} of memory, so that every tool's \
                 destination starts from memory the host has backed (this VM backs memory lazily; \
                 cold first touch costs about 1.5 s per GiB)",
                human(bytes as u64)
            ));
        }
        let reporting = if warm.is_some() && !config.keep_page_reporting {
            pause_page_reporting(notes, log)
        } else {
            None
        };

        // Equal terms: the chosen algorithm becomes the system's for the whole
        // measurement (QEMU cannot choose its own), and is put back after.
        let system_cc = sys::system_congestion().unwrap_or_else(|| "unknown".into());
        let guard = match config.congestion.as_deref() {
            Some(cc) if !system_wide => {
                let n = format!(
                    "TCP congestion control: {cc} for {chosen}, set on its own sockets (the \
                     system's, {system_cc}, was left as it is: no tool that cannot choose its \
                     own ran)"
                );
                log(&format!("TCP congestion control: {cc} for {chosen}"));
                notes.push(n);
                None
            }
            Some(cc) => match sys::set_system_congestion(cc) {
                Ok(guard) => {
                    notes.push(format!(
                        "TCP congestion control: {cc} for every tool{}",
                        if guard.is_some() {
                            format!(
                                " (made the system's for the measurement; it was {system_cc} and is \
                                 restored after)"
                            )
                        } else {
                            " (the system's)".into()
                        }
                    ));
                    log(&format!("TCP congestion control: {cc} for every tool"));
                    guard
                }
                Err(e) => {
                    let n = format!(
                        "TCP congestion control: {cc} for {chosen}{} (setting the system's needs \
                         root: {e})",
                        if qemu {
                            format!("; QEMU uses the system's ({system_cc})")
                        } else {
                            String::new()
                        }
                    );
                    log(&n);
                    notes.push(n);
                    None
                }
            },
            None => {
                notes.push(format!(
                    "TCP congestion control: the system's ({system_cc}) for every tool"
                ));
                None
            }
        };
        Self {
            warm,
            _system_cc: guard,
            _reporting: reporting,
        }
    }

    /// Before a measured run: touch and release memory (when asked).
    fn settle(&self, log: &mut dyn FnMut(&str)) {
        if let Some(bytes) = self.warm {
            if let Err(e) = sys::warm_free_memory(bytes) {
                log(&format!("warming memory failed ({e}); measuring as is"));
            }
        }
    }
}

/// Pauses the VM's free page reporting for the measurement, noting it;
/// `None` where there is none to pause or it cannot be paused (noted too).
fn pause_page_reporting(
    notes: &mut Vec<String>,
    log: &mut dyn FnMut(&str),
) -> Option<sys::SystemSetting> {
    match sys::pause_page_reporting() {
        Ok(Some(paused)) => {
            let n = format!(
                "free page reporting paused for the measurement (page_reporting_order {} -> 11, \
                 restored after), so the warmed memory stays backed and no reporting wave stalls \
                 a run; --keep-page-reporting leaves it on",
                paused.previous()
            );
            log("free page reporting paused for the measurement");
            notes.push(n);
            Some(paused)
        }
        Ok(None) => None,
        Err(e) => {
            let n = format!(
                "free page reporting left on (pausing it needs root: {e}); the host may take \
                 back warmed memory during a run"
            );
            log(&n);
            notes.push(n);
            None
        }
    }
}

/// This machine's name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "unknown".into(), |h| h.trim().to_string())
}

/// `ferry --version` of the binary measured.
fn ferry_version(exe: &Path) -> String {
    std::process::Command::new(exe)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "ferry (version unknown)".into())
}

/// Runs the benchmark: for each channel count, `runs` rounds of ferry, then
/// QEMU, then iperf3 (the peers only when asked for and available), each
/// round logged through `log`. Any failed ferry or peer run ends the bench
/// with an error; a peer that cannot run here is skipped with a note.
pub fn run(config: &BenchConfig, log: &mut dyn FnMut(&str)) -> Result<BenchReport, BenchError> {
    let started_at_unix = sys::unix_now();
    let channels = channel_list(config)?;
    if config.runs == 0 {
        return Err(BenchError::Config("runs must be at least 1".into()));
    }
    let mut notes = Vec::new();

    // Which peers can run.
    let mut qemu_version = None;
    if config.peer_qemu {
        match qmp::probe(QEMU_EXE) {
            Ok(v) => qemu_version = Some(v),
            Err(why) => {
                let n = format!("qemu peer skipped: {why}");
                log(&n);
                notes.push(n);
            }
        }
    }
    let mut iperf_ok = false;
    if config.peer_iperf {
        match iperf::probe() {
            Ok(v) => {
                log(&format!("iperf3 peer: {v}"));
                iperf_ok = true;
            }
            Err(why) => {
                let n = format!("iperf3 peer skipped: {why}");
                log(&n);
                notes.push(n);
            }
        }
    }

    // The dataset's size: the given file's, or the configured one.
    let size = match &config.dataset {
        Some(path) => {
            let len = std::fs::metadata(path)
                .map_err(|source| BenchError::Io {
                    what: "reading the dataset".into(),
                    path: path.clone(),
                    source,
                })?
                .len();
            if len == 0 {
                return Err(BenchError::Config(format!(
                    "the dataset {} is empty",
                    display(path)
                )));
            }
            log(&format!("dataset: {} ({len} bytes)", display(path)));
            len
        }
        None => {
            if config.size == 0 || !config.size.is_multiple_of(MIB) {
                return Err(BenchError::Config(format!(
                    "size {} is not a positive multiple of 1 MiB",
                    config.size
                )));
            }
            config.size
        }
    };
    if qemu_version.is_some() && size % MIB != 0 {
        let n = format!("qemu peer skipped: the dataset's size {size} is not a multiple of 1 MiB");
        log(&n);
        notes.push(n);
        qemu_version = None;
    }
    let shm = Path::new("/dev/shm");
    let mut needs = Vec::new();
    if config.dataset.is_none() {
        std::fs::create_dir_all(&config.workdir).map_err(|source| BenchError::Io {
            what: "creating the work directory".into(),
            path: config.workdir.clone(),
            source,
        })?;
        needs.push(("the dataset", config.workdir.as_path(), size));
    }
    if qemu_version.is_some() {
        needs.push(("QEMU's copy of the dataset", shm, size));
    }
    check_space(&needs)?;

    // Adopted, or generated and removed on the way out (error or not).
    let (dataset, _generated) = match &config.dataset {
        Some(path) => (path.clone(), None),
        None => {
            let path = config
                .workdir
                .join(format!("ferry-bench-{}.ram", std::process::id()));
            let guard = RemoveOnDrop::new(path.clone());
            log(&format!(
                "dataset: generating {} (mixed, seed {}) at {}",
                human(size),
                config.seed,
                display(&path)
            ));
            let t = Instant::now();
            write_file(&path, size, Pattern::Mixed, config.seed)?;
            log(&format!(
                "dataset: generated in {:.2} s",
                t.elapsed().as_secs_f64()
            ));
            (path, Some(guard))
        }
    };

    let qemu = match &qemu_version {
        Some(v) => {
            log(&format!(
                "qemu peer: QEMU {v}; copying the dataset to {}",
                display(&qmp::QemuPeer::copy_path())
            ));
            let mut peer = qmp::QemuPeer::prepare(QEMU_EXE, &dataset, size)?;
            peer.tls_dir = config.tls_dir.clone();
            peer.zstd_level = config.zstd_level;
            Some(peer)
        }
        None => None,
    };

    let plain = config.peer_plain && (config.tls_dir.is_some() || config.zstd_level.is_some());
    if config.peer_plain && !plain {
        let n = "plain peer skipped: it is ferry without --tls-dir and --compress, and neither was given";
        log(n);
        notes.push(n.into());
    }
    let (send_args, recv_args) = tls_and_compression_args(config);
    let chosen = if config.peer_iperf {
        "ferry and iperf3"
    } else {
        "ferry"
    };
    let conditions = Conditions::set(config, size, chosen, qemu.is_some(), true, &mut notes, log);
    let settle = |log: &mut dyn FnMut(&str)| conditions.settle(log);

    let no_checksum =
        config.peer_no_checksum && !config.send_args.iter().any(|a| a == "--no-checksum");
    if config.peer_no_checksum && !no_checksum {
        let n = "no-checksum peer skipped: ferry itself already runs with --no-checksum";
        log(n);
        notes.push(n.into());
    }
    if plain || no_checksum || qemu.is_some() || config.peer_floor {
        notes.push(
            "the migrations take turns in an order that rotates by one each run, so no tool \
             always runs first"
                .into(),
        );
    }
    // The migrations take turns in an order that rotates each run (and on
    // across channel counts), so none always goes first (or right after
    // another's memory churn).
    let mut turns = vec![Turn::Ferry];
    if plain {
        turns.push(Turn::Plain);
    }
    if no_checksum {
        turns.push(Turn::NoChecksum);
    }
    if qemu.is_some() {
        turns.push(Turn::Qemu);
    }
    if config.peer_floor {
        turns.push(Turn::Floor);
        notes.push(format!(
            "floor: K streams {} the dataset's non-zero pages into fresh anonymous memory \
                 (MADV_HUGEPAGE), as two processes; digests of both sides compared after the \
                 timing, as ferry's",
            std::env::var("FERRY_FLOOR_METHOD").unwrap_or_else(|_| "splice".into())
        ));
    }
    notes.push(
        "CPU per GiB (send/recv cs/G): each side's process over its whole life, from its wait4 \
         rusage: start-up, the transfer, and for ferry and the floor the digest of all memory \
         taken after it; QEMU's from its two processes, killed after the run; iperf3: n/a"
            .into(),
    );
    let mut cases = Vec::new();
    for &k in &channels {
        let (mut f, mut p, mut q, mut i) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut nc = Vec::new();
        let mut fl = Vec::new();
        let label = format!("ferry run with {k} channel(s)");
        let ferry = |send_args: &[String], recv_args: &[String]| {
            run::ferry_once(&FerryRun {
                exe: &config.ferry_exe,
                guest: SendGuest::Image(&dataset),
                size,
                channels: k,
                send_args,
                recv_args,
                congestion: config.congestion.as_deref(),
                switchover_digest: false,
                label: &label,
            })
        };
        for r in 1..=config.runs {
            for &turn in &turns {
                settle(log);
                let before = sys::SystemCounters::read();
                let system = || Some(sys::SystemCounters::read().since(before));
                match turn {
                    Turn::Ferry => {
                        let mut s = ferry(&send_args, &recv_args)?;
                        s.system = system();
                        log(&fmt_sample("ferry", k, r, config.runs, &s));
                        f.push(s);
                    }
                    Turn::Plain => {
                        // The same without --tls-dir and --compress.
                        let mut s = ferry(&config.send_args, &[])?;
                        s.system = system();
                        log(&fmt_sample("plain", k, r, config.runs, &s));
                        p.push(s);
                    }
                    Turn::NoChecksum => {
                        let args = [&send_args[..], &["--no-checksum".to_string()]].concat();
                        let mut s = ferry(&args, &recv_args)?;
                        s.system = system();
                        log(&fmt_sample("no-checksum", k, r, config.runs, &s));
                        nc.push(s);
                    }
                    Turn::Qemu => {
                        let Some(peer) = &qemu else { continue };
                        let mut s = peer.run_once(k)?;
                        s.system = system();
                        log(&fmt_sample("qemu", k, r, config.runs, &s));
                        q.push(s);
                    }
                    Turn::Floor => {
                        let mut s = floor::floor_once(
                            &config.ferry_exe,
                            &dataset,
                            size,
                            k,
                            config.congestion.as_deref(),
                        )?;
                        s.system = system();
                        log(&fmt_sample("floor", k, r, config.runs, &s));
                        fl.push(s);
                    }
                }
            }
            turns.rotate_left(1);
            if iperf_ok {
                let s = iperf::run_once(k, config.congestion.as_deref())?;
                log(&fmt_sample("iperf3", k, r, config.runs, &s));
                i.push(s);
            }
        }
        cases.push(Case::new(Tool::Ferry, k, f));
        if plain {
            cases.push(Case::new(Tool::Plain, k, p));
        }
        if no_checksum {
            cases.push(Case::new(Tool::NoChecksum, k, nc));
        }
        if qemu.is_some() {
            cases.push(Case::new(Tool::Qemu, k, q));
        }
        if iperf_ok {
            cases.push(Case::new(Tool::Iperf3, k, i));
        }
        if config.peer_floor {
            cases.push(Case::new(Tool::Floor, k, fl));
        }
    }
    drop(qemu);

    Ok(BenchReport {
        size,
        dataset: display(&dataset),
        dataset_generated: config.dataset.is_none(),
        seed: config.seed,
        runs: config.runs,
        channels,
        send_args: config.send_args.clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        qemu_version,
        host: host_name(),
        ferry_version: ferry_version(&config.ferry_exe),
        started_at_unix,
        finished_at_unix: sys::unix_now(),
        ratios: compute_ratios(&cases),
        cases,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        let mut c = BenchConfig::new("/no/such/ferry");
        c.channels = vec![];
        assert!(matches!(run(&c, &mut |_| {}), Err(BenchError::Config(_))));
        c.channels = vec![1, 0];
        assert!(matches!(run(&c, &mut |_| {}), Err(BenchError::Config(_))));
        c.channels = vec![2, 1, 2];
        assert_eq!(channel_list(&c).ok(), Some(vec![2, 1]));
        c.runs = 0;
        assert!(matches!(run(&c, &mut |_| {}), Err(BenchError::Config(_))));
        c.runs = 1;
        c.size = MIB + 1;
        assert!(matches!(run(&c, &mut |_| {}), Err(BenchError::Config(_))));
    }

    #[test]
    fn space_is_checked_per_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_space(&[("a", dir.path(), 1), ("b", dir.path(), 1)]).is_ok());
        let e = check_space(&[
            ("a", dir.path(), u64::MAX / 2),
            ("b", dir.path(), u64::MAX / 2),
        ]);
        match e {
            Err(BenchError::NoSpace { what, .. }) => assert_eq!(what, "a and b"),
            other => panic!("expected NoSpace, got {other:?}"),
        }
    }

    #[test]
    fn generated_dataset_is_removed_after_a_failed_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = BenchConfig::new("/no/such/ferry");
        c.size = MIB;
        c.workdir = dir.path().to_path_buf();
        c.channels = vec![1];
        let mut lines = Vec::new();
        let e = run(&c, &mut |l| lines.push(l.to_string()));
        assert!(matches!(e, Err(BenchError::Spawn { .. })), "{e:?}");
        assert!(lines
            .iter()
            .any(|l| l.starts_with("dataset: generating 1 MiB")));
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read_dir").collect();
        assert!(left.is_empty(), "dataset left behind: {left:?}");
    }

    /// The whole bench on 64 MiB with every peer, against the release
    /// binary (or $FERRY_EXE): `cargo test -p ferry-bench -- --ignored`.
    #[test]
    #[ignore]
    fn real_bench_64_mib() {
        let exe = std::env::var_os("FERRY_EXE").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ferry"),
            PathBuf::from,
        );
        if !exe.exists() {
            eprintln!("skipped: no ferry binary at {}", exe.display());
            return;
        }
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let mut c = BenchConfig::new(exe);
        c.size = 64 << 20;
        c.runs = 2;
        c.peer_qemu = true;
        c.peer_iperf = true;
        c.peer_floor = true;
        // The system's page reporting is sys.rs's test's to pause.
        c.keep_page_reporting = true;
        c.workdir = dir.path().to_path_buf();
        let report = run(&c, &mut |l| eprintln!("{l}")).expect("bench");
        // Every migration tool has both sides' CPU; iperf3 has none.
        for case in &report.cases {
            let m = case.summary.as_ref().expect("summary");
            let has = m.send_core_s_per_gib.is_some() && m.recv_core_s_per_gib.is_some();
            assert_eq!(has, case.tool != Tool::Iperf3, "{:?}", case.tool);
        }
        assert!(report
            .ratios
            .iter()
            .all(|r| r.ferry_over_floor_wall.is_some()));
        eprintln!("{}", report.table());
        let svg = dir.path().join("bench.svg");
        report.plot_svg(&svg).expect("plot");
        let json = report.to_json();
        assert_eq!(json["cases"][0]["tool"], "ferry");
        assert!(report
            .ratios
            .iter()
            .all(|r| r.ferry_over_qemu_wall.is_some()
                || report
                    .notes
                    .iter()
                    .any(|n| n.starts_with("qemu peer skipped"))));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("bench.svg")],
            "dataset left behind"
        );
    }

    /// A bad `ferry send` argument fails the bench quickly with both sides'
    /// stories: `cargo test -p ferry-bench -- --ignored`.
    #[test]
    #[ignore]
    fn real_ferry_failure_is_reported() {
        let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ferry");
        if !exe.exists() {
            eprintln!("skipped: no ferry binary at {}", exe.display());
            return;
        }
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let mut c = BenchConfig::new(exe);
        c.size = 4 << 20;
        c.runs = 1;
        c.channels = vec![2];
        c.keep_page_reporting = true;
        c.workdir = dir.path().to_path_buf();
        c.send_args = vec!["--no-such-option".into()];
        let start = Instant::now();
        let e = run(&c, &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        eprintln!("{e}");
        assert!(
            e.contains("ferry send: exit status: 2, printed no JSON report"),
            "{e}"
        );
        assert!(e.contains("ferry recv: signal: 9"), "{e}");
        assert!(start.elapsed().as_secs() < 20);
    }
}
