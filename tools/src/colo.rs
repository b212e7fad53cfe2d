//! `ferry send --colo` and `ferry recv --colo`: after the live migration
//! the source goes on as COLO's primary and the destination as its
//! secondary (`ferry::colo`), until a failover or a poweroff; a survivor
//! then runs the guest alone until `--colo-alone` ends, `ferry ctl SOCK
//! poweroff`, or a signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ferry::colo::{
    forward_outputs, run_primary, run_secondary, ColoControl, ColoOptions, ColoSummary,
    OutputQueue, OutputSink, SecondaryParts, WriterSink,
};
use ferry::{Guest, Progress};
use ferry_colo::Record;

/// COLO's options, the same on both sides.
#[derive(Args, Clone, Debug)]
pub struct ColoArgs {
    /// After the migration, keep a secondary copy of the guest running in
    /// lockstep on the destination (COLO): checkpoints every
    /// --checkpoint-delay, on `ferry ctl SOCK checkpoint`, and when the two
    /// copies' outputs differ; if one side dies the other goes on alone.
    /// Both `send` and `recv` need it. Synthetic (`--guest synthetic`, the
    /// default with --colo) or KVM guest (`--guest kvm`).
    #[arg(long)]
    pub colo: bool,
    /// COLO: time between periodic checkpoints (100ms, 1s; a bare number
    /// is milliseconds). `ferry ctl SOCK set checkpoint-delay=MS` changes
    /// it at once.
    #[arg(long, default_value = "100ms", value_parser = crate::units::parse_millis, requires = "colo")]
    pub checkpoint_delay: Duration,
    /// COLO: the longest silence from the other side before it is taken
    /// for dead and this side goes on alone (heartbeats go out four times
    /// within it).
    #[arg(long, default_value = "1000ms", value_parser = crate::units::parse_millis, requires = "colo")]
    pub heartbeat_timeout: Duration,
    /// COLO: where outputs released to the client go: a file, or
    /// tcp:HOST:PORT. Each record is a line `VCPU NUMBER VALUE`. Default:
    /// discarded (still counted).
    #[arg(long, value_name = "PATH|tcp:HOST:PORT", requires = "colo")]
    pub colo_output: Option<String>,
    /// COLO: each vCPU emits an output record every this many writes
    /// (both sides must give the same number: the secondary refuses COLO
    /// otherwise).
    #[arg(long, default_value_t = 64, requires = "colo")]
    pub colo_output_every: u64,
    /// COLO: per million writes, how many mix the clock into the vCPU's
    /// RNG (slight non-determinism, as interrupts give a real guest), so
    /// the copies drift apart and mismatches trigger checkpoints.
    /// Synthetic guest only.
    #[arg(long, default_value_t = 0, requires = "colo")]
    pub colo_jitter: u32,
    /// COLO: compare a digest of both sides' memory at every checkpoint
    /// (costs a full-memory hash per checkpoint on each side). Give it to
    /// both sides or neither: the secondary refuses COLO otherwise.
    #[arg(long, requires = "colo")]
    pub colo_verify: bool,
    /// COLO: power off (stop both guests and end) after this many
    /// checkpoints.
    #[arg(long, value_name = "N", requires = "colo")]
    pub colo_checkpoints: Option<u64>,
    /// COLO: after a failover, run the guest alone this long, then end
    /// (default: until `ferry ctl SOCK poweroff` or a signal).
    #[arg(long, value_parser = crate::units::parse_secs, requires = "colo")]
    pub colo_alone: Option<Duration>,
}

impl ColoArgs {
    pub fn options(&self) -> ColoOptions {
        ColoOptions {
            checkpoint_delay: self.checkpoint_delay,
            heartbeat_timeout: self.heartbeat_timeout,
            verify: self.colo_verify,
            output_every: self.colo_output_every,
            max_checkpoints: self.colo_checkpoints,
            ..ColoOptions::default()
        }
    }

