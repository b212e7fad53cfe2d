//! The source's postcopy: page requests answered on the preempt channel,
//! the remaining pages pushed over the multifd channels (see the module
//! doc of [`super`]). The guest is paused: its memory no longer changes, and
//! is only read, through volatile copies.
//!
//! On the preempt channel every page a request names is answered, even
//! one the push has already taken (on its way in a push socket, which the
//! destination's readers may not have reached): the faulting vCPU then
//! never waits behind the push's bytes. The destination places whichever
//! copy comes first and skips the other ([`super::PostcopyDestination`]
//! claims each page). Those second copies are counted apart
//! ([`PageServer::duplicate_bytes`]); they are bounded by the requests
//! (one page each, or one 2 MiB region for a fault in a region of which
//! no page had come), as the destination asks for a page at most once per
//! link.
//!
//! Without the preempt channel (`--no-postcopy-preempt`) a request is not
//! answered at once: it is queued ([`PageServer::queue`]) and the first
//! push channel sends it between two of its 64-page claims, behind the
//! background bytes already queued on that socket (QEMU's behaviour
//! without `postcopy-preempt`). After a recovery a new server is made
//! with the pages the destination still lacks ([`super::wire::still_missing`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ferry_ram::{BlockSpec, GuestMemory, PageBitmap};
use ferry_transport::Channel;

use super::wire::{self, FrameHeader, PageRun, FLAG_END, FLAG_ZERO, MAX_RUN_PAGES};
use super::PostcopyError;

/// Bitmap words (64 pages each) the push claims at once: 512 pages, one
/// 2 MiB huge page of 4 KiB pages, written out together (one `write` for
/// many scattered pages rather than one each). An answer to a request is
/// written whole at once too.
const CLAIM_WORDS: usize = 8;

/// Serves a postcopy from the paused guest's memory.
pub struct PageServer {
    memory: Arc<GuestMemory>,
    specs: Vec<BlockSpec>,
    /// Per block: pages the destination still lacks and nobody sent yet.
    pending: Arc<Vec<PageBitmap>>,
    /// The next region ([`CLAIM_WORDS`] bitmap words) the push claims,
    /// all blocks' regions in order.
    next_region: AtomicUsize,
    requests: AtomicU64,
    request_bytes: AtomicU64,
    pushed_bytes: AtomicU64,
    /// Of `request_bytes`: answers of pages that were no longer pending
    /// (the push, or an earlier answer, had sent them already).
    duplicate_bytes: AtomicU64,
    /// Requests waiting for the first push channel (no preempt channel).
    queued: Mutex<VecDeque<PageRun>>,
}

impl PageServer {
    /// `pending`: the discard list (the pages dirty at the switch), which
    /// the push takes from as it goes.
    pub fn new(memory: Arc<GuestMemory>, pending: Arc<Vec<PageBitmap>>) -> Self {
        Self {
            specs: memory.specs(),
            memory,
            pending,
            next_region: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            pushed_bytes: AtomicU64::new(0),
            duplicate_bytes: AtomicU64::new(0),
            queued: Mutex::new(VecDeque::new()),
        }
    }

