//! Postcopy's data path over real sockets and real userfaultfd: the source
//! side ([`PageServer`]) and the destination side
//! ([`PostcopyDestination`]) joined by a return path (page requests in
//! their wire format), a preempt channel and two multifd channels.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use ferry_ram::pattern::{fill_block, Pattern};
use ferry_ram::{BlockSpec, Digest, GuestMemory, PageBitmap};
use ferry_transport::{Channel, SocketChannel};

use super::wire::{self, FrameHeader, PageRun, REQUEST_LEN};
use super::*;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

fn memory(len: u64) -> Arc<GuestMemory> {
    let specs = [
        BlockSpec {
            name: "ram".into(),
            len,
            page_size: PAGE as u32,
        },
        BlockSpec {
            name: "vram".into(),
            len: MIB,
            page_size: PAGE as u32,
        },
    ];
    Arc::new(GuestMemory::anonymous(&specs).unwrap())
}

fn copy_bits(bits: &[PageBitmap]) -> Vec<PageBitmap> {
    bits.iter()
        .map(|b| PageBitmap::from_words(b.pages(), &b.to_words()).unwrap())
        .collect()
}

fn pair(label: &str) -> (Arc<dyn Channel>, Arc<dyn Channel>) {
    let (a, b) = UnixStream::pair().unwrap();
    let ch = |s: UnixStream| -> Arc<dyn Channel> {
        Arc::new(SocketChannel::new(
            socket2::Socket::from(OwnedFd::from(s)),
            label.into(),
        ))
    };
    (ch(a), ch(b))
}

/// The source's memory (mixed data and zero pages), the destination's
/// after precopy (every non-zero page copied, so zero pages stay
/// unpopulated), and the discard list: pages the source then changed.
fn switched(len: u64, seed: u64) -> (Arc<GuestMemory>, Arc<GuestMemory>, Vec<PageBitmap>) {
    let src = memory(len);
    for (i, b) in src.blocks().iter().enumerate() {
        fill_block(b, Pattern::Mixed, seed + i as u64);
    }
    let dst = memory(len);
    for (s, d) in src.blocks().iter().zip(dst.blocks()) {
        for p in 0..s.pages() {
            let from = s.page_slice(p).unwrap();
            if !ferry_ram::is_zero(&from) {
                let mut buf = vec![0u8; PAGE as usize];
                from.copy_to(&mut buf[..]);
                d.page_slice(p).unwrap().copy_from(&buf[..]);
            }
        }
    }
    // Dirty at the switch: every 5th page rewritten, every 13th zeroed.
    let discard: Vec<PageBitmap> = src
        .blocks()
        .iter()
        .map(|b| {
            let bits = PageBitmap::new(b.pages(), false);
            for p in (0..b.pages()).step_by(5) {
                b.page_slice(p)
                    .unwrap()
                    .copy_from(&[p as u8 ^ 0x5a; PAGE as usize][..]);
                bits.set(p);
            }
            for p in (0..b.pages()).step_by(13) {
                b.zero_page(p);
                bits.set(p);
            }
            bits
        })
        .collect();
    (src, dst, discard)
}

/// The return path as a socket carrying page requests in their wire
/// format: the destination's writer, and the source's reader thread
/// serving each on `preempt`.
fn return_path(server: Arc<PageServer>, preempt: Arc<dyn Channel>) -> RequestFn {
    let (dst, mut src) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; REQUEST_LEN];
        while src.read_exact(&mut b).is_ok() {
            let run = PageRun::decode_request(&b);
            if server.serve(&run, "return path", preempt.as_ref()).is_err() {
                return;
            }
        }
    });
    let dst = std::sync::Mutex::new(dst);
    Arc::new(move |run: PageRun| {
        dst.lock()
            .unwrap()
            .write_all(&run.encode_request())
            .map_err(|e| e.to_string())
    })
}

/// Reads one byte of each page on its own thread, as a guest's vCPU
/// would; returns the bytes read.
fn touch(
    mem: &Arc<GuestMemory>,
    block: usize,
    pages: Vec<u64>,
) -> std::thread::JoinHandle<Vec<u8>> {
    let mem = mem.clone();
    std::thread::spawn(move || {
        let b = &mem.blocks()[block];
        pages
            .into_iter()
            .map(|p| {
                let addr = b.page_addr(p).unwrap();
                // SAFETY: the first byte of page p inside the block's
                // mapping, which `mem` keeps alive; a volatile read of a
                // registered missing page blocks until it is placed.
                unsafe { std::ptr::read_volatile(addr.add(7)) }
            })
            .collect()
    })
}

