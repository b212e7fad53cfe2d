//! The destination's postcopy: userfaultfd over guest memory, the fault
//! thread and the page readers (see the module doc of [`super`]), and the
//! pause and resume of the link for recovery: a page channel that fails
//! (or a request that cannot be sent) pauses postcopy instead of failing
//! it; faulting guest threads stay blocked, their pages stay `requested`,
//! and [`PostcopyDestination::resume_link`] asks for them again over the
//! new link once [`PostcopyDestination::received`] told the source which
//! pages are already here.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_ram::uffd::{HugeStaging, Userfault, HUGE_PAGE};
use ferry_ram::{BlockSpec, GuestMemory, PageBitmap};
use ferry_transport::Channel;
use hdrhistogram::Histogram;

use super::huge::RegionStage;
use super::wire::{self, FrameHeader, PageRun, FLAG_END, FLAG_ZERO, FRAME_HEADER_LEN};
use super::PostcopyError;

/// Sends one page request to the source (the return path); an error text
/// if it could not be sent.
pub type RequestFn = Arc<dyn Fn(PageRun) -> Result<(), String> + Send + Sync>;

/// A page's state. Moves only forward: missing → requested → placing →
/// placed, or missing → placing → placed; each move a compare-and-swap.
/// One exception, at a resume: a page requested only along with another's
/// fault (the rest of its 2 MiB region) goes back to missing
/// ([`PostcopyDestination::resume_link`]).
const MISSING: u8 = 0;
const REQUESTED: u8 = 1;
const PLACING: u8 = 2;
const PLACED: u8 = 3;

/// How long the fault thread waits for a fault before looking at the stop
/// flag again.
const FAULT_POLL_MS: i32 = 50;

/// What a postcopy did on the destination.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PostcopyStats {
    /// Pages stale at the switch (the discard list).
    pub discarded_pages: u64,
    /// Page requests sent: one per page the guest touched while missing,
    /// which asks for that page, or for its whole 2 MiB region when no page
    /// of the region had come.
    pub requests: u64,
    /// Pages placed that the guest had asked for.
    pub requested_pages_placed: u64,
    /// Pages placed that nobody asked for (the background push, or a
    /// request's page that the background push brought first).
    pub pushed_pages_placed: u64,
    /// Pages that arrived once more after being placed (both ways), not
    /// placed again.
    pub duplicate_pages: u64,
    /// Of the pages placed: huge pages (2 MiB) moved into place whole
    /// (`UFFDIO_MOVE` of a region gathered from the push).
    pub huge_pages_moved: u64,
    /// Payload bytes received on the page channels.
    pub bytes: u64,
    /// Fault latency, request sent → page placed, in microseconds.
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// Sum of those latencies: how long faulting guest threads waited.
    pub blocked_ms: f64,
}

enum End {
    Running,
    Done,
    Failed,
}

struct Shared {
    memory: Arc<GuestMemory>,
    specs: Vec<BlockSpec>,
    /// Closed (taken) once every page is placed; kept open on failure so
    /// that guest threads on missing pages stay blocked.
    uffd: Mutex<Option<Arc<Userfault>>>,
    /// Per block, per page.
    states: Vec<Vec<AtomicU8>>,
    /// Per block, per page: when its request was sent (ns since `epoch`).
    requested_at: Vec<Vec<AtomicU64>>,
    epoch: Instant,
    missing: AtomicU64,
    /// Swapped for the new link's at each resume.
    request: Mutex<RequestFn>,
    stop: AtomicBool,
    /// The link failed: requests are held (the pages stay `requested`)
    /// until [`PostcopyDestination::resume_link`].
    paused: AtomicBool,
    /// Why it paused, the first failure of this link.
    pause_reason: Mutex<Option<String>>,
    /// Which link the readers belong to: a reader of an older link that
    /// fails late pauses nothing.
    link: AtomicU64,
    /// The memory as it was at the switch (one buffer per block), when
    /// [`PostcopyDestination::keep_reference`] asked for it: filled as
    /// pages are placed.
    reference: Mutex<Option<Vec<Vec<u8>>>>,
    /// Page reader threads (joined at a resume and at the end).
    readers: Mutex<Vec<JoinHandle<()>>>,
    end: Mutex<End>,
    ended: Condvar,
    /// The error, typed, for [`PostcopyDestination::finish`].
    error: Mutex<Option<PostcopyError>>,
    channels: Mutex<Vec<Arc<dyn Channel>>>,
    latency: Mutex<Histogram<u64>>,
    blocked_ns: AtomicU64,
    requests: AtomicU64,
    requested_placed: AtomicU64,
    pushed_placed: AtomicU64,
    duplicates: AtomicU64,
    /// Regions placed whole by one move (`huge.rs`).
    moved_regions: AtomicU64,
    /// A fault in a region with no page yet asks for the whole region
    /// ([`PostcopyDestination::ask_for_regions`]).
    ask_regions: AtomicBool,
    bytes: AtomicU64,
    discarded: u64,
}

