//! `ferry bench --live`: live precopy of a guest that keeps writing its
//! memory, measured as a user runs it.
//!
//! Each case is one dirty tracker at one channel count. A run of a case is
//! `ferry send --guest synthetic --size S --vcpus N --dirty-rate R
//! --dirty-pattern P --dirty-tracker T --downtime-limit D` into `ferry recv`
//! over loopback, two processes (`run.rs: ferry_pair`, as the bandwidth
//! cases), the destination's switchover digest off: its figures are what a
//! user gets, and the medians and ranges of total time, downtime (the
//! source's `downtime_ms`), passes and bytes on the wire come from them.
//!
//! With the digest off the destination's guest runs, and writes, as soon as
//! every page has landed, so nothing on that side is left to compare with
//! the source's memory at switchover. So every run also has a verification
//! migration of the same guest with the same options and the destination's
//! switchover digest on: the destination hashes all memory and the device
//! state before its guest runs, and both sides' digests at switchover must
//! be equal, else the bench fails naming both. Its downtime (the digest
//! included) is reported beside, not in the medians. In every migration the
//! device state the destination resumed from must be the one the source
//! sent (both sides' `device_state_digest`).
//!
//! The migrations of all cases take turns in an order that rotates by one
//! each run, with memory warmed before each (`Conditions` in lib.rs), as
//! the bandwidth cases. `--tcp-congestion` is set on ferry's own sockets;
//! the system's is left alone, since no tool that cannot choose its own runs.
//!
//! The guest is a [`LiveGuest`]: today the synthetic guest (vCPU threads
//! writing memory); a KVM guest, and QEMU as a peer on the same guest, are
//! meant to be further kinds and a further [`Tool`] here.

use std::fmt::Write as _;
use std::time::Duration;

use ferry_ram::{BlockSpec, GuestMemory, UffdLog, DEFAULT_PAGE_SIZE};
use serde::Serialize;
use serde_json::Value;

use crate::report::{fmt_opt, human_bytes, utc};
use crate::run::{ferry_pair, FerryRun, Pair, SendGuest};
use crate::sys::{self, SystemCounters};
use crate::{channel_list, ferry_version, host_name, tls_and_compression_args};
use crate::{BenchConfig, BenchError, Case, Conditions, Sample, Tool, MIB};

/// Which guest `ferry send` migrates live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LiveGuest {
    /// `--guest synthetic`: vCPU threads writing memory at a set rate and
    /// pattern, their counters and RNG state as the device state.
    #[default]
    Synthetic,
}

impl LiveGuest {
    pub fn name(self) -> &'static str {
        match self {
            Self::Synthetic => "synthetic",
        }
    }

    /// The dirty trackers this guest can use, in the default's order.
    pub fn trackers(self) -> &'static [&'static str] {
        match self {
            Self::Synthetic => &["bitmap", "uffd"],
        }
    }

    /// Whether this kernel has `tracker` for this guest: `Err` says why not.
    fn probe(self, tracker: &str) -> Result<(), String> {
        match (self, tracker) {
            (Self::Synthetic, "uffd") => probe_uffd(),
            _ => Ok(()),
        }
    }

    /// `ferry send`'s arguments for this guest, before `--to`.
    fn send_args(self, live: &LiveOptions, size: u64, seed: u64, tracker: &str) -> Vec<String> {
        match self {
            Self::Synthetic => vec![
                "--guest".into(),
                "synthetic".into(),
                "--size".into(),
                size.to_string(),
                "--vcpus".into(),
                live.vcpus.to_string(),
                "--dirty-rate".into(),
                live.dirty_rate.to_string(),
                "--dirty-pattern".into(),
                live.dirty_pattern.clone(),
                "--dirty-tracker".into(),
                tracker.into(),
                "--seed".into(),
                seed.to_string(),
                "--downtime-limit".into(),
                format!("{}ms", live.downtime_limit.as_secs_f64() * 1e3),
            ],
        }
    }
}

