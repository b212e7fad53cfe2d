//! The receiver pool: K threads, one per multifd channel, each with its own
//! io_uring, landing pages straight in destination memory.
//!
//! For every packet a thread reads the 64-byte header, then the offsets, and
//! checks all of it (see [`crate::packet`]) before it reads one payload byte,
//! including that no page comes twice in one pass (so no two threads, and
//! no two runs of one packet, ever write the same page); the payload is
//! then received directly into the destination pages with one `recvmsg`
//! over an iovec per run of pages, with no staging buffer. Zero
//! pages are written only if the page was received before (fresh memory is
//! already zero). A SYNC makes the thread wait at the pool's barrier until
//! every channel has finished the same pass.
//!
//! On a TLS channel the ring receives ciphertext into the thread's buffer,
//! rustls decrypts it, and the plaintext payload is copied once, from
//! rustls's buffer straight into the destination pages (no staging buffer of
//! ours). A compressed payload is received in pieces into a small scratch
//! buffer and decoded straight into the destination pages; it must decode to
//! exactly the packet's pages. After END, a TLS channel must end with
//! close_notify: a connection that just stops is reported as cut.
//!
//! A payload that fails its checksum is not fatal at once: in a live pass the
//! guest may have written the page while it was in flight, and then it is
//! dirty and comes again. Such pages are remembered, forgotten when they
//! arrive intact, and [`ReceiverPool::check_checksums`] (and `finish`) fail if any remain.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_ram::{GuestMemory, PageBitmap, RamBlock};
use ferry_transport::uring::Ring;
use ferry_transport::{Channel, TlsChannel};

use crate::compress::Decompressor;
use crate::packet::{
    bytes_crc, offsets_as_bytes_mut, page_crcs_as_bytes_mut, payload_crc_unshared, PacketHeader,
    HEADER_LEN,
};
use crate::stats::{Activity, StallClock};
use crate::sync::SyncBarrier;
use crate::{Counters, MultifdError, Totals, MAX_PACKET_PAGES};

/// `at_pass` of a channel whose END has arrived.
const ENDED: u64 = u64::MAX;
/// How often a wait looks at the channels' progress.
const STALL_POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct ReceiverOptions {
    /// The destination memory is freshly zeroed: a zero page that was never
    /// received needs no write.
    pub fresh_memory: bool,
    /// The setup announced compression: compressed packets are accepted.
    pub compressed: bool,
    /// The setup announced checksums: a packet without its CHECKSUM flag is
    /// refused (a flag flipped in transit must not switch the checks off).
    pub checksums: bool,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        Self {
            fresh_memory: true,
            compressed: true,
            checksums: false,
        }
    }
}

/// Compressed bytes received per step before decoding them.
const ZCHUNK: usize = 128 << 10;

/// Where a payload failed its checksum.
#[derive(Clone, Debug)]
struct Suspect {
    channel: String,
    seq: u64,
}

struct Shared {
    memory: Arc<GuestMemory>,
    /// Per block: pages that have landed at least once.
    received: Vec<PageBitmap>,
    /// Per block: pages some packet of the current pass has claimed. A page
    /// comes at most once a pass, so a second claim is refused before a
    /// byte is written: no two threads ever write one page at once.
    this_pass: Vec<PageBitmap>,
    barrier: SyncBarrier,
    counters: Arc<Counters>,
    /// Per channel: moves with every header and payload received.
    activity: Activity,
    /// Per channel: the first pass whose SYNC it has not reached yet, or
    /// `ENDED` once it ended cleanly (END, and TLS's close_notify).
    at_pass: Box<[AtomicU64]>,
    channels: Vec<Arc<dyn Channel>>,
    first_error: Mutex<Option<MultifdError>>,
    /// (block, offset) of pages whose last copy failed its checksum.
    suspects: Mutex<BTreeMap<(u32, u64), Suspect>>,
    suspect_count: AtomicUsize,
    opts: ReceiverOptions,
    on_fail: Box<dyn Fn() + Send + Sync>,
}

impl Shared {
    /// Records the first failure, stops every thread and every waiter.
    fn fail(&self, e: MultifdError) {
        let msg = e.to_string();
        let mut first = self.first_error.lock().unwrap();
        let is_first = first.is_none();
        if is_first {
            *first = Some(e);
        }
        drop(first);
        self.barrier.stop(&msg);
        for ch in &self.channels {
            ch.shutdown();
        }
        if is_first {
            (self.on_fail)();
        }
    }

