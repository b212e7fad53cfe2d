//! The synthetic live guest: memory that "vCPU" worker threads keep writing
//! at a set rate and pattern, so every live-migration feature runs for real.
//!
//! Each vCPU owns a small RNG (splitmix64) and counters; every write picks a
//! page by the pattern, stores one 64-bit word in it and then marks the page
//! in the dirty log (a kernel log ignores the mark). Pacing is by credit:
//! each tick adds `elapsed × rate × (100 − throttle)%` pages of credit and
//! spends it. Pausing parks every worker and waits for each to acknowledge,
//! so no write happens after `pause` returns. The device state (JSON, below)
//! holds the rate, pattern and every vCPU's RNG state and counters, so a
//! destination that loads it continues the same write sequence exactly.
//!
//! For COLO the vCPUs may also emit an output stream
//! ([`SyntheticGuest::set_output`]): every `every`-th write of a vCPU
//! emits record number `writes / every` whose value follows from the
//! vCPU's state, as a real guest's packets follow from its state. And
//! [`SyntheticGuest::set_jitter`] makes a vCPU now and then mix the clock
//! into its RNG, as interrupts and timers make real guests diverge.
//!
//! Device state format (UTF-8 JSON):
//! `{"kind":"ferry-synthetic","version":1,"dirty_rate":B,"pattern":"random"|
//! "sequential"|"hotset:PCT","page_size":4096,"vcpus":[{"rng":U64,
//! "writes":U64,"cursor":U64},...]}`.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_ram::pattern::{fill_block, Pattern};
use ferry_ram::{BitmapLog, BlockSpec, DirtyLog, GuestMemory, UffdLog, DEFAULT_PAGE_SIZE};
use serde::{Deserialize, Serialize};

use crate::{Guest, GuestError, Resources};

/// The synthetic guest's single RAM block.
pub const SYNTHETIC_BLOCK: &str = "ram";
const STATE_KIND: &str = "ferry-synthetic";
const MAX_VCPUS: usize = 1024;
/// How long `pause` waits for every vCPU to acknowledge.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker never banks more than this much time's worth of writes.
const MAX_CREDIT: Duration = Duration::from_millis(20);

/// Where the vCPUs write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyPattern {
    /// Any page, uniformly.
    Random,
    /// Each vCPU walks all pages in order from its own starting point.
    Sequential,
    /// Only the first PCT% of pages, uniformly.
    Hotset(u8),
}

impl FromStr for DirtyPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Self::Random),
            "sequential" => Ok(Self::Sequential),
            _ => {
                let pct = s
                    .strip_prefix("hotset:")
                    .and_then(|p| p.trim_end_matches('%').parse::<u8>().ok())
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| {
                        format!("dirty pattern '{s}': expected random, sequential or hotset:PCT (PCT 1-100)")
                    })?;
                Ok(Self::Hotset(pct))
            }
        }
    }
}

impl std::fmt::Display for DirtyPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Random => write!(f, "random"),
            Self::Sequential => write!(f, "sequential"),
            Self::Hotset(p) => write!(f, "hotset:{p}"),
        }
    }
}

/// Which dirty log tracks the guest's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// The writer marks an atomic bitmap.
    Bitmap,
    /// The kernel tracks writes (userfaultfd async write-protect).
    Uffd,
}

impl FromStr for TrackerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bitmap" => Ok(Self::Bitmap),
            "uffd" => Ok(Self::Uffd),
            _ => Err(format!("dirty tracker '{s}': expected bitmap or uffd")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SyntheticConfig {
    pub vcpus: u16,
    /// Bytes per second the whole guest dirties (one page per write).
    pub dirty_rate: u64,
    pub pattern: DirtyPattern,
    /// Seeds the vCPUs' RNGs.
    pub seed: u64,
    pub tracker: TrackerKind,
}

/// One vCPU's state: all a destination needs to continue its writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub rng: u64,
    pub writes: u64,
    pub cursor: u64,
}

#[derive(Serialize, Deserialize)]
struct DeviceState {
    kind: String,
    version: u32,
    dirty_rate: u64,
    pattern: String,
    page_size: u32,
    vcpus: Vec<VcpuState>,
}

