//! `ferry bench --postcopy`: issue #13's postcopy case measured as a user
//! runs it, with the replay check and the idle precopy it is judged by.
//!
//! Each run has these turns, in an order that rotates by one each run,
//! memory warmed before each (`Conditions` in lib.rs):
//! - `preempt`: `ferry send --guest synthetic --size S --vcpus N
//!   --dirty-rate R --dirty-pattern P --postcopy --postcopy-after A` into
//!   `ferry recv`, two processes over loopback (`run.rs: ferry_pair`);
//! - `no-preempt`: the same with `--no-postcopy-preempt` (page requests
//!   answered behind the background push), skipped with a note when the
//!   binary's `send --help` lacks that flag;
//! - `idle precopy`: the same guest with nobody writing (`--dirty-rate 0`),
//!   plain precopy: the reference for "total ≤ 1.3× idle precopy";
//! - `replay check` (unless `--no-replay-check`): the `preempt` migration
//!   once more, both sides in this process through the library
//!   (`ferry::migrate_out` / `migrate_in`), so that the source's memory
//!   (paused for good at the switch) and the destination's are both at
//!   hand: the destination's guest runs on for a moment, is paused, and
//!   `ferry::replay_check` compares its memory with the source's at the
//!   switch plus the destination's own writes replayed.
//!
//! Figures of a postcopy turn: total time (the source's start until the
//! destination held every page: `ferry recv`'s `finished_at_unix`, set as
//! soon as postcopy completed), downtime (the source's `downtime_ms`:
//! paused until the destination said its guest runs), the destination's
//! fault latency (p50, p99, max: request sent → page placed), requests,
//! postcopy bytes and discarded pages. The idle precopy's total ends when
//! the destination's guest runs (`destination_resumed_at_unix`), as in
//! `ferry bench --live`. The report gives medians and ranges.
//!
//! With `--peer qemu`: QEMU 10 migrating ferry's KVM micro-VM (the same
//! guest program, size, vCPUs, rate and pattern) QEMU to QEMU with the
//! `postcopy-ram` and `postcopy-preempt` capabilities (no multifd: QEMU
//! 10.0 refuses it with postcopy), `migrate-start-postcopy` once its first
//! pass has ended; its total time and downtime
//! are QEMU's own (`total-time`, `downtime`). It is the same case, not
//! the same guest: ferry's runs migrate the synthetic guest.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::report::{human_bytes, utc};
use crate::run::{ferry_pair, FerryRun, Pair, SendGuest};
use crate::sys;
use crate::{channel_list, ferry_version, host_name, tls_and_compression_args};
use crate::{BenchConfig, BenchError, Conditions, Spread, MIB};

/// The `ferry send` flag that turns the preempt channel off.
const NO_PREEMPT_FLAG: &str = "--no-postcopy-preempt";

/// How long the destination's guest runs on after postcopy completed
/// before the replay check pauses it.
const REPLAY_RUN_ON: Duration = Duration::from_millis(300);

/// What `ferry bench --postcopy` adds to a [`BenchConfig`].
#[derive(Clone, Debug)]
pub struct PostcopyOptions {
    /// The guest's vCPUs (writer threads).
    pub vcpus: u16,
    /// Bytes per second all vCPUs dirty together.
    pub dirty_rate: u64,
    /// `random`, `sequential` or `hotset:PCT`.
    pub dirty_pattern: String,
    /// `ferry send --postcopy-after`: precopy passes before the switch.
    pub postcopy_after: u64,
    /// The in-process replay-check migration in each run.
    pub replay_check: bool,
}

impl Default for PostcopyOptions {
    /// Issue #13's case: 2 vCPUs writing 1 GiB/s at random, the switch
    /// after the first pass, the replay check in every run.
    fn default() -> Self {
        Self {
            vcpus: 2,
            dirty_rate: 1 << 30,
            dirty_pattern: "random".into(),
            postcopy_after: 1,
            replay_check: true,
        }
    }
}