#[test]
fn faults_are_served_and_the_push_completes_every_page_once() {
    for seed in 1..=3 {
        let (src, dst, discard) = switched(16 * MIB, seed);
        let stale: u64 = discard.iter().map(PageBitmap::count).sum();
        let want = Digest::of_guest(&src, &[]);
        let server = Arc::new(PageServer::new(src.clone(), Arc::new(copy_bits(&discard))));
        let (pre_src, pre_dst) = pair("preempt");
        let request = return_path(server.clone(), pre_src);
        let mut pc = PostcopyDestination::start(dst.clone(), &discard, None, request).unwrap();
        assert_eq!(pc.missing(), stale);
        pc.read_pages(pre_dst).unwrap();
        // Two "vCPUs" touch stale pages (every 5th from 10), and pages
        // precopy left unpopulated (zeros) are touched too.
        let a = touch(&dst, 0, (10..4096).step_by(5).take(300).collect());
        let b = touch(&dst, 0, (3..4096).step_by(7).take(300).collect());
        let c = touch(&dst, 1, (0..256).collect());
        for t in [a, b, c] {
            t.join().unwrap();
        }
        let asked = pc.stats().requests;
        assert!(asked > 0, "the touches faulted");
        // The background push over two multifd channels.
        let mut pushers = Vec::new();
        for i in 0..2 {
            let (s, d) = pair(&format!("multifd[{i}]"));
            pc.read_pages(d).unwrap();
            let server = server.clone();
            pushers.push(std::thread::spawn(move || server.push(s.as_ref(), false)));
        }
        let stats = pc.finish(Duration::from_secs(30)).unwrap();
        for p in pushers {
            // Once every page is placed the destination closes its
            // channels: a push still sending (its END, a page that came
            // both ways) may find them closed, which is no error.
            let _ = p.join().unwrap();
        }
        assert_eq!(pc.missing(), 0);
        assert_eq!(stats.discarded_pages, stale);
        assert_eq!(
            stats.requested_pages_placed + stats.pushed_pages_placed,
            stale,
            "every stale page placed once: {stats:?}"
        );
        assert_eq!(stats.requests, asked, "no page requested twice");
        assert!(stats.requested_pages_placed <= stats.requests);
        assert!(
            stats.fault_max_us >= stats.fault_p99_us && stats.fault_p99_us >= stats.fault_p50_us
        );
        assert!(
            stats.fault_p50_us > 0 && stats.blocked_ms > 0.0,
            "{stats:?}"
        );
        // SAFETY: every page is placed and no thread touches `dst` now.
        let got = unsafe { Digest::of_still_guest(&dst, &[]) };
        assert_eq!(got, want, "seed {seed}: the destination equals the source");
    }
}

#[test]
fn a_page_arriving_both_ways_is_placed_once() {
    let (src, dst, discard) = switched(MIB, 9);
    let stale: u64 = discard.iter().map(PageBitmap::count).sum();
    let (q_src, q_dst) = pair("preempt");
    let mut pc =
        PostcopyDestination::start(dst.clone(), &discard, None, Arc::new(|_| Ok(()))).unwrap();
    pc.read_pages(q_dst).unwrap();
    // The push sends everything; the requests' answers send page 0 and 5 again.
    let server = PageServer::new(src.clone(), Arc::new(copy_bits(&discard)));
    let again = PageServer::new(src.clone(), Arc::new(copy_bits(&discard)));
    server.push(q_src.as_ref(), false).unwrap();
    let (r_src, r_dst) = pair("preempt[2]");
    pc.read_pages(r_dst).unwrap();
    for p in [0, 5] {
        let run = PageRun {
            block: 0,
            offset: p * PAGE,
            len: PAGE,
        };
        again.serve(&run, "return path", r_src.as_ref()).unwrap();
    }
    super::send_end(r_src.as_ref()).unwrap();
    // The second arrivals are read, and skipped.
    let t = std::time::Instant::now();
    while pc.stats().duplicate_pages < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", pc.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = pc.finish(Duration::from_secs(30)).unwrap();
    assert_eq!(stats.pushed_pages_placed, stale, "each page placed once");
    assert_eq!(stats.duplicate_pages, 2);
    assert_eq!(stats.requests, 0);
    // SAFETY: every page is placed and nothing touches `dst` now.
    assert_eq!(
        unsafe { Digest::of_still_guest(&dst, &[]) },
        Digest::of_guest(&src, &[])
    );
}

