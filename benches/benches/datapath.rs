//! Criterion micro-benches of ferry's data-path building blocks: zero-page
//! detection, dirty-bitmap scanning, payload checksums, packet-header
//! decoding and the two dirty logs (a page written then synced). Sizes are small and measurement times short, so the whole
//! target runs in well under a minute (`cargo bench -p ferry-bench`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_multifd::{PacketHeader, HEADER_LEN};
use ferry_ram::pattern::{fill, Pattern};
use ferry_ram::{is_zero_page, BitmapLog, BlockSpec, DirtyLog, GuestMemory, PageBitmap, UffdLog};

const PAGE: usize = 4096;

/// 1 MiB of random bytes from the dataset generator (seed 42).
fn random_bytes() -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 20];
    fill(&mut buf, 0, Pattern::Random, 42);
    buf
}

fn zero_pages(c: &mut Criterion) {
    let zero = vec![0u8; PAGE];
    let random = random_bytes();
    let random = &random[..PAGE];
    let mut g = c.benchmark_group("is_zero_page");
    g.throughput(Throughput::Bytes(PAGE as u64));
    g.bench_function("zero 4KiB", |b| b.iter(|| is_zero_page(black_box(&zero))));
    g.bench_function("random 4KiB", |b| {
        b.iter(|| is_zero_page(black_box(random)))
    });
    g.finish();
}

fn bitmap_scan(c: &mut Criterion) {
    const PAGES: u64 = 1 << 20;
    let bitmap = PageBitmap::new(PAGES, false);
    for page in (0..PAGES).step_by(2) {
        bitmap.set(page);
    }
    let mut g = c.benchmark_group("PageBitmap");
    g.throughput(Throughput::Elements(PAGES));
    g.bench_function("iter_set 1M pages, half set", |b| {
        b.iter(|| black_box(&bitmap).iter_set().count())
    });
    g.finish();
}

fn checksum(c: &mut Criterion) {
    let data = random_bytes();
    let data = &data[..512 << 10];
    let mut g = c.benchmark_group("crc32fast");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("hash 512KiB", |b| {
        b.iter(|| crc32fast::hash(black_box(data)))
    });
    g.finish();
}

fn header_decode(c: &mut Criterion) {
    let header = PacketHeader {
        flags: 4,
        block: 0,
        normal: 96,
        zero: 32,
        page_size: PAGE as u32,
        seq: 12_345,
        payload_len: 96 * PAGE as u64,
        generation: 1,
        payload_crc: 0x1234_5678,
        header_crc: 0x9abc_def0,
        compressed_pages: 0,
    };
    let mut bytes = [0u8; HEADER_LEN];
    header.encode(&mut bytes);
    assert_eq!(
        PacketHeader::decode(&bytes),
        Ok(header),
        "the sample header must decode"
    );
    c.bench_function("PacketHeader::decode", |b| {
        b.iter(|| PacketHeader::decode(black_box(&bytes)))
    });
}

/// The cost a dirty log adds per written page: every page of 64 MiB is
/// written once (for uffd, each first write after a sync is a kernel
/// write-protect fault) and the log is then synced (for uffd, a PAGEMAP_SCAN
/// that re-arms them); and a sync of the same memory with nothing dirty.
fn dirty_logs(c: &mut Criterion) {
    const LEN: u64 = 64 << 20;
    let memory = GuestMemory::anonymous_base_pages(&[BlockSpec {
        name: "ram".into(),
        len: LEN,
        page_size: PAGE as u32,
    }])
    .unwrap();
    let block = &memory.blocks()[0];
    let pages = block.pages();
    let pass = vec![PageBitmap::new(pages, false)];
    let mut g = c.benchmark_group("dirty log 64MiB");
    g.throughput(Throughput::Elements(pages));
    let logs: Vec<Box<dyn DirtyLog>> = match UffdLog::new(&memory) {
        Ok(u) => vec![Box::new(BitmapLog::new(&memory)), Box::new(u)],
        Err(e) => {
            eprintln!("uffd dirty log unavailable: {e}");
            vec![Box::new(BitmapLog::new(&memory))]
        }
    };
    for log in logs {
        log.start().unwrap();
        g.bench_function(
            format!("{}: write every page, then sync", log.name()),
            |b| {
                b.iter(|| {
                    for p in 0..pages {
                        // SAFETY: page p is inside the writable block; the word
                        // at its start is aligned.
                        unsafe {
                            std::ptr::write_volatile(block.page_addr(p).unwrap().cast::<u64>(), p)
                        };
                        log.mark(0, p);
                    }
                    black_box(log.sync(&pass).unwrap())
                })
            },
        );
        g.bench_function(format!("{}: sync, nothing dirty", log.name()), |b| {
            b.iter(|| black_box(log.sync(&pass).unwrap()))
        });
        log.stop().unwrap();
    }
    g.finish();
}

criterion_group! {
    name = datapath;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50);
    targets = zero_pages, bitmap_scan, checksum, header_decode, dirty_logs
}
criterion_main!(datapath);