/// A kind of turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Postcopy, page requests answered on the preempt channel.
    Preempt,
    /// Postcopy with `--no-postcopy-preempt`.
    NoPreempt,
    /// Precopy of the same guest with nobody writing.
    IdlePrecopy,
    /// QEMU to QEMU postcopy of the KVM micro-VM.
    Qemu,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Preempt => "preempt",
            Self::NoPreempt => "no-preempt",
            Self::IdlePrecopy => "idle precopy",
            Self::Qemu => "qemu postcopy",
        }
    }
}

/// One migration's figures.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PostcopySample {
    pub total_s: f64,
    pub downtime_ms: f64,
    pub passes: u64,
    /// Postcopy only (None for the idle precopy, and for QEMU's latency).
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    pub fault_max_us: Option<f64>,
    pub requests: Option<f64>,
    pub postcopy_bytes: Option<f64>,
    pub discarded_pages: Option<f64>,
    pub guest_blocked_ms: Option<f64>,
    /// Both reports, for a closer look.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

/// Medians and ranges of one variant's samples.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VariantSummary {
    pub variant: Variant,
    pub runs: usize,
    pub total_s: Option<Spread>,
    pub downtime_ms: Option<Spread>,
    pub passes: Option<Spread>,
    pub fault_p50_us: Option<Spread>,
    pub fault_p99_us: Option<Spread>,
    pub fault_max_us: Option<Spread>,
    pub requests: Option<Spread>,
    pub postcopy_bytes: Option<Spread>,
    pub discarded_pages: Option<Spread>,
    pub guest_blocked_ms: Option<Spread>,
    pub samples: Vec<PostcopySample>,
}

impl VariantSummary {
    pub fn of(variant: Variant, samples: Vec<PostcopySample>) -> Self {
        let of = |f: &dyn Fn(&PostcopySample) -> Option<f64>| {
            let v: Vec<f64> = samples.iter().filter_map(f).collect();
            Spread::of(&v)
        };
        Self {
            variant,
            runs: samples.len(),
            total_s: of(&|s| Some(s.total_s)),
            downtime_ms: of(&|s| Some(s.downtime_ms)),
            passes: of(&|s| Some(s.passes as f64)),
            fault_p50_us: of(&|s| s.fault_p50_us),
            fault_p99_us: of(&|s| s.fault_p99_us),
            fault_max_us: of(&|s| s.fault_max_us),
            requests: of(&|s| s.requests),
            postcopy_bytes: of(&|s| s.postcopy_bytes),
            discarded_pages: of(&|s| s.discarded_pages),
            guest_blocked_ms: of(&|s| s.guest_blocked_ms),
            samples,
        }
    }
}

/// One in-process replay check.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReplayOutcome {
    pub equal: bool,
    /// The destination's writes replayed, and the pages that differed.
    pub writes: u64,
    pub differing_pages: u64,
    pub downtime_ms: Option<f64>,
    pub requests: u64,
}

/// What `ferry bench --postcopy` measured.
#[derive(Clone, Debug, Serialize)]
pub struct PostcopyReport {
    /// Always "postcopy".
    pub mode: &'static str,
    pub size: u64,
    pub vcpus: u16,
    pub dirty_rate: u64,
    pub dirty_pattern: String,
    pub postcopy_after: u64,
    pub channels: u16,
    pub runs: usize,
    pub seed: u64,
    pub send_args: Vec<String>,
    pub cpus: usize,
    pub host: String,
    pub kernel: String,
    pub ferry_version: String,
    pub load_average_start: Option<[f64; 3]>,
    pub load_average_end: Option<[f64; 3]>,
    pub started_at_unix: f64,
    pub finished_at_unix: f64,
    pub variants: Vec<VariantSummary>,
    pub replay_checks: Vec<ReplayOutcome>,
    /// Median postcopy total (preempt) / median idle precopy total.
    pub total_over_idle_precopy: Option<f64>,
    /// ferry's medians (preempt) over QEMU's.
    pub ferry_over_qemu_total: Option<f64>,
    pub ferry_over_qemu_downtime: Option<f64>,
    pub notes: Vec<String>,
}

