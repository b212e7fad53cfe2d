//! The source side of a migration (seed 004's migration thread).
//!
//! 1. setup: open the session (main channel, then K multifd channels, each
//!    with its hello), send SETUP, wait for SETUP_ACK on the return path;
//! 2. active: start the dirty log, send pass 1 (every page) while the guest
//!    runs, then passes of the pages dirtied meanwhile. After each pass the
//!    bandwidth is measured and the switchover threshold is
//!    `bandwidth × downtime-limit` (or the user's avail-switchover-bandwidth);
//!    when the dirty bytes left fit under it and the destination has sent
//!    SWITCHOVER_ACK, precopy ends. Auto-converge throttles the guest after
//!    each pass in which it dirtied more than half of what the pass sent
//!    (seed 004's trigger): 20%, then +10% a pass, up to 99%;
//! 3. pause the guest; pre-switchover waits for `continue` if asked to;
//! 4. device: inactivate shared resources, send the final pass (the log's
//!    last pages), the device state and COMPLETE; the digest of memory and
//!    device state is taken while the destination loads;
//! 5. the destination answers RESUMED (its guest runs: downtime ends) and
//!    SHUT.
//!
//! The pass loop of step 2 and the final pass of step 4 are the session
//! engine's ([`crate::session`]); this module is its network [`PassSink`]
//! (multifd passes and PASS_END; SWITCHOVER_ACK before switching over) and
//! owns the rest: channels, setup, device state, the completion handshake.
//!
//! Cancel (from the control socket) ends the pass in flight early and tells
//! the destination with CANCEL. Whatever ends a migration other than
//! success goes through one cleanup path: throttle lifted, dirty log
//! stopped, resources reactivated, the guest resumed if it was running;
//! its memory is only ever read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_multifd::{SendPath, SenderOptions, SenderPool};
use ferry_ram::{Digest, GuestMemory, PageBitmap};
use ferry_transport::{
    await_accept, connect_channel_secure, Channel, ChannelHello, ChannelUri, Role, SessionId,
    SocketTuning, TlsClient,
};

use crate::protocol::{
    MainChannel, Message, Setup, CAP_CHECKSUM, CAP_POSTCOPY, CAP_VERIFY, CAP_ZSTD,
    DEFAULT_PEER_TIMEOUT,
};
use crate::session::{
    AtMaxPasses, Limits, Outcome, PassResult, PassSink, Phase, PrecopyEnd, Readiness, Session,
    SessionConfig,
};
use crate::summary::ZeroCopyReport;
use crate::{Failed, Guest, MigrationError, Progress, Role as SummaryRole, Summary};

/// The source's postcopy phase (the switch and the serving of pages), kept
/// beside the postcopy module; a child of this module, it sees `Source`
/// and `Link`.
#[path = "postcopy/outgoing.rs"]
mod postcopy_phase;
use postcopy_phase::open_preempt;

#[derive(Clone, Debug)]
pub struct OutgoingOptions {
    /// Multifd channels (K).
    pub channels: u16,
    pub sender: SenderOptions,
    pub tuning: SocketTuning,
    /// How long to wait for the destination to accept channels and setup.
    pub setup_timeout: Duration,
    /// How long to wait for the destination's final word after COMPLETE.
    pub completion_timeout: Duration,
    /// The longest silence tolerated from the destination (it sends a
    /// heartbeat well within it), and the longest a channel may make no
    /// progress while it owes data. Also the sockets' TCP_USER_TIMEOUT.
    pub peer_timeout: Duration,
    /// TLS on every channel, with these credentials.
    pub tls: Option<Arc<TlsClient>>,
    /// Ask that the switchover be verified (SETUP's [`CAP_VERIFY`]): the
    /// destination hashes all memory and the device state before its guest
    /// runs (inside the downtime) and compares that with this side's
    /// digest (VERIFY), and both sides complete only if they are equal. A
    /// destination that refuses fails the migration at setup. The
    /// destination may also verify on its own when this is false.
    pub verify_switchover: bool,
    /// The postcopy capability (`--postcopy`): announced in SETUP; the
    /// migration may then switch to postcopy (see [`crate::postcopy`]).
    pub postcopy: bool,
    /// With `postcopy`, switch after this many precopy passes: `Some(0)`
    /// before the first (every page then follows in postcopy), `None` only
    /// on `migrate-start-postcopy` or when precopy does not converge.
    pub postcopy_after: Option<u64>,
    /// Postcopy: answer page requests on the preempt channel (default);
    /// false (`--no-postcopy-preempt`): queue them on the first push
    /// channel, behind the background stream.
    pub postcopy_preempt: bool,
    /// Postcopy recovery after a link failure: wait for `resume URI`
    /// (manual) or reconnect by itself with backoff (auto).
    pub postcopy_recover: crate::postcopy::RecoverMode,
    /// How long to stay in postcopy-paused before giving up (the guest
    /// stays paused, the migration fails); `None`: for ever.
    pub postcopy_paused_timeout: Option<Duration>,
    /// COLO follows (`send --colo`): announced in SETUP ([`CAP_COLO`]);
    /// see [`crate::colo`].
    pub colo: bool,
}

impl Default for OutgoingOptions {
    fn default() -> Self {
        Self {
            channels: 2,
            sender: SenderOptions::default(),
            tuning: SocketTuning::default(),
            setup_timeout: Duration::from_secs(30),
            completion_timeout: Duration::from_secs(120),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            tls: None,
            verify_switchover: false,
            postcopy: false,
            postcopy_after: None,
            postcopy_preempt: true,
            postcopy_recover: crate::postcopy::RecoverMode::Manual,
            postcopy_paused_timeout: None,
            colo: false,
        }
    }
}

/// How long a cancelled pass may take to end on its own before its
/// channels are shut down (a dead link never drains).
const CANCEL_GRACE: Duration = Duration::from_secs(3);
/// How often waits look at the cancel flag.
const POLL: Duration = Duration::from_millis(50);

/// Why `--postcopy` and `--verify-switchover` cannot be combined.
pub(crate) const POSTCOPY_CANNOT_VERIFY: &str =
    "verifying the switchover (--verify-switchover) hashes all memory at the destination before \
     its guest runs, and after a postcopy switch the destination runs its guest before it holds \
     all memory (--postcopy): use one or the other";