/// A running postcopy on the destination.
pub struct PostcopyDestination {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl PostcopyDestination {
    /// Registers `memory` with userfaultfd (missing mode; anonymous private
    /// memory only, which the kernel checks), drops the pages `discard`
    /// names (one bitmap per block) so that their first touch faults, and
    /// starts the fault thread, which asks for each missing page through
    /// `request`. Every other page is taken as final. `dropped`: the pages
    /// [`drop_early`] dropped already (EARLY_DISCARD), which `discard` must
    /// name again and which are not dropped twice. An error leaves memory
    /// untouched: nothing was registered or discarded.
    pub fn start(
        memory: Arc<GuestMemory>,
        discard: &[PageBitmap],
        dropped: Option<&[PageBitmap]>,
        request: RequestFn,
    ) -> Result<Self, PostcopyError> {
        let specs = memory.specs();
        check_discard_shape(&specs, discard)?;
        if let Some(dropped) = dropped {
            check_discard_shape(&specs, dropped)?;
            check_names_dropped(&specs, discard, dropped)?;
        }
        let t0 = Instant::now();
        let uffd_err = |what| move |source| PostcopyError::Userfault { what, source };
        let uffd = Userfault::open_with_move().map_err(uffd_err("opening a userfaultfd"))?;
        for b in memory.blocks() {
            uffd.register(b.host_addr(), b.len())
                .map_err(uffd_err("registering guest memory (missing mode)"))?;
        }
        tracing::debug!(
            at_ms = t0.elapsed().as_secs_f64() * 1e3,
            "postcopy start: memory registered"
        );
        let mut states = Vec::new();
        let mut requested_at = Vec::new();
        let mut missing = 0;
        let mut madvised = 0u64;
        let mut batch = DropBatch::open();
        for (i, (b, d)) in memory.blocks().iter().zip(discard).enumerate() {
            states.push(
                (0..b.pages())
                    .map(|p| AtomicU8::new(if d.test(p) { MISSING } else { PLACED }))
                    .collect::<Vec<_>>(),
            );
            requested_at.push((0..b.pages()).map(|_| AtomicU64::new(0)).collect());
            missing += d.count();
            let early = dropped.map(|x| &x[i]);
            let runs = stale_runs(d, early);
            madvised += runs.len() as u64;
            drop_runs(b, &runs, &mut batch)?;
            if let Some(early) = early {
                madvised += drop_refilled(b, early, &mut batch)?;
            }
        }
        tracing::debug!(
            at_ms = t0.elapsed().as_secs_f64() * 1e3,
            missing,
            madvise_calls = madvised,
            "postcopy start: page states built, stale pages dropped"
        );
        let shared = Arc::new(Shared {
            memory,
            specs,
            uffd: Mutex::new(Some(Arc::new(uffd))),
            states,
            requested_at,
            epoch: Instant::now(),
            missing: AtomicU64::new(missing),
            request: Mutex::new(request),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            pause_reason: Mutex::new(None),
            link: AtomicU64::new(0),
            readers: Mutex::new(Vec::new()),
            reference: Mutex::new(None),
            end: Mutex::new(if missing == 0 {
                End::Done
            } else {
                End::Running
            }),
            ended: Condvar::new(),
            error: Mutex::new(None),
            channels: Mutex::new(Vec::new()),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ),
            blocked_ns: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            requested_placed: AtomicU64::new(0),
            pushed_placed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            moved_regions: AtomicU64::new(0),
            ask_regions: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
            discarded: missing,
        });
        let s = shared.clone();
        let fault = std::thread::Builder::new()
            .name("ferry-pc-fault".into())
            .spawn(move || {
                raise_priority("fault thread");
                fault_loop(&s)
            })
            .map_err(|source| PostcopyError::Io {
                channel: "fault thread".into(),
                what: "starting it",
                source,
            })?;
        Ok(Self {
            shared,
            threads: vec![fault],
        })
    }

    /// Starts a reader of page frames on `channel` (the preempt channel or
    /// a multifd channel), placing what it brings. It ends at the
    /// channel's END frame, or when postcopy ends.
    pub fn read_pages(&mut self, channel: Arc<dyn Channel>) -> Result<(), PostcopyError> {
        self.reader(channel, false)
    }

    /// [`Self::read_pages`] for a channel of the background push: its
    /// thread yields the CPU to the fault path ([`lower_priority`]).
    pub fn read_background_pages(
        &mut self,
        channel: Arc<dyn Channel>,
    ) -> Result<(), PostcopyError> {
        self.reader(channel, true)
    }

    fn reader(&mut self, channel: Arc<dyn Channel>, background: bool) -> Result<(), PostcopyError> {
        self.shared.channels.lock().unwrap().push(channel.clone());
        let s = self.shared.clone();
        let link = s.link.load(Ordering::Acquire);
        let t = std::thread::Builder::new()
            .name("ferry-pc-pages".into())
            .spawn(move || {
                if background {
                    lower_priority();
                } else {
                    raise_priority("preempt reader");
                }
                if let Err(e) = read_loop(&s, channel.as_ref()) {
                    if s.stop.load(Ordering::Acquire) {
                        return;
                    }
                    // A channel that breaks is the link's failure: pause
                    // (recoverable); a frame that is wrong fails.
                    match e {
                        PostcopyError::Io { .. } => pause(&s, link, &e.to_string()),
                        e => fail(&s, e),
                    }
                }
            })
            .map_err(|source| PostcopyError::Io {
                channel: "page reader".into(),
                what: "starting it",
                source,
            })?;
        self.shared.readers.lock().unwrap().push(t);
        Ok(())
    }

    /// Whether a fault in a 2 MiB region of which no page has come asks
    /// for the whole region (`yes`: the source answers requests of up to
    /// 512 pages, `CAP_POSTCOPY_REGIONS`) or for its page alone (the
    /// default). Set it before the guest runs.
    pub fn ask_for_regions(&self, yes: bool) {
        self.shared.ask_regions.store(yes, Ordering::Release);
    }

    /// Pauses postcopy: the link failed (`why`). Its channels are shut;
    /// guest threads on missing pages stay blocked and new faults are
    /// held as `requested` until [`Self::resume_link`].
    pub fn pause_link(&self, why: &str) {
        pause(&self.shared, self.shared.link.load(Ordering::Acquire), why);
    }

    /// Keeps a copy of the memory as it is at the switch: the pages held
    /// now are copied (call it before the guest runs and before any page
    /// reader starts), and each page placed later is copied as placed.
    /// [`Self::reference`] gives it back once every page is placed.
    pub fn keep_reference(&self) {
        let s = &self.shared;
        let mut out = Vec::new();
        for (block, b) in s.memory.blocks().iter().enumerate() {
            let mut buf = vec![0u8; b.len() as usize];
            let ps = u64::from(b.page_size());
            for (p, st) in s.states[block].iter().enumerate() {
                if st.load(Ordering::Acquire) == PLACED {
                    let at = p * ps as usize;
                    if let Some(page) = b.page_slice(p as u64) {
                        page.copy_to(&mut buf[at..at + ps as usize]);
                    }
                }
            }
            out.push(buf);
        }
        *s.reference.lock().unwrap() = Some(out);
    }

    /// The memory at the switch ([`Self::keep_reference`]), once every page
    /// is placed; taken.
    pub fn reference(&self) -> Option<Vec<Vec<u8>>> {
        (self.missing() == 0)
            .then(|| self.shared.reference.lock().unwrap().take())
            .flatten()
    }