    fn take_error(&self) -> MultifdError {
        let mut first = self.first_error.lock().unwrap();
        first
            .take()
            .unwrap_or_else(|| MultifdError::Aborted("stopped after an earlier error".into()))
    }
}

pub struct ReceiverPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl ReceiverPool {
    /// Starts one thread per channel, writing into `memory`. `on_fail` is
    /// called once, from the failing thread, when the pool first fails.
    pub fn start(
        channels: Vec<Box<dyn Channel>>,
        memory: Arc<GuestMemory>,
        opts: ReceiverOptions,
        on_fail: impl Fn() + Send + Sync + 'static,
    ) -> Result<Self, MultifdError> {
        let channels: Vec<Arc<dyn Channel>> = channels.into_iter().map(Arc::from).collect();
        if let Some(b) = memory.blocks().iter().find(|b| !b.is_writable()) {
            return Err(MultifdError::ReadOnlyBlock {
                block: b.name().into(),
            });
        }
        let mut fds = Vec::new();
        for ch in &channels {
            fds.push(ch.uring_fd().ok_or_else(|| MultifdError::NoDataPath {
                channel: ch.label().into(),
            })?);
        }
        let bitmaps = || {
            memory
                .blocks()
                .iter()
                .map(|b| PageBitmap::new(b.pages(), false))
                .collect()
        };
        let shared = Arc::new(Shared {
            received: bitmaps(),
            this_pass: bitmaps(),
            memory,
            barrier: SyncBarrier::new(channels.len()),
            counters: Arc::new(Counters::default()),
            activity: Activity::new(channels.len()),
            at_pass: (0..channels.len()).map(|_| AtomicU64::new(1)).collect(),
            channels,
            first_error: Mutex::new(None),
            suspects: Mutex::new(BTreeMap::new()),
            suspect_count: AtomicUsize::new(0),
            opts,
            on_fail: Box::new(on_fail),
        });
        let mut threads = Vec::new();
        for (index, fd) in fds.into_iter().enumerate() {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("ferry-recv-{index}"))
                .spawn(move || {
                    let ch = shared.channels[index].clone();
                    if let Err(e) = ChannelReceiver::new(ch, index, fd, shared.clone())
                        .and_then(|mut r| r.run())
                    {
                        shared.fail(e);
                    }
                })
                .map_err(|source| MultifdError::Spawn {
                    what: "receiver",
                    source,
                })?;
            threads.push(t);
        }
        Ok(Self { shared, threads })
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.shared.counters
    }

    /// Per block, the pages received at least once.
    pub fn received(&self) -> &[PageBitmap] {
        &self.shared.received
    }

    /// Waits until every channel has delivered all of pass `generation`.
    pub fn wait_sync(&self, generation: u64) -> Result<(), MultifdError> {
        self.wait_sync_within(generation, None)
    }

    /// [`ReceiverPool::wait_sync`], failing the pool when a channel that
    /// has not delivered its share receives nothing for `stall`.
    pub fn wait_sync_within(
        &self,
        generation: u64,
        stall: Option<Duration>,
    ) -> Result<(), MultifdError> {
        let owing = |i: usize| self.shared.at_pass[i].load(Ordering::Acquire) <= generation;
        self.watch(stall, owing, || {
            self.shared
                .barrier
                .wait_completed_for(generation, STALL_POLL)
        })
    }

    /// Waits until every channel has received its END packet, failing the
    /// pool when one that has not receives nothing for `stall`; then
    /// [`ReceiverPool::finish`].
    pub fn finish_within(self, stall: Option<Duration>) -> Result<Totals, MultifdError> {
        let owing = |i: usize| self.shared.at_pass[i].load(Ordering::Acquire) != ENDED;
        self.watch(stall, owing, || {
            self.shared.barrier.wait_closed_for(STALL_POLL)
        })?;
        self.finish()
    }

    /// [`ReceiverPool::finish_within`] for a stream that ends in postcopy:
    /// a page that failed its checksum is forgiven if `resent(block,
    /// offset)` says it will come again another way (it is in the discard
    /// list, so its bytes here are dropped and it is placed afresh).
    pub fn finish_within_resending(
        mut self,
        stall: Option<Duration>,
        resent: impl Fn(usize, u64) -> bool,
    ) -> Result<Totals, MultifdError> {
        let owing = |i: usize| self.shared.at_pass[i].load(Ordering::Acquire) != ENDED;
        self.watch(stall, owing, || {
            self.shared.barrier.wait_closed_for(STALL_POLL)
        })?;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.shared
            .suspects
            .lock()
            .unwrap()
            .retain(|&(block, offset), _| !resent(block as usize, offset));
        self.finish()
    }

    /// Runs `step` (which waits at most a poll interval, and says whether
    /// the wait is over) until it is done or fails, or until a channel
    /// that `owing` names has not moved for `stall`: then fails the pool
    /// naming that channel.
    fn watch(
        &self,
        stall: Option<Duration>,
        owing: impl Fn(usize) -> bool,
        mut step: impl FnMut() -> Result<bool, String>,
    ) -> Result<(), MultifdError> {
        let mut clock = stall.map(|l| StallClock::new(&self.shared.activity, l));
        loop {
            match step() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(why) => {
                    let first = self.shared.first_error.lock().unwrap().take();
                    return Err(first.unwrap_or(MultifdError::Aborted(why)));
                }
            }
            let Some(clock) = clock.as_mut() else {
                continue;
            };
            if let Some(i) = clock.stalled(&self.shared.activity, &owing) {
                let e = MultifdError::Stalled {
                    channel: self.shared.channels[i].label().into(),
                    secs: clock.limit().as_secs_f64(),
                };
                self.shared.fail(e);
                return Err(self.shared.take_error());
            }
        }
    }

    /// Releases whoever waits on the pool's pass barrier (`wait_sync`),
    /// with `why`: for a cancel, or a main channel that failed meanwhile.
    pub fn interrupter(&self) -> impl Fn(&str) + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |why| shared.barrier.stop(why)
    }

    /// The error that stopped the pool (call after `on_fail` fired).
    pub fn error(&self) -> MultifdError {
        self.shared.take_error()
    }

    /// Fails if a page whose payload failed its checksum was never re-sent.
    pub fn check_checksums(&self) -> Result<(), MultifdError> {
        let suspects = self.shared.suspects.lock().unwrap();
        match suspects.iter().next() {
            None => Ok(()),
            Some((&(block, offset), s)) => Err(MultifdError::Checksum {
                channel: s.channel.clone(),
                seq: s.seq,
                block: self.shared.memory.blocks()[block as usize].name().into(),
                offset,
            }),
        }
    }

    /// Waits for the END packet on every channel, joins the threads, and
    /// fails if a page that failed its checksum was never sent again (so
    /// no page that lands late goes unchecked).
    pub fn finish(mut self) -> Result<Totals, MultifdError> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if self.shared.first_error.lock().unwrap().is_some() {
            return Err(self.shared.take_error());
        }
        self.check_checksums()?;
        Ok(self.shared.counters.snapshot())
    }

    /// Stops every thread: channels are shut down, waiters released.
    pub fn abort(&self, why: &str) {
        self.shared.fail(MultifdError::Aborted(why.into()));
    }
}