/// The uffd tracker needs userfaultfd with async write-protect and
/// PAGEMAP_SCAN (Linux 6.7+): what ferry's own `UffdLog` opens, tried on
/// 2 MiB of anonymous memory.
fn probe_uffd() -> Result<(), String> {
    let memory = GuestMemory::anonymous(&[BlockSpec {
        name: "probe".into(),
        len: 2 * MIB,
        page_size: DEFAULT_PAGE_SIZE,
    }])
    .map_err(|e| format!("cannot map memory to probe it: {e}"))?;
    UffdLog::new(&memory).map(drop).map_err(|e| e.to_string())
}

/// What `ferry bench --live` adds to a [`BenchConfig`].
#[derive(Clone, Debug)]
pub struct LiveOptions {
    pub guest: LiveGuest,
    /// The guest's vCPUs (writer threads).
    pub vcpus: u16,
    /// Bytes per second all vCPUs dirty together.
    pub dirty_rate: u64,
    /// `random`, `sequential` or `hotset:PCT`.
    pub dirty_pattern: String,
    /// One case per tracker; one this kernel lacks is skipped with a note.
    pub trackers: Vec<String>,
    /// `ferry send --downtime-limit`.
    pub downtime_limit: Duration,
}

impl Default for LiveOptions {
    /// The synthetic guest, 2 vCPUs writing 256 MiB/s into a hot set of a
    /// quarter of memory, both trackers, a 30 ms downtime limit.
    fn default() -> Self {
        Self {
            guest: LiveGuest::Synthetic,
            vcpus: 2,
            dirty_rate: 256 * MIB,
            dirty_pattern: "hotset:25".into(),
            trackers: vec!["bitmap".into(), "uffd".into()],
            downtime_limit: Duration::from_millis(30),
        }
    }
}

/// Checks `random`, `sequential`, `hotset:PCT` (PCT 1-100), as `ferry
/// send` parses them, so a typo fails before anything runs.
fn check_pattern(p: &str) -> Result<(), BenchError> {
    let ok = match p {
        "random" | "sequential" => true,
        _ => p
            .strip_prefix("hotset:")
            .and_then(|pct| pct.trim_end_matches('%').parse::<u8>().ok())
            .is_some_and(|pct| (1..=100).contains(&pct)),
    };
    if ok {
        Ok(())
    } else {
        Err(BenchError::Config(format!(
            "dirty pattern '{p}': expected random, sequential or hotset:PCT (PCT 1-100)"
        )))
    }
}