/// A frame whose header is bad, on any channel, ends postcopy with an error
/// naming the channel, block and offset; nothing of it is placed.
#[test]
fn bad_frames_are_refused_naming_them_and_nothing_is_placed() {
    let frame =
        |block: u16, flags: u16, offset: u64, pages: u32, payload: &[u8], crc: Option<u32>| {
            let head = FrameHeader::head(block, flags, offset, pages);
            let mut b = head.to_vec();
            b.extend_from_slice(&crc.unwrap_or(wire::frame_crc(&head, payload)).to_le_bytes());
            b.extend_from_slice(payload);
            b
        };
    let page = vec![0xabu8; PAGE as usize];
    for (bytes, says) in [
        (
            frame(7, 0, 0, 1, &page, None),
            "preempt: page run for unknown block #7",
        ),
        (
            frame(1, 0, 100, 1, &page, None),
            "block 'vram' at offset 0x64, 4096 bytes: not aligned",
        ),
        (
            frame(1, 0, MIB, 1, &page, None),
            "block 'vram' at offset 0x100000, 4096 bytes: outside the block",
        ),
        (frame(1, 0, 0, 65, &[], None), "not 1 to 64 pages"),
        (
            frame(1, 0, 0, 1, &page, Some(1)),
            "preempt: 1 page(s) of block 'vram' at offset 0x0 failed their CRC",
        ),
        (
            b"GARBAGE!GARBAGE!GARBAGE!".to_vec(),
            "preempt: bad page frame: bad magic",
        ),
    ] {
        let (_src, dst, discard) = switched(MIB, 3);
        let stale: u64 = discard.iter().map(PageBitmap::count).sum();
        let (q_src, q_dst) = pair("preempt");
        let mut pc = PostcopyDestination::start(dst, &discard, None, Arc::new(|_| Ok(()))).unwrap();
        pc.read_pages(q_dst).unwrap();
        q_src.write_all(&bytes).unwrap();
        let e = pc.finish(Duration::from_secs(30)).unwrap_err().to_string();
        assert!(e.contains(says), "wanted {says:?} in: {e}");
        assert_eq!(pc.missing(), stale, "nothing placed");
        assert_eq!(pc.stats().pushed_pages_placed, 0);
    }
}

#[test]
fn requests_outside_guest_memory_are_refused_and_nothing_is_sent() {
    let src = memory(MIB);
    let pending = Arc::new(
        src.blocks()
            .iter()
            .map(|b| PageBitmap::new(b.pages(), true))
            .collect(),
    );
    let server = PageServer::new(src, pending);
    let (ours, theirs) = pair("preempt");
    for (run, says) in [
        (
            (2, 0, PAGE),
            "return path: page run for unknown block #2 (the guest has 2)",
        ),
        (
            (0, 1, PAGE),
            "return path: page run in block 'ram' at offset 0x1, 4096 bytes: not aligned",
        ),
        (
            (1, MIB, PAGE),
            "block 'vram' at offset 0x100000, 4096 bytes: outside the block",
        ),
        ((0, 0, 513 * PAGE), "not 1 to 512 pages"),
    ] {
        let run = PageRun {
            block: run.0,
            offset: run.1,
            len: run.2,
        };
        let e = server
            .serve(&run, "return path", ours.as_ref())
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "wanted {says:?} in: {e}");
    }
    assert_eq!(server.figures(), (0, 0, 0));
    ours.shutdown();
    let mut b = [0u8; 1];
    assert!(theirs.read_exact(&mut b).is_err(), "nothing was sent");
}

#[test]
fn a_discard_list_that_does_not_match_memory_is_refused_before_registering() {
    let dst = memory(MIB);
    let wrong = vec![PageBitmap::new(256, true)];
    let e = PostcopyDestination::start(dst.clone(), &wrong, None, Arc::new(|_| Ok(())))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("discard list: its blocks do not match"), "{e}");
    // Nothing registered: the memory is touched freely.
    dst.blocks()[0].touch_page(3);
}

