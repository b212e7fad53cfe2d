//! The session engine: the one pass loop every way of moving a running
//! guest's memory uses, and the controller's phases as one state machine
//! named as QEMU names them (seed 004: `MigrationStatus`).
//!
//! It owns the order of a precopy pass — dirty-log sync, send a pass,
//! estimate (bandwidth, bytes left, expected downtime, dirty rate,
//! auto-converge throttle), switchover decision — the figures it publishes
//! ([`PassFigures`](crate::PassFigures), [`Event::Pass`]), the cancel
//! checks around each pass, and every phase change ([`transition`], kept
//! by [`Phases`], which the destination uses on its own). It
//! does not know where pages go: the caller implements [`PassSink`]. `ferry
//! send` (`outgoing.rs`) sends passes through its multifd `SenderPool` and
//! the main channel; a live save (`save.rs`) writes them into the file in
//! place; a background snapshot (`save.rs`) is a session with no dirty log
//! whose one pass writes memory as it was at its pause.
//!
//! # A session's life
//!
//! ```text
//! none → setup → active ─┬─────────────────→ device → completed
//!                        ├→ pre-switchover ─┘
//!                        ├→ completed              (background snapshot)
//!                        ├→ postcopy-active → completed, or → postcopy-paused → failed
//!                        └→ colo  (COLO runs after a completed migration,
//!                                  on a session of its own: `src/colo/`;
//!                                  this engine does not enter the phase)
//! any running phase → failed, or → cancelling → cancelled
//! ```
//!
//! The caller enters `setup` ([`Session::enter`]), opens whatever it sends
//! through, and calls [`Session::precopy`], which enters `active`, starts
//! the dirty log and runs passes:
//!
//! 1. [`PassSink::before_pass`] (the network reads its return path);
//! 2. the cancel check, then [`PassSink::send_pass`] with the pending
//!    bitmaps (pass 1: every page), then the cancel check again;
//! 3. [`Session::sync`]: the dirty log's pages since the last sync are
//!    ORed into the pending bitmaps;
//! 4. estimate ([`estimate`]): bandwidth of the pass, bytes left,
//!    `threshold = bandwidth × downtime-limit` (or the user's
//!    avail-switchover-bandwidth × downtime-limit), expected downtime; the
//!    throttle steps up ([`next_throttle`]) when the guest dirtied more than
//!    half of what the pass moved and auto-converge is on;
//! 5. decide ([`decide`]): switch over when what is left fits the threshold
//!    (or the guest has no dirty log: one pass is all); at the max passes
//!    fail ([`AtMaxPasses::Fail`], `ferry send`) or switch over anyway
//!    ([`AtMaxPasses::SwitchOver`], a live save). Before switching over,
//!    [`PassSink::switchover_ready`] may make the loop wait (the network's
//!    SWITCHOVER_ACK); a running guest then gets one more pass.
//!
//! The caller then pauses the guest, enters `pre-switchover` and/or
//! `device` and calls [`Session::final_pass`] (sync, then the pages left),
//! saves the device state, and ends with [`Session::finish`].
//!
//! The engine's phase is the controller's own account; a cancel from
//! another thread ([`Progress::cancel`]) shows as `cancelling` at once in
//! the status the user sees, and the engine follows when its next cancel
//! check notices.
//!
//! # Adding a phase (postcopy-active, say)
//!
//! The phases exist already ([`Phase`]), with QEMU's transitions in
//! [`Phase::can_move_to`]; what a new phase needs is its behaviour:
//!
//! 1. **Status.** Give [`Status`] the variant and map it in
//!    [`Phase::status`] (today postcopy and COLO map to `None`: nothing
//!    reports them); the control socket and `query` then show it.
//! 2. **Decision.** Add a [`Decision`] variant (e.g. `StartPostcopy`) and
//!    return it from [`decide`] when its condition holds (postcopy: the user
//!    asked for it, or the passes stopped converging and postcopy is
//!    allowed); [`Session::precopy`] hands it back to the caller as a
//!    [`PrecopyEnd`] instead of switching over.
//! 3. **Sink.** Extend [`PassSink`] with what the phase needs from the data
//!    path, with a default so the existing sinks keep compiling (postcopy:
//!    `send_discard(&pending)` and `serve_page(block, page)` for the
//!    faults the return path reports).
//! 4. **Loop.** Write the phase's own loop as a `Session` method beside
//!    [`Session::final_pass`]: it enters the phase through
//!    [`Session::enter`] (so an illegal move is refused with a
//!    [`PhaseError`]), runs until its end condition and leaves through
//!    [`Session::finish`] or another `enter`. Postcopy: enter
//!    `postcopy-active`, pause the guest, send the device state and the
//!    discard set (the pending bitmaps), then stream what is left in the
//!    background while serving faults first; a broken link enters
//!    `postcopy-paused` (never `failed`), and `recover` goes
//!    `postcopy-recover-setup` → `postcopy-recover` → `postcopy-active`.
//! 5. **Caller.** `outgoing.rs: Source::run` matches the new [`PrecopyEnd`]
//!    and calls the phase's method instead of `switchover`.
//!
//! Postcopy now follows steps 1–3 and 5 ([`PassSink::start_postcopy`],
//! [`PrecopyEnd::Postcopy`]; its loop is `postcopy/outgoing.rs: Source::postcopy`
//! over `crate::postcopy`, recovery included). The sketch of
//! step 4 as first planned:
//!
//! ```ignore
//! impl Session<'_> {
//!     pub fn postcopy<S: PassSink>(&mut self, sink: &mut S) -> Result<(), S::Error> {
//!         self.enter(Phase::PostcopyActive).map_err(SessionError::from)?; // active → postcopy-active
//!         self.sync()?;
//!         sink.send_discard(self.pending())?;        // new PassSink method (step 3)
//!         loop {
//!             match sink.serve_fault_or_stream(self.pending()) { // ditto
//!                 Ok(Streamed::AllSent) => return Ok(()),
//!                 Ok(_) => continue,
//!                 Err(e) if e.is_link_loss() => self.enter(Phase::PostcopyPaused)?,
//!                 Err(e) => return Err(e),
//!             }
//!         }
//!     }
//! }
//! ```
//!
//! # Example: a session over an in-memory sink
//!
//! ```
//! use std::sync::Arc;
//! use ferry::session::{AtMaxPasses, Limits, Outcome, PassResult, PassSink, Phase, Session,
//!     SessionConfig, SessionError};
//! use ferry::{BlockSpec, GuestMemory, ImageGuest, PageBitmap, Progress};
//!
//! /// Counts the pages it is handed.
//! struct Counter(u64);
//! impl PassSink for Counter {
//!     type Error = SessionError;
//!     fn send_pass(&mut self, _n: u64, pending: &Arc<Vec<PageBitmap>>, _live: bool)
//!         -> Result<PassResult, SessionError> {
//!         for b in pending.iter() {
//!             self.0 += b.count();
//!             b.clear_all();
//!         }
//!         Ok(PassResult { bytes: 4096, pages: 1, seconds: 1.0 })
//!     }
//! }
//!
//! let specs = [BlockSpec { name: "ram".into(), len: 1 << 20, page_size: 4096 }];
//! let memory = Arc::new(GuestMemory::anonymous(&specs).unwrap());
//! let guest = ImageGuest::from_memory(memory, Vec::new());
//! let progress = Progress::default();
//! let config = SessionConfig {
//!     log: None, // no dirty log: one pass is all
//!     limits: Limits::Progress,
//!     at_max_passes: AtMaxPasses::Fail,
//! };
//! let mut session = Session::new(&guest, &progress, config);
//! session.enter(Phase::Setup).unwrap();
//! let mut sink = Counter(0);
//! session.precopy(&mut sink).unwrap();
//! assert_eq!(sink.0, 256);
//! assert_eq!(session.finish(Outcome::Completed), Phase::Completed);
//! assert_eq!(progress.status(), ferry::Status::Completed);
//! ```

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ferry_ram::{DirtyLog, PageBitmap, RamError};

