//! The destination side of a migration.
//!
//! 1. accept one session's channels, in any order (transport sorts them);
//! 2. read SETUP, build memory shaped like the source's (or check that the
//!    memory we were given matches it), start the receiver pool, answer
//!    SETUP_ACK;
//! 3. follow the main channel: PASS_END waits for that pass to land on every
//!    channel (after the first, SWITCHOVER_ACK tells the source it may switch
//!    over), DEVICE_STATE is kept, COMPLETE ends the stream, CANCEL discards;
//! 4. check that every page arrived and no page is left with a bad checksum;
//!    when the switchover is verified (either side asked: see
//!    [`IncomingOptions::verify_switchover`]), take the digest of memory and
//!    device state and compare it with the source's (VERIFY); keep what must
//!    be kept (`--ram-out` files renamed into place, the caller's `keep`),
//!    build the guest, activate its resources and resume it, then answer
//!    RESUMED (with our digest, when verified) and SHUT (success) on the
//!    return path.
//!
//! On any failure the destination answers SHUT with the error text, so the
//! source can report it, and returns the error: it never starts a guest from
//! an incomplete or unverified migration, and leaves no `--ram-out` file.
//!
//! Every wait has a deadline: the main channel's reads end after the peer
//! timeout without a frame (the source sends heartbeats), and a wait for a
//! pass's sync or the channels' END fails when a channel that owes data
//! receives nothing for as long.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::session::{Outcome, Phase, Phases};
use crate::{Guest, GuestBuilder};

use ferry_multifd::{ReceiverOptions, ReceiverPool};
use ferry_ram::{Digest, GuestMemory, PageBitmap, RamBlock};
use ferry_transport::{accept_session, AcceptOptions, Listener};

use crate::protocol::{
    heartbeat_interval, MainChannel, Message, Setup, CAP_CHECKSUM, CAP_POSTCOPY, CAP_VERIFY,
    CAP_ZSTD, DEFAULT_PEER_TIMEOUT,
};
use crate::{Failed, MigrationError, Progress, Role, Summary};

/// The destination's postcopy phase, kept beside the postcopy module; a
/// child of this module, it sees `Received` and `Event`.
#[path = "postcopy/incoming.rs"]
mod postcopy_phase;
use postcopy_phase::postcopy_in;

/// Where the destination's guest memory comes from.
#[derive(Clone)]
pub enum DestinationMemory {
    /// Fresh anonymous memory shaped like the source's.
    Anonymous,
    /// Fresh memory backed by a new file at this path (one block), or
    /// `PATH.NAME` per block.
    Files(PathBuf),
    /// Memory the caller (a VMM) already has; the source's blocks must match
    /// it by name, length and page size.
    Provided(Arc<GuestMemory>),
}

#[derive(Clone)]
pub struct IncomingOptions {
    pub memory: DestinationMemory,
    pub accept: AcceptOptions,
    /// Builds the guest that resumes here (default: synthetic or image,
    /// from the device state).
    pub build_guest: GuestBuilder,
    /// Whether to verify the switchover: take the digest of all memory and
    /// the device state before resuming (it counts in the downtime: about
    /// 80 ms per GiB on this project's VMs) and compare it with the
    /// source's. `None` (the default): only when the source asks (SETUP's
    /// capability bit, `send --verify-switchover`). `Some(true)`: always
    /// (SETUP_ACK asks the source for its digest). `Some(false)`: never,
    /// and a source that asks is refused at setup.
    pub verify_switchover: Option<bool>,
    /// Compression this destination insists on: `Some(true)` refuses a
    /// source that does not compress, `Some(false)` one that does; `None`
    /// takes what the source announces.
    pub compression: Option<bool>,
    /// The longest silence tolerated from the source (it sends heartbeats
    /// well within it), and the longest a channel that owes data may
    /// receive nothing.
    pub peer_timeout: Duration,
    /// What SETUP may ask for, checked before any memory or file exists.
    pub limits: SetupLimits,
    /// Called with the device state once memory and device state are
    /// verified, before the guest runs and before the source is told the
    /// migration completed: what fails here fails the migration (and the
    /// source keeps its guest). For `recv --device-state-out`.
    pub keep: Option<KeepHook>,
    /// Postcopy recovery after a link failure: wait for `recover URI`
    /// (manual) or listen again on this listener by itself (auto).
    pub postcopy_recover: crate::postcopy::RecoverMode,
    /// How long to stay in postcopy-paused before giving up (the guest's
    /// threads stay blocked, the migration fails); `None`: for ever.
    pub postcopy_paused_timeout: Option<Duration>,
    /// Postcopy: keep a copy of the guest's memory as it was at the switch
    /// (the pages held at the switch, copied before the guest runs, which
    /// adds to the downtime, and each page as it is placed), for the
    /// replay check ([`IncomingOutcome::postcopy_reference`]). Doubles the
    /// memory used; single-block guests only (the synthetic guest).
    pub postcopy_reference: bool,
    /// This destination is a COLO secondary (`recv --colo`): it takes only
    /// a source that announces COLO (SETUP's [`crate::protocol::CAP_COLO`]),
    /// and a source that announces it is refused without this.
    pub colo: bool,
    /// Called once with the destination's memory as soon as it exists
    /// (after SETUP, before any page lands): a VMM may start building its
    /// VM over it there (in a thread of its own; the call must return at
    /// once), so that less is left to do at the switchover, in
    /// `build_guest`. For `recv --prebuild-kvm`.
    pub prepare_guest: Option<PrepareHook>,
    /// Populate fresh anonymous memory just ahead of the pages arriving
    /// (`ferry_ram::Prefaulter`), so receivers copy into memory that is
    /// already there (`recv --prefault`). Never with postcopy, whose
    /// missing pages must stay missing. Off by default: it won no time in a
    /// quiet A/B on this project's machines.
    pub prefault: bool,
}

/// Sees the destination's memory as soon as it exists (see
/// [`IncomingOptions::prepare_guest`]).
pub type PrepareHook = Arc<dyn Fn(&Arc<GuestMemory>) + Send + Sync>;

/// Keeps what a completed migration must leave behind; the error's text is
/// reported to both sides.
pub type KeepHook = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// Limits on what an unauthenticated source can make the destination
/// allocate: checked when SETUP arrives, before any memory or file exists.
#[derive(Clone, Copy, Debug)]
pub struct SetupLimits {
    /// All blocks together (default: this host's physical memory).
    pub max_guest_bytes: u64,
    /// At most this many blocks.
    pub max_blocks: usize,
}

impl Default for SetupLimits {
    fn default() -> Self {
        Self {
            max_guest_bytes: physical_memory(),
            max_blocks: 256,
        }
    }
}

