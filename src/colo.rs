//! COLO's glue to a guest: the primary and secondary loops that run after
//! an ordinary migration (`send --colo` / `recv --colo`), over a
//! [`Guest`] and a fresh session of the same kind as the migration's
//! (main + K multifd channels, TLS and zstd as configured).
//!
//! The pieces that need no guest live in the `ferry-colo` crate (`colo/`):
//! messages and their order, the RAM cache, output comparison, triggers
//! and the failover status. This module owns:
//! - [`run_primary`]: waits for CHECKPOINT_READY, resumes the guest, then
//!   takes checkpoints when [`ferry_colo::Triggers`] says so: REQUEST →
//!   REPLY → pause → VMSTATE_SEND (dirty bitmap and the outputs still
//!   held) → the dirty pages as one multifd pass → VMSTATE_SIZE, VMSTATE →
//!   RECEIVED → LOADED → release held outputs → resume. Its outputs are
//!   compared with the secondary's (OUTPUT messages) as they come.
//! - [`run_secondary`]: receives each checkpoint into the [`RamCache`],
//!   and only when the device state has arrived too (RECEIVED sent) makes
//!   its memory equal the primary's and loads the device state; it sends
//!   its outputs to the primary and keeps those since its last commit, so
//!   that after a failover it can release what the client may lack.
//! - failover: a broken or silent main channel (`--heartbeat-timeout`), a
//!   message out of order, or `ctl failover` end COLO; the survivor goes
//!   on alone, releasing its outputs itself. A failover asked for during a
//!   load waits for the load (and happens after a failed load too).
//!
//! The guest is the synthetic one or any other kind the secondary's
//! builder is given ([`secondary_builder_with`], [`ColoGuestKind`]):
//! ferry-vmm's KVM guest, whose output records come from its own port.
//!
//! The session's setup on the COLO link: the primary sends SETUP (the
//! migration's SETUP message: checksum/zstd capabilities, channels,
//! blocks), the secondary checks the blocks against its memory and answers
//! CHECKPOINT_READY.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_colo::compare::{CompareStats, HistoryError};
use ferry_colo::trigger::TriggerCounts;
use ferry_colo::wire::Side;
/// An output record (a guest crate emitting them, ferry-vmm's, names it
/// from here).
pub use ferry_colo::Record;
use ferry_colo::{
    ClientHistory, ColoError, ColoMessage, ColoMode, ColoStatus, Comparator, Expect,
    FailoverReason, RamCache, StatusCell, TriggerKind, Triggers,
};
use ferry_multifd::{ReceiverOptions, ReceiverPool, SenderPool};
use ferry_ram::{GuestMemory, PageBitmap};
use ferry_transport::{accept_session, AcceptOptions, ChannelUri, Listener, SessionId};

use crate::outgoing::{open_session, OutgoingOptions};
use crate::protocol::{MainChannel, Message, Setup, CAP_CHECKSUM, CAP_COLO, CAP_ZSTD};
use crate::synthetic::OutputHook;
use crate::{Guest, GuestBuilder, GuestError, MigrationError, Resources, SyntheticGuest};

/// The COLO session's packet size on io_uring sendmsg paths, which take
/// at most 1024 iovecs a call (`SenderPool::start` checks).
const COLO_SENDMSG_PACKET_PAGES: u32 = 960;

/// How often queued outputs are compared or forwarded.
const OUTPUT_TICK: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum ColoRunError {
    #[error(transparent)]
    Migration(MigrationError),
    /// A silent or stalled peer during COLO: the same error as a
    /// migration's, but COLO's limit is `--heartbeat-timeout`.
    #[error("{}", heartbeat_text(.0))]
    Heartbeat(MigrationError),
    #[error(transparent)]
    Colo(#[from] ColoError),
    #[error("checkpoint {checkpoint}: the secondary's memory has digest {secondary:#034x}, the primary's {primary:#034x}")]
    Diverged {
        checkpoint: u64,
        primary: u128,
        secondary: u128,
    },
    #[error("COLO main channel: {0}")]
    Protocol(String),
    #[error("failover requested")]
    FailoverRequested,
    /// The secondary refused the COLO session: the sides disagree on a
    /// value both must share. It does not take over.
    #[error("COLO setup refused: {0}")]
    Refused(String),
    #[error("killed at {0:?} (test)")]
    Killed(KillPoint),
}

impl From<MigrationError> for ColoRunError {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::PeerSilent { .. }
            | MigrationError::PeerStalled { .. }
            | MigrationError::Multifd(ferry_multifd::MultifdError::Stalled { .. }) => {
                Self::Heartbeat(e)
            }
            e => Self::Migration(e),
        }
    }
}

/// A timeout error's text with the flag that set its limit in COLO.
fn heartbeat_text(e: &MigrationError) -> String {
    e.to_string()
        .replace("(--peer-timeout)", "(--heartbeat-timeout)")
}

impl From<GuestError> for ColoRunError {
    fn from(e: GuestError) -> Self {
        Self::Migration(e.into())
    }
}
impl From<ferry_multifd::MultifdError> for ColoRunError {
    fn from(e: ferry_multifd::MultifdError) -> Self {
        Self::Migration(e.into())
    }
}
impl From<ferry_transport::TransportError> for ColoRunError {
    fn from(e: ferry_transport::TransportError) -> Self {
        Self::Migration(e.into())
    }
}
impl From<ferry_ram::RamError> for ColoRunError {
    fn from(e: ferry_ram::RamError) -> Self {
        Self::Migration(e.into())
    }
}

/// Where a test kills one side (it stops dead: channels shut, guest
/// paused, nothing more released).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KillPoint {
    /// The checkpoint during which to die (1 = the first).
    pub checkpoint: u64,
    pub stage: KillStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillStage {
    /// This long after COLO started, wherever the side then is (the
    /// checkpoint number is ignored).
    Running(Duration),
    /// Primary: REQUEST sent. Secondary: REPLY sent.
    AfterRequest,
    /// Primary: VMSTATE_SEND sent, pages not yet. Secondary: VMSTATE_SEND read.
    MidCheckpoint,
    /// Primary: RECEIVED read. Secondary: RECEIVED sent.
    AfterReceived,
    /// This long after COLO started the side goes silent: no heartbeat,
    /// no message, its sockets left open (a hung host: only the peer's
    /// heartbeat timeout notices).
    Silent(Duration),
}

