//! The sender pool: the K channel threads seen from the migration thread.
//! Owns the options ([`SenderOptions`], [`SendPath`]), the checks made
//! before any thread starts, the pass handed to every thread ([`PassWork`],
//! claimed a chunk at a time), and the wait for every thread's report with
//! its stall deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_ram::{GuestMemory, PageBitmap, RamBlock};
use ferry_transport::splice::{SplicePipe, WANTED_PIPE_BYTES};
use ferry_transport::Channel;

use super::thread::channel_thread;
use crate::compress::Compressor;
use crate::packet::PAYLOAD_IOV;
use crate::stats::{Activity, StallClock};
use crate::{Counters, MultifdError, PassControl, Totals, MAX_PACKET_PAGES};

#[derive(Clone, Debug)]
pub struct SenderOptions {
    /// Pages per packet (and per claimed chunk): a multiple of 64.
    pub packet_pages: u32,
    /// crc32 over each payload and header (the receiver checks them).
    pub checksum: bool,
    /// How packets reach the socket.
    pub path: SendPath,
    /// Packets prepared or in flight per channel (io_uring paths).
    pub slots: usize,
    /// zstd level to compress payloads with, if any (negative levels allowed).
    pub compress: Option<i32>,
    /// A pass (or the final END) fails when a channel that still owes its
    /// share makes no progress for this long: the peer stopped reading.
    /// `None`: wait for ever.
    pub stall_timeout: Option<Duration>,
}

/// How a sender thread hands its packets to the socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SendPath {
    /// `vmsplice` + `splice`: the socket takes references to the guest
    /// pages; the sender copies nothing. A page rewritten before it leaves
    /// goes out with its new bytes (its checksum then fails, and the page,
    /// being dirty, is sent again).
    #[default]
    Splice,
    /// io_uring `sendmsg`: the kernel copies the pages into socket buffers.
    Copy,
    /// io_uring `sendmsg_zc` (MSG_ZEROCOPY): pages are pinned until the
    /// kernel's notification; loopback copies them anyway.
    ZeroCopy,
}

impl SendPath {
    pub fn name(self) -> &'static str {
        match self {
            SendPath::Splice => "splice",
            SendPath::Copy => "copy",
            SendPath::ZeroCopy => "zero-copy",
        }
    }
}

