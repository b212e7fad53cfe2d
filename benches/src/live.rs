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
//! The guest is a [`LiveGuest`]: the synthetic guest (vCPU threads writing
//! memory), or the KVM micro-VM (`--guest kvm`: ferry-vmm's guest program,
//! which checks its own memory and watches its own clock). For the KVM
//! guest `ferry recv` gets `--run-after T`: its report's `workload` gives
//! the blackout as the guest saw it (`guest_switchover_gap_us`, the
//! window spanning the switchover, and `guest_blackout_us`, the largest
//! gap over all its lines there), the rate it
//! wrote at there, and its self-check, which must be clean (else the bench
//! fails naming it). With `--peer qemu` the same guest program with the
//! same parameters also runs under QEMU and migrates QEMU to QEMU
//! (`live_qemu.rs`), its turn rotating with ferry's; the report adds the
//! ratios ferry/QEMU of the median total time and blackout, and the
//! congestion control chosen becomes the system's (QEMU cannot choose).

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
    /// `--guest kvm`: ferry-vmm's micro-VM running the guest program (a PVH
    /// ELF that QEMU boots too), its vCPU and VM state as the device state.
    Kvm,
}

impl LiveGuest {
    pub fn name(self) -> &'static str {
        match self {
            Self::Synthetic => "synthetic",
            Self::Kvm => "kvm",
        }
    }

    /// The dirty trackers this guest can use, in the default's order.
    pub fn trackers(self) -> &'static [&'static str] {
        match self {
            Self::Synthetic => &["bitmap", "uffd"],
            Self::Kvm => &["kvm-log", "kvm-ring"],
        }
    }

    /// Whether this kernel has `tracker` for this guest: `Err` says why not.
    fn probe(self, tracker: &str) -> Result<(), String> {
        match (self, tracker) {
            (Self::Synthetic, "uffd") => probe_uffd(),
            (Self::Kvm, "kvm-ring") => ferry_vmm::dirty_ring_usable(),
            (Self::Kvm, _) => ferry_vmm::kvm_usable(),
            _ => Ok(()),
        }
    }

    /// `ferry send`'s arguments for this guest, before `--to`.
    fn send_args(self, live: &LiveOptions, size: u64, seed: u64, tracker: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--guest".into(),
            self.name().into(),
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
        ];
        if live.auto_converge {
            args.push("--auto-converge".into());
        }
        args
    }

    /// `ferry recv`'s arguments for this guest: the KVM guest runs on for
    /// `run_after` and reports its workload (blackout, self-check).
    fn recv_args(self, live: &LiveOptions) -> Vec<String> {
        match self {
            Self::Synthetic => Vec::new(),
            Self::Kvm => vec![
                "--run-after".into(),
                format!("{}ms", live.run_after.as_millis()),
                "--prebuild-kvm".into(),
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
    /// `ferry send --downtime-limit`; QEMU's `downtime-limit` too.
    pub downtime_limit: Duration,
    /// `ferry send --auto-converge`; QEMU's `auto-converge` capability too.
    pub auto_converge: bool,
    /// The KVM guest: how long it runs on the destination before it reports
    /// (`ferry recv --run-after`; QEMU's destination is watched as long, and
    /// until each vCPU printed two progress lines there).
    pub run_after: Duration,
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
            auto_converge: false,
            run_after: Duration::from_secs(2),
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
    if config.peer_iperf || config.peer_floor || config.peer_plain {
        not_yet.push("--peer iperf3, floor or plain (live, the peer is QEMU)");
    }
    if config.peer_qemu && live.guest != LiveGuest::Kvm {
        not_yet.push("--peer qemu with this guest (QEMU runs the KVM guest: --guest kvm)");
    }
    if config.dataset.is_some() {
        not_yet.push("--dataset (a live guest makes its own memory from --seed)");
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
    if live.guest == LiveGuest::Kvm && live.run_after.is_zero() {
        return Err(BenchError::Config(
            "--run-after 0: the KVM guest must run on the destination to report its blackout \
             and self-check"
                .into(),
        ));
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
    /// `ferry send --auto-converge` (and QEMU's capability, with its peer).
    pub auto_converge: bool,
    /// Whether QEMU ran the same guest as a peer (`--peer qemu`).
    pub peer_qemu: bool,
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
    /// One per (channel count, tracker), in the order asked; with QEMU, its
    /// case after ferry's at each channel count.
    pub cases: Vec<Case>,
    /// ferry/QEMU for total time and blackout (empty without QEMU).
    pub ratios: Vec<LiveRatio>,
    /// Trackers skipped and why, the conditions, and how to read the figures.
    pub notes: Vec<String>,
}

fn rate(bytes_per_s: u64) -> String {
    format!("{}/s", human_bytes(bytes_per_s))
}

fn fmt_spread(s: crate::Spread, decimals: usize) -> String {
    crate::Spread::text(Some(&s), decimals)
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
             ms{}, {} run(s) per case: median (min-max){extra}",
            self.guest.name(),
            human_bytes(self.size),
            self.vcpus,
            rate(self.dirty_rate),
            self.dirty_pattern,
            self.downtime_limit_ms,
            if self.auto_converge {
                ", auto-converge"
            } else {
                ""
            },
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
            "{:<5} {:<8} {:>3} {:>22} {:>22} {:>22} {:>22} {:>12} {:>22} {:>18} {:>8} {:>22}",
            "tool",
            "tracker",
            "ch",
            "total s",
            "downtime ms",
            "switchover gap ms",
            "largest gap ms",
            "passes",
            "wire MiB",
            "guest MiB/s",
            "checked",
            "checked downtime ms"
        );
        let mib = |s: crate::Spread| crate::Spread {
            median: s.median / MIB as f64,
            min: s.min / MIB as f64,
            max: s.max / MIB as f64,
        };
        let opt =
            |s: Option<crate::Spread>, d: usize| s.map_or_else(|| "-".into(), |s| fmt_spread(s, d));
        for case in &self.cases {
            let tool = case.tool.name();
            let tracker = case.tracker.as_deref().unwrap_or("-");
            let Some(m) = case.summary.as_ref().and_then(|m| m.live.as_ref()) else {
                let _ = writeln!(s, "{tool:<5} {tracker:<8} {:>3}  (no runs)", case.channels);
                continue;
            };
            let _ = writeln!(
                s,
                "{tool:<5} {tracker:<8} {:>3} {:>22} {:>22} {:>22} {:>22} {:>12} {:>22} {:>18} {:>8} {:>22}",
                case.channels,
                fmt_spread(m.total_s, 3),
                fmt_spread(m.downtime_ms, 1),
                opt(m.guest_switchover_gap_ms, 1),
                opt(m.guest_blackout_ms, 1),
                fmt_spread(m.passes, 0),
                fmt_spread(mib(m.wire_bytes), 0),
                opt(m.guest_write_rate.map(mib), 1),
                if m.checks == 0 {
                    "-".into()
                } else {
                    format!("{}/{}", m.checks_equal, m.checks)
                },
                opt(m.check_downtime_ms, 1),
            );
        }
        for r in &self.ratios {
            let f = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                s,
                "ferry ({}, {} ch) / QEMU: total time {}, guest-observed blackout: \
                 switchover gap {}, largest gap {}",
                r.tracker,
                r.channels,
                f(r.ferry_over_qemu_total),
                f(r.ferry_over_qemu_switchover_gap),
                f(r.ferry_over_qemu_blackout)
            );
        }
        let _ = writeln!(
            s,
            "(total: from the start of the migration on the source until the destination's \
             guest ran (QEMU: its total-time); downtime: the source's, from pausing the guest \
             until the destination said it runs, the destination's switchover digest off \
             (QEMU: its downtime); switchover gap: the largest gap the KVM guest saw in its \
             own TSC in the window that spans the switchover (each vCPU's first progress \
             line on the destination), the blackout the migration caused; largest gap: the \
             largest over all its lines on the destination (the switchover's window and the \
             run after it, so also any stall of the host meanwhile); wire: every byte on every channel (QEMU: ram.transferred); \
             guest MiB/s: the rate the KVM guest wrote at on the destination, from its \
             counters; checked: verification migrations, one per run, with the destination's \
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
fn live_once(run: &FerryRun<'_>, guest: LiveGuest) -> Result<Sample, BenchError> {
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
    let seen = match guest {
        LiveGuest::Synthetic => GuestSeen::default(),
        LiveGuest::Kvm => kvm_workload(&held, run.label)?,
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
        guest_blackout_ms: seen.blackout_ms,
        guest_switchover_gap_ms: seen.switchover_gap_ms,
        guest_write_rate: seen.write_rate,
    });
    Ok(sample)
}

/// What the KVM guest saw on the destination (none for the synthetic one).
#[derive(Default)]
struct GuestSeen {
    /// The largest gap in its own TSC over all its lines there, ms.
    blackout_ms: Option<f64>,
    /// The largest in the window spanning the switchover, ms.
    switchover_gap_ms: Option<f64>,
    /// The rate it wrote at there, bytes/s.
    write_rate: Option<f64>,
}

/// The KVM guest's workload on the destination (`ferry recv --run-after`):
/// its self-check must be clean and every vCPU must have gone on; gives
/// what it saw there.
fn kvm_workload(held: &Value, case: &str) -> Result<GuestSeen, BenchError> {
    let bad = |why: String| BenchError::GuestCheck {
        case: case.to_string(),
        why,
    };
    let w = &held["workload"];
    if w.is_null() {
        return Err(bad(
            "ferry recv's report has no workload (it was given --run-after)".into(),
        ));
    }
    if let Some(f) = w["guest_failure"].as_str() {
        return Err(bad(format!("the guest stopped on the destination: {f}")));
    }
    let errors = w["self_check_errors"]
        .as_u64()
        .ok_or_else(|| bad("ferry recv's workload has no self_check_errors".into()))?;
    if errors > 0 {
        return Err(bad(format!(
            "{errors} wrong word(s) on the destination, the first at {}",
            w["self_check_first_error"].as_str().unwrap_or("?")
        )));
    }
    if w["continued"].as_bool() != Some(true) {
        return Err(bad(
            "its vCPUs did not all write on after it resumed on the destination".into(),
        ));
    }
    let ms = |key: &str| w[key].as_f64().map(|us| us / 1e3);
    let write_rate = match (
        w["writes_at_switchover"].as_u64(),
        w["writes_after"].as_u64(),
        w["seconds"].as_f64(),
    ) {
        (Some(at), Some(after), Some(secs)) if secs > 0.0 => {
            Some(after.saturating_sub(at) as f64 * 4096.0 / secs)
        }
        _ => None,
    };
    Ok(GuestSeen {
        blackout_ms: ms("guest_blackout_us"),
        switchover_gap_ms: ms("guest_switchover_gap_us"),
        write_rate,
    })
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
    let (send_args, mut recv_args) = tls_and_compression_args(config);
    recv_args.extend(live.guest.recv_args(live));
    // The QEMU peer: the guest's boot parameters as ferry's VMM gives them.
    let qemu_params = if config.peer_qemu {
        let qc = ferry_vmm::QemuConfig::new(config.size);
        ferry_vmm::qemu_usable(&qc)
            .map_err(|why| BenchError::Config(format!("--peer qemu: {why}")))?;
        let khz = ferry_vmm::host_tsc_khz()
            .map_err(|e| BenchError::Config(format!("--peer qemu: the TSC's frequency: {e}")))?;
        Some(crate::live_qemu::boot_params(live, config.seed, khz)?)
    } else {
        None
    };
    // With QEMU, which cannot choose its own congestion control, the one
    // chosen becomes the system's; ferry alone sets it on its own sockets.
    let peer = config.peer_qemu;
    let conditions = Conditions::set(config, size, "ferry", peer, peer, &mut notes, log);
    if let Some(p) = &qemu_params {
        notes.push(format!(
            "QEMU peer: the same guest ELF under QEMU (qboot, -append \"{}\"), QEMU to QEMU over \
             loopback with multifd, the same channels and downtime limit, max-bandwidth 1 TiB/s \
             (QEMU's default caps at 128 MiB/s){}; its total is QEMU's total-time, its downtime \
             QEMU's downtime, its wire ram.transferred, its passes ram.dirty-sync-count, its \
             blackout the largest TSC gap in the guest's progress lines on the destination \
             (as ferry's: the first line of each vCPU spans the switchover)",
            p.cmdline(),
            if live.auto_converge {
                ", auto-converge on"
            } else {
                ""
            }
        ));
    }
    if live.guest == LiveGuest::Kvm {
        notes.push(format!(
            "KVM guest: ferry recv --run-after {} s; its switchover gap is the destination's \
             workload.guest_switchover_gap_us (the largest TSC gap in each vCPU's first \
             progress line there, whose window spans the switchover), its largest gap \
             workload.guest_blackout_us (over all its lines there, one a second); the guest's \
             write rate is \
             from its own counters on the destination; the self-check was clean in every run \
             (else the bench fails)",
            live.run_after.as_secs_f64()
        ));
    }
    notes.push(format!(
        "each run: for every tracker, one measured migration (the destination's switchover \
         digest off: downtime as a user gets it) and one verification migration of the same \
         guest with the destination's switchover digest on, whose digest of memory and device \
         state at switchover must equal the source's; the {} migrations of a run take turns in \
         an order that rotates by one each run",
        2 * trackers.len()
    ));
    notes.push(format!(
        "the sending process's CPU includes the guest's own vCPU threads (the {} guest's \
         vCPUs run in `ferry send`)",
        live.guest.name()
    ));
    let guest_args: Vec<Vec<String>> = trackers
        .iter()
        .map(|t| live.guest.send_args(live, size, config.seed, t))
        .collect();
    // (tracker index, verification?), or QEMU's turn (None).
    let mut turns: Vec<Option<(usize, bool)>> = (0..trackers.len())
        .flat_map(|t| [Some((t, false)), Some((t, true))])
        .collect();
    if qemu_params.is_some() {
        turns.push(None);
    }
    let mut cases = Vec::new();
    for &k in &channels {
        let mut measured: Vec<Vec<Sample>> = vec![Vec::new(); trackers.len()];
        let mut checks: Vec<Vec<Sample>> = vec![Vec::new(); trackers.len()];
        let mut qemu_runs: Vec<Sample> = Vec::new();
        for r in 1..=config.runs {
            for &turn in &turns {
                let Some((t, check)) = turn else {
                    let label = format!(
                        "QEMU live migration ({} guest, {k} channel(s))",
                        live.guest.name()
                    );
                    conditions.settle(log);
                    let before = SystemCounters::read();
                    let params = qemu_params.as_ref().ok_or_else(|| {
                        BenchError::Config("a QEMU turn without QEMU's parameters".into())
                    })?;
                    let mut s = crate::live_qemu::qemu_live_once(live, params, size, k, &label)?;
                    s.system = Some(SystemCounters::read().since(before));
                    log(&fmt_live("qemu", k, r, config.runs, &s));
                    qemu_runs.push(s);
                    continue;
                };
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
                let mut s = live_once(
                    &FerryRun {
                        exe: &config.ferry_exe,
                        guest: SendGuest::Live(&guest_args[t]),
                        size,
                        channels: k,
                        send_args: &send_args,
                        recv_args: &recv_args,
                        congestion: config.congestion.as_deref(),
                        switchover_digest: check,
                        label: &label,
                    },
                    live.guest,
                )?;
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
        if qemu_params.is_some() {
            cases.push(Case::live(Tool::Qemu, k, "kvm-log", qemu_runs, Vec::new()));
        }
    }
    drop(conditions);
    let ratios = live_ratios(&cases);

    Ok(LiveReport {
        mode: "live",
        guest: live.guest,
        size,
        vcpus: live.vcpus,
        dirty_rate: live.dirty_rate,
        dirty_pattern: live.dirty_pattern.clone(),
        downtime_limit_ms: live.downtime_limit.as_secs_f64() * 1e3,
        auto_converge: live.auto_converge,
        peer_qemu: qemu_params.is_some(),
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
        ratios,
        notes,
    })
}

/// ferry's median over QEMU's at one channel count, per ferry tracker.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LiveRatio {
    pub channels: u16,
    pub tracker: String,
    /// ferry's median total time / QEMU's: below 1, ferry is faster.
    pub ferry_over_qemu_total: Option<f64>,
    /// ferry's median guest-observed blackout / QEMU's (the largest gap
    /// over the destination's lines).
    pub ferry_over_qemu_blackout: Option<f64>,
    /// ferry's median largest gap in the window spanning the switchover
    /// / QEMU's: the blackout the migration itself caused.
    pub ferry_over_qemu_switchover_gap: Option<f64>,
}

/// The ratios for every ferry case with a QEMU case at its channel count.
fn live_ratios(cases: &[Case]) -> Vec<LiveRatio> {
    let live_of = |c: &Case| c.summary.as_ref().and_then(|m| m.live.clone());
    let ratio = |a: f64, b: f64| (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b);
    cases
        .iter()
        .filter(|c| c.tool == Tool::Ferry)
        .filter_map(|f| {
            let q = cases
                .iter()
                .find(|q| q.tool == Tool::Qemu && q.channels == f.channels)?;
            let (fl, ql) = (live_of(f)?, live_of(q)?);
            Some(LiveRatio {
                channels: f.channels,
                tracker: f.tracker.clone().unwrap_or_default(),
                ferry_over_qemu_total: ratio(fl.total_s.median, ql.total_s.median),
                ferry_over_qemu_blackout: fl
                    .guest_blackout_ms
                    .zip(ql.guest_blackout_ms)
                    .and_then(|(a, b)| ratio(a.median, b.median)),
                ferry_over_qemu_switchover_gap: fl
                    .guest_switchover_gap_ms
                    .zip(ql.guest_switchover_gap_ms)
                    .and_then(|(a, b)| ratio(a.median, b.median)),
            })
        })
        .collect()
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
            guest_blackout_ms: None,
            guest_switchover_gap_ms: None,
            guest_write_rate: None,
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
            auto_converge: false,
            peer_qemu: false,
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
            ratios: Vec::new(),
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
            .find(|l| l.starts_with("ferry bitmap"))
            .expect("bitmap row");
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                "ferry",
                "bitmap",
                "2",
                "0.600",
                "(0.500-0.700)",
                "3.0",
                "(2.0-9.0)",
                "-",
                "-",
                "5",
                "(4-6)",
                "1005",
                "(1004-1006)",
                "-",
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