/// This host's physical memory in bytes (1 TiB if it cannot be read).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as u64).saturating_mul(size as u64)
    } else {
        1 << 40
    }
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            memory: DestinationMemory::Anonymous,
            accept: AcceptOptions::default(),
            build_guest: crate::default_guest_builder(),
            verify_switchover: None,
            compression: None,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            limits: SetupLimits::default(),
            keep: None,
            postcopy_recover: crate::postcopy::RecoverMode::Manual,
            postcopy_paused_timeout: None,
            postcopy_reference: false,
            colo: false,
            prepare_guest: None,
            prefault: false,
        }
    }
}

/// A completed incoming migration: the guest's memory and device state,
/// and the guest itself, running.
pub struct IncomingOutcome {
    pub summary: Summary,
    pub memory: Arc<GuestMemory>,
    pub device_state: Vec<u8>,
    pub guest: Box<dyn Guest>,
    /// After a postcopy with [`IncomingOptions::postcopy_reference`]: the
    /// guest's memory at the switch (its one block), for
    /// [`crate::replay_check`] with `device_state` (the switch's).
    pub postcopy_reference: Option<Vec<u8>>,
}

/// Accepts one migration on `listener` and receives it.
pub fn migrate_in(
    listener: &Listener,
    opts: &IncomingOptions,
    progress: &Progress,
) -> Result<IncomingOutcome, Failed> {
    let mut summary = Summary::new(Role::Destination, listener.uri().to_string());
    let mut started = Instant::now();
    let mut state = Received::default();
    let mut phases = Phases::new(progress);
    let mut result = progress.while_ticking(|| {
        run(
            listener,
            opts,
            &mut phases,
            &mut summary,
            &mut started,
            &mut state,
        )
    });
    let outcome = match (&result, state.memory, state.guest) {
        (Ok(()), Some(memory), Some(guest)) => Some((memory, guest)),
        (Ok(()), _, _) => {
            result = Err(MigrationError::Protocol(
                "the migration ended without memory or guest".into(),
            ));
            None
        }
        _ => None,
    };
    let cancelled = matches!(result, Err(MigrationError::Cancelled(_)));
    summary.finish(
        started,
        result.as_ref().err().map(ToString::to_string),
        cancelled,
    );
    if let Err(e) = &result {
        progress.set_error(&e.to_string());
        tracing::warn!("incoming migration did not complete: {e}");
    }
    if !(result.is_ok() && opts.colo && phases.enter(Phase::Colo).is_ok()) {
        // (With COLO next, `crate::colo::run_secondary` runs and
        // `session::end_colo` ends it.)
        phases.finish(outcome_of(&result));
    }
    match (result, outcome) {
        (Ok(()), Some((memory, guest))) => Ok(IncomingOutcome {
            summary,
            memory,
            device_state: state.device_state,
            guest,
            postcopy_reference: state.reference,
        }),
        (Err(error), _) => Err(Failed {
            error,
            summary: Box::new(summary),
        }),
        (Ok(()), None) => Err(Failed {
            error: MigrationError::Protocol("the migration ended without a guest".into()),
            summary: Box::new(summary),
        }),
    }
}

#[derive(Default)]
struct Received {
    memory: Option<Arc<GuestMemory>>,
    device_state: Vec<u8>,
    guest: Option<Box<dyn Guest>>,
    /// The postcopy package, when the source switched to postcopy.
    package: Option<Vec<u8>>,
    /// The main channel of a postcopy link recovered after a failure:
    /// SHUT goes there.
    recovered_main: Option<Arc<MainChannel>>,
    /// The memory at a postcopy's switch, when asked for.
    reference: Option<Vec<u8>>,
    /// SETUP announced postcopy.
    postcopy: bool,
    /// SETUP announced that the source answers whole-region page
    /// requests ([`crate::protocol::CAP_POSTCOPY_REGIONS`]).
    postcopy_regions: bool,
    /// The pages EARLY_DISCARD dropped (one bitmap per block).
    early_dropped: Option<Vec<ferry_ram::PageBitmap>>,
}

enum Event {
    Main(Result<(Message, u64), MigrationError>),
    MultifdFailed,
    Cancelled,
}

/// How a destination's migration ended, as its phase.
fn outcome_of(result: &Result<(), MigrationError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Completed,
        Err(MigrationError::Cancelled(_)) => Outcome::Cancelled,
        Err(_) => Outcome::Failed,
    }
}

fn run(
    listener: &Listener,
    opts: &IncomingOptions,
    phases: &mut Phases,
    summary: &mut Summary,
    started: &mut Instant,
    out: &mut Received,
) -> Result<(), MigrationError> {
    let progress = phases.progress();
    progress.set_phase("waiting for the source");
    let session = accept_session(listener, &opts.accept)?;
    *started = Instant::now();
    phases.enter(Phase::Setup)?;
    summary.session = session.session.to_string();
    summary.channels = session.multifd.len() as u16;
    tracing::info!(
        session = %session.session,
        "accepted a session: main and {} multifd channel(s)",
        session.multifd.len()
    );
    summary.wire_bytes +=
        (ferry_transport::HELLO_LEN as u64 + 8) * (session.multifd.len() as u64 + 1);
    summary.tls = listener.is_tls();
    let mut main = MainChannel::new(Arc::from(session.main), opts.peer_timeout)?;
    main.start_heartbeat(heartbeat_interval(opts.peer_timeout))?;
    let preempt = Some((listener, session.session));
    let result = receive(
        main.clone(),
        session.multifd,
        preempt,
        opts,
        phases,
        summary,
        out,
    );
    let shut = Message::Shut {
        error: result.as_ref().err().map(ToString::to_string),
    };
    if let Some(now) = out.recovered_main.take() {
        main.stop_heartbeat();
        main.channel().shutdown();
        main = now;
    }
    let sent = main.send(&shut);
    main.stop_heartbeat();
    match sent {
        Ok(n) => summary.wire_bytes += n,
        // The guest runs here already: a lost SHUT changes nothing.
        Err(e) if result.is_ok() => tracing::warn!("sending SHUT to the source: {e}"),
        Err(_) => {}
    }
    // End cleanly (TLS: close_notify); the source may be gone already.
    let _ = main.channel().finish();
    main.channel().shutdown();
    result
}