/// Pages dropped ahead of the switch (EARLY_DISCARD) are missing at the
/// switch like the rest of the discard list, which must name them again:
/// one it leaves out is refused before anything is registered; pages a
/// huge-page collapse filled back meanwhile are dropped again; and the
/// push completes the memory, equal to the source's.
#[test]
fn pages_dropped_early_are_missing_at_the_switch_which_must_name_them() {
    /// madvise(2)'s MADV_COLLAPSE (Linux 6.1).
    const MADV_COLLAPSE: i32 = 25;
    let (src, dst, discard) = switched(4 * MIB, 21);
    // Dropped early: the discard list's pages in block 0, every other one.
    let early: Vec<PageBitmap> = discard
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let e = PageBitmap::new(d.pages(), false);
            for p in d.iter_set().filter(|p| i == 0 && p % 2 == 0) {
                e.set(p);
            }
            e
        })
        .collect();
    let dropped: u64 = early.iter().map(PageBitmap::count).sum();
    assert!(dropped > 0);
    assert_eq!(super::drop_early(&dst, &early).unwrap(), dropped);
    let b0 = &dst.blocks()[0];
    let mapped_early = || {
        let m = b0.mapped_pages().expect("PAGEMAP_SCAN (Linux 6.7+)");
        early[0].iter_set().filter(|&p| m.test(p)).count()
    };
    assert_eq!(mapped_early(), 0, "dropped");
    // Until the switch registers the memory, khugepaged may collapse a
    // huge page back, filling the dropped pages with zeros (a page present
    // then fails its UFFDIO_COPY with EEXIST). MADV_COLLAPSE does it now.
    // SAFETY: madvise(MADV_COLLAPSE) over block 0's own mapping: the
    // pages backing it are gathered into huge pages, contents kept.
    let collapsed =
        unsafe { libc::madvise(b0.host_addr().cast(), b0.len() as usize, MADV_COLLAPSE) };
    if collapsed == 0 {
        assert!(mapped_early() > 0, "the collapse filled dropped pages");
    } else {
        eprintln!(
            "MADV_COLLAPSE refused ({}): the refill is not exercised here",
            std::io::Error::last_os_error()
        );
    }
    // A switch whose list leaves out a page dropped early (page 0, the
    // first rewritten one) is refused, before any registration.
    let short = copy_bits(&discard);
    short[0].test_and_clear(0);
    let e = PostcopyDestination::start(dst.clone(), &short, Some(&early), Arc::new(|_| Ok(())))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("leaves out page 0 (offset 0x0) of block 'ram', dropped before the switch"),
        "{e}"
    );
    dst.blocks()[1].touch_page(1); // not registered: no fault
                                   // The whole list: every stale page comes by the push, once.
    let stale: u64 = discard.iter().map(PageBitmap::count).sum();
    let (q_src, q_dst) = pair("preempt[1]");
    let mut pc =
        PostcopyDestination::start(dst.clone(), &discard, Some(&early), Arc::new(|_| Ok(())))
            .unwrap();
    pc.read_pages(q_dst).unwrap();
    let server = PageServer::new(src.clone(), Arc::new(copy_bits(&discard)));
    // On its own thread: a reader that fails stops reading, and the push
    // would wait on a full socket.
    let push = std::thread::spawn(move || server.push(q_src.as_ref(), false));
    let stats = pc.finish(Duration::from_secs(30)).unwrap();
    // Its END frame may find the channel closed: postcopy ends when the
    // last page is placed.
    let _ = push.join().unwrap();
    assert_eq!(stats.discarded_pages, stale);
    assert_eq!(stats.pushed_pages_placed, stale, "each page placed once");
    // SAFETY: every page is placed and nothing touches `dst` now.
    assert_eq!(
        unsafe { Digest::of_still_guest(&dst, &[]) },
        Digest::of_guest(&src, &[])
    );
}

/// Whether this process may use SCHED_RR is what a thread finds when it
/// tries: the push is niced only where it may not.
#[test]
fn realtime_is_allowed_exactly_where_a_thread_gets_sched_rr() {
    let got = std::thread::spawn(|| {
        let rt = libc::sched_param { sched_priority: 1 };
        // SAFETY: sched_setscheduler(2) on the calling thread (0), which
        // ends right after; no memory is kept.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &rt) == 0 }
    })
    .join()
    .unwrap();
    assert_eq!(super::dest::realtime_allowed(), got);
}