struct RunState {
    paused: bool,
    quit: bool,
    parked: usize,
}

struct Shared {
    memory: Arc<GuestMemory>,
    log: Arc<dyn DirtyLog>,
    dirty_rate: AtomicU64,
    pattern: Mutex<DirtyPattern>,
    throttle: AtomicU8,
    /// Set while a pause is requested: workers stop between two writes.
    stop_writes: AtomicBool,
    run: Mutex<RunState>,
    cv: Condvar,
    /// Each vCPU's state as of its last park (the live copy is the worker's).
    vcpus: Vec<Mutex<VcpuState>>,
    /// When the first write of any vCPU finished.
    first_write: std::sync::OnceLock<Instant>,
    /// Output stream: a record every this many writes (0: none).
    output_every: AtomicU64,
    output: Mutex<Option<OutputHook>>,
    /// Chance per million writes that a vCPU mixes the clock into its RNG.
    jitter_ppm: std::sync::atomic::AtomicU32,
}

/// Takes the synthetic guest's output records (called on vCPU threads).
pub type OutputHook = Arc<dyn Fn(ferry_colo::Record) + Send + Sync>;

pub struct SyntheticGuest {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    resources: Resources,
}

impl SyntheticGuest {
    /// A running guest over `memory` (one block), owning `resources`.
    pub fn start(
        memory: Arc<GuestMemory>,
        config: &SyntheticConfig,
        resources: Resources,
    ) -> Result<Self, GuestError> {
        let g = Self::paused(memory, config, resources)?;
        g.resume()?;
        Ok(g)
    }

    /// A paused guest built from a device state (a destination's guest).
    pub fn from_device_state(
        memory: Arc<GuestMemory>,
        state: &[u8],
        tracker: TrackerKind,
        resources: Resources,
    ) -> Result<Self, GuestError> {
        let s = parse_state(state)?;
        let config = SyntheticConfig {
            vcpus: s.vcpus.len() as u16,
            dirty_rate: s.dirty_rate,
            pattern: s.pattern.parse().map_err(GuestError::DeviceState)?,
            seed: 0,
            tracker,
        };
        let g = Self::paused(memory, &config, resources)?;
        g.load_device_state(state)?;
        Ok(g)
    }

    fn paused(
        memory: Arc<GuestMemory>,
        config: &SyntheticConfig,
        resources: Resources,
    ) -> Result<Self, GuestError> {
        if memory.blocks().len() != 1 {
            return Err(GuestError::Control(format!(
                "a synthetic guest has one RAM block, this memory has {}",
                memory.blocks().len()
            )));
        }
        if config.vcpus == 0 || usize::from(config.vcpus) > MAX_VCPUS {
            return Err(GuestError::Control(format!(
                "{} vCPUs: between 1 and {MAX_VCPUS}",
                config.vcpus
            )));
        }
        let log: Arc<dyn DirtyLog> = match config.tracker {
            TrackerKind::Bitmap => Arc::new(BitmapLog::new(&memory)),
            TrackerKind::Uffd => Arc::new(UffdLog::new(&memory)?),
        };
        let pages = memory.blocks()[0].pages();
        let vcpus = (0..u64::from(config.vcpus))
            .map(|i| {
                Mutex::new(VcpuState {
                    rng: splitmix(config.seed ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    writes: 0,
                    cursor: i * pages / u64::from(config.vcpus),
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            memory,
            log,
            dirty_rate: AtomicU64::new(config.dirty_rate),
            pattern: Mutex::new(config.pattern),
            throttle: AtomicU8::new(0),
            stop_writes: AtomicBool::new(true),
            run: Mutex::new(RunState {
                paused: true,
                quit: false,
                parked: 0,
            }),
            cv: Condvar::new(),
            vcpus,
            first_write: std::sync::OnceLock::new(),
            output_every: AtomicU64::new(0),
            output: Mutex::new(None),
            jitter_ppm: std::sync::atomic::AtomicU32::new(0),
        });
        let mut g = Self {
            shared,
            workers: Vec::new(),
            resources,
        };
        for i in 0..usize::from(config.vcpus) {
            let shared = g.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("ferry-vcpu-{i}"))
                .spawn(move || vcpu(&shared, i))
                .map_err(|e| GuestError::Control(format!("cannot start vCPU thread {i}: {e}")))?;
            g.workers.push(t);
        }
        g.wait_parked()?;
        Ok(g)
    }

    /// Every vCPU's state (exact while paused; as of the last pause while running).
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.shared
            .vcpus
            .iter()
            .map(|v| *v.lock().unwrap())
            .collect()
    }

    /// When the first write of any vCPU finished (e.g. on lazily restored
    /// memory, once the page it hit was loaded).
    pub fn first_write_at(&self) -> Option<Instant> {
        self.shared.first_write.get().copied()
    }

    /// Writes done by all vCPUs (exact while paused).
    pub fn writes(&self) -> u64 {
        self.vcpu_states().iter().map(|v| v.writes).sum()
    }

    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }

