//! One migration's live state, shared by the controller, the control socket
//! and progress displays: its status (seed 004's state machine), the
//! parameters a user may change while it runs, the figures `query-migrate`
//! reports, cancel and continue requests, and event subscribers.
//!
//! Status transitions on the source: setup → active → (pre-switchover) →
//! device → completed; any of them → failed, or → cancelling → cancelled.
//! A live save goes the same way; a background snapshot setup → active →
//! completed. The destination goes setup → active → device → completed;
//! any of them → failed, or → cancelling → cancelled. With COLO next
//! (`send --colo`, `recv --colo`) both sides go device → colo, then
//! completed (poweroff or failover) or failed. Every side changes
//! status only through the session engine's state machine
//! (`crate::session::Phase`, `transition`, through a `Session` or, on the
//! destination, `Phases`), which refuses an illegal move;
//! [`Progress::cancel`] alone moves to cancelling from another thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_multifd::{Counters, PassControl, Totals};
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    #[default]
    None,
    Setup,
    Active,
    PreSwitchover,
    Device,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    /// COLO runs after the migration (`send --colo`, `recv --colo`); left
    /// for completed (poweroff or failover) or failed.
    Colo,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecoverSetup => "postcopy-recover-setup",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Colo => "colo",
        }
    }
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Postcopy while it runs: pages the destination still lacks, page
/// requests (sent by the destination, served by the source) and page
/// bytes moved since the switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PostcopyLive {
    pub pages_left: u64,
    pub requests: u64,
    pub bytes: u64,
}

const POSTCOPY_OFF: u8 = 0;
const POSTCOPY_ALLOWED: u8 = 1;
const POSTCOPY_REQUESTED: u8 = 2;

/// What a user may set before or during a migration.
#[derive(Clone, Debug)]
pub struct Parameters {
    /// The longest the guest may stay paused for the final pass.
    pub downtime_limit: Duration,
    /// Bytes per second the passes may use (0: no limit).
    pub max_bandwidth: u64,
    /// Bytes per second to assume for the switchover decision instead of
    /// the measured bandwidth (0: use the measured one).
    pub avail_switchover_bandwidth: u64,
    /// Throttle the guest after each pass in which it dirtied more than half
    /// of the bytes the pass sent (passes are not shrinking fast enough).
    pub auto_converge: bool,
    pub throttle_initial: u8,
    pub throttle_increment: u8,
    pub throttle_max: u8,
    /// Wait in pre-switchover (guest paused) until `migrate-continue`.
    pub pause_before_switchover: bool,
    /// Give up after this many passes without converging (0: never).
    pub max_passes: u64,
}

impl Default for Parameters {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: 0,
            avail_switchover_bandwidth: 0,
            auto_converge: false,
            throttle_initial: 20,
            throttle_increment: 10,
            throttle_max: 99,
            pause_before_switchover: false,
            max_passes: 0,
        }
    }
}

/// Figures of the passes so far (seed 004's migration_update_counters).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PassFigures {
    pub pass: u64,
    pub dirty_sync_count: u64,
    /// Dirty bytes left after the last sync.
    pub remaining_bytes: u64,
    /// Bytes per second the last pass moved (multifd wire bytes).
    pub bandwidth: f64,
    /// Pages the guest dirtied per second, measured between syncs.
    pub dirty_pages_rate: f64,
    pub pages_per_second: f64,
    pub expected_downtime_ms: f64,
    pub throttle_percent: u8,
    /// Wire bytes sent while the guest ran, and while it was paused.
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
}

/// Figures taken while a pass runs (a few times a second), not only
/// between passes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LiveFigures {
    pub status: &'static str,
    pub pass: u64,
    /// Bytes on the wire so far (all channels).
    pub transferred: u64,
    /// Guest RAM bytes accounted for so far (sent, or zero pages named).
    pub ram_bytes: u64,
    /// Source: bytes still to send in this pass (the last sync's dirty set
    /// less what the pass has sent); `None` where it is not known.
    pub remaining: Option<u64>,
    /// Bytes of guest RAM the migration covers.
    pub total: u64,
    /// Wire bytes per second over the last second.
    pub bandwidth: f64,
    pub elapsed_ms: u64,
    /// `remaining` at the current rate.
    pub eta_ms: Option<u64>,
}