use crate::state::{Event, Parameters, Status};
use crate::{Guest, Progress};

/// The controller's phases, as QEMU's `MigrationStatus` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Phase {
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
    Colo,
}

impl Phase {
    /// Every phase, in QEMU's order.
    pub const ALL: [Phase; 14] = [
        Phase::None,
        Phase::Setup,
        Phase::Active,
        Phase::PreSwitchover,
        Phase::Device,
        Phase::PostcopyActive,
        Phase::PostcopyPaused,
        Phase::PostcopyRecoverSetup,
        Phase::PostcopyRecover,
        Phase::Completed,
        Phase::Failed,
        Phase::Cancelling,
        Phase::Cancelled,
        Phase::Colo,
    ];

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

    /// A phase no transition leaves.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The status a [`Progress`] reports in this phase (every phase has
    /// one).
    pub fn status(self) -> Option<Status> {
        Some(match self {
            Self::None => Status::None,
            Self::Setup => Status::Setup,
            Self::Active => Status::Active,
            Self::PreSwitchover => Status::PreSwitchover,
            Self::Device => Status::Device,
            Self::Completed => Status::Completed,
            Self::Failed => Status::Failed,
            Self::Cancelling => Status::Cancelling,
            Self::Cancelled => Status::Cancelled,
            Self::PostcopyActive => Status::PostcopyActive,
            Self::PostcopyPaused => Status::PostcopyPaused,
            Self::PostcopyRecoverSetup => Status::PostcopyRecoverSetup,
            Self::PostcopyRecover => Status::PostcopyRecover,
            Self::Colo => Status::Colo,
        })
    }

    /// Whether the controller may move from `self` to `to` (seed 004's
    /// `migrate_set_state` calls). Every phase that runs may fail; every
    /// one before postcopy may be cancelled (through `cancelling`); a
    /// broken postcopy pauses rather than fails until it is given up.
    pub fn can_move_to(self, to: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, to),
            (None, Setup | Failed | Cancelling)
                | (Setup, Active | Failed | Cancelling)
                | (
                    Active,
                    PreSwitchover
                        | Device
                        | PostcopyActive
                        | Colo
                        | Completed
                        | Failed
                        | Cancelling
                )
                | (PreSwitchover, Device | PostcopyActive | Failed | Cancelling)
                | (Device, Completed | Colo | Failed | Cancelling)
                | (PostcopyActive, PostcopyPaused | Completed | Failed)
                | (PostcopyPaused, PostcopyRecoverSetup | Failed)
                | (
                    PostcopyRecoverSetup,
                    PostcopyRecover | PostcopyPaused | Failed
                )
                | (PostcopyRecover, PostcopyActive | PostcopyPaused | Failed)
                | (Colo, Completed | Failed)
                | (Cancelling, Cancelled | Failed)
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase change the state machine does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the controller cannot move from phase '{from}' to '{to}'")]
pub struct PhaseError {
    pub from: Phase,
    pub to: Phase,
}

/// The one place a phase changes: `to` if `from` may move there.
pub fn transition(from: Phase, to: Phase) -> Result<Phase, PhaseError> {
    if from.can_move_to(to) {
        Ok(to)
    } else {
        Err(PhaseError { from, to })
    }
}

/// What the engine itself can fail with; a [`PassSink`]'s error type takes
/// it in (`From`), so the caller sees one error type.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The dirty log failed to start or sync.
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    Phase(#[from] PhaseError),
    /// A cancel was requested through the session's [`Progress`].
    #[error("cancelled")]
    Cancelled,
    /// The max passes went by without what is left fitting the threshold
    /// ([`AtMaxPasses::Fail`]).
    #[error("did not converge after {passes} passes: {} still dirty, the switchover allows {} (downtime limit {limit_ms} ms)", crate::summary::iec(*remaining), crate::summary::iec(*threshold))]
    NotConverged {
        passes: u64,
        remaining: u64,
        threshold: u64,
        limit_ms: u64,
    },
}

/// What one pass moved, and how long it took. `bytes` is what the
/// bandwidth is measured in (the network: wire bytes; a file: guest RAM
/// covered).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassResult {
    pub bytes: u64,
    pub pages: u64,
    pub seconds: f64,
}