/// Migrates `guest` to the destination listening at `uri`. The migration's
/// parameters (downtime limit, rate limit, auto-converge...) are those of
/// `progress`, which also carries its status, figures and cancel requests.
pub fn migrate_out(
    guest: &dyn Guest,
    uri: &ChannelUri,
    opts: &OutgoingOptions,
    progress: &Progress,
) -> Result<Summary, Failed> {
    let started = Instant::now();
    let mut summary = Summary::new(SummaryRole::Source, uri.to_string());
    summary.channels = opts.channels;
    summary.checksum = opts.sender.checksum;
    summary.tls = opts.tls.is_some();
    summary.compression = opts.sender.compress.map(|l| format!("zstd:{l}"));
    let memory = guest.memory().clone();
    progress
        .total_ram_bytes
        .store(memory.total_bytes(), Ordering::Relaxed);
    summary.guest_bytes = memory.total_bytes();
    if let Some(b) = memory.blocks().first() {
        progress
            .page_size
            .store(u64::from(b.page_size()), Ordering::Relaxed);
    }
    let mut session = Session::new(
        guest,
        progress,
        SessionConfig {
            log: guest.dirty_log(),
            limits: Limits::Progress,
            at_max_passes: AtMaxPasses::Fail,
        },
    );
    let was_running = guest.is_running();
    let mut source = Source {
        guest,
        uri,
        ended: Arc::new(AtomicBool::new(false)),
        handed_over: false,
        in_postcopy: false,
        memory,
        opts,
        progress,
        summary: &mut summary,
    };
    let mut result = progress.while_ticking(|| source.run(&mut session));
    let handed_over = source.handed_over;
    let in_postcopy = source.in_postcopy;
    let stats = session.stats();
    summary.dirty_sync_count = stats.dirty_sync_count;
    summary.dirty_sync_ms = stats.dirty_sync_ms;
    summary.throttle_percent = stats.throttle_percent;
    summary.expected_downtime_ms = stats.expected_downtime_ms;
    if result.is_err() && progress.cancel_requested() && !handed_over {
        result = Err(MigrationError::Cancelled(String::new()));
    }
    if let Err(e) = &mut result {
        let kept_paused = if in_postcopy {
            Some(POSTCOPY_PAUSED.to_string())
        } else {
            after_failure(guest, was_running, handed_over)
        };
        if let Some(why) = kept_paused {
            *e = MigrationError::SourceNotResumed {
                error: Box::new(std::mem::replace(
                    e,
                    MigrationError::Cancelled(String::new()),
                )),
                why,
            };
        }
        progress.set_error(&e.to_string());
        tracing::warn!("migration to {uri} did not complete: {e}");
    } else if let Some(log) = guest.dirty_log() {
        let _ = log.stop();
    }
    let cancelled = matches!(result, Err(MigrationError::Cancelled(_)));
    summary.guest_running = guest.is_running();
    if result.is_err() && summary.multifd_bytes == 0 {
        // What moved before the end.
        summary.add_totals(&progress.totals());
        let f = progress.figures();
        (summary.passes, summary.precopy_bytes) = (f.pass, f.precopy_bytes);
    }
    summary.finish(
        started,
        result.as_ref().err().map(ToString::to_string),
        cancelled,
    );
    progress.set_phase(summary.status);
    if result.is_ok() && opts.colo && session.enter(Phase::Colo).is_ok() {
        // COLO runs next (`crate::colo::run_primary`); `session::end_colo`
        // ends it.
    } else {
        session.finish(match (&result, cancelled) {
            (Ok(()), _) => Outcome::Completed,
            (Err(_), true) => Outcome::Cancelled,
            (Err(_), false) => Outcome::Failed,
        });
    }
    match result {
        Ok(()) => Ok(summary),
        Err(error) => Err(Failed {
            error,
            summary: Box::new(summary),
        }),
    }
}

/// What a migration that did not complete leaves of the source guest: it
/// goes on as before ([`restore_source`]) unless it was handed over (the
/// destination may run it already), where it stays paused, untouched. The
/// reason it stays paused, if it does.
fn after_failure(guest: &dyn Guest, was_running: bool, handed_over: bool) -> Option<String> {
    if handed_over {
        Some(
            "the destination had everything it needs to run the guest, and its word on \
             whether it does never arrived: check the destination before resuming here \
             (two running copies would diverge)"
                .to_string(),
        )
    } else {
        restore_source(guest, was_running)
    }
}

/// The one cleanup path of a source whose migration did not complete: the
/// guest goes on as if nothing happened. The one exception: if its shared
/// resources cannot be taken back (the destination already runs the guest
/// and holds them), resuming would give the guest two owners, so it stays
/// paused; the reason is returned.
fn restore_source(guest: &dyn Guest, was_running: bool) -> Option<String> {
    guest.set_throttle(0);
    if let Some(log) = guest.dirty_log() {
        if let Err(e) = log.stop() {
            tracing::error!("stopping the dirty log after a failed migration: {e}");
        }
    }
    if let Err(e) = guest.resources().activate() {
        return Some(e.to_string());
    }
    if was_running && !guest.is_running() {
        if let Err(e) = guest.resume() {
            return Some(e.to_string());
        }
    }
    None
}

struct Source<'a> {
    guest: &'a dyn Guest,
    uri: &'a ChannelUri,
    memory: Arc<GuestMemory>,
    opts: &'a OutgoingOptions,
    progress: &'a Progress,
    summary: &'a mut Summary,
    /// Set when the migration has ended, so a late cancel aborts nothing.
    ended: Arc<AtomicBool>,
    /// The destination has all it needs to resume the guest (COMPLETE, and
    /// VERIFY when it verifies) and has not said that it failed: from here
    /// on the source must not resume on its own, or the guest could run
    /// twice.
    handed_over: bool,
    /// The package went out: the destination may run the guest, and the
    /// source holds pages it lacks (see [`POSTCOPY_PAUSED`]).
    in_postcopy: bool,
}

/// Why a source that failed in postcopy keeps its guest paused.
const POSTCOPY_PAUSED: &str = "postcopy-paused: the device state went to the destination \
    (which may run the guest) and this source holds the pages it lacked; neither side alone \
    holds the whole guest, so it is never resumed here";