fn ratio(a: Option<&Spread>, b: Option<&Spread>) -> Option<f64> {
    let (a, b) = (a?.median, b?.median);
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

fn spread(s: Option<&Spread>, decimals: usize) -> String {
    Spread::text(s, decimals)
}

impl PostcopyReport {
    fn variant(&self, v: Variant) -> Option<&VariantSummary> {
        self.variants.iter().find(|s| s.variant == v && s.runs > 0)
    }

    /// A human table: one row per variant (median (min-max)), the replay
    /// checks, the ratios, then the notes.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ferry bench --postcopy: synthetic guest of {}, {} vCPU(s) writing {}/s ({}), \
             --postcopy-after {}, {} channel(s), {} run(s): median (min-max)",
            human_bytes(self.size),
            self.vcpus,
            human_bytes(self.dirty_rate),
            self.dirty_pattern,
            self.postcopy_after,
            self.channels,
            self.runs
        );
        let load = |l: Option<[f64; 3]>| {
            l.map_or_else(
                || "unknown".into(),
                |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
            )
        };
        let _ = writeln!(
            s,
            "{} UTC on {} ({} CPUs, Linux {}), load average {} at the start, {} at the end",
            utc(self.started_at_unix),
            self.host,
            self.cpus,
            self.kernel,
            load(self.load_average_start),
            load(self.load_average_end)
        );
        let _ = writeln!(
            s,
            "{:<14} {:>4} {:>22} {:>22} {:>20} {:>22} {:>24} {:>20} {:>22}",
            "variant",
            "runs",
            "total s",
            "downtime ms",
            "fault p50 us",
            "fault p99 us",
            "fault max us",
            "requests",
            "blocked ms"
        );
        for v in &self.variants {
            let _ = writeln!(
                s,
                "{:<14} {:>4} {:>22} {:>22} {:>20} {:>22} {:>24} {:>20} {:>22}",
                v.variant.name(),
                v.runs,
                spread(v.total_s.as_ref(), 3),
                spread(v.downtime_ms.as_ref(), 1),
                spread(v.fault_p50_us.as_ref(), 0),
                spread(v.fault_p99_us.as_ref(), 0),
                spread(v.fault_max_us.as_ref(), 0),
                spread(v.requests.as_ref(), 0),
                spread(v.guest_blocked_ms.as_ref(), 1),
            );
        }
        if !self.replay_checks.is_empty() {
            let equal = self.replay_checks.iter().filter(|r| r.equal).count();
            let _ = writeln!(
                s,
                "replay check: equal in {equal} of {} run(s)",
                self.replay_checks.len()
            );
        }
        let f = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "postcopy (preempt) total / idle precopy total: {}",
            f(self.total_over_idle_precopy)
        );
        if self.variant(Variant::Qemu).is_some() {
            let _ = writeln!(
                s,
                "ferry (preempt) / QEMU postcopy: total time {}, downtime {}",
                f(self.ferry_over_qemu_total),
                f(self.ferry_over_qemu_downtime)
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

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self)
            .unwrap_or_else(|e| json!({ "error": format!("cannot serialise the report: {e}") }))
    }
}

/// Whether `exe`'s `send --help` lists `flag`.
fn send_has_flag(exe: &std::path::Path, flag: &str) -> bool {
    std::process::Command::new(exe)
        .args(["send", "--help"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(|c: char| c.is_whitespace() || c == ',')
                .any(|w| w == flag)
        })
}

/// `ferry send`'s guest arguments for a variant (before `--to`).
fn send_args(v: Variant, pc: &PostcopyOptions, size: u64, seed: u64) -> Vec<String> {
    let rate = if v == Variant::IdlePrecopy {
        0
    } else {
        pc.dirty_rate
    };
    let mut a: Vec<String> = vec![
        "--guest".into(),
        "synthetic".into(),
        "--size".into(),
        size.to_string(),
        "--vcpus".into(),
        pc.vcpus.to_string(),
        "--dirty-rate".into(),
        rate.to_string(),
        "--dirty-pattern".into(),
        pc.dirty_pattern.clone(),
        "--seed".into(),
        seed.to_string(),
    ];
    if v != Variant::IdlePrecopy {
        a.extend([
            "--postcopy".into(),
            "--postcopy-after".into(),
            pc.postcopy_after.to_string(),
        ]);
    }
    if v == Variant::NoPreempt {
        a.push(NO_PREEMPT_FLAG.into());
    }
    a
}

