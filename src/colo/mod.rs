//! COLO's glue to a guest: the primary and secondary loops that run after
//! an ordinary migration (`send --colo` / `recv --colo`), over a
//! [`Guest`] and a fresh session of the same kind as the migration's
//! (main + K multifd channels, TLS and zstd as configured).
//!
//! The pieces that need no guest live in the `ferry-colo` crate (`colo/`):
//! messages and their order, the RAM cache, output comparison, triggers
//! and the failover status. This module owns what both sides share (the
//! options, the control handle, outputs, figures, the summary and the
//! failover helpers) and, in its two files:
//! - [`run_primary`] (`primary.rs`): waits for CHECKPOINT_READY, resumes the guest, then
//!   takes checkpoints when [`ferry_colo::Triggers`] says so: REQUEST →
//!   REPLY → pause → VMSTATE_SEND (dirty bitmap and the outputs still
//!   held) → the dirty pages as one multifd pass → VMSTATE_SIZE, VMSTATE →
//!   RECEIVED → LOADED → release held outputs → resume. Its outputs are
//!   compared with the secondary's (OUTPUT messages) as they come.
//! - [`run_secondary`] (`secondary.rs`): receives each checkpoint into the [`RamCache`],
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

/// Starts the thread ("ferry-colo-out") that calls `tick` every
/// [`OUTPUT_TICK`] until `stop` is set, or until `tick` returns false.
fn spawn_output_ticker(
    stop: Arc<AtomicBool>,
    mut tick: impl FnMut() -> bool + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, ColoRunError> {
    Ok(std::thread::Builder::new()
        .name("ferry-colo-out".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(OUTPUT_TICK);
                if !tick() {
                    return;
                }
            }
        })
        .map_err(|e| MigrationError::Thread("COLO output", e))?)
}

/// Begins the failover on this side after `e` ended COLO, recording `e`
/// as the reason unless a failover was asked for (which has its own).
fn begin_failover(ctl: &ColoControl, e: &ColoRunError) {
    if !matches!(e, ColoRunError::FailoverRequested) {
        ctl.status
            .request(FailoverReason::Error, Some(e.to_string()));
    }
    ctl.status.begin();
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

mod primary;
mod secondary;

pub use primary::run_primary;
pub use secondary::{
    forward_outputs, run_secondary, secondary_builder, secondary_builder_with, ColoGuestKind,
    SecondaryParts,
};