    /// Pauses the current link when called (with why): for a thread that
    /// watches it; once the link is replaced, calling it does nothing.
    pub fn pauser(&self) -> impl Fn(&str) + Send + 'static {
        let s = self.shared.clone();
        let link = s.link.load(Ordering::Acquire);
        move |why| pause(&s, link, why)
    }

    /// Whether the link is paused, and why.
    pub fn paused(&self) -> Option<String> {
        self.shared
            .paused
            .load(Ordering::Acquire)
            .then(|| self.shared.pause_reason.lock().unwrap().clone())
            .map(Option::unwrap_or_default)
    }

    /// Waits for the paused link's page readers to end (their channels
    /// are shut), then returns one bitmap per block of the pages held
    /// here: placed, or never discarded. Only while paused.
    pub fn received(&self) -> Vec<PageBitmap> {
        let readers: Vec<_> = self.shared.readers.lock().unwrap().drain(..).collect();
        for t in readers {
            let _ = t.join();
        }
        self.shared
            .states
            .iter()
            .map(|pages| {
                let bits = PageBitmap::new(pages.len() as u64, false);
                for (p, st) in pages.iter().enumerate() {
                    if st.load(Ordering::Acquire) == PLACED {
                        bits.set(p as u64);
                    }
                }
                bits
            })
            .collect()
    }

    /// Resumes over a new link: `request` sends page requests on it,
    /// `channels` (the new preempt channels) bring pages; every page a
    /// guest thread touched and that is not placed yet is asked for again
    /// (once each).
    pub fn resume_link(
        &mut self,
        request: RequestFn,
        channels: Vec<Arc<dyn Channel>>,
    ) -> Result<(), PostcopyError> {
        let s = self.shared.clone();
        *s.request.lock().unwrap() = request.clone();
        s.link.fetch_add(1, Ordering::AcqRel);
        s.channels.lock().unwrap().clear();
        *s.pause_reason.lock().unwrap() = None;
        // Pages asked for only along with another's fault (the rest of a
        // whole region) go back to missing: the source sends them again
        // anyway (the received bitmap lacks them), and asking for whole
        // regions again would send them twice. Only the pages the guest
        // touched are asked for again, below, and from now on a fault asks
        // for its page alone: the source's push of every page the
        // destination lacks is under way, and a region asked for would
        // mostly come twice.
        s.ask_regions.store(false, Ordering::Release);
        for (block, pages) in s.states.iter().enumerate() {
            for (p, st) in pages.iter().enumerate() {
                if s.requested_at[block][p].load(Ordering::Acquire) == 0 {
                    let _ = st.compare_exchange(
                        REQUESTED,
                        MISSING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
        }
        s.paused.store(false, Ordering::Release);
        // As at the switch: the first answers requests, the others push.
        for (i, ch) in channels.into_iter().enumerate() {
            self.reader(ch, i > 0)?;
        }
        let mut again = 0u64;
        for (block, pages) in s.states.iter().enumerate() {
            let ps = s.specs[block].page_size as u64;
            // Runs of requested pages, each at most one request long.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for (p, st) in pages.iter().enumerate() {
                if st.load(Ordering::Acquire) == REQUESTED {
                    add_to_runs(&mut runs, p as u64, u64::from(wire::MAX_REQUEST_PAGES));
                }
            }
            if let Err(e) = ask(&request, block, ps, &runs) {
                pause(&s, s.link.load(Ordering::Acquire), &e);
                return Ok(());
            }
            again += runs.len() as u64;
        }
        tracing::info!(again, "postcopy resumed: pending page requests sent again");
        Ok(())
    }

    /// Waits up to `timeout` for postcopy to end (every page placed, or a
    /// failure); true if it has.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let end = self.shared.end.lock().unwrap();
        let (end, _) = self
            .shared
            .ended
            .wait_timeout_while(end, timeout, |e| matches!(e, End::Running))
            .unwrap();
        !matches!(*end, End::Running)
    }

    /// Page requests sent so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Page payload bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Pages still missing.
    pub fn missing(&self) -> u64 {
        self.shared.missing.load(Ordering::Acquire)
    }

    /// Stops postcopy with `why` (the link failed): guest threads on
    /// missing pages stay blocked.
    pub fn fail(&self, why: &str) {
        fail(&self.shared, PostcopyError::Stopped(why.into()));
    }

    /// Waits until every page is placed (then unregisters the memory:
    /// userfaultfd closed) or postcopy failed, up to `timeout` between two
    /// placements; stops its threads and returns what it did. On failure
    /// the memory stays registered until this value is dropped: drop it
    /// only once the guest no longer runs, or a thread on a missing page
    /// would go on with a zero page.
    pub fn finish(&mut self, timeout: Duration) -> Result<PostcopyStats, PostcopyError> {
        let s = &self.shared;
        let mut end = s.end.lock().unwrap();
        let mut last = s.missing.load(Ordering::Acquire);
        while matches!(*end, End::Running) {
            let (e, t) = s.ended.wait_timeout(end, timeout).unwrap();
            end = e;
            let now = s.missing.load(Ordering::Acquire);
            let paused = s.paused.load(Ordering::Acquire);
            if t.timed_out() && now == last && matches!(*end, End::Running) && !paused {
                drop(end);
                fail(
                    s,
                    PostcopyError::Stopped(format!(
                        "no page placed for {:.1} s with {now} still missing",
                        timeout.as_secs_f64()
                    )),
                );
                end = s.end.lock().unwrap();
            }
            last = now;
        }
        let done = matches!(*end, End::Done);
        drop(end);
        if done {
            // Every page is in place: unregister (close) before the
            // threads go, so no fault can wait on them.
            s.uffd.lock().unwrap().take();
        }
        s.stop.store(true, Ordering::Release);
        for ch in s.channels.lock().unwrap().iter() {
            ch.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let readers: Vec<_> = s.readers.lock().unwrap().drain(..).collect();
        for t in readers {
            let _ = t.join();
        }
        if !done {
            let e = s.error.lock().unwrap().take();
            return Err(e.unwrap_or_else(|| PostcopyError::Stopped("failed".into())));
        }
        Ok(self.stats())
    }

    /// The figures so far.
    pub fn stats(&self) -> PostcopyStats {
        let s = &self.shared;
        let h = s.latency.lock().unwrap();
        let q = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        PostcopyStats {
            discarded_pages: s.discarded,
            requests: s.requests.load(Ordering::Relaxed),
            requested_pages_placed: s.requested_placed.load(Ordering::Relaxed),
            pushed_pages_placed: s.pushed_placed.load(Ordering::Relaxed),
            duplicate_pages: s.duplicates.load(Ordering::Relaxed),
            huge_pages_moved: s.moved_regions.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            fault_p50_us: q(0.5),
            fault_p99_us: q(0.99),
            fault_max_us: if h.is_empty() { 0 } else { h.max() },
            blocked_ms: s.blocked_ns.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

impl Drop for PostcopyDestination {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for ch in self.shared.channels.lock().unwrap().iter() {
            ch.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let readers: Vec<_> = self.shared.readers.lock().unwrap().drain(..).collect();
        for t in readers {
            let _ = t.join();
        }
    }
}

/// Pauses link `link` (if it is still the current one and postcopy runs):
/// its channels are shut, so its other readers end too.
fn pause(s: &Shared, link: u64, why: &str) {
    if s.link.load(Ordering::Acquire) != link || !matches!(*s.end.lock().unwrap(), End::Running) {
        return;
    }
    if !s.paused.swap(true, Ordering::AcqRel) {
        tracing::warn!("postcopy paused: {why}");
        *s.pause_reason.lock().unwrap() = Some(why.to_string());
        for ch in s.channels.lock().unwrap().iter() {
            ch.shutdown();
        }
    }
    s.ended.notify_all();
}

fn fail(s: &Shared, e: PostcopyError) {
    let mut end = s.end.lock().unwrap();
    if matches!(*end, End::Running) {
        tracing::error!("postcopy stopped: {e}");
        *end = End::Failed;
        *s.error.lock().unwrap() = Some(e);
    }
    s.stop.store(true, Ordering::Release);
    s.ended.notify_all();
}

fn uffd(s: &Shared) -> Option<Arc<Userfault>> {
    s.uffd.lock().unwrap().clone()
}

/// The block and page of a faulting address.
fn page_of(s: &Shared, addr: u64) -> Option<(usize, u64)> {
    s.memory.blocks().iter().enumerate().find_map(|(i, b)| {
        let start = b.host_addr() as u64;
        (addr >= start && addr < start + b.len())
            .then(|| (i, (addr - start) / u64::from(b.page_size())))
    })
}

fn fault_loop(s: &Shared) {
    let mut faults = Vec::new();
    while !s.stop.load(Ordering::Acquire) {
        let Some(u) = uffd(s) else { return };
        if let Err(source) = u.faults(FAULT_POLL_MS, &mut faults) {
            return fail(
                s,
                PostcopyError::Userfault {
                    what: "reading faults",
                    source,
                },
            );
        }
        for &addr in &faults {
            if let Err(e) = on_fault(s, &u, addr) {
                return fail(s, e);
            }
        }
    }
}

/// One fault: the page's first request, or nothing if it is already on
/// its way; a page we hold (a precopy page the kernel never populated,
/// which is zeros) is mapped as zeros at once. Where no page of the
/// fault's 2 MiB region has come yet and whole huge pages can be moved
/// into place, the request asks for the whole region ([`region_of`]).
fn on_fault(s: &Shared, u: &Userfault, addr: u64) -> Result<(), PostcopyError> {
    let Some((block, page)) = page_of(s, addr) else {
        return Err(PostcopyError::Userfault {
            what: "a fault outside guest memory",
            source: std::io::Error::other(format!("address {addr:#x}")),
        });
    };
    let b = &s.memory.blocks()[block];
    let ps = u64::from(b.page_size());
    let state = &s.states[block][page as usize];
    match state.compare_exchange(MISSING, REQUESTED, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            // Never 0: 0 marks a page requested along with another's fault.
            let at = (s.epoch.elapsed().as_nanos() as u64).max(1);
            s.requested_at[block][page as usize].store(at, Ordering::Release);
            let runs = match region_of(s, u, block, page) {
                Some(first) => claim_region(s, block, first, page),
                None => vec![(page, 1)],
            };
            s.requests.fetch_add(runs.len() as u64, Ordering::Relaxed);
            if s.paused.load(Ordering::Acquire) {
                // Asked for again at the resume.
                return Ok(());
            }
            let link = s.link.load(Ordering::Acquire);
            let request = s.request.lock().unwrap().clone();
            if let Err(why) = ask(&request, block, ps, &runs) {
                pause(s, link, &format!("sending a page request: {why}"));
            }
            Ok(())
        }
        // On its way: its placement wakes the toucher.
        Err(REQUESTED | PLACING) => Ok(()),
        Err(_) => {
            let dst = b.page_addr(page).expect("page_of stays inside the block");
            match u.zero(dst, ps) {
                Ok(()) => Ok(()),
                // Placed since the fault was queued: make sure the toucher runs.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    u.wake(dst, ps).map_err(|source| {
                        place_err("waking a toucher of", b.name(), page * ps, source)
                    })
                }
                Err(source) => Err(place_err("mapping zeros at", b.name(), page * ps, source)),
            }
        }
    }
}