impl Drop for ReceiverPool {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.abort("receiver pool dropped");
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// How a receiver thread reads its channel, decided once when it starts.
enum Inbound {
    /// Plain bytes: io_uring `recvmsg` straight into the destination pages.
    Plain,
    /// TLS records: ciphertext through the ring, plaintext out of rustls.
    Records(Arc<TlsChannel>),
}

struct ChannelReceiver {
    channel: Arc<dyn Channel>,
    inbound: Inbound,
    /// This channel's place in the pool.
    index: usize,
    fd: RawFd,
    ring: Ring,
    shared: Arc<Shared>,
    seq: u64,
    /// The pass being received (its SYNC not yet seen).
    generation: u64,
    offsets: Vec<u64>,
    /// Per-page crcs of the packet being received (live passes).
    page_crcs: Vec<u32>,
    /// The payload's destination runs, and a copy `recv_exact` may consume.
    iov: Vec<libc::iovec>,
    scratch_iov: Vec<libc::iovec>,
    /// zstd context and compressed bytes, made at the first compressed packet.
    decompressor: Option<Decompressor>,
    zscratch: Vec<u8>,
}

impl ChannelReceiver {
    fn new(
        channel: Arc<dyn Channel>,
        index: usize,
        fd: RawFd,
        shared: Arc<Shared>,
    ) -> Result<Self, MultifdError> {
        let ring = Ring::new(4).map_err(|source| MultifdError::Transport {
            channel: channel.label().into(),
            source,
        })?;
        let max = MAX_PACKET_PAGES as usize;
        let inbound = match channel.clone().tls_shared() {
            Some(tls) => Inbound::Records(tls),
            None => Inbound::Plain,
        };
        Ok(Self {
            inbound,
            channel,
            index,
            fd,
            ring,
            shared,
            seq: 0,
            generation: 1,
            offsets: Vec::with_capacity(max),
            page_crcs: Vec::with_capacity(max),
            iov: Vec::with_capacity(max),
            scratch_iov: Vec::with_capacity(max),
            decompressor: None,
            zscratch: Vec::new(),
        })
    }