    /// Emits an output record every `every` writes of each vCPU to `hook`
    /// (`every` 0 or no hook: no output).
    pub fn set_output(&self, every: u64, hook: Option<OutputHook>) {
        *self.shared.output.lock().unwrap() = hook;
        self.shared.output_every.store(every, Ordering::Release);
    }

    /// Makes the vCPUs non-deterministic: per million writes, this many
    /// mix the clock into the vCPU's RNG (0: deterministic).
    pub fn set_jitter(&self, per_million: u32) {
        self.shared
            .jitter_ppm
            .store(per_million.min(1_000_000), Ordering::Relaxed);
    }

    pub fn tracker_name(&self) -> &'static str {
        self.shared.log.name()
    }

    fn wait_parked(&self) -> Result<(), GuestError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut run = self.shared.run.lock().unwrap();
        while run.parked < self.workers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GuestError::Control(format!(
                    "only {} of {} vCPUs stopped within {} s",
                    run.parked,
                    self.workers.len(),
                    PAUSE_TIMEOUT.as_secs()
                )));
            }
            run = self.shared.cv.wait_timeout(run, left).unwrap().0;
        }
        Ok(())
    }
}

impl Guest for SyntheticGuest {
    fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        Some(&*self.shared.log)
    }

    fn pause(&self) -> Result<(), GuestError> {
        self.shared.stop_writes.store(true, Ordering::SeqCst);
        self.shared.run.lock().unwrap().paused = true;
        self.shared.cv.notify_all();
        self.wait_parked()
    }

    fn resume(&self) -> Result<(), GuestError> {
        let mut run = self.shared.run.lock().unwrap();
        run.paused = false;
        self.shared.stop_writes.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn is_running(&self) -> bool {
        !self.shared.run.lock().unwrap().paused
    }

    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        if self.is_running() {
            return Err(GuestError::DeviceState(
                "the synthetic guest must be paused to save its state".into(),
            ));
        }
        let s = DeviceState {
            kind: STATE_KIND.into(),
            version: 1,
            dirty_rate: self.shared.dirty_rate.load(Ordering::Relaxed),
            pattern: self.shared.pattern.lock().unwrap().to_string(),
            page_size: self.shared.memory.blocks()[0].page_size(),
            vcpus: self.vcpu_states(),
        };
        serde_json::to_vec(&s).map_err(|e| GuestError::DeviceState(e.to_string()))
    }

    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        if self.is_running() {
            return Err(GuestError::DeviceState(
                "the synthetic guest must be paused to load a state".into(),
            ));
        }
        let s = parse_state(state)?;
        if s.vcpus.len() != self.shared.vcpus.len() {
            return Err(GuestError::DeviceState(format!(
                "the state has {} vCPUs, this guest {}",
                s.vcpus.len(),
                self.shared.vcpus.len()
            )));
        }
        let block = &self.shared.memory.blocks()[0];
        if s.page_size != block.page_size() {
            return Err(GuestError::DeviceState(format!(
                "the state's page size {} differs from block '{}''s {}",
                s.page_size,
                block.name(),
                block.page_size()
            )));
        }
        if let Some(v) = s.vcpus.iter().find(|v| v.cursor >= block.pages()) {
            return Err(GuestError::DeviceState(format!(
                "a vCPU cursor at page {} is outside block '{}' ({} pages)",
                v.cursor,
                block.name(),
                block.pages()
            )));
        }
        *self.shared.pattern.lock().unwrap() =
            s.pattern.parse().map_err(GuestError::DeviceState)?;
        self.shared
            .dirty_rate
            .store(s.dirty_rate, Ordering::Relaxed);
        for (slot, v) in self.shared.vcpus.iter().zip(s.vcpus) {
            *slot.lock().unwrap() = v;
        }
        Ok(())
    }

    fn set_throttle(&self, percent: u8) {
        self.shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
    }

    fn resources(&self) -> &Resources {
        &self.resources
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.shared.stop_writes.store(true, Ordering::SeqCst);
        self.shared.run.lock().unwrap().quit = true;
        self.shared.cv.notify_all();
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        let _ = self.shared.log.stop();
    }
}