/// Asks for each run (first page, pages) of `block` (pages of `ps`
/// bytes) through `request`; the first one that cannot be sent ends it,
/// with why.
fn ask(request: &RequestFn, block: usize, ps: u64, runs: &[(u64, u64)]) -> Result<(), String> {
    for &(first, n) in runs {
        request(PageRun {
            block: block as u16,
            offset: first * ps,
            len: n * ps,
        })?;
    }
    Ok(())
}

/// The first page of `page`'s 2 MiB region when the whole region is worth
/// asking for: the source answers such requests, huge pages can be moved
/// into place here, the region is
/// aligned and inside its block, and every other page of it is missing
/// (`page` itself was just marked requested).
fn region_of(s: &Shared, u: &Userfault, block: usize, page: u64) -> Option<u64> {
    let b = &s.memory.blocks()[block];
    let n = HUGE_PAGE / u64::from(b.page_size());
    let first = page - page % n;
    let aligned = b
        .page_addr(first)
        .is_some_and(|a| (a as u64).is_multiple_of(HUGE_PAGE));
    let whole = u.can_move()
        && s.ask_regions.load(Ordering::Acquire)
        && n <= u64::from(wire::MAX_REQUEST_PAGES)
        && aligned
        && first + n <= b.pages()
        && s.states[block][first as usize..(first + n) as usize]
            .iter()
            .enumerate()
            .all(|(i, p)| first + i as u64 == page || p.load(Ordering::Acquire) == MISSING);
    whole.then_some(first)
}