/// Whether the data path lets the session switch over now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// At once.
    Ready,
    /// After waiting (for the destination's SWITCHOVER_ACK): a running
    /// guest dirtied pages meanwhile, so the loop runs one more pass.
    Waited,
}

/// Where a session's passes go: the one thing a caller of the engine
/// implements.
pub trait PassSink {
    /// The caller's error; it takes in the engine's own.
    type Error: From<SessionError>;

    /// Runs before each precopy pass (not before the final one).
    fn before_pass(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Moves every page set in `pending` (one bitmap per block, in block
    /// order) as pass `number` (1 is the first, which has every page set),
    /// clearing each bit as its page is taken: a bit still set afterwards
    /// is sent again in the next pass. `live`: the guest runs with a dirty
    /// log (the final pass, with the guest paused, is not live).
    fn send_pass(
        &mut self,
        number: u64,
        pending: &Arc<Vec<PageBitmap>>,
        live: bool,
    ) -> Result<PassResult, Self::Error>;

    /// After each pass (`passes` so far, the estimate after it, and the
    /// previous pass's remaining bytes), before the switchover decision:
    /// switch to postcopy now? By default never.
    fn start_postcopy(&mut self, _passes: u64, _est: &Estimate, _before: Option<u64>) -> bool {
        false
    }

    /// Postcopy at once, before the first pass: then every page is
    /// pending and follows in postcopy. By default, no.
    fn postcopy_at_start(&mut self) -> bool {
        false
    }

    /// The loop decided to switch over: may it? By default, at once.
    fn switchover_ready(&mut self) -> Result<Readiness, Self::Error> {
        Ok(Readiness::Ready)
    }
}

/// What the max passes mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtMaxPasses {
    /// Give up: [`SessionError::NotConverged`] (`ferry send`: the user
    /// would rather keep the guest here than pause it too long).
    Fail,
    /// Switch over whatever is left (a live save: it pauses anyway).
    SwitchOver,
}

/// Where the switchover decision reads its parameters.
#[derive(Clone, Debug)]
pub enum Limits {
    /// The session's [`Progress::parameters`], read after every pass (the
    /// user may change them while the session runs).
    Progress,
    /// These, fixed.
    Fixed(Parameters),
}

/// How a session runs.
#[derive(Clone)]
pub struct SessionConfig<'a> {
    /// The guest's dirty log; without one, one pass is all (the guest does
    /// not change, or, for a background snapshot, its changes do not
    /// matter).
    pub log: Option<&'a dyn DirtyLog>,
    pub limits: Limits,
    pub at_max_passes: AtMaxPasses,
}

/// The estimate after a pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Dirty bytes left after the sync.
    pub remaining: u64,
    /// What the pass moved per second.
    pub bandwidth: f64,
    /// The bandwidth the decision assumes: the user's
    /// avail-switchover-bandwidth if set, else `bandwidth`.
    pub switchover_bandwidth: f64,
    /// Bytes the downtime limit allows: `switchover_bandwidth ×
    /// downtime-limit`.
    pub threshold: f64,
    /// `remaining` at `switchover_bandwidth`.
    pub expected_downtime_ms: f64,
}

/// Estimates what switching over now would cost (seed 004's
/// `migration_update_counters`).
pub fn estimate(pass: &PassResult, remaining: u64, params: &Parameters) -> Estimate {
    let bandwidth = pass.bytes as f64 / pass.seconds.max(1e-6);
    let switchover_bandwidth = if params.avail_switchover_bandwidth > 0 {
        params.avail_switchover_bandwidth as f64
    } else {
        bandwidth
    };
    Estimate {
        remaining,
        bandwidth,
        switchover_bandwidth,
        threshold: switchover_bandwidth * params.downtime_limit.as_secs_f64(),
        expected_downtime_ms: remaining as f64 / switchover_bandwidth.max(1.0) * 1e3,
    }
}

/// What the loop does after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Another pass.
    Continue,
    /// What is left fits the downtime limit (or the guest has no dirty
    /// log): pause and send the rest.
    SwitchOver,
    /// `passes` reached the max passes without converging.
    MaxPasses,
}

/// The switchover decision after `passes` passes: converged if what is
/// left fits the threshold or nothing is tracked (`tracking` false); else
/// the max passes (`params.max_passes`, 0: none) end the loop.
pub fn decide(est: &Estimate, passes: u64, tracking: bool, params: &Parameters) -> Decision {
    if (est.remaining as f64) <= est.threshold || !tracking {
        Decision::SwitchOver
    } else if params.max_passes > 0 && passes >= params.max_passes {
        Decision::MaxPasses
    } else {
        Decision::Continue
    }
}