/// The open link to the destination: main channel, its return path and
/// the sender pool.
struct Link {
    main: Arc<MainChannel>,
    return_path: ReturnPath,
    /// Postcopy: answers page requests on the return path's own thread.
    answer_requests: RequestHook,
    pool: SenderPool,
    switchover_acked: bool,
    /// The destination asked for VERIFY (SETUP_ACK): it compares digests
    /// before its guest runs.
    destination_verifies: bool,
    /// Postcopy's channels (with the capability): preempt[0] for the
    /// answers to page requests, preempt[1..=K] for the background push.
    preempt: Vec<Arc<dyn Channel>>,
    /// The session's id (a postcopy recovery reconnects with it).
    session: SessionId,
}

impl Source<'_> {
    fn run(&mut self, session: &mut Session) -> Result<(), MigrationError> {
        session.enter(Phase::Setup)?;
        if self.opts.channels == 0 {
            return Err(MigrationError::Options(
                "at least one multifd channel is needed".into(),
            ));
        }
        let mut s = self.setup()?;
        let result = self.precopy(session, &mut s).and_then(|end| match end {
            // A COLO phase would start here (session.rs).
            PrecopyEnd::SwitchOver => self.switchover(session, &mut s),
            PrecopyEnd::Postcopy => self.postcopy(session, &mut s),
        });
        if result.is_err() && self.in_postcopy {
            let _ = session.enter(Phase::PostcopyPaused);
        }
        if result.is_err() && self.progress.cancel_requested() {
            // End the channels cleanly (a dead link is cut by the cancel's
            // grace timer), then tell the destination to discard.
            let _ = s.pool.finish();
            let _ = s.main.send(&Message::Cancel);
        }
        self.ended.store(true, Ordering::SeqCst);
        s.main.stop_heartbeat();
        if result.is_err() {
            s.main.channel().shutdown();
        } else {
            // End the main channel cleanly (TLS: close_notify); the
            // destination may already have closed its side: best effort.
            let _ = s.main.channel().finish();
        }
        result
    }

    fn setup(&mut self) -> Result<Link, MigrationError> {
        let opts = self.opts;
        if opts.postcopy && opts.verify_switchover {
            return Err(MigrationError::Setup(POSTCOPY_CANNOT_VERIFY.into()));
        }
        self.progress.set_phase("connecting");
        let session = SessionId::random();
        self.summary.session = session.to_string();
        let (main, multifd) = open_session(self.uri, opts, session)?;
        self.summary.wire_bytes +=
            (ferry_transport::HELLO_LEN as u64 + 8) * (u64::from(opts.channels) + 1);
        tracing::info!(
            session = %session,
            uri = %self.uri,
            "connected: main and {} multifd channel(s)",
            opts.channels
        );
        let main = MainChannel::new(Arc::from(main), opts.peer_timeout)?;
        main.start_heartbeat(crate::protocol::heartbeat_interval(opts.peer_timeout))?;
        let on_destination_failure = Arc::new(OnceLock::new());
        let answer_requests = RequestHook::default();
        let return_path = spawn_return_path(
            main.clone(),
            on_destination_failure.clone(),
            answer_requests.clone(),
        )?;

        self.progress.set_phase("setup");
        let setup = Setup {
            capabilities: if opts.sender.checksum {
                CAP_CHECKSUM
            } else {
                0
            } | if opts.sender.compress.is_some() {
                CAP_ZSTD
            } else {
                0
            } | if opts.verify_switchover {
                CAP_VERIFY
            } else {
                0
            } | if opts.postcopy {
                CAP_POSTCOPY | crate::protocol::CAP_POSTCOPY_REGIONS
            } else {
                0
            } | if opts.colo {
                crate::protocol::CAP_COLO
            } else {
                0
            },
            multifd_channels: opts.channels,
            packet_pages: opts.sender.packet_pages,
            blocks: self.memory.specs(),
        };
        self.summary.wire_bytes += main.send(&Message::Setup(setup))?;
        let reply = wait_reply(self.progress, &return_path, opts.setup_timeout, "SETUP_ACK");
        if reply.is_err() && self.progress.cancel_requested() {
            let _ = main.send(&Message::Cancel);
        }
        let destination_verifies = match reply? {
            Message::SetupAck { verify } => {
                tracing::info!(verify, "setup acknowledged by the destination");
                if opts.verify_switchover && !verify {
                    // A destination that will not verify refuses such a
                    // SETUP itself; this one broke the protocol.
                    return Err(MigrationError::Setup(
                        "this source asked to verify the switchover (--verify-switchover) and \
                         the destination's SETUP_ACK does not agree to"
                            .into(),
                    ));
                }
                verify
            }
            // The destination's text already says "setup refused: ...".
            Message::Shut { error: Some(e) } => {
                let why = e.strip_prefix("setup refused: ").unwrap_or(&e);
                return Err(MigrationError::Setup(format!("by the destination: {why}")));
            }
            other => return Err(unexpected("SETUP_ACK", &other)),
        };

        let preempt = if opts.postcopy {
            let p = open_preempt(self.uri, opts, session)?;
            self.progress.allow_postcopy();
            p
        } else {
            Vec::new()
        };
        let mut sender = opts.sender.clone();
        sender.stall_timeout = Some(opts.peer_timeout);
        let pool = SenderPool::start(multifd, self.memory.clone(), sender)?;
        self.progress.attach(pool.counters().clone());
        self.progress.attach_pass_control(pool.control().clone());
        let abort = Arc::new(pool.aborter());
        {
            // A destination that gives up mid-pass stops the pass at once.
            let (abort, control) = (abort.clone(), pool.control().clone());
            let _ = on_destination_failure.set(Box::new(move || {
                control.interrupt();
                abort();
            }) as StopHook);
        }
        let ended = self.ended.clone();
        self.progress.on_cancel(move || {
            let (abort, ended) = (abort.clone(), ended.clone());
            // A pass stuck on a dead link never ends on its own.
            let _ = std::thread::Builder::new()
                .name("ferry-cancel".into())
                .spawn(move || {
                    let t = Instant::now();
                    while t.elapsed() < CANCEL_GRACE {
                        if ended.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(POLL);
                    }
                    abort();
                });
        });
        self.summary.send_path = pool.path().name();
        self.summary.send_path_note = pool.path_note().map(String::from);
        self.summary.zero_copy = (opts.sender.path == SendPath::ZeroCopy).then(|| ZeroCopyReport {
            requested: true,
            used: pool.path() == SendPath::ZeroCopy,
            note: pool.path_note().map(String::from),
            ..Default::default()
        });
        Ok(Link {
            main,
            return_path,
            answer_requests,
            pool,
            switchover_acked: false,
            destination_verifies,
            preempt,
            session,
        })
    }

    /// Passes while the guest runs, until what is left fits the downtime
    /// limit (the session engine's loop, through the network sink); the
    /// dirty pages left stay pending in `session` for the final pass.
    fn precopy(
        &mut self,
        session: &mut Session,
        s: &mut Link,
    ) -> Result<PrecopyEnd, MigrationError> {
        session.enter(Phase::Active)?;
        self.progress.set_phase("active");
        self.summary.dirty_tracker = self.guest.dirty_log().map(|l| l.name().to_string());
        let mut sink = NetSink {
            link: s,
            summary: self.summary,
            progress: self.progress,
            opts: self.opts,
        };
        session.precopy(&mut sink)
    }

    /// Pause, (pre-switchover), device: the final pass, device state,
    /// COMPLETE; then the destination's RESUMED and SHUT.
    fn switchover(&mut self, session: &mut Session, s: &mut Link) -> Result<(), MigrationError> {
        let paused_at = Instant::now();
        tracing::info!(
            remaining = self.progress.figures().remaining_bytes,
            "switchover: pausing the guest"
        );
        crate::switchover_trace::mark("source: pausing");
        self.guest.pause()?;
        crate::switchover_trace::mark("source: paused");
        if self.progress.parameters().pause_before_switchover {
            session.enter(Phase::PreSwitchover)?;
            self.progress.set_phase("pre-switchover");
            if !self.progress.wait_for_continue() {
                return Err(MigrationError::Cancelled(" in pre-switchover".into()));
            }
        }
        self.check_cancel()?;
        session.enter(Phase::Device)?;
        self.progress.set_phase("device");
        self.guest.resources().inactivate()?;
        // The final pass runs at full speed (seed 004 lifts the rate limit).
        s.pool.control().set_max_bandwidth(0);
        // A guest without a dirty log (an image) changed nothing since its
        // one pass: the engine sends nothing then.
        let last = session.final_pass(&mut NetSink {
            link: s,
            summary: self.summary,
            progress: self.progress,
            opts: self.opts,
        })?;
        self.summary.precopy_bytes = self.progress.figures().precopy_bytes;
        self.summary.downtime_bytes = last.bytes;
        self.summary.passes = s.pool.generation();
        crate::switchover_trace::mark("source: final pass sent");

        let device_state = self.guest.save_device_state()?;
        crate::switchover_trace::mark("source: device state saved");
        self.summary.device_state_bytes = device_state.len() as u64;
        self.summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
        self.summary.wire_bytes += s.main.send(&Message::DeviceState(device_state.clone()))?;
        self.summary.wire_bytes += s.main.send(&Message::Complete {
            generation: s.pool.generation(),
        })?;
        crate::switchover_trace::mark("source: COMPLETE sent");
        let totals = match s.pool.finish() {
            Ok(t) => t,
            Err(e) => return Err(local_or_destination(e, &s.return_path)),
        };
        crate::switchover_trace::mark("source: channels finished");
        // The guest is paused: memory is as it was at switchover. A
        // destination that verifies gets our digest now and compares it
        // with its own before its guest may run.
        let digest = if s.destination_verifies {
            self.progress.set_phase("verifying");
            let d = self.switchover_digest(&device_state);
            self.summary.wire_bytes += s.main.send(&Message::Verify { digest: d.1 .0 })?;
            self.handed_over = true;
            Some(d)
        } else {
            self.handed_over = true;
            None
        };
        self.summary.add_totals(&totals);
        if let Some(zc) = self.summary.zero_copy.as_mut() {
            (zc.sends, zc.copied) = (totals.zero_copy_sends, totals.zero_copy_copied);
        }

        self.progress.set_phase("completing");
        let timeout = self.opts.completion_timeout;
        match recv_timeout(&s.return_path, timeout, "the destination's RESUMED")? {
            Message::Resumed {
                unix_nanos,
                digest: theirs,
            } => {
                let downtime = paused_at.elapsed();
                crate::switchover_trace::mark("source: RESUMED received");
                tracing::info!(
                    downtime_ms = downtime.as_secs_f64() * 1e3,
                    "the destination runs the guest"
                );
                self.progress.set_downtime(downtime);
                self.summary.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
                self.summary.destination_resumed_at_unix = Some(unix_nanos as f64 / 1e9);
                if let Some((_, ours)) = digest {
                    match theirs {
                        Some(t) if t == ours.0 => self.summary.verified = true,
                        Some(t) => {
                            return Err(MigrationError::DigestMismatch {
                                source_digest: ours.to_string(),
                                destination_digest: Digest(t).to_string(),
                            })
                        }
                        None => return Err(MigrationError::Protocol(
                            "RESUMED without the destination's digest, though it asked to verify"
                                .into(),
                        )),
                    }
                }
            }
            Message::Shut { error: Some(e) } => {
                // It failed, so it does not run the guest: ours may resume.
                self.handed_over = false;
                return Err(MigrationError::Destination(e));
            }
            other => return Err(unexpected("RESUMED", &other)),
        }
        // RESUMED (with equal digests, when verifying) is the destination's
        // word that it runs the guest: the migration has completed. SHUT
        // only ends the session; if it is lost, say so and nothing more.
        match recv_timeout(&s.return_path, timeout, "the destination's SHUT") {
            Ok(Message::Shut { error: None }) => {}
            Ok(other) => tracing::warn!(
                "after RESUMED the destination sent {} instead of a clean SHUT",
                other.name()
            ),
            Err(e) => tracing::warn!("after RESUMED, the destination's SHUT: {e}"),
        }
        // Without verification (the default) the guest stays paused here,
        // so memory is still as it was at switchover; hashing now costs no
        // downtime (and no CPU the destination needed to resume).
        // It runs beside the destination's first moments on the same host
        // when both ends are local (the bench, tests): at the lowest CPU
        // priority, so that it never takes a core from the guest's vCPUs
        // (the hashing threads it starts inherit the priority).
        let (memory, digest) = match digest {
            Some(d) => d,
            None => std::thread::scope(|scope| {
                let memory = &self.memory;
                let device_state = &device_state;
                scope
                    .spawn(move || {
                        lowest_cpu_priority();
                        // SAFETY: as in `switchover_digest`: the guest
                        // stays paused after a completed migration, so its
                        // memory no longer changes.
                        let m = unsafe { Digest::of_still_memory(memory) };
                        (m, Digest::with_device_state(m, device_state))
                    })
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
        };
        crate::switchover_trace::mark("source: digest of memory taken");
        self.summary.switchover_digest = Some(digest.to_string());
        // What the source sent: the guest stays paused after a completed
        // migration, so its memory is not hashed a second time.
        self.summary.digest = Some(memory.to_string());
        Ok(())
    }

    /// The digests of memory, and of memory and device state together, at
    /// switchover.
    ///
    /// Called only while the guest is paused (between stop and the end of
    /// a completed migration, when it stays paused).
    fn switchover_digest(&self, device_state: &[u8]) -> (Digest, Digest) {
        // SAFETY: the guest is paused (see above), and `Guest::pause`
        // promises that its memory no longer changes once it returns; the
        // sender threads only read it.
        let memory = unsafe { Digest::of_still_memory(&self.memory) };
        (memory, Digest::with_device_state(memory, device_state))
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.progress.cancel_requested() {
            return Err(MigrationError::Cancelled(String::new()));
        }
        Ok(())
    }
}

/// Puts the calling thread (and the threads it starts later, which inherit
/// it) at nice 19, the lowest CPU priority, for work that must not compete
/// with a running guest. A thread may always lower its own priority; if it
/// cannot, nothing else changes and it is only logged.
fn lowest_cpu_priority() {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority(2) on this thread's own id (Linux applies
    // PRIO_PROCESS to one thread); no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
        tracing::debug!(
            "lowering the post-switchover digest's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The network's [`PassSink`]: passes through the sender pool, each ended
/// by PASS_END on the main channel; the return path read between passes;
/// SWITCHOVER_ACK awaited before switching over.
struct NetSink<'s, 'a> {
    link: &'s mut Link,
    summary: &'s mut Summary,
    progress: &'a Progress,
    opts: &'a OutgoingOptions,
}

impl PassSink for NetSink<'_, '_> {
    type Error = MigrationError;

    fn before_pass(&mut self) -> Result<(), MigrationError> {
        check_return_path(self.link)
    }

    /// Sends the pages set in `pending` and PASS_END; measures the pass.
    fn send_pass(
        &mut self,
        _number: u64,
        pending: &Arc<Vec<PageBitmap>>,
        live: bool,
    ) -> Result<PassResult, MigrationError> {
        let s = &mut *self.link;
        let before = s.pool.counters().snapshot();
        let t0 = Instant::now();
        let sent = if live {
            s.pool.send_live_pass(pending.clone())
        } else {
            s.pool.send_pass(pending.clone())
        };
        if let Err(e) = sent {
            return Err(local_or_destination(e, &s.return_path));
        }
        self.summary.wire_bytes += s.main.send(&Message::PassEnd {
            generation: s.pool.generation(),
        })?;
        let after = s.pool.counters().snapshot();
        Ok(PassResult {
            bytes: after.wire_bytes - before.wire_bytes,
            pages: (after.pages_normal + after.pages_zero)
                - (before.pages_normal + before.pages_zero),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// With the capability: on `migrate-start-postcopy`, after
    /// `--postcopy-after` passes, or when precopy does not converge (the
    /// bytes left did not shrink and exceed what the downtime allows).
    fn start_postcopy(
        &mut self,
        passes: u64,
        est: &crate::session::Estimate,
        before: Option<u64>,
    ) -> bool {
        if !self.opts.postcopy {
            return false;
        }
        let after = self.opts.postcopy_after.unwrap_or(0);
        // Not converging: what is left exceeds what the downtime allows
        // and shrank by less than a tenth in the last pass.
        let stuck = before.is_some_and(|b| est.remaining as f64 > 0.9 * b as f64)
            && est.remaining as f64 > est.threshold;
        let why = if self.progress.postcopy_requested() {
            "start-postcopy"
        } else if after > 0 && passes >= after {
            "--postcopy-after"
        } else if stuck {
            "precopy does not converge"
        } else {
            return false;
        };
        tracing::info!(passes, why, "switching to postcopy");
        true
    }

    /// With the capability: `--postcopy-after 0`, or `migrate-start-postcopy`
    /// already asked for.
    fn postcopy_at_start(&mut self) -> bool {
        let at_once = self.opts.postcopy
            && (self.opts.postcopy_after == Some(0) || self.progress.postcopy_requested());
        if at_once {
            tracing::info!("switching to postcopy before the first pass");
        }
        at_once
    }

    /// The destination must have sent SWITCHOVER_ACK.
    fn switchover_ready(&mut self) -> Result<Readiness, MigrationError> {
        if self.link.switchover_acked {
            return Ok(Readiness::Ready);
        }
        let what = "SWITCHOVER_ACK";
        match wait_reply(
            self.progress,
            &self.link.return_path,
            self.opts.setup_timeout,
            what,
        )? {
            Message::SwitchoverAck => {
                self.link.switchover_acked = true;
                Ok(Readiness::Waited)
            }
            Message::Shut { error: Some(e) } => Err(MigrationError::Destination(e)),
            other => Err(unexpected(what, &other)),
        }
    }
}

/// Takes what the destination said between passes, without waiting.
fn check_return_path(s: &mut Link) -> Result<(), MigrationError> {
    loop {
        match s.return_path.try_recv() {
            Ok(Ok(Message::SwitchoverAck)) => s.switchover_acked = true,
            Ok(Ok(Message::Shut { error: Some(e) })) => return Err(MigrationError::Destination(e)),
            Ok(Ok(other)) => return Err(unexpected("SWITCHOVER_ACK", &other)),
            Ok(Err(e)) => return Err(e),
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => {
                return Err(MigrationError::MainClosed {
                    peer: "destination",
                    during: "before the migration ended",
                })
            }
        }
    }
}

/// Waits for the next return-path message, giving up on cancel.
fn wait_reply(
    progress: &Progress,
    rp: &ReturnPath,
    timeout: Duration,
    what: &str,
) -> Result<Message, MigrationError> {
    let deadline = Instant::now() + timeout;
    loop {
        if progress.cancel_requested() {
            return Err(MigrationError::Cancelled(String::new()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::Protocol(format!(
                "no {what} from the destination within {:.1} s",
                timeout.as_secs_f64()
            )));
        }
        match rp.recv_timeout(left.min(POLL)) {
            Ok(m) => return m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::MainClosed {
                    peer: "destination",
                    during: "before the migration ended",
                })
            }
        }
    }
}

fn unexpected(expected: &str, got: &Message) -> MigrationError {
    MigrationError::Protocol(format!("expected {expected}, got {}", got.name()))
}

type Channels = Vec<Box<dyn Channel>>;

/// Connects main and the multifd channels, then waits until the
/// destination has accepted every one of them.
pub(crate) fn open_session(
    uri: &ChannelUri,
    opts: &OutgoingOptions,
    session: SessionId,
) -> Result<(Box<dyn Channel>, Channels), MigrationError> {
    let hello = |role, index| ChannelHello {
        session,
        role,
        index,
        multifd_channels: opts.channels,
    };
    let tls = opts.tls.as_deref();
    // Data unacknowledged for the peer timeout ends a connection.
    let tuning = SocketTuning {
        user_timeout: Some(opts.peer_timeout),
        ..opts.tuning.clone()
    };
    let main = connect_channel_secure(uri, &tuning, &hello(Role::Main, 0), tls)?;
    let mut multifd: Vec<Box<dyn Channel>> = Vec::new();
    for i in 0..opts.channels {
        match connect_channel_secure(uri, &tuning, &hello(Role::Multifd, i), tls) {
            Ok(ch) => multifd.push(ch),
            // With TLS 1.3 a server that refuses our certificate says so
            // only after our side of the handshake is done: its alert
            // waits on the main channel and explains this failure.
            Err(e) => return Err(pending_refusal(main.as_ref()).unwrap_or(e).into()),
        }
    }
    await_accept(main.as_ref(), opts.setup_timeout)?;
    for ch in &multifd {
        await_accept(ch.as_ref(), opts.setup_timeout)?;
    }
    Ok((main, multifd))
}

/// What the destination said on a channel it refused, if it said anything
/// (a TLS alert, a refusal) within a moment.
fn pending_refusal(ch: &dyn Channel) -> Option<ferry_transport::TransportError> {
    match await_accept(ch, Duration::from_millis(500)) {
        Err(e @ ferry_transport::TransportError::Io { .. })
        | Err(e @ ferry_transport::TransportError::Refused { .. }) => Some(e),
        _ => None,
    }
}

type ReturnPath = Receiver<Result<Message, MigrationError>>;

/// Stops the data path when the destination has failed.
type StopHook = Box<dyn Fn() + Send + Sync>;

/// Answers a postcopy page request where the return path reads it (true:
/// answered), one thread hop fewer per request than handing it to the
/// serving loop: each hop is a wake-up on another CPU, on a machine whose
/// cores the guest's vCPUs and the push keep busy. False hands the request
/// on after all: the serving loop answers it, or meets the failure.
pub(crate) type AnswerRequest = Box<dyn Fn(&crate::postcopy::wire::PageRun) -> bool + Send>;
/// Where the serving loop installs its [`AnswerRequest`] (and takes it
/// away: the lock is held while one request is answered, so none is
/// answered after).
pub(crate) type RequestHook = Arc<Mutex<Option<AnswerRequest>>>;

/// Reads the return path on its own thread until SHUT or an error. A SHUT
/// with an error, or a broken return path, runs `on_failure` (once set):
/// the source need not finish a pass the destination no longer reads.
/// Page requests go to `answer` while one is installed.
fn spawn_return_path(
    main: Arc<MainChannel>,
    on_failure: Arc<OnceLock<StopHook>>,
    answer: RequestHook,
) -> Result<ReturnPath, MigrationError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("ferry-return-path".into())
        .spawn(move || loop {
            let m = main.recv("destination").map(|(m, _)| m);
            if let Ok(Message::PageRequest(run)) = &m {
                if answer.lock().unwrap().as_ref().is_some_and(|a| a(run)) {
                    continue;
                }
            }
            let failed = matches!(m, Err(_) | Ok(Message::Shut { error: Some(_) }));
            let last = !matches!(
                m,
                Ok(Message::SetupAck { .. }
                    | Message::SwitchoverAck
                    | Message::EarlyDiscarded
                    | Message::Resumed { .. }
                    | Message::PageRequest(_))
            );
            let gone = tx.send(m).is_err();
            if failed {
                if let Some(stop) = on_failure.get() {
                    stop();
                }
            }
            if gone || last {
                break;
            }
        })
        .map_err(|e| MigrationError::Thread("return-path", e))?;
    Ok(rx)
}

fn recv_timeout(rp: &ReturnPath, timeout: Duration, what: &str) -> Result<Message, MigrationError> {
    match rp.recv_timeout(timeout) {
        Ok(m) => m,
        Err(RecvTimeoutError::Timeout) => Err(MigrationError::Protocol(format!(
            "no {what} from the destination within {:.0}s",
            timeout.as_secs_f64()
        ))),
        Err(RecvTimeoutError::Disconnected) => Err(MigrationError::MainClosed {
            peer: "destination",
            during: "before the migration ended",
        }),
    }
}

/// A data-path failure as the user should see it: if the destination went
/// away, its own account (SHUT) when it sends one promptly, as it usually
/// caused the failure; a failure of our own (a refused send, say) as is.
fn local_or_destination(e: ferry_multifd::MultifdError, rp: &ReturnPath) -> MigrationError {
    if e.is_connection_loss() {
        destination_reason(rp).unwrap_or(e.into())
    } else {
        e.into()
    }
}

/// The destination's SHUT error, or the return path's own failure, if
/// either comes within 2 s.
fn destination_reason(rp: &ReturnPath) -> Option<MigrationError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(m) = rp.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        match m {
            Ok(Message::Shut { error: Some(e) }) => return Some(MigrationError::Destination(e)),
            Ok(Message::SwitchoverAck) => continue,
            // The return path failed first (a corrupt frame, say): that is
            // why the data path was stopped.
            Err(e) => return Some(e),
            _ => return None,
        }
    }
    None
}

/// Now (Unix time, nanoseconds).
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    use ferry_multifd::{MultifdError, ReceiverOptions, ReceiverPool};
    use ferry_ram::pattern::{fill_block, Pattern};
    use ferry_ram::BlockSpec;
    use ferry_transport::{SocketChannel, TransportError};

    use super::*;
    use crate::{
        DirtyPattern, ImageGuest, Resources, SyntheticConfig, SyntheticGuest, TrackerKind,
    };

    const KIB: u64 = 1 << 10;
    const PAGE: u64 = 4 * KIB;

    fn memory(len: u64) -> Arc<GuestMemory> {
        let specs = [BlockSpec {
            name: "ram".into(),
            len,
            page_size: PAGE as u32,
        }];
        Arc::new(GuestMemory::anonymous(&specs).unwrap())
    }

    /// Both ends of a connected unix socket, as channels.
    fn channel_pair(label: &str) -> (Box<dyn Channel>, Box<dyn Channel>) {
        let (a, b) = UnixStream::pair().unwrap();
        let ch = |s: UnixStream, side: &str| -> Box<dyn Channel> {
            Box::new(SocketChannel::new(
                socket2::Socket::from(OwnedFd::from(s)),
                format!("{label} ({side})"),
            ))
        };
        (ch(a, "source"), ch(b, "destination"))
    }

    /// A main channel and its peer's end.
    fn main_pair() -> (Arc<MainChannel>, Arc<MainChannel>) {
        let (a, b) = channel_pair("main");
        let timeout = Duration::from_secs(30);
        (
            MainChannel::new(Arc::from(a), timeout).unwrap(),
            MainChannel::new(Arc::from(b), timeout).unwrap(),
        )
    }

    fn closed(channel: &str) -> MultifdError {
        MultifdError::Closed {
            channel: channel.into(),
            during: "in a pass".into(),
        }
    }

    #[test]
    fn a_failure_resumes_the_guest_and_lifts_its_throttle() {
        let config = SyntheticConfig {
            vcpus: 1,
            dirty_rate: 64 * KIB,
            pattern: DirtyPattern::Random,
            seed: 1,
            tracker: TrackerKind::Bitmap,
        };
        let guest = SyntheticGuest::start(memory(256 * KIB), &config, Resources::none(true))
            .expect("a synthetic guest");
        guest.set_throttle(40);
        guest.dirty_log().unwrap().start().unwrap();
        guest.pause().unwrap();
        guest.resources().inactivate().unwrap();
        assert_eq!(after_failure(&guest, true, false), None);
        assert!(guest.is_running(), "the guest runs on");
        assert_eq!(guest.throttle(), 0, "the throttle is lifted");
        assert!(guest.resources().is_active(), "its resources are back");
        guest.pause().unwrap();
    }

    #[test]
    fn a_guest_that_was_paused_stays_paused_with_its_resources_back() {
        let guest = ImageGuest::from_memory(memory(64 * KIB), Vec::new());
        guest.pause().unwrap();
        guest.resources().inactivate().unwrap();
        assert_eq!(restore_source(&guest, false), None);
        assert!(!guest.is_running());
        assert!(guest.resources().is_active());
    }

    #[test]
    fn a_handed_over_guest_stays_paused_and_its_resources_are_left_alone() {
        let guest = ImageGuest::from_memory(memory(64 * KIB), Vec::new());
        guest.pause().unwrap();
        guest.resources().inactivate().unwrap();
        let why = after_failure(&guest, true, true).expect("kept paused");
        assert!(why.contains("check the destination"), "{why}");
        assert!(!guest.is_running(), "two running copies would diverge");
        assert!(
            !guest.resources().is_active(),
            "the destination may hold them"
        );
    }

    #[test]
    fn resources_held_elsewhere_keep_the_guest_paused_and_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("disk.lock");
        let guest = ImageGuest::from_memory(memory(64 * KIB), Vec::new())
            .with_resources(Resources::new(std::slice::from_ref(&lock), true).unwrap());
        guest.pause().unwrap();
        guest.resources().inactivate().unwrap();
        // The destination took the lock meanwhile.
        let destination = Resources::new(std::slice::from_ref(&lock), true).unwrap();
        let why = restore_source(&guest, true).expect("kept paused");
        assert!(!why.is_empty());
        assert!(
            !guest.is_running(),
            "resuming would give the guest two owners"
        );
        // Once the destination lets go, the guest runs on.
        destination.inactivate().unwrap();
        assert_eq!(restore_source(&guest, true), None);
        assert!(guest.is_running());
        assert!(guest.resources().is_active());
    }

    /// Refusal bytes as the transport's handshake writes them.
    fn refusal(reason: &str) -> Vec<u8> {
        let mut b = b"FRY!".to_vec();
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        b.extend_from_slice(reason.as_bytes());
        b
    }

    #[test]
    fn pending_refusal_reports_what_the_destination_said_and_nothing_else() {
        let (ours, theirs) = channel_pair("main");
        theirs
            .write_all(&refusal("certificate not trusted"))
            .unwrap();
        match pending_refusal(ours.as_ref()) {
            Some(TransportError::Refused { reason, .. }) => {
                assert_eq!(reason, "certificate not trusted")
            }
            other => panic!("expected the refusal, got {other:?}"),
        }
        // A channel closed before any reply: why the connect failed.
        let (ours, theirs) = channel_pair("main");
        drop(theirs);
        assert!(matches!(
            pending_refusal(ours.as_ref()),
            Some(TransportError::Io { .. })
        ));
        // An acceptance, or silence, explains nothing.
        let (ours, theirs) = channel_pair("main");
        theirs.write_all(b"FRY!\0\0\0\0").unwrap();
        assert!(pending_refusal(ours.as_ref()).is_none());
        let (ours, _theirs) = channel_pair("main");
        assert!(pending_refusal(ours.as_ref()).is_none());
    }

    #[test]
    fn the_destinations_own_account_is_preferred_and_named() {
        // Its SHUT, after any SWITCHOVER_ACK still queued.
        let (tx, rp) = mpsc::channel();
        tx.send(Ok(Message::SwitchoverAck)).unwrap();
        tx.send(Ok(Message::Shut {
            error: Some("disk full".into()),
        }))
        .unwrap();
        match local_or_destination(closed("multifd[0]"), &rp) {
            MigrationError::Destination(e) => assert_eq!(e, "disk full"),
            other => panic!("expected the destination's error, got {other}"),
        }
        // The return path's own failure is why the data path stopped.
        let (tx, rp) = mpsc::channel();
        tx.send(Err(MigrationError::Protocol("a corrupt frame".into())))
            .unwrap();
        let e = destination_reason(&rp).expect("the return path's failure");
        assert_eq!(e.to_string(), "main channel: a corrupt frame");
        // Anything else explains nothing.
        let (tx, rp) = mpsc::channel();
        tx.send(Ok(Message::Shut { error: None })).unwrap();
        assert!(destination_reason(&rp).is_none());
        // Without a word from the destination the local error stands.
        let (tx, rp) = mpsc::channel::<Result<Message, MigrationError>>();
        drop(tx);
        match local_or_destination(closed("multifd[1]"), &rp) {
            MigrationError::Multifd(MultifdError::Closed { channel, .. }) => {
                assert_eq!(channel, "multifd[1]")
            }
            other => panic!("expected the local error, got {other}"),
        }
        // A failure of our own is ours, whatever the destination says.
        let (tx, rp) = mpsc::channel();
        tx.send(Ok(Message::Shut {
            error: Some("disk full".into()),
        }))
        .unwrap();
        let ours = MultifdError::Io {
            channel: "multifd[0]".into(),
            what: "sending a packet",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        };
        assert!(matches!(
            local_or_destination(ours, &rp),
            MigrationError::Multifd(MultifdError::Io { .. })
        ));
        assert!(
            rp.try_recv().is_ok(),
            "the destination's word is left unread"
        );
    }

    #[test]
    fn a_missed_deadline_names_what_was_awaited() {
        let (tx, rp) = mpsc::channel::<Result<Message, MigrationError>>();
        let e =
            recv_timeout(&rp, Duration::from_millis(10), "the destination's RESUMED").unwrap_err();
        assert!(
            matches!(&e, MigrationError::Protocol(m) if m.contains("the destination's RESUMED")),
            "{e}"
        );
        tx.send(Ok(Message::Resumed {
            unix_nanos: 7,
            digest: None,
        }))
        .unwrap();
        assert_eq!(
            recv_timeout(&rp, Duration::from_secs(30), "RESUMED").unwrap(),
            Message::Resumed {
                unix_nanos: 7,
                digest: None
            }
        );
        drop(tx);
        assert!(matches!(
            recv_timeout(&rp, Duration::from_secs(30), "SHUT"),
            Err(MigrationError::MainClosed {
                peer: "destination",
                ..
            })
        ));
        // wait_reply says the same, and gives up on a cancel.
        let (_tx, rp) = mpsc::channel::<Result<Message, MigrationError>>();
        let progress = Progress::default();
        let e = wait_reply(&progress, &rp, Duration::from_millis(10), "SETUP_ACK").unwrap_err();
        assert!(
            e.to_string().contains("no SETUP_ACK from the destination"),
            "{e}"
        );
        progress.cancel();
        assert!(matches!(
            wait_reply(&progress, &rp, Duration::from_secs(30), "SETUP_ACK"),
            Err(MigrationError::Cancelled(_))
        ));
    }

    /// The network sink over a real sender pool and receiver pool: a live
    /// pass carries a crc per page when checksums are on (the sender
    /// re-checks them once sent), a pass with the guest paused does not;
    /// both end with PASS_END and leave the destination equal.
    #[test]
    fn the_net_sink_chooses_the_live_pass_while_the_guest_runs() {
        const LEN: u64 = 256 * KIB;
        let pages = LEN / PAGE;
        for checksum in [true, false] {
            let src = memory(LEN);
            fill_block(&src.blocks()[0], Pattern::Random, 7);
            let dst = memory(LEN);
            let (ours, theirs): (Vec<_>, Vec<_>) = (0..2)
                .map(|i| channel_pair(&format!("multifd[{i}]")))
                .unzip();
            let sender = SenderOptions {
                checksum,
                ..SenderOptions::default()
            };
            let pool = SenderPool::start(ours, src.clone(), sender).unwrap();
            let ropts = ReceiverOptions {
                fresh_memory: true,
                compressed: false,
                checksums: checksum,
            };
            let receivers = ReceiverPool::start(theirs, dst.clone(), ropts, || {}).unwrap();
            let (main, peer) = main_pair();
            let (_tx, return_path) = mpsc::channel();
            let mut link = Link {
                main,
                return_path,
                answer_requests: RequestHook::default(),
                pool,
                switchover_acked: false,
                destination_verifies: false,
                preempt: Vec::new(),
                session: SessionId::random(),
            };
            let mut summary = Summary::new(SummaryRole::Source, "unix:test".into());
            let progress = Progress::default();
            let opts = OutgoingOptions::default();
            let mut sink = NetSink {
                link: &mut link,
                summary: &mut summary,
                progress: &progress,
                opts: &opts,
            };
            let stall = Some(Duration::from_secs(30));
            let mut sent = Vec::new();
            for (number, live) in [(1, false), (2, true)] {
                let pending = Arc::new(vec![PageBitmap::new(pages, true)]);
                let pass = sink.send_pass(number, &pending, live).unwrap();
                assert_eq!(pass.pages, pages, "pass {number}");
                assert_eq!(pending[0].count(), 0, "every page taken");
                let (end, _) = peer.recv("source").unwrap();
                assert_eq!(end, Message::PassEnd { generation: number });
                receivers.wait_sync_within(number, stall).unwrap();
                sent.push(pass.bytes);
            }
            let crcs = if checksum { 4 * pages } else { 0 };
            assert_eq!(sent[1], sent[0] + crcs, "checksum {checksum}: {sent:?}");
            link.pool.finish().unwrap();
            let totals = receivers.finish_within(stall).unwrap();
            assert_eq!(totals.pages_normal, 2 * pages);
            assert_eq!(Digest::of_guest(&dst, &[]), Digest::of_guest(&src, &[]));
            assert_eq!(
                summary.wire_bytes,
                2 * Message::PassEnd { generation: 1 }.frame(0).len() as u64
            );
        }
    }
}