/// Marks every missing page of the region from `first` requested (`page`,
/// the faulting one, is already) and returns the runs (first page, pages)
/// to ask for: the whole region, unless a page arrived meanwhile.
fn claim_region(s: &Shared, block: usize, first: u64, page: u64) -> Vec<(u64, u64)> {
    let n = HUGE_PAGE / u64::from(s.memory.blocks()[block].page_size());
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in first..first + n {
        let mine = p == page
            || s.states[block][p as usize]
                .compare_exchange(MISSING, REQUESTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if mine {
            add_to_runs(&mut runs, p, n);
        }
    }
    runs
}

/// Drops the pages `discard` names (one bitmap per block) ahead of the
/// switch, while the source's guest still runs (EARLY_DISCARD): the bulk of
/// the stale pages, so that the downtime drops only those dirtied since.
/// The caller makes sure no pass is landing (every PASS_END so far was
/// waited for) and the guest does not run here. Nothing is registered: the
/// pages are simply empty until [`PostcopyDestination::start`], given the
/// same bitmaps as `dropped`, registers the memory, drops again any that
/// came back meanwhile (khugepaged) and takes them all as missing. Returns
/// how many pages were dropped.
pub fn drop_early(memory: &GuestMemory, discard: &[PageBitmap]) -> Result<u64, PostcopyError> {
    check_discard_shape(&memory.specs(), discard)?;
    let mut batch = DropBatch::open();
    for (b, d) in memory.blocks().iter().zip(discard) {
        drop_runs(b, &stale_runs(d, None), &mut batch)?;
    }
    Ok(discard.iter().map(PageBitmap::count).sum())
}

/// Drops again the pages of `early` (dropped by [`drop_early`]) that have
/// a page-table entry now: until the memory was registered, khugepaged
/// could collapse their huge page back, filling the holes with zeros (a
/// page present there would fail its `UFFDIO_COPY` with EEXIST). Once
/// registered nothing fills them: khugepaged leaves a registered range's
/// holes alone. Where the page tables cannot be read, every page of
/// `early` is dropped again. Returns the runs dropped.
fn drop_refilled(
    b: &ferry_ram::RamBlock,
    early: &PageBitmap,
    batch: &mut DropBatch,
) -> Result<u64, PostcopyError> {
    let runs = match b.mapped_pages() {
        Some(mapped) => {
            let back = PageBitmap::new(early.pages(), false);
            for w in 0..early.words() {
                back.or_word(w, early.word(w) & mapped.word(w));
            }
            stale_runs(&back, None)
        }
        None => stale_runs(early, None),
    };
    if !runs.is_empty() {
        tracing::debug!(
            block = b.name(),
            runs = runs.len(),
            "postcopy start: pages dropped early were mapped again (a huge page collapsed back?): dropped again"
        );
    }
    drop_runs(b, &runs, batch)?;
    Ok(runs.len() as u64)
}

/// A discard list names each block of the guest, in order, with its page
/// count.
fn check_discard_shape(specs: &[BlockSpec], discard: &[PageBitmap]) -> Result<(), PostcopyError> {
    if discard.len() != specs.len()
        || discard
            .iter()
            .zip(specs)
            .any(|(d, s)| d.pages() != s.len / u64::from(s.page_size))
    {
        return Err(PostcopyError::BadDiscard(
            "its blocks do not match the guest's memory".into(),
        ));
    }
    Ok(())
}

/// The switch's discard list names every page dropped early: one it left
/// out would be taken as final, and the guest would find it empty.
fn check_names_dropped(
    specs: &[BlockSpec],
    discard: &[PageBitmap],
    dropped: &[PageBitmap],
) -> Result<(), PostcopyError> {
    for ((spec, d), early) in specs.iter().zip(discard).zip(dropped) {
        for w in 0..early.words() {
            let left_out = early.word(w) & !d.word(w);
            if left_out != 0 {
                let page = w as u64 * 64 + u64::from(left_out.trailing_zeros());
                return Err(PostcopyError::BadDiscard(format!(
                    "it leaves out page {page} (offset {:#x}) of block '{}', dropped before \
                     the switch (EARLY_DISCARD): that page would never come",
                    page * u64::from(spec.page_size),
                    spec.name
                )));
            }
        }
    }
    Ok(())
}

/// Adds page `p` to `runs` (first page, pages; `p` after every page in
/// them): it lengthens the last run if it follows it and that run has
/// fewer than `max` pages, else it starts a run.
fn add_to_runs(runs: &mut Vec<(u64, u64)>, p: u64, max: u64) {
    match runs.last_mut() {
        Some((first, n)) if *first + *n == p && *n < max => *n += 1,
        _ => runs.push((p, 1)),
    }
}

/// The runs (first page, pages) of the pages set in `d` and not in `skip`.
fn stale_runs(d: &PageBitmap, skip: Option<&PageBitmap>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in d.iter_set() {
        if !skip.is_some_and(|s| s.test(p)) {
            add_to_runs(&mut runs, p, u64::MAX);
        }
    }
    runs
}

/// Batches the dropping of stale pages: process_madvise(2) over this
/// process's own pidfd takes up to [`IOV_MAX`] ranges a call with one TLB
/// flush for them all, where one madvise(2) per range flushes once per
/// range (on 1 GiB with 17 000 runs, 70 ms rather than 110 ms here).
/// Kernels that refuse MADV_DONTNEED there (before 5.10 there is no
/// process_madvise; until 6.x it takes only MADV_COLD and PAGEOUT) get
/// one madvise(2) per range.
struct DropBatch {
    /// None: process_madvise is not usable; madvise(2) per range.
    pidfd: Option<std::os::fd::OwnedFd>,
}

/// The most ranges one process_madvise(2) call takes (UIO_MAXIOV).
const IOV_MAX: usize = 1024;

impl DropBatch {
    fn open() -> Self {
        // SAFETY: pidfd_open(2) on our own pid with no flags; it returns a
        // new file descriptor (owned below) or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: fd is a pidfd just returned to us and owned nowhere else.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
        });
        Self { pidfd }
    }
}