/// The throttle after a pass that failed to shrink what is left (QEMU's
/// cpu-throttle-initial, then + cpu-throttle-increment, up to the max).
pub fn next_throttle(current: u8, p: &Parameters) -> u8 {
    let next = if current == 0 {
        p.throttle_initial
    } else {
        current.saturating_add(p.throttle_increment)
    };
    next.min(p.throttle_max).min(99)
}

/// Why [`Session::precopy`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecopyEnd {
    SwitchOver,
    /// The sink asked for postcopy ([`PassSink::start_postcopy`]).
    Postcopy,
}

/// How a session ended, for [`Session::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

/// What the passes so far measured, for the caller's report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SessionStats {
    /// Passes sent, the final one included once sent.
    pub passes: u64,
    pub dirty_sync_count: u64,
    pub dirty_sync_ms: f64,
    /// The highest throttle auto-converge applied.
    pub throttle_percent: u8,
    /// The expected downtime when precopy decided to switch over.
    pub expected_downtime_ms: Option<f64>,
}

/// One side's phase and the status its [`Progress`] reports, every move
/// through [`transition`]. A [`Session`] has one; the destination
/// (`incoming.rs`), which runs no pass loop, follows its own: none →
/// setup → active → device → completed, any of them → failed, or →
/// cancelling → cancelled.
pub struct Phases<'a> {
    phase: Phase,
    progress: &'a Progress,
}

impl<'a> Phases<'a> {
    /// In phase `none`; statuses go to `progress`.
    pub fn new(progress: &'a Progress) -> Self {
        Self {
            phase: Phase::None,
            progress,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn progress(&self) -> &'a Progress {
        self.progress
    }

    /// Moves to `to` ([`transition`]) and reports its status; an illegal
    /// move changes nothing.
    pub fn enter(&mut self, to: Phase) -> Result<(), PhaseError> {
        self.phase = transition(self.phase, to)?;
        if let Some(s) = to.status() {
            self.progress.set_status(s);
        }
        Ok(())
    }

    /// Ends in the phase `outcome` names (a cancel through `cancelling`)
    /// and returns it; a final phase stays as it is. A move the state
    /// machine refuses (a bug in the caller) ends it `failed`, logged.
    pub fn finish(&mut self, outcome: Outcome) -> Phase {
        let to = match outcome {
            Outcome::Completed => Phase::Completed,
            Outcome::Failed => Phase::Failed,
            Outcome::Cancelled => Phase::Cancelled,
        };
        if self.phase.is_final() {
            return self.phase;
        }
        if to == Phase::Cancelled && self.phase != Phase::Cancelling {
            let _ = self.enter(Phase::Cancelling);
        }
        if let Err(e) = self.enter(to) {
            tracing::error!("{e}; the session ends failed");
            if let Err(e) = self.enter(Phase::Failed) {
                tracing::error!("{e}");
            }
        }
        self.phase
    }
}

/// Ends COLO on a side whose migration moved to `colo` (the migration
/// completed with `colo` set): `completed` after a poweroff or a failover
/// (seed 000's failover moves colo → completed on both sides), `failed`
/// otherwise. Returns the phase reached; a side not in `colo` is left as
/// it is (`None`).
pub fn end_colo(progress: &Progress, ok: bool) -> Option<Phase> {
    if progress.status() != Status::Colo {
        return None;
    }
    let to = transition(
        Phase::Colo,
        if ok { Phase::Completed } else { Phase::Failed },
    )
    .ok()?;
    if let Some(s) = to.status() {
        progress.set_status(s);
    }
    Some(to)
}

/// One session: the pending bitmaps, the phase, the throttle, and the
/// figures of the passes so far.
pub struct Session<'a> {
    guest: &'a dyn Guest,
    progress: &'a Progress,
    config: SessionConfig<'a>,
    phases: Phases<'a>,
    pending: Arc<Vec<PageBitmap>>,
    /// Per block, in block order.
    page_sizes: Vec<u64>,
    throttle: u8,
    last_sync: Instant,
    stats: SessionStats,
}