/// The trackers asked for, checked against the guest's, duplicates dropped.
fn tracker_list(live: &LiveOptions) -> Result<Vec<String>, BenchError> {
    if live.trackers.is_empty() {
        return Err(BenchError::Config("no dirty tracker given".into()));
    }
    let known = live.guest.trackers();
    let mut out: Vec<String> = Vec::new();
    for t in &live.trackers {
        if !known.contains(&t.as_str()) {
            return Err(BenchError::Config(format!(
                "dirty tracker '{t}': the {} guest has {}",
                live.guest.name(),
                known.join(" and ")
            )));
        }
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    Ok(out)
}

/// Everything checked before anything runs: the guest's size, the live
/// options, and that nothing asks for what `--live` does not do yet.
fn check_config(config: &BenchConfig, live: &LiveOptions) -> Result<Vec<String>, BenchError> {
    let mut not_yet = Vec::new();
    if config.peer_qemu || config.peer_iperf || config.peer_floor || config.peer_plain {
        not_yet.push("--peer (ferry alone is measured live for now)");
    }
    if config.dataset.is_some() {
        not_yet.push("--dataset (the synthetic guest makes its own memory from --seed)");
    }
    if !not_yet.is_empty() {
        return Err(BenchError::Config(format!(
            "--live does not take {}",
            not_yet.join(", nor ")
        )));
    }
    if config.size == 0 || !config.size.is_multiple_of(MIB) {
        return Err(BenchError::Config(format!(
            "size {} is not a positive multiple of 1 MiB",
            config.size
        )));
    }
    if !(1..=1024).contains(&live.vcpus) {
        return Err(BenchError::Config(format!(
            "{} vCPUs: a live guest has 1 to 1024",
            live.vcpus
        )));
    }
    if live.downtime_limit.is_zero() {
        return Err(BenchError::Config(
            "a downtime limit of 0: no final pass fits in it, so the migration would never \
             switch over"
                .into(),
        ));
    }
    check_pattern(&live.dirty_pattern)?;
    tracker_list(live)
}

/// What `ferry bench --live` measured, with the conditions to compare it by.
#[derive(Clone, Debug, Serialize)]
pub struct LiveReport {
    /// Always "live": tells this report from the bandwidth one.
    pub mode: &'static str,
    pub guest: LiveGuest,
    /// Guest RAM, bytes.
    pub size: u64,
    pub vcpus: u16,
    /// Bytes per second all vCPUs dirty together.
    pub dirty_rate: u64,
    pub dirty_pattern: String,
    pub downtime_limit_ms: f64,
    /// The trackers measured (those this kernel lacks are in the notes).
    pub trackers: Vec<String>,
    pub seed: u64,
    pub runs: usize,
    pub channels: Vec<u16>,
    pub send_args: Vec<String>,
    /// CPUs this process may use.
    pub cpus: usize,
    pub host: String,
    /// `uname -r`: which trackers exist depends on it.
    pub kernel: String,
    pub ferry_version: String,
    /// The load averages (1, 5, 15 minutes) when the bench started and ended.
    pub load_average_start: Option<[f64; 3]>,
    pub load_average_end: Option<[f64; 3]>,
    pub started_at_unix: f64,
    pub finished_at_unix: f64,
    /// One per (channel count, tracker), in the order asked.
    pub cases: Vec<Case>,
    /// Trackers skipped and why, the conditions, and how to read the figures.
    pub notes: Vec<String>,
}

fn rate(bytes_per_s: u64) -> String {
    format!("{}/s", human_bytes(bytes_per_s))
}

fn fmt_spread(s: crate::Spread, decimals: usize) -> String {
    format!(
        "{:.decimals$} ({:.decimals$}-{:.decimals$})",
        s.median, s.min, s.max
    )
}

fn fmt_load(l: Option<[f64; 3]>) -> String {
    l.map_or_else(
        || "unknown".into(),
        |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
    )
}

impl LiveReport {
    /// A human table: one row per case with the medians and ranges (min-max)
    /// of total time, downtime, passes and wire bytes, and the verification
    /// migrations; then the notes.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let extra = if self.send_args.is_empty() {
            String::new()
        } else {
            format!(", ferry send {}", self.send_args.join(" "))
        };
        let _ = writeln!(
            s,
            "ferry bench --live: {} guest of {}, {} vCPU(s) writing {} ({}), downtime limit {} \
             ms, {} run(s) per case: median (min-max){extra}",
            self.guest.name(),
            human_bytes(self.size),
            self.vcpus,
            rate(self.dirty_rate),
            self.dirty_pattern,
            self.downtime_limit_ms,
            self.runs,
        );
        let _ = writeln!(
            s,
            "{} UTC on {} ({} CPUs, Linux {}), load average {} at the start, {} at the end",
            utc(self.started_at_unix),
            self.host,
            self.cpus,
            self.kernel,
            fmt_load(self.load_average_start),
            fmt_load(self.load_average_end),
        );
        let _ = writeln!(
            s,
            "{:<8} {:>3} {:>22} {:>22} {:>12} {:>22} {:>8} {:>22}",
            "tracker",
            "ch",
            "total s",
            "downtime ms",
            "passes",
            "wire MiB",
            "checked",
            "checked downtime ms"
        );
        for case in &self.cases {
            let tracker = case.tracker.as_deref().unwrap_or("-");
            let Some(m) = case.summary.as_ref().and_then(|m| m.live.as_ref()) else {
                let _ = writeln!(s, "{tracker:<8} {:>3}  (no runs)", case.channels);
                continue;
            };
            let mib = |v: f64| v / MIB as f64;
            let wire = crate::Spread {
                median: mib(m.wire_bytes.median),
                min: mib(m.wire_bytes.min),
                max: mib(m.wire_bytes.max),
            };
            let _ = writeln!(
                s,
                "{tracker:<8} {:>3} {:>22} {:>22} {:>12} {:>22} {:>8} {:>22}",
                case.channels,
                fmt_spread(m.total_s, 3),
                fmt_spread(m.downtime_ms, 1),
                fmt_spread(m.passes, 0),
                fmt_spread(wire, 0),
                format!("{}/{}", m.checks_equal, m.checks),
                m.check_downtime_ms
                    .map_or_else(|| "-".into(), |d| fmt_spread(d, 1)),
            );
        }
        let _ = writeln!(
            s,
            "(total: from the start of the migration on the source until the destination's \
             guest ran; downtime: the source's, from pausing the guest until the destination \
             said it runs, the destination's switchover digest off; wire: every byte on every \
             channel; checked: verification migrations, one per run, with the destination's \
             switchover digest on, whose digests of memory and device state at switchover \
             equalled the source's, and their downtime, the digest included)"
        );
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    /// The whole report as JSON (the same shape as its `Serialize`).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(
            |e| serde_json::json!({ "error": format!("cannot serialise the report: {e}") }),
        )
    }
}