/// The figures of one two-process migration, checked.
fn sample_of(pair: &Pair, v: Variant, label: &str) -> Result<PostcopySample, BenchError> {
    let failed = |why: String| BenchError::FerryFailed {
        case: label.to_string(),
        failures: vec![why],
    };
    let (sent, held) = (&pair.sent, &pair.held);
    let num = |j: &Value, side: &str, key: &str| {
        j[key]
            .as_f64()
            .ok_or_else(|| failed(format!("{side}'s JSON report has no numeric {key}")))
    };
    let started = num(sent, "ferry send", "started_at_unix")?;
    let downtime_ms = num(sent, "ferry send", "downtime_ms")?;
    let state = |j: &Value| j["device_state_digest"].as_str().map(str::to_string);
    if state(sent).is_none() || state(sent) != state(held) {
        return Err(failed(format!(
            "the device state the destination resumed from ({:?}) is not the one sent ({:?})",
            state(held),
            state(sent)
        )));
    }
    let postcopy = v != Variant::IdlePrecopy;
    let switched = sent["postcopy_requests"].is_u64();
    if postcopy != switched {
        return Err(failed(format!(
            "expected {}, but the source's report {} postcopy figures",
            if postcopy { "postcopy" } else { "precopy" },
            if switched { "has" } else { "has no" }
        )));
    }
    let end = if postcopy {
        num(held, "ferry recv", "finished_at_unix")?
    } else {
        num(sent, "ferry send", "destination_resumed_at_unix")?
    };
    let total_s = end - started;
    if total_s.is_nan() || total_s <= 0.0 {
        return Err(failed(format!(
            "the migration ended at {end:.6}, not after it started ({started:.6})"
        )));
    }
    let opt = |j: &Value, k: &str| if postcopy { j[k].as_f64() } else { None };
    Ok(PostcopySample {
        total_s,
        downtime_ms,
        passes: sent["passes"].as_u64().unwrap_or(0),
        fault_p50_us: opt(held, "fault_latency_p50_us"),
        fault_p99_us: opt(held, "fault_latency_p99_us"),
        fault_max_us: opt(held, "fault_latency_max_us"),
        requests: opt(held, "postcopy_requests"),
        postcopy_bytes: opt(held, "postcopy_bytes"),
        discarded_pages: opt(held, "postcopy_discarded_pages"),
        guest_blocked_ms: opt(held, "guest_blocked_ms"),
        detail: json!({ "t0_unix": pair.t0, "send": sent, "recv": held }),
    })
}

fn fmt_sample(v: Variant, run: usize, runs: usize, s: &PostcopySample) -> String {
    let mut l = format!(
        "{:<13} run {run}/{runs}: total {:.3} s, downtime {:.1} ms, {} pass(es)",
        v.name(),
        s.total_s,
        s.downtime_ms,
        s.passes
    );
    if let (Some(p50), Some(p99), Some(max)) = (s.fault_p50_us, s.fault_p99_us, s.fault_max_us) {
        let _ = write!(l, ", fault p50/p99/max {p50:.0}/{p99:.0}/{max:.0} us");
    }
    if let Some(r) = s.requests {
        let _ = write!(l, ", {r:.0} requests");
    }
    l
}

