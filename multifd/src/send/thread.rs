//! One sender thread: its channel, its io_uring, its slots. Owns the send
//! loop of a pass (claim a chunk, build the packet, hand it to the
//! channel's [`Delivery`]), the io_uring chain the ring deliveries use
//! (queue, reap, complete), SYNC and END markers, and the thread's report
//! to the pool.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use ferry_ram::GuestMemory;
use ferry_transport::uring::{Completion, Ring};
use ferry_transport::Channel;

use super::build::{recheck_pages, PacketBuilder, Slot};
use super::delivery::{Delivery, Handoff};
use super::pool::{Command, PassWork, Report, SenderOptions};
use crate::compress::Compressor;
use crate::packet::{FLAG_END, FLAG_SYNC};
use crate::stats::Activity;
use crate::{Counters, MultifdError};

#[allow(clippy::too_many_arguments)]
pub(super) fn channel_thread(
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

/// Where a sender thread reports that it moved (see [`Activity`]).
pub(super) struct Progress {
    pub(super) activity: Arc<Activity>,
    pub(super) index: usize,
}

impl Progress {
    fn tick(&self) {
        self.activity.bump(self.index);
    }
}

pub(super) struct ChannelSender {
    pub(super) channel: Arc<dyn Channel>,
    fd: RawFd,
    ring: Ring,
    delivery: Delivery,
    pub(super) builder: PacketBuilder,
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
    error: Option<MultifdError>,
}

impl ChannelSender {
    pub(super) fn new(
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
        let delivery =
            Delivery::choose(&channel, opts.path, ring.supports_send_zc()).map_err(|source| {
                MultifdError::Io {
                    channel: channel.label().into(),
                    what: "creating the splice pipe",
                    source,
                }
            })?;
        let max = opts.packet_pages as usize;
        let compressor = match opts.compress {
            Some(level) => Some(Compressor::new(level).map_err(|source| MultifdError::Io {
                channel: channel.label().into(),
                what: "creating the zstd context",
                source,
            })?),
            None => None,
        };
        let sealed = delivery.seals();
        Ok(Self {
            channel,
            fd,
            ring,
            delivery,
            builder: PacketBuilder::new(memory, opts.checksum, max, compressor, sealed),
            counters,
            progress,
            slots: (0..opts.slots).map(|_| Slot::new(max)).collect(),
            free: (0..opts.slots).rev().collect(),
            pending: Vec::new(),
            chain_left: 0,
            outstanding: 0,
            error: None,
        })
    }

    /// Sends this channel's share of a pass, then its SYNC. Every delivery
    /// runs this one loop: a splice sends a packet at once and frees its
    /// slot, so it builds one packet at a time; the ring deliveries queue
    /// packets as one chain and build the next ones while it is in flight.
    pub(super) fn run_pass(&mut self, work: &PassWork) -> Result<(), MultifdError> {
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
                            self.dispatch(slot)?;
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

    /// Builds the packet for one chunk into `slot`. False if the chunk had
    /// no pages to send.
    fn prepare_chunk(
        &mut self,
        slot: usize,
        work: &PassWork,
        block_index: usize,
        first_word: usize,
    ) -> Result<bool, MultifdError> {
        self.builder
            .build(&mut self.slots[slot], work, block_index, first_word)
            .map_err(|source| MultifdError::Io {
                channel: self.channel.label().into(),
                what: "compressing a payload (zstd)",
                source,
            })
    }

    /// Hands a built packet to the channel's delivery: sent at once (the
    /// slot is free again), or queued for the ring's chain, which starts at
    /// once if the stream is idle.
    fn dispatch(&mut self, slot: usize) -> Result<(), MultifdError> {
        let s = &mut self.slots[slot];
        // SAFETY: a built slot's iovecs point at its own header, offsets,
        // crcs and zstd buffer, or at guest pages of the builder's memory,
        // which this thread holds for the migration; a page rewritten
        // meanwhile is dirty again and re-sent.
        match unsafe { self.delivery.send(self.fd, s) } {
            Ok(Handoff::Queued) => {
                self.pending.push(slot);
                self.submit_chain()
            }
            Ok(Handoff::Sent(n)) if n == s.wire => {
                self.counters
                    .add_packet(s.normal, s.zero, s.page_size, s.wire);
                self.counters.add_payload(s.payload_raw, s.payload_wire);
                self.progress.tick();
                if let Some(v) = s.verify.take() {
                    // The socket may still refer to the pages; a page written
                    // after this check is dirty in the log and goes again anyway.
                    let b = &mut self.builder;
                    recheck_pages(s, v, &b.memory, &self.counters);
                }
                self.free.push(slot);
                Ok(())
            }
            Ok(Handoff::Sent(n)) => Err(MultifdError::Io {
                channel: self.channel.label().into(),
                what: "short splice",
                source: std::io::Error::other(format!("{n} of {} bytes", s.wire)),
            }),
            Err(source) => {
                self.channel.shutdown();
                Err(MultifdError::Io {
                    channel: self.channel.label().into(),
                    what: "handing a packet to the socket",
                    source,
                })
            }
        }
    }

    /// Sends a SYNC or END packet and waits until it is out.
    pub(super) fn send_marker(&mut self, flag: u16, generation: u64) -> Result<(), MultifdError> {
        while self.free.is_empty() || self.chain_left > 0 {
            self.submit_chain()?;
            self.reap(1)?;
        }
        let slot = self.free.pop().unwrap();
        self.builder.marker(&mut self.slots[slot], flag, generation);
        self.dispatch(slot)?;
        self.submit_chain()?;
        while self.chain_left > 0 {
            self.reap(1)?;
        }
        Ok(())
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
            // SAFETY: the slot (header, offsets, iov, msg) stays put and
            // untouched until `awaiting` reaches 0 in `reap`, and the guest
            // pages it points at belong to the builder's memory, which
            // outlives this thread; `drain` waits for every op before the
            // slots are dropped.
            unsafe {
                self.ring
                    .queue_sendmsg(self.fd, &s.msg, s.awaiting == 2, i + 1 < n, slot as u64)
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
                let b = &mut self.builder;
                recheck_pages(s, v, &b.memory, &self.counters);
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
    pub(super) fn drain(&mut self) {
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
