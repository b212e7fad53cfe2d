//! The sender pool: K threads, one per multifd channel, each with its own
//! io_uring, moving the pages of each pass straight from guest memory.
//!
//! A pass hands every thread the same [`PassWork`]: one bitmap per block of
//! the pages to send. Threads claim chunks of `packet_pages` pages with one
//! atomic add, take (and so clear) the chunk's bitmap words *before* reading
//! the pages, sort the pages into zero (offsets only) and normal (payload),
//! and build one packet per chunk in a [`Slot`]: header, offsets and an iovec
//! list that points at the guest pages themselves. How a packet then reaches
//! the socket is the [`SendPath`]:
//! - `Splice` (the default): the header is copied into a pipe, the pages are
//!   put in it by reference (`vmsplice`) and the pipe is spliced into the
//!   socket, so the sender never copies a page (over loopback the receiver's
//!   copy is the only one). One packet at a time: splice through io_uring is
//!   always punted to a kernel worker thread and `vmsplice` has no io_uring
//!   opcode, so the blocking calls are cheaper on the channel's own thread.
//! - `Copy` / `ZeroCopy`: prepared packets go out through the channel's
//!   io_uring as one linked chain of `sendmsg` (or `sendmsg_zc`) operations,
//!   so many sends are in flight while the thread prepares the next ones.
//!
//! With `--compress zstd` a packet's pages are compressed into the slot's
//! own buffer (one context per thread), and on a TLS channel the whole
//! packet is sealed into the slot's ciphertext buffer; both then go out by
//! io_uring `sendmsg` (a pipe would hold references to a buffer the thread
//! reuses). Either way the stream stays in order, and a pass ends with a
//! SYNC packet on every channel. A TLS channel ends with close_notify after
//! its END packet.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_ram::{is_zero, set_bits, GuestMemory, PageBitmap, RamBlock, VolatileSlice};
use ferry_transport::splice::{SplicePipe, WANTED_PIPE_BYTES};
use ferry_transport::uring::{Completion, Ring};
use ferry_transport::Channel;

use crate::compress::Compressor;
use crate::packet::{
    offsets_as_bytes, page_crc, page_crcs_as_bytes, PacketHeader, FLAG_CHECKSUM, FLAG_COMPRESSED,
    FLAG_END, FLAG_PAGE_CRCS, FLAG_SYNC, HEADER_LEN,
};
use crate::stats::{Activity, StallClock};
use crate::{Counters, MultifdError, PassControl, Totals, MAX_PACKET_PAGES};

/// A packet's iovecs: header, offsets, page crcs, then the payload's runs.
const PAYLOAD_IOV: usize = 3;
/// Bytes of guest memory copied out at a time to be checksummed (fits L1).
const SCRATCH_BYTES: usize = 16 << 10;
/// How many pages ahead of the zero-page scan a page's first cache line is
/// prefetched. Measured on 2 GiB `mixed`, K=2, 7 alternating runs: 16 pages
/// ahead cut the median wall time from 0.484 s to 0.444 s (8 and 24 ahead did
/// about as well in a shorter, 3-run trial).
const PREFETCH_PAGES: u64 = 16;
/// The kernel maps a file's pages into the sender on a fault 16 at a time
/// (fault-around, 64 KiB), and a prefetch of a page not mapped yet is
/// dropped. So at the first page of each such window the scan reads the
/// first byte of the next window, which maps it: the prefetches ahead then
/// find their pages. Measured on 2 GiB `mixed`, K=2, alternating runs of
/// one binary: 10 pairs, median wall 0.543 -> 0.509 s and sender CPU
/// 0.93 -> 0.85 s; with zstd, 6 pairs, 1.194 -> 1.005 s; perf showed the
/// scan's samples down by a third.
const FAULT_AROUND_PAGES: u64 = 16;

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
pub struct PassWork {
    generation: u64,
    /// The guest runs during this pass: pages may change while in flight.
    live: bool,
    control: Arc<PassControl>,
    bitmaps: Arc<Vec<PageBitmap>>,
    /// First chunk number of each block, and the total after the last.
    chunk_starts: Vec<u64>,
    words_per_chunk: usize,
    next_chunk: AtomicU64,
}