/// One postcopy with both sides in this process, then the replay check.
fn replay_once(
    size: u64,
    pc: &PostcopyOptions,
    seed: u64,
    channels: u16,
) -> Result<ReplayOutcome, BenchError> {
    use ferry::{Guest, SyntheticConfig, SyntheticGuest};
    let fail = |why: String| BenchError::FerryFailed {
        case: "replay check (in-process postcopy)".into(),
        failures: vec![why],
    };
    let pattern: ferry::DirtyPattern = pc.dirty_pattern.parse().map_err(fail)?;
    let memory = ferry::synthetic::synthetic_memory(size, None, seed)
        .map_err(|e| fail(format!("making the guest's memory: {e}")))?;
    let config = SyntheticConfig {
        vcpus: pc.vcpus,
        dirty_rate: pc.dirty_rate,
        pattern,
        seed,
        tracker: ferry::TrackerKind::Bitmap,
    };
    let guest = SyntheticGuest::start(memory, &config, ferry::Resources::none(true))
        .map_err(|e| fail(format!("starting the guest: {e}")))?;
    let listener = ferry::Listener::bind(
        &"tcp:127.0.0.1:0"
            .parse()
            .map_err(|e| fail(format!("{e}")))?,
        ferry::SocketTuning::default(),
    )
    .map_err(|e| fail(format!("listening: {e}")))?;
    let uri = listener.uri().clone();
    let dst = std::thread::spawn(move || {
        ferry::migrate_in(
            &listener,
            &ferry::IncomingOptions::default(),
            &ferry::Progress::default(),
        )
    });
    let opts = ferry::OutgoingOptions {
        channels,
        postcopy: true,
        postcopy_after: Some(pc.postcopy_after),
        ..Default::default()
    };
    let sent = ferry::migrate_out(&guest, &uri, &opts, &ferry::Progress::default());
    let got = dst
        .join()
        .map_err(|_| fail("the destination's thread panicked".into()))?;
    let sent = sent.map_err(|e| fail(format!("source: {}", e.error)))?;
    let got = got.map_err(|e| fail(format!("destination: {}", e.error)))?;
    if sent.postcopy.is_none() {
        return Err(fail("the source never switched to postcopy".into()));
    }
    std::thread::sleep(REPLAY_RUN_ON);
    got.guest
        .pause()
        .map_err(|e| fail(format!("pausing the destination's guest: {e}")))?;
    let now = got
        .guest
        .save_device_state()
        .map_err(|e| fail(format!("the destination's device state: {e}")))?;
    let switchover = guest
        .save_device_state()
        .map_err(|e| fail(format!("the source's device state: {e}")))?;
    let reference = guest.memory().blocks()[0].copy_all();
    drop(guest);
    let r = ferry::replay_check(&reference, &switchover, &got.memory, &now)
        .map_err(|e| fail(format!("{e}")))?;
    Ok(ReplayOutcome {
        equal: r.equal(),
        writes: r.writes,
        differing_pages: r.differing,
        downtime_ms: sent.downtime_ms,
        requests: sent.postcopy.map_or(0, |p| p.postcopy_requests),
    })
}