    fn run(&mut self) -> Result<(), MultifdError> {
        let mut raw = [0u8; HEADER_LEN];
        loop {
            let got = self.recv(&mut raw[..], "reading a packet header")?;
            if got < HEADER_LEN {
                let during = if got == 0 {
                    match self.seq.checked_sub(1) {
                        Some(last) => format!("after packet #{last} without an END packet"),
                        None => "before its first packet".into(),
                    }
                } else {
                    format!("inside the header of packet #{}", self.seq)
                };
                return Err(self.closed(during));
            }
            let h = PacketHeader::decode(&raw).map_err(|source| MultifdError::Decode {
                channel: self.channel.label().into(),
                seq: self.seq,
                source,
            })?;
            if self.shared.opts.checksums && !h.has_checksum() {
                return Err(MultifdError::ChecksumFlagMissing {
                    channel: self.channel.label().into(),
                    seq: self.seq,
                });
            }
            if (h.is_sync() || h.is_end()) && !h.header_crc_ok(&raw, &[]) {
                return Err(self.header_crc_mismatch(false));
            }
            if h.seq != self.seq {
                return Err(self.bad("sequence number", h.seq, self.seq));
            }
            if h.is_sync() || h.is_end() {
                self.shared.counters.add_packet(0, 0, 0, HEADER_LEN as u64);
            }
            if h.is_end() {
                self.shared.barrier.end(self.generation);
                self.expect_clean_end()?;
                self.shared.at_pass[self.index].store(ENDED, Ordering::Release);
                self.shared.barrier.closed();
                return Ok(());
            }
            if h.generation != self.generation {
                return Err(self.bad("pass", h.generation, self.generation));
            }
            if h.is_sync() {
                // This channel has delivered its share of the pass.
                self.shared.at_pass[self.index].store(h.generation + 1, Ordering::Release);
                // Every channel is done with this pass: its pages may come again.
                let this_pass = &self.shared.this_pass;
                self.shared
                    .barrier
                    .arrive(h.generation, || {
                        this_pass.iter().for_each(PageBitmap::clear_all)
                    })
                    .map_err(MultifdError::Aborted)?;
                self.generation += 1;
            } else {
                self.receive_pages(&h, &raw)?;
            }
            self.seq += 1;
        }
    }