fn receive(
    main: Arc<MainChannel>,
    multifd: Vec<Box<dyn ferry_transport::Channel>>,
    preempt_from: Option<(&Listener, ferry_transport::SessionId)>,
    opts: &IncomingOptions,
    phases: &mut Phases,
    summary: &mut Summary,
    out: &mut Received,
) -> Result<(), MigrationError> {
    let progress = phases.progress();
    progress.set_phase("setup");
    let setup = match main.recv("source")? {
        (Message::Setup(s), n) => {
            summary.wire_bytes += n;
            s
        }
        (other, _) => {
            return Err(MigrationError::Protocol(format!(
                "expected SETUP, got {}",
                other.name()
            )))
        }
    };
    if usize::from(setup.multifd_channels) != multifd.len() {
        return Err(MigrationError::Setup(format!(
            "SETUP announces {} multifd channels, the session has {}",
            setup.multifd_channels,
            multifd.len()
        )));
    }
    let unknown = setup.capabilities
        & !(CAP_CHECKSUM
            | CAP_ZSTD
            | CAP_VERIFY
            | CAP_POSTCOPY
            | crate::protocol::CAP_COLO
            | crate::protocol::CAP_POSTCOPY_REGIONS);
    if unknown != 0 {
        return Err(MigrationError::Setup(format!(
            "SETUP asks for capabilities this receiver does not have (bits {unknown:#04x}): \
             a newer ferry at the source?"
        )));
    }
    let verify = match (opts.verify_switchover, setup.capabilities & CAP_VERIFY != 0) {
        (Some(false), true) => {
            return Err(MigrationError::Setup(
                "the source asks to verify the switchover (--verify-switchover), and this \
                 receiver was started with --no-digest"
                    .into(),
            ))
        }
        (Some(ours), _) => ours,
        (None, asked) => asked,
    };
    let colo = setup.capabilities & crate::protocol::CAP_COLO != 0;
    if colo != opts.colo {
        return Err(MigrationError::Setup(if colo {
            "the source announces COLO (send --colo): start this receiver with --colo".into()
        } else {
            "this receiver is a COLO secondary (recv --colo) and the source does not announce              COLO: start the source with --colo"
                .into()
        }));
    }
    summary.checksum = setup.capabilities & CAP_CHECKSUM != 0;
    let compressed = setup.capabilities & CAP_ZSTD != 0;
    match opts.compression {
        Some(true) if !compressed => {
            return Err(MigrationError::Setup(
                "this receiver requires zstd compression (--compress zstd), the source sends uncompressed"
                    .into(),
            ))
        }
        Some(false) if compressed => {
            return Err(MigrationError::Setup(
                "the source compresses with zstd, but this receiver was started with --compress none"
                    .into(),
            ))
        }
        _ => {}
    }
    summary.compression = compressed.then(|| "zstd".to_string());
    check_limits(&setup, &opts.limits)?;
    tracing::info!(
        blocks = setup.blocks.len(),
        bytes = setup.blocks.iter().map(|b| b.len).sum::<u64>(),
        checksums = summary.checksum,
        compressed,
        "setup"
    );
    let (memory, staged) = build_memory(&setup, &opts.memory, &summary.session)?;
    let postcopy = setup.capabilities & CAP_POSTCOPY != 0;
    if postcopy && verify {
        return Err(MigrationError::Setup(
            crate::outgoing::POSTCOPY_CANNOT_VERIFY.into(),
        ));
    }
    if postcopy {
        crate::postcopy::check_registrable(&memory)
            .map_err(|e| MigrationError::Setup(format!("the source asks for postcopy, but {e}")))?;
    }
    progress
        .total_ram_bytes
        .store(memory.total_bytes(), std::sync::atomic::Ordering::Relaxed);
    summary.guest_bytes = memory.total_bytes();
    out.memory = Some(memory.clone());
    out.postcopy = postcopy;
    out.postcopy_regions = setup.capabilities & crate::protocol::CAP_POSTCOPY_REGIONS != 0;
    if let Some(prepare) = &opts.prepare_guest {
        prepare(&memory);
    }

    let (events, inbox) = mpsc::channel();
    let ropts = ReceiverOptions {
        fresh_memory: !matches!(opts.memory, DestinationMemory::Provided(_)),
        compressed,
        checksums: setup.capabilities & CAP_CHECKSUM != 0,
    };
    let on_cancel = Mutex::new(events.clone());
    progress.on_cancel(move || {
        let _ = on_cancel.lock().unwrap().send(Event::Cancelled);
    });
    let on_fail = events.clone();
    let pool = ReceiverPool::start(multifd, memory.clone(), ropts, move || {
        let _ = on_fail.send(Event::MultifdFailed);
    })?;
    progress.attach(pool.counters().clone());
    let prefault =
        (opts.prefault && !postcopy && matches!(opts.memory, DestinationMemory::Anonymous))
            .then(|| {
                ferry_ram::Prefaulter::start(
                    memory.clone(),
                    pool.counters().clone(),
                    ferry_ram::DEFAULT_PREFAULT_WINDOW,
                )
                .map_err(|e| MigrationError::Thread("prefault", e))
            })
            .transpose()?;
    // A cancel, or a main channel that fails, must also free a wait for a
    // pass's sync (follow_main is blocked there, not reading its inbox).
    let stop = Arc::new(pool.interrupter());
    let on_cancel_stop = stop.clone();
    progress.on_cancel(move || on_cancel_stop("cancelled on the destination"));
    spawn_main_reader(main.clone(), events, move || {
        stop("the main channel failed")
    })?;
    summary.wire_bytes += main.send(&Message::SetupAck { verify })?;
    let recovery = preempt_from.map(|(l, id)| (l, id, setup.multifd_channels + 1));
    let preempt = match preempt_from {
        Some((listener, session)) if postcopy => ferry_transport::accept_preempt(
            listener,
            session,
            setup.multifd_channels + 1,
            &opts.accept,
        )?,
        _ => Vec::new(),
    };

    phases.enter(Phase::Active)?;
    progress.set_phase("receiving");
    let counters = pool.counters().clone();
    let stall = Some(opts.peer_timeout);
    let followed = follow_main(&pool, &main, &inbox, phases, summary, out, stall);
    if let Some(p) = prefault {
        let report = p.stop();
        summary.prefaulted_bytes = report.bytes;
        if let Some(e) = report.error {
            tracing::info!("prefaulting stopped early: {e}");
        }
    }
    if followed.is_ok() && out.package.is_some() {
        return postcopy_in(
            &main, &inbox, pool, memory, preempt, recovery, opts, phases, summary, out,
        );
    }
    let result = followed
        .and_then(|()| check_all_received(&memory, pool.received()))
        .and_then(|()| {
            pool.finish_within(stall)
                .map_err(MigrationError::from)
                .map(drop)
        });
    // What landed, whether or not the migration completed.
    summary.add_totals(&counters.snapshot());
    result?;
    crate::switchover_trace::mark("destination: every page landed");
    start_guest(
        &main, &inbox, memory, staged, verify, opts, progress, summary, out,
    )
}