/// Whether `state` is a synthetic guest's device state.
pub fn is_synthetic_state(state: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(state)
        .ok()
        .and_then(|v| {
            v.get("kind")
                .and_then(|k| k.as_str().map(|k| k == STATE_KIND))
        })
        .unwrap_or(false)
}

fn parse_state(state: &[u8]) -> Result<DeviceState, GuestError> {
    let s: DeviceState = serde_json::from_slice(state)
        .map_err(|e| GuestError::DeviceState(format!("not a synthetic guest's state: {e}")))?;
    if s.kind != STATE_KIND || s.version != 1 {
        return Err(GuestError::DeviceState(format!(
            "state of kind '{}' version {}, expected '{STATE_KIND}' version 1",
            s.kind, s.version
        )));
    }
    if s.vcpus.is_empty() || s.vcpus.len() > MAX_VCPUS {
        return Err(GuestError::DeviceState(format!(
            "{} vCPUs in the state: between 1 and {MAX_VCPUS}",
            s.vcpus.len()
        )));
    }
    Ok(s)
}

/// Memory for a synthetic guest: `size` bytes in base pages, filled from
/// `seed_file` (its first `size` bytes; the rest zero) or else with the
/// `mixed` dataset pattern.
pub fn synthetic_memory(
    size: u64,
    seed_file: Option<&Path>,
    seed: u64,
) -> Result<Arc<GuestMemory>, GuestError> {
    let memory = GuestMemory::anonymous_base_pages(&[BlockSpec {
        name: SYNTHETIC_BLOCK.into(),
        len: size,
        page_size: DEFAULT_PAGE_SIZE,
    }])?;
    let block = &memory.blocks()[0];
    match seed_file {
        Some(path) => {
            let src = GuestMemory::from_file("seed", path, DEFAULT_PAGE_SIZE, false)?;
            let from = src.blocks()[0].as_volatile_slice();
            let n = from.len().min(size as usize);
            if let (Ok(from), Some(to)) = (from.subslice(0, n), block.slice(0, n)) {
                from.copy_to_volatile_slice(to);
            }
        }
        None => fill_block(block, Pattern::Mixed, seed),
    }
    Ok(Arc::new(memory))
}