impl<'a> Session<'a> {
    /// A session over `guest`'s memory, every page pending, in phase
    /// `none`. Its figures, events and status go to `progress`.
    pub fn new(guest: &'a dyn Guest, progress: &'a Progress, config: SessionConfig<'a>) -> Self {
        let blocks = guest.memory().blocks();
        Self {
            guest,
            progress,
            config,
            phases: Phases::new(progress),
            pending: Arc::new(
                blocks
                    .iter()
                    .map(|b| PageBitmap::new(b.pages(), true))
                    .collect(),
            ),
            page_sizes: blocks.iter().map(|b| u64::from(b.page_size())).collect(),
            throttle: 0,
            last_sync: Instant::now(),
            stats: SessionStats::default(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phases.phase()
    }

    /// Moves to `to` ([`transition`]) and reports its status; an illegal
    /// move changes nothing.
    pub fn enter(&mut self, to: Phase) -> Result<(), PhaseError> {
        self.phases.enter(to)
    }

    /// Ends the session in the phase `outcome` names (a cancel through
    /// `cancelling`) and returns it. A move the state machine refuses (a
    /// bug in the caller) ends it `failed`, logged.
    pub fn finish(&mut self, outcome: Outcome) -> Phase {
        self.phases.finish(outcome)
    }

    /// The pages still to send, one bitmap per block.
    pub fn pending(&self) -> &Arc<Vec<PageBitmap>> {
        &self.pending
    }

    /// Dirty bytes pending.
    pub fn pending_bytes(&self) -> u64 {
        self.pending
            .iter()
            .zip(&self.page_sizes)
            .map(|(b, ps)| b.count() * ps)
            .sum()
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Passes sent so far.
    pub fn passes(&self) -> u64 {
        self.stats.passes
    }

    /// The cancel check around each pass.
    pub fn check_cancel(&self) -> Result<(), SessionError> {
        if self.progress.cancel_requested() {
            return Err(SessionError::Cancelled);
        }
        Ok(())
    }

    fn parameters(&self) -> Parameters {
        match &self.config.limits {
            Limits::Progress => self.progress.parameters(),
            Limits::Fixed(p) => p.clone(),
        }
    }

    /// Moves the dirty log's pages since the last sync into the pending
    /// bitmaps; returns how many the log reported (0 without a log).
    pub fn sync(&mut self) -> Result<u64, SessionError> {
        let Some(log) = self.config.log else {
            return Ok(0);
        };
        let t = Instant::now();
        let dirty = log.sync(&self.pending)?;
        self.stats.dirty_sync_ms += t.elapsed().as_secs_f64() * 1e3;
        self.stats.dirty_sync_count += 1;
        self.progress.update_figures(|f| f.dirty_sync_count += 1);
        Ok(dirty)
    }

    /// One pass through `sink`, between two cancel checks, with the live
    /// figures told that it runs.
    fn pass<S: PassSink>(&mut self, sink: &mut S, live: bool) -> Result<PassResult, S::Error> {
        self.check_cancel()?;
        self.progress.begin_pass(self.pending_bytes());
        let number = self.stats.passes + 1;
        crate::switchover_trace::mark_with(|| format!("source: pass {number} begins"));
        let sent = sink.send_pass(number, &self.pending, live);
        crate::switchover_trace::mark_with(|| format!("source: pass {number} sent"));
        self.progress.end_pass();
        let pass = sent?;
        self.stats.passes = number;
        self.check_cancel()?;
        Ok(pass)
    }

    /// Precopy: enters `active` (unless there already), starts the dirty
    /// log and runs passes while the guest runs until the switchover
    /// decision says so (see the module doc). Errors: the sink's, the
    /// dirty log's, a cancel, or [`SessionError::NotConverged`].
    pub fn precopy<S: PassSink>(&mut self, sink: &mut S) -> Result<PrecopyEnd, S::Error> {
        if self.phase() != Phase::Active {
            self.enter(Phase::Active).map_err(SessionError::from)?;
        }
        let log = self.config.log;
        if let Some(l) = log {
            l.start().map_err(SessionError::from)?;
            crate::switchover_trace::mark("source: dirty log started");
        }
        if sink.postcopy_at_start() {
            return Ok(PrecopyEnd::Postcopy);
        }
        let tracking = log.is_some();
        let page_size = self.progress.page_size.load(Ordering::Relaxed);
        self.last_sync = Instant::now();
        let mut previous_remaining = None;
        loop {
            sink.before_pass()?;
            let pass = self.pass(sink, tracking)?;
            let dirty = self.sync()?;
            let since_sync = self.last_sync.elapsed().as_secs_f64().max(1e-6);
            self.last_sync = Instant::now();
            let params = self.parameters();
            let est = estimate(&pass, self.pending_bytes(), &params);
            // QEMU's trigger: the guest dirtied more than half of what the
            // pass could send, so passes are not shrinking fast enough.
            if params.auto_converge && tracking && dirty * page_size > pass.bytes / 2 {
                self.throttle = next_throttle(self.throttle, &params);
                self.guest.set_throttle(self.throttle);
                self.stats.throttle_percent = self.stats.throttle_percent.max(self.throttle);
            }
            let (passes, throttle) = (self.stats.passes, self.throttle);
            let figures = self.progress.update_figures(|f| {
                f.pass = passes;
                f.remaining_bytes = est.remaining;
                f.bandwidth = est.bandwidth;
                f.pages_per_second = pass.pages as f64 / pass.seconds.max(1e-6);
                f.dirty_pages_rate = dirty as f64 / since_sync;
                f.expected_downtime_ms = est.expected_downtime_ms;
                f.throttle_percent = throttle;
                f.precopy_bytes += pass.bytes;
            });
            self.progress.publish(Event::Pass(figures));
            tracing::info!(
                pass = passes,
                remaining = est.remaining,
                threshold = est.threshold,
                bytes_per_second = est.bandwidth,
                dirty_pages = dirty,
                "pass done"
            );
            if sink.start_postcopy(passes, &est, previous_remaining) {
                self.stats.expected_downtime_ms = Some(est.expected_downtime_ms);
                return Ok(PrecopyEnd::Postcopy);
            }
            previous_remaining = Some(est.remaining);
            match decide(&est, passes, tracking, &params) {
                Decision::Continue => {}
                Decision::SwitchOver => {
                    if sink.switchover_ready()? == Readiness::Waited && tracking {
                        continue;
                    }
                    self.stats.expected_downtime_ms = Some(est.expected_downtime_ms);
                    return Ok(PrecopyEnd::SwitchOver);
                }
                Decision::MaxPasses => match self.config.at_max_passes {
                    AtMaxPasses::Fail => {
                        return Err(SessionError::NotConverged {
                            passes,
                            remaining: est.remaining,
                            threshold: est.threshold as u64,
                            limit_ms: params.downtime_limit.as_millis() as u64,
                        }
                        .into())
                    }
                    AtMaxPasses::SwitchOver => {
                        sink.switchover_ready()?;
                        self.stats.expected_downtime_ms = Some(est.expected_downtime_ms);
                        return Ok(PrecopyEnd::SwitchOver);
                    }
                },
            }
        }
    }

    /// The final pass, with the guest paused: syncs the log and sends what
    /// is pending (nothing to send without a log and with nothing pending:
    /// the guest changed nothing since its one pass). Sets the figures'
    /// downtime bytes; nothing is left after it.
    pub fn final_pass<S: PassSink>(&mut self, sink: &mut S) -> Result<PassResult, S::Error> {
        self.sync()?;
        crate::switchover_trace::mark("source: final dirty sync done");
        let last = if self.config.log.is_some() || self.pending.iter().any(|b| b.count() > 0) {
            self.pass(sink, false)?
        } else {
            PassResult::default()
        };
        self.progress.update_figures(|f| {
            f.downtime_bytes = last.bytes;
            f.remaining_bytes = 0;
        });
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::time::Duration;

    use ferry_ram::{BitmapLog, BlockSpec, GuestMemory};

    use super::*;
    use crate::{GuestError, ImageGuest, Resources};

    /// An image guest that records the throttles it is given.
    struct Throttled {
        inner: ImageGuest,
        throttles: Mutex<Vec<u8>>,
    }

    impl Guest for Throttled {
        fn memory(&self) -> &Arc<GuestMemory> {
            self.inner.memory()
        }
        fn dirty_log(&self) -> Option<&dyn DirtyLog> {
            None
        }
        fn pause(&self) -> Result<(), GuestError> {
            self.inner.pause()
        }
        fn resume(&self) -> Result<(), GuestError> {
            self.inner.resume()
        }
        fn is_running(&self) -> bool {
            self.inner.is_running()
        }
        fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
            self.inner.save_device_state()
        }
        fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
            self.inner.load_device_state(state)
        }
        fn set_throttle(&self, percent: u8) {
            self.throttles.lock().unwrap().push(percent);
        }
        fn resources(&self) -> &Resources {
            self.inner.resources()
        }
    }

    const PAGE: u64 = 4096;

    /// Two blocks: 100 and 70 pages.
    fn guest() -> Throttled {
        let specs = [
            BlockSpec {
                name: "ram".into(),
                len: 100 * PAGE,
                page_size: PAGE as u32,
            },
            BlockSpec {
                name: "vram".into(),
                len: 70 * PAGE,
                page_size: PAGE as u32,
            },
        ];
        let memory = Arc::new(GuestMemory::anonymous(&specs).unwrap());
        Throttled {
            inner: ImageGuest::from_memory(memory, Vec::new()),
            throttles: Mutex::new(Vec::new()),
        }
    }

    /// An in-memory sink: records the (block, page)s of each pass, clears
    /// them, and plays the guest: while pass n runs it writes the pages
    /// `dirty(n)` names, through the dirty log.
    struct Recorder<'a> {
        log: Option<&'a BitmapLog>,
        dirty: fn(u64) -> Vec<(usize, u64)>,
        passes: Vec<BTreeSet<(usize, u64)>>,
        live: Vec<bool>,
        /// Bytes each pass reports having moved (in one second).
        bytes: u64,
        readiness: Vec<Readiness>,
    }

    impl<'a> Recorder<'a> {
        fn new(log: Option<&'a BitmapLog>, dirty: fn(u64) -> Vec<(usize, u64)>) -> Self {
            Self {
                log,
                dirty,
                passes: Vec::new(),
                live: Vec::new(),
                bytes: 1 << 20,
                readiness: Vec::new(),
            }
        }
    }

    impl PassSink for Recorder<'_> {
        type Error = SessionError;
        fn send_pass(
            &mut self,
            number: u64,
            pending: &Arc<Vec<PageBitmap>>,
            live: bool,
        ) -> Result<PassResult, SessionError> {
            assert_eq!(number, self.passes.len() as u64 + 1, "passes in order");
            let mut got = BTreeSet::new();
            for (i, b) in pending.iter().enumerate() {
                for p in b.iter_set().collect::<Vec<_>>() {
                    b.clear(p);
                    got.insert((i, p));
                }
            }
            if live {
                if let Some(log) = self.log {
                    for (block, page) in (self.dirty)(number) {
                        log.mark(block, page);
                    }
                }
            }
            self.passes.push(got);
            self.live.push(live);
            Ok(PassResult {
                bytes: self.bytes,
                pages: self.bytes / PAGE,
                seconds: 1.0,
            })
        }
        fn switchover_ready(&mut self) -> Result<Readiness, SessionError> {
            Ok(if self.readiness.is_empty() {
                Readiness::Ready
            } else {
                self.readiness.remove(0)
            })
        }
    }