/// What subscribers (control socket clients, `--json`) are told.
#[derive(Clone, Debug)]
pub enum Event {
    Status(Status),
    Pass(PassFigures),
    /// A few times a second while the migration runs.
    Progress(LiveFigures),
}

impl Event {
    /// The event in QMP's shape.
    pub fn to_json(&self) -> Value {
        let (name, data) = match self {
            Self::Status(s) => ("MIGRATION", json!({ "status": s.as_str() })),
            Self::Pass(p) => (
                "MIGRATION_PASS",
                json!({ "pass": p.pass, "remaining": p.remaining_bytes,
                "bandwidth": p.bandwidth as u64, "dirty-pages-rate": p.dirty_pages_rate as u64,
                "expected-downtime": p.expected_downtime_ms as u64, "cpu-throttle-percentage": p.throttle_percent }),
            ),
            Self::Progress(l) => (
                "MIGRATION_PROGRESS",
                json!({ "status": l.status, "pass": l.pass, "transferred": l.transferred,
                "ram-bytes": l.ram_bytes, "remaining": l.remaining, "total": l.total,
                "mbps": l.bandwidth * 8.0 / 1e6, "elapsed": l.elapsed_ms, "eta": l.eta_ms }),
            ),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        json!({ "event": name, "data": data,
                "timestamp": { "seconds": now.as_secs(), "microseconds": now.subsec_micros() } })
    }
}

/// What the live figures are computed from.
#[derive(Default)]
struct Live {
    /// The pass in flight.
    pass: Option<PassStart>,
    /// (when, wire bytes) of the last second's ticks.
    samples: std::collections::VecDeque<(Instant, u64)>,
}

/// When the pass in flight began, the data path's totals then, and the
/// guest RAM bytes it has to cover.
#[derive(Clone, Copy)]
struct PassStart {
    at: Instant,
    ram: u64,
    wire: u64,
    bytes: u64,
}

/// How often [`Progress::tick`] runs while a migration is active.
pub const TICK: Duration = Duration::from_millis(250);

struct Timing {
    started: Option<Instant>,
    setup_ms: u64,
    total_ms: Option<u64>,
    downtime_ms: Option<f64>,
}

/// The live view and control handle of one migration.
pub struct Progress {
    /// Bytes of guest RAM the migration covers.
    pub total_ram_bytes: AtomicU64,
    pub page_size: AtomicU64,
    counters: OnceLock<Arc<Counters>>,
    pass_control: OnceLock<Arc<PassControl>>,
    phase: Mutex<&'static str>,
    status: Mutex<Status>,
    status_cv: Condvar,
    params: Mutex<Parameters>,
    figures: Mutex<PassFigures>,
    timing: Mutex<Timing>,
    error: Mutex<Option<String>>,
    cancel: AtomicBool,
    resume_requested: AtomicBool,
    /// Postcopy recovery: the URI `migrate-recover` (destination) or
    /// `migrate-resume` (source) gave, until the paused side takes it.
    recover_uri: Mutex<Option<String>>,
    /// Postcopy's live figures, once it runs.
    postcopy_live: Mutex<Option<PostcopyLive>>,
    /// Postcopy: [`POSTCOPY_OFF`], [`POSTCOPY_ALLOWED`] (the capability is
    /// on) or [`POSTCOPY_REQUESTED`] (`migrate-start-postcopy`).
    postcopy: std::sync::atomic::AtomicU8,
    /// A cancel is taken in the device phase too (a save: no destination
    /// can be taking the guest over).
    cancel_in_device: AtomicBool,
    cancel_hooks: Mutex<Vec<Box<dyn Fn() + Send>>>,
    subscribers: Mutex<Vec<mpsc::Sender<Event>>>,
    live: Mutex<Live>,
    /// COLO's control, once COLO runs (`send --colo`, `recv --colo`).
    colo: OnceLock<Arc<crate::colo::ColoControl>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            total_ram_bytes: AtomicU64::new(0),
            page_size: AtomicU64::new(4096),
            counters: OnceLock::new(),
            pass_control: OnceLock::new(),
            phase: Mutex::new(""),
            status: Mutex::new(Status::None),
            status_cv: Condvar::new(),
            params: Mutex::new(Parameters::default()),
            figures: Mutex::new(PassFigures::default()),
            timing: Mutex::new(Timing {
                started: None,
                setup_ms: 0,
                total_ms: None,
                downtime_ms: None,
            }),
            error: Mutex::new(None),
            cancel: AtomicBool::new(false),
            recover_uri: Mutex::new(None),
            resume_requested: AtomicBool::new(false),
            postcopy_live: Mutex::new(None),
            postcopy: std::sync::atomic::AtomicU8::new(POSTCOPY_OFF),
            cancel_in_device: AtomicBool::new(false),
            cancel_hooks: Mutex::new(Vec::new()),
            subscribers: Mutex::new(Vec::new()),
            live: Mutex::new(Live::default()),
            colo: OnceLock::new(),
        }
    }
}