/// A link that breaks pauses (it does not fail): a guest thread touching a
/// missing page stays blocked, its request is held; the received bitmap
/// names exactly the pages placed; a resume over a new link asks again for
/// that page, and a server made from what the bitmap lacks completes the
/// memory, equal to the source's.
#[test]
fn a_broken_link_pauses_and_a_resume_completes_from_the_received_bitmap() {
    let (src, dst, discard) = switched(4 * MIB, 11);
    let stale: u64 = discard.iter().map(PageBitmap::count).sum();
    let want = Digest::of_guest(&src, &[]);
    // The first link: requests are dropped (never answered), and the
    // preempt channel brings a few pages, then breaks.
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = asked.clone();
    let request: RequestFn = Arc::new(move |run| {
        log.lock().unwrap().push(run);
        Ok(())
    });
    let mut pc = PostcopyDestination::start(dst.clone(), &discard, None, request).unwrap();
    let (q_src, q_dst) = pair("preempt");
    pc.read_pages(q_dst).unwrap();
    let first = PageServer::new(src.clone(), Arc::new(copy_bits(&discard)));
    for p in [0, 5, 10] {
        let run = PageRun {
            block: 0,
            offset: p * PAGE,
            len: PAGE,
        };
        first.serve(&run, "return path", q_src.as_ref()).unwrap();
    }
    let t = std::time::Instant::now();
    while pc.missing() != stale - 3 {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", pc.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
    q_src.shutdown();
    while pc.paused().is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "no pause");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        pc.paused().unwrap().contains("preempt"),
        "{:?}",
        pc.paused()
    );
    assert!(
        !pc.wait_ended(Duration::from_millis(10)),
        "paused, not ended"
    );
    // A vCPU touches stale page 15 while paused: it blocks.
    let toucher = touch(&dst, 0, vec![15]);
    // Its request is held (counted, not sent) while paused.
    while pc.requests() == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no fault");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        asked.lock().unwrap().is_empty(),
        "nothing sent on a paused link"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !toucher.is_finished(),
        "a thread on a missing page stays blocked"
    );
    // The received bitmap: every page except the stale ones not placed.
    let received = pc.received();
    for (b, (r, d)) in received.iter().zip(&discard).enumerate() {
        for p in 0..r.pages() {
            let placed = !d.test(p) || (b == 0 && [0, 5, 10].contains(&p));
            assert_eq!(r.test(p), placed, "block {b} page {p}");
        }
    }
    // Resume: a new link whose requests are served, and a push of what
    // the bitmap lacks.
    let second = Arc::new(PageServer::new(
        src.clone(),
        Arc::new(wire::still_missing(&discard, &received)),
    ));
    assert_eq!(second.pending_pages(), stale - 3);
    let (q2_src, q2_dst) = pair("preempt");
    let request = return_path(second.clone(), q2_src);
    pc.resume_link(request, vec![q2_dst]).unwrap();
    assert_eq!(pc.paused(), None);
    // The held request went out on the new link and was served.
    let mut page = vec![0u8; PAGE as usize];
    src.blocks()[0]
        .page_slice(15)
        .unwrap()
        .copy_to(&mut page[..]);
    assert_eq!(toucher.join().unwrap(), vec![page[7]]);
    let (p_src, p_dst) = pair("multifd[0]");
    pc.read_pages(p_dst).unwrap();
    let pusher = {
        let second = second.clone();
        std::thread::spawn(move || second.push(p_src.as_ref(), false))
    };
    let stats = pc.finish(Duration::from_secs(30)).unwrap();
    let _ = pusher.join().unwrap();
    assert_eq!(stats.requests, 1, "page 15, asked once: {stats:?}");
    assert_eq!(
        stats.requested_pages_placed + stats.pushed_pages_placed,
        stale,
        "every stale page placed once: {stats:?}"
    );
    let (_, sent_requests, sent_push) = second.figures();
    assert!(
        sent_requests + sent_push <= (stale - 3) * (PAGE + 24),
        "only what the destination lacked went again"
    );
    // SAFETY: every page is placed and nothing touches `dst` now.
    assert_eq!(unsafe { Digest::of_still_guest(&dst, &[]) }, want);
}

/// A request for a page the push has taken (its bytes sit unread in the
/// push's socket) is answered on the preempt channel at once, counted as
/// a second copy; the push's copy that comes later is skipped, so the page
/// is placed once. (Were taken pages left to the push, the faulting thread
/// would wait until the push channel is read, which here it is not.)
#[test]
fn a_request_for_a_page_the_push_took_is_answered_on_preempt_and_placed_once() {
    let (src, dst, discard) = switched(4 * MIB, 5);
    let stale: u64 = discard.iter().map(PageBitmap::count).sum();
    let pending = Arc::new(copy_bits(&discard));
    let server = Arc::new(PageServer::new(src.clone(), pending.clone()));
    let (pre_src, pre_dst) = pair("preempt");
    let request = return_path(server.clone(), pre_src);
    let mut pc = PostcopyDestination::start(dst.clone(), &discard, None, request).unwrap();
    pc.read_pages(pre_dst).unwrap();
    // The push runs on a channel nobody reads yet: it takes the first
    // words and blocks once the socket's buffer is full.
    let (p_src, p_dst) = pair("multifd[0]");
    let pusher = {
        let server = server.clone();
        std::thread::spawn(move || server.push(p_src.as_ref(), false))
    };
    let t = std::time::Instant::now();
    while pending[0].test(5) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the push took nothing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Page 5 (stale, not zero) is in flight in the push: a vCPU touches it.
    let toucher = touch(&dst, 0, vec![5]);
    while !toucher.is_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the fault waits behind the push: {:?}",
            pc.stats()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut page = vec![0u8; PAGE as usize];
    src.blocks()[0]
        .page_slice(5)
        .unwrap()
        .copy_to(&mut page[..]);
    assert_eq!(toucher.join().unwrap(), vec![page[7]]);
    let (requests, request_bytes, _) = server.figures();
    assert_eq!(requests, 1);
    assert_eq!(request_bytes, PAGE + 24, "one frame of one page");
    assert_eq!(
        server.duplicate_bytes(),
        PAGE + 24,
        "counted as a second copy"
    );
    // Now the push's bytes are read: its copy of page 5 is skipped.
    pc.read_pages(p_dst).unwrap();
    let stats = pc.finish(Duration::from_secs(30)).unwrap();
    let _ = pusher.join().unwrap();
    assert_eq!(stats.requests, 1, "{stats:?}");
    assert_eq!(stats.requested_pages_placed, 1, "{stats:?}");
    assert_eq!(
        stats.requested_pages_placed + stats.pushed_pages_placed,
        stale,
        "every stale page placed once: {stats:?}"
    );
    assert_eq!(
        stats.duplicate_pages, 1,
        "the push's copy skipped: {stats:?}"
    );
    // SAFETY: every page is placed and nothing touches `dst` now.
    assert_eq!(
        unsafe { Digest::of_still_guest(&dst, &[]) },
        Digest::of_guest(&src, &[])
    );
}