/// One live migration: the pair of processes, then its figures from the
/// source's report, checked; with `run.switchover_digest`, both sides'
/// digests at switchover must be equal.
fn live_once(run: &FerryRun<'_>) -> Result<Sample, BenchError> {
    let Pair {
        sent,
        held,
        t0,
        cpu,
        send_cpu,
        recv_cpu,
    } = ferry_pair(run)?;
    let failed = |why: String| BenchError::FerryFailed {
        case: run.label.to_string(),
        failures: vec![why],
    };
    let need_f64 = |v: &Value, side: &str, key: &str| {
        v[key]
            .as_f64()
            .ok_or_else(|| failed(format!("{side}'s JSON report has no numeric {key}")))
    };
    let need_str = |v: &Value, side: &str, key: &str| {
        v[key]
            .as_str()
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .ok_or_else(|| failed(format!("{side}'s JSON report has no {key}")))
    };
    let downtime_ms = need_f64(&sent, "ferry send", "downtime_ms")?;
    let started = need_f64(&sent, "ferry send", "started_at_unix")?;
    let resumed = need_f64(&sent, "ferry send", "destination_resumed_at_unix")?;
    let total_s = resumed - started;
    if total_s.is_nan() || total_s <= 0.0 {
        return Err(failed(format!(
            "the destination's guest ran at {resumed:.6}, not after the migration started \
             ({started:.6})"
        )));
    }
    let passes = sent["passes"]
        .as_u64()
        .ok_or_else(|| failed("ferry send's JSON report has no passes".into()))?;
    // The device state the destination resumed from is the one sent.
    let (state_sent, state_held) = (
        need_str(&sent, "ferry send", "device_state_digest")?,
        need_str(&held, "ferry recv", "device_state_digest")?,
    );
    if state_sent != state_held {
        return Err(BenchError::LiveMismatch {
            case: run.label.to_string(),
            what: "digests of the device state".into(),
            source_digest: state_sent,
            destination_digest: state_held,
        });
    }
    let source_digest = need_str(&sent, "ferry send", "switchover_digest")?;
    let destination_digest = if run.switchover_digest {
        let theirs = held["switchover_digest"]
            .as_str()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| {
                failed(
                    "ferry recv was asked for its switchover digest and its report has none".into(),
                )
            })?;
        if theirs != source_digest {
            return Err(BenchError::LiveMismatch {
                case: run.label.to_string(),
                what: "digests of memory and device state at switchover".into(),
                source_digest,
                destination_digest: theirs.to_string(),
            });
        }
        Some(theirs.to_string())
    } else {
        None
    };
    let wire_bytes = sent["wire_bytes"].as_u64().unwrap_or(0);
    let detail = serde_json::json!({ "t0_unix": t0, "send": sent, "recv": held });
    let mut sample = Sample::new(total_s, run.size, wire_bytes, Some(cpu), detail)
        .with_sides(send_cpu, recv_cpu);
    sample.live = Some(crate::LiveFigures {
        total_s,
        downtime_ms,
        expected_downtime_ms: sample.detail["send"]["expected_downtime_ms"].as_f64(),
        passes,
        wire_bytes,
        throttle_percent: sample.detail["send"]["throttle_percent"]
            .as_u64()
            .unwrap_or(0),
        switchover_digest: run.switchover_digest,
        source_digest,
        destination_digest,
    });
    Ok(sample)
}