impl Progress {
    /// A handle whose parameters start as `params`.
    pub fn with_parameters(params: Parameters) -> Self {
        let p = Self::default();
        *p.params.lock().unwrap() = params;
        p
    }

    /// Makes COLO's control reachable from the control socket.
    pub fn attach_colo(&self, ctl: Arc<crate::colo::ColoControl>) {
        let _ = self.colo.set(ctl);
    }
    /// COLO's control, once attached.
    pub fn colo(&self) -> Option<&Arc<crate::colo::ColoControl>> {
        self.colo.get()
    }

    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap() = phase;
    }
    pub fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap()
    }
    pub(crate) fn attach(&self, counters: Arc<Counters>) {
        let _ = self.counters.set(counters);
    }
    pub(crate) fn attach_pass_control(&self, control: Arc<PassControl>) {
        control.set_max_bandwidth(self.parameters().max_bandwidth);
        let _ = self.pass_control.set(control);
    }
    /// What the data path has moved so far.
    pub fn totals(&self) -> Totals {
        self.counters
            .get()
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }
    pub fn total_ram_bytes(&self) -> u64 {
        self.total_ram_bytes.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Status {
        *self.status.lock().unwrap()
    }

    /// Moves to `to` and tells subscribers. A final status is never left,
    /// and once cancelling only a final status may follow.
    pub(crate) fn set_status(&self, to: Status) {
        let mut s = self.status.lock().unwrap();
        if s.is_final() || *s == to || (*s == Status::Cancelling && !to.is_final()) {
            return;
        }
        *s = to;
        drop(s);
        self.status_cv.notify_all();
        let mut t = self.timing.lock().unwrap();
        match to {
            Status::Setup => t.started = Some(Instant::now()),
            Status::Active if t.setup_ms == 0 => {
                t.setup_ms = t.started.map_or(0, |s| s.elapsed().as_millis() as u64)
            }
            _ if to.is_final() => t.total_ms = t.started.map(|s| s.elapsed().as_millis() as u64),
            _ => {}
        }
        drop(t);
        self.publish(Event::Status(to));
    }

    pub(crate) fn set_error(&self, e: &str) {
        self.error.lock().unwrap().get_or_insert_with(|| e.into());
    }

    pub(crate) fn set_downtime(&self, d: Duration) {
        self.timing.lock().unwrap().downtime_ms = Some(d.as_secs_f64() * 1e3);
    }

    pub fn downtime(&self) -> Option<Duration> {
        self.timing
            .lock()
            .unwrap()
            .downtime_ms
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
    }

    pub(crate) fn update_figures(&self, f: impl FnOnce(&mut PassFigures)) -> PassFigures {
        let mut g = self.figures.lock().unwrap();
        f(&mut g);
        g.clone()
    }

    pub fn figures(&self) -> PassFigures {
        self.figures.lock().unwrap().clone()
    }

    /// Runs `f` while a thread refreshes the live figures every [`TICK`].
    pub(crate) fn while_ticking<T>(&self, f: impl FnOnce() -> T) -> T {
        std::thread::scope(|scope| {
            let (stop, stopped) = mpsc::channel::<()>();
            scope.spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    self.tick();
                }
            });
            let out = f();
            drop(stop);
            out
        })
    }

    /// A pass that has `bytes` of guest RAM to cover starts now.
    pub(crate) fn begin_pass(&self, bytes: u64) {
        let t = self.totals();
        self.live.lock().unwrap().pass = Some(PassStart {
            at: Instant::now(),
            ram: t.ram_bytes,
            wire: t.wire_bytes,
            bytes,
        });
    }

    /// The pass in flight has ended (its figures are in `figures`).
    pub(crate) fn end_pass(&self) {
        self.live.lock().unwrap().pass = None;
    }

    /// Takes a sample of the data path and tells subscribers the live
    /// figures. The controllers call it every [`TICK`] while they run.
    pub fn tick(&self) {
        let status = self.status();
        if !matches!(
            status,
            Status::Active
                | Status::Device
                | Status::PreSwitchover
                | Status::Cancelling
                | Status::PostcopyActive
        ) {
            return;
        }
        let wire = self.totals().wire_bytes;
        {
            let mut live = self.live.lock().unwrap();
            let now = Instant::now();
            live.samples.push_back((now, wire));
            while live
                .samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
            {
                live.samples.pop_front();
            }
        }
        self.publish(Event::Progress(self.live()));
    }

    /// The figures as they are now, between ticks too.
    pub fn live(&self) -> LiveFigures {
        let t = self.totals();
        let f = self.figures();
        let live = self.live.lock().unwrap();
        // The last second's ticks; early in a pass, the pass so far.
        let bandwidth = match (live.samples.front(), live.samples.back(), live.pass) {
            (Some(&(t0, b0)), Some(&(t1, b1)), _) if t1.duration_since(t0) >= TICK => {
                (b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64()
            }
            (_, _, Some(p)) if p.at.elapsed() >= TICK / 5 => {
                t.wire_bytes.saturating_sub(p.wire) as f64 / p.at.elapsed().as_secs_f64()
            }
            _ => f.bandwidth,
        };
        let remaining = match live.pass {
            Some(p) => Some(p.bytes.saturating_sub(t.ram_bytes.saturating_sub(p.ram))),
            None if f.pass > 0 => Some(f.remaining_bytes),
            None => None,
        };
        let elapsed = self
            .timing
            .lock()
            .unwrap()
            .started
            .map_or(0, |s| s.elapsed().as_millis() as u64);
        LiveFigures {
            status: self.status().as_str(),
            pass: f.pass + u64::from(live.pass.is_some()),
            transferred: t.wire_bytes,
            ram_bytes: t.ram_bytes,
            remaining,
            total: self.total_ram_bytes(),
            bandwidth,
            elapsed_ms: elapsed,
            eta_ms: remaining
                .filter(|_| bandwidth > 0.0)
                .map(|r| (r as f64 / bandwidth * 1e3) as u64),
        }
    }

    pub(crate) fn publish(&self, e: Event) {
        self.subscribers
            .lock()
            .unwrap()
            .retain(|s| s.send(e.clone()).is_ok());
    }

    /// Events from now on, until the receiver is dropped.
    pub fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.subscribers.lock().unwrap().push(tx);
        rx
    }

    pub fn parameters(&self) -> Parameters {
        self.params.lock().unwrap().clone()
    }

    /// Changes parameters while the migration runs; the rate limit applies
    /// to the pass in flight.
    pub fn set_parameters(&self, f: impl FnOnce(&mut Parameters)) {
        let mut p = self.params.lock().unwrap();
        f(&mut p);
        if let Some(c) = self.pass_control.get() {
            c.set_max_bandwidth(p.max_bandwidth);
        }
    }

    /// Asks the migration to stop: status cancelling, the pass in flight
    /// ends early, and the controller cleans up to cancelled. False if the
    /// migration has already ended, or is in the device phase, where the
    /// destination may already be taking over (a save may be cancelled
    /// there: see [`Progress::cancel_in_device`]).
    pub fn cancel(&self) -> bool {
        let s = self.status();
        // In postcopy neither side alone holds the guest: no cancel.
        if s.is_final()
            || self.cancel_refusal().is_some()
            || (s == Status::Device && !self.cancel_in_device.load(Ordering::SeqCst))
        {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.set_status(Status::Cancelling);
        if let Some(c) = self.pass_control.get() {
            c.interrupt();
        }
        for hook in self.cancel_hooks.lock().unwrap().iter() {
            hook();
        }
        self.status_cv.notify_all();
        true
    }

    /// Lets [`Progress::cancel`] stop the device phase too: for a save to
    /// a file, whose guest nobody else can be running.
    pub(crate) fn cancel_in_device(&self) {
        self.cancel_in_device.store(true, Ordering::SeqCst);
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub(crate) fn on_cancel(&self, hook: impl Fn() + Send + 'static) {
        self.cancel_hooks.lock().unwrap().push(Box::new(hook));
        if self.cancel_requested() {
            // Asked before the hook existed: run it now.
            if let Some(h) = self.cancel_hooks.lock().unwrap().last() {
                h();
            }
        }
    }

    /// Postcopy's live figures (the progress bar and `query` show them).
    pub fn set_postcopy_live(&self, live: PostcopyLive) {
        *self.postcopy_live.lock().unwrap() = Some(live);
    }

    /// Postcopy's live figures, once it runs.
    pub fn postcopy_live(&self) -> Option<PostcopyLive> {
        *self.postcopy_live.lock().unwrap()
    }

    /// `recover URI` (destination: listen there again) or `resume URI`
    /// (source: connect there again) for a postcopy in `postcopy-paused`;
    /// `what` names the command in the error, which says why it cannot
    /// be taken now.
    pub fn request_recover(&self, what: &str, uri: &str) -> Result<(), String> {
        let s = self.status();
        if s != Status::PostcopyPaused {
            return Err(format!(
                "{what}: the migration is in state '{}'; only a postcopy in \
                 'postcopy-paused' (its link failed) can be recovered",
                s.as_str()
            ));
        }
        if uri.trim().is_empty() {
            return Err(format!("{what} needs a URI such as tcp:HOST:PORT"));
        }
        *self.recover_uri.lock().unwrap() = Some(uri.trim().to_string());
        self.status_cv.notify_all();
        Ok(())
    }

    /// The URI of a pending recover/resume request, taken.
    pub fn take_recover(&self) -> Option<String> {
        self.recover_uri.lock().unwrap().take()
    }

    /// Why a cancel is refused now, if it is: in postcopy neither side
    /// alone holds the guest.
    pub fn cancel_refusal(&self) -> Option<String> {
        let s = self.status();
        matches!(
            s,
            Status::PostcopyActive
                | Status::PostcopyPaused
                | Status::PostcopyRecoverSetup
                | Status::PostcopyRecover
        )
        .then(|| {
            format!(
                "cancel refused in state '{}': after the postcopy switch the destination runs \
                 the guest and the source holds the pages it still lacks; neither side alone \
                 holds the whole guest, so the migration can only complete (after a link \
                 failure: `recover` on the destination, `resume` on the source)",
                s.as_str()
            )
        })
    }

    /// Allows `migrate-start-postcopy` (the migration has the postcopy
    /// capability).
    pub fn allow_postcopy(&self) {
        let _ = self.postcopy.compare_exchange(
            POSTCOPY_OFF,
            POSTCOPY_ALLOWED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Whether `migrate-start-postcopy` asked to switch to postcopy.
    pub fn postcopy_requested(&self) -> bool {
        self.postcopy.load(Ordering::SeqCst) == POSTCOPY_REQUESTED
    }

    /// `migrate-start-postcopy`: switch to postcopy after the pass in
    /// flight. Error text if there is no migration in precopy yet, or it
    /// lacks the capability.
    pub fn start_postcopy(&self) -> Result<(), String> {
        let s = self.status();
        match s {
            Status::None | Status::Setup => {
                return Err(format!(
                    "start-postcopy: no migration has started yet (state '{}'); it takes \
                     effect once precopy runs",
                    s.as_str()
                ))
            }
            Status::Active => {}
            _ => {
                return Err(format!(
                    "start-postcopy: the migration is in state '{}', not in precopy ('active')",
                    s.as_str()
                ))
            }
        }
        match self.postcopy.compare_exchange(
            POSTCOPY_ALLOWED,
            POSTCOPY_REQUESTED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) | Err(POSTCOPY_REQUESTED) => Ok(()),
            Err(_) => Err(
                "start-postcopy: this migration does not have the postcopy capability \
                 (start the source with `ferry send --postcopy`)"
                    .into(),
            ),
        }
    }

    /// `migrate-continue`: leaves pre-switchover. Error text if the
    /// migration is not waiting there.
    pub fn continue_from(&self, state: &str) -> Result<(), String> {
        let s = self.status();
        if s.as_str() != state || s != Status::PreSwitchover {
            return Err(format!(
                "migration is in state '{}', not '{state}'",
                s.as_str()
            ));
        }
        self.resume_requested.store(true, Ordering::SeqCst);
        self.status_cv.notify_all();
        Ok(())
    }

    /// Waits in pre-switchover until continued (true) or cancelled (false).
    pub(crate) fn wait_for_continue(&self) -> bool {
        let mut s = self.status.lock().unwrap();
        loop {
            if self.cancel_requested() {
                return false;
            }
            if self.resume_requested.swap(false, Ordering::SeqCst) {
                return true;
            }
            s = self
                .status_cv
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    /// What `query-migrate` answers (the fields of seed 004's
    /// populate_time_info and populate_ram_info).
    pub fn query(&self) -> Value {
        let status = self.status();
        let t = self.totals();
        let f = self.figures();
        let live = self.live();
        let timing = self.timing.lock().unwrap();
        let page_size = self.page_size.load(Ordering::Relaxed);
        let total_time = timing
            .total_ms
            .or_else(|| timing.started.map(|s| s.elapsed().as_millis() as u64))
            .unwrap_or(0);
        let mut info = json!({
            "status": status.as_str(),
            "setup-time": timing.setup_ms,
            "total-time": total_time,
            "ram": {
                "transferred": t.wire_bytes,
                "total": self.total_ram_bytes(),
                "duplicate": t.pages_zero,
                "normal": t.pages_normal,
                "normal-bytes": t.pages_normal * page_size,
                "mbps": if status.is_final() { f.bandwidth } else { live.bandwidth } * 8.0 / 1e6,
                "pages-per-second": f.pages_per_second as u64,
                "dirty-sync-count": f.dirty_sync_count,
                "page-size": page_size,
                "multifd-bytes": t.wire_bytes,
                "precopy-bytes": f.precopy_bytes,
                "downtime-bytes": f.downtime_bytes,
                "postcopy-bytes": 0,
            },
        });
        match timing.downtime_ms {
            Some(d) => info["downtime"] = json!(d.round() as u64),
            None => info["expected-downtime"] = json!(f.expected_downtime_ms.round() as u64),
        }
        if status != Status::Completed {
            info["ram"]["remaining"] = json!(live.remaining.unwrap_or(f.remaining_bytes));
            info["ram"]["dirty-pages-rate"] = json!(f.dirty_pages_rate as u64);
        }
        if f.throttle_percent > 0 {
            info["cpu-throttle-percentage"] = json!(f.throttle_percent);
        }
        if let Some(pc) = *self.postcopy_live.lock().unwrap() {
            info["ram"]["postcopy-requests"] = json!(pc.requests);
            info["ram"]["postcopy-bytes"] = json!(pc.bytes);
            info["ram"]["postcopy-pages-left"] = json!(pc.pages_left);
        }
        if let Some(e) = self.error.lock().unwrap().as_ref() {
            info["error-desc"] = json!(e);
        }
        info
    }
}