    pub fn sink(&self) -> anyhow::Result<Arc<dyn OutputSink>> {
        Ok(match &self.colo_output {
            Some(spec) => Arc::new(
                WriterSink::open(spec).map_err(|e| anyhow::anyhow!("--colo-output {spec}: {e}"))?,
            ),
            None => Arc::new(Discard),
        })
    }

    /// COLO's control, reachable from the control socket; a signal powers
    /// off.
    pub fn control(&self, progress: &Arc<Progress>) -> Arc<ColoControl> {
        let ctl = ColoControl::new(self.checkpoint_delay);
        progress.attach_colo(ctl.clone());
        let (p, c) = (progress.clone(), Arc::downgrade(&ctl));
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            let Some(c) = c.upgrade() else { return };
            if p.cancel_requested() {
                c.poweroff();
                return;
            }
        });
        ctl
    }
}

/// The secondary's builder for a KVM guest's state (`recv --colo`): the
/// VM from the migrated state with KVM's dirty log (kvm-log) started and
/// its outputs to COLO, noted in `slot` like any KVM guest a destination
/// builds (so `--run-after` reads its counters and self-check).
pub fn kvm_kind(slot: crate::kvm::ArrivedSlot) -> ferry::colo::ColoGuestKind {
    Arc::new(move |memory, state, _every, hook| {
        if !ferry_vmm::is_kvm_state(state) {
            return None;
        }
        let built = (|| -> anyhow::Result<Box<dyn Guest>> {
            crate::kvm::require_kvm()?;
            let g = ferry_vmm::KvmGuest::colo_secondary(
                memory,
                state,
                hook,
                ferry::Resources::none(false),
                ferry_vmm::DirtyTracker::default(),
            )?;
            let at_arrival = g.statuses()?;
            let guest = Arc::new(g);
            *slot.lock().unwrap() = Some(crate::kvm::Arrived {
                guest: guest.clone(),
                at_arrival,
            });
            Ok(Box::new(ferry_vmm::SharedKvmGuest(guest)))
        })();
        Some(built.map_err(|e| ferry::GuestError::DeviceState(crate::output::error_chain(&e))))
    })
}

struct Discard;
impl OutputSink for Discard {
    fn release(&self, _: &[Record]) {}
}

/// A line on stderr every second while COLO runs (not with --json).
fn ticker(role: &'static str, ctl: &Arc<ColoControl>, show: bool) -> Option<Arc<AtomicBool>> {
    if !show {
        return None;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (s, c) = (stop.clone(), ctl.clone());
    std::thread::spawn(move || {
        let mut last = Instant::now();
        while !s.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() < Duration::from_secs(1) {
                continue;
            }
            last = Instant::now();
            let l = c.live();
            let t = c.triggers.counts();
            eprintln!(
                "COLO {role}: {} checkpoints ({} periodic, {} request, {} mismatch), last pause \
                 {:.2} ms, last {} bytes; outputs: {} released, {} held, {} mismatches",
                l.checkpoints,
                t.periodic,
                t.request,
                t.mismatch,
                l.last_pause_ms,
                l.last_bytes,
                l.released,
                l.held,
                l.mismatches
            );
        }
    });
    Some(stop)
}

/// The primary, after `migrate_out` completed.
#[allow(clippy::too_many_arguments)]
pub fn primary(
    a: &ColoArgs,
    guest: &dyn Guest,
    outputs: &Arc<OutputQueue>,
    uri: &ferry::ChannelUri,
    link: &ferry::OutgoingOptions,
    ctl: &Arc<ColoControl>,
    progress: &Progress,
    json: bool,
) -> anyhow::Result<ColoSummary> {
    let sink = a.sink()?;
    let t = ticker("primary", ctl, !json);
    let s = run_primary(guest, outputs, uri, link, &a.options(), ctl, sink.clone());
    // query-migrate and the events leave `colo`: completed after a
    // poweroff or a failover (as QEMU), failed otherwise.
    ferry::session::end_colo(progress, !matches!(s.end, "killed" | "refused"));
    if let Some(t) = t {
        t.store(true, Ordering::SeqCst);
    }
    alone(a, guest, outputs, &*sink, ctl, progress, &s);
    Ok(s)
}