/// Everything landed: verify it against the source's digest (when
/// `verify`), keep what must be kept, build the guest, give it its
/// resources and let it run, then tell the source when it started
/// (downtime ends).
#[allow(clippy::too_many_arguments)]
fn start_guest(
    main: &Arc<MainChannel>,
    inbox: &mpsc::Receiver<Event>,
    memory: Arc<GuestMemory>,
    staged: Option<StagedFiles>,
    verify: bool,
    opts: &IncomingOptions,
    progress: &Progress,
    summary: &mut Summary,
    out: &mut Received,
) -> Result<(), MigrationError> {
    let t = Instant::now();
    let mut ours = None;
    if verify {
        progress.set_phase("verifying");
        // SAFETY: every receiver thread has ended (`finish_within` joined
        // the pool before this call) and the guest is not built yet, so
        // nothing writes `memory` while it is hashed.
        let d = unsafe { Digest::of_still_guest(&memory, &out.device_state) };
        summary.switchover_digest = Some(d.to_string());
        summary.digest_ms = Some(t.elapsed().as_secs_f64() * 1e3);
        let theirs = wait_verify(inbox, summary)?;
        if theirs != d.0 {
            return Err(MigrationError::DigestMismatch {
                source_digest: Digest(theirs).to_string(),
                destination_digest: d.to_string(),
            });
        }
        summary.verified = true;
        tracing::info!(digest = %d, "memory and device state equal the source's");
        ours = Some(d.0);
    }
    progress.set_phase("resuming");
    let guest = (opts.build_guest)(memory, &out.device_state)?;
    crate::switchover_trace::mark("destination: guest built");
    guest.resources().activate()?;
    // Outputs replace what the user had only once nothing but the resume
    // itself can fail: a guest that cannot be built, or whose resources
    // the source still holds, leaves every earlier file as it was.
    let kept = opts
        .keep
        .as_ref()
        .map_or(Ok(()), |keep| {
            keep(&out.device_state).map_err(MigrationError::Keep)
        })
        .and_then(|()| staged.map_or(Ok(()), StagedFiles::commit));
    if let Err(e) = kept {
        // Give the resources back: the source resumes its guest.
        let _ = guest.resources().inactivate();
        return Err(e);
    }
    guest.resume()?;
    crate::switchover_trace::mark("destination: guest resumed");
    summary.resume_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    let resumed_at = crate::outgoing::unix_nanos();
    summary.guest_running = guest.is_running();
    tracing::info!("the guest runs here");
    out.guest = Some(guest);
    // The guest runs here now: this side owns it, whatever happens to the
    // messages that tell the source so (it then stays paused, unsure).
    match main.send(&Message::Resumed {
        unix_nanos: resumed_at,
        digest: ours,
    }) {
        Ok(n) => summary.wire_bytes += n,
        Err(e) => tracing::warn!("the guest runs here, but telling the source failed: {e}"),
    }
    Ok(())
}

/// The source's VERIFY, which follows COMPLETE.
fn wait_verify(
    inbox: &mpsc::Receiver<Event>,
    summary: &mut Summary,
) -> Result<u128, MigrationError> {
    loop {
        let event = inbox
            .recv()
            .map_err(|_| MigrationError::Protocol("main channel reader stopped".into()))?;
        match event {
            Event::Main(Ok((Message::Verify { digest }, n))) => {
                summary.wire_bytes += n;
                return Ok(digest);
            }
            Event::Main(Ok((Message::Cancel, _))) => {
                return Err(MigrationError::Cancelled(" by the source".into()))
            }
            Event::Main(Ok((other, _))) => {
                return Err(MigrationError::Protocol(format!(
                    "expected VERIFY after COMPLETE, got {}",
                    other.name()
                )))
            }
            Event::Main(Err(e)) => return Err(e),
            Event::Cancelled => {
                return Err(MigrationError::Cancelled(" on the destination".into()))
            }
            // The pool has finished: a late failure report changes nothing.
            Event::MultifdFailed => {}
        }
    }
}

/// Every page of every block must have landed at least once.
fn check_all_received(memory: &GuestMemory, received: &[PageBitmap]) -> Result<(), MigrationError> {
    for (block, bits) in memory.blocks().iter().zip(received) {
        let missing = bits.pages() - bits.count();
        if missing > 0 {
            let first = (0..bits.pages()).find(|&p| !bits.test(p)).unwrap_or(0);
            return Err(MigrationError::MissingPages {
                block: block.name().into(),
                missing,
                first: first * u64::from(block.page_size()),
            });
        }
    }
    Ok(())
}

/// Follows the main channel until COMPLETE, the data path in step with it.
fn follow_main(
    pool: &ReceiverPool,
    main: &Arc<MainChannel>,
    inbox: &mpsc::Receiver<Event>,
    phases: &mut Phases,
    summary: &mut Summary,
    out: &mut Received,
    stall: Option<Duration>,
) -> Result<(), MigrationError> {
    let mut acked = false;
    // The last pass whose PASS_END arrived: passes end in order, 1, 2, ...
    let mut last_pass = 0;
    loop {
        let event = inbox
            .recv()
            .map_err(|_| MigrationError::Protocol("main channel reader stopped".into()))?;
        let (msg, n) = match event {
            Event::Main(m) => m?,
            Event::MultifdFailed => return Err(pool.error().into()),
            Event::Cancelled => {
                pool.abort("cancelled on the destination");
                return Err(MigrationError::Cancelled(" on the destination".into()));
            }
        };
        summary.wire_bytes += n;
        match msg {
            Message::PassEnd { generation } => {
                refuse_after_early_discard(out, "PASS_END")?;
                if generation != last_pass + 1 {
                    return Err(MigrationError::Protocol(format!(
                        "PASS_END of pass {generation}, but pass {} is the one due",
                        last_pass + 1
                    )));
                }
                pool.wait_sync_within(generation, stall)
                    .map_err(|e| interrupted(inbox, pool, e))?;
                last_pass = generation;
                crate::switchover_trace::mark("destination: a pass landed");
                summary.passes = generation;
                tracing::debug!(pass = generation, "pass landed on every channel");
                if !acked {
                    // The first full pass is here: the source may switch over.
                    summary.wire_bytes += main.send(&Message::SwitchoverAck)?;
                    acked = true;
                }
            }
            Message::Cancel => {
                pool.abort("cancelled by the source");
                return Err(MigrationError::Cancelled(" by the source".into()));
            }
            Message::DeviceState(d) => {
                crate::switchover_trace::mark("destination: DEVICE_STATE arrived");
                // Once only: a second DEVICE_STATE is a move from device
                // to device, which the state machine refuses.
                phases.enter(Phase::Device)?;
                summary.device_state_bytes = d.len() as u64;
                summary.device_state_digest = Some(Digest::of_bytes(&d).to_string());
                out.device_state = d;
            }
            // Before any pass too (`--postcopy-after 0`): then its discard
            // list must name every page (`postcopy_in` checks).
            Message::PostcopyPackage(p) => {
                out.package = Some(p);
                return Ok(());
            }
            Message::EarlyDiscard(list) => early_discard(&list, last_pass, main, summary, out)?,
            Message::Complete { generation } => {
                refuse_after_early_discard(out, "COMPLETE")?;
                crate::switchover_trace::mark("destination: COMPLETE arrived");
                if generation != last_pass || last_pass == 0 {
                    return Err(MigrationError::Protocol(format!(
                        "COMPLETE after pass {generation}, but the last pass that \
                         ended (PASS_END) was {last_pass}"
                    )));
                }
                // Again in `pool.finish`, for anything that lands late.
                pool.check_checksums()?;
                if summary.device_state_digest.is_none() {
                    return Err(MigrationError::Protocol(
                        "COMPLETE before any DEVICE_STATE".into(),
                    ));
                }
                return Ok(());
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {} from the source",
                    other.name()
                )))
            }
        }
    }
}