/// Drops pages `runs` ((first page, pages)) of `b`: their contents go
/// (they are stale; the source sends them again) and their next touch is
/// a missing-page fault, which the userfaultfd registered over `b` holds
/// until the page is placed.
fn drop_runs(
    b: &ferry_ram::RamBlock,
    runs: &[(u64, u64)],
    batch: &mut DropBatch,
) -> Result<(), PostcopyError> {
    use std::os::fd::AsRawFd;
    let ps = u64::from(b.page_size());
    let range = |&(first, n): &(u64, u64)| {
        let addr = b
            .page_addr(first)
            .expect("discard bits are inside the block");
        (addr, (n * ps) as usize)
    };
    for chunk in runs.chunks(IOV_MAX) {
        if let Some(pidfd) = &batch.pidfd {
            let iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|r| {
                    let (addr, len) = range(r);
                    libc::iovec {
                        iov_base: addr.cast(),
                        iov_len: len,
                    }
                })
                .collect();
            let want: usize = iov.iter().map(|v| v.iov_len).sum();
            // SAFETY: process_madvise(MADV_DONTNEED) on our own process
            // (pidfd), over `iov`: at most IOV_MAX ranges, each whole pages
            // of this block's own anonymous private mapping (the discard
            // bits lie inside the block), dropped as madvise(2) would.
            let done = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    libc::MADV_DONTNEED,
                    0,
                )
            };
            if done >= 0 && done as usize == want {
                continue;
            }
            tracing::debug!(
                "process_madvise(MADV_DONTNEED) returned {done} of {want} bytes ({}): \
                 madvise(2) per range from here",
                std::io::Error::last_os_error()
            );
            // Dropping twice is harmless: the whole chunk again, one by one.
            batch.pidfd = None;
        }
        for r in chunk {
            let (addr, len) = range(r);
            // SAFETY: madvise(MADV_DONTNEED) over whole pages of this
            // block's own anonymous private mapping (the discard bits lie
            // inside the block), dropped as described above.
            if unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) } != 0 {
                return Err(PostcopyError::Place {
                    what: "dropping the stale pages of",
                    block: b.name().into(),
                    offset: r.0 * ps,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

fn place_err(
    what: &'static str,
    block: &str,
    offset: u64,
    source: std::io::Error,
) -> PostcopyError {
    PostcopyError::Place {
        what,
        block: block.into(),
        offset,
        source,
    }
}

/// Bytes of a channel read ahead: one `read` takes as many frames as have
/// arrived (a push of scattered pages brings one small frame per page), and
/// the frames are then parsed from memory. A channel kind that only reads
/// exactly (TLS, which buffers records itself) is read frame by frame.
struct FrameReader<'a> {
    ch: &'a dyn Channel,
    buf: Vec<u8>,
    /// `buf[start..end]`: read, not parsed yet.
    start: usize,
    end: usize,
}

/// How much a [`FrameReader`] asks for in one read: a few of the largest
/// frames.
const READ_AHEAD: usize = 1 << 20;

impl<'a> FrameReader<'a> {
    fn new(ch: &'a dyn Channel) -> Self {
        Self {
            ch,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// Makes the next `n` bytes available ([`Self::peek`]).
    fn fill(&mut self, n: usize) -> std::io::Result<()> {
        if self.end - self.start >= n {
            return Ok(());
        }
        if self.buf.len() < self.start + n {
            // Move what is left to the front, and make room for `n`.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let want = n.max(READ_AHEAD);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
        }
        while self.end - self.start < n {
            match self.ch.read_some(&mut self.buf[self.end..]) {
                Some(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Some(Ok(k)) => self.end += k,
                Some(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Some(Err(e)) => return Err(e),
                None => {
                    // Exactly what is missing, no more.
                    let to = self.start + n;
                    self.ch.read_exact(&mut self.buf[self.end..to])?;
                    self.end = to;
                }
            }
        }
        Ok(())
    }

    /// The next `n` bytes, after [`Self::fill`] of at least `n`.
    fn peek(&self, n: usize) -> &[u8] {
        &self.buf[self.start..self.start + n]
    }

    /// Drops the next `n` bytes (parsed).
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }
}

/// Reads page frames from `ch` until its END (or a stop), placing each.
fn read_loop(s: &Shared, ch: &dyn Channel) -> Result<(), PostcopyError> {
    let name = ch.label().to_string();
    let io = |what| {
        let name = name.clone();
        move |source| PostcopyError::Io {
            channel: name,
            what,
            source,
        }
    };
    let mut rd = FrameReader::new(ch);
    // Where whole huge pages can be moved into place: a region's frames
    // are gathered first (`huge.rs`).
    let mut stage = uffd(s)
        .is_some_and(|u| u.can_move())
        .then(|| RegionStage::new(u64::from(ferry_ram::DEFAULT_PAGE_SIZE)))
        .flatten();
    loop {
        rd.fill(FRAME_HEADER_LEN)
            .map_err(io("reading a page frame"))?;
        let hb: [u8; FRAME_HEADER_LEN] = rd.peek(FRAME_HEADER_LEN).try_into().expect("24 bytes");
        let h = FrameHeader::decode(&hb, &s.specs, &name)?;
        if h.flags & FLAG_END != 0 {
            if let Some(st) = stage.as_mut() {
                flush(s, st)?;
            }
            return Ok(());
        }
        let (ps, first) = wire::check_run(&s.specs, &h.run, &name)?;
        let head: [u8; 20] = hb[..20].try_into().expect("20 bytes");
        let zero = h.flags & FLAG_ZERO != 0;
        let len = if zero { 0 } else { h.run.len as usize };
        rd.fill(FRAME_HEADER_LEN + len)
            .map_err(io("reading a page frame's payload"))?;
        let data = &rd.peek(FRAME_HEADER_LEN + len)[FRAME_HEADER_LEN..];
        s.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let got = wire::frame_crc(&head, data);
        if got != h.crc {
            return Err(PostcopyError::Checksum {
                channel: name,
                block: s.specs[usize::from(h.run.block)].name.clone(),
                offset: h.run.offset,
                pages: h.pages,
                want: h.crc,
                got,
            });
        }
        let (block, pages) = (usize::from(h.run.block), h.run.len / ps);
        let payload = (!zero).then_some(data);
        match stage.as_mut() {
            Some(st) if st.continues(block, first, pages) => st.add(pages, payload),
            Some(st) => {
                flush(s, st)?;
                if can_move_region(s, st, block, first) {
                    st.begin(block, first);
                    st.add(pages, payload);
                } else {
                    place(s, block, first, pages, payload)?;
                }
            }
            None => place(s, block, first, pages, payload)?,
        }
        if let Some(st) = stage.as_mut().filter(|st| st.full()) {
            flush(s, st)?;
        }
        rd.consume(FRAME_HEADER_LEN + len);
    }
}

/// Whether a frame at page `first` of `block` may start gathering a
/// region to move whole: the region starts there, lies in the block, is
/// aligned in memory as a huge page is, and every page of it is missing.
fn can_move_region(s: &Shared, st: &RegionStage, block: usize, first: u64) -> bool {
    let n = st.region_pages();
    let b = &s.memory.blocks()[block];
    if u64::from(b.page_size()) * n != HUGE_PAGE
        || !first.is_multiple_of(n)
        || first + n > b.pages()
    {
        return false;
    }
    let at = b.page_addr(first).expect("first < pages") as u64;
    at.is_multiple_of(HUGE_PAGE)
        && s.states[block][first as usize..(first + n) as usize]
            .iter()
            .all(|p| p.load(Ordering::Acquire) <= REQUESTED)
}

/// Places the region `st` gathered, if any: moved whole when every page
/// of it is still missing and it was gathered whole, page by page from the
/// buffer otherwise.
fn flush(s: &Shared, st: &mut RegionStage) -> Result<(), PostcopyError> {
    let whole = st.full();
    let Some((g, buf)) = st.take() else {
        return Ok(());
    };
    let ps = u64::from(s.memory.blocks()[g.block].page_size());
    if whole {
        return place_region(s, g.block, g.first, g.pages, buf);
    }
    let len = (g.pages * ps) as usize;
    place(s, g.block, g.first, g.pages, Some(&buf.bytes_mut()[..len]))
}

/// Places the gathered region `first..first + pages` of `block` from
/// `buf`: claims every page; when it holds them all, moves the buffer's
/// huge page into place with one `UFFDIO_MOVE`, else (another arrival
/// placed some) copies the pages it claimed. A move that stops part way
/// leaves the rest in the buffer, copied then.
fn place_region(
    s: &Shared,
    block: usize,
    first: u64,
    pages: u64,
    buf: &mut HugeStaging,
) -> Result<(), PostcopyError> {
    let Some(u) = uffd(s) else {
        s.duplicates.fetch_add(pages, Ordering::Relaxed);
        return Ok(());
    };
    let b = &s.memory.blocks()[block];
    let ps = u64::from(b.page_size());
    let prevs: Vec<Option<u8>> = (first..first + pages).map(|p| claim(s, block, p)).collect();
    let mut moved = 0u64;
    if u.can_move() && prevs.iter().all(Option::is_some) {
        let dst = b.page_addr(first).expect("the region lies in the block");
        let claimed: Vec<u8> = prevs.iter().map(|p| p.expect("all claimed")).collect();
        record_reference(s, block, first, buf.bytes_mut());
        let src = buf.as_mut_ptr();
        // SAFETY: dst..dst + pages × ps is a huge-page-aligned region of a
        // block registered with `u` (can_move_region), every page of it
        // missing and claimed here (PLACING: no other placement touches it;
        // the guest cannot write a missing page, it faults); src is this
        // reader's own staging buffer, used by nothing else meanwhile.
        moved = match unsafe { u.move_pages(dst, src, pages * ps) } {
            Ok(n) => n / ps,
            Err(e) => {
                tracing::debug!(
                    block = b.name(),
                    offset = first * ps,
                    "moving a whole huge page failed ({e}): copied page by page"
                );
                0
            }
        };
        if moved > 0 {
            mark_placed(s, block, first, &claimed[..moved as usize]);
            s.moved_regions
                .fetch_add(u64::from(moved == pages), Ordering::Relaxed);
        }
        if moved == pages {
            // The buffer gave its huge page away: fault in (and zero) the
            // next one now, rather than when the next region arrives.
            buf.bytes_mut()[0] = 0;
            return Ok(());
        }
    }
    // What was not moved: the runs claimed here, copied from the buffer.
    let data = buf.bytes_mut();
    let mut i = moved;
    while i < pages {
        if prevs[i as usize].is_none() {
            s.duplicates.fetch_add(1, Ordering::Relaxed);
            i += 1;
            continue;
        }
        let run: Vec<u8> = prevs[i as usize..].iter().map_while(|p| *p).collect();
        let n = run.len() as u64;
        let src = &data[(i * ps) as usize..((i + n) * ps) as usize];
        fill(s, &u, block, first + i, &run, Some(src))?;
        i += n;
    }
    Ok(())
}

/// Claims page `page` of `block` for placing: its state before, or None if
/// another arrival has it already.
fn claim(s: &Shared, block: usize, page: u64) -> Option<u8> {
    let state = &s.states[block][page as usize];
    let mut cur = state.load(Ordering::Acquire);
    loop {
        if cur >= PLACING {
            return None;
        }
        match state.compare_exchange(cur, PLACING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(prev) => return Some(prev),
            Err(now) => cur = now,
        }
    }
}

/// Places pages `first..first + pages` of `block` (from `data`, or zeros),
/// each exactly once: a page another arrival already claimed is skipped.
/// Each unbroken run of pages claimed here is placed with one ioctl.
fn place(
    s: &Shared,
    block: usize,
    first: u64,
    pages: u64,
    data: Option<&[u8]>,
) -> Result<(), PostcopyError> {
    let Some(u) = uffd(s) else {
        // Every page is placed already: what comes now is a duplicate.
        s.duplicates.fetch_add(pages, Ordering::Relaxed);
        return Ok(());
    };
    let ps = u64::from(s.memory.blocks()[block].page_size());
    // The states the pages of the current run had before their claim.
    let mut prevs: Vec<u8> = Vec::with_capacity(pages as usize);
    let mut i = 0;
    while i < pages {
        prevs.clear();
        while i + (prevs.len() as u64) < pages {
            match claim(s, block, first + i + prevs.len() as u64) {
                Some(prev) => prevs.push(prev),
                None => break,
            }
        }
        if prevs.is_empty() {
            s.duplicates.fetch_add(1, Ordering::Relaxed);
            i += 1;
            continue;
        }
        let n = prevs.len() as u64;
        let src = data.map(|d| &d[(i * ps) as usize..((i + n) * ps) as usize]);
        fill(s, &u, block, first + i, &prevs, src)?;
        i += n;
    }
    Ok(())
}

/// Fills the pages `page..page + prevs.len()` of `block`, claimed here
/// (`prevs`: their states before the claim), from `src` or with zeros, in
/// one ioctl, and records them placed.
fn fill(
    s: &Shared,
    u: &Userfault,
    block: usize,
    page: u64,
    prevs: &[u8],
    src: Option<&[u8]>,
) -> Result<(), PostcopyError> {
    let b = &s.memory.blocks()[block];
    let ps = u64::from(b.page_size());
    let n = prevs.len() as u64;
    let dst = b
        .page_addr(page)
        .expect("check_run kept the run inside the block");
    let placed = match src {
        None => u.zero(dst, n * ps),
        Some(src) => {
            // SAFETY: dst..dst + n pages lie inside a block registered
            // with `u` (check_run), all missing (each page's state was
            // missing or requested, and we hold its PLACING claim, so
            // no other placement touches it; the guest cannot write a
            // missing page, it faults); src is n pages of this
            // thread's own buffer.
            unsafe { u.copy(dst, src.as_ptr(), n * ps) }
        }
    };
    placed.map_err(|source| place_err("placing a page of", b.name(), page * ps, source))?;
    match src {
        Some(src) => record_reference(s, block, page, src),
        None => zero_reference(s, block, page, n),
    }
    mark_placed(s, block, page, prevs);
    Ok(())
}

/// Copies pages placed from `src` into the reference
/// ([`PostcopyDestination::keep_reference`]), if one is kept.
fn record_reference(s: &Shared, block: usize, page: u64, src: &[u8]) {
    if let Some(r) = s.reference.lock().unwrap().as_mut() {
        let at = (page * u64::from(s.memory.blocks()[block].page_size())) as usize;
        r[block][at..at + src.len()].copy_from_slice(src);
    }
}

/// Zeros `n` pages from `page` in the reference, if one is kept.
fn zero_reference(s: &Shared, block: usize, page: u64, n: u64) {
    if let Some(r) = s.reference.lock().unwrap().as_mut() {
        let ps = u64::from(s.memory.blocks()[block].page_size());
        let at = (page * ps) as usize;
        r[block][at..at + (n * ps) as usize].fill(0);
    }
}

/// Records the pages `page..page + prevs.len()` of `block` placed
/// (`prevs`: their states before their claim): a requested one's fault
/// latency, and the end once none is missing.
fn mark_placed(s: &Shared, block: usize, page: u64, prevs: &[u8]) {
    let n = prevs.len() as u64;
    let now = s.epoch.elapsed().as_nanos() as u64;
    for (k, &prev) in prevs.iter().enumerate() {
        let p = (page + k as u64) as usize;
        s.states[block][p].store(PLACED, Ordering::Release);
        if prev == REQUESTED {
            // A fault's own page (not one asked for along with it): its wait.
            let asked = s.requested_at[block][p].load(Ordering::Acquire);
            if asked != 0 {
                let ns = now.saturating_sub(asked);
                s.latency
                    .lock()
                    .unwrap()
                    .saturating_record((ns / 1000).max(1));
                s.blocked_ns.fetch_add(ns, Ordering::Relaxed);
            }
            s.requested_placed.fetch_add(1, Ordering::Relaxed);
        } else {
            s.pushed_placed.fetch_add(1, Ordering::Relaxed);
        }
    }
    if s.missing.fetch_sub(n, Ordering::AcqRel) == n {
        let mut end = s.end.lock().unwrap();
        if matches!(*end, End::Running) {
            *end = End::Done;
        }
        s.ended.notify_all();
    }
}

/// The nice value of postcopy's background threads (the push on the
/// source, its readers here).
const BACKGROUND_NICE: i32 = 5;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`], so
/// that on a busy machine the threads of a page request (the fault thread,
/// the preempt channel's reader here, the source's server) get a CPU at
/// once when they wake, rather than after a push thread's time slice. A
/// thread may always lower its own priority; failure changes nothing else
/// and is only logged. Not where the request path may run at SCHED_RR
/// ([`realtime_allowed`]): it then runs first by policy, and a niced push
/// only lost the CPU to the guest's vCPUs as well (1 GiB guest writing
/// 1 GiB/s, 2 cores, 7 alternating runs: total 0.708 s niced against
/// 0.647 s not, the fault latency's p99 the same).
pub(super) fn lower_priority() {
    if realtime_allowed() {
        return;
    }
    // SAFETY: gettid(2) has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority(2) on this thread's own id (Linux applies
    // PRIO_PROCESS to one thread); no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) } != 0 {
        tracing::debug!(
            "lowering a postcopy background thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether this process may put threads on SCHED_RR at
/// [`URGENT_RT_PRIORITY`]: an RLIMIT_RTPRIO that high, or CAP_SYS_NICE.
/// Asked once.
pub(super) fn realtime_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes one rlimit into `lim`.
        let rtprio = unsafe { libc::getrlimit(libc::RLIMIT_RTPRIO, &mut lim) } == 0
            && lim.rlim_cur >= URGENT_RT_PRIORITY as libc::rlim_t;
        rtprio || has_cap_sys_nice()
    })
}

/// CAP_SYS_NICE (bit 23) in this process's effective capabilities, as
/// /proc/self/status lists them.
fn has_cap_sys_nice() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// The real-time priority (SCHED_RR) of the threads a page request
/// crosses: the lowest, enough to run before every ordinary thread.
const URGENT_RT_PRIORITY: i32 = 1;
/// sched_setscheduler(2)'s flag: threads this one starts do not inherit
/// its policy.
const SCHED_RESET_ON_FORK: i32 = 0x4000_0000;
/// The nice value used where real-time scheduling is refused.
const URGENT_NICE: i32 = -5;

/// A thread's scheduling before [`raise_priority`], to put back with
/// [`restore_priority`].
pub(crate) struct Priority {
    tid: libc::pid_t,
    policy: i32,
    param: libc::sched_param,
    nice: i32,
}

/// Runs the calling thread before every ordinary thread on a busy machine:
/// a page request's threads (the fault thread and the preempt channel's
/// reader here, the serving thread on the source) then get a CPU as soon
/// as they wake, not after a vCPU's or a push thread's time slice.
/// SCHED_RR at priority 1 (threads it starts do not inherit it), where
/// refused (no CAP_SYS_NICE) nice -5, where that too is refused nothing
/// (a note in the log). These threads only wait, then do a short piece
/// of work; the kernel's real-time throttling bounds them anyway.
pub(crate) fn raise_priority(what: &str) -> Priority {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    raise_thread(tid, what)
}

/// [`raise_priority`] for the threads of this process named `name` (as
/// `/proc/self/task/*/comm` shows it: at most 15 bytes): for a thread of
/// the request path that another module starts (the source's return-path
/// reader). Not put back: such a thread ends with its link.
pub(crate) fn raise_threads_named(name: &str, what: &str) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        if let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) {
            raise_thread(tid, what);
        }
    }
}

fn raise_thread(tid: libc::pid_t, what: &str) -> Priority {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getscheduler/sched_getparam(2) on a thread of this
    // process; `param` is a valid sched_param to write.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    // SAFETY: as above.
    unsafe { libc::sched_getparam(tid, &mut param) };
    // SAFETY: getpriority(2) on a thread's id (Linux: that one thread).
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let before = Priority {
        tid,
        policy,
        param,
        nice,
    };
    let rt = libc::sched_param {
        sched_priority: URGENT_RT_PRIORITY,
    };
    // SAFETY: sched_setscheduler(2) on a thread of this process with a
    // valid sched_param; no memory is kept.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_RR | SCHED_RESET_ON_FORK, &rt) } == 0 {
        return before;
    }
    let rt_err = std::io::Error::last_os_error();
    // SAFETY: setpriority(2) on a thread of this process; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, URGENT_NICE) } == 0 {
        tracing::debug!(
            "postcopy {what}: SCHED_RR refused ({rt_err}), running at nice {URGENT_NICE}"
        );
        return before;
    }
    tracing::debug!(
        "postcopy {what}: SCHED_RR refused ({rt_err}), nice {URGENT_NICE} refused ({}): \
         normal priority",
        std::io::Error::last_os_error()
    );
    before
}

/// Puts back the scheduling of the thread that called [`raise_priority`]
/// (the caller of this, the same thread).
pub(crate) fn restore_priority(p: Priority) {
    let tid = p.tid;
    // SAFETY: sched_setscheduler(2) and setpriority(2) on this thread's
    // own id with the values read from it before; no memory is kept.
    unsafe {
        libc::sched_setscheduler(tid, p.policy, &p.param);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, p.nice);
    }
}
