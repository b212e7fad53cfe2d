//! The benchmark report: per-run samples, medians per (tool, channels), the
//! ferry/peer ratios, and the three renderings a person or a machine reads:
//! a text table, JSON, and an SVG plot.
//!
//! Rates are GB/s in SI units (10^9 bytes per second). "RAM" rates divide the
//! dataset size by the wall time; "wire" rates divide the bytes put on the
//! wire by the same wall time.

use std::fmt::Write as _;
use std::path::Path;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use serde::Serialize;

use crate::sys::Cpu;
use crate::BenchError;

/// Which program a case measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    /// `ferry send` → `ferry recv` over loopback TCP.
    Ferry,
    /// The same without TLS or compression: what they cost.
    Plain,
    /// The same with `ferry send --no-checksum`: what the page checksums cost.
    NoChecksum,
    /// QEMU's own (multifd) migration of a paused KVM guest holding the dataset.
    Qemu,
    /// `iperf3 -P K` over loopback: what the link carries with K streams.
    Iperf3,
    /// The floor: K streams `splice` the dataset's non-zero pages into
    /// fresh anonymous memory (`floor.rs`); the least work any migration does.
    Floor,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Ferry => "ferry",
            Tool::Plain => "plain",
            Tool::NoChecksum => "no-checksum",
            Tool::Qemu => "qemu",
            Tool::Iperf3 => "iperf3",
            Tool::Floor => "floor",
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// ferry and QEMU: seconds from the start of the migration until the
    /// destination held every page. iperf3: the test's duration.
    pub wall_s: f64,
    /// Bytes of guest RAM moved (the dataset size); 0 for iperf3.
    pub ram_bytes: u64,
    /// Bytes put on the wire (ferry: sender's `wire_bytes`; QEMU:
    /// `ram.transferred`; iperf3: bytes received).
    pub wire_bytes: u64,
    /// `ram_bytes / wall_s` in GB/s; None for iperf3.
    pub gbps_ram: Option<f64>,
    /// `wire_bytes / wall_s` in GB/s.
    pub gbps_wire: f64,
    /// User + system CPU seconds of the tool's processes (both ends) over
    /// their whole lives, from getrusage(RUSAGE_CHILDREN).
    pub cpu_s: Option<f64>,
    /// Wall seconds from spawning the first of those processes to reaping the last.
    pub lifetime_s: Option<f64>,
    /// `100 × cpu_s / lifetime_s`: up to 100 × cores.
    pub cpu_percent: Option<f64>,
    /// The sending process's own user + system CPU seconds over its whole
    /// life (its `wait4` rusage); None where not measured (iperf3).
    pub cpu_send_s: Option<f64>,
    /// The same for the receiving process.
    pub cpu_recv_s: Option<f64>,
    /// `cpu_send_s` per GiB of guest RAM moved: core-seconds per GiB.
    pub send_core_s_per_gib: Option<f64>,
    /// `cpu_recv_s` per GiB of guest RAM moved.
    pub recv_core_s_per_gib: Option<f64>,
    /// The migration's own CPU per GiB of guest RAM, each side: ferry's
    /// process CPU when its summary says the migration ended (start-up
    /// included, its report's digest of memory after it not); QEMU's
    /// processes' CPU from `migrate` until completed (`/proc/PID/stat`);
    /// the floor's until its last byte was placed. None where not measured.
    pub send_migration_core_s_per_gib: Option<f64>,
    pub recv_migration_core_s_per_gib: Option<f64>,
    /// System-wide counters over the run (steal, compaction stalls, huge
    /// page fallbacks, faults): what made a slow run slow.
    pub system: Option<crate::sys::SystemCounters>,
    /// Tool-specific figures: ferry's two JSON reports, QEMU's query-migrate,
    /// iperf3's summary.
    pub detail: serde_json::Value,
    /// A live migration's own figures (`ferry bench --live`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveFigures>,
}

impl Sample {
    /// Fills in the derived rates and CPU share from the raw figures.
    pub fn new(
        wall_s: f64,
        ram_bytes: u64,
        wire_bytes: u64,
        cpu: Option<(f64, f64)>,
        detail: serde_json::Value,
    ) -> Self {
        let rate = |bytes: u64| {
            if wall_s > 0.0 {
                bytes as f64 / wall_s / 1e9
            } else {
                0.0
            }
        };
        let (cpu_s, lifetime_s) = match cpu {
            Some((c, l)) => (Some(c), Some(l)),
            None => (None, None),
        };
        let cpu_percent = cpu.and_then(|(c, l)| (l > 0.0).then(|| 100.0 * c / l));
        Self {
            wall_s,
            ram_bytes,
            wire_bytes,
            gbps_ram: (ram_bytes > 0).then(|| rate(ram_bytes)),
            gbps_wire: rate(wire_bytes),
            cpu_s,
            lifetime_s,
            cpu_percent,
            cpu_send_s: None,
            cpu_recv_s: None,
            send_core_s_per_gib: None,
            recv_core_s_per_gib: None,
            send_migration_core_s_per_gib: None,
            recv_migration_core_s_per_gib: None,
            system: None,
            detail,
            live: None,
        }
    }

    /// Adds each side's own CPU time (user + system, from its process's
    /// rusage) and the core-seconds per GiB of guest RAM they make.
    pub fn with_sides(mut self, send: Option<Cpu>, recv: Option<Cpu>) -> Self {
        let gib = self.ram_bytes as f64 / GIB;
        let per_gib = |c: Option<f64>| c.filter(|_| gib > 0.0).map(|c| c / gib);
        self.cpu_send_s = send.map(Cpu::total_s);
        self.cpu_recv_s = recv.map(Cpu::total_s);
        self.send_core_s_per_gib = per_gib(self.cpu_send_s);
        self.recv_core_s_per_gib = per_gib(self.cpu_recv_s);
        self
    }

