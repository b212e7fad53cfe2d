//! Unit tests of the sender's pieces: packet building from a small guest
//! memory and bitmap, and every delivery sending the same bytes, which a
//! receiver accepts.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use ferry_ram::{GuestMemory, PageBitmap, RamBlock};
use ferry_transport::{Channel, SocketChannel};

use super::build::{PacketBuilder, Slot};
use super::delivery::Delivery;
use super::pool::PassWork;
use super::{SendPath, SenderOptions, SenderPool};
use crate::packet::{bytes_crc, PacketHeader, FLAG_PAGE_CRCS, HEADER_LEN, PAYLOAD_IOV};
use crate::{PassControl, ReceiverOptions, ReceiverPool};

const PS: u64 = 4096;

/// 128 pages: page p holds bytes (p * 7 + i) % 251 where p % 3 == 1, else zeros.
fn memory() -> Arc<GuestMemory> {
    let b = RamBlock::anonymous("ram", 128 * PS, PS as u32).unwrap();
    for p in (1..128).step_by(3) {
        let data: Vec<u8> = (0..PS).map(|i| ((p * 7 + i) % 251) as u8).collect();
        b.page_slice(p).unwrap().copy_from(&data);
    }
    Arc::new(GuestMemory::new(vec![b]).unwrap())
}

fn bitmaps(pages: &[u64]) -> Arc<Vec<PageBitmap>> {
    let bm = PageBitmap::new(128, false);
    pages.iter().for_each(|&p| bm.set(p));
    Arc::new(vec![bm])
}

fn work(bitmaps: Arc<Vec<PageBitmap>>, live: bool) -> PassWork {
    PassWork::new(
        1,
        live,
        Arc::new(PassControl::default()),
        bitmaps,
        Vec::new(),
        1,
    )
}

#[test]
fn a_packet_built_from_a_bitmap_has_the_right_offsets_zero_pages_and_crcs() {
    let mem = memory();
    // One bitmap word (64 pages) a chunk: pages 1, 4, 5 (zero), 6 (zero)
    // and 7 in the first, 100 in the second.
    let bms = bitmaps(&[1, 4, 5, 6, 7, 100]);
    let w = work(bms.clone(), true);
    let mut b = PacketBuilder::new(mem.clone(), true, 128, None, false);
    let mut s = Slot::new(128);
    let (block, word) = w.claim().unwrap();
    assert!(b.build(&mut s, &w, block, word).unwrap());
    // Normal pages first, in page order, then zero pages.
    assert_eq!(s.offsets, [PS, 4 * PS, 7 * PS, 5 * PS, 6 * PS]);
    assert_eq!((s.normal, s.zero), (3, 2));
    let ram = &mem.blocks()[0];
    let want: Vec<u32> = [1, 4, 7]
        .iter()
        .map(|&p| bytes_crc(&ram.copy_page(p).unwrap()))
        .collect();
    assert_eq!(s.page_crcs, want);
    // The bits were taken (clean before read); the next chunk's stay.
    assert!(!bms[0].test(1) && !bms[0].test(5) && bms[0].test(100));
    let h = PacketHeader::decode(&s.header).unwrap();
    assert_eq!((h.normal, h.zero, h.seq, h.block), (3, 2, 0, 0));
    assert!(h.has_page_crcs() && h.flags & FLAG_PAGE_CRCS != 0);
    assert!(h.header_crc_ok_with(&s.header, &s.offsets, &s.page_crcs));
    assert_eq!(s.wire, h.body().wire_len());
    assert_eq!(s.wire, (HEADER_LEN + 5 * 8 + 3 * 4) as u64 + 3 * PS);
    // Pages 1, 4 and 7 are not adjacent: 3 runs.
    assert_eq!(s.iov.len(), PAYLOAD_IOV + 3);
    // The second chunk is the next packet.
    let (block, word) = w.claim().unwrap();
    assert!(b.build(&mut s, &w, block, word).unwrap());
    assert_eq!(s.offsets, [100 * PS]);
    assert_eq!(PacketHeader::decode(&s.header).unwrap().seq, 1);
    assert!(w.claim().is_none());
}

#[test]
fn pages_the_page_tables_call_unwritten_go_as_zero_pages_unread() {
    let mem = memory();
    let bms = bitmaps(&[1, 2, 4, 7]);
    // As if the walk had found only pages 1 and 7 written: page 4's bytes
    // are then not read, and it goes as a zero page.
    let data = PageBitmap::new(128, false);
    data.set(1);
    data.set(7);
    let w = PassWork::new(
        1,
        false,
        Arc::new(PassControl::default()),
        bms,
        vec![Some(data)],
        1,
    );
    let mut b = PacketBuilder::new(mem.clone(), true, 128, None, false);
    let mut s = Slot::new(128);
    let (block, word) = w.claim().unwrap();
    assert!(b.build(&mut s, &w, block, word).unwrap());
    assert_eq!((s.normal, s.zero), (2, 2));
    assert_eq!(s.offsets[..2], [PS, 7 * PS]);
    let mut zero = s.offsets[2..].to_vec();
    zero.sort_unstable();
    assert_eq!(zero, [2 * PS, 4 * PS]);
}