#[derive(Clone, Debug)]
pub struct ColoOptions {
    /// The period between checkpoints (`--checkpoint-delay`).
    pub checkpoint_delay: Duration,
    /// The longest silence from the peer before failover
    /// (`--heartbeat-timeout`); heartbeats go out four times within it.
    pub heartbeat_timeout: Duration,
    /// How long the secondary waits for the primary's COLO session.
    pub setup_timeout: Duration,
    /// The secondary sends its memory's digest with LOADED and the
    /// primary compares it with its own (a test's check; costs a digest
    /// of all memory on both sides per checkpoint).
    pub verify: bool,
    /// Each vCPU's output record every this many writes
    /// (`--colo-output-every`): both sides must agree (COLO_SETUP).
    pub output_every: u64,
    /// Stop (poweroff) after this many checkpoints.
    pub max_checkpoints: Option<u64>,
    /// Test only: die here.
    pub kill: Option<KillPoint>,
    /// Test only: called in the middle of the secondary's load of every
    /// checkpoint (a failover asked for then must wait for the load).
    #[doc(hidden)]
    pub test_during_load: Option<LoadHook>,
    /// Test only: the secondary's load of this checkpoint fails.
    #[doc(hidden)]
    pub test_load_error_at: Option<u64>,
}

impl Default for ColoOptions {
    fn default() -> Self {
        Self {
            checkpoint_delay: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_secs(1),
            setup_timeout: Duration::from_secs(30),
            verify: false,
            output_every: 64,
            max_checkpoints: None,
            kill: None,
            test_during_load: None,
            test_load_error_at: None,
        }
    }
}

/// A test's hook (see [`ColoOptions::test_during_load`]).
#[derive(Clone)]
pub struct LoadHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for LoadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadHook")
    }
}

/// Outputs a guest emitted, queued until the COLO loop takes them.
#[derive(Default)]
pub struct OutputQueue {
    queue: Mutex<Vec<Record>>,
}

impl OutputQueue {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }
    /// The hook to give the guest ([`SyntheticGuest::set_output`]).
    pub fn hook(self: &Arc<Self>) -> OutputHook {
        let q = self.clone();
        Arc::new(move |r| q.queue.lock().unwrap().push(r))
    }
    pub fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.queue.lock().unwrap())
    }
}

/// The client: where released outputs go (`--colo-output`).
pub trait OutputSink: Send + Sync {
    fn release(&self, records: &[Record]);
}

/// A client that keeps what it was released as a [`ClientHistory`], and
/// every record the history refused (a gap or a contradiction): the view
/// a test, or an embedder checking a run, has of COLO's outputs.
#[derive(Default)]
pub struct HistorySink {
    pub history: Mutex<ClientHistory>,
    pub errors: Mutex<Vec<HistoryError>>,
}

impl OutputSink for HistorySink {
    fn release(&self, records: &[Record]) {
        let mut h = self.history.lock().unwrap();
        for r in records {
            if let Err(e) = h.accept(*r) {
                self.errors.lock().unwrap().push(e);
            }
        }
    }
}

/// A client that writes each new record as a line `VCPU SEQ VALUE(hex)`
/// to a file or a TCP connection, dropping one it already wrote (a
/// survivor re-sending what the client may lack), and counting gaps.
pub struct WriterSink {
    inner: Mutex<WriterState>,
}

/// The writer, each vCPU's last record number written, and the gaps seen.
type WriterState = (
    Box<dyn Write + Send>,
    std::collections::BTreeMap<u16, u64>,
    u64,
);

impl WriterSink {
    /// `PATH` or `tcp:HOST:PORT`.
    pub fn open(spec: &str) -> std::io::Result<Self> {
        let w: Box<dyn Write + Send> = match spec.strip_prefix("tcp:") {
            Some(addr) => Box::new(std::net::TcpStream::connect(addr)?),
            None => Box::new(std::fs::File::create(spec)?),
        };
        Ok(Self {
            inner: Mutex::new((w, Default::default(), 0)),
        })
    }
    /// Records that came after a gap (should stay 0).
    pub fn gaps(&self) -> u64 {
        self.inner.lock().unwrap().2
    }
}

impl OutputSink for WriterSink {
    fn release(&self, records: &[Record]) {
        let mut g = self.inner.lock().unwrap();
        let (w, last, gaps) = &mut *g;
        let mut text = String::new();
        for r in records {
            let l = last.entry(r.vcpu).or_insert(r.seq.saturating_sub(1));
            if r.seq <= *l {
                continue;
            }
            if r.seq != *l + 1 {
                *gaps += 1;
            }
            *l = r.seq;
            text.push_str(&format!("{} {} {:016x}\n", r.vcpu, r.seq, r.value));
        }
        if let Err(e) = w.write_all(text.as_bytes()).and_then(|()| w.flush()) {
            tracing::warn!("--colo-output: {e}");
        }
    }
}

/// What the control socket reaches while COLO runs.
pub struct ColoControl {
    pub triggers: Triggers,
    pub status: StatusCell,
    poweroff: AtomicBool,
    /// Shuts the COLO channels (a forced failover must not wait for a read).
    breaker: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Test only: stops the heartbeat (a side gone silent).
    silencer: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    silenced: AtomicBool,
    live: Mutex<ColoLive>,
}

/// Live figures for the progress display.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ColoLive {
    pub checkpoints: u64,
    pub last_pause_ms: f64,
    pub last_bytes: u64,
    pub mismatches: u64,
    pub released: u64,
    pub held: u64,
}

impl ColoControl {
    pub fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            triggers: Triggers::new(delay),
            status: StatusCell::new(),
            poweroff: AtomicBool::new(false),
            breaker: Mutex::new(None),
            silencer: Mutex::new(None),
            silenced: AtomicBool::new(false),
            live: Mutex::new(ColoLive::default()),
        })
    }
    /// `ctl checkpoint`.
    pub fn checkpoint(&self) {
        self.triggers.request(TriggerKind::Request);
    }
    /// `ctl failover`: false if COLO is not running.
    pub fn failover(&self) -> bool {
        let Some(state) = self.status.request(FailoverReason::Request, None) else {
            return false;
        };
        // During a load the loop completes the failover after it.
        if state != ferry_colo::FailoverState::Relaunch {
            self.break_link();
        }
        self.triggers.stop();
        true
    }
    /// Stop the guest on both sides and end.
    pub fn poweroff(&self) {
        self.poweroff.store(true, Ordering::SeqCst);
        self.triggers.poke();
    }
    /// Whether a poweroff was asked for.
    pub fn poweroff_requested(&self) -> bool {
        self.poweroff.load(Ordering::SeqCst)
    }
    pub fn query(&self) -> ColoStatus {
        self.status.get()
    }
    pub fn live(&self) -> ColoLive {
        *self.live.lock().unwrap()
    }
    /// Test only: cuts the COLO channels as a broken link would, with no
    /// failover requested (each side must notice by itself).
    #[doc(hidden)]
    pub fn cut_link(&self) {
        self.break_link();
    }
    fn break_link(&self) {
        if let Some(b) = self.breaker.lock().unwrap().as_ref() {
            b();
        }
    }
}