    /// Requests served, and the bytes they and the push put on the wire.
    pub fn figures(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.request_bytes.load(Ordering::Relaxed),
            self.pushed_bytes.load(Ordering::Relaxed),
        )
    }

    /// Of the request bytes in [`Self::figures`]: those that answered
    /// pages already sent (taken by the push or by an earlier answer), so
    /// request bytes minus these plus push bytes sent each page once.
    pub fn duplicate_bytes(&self) -> u64 {
        self.duplicate_bytes.load(Ordering::Relaxed)
    }

    /// Pages nobody has sent yet.
    pub fn pending_pages(&self) -> u64 {
        self.pending.iter().map(PageBitmap::count).sum()
    }

    /// Answers one page request (from `from`, the return path) on
    /// `preempt`: every page of it, pending or not (a page no longer
    /// pending is counted in [`Self::duplicate_bytes`]). A request outside
    /// guest memory is refused, naming it, before any byte is read.
    pub fn serve(
        &self,
        run: &PageRun,
        from: &str,
        preempt: &dyn Channel,
    ) -> Result<(), PostcopyError> {
        let (ps, first) = wire::check_request(&self.specs, run, from)?;
        // A frame's worth at a time: the destination reads the first while
        // the next is read from memory here (a whole region is 8 frames).
        let mut buf = Vec::new();
        let end = first + run.len / ps;
        for at in (first..end).step_by(MAX_RUN_PAGES as usize) {
            let n = (end - at).min(u64::from(MAX_RUN_PAGES));
            let sent = self.send_claimed(usize::from(run.block), at, n, true, preempt, &mut buf)?;
            self.request_bytes.fetch_add(sent, Ordering::Relaxed);
        }
        // Counted once answered whole: one that failed part way may be
        // served again (the serving loop retries what the return path's
        // reader could not answer).
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends pages `first..first + pages` of `block` that are still
    /// pending, claiming each (the push then skips it), and with
    /// `taken_too` also those no longer pending (the push claimed them
    /// already; counted in `duplicate_bytes`). Returns all bytes sent.
    fn send_claimed(
        &self,
        block: usize,
        first: u64,
        pages: u64,
        taken_too: bool,
        ch: &dyn Channel,
        buf: &mut Vec<u8>,
    ) -> Result<u64, PostcopyError> {
        let mut sent = 0;
        // Runs of consecutive pages alike (all pending, or all taken), so
        // that each frame is counted wholly as a first copy or a second.
        let mut run: Option<(u64, u64, bool)> = None;
        let mut flush = |run: Option<(u64, u64, bool)>, buf: &mut Vec<u8>| {
            if let Some((f, n, taken)) = run {
                let b = frame_run(&self.memory, block, f, n, buf);
                if taken {
                    self.duplicate_bytes.fetch_add(b, Ordering::Relaxed);
                }
                sent += b;
            }
        };
        for p in first..first + pages {
            let taken = !self.pending[block].test_and_clear(p);
            if taken && !taken_too {
                continue;
            }
            run = match run {
                Some((f, n, t)) if f + n == p && t == taken => Some((f, n + 1, t)),
                other => {
                    flush(other, buf);
                    Some((p, 1, taken))
                }
            };
        }
        flush(run, buf);
        // The whole answer in one write.
        write_out(ch, buf)?;
        Ok(sent)
    }

    /// Queues one page request (checked like [`Self::serve`]) for the
    /// push channel that serves requests ([`Self::push`] with
    /// `serves_requests`): no preempt channel.
    pub fn queue(&self, run: &PageRun, from: &str) -> Result<(), PostcopyError> {
        wire::check_request(&self.specs, run, from)?;
        self.queued.lock().unwrap().push_back(*run);
        Ok(())
    }

    /// Pushes pending pages on `ch` until none is left, then sends END.
    /// Pages are claimed a region ([`CLAIM_WORDS`] bitmap words, 512 pages)
    /// at a time, so several channels share the work, and each region's
    /// frames go out in page order, in one write, on one channel: the
    /// destination can then gather a region whole and move it into place
    /// as one huge page. With `serves_requests`, queued requests
    /// ([`Self::queue`]) go first, between two claims.
    pub fn push(&self, ch: &dyn Channel, serves_requests: bool) -> Result<(), PostcopyError> {
        let mut buf = Vec::new();
        // Per block: bitmap words, and regions of CLAIM_WORDS of them.
        let words: Vec<usize> = self.pending.iter().map(|b| b.words()).collect();
        let regions: Vec<usize> = words.iter().map(|w| w.div_ceil(CLAIM_WORDS)).collect();
        let total: usize = regions.iter().sum();
        // Requests are answered on another thread: let it have the CPU
        // first (without a preempt channel this thread answers them).
        if !serves_requests {
            super::dest::lower_priority();
        }
        loop {
            while let Some(run) = serves_requests
                .then(|| self.queued.lock().unwrap().pop_front())
                .flatten()
            {
                let (ps, first) = wire::check_request(&self.specs, &run, "return path")?;
                self.requests.fetch_add(1, Ordering::Relaxed);
                // Behind this socket's own bytes: a page another push
                // channel took is left to it (QEMU's way without preempt).
                let n = self.send_claimed(
                    usize::from(run.block),
                    first,
                    run.len / ps,
                    false,
                    ch,
                    &mut buf,
                )?;
                self.request_bytes.fetch_add(n, Ordering::Relaxed);
            }
            let r = self.next_region.fetch_add(1, Ordering::Relaxed);
            if r >= total {
                break;
            }
            let (mut block, mut region) = (0, r);
            while region >= regions[block] {
                region -= regions[block];
                block += 1;
            }
            let first_word = region * CLAIM_WORDS;
            let last_word = (first_word + CLAIM_WORDS).min(words[block]);
            let mut sent = 0;
            let mut run: Option<(u64, u64)> = None;
            for word in first_word..last_word {
                let bits = self.pending[block].take_word(word);
                for page in ferry_ram::set_bits(bits, word as u64 * 64) {
                    run = match run {
                        Some((first, n)) if first + n == page => Some((first, n + 1)),
                        Some((first, n)) => {
                            sent += frame_run(&self.memory, block, first, n, &mut buf);
                            Some((page, 1))
                        }
                        None => Some((page, 1)),
                    };
                }
            }
            if let Some((first, n)) = run {
                sent += frame_run(&self.memory, block, first, n, &mut buf);
            }
            write_out(ch, &mut buf)?;
            // Counted once written (a failed write sent nothing whole).
            self.pushed_bytes.fetch_add(sent, Ordering::Relaxed);
        }
        send_end(ch)
    }
}