    /// Adds each side's CPU seconds spent on the migration itself (see
    /// [`Sample::send_migration_core_s_per_gib`]).
    pub fn with_migration_cpu(mut self, send_s: Option<f64>, recv_s: Option<f64>) -> Self {
        let gib = self.ram_bytes as f64 / GIB;
        let per_gib = |c: Option<f64>| c.filter(|c| gib > 0.0 && *c >= 0.0).map(|c| c / gib);
        self.send_migration_core_s_per_gib = per_gib(send_s);
        self.recv_migration_core_s_per_gib = per_gib(recv_s);
        self
    }
}

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// Medians (and the spread of the wall time) over a case's samples.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub runs: usize,
    pub wall_s: f64,
    pub wall_min_s: f64,
    pub wall_max_s: f64,
    pub gbps_ram: Option<f64>,
    pub gbps_wire: f64,
    pub cpu_percent: Option<f64>,
    /// Medians of the sender's and the receiver's core-seconds per GiB.
    pub send_core_s_per_gib: Option<f64>,
    pub recv_core_s_per_gib: Option<f64>,
    /// Median of both sides' migration CPU together, core-seconds per GiB
    /// (see [`Sample::send_migration_core_s_per_gib`]).
    pub migration_core_s_per_gib: Option<f64>,
    /// Run-to-run spread of the wall time: max / min.
    pub wall_spread: f64,
    /// A live case's medians and spreads (`ferry bench --live`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveSummary>,
}

impl Summary {
    /// None when there are no samples.
    pub fn of(samples: &[Sample]) -> Option<Self> {
        let walls: Vec<f64> = samples.iter().map(|s| s.wall_s).collect();
        let wall_s = median(&walls)?;
        let finite = walls.iter().copied().filter(|w| w.is_finite());
        let wall_min_s = finite.clone().fold(f64::INFINITY, f64::min);
        let wall_max_s = finite.fold(f64::NEG_INFINITY, f64::max);
        let ram: Vec<f64> = samples.iter().filter_map(|s| s.gbps_ram).collect();
        let wire: Vec<f64> = samples.iter().map(|s| s.gbps_wire).collect();
        let cpu: Vec<f64> = samples.iter().filter_map(|s| s.cpu_percent).collect();
        let sends: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.send_core_s_per_gib)
            .collect();
        let recvs: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.recv_core_s_per_gib)
            .collect();
        let migration: Vec<f64> = samples
            .iter()
            .filter_map(|s| {
                Some(s.send_migration_core_s_per_gib? + s.recv_migration_core_s_per_gib?)
            })
            .collect();
        Some(Self {
            runs: samples.len(),
            wall_s,
            wall_min_s,
            wall_max_s,
            gbps_ram: median(&ram),
            gbps_wire: median(&wire).unwrap_or(0.0),
            cpu_percent: median(&cpu),
            send_core_s_per_gib: median(&sends),
            recv_core_s_per_gib: median(&recvs),
            migration_core_s_per_gib: median(&migration),
            wall_spread: wall_max_s / wall_min_s,
            live: None,
        })
    }
}

/// Every run of one tool at one channel count.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub tool: Tool,
    pub channels: u16,
    /// A live case's dirty tracker (`bitmap`, `uffd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracker: Option<String>,
    pub summary: Option<Summary>,
    pub samples: Vec<Sample>,
    /// A live case's verification migrations: the same migration with the
    /// destination's switchover digest on, one per run, each with both
    /// sides' digests at switchover (equal, or the bench failed). Their
    /// figures are not in `summary`, except as `summary.live.checks*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Sample>,
}

impl Case {
    pub fn new(tool: Tool, channels: u16, samples: Vec<Sample>) -> Self {
        Self {
            tool,
            channels,
            tracker: None,
            summary: Summary::of(&samples),
            samples,
            checks: Vec::new(),
        }
    }

    /// A live case: `samples` measured (the destination's switchover digest
    /// off), `checks` the verification migrations beside them.
    pub fn live(
        tool: Tool,
        channels: u16,
        tracker: &str,
        samples: Vec<Sample>,
        checks: Vec<Sample>,
    ) -> Self {
        let mut summary = Summary::of(&samples);
        if let Some(m) = summary.as_mut() {
            m.live = LiveSummary::of(&samples, &checks);
        }
        Self {
            tool,
            channels,
            tracker: Some(tracker.to_string()),
            summary,
            samples,
            checks,
        }
    }
}

/// The median and the range of one figure over a case's runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Over the finite values; None when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let median = median(values)?;
        let finite = values.iter().copied().filter(|v| v.is_finite());
        Some(Self {
            median,
            min: finite.clone().fold(f64::INFINITY, f64::min),
            max: finite.fold(f64::NEG_INFINITY, f64::max),
        })
    }

    /// `median (min-max)` with `decimals` places, or `-` for none: how
    /// the live and postcopy tables show a figure.
    pub fn text(s: Option<&Spread>, decimals: usize) -> String {
        s.map_or_else(
            || "-".into(),
            |s| {
                format!(
                    "{:.decimals$} ({:.decimals$}-{:.decimals$})",
                    s.median, s.min, s.max
                )
            },
        )
    }
}