    fn receive_pages(
        &mut self,
        h: &PacketHeader,
        raw: &[u8; HEADER_LEN],
    ) -> Result<(), MultifdError> {
        let shared = self.shared.clone();
        let block = self.block_for(h, &shared.memory)?;
        let body = h.body();
        self.offsets.clear();
        self.offsets.resize(h.pages(), 0);
        let mut offsets = std::mem::take(&mut self.offsets);
        let got = self.recv(offsets_as_bytes_mut(&mut offsets), "reading page offsets");
        self.offsets = offsets;
        if got? < body.offsets_len() {
            return Err(self.closed(format!("inside the offsets of packet #{}", self.seq)));
        }
        self.page_crcs.clear();
        if body.page_crcs_len() > 0 {
            self.page_crcs.resize(body.normal, 0);
            let mut crcs = std::mem::take(&mut self.page_crcs);
            let got = self.recv(page_crcs_as_bytes_mut(&mut crcs), "reading page crcs");
            self.page_crcs = crcs;
            if got? < body.page_crcs_len() {
                return Err(self.closed(format!("inside the page crcs of packet #{}", self.seq)));
            }
        }
        if !h.header_crc_ok_with(raw, &self.offsets, &self.page_crcs) {
            return Err(self.header_crc_mismatch(true));
        }
        let ps = u64::from(h.page_size);
        for &off in &self.offsets {
            if off % ps != 0 || off >= block.len() {
                return Err(MultifdError::OffsetOutOfBlock {
                    channel: self.channel.label().into(),
                    seq: self.seq,
                    block: block.name().into(),
                    offset: off,
                    block_len: block.len(),
                });
            }
        }
        // Claim every page for this pass; a page claimed already is refused.
        let mut again = None;
        shared.this_pass[h.block as usize].set_pages(self.offsets.iter().map(|o| o / ps), |p| {
            again.get_or_insert(p);
        });
        if let Some(page) = again {
            return Err(MultifdError::PageTwice {
                channel: self.channel.label().into(),
                seq: self.seq,
                block: block.name().into(),
                offset: page * ps,
                pass: self.generation,
            });
        }
        let normal = body.normal;
        // The zstd frame's pages (the first C) and the raw ones make
        // separate runs, never merged across the boundary.
        let framed = body.framed_pages;
        self.iov.clear();
        for &off in &self.offsets[..framed] {
            push_run(&mut self.iov, block.host_addr(), off, ps, 0);
        }
        let split = self.iov.len();
        for &off in &self.offsets[framed..normal] {
            push_run(&mut self.iov, block.host_addr(), off, ps, split);
        }
        if h.is_compressed() {
            if !shared.opts.compressed {
                return Err(MultifdError::UnexpectedCompression {
                    channel: self.channel.label().into(),
                    seq: self.seq,
                    block: block.name().into(),
                });
            }
            self.receive_compressed(h, block.name(), split)?;
            self.receive_raw(h, split)?;
        } else {
            self.receive_raw(h, 0)?;
        }
        shared.counters.add_payload(h.pages_len(), h.payload_len);
        if h.has_checksum() {
            self.check_payload(h)?;
        }
        let received = &shared.received[h.block as usize];
        received.set_pages(self.offsets[..normal].iter().map(|o| o / ps), |_| ());
        let zero = self.offsets[normal..].iter().map(|o| o / ps);
        if shared.opts.fresh_memory {
            // Fresh memory is zero: only a page that landed before needs it.
            received.set_pages(zero, |page| block.zero_page(page));
        } else {
            received.set_pages(zero.clone(), |_| ());
            zero.for_each(|page| block.zero_page(page));
        }
        shared
            .counters
            .add_packet(h.normal.into(), h.zero.into(), ps, body.wire_len());
        Ok(())
    }

