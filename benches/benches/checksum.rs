//! Criterion micro-benches for the page checksum (issue #16, item 3): what
//! each candidate costs per 4 KiB page of guest memory, read the way the
//! sender must read it.
//!
//! Memory is a 256 MiB anonymous block of the `mixed` dataset's data pages
//! (bigger than the caches, as guest RAM is), walked page by page. Each
//! candidate is measured in place (memory nobody writes, as in a paused
//! guest's final pass) and through a copy into a private 16 KiB buffer
//! (`ferry_ram::read_in_pieces`, what a live pass must do), and once folded
//! into the zero scan that already reads the page; and `ferry_ram::crc32`,
//! which reads shared memory in place by inline assembly. `cargo bench -p
//! ferry-bench --bench checksum` runs it in about a minute.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_ram::pattern::{fill_block, Pattern};
use ferry_ram::{crc32, is_zero, read_in_pieces, RamBlock};

const PAGE: u64 = 4096;
const LEN: u64 = 256 << 20;

type PageHash = fn(&[u8]) -> u64;

fn candidates() -> [(&'static str, PageHash); 3] {
    [
        ("crc32fast", |p| u64::from(crc32fast::hash(p))),
        ("crc32c", |p| u64::from(crc32c::crc32c(p))),
        ("xxh3-64", xxhash_rust::xxh3::xxh3_64),
    ]
}

fn pages(c: &mut Criterion) {
    let block = RamBlock::anonymous("bench", LEN, PAGE as u32).unwrap();
    fill_block(&block, Pattern::Random, 3);
    let count = block.pages();
    let mut g = c.benchmark_group("page checksum, 256 MiB of pages");
    g.throughput(Throughput::Bytes(LEN));
    for (name, hash) in candidates() {
        g.bench_function(format!("{name} in place"), |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for p in 0..count {
                    // SAFETY: nothing writes the block while the bench runs.
                    let page = unsafe { block.bytes_unshared(p * PAGE, PAGE as usize) }.unwrap();
                    acc ^= hash(page);
                }
                black_box(acc)
            })
        });
        g.bench_function(format!("{name} of a copy"), |b| {
            let mut scratch = vec![0u8; 16 << 10];
            b.iter(|| {
                let mut acc = 0u64;
                for p in 0..count {
                    let page = block.page_slice(p).unwrap();
                    read_in_pieces(&page, &mut scratch, |piece| acc ^= hash(piece));
                }
                black_box(acc)
            })
        });
        g.bench_function(format!("zero scan, then {name} of a copy"), |b| {
            let mut scratch = vec![0u8; 16 << 10];
            b.iter(|| {
                let mut acc = 0u64;
                for p in 0..count {
                    let page = block.page_slice(p).unwrap();
                    if !is_zero(&page) {
                        read_in_pieces(&page, &mut scratch, |piece| acc ^= hash(piece));
                    }
                }
                black_box(acc)
            })
        });
    }
    // Sound without a copy: `ferry_ram::crc32` loads guest memory by
    // inline assembly (crc32fast's value, read in place).
    g.bench_function("crc32 in place (ferry_ram::crc32, shared memory)", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in 0..count {
                acc ^= u64::from(crc32(0, &block.page_slice(p).unwrap()));
            }
            black_box(acc)
        })
    });
    g.bench_function("zero scan, then crc32 in place (shared memory)", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for p in 0..count {
                let page = block.page_slice(p).unwrap();
                if !is_zero(&page) {
                    acc ^= u64::from(crc32(0, &page));
                }
            }
            black_box(acc)
        })
    });
    g.bench_function("zero scan alone", |b| {
        b.iter(|| {
            (0..count)
                .filter(|&p| is_zero(&block.page_slice(p).unwrap()))
                .count()
        })
    });
    g.finish();
}

/// What a receiver pays to check a packet it has just received: one
/// 512 KiB payload (128 pages, one run), still in the CPU's caches.
fn received_payload(c: &mut Criterion) {
    const PAYLOAD: u64 = 128 * PAGE;
    let block = RamBlock::anonymous("bench", PAYLOAD, PAGE as u32).unwrap();
    fill_block(&block, Pattern::Random, 3);
    let mut g = c.benchmark_group("a received 512 KiB payload, in cache");
    g.throughput(Throughput::Bytes(PAYLOAD));
    g.bench_function("crc32fast", |b| {
        // SAFETY: nothing writes the block while the bench runs.
        let bytes = unsafe { block.bytes_unshared(0, PAYLOAD as usize) }.unwrap();
        b.iter(|| black_box(crc32fast::hash(bytes)))
    });
    g.bench_function("ferry_ram::crc32", |b| {
        let mem = block.as_volatile_slice();
        b.iter(|| black_box(crc32(0, &mem)))
    });
    g.finish();
}

criterion_group! {
    name = checksum;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    targets = pages, received_payload
}
criterion_main!(checksum);