impl PassWork {
    fn new(
        generation: u64,
        live: bool,
        control: Arc<PassControl>,
        bitmaps: Arc<Vec<PageBitmap>>,
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
            chunk_starts,
            words_per_chunk,
            next_chunk: AtomicU64::new(0),
        }
    }

    /// The next unclaimed chunk: (block index, first bitmap word).
    fn claim(&self) -> Option<(usize, usize)> {
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

enum Command {
    Pass(Arc<PassWork>),
    Finish,
}

type Report = (usize, Result<(), MultifdError>);

pub struct SenderPool {
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
            || opts.packet_pages % 64 != 0
            || opts.packet_pages > MAX_PACKET_PAGES
        {
            return Err(MultifdError::Aborted(format!(
                "packet size of {} pages: must be a multiple of 64 up to {MAX_PACKET_PAGES}",
                opts.packet_pages
            )));
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
            return Err(MultifdError::Aborted(format!(
                "packet size of {} pages: sending with io_uring sendmsg ({} path) takes at \
                 most {} pages a packet (the kernel's {} iovecs a call); use fewer pages or \
                 the splice path",
                opts.packet_pages,
                opts.path.name(),
                sendmsg_limit / 64 * 64,
                libc::UIO_MAXIOV
            )));
        }
        if let Some(level) = opts.compress {
            Compressor::new(level)
                .map_err(|e| MultifdError::Aborted(format!("zstd level {level} refused: {e}")))?;
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
                .map_err(|e| MultifdError::Aborted(format!("cannot start sender thread: {e}")))?;
            threads.push(t);
        }
        let words_per_chunk = opts.packet_pages as usize / 64;
        Ok(Self {
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
        let work = Arc::new(PassWork::new(
            self.generation,
            live,
            self.control.clone(),
            bitmaps,
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
                return Err(MultifdError::Aborted("a sender thread has exited".into()));
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
                    first_err
                        .get_or_insert(MultifdError::Aborted("a sender thread has exited".into()));
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

/// A live packet the kernel has finished with: each page that no longer
/// matches the crc it carried fails its check at the receiver, so it goes
/// again in the next pass.
fn recheck_pages(
    s: &Slot,
    (bitmaps, block): (Arc<Vec<PageBitmap>>, usize),
    memory: &GuestMemory,
    counters: &Counters,
    scratch: &mut [u8],
) {
    let Some(b) = memory.block(block) else { return };
    let ps = s.page_size.max(1);
    let mut changed = 0;
    for (&off, &crc) in s.offsets[..s.normal as usize].iter().zip(&s.page_crcs) {
        let now = b.page_slice(off / ps).map(|p| page_crc(&p, scratch));
        if now != Some(crc) {
            bitmaps[block].set(off / ps);
            changed += 1;
        }
    }
    counters
        .pages_changed_in_flight
        .fetch_add(changed, Ordering::Relaxed);
}

#[allow(clippy::too_many_arguments)]
fn channel_thread(
    index: usize,
    channel: Arc<dyn Channel>,
    fd: RawFd,
    memory: Arc<GuestMemory>,
    (counters, activity): (Arc<Counters>, Arc<Activity>),
    opts: SenderOptions,
    commands: mpsc::Receiver<Command>,
    reports: mpsc::Sender<Report>,
) {
    let progress = Progress { activity, index };
    let mut sender = match ChannelSender::new(channel, fd, memory, counters, progress, &opts) {
        Ok(s) => s,
        Err(e) => {
            let _ = reports.send((index, Err(e)));
            return;
        }
    };
    while let Ok(cmd) = commands.recv() {
        let (result, last) = match cmd {
            Command::Pass(work) => (sender.run_pass(&work), false),
            Command::Finish => (
                sender.send_marker(FLAG_END, 0).and_then(|()| {
                    sender.channel.finish().map_err(|source| MultifdError::Io {
                        channel: sender.channel.label().into(),
                        what: "ending the channel (TLS close_notify)",
                        source,
                    })
                }),
                true,
            ),
        };
        let failed = result.is_err();
        let _ = reports.send((index, result));
        if failed || last {
            break;
        }
    }
    // Buffers of sends still in flight must outlive them.
    sender.drain();
}

/// One packet being prepared or in flight. Slots live in a boxed slice and
/// never move, so the pointers inside `msg` and `iov` stay valid.
struct Slot {
    header: [u8; HEADER_LEN],
    /// Normal page offsets, then zero page offsets.
    offsets: Vec<u64>,
    /// header, offsets, then runs of contiguous normal pages.
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    normal: u64,
    zero: u64,
    page_size: u64,
    /// The packet's size in ferry framing (what the counters add up).
    wire: u64,
    /// Bytes this slot's send puts on the socket (TLS records included).
    send_len: u64,
    /// The sealed packet, on a TLS channel.
    cipher: Vec<u8>,
    /// The compressed payload, when compressed.
    zbuf: Vec<u8>,
    /// Payload bytes of the pages, and on the wire.
    payload_raw: u64,
    payload_wire: u64,
    /// Completions still due before the slot is free: 1, or 2 with zero-copy.
    awaiting: u8,
    /// Live passes: one crc per normal page.
    page_crcs: Vec<u32>,
    /// In a live pass: the pass's bitmaps and the block, to check the pages
    /// against `page_crcs` once the kernel is done with them.
    verify: Option<(Arc<Vec<PageBitmap>>, usize)>,
}

impl Slot {
    fn new(max_pages: usize) -> Self {
        Self {
            header: [0; HEADER_LEN],
            offsets: Vec::with_capacity(max_pages),
            iov: Vec::with_capacity(max_pages + PAYLOAD_IOV),
            // SAFETY: a zeroed msghdr is a valid empty message.
            msg: unsafe { std::mem::zeroed() },
            normal: 0,
            zero: 0,
            page_size: 0,
            wire: 0,
            send_len: 0,
            cipher: Vec::new(),
            zbuf: Vec::new(),
            payload_raw: 0,
            payload_wire: 0,
            awaiting: 0,
            page_crcs: Vec::with_capacity(max_pages),
            verify: None,
        }
    }
}

/// Where a sender thread reports that it moved (see [`Activity`]).
struct Progress {
    activity: Arc<Activity>,
    index: usize,
}

impl Progress {
    fn tick(&self) {
        self.activity.bump(self.index);
    }
}

struct ChannelSender {
    channel: Arc<dyn Channel>,
    fd: RawFd,
    ring: Ring,
    memory: Arc<GuestMemory>,
    counters: Arc<Counters>,
    progress: Progress,
    slots: Box<[Slot]>,
    free: Vec<usize>,
    /// Prepared, waiting for the chain in flight to finish.
    pending: Vec<usize>,
    /// Sends of the current chain not yet completed.
    chain_left: usize,
    /// Operations whose completion or notification is still due.
    outstanding: usize,
    seq: u64,
    checksum: bool,
    zero_copy: bool,
    packet_pages: usize,
    /// Zero-page offsets of the packet being built.
    zero_scratch: Vec<u64>,
    /// With compression: offsets of random-looking pages (sent raw).
    raw_scratch: Vec<u64>,
    /// Guest bytes copied out to be checksummed, compressed or sealed:
    /// those read the copy, never memory the guest may be writing.
    scratch: Vec<u8>,
    /// A packet's bytes copied out whole, as zstd's input or TLS's plaintext.
    plain: Vec<u8>,
    /// The by-reference path, when chosen.
    pipe: Option<SplicePipe>,
    /// zstd context, when compressing.
    compressor: Option<Compressor>,
    error: Option<MultifdError>,
}

impl ChannelSender {
    fn new(
        channel: Arc<dyn Channel>,
        fd: RawFd,
        memory: Arc<GuestMemory>,
        counters: Arc<Counters>,
        progress: Progress,
        opts: &SenderOptions,
    ) -> Result<Self, MultifdError> {
        let ring =
            Ring::new((opts.slots * 2) as u32).map_err(|source| MultifdError::Transport {
                channel: channel.label().into(),
                source,
            })?;
        let zero_copy = opts.path == SendPath::ZeroCopy && ring.supports_send_zc();
        let max = opts.packet_pages as usize;
        let pipe = if opts.path == SendPath::Splice {
            let p = SplicePipe::new(WANTED_PIPE_BYTES).map_err(|source| MultifdError::Io {
                channel: channel.label().into(),
                what: "creating the splice pipe",
                source,
            })?;
            Some(p)
        } else {
            None
        };
        let compressor = match opts.compress {
            Some(level) => Some(Compressor::new(level).map_err(|source| MultifdError::Io {
                channel: channel.label().into(),
                what: "creating the zstd context",
                source,
            })?),
            None => None,
        };
        Ok(Self {
            compressor,
            channel,
            fd,
            ring,
            memory,
            counters,
            progress,
            slots: (0..opts.slots).map(|_| Slot::new(max)).collect(),
            free: (0..opts.slots).rev().collect(),
            pending: Vec::new(),
            chain_left: 0,
            outstanding: 0,
            seq: 0,
            checksum: opts.checksum,
            zero_copy,
            packet_pages: max,
            zero_scratch: Vec::with_capacity(max),
            raw_scratch: Vec::with_capacity(max),
            scratch: vec![0; SCRATCH_BYTES],
            plain: Vec::new(),
            pipe,
            error: None,
        })
    }

    /// Sends this channel's share of a pass, then its SYNC.
    fn run_pass(&mut self, work: &PassWork) -> Result<(), MultifdError> {
        if self.pipe.is_some() {
            return self.run_pass_spliced(work);
        }
        let mut exhausted = false;
        loop {
            while !exhausted {
                let Some(slot) = self.free.pop() else { break };
                // Wait for the rate limit before reading pages, not after:
                // pages read long before they are sent change more often.
                work.control.wait_turn();
                self.progress.tick();
                match work.claim() {
                    Some((block, word)) => {
                        if self.prepare_chunk(slot, work, block, word)? {
                            work.control.account(self.slots[slot].wire);
                            self.pending.push(slot);
                            // Start sending at once if the stream is idle.
                            self.submit_chain()?;
                        } else {
                            self.free.push(slot);
                        }
                    }
                    None => {
                        self.free.push(slot);
                        exhausted = true;
                    }
                }
            }
            self.submit_chain()?;
            if exhausted && self.pending.is_empty() && self.chain_left == 0 {
                break;
            }
            // Every slot is busy or the pass is claimed: wait for a send.
            self.reap(1)?;
        }
        self.send_marker(FLAG_SYNC, work.generation)
    }

    /// The by-reference path: one packet at a time, each handed to the
    /// socket in full before the next is built.
    fn run_pass_spliced(&mut self, work: &PassWork) -> Result<(), MultifdError> {
        let slot = self.free.pop().expect("an idle channel has free slots");
        let mut result = Ok(());
        loop {
            // Wait for the rate limit before reading pages (see `run_pass`).
            work.control.wait_turn();
            self.progress.tick();
            let Some((block, word)) = work.claim() else {
                break;
            };
            match self.prepare_chunk(slot, work, block, word) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            work.control.account(self.slots[slot].wire);
            if let Err(e) = self.splice_slot(slot) {
                result = Err(e);
                break;
            }
            let s = &mut self.slots[slot];
            if let Some(v) = s.verify.take() {
                // The socket may still refer to the pages; a page written
                // after this check is dirty in the log and goes again anyway.
                recheck_pages(s, v, &self.memory, &self.counters, &mut self.scratch);
            }
        }
        self.free.push(slot);
        result?;
        self.send_marker(FLAG_SYNC, work.generation)
    }

    fn splice_slot(&mut self, slot: usize) -> Result<(), MultifdError> {
        let s = &mut self.slots[slot];
        let pipe = self.pipe.as_mut().expect("splice path");
        let (head, pages) = s.iov.split_at_mut(PAYLOAD_IOV);
        // SAFETY: the pages belong to `self.memory`, mapped for the whole
        // migration; a page the guest rewrites meanwhile is dirty again and
        // is re-sent, and its checksum mismatch is forgiven then.
        let sent = unsafe { pipe.send(self.fd, head, pages) };
        match sent {
            Ok(n) if n == s.wire => {
                self.counters
                    .add_packet(s.normal, s.zero, s.page_size, s.wire);
                self.counters.add_payload(s.payload_raw, s.payload_wire);
                self.progress.tick();
                Ok(())
            }
            Ok(n) => Err(MultifdError::Io {
                channel: self.channel.label().into(),
                what: "short splice",
                source: std::io::Error::other(format!("{n} of {} bytes", s.wire)),
            }),
            Err(source) => {
                self.channel.shutdown();
                Err(MultifdError::Io {
                    channel: self.channel.label().into(),
                    what: "splicing a packet",
                    source,
                })
            }
        }
    }

    /// Sends a SYNC or END packet and waits until it is out.
    fn send_marker(&mut self, flag: u16, generation: u64) -> Result<(), MultifdError> {
        while self.free.is_empty() || self.chain_left > 0 {
            self.submit_chain()?;
            self.reap(1)?;
        }
        let slot = self.free.pop().unwrap();
        let s = &mut self.slots[slot];
        s.offsets.clear();
        s.iov.clear();
        let mut h = PacketHeader {
            flags: flag,
            generation,
            seq: self.seq,
            ..Default::default()
        };
        if self.checksum {
            h.flags |= FLAG_CHECKSUM;
        }
        h.seal(&mut s.header, &[]);
        s.iov.push(libc::iovec {
            iov_base: s.header.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        });
        (s.normal, s.zero, s.page_size, s.wire) = (0, 0, 0, HEADER_LEN as u64);
        (s.payload_raw, s.payload_wire) = (0, 0);
        self.seq += 1;
        self.seal(slot)?;
        self.pending.push(slot);
        self.submit_chain()?;
        while self.chain_left > 0 {
            self.reap(1)?;
        }
        Ok(())
    }

    /// On a TLS channel: encrypts the slot's packet into its ciphertext
    /// buffer, which then is all the slot sends.
    fn seal(&mut self, slot: usize) -> Result<(), MultifdError> {
        let s = &mut self.slots[slot];
        let Some(tls) = self.channel.tls() else {
            s.send_len = s.wire;
            return Ok(());
        };
        // SAFETY: every iovec of a prepared slot points at `iov_len`
        // readable bytes (the slot's header, offsets or zstd buffer, or
        // guest pages of `self.memory`), alive for this call.
        unsafe { copy_runs(&s.iov, &mut self.plain) };
        s.cipher.clear();
        tls.seal(&[std::io::IoSlice::new(&self.plain)], &mut s.cipher)
            .map_err(|source| MultifdError::Io {
                channel: self.channel.label().into(),
                what: "sealing a packet (TLS)",
                source,
            })?;

        s.iov.clear();
        s.iov.push(libc::iovec {
            iov_base: s.cipher.as_mut_ptr().cast(),
            iov_len: s.cipher.len(),
        });
        s.send_len = s.cipher.len() as u64;
        Ok(())
    }

    /// Builds the packet for one chunk into `slot`. False if the chunk had
    /// no pages to send.
    fn prepare_chunk(
        &mut self,
        slot: usize,
        work: &PassWork,
        block_index: usize,
        first_word: usize,
    ) -> Result<bool, MultifdError> {
        let per_page = work.live && self.checksum;
        let pages = self.scan_chunk(slot, work, block_index, first_word, per_page);
        if pages.normal + pages.zero == 0 {
            return Ok(false);
        }
        let mut h = self.data_header(slot, work, block_index, &pages, per_page);
        if pages.compressible > 0 && self.compressor.is_some() {
            self.compress_payload(slot, &mut h, &pages)?;
        }
        self.finish_packet(slot, h, &pages, work, block_index, per_page)?;
        Ok(true)
    }

    /// The chunk's loop: takes its dirty bits (clean before read) and sorts
    /// its pages into the slot: zero pages as offsets only, the others as
    /// iovecs over guest memory; with compression the compressible-looking
    /// pages first (they go into the zstd frame), then the random-looking
    /// ones (raw). Offsets end up normal pages first, then zero pages.
    fn scan_chunk(
        &mut self,
        slot: usize,
        work: &PassWork,
        block_index: usize,
        first_word: usize,
        per_page: bool,
    ) -> ChunkPages {
        let block = &self.memory.blocks()[block_index];
        let bitmap = &work.bitmaps[block_index];
        let last_word = (first_word + work.words_per_chunk).min(bitmap.words());
        let ps = block.page_size() as usize;
        let sort = self.compressor.is_some();
        let s = &mut self.slots[slot];
        s.offsets.clear();
        s.page_crcs.clear();
        reset_iov(&mut s.iov, &mut s.header);
        self.zero_scratch.clear();
        self.raw_scratch.clear();
        for w in first_word..last_word {
            for page in set_bits(bitmap.take_word(w), w as u64 * 64) {
                if page % FAULT_AROUND_PAGES == 0 {
                    block.touch_page(page + FAULT_AROUND_PAGES);
                }
                block.prefetch_page(page + PREFETCH_PAGES);
                let Some(mem) = block.page_slice(page) else {
                    continue; // bits past the block's end are never set
                };
                let offset = page * ps as u64;
                if is_zero(&mem) {
                    self.zero_scratch.push(offset);
                } else if sort && !looks_compressible(&mem) {
                    self.raw_scratch.push(offset);
                } else {
                    s.offsets.push(offset);
                    if per_page {
                        s.page_crcs.push(page_crc(&mem, &mut self.scratch));
                    }
                    push_page(&mut s.iov, &mem, PAYLOAD_IOV);
                }
            }
        }
        let compressible = s.offsets.len();
        let raw_from = s.iov.len();
        for &offset in &self.raw_scratch {
            let Some(mem) = block.page_slice(offset / ps as u64) else {
                continue; // taken from this block's bitmap above
            };
            if per_page {
                s.page_crcs.push(page_crc(&mem, &mut self.scratch));
            }
            push_page(&mut s.iov, &mem, raw_from);
        }
        s.offsets.extend_from_slice(&self.raw_scratch);
        let normal = s.offsets.len();
        s.offsets.extend_from_slice(&self.zero_scratch);
        debug_assert!(s.offsets.len() <= self.packet_pages);
        ChunkPages {
            page_size: ps,
            compressible,
            normal,
            zero: self.zero_scratch.len(),
            raw_from,
        }
    }

    /// The packet header for the pages `scan_chunk` put in `slot`, with the
    /// payload as the raw pages (and its crc, unless per-page crcs go).
    fn data_header(
        &mut self,
        slot: usize,
        work: &PassWork,
        block_index: usize,
        pages: &ChunkPages,
        per_page: bool,
    ) -> PacketHeader {
        let s = &mut self.slots[slot];
        let flags = match (self.checksum, per_page) {
            (false, _) => 0,
            (true, false) => FLAG_CHECKSUM,
            (true, true) => FLAG_CHECKSUM | FLAG_PAGE_CRCS,
        };
        let h = PacketHeader {
            flags,
            block: block_index as u32,
            normal: pages.normal as u32,
            zero: pages.zero as u32,
            page_size: pages.page_size as u32,
            seq: self.seq,
            payload_len: (pages.normal * pages.page_size) as u64,
            generation: work.generation,
            payload_crc: if self.checksum && !per_page {
                // SAFETY: the payload's iovecs point at pages of
                // `self.memory`, which this sender holds for the call.
                unsafe { crate::packet::payload_crc(&s.iov[PAYLOAD_IOV..], &mut self.scratch) }
            } else {
                0
            },
            header_crc: 0,
            compressed_pages: 0,
        };
        s.payload_raw = h.payload_len;
        h
    }

    /// Replaces the compressible pages' iovecs with one zstd frame in the
    /// slot's buffer, if the frame is smaller than they are.
    fn compress_payload(
        &mut self,
        slot: usize,
        h: &mut PacketHeader,
        pages: &ChunkPages,
    ) -> Result<(), MultifdError> {
        let Some(c) = self.compressor.as_mut() else {
            return Ok(());
        };
        let s = &mut self.slots[slot];
        // SAFETY: the runs point at guest pages of `self.memory`, which
        // this sender holds for the call.
        unsafe { copy_runs(&s.iov[PAYLOAD_IOV..pages.raw_from], &mut self.plain) };
        let shrank = c
            .compress(&[&self.plain[..]], &mut s.zbuf)
            .map_err(|source| MultifdError::Io {
                channel: self.channel.label().into(),
                what: "compressing a payload (zstd)",
                source,
            })?;
        if !shrank {
            return Ok(());
        }
        h.flags |= FLAG_COMPRESSED;
        h.compressed_pages = pages.compressible as u32;
        h.payload_len =
            (s.zbuf.len() + (pages.normal - pages.compressible) * pages.page_size) as u64;
        s.iov.splice(
            PAYLOAD_IOV..pages.raw_from,
            [libc::iovec {
                iov_base: s.zbuf.as_mut_ptr().cast(),
                iov_len: s.zbuf.len(),
            }],
        );
        Ok(())
    }

    /// Seals the header, points the slot's iovecs at the offsets and page
    /// crcs, records what the packet carries, and (on TLS) encrypts it.
    fn finish_packet(
        &mut self,
        slot: usize,
        mut h: PacketHeader,
        pages: &ChunkPages,
        work: &PassWork,
        block_index: usize,
        per_page: bool,
    ) -> Result<(), MultifdError> {
        let s = &mut self.slots[slot];
        s.payload_wire = h.payload_len;
        s.verify = per_page.then(|| (work.bitmaps.clone(), block_index));
        h.seal_with_page_crcs(&mut s.header, &s.offsets, &s.page_crcs);
        let off = offsets_as_bytes(&s.offsets);
        s.iov[1] = libc::iovec {
            iov_base: off.as_ptr() as *mut _,
            iov_len: off.len(),
        };
        let crcs = page_crcs_as_bytes(&s.page_crcs);
        s.iov[2] = libc::iovec {
            iov_base: crcs.as_ptr() as *mut _,
            iov_len: crcs.len(),
        };
        s.normal = pages.normal as u64;
        s.zero = pages.zero as u64;
        s.page_size = pages.page_size as u64;
        s.wire = (HEADER_LEN + off.len() + crcs.len()) as u64 + h.payload_len;
        self.seq += 1;
        self.seal(slot)
    }

    /// Queues every prepared packet as one linked chain, if no chain is in flight.
    fn submit_chain(&mut self) -> Result<(), MultifdError> {
        if self.chain_left > 0 || self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len();
        for (i, &slot) in self.pending.iter().enumerate() {
            let s = &mut self.slots[slot];
            s.msg.msg_iov = s.iov.as_mut_ptr();
            s.msg.msg_iovlen = s.iov.len();
            s.awaiting = if self.zero_copy { 2 } else { 1 };
            // SAFETY: the slot (header, offsets, iov, msg) stays put and
            // untouched until `awaiting` reaches 0 in `reap`, and the guest
            // pages it points at belong to `self.memory`, which outlives this
            // thread; `drain` waits for every op before the slots are dropped.
            unsafe {
                self.ring
                    .queue_sendmsg(self.fd, &s.msg, self.zero_copy, i + 1 < n, slot as u64)
            }
            .map_err(|source| MultifdError::Transport {
                channel: self.channel.label().into(),
                source,
            })?;
            self.outstanding += usize::from(s.awaiting);
        }
        self.chain_left = n;
        self.pending.clear();
        self.ring
            .submit(0)
            .map_err(|source| MultifdError::Transport {
                channel: self.channel.label().into(),
                source,
            })
    }

    /// Waits for at least `want` completions and handles all that are ready.
    fn reap(&mut self, want: usize) -> Result<(), MultifdError> {
        self.ring
            .submit(want.min(self.outstanding))
            .map_err(|source| MultifdError::Transport {
                channel: self.channel.label().into(),
                source,
            })?;
        while let Some(c) = self.ring.pop() {
            self.complete(c);
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn complete(&mut self, c: Completion) {
        let slot = c.user_data as usize;
        self.outstanding -= 1;
        let s = &mut self.slots[slot];
        if c.is_notification() {
            self.counters
                .zero_copy_sends
                .fetch_add(1, Ordering::Relaxed);
            if c.zero_copy_fell_back() {
                self.counters
                    .zero_copy_copied
                    .fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.chain_left -= 1;
            if s.awaiting == 2 && !c.notification_follows() {
                // The kernel sent no notification (the send failed early).
                s.awaiting -= 1;
                self.outstanding -= 1;
            }
            match c.bytes() {
                Ok(n) if n as u64 == s.send_len => {
                    self.counters
                        .add_packet(s.normal, s.zero, s.page_size, s.wire);
                    self.counters.add_payload(s.payload_raw, s.payload_wire);
                    self.progress.tick();
                }
                Ok(n) => {
                    let msg = format!("{n} of {} bytes", s.send_len);
                    self.fail("short send", std::io::Error::other(msg))
                }
                Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
                Err(e) => self.fail("sending a packet", e),
            }
        }
        let s = &mut self.slots[slot];
        s.awaiting -= 1;
        if s.awaiting == 0 {
            if let Some(v) = s.verify.take() {
                recheck_pages(s, v, &self.memory, &self.counters, &mut self.scratch);
            }
            self.free.push(slot);
        }
    }

    fn fail(&mut self, what: &'static str, source: std::io::Error) {
        if self.error.is_none() {
            self.channel.shutdown();
            self.error = Some(MultifdError::Io {
                channel: self.channel.label().into(),
                what,
                source,
            });
        }
    }

    /// Waits for every operation in flight (after a failure, the channel is
    /// shut down so they end quickly).
    fn drain(&mut self) {
        while self.outstanding > 0 {
            if self.ring.submit(1).is_err() {
                self.channel.shutdown();
            }
            while let Some(c) = self.ring.pop() {
                self.complete(c);
            }
        }
    }
}

/// Whether a page is worth giving to zstd: 64 bytes sampled across it take
/// few distinct values (text, tables, low-entropy data). Random-looking
/// pages (about 56 distinct of 64) go raw, saving zstd's time on them.
#[inline]
fn looks_compressible(page: &VolatileSlice) -> bool {
    use ferry_ram::vm_memory::Bytes;
    let mut seen = [0u64; 4];
    let step = (page.len() / 64).max(1);
    for at in (0..page.len()).step_by(step) {
        // One byte loaded at a time: the guest may be writing the page.
        let b: u8 = page.load(at, Ordering::Relaxed).unwrap_or(0);
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    seen.iter().map(|w| w.count_ones()).sum::<u32>() <= 40
}

/// What [`ChannelSender::scan_chunk`] found in a chunk.
struct ChunkPages {
    page_size: usize,
    /// Normal pages that looked compressible (the first ones): the zstd
    /// frame's pages if it shrinks them. All of them without compression.
    compressible: usize,
    /// Normal pages in all.
    normal: usize,
    zero: usize,
    /// Index of the first iovec of the raw (not compressed) pages.
    raw_from: usize,
}

/// Starts a packet's iovec list: the header, then empty entries for the
/// offsets and page crcs (filled in once the packet is sealed).
fn reset_iov(iov: &mut Vec<libc::iovec>, header: &mut [u8; HEADER_LEN]) {
    iov.clear();
    iov.push(libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    });
    iov.resize(
        PAYLOAD_IOV,
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
    );
}

/// Copies the bytes the iovecs point at, in order, into `out` (replacing
/// what it held): guest pages become a private copy that zstd or TLS can
/// read while the guest goes on writing the pages.
///
/// # Safety
/// Every iovec must point at `iov_len` bytes that stay mapped and readable
/// for the whole call.
unsafe fn copy_runs(runs: &[libc::iovec], out: &mut Vec<u8>) {
    out.resize(runs.iter().map(|v| v.iov_len).sum(), 0);
    let mut at = 0;
    for v in runs {
        // SAFETY: the caller's guarantee; VolatileSlice tolerates writers.
        let mem = unsafe { VolatileSlice::new(v.iov_base.cast::<u8>(), v.iov_len) };
        mem.copy_to(&mut out[at..at + v.iov_len]);
        at += v.iov_len;
    }
}

/// Appends a page to an iovec list, merging it with the previous entry when
/// the two are adjacent in memory and that entry is at index `first` or later.
#[inline]
fn push_page(iov: &mut Vec<libc::iovec>, page: &VolatileSlice, first: usize) {
    let base = page.ptr_guard().as_ptr();
    let pages_started = iov.len() > first;
    if let Some(last) = iov.last_mut().filter(|_| pages_started) {
        if last.iov_base as usize + last.iov_len == base as usize {
            last.iov_len += page.len();
            return;
        }
    }
    iov.push(libc::iovec {
        iov_base: base.cast_mut().cast(),
        iov_len: page.len(),
    });
}