/// One live migration's figures, from the source's JSON report (and the
/// destination's digest, when it took one).
#[derive(Clone, Debug, Serialize)]
pub struct LiveFigures {
    /// Seconds from the start of the migration on the source until the
    /// destination's guest ran: the source's `destination_resumed_at_unix`
    /// (the destination's clock, on this same machine) minus its
    /// `started_at_unix`. Building the guest before the migration starts is
    /// not in it.
    pub total_s: f64,
    /// The source's `downtime_ms`: from pausing the guest until the
    /// destination said its guest runs.
    pub downtime_ms: f64,
    /// The downtime the source expected when it decided to switch over.
    pub expected_downtime_ms: Option<f64>,
    /// Passes over memory, the final one (guest paused) included.
    pub passes: u64,
    /// Every byte on every channel: the source's `wire_bytes`.
    pub wire_bytes: u64,
    /// The highest auto-converge throttle applied.
    pub throttle_percent: u64,
    /// Whether the destination took its switchover digest (of all memory
    /// and the device state, before its guest ran: inside the downtime).
    pub switchover_digest: bool,
    /// The source's digest of memory and device state at switchover.
    pub source_digest: String,
    /// The destination's, taken before its guest ran; only with
    /// `switchover_digest` (equal to `source_digest`, or the bench failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_digest: Option<String>,
    /// A guest that watches its own clock (the KVM guest): the blackout it
    /// saw, ms: for ferry the destination's `workload.guest_blackout_us`
    /// (the largest TSC gap in its progress lines there, the first of
    /// which spans the switchover), for QEMU the same over its
    /// destination's progress lines (`live_qemu.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_blackout_ms: Option<f64>,
    /// The same guest: the largest gap in the window that spans the
    /// switchover only (each vCPU's first progress line on the
    /// destination; for ferry `workload.guest_switchover_gap_us`), ms:
    /// the blackout the migration caused, without the stalls the host
    /// adds in the seconds after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_switchover_gap_ms: Option<f64>,
    /// The KVM guest: the rate its vCPUs wrote at on the destination,
    /// bytes/s, from its own write counters (the rate asked may be more
    /// than a software KVM lets it reach).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_write_rate: Option<f64>,
}

/// A live case's figures over its runs.
#[derive(Clone, Debug, Serialize)]
pub struct LiveSummary {
    pub total_s: Spread,
    pub downtime_ms: Spread,
    pub passes: Spread,
    pub wire_bytes: Spread,
    /// Verification migrations (one per run), and how many of them had
    /// equal digests on both sides (a mismatch fails the bench: all).
    pub checks: usize,
    pub checks_equal: usize,
    /// The verification migrations' downtime, the destination's switchover
    /// digest included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_downtime_ms: Option<Spread>,
    /// The guest-observed blackout, ms (the KVM guest): the largest gap
    /// over its lines on the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_blackout_ms: Option<Spread>,
    /// The largest gap in the window spanning the switchover, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_switchover_gap_ms: Option<Spread>,
    /// The write rate the guest reached, bytes/s (the KVM guest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_write_rate: Option<Spread>,
}

impl LiveSummary {
    /// None unless every sample has live figures.
    pub fn of(samples: &[Sample], checks: &[Sample]) -> Option<Self> {
        let live: Vec<&LiveFigures> = samples.iter().filter_map(|s| s.live.as_ref()).collect();
        if live.is_empty() || live.len() != samples.len() {
            return None;
        }
        let spread = |f: &dyn Fn(&LiveFigures) -> f64| {
            Spread::of(&live.iter().map(|l| f(l)).collect::<Vec<_>>())
        };
        let checked: Vec<&LiveFigures> = checks.iter().filter_map(|s| s.live.as_ref()).collect();
        Some(Self {
            total_s: spread(&|l| l.total_s)?,
            downtime_ms: spread(&|l| l.downtime_ms)?,
            passes: spread(&|l| l.passes as f64)?,
            wire_bytes: spread(&|l| l.wire_bytes as f64)?,
            checks: checks.len(),
            checks_equal: checked
                .iter()
                .filter(|c| c.destination_digest.as_deref() == Some(c.source_digest.as_str()))
                .count(),
            check_downtime_ms: Spread::of(
                &checked.iter().map(|c| c.downtime_ms).collect::<Vec<_>>(),
            ),
            guest_blackout_ms: Spread::of(
                &live
                    .iter()
                    .filter_map(|l| l.guest_blackout_ms)
                    .collect::<Vec<_>>(),
            ),
            guest_switchover_gap_ms: Spread::of(
                &live
                    .iter()
                    .filter_map(|l| l.guest_switchover_gap_ms)
                    .collect::<Vec<_>>(),
            ),
            guest_write_rate: Spread::of(
                &live
                    .iter()
                    .filter_map(|l| l.guest_write_rate)
                    .collect::<Vec<_>>(),
            ),
        })
    }
}

/// ferry against its peers at one channel count, from the medians.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub channels: u16,
    /// ferry's median wall time / QEMU's: below 1 means ferry is faster.
    pub ferry_over_qemu_wall: Option<f64>,
    /// ferry's median wire rate / iperf3's: the share of the link ferry uses.
    pub ferry_wire_over_iperf3: Option<f64>,
    /// ferry's median wall time / its own without TLS or compression.
    pub ferry_over_plain_wall: Option<f64>,
    /// ferry's median wall time / the floor peer's: how far above the least
    /// work ferry is (at least 1 in principle).
    pub ferry_over_floor_wall: Option<f64>,
    /// ferry's median wall time / its own with `--no-checksum`: what the
    /// page checksums cost.
    pub ferry_over_no_checksum_wall: Option<f64>,
    /// ferry's median migration CPU (both sides, per GiB) / QEMU's.
    pub ferry_over_qemu_migration_cpu: Option<f64>,
    /// ferry's wall spread (max/min) / QEMU's: at most 1 means ferry's runs
    /// vary no more than QEMU's.
    pub ferry_over_qemu_spread: Option<f64>,
}