/// Percentiles of the primary's pause per checkpoint.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PauseStats {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Mean of the first ten pauses and of the last ten (a pause that
    /// grows over a run shows here).
    pub first10_mean_ms: f64,
    pub last10_mean_ms: f64,
}

/// What a COLO run did, for the JSON summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ColoSummary {
    pub role: &'static str,
    pub checkpoints: u64,
    pub by_trigger: TriggerCounts,
    pub pause: PauseStats,
    /// Bytes per checkpoint (pages, device state and messages).
    pub bytes_per_checkpoint_mean: u64,
    pub bytes_per_checkpoint_max: u64,
    pub pages_per_checkpoint_mean: u64,
    pub compare: CompareStats,
    /// Outputs released to the client by this side.
    pub released: u64,
    /// How COLO ended: "failover", "poweroff", "killed" or (secondary)
    /// "refused" (COLO_SETUP differed).
    pub end: &'static str,
    pub status: ColoStatus,
    /// From detecting the end to the survivor running alone.
    pub failover_ms: Option<f64>,
    /// The guest runs here after COLO.
    pub guest_running: bool,
    /// Secondary: the device state of the last checkpoint it loaded.
    #[serde(skip)]
    pub last_loaded_state: Vec<u8>,
}

struct Figures {
    pauses: hdrhistogram::Histogram<u64>,
    /// Every pause, in order (microseconds).
    pause_list: Vec<u64>,
    bytes: Vec<u64>,
    pages: Vec<u64>,
    released: u64,
    last_state: Vec<u8>,
}

impl Figures {
    fn new() -> Self {
        Self {
            pauses: hdrhistogram::Histogram::new(3).expect("3 significant figures"),
            pause_list: Vec::new(),
            bytes: Vec::new(),
            pages: Vec::new(),
            released: 0,
            last_state: Vec::new(),
        }
    }
    fn summary(
        &self,
        role: &'static str,
        ctl: &ColoControl,
        compare: CompareStats,
        end: &'static str,
        failover_ms: Option<f64>,
        guest_running: bool,
    ) -> ColoSummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let n = self.bytes.len().max(1) as u64;
        ColoSummary {
            role,
            checkpoints: self.bytes.len() as u64,
            by_trigger: ctl.triggers.counts(),
            pause: if self.pauses.is_empty() {
                PauseStats::default()
            } else {
                let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1e3;
                let n = self.pause_list.len();
                PauseStats {
                    p50_ms: ms(self.pauses.value_at_quantile(0.5)),
                    p99_ms: ms(self.pauses.value_at_quantile(0.99)),
                    max_ms: ms(self.pauses.max()),
                    first10_mean_ms: mean(&self.pause_list[..n.min(10)]),
                    last10_mean_ms: mean(&self.pause_list[n.saturating_sub(10)..]),
                }
            },
            bytes_per_checkpoint_mean: self.bytes.iter().sum::<u64>() / n,
            bytes_per_checkpoint_max: self.bytes.iter().copied().max().unwrap_or(0),
            pages_per_checkpoint_mean: self.pages.iter().sum::<u64>() / n,
            compare,
            released: self.released,
            end,
            status: ctl.status.get(),
            failover_ms,
            guest_running,
            last_loaded_state: self.last_state.clone(),
        }
    }
}

fn colo_send(main: &MainChannel, m: &ColoMessage) -> Result<u64, ColoRunError> {
    Ok(main.send(&Message::Colo(m.encode()))?)
}

fn colo_recv(main: &MainChannel, peer: &'static str) -> Result<(ColoMessage, u64), ColoRunError> {
    match main.recv(peer)? {
        (Message::Colo(b), n) => Ok((ColoMessage::decode(&b, "main")?, n)),
        (Message::Shut { error }, _) => Err(ColoRunError::Protocol(format!(
            "the {peer} ended COLO: {}",
            error.unwrap_or_else(|| "no reason given".into())
        ))),
        (other, _) => Err(ColoRunError::Protocol(format!(
            "{} from the {peer} during COLO",
            other.name()
        ))),
    }
}

fn fresh_bitmaps(memory: &GuestMemory) -> Vec<PageBitmap> {
    memory
        .blocks()
        .iter()
        .map(|b| PageBitmap::new(b.pages(), false))
        .collect()
}

type Killer = (Arc<AtomicBool>, std::thread::JoinHandle<()>);

/// What both sides do once their loop has ended, before settling how COLO
/// ended: a test's kill counts as such, the triggers and the link stop, and
/// the killer thread (if any) is joined.
fn wind_down(
    result: Result<(), ColoRunError>,
    killed: &AtomicBool,
    killer: Option<Killer>,
    opts: &ColoOptions,
    ctl: &ColoControl,
) -> Result<(), ColoRunError> {
    let result = match (killed.load(Ordering::SeqCst), opts.kill) {
        (true, Some(k)) => Err(ColoRunError::Killed(k)),
        _ => result,
    };
    ctl.triggers.stop();
    ctl.break_link();
    if let Some((stop, t)) = killer {
        stop.store(true, Ordering::SeqCst);
        let _ = t.join();
    }
    result
}