/// Runs `ferry bench --postcopy` (see the module doc).
pub fn run_postcopy(
    config: &BenchConfig,
    pc: &PostcopyOptions,
    log: &mut dyn FnMut(&str),
) -> Result<PostcopyReport, BenchError> {
    let started_at_unix = sys::unix_now();
    let load_average_start = sys::load_average();
    let channels = channel_list(config)?;
    let [k] = channels[..] else {
        return Err(BenchError::Config(
            "--postcopy measures one channel count (e.g. --channels 2)".into(),
        ));
    };
    if config.runs == 0 {
        return Err(BenchError::Config("runs must be at least 1".into()));
    }
    if config.size == 0 || !config.size.is_multiple_of(MIB) {
        return Err(BenchError::Config(format!(
            "size {} is not a positive multiple of 1 MiB",
            config.size
        )));
    }
    if config.peer_iperf || config.peer_floor || config.peer_plain || config.dataset.is_some() {
        return Err(BenchError::Config(
            "--postcopy takes only --peer qemu (and no --dataset)".into(),
        ));
    }
    let mut notes = vec![
        "the machine may be shared: medians over the runs; ranges show the spread".to_string(),
    ];
    let mut turns = vec![Variant::Preempt, Variant::IdlePrecopy];
    if send_has_flag(&config.ferry_exe, NO_PREEMPT_FLAG) {
        turns.insert(1, Variant::NoPreempt);
    } else {
        let n = format!(
            "no-preempt skipped: this ferry's `send --help` has no {NO_PREEMPT_FLAG} (page \
             requests then always go on the preempt channel)"
        );
        log(&n);
        notes.push(n);
    }
    let qemu = if config.peer_qemu {
        match crate::postcopy_qemu::prepare(config.size, pc, config.seed) {
            Ok(q) => {
                notes.push(
                    "QEMU postcopy: ferry's KVM micro-VM program under QEMU (not the synthetic \
                     guest) with the same size, vCPUs, rate and pattern; postcopy-ram and \
                     postcopy-preempt on one main channel, without multifd (QEMU 10.0 refuses \
                     it with postcopy: \"Postcopy is not yet compatible with multifd\"); \
                     migrate-start-postcopy once ram.dirty-sync-count passed --postcopy-after; \
                     its total is QEMU's total-time, its downtime QEMU's downtime, which in \
                     postcopy ends once the source has sent the package (ferry's ends when the \
                     destination says its guest runs)"
                        .into(),
                );
                turns.push(Variant::Qemu);
                Some(q)
            }
            Err(why) => {
                let n = format!("QEMU postcopy skipped: {why}");
                log(&n);
                notes.push(n);
                None
            }
        }
    } else {
        None
    };
    let (extra_send, recv_args) = tls_and_compression_args(config);
    let conditions = Conditions::set(
        config,
        config.size,
        "ferry",
        qemu.is_some(),
        qemu.is_some(),
        &mut notes,
        log,
    );
    let mut samples: Vec<(Variant, Vec<PostcopySample>)> =
        turns.iter().map(|&v| (v, Vec::new())).collect();
    let mut replays = Vec::new();
    for r in 1..=config.runs {
        for &v in &turns {
            conditions.settle(log);
            let label = format!("postcopy bench, {} turn", v.name());
            let s = if v == Variant::Qemu {
                let q = qemu
                    .as_ref()
                    .ok_or_else(|| BenchError::Config("a QEMU turn without QEMU".into()))?;
                crate::postcopy_qemu::run_once(q, &label)?
            } else {
                let args = send_args(v, pc, config.size, config.seed);
                let pair = ferry_pair(&FerryRun {
                    exe: &config.ferry_exe,
                    guest: SendGuest::Live(&args),
                    size: config.size,
                    channels: k,
                    send_args: &extra_send,
                    recv_args: &recv_args,
                    congestion: config.congestion.as_deref(),
                    switchover_digest: false,
                    label: &label,
                })?;
                sample_of(&pair, v, &label)?
            };
            log(&fmt_sample(v, r, config.runs, &s));
            if let Some((_, list)) = samples.iter_mut().find(|(x, _)| *x == v) {
                list.push(s);
            }
        }
        if pc.replay_check {
            conditions.settle(log);
            let t = Instant::now();
            let o = replay_once(config.size, pc, config.seed, k)?;
            log(&format!(
                "replay check  run {r}/{}: {} ({} writes replayed, {} page(s) differ, downtime \
                 {} ms, {} requests; {:.1} s)",
                config.runs,
                if o.equal { "equal" } else { "NOT EQUAL" },
                o.writes,
                o.differing_pages,
                o.downtime_ms.map_or("-".into(), |d| format!("{d:.1}")),
                o.requests,
                t.elapsed().as_secs_f64()
            ));
            replays.push(o);
        }
        turns.rotate_left(1);
    }
    drop(conditions);
    if pc.replay_check {
        notes.push(
            "replay check: one more preempt postcopy per run with both sides in the bench's \
             process (the library's migrate_out/migrate_in), the destination's guest run on \
             for 0.3 s, paused, and its memory compared with the source's at the switch plus \
             its own writes replayed (ferry::replay_check)"
                .into(),
        );
    }
    notes.push(
        "total: postcopy from the source's start until the destination held every page \
         (ferry recv's finished_at_unix); idle precopy until the destination's guest ran; \
         downtime: the source's, paused until the destination said its guest runs; fault \
         latency: the destination's, a page request sent until its page was placed"
            .into(),
    );
    let variants: Vec<VariantSummary> = samples
        .into_iter()
        .map(|(v, s)| VariantSummary::of(v, s))
        .collect();
    let find = |v: Variant| variants.iter().find(|s| s.variant == v);
    let pre = find(Variant::Preempt);
    let idle = find(Variant::IdlePrecopy);
    let q = find(Variant::Qemu);
    Ok(PostcopyReport {
        mode: "postcopy",
        size: config.size,
        vcpus: pc.vcpus,
        dirty_rate: pc.dirty_rate,
        dirty_pattern: pc.dirty_pattern.clone(),
        postcopy_after: pc.postcopy_after,
        channels: k,
        runs: config.runs,
        seed: config.seed,
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
        total_over_idle_precopy: ratio(
            pre.and_then(|p| p.total_s.as_ref()),
            idle.and_then(|p| p.total_s.as_ref()),
        ),
        ferry_over_qemu_total: ratio(
            pre.and_then(|p| p.total_s.as_ref()),
            q.and_then(|p| p.total_s.as_ref()),
        ),
        ferry_over_qemu_downtime: ratio(
            pre.and_then(|p| p.downtime_ms.as_ref()),
            q.and_then(|p| p.downtime_ms.as_ref()),
        ),
        variants,
        replay_checks: replays,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BenchConfig {
        let mut c = BenchConfig::new("/no/such/ferry");
        c.size = 32 * MIB;
        c.channels = vec![2];
        c.runs = 1;
        c.warm_memory = false;
        c.congestion = None;
        c
    }

    #[test]
    fn send_arguments_per_variant() {
        let pc = PostcopyOptions::default();
        let a = send_args(Variant::Preempt, &pc, 64 * MIB, 7).join(" ");
        assert_eq!(
            a,
            "--guest synthetic --size 67108864 --vcpus 2 --dirty-rate 1073741824 \
             --dirty-pattern random --seed 7 --postcopy --postcopy-after 1"
        );
        let a = send_args(Variant::NoPreempt, &pc, 64 * MIB, 7);
        assert_eq!(a.last().map(String::as_str), Some(NO_PREEMPT_FLAG));
        let a = send_args(Variant::IdlePrecopy, &pc, 64 * MIB, 7).join(" ");
        assert!(a.contains("--dirty-rate 0 "), "{a}");
        assert!(!a.contains("--postcopy"), "{a}");
    }

    #[test]
    fn bad_configurations_fail_before_anything_runs() {
        let pc = PostcopyOptions::default();
        let err = |c: &BenchConfig, pc: &PostcopyOptions| match run_postcopy(c, pc, &mut |_| {}) {
            Err(BenchError::Config(e)) => e,
            Err(e) => panic!("expected a configuration error, got {e}"),
            Ok(_) => panic!("expected a configuration error, got a report"),
        };
        let mut c = config();
        c.channels = vec![1, 2];
        assert!(err(&c, &pc).contains("one channel count"));
        let mut c = config();
        c.size = MIB + 1;
        assert!(err(&c, &pc).contains("multiple of 1 MiB"));
        let mut c = config();
        c.peer_iperf = true;
        assert!(err(&c, &pc).contains("only --peer qemu"));
    }

    #[test]
    fn a_missing_binary_is_a_spawn_error() {
        let pc = PostcopyOptions {
            replay_check: false,
            ..PostcopyOptions::default()
        };
        let e = run_postcopy(&config(), &pc, &mut |_| {}).err();
        assert!(matches!(e, Some(BenchError::Spawn { .. })), "{e:?}");
    }

    fn reports(total: f64, downtime: f64, postcopy: bool) -> Pair {
        let mut sent = json!({
            "started_at_unix": 100.0,
            "downtime_ms": downtime,
            "destination_resumed_at_unix": 100.0 + total,
            "device_state_digest": "ab",
            "passes": 1,
        });
        let mut held = json!({
            "finished_at_unix": 100.0 + total,
            "device_state_digest": "ab",
        });
        if postcopy {
            sent["postcopy_requests"] = json!(10);
            for (k, v) in [
                ("postcopy_requests", 12.0),
                ("fault_latency_p50_us", 80.0),
                ("fault_latency_p99_us", 900.0),
                ("fault_latency_max_us", 4000.0),
                ("postcopy_bytes", 4096.0),
                ("postcopy_discarded_pages", 99.0),
                ("guest_blocked_ms", 3.5),
            ] {
                held[k] = json!(v);
            }
        }
        Pair {
            sent,
            held,
            t0: 99.0,
            cpu: (0.0, 0.0),
            send_cpu: None,
            recv_cpu: None,
        }
    }

    #[test]
    fn samples_are_read_and_checked() {
        let s = sample_of(&reports(2.0, 30.0, true), Variant::Preempt, "t").unwrap();
        assert_eq!((s.total_s, s.downtime_ms, s.passes), (2.0, 30.0, 1));
        assert_eq!(
            (s.fault_p50_us, s.fault_p99_us, s.fault_max_us),
            (Some(80.0), Some(900.0), Some(4000.0))
        );
        assert_eq!(s.requests, Some(12.0));
        let s = sample_of(&reports(1.0, 5.0, false), Variant::IdlePrecopy, "t").unwrap();
        assert_eq!((s.total_s, s.fault_p99_us), (1.0, None));
        // A postcopy turn whose source never switched is an error, and so
        // is a device state that changed on the way.
        let e = sample_of(&reports(1.0, 5.0, false), Variant::Preempt, "t")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("has no postcopy figures"), "{e}");
        let mut p = reports(1.0, 5.0, true);
        p.held["device_state_digest"] = json!("cd");
        let e = sample_of(&p, Variant::Preempt, "t")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("is not the one sent"), "{e}");
    }

    #[test]
    fn medians_ratios_and_table() {
        let pre: Vec<PostcopySample> = [(3.0, 40.0), (1.0, 20.0), (2.0, 30.0)]
            .iter()
            .map(|&(t, d)| sample_of(&reports(t, d, true), Variant::Preempt, "t").unwrap())
            .collect();
        let idle = vec![sample_of(&reports(1.6, 4.0, false), Variant::IdlePrecopy, "t").unwrap()];
        let v = VariantSummary::of(Variant::Preempt, pre);
        assert_eq!(
            v.downtime_ms,
            Some(Spread {
                median: 30.0,
                min: 20.0,
                max: 40.0
            })
        );
        let i = VariantSummary::of(Variant::IdlePrecopy, idle);
        let r = ratio(v.total_s.as_ref(), i.total_s.as_ref()).unwrap();
        assert!((r - 1.25).abs() < 1e-9, "{r}");
        assert!(i.fault_p99_us.is_none());
        let report = PostcopyReport {
            mode: "postcopy",
            size: 1 << 30,
            vcpus: 2,
            dirty_rate: 1 << 30,
            dirty_pattern: "random".into(),
            postcopy_after: 1,
            channels: 2,
            runs: 3,
            seed: 1,
            send_args: vec![],
            cpus: 2,
            host: "h".into(),
            kernel: "k".into(),
            ferry_version: "ferry".into(),
            load_average_start: None,
            load_average_end: None,
            started_at_unix: 1.7e9,
            finished_at_unix: 1.7e9,
            variants: vec![v, i],
            replay_checks: vec![ReplayOutcome {
                equal: true,
                writes: 5,
                differing_pages: 0,
                downtime_ms: Some(1.0),
                requests: 1,
            }],
            total_over_idle_precopy: Some(r),
            ferry_over_qemu_total: None,
            ferry_over_qemu_downtime: None,
            notes: vec![],
        };
        let t = report.table();
        let row = t.lines().find(|l| l.starts_with("preempt")).expect("row");
        assert_eq!(
            row.split_whitespace().take(6).collect::<Vec<_>>(),
            [
                "preempt",
                "3",
                "2.000",
                "(1.000-3.000)",
                "30.0",
                "(20.0-40.0)"
            ]
        );
        assert!(t.contains("replay check: equal in 1 of 1 run(s)"), "{t}");
        assert!(t.contains("idle precopy total: 1.25"), "{t}");
        let j = report.to_json();
        assert_eq!(j["variants"][0]["variant"], "preempt");
        assert_eq!(j["variants"][1]["variant"], "idle-precopy");
        assert_eq!(j["variants"][0]["fault_p99_us"]["median"], 900.0);
    }
}