impl Default for SenderOptions {
    fn default() -> Self {
        Self {
            packet_pages: 128,
            checksum: true,
            path: SendPath::Splice,
            slots: 8,
            compress: None,
            stall_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// The pages one pass must send, claimed a chunk at a time by all threads.
pub(crate) struct PassWork {
    pub(super) generation: u64,
    /// The guest runs during this pass: pages may change while in flight.
    pub(super) live: bool,
    pub(super) control: Arc<PassControl>,
    pub(super) bitmaps: Arc<Vec<PageBitmap>>,
    /// Per block, when the pass takes a large share of it: the pages that
    /// may hold data ([`RamBlock::data_pages`]); the others go as zero
    /// pages without being read.
    pub(super) data_pages: Vec<Option<PageBitmap>>,
    /// First chunk number of each block, and the total after the last.
    chunk_starts: Vec<u64>,
    pub(super) words_per_chunk: usize,
    next_chunk: AtomicU64,
}

impl PassWork {
    pub(super) fn new(
        generation: u64,
        live: bool,
        control: Arc<PassControl>,
        bitmaps: Arc<Vec<PageBitmap>>,
        data_pages: Vec<Option<PageBitmap>>,
        words_per_chunk: usize,
    ) -> Self {
        let mut chunk_starts = vec![0];
        for b in bitmaps.iter() {
            let last = *chunk_starts.last().unwrap();
            chunk_starts.push(last + b.words().div_ceil(words_per_chunk) as u64);
        }
        Self {
            generation,
            live,
            control,
            bitmaps,
            data_pages,
            chunk_starts,
            words_per_chunk,
            next_chunk: AtomicU64::new(0),
        }
    }

    /// The next unclaimed chunk: (block index, first bitmap word).
    pub(super) fn claim(&self) -> Option<(usize, usize)> {
        if self.control.is_interrupted() {
            return None;
        }
        let c = self.next_chunk.fetch_add(1, Ordering::Relaxed);
        let block = self
            .chunk_starts
            .partition_point(|&s| s <= c)
            .checked_sub(1)?;
        if block >= self.bitmaps.len() {
            return None;
        }
        Some((
            block,
            (c - self.chunk_starts[block]) as usize * self.words_per_chunk,
        ))
    }
}

/// For each block a pass takes at least a quarter of (a first pass takes
/// all of it), the pages that may hold data, from one walk of the page
/// tables: a guest's first pass then reads only the memory it has written
/// (a 2 GiB micro-VM that touched 50 MiB: 50 MiB read, not 2 GiB of zero
/// page faults). A smaller pass reads its dirty pages, which are present.
fn data_pages_worth_asking(
    memory: &GuestMemory,
    bitmaps: &[PageBitmap],
) -> Vec<Option<PageBitmap>> {
    memory
        .blocks()
        .iter()
        .zip(bitmaps)
        .map(|(block, pass)| {
            (pass.count() * 4 >= block.pages())
                .then(|| block.data_pages())
                .flatten()
        })
        .collect()
}

pub(super) enum Command {
    Pass(Arc<PassWork>),
    Finish,
}

pub(super) type Report = (usize, Result<(), MultifdError>);

pub struct SenderPool {
    memory: Arc<GuestMemory>,
    commands: Vec<mpsc::Sender<Command>>,
    reports: mpsc::Receiver<Report>,
    threads: Vec<JoinHandle<()>>,
    channels: Vec<Arc<dyn Channel>>,
    counters: Arc<Counters>,
    activity: Arc<Activity>,
    stall_timeout: Option<Duration>,
    control: Arc<PassControl>,
    generation: u64,
    words_per_chunk: usize,
    path: SendPath,
    path_note: Option<String>,
}

impl SenderPool {
    /// Starts one thread per channel. Each channel must offer an io_uring fd.
    pub fn start(
        channels: Vec<Box<dyn Channel>>,
        memory: Arc<GuestMemory>,
        mut opts: SenderOptions,
    ) -> Result<Self, MultifdError> {
        if opts.packet_pages == 0
            || !opts.packet_pages.is_multiple_of(64)
            || opts.packet_pages > MAX_PACKET_PAGES
        {
            return Err(MultifdError::PacketPages {
                pages: opts.packet_pages,
                max: MAX_PACKET_PAGES,
            });
        }
        opts.slots = opts.slots.clamp(2, 64);
        let path_note = match opts.path {
            SendPath::ZeroCopy => zero_copy_limit_note(&opts, channels.len(), &memory),
            SendPath::Splice => SplicePipe::new(WANTED_PIPE_BYTES)
                .err()
                .map(|e| format!("cannot create a splice pipe ({e}); sending with copies")),
            SendPath::Copy => None,
        };
        let tls = channels.iter().any(|c| c.tls().is_some());
        let path_note = match path_note {
            None if opts.path != SendPath::Copy && (tls || opts.compress.is_some()) => {
                Some(format!(
                    "{} packets are built in the sender's buffers: sending with io_uring sendmsg",
                    if tls { "TLS" } else { "compressed" }
                ))
            }
            other => other,
        };
        if path_note.is_some() {
            opts.path = SendPath::Copy;
        }
        // One sendmsg carries a packet on the io_uring paths, and the kernel
        // takes at most UIO_MAXIOV iovecs: each page may be a run of its own.
        let sendmsg_limit = libc::UIO_MAXIOV as usize - PAYLOAD_IOV;
        if opts.path != SendPath::Splice && !tls && opts.packet_pages as usize > sendmsg_limit {
            return Err(MultifdError::PacketPagesForSendmsg {
                pages: opts.packet_pages,
                path: opts.path.name(),
                max: sendmsg_limit / 64 * 64,
                iovecs: libc::UIO_MAXIOV as usize,
            });
        }
        if let Some(level) = opts.compress {
            Compressor::new(level)
                .map_err(|source| MultifdError::CompressLevel { level, source })?;
        }
        let counters = Arc::new(Counters::default());
        let activity = Arc::new(Activity::new(channels.len()));
        let (report_tx, reports) = mpsc::channel();
        let channels: Vec<Arc<dyn Channel>> = channels.into_iter().map(Arc::from).collect();
        let mut commands = Vec::new();
        let mut threads = Vec::new();
        for (index, ch) in channels.iter().enumerate() {
            let fd = ch.uring_fd().ok_or_else(|| MultifdError::NoDataPath {
                channel: ch.label().into(),
            })?;
            let (tx, rx) = mpsc::channel();
            commands.push(tx);
            let (ch, memory, counters, opts, report_tx) = (
                ch.clone(),
                memory.clone(),
                counters.clone(),
                opts.clone(),
                report_tx.clone(),
            );
            let activity = activity.clone();
            let t = std::thread::Builder::new()
                .name(format!("ferry-send-{index}"))
                .spawn(move || {
                    let counters = (counters, activity);
                    channel_thread(index, ch, fd, memory, counters, opts, rx, report_tx)
                })
                .map_err(|source| MultifdError::Spawn {
                    what: "sender",
                    source,
                })?;
            threads.push(t);
        }
        let words_per_chunk = opts.packet_pages as usize / 64;
        Ok(Self {
            memory,
            commands,
            reports,
            threads,
            channels,
            counters,
            activity,
            stall_timeout: opts.stall_timeout,
            control: Arc::new(PassControl::default()),
            generation: 0,
            words_per_chunk,
            path: opts.path,
            path_note,
        })
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The path the threads use: the one asked for, or `Copy` if that was
    /// not possible here.
    pub fn path(&self) -> SendPath {
        self.path
    }

    /// Why the path asked for is not used, if it is not.
    pub fn path_note(&self) -> Option<&str> {
        self.path_note.as_deref()
    }

    /// Interrupts passes and limits their rate, from any thread.
    pub fn control(&self) -> &Arc<PassControl> {
        &self.control
    }

    /// The generation the last pass had (0 before the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sends every page set in `bitmaps` (one per block, in block order) and
    /// a SYNC on every channel; returns when all channels have sent theirs.
    pub fn send_pass(&mut self, bitmaps: Arc<Vec<PageBitmap>>) -> Result<(), MultifdError> {
        self.run(bitmaps, false)
    }

    /// Like [`SenderPool::send_pass`], while the guest runs. With checksums
    /// on, each packet's payload is checked again once the kernel has it:
    /// if a page changed after its checksum was taken, the receiver will see
    /// a mismatch for the whole packet, so every page of that packet is set
    /// again in `bitmaps` and goes in the next pass.
    pub fn send_live_pass(&mut self, bitmaps: Arc<Vec<PageBitmap>>) -> Result<(), MultifdError> {
        self.run(bitmaps, true)
    }

    fn run(&mut self, bitmaps: Arc<Vec<PageBitmap>>, live: bool) -> Result<(), MultifdError> {
        self.generation += 1;
        let data_pages = data_pages_worth_asking(&self.memory, &bitmaps);
        let work = Arc::new(PassWork::new(
            self.generation,
            live,
            self.control.clone(),
            bitmaps,
            data_pages,
            self.words_per_chunk,
        ));
        self.broadcast(|| Command::Pass(work.clone()))
    }

    /// Ends every channel with an END packet and joins the threads.
    pub fn finish(&mut self) -> Result<Totals, MultifdError> {
        self.broadcast(|| Command::Finish)?;
        self.commands.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(self.counters.snapshot())
    }

    /// Shuts every channel down; threads in flight fail and exit.
    pub fn abort(&self) {
        for ch in &self.channels {
            ch.shutdown();
        }
    }

    /// A function that shuts every channel down, callable from any thread
    /// (a cancel that must not wait for sends stuck on a dead link).
    pub fn aborter(&self) -> impl Fn() + Send + Sync + 'static {
        let channels = self.channels.clone();
        move || {
            for ch in &channels {
                ch.shutdown();
            }
        }
    }

    fn broadcast(&mut self, cmd: impl Fn() -> Command) -> Result<(), MultifdError> {
        for tx in &self.commands {
            if tx.send(cmd()).is_err() {
                return Err(MultifdError::ThreadExited { what: "sender" });
            }
        }
        let mut first_err = None;
        let mut owing = vec![true; self.commands.len()];
        let mut clock = self
            .stall_timeout
            .map(|limit| StallClock::new(&self.activity, limit));
        for _ in 0..self.commands.len() {
            match self.next_report(&mut clock, &owing, first_err.is_some()) {
                Ok((i, Ok(()))) => owing[i] = false,
                Ok((i, Err(e))) => {
                    owing[i] = false;
                    if first_err.is_none() {
                        // The pool is dead: wake threads waiting for the
                        // rate limit, and cut the other channels.
                        self.control.interrupt();
                        self.abort();
                        first_err = Some(e);
                    }
                }
                Err(_) => {
                    first_err.get_or_insert(MultifdError::ThreadExited { what: "sender" });
                    break;
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The next thread's report. A channel that owes its report and has
    /// not moved for the stall timeout is reported as stalled; after a
    /// failure, threads get a short grace to report before the pool gives
    /// up on them (their channels are shut down, so they end soon).
    fn next_report(
        &self,
        clock: &mut Option<StallClock>,
        owing: &[bool],
        failed: bool,
    ) -> Result<Report, ()> {
        let Some(clock) = clock.as_mut() else {
            return self.reports.recv().map_err(drop);
        };
        let grace_end = Instant::now() + STALL_GRACE;
        loop {
            match self.reports.recv_timeout(STALL_POLL) {
                Ok(r) => return Ok(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(()),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if failed {
                if Instant::now() >= grace_end {
                    return Err(());
                }
                continue;
            }
            if let Some(i) = clock.stalled(&self.activity, |i| owing[i]) {
                return Ok((
                    i,
                    Err(MultifdError::Stalled {
                        channel: self.channels[i].label().into(),
                        secs: clock.limit().as_secs_f64(),
                    }),
                ));
            }
        }
    }
}

/// How often a pool's wait looks at its channels' progress.
const STALL_POLL: Duration = Duration::from_millis(100);
/// How long threads of a failed pool have to report before it gives up.
const STALL_GRACE: Duration = Duration::from_secs(2);

impl Drop for SenderPool {
    fn drop(&mut self) {
        self.abort();
        self.commands.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Zero-copy pins the pages of every send in flight. Without CAP_IPC_LOCK
/// that counts against RLIMIT_MEMLOCK; if the pool could exceed it, say so
/// and send with copies instead of failing mid-migration.
fn zero_copy_limit_note(
    opts: &SenderOptions,
    channels: usize,
    memory: &GuestMemory,
) -> Option<String> {
    let page = memory
        .blocks()
        .iter()
        .map(RamBlock::page_size)
        .max()
        .unwrap_or(4096) as u64;
    let need = channels as u64 * opts.slots as u64 * u64::from(opts.packet_pages) * page;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return None;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0;
    (ok && lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < need).then(|| {
        format!(
            "zero-copy would pin up to {} MiB but RLIMIT_MEMLOCK is {} MiB; sending with copies",
            need >> 20,
            lim.rlim_cur >> 20
        )
    })
}