    fn block_for<'m>(
        &self,
        h: &PacketHeader,
        memory: &'m GuestMemory,
    ) -> Result<&'m RamBlock, MultifdError> {
        let block = memory
            .block(h.block as usize)
            .ok_or_else(|| MultifdError::UnknownBlock {
                channel: self.channel.label().into(),
                seq: self.seq,
                block: h.block,
                blocks: memory.blocks().len(),
            })?;
        if h.page_size != block.page_size() {
            return Err(MultifdError::PageSize {
                channel: self.channel.label().into(),
                seq: self.seq,
                block: block.name().into(),
                page_size: h.page_size,
                block_page_size: block.page_size(),
            });
        }
        Ok(block)
    }

    /// Checks the payload that just landed; remembers or clears suspects.
    fn check_payload(&self, h: &PacketHeader) -> Result<(), MultifdError> {
        if h.has_page_crcs() {
            self.check_pages(h);
        // SAFETY: the iovecs are this packet's runs (`push_run` over checked
        // offsets), claimed in this pass by this thread alone and read
        // into completely; nobody else writes them before the pass's sync.
        } else if unsafe { payload_crc_unshared(&self.iov) } != h.payload_crc {
            self.record_verdict(h, &self.offsets[..h.normal as usize]);
        } else {
            self.record_verdict(h, &[]);
        }
        Ok(())
    }

    /// Checks each page of a packet with per-page crcs: only the pages that
    /// fail become suspects; the ones that pass are forgiven.
    fn check_pages(&self, h: &PacketHeader) {
        let Some(block) = self.shared.memory.block(h.block as usize) else {
            return;
        };
        let ps = u64::from(h.page_size);
        let bad: Vec<u64> = self.offsets[..h.normal as usize]
            .iter()
            .zip(&self.page_crcs)
            // SAFETY: these pages were claimed in this pass by this thread
            // alone and read into completely; nobody writes them before the
            // pass's sync (the destination's guest is not running).
            .filter(|&(&off, &crc)| {
                unsafe { block.bytes_unshared(off, ps as usize) }.map(bytes_crc) != Some(crc)
            })
            .map(|(&off, _)| off)
            .collect();
        self.record_verdict(h, &bad);
    }

    /// Records a packet's checksum verdict: its `bad` pages become suspects
    /// (to be forgiven if they arrive intact later); its other normal pages
    /// are forgiven now.
    fn record_verdict(&self, h: &PacketHeader, bad: &[u64]) {
        let shared = &self.shared;
        if bad.is_empty() && shared.suspect_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        shared
            .counters
            .checksum_mismatches
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        let mut suspects = shared.suspects.lock().unwrap();
        for &off in &self.offsets[..h.normal as usize] {
            suspects.remove(&(h.block, off));
        }
        for &off in bad {
            suspects.insert(
                (h.block, off),
                Suspect {
                    channel: self.channel.label().into(),
                    seq: self.seq,
                },
            );
        }
        shared
            .suspect_count
            .store(suspects.len(), Ordering::Relaxed);
    }

    /// The destination runs `range` of the current packet as slices (they
    /// do not overlap, and no other thread writes them: see `this_pass`).
    #[allow(clippy::mut_from_ref)] // as for `run_slice`
    fn runs<'m>(
        &self,
        memory: &'m GuestMemory,
        range: std::ops::Range<usize>,
    ) -> Vec<&'m mut [u8]> {
        self.iov[range]
            .iter()
            // SAFETY: `iov` holds this packet's runs, built by `push_run`
            // from checked offsets, each page claimed by this packet alone.
            .map(|v| unsafe { run_slice(*v, memory) })
            .collect()
    }

    /// The raw payload runs from `first` on, straight into the pages.
    fn receive_raw(&mut self, h: &PacketHeader, first: usize) -> Result<(), MultifdError> {
        if let Inbound::Records(_) = self.inbound {
            return self.receive_sealed(h, first);
        }
        // recv_exact consumes the list it is given; keep `iov` for the checksum.
        self.scratch_iov.clear();
        self.scratch_iov.extend_from_slice(&self.iov[first..]);
        if self.scratch_iov.is_empty() {
            return Ok(());
        }
        let want: usize = self.scratch_iov.iter().map(|v| v.iov_len).sum();
        let mut scratch = std::mem::take(&mut self.scratch_iov);
        // SAFETY: `scratch` holds this packet's runs, built by `push_run`
        // from checked offsets inside the block, each page claimed by this
        // packet alone in `this_pass`: mapped, and no one else reads or
        // writes them until the pass's sync.
        let got = unsafe { self.ring.recv_exact(self.fd, &mut scratch) }
            .map_err(|e| self.io("reading a payload", e));
        self.scratch_iov = scratch;
        if got? < want {
            return Err(self.closed(format!("inside the payload of packet #{}", self.seq)));
        }
        Ok(())
    }

    /// A TLS payload: decrypted plaintext goes straight into the page runs.
    fn receive_sealed(&mut self, h: &PacketHeader, first: usize) -> Result<(), MultifdError> {
        let shared = self.shared.clone();
        for i in first..self.iov.len() {
            // SAFETY: a run of this packet, built by `push_run` from checked
            // offsets, its pages claimed by this packet alone.
            let run = unsafe { run_slice(self.iov[i], &shared.memory) };
            if self.recv(run, "reading a payload")? < run.len() {
                return Err(self.closed(format!(
                    "inside the payload of packet #{} ({} bytes)",
                    self.seq, h.payload_len
                )));
            }
        }
        Ok(())
    }

    /// A zstd frame: received in pieces, decoded straight into the page runs.
    fn receive_compressed(
        &mut self,
        h: &PacketHeader,
        block: &str,
        split: usize,
    ) -> Result<(), MultifdError> {
        let zerr = |me: &Self, why: String| MultifdError::Decompress {
            channel: me.channel.label().into(),
            seq: me.seq,
            block: block.into(),
            why,
        };
        if self.decompressor.is_none() {
            let d = Decompressor::new().map_err(|e| self.io("creating the zstd context", e))?;
            self.decompressor = Some(d);
            self.zscratch.resize(ZCHUNK, 0);
        }
        let shared = self.shared.clone();
        let mut runs = self.runs(&shared.memory, 0..split);
        let mut d = self.decompressor.take().expect("made above");
        let mut z = std::mem::take(&mut self.zscratch);
        let result = (|| {
            d.begin().map_err(|e| zerr(self, e.to_string()))?;
            let mut left = h.frame_len() as usize;
            while left > 0 {
                let n = left.min(z.len());
                if self.recv(&mut z[..n], "reading a compressed payload")? < n {
                    return Err(self.closed(format!(
                        "inside the compressed payload of packet #{}",
                        self.seq
                    )));
                }
                left -= n;
                d.feed(&z[..n], &mut runs).map_err(|why| zerr(self, why))?;
            }
            d.end(&mut runs).map_err(|why| zerr(self, why))
        })();
        self.decompressor = Some(d);
        self.zscratch = z;
        result
    }

    /// After END: a TLS channel must end with close_notify, not just stop.
    fn expect_clean_end(&mut self) -> Result<(), MultifdError> {
        if let Inbound::Plain = self.inbound {
            return Ok(());
        }
        let mut one = [0u8; 1];
        match self.recv(&mut one, "waiting for TLS close_notify after END")? {
            0 => Ok(()),
            _ => Err(MultifdError::DataAfterEnd {
                channel: self.channel.label().into(),
                seq: self.seq,
            }),
        }
    }

    /// Fills `buf` from the stream; fewer bytes only if the peer ended it.
    fn recv(&mut self, buf: &mut [u8], what: &'static str) -> Result<usize, MultifdError> {
        self.shared.activity.bump(self.index);
        let (ring, fd) = (&mut self.ring, self.fd);
        let got = match &self.inbound {
            Inbound::Records(tls) => tls.read_plain(buf, &mut |b| ring.recv_some(fd, b)),
            Inbound::Plain => {
                let mut iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: the one iovec covers `buf`, borrowed mutably for the call.
                unsafe { ring.recv_exact(fd, &mut iov) }
            }
        };
        got.map_err(|e| self.io(what, e))
    }

    fn io(&self, what: &'static str, source: std::io::Error) -> MultifdError {
        MultifdError::Io {
            channel: self.channel.label().into(),
            what,
            source,
        }
    }
    fn closed(&self, during: String) -> MultifdError {
        MultifdError::Closed {
            channel: self.channel.label().into(),
            during,
        }
    }
    fn bad(&self, field: &'static str, value: u64, expected: u64) -> MultifdError {
        MultifdError::BadPacket {
            channel: self.channel.label().into(),
            seq: self.seq,
            field,
            value,
            expected,
        }
    }
    fn header_crc_mismatch(&self, with_offsets: bool) -> MultifdError {
        MultifdError::HeaderChecksum {
            channel: self.channel.label().into(),
            seq: self.seq,
            with_offsets,
        }
    }
}