fn vcpu(shared: &Shared, index: usize) {
    let mut state = *shared.vcpus[index].lock().unwrap();
    let vcpus = shared.vcpus.len() as u64;
    let block = &shared.memory.blocks()[0];
    let mut last = Instant::now();
    let mut credit = 0f64;
    loop {
        if shared.stop_writes.load(Ordering::Acquire) {
            match park(shared, index, state) {
                Some(s) => state = s,
                None => return,
            }
            last = Instant::now();
            credit = 0.0;
        }
        let now = Instant::now();
        let dt = now.duration_since(last).min(MAX_CREDIT);
        last = now;
        let rate = shared.dirty_rate.load(Ordering::Relaxed) as f64
            / f64::from(block.page_size())
            / vcpus as f64;
        let speed = f64::from(100 - shared.throttle.load(Ordering::Relaxed).min(99)) / 100.0;
        credit += dt.as_secs_f64() * rate * speed;
        let pattern = *shared.pattern.lock().unwrap();
        while credit >= 1.0 {
            if shared.stop_writes.load(Ordering::Acquire) {
                break;
            }
            write_one(shared, index, &mut state, pattern);
            credit -= 1.0;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Parks a worker until resumed; publishes its state first. `None`: quit.
fn park(shared: &Shared, index: usize, state: VcpuState) -> Option<VcpuState> {
    *shared.vcpus[index].lock().unwrap() = state;
    let mut run = shared.run.lock().unwrap();
    run.parked += 1;
    shared.cv.notify_all();
    while (run.paused || shared.stop_writes.load(Ordering::Acquire)) && !run.quit {
        run = shared.cv.wait(run).unwrap();
    }
    run.parked -= 1;
    if run.quit {
        return None;
    }
    drop(run);
    // A loaded device state may have replaced ours while parked.
    let s = *shared.vcpus[index].lock().unwrap();
    Some(s)
}

/// One write: pick a page, store a word in it, then mark it dirty.
fn write_one(shared: &Shared, index: usize, s: &mut VcpuState, pattern: DirtyPattern) {
    let block = &shared.memory.blocks()[0];
    let words = u64::from(block.page_size()) / 8;
    let (page, word, value) = next_write(index, s, pattern, block.pages(), words);
    let addr = block
        .page_addr(page)
        .expect("page < pages")
        .wrapping_add((word * 8) as usize);
    // SAFETY: addr is 8-byte aligned (page start plus a multiple of 8) and
    // inside the block's writable mapping, which outlives the workers; the
    // store is atomic, so concurrent readers (senders) see old or new bytes.
    unsafe { AtomicU64::from_ptr(addr.cast::<u64>()).store(value, Ordering::Relaxed) };
    shared.log.mark(0, page);
    let every = shared.output_every.load(Ordering::Acquire);
    if every != 0 && s.writes.is_multiple_of(every) {
        if let Some(hook) = shared.output.lock().unwrap().as_ref() {
            hook(ferry_colo::Record {
                vcpu: index as u16,
                seq: s.writes / every,
                value: output_value(s),
            });
        }
    }
    let ppm = shared.jitter_ppm.load(Ordering::Relaxed);
    if ppm != 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()));
        if splitmix(nanos ^ s.writes) % 1_000_000 < u64::from(ppm) {
            s.rng ^= splitmix(nanos);
        }
    }
    if shared.first_write.get().is_none() {
        let _ = shared.first_write.set(Instant::now());
    }
}

/// vCPU `index`'s next write from state `s` (which it advances): the page,
/// the word in it and the value stored. The one definition of the write
/// sequence, for the vCPUs and for [`replay_check`].
fn next_write(
    index: usize,
    s: &mut VcpuState,
    pattern: DirtyPattern,
    pages: u64,
    words: u64,
) -> (u64, u64, u64) {
    s.rng = splitmix(s.rng);
    let page = match pattern {
        DirtyPattern::Random => s.rng % pages,
        DirtyPattern::Sequential => {
            let p = s.cursor % pages;
            s.cursor = (p + 1) % pages;
            p
        }
        DirtyPattern::Hotset(pct) => s.rng % (pages * u64::from(pct) / 100).max(1),
    };
    let word = (s.rng >> 40) % words;
    s.writes += 1;
    let value = ((index as u64 + 1) << 48) ^ s.writes;
    (page, word, value)
}

/// The value of the output record a vCPU in state `s` emits.
pub fn output_value(s: &VcpuState) -> u64 {
    splitmix(s.rng ^ s.writes.rotate_left(32))
}

/// What [`replay_check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayCheck {
    /// Writes of the destination's vCPUs replayed.
    pub writes: u64,
    /// Distinct words they wrote.
    pub words: u64,
    /// Pages that differ from the replay (at most 16 listed), and how many.
    pub differing_pages: Vec<u64>,
    pub differing: u64,
}

impl ReplayCheck {
    pub fn equal(&self) -> bool {
        self.differing == 0
    }
}