/// EARLY_DISCARD: drops the pages dirty so far at once, while the
/// source's guest still runs, and says so (EARLY_DISCARDED). Every pass so
/// far has landed (each PASS_END was waited for) and no page data follows
/// before the package, whose discard list names these pages again.
fn early_discard(
    list: &[u8],
    last_pass: u64,
    main: &MainChannel,
    summary: &mut Summary,
    out: &mut Received,
) -> Result<(), MigrationError> {
    let refuse = |why: &str| Err(MigrationError::Protocol(format!("EARLY_DISCARD {why}")));
    if !out.postcopy {
        return refuse("without the postcopy capability");
    }
    if last_pass == 0 {
        return refuse("before any pass ended: no page landed here to drop");
    }
    if out.early_dropped.is_some() {
        return refuse("a second time");
    }
    let Some(memory) = out.memory.clone() else {
        return refuse("before SETUP");
    };
    let discard = crate::postcopy::wire::decode_discard(list, &memory.specs())?;
    let t = Instant::now();
    let pages = crate::postcopy::drop_early(&memory, &discard)?;
    tracing::debug!(
        pages,
        ms = t.elapsed().as_secs_f64() * 1e3,
        "postcopy: pages dirty so far dropped ahead of the switch"
    );
    out.early_dropped = Some(discard);
    summary.wire_bytes += main.send(&Message::EarlyDiscarded)?;
    Ok(())
}

/// After EARLY_DISCARD only the postcopy package may come (or a cancel):
/// a page written after the drop would be stale and taken as final.
fn refuse_after_early_discard(out: &Received, what: &str) -> Result<(), MigrationError> {
    if out.early_dropped.is_some() {
        return Err(MigrationError::Protocol(format!(
            "{what} after EARLY_DISCARD: only the postcopy package may follow"
        )));
    }
    Ok(())
}

/// Why a wait for a pass's sync ended early: a cancel or a main channel
/// error waiting in the inbox, else the data path's own error.
fn interrupted(
    inbox: &mpsc::Receiver<Event>,
    pool: &ReceiverPool,
    data_path: ferry_multifd::MultifdError,
) -> MigrationError {
    while let Ok(event) = inbox.try_recv() {
        match event {
            Event::Cancelled => {
                pool.abort("cancelled on the destination");
                return MigrationError::Cancelled(" on the destination".into());
            }
            Event::Main(Err(e)) => return e,
            Event::Main(Ok(_)) | Event::MultifdFailed => {}
        }
    }
    data_path.into()
}

/// Reads source → destination messages on their own thread until VERIFY
/// (or COMPLETE, when this side does not verify); calls `on_error` (after
/// queueing the error) if the channel fails.
fn spawn_main_reader(
    main: Arc<MainChannel>,
    events: mpsc::Sender<Event>,
    on_error: impl Fn() + Send + 'static,
) -> Result<(), MigrationError> {
    std::thread::Builder::new()
        .name("ferry-main-reader".into())
        .spawn(move || loop {
            let m = main.recv("source");
            if let (Ok((msg, _)), true) = (&m, crate::switchover_trace::enabled()) {
                crate::switchover_trace::mark(&format!(
                    "destination: main reader got {}",
                    msg.name()
                ));
            }
            let failed = m.is_err();
            let last = !matches!(
                m,
                Ok((
                    Message::PassEnd { .. }
                        | Message::DeviceState(_)
                        | Message::Complete { .. }
                        | Message::EarlyDiscard(_)
                        | Message::PostcopyPackage(_),
                    _
                ))
            );
            let gone = events.send(Event::Main(m)).is_err();
            if failed {
                on_error();
            }
            if gone || last {
                break;
            }
        })
        .map_err(|e| MigrationError::Thread("main-channel reader", e))?;
    Ok(())
}

/// What SETUP asks for must fit `limits`, before anything is allocated.
fn check_limits(setup: &Setup, limits: &SetupLimits) -> Result<(), MigrationError> {
    if setup.blocks.len() > limits.max_blocks {
        return Err(MigrationError::Setup(format!(
            "the source announces {} RAM blocks, more than this receiver's limit of {}",
            setup.blocks.len(),
            limits.max_blocks
        )));
    }
    let total = setup
        .blocks
        .iter()
        .try_fold(0u64, |sum, b| sum.checked_add(b.len));
    match total {
        Some(t) if t <= limits.max_guest_bytes => Ok(()),
        _ => Err(MigrationError::Setup(format!(
            "the source announces {} of guest RAM in {} block(s), more than this receiver \
             accepts ({}; raise it with --max-guest)",
            total.map_or("more than 16 EiB".into(), crate::summary::iec),
            setup.blocks.len(),
            crate::summary::iec(limits.max_guest_bytes)
        ))),
    }
}