/// A payload run as a slice of destination memory, borrowed no longer than
/// `_memory`, the guest memory it lies in (blocks hand out addresses, not
/// `&mut`, because several receiver threads fill one block at once).
///
/// # Safety
/// `v` must come from `push_run` over offsets checked to lie inside a block
/// of `_memory` and claimed in `Shared::this_pass` by the current packet, so
/// no other slice over these pages exists until the pass's sync.
// `&GuestMemory` only bounds the lifetime: blocks hand out raw addresses
// by design (see `ferry_ram::RamBlock`), so `&mut` from `&` is intended.
#[allow(clippy::mut_from_ref)]
unsafe fn run_slice(v: libc::iovec, _memory: &GuestMemory) -> &mut [u8] {
    // SAFETY: the caller's guarantee; the block's mapping lives as long as
    // `_memory` does.
    unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) }
}

/// Appends the page at `off` to an iovec list, merging adjacent pages.
#[inline]
fn push_run(iov: &mut Vec<libc::iovec>, base: *mut u8, off: u64, ps: u64, first: usize) {
    // SAFETY: the caller checked off + ps <= block length, so the address is
    // inside the block's mapping.
    let addr = unsafe { base.add(off as usize) };
    let merge = iov.len() > first;
    if let Some(last) = iov.last_mut().filter(|_| merge) {
        if last.iov_base as usize + last.iov_len == addr as usize {
            last.iov_len += ps as usize;
            return;
        }
    }
    iov.push(libc::iovec {
        iov_base: addr.cast(),
        iov_len: ps as usize,
    });
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use ferry_transport::SocketChannel;

    use super::*;
    use crate::packet::{offsets_as_bytes, FLAG_CHECKSUM};

    const PS: u64 = 4096;

    /// A pool on one unix-stream channel over a 16-page block `ram`, and
    /// the stream's other end.
    fn start_pool() -> (ReceiverPool, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let ch: Box<dyn Channel> = Box::new(SocketChannel::new(b.into(), "multifd[0]".into()));
        let mem = GuestMemory::new(vec![RamBlock::anonymous("ram", 16 * PS, PS as u32).unwrap()]);
        let opts = ReceiverOptions {
            checksums: true,
            ..Default::default()
        };
        let pool = ReceiverPool::start(vec![ch], Arc::new(mem.unwrap()), opts, || {}).unwrap();
        (pool, a)
    }

    /// A sealed packet of zero pages at `offsets` in `block`.
    fn zero_pages(block: u32, offsets: &[u64]) -> Vec<u8> {
        let mut h = PacketHeader {
            flags: FLAG_CHECKSUM,
            block,
            zero: offsets.len() as u32,
            page_size: PS as u32,
            generation: 1,
            ..Default::default()
        };
        let mut b = [0u8; HEADER_LEN];
        h.seal(&mut b, offsets);
        let mut out = b.to_vec();
        out.extend_from_slice(offsets_as_bytes(offsets));
        out
    }

    #[test]
    fn an_offset_outside_the_block_is_refused_naming_channel_block_and_offset() {
        let (pool, mut a) = start_pool();
        a.write_all(&zero_pages(0, &[PS, 16 * PS])).unwrap();
        let e = pool.finish().unwrap_err();
        let msg = e.to_string();
        match e {
            MultifdError::OffsetOutOfBlock {
                channel,
                seq,
                block,
                offset,
                block_len,
            } => {
                assert_eq!(
                    (channel.as_str(), seq, block.as_str()),
                    ("multifd[0]", 0, "ram")
                );
                assert_eq!((offset, block_len), (16 * PS, 16 * PS));
            }
            other => panic!("{other}"),
        }
        for part in ["multifd[0]", "packet #0", "outside block 'ram'", "0x10000"] {
            assert!(msg.contains(part), "{msg}");
        }
    }

    #[test]
    fn an_unknown_block_and_a_bad_header_are_typed() {
        let (pool, mut a) = start_pool();
        a.write_all(&zero_pages(3, &[0])).unwrap();
        let e = pool.finish().unwrap_err();
        assert!(
            matches!(
                e,
                MultifdError::UnknownBlock {
                    block: 3,
                    blocks: 1,
                    ..
                }
            ),
            "{e}"
        );
        let (pool, mut a) = start_pool();
        let mut p = zero_pages(0, &[0]);
        p[0] = b'X';
        a.write_all(&p).unwrap();
        let e = pool.finish().unwrap_err();
        assert!(
            matches!(
                e,
                MultifdError::Decode {
                    seq: 0,
                    source: crate::PacketError::Magic(_),
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("multifd[0]: packet #0: bad magic"),
            "{e}"
        );
    }

    #[test]
    fn a_page_twice_in_one_pass_is_refused() {
        let (pool, mut a) = start_pool();
        let mut two = zero_pages(0, &[2 * PS]);
        let mut second = zero_pages(0, &[2 * PS]);
        // The second packet is #1.
        let mut h = PacketHeader::decode(second[..HEADER_LEN].try_into().unwrap()).unwrap();
        h.seq = 1;
        let mut b = [0u8; HEADER_LEN];
        h.seal(&mut b, &[2 * PS]);
        second[..HEADER_LEN].copy_from_slice(&b);
        two.extend_from_slice(&second);
        a.write_all(&two).unwrap();
        let e = pool.finish().unwrap_err();
        assert!(
            matches!(
                e,
                MultifdError::PageTwice {
                    seq: 1,
                    offset: 0x2000,
                    pass: 1,
                    ..
                }
            ),
            "{e}"
        );
    }
}
