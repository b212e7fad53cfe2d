//! What a migration reports while it runs ([`Progress`]) and when it ends
//! ([`Summary`], printed by `ferry send/recv` as text or JSON).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_multifd::{Counters, Totals};
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Source,
    Destination,
}

/// Live figures of a running migration, for progress bars.
#[derive(Default)]
pub struct Progress {
    /// Bytes of guest RAM the migration covers.
    pub total_ram_bytes: AtomicU64,
    counters: OnceLock<Arc<Counters>>,
    phase: Mutex<&'static str>,
}

impl Progress {
    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap() = phase;
    }
    pub fn phase(&self) -> &'static str {
        *self.phase.lock().unwrap()
    }
    pub(crate) fn attach(&self, counters: Arc<Counters>) {
        let _ = self.counters.set(counters);
    }
    /// What the data path has moved so far.
    pub fn totals(&self) -> Totals {
        self.counters
            .get()
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }
    pub fn total_ram_bytes(&self) -> u64 {
        self.total_ram_bytes.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ZeroCopyReport {
    pub requested: bool,
    pub used: bool,
    pub sends: u64,
    /// Sends the kernel copied after all (always so on loopback).
    pub copied: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The end of a migration, on either side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// "completed" or "failed".
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub role: Role,
    pub session: String,
    pub uri: String,
    pub channels: u16,
    /// Guest RAM covered by pages sent or received (normal and zero).
    pub ram_bytes: u64,
    /// Every byte on every channel, handshakes and headers included.
    pub wire_bytes: u64,
    pub multifd_bytes: u64,
    pub pages_normal: u64,
    pub pages_zero: u64,
    pub packets: u64,
    pub passes: u64,
    pub seconds: f64,
    pub gbps_ram: f64,
    pub gbps_wire: f64,
    /// Digest of all guest RAM (see `ferry_ram::Digest`): on the source what
    /// it sent, on the destination what it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub device_state_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_state_digest: Option<String>,
    pub checksum: bool,
    pub checksum_mismatches: u64,
    /// Every channel ran over TLS.
    pub tls: bool,
    /// `zstd:LEVEL` on the source, `zstd` on the destination, when payloads
    /// may be compressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Page payload bytes per payload byte on the wire (1.0 uncompressed).
    pub compression_ratio: f64,
    /// Packets whose payload travelled compressed.
    pub compressed_packets: u64,
    /// Source only: how packets reached the sockets (`splice`, `copy`,
    /// `zero-copy`), and why the path asked for was not used, if it was not.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub send_path: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_path_note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_copy: Option<ZeroCopyReport>,
    /// Wall-clock time (Unix seconds) the migration started and ended on this side.
    pub started_at_unix: f64,
    pub finished_at_unix: f64,
}

impl Summary {
    pub(crate) fn new(role: Role, uri: String) -> Self {
        Self {
            status: "failed",
            role,
            uri,
            started_at_unix: unix_now(),
            ..Default::default()
        }
    }

    pub(crate) fn add_totals(&mut self, t: &Totals) {
        self.ram_bytes = t.ram_bytes;
        self.multifd_bytes = t.wire_bytes;
        self.wire_bytes += t.wire_bytes;
        self.pages_normal = t.pages_normal;
        self.pages_zero = t.pages_zero;
        self.packets = t.packets;
        self.checksum_mismatches = t.checksum_mismatches;
        self.compression_ratio = t.compression_ratio();
        self.compressed_packets = t.compressed_packets;
    }

    pub(crate) fn finish(&mut self, started: Instant, error: Option<String>) {
        self.seconds = started.elapsed().as_secs_f64();
        self.finished_at_unix = unix_now();
        let s = self.seconds.max(1e-9);
        self.gbps_ram = self.ram_bytes as f64 / s / 1e9;
        self.gbps_wire = self.wire_bytes as f64 / s / 1e9;
        self.status = if error.is_none() {
            "completed"
        } else {
            "failed"
        };
        self.error = error;
    }

    pub fn completed(&self) -> bool {
        self.status == "completed"
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