/// The ratios for every channel count that has a ferry case.
pub fn compute_ratios(cases: &[Case]) -> Vec<Ratio> {
    let summary = |tool: Tool, k: u16| {
        cases
            .iter()
            .find(|c| c.tool == tool && c.channels == k)
            .and_then(|c| c.summary.as_ref())
    };
    let mut out = Vec::new();
    for case in cases.iter().filter(|c| c.tool == Tool::Ferry) {
        let k = case.channels;
        let Some(ferry) = summary(Tool::Ferry, k) else {
            continue;
        };
        let qemu = summary(Tool::Qemu, k);
        let iperf = summary(Tool::Iperf3, k);
        let plain = summary(Tool::Plain, k);
        let floor = summary(Tool::Floor, k);
        let no_checksum = summary(Tool::NoChecksum, k);
        let over = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 && b.is_finite() && a.is_finite() => Some(a / b),
            _ => None,
        };
        out.push(Ratio {
            channels: k,
            ferry_over_qemu_wall: qemu
                .filter(|q| q.wall_s > 0.0)
                .map(|q| ferry.wall_s / q.wall_s),
            ferry_wire_over_iperf3: iperf
                .filter(|i| i.gbps_wire > 0.0)
                .map(|i| ferry.gbps_wire / i.gbps_wire),
            ferry_over_plain_wall: plain
                .filter(|p| p.wall_s > 0.0)
                .map(|p| ferry.wall_s / p.wall_s),
            ferry_over_floor_wall: floor
                .filter(|p| p.wall_s > 0.0)
                .map(|p| ferry.wall_s / p.wall_s),
            ferry_over_no_checksum_wall: over(Some(ferry.wall_s), no_checksum.map(|n| n.wall_s)),
            ferry_over_qemu_migration_cpu: over(
                ferry.migration_core_s_per_gib,
                qemu.and_then(|q| q.migration_core_s_per_gib),
            ),
            ferry_over_qemu_spread: over(Some(ferry.wall_spread), qemu.map(|q| q.wall_spread)),
        });
    }
    out
}

/// The median of the finite values (mean of the middle two for an even
/// count); None when there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// What `ferry bench` measured, with enough context to compare runs later.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Dataset size, bytes.
    pub size: u64,
    /// The dataset file (removed after the run when it was generated).
    pub dataset: String,
    pub dataset_generated: bool,
    pub seed: u64,
    pub runs: usize,
    pub channels: Vec<u16>,
    pub send_args: Vec<String>,
    /// CPUs this process may use.
    pub cpus: usize,
    /// `qemu-system-x86_64 --version`'s version, when the QEMU peer ran.
    pub qemu_version: Option<String>,
    /// This machine's name, and `ferry --version` of the binary measured.
    pub host: String,
    pub ferry_version: String,
    pub started_at_unix: f64,
    pub finished_at_unix: f64,
    /// One per (channel count, tool), channel counts in the order asked,
    /// ferry before qemu before iperf3.
    pub cases: Vec<Case>,
    pub ratios: Vec<Ratio>,
    /// Peers skipped and why, and anything else worth knowing.
    pub notes: Vec<String>,
}

pub(crate) fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "-".into(), |x| format!("{x:.decimals$}"))
}

pub(crate) fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = b as f64;
    if f >= GIB {
        format!("{:.2} GiB", f / GIB)
    } else {
        format!("{:.0} MiB", f / MIB)
    }
}