/// Builds (or checks) the destination memory for the source's layout.
/// Files for `--ram-out` are made under temporary names and returned, to be
/// renamed into place once the migration is verified.
fn build_memory(
    setup: &Setup,
    memory: &DestinationMemory,
    session: &str,
) -> Result<(Arc<GuestMemory>, Option<StagedFiles>), MigrationError> {
    if setup.blocks.is_empty() {
        return Err(MigrationError::Setup(
            "the source announced no RAM blocks".into(),
        ));
    }
    let setup_err = |e: ferry_ram::RamError| MigrationError::Setup(e.to_string());
    match memory {
        DestinationMemory::Anonymous => Ok((
            Arc::new(GuestMemory::anonymous(&setup.blocks).map_err(setup_err)?),
            None,
        )),
        DestinationMemory::Files(path) => {
            let (memory, staged) = StagedFiles::create(&setup.blocks, path, session)?;
            Ok((Arc::new(memory), Some(staged)))
        }
        DestinationMemory::Provided(mem) => {
            if mem.blocks().len() != setup.blocks.len() {
                return Err(MigrationError::Setup(format!(
                    "the source has {} RAM block(s), the receiver {}",
                    setup.blocks.len(),
                    mem.blocks().len()
                )));
            }
            for (i, spec) in setup.blocks.iter().enumerate() {
                let names = || {
                    mem.blocks()
                        .iter()
                        .map(|b| b.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let Some((j, b)) = mem.find(&spec.name) else {
                    return Err(MigrationError::Setup(format!(
                        "block '{}' is unknown to the receiver (it has: {})",
                        spec.name,
                        names()
                    )));
                };
                if j != i || b.len() != spec.len || b.page_size() != spec.page_size {
                    return Err(MigrationError::Setup(format!(
                        "block '{}': the source has #{i}, {} bytes in {}-byte pages; the receiver has #{j}, {} bytes in {}-byte pages",
                        spec.name,
                        spec.len,
                        spec.page_size,
                        b.len(),
                        b.page_size()
                    )));
                }
            }
            Ok((mem.clone(), None))
        }
    }
}

/// `--ram-out` files under temporary names beside their final paths: an
/// existing file at a final path is only ever replaced by a complete,
/// verified one (a rename), and a failed migration leaves nothing behind.
struct StagedFiles {
    /// (temporary, final) per block.
    paths: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

impl StagedFiles {
    /// Files for `specs` beside `path`, named after the `session` (unique
    /// to this migration) until they are committed.
    fn create(
        specs: &[ferry_ram::BlockSpec],
        path: &Path,
        session: &str,
    ) -> Result<(GuestMemory, Self), MigrationError> {
        let setup_err = |e: ferry_ram::RamError| MigrationError::Setup(e.to_string());
        let finals = ferry_ram::block_file_paths(specs, path).map_err(setup_err)?;
        let tag = format!("{}.{session}", std::process::id());
        let mut staged = Self {
            paths: Vec::new(),
            committed: false,
        };
        let mut blocks = Vec::new();
        for (spec, fin) in specs.iter().zip(finals) {
            let name = fin
                .file_name()
                .map_or_else(Default::default, |n| n.to_string_lossy());
            let tmp = fin.with_file_name(format!(".{name}.ferry-recv-{tag}"));
            staged.paths.push((tmp.clone(), fin));
            let block = RamBlock::file(&spec.name, &tmp, spec.page_size, true, Some(spec.len))
                .map_err(setup_err)?;
            blocks.push(block);
        }
        let memory = GuestMemory::new(blocks).map_err(setup_err)?;
        Ok((memory, staged))
    }

    /// Renames every file into place.
    fn commit(mut self) -> Result<(), MigrationError> {
        for (tmp, fin) in &self.paths {
            std::fs::rename(tmp, fin).map_err(|e| {
                MigrationError::Keep(format!(
                    "moving the received RAM into {}: {e}",
                    fin.display()
                ))
            })?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        if !self.committed {
            for (tmp, _) in &self.paths {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    use ferry_ram::BlockSpec;
    use ferry_transport::{Channel, SocketChannel};

    use super::*;
    use crate::session::PhaseError;
    use crate::state::{Event as StateEvent, Status};

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const PAGE: u32 = 4096;

    fn spec(name: &str, len: u64) -> BlockSpec {
        BlockSpec {
            name: name.into(),
            len,
            page_size: PAGE,
        }
    }

    fn setup(blocks: Vec<BlockSpec>) -> Setup {
        Setup {
            capabilities: 0,
            multifd_channels: 0,
            packet_pages: 128,
            blocks,
        }
    }

    /// "ram" 64 KiB and "vram" 32 KiB.
    fn two_blocks() -> Vec<BlockSpec> {
        vec![spec("ram", 64 * KIB), spec("vram", 32 * KIB)]
    }

    /// A main channel and its peer's (the source's) end.
    fn main_pair() -> (Arc<MainChannel>, Arc<MainChannel>) {
        let (a, b) = UnixStream::pair().unwrap();
        let ch = |s: UnixStream, label: &str| -> Arc<dyn Channel> {
            Arc::new(SocketChannel::new(
                socket2::Socket::from(OwnedFd::from(s)),
                label.into(),
            ))
        };
        let timeout = Duration::from_secs(30);
        (
            MainChannel::new(ch(a, "main (destination)"), timeout).unwrap(),
            MainChannel::new(ch(b, "main (source)"), timeout).unwrap(),
        )
    }

    fn setup_error(e: MigrationError) -> String {
        match e {
            MigrationError::Setup(m) => m,
            other => panic!("expected a setup refusal, got {other}"),
        }
    }

    #[test]
    fn a_missing_page_is_named_with_its_block_and_offset() {
        let memory = GuestMemory::anonymous(&two_blocks()).unwrap();
        let received: Vec<PageBitmap> = memory
            .blocks()
            .iter()
            .map(|b| PageBitmap::new(b.pages(), true))
            .collect();
        check_all_received(&memory, &received).unwrap();
        // Pages 3 and 5 of the second block never came.
        received[1].clear(5);
        received[1].clear(3);
        match check_all_received(&memory, &received) {
            Err(e @ MigrationError::MissingPages { .. }) => {
                let MigrationError::MissingPages {
                    block,
                    missing,
                    first,
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((block.as_str(), *missing, *first), ("vram", 2, 3 * 4096));
                assert!(e.to_string().contains("block 'vram' has 2 page(s)"), "{e}");
                assert!(e.to_string().contains("offset 0x3000"), "{e}");
            }
            other => panic!("expected missing pages, got {other:?}"),
        }
        // The first block is named first.
        received[0].clear(15);
        assert!(matches!(
            check_all_received(&memory, &received),
            Err(MigrationError::MissingPages { block, missing: 1, first: 0xf000 }) if block == "ram"
        ));
    }

    #[test]
    fn setup_limits_refuse_too_many_blocks_and_too_big_a_guest() {
        let limits = SetupLimits {
            max_guest_bytes: 96 * KIB,
            max_blocks: 2,
        };
        // Exactly at both limits.
        check_limits(&setup(two_blocks()), &limits).unwrap();
        let mut three = two_blocks();
        three.push(spec("rom", 4 * KIB));
        let e = setup_error(check_limits(&setup(three), &limits).unwrap_err());
        assert!(
            e.contains("3 RAM blocks, more than this receiver's limit of 2"),
            "{e}"
        );
        let big = vec![spec("ram", 64 * KIB), spec("vram", 36 * KIB)];
        let e = setup_error(check_limits(&setup(big), &limits).unwrap_err());
        assert!(e.contains("in 2 block(s)"), "{e}");
        assert!(e.contains("--max-guest"), "{e}");
        // Lengths that overflow when added are refused, not wrapped.
        let huge = vec![spec("a", u64::MAX), spec("b", 64 * KIB)];
        let limits = SetupLimits {
            max_guest_bytes: u64::MAX,
            max_blocks: 2,
        };
        let e = setup_error(check_limits(&setup(huge), &limits).unwrap_err());
        assert!(e.contains("more than 16 EiB"), "{e}");
    }

    /// SETUP over a real main channel asks for more than the limit: the
    /// refusal comes before any memory or `--ram-out` file exists.
    #[test]
    fn an_oversized_setup_is_refused_before_any_memory_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let opts = IncomingOptions {
            memory: DestinationMemory::Files(dir.path().join("guest.ram")),
            limits: SetupLimits {
                max_guest_bytes: MIB,
                max_blocks: 4,
            },
            ..IncomingOptions::default()
        };
        let progress = Progress::default();
        for blocks in [
            vec![spec("ram", 2 * MIB)],
            (0..5).map(|i| spec(&format!("b{i}"), 64 * KIB)).collect(),
        ] {
            let (main, source) = main_pair();
            source.send(&Message::Setup(setup(blocks))).unwrap();
            let mut phases = Phases::new(&progress);
            let mut summary = Summary::new(Role::Destination, "unix:test".into());
            let mut out = Received::default();
            let e = receive(
                main,
                Vec::new(),
                None,
                &opts,
                &mut phases,
                &mut summary,
                &mut out,
            )
            .unwrap_err();
            let e = setup_error(e);
            assert!(e.contains("more than this receiver"), "{e}");
            assert!(out.memory.is_none(), "no memory made");
            assert_eq!(summary.guest_bytes, 0);
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                0,
                "no file made"
            );
            assert_eq!(phases.phase(), Phase::None, "never active");
        }
    }

    #[test]
    fn provided_memory_must_match_by_name_length_and_page_size() {
        let mem = Arc::new(GuestMemory::anonymous(&two_blocks()).unwrap());
        let provided = DestinationMemory::Provided(mem.clone());
        let refused = |blocks: Vec<BlockSpec>| {
            setup_error(build_memory(&setup(blocks), &provided, "s").err().unwrap())
        };
        let (got, staged) = build_memory(&setup(two_blocks()), &provided, "s").unwrap();
        assert!(Arc::ptr_eq(&got, &mem), "the caller's memory itself");
        assert!(staged.is_none());

        let e = refused(vec![spec("ram", 64 * KIB)]);
        assert_eq!(e, "the source has 1 RAM block(s), the receiver 2");
        let e = refused(vec![spec("ram", 64 * KIB), spec("vga", 32 * KIB)]);
        assert_eq!(
            e,
            "block 'vga' is unknown to the receiver (it has: ram, vram)"
        );
        let e = refused(vec![spec("ram", 128 * KIB), spec("vram", 32 * KIB)]);
        assert_eq!(
            e,
            "block 'ram': the source has #0, 131072 bytes in 4096-byte pages; \
             the receiver has #0, 65536 bytes in 4096-byte pages"
        );
        let mut huge = two_blocks();
        huge[1].page_size = 64 * KIB as u32;
        let e = refused(huge);
        assert!(
            e.contains("in 65536-byte pages; the receiver has #1"),
            "{e}"
        );
        let e = refused(vec![spec("vram", 32 * KIB), spec("ram", 64 * KIB)]);
        assert!(e.starts_with("block 'vram': the source has #0"), "{e}");
        assert!(e.contains("the receiver has #1"), "{e}");
    }

    #[test]
    fn destination_memory_is_shaped_like_the_source() {
        let blocks = two_blocks();
        assert_eq!(
            setup_error(
                build_memory(&setup(Vec::new()), &DestinationMemory::Anonymous, "s")
                    .err()
                    .unwrap()
            ),
            "the source announced no RAM blocks"
        );
        let (mem, staged) =
            build_memory(&setup(blocks.clone()), &DestinationMemory::Anonymous, "s").unwrap();
        assert_eq!(mem.specs(), blocks);
        assert!(staged.is_none());

        // Files: made under temporary names, renamed into place on commit.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.ram");
        let files = DestinationMemory::Files(path.clone());
        let finals = [
            dir.path().join("guest.ram.ram"),
            dir.path().join("guest.ram.vram"),
        ];
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        let (mem, staged) = build_memory(&setup(blocks.clone()), &files, "s1").unwrap();
        assert_eq!(mem.specs(), blocks);
        let tmp = names();
        assert_eq!(tmp.len(), 2, "{tmp:?}");
        for (n, block) in tmp.iter().zip(["ram", "vram"]) {
            assert!(
                n.starts_with(&format!(".guest.ram.{block}.ferry-recv-")),
                "{n}"
            );
            assert!(n.ends_with(".s1"), "{n}");
        }
        assert!(finals.iter().all(|f| !f.exists()));
        drop(mem);
        staged.unwrap().commit().unwrap();
        assert_eq!(names(), ["guest.ram.ram", "guest.ram.vram"]);
        assert_eq!(std::fs::metadata(&finals[1]).unwrap().len(), 32 * KIB);

        // A migration that fails leaves neither temporary nor final files
        // of its own; the earlier ones stay.
        let (mem, staged) = build_memory(&setup(blocks), &files, "s2").unwrap();
        assert_eq!(names().len(), 4);
        drop((mem, staged));
        assert_eq!(names(), ["guest.ram.ram", "guest.ram.vram"]);
    }

    fn statuses(events: &mpsc::Receiver<StateEvent>) -> Vec<Status> {
        events
            .try_iter()
            .filter_map(|e| match e {
                StateEvent::Status(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_destination_phases_go_through_the_state_machine() {
        use Status::*;
        // Completed: setup → active → device → completed.
        let progress = Progress::default();
        let events = progress.subscribe();
        let mut phases = Phases::new(&progress);
        assert_eq!(
            phases.enter(Phase::Active),
            Err(PhaseError {
                from: Phase::None,
                to: Phase::Active
            })
        );
        for p in [Phase::Setup, Phase::Active, Phase::Device] {
            phases.enter(p).unwrap();
        }
        assert_eq!(
            phases.enter(Phase::Device),
            Err(PhaseError {
                from: Phase::Device,
                to: Phase::Device
            })
        );
        assert_eq!(phases.finish(outcome_of(&Ok(()))), Phase::Completed);
        assert_eq!(statuses(&events), [Setup, Active, Device, Completed]);
        assert!(phases.enter(Phase::Failed).is_err(), "a final phase stays");

        // Cancelled by the source while active: through cancelling.
        let progress = Progress::default();
        let events = progress.subscribe();
        let mut phases = Phases::new(&progress);
        phases.enter(Phase::Setup).unwrap();
        phases.enter(Phase::Active).unwrap();
        let cancelled = Err(MigrationError::Cancelled(" by the source".into()));
        assert_eq!(phases.finish(outcome_of(&cancelled)), Phase::Cancelled);
        assert_eq!(statuses(&events), [Setup, Active, Cancelling, Cancelled]);

        // Cancelled here: the status is cancelling at once, one event.
        let progress = Progress::default();
        let events = progress.subscribe();
        let mut phases = Phases::new(&progress);
        phases.enter(Phase::Setup).unwrap();
        assert!(progress.cancel());
        let cancelled = Err(MigrationError::Cancelled(" on the destination".into()));
        assert_eq!(phases.finish(outcome_of(&cancelled)), Phase::Cancelled);
        assert_eq!(statuses(&events), [Setup, Cancelling, Cancelled]);

        // Failed before any source came: none → failed.
        let progress = Progress::default();
        let mut phases = Phases::new(&progress);
        let failed = Err(MigrationError::Protocol("bad hello".into()));
        assert_eq!(phases.finish(outcome_of(&failed)), Phase::Failed);
        assert_eq!(progress.status(), Failed);
    }

    /// `follow_main` over a pool with no channels: the main channel's
    /// messages alone.
    fn follow(
        messages: Vec<Message>,
        phases: &mut Phases,
        out: &mut Received,
    ) -> Result<(), MigrationError> {
        let memory = Arc::new(GuestMemory::anonymous(&two_blocks()).unwrap());
        let ropts = ReceiverOptions {
            fresh_memory: true,
            compressed: false,
            checksums: false,
        };
        let pool = ReceiverPool::start(Vec::new(), memory, ropts, || {}).unwrap();
        let (main, _source) = main_pair();
        let (tx, inbox) = mpsc::channel();
        for m in messages {
            tx.send(Event::Main(Ok((m, 16)))).unwrap();
        }
        drop(tx);
        let mut summary = Summary::new(Role::Destination, "unix:test".into());
        follow_main(&pool, &main, &inbox, phases, &mut summary, out, None)
    }

    /// EARLY_DISCARD comes once, after a pass landed, and only with
    /// postcopy; after it only the package may come. A list that does not
    /// fit the guest drops nothing. One accepted is dropped, kept for the
    /// switch, and answered.
    #[test]
    fn an_early_discard_comes_once_after_a_pass_and_only_with_postcopy() {
        let memory = Arc::new(GuestMemory::anonymous(&two_blocks()).unwrap());
        let pages = |i: usize| memory.blocks()[i].pages();
        let list = |bits: &[PageBitmap]| crate::postcopy::wire::encode_discard(bits);
        let good = list(&[
            PageBitmap::new(pages(0), true),
            PageBitmap::new(pages(1), false),
        ]);
        let (main, source) = main_pair();
        let mut summary = Summary::new(Role::Destination, "unix:test".into());
        let mut out = Received {
            memory: Some(memory.clone()),
            ..Default::default()
        };
        let mut refused = |list: &[u8], last_pass: u64, out: &mut Received, says: &str| {
            let e = early_discard(list, last_pass, &main, &mut summary, out)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "wanted {says:?} in: {e}");
            assert!(out.early_dropped.is_none(), "nothing kept");
        };
        refused(
            &good,
            1,
            &mut out,
            "EARLY_DISCARD without the postcopy capability",
        );
        out.postcopy = true;
        refused(&good, 0, &mut out, "EARLY_DISCARD before any pass ended");
        let one_block = list(&[PageBitmap::new(pages(0), true)]);
        refused(&one_block, 1, &mut out, "discard list");
        // Accepted: block 0's pages are gone, block 1's stay.
        for b in memory.blocks() {
            ferry_ram::pattern::fill_block(b, ferry_ram::pattern::Pattern::Random, 3);
        }
        let mut summary = Summary::new(Role::Destination, "unix:test".into());
        early_discard(&good, 1, &main, &mut summary, &mut out).unwrap();
        assert!(matches!(
            source.recv("destination").unwrap().0,
            Message::EarlyDiscarded
        ));
        let kept = out.early_dropped.as_ref().expect("kept for the switch");
        assert_eq!((kept[0].count(), kept[1].count()), (pages(0), 0));
        let zero =
            |i: usize, p: u64| ferry_ram::is_zero(&memory.blocks()[i].page_slice(p).unwrap());
        assert!((0..pages(0)).all(|p| zero(0, p)), "block 0 dropped");
        assert!((0..pages(1)).all(|p| !zero(1, p)), "block 1 kept");
        let again = early_discard(&good, 1, &main, &mut summary, &mut out).unwrap_err();
        assert!(
            again.to_string().contains("EARLY_DISCARD a second time"),
            "{again}"
        );
        for what in ["PASS_END", "COMPLETE"] {
            let e = refuse_after_early_discard(&out, what)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{what} after EARLY_DISCARD")), "{e}");
        }
        refuse_after_early_discard(&Received::default(), "PASS_END").unwrap();
    }

    #[test]
    fn the_device_state_moves_the_destination_to_device_once() {
        let progress = Progress::default();
        let mut phases = Phases::new(&progress);
        phases.enter(Phase::Setup).unwrap();
        phases.enter(Phase::Active).unwrap();
        let mut out = Received::default();
        let e = follow(
            vec![
                Message::DeviceState(b"one".to_vec()),
                Message::DeviceState(b"two".to_vec()),
            ],
            &mut phases,
            &mut out,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                MigrationError::Phase(PhaseError {
                    from: Phase::Device,
                    to: Phase::Device
                })
            ),
            "{e}"
        );
        assert_eq!(out.device_state, b"one");
        assert_eq!(progress.status(), Status::Device);

        // A CANCEL from the source ends it cancelled, still active.
        let progress = Progress::default();
        let mut phases = Phases::new(&progress);
        phases.enter(Phase::Setup).unwrap();
        phases.enter(Phase::Active).unwrap();
        let e = follow(vec![Message::Cancel], &mut phases, &mut Received::default()).unwrap_err();
        assert_eq!(e.to_string(), "migration cancelled by the source");
        assert_eq!(phases.phase(), Phase::Active);
        assert_eq!(phases.finish(outcome_of(&Err(e))), Phase::Cancelled);

        // COMPLETE before any pass ended is refused.
        let progress = Progress::default();
        let mut phases = Phases::new(&progress);
        phases.enter(Phase::Setup).unwrap();
        phases.enter(Phase::Active).unwrap();
        let e = follow(
            vec![
                Message::DeviceState(Vec::new()),
                Message::Complete { generation: 0 },
            ],
            &mut phases,
            &mut Received::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("COMPLETE after pass 0"), "{e}");
    }
}