#[test]
fn a_full_pass_reads_only_the_pages_written_and_the_receiver_matches() {
    // memory() wrote every third page of fresh anonymous memory; a full
    // pass asks the page tables, so the others go as zero pages unread.
    let mem = memory();
    let Some(data) = mem.blocks()[0].data_pages() else {
        eprintln!("skipped: this kernel has no PAGEMAP_SCAN (Linux 6.7 or newer)");
        return;
    };
    let written: Vec<u64> = (1..128).step_by(3).collect();
    assert_eq!(data.iter_set().collect::<Vec<_>>(), written);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = Arc::new(
        GuestMemory::new(vec![
            RamBlock::anonymous("ram", 128 * PS, PS as u32).unwrap()
        ])
        .unwrap(),
    );
    let receiver = ReceiverPool::start(
        vec![socket_channel(b, "multifd[0]")],
        dest.clone(),
        ReceiverOptions {
            checksums: true,
            ..Default::default()
        },
        || (),
    )
    .unwrap();
    let mut pool = SenderPool::start(
        vec![socket_channel(a, "multifd[0]")],
        mem.clone(),
        SenderOptions::default(),
    )
    .unwrap();
    pool.send_pass(Arc::new(vec![PageBitmap::new(128, true)]))
        .unwrap();
    let sent = pool.finish().unwrap();
    receiver.finish().unwrap();
    assert_eq!(sent.pages_zero, 128 - written.len() as u64);
    assert_eq!(sent.pages_normal, written.len() as u64);
    assert_eq!(dest.blocks()[0].copy_all(), mem.blocks()[0].copy_all());
}

#[test]
fn a_chunk_without_dirty_pages_builds_nothing() {
    let mem = memory();
    let w = work(bitmaps(&[100]), false);
    let mut b = PacketBuilder::new(mem, true, 128, None, false);
    let mut s = Slot::new(128);
    let (block, word) = w.claim().unwrap();
    assert!(!b.build(&mut s, &w, block, word).unwrap());
}

fn socket_channel(s: UnixStream, label: &str) -> Box<dyn Channel> {
    Box::new(SocketChannel::new(s.into(), label.into()))
}

/// Everything a sender pool with `path` puts on its one channel (TCP over
/// loopback: zero-copy needs TCP) for one pass over `pages` and the END.
fn stream_of(path: SendPath, pages: &[u64]) -> Vec<u8> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let mut b = l.accept().unwrap().0;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        got
    });
    let opts = SenderOptions {
        path,
        ..Default::default()
    };
    let mut pool = SenderPool::start(
        vec![Box::new(SocketChannel::new(a.into(), "multifd[0]".into()))],
        memory(),
        opts,
    )
    .unwrap();
    assert_eq!(pool.path(), path, "{:?}", pool.path_note());
    pool.send_pass(bitmaps(pages)).unwrap();
    pool.finish().unwrap();
    drop(pool);
    reader.join().unwrap()
}

#[test]
fn every_delivery_sends_the_same_bytes_and_the_receiver_takes_them() {
    let pages: Vec<u64> = (0..128).filter(|p| p % 5 != 0).collect();
    let splice = stream_of(SendPath::Splice, &pages);
    for path in [SendPath::Copy, SendPath::ZeroCopy] {
        assert!(
            stream_of(path, &pages) == splice,
            "{path:?} differs from splice"
        );
    }
    // Each delivery the threads choose from: the kinds are what was asked.
    let (a, _b) = UnixStream::pair().unwrap();
    let ch: Arc<dyn Channel> = Arc::from(socket_channel(a, "x"));
    for (path, zc, name) in [
        (SendPath::Splice, true, "splice"),
        (SendPath::Copy, true, "copy"),
        (SendPath::ZeroCopy, true, "zero-copy"),
        (SendPath::ZeroCopy, false, "copy"),
    ] {
        assert_eq!(Delivery::choose(&ch, path, zc).unwrap().name(), name);
    }
    // A receiver accepts the stream and lands every page as it was.
    let (mut a, b) = UnixStream::pair().unwrap();
    let dst = Arc::new(
        GuestMemory::new(vec![
            RamBlock::anonymous("ram", 128 * PS, PS as u32).unwrap()
        ])
        .unwrap(),
    );
    let pool = ReceiverPool::start(
        vec![socket_channel(b, "multifd[0]")],
        dst.clone(),
        ReceiverOptions {
            checksums: true,
            ..Default::default()
        },
        || {},
    )
    .unwrap();
    a.write_all(&splice).unwrap();
    pool.wait_sync(1).unwrap();
    let totals = pool.finish().unwrap();
    assert_eq!(totals.wire_bytes, splice.len() as u64);
    let src = memory();
    for &p in &pages {
        assert_eq!(
            dst.blocks()[0].copy_page(p),
            src.blocks()[0].copy_page(p),
            "page {p}"
        );
    }
}