impl BenchReport {
    /// A human table: one row per (tool, channels) with the median wall time,
    /// its min/max, GB/s of guest RAM, GB/s on the wire, CPU% and each
    /// side's core-seconds per GiB; then the
    /// ratios per channel count; then the notes.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let extra = if self.send_args.is_empty() {
            String::new()
        } else {
            format!(", ferry send {}", self.send_args.join(" "))
        };
        let _ = writeln!(
            s,
            "ferry bench: {} dataset (seed {}), {} run(s) per case, medians{extra}",
            human_bytes(self.size),
            self.seed,
            self.runs
        );
        let _ = writeln!(
            s,
            "{:<11} {:>3} {:>8} {:>8} {:>8} {:>9} {:>10} {:>6} {:>10} {:>10} {:>9}",
            "tool",
            "ch",
            "wall s",
            "min s",
            "max s",
            "GB/s RAM",
            "GB/s wire",
            "CPU%",
            "send cs/G",
            "recv cs/G",
            "mig cs/G"
        );
        for case in &self.cases {
            let Some(m) = &case.summary else {
                let _ = writeln!(
                    s,
                    "{:<11} {:>3}  (no runs)",
                    case.tool.name(),
                    case.channels
                );
                continue;
            };
            // iperf3's wall time is just its fixed test length: not comparable.
            let timed = case.tool != Tool::Iperf3;
            let wall = |v: f64| fmt_opt(timed.then_some(v), 3);
            let _ = writeln!(
                s,
                "{:<11} {:>3} {:>8} {:>8} {:>8} {:>9} {:>10} {:>6} {:>10} {:>10} {:>9}",
                case.tool.name(),
                case.channels,
                wall(m.wall_s),
                wall(m.wall_min_s),
                wall(m.wall_max_s),
                fmt_opt(m.gbps_ram, 2),
                fmt_opt(Some(m.gbps_wire), 2),
                fmt_opt(m.cpu_percent, 0),
                fmt_opt(m.send_core_s_per_gib, 3),
                fmt_opt(m.recv_core_s_per_gib, 3),
                fmt_opt(m.migration_core_s_per_gib, 3),
            );
        }
        if self.cases.iter().any(|c| {
            c.summary
                .as_ref()
                .is_some_and(|m| m.send_core_s_per_gib.is_some())
        }) {
            let _ = writeln!(
                s,
                "(send/recv cs/G: core-seconds of CPU, user + system, per GiB of guest RAM, of \
                 the sending and the receiving process over their whole lives, from their wait4 \
                 rusage; iperf3: n/a, it moves no guest RAM. mig cs/G: both sides' CPU spent on \
                 the migration itself, per GiB: ferry up to the end its summary reports (its \
                 digest of memory for the report after it excluded), QEMU from `migrate` to \
                 completed, the floor up to its last byte)"
            );
        }
        let useful: Vec<&Ratio> = self
            .ratios
            .iter()
            .filter(|r| {
                r.ferry_over_qemu_wall.is_some()
                    || r.ferry_wire_over_iperf3.is_some()
                    || r.ferry_over_plain_wall.is_some()
                    || r.ferry_over_floor_wall.is_some()
                    || r.ferry_over_no_checksum_wall.is_some()
            })
            .collect();
        if !useful.is_empty() {
            let _ = writeln!(s, "\nratios (from medians)");
            let _ = writeln!(
                s,
                "{:>3} {:>16} {:>18} {:>17} {:>17} {:>16} {:>14} {:>13}",
                "ch",
                "ferry/qemu wall",
                "ferry wire/iperf3",
                "ferry/plain wall",
                "ferry/floor wall",
                "/no-checksum",
                "qemu mig CPU",
                "qemu spread"
            );
            for r in useful {
                let speed = match r.ferry_over_qemu_wall {
                    Some(x) if x > 0.0 && x.is_finite() => {
                        format!("{x:.2} ({:.2}x)", 1.0 / x)
                    }
                    _ => "-".into(),
                };
                let _ = writeln!(
                    s,
                    "{:>3} {:>16} {:>18} {:>17} {:>17} {:>16} {:>14} {:>13}",
                    r.channels,
                    speed,
                    fmt_opt(r.ferry_wire_over_iperf3, 2),
                    fmt_opt(r.ferry_over_plain_wall, 2),
                    fmt_opt(r.ferry_over_floor_wall, 2),
                    fmt_opt(r.ferry_over_no_checksum_wall, 2),
                    fmt_opt(r.ferry_over_qemu_migration_cpu, 2),
                    fmt_opt(r.ferry_over_qemu_spread, 2)
                );
            }
            let _ = writeln!(
                s,
                "(ferry/qemu wall < 1: ferry is faster; (Nx) is ferry's speed-up; /no-checksum: \
                 ferry's wall over its own with --no-checksum; qemu mig CPU: ferry's mig cs/G over \
                 QEMU's; qemu spread: ferry's max/min wall over QEMU's)"
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    /// The whole report as JSON (the same shape as its `Serialize`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(
            |e| serde_json::json!({ "error": format!("cannot serialise the report: {e}") }),
        )
    }

    /// The tools that ran, each with its colour and its cases' medians
    /// by channel count.
    fn plotted(&self) -> Vec<Plotted<'_>> {
        let qemu = match &self.qemu_version {
            Some(v) => format!("QEMU {v} multifd"),
            None => "QEMU multifd".into(),
        };
        let tools = [
            (Tool::Ferry, "ferry".to_string(), RGBColor(0x1f, 0x77, 0xb4)),
            (
                Tool::Plain,
                "ferry (plain)".to_string(),
                RGBColor(0x2c, 0xa0, 0x2c),
            ),
            (
                Tool::NoChecksum,
                "ferry --no-checksum".to_string(),
                RGBColor(0x94, 0x67, 0xbd),
            ),
            (Tool::Qemu, qemu, RGBColor(0xd6, 0x27, 0x28)),
            (
                Tool::Iperf3,
                "iperf3 -P K".to_string(),
                RGBColor(0x55, 0x55, 0x55),
            ),
            (
                Tool::Floor,
                "floor (splice)".to_string(),
                RGBColor(0xff, 0x7f, 0x0e),
            ),
        ];
        let mut out = Vec::new();
        for (tool, name, colour) in tools {
            let mut points: Vec<(u16, &Summary)> = self
                .cases
                .iter()
                .filter(|c| c.tool == tool)
                .filter_map(|c| Some((c.channels, c.summary.as_ref()?)))
                .collect();
            points.sort_by_key(|p| p.0);
            if !points.is_empty() {
                out.push(Plotted {
                    tool,
                    name,
                    colour,
                    points,
                });
            }
        }
        out
    }

    /// Writes an SVG of two charts side by side, over the channel count:
    /// rates (guest RAM solid, wire dashed; iperf3 the wire only) and the
    /// median wall time with its min-max range, each point marked with
    /// the CPU the run used. A footer names the host, the date and the
    /// versions measured.
    pub fn plot_svg(&self, path: &Path) -> Result<(), BenchError> {
        let err = |e: &dyn std::fmt::Display| BenchError::Plot {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let tools = self.plotted();
        let xs = tools
            .iter()
            .flat_map(|t| t.points.iter().map(|p| f64::from(p.0)));
        let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let (xmin, xmax) = if xmin > xmax {
            (1.0, 1.0)
        } else {
            (xmin, xmax)
        };
        let xrange = (xmin - 0.6)..(xmax + 0.6);
        let rate_max = tools
            .iter()
            .flat_map(|t| t.points.iter())
            .flat_map(|(_, m)| [m.gbps_wire, m.gbps_ram.unwrap_or(0.0)])
            .fold(0.0f64, f64::max);
        let wall_max = tools
            .iter()
            .filter(|t| t.tool != Tool::Iperf3)
            .flat_map(|t| t.points.iter().map(|(_, m)| m.wall_max_s))
            .filter(|w| w.is_finite())
            .fold(0.0f64, f64::max);
        let rate_max = if rate_max > 0.0 { rate_max * 1.3 } else { 1.0 };
        let wall_max = if wall_max > 0.0 { wall_max * 1.3 } else { 1.0 };

        let root = SVGBackend::new(path, (1280, 645)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let title = format!(
            "ferry bench: {} dataset, median of {} run(s) per point",
            human_bytes(self.size),
            self.runs
        );
        let root = root
            .titled(&title, ("sans-serif", 24))
            .map_err(|e| err(&e))?;
        let (body, footer) = root.split_vertically(560);
        let (left, right) = body.split_horizontally(640);
        // Only the measured channel counts are labelled.
        let x_label = move |x: &f64| {
            let r = x.round();
            if (x - r).abs() < 1e-6 && (xmin..=xmax).contains(&r) {
                format!("{r}")
            } else {
                String::new()
            }
        };
        let ticks = usize::try_from((xmax - xmin) as i64 * 5 + 7)
            .unwrap_or(7)
            .min(60);

        let mut rates = ChartBuilder::on(&left)
            .caption("throughput", ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(xrange.clone(), 0f64..rate_max)
            .map_err(|e| err(&e))?;
        rates
            .configure_mesh()
            .x_desc("channels (K)")
            .y_desc("GB/s (10^9 bytes/s)")
            .x_labels(ticks)
            .y_labels(8)
            .x_label_formatter(&x_label)
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for t in &tools {
            let colour = t.colour;
            let wire: Vec<(f64, f64)> = t
                .points
                .iter()
                .map(|(k, m)| (f64::from(*k), m.gbps_wire))
                .collect();
            let ram: Vec<(f64, f64)> = t
                .points
                .iter()
                .filter_map(|(k, m)| Some((f64::from(*k), m.gbps_ram?)))
                .collect();
            if !ram.is_empty() {
                rates
                    .draw_series(LineSeries::new(ram.clone(), colour.stroke_width(3)))
                    .map_err(|e| err(&e))?
                    .label(format!("{}: guest RAM", t.name))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
                    });
                rates
                    .draw_series(ram.iter().map(|&(x, y)| {
                        EmptyElement::at((x, y))
                            + Circle::new((0, 0), 4, colour.filled())
                            + Text::new(
                                format!("{y:.2}"),
                                (6, -18),
                                ("sans-serif", 13).into_font().color(&colour),
                            )
                    }))
                    .map_err(|e| err(&e))?;
            }
            rates
                .draw_series(DashedLineSeries::new(
                    wire.clone(),
                    8,
                    5,
                    colour.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(format!("{}: wire", t.name))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 24, y)], 5, 3, colour.stroke_width(2))
                });
            rates
                .draw_series(
                    wire.iter()
                        .map(|&p| Circle::new(p, 3, colour.stroke_width(1))),
                )
                .map_err(|e| err(&e))?;
        }
        rates
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;

        let mut walls = ChartBuilder::on(&right)
            .caption(
                "wall time: median, min-max; CPU of both sides",
                ("sans-serif", 18),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(xrange, 0f64..wall_max)
            .map_err(|e| err(&e))?;
        walls
            .configure_mesh()
            .x_desc("channels (K)")
            .y_desc("seconds")
            .x_labels(ticks)
            .y_labels(8)
            .x_label_formatter(&x_label)
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        let migrations: Vec<&Plotted> = tools.iter().filter(|t| t.tool != Tool::Iperf3).collect();
        let n = migrations.len().max(1) as f64;
        for (i, t) in migrations.iter().enumerate() {
            // Side by side around each channel count.
            let dx = (i as f64 - (n - 1.0) / 2.0) * 0.15;
            let colour = t.colour;
            walls
                .draw_series(t.points.iter().map(|(k, m)| {
                    ErrorBar::new_vertical(
                        f64::from(*k) + dx,
                        m.wall_min_s,
                        m.wall_s,
                        m.wall_max_s,
                        colour.stroke_width(2),
                        10,
                    )
                }))
                .map_err(|e| err(&e))?
                .label(t.name.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 4), (x + 16, y + 4)], colour.filled())
                });
            walls
                .draw_series(t.points.iter().map(|(k, m)| {
                    let cpu = m
                        .cpu_percent
                        .map_or(String::new(), |c| format!(", CPU {c:.0}%"));
                    EmptyElement::at((f64::from(*k) + dx, m.wall_s))
                        + Circle::new((0, 0), 4, colour.filled())
                        + Text::new(
                            format!("{:.3} s{cpu}", m.wall_s),
                            (8, -6),
                            ("sans-serif", 12).into_font().color(&colour),
                        )
                }))
                .map_err(|e| err(&e))?;
        }
        walls
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;

        let footer_text = format!(
            "host {} ({} CPUs) | {} UTC | {}{} | notes in the report",
            self.host,
            self.cpus,
            utc(self.started_at_unix),
            self.ferry_version,
            self.qemu_version
                .as_deref()
                .map_or(String::new(), |v| format!(" | QEMU {v}"))
        );
        footer
            .draw(&Text::new(
                footer_text,
                (20, 20),
                ("sans-serif", 14).into_font().color(&BLACK),
            ))
            .map_err(|e| err(&e))?;
        let cost = self.cpu_cost_line();
        if !cost.is_empty() {
            footer
                .draw(&Text::new(
                    cost,
                    (20, 40),
                    ("sans-serif", 13).into_font().color(&BLACK),
                ))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

impl BenchReport {
    /// `CPU core-s per GiB, send/recv: ferry K=2 0.41/0.35; ...` from the
    /// medians, for the plot's footer; empty when no case has them.
    pub fn cpu_cost_line(&self) -> String {
        let parts: Vec<String> = self
            .cases
            .iter()
            .filter_map(|c| {
                let m = c.summary.as_ref()?;
                let (snd, rcv) = (m.send_core_s_per_gib?, m.recv_core_s_per_gib?);
                Some(format!(
                    "{} K={} {snd:.2}/{rcv:.2}",
                    c.tool.name(),
                    c.channels
                ))
            })
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(
                "CPU core-s per GiB of guest RAM, sender/receiver (wait4 rusage): {}",
                parts.join("; ")
            )
        }
    }
}