/// The per-run log line of a live migration.
fn fmt_live(tracker: &str, k: u16, run: usize, runs: usize, s: &Sample) -> String {
    let Some(l) = &s.live else {
        return format!("live {tracker} K={k} run {run}/{runs}: (no figures)");
    };
    let mut line = if l.switchover_digest {
        format!(
            "check {tracker:<6} K={k} run {run}/{runs}: digests at switchover equal ({}), \
             downtime {:.1} ms with the destination's digest, total {:.3} s, {} passes",
            l.source_digest, l.downtime_ms, l.total_s, l.passes
        )
    } else {
        format!(
            "live  {tracker:<6} K={k} run {run}/{runs}: total {:.3} s, downtime {:.1} ms \
             (expected {} ms), {} passes, {} on the wire",
            l.total_s,
            l.downtime_ms,
            fmt_opt(l.expected_downtime_ms, 1),
            l.passes,
            human_bytes(l.wire_bytes),
        )
    };
    if l.throttle_percent > 0 {
        let _ = write!(line, ", throttled to {}%", l.throttle_percent);
    }
    if let Some(c) = s.cpu_percent {
        let _ = write!(line, ", CPU {c:.0}%");
    }
    if let Some(c) = s.system {
        let _ = write!(
            line,
            "; steal {} ms, compaction stalls {}",
            c.steal_ms, c.compact_stall
        );
    }
    line
}