/// A request for a page still pending is a first copy: the push skips
/// it and no byte counts as a duplicate.
#[test]
fn a_request_for_a_pending_page_is_no_duplicate() {
    let (src, _dst, discard) = switched(MIB, 6);
    let pending = Arc::new(copy_bits(&discard));
    let server = PageServer::new(src, pending.clone());
    let (ours, theirs) = pair("preempt");
    let run = PageRun {
        block: 0,
        offset: 10 * PAGE,
        len: PAGE,
    };
    server.serve(&run, "return path", ours.as_ref()).unwrap();
    assert!(!pending[0].test(10), "claimed: the push skips it");
    assert_eq!(server.figures(), (1, PAGE + 24, 0));
    assert_eq!(server.duplicate_bytes(), 0);
    // Asked again (after a recovery, say): a second copy, counted.
    server.serve(&run, "return path", ours.as_ref()).unwrap();
    assert_eq!(server.figures(), (2, 2 * (PAGE + 24), 0));
    assert_eq!(server.duplicate_bytes(), PAGE + 24);
    drop(theirs);
}

/// A channel that reads only exactly (as a TLS channel does): the page
/// readers then read each frame's header and payload apart.
#[derive(Debug)]
struct ExactOnly(Arc<dyn Channel>);

impl Channel for ExactOnly {
    fn label(&self) -> &str {
        self.0.label()
    }
    fn set_label(&mut self, _label: String) {}
    fn read_exact(&self, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact(buf)
    }
    fn write_all(&self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf)
    }
    fn uring_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    fn shutdown(&self) {
        self.0.shutdown()
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.0.set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.0.set_write_timeout(timeout)
    }
}

/// A page frame of `pages` pages of `src`'s block `block` from `first`.
fn frame_of(src: &GuestMemory, block: usize, first: u64, pages: u64) -> Vec<u8> {
    let b = &src.blocks()[block];
    let mut payload = vec![0u8; (pages * PAGE) as usize];
    b.pages_slice(first, pages)
        .unwrap()
        .copy_to(&mut payload[..]);
    let head = FrameHeader::head(block as u16, 0, first * PAGE, pages as u32);
    let mut f = head.to_vec();
    f.extend_from_slice(&wire::frame_crc(&head, &payload).to_le_bytes());
    f.extend_from_slice(&payload);
    f
}

/// Pages of one frame that another arrival placed first are skipped, and
/// the others around them are placed (each unbroken run with one
/// UFFDIO_COPY, which the kernel would refuse over a placed page), over
/// a socket read many frames at a time and over a channel read exactly.
#[test]
fn a_frame_whose_pages_are_partly_placed_places_the_others_once_each() {
    for exact in [false, true] {
        let (src, dst, _) = switched(MIB, 21);
        // The destination holds every page as the source has it, but for
        // pages 0..8 of "vram", which the source changes: stale.
        for (s, d) in src.blocks().iter().zip(dst.blocks()) {
            let mut buf = vec![0u8; s.len() as usize];
            s.pages_slice(0, s.pages()).unwrap().copy_to(&mut buf[..]);
            d.pages_slice(0, d.pages()).unwrap().copy_from(&buf[..]);
        }
        let discard: Vec<PageBitmap> = src
            .blocks()
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let bits = PageBitmap::new(b.pages(), false);
                if i == 1 {
                    for p in 0..8 {
                        b.page_slice(p)
                            .unwrap()
                            .copy_from(&[p as u8 + 1; PAGE as usize][..]);
                        bits.set(p);
                    }
                }
                bits
            })
            .collect();
        let (q_src, q_dst) = pair("multifd[0]");
        let q_dst: Arc<dyn Channel> = if exact {
            Arc::new(ExactOnly(q_dst))
        } else {
            q_dst
        };
        let mut pc =
            PostcopyDestination::start(dst.clone(), &discard, None, Arc::new(|_| Ok(()))).unwrap();
        pc.read_pages(q_dst).unwrap();
        // Pages 0, 3, 4 and 7 first, then all eight: one write.
        let mut bytes = Vec::new();
        for (first, n) in [(0, 1), (3, 2), (7, 1), (0, 8)] {
            bytes.extend_from_slice(&frame_of(&src, 1, first, n));
        }
        q_src.write_all(&bytes).unwrap();
        let stats = pc.finish(Duration::from_secs(30)).unwrap();
        assert_eq!(stats.pushed_pages_placed, 8, "exact {exact}: {stats:?}");
        assert_eq!(stats.duplicate_pages, 4, "exact {exact}: {stats:?}");
        // SAFETY: every page is placed and nothing touches `dst` now.
        assert_eq!(
            unsafe { Digest::of_still_guest(&dst, &[]) },
            Digest::of_guest(&src, &[]),
            "exact {exact}"
        );
    }
}