/// The secondary, after `migrate_in` completed.
pub fn secondary(
    a: &ColoArgs,
    guest: &dyn Guest,
    parts: &SecondaryParts,
    listener: &ferry::Listener,
    ctl: &Arc<ColoControl>,
    progress: &Progress,
    json: bool,
) -> anyhow::Result<ColoSummary> {
    let sink = a.sink()?;
    let t = ticker("secondary", ctl, !json);
    let s = run_secondary(guest, parts, listener, &a.options(), ctl, sink.clone());
    // query-migrate and the events leave `colo`: completed after a
    // poweroff or a failover (as QEMU), failed otherwise.
    ferry::session::end_colo(progress, !matches!(s.end, "killed" | "refused"));
    if let Some(t) = t {
        t.store(true, Ordering::SeqCst);
    }
    alone(a, guest, &parts.outputs, &*sink, ctl, progress, &s);
    Ok(s)
}

/// A survivor runs the guest alone until --colo-alone ends, a poweroff or
/// a signal; then stops it.
fn alone(
    a: &ColoArgs,
    guest: &dyn Guest,
    outputs: &OutputQueue,
    sink: &dyn OutputSink,
    ctl: &ColoControl,
    progress: &Progress,
    s: &ColoSummary,
) {
    if !s.guest_running {
        return;
    }
    eprintln!(
        "ferry: COLO ended ({}): this side runs the guest alone{}",
        s.status.error.as_deref().unwrap_or("failover requested"),
        match a.colo_alone {
            Some(d) => format!(" for {:.1} s", d.as_secs_f64()),
            None => " until `ferry ctl SOCK poweroff` or Ctrl-C".into(),
        }
    );
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|sc| {
        sc.spawn(|| forward_outputs(outputs, sink, &stop));
        while !ctl.poweroff_requested()
            && !progress.cancel_requested()
            && a.colo_alone.is_none_or(|d| started.elapsed() < d)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = guest.pause();
        stop.store(true, Ordering::SeqCst);
    });
}

/// The COLO part of the text summary.
pub fn print(s: &ColoSummary) {
    if s.role == "secondary" {
        eprintln!(
            "  COLO secondary: {} checkpoints loaded; {} bytes and {} pages per checkpoint; \
             {} outputs released at failover; ended by {}{}",
            s.checkpoints,
            s.bytes_per_checkpoint_mean,
            s.pages_per_checkpoint_mean,
            s.released,
            s.end,
            match s.failover_ms {
                Some(ms) => format!(", failover in {ms:.3} ms ({:?})", s.status.reason),
                None => String::new(),
            }
        );
        return;
    }
    let t = s.by_trigger;
    eprintln!(
        "  COLO {}: {} checkpoints ({} periodic, {} request, {} mismatch, {} coalesced); \
         pause p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} bytes and {} pages per checkpoint",
        s.role,
        s.checkpoints,
        t.periodic,
        t.request,
        t.mismatch,
        t.coalesced,
        s.pause.p50_ms,
        s.pause.p99_ms,
        s.pause.max_ms,
        s.bytes_per_checkpoint_mean,
        s.pages_per_checkpoint_mean
    );
    eprintln!(
        "  COLO outputs: {} compared, {} mismatches, {} released, at most {} held; ended by {}{}",
        s.compare.compared,
        s.compare.mismatches,
        s.released,
        s.compare.held_max,
        s.end,
        match s.failover_ms {
            Some(ms) => format!(", failover in {ms:.3} ms ({:?})", s.status.reason),
            None => String::new(),
        }
    );
}