/// Postcopy's replay check: `memory` (the destination's guest, paused
/// with device state `state_now`) must equal `switchover` (the guest's
/// one block as the source held it at the switch, device state
/// `switchover_state`) with the destination's own writes replayed. The
/// synthetic guest's writes follow from its device state, so every write
/// between the two states is known; a word two vCPUs both wrote may hold
/// either one's last value. Any lost, stale or late page shows as a page
/// that differs.
pub fn replay_check(
    switchover: &[u8],
    switchover_state: &[u8],
    memory: &GuestMemory,
    state_now: &[u8],
) -> Result<ReplayCheck, GuestError> {
    let bad = |why: String| GuestError::DeviceState(format!("replay check: {why}"));
    let (from, to) = (parse_state(switchover_state)?, parse_state(state_now)?);
    let pattern: DirtyPattern = from.pattern.parse().map_err(bad)?;
    let [block] = memory.blocks() else {
        return Err(bad(format!("{} blocks, not one", memory.blocks().len())));
    };
    let page_size = u64::from(block.page_size());
    if switchover.len() as u64 != block.len() || from.vcpus.len() != to.vcpus.len() {
        return Err(bad(format!(
            "{} bytes and {} vCPUs at the switch, {} bytes and {} vCPUs now",
            switchover.len(),
            from.vcpus.len(),
            block.len(),
            to.vcpus.len()
        )));
    }
    let words = page_size / 8;
    // Word index → each vCPU's last value there.
    let mut last: std::collections::HashMap<u64, Vec<(usize, u64)>> = Default::default();
    let mut report = ReplayCheck::default();
    for (i, (a, b)) in from.vcpus.iter().zip(&to.vcpus).enumerate() {
        let mut s = *a;
        while s.writes < b.writes {
            let (page, word, value) = next_write(i, &mut s, pattern, block.pages(), words);
            let slot = last.entry(page * words + word).or_default();
            match slot.iter_mut().find(|(v, _)| *v == i) {
                Some(e) => e.1 = value,
                None => slot.push((i, value)),
            }
            report.writes += 1;
        }
        if s != *b {
            return Err(bad(format!(
                "vCPU {i}'s state now does not follow from its state at the switch"
            )));
        }
    }
    report.words = last.len() as u64;
    let mut page = vec![0u8; page_size as usize];
    for p in 0..block.pages() {
        block
            .page_slice(p)
            .expect("p < pages")
            .copy_to(&mut page[..]);
        let reference = &switchover[(p * page_size) as usize..((p + 1) * page_size) as usize];
        let same = (0..words).all(|w| {
            let at = (w * 8) as usize;
            let got = u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"));
            match last.get(&(p * words + w)) {
                Some(values) => values.iter().any(|&(_, v)| v == got),
                None => page[at..at + 8] == reference[at..at + 8],
            }
        });
        if !same {
            report.differing += 1;
            if report.differing_pages.len() < 16 {
                report.differing_pages.push(p);
            }
        }
    }
    Ok(report)
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tracker: TrackerKind) -> SyntheticConfig {
        SyntheticConfig {
            vcpus: 2,
            dirty_rate: 64 << 20,
            pattern: DirtyPattern::Hotset(50),
            seed: 7,
            tracker,
        }
    }

    #[test]
    fn patterns_parse() {
        assert_eq!("random".parse(), Ok(DirtyPattern::Random));
        assert_eq!("hotset:25".parse(), Ok(DirtyPattern::Hotset(25)));
        assert!("hotset:0".parse::<DirtyPattern>().is_err());
        assert!("zigzag".parse::<DirtyPattern>().is_err());
    }

    #[test]
    fn pause_stops_writes_and_state_continues_exactly() {
        let mem = synthetic_memory(8 << 20, None, 1).unwrap();
        let g = SyntheticGuest::start(
            mem.clone(),
            &config(TrackerKind::Bitmap),
            Resources::none(true),
        )
        .unwrap();
        while g.is_running() && {
            std::thread::sleep(Duration::from_millis(20));
            g.pause().unwrap();
            let w = g.writes();
            g.resume().unwrap();
            w == 0
        } {}
        g.pause().unwrap();
        let digest = mem.digest();
        let state = g.save_device_state().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(mem.digest(), digest, "no write after pause returned");

        // A copy of memory and state continues the same sequence.
        let copy = synthetic_memory(8 << 20, None, 99).unwrap();
        mem.blocks()[0]
            .as_volatile_slice()
            .copy_to_volatile_slice(copy.blocks()[0].as_volatile_slice());
        let twin = SyntheticGuest::from_device_state(
            copy.clone(),
            &state,
            TrackerKind::Bitmap,
            Resources::none(false),
        )
        .unwrap();
        assert_eq!(twin.vcpu_states(), g.vcpu_states());
        let mut a = g.vcpu_states()[0];
        let mut b = twin.vcpu_states()[0];
        let p = *g.shared.pattern.lock().unwrap();
        write_one(&g.shared, 0, &mut a, p);
        write_one(&twin.shared, 0, &mut b, p);
        assert_eq!(a, b);
        assert_eq!(mem.digest(), copy.digest(), "the same write lands on both");
    }

    /// Two copies from one state emit the same numbered records; with
    /// jitter they drift apart.
    #[test]
    fn outputs_follow_the_state_and_jitter_makes_copies_diverge() {
        fn run(jitter: u32) -> (Vec<ferry_colo::Record>, Vec<ferry_colo::Record>) {
            let mem = synthetic_memory(4 << 20, None, 1).unwrap();
            let g = SyntheticGuest::paused(
                mem.clone(),
                &config(TrackerKind::Bitmap),
                Resources::none(true),
            )
            .unwrap();
            let state = g.save_device_state().unwrap();
            let twin = SyntheticGuest::from_device_state(
                mem,
                &state,
                TrackerKind::Bitmap,
                Resources::none(true),
            )
            .unwrap();
            let outs: Vec<Arc<Mutex<Vec<ferry_colo::Record>>>> =
                (0..2).map(|_| Arc::default()).collect();
            for (guest, out) in [(&g, &outs[0]), (&twin, &outs[1])] {
                let out = out.clone();
                guest.set_output(4, Some(Arc::new(move |r| out.lock().unwrap().push(r))));
                guest.set_jitter(jitter);
            }
            // The same writes on both, one vCPU at a time, no clock.
            for guest in [&g, &twin] {
                for i in 0..2 {
                    let mut s = guest.vcpu_states()[i];
                    for _ in 0..400 {
                        write_one(&guest.shared, i, &mut s, DirtyPattern::Hotset(50));
                    }
                }
            }
            let take = |o: &Arc<Mutex<Vec<ferry_colo::Record>>>| o.lock().unwrap().clone();
            (take(&outs[0]), take(&outs[1]))
        }
        let (a, b) = run(0);
        assert_eq!(a.len(), 200, "a record every 4 writes of each vCPU");
        assert_eq!(a, b, "copies from one state emit the same records");
        let seqs: Vec<u64> = a.iter().filter(|r| r.vcpu == 1).map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (1..=100).collect::<Vec<_>>(),
            "numbered 1, 2, 3... per vCPU"
        );
        let (a, b) = run(100_000);
        assert_ne!(a, b, "with jitter the copies diverge");
    }

    #[test]
    fn throttle_and_bad_states() {
        let mem = synthetic_memory(4 << 20, None, 1).unwrap();
        let g =
            SyntheticGuest::start(mem, &config(TrackerKind::Uffd), Resources::none(true)).unwrap();
        g.set_throttle(150);
        assert_eq!(g.throttle(), 99);
        assert_eq!(g.tracker_name(), "uffd");
        g.pause().unwrap();
        assert!(g.load_device_state(b"{}").is_err());
        assert!(g.load_device_state(b"\xff").is_err());
        let mut s: serde_json::Value =
            serde_json::from_slice(&g.save_device_state().unwrap()).unwrap();
        s["vcpus"][0]["cursor"] = (1u64 << 40).into();
        let e = g
            .load_device_state(s.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside block"), "{e}");
    }
}