/// Good frames and a bad one in one write: the reader takes them from one
/// read, places the good ones, and refuses the bad one naming it (nothing
/// of it placed).
#[test]
fn a_bad_frame_behind_good_ones_in_one_read_is_refused_alone() {
    for exact in [false, true] {
        let (src, dst, discard) = switched(MIB, 5);
        let stale: u64 = discard.iter().map(PageBitmap::count).sum();
        let (q_src, q_dst) = pair("multifd[1]");
        let q_dst: Arc<dyn Channel> = if exact {
            Arc::new(ExactOnly(q_dst))
        } else {
            q_dst
        };
        let mut pc = PostcopyDestination::start(dst, &discard, None, Arc::new(|_| Ok(()))).unwrap();
        pc.read_pages(q_dst).unwrap();
        // "vram" pages 0 and 5 are stale (every 5th); then a frame of 65
        // pages (more than a frame may carry) at page 10.
        let mut bytes = frame_of(&src, 1, 0, 1);
        bytes.extend_from_slice(&frame_of(&src, 1, 5, 1));
        let head = FrameHeader::head(1, 0, 10 * PAGE, 65);
        bytes.extend_from_slice(&head);
        bytes.extend_from_slice(&wire::frame_crc(&head, &[]).to_le_bytes());
        q_src.write_all(&bytes).unwrap();
        let e = pc.finish(Duration::from_secs(30)).unwrap_err().to_string();
        assert!(
            e.contains("multifd[1]: page run in block 'vram' at offset 0xa000")
                && e.contains("not 1 to 64 pages"),
            "exact {exact}: {e}"
        );
        assert_eq!(pc.stats().pushed_pages_placed, 2, "exact {exact}");
        assert_eq!(pc.missing(), stale - 2, "exact {exact}");
    }
}

/// The request path's threads are raised (SCHED_RR as root, else nice -5,
/// else nothing) and put back exactly; a thread started while raised
/// does not inherit it.
#[test]
fn a_raised_thread_is_put_back_and_its_children_do_not_inherit() {
    std::thread::spawn(|| {
        let sched = || {
            // SAFETY: sched_getscheduler(2) and getpriority(2) on the
            // calling thread (0 / its tid); no memory is passed.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                (
                    libc::sched_getscheduler(0),
                    libc::getpriority(libc::PRIO_PROCESS, tid),
                )
            }
        };
        let before = sched();
        let saved = super::raise_priority("test");
        let raised = sched();
        let child = std::thread::spawn(sched).join().unwrap();
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let reset_on_fork = 0x4000_0000;
            assert_eq!(
                raised.0,
                libc::SCHED_RR | reset_on_fork,
                "root may use SCHED_RR"
            );
        }
        assert_eq!(child.0, before.0, "the child's policy is the normal one");
        super::restore_priority(saved);
        assert_eq!(sched(), before);
    })
    .join()
    .unwrap();
}

/// Another thread of the request path is raised by its name (the
/// source's return-path reader), and only that thread.
#[test]
fn threads_are_raised_by_name() {
    let policy = || {
        // SAFETY: sched_getscheduler(2) on the calling thread; no memory.
        unsafe { libc::sched_getscheduler(0) }
    };
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (ready, started) = std::sync::mpsc::channel::<()>();
    let named = std::thread::Builder::new()
        .name("ferry-pc-t-named".into())
        .spawn(move || {
            let before = policy();
            ready.send(()).unwrap();
            wait.recv().unwrap();
            (before, policy())
        })
        .unwrap();
    let other = std::thread::Builder::new()
        .name("ferry-pc-t-other".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            policy()
        })
        .unwrap();
    started.recv().unwrap();
    // The kernel's name is the first 15 bytes.
    super::raise_threads_named("ferry-pc-t-name", "test");
    go.send(()).unwrap();
    let (before, after) = named.join().unwrap();
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(after & !0x4000_0000, libc::SCHED_RR, "raised");
    }
    assert_eq!(other.join().unwrap(), before, "the other thread is not");
}