    fn params(f: impl FnOnce(&mut Parameters)) -> Parameters {
        let mut p = Parameters::default();
        f(&mut p);
        p
    }

    fn est(remaining: u64, bytes: u64, p: &Parameters) -> Estimate {
        estimate(
            &PassResult {
                bytes,
                pages: 0,
                seconds: 1.0,
            },
            remaining,
            p,
        )
    }

    #[test]
    fn switchover_decision() {
        let p = params(|p| {
            p.downtime_limit = Duration::from_millis(100);
            p.max_passes = 5;
        });
        // 10 MB/s for 100 ms: 1 MB fits, 1 MB + 1 byte does not.
        let fits = est(1_000_000, 10_000_000, &p);
        assert_eq!(fits.threshold, 1_000_000.0);
        assert_eq!(fits.expected_downtime_ms, 100.0);
        assert_eq!(decide(&fits, 1, true, &p), Decision::SwitchOver);
        let over = est(1_000_001, 10_000_000, &p);
        assert_eq!(decide(&over, 1, true, &p), Decision::Continue);
        assert_eq!(decide(&over, 4, true, &p), Decision::Continue);
        assert_eq!(decide(&over, 5, true, &p), Decision::MaxPasses);
        // No dirty log: one pass is all, whatever is left.
        assert_eq!(decide(&over, 1, false, &p), Decision::SwitchOver);
        // max_passes 0: never gives up.
        let forever = params(|p| p.downtime_limit = Duration::from_millis(100));
        assert_eq!(decide(&over, 1000, true, &forever), Decision::Continue);
        // The user's avail-switchover-bandwidth replaces the measured one.
        let avail = params(|p| {
            p.downtime_limit = Duration::from_millis(100);
            p.avail_switchover_bandwidth = 20_000_000;
        });
        let e = est(1_500_000, 10_000_000, &avail);
        assert_eq!(e.bandwidth, 10_000_000.0);
        assert_eq!(e.switchover_bandwidth, 20_000_000.0);
        assert_eq!(decide(&e, 1, true, &avail), Decision::SwitchOver);
    }

