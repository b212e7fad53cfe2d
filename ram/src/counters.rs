//! What the data path has moved: pages (data and zero), bytes of guest
//! RAM covered, bytes on the wire or in the file, packets and payloads.
//! One [`Counters`] is shared by whichever path moves a migration's pages
//! (the multifd pools, or file mode) and read at any time by the
//! controller's progress; [`Totals`] is a point-in-time copy.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live tallies, updated with relaxed atomics by the threads moving pages.
#[derive(Default, Debug)]
pub struct Counters {
    pub pages_normal: AtomicU64,
    pub pages_zero: AtomicU64,
    /// Bytes of guest memory accounted for (normal + zero pages).
    pub ram_bytes: AtomicU64,
    /// Bytes on the wire (headers, offsets and payloads), or of page data
    /// written to or read from a saved-guest file.
    pub wire_bytes: AtomicU64,
    pub packets: AtomicU64,
    /// Zero-copy sends that completed, and how many of them the kernel copied anyway.
    pub zero_copy_sends: AtomicU64,
    pub zero_copy_copied: AtomicU64,
    /// Pages whose payload failed its checksum (re-sent or not).
    pub checksum_mismatches: AtomicU64,
    /// Sender: pages of live packets that changed while in flight (sent again).
    pub pages_changed_in_flight: AtomicU64,
    /// Payload bytes of normal pages, and what they took on the wire
    /// (less when compressed).
    pub payload_raw: AtomicU64,
    pub payload_wire: AtomicU64,
    /// Packets whose payload travelled compressed.
    pub compressed_packets: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Totals {
        Totals {
            pages_normal: self.pages_normal.load(Relaxed),
            pages_zero: self.pages_zero.load(Relaxed),
            ram_bytes: self.ram_bytes.load(Relaxed),
            wire_bytes: self.wire_bytes.load(Relaxed),
            packets: self.packets.load(Relaxed),
            zero_copy_sends: self.zero_copy_sends.load(Relaxed),
            zero_copy_copied: self.zero_copy_copied.load(Relaxed),
            checksum_mismatches: self.checksum_mismatches.load(Relaxed),
            pages_changed_in_flight: self.pages_changed_in_flight.load(Relaxed),
            payload_raw: self.payload_raw.load(Relaxed),
            payload_wire: self.payload_wire.load(Relaxed),
            compressed_packets: self.compressed_packets.load(Relaxed),
        }
    }
    /// Accounts one packet: `normal` data and `zero` pages of `page_size`
    /// bytes, `wire` bytes on the wire.
    pub fn add_packet(&self, normal: u64, zero: u64, page_size: u64, wire: u64) {
        self.pages_normal.fetch_add(normal, Relaxed);
        self.pages_zero.fetch_add(zero, Relaxed);
        self.ram_bytes
            .fetch_add((normal + zero) * page_size, Relaxed);
        self.wire_bytes.fetch_add(wire, Relaxed);
        self.packets.fetch_add(1, Relaxed);
    }
    /// Accounts a payload of `raw` bytes that took `wire` bytes.
    pub fn add_payload(&self, raw: u64, wire: u64) {
        self.payload_raw.fetch_add(raw, Relaxed);
        self.payload_wire.fetch_add(wire, Relaxed);
        if wire < raw {
            self.compressed_packets.fetch_add(1, Relaxed);
        }
    }
}

/// A point-in-time copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub pages_normal: u64,
    pub pages_zero: u64,
    pub ram_bytes: u64,
    pub wire_bytes: u64,
    pub packets: u64,
    pub zero_copy_sends: u64,
    pub zero_copy_copied: u64,
    pub checksum_mismatches: u64,
    pub pages_changed_in_flight: u64,
    pub payload_raw: u64,
    pub payload_wire: u64,
    pub compressed_packets: u64,
}

impl Totals {
    /// Payload bytes per byte on the wire (1.0 without compression).
    pub fn compression_ratio(&self) -> f64 {
        if self.payload_wire == 0 {
            1.0
        } else {
            self.payload_raw as f64 / self.payload_wire as f64
        }
    }
}