/// Sends END on `ch`: no more page frames.
pub fn send_end(ch: &dyn Channel) -> Result<(), PostcopyError> {
    let head = FrameHeader::head(0, FLAG_END, 0, 0);
    let mut b = head.to_vec();
    b.extend_from_slice(&wire::frame_crc(&head, &[]).to_le_bytes());
    write(ch, &b)
}

fn write(ch: &dyn Channel, b: &[u8]) -> Result<(), PostcopyError> {
    ch.write_all(b).map_err(|source| PostcopyError::Io {
        channel: ch.label().into(),
        what: "sending a page frame",
        source,
    })
}

/// Writes the frames batched in `buf` (if any) and empties it.
fn write_out(ch: &dyn Channel, buf: &mut Vec<u8>) -> Result<(), PostcopyError> {
    if !buf.is_empty() {
        write(ch, buf)?;
        buf.clear();
    }
    Ok(())
}

/// Appends pages `first..first + pages` of `block` to `buf` as frames of
/// at most [`MAX_RUN_PAGES`], zero runs without payload; returns the bytes
/// appended. The caller writes them ([`write_out`]).
fn frame_run(memory: &GuestMemory, block: usize, first: u64, pages: u64, buf: &mut Vec<u8>) -> u64 {
    let b = &memory.blocks()[block];
    let ps = u64::from(b.page_size());
    let mut sent = 0;
    let mut page = first;
    let end = first + pages;
    while page < end {
        let zero = is_zero(b, page);
        let mut n = 1;
        while page + n < end && n < u64::from(MAX_RUN_PAGES) && is_zero(b, page + n) == zero {
            n += 1;
        }
        let flags = if zero { FLAG_ZERO } else { 0 };
        let head = FrameHeader::head(block as u16, flags, page * ps, n as u32);
        let start = buf.len();
        buf.extend_from_slice(&head);
        buf.extend_from_slice(&[0; 4]);
        let at = buf.len();
        if !zero {
            buf.resize(at + (n * ps) as usize, 0);
            let slice = b
                .pages_slice(page, n)
                .expect("the run lies inside the block");
            slice.copy_to(&mut buf[at..]);
        }
        let crc = wire::frame_crc(&head, &buf[at..]);
        buf[start + 20..start + 24].copy_from_slice(&crc.to_le_bytes());
        sent += (buf.len() - start) as u64;
        page += n;
    }
    sent
}

fn is_zero(b: &ferry_ram::RamBlock, page: u64) -> bool {
    b.page_slice(page).is_some_and(|s| ferry_ram::is_zero(&s))
}