    #[test]
    fn throttle_steps() {
        let p = Parameters::default();
        let steps: Vec<u8> = std::iter::successors(Some(0u8), |&t| Some(next_throttle(t, &p)))
            .skip(1)
            .take(10)
            .collect();
        assert_eq!(steps, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]);
        let capped = params(|p| p.throttle_max = 45);
        assert_eq!(next_throttle(40, &capped), 45);
    }

    #[test]
    fn illegal_phase_transitions_are_refused() {
        use Phase::*;
        for (from, to) in [
            (None, Active),
            (Setup, Device),
            (Setup, Completed),
            (Active, Setup),
            (Device, Active),
            (PreSwitchover, Completed),
            (Cancelling, Active),
            (PostcopyActive, Active),
            (PostcopyPaused, PostcopyActive),
            (Colo, Active),
        ] {
            assert_eq!(transition(from, to), Err(PhaseError { from, to }));
        }
        for end in [Completed, Failed, Cancelled] {
            assert!(end.is_final());
            for to in Phase::ALL {
                assert!(transition(end, to).is_err(), "{end} → {to}");
            }
        }
        // Every phase that runs may fail.
        for from in Phase::ALL.into_iter().filter(|p| !p.is_final()) {
            assert_eq!(transition(from, Failed), Ok(Failed), "{from}");
        }
        // A session refuses the move and stays where it was.
        let g = guest();
        let progress = Progress::default();
        let config = SessionConfig {
            log: Option::None,
            limits: Limits::Progress,
            at_max_passes: AtMaxPasses::Fail,
        };
        let mut s = Session::new(&g, &progress, config);
        assert_eq!(
            s.enter(Device),
            Err(PhaseError {
                from: None,
                to: Device
            })
        );
        assert_eq!(s.phase(), None);
        s.enter(Setup).unwrap();
        s.enter(Active).unwrap();
        assert_eq!(progress.status(), Status::Active);
        assert!(s.enter(Setup).is_err());
        assert_eq!(s.phase(), Active);
        s.enter(Device).unwrap();
        assert_eq!(s.finish(Outcome::Completed), Completed);
        assert!(s.enter(Active).is_err());
        assert_eq!(progress.status(), Status::Completed);
        // A cancel goes through cancelling.
        let progress = Progress::default();
        let mut s = Session::new(&g, &progress, s.config.clone());
        s.enter(Setup).unwrap();
        assert_eq!(s.finish(Outcome::Cancelled), Cancelled);
        assert_eq!(progress.status(), Status::Cancelled);
        // The device phase refuses a cancel (a destination may be taking
        // over), unless the progress is a save's.
        for save in [false, true] {
            let progress = Progress::default();
            if save {
                progress.cancel_in_device();
            }
            let mut s = Session::new(&g, &progress, s.config.clone());
            s.enter(Setup).unwrap();
            s.enter(Active).unwrap();
            s.enter(Device).unwrap();
            assert_eq!(progress.cancel(), save);
        }
        // Postcopy's phases report their status; those not implemented
        // (recovery, COLO) report none of their own.
        assert_eq!(PostcopyActive.status(), Some(Status::PostcopyActive));
        assert_eq!(PostcopyPaused.status(), Some(Status::PostcopyPaused));
        assert_eq!(PostcopyRecover.status(), Some(Status::PostcopyRecover));
        assert_eq!(Colo.as_str(), "colo");
    }

    /// Pages the guest writes while pass `n` runs: some new each pass,
    /// some written again in every pass, in both blocks.
    fn writes(n: u64) -> Vec<(usize, u64)> {
        vec![
            (0, n),
            (0, 50 + n),
            (1, 69 - n),
            (0, 99),
            (1, 0),
            (1, (3 * n) % 70),
        ]
    }

    #[test]
    fn every_dirty_page_goes_in_the_pass_after_it_was_dirtied() {
        let g = guest();
        let log = BitmapLog::new(g.memory());
        let progress = Progress::default();
        let events = progress.subscribe();
        let config = SessionConfig {
            log: Some(&log),
            // Nothing fits a zero downtime: the max passes end precopy.
            limits: Limits::Fixed(params(|p| {
                p.downtime_limit = Duration::ZERO;
                p.max_passes = 4;
            })),
            at_max_passes: AtMaxPasses::SwitchOver,
        };
        let mut s = Session::new(&g, &progress, config);
        s.enter(Phase::Setup).unwrap();
        let mut sink = Recorder::new(Some(&log), writes);
        assert_eq!(s.precopy(&mut sink).unwrap(), PrecopyEnd::SwitchOver);
        assert_eq!(s.passes(), 4);
        s.enter(Phase::Device).unwrap();
        let last = s.final_pass(&mut sink).unwrap();
        assert_eq!(last.bytes, sink.bytes);
        assert_eq!(s.passes(), 5);
        assert_eq!(s.finish(Outcome::Completed), Phase::Completed);

        let all: BTreeSet<_> = (0..100)
            .map(|p| (0, p))
            .chain((0..70).map(|p| (1, p)))
            .collect();
        assert_eq!(sink.passes[0], all, "pass 1 has every page");
        for n in 1..5u64 {
            let want: BTreeSet<_> = writes(n).into_iter().collect();
            assert_eq!(sink.passes[n as usize], want, "pass {}", n + 1);
        }
        assert_eq!(sink.live, [true, true, true, true, false]);
        assert_eq!(s.pending_bytes(), 0);
        assert_eq!(s.stats().dirty_sync_count, 5);
        assert_eq!(s.stats().throttle_percent, 0);
        assert!(g.throttles.lock().unwrap().is_empty(), "auto-converge off");

        let f = progress.figures();
        assert_eq!(f.pass, 4);
        assert_eq!(f.dirty_sync_count, 5);
        assert_eq!(f.precopy_bytes, 4 * sink.bytes);
        assert_eq!(f.downtime_bytes, sink.bytes);
        assert_eq!(f.remaining_bytes, 0);
        let passes: Vec<u64> = events
            .try_iter()
            .filter_map(|e| match e {
                Event::Pass(p) => Some(p.pass),
                _ => Option::None,
            })
            .collect();
        assert_eq!(passes, [1, 2, 3, 4]);
    }

    /// The guest writes half of memory during every pass, which moves
    /// 10 pages' worth: passes never converge, auto-converge throttles
    /// after each, and `ferry send`'s policy gives up at the max passes.
    #[test]
    fn a_session_that_does_not_converge_throttles_then_gives_up() {
        fn half(_: u64) -> Vec<(usize, u64)> {
            (0..50).map(|p| (0, p * 2)).collect()
        }
        let g = guest();
        let log = BitmapLog::new(g.memory());
        let progress = Progress::with_parameters(params(|p| {
            p.auto_converge = true;
            p.max_passes = 3;
            p.downtime_limit = Duration::from_millis(500);
        }));
        progress.page_size.store(PAGE, Ordering::Relaxed);
        let config = SessionConfig {
            log: Some(&log),
            limits: Limits::Progress,
            at_max_passes: AtMaxPasses::Fail,
        };
        let mut s = Session::new(&g, &progress, config);
        s.enter(Phase::Setup).unwrap();
        let mut sink = Recorder::new(Some(&log), half);
        sink.bytes = 10 * PAGE;
        match s.precopy(&mut sink) {
            Err(SessionError::NotConverged {
                passes,
                remaining,
                threshold,
                limit_ms,
            }) => {
                assert_eq!(passes, 3);
                assert_eq!(remaining, 50 * PAGE);
                // 10 pages a second for 500 ms.
                assert_eq!(threshold, 5 * PAGE);
                assert_eq!(limit_ms, 500);
            }
            other => panic!("expected NotConverged, got {other:?}"),
        }
        assert_eq!(*g.throttles.lock().unwrap(), [20, 30, 40]);
        assert_eq!(s.stats().throttle_percent, 40);
        assert_eq!(progress.figures().throttle_percent, 40);
        assert_eq!(s.stats().expected_downtime_ms, Option::None);
        assert_eq!(s.finish(Outcome::Failed), Phase::Failed);
        assert_eq!(progress.status(), Status::Failed);
    }

    /// A session converges once what is left fits; a sink that had to wait
    /// before switching over gets one more pass first.
    #[test]
    fn a_session_converges_and_waits_for_the_sink() {
        fn few(_: u64) -> Vec<(usize, u64)> {
            vec![(0, 1), (1, 2)]
        }
        let g = guest();
        let log = BitmapLog::new(g.memory());
        let progress = Progress::default();
        let config = SessionConfig {
            log: Some(&log),
            // 1 MiB a second for 300 ms: two pages fit.
            limits: Limits::Fixed(Parameters::default()),
            at_max_passes: AtMaxPasses::Fail,
        };
        let mut s = Session::new(&g, &progress, config);
        s.enter(Phase::Setup).unwrap();
        let mut sink = Recorder::new(Some(&log), few);
        sink.readiness = vec![Readiness::Waited];
        assert_eq!(s.precopy(&mut sink).unwrap(), PrecopyEnd::SwitchOver);
        assert_eq!(s.passes(), 2, "converged after pass 1, waited, one more");
        let expected = 2.0 * PAGE as f64 / (1 << 20) as f64 * 1e3;
        assert_eq!(s.stats().expected_downtime_ms, Some(expected));
        assert_eq!(s.pending_bytes(), 2 * PAGE);

        // Without a dirty log one pass is all, and the final pass has
        // nothing to send.
        let progress = Progress::default();
        let config = SessionConfig {
            log: Option::None,
            limits: Limits::Progress,
            at_max_passes: AtMaxPasses::Fail,
        };
        let mut s = Session::new(&g, &progress, config);
        s.enter(Phase::Setup).unwrap();
        let mut sink = Recorder::new(Option::None, few);
        s.precopy(&mut sink).unwrap();
        assert_eq!(s.final_pass(&mut sink).unwrap(), PassResult::default());
        assert_eq!(sink.passes.len(), 1);
        assert_eq!(s.phase(), Phase::Active);
    }

    #[test]
    fn a_cancel_stops_the_loop_before_the_next_pass() {
        let g = guest();
        let progress = Progress::default();
        let config = SessionConfig {
            log: Option::None,
            limits: Limits::Progress,
            at_max_passes: AtMaxPasses::Fail,
        };
        let mut s = Session::new(&g, &progress, config);
        s.enter(Phase::Setup).unwrap();
        assert!(progress.cancel());
        let mut sink = Recorder::new(Option::None, writes);
        assert!(matches!(s.precopy(&mut sink), Err(SessionError::Cancelled)));
        assert!(sink.passes.is_empty());
        assert_eq!(s.finish(Outcome::Cancelled), Phase::Cancelled);
        assert_eq!(progress.status(), Status::Cancelled);
    }
}