/// One tool on the plot: its cases' medians by channel count.
struct Plotted<'a> {
    tool: Tool,
    name: String,
    colour: RGBColor,
    points: Vec<(u16, &'a Summary)>,
}

/// `2026-12-01 03:04` from Unix seconds.
pub(crate) fn utc(unix: f64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64).map_or_else(
        |_| "unknown date".into(),
        |t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(wall: f64, cpu: f64) -> Sample {
        // 1 GiB: the sender spends 0.6 × wall core-seconds, the receiver 0.4.
        let side = |user_s: f64, sys_s: f64| Some(Cpu { user_s, sys_s });
        Sample::new(
            wall,
            1 << 30,
            800 << 20,
            Some((cpu * wall / 100.0, wall)),
            serde_json::Value::Null,
        )
        .with_sides(side(0.5 * wall, 0.1 * wall), side(0.2 * wall, 0.2 * wall))
    }

    fn iperf(gbps: f64) -> Sample {
        Sample::new(3.0, 0, (gbps * 3e9) as u64, None, serde_json::Value::Null)
    }

    pub(crate) fn hand_report() -> BenchReport {
        let cases = vec![
            Case::new(
                Tool::Ferry,
                1,
                vec![sample(1.0, 90.0), sample(1.2, 100.0), sample(0.8, 80.0)],
            ),
            Case::new(
                Tool::Qemu,
                1,
                vec![sample(2.0, 60.0), sample(2.2, 70.0), sample(1.8, 50.0)],
            ),
            Case::new(Tool::Iperf3, 1, vec![iperf(4.0), iperf(5.0), iperf(6.0)]),
            Case::new(
                Tool::Ferry,
                2,
                vec![sample(0.5, 150.0), sample(0.6, 160.0), sample(0.4, 170.0)],
            ),
            Case::new(
                Tool::Qemu,
                2,
                vec![sample(1.0, 120.0), sample(1.0, 130.0), sample(1.0, 110.0)],
            ),
            Case::new(Tool::Iperf3, 2, vec![iperf(6.0), iperf(6.0), iperf(6.0)]),
            Case::new(
                Tool::Floor,
                2,
                vec![sample(0.25, 100.0), sample(0.2, 100.0), sample(0.3, 100.0)],
            ),
        ];
        BenchReport {
            size: 1 << 30,
            dataset: "/dev/shm/x.ram".into(),
            dataset_generated: true,
            seed: 7,
            runs: 3,
            channels: vec![1, 2],
            send_args: vec!["--no-checksum".into()],
            cpus: 2,
            qemu_version: Some("10.0.2".into()),
            host: "testhost".into(),
            ferry_version: "ferry 0.1.0 (commit abc)".into(),
            started_at_unix: 1.7e9,
            finished_at_unix: 1.7e9 + 30.0,
            ratios: compute_ratios(&cases),
            cases,
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn median_of_odd_even_empty_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(median(&[f64::NAN, 1.0, 9.0, 5.0]), Some(5.0));
    }

    #[test]
    fn summary_and_ratios() {
        let r = hand_report();
        let f1 = r.cases[0].summary.as_ref().expect("ferry summary");
        assert_eq!(f1.runs, 3);
        assert!((f1.wall_s - 1.0).abs() < 1e-9);
        assert!((f1.wall_min_s - 0.8).abs() < 1e-9);
        assert!((f1.wall_max_s - 1.2).abs() < 1e-9);
        assert!((f1.cpu_percent.unwrap_or(0.0) - 90.0).abs() < 1e-6);
        let gib = (1u64 << 30) as f64 / 1e9;
        assert!((f1.gbps_ram.unwrap_or(0.0) - gib).abs() < 1e-9);
        assert_eq!(r.ratios.len(), 2);
        assert!((r.ratios[0].ferry_over_qemu_wall.unwrap_or(0.0) - 0.5).abs() < 1e-9);
        let wire = (800u64 << 20) as f64 / 1e9;
        assert!((r.ratios[0].ferry_wire_over_iperf3.unwrap_or(0.0) - wire / 5.0).abs() < 1e-6);
        assert!((r.ratios[1].ferry_over_qemu_wall.unwrap_or(0.0) - 0.5).abs() < 1e-9);
        // iperf3 has no RAM rate.
        assert!(r.cases[2]
            .summary
            .as_ref()
            .is_some_and(|s| s.gbps_ram.is_none()));
    }

    #[test]
    fn plain_ratio_compares_ferry_with_itself_without_tls() {
        let cases = vec![
            Case::new(Tool::Ferry, 2, vec![sample(0.9, 180.0), sample(1.1, 180.0)]),
            Case::new(Tool::Plain, 2, vec![sample(0.5, 170.0), sample(0.5, 170.0)]),
        ];
        let r = compute_ratios(&cases);
        assert_eq!(
            r.len(),
            1,
            "one ratio row per ferry case, not per plain case"
        );
        assert!((r[0].ferry_over_plain_wall.unwrap_or(0.0) - 2.0).abs() < 1e-9);
        assert!(r[0].ferry_over_qemu_wall.is_none());
    }

    #[test]
    fn checksum_cpu_and_spread_ratios_come_from_their_own_cases() {
        let mig = |wall: f64, send: f64, recv: f64| {
            sample(wall, 100.0).with_migration_cpu(Some(send), Some(recv))
        };
        let cases = vec![
            // ferry: walls 1.0..1.5 (spread 1.5), migration CPU 0.3 + 0.2.
            Case::new(
                Tool::Ferry,
                2,
                vec![mig(1.0, 0.3, 0.2), mig(1.5, 0.3, 0.2), mig(1.2, 0.3, 0.2)],
            ),
            Case::new(
                Tool::NoChecksum,
                2,
                vec![sample(1.0, 100.0), sample(1.0, 100.0)],
            ),
            // QEMU: walls 2.0..2.4 (spread 1.2), migration CPU 0.5 + 0.5.
            Case::new(
                Tool::Qemu,
                2,
                vec![mig(2.0, 0.5, 0.5), mig(2.4, 0.5, 0.5), mig(2.2, 0.5, 0.5)],
            ),
        ];
        let r = compute_ratios(&cases);
        assert_eq!(r.len(), 1);
        assert!((r[0].ferry_over_no_checksum_wall.unwrap_or(0.0) - 1.2).abs() < 1e-9);
        assert!((r[0].ferry_over_qemu_migration_cpu.unwrap_or(0.0) - 0.5).abs() < 1e-9);
        assert!((r[0].ferry_over_qemu_spread.unwrap_or(0.0) - 1.25).abs() < 1e-9);
        // Without the figures, no ratio (not a zero).
        let bare = vec![
            Case::new(Tool::Ferry, 2, vec![sample(1.0, 100.0)]),
            Case::new(Tool::Qemu, 2, vec![sample(2.0, 100.0)]),
        ];
        let r = compute_ratios(&bare);
        assert!(r[0].ferry_over_qemu_migration_cpu.is_none());
        assert!(r[0].ferry_over_no_checksum_wall.is_none());
    }

    #[test]
    fn ratios_absent_without_peers() {
        let cases = vec![Case::new(Tool::Ferry, 4, vec![sample(1.0, 50.0)])];
        let r = compute_ratios(&cases);
        assert_eq!(r.len(), 1);
        assert!(r[0].ferry_over_qemu_wall.is_none() && r[0].ferry_wire_over_iperf3.is_none());
        assert!(r[0].ferry_over_plain_wall.is_none());
    }

    #[test]
    fn table_renders_rows_ratios_and_notes() {
        let t = hand_report().table();
        println!("{t}");
        assert!(t.contains("1.00 GiB dataset (seed 7), 3 run(s)"));
        assert!(t.contains("--no-checksum"));
        let ferry1 = t
            .lines()
            .find(|l| l.starts_with("ferry") && l.split_whitespace().nth(1) == Some("1"))
            .expect("ferry row");
        assert_eq!(
            ferry1.split_whitespace().collect::<Vec<_>>(),
            [
                "ferry", "1", "1.000", "0.800", "1.200", "1.07", "0.84", "90", "0.600", "0.400",
                "-"
            ]
        );
        let iperf2 = t
            .lines()
            .find(|l| l.starts_with("iperf3") && l.split_whitespace().nth(1) == Some("2"))
            .expect("iperf3 row");
        assert_eq!(
            iperf2.split_whitespace().collect::<Vec<_>>(),
            ["iperf3", "2", "-", "-", "-", "-", "6.00", "-", "-", "-", "-"]
        );
        let floor = t
            .lines()
            .find(|l| l.starts_with("floor"))
            .expect("floor row");
        assert_eq!(
            floor.split_whitespace().collect::<Vec<_>>(),
            [
                "floor", "2", "0.250", "0.200", "0.300", "4.29", "3.36", "100", "0.150", "0.100",
                "-"
            ]
        );
        assert!(t.contains("ferry/floor wall"));
        let k2 = t
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with("2 ") && l.contains("(2.00x)"))
            .expect("K=2 ratio row");
        // ferry/floor 2.00, no checksum or migration CPU case, spreads
        // 0.6/0.4 over 1.0/1.0.
        assert!(
            k2.trim_end()
                .ends_with("2.00                -              -          1.50"),
            "ferry/floor and the spread ratio at K=2: {k2}"
        );
        assert!(t.contains("ratios"));
        assert!(t.contains("0.50 (2.00x)"));
        assert!(t.contains("- a note"));
    }

    #[test]
    fn json_has_cases_ratios_and_notes() {
        let j = hand_report().to_json();
        assert_eq!(j["size"], 1u64 << 30);
        assert_eq!(j["cases"].as_array().map(Vec::len), Some(7));
        assert_eq!(j["cases"][6]["tool"], "floor");
        let f = &j["cases"][6]["summary"];
        assert!((f["send_core_s_per_gib"].as_f64().unwrap_or(0.0) - 0.15).abs() < 1e-9);
        assert!((f["recv_core_s_per_gib"].as_f64().unwrap_or(0.0) - 0.1).abs() < 1e-9);
        let one = &j["cases"][0]["samples"][0];
        assert!((one["cpu_send_s"].as_f64().unwrap_or(0.0) - 0.6).abs() < 1e-9);
        assert!(j["cases"][2]["summary"]["send_core_s_per_gib"].is_null());
        assert!(
            (j["ratios"][1]["ferry_over_floor_wall"]
                .as_f64()
                .unwrap_or(0.0)
                - 2.0)
                .abs()
                < 1e-9
        );
        assert_eq!(j["cases"][0]["tool"], "ferry");
        assert_eq!(j["cases"][2]["tool"], "iperf3");
        assert_eq!(j["cases"][0]["summary"]["runs"], 3);
        assert_eq!(j["cases"][0]["samples"].as_array().map(Vec::len), Some(3));
        assert_eq!(j["ratios"][1]["channels"], 2);
        assert!(j["ratios"][0]["ferry_over_qemu_wall"].as_f64().is_some());
        assert_eq!(j["notes"][0], "a note");
        assert_eq!(j["qemu_version"], "10.0.2");
    }

    #[test]
    fn svg_plot_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bench.svg");
        hand_report().plot_svg(&path).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("read svg");
        assert!(svg.contains("<svg"));
        for part in [
            "ferry: guest RAM",
            "ferry: wire",
            "QEMU 10.0.2 multifd: guest RAM",
            "iperf3 -P K: wire",
            "floor (splice): guest RAM",
            "CPU core-s per GiB of guest RAM, sender/receiver (wait4 rusage): ferry K=1 0.60/0.40",
            "floor K=2 0.15/0.10",
            "channels (K)",
            "GB/s (10^9 bytes/s)",
            "seconds",
            // Wall time of ferry at K=2 (median 0.5 s of 0.4-0.6) with its CPU.
            "0.500 s, CPU 160%",
            "host testhost (2 CPUs)",
            "ferry 0.1.0 (commit abc)",
            "2023-11-14 22:13",
        ] {
            assert!(svg.contains(part), "{part} missing from the plot");
        }
        // Tick labels on both axes: the channel counts and the rates.
        assert!(
            svg.contains("\n1\n</text>") && svg.contains("\n2\n</text>"),
            "channel ticks"
        );
    }

    #[test]
    fn svg_plot_of_empty_report_and_bad_path() {
        let mut r = hand_report();
        r.cases.clear();
        r.ratios.clear();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.svg");
        r.plot_svg(&path).expect("empty plot");
        assert!(std::fs::read_to_string(&path).is_ok_and(|s| s.contains("<svg")));
        let bad = dir.path().join("no/such/dir/x.svg");
        assert!(matches!(r.plot_svg(&bad), Err(BenchError::Plot { .. })));
    }
}