/// Runs `ferry bench --live`: for each channel count, `runs` rounds in
/// which every tracker's measured migration and verification migration take
/// turns (the order rotating each round), each logged through `log`. A
/// failed migration or a digest mismatch ends the bench with an error; a
/// tracker this kernel lacks is skipped with a note.
pub fn run_live(
    config: &BenchConfig,
    live: &LiveOptions,
    log: &mut dyn FnMut(&str),
) -> Result<LiveReport, BenchError> {
    let started_at_unix = sys::unix_now();
    let load_average_start = sys::load_average();
    let asked = check_config(config, live)?;
    let channels = channel_list(config)?;
    if config.runs == 0 {
        return Err(BenchError::Config("runs must be at least 1".into()));
    }
    let mut notes = Vec::new();
    let mut trackers = Vec::new();
    for t in asked {
        match live.guest.probe(&t) {
            Ok(()) => trackers.push(t),
            Err(why) => {
                let n = format!("dirty tracker {t} skipped: this kernel lacks it: {why}");
                log(&n);
                notes.push(n);
            }
        }
    }
    if trackers.is_empty() {
        return Err(BenchError::Config(format!(
            "no dirty tracker asked for can run here: {}",
            notes.join("; ")
        )));
    }
    let size = config.size;
    let (send_args, recv_args) = tls_and_compression_args(config);
    // Only ferry runs, and it sets the congestion control on its own
    // sockets: the system's is left alone (a QEMU peer would need it).
    let conditions = Conditions::set(config, size, "ferry", false, false, &mut notes, log);
    notes.push(format!(
        "each run: for every tracker, one measured migration (the destination's switchover \
         digest off: downtime as a user gets it) and one verification migration of the same \
         guest with the destination's switchover digest on, whose digest of memory and device \
         state at switchover must equal the source's; the {} migrations of a run take turns in \
         an order that rotates by one each run",
        2 * trackers.len()
    ));
    notes.push(
        "the sending process's CPU includes the guest's own vCPU threads (the synthetic \
         guest's writers run in `ferry send`)"
            .into(),
    );
    let guest_args: Vec<Vec<String>> = trackers
        .iter()
        .map(|t| live.guest.send_args(live, size, config.seed, t))
        .collect();
    // (tracker index, verification?)
    let mut turns: Vec<(usize, bool)> = (0..trackers.len())
        .flat_map(|t| [(t, false), (t, true)])
        .collect();
    let mut cases = Vec::new();
    for &k in &channels {
        let mut measured: Vec<Vec<Sample>> = vec![Vec::new(); trackers.len()];
        let mut checks: Vec<Vec<Sample>> = vec![Vec::new(); trackers.len()];
        for r in 1..=config.runs {
            for &(t, check) in &turns {
                let label = format!(
                    "live migration ({} guest, tracker {}, {k} channel(s){})",
                    live.guest.name(),
                    trackers[t],
                    if check {
                        ", destination's switchover digest on"
                    } else {
                        ""
                    }
                );
                conditions.settle(log);
                let before = SystemCounters::read();
                let mut s = live_once(&FerryRun {
                    exe: &config.ferry_exe,
                    guest: SendGuest::Live(&guest_args[t]),
                    size,
                    channels: k,
                    send_args: &send_args,
                    recv_args: &recv_args,
                    congestion: config.congestion.as_deref(),
                    switchover_digest: check,
                    label: &label,
                })?;
                s.system = Some(SystemCounters::read().since(before));
                log(&fmt_live(&trackers[t], k, r, config.runs, &s));
                if check {
                    checks[t].push(s);
                } else {
                    measured[t].push(s);
                }
            }
            turns.rotate_left(1);
        }
        for (t, (m, c)) in measured.into_iter().zip(checks).enumerate() {
            cases.push(Case::live(Tool::Ferry, k, &trackers[t], m, c));
        }
    }
    drop(conditions);

    Ok(LiveReport {
        mode: "live",
        guest: live.guest,
        size,
        vcpus: live.vcpus,
        dirty_rate: live.dirty_rate,
        dirty_pattern: live.dirty_pattern.clone(),
        downtime_limit_ms: live.downtime_limit.as_secs_f64() * 1e3,
        trackers,
        seed: config.seed,
        runs: config.runs,
        channels,
        send_args: config.send_args.clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        host: host_name(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |r| r.trim().to_string()),
        ferry_version: ferry_version(&config.ferry_exe),
        load_average_start,
        load_average_end: sys::load_average(),
        started_at_unix,
        finished_at_unix: sys::unix_now(),
        cases,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Summary;

    fn config() -> BenchConfig {
        let mut c = BenchConfig::new("/no/such/ferry");
        c.size = 32 * MIB;
        c.channels = vec![2];
        c.runs = 1;
        c
    }

    fn config_error(c: &BenchConfig, live: &LiveOptions) -> String {
        match run_live(c, live, &mut |_| {}) {
            Err(BenchError::Config(e)) => e,
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("expected a configuration error, got a report"),
        }
    }

    #[test]
    fn patterns_are_checked_as_ferry_send_parses_them() {
        for ok in [
            "random",
            "sequential",
            "hotset:1",
            "hotset:25",
            "hotset:100%",
        ] {
            assert!(check_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "hot", "hotset:", "hotset:0", "hotset:101", "Random"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trackers_are_checked_and_deduplicated() {
        let mut live = LiveOptions::default();
        assert_eq!(
            tracker_list(&live).ok(),
            Some(vec!["bitmap".into(), "uffd".into()])
        );
        live.trackers = vec!["uffd".into(), "bitmap".into(), "uffd".into()];
        assert_eq!(
            tracker_list(&live).ok(),
            Some(vec!["uffd".into(), "bitmap".into()])
        );
        live.trackers = vec![];
        assert!(tracker_list(&live).is_err());
        live.trackers = vec!["kvm-log".into()];
        let e = tracker_list(&live).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "invalid bench configuration: dirty tracker 'kvm-log': the synthetic guest has \
                 bitmap and uffd"
            )
        );
    }

    #[test]
    fn bad_configurations_fail_before_anything_runs() {
        let live = LiveOptions::default();
        let mut c = config();
        c.peer_qemu = true;
        c.dataset = Some("/dev/shm/x.ram".into());
        let e = config_error(&c, &live);
        assert!(
            e.contains("--live does not take --peer") && e.contains("--dataset"),
            "{e}"
        );
        let mut c = config();
        c.size = MIB + 4096;
        assert!(config_error(&c, &live).contains("multiple of 1 MiB"));
        c.size = 0;
        assert!(config_error(&c, &live).contains("multiple of 1 MiB"));
        let c = config();
        let mut l = live.clone();
        l.vcpus = 0;
        assert!(config_error(&c, &l).contains("0 vCPUs"));
        let mut l = live.clone();
        l.downtime_limit = Duration::ZERO;
        assert!(config_error(&c, &l).contains("downtime limit of 0"));
        let mut l = live.clone();
        l.dirty_pattern = "hotset:0".into();
        assert!(config_error(&c, &l).contains("dirty pattern 'hotset:0'"));
        let mut c = config();
        c.channels = vec![0];
        assert!(config_error(&c, &live).contains("channel count of 0"));
        let mut c = config();
        c.runs = 0;
        assert!(config_error(&c, &live).contains("runs must be at least 1"));
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let live = LiveOptions {
            trackers: vec!["bitmap".into()],
            ..LiveOptions::default()
        };
        let mut c = config();
        c.warm_memory = false;
        c.congestion = None;
        let e = run_live(&c, &live, &mut |_| {}).err();
        assert!(matches!(e, Some(BenchError::Spawn { .. })), "{e:?}");
    }

    #[test]
    fn synthetic_send_arguments() {
        let mut live = LiveOptions {
            downtime_limit: Duration::from_micros(1500),
            ..LiveOptions::default()
        };
        let a = LiveGuest::Synthetic.send_args(&live, 64 * MIB, 7, "uffd");
        assert_eq!(
            a.join(" "),
            "--guest synthetic --size 67108864 --vcpus 2 --dirty-rate 268435456 \
             --dirty-pattern hotset:25 --dirty-tracker uffd --seed 7 --downtime-limit 1.5ms"
        );
        live.downtime_limit = Duration::from_millis(30);
        let a = LiveGuest::Synthetic.send_args(&live, MIB, 1, "bitmap");
        assert_eq!(a.last().map(String::as_str), Some("30ms"));
    }

    #[test]
    fn the_uffd_probe_answers_either_way() {
        // Which way depends on the kernel; a refusal must say why.
        if let Err(why) = LiveGuest::Synthetic.probe("uffd") {
            assert!(!why.is_empty());
        }
        assert!(LiveGuest::Synthetic.probe("bitmap").is_ok());
    }

    fn figures(total_s: f64, downtime_ms: f64, passes: u64, check: bool) -> Sample {
        let wire = 1000 * MIB + passes * MIB;
        let mut s = Sample::new(total_s, 1 << 30, wire, None, Value::Null);
        s.live = Some(crate::LiveFigures {
            total_s,
            downtime_ms,
            expected_downtime_ms: Some(1.0),
            passes,
            wire_bytes: wire,
            throttle_percent: 0,
            switchover_digest: check,
            source_digest: "ab".into(),
            destination_digest: check.then(|| "ab".into()),
        });
        s
    }

    fn hand_report() -> LiveReport {
        let samples = vec![
            figures(0.5, 3.0, 4, false),
            figures(0.7, 9.0, 6, false),
            figures(0.6, 2.0, 5, false),
        ];
        let checks = vec![figures(0.6, 60.0, 5, true), figures(0.6, 70.0, 5, true)];
        LiveReport {
            mode: "live",
            guest: LiveGuest::Synthetic,
            size: 1 << 30,
            vcpus: 2,
            dirty_rate: 256 * MIB,
            dirty_pattern: "hotset:25".into(),
            downtime_limit_ms: 30.0,
            trackers: vec!["bitmap".into()],
            seed: 1,
            runs: 3,
            channels: vec![2],
            send_args: vec![],
            cpus: 2,
            host: "testhost".into(),
            kernel: "6.18".into(),
            ferry_version: "ferry 0.1.0".into(),
            load_average_start: Some([1.5, 2.0, 2.5]),
            load_average_end: None,
            started_at_unix: 1.7e9,
            finished_at_unix: 1.7e9 + 60.0,
            cases: vec![Case::live(Tool::Ferry, 2, "bitmap", samples, checks)],
            notes: vec!["dirty tracker uffd skipped: this kernel lacks it: test".into()],
        }
    }

    #[test]
    fn live_summary_has_medians_and_ranges() {
        let r = hand_report();
        let m: &Summary = r.cases[0].summary.as_ref().expect("summary");
        let l = m.live.as_ref().expect("live summary");
        assert_eq!(
            l.downtime_ms,
            crate::Spread {
                median: 3.0,
                min: 2.0,
                max: 9.0
            }
        );
        assert_eq!(
            (l.passes.median, l.passes.min, l.passes.max),
            (5.0, 4.0, 6.0)
        );
        assert!((l.total_s.median - 0.6).abs() < 1e-12);
        assert_eq!(l.wire_bytes.median, (1005 * MIB) as f64);
        assert_eq!((l.checks, l.checks_equal), (2, 2));
        assert_eq!(l.check_downtime_ms.map(|d| d.median), Some(65.0));
        // Bandwidth samples have no live summary.
        let plain = vec![Sample::new(1.0, 1, 1, None, Value::Null)];
        assert!(crate::LiveSummary::of(&plain, &[]).is_none());
    }

    #[test]
    fn table_and_json() {
        let r = hand_report();
        let t = r.table();
        println!("{t}");
        assert!(t.contains(
            "synthetic guest of 1.00 GiB, 2 vCPU(s) writing 256 MiB/s (hotset:25), downtime \
             limit 30 ms, 3 run(s) per case"
        ));
        assert!(t.contains("load average 1.50 2.00 2.50 at the start, unknown at the end"));
        let row = t
            .lines()
            .find(|l| l.starts_with("bitmap"))
            .expect("bitmap row");
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                "bitmap",
                "2",
                "0.600",
                "(0.500-0.700)",
                "3.0",
                "(2.0-9.0)",
                "5",
                "(4-6)",
                "1005",
                "(1004-1006)",
                "2/2",
                "65.0",
                "(60.0-70.0)"
            ]
        );
        assert!(t.contains("- dirty tracker uffd skipped"));
        let j = r.to_json();
        assert_eq!(j["mode"], "live");
        assert_eq!(j["guest"], "synthetic");
        assert_eq!(j["dirty_rate"], 256 * MIB);
        let case = &j["cases"][0];
        assert_eq!(case["tracker"], "bitmap");
        assert_eq!(case["summary"]["live"]["downtime_ms"]["median"], 3.0);
        assert_eq!(case["summary"]["live"]["checks_equal"], 2);
        assert_eq!(case["samples"][0]["live"]["passes"], 4);
        assert!(case["samples"][0]["live"]["destination_digest"].is_null());
        assert_eq!(
            case["checks"][0]["live"]["source_digest"],
            case["checks"][0]["live"]["destination_digest"]
        );
    }
}