/// Whole 2 MiB regions of `block` (first pages) that can be moved into
/// place as huge pages: inside the block and aligned in memory.
fn movable_regions(mem: &GuestMemory, block: usize) -> Vec<u64> {
    let b = &mem.blocks()[block];
    let n = ferry_ram::uffd::HUGE_PAGE / PAGE;
    (0..b.pages() / n)
        .map(|r| r * n)
        .filter(|&p| (b.page_addr(p).unwrap() as u64).is_multiple_of(ferry_ram::uffd::HUGE_PAGE))
        .collect()
}

#[test]
fn a_fault_in_a_region_with_no_page_yet_asks_for_it_whole_and_it_moves_in_as_one_huge_page() {
    if !ferry_ram::uffd::Userfault::open_with_move().is_ok_and(|u| u.can_move()) {
        eprintln!("skipped: no UFFDIO_MOVE (Linux 6.8+) or transparent huge pages off");
        return;
    }
    // Switched before any pass: every page is missing, except page 3 of
    // the third region, which the destination holds (never discarded).
    let src = memory(8 * MIB);
    for (i, b) in src.blocks().iter().enumerate() {
        fill_block(b, Pattern::Mixed, 40 + i as u64);
    }
    let dst = memory(8 * MIB);
    let regions = movable_regions(&dst, 0);
    if regions.len() < 3 {
        eprintln!("skipped: the kernel did not align this 8 MiB mapping to huge pages");
        return;
    }
    let discard: Vec<PageBitmap> = src
        .blocks()
        .iter()
        .map(|b| PageBitmap::new(b.pages(), true))
        .collect();
    let held = regions[2] + 3;
    discard[0].clear(held);
    let buf = src.blocks()[0].copy_page(held).unwrap();
    dst.blocks()[0]
        .page_slice(held)
        .unwrap()
        .copy_from(&buf[..]);
    let want = Digest::of_guest(&src, &[]);

    let server = Arc::new(PageServer::new(src.clone(), Arc::new(copy_bits(&discard))));
    let (pre_src, pre_dst) = pair("preempt");
    let request = return_path(server.clone(), pre_src);
    let mut pc = PostcopyDestination::start(dst.clone(), &discard, None, request).unwrap();
    pc.read_pages(pre_dst).unwrap();
    // Until the source is known to answer whole regions
    // (CAP_POSTCOPY_REGIONS), a fault asks for its own page: the second
    // region then goes page by page.
    touch(&dst, 0, vec![regions[1] + 1]).join().unwrap();
    let s = pc.stats();
    assert_eq!((s.requests, s.requested_pages_placed), (1, 1), "{s:?}");
    pc.ask_for_regions(true);
    // A "vCPU" touches a page of the first region, then one of the third.
    let got = touch(&dst, 0, vec![regions[0] + 100]).join().unwrap();
    let s = pc.stats();
    assert_eq!(s.requests, 2, "one request for the whole region: {s:?}");
    assert_eq!(s.requested_pages_placed, 513, "{s:?}");
    assert_eq!(s.huge_pages_moved, 1, "{s:?}");
    let page = src.blocks()[0].copy_page(regions[0] + 100).unwrap();
    assert_eq!(got, vec![page[7]]);
    // The third region holds a page already: only the touched page is asked for.
    touch(&dst, 0, vec![regions[2] + 9]).join().unwrap();
    let s = pc.stats();
    assert_eq!((s.requests, s.requested_pages_placed), (3, 514), "{s:?}");
    // The push brings the rest, a region at a time.
    let mut pushers = Vec::new();
    for i in 0..2 {
        let (s, d) = pair(&format!("multifd[{i}]"));
        pc.read_background_pages(d).unwrap();
        let server = server.clone();
        pushers.push(std::thread::spawn(move || server.push(s.as_ref(), false)));
    }
    let stats = pc.finish(Duration::from_secs(30)).unwrap();
    for p in pushers {
        let _ = p.join().unwrap();
    }
    // Every whole region of missing pages moved in whole; the second (a
    // page placed by request) and the third (a page held, one placed by
    // request) went page by page, as did "vram" (1 MiB: no huge page).
    assert_eq!(
        stats.huge_pages_moved,
        regions.len() as u64 - 2,
        "{stats:?}"
    );
    let stale: u64 = discard.iter().map(PageBitmap::count).sum();
    assert_eq!(
        stats.requested_pages_placed + stats.pushed_pages_placed,
        stale,
        "every missing page placed once: {stats:?}"
    );
    // SAFETY: every page is placed and no thread touches `dst` now.
    let got = unsafe { Digest::of_still_guest(&dst, &[]) };
    assert_eq!(got, want, "the destination equals the source");
}