/// For a `Running` kill point: a thread that, when the time comes, marks
/// the side dead (`dead_flag`: nothing more is released) and cuts its
/// channels.
fn spawn_killer(
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    killed: &Arc<AtomicBool>,
    dead_flag: Option<Arc<AtomicBool>>,
) -> Option<Killer> {
    let (after, silent) = match opts.kill {
        Some(KillPoint {
            stage: KillStage::Running(after),
            ..
        }) => (after, false),
        Some(KillPoint {
            stage: KillStage::Silent(after),
            ..
        }) => (after, true),
        _ => return None,
    };
    let hb = opts.heartbeat_timeout;
    let stop = Arc::new(AtomicBool::new(false));
    let (ctl, killed, stop2) = (ctl.clone(), killed.clone(), stop.clone());
    let t = std::thread::spawn(move || {
        let until = Instant::now() + after;
        while Instant::now() < until {
            if stop2.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Silent first: a checkpoint whose held outputs were cut short by
        // the dead flag must never be sent.
        if silent {
            ctl.silenced.store(true, Ordering::SeqCst);
            if let Some(s) = ctl.silencer.lock().unwrap().as_ref() {
                s();
            }
        }
        if let Some(d) = dead_flag {
            d.store(true, Ordering::SeqCst);
        }
        killed.store(true, Ordering::SeqCst);
        let since = Instant::now();
        ctl.triggers.stop();
        // The channels may not exist yet: cut them once they do (a silent
        // side only once the peer had time to notice).
        while !stop2.load(Ordering::SeqCst) {
            if !silent || since.elapsed() > hb * 4 {
                ctl.break_link();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    Some((stop, t))
}

/// [`colo_send`], unless a test silenced this side (a hung host sends
/// nothing more).
fn live_send(ctl: &ColoControl, main: &MainChannel, m: &ColoMessage) -> Result<u64, ColoRunError> {
    if silenced(ctl) {
        return Err(ColoRunError::Protocol(format!(
            "silenced before {}",
            m.name()
        )));
    }
    colo_send(main, m)
}

fn silenced(ctl: &ColoControl) -> bool {
    ctl.silenced.load(Ordering::SeqCst)
}

/// At a test's kill point: the side dies at once (nothing more released,
/// channels cut) and returns [`ColoRunError::Killed`].
fn dead(
    kill: Option<KillPoint>,
    checkpoint: u64,
    stage: KillStage,
    ctl: &ColoControl,
    dead_flag: Option<&AtomicBool>,
) -> Result<(), ColoRunError> {
    match kill {
        Some(k) if k.checkpoint == checkpoint && k.stage == stage => {
            if let Some(d) = dead_flag {
                d.store(true, Ordering::SeqCst);
            }
            ctl.break_link();
            Err(ColoRunError::Killed(k))
        }
        _ => Ok(()),
    }
}

/// The primary's side: after `migrate_out` completed (the guest paused,
/// handed over), opens a COLO session to the secondary at `uri` and runs
/// COLO until failover or poweroff. The guest runs on at the end unless
/// it was powered off (or the test killed this side).
#[allow(clippy::too_many_arguments)]
pub fn run_primary(
    guest: &dyn Guest,
    outputs: &Arc<OutputQueue>,
    uri: &ChannelUri,
    link: &OutgoingOptions,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: Arc<dyn OutputSink>,
) -> ColoSummary {
    ctl.status.enter(ColoMode::Primary);
    let dead_flag = Arc::new(AtomicBool::new(false));
    let compare = Arc::new(Mutex::new(Comparator::new()));
    let mut figures = Figures::new();
    let killed = Arc::new(AtomicBool::new(false));
    let killer = spawn_killer(opts, ctl, &killed, Some(dead_flag.clone()));
    let result = primary_loop(
        guest,
        outputs,
        uri,
        link,
        opts,
        ctl,
        &sink,
        &compare,
        &dead_flag,
        &mut figures,
    );
    let detected = Instant::now();
    let result = wind_down(result, &killed, killer, opts, ctl);
    let (end, running) = match &result {
        Err(ColoRunError::Killed(_)) => {
            dead_flag.store(true, Ordering::SeqCst);
            let _ = guest.pause();
            ("killed", false)
        }
        Ok(()) => ("poweroff", false),
        Err(e) => {
            // The secondary is lost (or a failover was asked for): go on alone.
            tracing::warn!("COLO primary: {e}; going on alone");
            if !matches!(e, ColoRunError::FailoverRequested) {
                ctl.status
                    .request(FailoverReason::Error, Some(e.to_string()));
            }
            ctl.status.begin();
            let mut c = compare.lock().unwrap();
            let released = c.secondary_lost(outputs.take());
            sink.release(&released);
            drop(c);
            let _ = guest.resume();
            ("failover", true)
        }
    };
    let failover_ms = (end == "failover").then(|| detected.elapsed().as_secs_f64() * 1e3);
    if end == "failover" {
        ctl.status.complete();
    }
    if end == "poweroff" {
        let _ = guest.pause();
    }
    let stats = compare.lock().unwrap().stats();
    let mut s = figures.summary("primary", ctl, stats, end, failover_ms, running);
    s.released = stats.released + figures.released;
    s
}

#[allow(clippy::too_many_arguments)]
fn primary_loop(
    guest: &dyn Guest,
    outputs: &Arc<OutputQueue>,
    uri: &ChannelUri,
    link: &OutgoingOptions,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: &Arc<dyn OutputSink>,
    compare: &Arc<Mutex<Comparator>>,
    dead_flag: &Arc<AtomicBool>,
    figures: &mut Figures,
) -> Result<(), ColoRunError> {
    let memory = guest.memory().clone();
    let log = guest
        .dirty_log()
        .ok_or_else(|| ColoRunError::Protocol("COLO needs a guest with a dirty log".into()))?;
    let link = OutgoingOptions {
        peer_timeout: opts.heartbeat_timeout,
        ..link.clone()
    };
    let (main, multifd) = open_session(uri, &link, SessionId::random())?;
    let main = MainChannel::new(Arc::from(main), opts.heartbeat_timeout)?;
    main.start_heartbeat(crate::protocol::heartbeat_interval(opts.heartbeat_timeout))?;
    let mut sender = link.sender.clone();
    sender.stall_timeout = Some(opts.heartbeat_timeout);
    // A checkpoint's pages are few and scattered: the largest packets the
    // path takes carry more of them per packet (1640 pages of 1 GiB went
    // in 6-13 ms with 128-page packets, 3-4 ms with 4096).
    sender.packet_pages = if link.tls.is_some()
        || (sender.path == ferry_multifd::SendPath::Splice && sender.compress.is_none())
    {
        ferry_multifd::MAX_PACKET_PAGES
    } else {
        COLO_SENDMSG_PACKET_PAGES
    };
    let packet_pages = sender.packet_pages;
    let mut pool = SenderPool::start(multifd, memory.clone(), sender)?;
    {
        let main = main.clone();
        *ctl.silencer.lock().unwrap() = Some(Box::new(move || main.stop_heartbeat()));
    }
    {
        let (abort, main) = (pool.aborter(), main.clone());
        *ctl.breaker.lock().unwrap() = Some(Box::new(move || {
            abort();
            main.channel().shutdown();
        }));
    }
    let setup = Setup {
        capabilities: CAP_COLO
            | if link.sender.checksum {
                CAP_CHECKSUM
            } else {
                0
            }
            | if link.sender.compress.is_some() {
                CAP_ZSTD
            } else {
                0
            },
        multifd_channels: link.channels,
        packet_pages,
        blocks: memory.specs(),
    };
    main.send(&Message::Setup(setup))?;
    colo_send(
        &main,
        &ColoMessage::ColoSetup {
            output_every: opts.output_every,
            verify: opts.verify,
        },
    )?;

    // The reader: outputs to the comparator, the rest to this loop.
    let expect = Arc::new(Mutex::new(Expect::new(Side::Primary)));
    let (tx, rx) = mpsc::channel::<Result<(ColoMessage, u64), ColoRunError>>();
    let reader = {
        let (main, expect, compare, sink, ctl, dead_flag) = (
            main.clone(),
            expect.clone(),
            compare.clone(),
            sink.clone(),
            ctl.clone(),
            dead_flag.clone(),
        );
        std::thread::Builder::new()
            .name("ferry-colo-read".into())
            .spawn(move || loop {
                let got = colo_recv(&main, "secondary").and_then(|(m, n)| {
                    expect.lock().unwrap().check(&m)?;
                    Ok((m, n))
                });
                match got {
                    Ok((ColoMessage::Output(records), _)) => {
                        let mut c = compare.lock().unwrap();
                        if dead_flag.load(Ordering::SeqCst) {
                            return;
                        }
                        let mut mismatch = false;
                        for r in records {
                            let fed = c.secondary(r);
                            mismatch |= fed.mismatch;
                            if !fed.released.is_empty() {
                                sink.release(&fed.released);
                            }
                        }
                        if mismatch {
                            ctl.triggers.request(TriggerKind::Mismatch);
                        }
                    }
                    Ok(m) => {
                        if let ColoMessage::VmstateLoaded { .. } = &m.0 {
                            // The secondary equals this side now: release
                            // what was held, before any output of the
                            // secondary's next run is read.
                            let mut c = compare.lock().unwrap();
                            if dead_flag.load(Ordering::SeqCst) {
                                return;
                            }
                            let released = c.release_all();
                            sink.release(&released);
                        }
                        if tx.send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        ctl.triggers.stop();
                        return;
                    }
                }
            })
            .map_err(|e| MigrationError::Thread("COLO reader", e))?
    };
    let result = primary_checkpoints(
        guest, outputs, opts, ctl, sink, compare, dead_flag, figures, &main, &mut pool, &expect,
        &rx, log, &memory,
    );
    if matches!(result, Err(ColoRunError::Killed(_))) {
        dead_flag.store(true, Ordering::SeqCst);
    }
    if let Ok(()) = &result {
        // Poweroff: tell the secondary, then close.
        let _ = colo_send(&main, &ColoMessage::GuestShutdown);
        let _ = main.channel().finish();
    }
    main.stop_heartbeat();
    if ctl.silenced.load(Ordering::SeqCst) {
        // A hung host: the sockets stay open, silent, while the peer's
        // heartbeat timeout runs.
        std::thread::sleep(opts.heartbeat_timeout * 3);
    }
    pool.abort();
    main.channel().shutdown();
    let _ = reader.join();
    result
}

#[allow(clippy::too_many_arguments)]
fn primary_checkpoints(
    guest: &dyn Guest,
    outputs: &Arc<OutputQueue>,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: &Arc<dyn OutputSink>,
    compare: &Arc<Mutex<Comparator>>,
    dead_flag: &Arc<AtomicBool>,
    figures: &mut Figures,
    main: &Arc<MainChannel>,
    pool: &mut SenderPool,
    expect: &Arc<Mutex<Expect>>,
    rx: &Receiver<Result<(ColoMessage, u64), ColoRunError>>,
    log: &dyn ferry_ram::DirtyLog,
    memory: &Arc<GuestMemory>,
) -> Result<(), ColoRunError> {
    let wait = |what: &'static str| -> Result<(ColoMessage, u64), ColoRunError> {
        match rx.recv_timeout(opts.heartbeat_timeout * 2) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(ColoRunError::Protocol(format!(
                "no {what} from the secondary within {:.1} s (twice --heartbeat-timeout)",
                (opts.heartbeat_timeout * 2).as_secs_f64()
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(ColoRunError::Protocol(format!(
                "the COLO reader ended while {what} was due"
            ))),
        }
    };
    // CHECKPOINT_READY: the secondary's cache and receivers are ready.
    wait("CHECKPOINT_READY")?;
    // Outputs made before the switchover (the secondary starts after
    // them) went to the client as they would without COLO.
    let before = outputs.take();
    sink.release(&before);
    figures.released += before.len() as u64;
    // The guest's memory equals the secondary's cache now: track from here.
    log.start()?;
    guest.resume()?;
    let pump_stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let (outputs, compare, sink, ctl, stop, dead_flag) = (
            outputs.clone(),
            compare.clone(),
            sink.clone(),
            ctl.clone(),
            pump_stop.clone(),
            dead_flag.clone(),
        );
        std::thread::Builder::new()
            .name("ferry-colo-out".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(OUTPUT_TICK);
                    feed_primary(&outputs, &compare, &*sink, &ctl, &dead_flag);
                }
            })
            .map_err(|e| MigrationError::Thread("COLO output", e))?
    };
    let result = (|| -> Result<(), ColoRunError> {
        let mut n = 0u64;
        loop {
            if ctl.status.failover_pending() {
                return Err(ColoRunError::FailoverRequested);
            }
            if let Ok(m) = rx.try_recv() {
                // Only errors come between checkpoints.
                let m = m?;
                return Err(ColoRunError::Protocol(format!(
                    "{} from the secondary between checkpoints",
                    m.0.name()
                )));
            }
            if ctl.triggers.is_stopped() {
                return Err(ColoRunError::Protocol("COLO was stopped".into()));
            }
            if ctl.poweroff.load(Ordering::SeqCst) || opts.max_checkpoints.is_some_and(|m| n >= m) {
                guest.pause()?;
                return Ok(());
            }
            if ctl.triggers.wait(Duration::from_millis(20)).is_none() {
                continue;
            }
            n += 1;
            let r = primary_checkpoint(
                n, guest, outputs, opts, ctl, sink, compare, dead_flag, figures, main, pool,
                expect, &wait, log, memory,
            );
            ctl.triggers.done();
            r?;
        }
    })();
    pump_stop.store(true, Ordering::SeqCst);
    let _ = pump.join();
    result
}

fn feed_primary(
    outputs: &OutputQueue,
    compare: &Mutex<Comparator>,
    sink: &dyn OutputSink,
    ctl: &ColoControl,
    dead_flag: &AtomicBool,
) {
    let records = outputs.take();
    if records.is_empty() {
        return;
    }
    let mut c = compare.lock().unwrap();
    if dead_flag.load(Ordering::SeqCst) {
        return;
    }
    let mut mismatch = false;
    for r in records {
        let fed = c.primary(r);
        mismatch |= fed.mismatch;
        if !fed.released.is_empty() {
            sink.release(&fed.released);
        }
    }
    let s = c.stats();
    drop(c);
    {
        let mut l = ctl.live.lock().unwrap();
        l.mismatches = s.mismatches;
        l.released = s.released;
        l.held = s.held;
    }
    if mismatch {
        ctl.triggers.request(TriggerKind::Mismatch);
    }
}

#[allow(clippy::too_many_arguments)]
fn primary_checkpoint(
    n: u64,
    guest: &dyn Guest,
    outputs: &Arc<OutputQueue>,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: &Arc<dyn OutputSink>,
    compare: &Arc<Mutex<Comparator>>,
    dead_flag: &Arc<AtomicBool>,
    figures: &mut Figures,
    main: &Arc<MainChannel>,
    pool: &mut SenderPool,
    expect: &Arc<Mutex<Expect>>,
    wait: &dyn Fn(&'static str) -> Result<(ColoMessage, u64), ColoRunError>,
    log: &dyn ferry_ram::DirtyLog,
    memory: &Arc<GuestMemory>,
) -> Result<(), ColoRunError> {
    let mut bytes = 0u64;
    let before = pool.counters().snapshot().wire_bytes;
    expect.lock().unwrap().requested(n);
    bytes += live_send(ctl, main, &ColoMessage::CheckpointRequest { checkpoint: n })?;
    dead(opts.kill, n, KillStage::AfterRequest, ctl, Some(dead_flag))?;
    let (_, b) = wait("CHECKPOINT_REPLY")?;
    bytes += b;
    guest.pause()?;
    let paused = Instant::now();
    let result = (|| -> Result<(), ColoRunError> {
        // Every output made before the pause is compared or held now.
        feed_primary(outputs, compare, &**sink, ctl, dead_flag);
        let dirty = Arc::new(fresh_bitmaps(memory));
        log.sync(&dirty)?;
        let synced = paused.elapsed();
        let pages: u64 = dirty.iter().map(PageBitmap::count).sum();
        let held = compare.lock().unwrap().held();
        bytes += live_send(
            ctl,
            main,
            &ColoMessage::VmstateSend {
                checkpoint: n,
                generation: pool.generation() + 1,
                dirty: RamCache::words_of(&dirty),
                held,
            },
        )?;
        dead(opts.kill, n, KillStage::MidCheckpoint, ctl, Some(dead_flag))?;
        pool.send_pass(dirty)?;
        let sent = paused.elapsed();
        let state = guest.save_device_state()?;
        bytes += live_send(
            ctl,
            main,
            &ColoMessage::VmstateSize {
                size: state.len() as u64,
            },
        )?;
        bytes += live_send(ctl, main, &ColoMessage::Vmstate(state))?;
        let digest = opts.verify.then(|| memory.digest().0);
        bytes += wait("VMSTATE_RECEIVED")?.1;
        let received = paused.elapsed();
        dead(opts.kill, n, KillStage::AfterReceived, ctl, Some(dead_flag))?;
        let (loaded, b) = wait("VMSTATE_LOADED")?;
        bytes += b;
        tracing::debug!(
            checkpoint = n,
            pages,
            synced_ms = synced.as_secs_f64() * 1e3,
            sent_ms = sent.as_secs_f64() * 1e3,
            received_ms = received.as_secs_f64() * 1e3,
            loaded_ms = paused.elapsed().as_secs_f64() * 1e3,
            "COLO checkpoint (times since the pause)"
        );
        if let (
            Some(primary),
            ColoMessage::VmstateLoaded {
                digest: Some(secondary),
                ..
            },
        ) = (digest, &loaded)
        {
            if primary != *secondary {
                return Err(ColoRunError::Diverged {
                    checkpoint: n,
                    primary,
                    secondary: *secondary,
                });
            }
        }
        bytes += pool.counters().snapshot().wire_bytes - before;
        figures.bytes.push(bytes);
        figures.pages.push(pages);
        Ok(())
    })();
    if result.is_ok() {
        guest.resume()?;
        let pause = paused.elapsed();
        let _ = figures.pauses.record(pause.as_micros() as u64);
        figures.pause_list.push(pause.as_micros() as u64);
        let mut l = ctl.live.lock().unwrap();
        l.checkpoints = n;
        l.last_pause_ms = pause.as_secs_f64() * 1e3;
        l.last_bytes = bytes;
    }
    result
}

/// What the secondary's guest builder leaves for [`run_secondary`].
pub struct SecondaryParts {
    /// The cache, a copy of the memory as migrated (taken before the
    /// guest first ran).
    pub cache: RamCache,
    pub outputs: Arc<OutputQueue>,
}

/// How a secondary builds a guest of a kind ferry does not know (the KVM
/// micro-VM of ferry-vmm, which depends on ferry): given the migrated
/// memory, the device state and the hook its outputs go to, `None` if the
/// state is not of its kind, else the guest paused, its dirty log
/// started, every `output_every`-th write of a vCPU an output record to
/// the hook (or an error saying why it cannot).
pub type ColoGuestKind = Arc<
    dyn Fn(Arc<GuestMemory>, &[u8], u64, OutputHook) -> Option<Result<Box<dyn Guest>, GuestError>>
        + Send
        + Sync,
>;

/// A guest builder for `recv --colo`: the synthetic guest, with its dirty
/// log started and its outputs queued before it first runs, and the RAM
/// cache copied from the migrated memory.
pub fn secondary_builder(
    output_every: u64,
    jitter_ppm: u32,
    tee: Option<OutputHook>,
) -> (GuestBuilder, Arc<OnceLock<SecondaryParts>>) {
    secondary_builder_with(output_every, jitter_ppm, tee, None)
}

/// [`secondary_builder`] that dispatches on the state's kind: the
/// synthetic guest's, or `other`'s (the KVM guest's, say). Jitter is the
/// synthetic guest's only: another kind's state with `jitter_ppm` > 0 is
/// refused.
pub fn secondary_builder_with(
    output_every: u64,
    jitter_ppm: u32,
    tee: Option<OutputHook>,
    other: Option<ColoGuestKind>,
) -> (GuestBuilder, Arc<OnceLock<SecondaryParts>>) {
    let parts: Arc<OnceLock<SecondaryParts>> = Arc::new(OnceLock::new());
    let slot = parts.clone();
    let builder: GuestBuilder = Arc::new(move |memory, state| {
        let synthetic = crate::synthetic::is_synthetic_state(state);
        if !synthetic && other.is_none() {
            return Err(GuestError::Control(
                "COLO's secondary runs the synthetic guest only here (no other kind of guest \
                 was given to its builder)"
                    .into(),
            ));
        }
        if !synthetic && jitter_ppm > 0 {
            return Err(GuestError::Control(
                "--colo-jitter makes the synthetic guest non-deterministic; this guest is not \
                 the synthetic one (a KVM guest's outputs follow its own state): leave it out"
                    .into(),
            ));
        }
        let outputs = OutputQueue::new();
        let queue = outputs.hook();
        let hook: OutputHook = match tee.clone() {
            Some(tee) => Arc::new(move |r| {
                tee(r);
                queue(r)
            }),
            None => queue,
        };
        // The cache is the memory as migrated, before the guest first runs.
        let cache = RamCache::copy_of(&memory).map_err(|e| GuestError::Control(format!("{e}")))?;
        let g: Box<dyn Guest> = if synthetic {
            let g = SyntheticGuest::from_device_state(
                memory,
                state,
                crate::TrackerKind::Bitmap,
                Resources::none(false),
            )?;
            g.dirty_log()
                .expect("synthetic guests have a log")
                .start()?;
            g.set_output(output_every, Some(hook));
            g.set_jitter(jitter_ppm);
            Box::new(g)
        } else {
            let build = other.as_ref().expect("checked above");
            match build(memory, state, output_every, hook) {
                None => {
                    return Err(GuestError::Control(
                        "COLO's secondary runs the synthetic or the KVM guest; this device \
                         state is neither's"
                            .into(),
                    ))
                }
                Some(r) => r?,
            }
        };
        let _ = slot.set(SecondaryParts { cache, outputs });
        Ok(g)
    });
    (builder, parts)
}

/// The secondary's side: after `migrate_in` completed with a guest from
/// [`secondary_builder`], accepts the primary's COLO session on
/// `listener` and runs COLO until failover or poweroff.
#[allow(clippy::too_many_arguments)]
pub fn run_secondary(
    guest: &dyn Guest,
    parts: &SecondaryParts,
    listener: &Listener,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: Arc<dyn OutputSink>,
) -> ColoSummary {
    ctl.status.enter(ColoMode::Secondary);
    let mut figures = Figures::new();
    // Outputs since the last commit (and those inherited with it).
    let since_commit = Arc::new(Mutex::new(Vec::<Record>::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let killer = spawn_killer(opts, ctl, &killed, None);
    let result = secondary_loop(
        guest,
        parts,
        listener,
        opts,
        ctl,
        &since_commit,
        &mut figures,
    );
    let detected = Instant::now();
    let result = wind_down(result, &killed, killer, opts, ctl);
    let (end, running) = match &result {
        Err(ColoRunError::Killed(_)) => {
            let _ = guest.pause();
            ("killed", false)
        }
        Err(e @ ColoRunError::Refused(_)) => {
            // Never a replica: the primary goes on alone, this copy stops.
            let _ = guest.pause();
            ctl.status
                .request(FailoverReason::Error, Some(e.to_string()));
            ("refused", false)
        }
        Ok(()) => {
            let _ = guest.pause();
            ("poweroff", false)
        }
        Err(e) => {
            tracing::warn!("COLO secondary: {e}; taking over");
            if !matches!(e, ColoRunError::FailoverRequested) {
                ctl.status
                    .request(FailoverReason::Error, Some(e.to_string()));
            }
            ctl.status.begin();
            // Whatever the client may lack: every output since the last
            // commit, then the rest as it comes.
            let mut mine = std::mem::take(&mut *since_commit.lock().unwrap());
            mine.extend(parts.outputs.take());
            sink.release(&mine);
            figures.released += mine.len() as u64;
            let _ = guest.resume();
            ("failover", true)
        }
    };
    let failover_ms = (end == "failover").then(|| detected.elapsed().as_secs_f64() * 1e3);
    if end == "failover" {
        ctl.status.complete();
    }
    figures.summary(
        "secondary",
        ctl,
        CompareStats::default(),
        end,
        failover_ms,
        running,
    )
}

/// Forwards the secondary's outputs to the sink after failover, until
/// `stop`; call on a thread of its own.
pub fn forward_outputs(outputs: &OutputQueue, sink: &dyn OutputSink, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(OUTPUT_TICK);
        let r = outputs.take();
        if !r.is_empty() {
            sink.release(&r);
        }
    }
    let r = outputs.take();
    if !r.is_empty() {
        sink.release(&r);
    }
}

fn secondary_loop(
    guest: &dyn Guest,
    parts: &SecondaryParts,
    listener: &Listener,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    since_commit: &Arc<Mutex<Vec<Record>>>,
    figures: &mut Figures,
) -> Result<(), ColoRunError> {
    let memory = guest.memory().clone();
    let log = guest
        .dirty_log()
        .ok_or_else(|| ColoRunError::Protocol("COLO needs a guest with a dirty log".into()))?;
    let session = accept_session(
        listener,
        &AcceptOptions {
            first_timeout: Some(opts.setup_timeout),
            ..AcceptOptions::default()
        },
    )?;
    let main = MainChannel::new(Arc::from(session.main), opts.heartbeat_timeout)?;
    main.start_heartbeat(crate::protocol::heartbeat_interval(opts.heartbeat_timeout))?;
    let setup = match main.recv("primary")? {
        (Message::Setup(s), _) => s,
        (m, _) => {
            return Err(ColoRunError::Protocol(format!(
                "expected SETUP on the COLO session, got {}",
                m.name()
            )))
        }
    };
    if setup.blocks != memory.specs()
        || usize::from(setup.multifd_channels) != session.multifd.len()
    {
        return Err(ColoRunError::Protocol(format!(
            "the COLO session's SETUP announces {} multifd channels and blocks {:?}; this \
             secondary has {} channels and blocks {:?}",
            setup.multifd_channels,
            setup.blocks,
            session.multifd.len(),
            memory.specs()
        )));
    }
    match colo_recv(&main, "primary")? {
        (
            ColoMessage::ColoSetup {
                output_every,
                verify,
            },
            _,
        ) => {
            let differ = if output_every != opts.output_every {
                Some(format!(
                    "--colo-output-every differs: the primary has {output_every}, this secondary \
                     {}; give both sides the same value",
                    opts.output_every
                ))
            } else if verify != opts.verify {
                Some(format!(
                    "--colo-verify differs: the primary has it {}, this secondary {}; give it \
                     to both sides or to neither",
                    if verify { "on" } else { "off" },
                    if opts.verify { "on" } else { "off" }
                ))
            } else {
                None
            };
            if let Some(why) = differ {
                let _ = main.send(&Message::Shut {
                    error: Some(format!("the secondary refused COLO: {why}")),
                });
                return Err(ColoRunError::Refused(why));
            }
        }
        (m, _) => {
            return Err(ColoRunError::Protocol(format!(
                "expected COLO_SETUP after SETUP, got {}",
                m.name()
            )))
        }
    }
    let pool = ReceiverPool::start(
        session.multifd,
        parts.cache.memory().clone(),
        ReceiverOptions {
            fresh_memory: false,
            compressed: setup.capabilities & CAP_ZSTD != 0,
            checksums: setup.capabilities & CAP_CHECKSUM != 0,
        },
        || {},
    )?;
    {
        let main = main.clone();
        *ctl.silencer.lock().unwrap() = Some(Box::new(move || main.stop_heartbeat()));
    }
    {
        let (main, stop) = (main.clone(), pool.interrupter());
        *ctl.breaker.lock().unwrap() = Some(Box::new(move || {
            stop("failover");
            main.channel().shutdown();
        }));
    }
    // Sends the queued outputs (and keeps them): one sender at a time, so
    // none overtakes a REPLY.
    let forward = Arc::new(Mutex::new(()));
    let send_outputs = {
        let (main, outputs, since_commit, forward) = (
            main.clone(),
            parts.outputs.clone(),
            since_commit.clone(),
            forward.clone(),
        );
        move || -> Result<(), ColoRunError> {
            let _turn = forward.lock().unwrap();
            let r = outputs.take();
            if r.is_empty() {
                return Ok(());
            }
            since_commit.lock().unwrap().extend_from_slice(&r);
            colo_send(&main, &ColoMessage::Output(r))?;
            Ok(())
        }
    };
    colo_send(&main, &ColoMessage::CheckpointReady)?;
    guest.resume()?;
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let forwarder = {
        let (send_outputs, stop, paused, ctl) = (
            send_outputs.clone(),
            stop.clone(),
            paused.clone(),
            ctl.clone(),
        );
        std::thread::Builder::new()
            .name("ferry-colo-out".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(OUTPUT_TICK);
                    if silenced(&ctl) {
                        continue;
                    }
                    if !paused.load(Ordering::SeqCst) && send_outputs().is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| MigrationError::Thread("COLO output", e))?
    };
    let result = secondary_checkpoints(
        guest,
        parts,
        opts,
        ctl,
        since_commit,
        figures,
        &main,
        &pool,
        log,
        &memory,
        &send_outputs,
        &paused,
    );
    stop.store(true, Ordering::SeqCst);
    let _ = forwarder.join();
    if !matches!(result, Err(ColoRunError::Killed(_))) {
        // Whatever was queued but not forwarded is the survivor's too.
        let _turn = forward.lock().unwrap();
        since_commit.lock().unwrap().extend(parts.outputs.take());
    }
    main.stop_heartbeat();
    pool.abort("COLO ended");
    main.channel().shutdown();
    result
}

#[allow(clippy::too_many_arguments)]
fn secondary_checkpoints(
    guest: &dyn Guest,
    parts: &SecondaryParts,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    since_commit: &Arc<Mutex<Vec<Record>>>,
    figures: &mut Figures,
    main: &Arc<MainChannel>,
    pool: &ReceiverPool,
    log: &dyn ferry_ram::DirtyLog,
    memory: &Arc<GuestMemory>,
    send_outputs: &dyn Fn() -> Result<(), ColoRunError>,
    paused: &AtomicBool,
) -> Result<(), ColoRunError> {
    let mut expect = Expect::new(Side::Secondary);
    let mut pending: Option<(Vec<PageBitmap>, u64, Vec<Record>)> = None;
    let mut size_bytes = 0u64;
    let mut pool_bytes = pool.counters().snapshot().wire_bytes;
    loop {
        if ctl.status.failover_pending() {
            return Err(ColoRunError::FailoverRequested);
        }
        if silenced(ctl) {
            // A hung host reads nothing it acts on and says nothing.
            loop {
                colo_recv(main, "primary")?;
            }
        }
        let (m, n) = colo_recv(main, "primary")?;
        size_bytes += n;
        expect.check(&m)?;
        let cp = expect.checkpoint();
        match m {
            ColoMessage::GuestShutdown => return Ok(()),
            ColoMessage::CheckpointRequest { .. } => {
                paused.store(true, Ordering::SeqCst);
                guest.pause()?;
                // Every output made before the pause goes before REPLY.
                send_outputs()?;
                live_send(ctl, main, &ColoMessage::CheckpointReply { checkpoint: cp })?;
                dead(opts.kill, cp, KillStage::AfterRequest, ctl, None)?;
            }
            ColoMessage::VmstateSend {
                generation,
                dirty,
                held,
                ..
            } => {
                let dirty = parts.cache.dirty_from_words(&dirty)?;
                dead(opts.kill, cp, KillStage::MidCheckpoint, ctl, None)?;
                pending = Some((dirty, generation, held));
            }
            ColoMessage::VmstateSize { .. } => {}
            ColoMessage::Vmstate(state) => {
                let (dirty, generation, held) = pending
                    .take()
                    .ok_or_else(|| ColoRunError::Protocol("VMSTATE without VMSTATE_SEND".into()))?;
                // The whole checkpoint is here once its pages are.
                pool.wait_sync_within(generation, Some(opts.heartbeat_timeout))?;
                live_send(ctl, main, &ColoMessage::VmstateReceived { checkpoint: cp })?;
                dead(opts.kill, cp, KillStage::AfterReceived, ctl, None)?;
                // Commit: from here a failover waits for the load.
                ctl.status.set_loading(true);
                let loaded = (|| -> Result<u64, ColoRunError> {
                    let own = fresh_bitmaps(memory);
                    log.sync(&own)?;
                    let pages = parts.cache.commit(memory, &dirty, &own)?;
                    if let Some(LoadHook(hook)) = &opts.test_during_load {
                        hook();
                    }
                    if opts.test_load_error_at == Some(cp) {
                        return Err(GuestError::DeviceState(format!(
                            "checkpoint {cp}: load failed (test)"
                        ))
                        .into());
                    }
                    guest.load_device_state(&state)?;
                    figures.last_state = state;
                    Ok(pages)
                })();
                ctl.status.set_loading(false);
                let pages = loaded?;
                // The primary's unreleased outputs are this side's now.
                *since_commit.lock().unwrap() = held;
                expect.loaded();
                let now = pool.counters().snapshot().wire_bytes;
                figures.bytes.push(size_bytes + now - pool_bytes);
                figures.pages.push(pages);
                (size_bytes, pool_bytes) = (0, now);
                if ctl.status.failover_pending() {
                    // RELAUNCH: the failover asked for during the load.
                    return Err(ColoRunError::FailoverRequested);
                }
                let digest = opts.verify.then(|| memory.digest().0);
                live_send(
                    ctl,
                    main,
                    &ColoMessage::VmstateLoaded {
                        checkpoint: cp,
                        digest,
                    },
                )?;
                paused.store(false, Ordering::SeqCst);
                guest.resume()?;
                ctl.live.lock().unwrap().checkpoints = cp;
            }
            other => {
                return Err(ColoRunError::Protocol(format!(
                    "{} from the primary",
                    other.name()
                )))
            }
        }
    }
}
